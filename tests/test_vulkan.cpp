// The Vulkan suite: the generated GLSL kernels against the reference emulation (parity) and against exact
// fp64 attention (the BENCH.md budget), odd sizes and every option. Runs with the Khronos validation layer
// (meson test sets SPARQ_VULKAN_VALIDATION=1; this program sets it too when it is unset) and fails on any
// validation message. Without a Vulkan device every test prints why and passes.
#include <doctest/doctest.h>

#include "harness.hpp"
#include "reference.hpp"
#include "vulkan_debug.hpp"

#include <sparq/sparge.hpp>
#include <sparq/sparq.hpp>

#include <algorithm>
#include <chrono>
#include <limits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>

using namespace sparq;
using namespace sparq::test;

namespace {

// One context for the whole suite (the device and its pipelines are created once per process anyway).
Context* vulkan_context() {
  static std::unique_ptr<Context> ctx;
  static bool tried = false;
  static std::string why;
  if (!tried) {
    tried = true;
    setenv("SPARQ_VULKAN_VALIDATION", "1", 0);  // keep an explicit SPARQ_VULKAN_VALIDATION=0
    try {
      ctx = std::make_unique<Context>(Context::create(Backend::Vulkan));
      std::printf("vulkan device: %s\n  features: %s\n  validation layer: %s\n", ctx->device_name().c_str(),
                  vulkan::device_features().c_str(), vulkan::validation_enabled() ? "on" : "off");
    } catch (const Error& e) {
      why = e.what();
    }
  }
  if (!ctx) std::printf("SKIPPED: no Vulkan device (%s)\n", why.c_str());
  return ctx.get();
}

// Fails the current test when the validation layer reported anything since the last call.
void check_validation() {
  static std::uint64_t seen = 0;
  std::uint64_t now = vulkan::validation_message_count();
  CHECK_MESSAGE(now == seen, "the Vulkan validation layer reported " << (now - seen) << " message(s) (see stderr)");
  seen = now;
}

// Parity with the reference emulation: the same contract, computed with the GPU's exp2 and another
// summation order, so a P element may round to the neighbouring fp16 value.
constexpr double kParityRelL1 = 2e-3;
constexpr double kParityLse = 2e-3;

void check_parity(Context& ctx, const Case& c) {
  INFO(c.describe());
  Inputs in = make_inputs(c);
  Result got = run_case(ctx, c, in);
  Result ref = emulate(c, in);
  REQUIRE(got.out.size() == ref.out.size());
  CHECK(all_finite(got.out));
  Accuracy a = compare(got.out, ref.out);
  INFO("vs emulation: " << a.describe());
  CHECK(a.rel_l1 <= kParityRelL1);
  if (c.want_lse) {
    LseDiff d = compare_lse(got.lse, ref.lse);
    INFO("lse vs emulation: " << d.describe());
    CHECK(d.ok(kParityLse));
  }
  check_validation();
}

// Whether the device runs the cooperative-matrix kernels (VK_NV_cooperative_matrix with the needed shapes).
bool has_coopmat() { return vulkan::device_features().find("cooperativeMatrixNV=1") != std::string::npos; }

void check_budget(Context& ctx, const Case& c) {
  INFO(c.describe());
  Inputs in = make_inputs(c);
  Result got = run_case(ctx, c, in);
  Exact ex = exact(c, in);
  Accuracy a = compare(got.out, ex.out);
  Budget bud = budget(c.qk_precision, c.pv_precision);
  INFO("vs exact: " << a.describe());
  if (!within(a, bud)) {
    // Where the contract itself cannot meet the budget (outputs that are fp16 subnormals, say), the
    // reference emulation's own error is the bar.
    Accuracy e = compare(emulate(c, in).out, ex.out);
    INFO("reference emulation vs exact: " << e.describe());
    CHECK(a.rel_l1 <= 1.1 * e.rel_l1);
    CHECK(a.cosine >= 1.0 - 1.1 * (1.0 - e.cosine));
    CHECK(e.rel_l1 > bud.rel_l1);
  }
  if (c.want_lse) {
    LseDiff d = compare_lse(got.lse, ex.lse);
    INFO("lse vs exact: " << d.describe());
    CHECK(d.ok(2e-2));
  }
  check_validation();
}

}  // namespace

TEST_SUITE("vulkan") {

TEST_CASE("vulkan context reports itself") {
  Context* ctx = vulkan_context();
  if (!ctx) return;
  CHECK(ctx->backend() == Backend::Vulkan);
  CHECK(!ctx->device_name().empty());
  CHECK(ctx->mask_granularity() == std::array<int, 2>{64, 64});
  if (std::getenv("SPARQ_VULKAN_VALIDATION") && std::string(std::getenv("SPARQ_VULKAN_VALIDATION")) != "0")
    CHECK_MESSAGE(vulkan::validation_enabled(), "validation was requested but VK_LAYER_KHRONOS_validation is missing");
  check_validation();
}

TEST_CASE("parity with the reference emulation: layouts, dtypes, GQA, Nq != Nk, causal, strides") {
  Context* ctx = vulkan_context();
  if (!ctx) return;
  for (int D : {64, 128}) {
    Case c;
    c.B = 2, c.Hq = 4, c.Hkv = 2, c.Nq = 130, c.Nk = 200, c.D = D;
    c.seed = 10 + D;
    check_parity(*ctx, c);  // GQA, Nq < Nk, tails in both
    c.layout = Layout::NHD;
    check_parity(*ctx, c);
    c.causal = true;
    check_parity(*ctx, c);  // bottom-right diagonal
    c.Nq = 200, c.Nk = 77;  // Nq > Nk: the first Nq - Nk rows see no key
    check_parity(*ctx, c);
    c.dtype = DType::BF16, c.causal = false, c.layout = Layout::HND;
    check_parity(*ctx, c);
    c.row_pad = 24, c.layout = Layout::NHD, c.causal = true;  // strided views of padded rows
    check_parity(*ctx, c);
    c.row_pad = 3, c.layout = Layout::HND, c.causal = false;  // rows not 16-byte aligned
    check_parity(*ctx, c);
  }
}

TEST_CASE("parity: QK precision, granularity, smoothing, scale") {
  Context* ctx = vulkan_context();
  if (!ctx) return;
  Case c;
  c.B = 1, c.Hq = 2, c.Hkv = 1, c.Nq = 150, c.Nk = 190, c.D = 64;
  for (QKGranularity g : {QKGranularity::PerBlock, QKGranularity::PerWarp, QKGranularity::PerThread}) {
    c.qk_granularity = g;
    check_parity(*ctx, c);
  }
  c.qk_granularity = QKGranularity::PerThread, c.outliers = 8.0, c.scale = 1.0f / 32.0f, c.D = 128;
  check_parity(*ctx, c);
  c.outliers = 0.0, c.scale = 0.3f, c.smooth_k = false;
  check_parity(*ctx, c);
  c.scale = 0.0f, c.smooth_k = true, c.qk_precision = QKPrecision::Fp16;
  check_parity(*ctx, c);
  c.causal = true, c.dtype = DType::BF16, c.D = 64;
  check_parity(*ctx, c);
}

TEST_CASE("parity and budget: block masks (bitmap, LUT, per-head, coarse blocks, empty rows)") {
  Context* ctx = vulkan_context();
  if (!ctx) return;
  Case c;
  c.B = 2, c.Hq = 4, c.Hkv = 2, c.Nq = 300, c.Nk = 333, c.D = 64;
  for (MaskKind m : {MaskKind::Bitmap, MaskKind::Lut}) {
    c.mask = m;
    c.mask_heads = 1, c.block_q = 64, c.block_k = 64, c.density = 0.5, c.empty_rows = false, c.causal = false;
    check_parity(*ctx, c);
    c.mask_heads = m == MaskKind::Bitmap ? 2 : 4, c.block_q = 128, c.block_k = 192, c.empty_rows = true;
    check_parity(*ctx, c);
    c.causal = true, c.density = 0.3, c.mask_heads = m == MaskKind::Bitmap ? 4 : 4, c.block_q = 64, c.block_k = 128;
    check_parity(*ctx, c);
    check_budget(*ctx, c);
  }
}

TEST_CASE("bitmap and LUT give identical results, and a full mask equals no mask") {
  Context* ctx = vulkan_context();
  if (!ctx) return;
  Case c;
  c.B = 1, c.Hq = 2, c.Hkv = 1, c.Nq = 200, c.Nk = 260, c.D = 64, c.empty_rows = true, c.density = 0.4;
  c.mask = MaskKind::Bitmap, c.mask_heads = 2;
  Inputs in = make_inputs(c);
  Result bitmap = run_case(*ctx, c, in);
  c.mask = MaskKind::Lut;
  Inputs in_lut = make_inputs(c);
  REQUIRE(in_lut.q == in.q);
  // The same pattern as a LUT.
  in_lut.lut_counts.assign(static_cast<std::size_t>(c.B) * c.Hq * in.nqb, 0);
  in_lut.lut_indices.assign(static_cast<std::size_t>(c.B) * c.Hq * in.nqb * in.nkb, 0);
  for (int h = 0; h < c.Hq; ++h)
    for (int qb = 0; qb < in.nqb; ++qb) {
      int n = 0;
      for (int kb = 0; kb < in.nkb; ++kb)
        if (in.bitmap[(static_cast<std::size_t>(h) * in.nqb + qb) * in.nkb + kb])
          in_lut.lut_indices[(static_cast<std::size_t>(h) * in.nqb + qb) * in.nkb + n++] = kb;
      in_lut.lut_counts[static_cast<std::size_t>(h) * in.nqb + qb] = n;
    }
  Result lut = run_case(*ctx, c, in_lut);
  CHECK(bitwise_equal(bitmap.out, lut.out));
  CHECK(bitwise_equal(bitmap.lse, lut.lse));
  // Empty rows: O = 0 and LSE = -inf exactly.
  std::size_t empty_rows = 0;
  for (int h = 0; h < c.Hq; ++h)
    for (int qb = 0; qb < in.nqb; ++qb) {
      if (in_lut.lut_counts[static_cast<std::size_t>(h) * in.nqb + qb]) continue;
      for (int t = qb * c.block_q; t < std::min(c.Nq, (qb + 1) * c.block_q); ++t) {
        ++empty_rows;
        std::size_t row = static_cast<std::size_t>(h) * c.Nq + t;
        CHECK(std::isinf(lut.lse[row]));
        CHECK(lut.lse[row] < 0);
        for (int ch = 0; ch < c.D; ++ch) CHECK(lut.out[row * c.D + ch] == 0.0f);
      }
    }
  CHECK(empty_rows > 0);
  // A bitmap that lists every block is the dense kernel.
  c.mask = MaskKind::Bitmap, c.density = 1.0, c.empty_rows = false;
  Inputs full = make_inputs(c);
  Result masked = run_case(*ctx, c, full);
  c.mask = MaskKind::None;
  Result dense = run_case(*ctx, c, full);
  CHECK(bitwise_equal(masked.out, dense.out));
  CHECK(bitwise_equal(masked.lse, dense.lse));
  check_validation();
}

TEST_CASE("integer inputs: the INT8 Q·Kᵀ is exact (INT8 and FP16 paths agree bit for bit)") {
  Context* ctx = vulkan_context();
  if (!ctx) return;
  Case c;
  c.B = 1, c.Hq = 2, c.Hkv = 1, c.Nq = 77, c.Nk = 200, c.D = 64;
  c.integer_inputs = true, c.smooth_k = false;
  c.scale = 1.0f / (127.0f * 127.0f);
  Inputs in = make_inputs(c);
  // The cooperative-matrix kernels serve INT8 Q·Kᵀ only (fp16 Q·Kᵀ runs the dot-product kernel, which sums
  // P·V in another order): compare within the dot-product family; the coopmat test checks the INT8 path.
  ScopedEnv kernels("SPARQ_VULKAN_KERNELS", has_coopmat() ? "fast" : std::getenv("SPARQ_VULKAN_KERNELS"));
  c.qk_precision = QKPrecision::Fp16;
  Result fp16 = run_case(*ctx, c, in);
  for (QKGranularity g : {QKGranularity::PerBlock, QKGranularity::PerWarp, QKGranularity::PerThread}) {
    c.qk_precision = QKPrecision::Int8, c.qk_granularity = g;
    INFO(c.describe());
    Result int8 = run_case(*ctx, c, in);
    CHECK(bitwise_equal(int8.out, fp16.out));
    CHECK(bitwise_equal(int8.lse, fp16.lse));
    Result ref = emulate(c, in);
    Accuracy a = compare(int8.out, ref.out);
    INFO("vs emulation: " << a.describe());
    CHECK(a.rel_l1 <= kParityRelL1);
  }
  check_validation();
}

TEST_CASE("the fast (packed dot product) and portable kernels agree bit for bit") {
  Context* ctx = vulkan_context();
  if (!ctx) return;
  if (vulkan::device_features().find("shaderIntegerDotProduct=1") == std::string::npos) {
    MESSAGE("the device has no shaderIntegerDotProduct: only the plain-integer kernel runs");
    return;
  }
  // The GPU flavour is what runs on real GPUs: check it here against the portable one, which the rest of
  // this suite checks against the reference (on lavapipe).
  Case c;
  c.B = 1, c.Hq = 2, c.Hkv = 2, c.Nq = 100, c.Nk = 150, c.D = 64, c.causal = true;
  Case f = c;
  f.qk_precision = QKPrecision::Fp16, f.dtype = DType::BF16, f.layout = Layout::NHD, f.causal = false;
  for (const Case& k : {c, f}) {
    INFO(k.describe());
    Inputs in = make_inputs(k);
    ScopedEnv kernels("SPARQ_VULKAN_KERNELS", "fast");
    Result packed = run_case(*ctx, k, in);
    kernels.set("portable");
    Result plain = run_case(*ctx, k, in);
    CHECK(bitwise_equal(packed.out, plain.out));
    CHECK(bitwise_equal(packed.lse, plain.lse));
  }
  check_validation();
}

TEST_CASE("cooperative-matrix kernels: parity with the reference emulation, every option") {
  Context* ctx = vulkan_context();
  if (!ctx) return;
  if (!has_coopmat()) {
    MESSAGE("SKIPPED: the device has no usable VK_NV_cooperative_matrix (int8 16x16x32 and fp16 16x16x16, "
            "subgroups of 32): the cooperative-matrix kernels do not run here");
    return;
  }
  ScopedEnv kernels("SPARQ_VULKAN_KERNELS", "coopmat");
  for (int D : {64, 128}) {
    Case c;
    c.B = 2, c.Hq = 4, c.Hkv = 2, c.Nq = 130, c.Nk = 200, c.D = D;
    c.seed = 40 + D;
    check_parity(*ctx, c);  // GQA, Nq < Nk, tails in both
    c.layout = Layout::NHD;
    check_parity(*ctx, c);
    c.causal = true;
    check_parity(*ctx, c);  // bottom-right diagonal
    c.Nq = 200, c.Nk = 77;  // Nq > Nk: the first Nq - Nk rows see no key
    check_parity(*ctx, c);
    c.row_pad = 24, c.causal = false;  // strided views of padded rows
    check_parity(*ctx, c);
    c.row_pad = 3, c.layout = Layout::HND, c.causal = true;  // rows not 16-byte aligned
    check_parity(*ctx, c);
    c.row_pad = 0, c.Nq = 1, c.Nk = 1;
    check_parity(*ctx, c);
    c.Nq = 1000, c.Nk = 1000, c.causal = false, c.B = 1, c.Hq = 2, c.Hkv = 1;
    check_budget(*ctx, c);
  }
  Case g;
  g.B = 1, g.Hq = 2, g.Hkv = 1, g.Nq = 150, g.Nk = 190, g.D = 128;
  for (QKGranularity q : {QKGranularity::PerBlock, QKGranularity::PerWarp, QKGranularity::PerThread}) {
    g.qk_granularity = q;
    check_parity(*ctx, g);
  }
  g.outliers = 8.0, g.scale = 1.0f / 32.0f;
  check_parity(*ctx, g);
  g.outliers = 0.0, g.scale = 0.3f, g.smooth_k = false;
  check_parity(*ctx, g);
  Case m;
  m.B = 2, m.Hq = 4, m.Hkv = 2, m.Nq = 300, m.Nk = 333, m.D = 64;
  for (MaskKind k : {MaskKind::Bitmap, MaskKind::Lut}) {
    m.mask = k;
    m.mask_heads = 1, m.block_q = 64, m.block_k = 64, m.density = 0.5, m.empty_rows = false, m.causal = false;
    check_parity(*ctx, m);
    m.mask_heads = k == MaskKind::Bitmap ? 2 : 4, m.block_q = 128, m.block_k = 192, m.empty_rows = true, m.D = 128;
    check_parity(*ctx, m);
    m.causal = true, m.density = 0.3, m.mask_heads = 4, m.block_q = 64, m.block_k = 128, m.D = 64;
    check_parity(*ctx, m);
    check_budget(*ctx, m);
  }
  // Against the dot-product kernel (another summation order, the same contract).
  Case f;
  f.B = 1, f.Hq = 2, f.Hkv = 1, f.Nq = 300, f.Nk = 500, f.D = 128, f.causal = true;
  Inputs in = make_inputs(f);
  Result coop = run_case(*ctx, f, in);
  Result dot;
  {
    ScopedEnv fast("SPARQ_VULKAN_KERNELS", "fast");
    dot = run_case(*ctx, f, in);
  }
  Accuracy a = compare(coop.out, dot.out);
  INFO("coopmat vs dot-product kernel: " << a.describe());
  CHECK(a.rel_l1 <= kParityRelL1);
  check_validation();
}

TEST_CASE("accuracy against exact attention within the budget at odd sizes (N = 1, 17, 1000, 4097)") {
  Context* ctx = vulkan_context();
  if (!ctx) return;
  Case base;
  base.D = 64;
  int i = 0;
  for (Case c : odd_size_cases(base)) {
    c.seed = 100 + i;
    // Alternate the options over the sizes so that each runs at several of them.
    c.causal = i % 2 == 1;
    c.layout = i % 3 == 2 ? Layout::NHD : Layout::HND;
    if (i == 2) c.D = 128;
    ++i;
    check_budget(*ctx, c);
    if (static_cast<long>(c.Nq) * c.Nk <= 1000L * 1000L) check_parity(*ctx, c);
  }
  Case f;  // the fp16 Q·Kᵀ path against its tighter budget
  f.qk_precision = QKPrecision::Fp16, f.Nq = 1000, f.Nk = 1000, f.B = 1, f.Hq = 2, f.Hkv = 1;
  check_budget(*ctx, f);
}

TEST_CASE("huge and tiny magnitudes stay finite; NaN stays in its (batch, head)") {
  Context* ctx = vulkan_context();
  if (!ctx) return;
  for (double mag : {1e4, 1e-4})
    for (QKPrecision qk : {QKPrecision::Fp16, QKPrecision::Int8}) {
      Case c;
      c.B = 1, c.Hq = 2, c.Hkv = 1, c.Nq = 200, c.Nk = 300, c.D = 64;
      c.magnitude = mag, c.v_magnitude = mag;
      c.scale = static_cast<float>(1.0 / (mag * mag * 8.0));
      c.qk_precision = qk;
      check_budget(*ctx, c);
    }
  Case c;
  c.B = 2, c.Hq = 2, c.Hkv = 2, c.Nq = 100, c.Nk = 150, c.D = 64;
  Inputs in = make_inputs(c);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  set_input_value(c, in.q, true, 0, 0, 5, 3, nan);
  set_input_value(c, in.k, false, 0, 1, 7, 9, nan);
  set_input_value(c, in.v, false, 0, 1, 11, 0, std::numeric_limits<float>::infinity());
  for (QKPrecision qk : {QKPrecision::Fp16, QKPrecision::Int8}) {
    c.qk_precision = qk;
    Result r;
    CHECK_NOTHROW(r = run_case(*ctx, c, in));
    const std::size_t half = r.out.size() / 2;
    CHECK(all_finite(std::vector<float>(r.out.begin() + static_cast<std::ptrdiff_t>(half), r.out.end())));
  }
  check_validation();
}

TEST_CASE("other head dims, when the build generated them (-Dhead_dims)") {
  Context* ctx = vulkan_context();
  if (!ctx) return;
  for (int D : {16, 48, 96, 192, 256}) {
    Case c;
    c.B = 1, c.Hq = 2, c.Hkv = 1, c.Nq = 100, c.Nk = 130, c.D = D, c.causal = D % 32 == 0;
    try {
      check_parity(*ctx, c);
      c.qk_precision = QKPrecision::Fp16, c.dtype = DType::BF16, c.layout = Layout::NHD;
      check_parity(*ctx, c);
    } catch (const Error& e) {
      CHECK(e.status() == Status::NotSupported);
      MESSAGE("head_dim " << D << " not generated in this build: " << std::string(e.what()));
    }
  }
  check_validation();
}

TEST_CASE("two contexts on the same device, used alternately, give the same results") {
  Context* ctx = vulkan_context();
  if (!ctx) return;
  Context other = Context::create(Backend::Vulkan);
  Case a, b;
  a.Nq = 90, a.Nk = 140, a.seed = 7;
  b.Nq = 150, b.Nk = 60, b.causal = true, b.seed = 8, b.D = 128;
  Inputs ia = make_inputs(a), ib = make_inputs(b);
  Result a1 = run_case(*ctx, a, ia), b1 = run_case(other, b, ib);
  Result b2 = run_case(*ctx, b, ib), a2 = run_case(other, a, ia);
  CHECK(bitwise_equal(a1.out, a2.out));
  CHECK(bitwise_equal(b1.out, b2.out));
  CHECK(bitwise_equal(a1.lse, a2.lse));
  check_validation();
}

TEST_CASE("SpargeAttn stage 2 (P·V skip): the reference's skips, statistics and results") {
  Context* ctx = vulkan_context();
  if (!ctx) return;
  Context ref = Context::create(Backend::Reference);
  Case c;
  c.B = 1, c.Hq = 4, c.Hkv = 2, c.Nq = 300, c.Nk = 420, c.D = 64, c.magnitude = 2.5, c.seed = 5;
  Inputs in = make_inputs(c);
  auto run = [&](Context& x, const SpargeOptions& opt, const std::vector<SpargeParams>& params, SpargeStats& st) {
    Tensor q = x.from_host(c.dtype, {c.B, c.Hq, c.Nq, c.D}, in.q.data());
    Tensor k = x.from_host(c.dtype, {c.B, c.Hkv, c.Nk, c.D}, in.k.data());
    Tensor v = x.from_host(c.dtype, {c.B, c.Hkv, c.Nk, c.D}, in.v.data());
    Tensor out = x.empty(c.dtype, {c.B, c.Hq, c.Nq, c.D});
    sparge_attention(x, q, k, v, out, opt, params, &st);
    std::vector<uint16_t> raw(static_cast<std::size_t>(out.numel()));
    x.to_host(out, raw.data());
    std::vector<float> o(raw.size());
    for (std::size_t e = 0; e < raw.size(); ++e) o[e] = reference::load_16(raw[e], c.dtype);
    return o;
  };
  SpargeParams dense;
  dense.dense = true, dense.pvthreshd = 1.5f;
  SpargeParams sparse;
  sparse.simthreshd = 0.3f, sparse.cdfthreshd = 0.95f, sparse.pvthreshd = 3.0f;
  for (bool causal : {false, true})
    for (const auto& params : {std::vector<SpargeParams>{dense}, std::vector<SpargeParams>{sparse, dense, sparse, dense}}) {
      SpargeOptions opt;
      opt.attention.causal = causal;
      SpargeStats sv, sr;
      std::vector<float> got = run(*ctx, opt, params, sv);
      std::vector<float> want = run(ref, opt, params, sr);
      Accuracy a = compare(got, want);
      INFO("causal " << causal << " heads " << params.size() << ": vs reference " << a.describe() << "; pv skipped "
                     << sv.pv_skipped << "/" << sv.pv_total << " (reference " << sr.pv_skipped << "/" << sr.pv_total << ")");
      CHECK(a.rel_l1 <= kParityRelL1);
      CHECK(sv.pv_total == sr.pv_total);
      CHECK(sv.pv_skipped == sr.pv_skipped);
      CHECK(sv.pv_skipped > 0);
      CHECK(sv.blocks_computed == sr.blocks_computed);
    }
  check_validation();
}

TEST_CASE("unsupported requests are clear errors") {
  Context* ctx = vulkan_context();
  if (!ctx) return;
  Case c;
  c.pv_precision = PVPrecision::Fp8;
  Inputs in = make_inputs(c);
  try {
    run_case(*ctx, c, in);
    FAIL("fp8 P·V did not throw");
  } catch (const Error& e) {
    CHECK(e.status() == Status::NotSupported);
    CHECK(std::string(e.what()).find("fp8") != std::string::npos);
  }
  c.pv_precision = PVPrecision::Fp16, c.D = 32;  // not in the default -Dhead_dims
  in = make_inputs(c);
  try {
    run_case(*ctx, c, in);
    MESSAGE("head_dim 32 ran: this build generated it");
  } catch (const Error& e) {
    CHECK(e.status() == Status::NotSupported);
    CHECK(std::string(e.what()).find("head_dims") != std::string::npos);
  }
  check_validation();
}

TEST_CASE("profiling fills the device timing from timestamps") {
  Context* ctx = vulkan_context();
  if (!ctx) return;
  Case c;
  c.Nq = c.Nk = 512;
  Inputs in = make_inputs(c);
  ctx->set_profiling(true);
  run_case(*ctx, c, in);
  Timing t = ctx->last_timing();
  ctx->set_profiling(false);
  MESSAGE("total " << t.total_ms << " ms, attention " << t.attention_ms << " ms");
  CHECK(t.total_ms > 0);
  CHECK(t.attention_ms > 0);
  CHECK(t.attention_ms <= t.total_ms);
  check_validation();
}

TEST_CASE("Context::create(Backend::Vulkan) with a device index, and a bad index") {
  Context* ctx = vulkan_context();
  if (!ctx) return;
  Context again = Context::create(Backend::Vulkan, 0);
  CHECK(again.backend() == Backend::Vulkan);
  try {
    Context::create(Backend::Vulkan, 1000);
    FAIL("device 1000 exists?");
  } catch (const Error& e) {
    CHECK(e.status() == Status::BackendUnavailable);
  }
  // SPARQ_VULKAN_DEVICE picks a device by index or by a (case-insensitive) substring of its name.
  std::string name = ctx->device_name();
  {  // the variable is restored before the validation check below
    ScopedEnv device("SPARQ_VULKAN_DEVICE", name.substr(0, std::min<std::size_t>(name.size(), 4)).c_str());
    CHECK(Context::create(Backend::Vulkan).device_name() == name);
    device.set("no-such-gpu-anywhere");
    try {
      Context::create(Backend::Vulkan);
      FAIL("SPARQ_VULKAN_DEVICE=no-such-gpu-anywhere matched a device");
    } catch (const Error& e) {
      CHECK(e.status() == Status::BackendUnavailable);
      CHECK(std::string(e.what()).find("no-such-gpu-anywhere") != std::string::npos);
    }
  }
  check_validation();
}

}  // TEST_SUITE
