// The reference backend: number formats, quantization, and the emulated kernels against exact attention.
#include <doctest/doctest.h>

#include "harness.hpp"
#include "reference.hpp"

#include <cmath>
#include <cstring>
#include <ios>
#include <limits>

using namespace sparq;
using namespace sparq::test;
namespace ref = sparq::reference;

namespace {

Context& ref_ctx() {
  static Context ctx = Context::create(Backend::Reference);
  return ctx;
}

const double kInf = std::numeric_limits<double>::infinity();

std::size_t row_index(const Case& c, int b, int h, int t) {
  return (static_cast<std::size_t>(b) * c.Hq + h) * c.Nq + t;
}

// Runs a case on the reference context and checks it against exact attention: within the BENCH.md budget
// for fp16 inputs with fp16 P·V; within contract_bound() (see harness.hpp) for fp8 P·V and bf16 inputs,
// where the contract itself cannot reach the BENCH.md figure (test "the int8/fp8 path meets ...").
Result check_accuracy(const Case& c, const Inputs& in, const Exact& e) {
  Result r = run_case(ref_ctx(), c, in);
  Accuracy a = compare(r.out, e.out);
  INFO(c.describe());
  INFO(a.describe());
  CHECK(all_finite(r.out));
  CHECK(within(a, contract_bound(c)));
  if (c.dtype == DType::F16 && c.pv_precision == PVPrecision::Fp16)
    CHECK(within(a, budget(c.qk_precision, c.pv_precision)));
  return r;
}

// LSE tolerance: the logits' error grows with their size; int8 Q·Kᵀ errs by ~1% of a logit's spread.
double lse_tolerance(const Case& c) {
  if (c.qk_precision == QKPrecision::Int8) return 0.05;
  return c.dtype == DType::BF16 ? 0.02 : 2e-3;  // K' rounded to bf16 keeps 8 bits
}

// A naive exact attention written independently of reference::exact_attention.
std::vector<double> naive_attention(const Case& c, const Inputs& in, std::vector<double>* lse) {
  std::vector<double> out(static_cast<std::size_t>(c.B) * c.Hq * c.Nq * c.D, 0.0);
  if (lse) lse->assign(static_cast<std::size_t>(c.B) * c.Hq * c.Nq, -kInf);
  const double scale = c.resolved_scale();
  for (int b = 0; b < c.B; ++b)
    for (int h = 0; h < c.Hq; ++h) {
      const int kvh = h / (c.Hq / c.Hkv);
      for (int i = 0; i < c.Nq; ++i) {
        std::vector<double> w(static_cast<std::size_t>(c.Nk), 0.0);
        std::vector<bool> seen(static_cast<std::size_t>(c.Nk), false);
        double mx = -kInf;
        for (int j = 0; j < c.Nk; ++j) {
          if (c.causal && j > i + (c.Nk - c.Nq)) continue;
          if (c.mask == MaskKind::Bitmap) {
            int hm = h / (c.Hq / c.mask_heads);
            std::size_t at = ((static_cast<std::size_t>(b) * c.mask_heads + hm) * in.nqb + i / c.block_q) * in.nkb +
                             j / c.block_k;
            if (!in.bitmap[at]) continue;
          }
          double dot = 0;
          for (int ch = 0; ch < c.D; ++ch)
            dot += static_cast<double>(input_value(c, in.q, true, b, h, i, ch)) *
                   input_value(c, in.k, false, b, kvh, j, ch);
          w[static_cast<std::size_t>(j)] = dot * scale;
          seen[static_cast<std::size_t>(j)] = true;
          mx = std::max(mx, dot * scale);
        }
        if (mx == -kInf) continue;
        double sum = 0;
        for (int j = 0; j < c.Nk; ++j)
          if (seen[static_cast<std::size_t>(j)]) sum += std::exp(w[static_cast<std::size_t>(j)] - mx);
        for (int ch = 0; ch < c.D; ++ch) {
          double acc = 0;
          for (int j = 0; j < c.Nk; ++j)
            if (seen[static_cast<std::size_t>(j)])
              acc += std::exp(w[static_cast<std::size_t>(j)] - mx) * input_value(c, in.v, false, b, kvh, j, ch);
          out[row_index(c, b, h, i) * c.D + ch] = acc / sum;
        }
        if (lse) (*lse)[row_index(c, b, h, i)] = mx + std::log(sum);
      }
    }
  return out;
}

float e4m3_expected(int code) {
  const int sign = code >> 7, exp = (code >> 3) & 15, man = code & 7;
  double v;
  if (exp == 0) v = man / 8.0 * std::pow(2.0, -6);
  else v = (1.0 + man / 8.0) * std::pow(2.0, exp - 7);
  return static_cast<float>(sign ? -v : v);
}

uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

}  // namespace

TEST_SUITE("reference") {

TEST_CASE("reference context reports itself") {
  Context& ctx = ref_ctx();
  CHECK(ctx.backend() == Backend::Reference);
  CHECK(ctx.device_name().find("CPU reference (") == 0);
  auto g = ctx.mask_granularity();
  CHECK(g[0] == 16);
  CHECK(g[1] == 64);
}

// ---- number formats -------------------------------------------------------------------------------------

TEST_CASE("e4m3: all 256 codes decode to sign/exponent/mantissa and round-trip") {
  int nans = 0;
  for (int code = 0; code < 256; ++code) {
    INFO("code 0x" << std::hex << code);
    const float got = ref::e4m3_to_float(static_cast<uint8_t>(code));
    if ((code & 0x7F) == 0x7F) {
      CHECK(std::isnan(got));
      CHECK(ref::float_to_e4m3(got) == 0x7F);
      ++nans;
      continue;
    }
    const float want = e4m3_expected(code);
    CHECK(bits(got) == bits(want));  // -0 for 0x80 included
    CHECK(ref::float_to_e4m3(got) == code);
  }
  CHECK(nans == 2);
  CHECK(ref::e4m3_to_float(0x7E) == 448.0f);
  CHECK(ref::e4m3_to_float(0x01) == std::ldexp(1.0f, -9));
  CHECK(ref::e4m3_to_float(0x08) == std::ldexp(1.0f, -6));
}

TEST_CASE("e4m3: rounding to nearest even, saturation, NaN") {
  // Every midpoint between neighbouring codes rounds to the even code; just off it, to the nearer one.
  for (int code = 0; code < 0x7E; ++code) {
    const float lo = ref::e4m3_to_float(static_cast<uint8_t>(code));
    const float hi = ref::e4m3_to_float(static_cast<uint8_t>(code + 1));
    const float mid = (lo + hi) / 2;  // exact in fp32
    INFO("between 0x" << std::hex << code << " and 0x" << code + 1);
    const int even = (code % 2 == 0) ? code : code + 1;
    CHECK(ref::float_to_e4m3(mid) == even);
    CHECK(ref::float_to_e4m3(-mid) == (0x80 | even));
    CHECK(ref::float_to_e4m3(std::nextafter(mid, 0.0f)) == code);
    CHECK(ref::float_to_e4m3(std::nextafter(mid, 1000.0f)) == code + 1);
  }
  CHECK(ref::float_to_e4m3(0.0f) == 0x00);
  CHECK(ref::float_to_e4m3(-0.0f) == 0x80);
  CHECK(ref::float_to_e4m3(std::ldexp(1.0f, -10)) == 0x00);  // half the smallest subnormal: tie to 0
  CHECK(ref::float_to_e4m3(std::ldexp(1.0f, -20)) == 0x00);
  CHECK(ref::float_to_e4m3(448.0f) == 0x7E);
  CHECK(ref::float_to_e4m3(460.0f) == 0x7E);
  CHECK(ref::float_to_e4m3(500.0f) == 0x7E);
  CHECK(ref::float_to_e4m3(1e30f) == 0x7E);
  CHECK(ref::float_to_e4m3(-1e30f) == 0xFE);
  CHECK(ref::float_to_e4m3(std::numeric_limits<float>::infinity()) == 0x7E);
  CHECK(ref::float_to_e4m3(-std::numeric_limits<float>::infinity()) == 0xFE);
  CHECK(ref::float_to_e4m3(std::numeric_limits<float>::quiet_NaN()) == 0x7F);
  CHECK(ref::float_to_e4m3(-std::numeric_limits<float>::quiet_NaN()) == 0x7F);
}

TEST_CASE("fp16 and bf16: every code round-trips") {
  for (uint32_t h = 0; h < 65536; ++h) {
    const uint16_t code = static_cast<uint16_t>(h);
    const float f = ref::half_to_float(code);
    if ((code & 0x7C00) == 0x7C00 && (code & 0x3FF)) {
      CHECK(std::isnan(f));
      CHECK(std::isnan(ref::half_to_float(ref::float_to_half(f))));
    } else if (ref::float_to_half(f) != code) {
      FAIL_CHECK("fp16 code " << h << " -> " << f << " -> " << ref::float_to_half(f));
    }
    const float g = ref::bf16_to_float(code);
    if ((code & 0x7F80) == 0x7F80 && (code & 0x7F)) {
      CHECK(std::isnan(g));
      CHECK(std::isnan(ref::bf16_to_float(ref::float_to_bf16(g))));
    } else if (ref::float_to_bf16(g) != code) {
      FAIL_CHECK("bf16 code " << h << " -> " << g << " -> " << ref::float_to_bf16(g));
    }
  }
  CHECK(ref::half_to_float(0x3C00) == 1.0f);
  CHECK(ref::half_to_float(0x0001) == std::ldexp(1.0f, -24));
  CHECK(ref::half_to_float(0x7BFF) == 65504.0f);
  CHECK(ref::bf16_to_float(0x3F80) == 1.0f);
}

TEST_CASE("fp16 and bf16: round to nearest even, subnormals, overflow") {
  // Half: ties between 1 and 1 + 2^-10 go to 1; between 1 + 2^-10 and 1 + 2^-9 to 1 + 2^-9.
  CHECK(ref::float_to_half(1.0f + std::ldexp(1.0f, -11)) == 0x3C00);
  CHECK(ref::float_to_half(1.0f + 3 * std::ldexp(1.0f, -11)) == 0x3C02);
  CHECK(ref::float_to_half(std::ldexp(1.0f, -25)) == 0x0000);      // half the smallest subnormal
  CHECK(ref::float_to_half(3 * std::ldexp(1.0f, -25)) == 0x0002);  // 1.5 subnormal steps -> 2
  CHECK(ref::float_to_half(-std::ldexp(1.0f, -24)) == 0x8001);
  CHECK(ref::float_to_half(std::ldexp(1023.5f, -24)) == 0x0400);  // rounds up into the normals
  CHECK(ref::float_to_half(65504.0f) == 0x7BFF);
  CHECK(ref::float_to_half(65519.99f) == 0x7BFF);
  CHECK(ref::float_to_half(65520.0f) == 0x7C00);
  CHECK(ref::float_to_half(-1e10f) == 0xFC00);
  CHECK(ref::float_to_bf16(1.0f + std::ldexp(1.0f, -8)) == 0x3F80);
  CHECK(ref::float_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)) == 0x3F82);
  CHECK(ref::float_to_bf16(3.4e38f) == 0x7F80);  // rounds past the largest bf16

  // Every result is a nearest representable value, ties to the even code (checked against neighbours).
  uint64_t state = 12345;
  auto next = [&] {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return static_cast<uint32_t>(state >> 32);
  };
  for (int n = 0; n < 200000; ++n) {
    uint32_t u = next();
    if (n % 2) u = (u & 0x807FFFFFu) | ((100u + next() % 50u) << 23);  // half's range, subnormals included
    const float x = from_bits(u);
    if (!std::isfinite(x)) continue;
    struct Fmt {
      uint16_t (*enc)(float);
      float (*dec)(uint16_t);
      uint16_t inf;
    } fmts[] = {{ref::float_to_half, ref::half_to_float, 0x7C00}, {ref::float_to_bf16, ref::bf16_to_float, 0x7F80}};
    for (const Fmt& f : fmts) {
      const uint16_t code = f.enc(x);
      const uint16_t mag = code & 0x7FFF;
      if (mag >= f.inf) continue;  // overflow checked above
      const double y = f.dec(code), d = std::fabs(static_cast<double>(x) - y);
      const uint16_t sign = code & 0x8000;
      const double up = f.dec(static_cast<uint16_t>(sign | (mag + 1)));
      const double down = mag ? f.dec(static_cast<uint16_t>(sign | (mag - 1))) : -y;
      const double du = std::fabs(static_cast<double>(x) - up), dd = std::fabs(static_cast<double>(x) - down);
      if (d > du || d > dd || ((d == du || d == dd) && (mag & 1)))
        FAIL_CHECK("x=" << x << " rounded to " << y << " (code " << code << ")");
    }
  }
}

// ---- INT8 quantization ----------------------------------------------------------------------------------

TEST_CASE("INT8 groups follow the MMA fragment layout") {
  using G = QKGranularity;
  CHECK(ref::q_group(G::PerBlock, 127) == 0);
  CHECK(ref::q_group(G::PerBlock, 128) == 1);
  CHECK(ref::q_group(G::PerWarp, 15) == 0);
  CHECK(ref::q_group(G::PerWarp, 16) == 1);
  CHECK(ref::q_group(G::PerThread, 0) == ref::q_group(G::PerThread, 8));
  CHECK(ref::q_group(G::PerThread, 7) == 7);
  CHECK(ref::q_group(G::PerThread, 16) == 8);
  CHECK(ref::q_group(G::PerThread, 16 + 8 + 3) == 11);
  CHECK(ref::k_group(G::PerBlock, 63) == 0);
  CHECK(ref::k_group(G::PerWarp, 64) == 1);
  CHECK(ref::k_group(G::PerThread, 8) == 0);
  CHECK(ref::k_group(G::PerThread, 56 + 5) == 5);
  CHECK(ref::k_group(G::PerThread, 64 + 13) == 13);
  CHECK(ref::group_count(G::PerThread, 17, true) == 9);
  CHECK(ref::group_count(G::PerThread, 3, false) == 3);
  CHECK(ref::group_count(G::PerBlock, 129, true) == 2);
}

TEST_CASE("INT8 quantization errs by at most half a step") {
  const int n = 300, d = 64;
  std::vector<float> x(static_cast<std::size_t>(n) * d);
  uint64_t s = 99;
  for (auto& v : x) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    v = (static_cast<float>(s >> 40) / 16777216.0f - 0.5f) * ((s >> 20) % 7 == 0 ? 40.0f : 3.0f);
  }
  for (QKGranularity g : {QKGranularity::PerBlock, QKGranularity::PerWarp, QKGranularity::PerThread})
    for (bool query : {true, false}) {
      ref::QuantizedTokens qt = ref::quantize_tokens(x.data(), 0, n, d, query, g);
      CHECK(qt.steps.size() == static_cast<std::size_t>(ref::group_count(g, n, query)));
      std::vector<float> amax(qt.steps.size(), 0.0f);
      for (int t = 0; t < n; ++t) {
        const int grp = query ? ref::q_group(g, t) : ref::k_group(g, t);
        const float step = qt.steps[static_cast<std::size_t>(grp)];
        CHECK(qt.token_step[static_cast<std::size_t>(t)] == step);
        for (int c = 0; c < d; ++c) {
          const float v = x[static_cast<std::size_t>(t * d + c)];
          const int8_t q = qt.values[static_cast<std::size_t>(t * d + c)];
          amax[static_cast<std::size_t>(grp)] = std::max(amax[static_cast<std::size_t>(grp)], std::fabs(v));
          if (!(std::fabs(v - q * step) <= step * 0.5f * (1 + 1e-5f)) || q < -127)
            FAIL_CHECK("token " << t << " channel " << c << ": " << v << " -> " << int(q) << " * " << step);
        }
      }
      for (std::size_t gi = 0; gi < amax.size(); ++gi) CHECK(qt.steps[gi] == amax[gi] / 127.0f);
    }
  // a zero group quantizes to zeros with step 0; the maximum maps to ±127; NaN to 0
  float z[4] = {0, 0, 0, 0}, w[4] = {1.0f, -2.0f, 0.5f, std::numeric_limits<float>::quiet_NaN()};
  int8_t q[4];
  CHECK(ref::quantize_group(z, 4, q) == 0.0f);
  CHECK((q[0] == 0 && q[3] == 0));
  CHECK(ref::quantize_group(w, 4, q) == 2.0f / 127.0f);
  CHECK(q[1] == -127);
  CHECK(q[0] == 64);  // 63.5 rounds to even
  CHECK(q[3] == 0);
}

// ---- the oracle -----------------------------------------------------------------------------------------

TEST_CASE("exact attention equals an independent naive computation") {
  Case c;
  c.B = 2, c.Hq = 4, c.Hkv = 2, c.Nq = 40, c.Nk = 70, c.D = 32;
  for (bool causal : {false, true})
    for (MaskKind m : {MaskKind::None, MaskKind::Bitmap, MaskKind::Lut}) {
      c.causal = causal;
      c.mask = m;
      c.block_q = 16, c.block_k = 64, c.mask_heads = 2, c.empty_rows = true;
      Inputs in = make_inputs(c);
      Case naive_case = c;
      if (m == MaskKind::Lut) naive_case.mask = MaskKind::Bitmap;  // the LUT is built from the same bitmap
      std::vector<double> lse;
      std::vector<double> want = naive_attention(naive_case, in, &lse);
      Exact e = exact(c, in);
      INFO(c.describe());
      double worst = 0;
      for (std::size_t i = 0; i < want.size(); ++i) worst = std::max(worst, std::fabs(want[i] - e.out[i]));
      CHECK(worst < 1e-12);
      for (std::size_t i = 0; i < lse.size(); ++i) {
        if (std::isinf(lse[i])) CHECK(e.lse[i] == lse[i]);
        else CHECK(std::fabs(lse[i] - e.lse[i]) < 1e-12);
      }
    }
}

// ---- the emulation --------------------------------------------------------------------------------------

TEST_CASE("the API path equals the direct emulation for both layouts and padded strides") {
  Case base;
  base.B = 2, base.Hq = 4, base.Hkv = 2, base.Nq = 150, base.Nk = 90, base.D = 64;
  base.causal = true;
  Result first;
  for (Layout layout : {Layout::HND, Layout::NHD})
    for (int pad : {0, 24}) {
      Case c = base;
      c.layout = layout;
      c.row_pad = pad;
      Inputs in = make_inputs(c);
      Result api = run_case(ref_ctx(), c, in);
      Result direct = emulate(c, in);
      INFO(c.describe());
      std::size_t at = 0;
      CHECK_MESSAGE(bitwise_equal(api.out, direct.out, &at), "first difference at " << at);
      CHECK(bitwise_equal(api.lse, direct.lse));
      // the same values in another layout or with other strides give the same bits
      if (layout == Layout::HND && pad == 0) first = api;
      else {
        CHECK(bitwise_equal(api.out, first.out));
        CHECK(bitwise_equal(api.lse, first.lse));
      }
    }
}

TEST_CASE("wrapped host memory with a padded token stride") {
  Case c;
  c.Hq = 2, c.Hkv = 2, c.Nq = 70, c.Nk = 200, c.D = 64;
  Inputs in = make_inputs(c);
  Result want = run_case(ref_ctx(), c, in);
  // q, k, v, out as views of caller memory with rows of 80 elements
  const int64_t row = 80;
  auto padded = [&](const std::vector<uint16_t>& src, int H, int N) {
    std::vector<uint16_t> dst(static_cast<std::size_t>(c.B * H * N) * row, 0xFFFF);  // NaN padding
    for (std::size_t r = 0; r < static_cast<std::size_t>(c.B * H * N); ++r)
      std::memcpy(&dst[r * row], &src[r * c.D], sizeof(uint16_t) * c.D);
    return dst;
  };
  std::vector<uint16_t> q = padded(in.q, c.Hq, c.Nq), k = padded(in.k, c.Hkv, c.Nk), v = padded(in.v, c.Hkv, c.Nk);
  std::vector<uint16_t> o(static_cast<std::size_t>(c.B * c.Hq * c.Nq) * row, 0x1234);
  Context& ctx = ref_ctx();
  auto strides = [&](int H, int N) { return std::vector<int64_t>{H * N * row, N * row, row, 1}; };
  Tensor tq = ctx.wrap_host(q.data(), DType::F16, {c.B, c.Hq, c.Nq, c.D}, strides(c.Hq, c.Nq));
  Tensor tk = ctx.wrap_host(k.data(), DType::F16, {c.B, c.Hkv, c.Nk, c.D}, strides(c.Hkv, c.Nk));
  Tensor tv = ctx.wrap_host(v.data(), DType::F16, {c.B, c.Hkv, c.Nk, c.D}, strides(c.Hkv, c.Nk));
  Tensor to = ctx.wrap_host(o.data(), DType::F16, {c.B, c.Hq, c.Nq, c.D}, strides(c.Hq, c.Nq));
  AttentionOptions opt;
  opt.pv_precision = PVPrecision::Fp16;
  attention(ctx, tq, tk, tv, to, opt);
  std::size_t wrong = 0, pad_touched = 0;
  for (std::size_t r = 0; r < static_cast<std::size_t>(c.B * c.Hq * c.Nq); ++r) {
    for (int ch = 0; ch < c.D; ++ch)
      if (ref::half_to_float(o[r * row + ch]) != want.out[r * c.D + ch]) ++wrong;
    for (int64_t ch = c.D; ch < row; ++ch)
      if (o[r * row + static_cast<std::size_t>(ch)] != 0x1234) ++pad_touched;
  }
  CHECK(wrong == 0);
  CHECK(pad_touched == 0);
}

TEST_CASE("a single visible key: O = v on both P·V paths") {
  Case c;
  c.B = 1, c.Hq = 2, c.Hkv = 1, c.Nq = 3, c.Nk = 1, c.D = 64;
  Inputs in = make_inputs(c);
  Exact e = exact(c, in);
  for (QKPrecision qk : {QKPrecision::Fp16, QKPrecision::Int8})
    for (PVPrecision pv : {PVPrecision::Fp16, PVPrecision::Fp8}) {
      c.qk_precision = qk, c.pv_precision = pv;
      Result r = run_case(ref_ctx(), c, in);
      INFO(c.describe());
      // p = 1: fp16 P·V gives v / 1; fp8 gives e4m3(448)·e4m3(±448)·(|v|/448)/448 = v
      for (int h = 0; h < c.Hq; ++h)
        for (int i = 0; i < c.Nq; ++i)
          for (int ch = 0; ch < c.D; ++ch)
            REQUIRE(r.out[row_index(c, 0, h, i) * c.D + ch] == input_value(c, in.v, false, 0, 0, 0, ch));
      CHECK(compare_lse(r.lse, e.lse).ok(lse_tolerance(c)));
    }
}

TEST_CASE("accuracy of every path within the budget at odd sizes") {
  Case base;
  base.D = 64;
  struct Path {
    QKPrecision qk;
    QKGranularity g;
    PVPrecision pv;
  };
  const Path paths[] = {
      {QKPrecision::Fp16, QKGranularity::PerBlock, PVPrecision::Fp16},
      {QKPrecision::Int8, QKGranularity::PerBlock, PVPrecision::Fp16},
      {QKPrecision::Int8, QKGranularity::PerWarp, PVPrecision::Fp16},
      {QKPrecision::Int8, QKGranularity::PerThread, PVPrecision::Fp16},
      {QKPrecision::Int8, QKGranularity::PerBlock, PVPrecision::Fp8},
      {QKPrecision::Int8, QKGranularity::PerThread, PVPrecision::Fp8},
  };
  int cases = 0;
  for (bool causal : {false, true})
    for (Case c : odd_size_cases(base)) {
      if (causal && c.Nq == 4097) continue;  // the largest size once is enough
      c.causal = causal;
      c.seed = static_cast<uint64_t>(c.Nq * 7 + c.Nk + causal);
      Inputs in = make_inputs(c);
      Exact e = exact(c, in);
      for (const Path& p : paths) {
        c.qk_precision = p.qk, c.qk_granularity = p.g, c.pv_precision = p.pv;
        Result r = check_accuracy(c, in, e);
        LseDiff d = compare_lse(r.lse, e.lse);
        INFO(c.describe());
        INFO(d.describe());
        CHECK(d.ok(lse_tolerance(c)));
        ++cases;
      }
    }
  MESSAGE(cases << " size/path combinations");
}

TEST_CASE("K smoothing leaves O unchanged and LSE corrected") {
  Case c;
  c.B = 1, c.Hq = 2, c.Hkv = 1, c.Nq = 300, c.Nk = 500, c.D = 64;
  c.k_bias = 4.0;  // a large per-channel bias: smoothing shifts each logit by a lot
  Inputs in = make_inputs(c);
  Exact e = exact(c, in);
  for (QKPrecision qk : {QKPrecision::Fp16, QKPrecision::Int8}) {
    c.qk_precision = qk;
    c.smooth_k = true;
    Result on = check_accuracy(c, in, e);
    c.smooth_k = false;
    Result off = run_case(ref_ctx(), c, in);
    INFO(c.describe());
    if (qk == QKPrecision::Fp16) {
      // the softmax is the same up to rounding; only the logits' rounding differs
      Accuracy a = compare(on.out, off.out);
      INFO(a.describe());
      CHECK(a.rel_l1 < 1e-3);
      CHECK(within(compare(off.out, e.out), budget(qk, c.pv_precision)));
    }
    LseDiff don = compare_lse(on.lse, e.lse), doff = compare_lse(off.lse, e.lse);
    INFO("smooth: " << don.describe() << "; no smooth: " << doff.describe());
    CHECK(don.ok(lse_tolerance(c)));
    if (qk == QKPrecision::Fp16) CHECK(doff.ok(lse_tolerance(c)));
    // the correction is not trivially small here: scale·q·km spans many units across rows
    double lo = 1e300, hi = -1e300;
    for (double x : e.lse) lo = std::min(lo, x), hi = std::max(hi, x);
    CHECK(hi - lo > 10 * lse_tolerance(c));
  }
}

TEST_CASE("causal is bottom-right aligned when Nq != Nk") {
  for (auto [nq, nk] : {std::pair{100, 37}, std::pair{37, 100}, std::pair{64, 64}, std::pair{129, 1}}) {
    Case c;
    c.B = 1, c.Hq = 2, c.Hkv = 1, c.Nq = nq, c.Nk = nk, c.D = 64;
    c.causal = true;
    c.qk_precision = QKPrecision::Fp16;
    Inputs in = make_inputs(c);
    Exact e = exact(c, in);
    Result r = check_accuracy(c, in, e);
    const int offset = nk - nq;  // query i sees keys j <= i + offset
    for (int h = 0; h < c.Hq; ++h)
      for (int i = 0; i < nq; ++i) {
        const std::size_t row = row_index(c, 0, h, i);
        INFO(c.describe() << " head " << h << " row " << i);
        if (i + offset < 0) {
          for (int ch = 0; ch < c.D; ++ch) REQUIRE(r.out[row * c.D + ch] == 0.0f);
          REQUIRE(std::isinf(r.lse[row]));
          REQUIRE(r.lse[row] < 0);
          REQUIRE(e.lse[row] == -kInf);
        } else if (i + offset == 0) {
          // exactly one visible key: O is v[0] (p = 1 exactly) and LSE its logit
          for (int ch = 0; ch < c.D; ++ch) REQUIRE(r.out[row * c.D + ch] == input_value(c, in.v, false, 0, 0, 0, ch));
        }
      }
    // a row of the causal problem equals the non-causal problem over the keys it sees
    for (int i : {nq - 1, nq / 2, std::max(0, -offset)}) {
      if (i + offset < 0) continue;
      Case sub = c;
      sub.causal = false;
      sub.Nq = 1;
      sub.Nk = i + offset + 1;
      Inputs sin = make_inputs(sub);
      for (int h = 0; h < c.Hq; ++h)
        for (int ch = 0; ch < c.D; ++ch) {
          sin.q[input_index(sub, true, 0, h, 0, ch)] = in.q[input_index(c, true, 0, h, i, ch)];
          for (int j = 0; j < sub.Nk; ++j)
            if (h < c.Hkv) {
              sin.k[input_index(sub, false, 0, h, j, ch)] = in.k[input_index(c, false, 0, h, j, ch)];
              sin.v[input_index(sub, false, 0, h, j, ch)] = in.v[input_index(c, false, 0, h, j, ch)];
            }
        }
      Exact se = exact(sub, sin);
      for (int h = 0; h < c.Hq; ++h) {
        for (int ch = 0; ch < c.D; ++ch)
          CHECK(std::fabs(se.out[static_cast<std::size_t>(h) * c.D + ch] - e.out[row_index(c, 0, h, i) * c.D + ch]) < 1e-12);
        CHECK(std::fabs(se.lse[static_cast<std::size_t>(h)] - e.lse[row_index(c, 0, h, i)]) < 1e-12);
      }
    }
  }
}

TEST_CASE("empty mask rows give O = 0 and LSE = -inf") {
  for (MaskKind m : {MaskKind::Bitmap, MaskKind::Lut})
    for (PVPrecision pv : {PVPrecision::Fp16, PVPrecision::Fp8}) {
      Case c;
      c.B = 2, c.Hq = 4, c.Hkv = 2, c.Nq = 200, c.Nk = 300, c.D = 64;
      c.mask = m, c.block_q = 32, c.block_k = 64, c.mask_heads = 2, c.empty_rows = true, c.density = 0.4;
      c.pv_precision = pv;
      Inputs in = make_inputs(c);
      Exact e = exact(c, in);
      Result r = check_accuracy(c, in, e);
      std::size_t empty = 0;
      for (std::size_t row = 0; row < e.lse.size(); ++row) {
        if (e.lse[row] != -kInf) continue;
        ++empty;
        INFO(c.describe() << " row " << row);
        for (int ch = 0; ch < c.D; ++ch) REQUIRE(r.out[row * c.D + ch] == 0.0f);
        REQUIRE(r.lse[row] == -std::numeric_limits<float>::infinity());
      }
      CHECK(empty > 0);
      CHECK(compare_lse(r.lse, e.lse).ok(lse_tolerance(c)));
    }
}

TEST_CASE("GQA: each query head attends to its kv head h / (Hq / Hkv)") {
  Case c;
  c.B = 2, c.Hq = 8, c.Hkv = 2, c.Nq = 90, c.Nk = 130, c.D = 64;
  c.causal = true;
  c.pv_precision = PVPrecision::Fp8;
  Inputs in = make_inputs(c);
  Exact e = exact(c, in);
  Result all = check_accuracy(c, in, e);
  // one query head against its kv head alone: the same bits
  Case one = c;
  one.B = 1, one.Hq = 1, one.Hkv = 1;
  for (int b = 0; b < c.B; ++b)
    for (int h = 0; h < c.Hq; ++h) {
      Inputs sin = make_inputs(one);
      const int kvh = h / (c.Hq / c.Hkv);
      for (int ch = 0; ch < c.D; ++ch) {
        for (int t = 0; t < c.Nq; ++t)
          sin.q[input_index(one, true, 0, 0, t, ch)] = in.q[input_index(c, true, b, h, t, ch)];
        for (int t = 0; t < c.Nk; ++t) {
          sin.k[input_index(one, false, 0, 0, t, ch)] = in.k[input_index(c, false, b, kvh, t, ch)];
          sin.v[input_index(one, false, 0, 0, t, ch)] = in.v[input_index(c, false, b, kvh, t, ch)];
        }
      }
      Result r = run_case(ref_ctx(), one, sin);
      const std::size_t at = row_index(c, b, h, 0);
      std::vector<float> part(all.out.begin() + static_cast<std::ptrdiff_t>(at * c.D),
                              all.out.begin() + static_cast<std::ptrdiff_t>((at + c.Nq) * c.D));
      std::vector<float> lpart(all.lse.begin() + static_cast<std::ptrdiff_t>(at),
                               all.lse.begin() + static_cast<std::ptrdiff_t>(at + c.Nq));
      INFO("batch " << b << " head " << h);
      CHECK(bitwise_equal(part, r.out));
      CHECK(bitwise_equal(lpart, r.lse));
    }
}

TEST_CASE("bitmap and LUT masks give identical results") {
  struct M {
    int bq, bk, hm;
  };
  for (M m : {M{16, 64, 1}, M{64, 128, 2}, M{128, 64, 8}, M{32, 192, 1}}) {
    Case c;
    c.B = 2, c.Hq = 8, c.Hkv = 2, c.Nq = 333, c.Nk = 517, c.D = 64;
    c.block_q = m.bq, c.block_k = m.bk, c.mask_heads = m.hm, c.density = 0.35, c.empty_rows = true;
    c.causal = m.bq == 64;
    c.pv_precision = m.hm == 2 ? PVPrecision::Fp8 : PVPrecision::Fp16;
    c.mask = MaskKind::Bitmap;
    Inputs in = make_inputs(c);
    Result bitmap = run_case(ref_ctx(), c, in);
    c.mask = MaskKind::Lut;
    Result lut = run_case(ref_ctx(), c, in);
    INFO(c.describe());
    CHECK(bitwise_equal(bitmap.out, lut.out));
    CHECK(bitwise_equal(bitmap.lse, lut.lse));
    Exact e = exact(c, in);
    check_accuracy(c, in, e);
  }
}

TEST_CASE("a mask that lists every block equals no mask") {
  Case c;
  c.B = 1, c.Hq = 2, c.Hkv = 1, c.Nq = 100, c.Nk = 250, c.D = 64;
  Inputs in = make_inputs(c);
  Result dense = run_case(ref_ctx(), c, in);
  c.mask = MaskKind::Lut, c.density = 1.0, c.block_q = 16, c.block_k = 64;
  Inputs min = make_inputs(c);
  // make_inputs draws the data before the mask: the same seed gives the same q, k, v
  REQUIRE(in.q == min.q);
  REQUIRE(in.k == min.k);
  REQUIRE(in.v == min.v);
  Result masked = run_case(ref_ctx(), c, min);
  CHECK(bitwise_equal(dense.out, masked.out));
  CHECK(bitwise_equal(dense.lse, masked.lse));
}

TEST_CASE("integer inputs quantize exactly: INT8 and FP16 Q·Kᵀ agree bit for bit") {
  Case c;
  c.B = 1, c.Hq = 2, c.Hkv = 1, c.Nq = 77, c.Nk = 200, c.D = 64;
  c.integer_inputs = true, c.smooth_k = false;
  c.scale = 1.0f / (127.0f * 127.0f);
  Inputs in = make_inputs(c);
  c.qk_precision = QKPrecision::Fp16;
  Result fp16 = run_case(ref_ctx(), c, in);
  for (QKGranularity g : {QKGranularity::PerBlock, QKGranularity::PerWarp, QKGranularity::PerThread}) {
    c.qk_precision = QKPrecision::Int8, c.qk_granularity = g;
    Result int8 = run_case(ref_ctx(), c, in);
    INFO(c.describe());
    CHECK(bitwise_equal(int8.out, fp16.out));
    CHECK(bitwise_equal(int8.lse, fp16.lse));
  }
}

TEST_CASE("bf16 inputs and outputs") {
  Case c;
  c.dtype = DType::BF16;
  c.B = 1, c.Hq = 4, c.Hkv = 2, c.Nq = 257, c.Nk = 300, c.D = 128;
  for (bool causal : {false, true})
    for (QKPrecision qk : {QKPrecision::Fp16, QKPrecision::Int8})
      for (PVPrecision pv : {PVPrecision::Fp16, PVPrecision::Fp8}) {
        c.causal = causal, c.qk_precision = qk, c.pv_precision = pv;
        c.layout = causal ? Layout::NHD : Layout::HND;
        Inputs in = make_inputs(c);
        Exact e = exact(c, in);
        Result r = check_accuracy(c, in, e);
        CHECK(compare_lse(r.lse, e.lse).ok(lse_tolerance(c)));
      }
}

TEST_CASE("huge and tiny magnitudes stay finite and within budget") {
  for (DType dtype : {DType::F16, DType::BF16})
    for (double mag : {1e4, 1e-4})
      for (QKPrecision qk : {QKPrecision::Fp16, QKPrecision::Int8})
        for (PVPrecision pv : {PVPrecision::Fp16, PVPrecision::Fp8}) {
          Case c;
          c.dtype = dtype;
          c.B = 1, c.Hq = 2, c.Hkv = 1, c.Nq = 200, c.Nk = 300, c.D = 64;
          c.magnitude = mag, c.v_magnitude = mag;
          // the same softmax as at unit magnitude: the logits stay O(1)
          c.scale = static_cast<float>(1.0 / (mag * mag * 8.0));
          c.qk_precision = qk, c.pv_precision = pv;
          Inputs in = make_inputs(c);
          Exact e = exact(c, in);
          Result r = run_case(ref_ctx(), c, in);
          INFO(c.describe());
          CHECK(all_finite(r.out));
          CHECK(all_finite(r.lse));
          CHECK(compare_lse(r.lse, e.lse).ok(lse_tolerance(c)));
          // At 1e-4 most fp16 outputs are subnormal: rounding exact attention itself into fp16 costs 0.002
          // rel L1, twice the fp16/fp16 budget. The budget is checked against exact attention rounded to the
          // output dtype (the best any kernel can write); at 1e4 that changes nothing.
          const std::vector<double> best = round_output(e.out, c.dtype);
          Accuracy a = compare(r.out, best);
          INFO(a.describe() << "; the output dtype's own rounding: " << compare(std::vector<float>(best.begin(), best.end()), e.out).describe());
          CHECK(within(a, contract_bound(c)));
          if (c.dtype == DType::F16 && pv == PVPrecision::Fp16) CHECK(within(a, budget(qk, pv)));
        }
  // huge logits (unscaled): the softmax is nearly one-hot, and nothing overflows
  Case c;
  c.B = 1, c.Hq = 1, c.Hkv = 1, c.Nq = 100, c.Nk = 100, c.D = 64;
  c.magnitude = 100, c.v_magnitude = 1e4;
  Inputs in = make_inputs(c);
  for (PVPrecision pv : {PVPrecision::Fp16, PVPrecision::Fp8}) {
    c.pv_precision = pv;
    Result r = run_case(ref_ctx(), c, in);
    CHECK(all_finite(r.out));
    CHECK(all_finite(r.lse));
  }
}

TEST_CASE("NaN inputs do not crash and stay in their (batch, head)") {
  Case c;
  c.B = 2, c.Hq = 2, c.Hkv = 2, c.Nq = 100, c.Nk = 150, c.D = 64;
  Inputs in = make_inputs(c);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  set_input_value(c, in.q, true, 0, 0, 5, 3, nan);
  set_input_value(c, in.k, false, 0, 1, 7, 9, nan);
  set_input_value(c, in.v, false, 0, 1, 11, 0, std::numeric_limits<float>::infinity());
  for (QKPrecision qk : {QKPrecision::Fp16, QKPrecision::Int8})
    for (PVPrecision pv : {PVPrecision::Fp16, PVPrecision::Fp8}) {
      c.qk_precision = qk, c.pv_precision = pv;
      Result r;
      CHECK_NOTHROW(r = run_case(ref_ctx(), c, in));
      CHECK_NOTHROW(exact(c, in));
      // batch 1 has no NaN: finite there
      const std::size_t half = r.out.size() / 2;
      CHECK(all_finite(std::vector<float>(r.out.begin() + static_cast<std::ptrdiff_t>(half), r.out.end())));
    }
}

TEST_CASE("per-warp and per-thread INT8 are at least as accurate as per-block on per-token outliers") {
  Case c;
  c.B = 1, c.Hq = 4, c.Hkv = 2, c.Nq = 512, c.Nk = 512, c.D = 64;
  c.outliers = 8.0;
  c.scale = 1.0f / 32.0f;  // keep the outliers' logits moderate
  Inputs in = make_inputs(c);
  Exact e = exact(c, in);
  double err[3];
  int i = 0;
  for (QKGranularity g : {QKGranularity::PerBlock, QKGranularity::PerWarp, QKGranularity::PerThread}) {
    c.qk_granularity = g;
    Result r = run_case(ref_ctx(), c, in);
    err[i++] = compare(r.out, e.out).rel_l1;
  }
  INFO("per-block " << err[0] << " per-warp " << err[1] << " per-thread " << err[2]);
  CHECK(err[1] <= err[0]);
  CHECK(err[2] <= err[0]);
  CHECK(err[2] < 0.5 * err[0]);  // per-thread groups of 2 query / 8 key tokens isolate the outliers
}

// BENCH.md's budget for int8 Q·Kᵀ with fp8 P·V is 0.03 rel L1 on its protocol data (N(0,1) q, k, v, a
// per-channel bias on K). The contract's fp8 path, emulated exactly, measures 0.033-0.044 there: e4m3 keeps
// 3 mantissa bits, and rounding P and V each costs ~0.025 on zero-mean V (0.036 together; the peer kernel
// measured 0.039). No implementation of the contract can pass; the contract (e.g. a second e4m3 term for V,
// or V in fp16) or the budget has to change. Until then this test reports the figures and may fail.
TEST_CASE("the int8/fp8 path meets the BENCH.md budget on the protocol data" * doctest::may_fail()) {
  for (int D : {64, 128})
    for (QKGranularity g : {QKGranularity::PerBlock, QKGranularity::PerThread}) {
      Case c;
      c.B = 1, c.Hq = 2, c.Hkv = 2, c.Nq = 1024, c.Nk = 1024, c.D = D;
      c.qk_granularity = g, c.pv_precision = PVPrecision::Fp8;
      Inputs in = make_inputs(c);
      Exact e = exact(c, in);
      Result r = run_case(ref_ctx(), c, in);
      Accuracy a = compare(r.out, e.out);
      MESSAGE(c.describe() << ": " << a.describe() << " (budget rel_l1 <= 0.03, cos >= 0.9995)");
      CHECK(within(a, budget(c.qk_precision, c.pv_precision)));
    }
}

TEST_CASE("profiling reports the wall time of the call") {
  Context ctx = Context::create(Backend::Reference);
  ctx.set_profiling(true);
  Case c;
  Inputs in = make_inputs(c);
  run_case(ctx, c, in);
  Timing t = ctx.last_timing();
  CHECK(t.total_ms > 0);
  CHECK(t.attention_ms == t.total_ms);
}

}  // TEST_SUITE
