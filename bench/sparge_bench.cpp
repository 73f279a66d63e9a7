// sparq-sparge-bench: SpargeAttn on a GPU backend (issue #5, docs/SPARGE.md). Prints one JSON object per line
// (stdout) and notes (stderr).
//
//   sparq-sparge-bench [--backend auto|cuda|vulkan] [--batch 4] [--heads 32] [--dim 128] [--grid 16,32,32]
//                      [--width 4] [--block-k 128] [--simthreshd 0.5] [--cdfthreshd 0.95,0.999] [--iters 10]
//                      [--warmup 2] [--lut-dir DIR] [--tune-tokens 16384] [--pvthreshd inf]
//
// Workload: tokens on a (t, h, w) grid (N = t·h·w), q and k random Fourier features of the position (a smooth
// bump of peak logit ~20 and about --width cells around each query's own position), v smooth in the position;
// fp16 HND. One JSON line per τ of --cdfthreshd (same data).
// Measured (device times through Context::set_profiling, medians of --iters after --warmup):
//   dense        attention() end to end (K mean, quantization, kernel);
//   predict      the device predictor alone (predict_block_mask; its kernels, not the LUT allocation);
//   sparse       attention() with the predicted LUT, end to end;
//   sparge_wall  sparge_attention() wall clock (host overheads and allocations included);
//   sparge       the device time of sparge_attention()'s last backend call: where the backend predicts inside the
//                attention (CUDA), prediction + attention, so sparge − sparse is what the prediction adds;
//                elsewhere the attention alone; sparge_kernel: that call's attention kernel;
// effective TOPS = dense FLOPs (4·B·H·N²·D) / time. Accuracy: rel L1 of sparge_attention's output against
// dense attention()'s. --lut-dir writes each τ's LUT (DIR/tau<i>/counts.i32, indices.i32, lut.json) for
// bench/flex_lut.py.
// --tune-tokens > 0 times the tuner (host CPU) on one head of N tokens. --pvthreshd λ (finite) turns stage 2 on
// for every head of sparge_attention (the JSON line then gives the fraction of P·V tiles it skipped).
#include <sparq/sparge.hpp>
#include <sparq/sparq.hpp>

#include "reference.hpp"  // fp16 conversion

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {

struct Args {
  sparq::Backend backend = sparq::Backend::Auto;
  int batch = 4, heads = 32, dim = 128;
  int grid_t = 16, grid_h = 32, grid_w = 32;
  int block_k = 128;
  float simthreshd = 0.5f;
  float pvthreshd = std::numeric_limits<float>::infinity();
  std::vector<float> cdfthreshd = {0.95f, 0.999f};
  double width = 4.0;
  int iters = 10, warmup = 2;
  std::string lut_dir;
  int tune_tokens = 16384;
};

[[noreturn]] void usage(const std::string& why) {
  std::fprintf(stderr, "sparq-sparge-bench: %s\nsee the header of bench/sparge_bench.cpp for the options\n", why.c_str());
  std::exit(2);
}

double number(const std::string& s, const std::string& flag) {
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  if (s.empty() || *end) usage(flag + ": expected a number, got '" + s + "'");
  return v;
}

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string f = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage("missing value after " + f);
      return argv[++i];
    };
    if (f == "--backend") {
      const std::string v = value();
      if (v == "auto") a.backend = sparq::Backend::Auto;
      else if (v == "cuda") a.backend = sparq::Backend::Cuda;
      else if (v == "vulkan") a.backend = sparq::Backend::Vulkan;
      else if (v == "reference") a.backend = sparq::Backend::Reference;
      else usage("unknown backend " + v);
    } else if (f == "--batch") a.batch = static_cast<int>(number(value(), f));
    else if (f == "--heads") a.heads = static_cast<int>(number(value(), f));
    else if (f == "--dim") a.dim = static_cast<int>(number(value(), f));
    else if (f == "--grid") {
      std::stringstream ss(value());
      std::string t, h, w;
      std::getline(ss, t, ',');
      std::getline(ss, h, ',');
      std::getline(ss, w, ',');
      a.grid_t = static_cast<int>(number(t, f)), a.grid_h = static_cast<int>(number(h, f));
      a.grid_w = static_cast<int>(number(w, f));
    } else if (f == "--block-k") a.block_k = static_cast<int>(number(value(), f));
    else if (f == "--simthreshd") a.simthreshd = static_cast<float>(number(value(), f));
    else if (f == "--pvthreshd") a.pvthreshd = static_cast<float>(number(value(), f));
    else if (f == "--cdfthreshd") {
      a.cdfthreshd.clear();
      std::stringstream ss(value());
      std::string item;
      while (std::getline(ss, item, ',')) a.cdfthreshd.push_back(static_cast<float>(number(item, f)));
    } else if (f == "--width") a.width = number(value(), f);
    else if (f == "--iters") a.iters = static_cast<int>(number(value(), f));
    else if (f == "--warmup") a.warmup = static_cast<int>(number(value(), f));
    else if (f == "--lut-dir") a.lut_dir = value();
    else if (f == "--tune-tokens") a.tune_tokens = static_cast<int>(number(value(), f));
    else usage("unknown argument " + f);
  }
  if (a.iters < 1 || a.batch < 1 || a.heads < 1 || a.dim < 2) usage("sizes and --iters must be positive");
  return a;
}

// q, k, v of one (batch, head) on the grid: per head random frequencies ω_f (3-D) and phases; q_n and k_n hold
// amp·(cos, sin)(ω_f·pos_n + φ_f) plus 5% noise, so q_i·k_j ≈ amp²·Σ_f cos(ω_f·(pos_i − pos_j)) peaks at i = j.
struct Grid {
  int t, h, w;
  int tokens() const { return t * h * w; }
};

void fill_head(const Grid& g, int D, double width, uint64_t seed, uint16_t* q, uint16_t* k, uint16_t* v) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  const int F = D / 2;
  const double peak = 20.0;
  const double amp = std::sqrt(peak * std::sqrt(static_cast<double>(D)) / F);
  std::vector<double> omega(static_cast<std::size_t>(F) * 3), phase(static_cast<std::size_t>(F)), vw(static_cast<std::size_t>(D) * 4);
  for (double& o : omega) o = nd(rng) / width;
  for (double& p : phase) p = 3.0 * nd(rng);
  for (double& x : vw) x = nd(rng);
  for (int n = 0; n < g.tokens(); ++n) {
    const double pt = n / (g.h * g.w), py = (n / g.w) % g.h, px = n % g.w;
    for (int f = 0; f < F; ++f) {
      const double arg = omega[3 * f] * pt + omega[3 * f + 1] * py + omega[3 * f + 2] * px + phase[static_cast<std::size_t>(f)];
      const double c = amp * std::cos(arg), s = amp * std::sin(arg);
      const std::size_t at = static_cast<std::size_t>(n) * D + 2 * f;
      q[at] = sparq::reference::float_to_half(static_cast<float>(c + 0.05 * amp * nd(rng)));
      q[at + 1] = sparq::reference::float_to_half(static_cast<float>(s + 0.05 * amp * nd(rng)));
      k[at] = sparq::reference::float_to_half(static_cast<float>(c + 0.05 * amp * nd(rng)));
      k[at + 1] = sparq::reference::float_to_half(static_cast<float>(s + 0.05 * amp * nd(rng)));
    }
    for (int c = 0; c < D; ++c) {
      const double* a = vw.data() + 4 * c;
      v[static_cast<std::size_t>(n) * D + c] = sparq::reference::float_to_half(
          static_cast<float>(std::sin(0.3 * a[0] * px + 0.3 * a[1] * py + 0.5 * a[2] * pt + a[3]) + 0.3 * nd(rng)));
    }
  }
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

std::vector<float> download_f16(sparq::Context& ctx, const sparq::Tensor& t) {
  std::vector<uint16_t> h(static_cast<std::size_t>(t.numel()));
  ctx.to_host(t, h.data());
  std::vector<float> f(h.size());
  for (std::size_t i = 0; i < h.size(); ++i) f[i] = sparq::reference::half_to_float(h[i]);
  return f;
}

}  // namespace

int main(int argc, char** argv) {
  const Args a = parse(argc, argv);
  try {
    sparq::Context ctx = sparq::Context::create(a.backend);
    std::fprintf(stderr, "sparq-sparge-bench: backend %s, device %s\n", sparq::to_string(ctx.backend()),
                 ctx.device_name().c_str());
    const Grid g{a.grid_t, a.grid_h, a.grid_w};
    const int B = a.batch, H = a.heads, N = g.tokens(), D = a.dim;
    const std::size_t head_elems = static_cast<std::size_t>(N) * D, n = static_cast<std::size_t>(B) * H * head_elems;
    std::vector<uint16_t> q(n), k(n), v(n);
    {
      std::vector<std::thread> pool;
      const int bh_total = B * H;
      const int threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
      for (int t = 0; t < threads; ++t)
        pool.emplace_back([&, t] {
          for (int bh = t; bh < bh_total; bh += threads)
            fill_head(g, D, a.width, 1000 + static_cast<uint64_t>(bh), q.data() + bh * head_elems, k.data() + bh * head_elems,
                      v.data() + bh * head_elems);
        });
      for (auto& th : pool) th.join();
    }
    const std::vector<int64_t> shape = {B, H, N, D};
    sparq::Tensor tq = ctx.from_host(sparq::DType::F16, shape, q.data());
    sparq::Tensor tk = ctx.from_host(sparq::DType::F16, shape, k.data());
    sparq::Tensor tv = ctx.from_host(sparq::DType::F16, shape, v.data());
    sparq::Tensor dense_out = ctx.empty(sparq::DType::F16, shape), sparse_out = ctx.empty(sparq::DType::F16, shape);
    const double flops = 4.0 * B * H * double(N) * N * D;
    ctx.set_profiling(true);

    // dense
    std::vector<double> dense_ms, dense_kernel_ms;
    for (int it = 0; it < a.warmup + a.iters; ++it) {
      sparq::attention(ctx, tq, tk, tv, dense_out);
      ctx.synchronize();
      if (it >= a.warmup) dense_ms.push_back(ctx.last_timing().total_ms), dense_kernel_ms.push_back(ctx.last_timing().attention_ms);
    }

    // the predictor (Hilbert order applied beforehand: the grid's tokens in curve order)
    sparq::SpargeOptions opt;
    opt.block_k = a.block_k;
    sparq::SpargeParams params;
    params.simthreshd = a.simthreshd;
    params.pvthreshd = a.pvthreshd;
    const std::vector<int64_t> order = sparq::hilbert_order(g.t, g.h, g.w);
    sparq::Tensor hq = ctx.empty(sparq::DType::F16, shape), hk = ctx.empty(sparq::DType::F16, shape),
                  hv = ctx.empty(sparq::DType::F16, shape);
    auto wall = [&](auto&& f) {
      ctx.synchronize();
      const auto t0 = std::chrono::steady_clock::now();
      f();
      ctx.synchronize();
      return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    };
    const double permute_ms = wall([&] {
      sparq::permute_tokens(ctx, tq, hq, order);
      sparq::permute_tokens(ctx, tk, hk, order);
      sparq::permute_tokens(ctx, tv, hv, order);
    });
    const double dense = median(dense_ms);
    const std::vector<float> d = download_f16(ctx, dense_out);
    for (std::size_t ti = 0; ti < a.cdfthreshd.size(); ++ti) {
      params.cdfthreshd = a.cdfthreshd[ti];
      opt.hilbert.reset();
      std::vector<double> predict_ms, predict_wall_ms;
      sparq::SpargeStats pst;
      sparq::BlockMask mask;
      for (int it = 0; it < a.warmup + a.iters; ++it) {
        const double w = wall([&] { mask = sparq::predict_block_mask(ctx, hq, hk, opt, {params}, &pst); });
        if (it >= a.warmup) predict_ms.push_back(ctx.last_timing().total_ms), predict_wall_ms.push_back(w);
      }
      std::vector<double> sparse_ms, sparse_kernel_ms;
      for (int it = 0; it < a.warmup + a.iters; ++it) {
        sparq::attention(ctx, hq, hk, hv, sparse_out, {}, &mask);
        ctx.synchronize();
        if (it >= a.warmup) sparse_ms.push_back(ctx.last_timing().total_ms), sparse_kernel_ms.push_back(ctx.last_timing().attention_ms);
      }
      // sparge_attention end to end (permutation, prediction, attention, unpermutation), wall clock
      opt.hilbert = sparq::TokenGrid{g.t, g.h, g.w};
      std::vector<double> sparge_wall_ms, sparge_ms, sparge_kernel_ms;
      sparq::SpargeStats st;
      for (int it = 0; it < a.warmup + a.iters; ++it) {
        const double w = wall([&] { sparq::sparge_attention(ctx, tq, tk, tv, sparse_out, opt, {params}, &st); });
        if (it >= a.warmup)
          sparge_wall_ms.push_back(w), sparge_ms.push_back(ctx.last_timing().total_ms),
              sparge_kernel_ms.push_back(ctx.last_timing().attention_ms);
      }
      const std::vector<float> s = download_f16(ctx, sparse_out);
      double num = 0, den = 0;
      for (std::size_t i = 0; i < d.size(); ++i) num += std::fabs(double(s[i]) - d[i]), den += std::fabs(double(d[i]));
      const double rel_l1 = den > 0 ? num / den : 0;

      const double pred = median(predict_ms), sparse = median(sparse_ms);
      const std::string pvthreshd_json = std::isfinite(params.pvthreshd) ? std::to_string(params.pvthreshd) : "null";
      std::printf("{\"backend\": \"%s\", \"B\": %d, \"H\": %d, \"N\": %d, \"D\": %d, \"grid\": [%d, %d, %d], "
                  "\"width\": %.2f, \"block_q\": %d, \"block_k\": %d, \"simthreshd\": %.3f, \"cdfthreshd\": %.5f, "
                  "\"predicted_on_device\": %s, \"block_sparsity\": %.4f, \"rel_l1_vs_dense\": %.5f, "
                  "\"dense_ms\": %.4f, \"dense_kernel_ms\": %.4f, \"predict_ms\": %.4f, \"predict_wall_ms\": %.3f, "
                  "\"predict_over_dense\": %.4f, \"sparse_ms\": %.4f, \"sparse_kernel_ms\": %.4f, "
                  "\"permute3_wall_ms\": %.3f, \"sparge_ms\": %.4f, \"sparge_kernel_ms\": %.4f, \"sparge_wall_ms\": %.3f, \"dense_tops\": %.1f, "
                  "\"sparse_eff_tops\": %.1f, \"predict_plus_sparse_eff_tops\": %.1f, \"sparge_wall_eff_tops\": %.1f, "
                  "\"pvthreshd\": %s, \"pv_skipped_fraction\": %.4f}\n",
                  sparq::to_string(ctx.backend()), B, H, N, D, g.t, g.h, g.w, a.width, opt.block_q, opt.block_k,
                  a.simthreshd, params.cdfthreshd, pst.predicted_on_device ? "true" : "false", st.block_sparsity, rel_l1,
                  dense, median(dense_kernel_ms), pred, median(predict_wall_ms), pred / dense, sparse,
                  median(sparse_kernel_ms), permute_ms, median(sparge_ms), median(sparge_kernel_ms), median(sparge_wall_ms), flops / dense / 1e9, flops / sparse / 1e9,
                  flops / (pred + sparse) / 1e9, flops / median(sparge_wall_ms) / 1e9, pvthreshd_json.c_str(),
                  st.pv_total > 0 ? double(st.pv_skipped) / double(st.pv_total) : 0.0);
      std::fflush(stdout);

      if (!a.lut_dir.empty()) {
        const std::string dir = a.lut_dir + "/tau" + std::to_string(ti);
        std::filesystem::create_directories(dir);
        const auto& cs = mask.counts().shape();
        const auto& is = mask.indices().shape();
        std::vector<int32_t> counts(static_cast<std::size_t>(mask.counts().numel())),
            indices(static_cast<std::size_t>(mask.indices().numel()));
        ctx.to_host(mask.counts(), counts.data());
        ctx.to_host(mask.indices(), indices.data());
        std::ofstream(dir + "/counts.i32", std::ios::binary)
            .write(reinterpret_cast<const char*>(counts.data()), static_cast<std::streamsize>(counts.size() * 4));
        std::ofstream(dir + "/indices.i32", std::ios::binary)
            .write(reinterpret_cast<const char*>(indices.data()), static_cast<std::streamsize>(indices.size() * 4));
        std::ofstream(dir + "/lut.json") << "{\"B\": " << cs[0] << ", \"H\": " << cs[1] << ", \"nqb\": " << cs[2]
                                         << ", \"nkb\": " << is[3] << ", \"N\": " << N << ", \"D\": " << D
                                         << ", \"block_q\": " << opt.block_q << ", \"block_k\": " << opt.block_k
                                         << ", \"cdfthreshd\": " << params.cdfthreshd << "}\n";
      }
    }

    if (a.tune_tokens > 0) {
      // The tuner (host CPU): one head, one sample of tune_tokens tokens of the same workload.
      const int tn = a.tune_tokens;
      Grid tg{1, 1, tn};
      std::vector<uint16_t> q1(static_cast<std::size_t>(tn) * D), k1(q1.size()), v1(q1.size());
      fill_head(tg, D, a.width, 7, q1.data(), k1.data(), v1.data());
      std::vector<float> fq(q1.size()), fk(q1.size()), fv(q1.size());
      for (std::size_t i = 0; i < q1.size(); ++i)
        fq[i] = sparq::reference::half_to_float(q1[i]), fk[i] = sparq::reference::half_to_float(k1[i]),
        fv[i] = sparq::reference::half_to_float(v1[i]);
      sparq::SpargeOptions topt;
      topt.block_k = a.block_k;
      sparq::Tuner tuner(topt, sparq::TunerOptions{});
      const auto t0 = std::chrono::steady_clock::now();
      tuner.observe_host("layer", 1, 1, 1, tn, tn, D, fq.data(), fk.data(), fv.data());
      sparq::HyperParams hp = tuner.tune();
      const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      const sparq::SpargeParams& r = hp.layer("layer", 1)[0];
      std::printf("{\"tuner\": true, \"N\": %d, \"D\": %d, \"heads\": 1, \"seconds_per_head\": %.2f, \"threads\": %u, "
                  "\"simthreshd\": %.2f, \"cdfthreshd\": %.5f, \"dense\": %s}\n",
                  tn, D, sec, std::thread::hardware_concurrency(), r.simthreshd, r.cdfthreshd, r.dense ? "true" : "false");
    }
    return 0;
  } catch (const sparq::Error& e) {
    std::fprintf(stderr, "sparq error (%s): %s\n", sparq::to_string(e.status()), e.what());
    return 1;
  }
}
