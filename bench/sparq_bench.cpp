// sparq-bench: BENCH.md's protocol. Prints one JSON object per line (stdout) and a table (stderr).
//
//   sparq-bench [--backend auto|cuda|vulkan|reference] [--batch 4] [--heads 32] [--dims 64,128]
//               [--seqs 1024,4096,16384,32768] [--causal 0,1] [--densities 1,0.5,0.25,0.1]
//               [--pv auto|fp16|fp8] [--iters 20] [--warmup 3] [--seed 0]
//
// Times are device times (Context::set_profiling), the median of --iters runs after --warmup runs.
// end-to-end = from fp16 q, k, v (smoothing, quantization included); kernel = the attention kernel alone.
// Sparse runs use a random 128x128 block pattern at the given density plus the diagonal (seeded).
#include <sparq/sparq.hpp>

#include "reference.hpp"  // fp16 conversion

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {

struct Args {
  sparq::Backend backend = sparq::Backend::Auto;
  int64_t batch = 4, heads = 32;
  std::vector<int64_t> dims = {64, 128}, seqs = {1024, 4096, 16384, 32768};
  std::vector<int64_t> causal = {0, 1};
  std::vector<double> densities = {1.0, 0.5, 0.25, 0.1};
  sparq::PVPrecision pv = sparq::PVPrecision::Auto;
  int iters = 20, warmup = 3;
  uint64_t seed = 0;
};

[[noreturn]] void usage(const std::string& why) {
  std::fprintf(stderr, "sparq-bench: %s\nsee the header of bench/sparq_bench.cpp for the options\n", why.c_str());
  std::exit(2);
}

template <class T>
std::vector<T> list(const std::string& s, const std::string& flag) {
  std::vector<T> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    char* end = nullptr;
    double v = std::strtod(item.c_str(), &end);
    if (item.empty() || *end || v < 0) usage(flag + ": bad list entry '" + item + "'");
    out.push_back(static_cast<T>(v));
  }
  if (out.empty()) usage(flag + ": empty list");
  return out;
}

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string f = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage("missing value after " + f);
      return argv[++i];
    };
    if (f == "--backend") {
      std::string v = value();
      if (v == "auto") a.backend = sparq::Backend::Auto;
      else if (v == "cuda") a.backend = sparq::Backend::Cuda;
      else if (v == "vulkan") a.backend = sparq::Backend::Vulkan;
      else if (v == "reference") a.backend = sparq::Backend::Reference;
      else usage("unknown backend " + v);
    } else if (f == "--batch") a.batch = list<int64_t>(value(), f)[0];
    else if (f == "--heads") a.heads = list<int64_t>(value(), f)[0];
    else if (f == "--dims") a.dims = list<int64_t>(value(), f);
    else if (f == "--seqs") a.seqs = list<int64_t>(value(), f);
    else if (f == "--causal") a.causal = list<int64_t>(value(), f);
    else if (f == "--densities") a.densities = list<double>(value(), f);
    else if (f == "--iters") a.iters = static_cast<int>(list<int64_t>(value(), f)[0]);
    else if (f == "--warmup") a.warmup = static_cast<int>(list<int64_t>(value(), f)[0]);
    else if (f == "--seed") a.seed = static_cast<uint64_t>(list<int64_t>(value(), f)[0]);
    else if (f == "--pv") {
      std::string v = value();
      if (v == "auto") a.pv = sparq::PVPrecision::Auto;
      else if (v == "fp16") a.pv = sparq::PVPrecision::Fp16;
      else if (v == "fp8") a.pv = sparq::PVPrecision::Fp8;
      else usage("unknown --pv " + v);
    } else usage("unknown argument " + f);
  }
  if (a.iters < 1) usage("--iters must be >= 1");
  return a;
}

// N(0,1) fp16 data (plus a per-channel bias for K), generated on all cores: BENCH.md's inputs.
std::vector<uint16_t> random_half(int64_t n, int64_t dim, uint64_t seed, float bias_scale) {
  std::vector<uint16_t> out(static_cast<size_t>(n));
  std::vector<float> bias(static_cast<size_t>(dim));
  std::mt19937_64 brng(seed ^ 0x9E3779B97F4A7C15ull);
  std::normal_distribution<float> bn(0.0f, 1.0f);
  for (auto& b : bias) b = bias_scale * bn(brng);
  unsigned threads = std::max(1u, std::thread::hardware_concurrency());
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      std::mt19937_64 rng(seed * 1000003 + t);
      std::normal_distribution<float> n01(0.0f, 1.0f);
      int64_t chunk = (n + threads - 1) / threads, begin = t * chunk, end = std::min(n, begin + chunk);
      for (int64_t i = begin; i < end; ++i) out[i] = sparq::reference::float_to_half(n01(rng) + bias[i % dim]);
    });
  for (auto& th : pool) th.join();
  return out;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct Row {
  int64_t D, N;
  bool causal;
  double density, e2e_ms, kernel_ms, tops, kernel_tops, efficiency;
};

}  // namespace

int main(int argc, char** argv) {
  Args a = parse(argc, argv);
  try {
    sparq::Context ctx = sparq::Context::create(a.backend);
    std::fprintf(stderr, "sparq-bench: backend %s, device %s\n", sparq::to_string(ctx.backend()),
                 ctx.device_name().c_str());
    ctx.set_profiling(true);
    std::vector<Row> rows;
    const int block = 128;
    for (int64_t D : a.dims) {
      for (int64_t N : a.seqs) {
        std::vector<int64_t> shape = {a.batch, a.heads, N, D};
        int64_t n = a.batch * a.heads * N * D;
        sparq::Tensor q = ctx.from_host(sparq::DType::F16, shape, random_half(n, D, a.seed * 3 + 1, 0.0f).data());
        sparq::Tensor k = ctx.from_host(sparq::DType::F16, shape, random_half(n, D, a.seed * 3 + 2, 2.0f).data());
        sparq::Tensor v = ctx.from_host(sparq::DType::F16, shape, random_half(n, D, a.seed * 3 + 3, 0.0f).data());
        sparq::Tensor out = ctx.empty(sparq::DType::F16, shape);
        for (int64_t causal : a.causal) {
          double dense_e2e = 0;
          for (double density : a.densities) {
            if (causal && density < 1.0) continue;  // BENCH.md: sparse patterns are non-causal
            sparq::AttentionOptions options;
            options.causal = causal != 0;
            options.pv_precision = a.pv;
            sparq::BlockMask mask;
            bool sparse = density < 1.0;
            double actual_density = 1.0;
            if (sparse) {
              int64_t nb = (N + block - 1) / block;
              std::vector<uint8_t> bits(static_cast<size_t>(a.batch * a.heads * nb * nb));
              std::mt19937_64 rng(a.seed + 7);
              std::uniform_real_distribution<double> u(0.0, 1.0);
              int64_t on = 0;
              for (int64_t bh = 0; bh < a.batch * a.heads; ++bh)
                for (int64_t i = 0; i < nb; ++i)
                  for (int64_t j = 0; j < nb; ++j) {
                    uint8_t bit = (u(rng) < density || i == j) ? 1 : 0;
                    bits[(bh * nb + i) * nb + j] = bit;
                    on += bit;
                  }
              actual_density = double(on) / double(bits.size());
              sparq::Tensor bitmap = ctx.from_host(sparq::DType::U8, {a.batch, a.heads, nb, nb}, bits.data());
              mask = sparq::BlockMask::from_bitmap(bitmap, block, block);
            }
            std::vector<double> e2e, kernel;
            for (int it = 0; it < a.warmup + a.iters; ++it) {
              sparq::attention(ctx, q, k, v, out, options, sparse ? &mask : nullptr);
              ctx.synchronize();
              if (it < a.warmup) continue;
              sparq::Timing t = ctx.last_timing();
              e2e.push_back(t.total_ms);
              kernel.push_back(t.attention_ms);
            }
            Row r{D, N, causal != 0, actual_density, median(e2e), median(kernel), 0, 0, 0};
            double flops = 4.0 * a.batch * a.heads * N * N * D / (causal ? 2 : 1);
            r.tops = flops / r.e2e_ms / 1e9;
            r.kernel_tops = flops / r.kernel_ms / 1e9;
            if (!sparse) dense_e2e = r.e2e_ms;
            r.efficiency = sparse && dense_e2e > 0 ? actual_density * dense_e2e / r.e2e_ms : 1.0;
            rows.push_back(r);
            std::printf("{\"method\": \"sparq-%s\", \"B\": %lld, \"H\": %lld, \"N\": %lld, \"D\": %lld, "
                        "\"causal\": %s, \"density\": %.4f, \"ms\": %.4f, \"kernel_ms\": %.4f, \"eff_tops\": %.2f, "
                        "\"kernel_tops\": %.2f, \"sparse_efficiency\": %.3f}\n",
                        sparq::to_string(ctx.backend()), (long long)a.batch, (long long)a.heads, (long long)N,
                        (long long)D, causal ? "true" : "false", r.density, r.e2e_ms, r.kernel_ms, r.tops,
                        r.kernel_tops, r.efficiency);
            std::fflush(stdout);
          }
        }
      }
    }
    std::fprintf(stderr, "\n|   D |     N | causal | density | end-to-end ms | TOPS | kernel ms | kernel TOPS | sparse eff |\n"
                         "|---|---|---|---|---|---|---|---|---|\n");
    for (const Row& r : rows)
      std::fprintf(stderr, "| %3lld | %5lld | %s | %.3f | %.3f | %.1f | %.3f | %.1f | %.2f |\n", (long long)r.D,
                   (long long)r.N, r.causal ? "yes" : "no", r.density, r.e2e_ms, r.tops, r.kernel_ms, r.kernel_tops,
                   r.efficiency);
    return 0;
  } catch (const sparq::Error& e) {
    std::fprintf(stderr, "sparq error (%s): %s\n", sparq::to_string(e.status()), e.what());
    return 1;
  }
}
