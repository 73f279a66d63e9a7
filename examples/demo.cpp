// sparq-demo: attention on realistic synthetic inputs on the best available backend (or --backend), checked
// against exact fp64 attention on sampled query rows, with the device time.
//
//   sparq-demo [--backend auto|cuda|vulkan|reference] [--batch 1] [--heads 8] [--seq 1024] [--dim 128]
//              [--causal] [--pv auto|fp16|fp8] [--granularity block|warp|thread (default)]
#include <sparq/sparq.hpp>

#include "reference.hpp"  // fp16 conversion

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace {

struct Args {
  sparq::Backend backend = sparq::Backend::Auto;
  int64_t batch = 1, heads = 8, seq = 1024, dim = 128;
  bool causal = false;
  sparq::PVPrecision pv = sparq::PVPrecision::Auto;
  // Per-thread INT8 groups: about per-token accuracy at per-block cost (the peaked attention of
  // transformer-like inputs amplifies Q·Kᵀ quantization error; per block misses the cosine budget here).
  sparq::QKGranularity granularity = sparq::QKGranularity::PerThread;
};

[[noreturn]] void usage(const char* why) {
  std::fprintf(stderr,
               "sparq-demo: %s\nusage: sparq-demo [--backend auto|cuda|vulkan|reference] [--batch B] [--heads H] "
               "[--seq N] [--dim D] [--causal] [--pv auto|fp16|fp8] [--granularity block|warp|thread]\n",
               why);
  std::exit(2);
}

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string f = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage(("missing value after " + f).c_str());
      return argv[++i];
    };
    auto number = [&]() -> int64_t {
      std::string v = value();
      char* end = nullptr;
      long long n = std::strtoll(v.c_str(), &end, 10);
      if (*end || n <= 0) usage((f + " needs a positive integer, got " + v).c_str());
      return n;
    };
    if (f == "--backend") {
      std::string v = value();
      if (v == "auto") a.backend = sparq::Backend::Auto;
      else if (v == "cuda") a.backend = sparq::Backend::Cuda;
      else if (v == "vulkan") a.backend = sparq::Backend::Vulkan;
      else if (v == "reference") a.backend = sparq::Backend::Reference;
      else usage(("unknown backend " + v).c_str());
    } else if (f == "--batch") a.batch = number();
    else if (f == "--heads") a.heads = number();
    else if (f == "--seq") a.seq = number();
    else if (f == "--dim") a.dim = number();
    else if (f == "--causal") a.causal = true;
    else if (f == "--pv") {
      std::string v = value();
      if (v == "auto") a.pv = sparq::PVPrecision::Auto;
      else if (v == "fp16") a.pv = sparq::PVPrecision::Fp16;
      else if (v == "fp8") a.pv = sparq::PVPrecision::Fp8;
      else usage(("unknown --pv " + v).c_str());
    } else if (f == "--granularity") {
      std::string v = value();
      if (v == "block") a.granularity = sparq::QKGranularity::PerBlock;
      else if (v == "warp") a.granularity = sparq::QKGranularity::PerWarp;
      else if (v == "thread") a.granularity = sparq::QKGranularity::PerThread;
      else usage(("unknown --granularity " + v).c_str());
    } else if (f == "--help" || f == "-h") usage("help");
    else usage(("unknown argument " + f).c_str());
  }
  return a;
}

// Activations shaped like a transformer's: q and k share a few strong directions (so attention is peaked,
// not uniform), K carries a per-channel bias (what smoothing removes), v is plain noise.
void synthetic(const Args& a, std::vector<float>& q, std::vector<float>& k, std::vector<float>& v) {
  std::mt19937 rng(1234);
  std::normal_distribution<float> n01(0.0f, 1.0f);
  const int64_t D = a.dim, rank = 8;
  std::vector<float> basis(rank * D), bias(D);
  for (auto& x : basis) x = n01(rng);
  for (auto& x : bias) x = 3.0f * n01(rng);
  auto fill = [&](std::vector<float>& t, float structured, const std::vector<float>* add) {
    t.resize(a.batch * a.heads * a.seq * D);
    for (int64_t row = 0; row < a.batch * a.heads * a.seq; ++row) {
      float c[rank];
      for (auto& x : c) x = n01(rng);
      for (int64_t d = 0; d < D; ++d) {
        float s = 0;
        for (int r = 0; r < rank; ++r) s += c[r] * basis[r * D + d];
        t[row * D + d] = structured * s / std::sqrt(float(rank)) + n01(rng) + (add ? (*add)[d] : 0.0f);
      }
    }
  };
  fill(q, 1.5f, nullptr);
  fill(k, 1.5f, &bias);
  fill(v, 0.0f, nullptr);
}

}  // namespace

int main(int argc, char** argv) {
  Args a = parse(argc, argv);
  try {
    sparq::Context ctx = sparq::Context::create(a.backend);
    std::printf("sparq %s | backend: %s | device: %s\n", sparq::version(), sparq::to_string(ctx.backend()),
                ctx.device_name().c_str());
    std::printf("shape: B=%lld H=%lld N=%lld D=%lld, %s, fp16 HND\n", (long long)a.batch, (long long)a.heads,
                (long long)a.seq, (long long)a.dim, a.causal ? "causal" : "non-causal");

    std::vector<float> qf, kf, vf;
    synthetic(a, qf, kf, vf);
    auto to_half = [](const std::vector<float>& f) {
      std::vector<uint16_t> h(f.size());
      for (size_t i = 0; i < f.size(); ++i) h[i] = sparq::reference::float_to_half(f[i]);
      return h;
    };
    auto qh = to_half(qf), kh = to_half(kf), vh = to_half(vf);
    std::vector<int64_t> shape = {a.batch, a.heads, a.seq, a.dim};
    sparq::Tensor q = ctx.from_host(sparq::DType::F16, shape, qh.data());
    sparq::Tensor k = ctx.from_host(sparq::DType::F16, shape, kh.data());
    sparq::Tensor v = ctx.from_host(sparq::DType::F16, shape, vh.data());
    sparq::Tensor out = ctx.empty(sparq::DType::F16, shape);
    sparq::AttentionOptions options;
    options.causal = a.causal;
    options.pv_precision = a.pv;
    options.qk_granularity = a.granularity;

    ctx.set_profiling(true);
    sparq::attention(ctx, q, k, v, out, options);  // warm-up: pipelines, workspaces
    ctx.synchronize();
    auto t0 = std::chrono::steady_clock::now();
    sparq::attention(ctx, q, k, v, out, options);
    ctx.synchronize();
    double wall_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    sparq::Timing timing = ctx.last_timing();

    std::vector<uint16_t> oh(qh.size());
    ctx.to_host(out, oh.data());

    // Exact fp64 attention on sampled rows of every (batch, head) (from the same fp16-rounded inputs).
    const int64_t N = a.seq, D = a.dim, samples = std::min<int64_t>(N, 64);
    const double scale = 1.0 / std::sqrt(double(D));
    double l1 = 0, l1_ref = 0, dot = 0, nrm_o = 0, nrm_r = 0;
    bool finite = true;
    std::vector<double> logits(N), ref(D);
    for (int64_t bh = 0; bh < a.batch * a.heads; ++bh) {
      for (int64_t s = 0; s < samples; ++s) {
        int64_t i = (s * 7919 + bh * 31) % N;
        int64_t visible = a.causal ? i + 1 : N;
        double m = -INFINITY;
        for (int64_t j = 0; j < visible; ++j) {
          double acc = 0;
          for (int64_t d = 0; d < D; ++d)
            acc += double(sparq::reference::half_to_float(qh[(bh * N + i) * D + d])) *
                   sparq::reference::half_to_float(kh[(bh * N + j) * D + d]);
          logits[j] = acc * scale;
          m = std::max(m, logits[j]);
        }
        double sum = 0;
        std::fill(ref.begin(), ref.end(), 0.0);
        for (int64_t j = 0; j < visible; ++j) {
          double p = std::exp(logits[j] - m);
          sum += p;
          for (int64_t d = 0; d < D; ++d) ref[d] += p * sparq::reference::half_to_float(vh[(bh * N + j) * D + d]);
        }
        for (int64_t d = 0; d < D; ++d) {
          double r = ref[d] / sum, o = sparq::reference::half_to_float(oh[(bh * N + i) * D + d]);
          finite = finite && std::isfinite(o);
          l1 += std::fabs(o - r);
          l1_ref += std::fabs(r);
          dot += o * r;
          nrm_o += o * o;
          nrm_r += r * r;
        }
      }
    }
    double rel_l1 = l1 / l1_ref, cosine = dot / std::sqrt(nrm_o * nrm_r);
    double flops = 4.0 * a.batch * a.heads * N * N * D / (a.causal ? 2 : 1);
    std::printf("accuracy vs exact fp64 (%lld sampled rows): rel L1 = %.5f, cosine = %.6f%s\n",
                (long long)(samples * a.batch * a.heads), rel_l1, cosine, finite ? "" : "  (NON-FINITE OUTPUT)");
    std::printf("time: %.3f ms device end-to-end (%.3f ms attention kernel), %.3f ms wall; %.4g TOPS end-to-end\n",
                timing.total_ms, timing.attention_ms, wall_ms, timing.total_ms > 0 ? flops / timing.total_ms / 1e9 : 0);
    // BENCH.md's budget for the path that ran (int8 Q·Kᵀ with fp16 or fp8 P·V).
    sparq::PVPrecision pv = a.pv == sparq::PVPrecision::Auto ? ctx.default_pv_precision() : a.pv;
    bool fp8 = pv == sparq::PVPrecision::Fp8;
    double max_l1 = fp8 ? 0.03 : 0.015, min_cos = fp8 ? 0.9995 : 0.9999;
    bool ok = finite && rel_l1 <= max_l1 && cosine >= min_cos;
    std::printf("%s the int8/%s budget (rel L1 <= %g, cosine >= %g)\n", ok ? "OK: within" : "FAIL: outside",
                fp8 ? "fp8" : "fp16", max_l1, min_cos);
    return ok ? 0 : 1;
  } catch (const sparq::Error& e) {
    std::fprintf(stderr, "sparq error (%s): %s\n", sparq::to_string(e.status()), e.what());
    return 1;
  }
}
