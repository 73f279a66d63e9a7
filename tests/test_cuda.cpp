// The CUDA backend against the reference emulation (what the quantized kernels must compute) and exact fp64
// attention (the BENCH.md budget). Skips, with a message, when no CUDA device is usable.
//
// Tolerances against the emulation (stated here, checked below): the kernels use the hardware exp2
// approximation and a different fp32 summation order, so P (hence its fp16 / e4m3 rounding) may differ by an
// ulp from the emulation's: rel L1 ≤ 2e-3 with FP16 P·V, ≤ 1e-2 with FP8 P·V; LSE within 1e-3 absolute (or, for
// the integer-exact inputs' LSE of ~1e4, where 1e-3 is one fp32 ulp, within 2 ulps).
// Integer-exact inputs (no smoothing) make the INT8 Q·Kᵀ exact on both sides, so the logits are identical.
#include <doctest/doctest.h>

#include "harness.hpp"

#include <sparq/sparge.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <memory>
#include <vector>

using namespace sparq;
using namespace sparq::test;

namespace {

// The CUDA context, or null (after one message) when the backend or a device is missing.
Context* cuda_ctx() {
  static std::unique_ptr<Context> ctx;
  static bool tried = false;
  if (!tried) {
    tried = true;
    try {
      ctx = std::make_unique<Context>(Context::create(Backend::Cuda));
      std::printf("[cuda] running on %s\n", ctx->device_name().c_str());
    } catch (const Error& e) {
      if (e.status() != Status::BackendUnavailable) throw;
      std::printf("[cuda] SKIPPED: no usable CUDA device (%s); the cuda suite passes without running\n", e.what());
    }
  }
  return ctx.get();
}

double emulation_tolerance(const Case& c) { return c.pv_precision == PVPrecision::Fp8 ? 1e-2 : 2e-3; }
double lse_tolerance_vs_exact(const Case& c) { return c.qk_precision == QKPrecision::Int8 ? 0.05 : 2e-3; }

Case cuda_case() {
  Case c;
  c.block_q = 128;  // a multiple of the CUDA tile (64 x 64); 64-row blocks are tested too
  c.block_k = 64;
  return c;
}

// Runs `c` on the GPU; checks it against the emulation (tolerance above) and against exact attention: within
// contract_bound() (the BENCH.md budget, except FP8 P·V on zero-mean V and bf16, where the contract itself
// measures above it; harness.hpp). Sharper cases (large scale, no smoothing) only check the emulation, which
// the contract defines, and finiteness.
void check_case(Context& ctx, const Case& c, bool against_emulation = true, bool against_exact = true) {
  INFO(c.describe());
  const Inputs in = make_inputs(c);
  const Result got = run_case(ctx, c, in);
  CHECK(all_finite(got.out));
  const Exact e = exact(c, in);
  const Accuracy a = compare(got.out, e.out);
  INFO("vs exact: " << a.describe());
  if (against_exact) CHECK(within(a, contract_bound(c)));
  if (against_exact && c.want_lse) {
    const LseDiff d = compare_lse(got.lse, e.lse);
    INFO("LSE vs exact: " << d.describe());
    CHECK(d.ok(lse_tolerance_vs_exact(c)));
  }
  if (against_emulation) {
    const Result em = emulate(c, in);
    const Accuracy ae = compare(got.out, em.out);
    INFO("vs emulation: " << ae.describe());
    CHECK(ae.rel_l1 <= emulation_tolerance(c));
    if (c.want_lse) {
      const LseDiff d = compare_lse(got.lse, em.lse);
      INFO("LSE vs emulation: " << d.describe());
      CHECK(d.ok(1e-3));
    }
  }
}

std::vector<PVPrecision> pv_precisions(Context& ctx) {
  // FP8 P·V where the device runs it (the default precision then), FP16 P·V always.
  Case probe = cuda_case();
  probe.Nq = probe.Nk = 16;
  probe.pv_precision = PVPrecision::Fp8;
  try {
    run_case(ctx, probe, make_inputs(probe));
    return {PVPrecision::Fp16, PVPrecision::Fp8};
  } catch (const Error& e) {
    if (e.status() != Status::NotSupported) throw;
    std::printf("[cuda] FP8 P·V not available here (%s): FP16 P·V only\n", e.what());
    return {PVPrecision::Fp16};
  }
}

}  // namespace

TEST_SUITE("cuda") {

TEST_CASE("cuda context reports itself") {
  Context* ctx = cuda_ctx();
  if (!ctx) return;
  CHECK(ctx->backend() == Backend::Cuda);
  CHECK(!ctx->device_name().empty());
  const auto g = ctx->mask_granularity();
  CHECK(g[0] == 64);
  CHECK(g[1] == 64);
}

TEST_CASE("cuda integer-exact inputs match the emulation") {
  Context* ctx = cuda_ctx();
  if (!ctx) return;
  for (PVPrecision pv : pv_precisions(*ctx))
    for (QKGranularity g : {QKGranularity::PerBlock, QKGranularity::PerWarp, QKGranularity::PerThread})
      for (int d : {64, 128}) {
        Case c = cuda_case();
        c.integer_inputs = true;
        c.smooth_k = false;
        c.pv_precision = pv;
        c.qk_granularity = g;
        c.D = d;
        c.Nq = 300;
        c.Nk = 260;
        c.Hq = 4;
        c.Hkv = 2;
        INFO(c.describe());
        const Inputs in = make_inputs(c);
        const Result got = run_case(*ctx, c, in);
        const Result em = emulate(c, in);
        const Accuracy a = compare(got.out, em.out);
        INFO(a.describe());
        CHECK(all_finite(got.out));
        CHECK(a.rel_l1 <= emulation_tolerance(c));
        const LseDiff l = compare_lse(got.lse, em.lse);
        INFO(l.describe());
        // These logits reach ~1e4 (integers up to 127 in every channel), where 1e-3 is one ulp of an fp32 LSE:
        // the kernels' LSE (their summation order; on the sm90a path the exponent formed with one rounding instead
        // of two) may differ from the emulation's in its last two bits.
        CHECK((l.ok(1e-3) || l.ok_ulps(2)));
      }
}

TEST_CASE("cuda dense accuracy within the BENCH.md budget, every granularity") {
  Context* ctx = cuda_ctx();
  if (!ctx) return;
  for (PVPrecision pv : pv_precisions(*ctx))
    for (QKGranularity g : {QKGranularity::PerBlock, QKGranularity::PerWarp, QKGranularity::PerThread})
      for (int d : {64, 128}) {
        Case c = cuda_case();
        c.pv_precision = pv;
        c.qk_granularity = g;
        c.D = d;
        c.Nq = c.Nk = 1024;
        c.B = 2;
        c.Hq = 2;
        c.Hkv = 1;
        check_case(*ctx, c);
      }
}

TEST_CASE("cuda odd sizes") {
  Context* ctx = cuda_ctx();
  if (!ctx) return;
  for (PVPrecision pv : pv_precisions(*ctx))
    for (bool causal : {false, true}) {
      Case base = cuda_case();
      base.pv_precision = pv;
      base.causal = causal;
      base.D = 128;
      for (const Case& c : odd_size_cases(base)) check_case(*ctx, c, c.Nq * static_cast<double>(c.Nk) < 5e6);
    }
}

TEST_CASE("cuda options: layouts, strides, bf16, GQA, Nq != Nk, causal, no smoothing") {
  Context* ctx = cuda_ctx();
  if (!ctx) return;
  for (PVPrecision pv : pv_precisions(*ctx)) {
    std::vector<Case> cases;
    Case c = cuda_case();
    c.pv_precision = pv;
    c.Nq = c.Nk = 700;
    c.Hq = 4;
    c.Hkv = 2;
    cases.push_back(c);
    Case nhd = c;
    nhd.layout = Layout::NHD;
    cases.push_back(nhd);
    Case padded = c;
    padded.row_pad = 8;  // rows 16-byte aligned: V read in place
    cases.push_back(padded);
    Case odd_pad = nhd;
    odd_pad.row_pad = 3;  // rows not 16-byte aligned: V copied (FP16 P·V), unaligned loads and stores
    cases.push_back(odd_pad);
    Case bf16 = c;
    bf16.dtype = DType::BF16;
    cases.push_back(bf16);
    Case gqa = c;
    gqa.Hq = 8;
    gqa.Hkv = 1;
    gqa.D = 128;
    cases.push_back(gqa);
    for (bool causal : {false, true}) {
      Case longer_k = c;
      longer_k.Nq = 200;
      longer_k.Nk = 900;
      longer_k.causal = causal;
      cases.push_back(longer_k);
      Case longer_q = c;  // causal: the first 500 rows see no key (O = 0, LSE = -inf)
      longer_q.Nq = 900;
      longer_q.Nk = 400;
      longer_q.causal = causal;
      cases.push_back(longer_q);
    }
    Case causal = c;
    causal.causal = true;
    causal.D = 128;
    cases.push_back(causal);
    Case no_lse = c;
    no_lse.want_lse = false;
    cases.push_back(no_lse);
    for (const Case& x : cases) check_case(*ctx, x);
    // Sharper attention: the contract's own error exceeds the budget there; parity with the emulation only.
    Case unsmoothed = c;
    unsmoothed.smooth_k = false;
    check_case(*ctx, unsmoothed, true, false);
    Case scaled = c;
    scaled.scale = 0.3f;
    scaled.magnitude = 2.0;
    check_case(*ctx, scaled, true, false);
  }
}

TEST_CASE("cuda block masks: bitmap and LUT, mask heads, block sizes, empty rows, causal") {
  Context* ctx = cuda_ctx();
  if (!ctx) return;
  // Bitmaps are walked as a device-made LUT when it is small, else as they are; SPARQ_CUDA_BITMAP_LUT=0 (read per
  // call) forces the second, so both run here.
  for (const char* bitmap_lut : {"1", "0"}) {
    ScopedEnv env("SPARQ_CUDA_BITMAP_LUT", bitmap_lut);
    INFO("SPARQ_CUDA_BITMAP_LUT=" << bitmap_lut);
    for (PVPrecision pv : pv_precisions(*ctx))
      for (MaskKind kind : {MaskKind::Bitmap, MaskKind::Lut})
        for (bool causal : {false, true}) {
          Case c = cuda_case();
          c.pv_precision = pv;
          c.mask = kind;
          c.causal = causal;
          c.Nq = 1000;
          c.Nk = 1100;
          c.Hq = 4;
          c.Hkv = 2;
          c.density = 0.4;
          check_case(*ctx, c);
          Case empty = c;
          empty.empty_rows = true;
          check_case(*ctx, empty);
          Case big = c;
          big.block_q = 256;
          big.block_k = 128;
          big.mask_heads = kind == MaskKind::Bitmap ? 2 : 1;
          check_case(*ctx, big);
          Case fine = c;  // the kernel tile itself
          fine.block_q = 64;
          check_case(*ctx, fine);
          if (kind == MaskKind::Bitmap) {
            Case per_q_head = c;
            per_q_head.mask_heads = 4;
            per_q_head.D = 128;
            check_case(*ctx, per_q_head);
          }
        }
  }
}

// Stage 2 in each sm90a kernel that takes it (SPARQ_SM90_KERNEL: the wide kernel decides per warp and 64-key half
// as the serial one per tile); elsewhere both runs take the same path. Dense heads (stage 2 alone: every tile
// visited) and predicted LUTs of 64-key blocks (the wide kernel's pairs of listed tiles) and of 128-key blocks; both
// backends predict the same LUT, so they visit the same tiles.
TEST_CASE("cuda SpargeAttn stage 2 (P·V skip) agrees with the reference") {
  Context* ctx = cuda_ctx();
  if (!ctx) return;
  Context ref = Context::create(Backend::Reference);
  ScopedEnv sm90_kernel("SPARQ_SM90_KERNEL", nullptr);
  std::vector<Case> cases;
  for (int d : {64, 128})
    for (PVPrecision pv : pv_precisions(*ctx)) {
      Case c = cuda_case();
      c.Nq = c.Nk = 1000;
      c.Hq = 4;
      c.Hkv = 2;
      c.D = d;
      c.pv_precision = pv;
      cases.push_back(c);
    }
  for (const Case& c : cases) {
    const Inputs in = make_inputs(c);
    for (int block_k : {0, 64, 128}) {  // 0: dense heads
      SpargeOptions options;
      options.attention.pv_precision = c.pv_precision;
      if (block_k > 0) options.block_k = block_k;
      std::vector<SpargeParams> heads(4);
      const float lambdas[4] = {0.25f, 0.5f, 1.0f, 2.0f};
      for (int h = 0; h < 4; ++h) {
        heads[h].dense = block_k == 0;
        heads[h].simthreshd = 0.0f;  // every block may be dropped
        heads[h].cdfthreshd = 0.5f;  // random inputs: a flat map, half of it kept
        heads[h].pvthreshd = lambdas[h];
      }
      auto run = [&](Context& x, SpargeStats& stats) {
        Tensor q = x.from_host(c.dtype, {c.B, c.Hq, c.Nq, c.D}, in.q.data());
        Tensor k = x.from_host(c.dtype, {c.B, c.Hkv, c.Nk, c.D}, in.k.data());
        Tensor v = x.from_host(c.dtype, {c.B, c.Hkv, c.Nk, c.D}, in.v.data());
        Tensor out = x.empty(c.dtype, {c.B, c.Hq, c.Nq, c.D});
        sparge_attention(x, q, k, v, out, options, heads, &stats);
        std::vector<uint16_t> bits(in.q.size());
        x.to_host(out, bits.data());
        std::vector<float> values;
        for (int b = 0; b < c.B; ++b)
          for (int h = 0; h < c.Hq; ++h)
            for (int t = 0; t < c.Nq; ++t)
              for (int ch = 0; ch < c.D; ++ch) values.push_back(input_value(c, bits, true, b, h, t, ch));
        return values;
      };
      SpargeStats ref_stats;
      const std::vector<float> want = run(ref, ref_stats);
      for (const char* kernel : {"wide", "serial"}) {
        sm90_kernel.set(kernel);
        INFO(c.describe() << ", block_k " << block_k << " (0: dense heads), SPARQ_SM90_KERNEL="
                          << std::string(kernel));
        SpargeStats got_stats;
        const std::vector<float> got = run(*ctx, got_stats);
        const Accuracy a = compare(got, want);
        INFO(a.describe());
        INFO("pv skipped/total: cuda " << got_stats.pv_skipped << "/" << got_stats.pv_total << ", reference "
                                        << ref_stats.pv_skipped << "/" << ref_stats.pv_total << ", block sparsity "
                                        << ref_stats.block_sparsity);
        CHECK(all_finite(got));
        CHECK(a.rel_l1 <= emulation_tolerance(c));
        CHECK(got_stats.block_sparsity == ref_stats.block_sparsity);
        if (block_k > 0) CHECK(ref_stats.block_sparsity > 0.05);  // a LUT that leaves tiles out
        CHECK(got_stats.pv_total == ref_stats.pv_total);
        CHECK(ref_stats.pv_skipped > 0);
        // Skip decisions compare logits that differ in the last bits between the two: allow a few to flip.
        CHECK(std::abs(got_stats.pv_skipped - ref_stats.pv_skipped) <= 2 + ref_stats.pv_skipped / 50);
      }
    }
  }
}

// A head's result must not depend on what else is in the call: the preprocessing's K-mean split count (its
// summation order) depends on the sequence length alone, so batch b of a 9-batch call equals the same data
// attended alone, bit for bit.
TEST_CASE("cuda results do not depend on the batch they are part of") {
  Context* ctx = cuda_ctx();
  if (!ctx) return;
  for (PVPrecision pv : pv_precisions(*ctx)) {
    Case all = cuda_case();
    all.pv_precision = pv;
    all.B = 9, all.Hq = 8, all.Hkv = 4, all.Nq = 64, all.Nk = 5000;
    const Inputs in = make_inputs(all);
    const Result whole = run_case(*ctx, all, in);
    for (int b : {0, 5}) {
      Case one = all;
      one.B = 1;
      Inputs part;
      auto batch = [b](const std::vector<uint16_t>& x, std::size_t per) {
        return std::vector<uint16_t>(x.begin() + b * per, x.begin() + (b + 1) * per);
      };
      part.q = batch(in.q, std::size_t(all.Hq) * all.Nq * all.D);
      part.k = batch(in.k, std::size_t(all.Hkv) * all.Nk * all.D);
      part.v = batch(in.v, std::size_t(all.Hkv) * all.Nk * all.D);
      const Result alone = run_case(*ctx, one, part);
      const std::size_t out_per = std::size_t(all.Hq) * all.Nq * all.D, lse_per = std::size_t(all.Hq) * all.Nq;
      INFO(all.describe() << ", batch " << b);
      CHECK(std::equal(alone.out.begin(), alone.out.end(), whole.out.begin() + b * out_per));
      CHECK(std::equal(alone.lse.begin(), alone.lse.end(), whole.lse.begin() + b * lse_per));
    }
  }
}

// SPARQ_CUDA_PATH (read when a context is created) picks the kernel path: sm80, sm89 or sm90a (the wgmma
// kernels, compute capability 9.0 only); a path the GPU or the build lacks falls back to an older one or reports
// NotSupported. Every path this GPU and build run gets one FP8 (where available) and one FP16 P·V case.
TEST_CASE("cuda SPARQ_CUDA_PATH selects each built path") {
  if (!cuda_ctx()) return;
  ScopedEnv cuda_path("SPARQ_CUDA_PATH", "sm42");
  try {
    Context::create(Backend::Cuda);
    FAIL("SPARQ_CUDA_PATH=sm42 should be rejected");
  } catch (const Error& e) {
    CHECK(e.status() == Status::InvalidArgument);
  }
  // The sm90a path has four kernel choices (backends/cuda/attention_sm90a.cuh): SPARQ_SM90_KERNEL, read per launch.
  ScopedEnv sm90_kernel("SPARQ_SM90_KERNEL", nullptr);
  for (const char* path : {"sm80", "sm89", "sm90a"}) {
    cuda_path.set(path);
    Context ctx = Context::create(Backend::Cuda);
    for (const char* kernel : {"wide", "serial", "ws", "ws-free"}) {
      if (std::string(path) != "sm90a" && std::string(kernel) != "serial") continue;
      sm90_kernel.set(kernel);
      for (PVPrecision pv : {PVPrecision::Fp16, PVPrecision::Fp8})
        for (bool causal : {false, true})
          for (int d : {64, 128}) {
            Case c = cuda_case();
            c.pv_precision = pv;
            c.causal = causal;
            c.D = d;
            c.Nq = 200;
            c.Nk = 333;
            c.Hq = 4;
            c.Hkv = 2;
            INFO("SPARQ_CUDA_PATH=" << path << " SPARQ_SM90_KERNEL=" << kernel);
            try {
              check_case(ctx, c);
            } catch (const Error& e) {
              // Not built for this path (e.g. -Dcuda-archs without sm_80) or FP8 below sm_89.
              CHECK(e.status() == Status::NotSupported);
            }
          }
    }
  }
}

TEST_CASE("cuda rejects what it does not support") {
  Context* ctx = cuda_ctx();
  if (!ctx) return;
  Case c = cuda_case();
  c.qk_precision = QKPrecision::Fp16;
  const Inputs in = make_inputs(c);
  try {
    run_case(*ctx, c, in);
    FAIL("fp16 Q·Kᵀ should not be supported");
  } catch (const Error& e) {
    CHECK(e.status() == Status::NotSupported);
  }
  Case mask = cuda_case();
  mask.mask = MaskKind::Lut;
  mask.block_q = 32;  // not a multiple of the 64-row tile
  try {
    run_case(*ctx, mask, make_inputs(mask));
    FAIL("a 32-row mask block should be rejected");
  } catch (const Error& e) {
    CHECK(e.status() == Status::InvalidArgument);
  }
}

TEST_CASE("cuda profiling fills Timing, repeated calls agree") {
  Context* ctx = cuda_ctx();
  if (!ctx) return;
  Case c = cuda_case();
  c.Nq = c.Nk = 2048;
  c.Hq = c.Hkv = 4;
  c.D = 128;
  const Inputs in = make_inputs(c);
  ctx->set_profiling(true);
  const Result first = run_case(*ctx, c, in);
  const Timing t = ctx->last_timing();
  const Result second = run_case(*ctx, c, in);
  ctx->set_profiling(false);
  CHECK(t.total_ms > 0);
  CHECK(t.attention_ms > 0);
  CHECK(t.attention_ms <= t.total_ms);
  CHECK(bitwise_equal(first.out, second.out));
  CHECK(bitwise_equal(first.lse, second.lse));
}

// Throughput of the dense kernel, only when SPARQ_CUDA_BENCH=1 (B=4, H=32, N=16384 by default; SPARQ_CUDA_BENCH_N
// and SPARQ_CUDA_BENCH_D change N and D). Prints TOPS = 4·B·H·N²·D / time, end-to-end and kernel-only.
TEST_CASE("cuda throughput (SPARQ_CUDA_BENCH=1)") {
  const char* on = std::getenv("SPARQ_CUDA_BENCH");
  if (!on || std::string(on) != "1") return;
  Context* ctx = cuda_ctx();
  if (!ctx) return;
  const int B = 4, H = 32;
  const int N = std::getenv("SPARQ_CUDA_BENCH_N") ? std::atoi(std::getenv("SPARQ_CUDA_BENCH_N")) : 16384;
  const int D = std::getenv("SPARQ_CUDA_BENCH_D") ? std::atoi(std::getenv("SPARQ_CUDA_BENCH_D")) : 128;
  const std::vector<int64_t> shape{B, H, N, D};
  const std::size_t n = static_cast<std::size_t>(B) * H * N * D;
  std::vector<uint16_t> host(n);
  uint32_t state = 12345u;
  auto normal_half = [&](float bias) {  // rough N(0,1) as fp16 bits: sum of 4 uniforms, scaled
    float s = 0;
    for (int i = 0; i < 4; ++i) {
      state = state * 1664525u + 1013904223u;
      s += static_cast<float>(state >> 8) / 16777216.0f - 0.5f;
    }
    const float x = s * 1.732f + bias;
    // float -> fp16 bits (normal range, round toward zero is fine for test data)
    uint32_t u;
    std::memcpy(&u, &x, 4);
    const uint32_t sign = (u >> 16) & 0x8000u;
    const int exp = static_cast<int>((u >> 23) & 0xff) - 127 + 15;
    if (exp <= 0) return static_cast<uint16_t>(sign);
    return static_cast<uint16_t>(sign | (static_cast<uint32_t>(exp) << 10) | ((u >> 13) & 0x3ffu));
  };
  for (std::size_t i = 0; i < n; ++i) host[i] = normal_half(0.0f);
  Tensor q = ctx->from_host(DType::F16, shape, host.data());
  for (std::size_t i = 0; i < n; ++i) host[i] = normal_half(static_cast<float>(i % D) * 0.02f);
  Tensor k = ctx->from_host(DType::F16, shape, host.data());
  for (std::size_t i = 0; i < n; ++i) host[i] = normal_half(0.0f);
  Tensor v = ctx->from_host(DType::F16, shape, host.data());
  Tensor out = ctx->empty(DType::F16, shape);
  // Median device times (end-to-end, kernel-only) of 10 calls after 2 warm-ups.
  auto time = [&](const AttentionOptions& o, const BlockMask* mask) {
    ctx->set_profiling(true);
    std::vector<double> total, kernel;
    for (int i = 0; i < 12; ++i) {
      attention(*ctx, q, k, v, out, o, mask);
      if (i >= 2) {
        total.push_back(ctx->last_timing().total_ms);
        kernel.push_back(ctx->last_timing().attention_ms);
      }
    }
    ctx->set_profiling(false);
    std::sort(total.begin(), total.end());
    std::sort(kernel.begin(), kernel.end());
    return std::make_pair(total[total.size() / 2], kernel[kernel.size() / 2]);
  };
  // Block-sparse pattern of BENCH.md: random 128x128 blocks at density 0.25 plus the diagonal, as a LUT.
  const int nb = (N + 127) / 128;
  std::vector<int32_t> counts(static_cast<std::size_t>(B) * H * nb), indices(counts.size() * nb, 0);
  std::size_t kept = 0;
  for (std::size_t row = 0; row < counts.size(); ++row) {
    int n = 0;
    for (int kb = 0; kb < nb; ++kb) {
      state = state * 1664525u + 1013904223u;
      if (kb == static_cast<int>(row % nb) || (state >> 8) % 4 == 0) indices[row * nb + n++] = kb;
    }
    counts[row] = n;
    kept += n;
  }
  const double density = static_cast<double>(kept) / (static_cast<double>(counts.size()) * nb);
  Tensor lut_counts = ctx->from_host(DType::I32, {B, H, nb}, counts.data());
  Tensor lut_indices = ctx->from_host(DType::I32, {B, H, nb, nb}, indices.data());
  const BlockMask sparse = BlockMask::from_lut(lut_counts, lut_indices, 128, 128);

  for (PVPrecision pv : pv_precisions(*ctx)) {
    double dense_kernel_ms = 0;
    for (bool causal : {false, true}) {
      AttentionOptions o;
      o.pv_precision = pv;
      o.causal = causal;
      const auto [total_ms, kernel_ms] = time(o, nullptr);
      if (!causal) dense_kernel_ms = kernel_ms;
      const double flops = 4.0 * B * H * static_cast<double>(N) * N * D * (causal ? 0.5 : 1.0);
      std::printf("[cuda bench] B=%d H=%d N=%d D=%d %s pv=%s: end-to-end %.3f ms = %.1f TOPS, "
                  "kernel-only %.3f ms = %.1f TOPS\n",
                  B, H, N, D, causal ? "causal" : "dense", pv == PVPrecision::Fp8 ? "fp8" : "fp16", total_ms,
                  flops / (total_ms * 1e9), kernel_ms, flops / (kernel_ms * 1e9));
    }
    AttentionOptions o;
    o.pv_precision = pv;
    const auto [total_ms, kernel_ms] = time(o, &sparse);
    const double flops = 4.0 * B * H * static_cast<double>(N) * N * D;
    std::printf("[cuda bench] B=%d H=%d N=%d D=%d LUT density %.3f pv=%s: end-to-end %.3f ms, kernel-only %.3f ms = "
                "%.1f effective TOPS, sparse efficiency (kernel) %.3f\n",
                B, H, N, D, density, pv == PVPrecision::Fp8 ? "fp8" : "fp16", total_ms, kernel_ms,
                flops / (kernel_ms * 1e9), density * dense_kernel_ms / kernel_ms);
  }
}

}  // TEST_SUITE
