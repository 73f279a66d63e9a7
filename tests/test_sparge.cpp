// SpargeAttn on the Reference backend: the Hilbert order, the stage-1 predictor (through sparge_attention and
// predict_block_mask), the stage-2 P·V skip, the hyper-parameter file, the tuner and the `sparq tune` tool.
#include <doctest/doctest.h>

#include <sparq/sparge.hpp>

#include "harness.hpp"
#include "reference.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <limits>
#include <optional>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <unistd.h>

using namespace sparq;
namespace fs = std::filesystem;

namespace {

// ---- inputs ---------------------------------------------------------------------------------------------

// Tokens on a (t, h, w) grid, row-major. q and k are random Fourier features of the position (the same
// frequencies for both, a little noise), so q·k is a smooth bump around the query's own position whose peak
// logit (after the softmax scale) is about `peak`; v varies smoothly too. HND [B, H, N, D] fp32.
struct Qkv {
  int B = 1, Hq = 2, Hkv = 2, N = 0, D = 64;
  std::vector<float> q, k, v;
};

Qkv grid_inputs(int t, int h, int w, int B, int Hq, int Hkv, int D, double peak, double width, uint64_t seed,
                double noise = 0.05) {
  Qkv x;
  x.B = B;
  x.Hq = Hq;
  x.Hkv = Hkv;
  x.N = t * h * w;
  x.D = D;
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  const int F = D / 2;
  // q·k = A² Σ_f cos(ω_f·Δp) ≈ A² F at Δp = 0; logit peak = A² F / sqrt(D)
  const double amp = std::sqrt(peak * std::sqrt(static_cast<double>(D)) / F);
  auto features = [&](int heads, bool query, std::vector<float>& out, const std::vector<std::vector<double>>& omega,
                      const std::vector<std::vector<double>>& phase) {
    out.assign(static_cast<std::size_t>(B) * heads * x.N * D, 0.0f);
    for (int b = 0; b < B; ++b)
      for (int hd = 0; hd < heads; ++hd) {
        const int fh = query ? hd / (Hq / Hkv) : hd;  // query heads use their kv head's frequencies
        for (int n = 0; n < x.N; ++n) {
          const double pt = n / (h * w), py = (n / w) % h, px = n % w;
          float* row = out.data() + ((static_cast<std::size_t>(b) * heads + hd) * x.N + n) * D;
          for (int f = 0; f < F; ++f) {
            const double* om = omega[static_cast<std::size_t>(fh * F + f)].data();
            const double arg = om[0] * pt + om[1] * py + om[2] * px + phase[static_cast<std::size_t>(fh)][static_cast<std::size_t>(f)];
            row[2 * f] = static_cast<float>(amp * std::cos(arg) + noise * amp * nd(rng));
            row[2 * f + 1] = static_cast<float>(amp * std::sin(arg) + noise * amp * nd(rng));
          }
        }
      }
  };
  std::vector<std::vector<double>> omega(static_cast<std::size_t>(Hkv * F), std::vector<double>(3));
  std::vector<std::vector<double>> phase(static_cast<std::size_t>(Hkv), std::vector<double>(static_cast<std::size_t>(F)));
  for (auto& o : omega)
    for (double& c : o) c = nd(rng) / width;
  for (auto& p : phase)
    for (double& c : p) c = nd(rng) * 3.0;
  features(Hq, true, x.q, omega, phase);
  features(Hkv, false, x.k, omega, phase);
  // v: smooth random fields of the position
  x.v.assign(static_cast<std::size_t>(B) * Hkv * x.N * D, 0.0f);
  std::vector<double> vw(static_cast<std::size_t>(D) * 4);
  for (double& c : vw) c = nd(rng);
  for (int b = 0; b < B; ++b)
    for (int hd = 0; hd < Hkv; ++hd)
      for (int n = 0; n < x.N; ++n) {
        const double pt = n / (h * w), py = (n / w) % h, px = n % w;
        float* row = x.v.data() + ((static_cast<std::size_t>(b) * Hkv + hd) * x.N + n) * D;
        for (int c = 0; c < D; ++c) {
          const double* a = vw.data() + 4 * c;
          row[c] = static_cast<float>(std::sin(a[0] * 0.3 * px + a[1] * 0.3 * py + a[2] * 0.5 * pt + a[3]) + 0.3 * nd(rng));
        }
      }
  return x;
}

Qkv random_inputs(int B, int Hq, int Hkv, int N, int D, uint64_t seed) {
  Qkv x;
  x.B = B, x.Hq = Hq, x.Hkv = Hkv, x.N = N, x.D = D;
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  x.q.resize(static_cast<std::size_t>(B) * Hq * N * D);
  x.k.resize(static_cast<std::size_t>(B) * Hkv * N * D);
  x.v.resize(x.k.size());
  for (float& e : x.q) e = nd(rng);
  for (float& e : x.k) e = nd(rng);
  for (float& e : x.v) e = nd(rng);
  return x;
}

std::vector<uint16_t> to_f16(const std::vector<float>& x) {
  std::vector<uint16_t> h(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) h[i] = reference::float_to_half(x[i]);
  return h;
}
std::vector<float> from_f16(const std::vector<uint16_t>& h) {
  std::vector<float> x(h.size());
  for (std::size_t i = 0; i < h.size(); ++i) x[i] = reference::half_to_float(h[i]);
  return x;
}

struct Device {
  Tensor q, k, v, out;
};
Device upload(Context& ctx, const Qkv& x) {
  Device d;
  d.q = ctx.from_host(DType::F16, {x.B, x.Hq, x.N, x.D}, to_f16(x.q).data());
  d.k = ctx.from_host(DType::F16, {x.B, x.Hkv, x.N, x.D}, to_f16(x.k).data());
  d.v = ctx.from_host(DType::F16, {x.B, x.Hkv, x.N, x.D}, to_f16(x.v).data());
  d.out = ctx.empty(DType::F16, {x.B, x.Hq, x.N, x.D});
  return d;
}
std::vector<float> download(Context& ctx, const Tensor& t) {
  std::vector<uint16_t> h(static_cast<std::size_t>(t.numel()));
  ctx.to_host(t, h.data());
  return from_f16(h);
}

// A 16-bit tensor's bits.
std::vector<uint16_t> bits_of(Context& ctx, const Tensor& t) {
  std::vector<uint16_t> b(static_cast<std::size_t>(t.numel()));
  ctx.to_host(t, b.data());
  return b;
}

// An F32 tensor (LSE) as it is.
std::vector<float> floats_of(Context& ctx, const Tensor& t) {
  std::vector<float> h(static_cast<std::size_t>(t.numel()));
  ctx.to_host(t, h.data());
  return h;
}

// Exact fp64 attention of the fp16-rounded inputs (the harness's oracle).
std::vector<double> exact_out(const Qkv& x, bool causal = false) {
  test::Case c;
  c.B = x.B, c.Hq = x.Hq, c.Hkv = x.Hkv, c.Nq = x.N, c.Nk = x.N, c.D = x.D;
  c.causal = causal;
  test::Inputs in;
  in.q = to_f16(x.q);
  in.k = to_f16(x.k);
  in.v = to_f16(x.v);
  return test::exact(c, in).out;
}

double rel_l1(const std::vector<float>& got, const std::vector<double>& ref) { return test::compare(got, ref).rel_l1; }

bool finite(const std::vector<float>& x) {
  return std::all_of(x.begin(), x.end(), [](float e) { return std::isfinite(e); });
}

struct LutHost {
  int B = 0, H = 0, nqb = 0, nkb = 0;
  std::vector<int32_t> counts, indices;
};
LutHost lut_of(Context& ctx, const BlockMask& m) {
  LutHost l;
  REQUIRE(m.kind() == BlockMask::Kind::Lut);
  const auto& s = m.indices().shape();
  l.B = static_cast<int>(s[0]), l.H = static_cast<int>(s[1]), l.nqb = static_cast<int>(s[2]), l.nkb = static_cast<int>(s[3]);
  l.counts.resize(static_cast<std::size_t>(m.counts().numel()));
  l.indices.resize(static_cast<std::size_t>(m.indices().numel()));
  ctx.to_host(m.counts(), l.counts.data());
  ctx.to_host(m.indices(), l.indices.data());
  return l;
}

bool neighbours(int64_t a, int64_t b, int h, int w) {
  const int64_t az = a / (static_cast<int64_t>(h) * w), ay = (a / w) % h, ax = a % w;
  const int64_t bz = b / (static_cast<int64_t>(h) * w), by = (b / w) % h, bx = b % w;
  return std::abs(az - bz) + std::abs(ay - by) + std::abs(ax - bx) == 1;
}

void check_curve(const std::vector<int64_t>& order, int t, int h, int w) {
  INFO("grid " << t << "x" << h << "x" << w);
  REQUIRE(order.size() == static_cast<std::size_t>(t) * h * w);
  std::vector<char> seen(order.size(), 0);
  for (int64_t o : order) {
    REQUIRE(o >= 0);
    REQUIRE(o < static_cast<int64_t>(order.size()));
    REQUIRE(!seen[static_cast<std::size_t>(o)]);
    seen[static_cast<std::size_t>(o)] = 1;
  }
  int far = 0;
  for (std::size_t i = 1; i < order.size(); ++i) far += neighbours(order[i - 1], order[i], h, w) ? 0 : 1;
  CHECK(far == 0);
  const auto inv = inverse_permutation(order);
  for (std::size_t i = 0; i < order.size(); ++i) REQUIRE(inv[static_cast<std::size_t>(order[i])] == static_cast<int64_t>(i));
}

template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

}  // namespace

TEST_SUITE("sparge") {

// ---- Hilbert order ------------------------------------------------------------------------------------------

TEST_CASE("hilbert: 2-D curves of any size are bijections through neighbouring cells") {
  for (int h : {1, 2, 3, 5, 7, 8, 9, 13, 16, 17, 31, 33})
    for (int w : {1, 2, 3, 4, 7, 9, 11, 15, 16, 21, 45})
      check_curve(hilbert_order(h, w), 1, h, w);
  check_curve(hilbert_order(97, 61), 1, 97, 61);
}

TEST_CASE("hilbert: 3-D curves of any size are bijections through neighbouring cells") {
  for (int t : {1, 2, 3, 5, 8})
    for (int h : {1, 3, 4, 7, 9})
      for (int w : {2, 5, 6, 11})
        check_curve(hilbert_order(t, h, w), t, h, w);
  check_curve(hilbert_order(13, 15, 17), 13, 15, 17);
  check_curve(hilbert_order(TokenGrid{4, 30, 52}), 4, 30, 52);
}

TEST_CASE("hilbert: the curve is local (a run of 64 tokens spans a small box)") {
  const auto order = hilbert_order(64, 64);
  double mean_extent = 0;
  for (std::size_t s = 0; s < order.size(); s += 64) {
    int64_t y0 = 1 << 30, y1 = -1, x0 = 1 << 30, x1 = -1;
    for (std::size_t i = s; i < s + 64; ++i) {
      y0 = std::min(y0, order[i] / 64), y1 = std::max(y1, order[i] / 64);
      x0 = std::min(x0, order[i] % 64), x1 = std::max(x1, order[i] % 64);
    }
    mean_extent += static_cast<double>((y1 - y0 + 1) + (x1 - x0 + 1)) / 2;
  }
  mean_extent /= static_cast<double>(order.size() / 64);
  CHECK(mean_extent <= 10.0);  // a row-major run would span 64 columns
}

TEST_CASE("hilbert: errors") {
  CHECK(contains(error_of([] { hilbert_order(0, 5); }), "positive"));
  CHECK(contains(error_of([] { hilbert_order(2, -1, 5); }), "positive"));
  CHECK(contains(error_of([] { inverse_permutation({0, 2, 2}); }), "not a permutation"));
  CHECK(contains(error_of([] { inverse_permutation({0, 3}); }), "not a permutation"));
}

TEST_CASE("hilbert: permute_tokens round-trips exactly (HND, NHD, tokens beyond the grid)") {
  Context ctx = Context::create(Backend::Reference);
  for (Layout layout : {Layout::HND, Layout::NHD}) {
    const int B = 2, H = 3, N = 7 * 9 + 5, D = 16;
    std::vector<uint16_t> data(static_cast<std::size_t>(B) * H * N * D);
    for (std::size_t i = 0; i < data.size(); ++i) data[i] = static_cast<uint16_t>(i * 2654435761u >> 7);
    std::vector<int64_t> shape = layout == Layout::HND ? std::vector<int64_t>{B, H, N, D} : std::vector<int64_t>{B, N, H, D};
    Tensor src = ctx.from_host(DType::F16, shape, data.data());
    Tensor mid = ctx.empty(DType::F16, shape), back = ctx.empty(DType::F16, shape);
    const auto order = hilbert_order(7, 9);
    permute_tokens(ctx, src, mid, order, layout);
    permute_tokens(ctx, mid, back, inverse_permutation(order), layout);
    std::vector<uint16_t> m(data.size()), r(data.size());
    ctx.to_host(mid, m.data());
    ctx.to_host(back, r.data());
    CHECK(r == data);
    // token i of mid is token order[i] of src; the 5 tokens past the grid stay
    auto at = [&](const std::vector<uint16_t>& x, int b, int h, int n, int d) {
      const std::size_t idx = layout == Layout::HND ? ((static_cast<std::size_t>(b) * H + h) * N + n) * D + d
                                                    : ((static_cast<std::size_t>(b) * N + n) * H + h) * D + d;
      return x[idx];
    };
    for (int n = 0; n < N; ++n) {
      const int from = n < 63 ? static_cast<int>(order[static_cast<std::size_t>(n)]) : n;
      CHECK(at(m, 1, 2, n, 3) == at(data, 1, 2, from, 3));
    }
  }
}

// ---- stage 1 ------------------------------------------------------------------------------------------------

TEST_CASE("predictor: structured 2-D tokens (Hilbert order) are sparse and accurate") {
  Context ctx = Context::create(Backend::Reference);
  const int H = 48, W = 48;
  Qkv x = grid_inputs(1, H, W, 1, 2, 2, 64, 20.0, 6.0, 11);
  Device d = upload(ctx, x);
  const auto ref = exact_out(x);
  SpargeOptions opt;
  opt.hilbert = TokenGrid{1, H, W};
  SpargeParams p;
  p.simthreshd = 0.5f;
  p.cdfthreshd = 0.99f;
  SpargeStats st;
  sparge_attention(ctx, d.q, d.k, d.v, d.out, opt, {p}, &st);
  const auto got = download(ctx, d.out);
  const double err = rel_l1(got, ref);
  MESSAGE("2-D grid 48x48: block sparsity " << st.block_sparsity << ", rel L1 " << err);
  CHECK(finite(got));
  CHECK(st.block_sparsity >= 0.5);
  CHECK(err <= 0.05);
  // the same without the Hilbert order is less sparse (row-major blocks are thin strips)
  SpargeOptions plain;
  SpargeStats st2;
  sparge_attention(ctx, d.q, d.k, d.v, d.out, plain, {p}, &st2);
  MESSAGE("2-D grid 48x48, row-major: block sparsity " << st2.block_sparsity << ", rel L1 "
                                                        << rel_l1(download(ctx, d.out), ref));
  CHECK(st2.block_sparsity < st.block_sparsity);
}

TEST_CASE("predictor: structured 3-D (video) tokens with GQA are sparse and accurate") {
  Context ctx = Context::create(Backend::Reference);
  const int T = 4, H = 16, W = 24;
  Qkv x = grid_inputs(T, H, W, 1, 4, 2, 64, 24.0, 4.0, 5);
  Device d = upload(ctx, x);
  const auto ref = exact_out(x);
  SpargeOptions opt;
  opt.hilbert = TokenGrid{T, H, W};
  SpargeParams p;
  p.simthreshd = 0.5f;
  p.cdfthreshd = 0.998f;
  SpargeStats st;
  sparge_attention(ctx, d.q, d.k, d.v, d.out, opt, {p}, &st);
  const auto got = download(ctx, d.out);
  const double err = rel_l1(got, ref);
  MESSAGE("3-D grid 4x16x24, Hq=4 Hkv=2: block sparsity " << st.block_sparsity << ", rel L1 " << err);
  CHECK(st.block_sparsity >= 0.5);
  CHECK(err <= 0.05);
}

TEST_CASE("predictor: unstructured random inputs keep nearly all blocks") {
  Context ctx = Context::create(Backend::Reference);
  Qkv x = random_inputs(1, 2, 1, 1024, 64, 3);
  Device d = upload(ctx, x);
  const auto ref = exact_out(x);
  SpargeStats st;
  sparge_attention(ctx, d.q, d.k, d.v, d.out, SpargeOptions{}, {SpargeParams{}}, &st);
  const double err = rel_l1(download(ctx, d.out), ref);
  MESSAGE("random: block sparsity " << st.block_sparsity << ", rel L1 " << err);
  CHECK(st.block_sparsity <= 0.05);
  CHECK(err <= 0.015);  // the INT8 budget: no accuracy lost to sparsity
}

TEST_CASE("predictor: LUT format, causal validity, diagonal, sink, dense and top-k") {
  Context ctx = Context::create(Backend::Reference);
  Qkv x = grid_inputs(1, 24, 40, 1, 2, 1, 64, 20.0, 3.0, 9);  // N = 960: a partial last block
  Device d = upload(ctx, x);
  for (bool causal : {false, true}) {
    CAPTURE(causal);
    SpargeOptions opt;
    opt.attention.causal = causal;
    opt.attention_sink = true;
    SpargeParams sparse;
    sparse.simthreshd = 0.0f;
    sparse.cdfthreshd = 0.5f;
    SpargeParams dense;
    dense.dense = true;
    SpargeStats st;
    BlockMask m = predict_block_mask(ctx, d.q, d.k, opt, {sparse, dense}, &st);
    CHECK(m.block_q() == 128);
    CHECK(m.block_k() == 64);
    LutHost l = lut_of(ctx, m);
    CHECK(l.nqb == (960 + 127) / 128);
    CHECK(l.nkb == 960 / 64);
    for (int h = 0; h < 2; ++h)
      for (int qb = 0; qb < l.nqb; ++qb) {
        const std::size_t row = static_cast<std::size_t>(h) * l.nqb + qb;
        const int count = l.counts[row];
        const int32_t* idx = l.indices.data() + row * l.nkb;
        const int last_row = std::min(960, (qb + 1) * 128) - 1;
        const int valid = causal ? last_row / 64 + 1 : l.nkb;
        REQUIRE(count >= 1);
        REQUIRE(count <= valid);
        for (int e = 1; e < count; ++e) CHECK(idx[e] > idx[e - 1]);
        CHECK(idx[count - 1] < valid);
        CHECK(idx[0] == 0);  // the sink
        // the diagonal: key blocks at the query block's positions
        for (int kb = qb * 2; kb <= last_row / 64; ++kb) CHECK(std::count(idx, idx + count, kb) == 1);
        if (h == 1) CHECK(count == valid);  // dense head
      }
    CHECK(st.block_sparsity > 0.0);
    // top-k: ceil(k · valid) blocks (the forced ones come on top)
    SpargeParams topk;
    topk.simthreshd = 0.0f;
    topk.topk = 0.25f;
    SpargeOptions bare;
    bare.attention.causal = causal;
    bare.diagonal = false;
    LutHost t = lut_of(ctx, predict_block_mask(ctx, d.q, d.k, bare, {topk}));
    for (int qb = 0; qb < t.nqb; ++qb) {
      const int last_row = std::min(960, (qb + 1) * 128) - 1;
      const int valid = causal ? last_row / 64 + 1 : t.nkb;
      CHECK(t.counts[static_cast<std::size_t>(qb)] == static_cast<int>(std::ceil(0.25 * valid - 1e-9)));
    }
  }
}

TEST_CASE("predictor: zero and constant inputs give no NaN") {
  Context ctx = Context::create(Backend::Reference);
  Qkv x = random_inputs(1, 2, 2, 300, 64, 1);
  std::fill(x.q.begin(), x.q.end(), 0.0f);
  std::fill(x.k.begin(), x.k.begin() + static_cast<std::ptrdiff_t>(x.k.size() / 2), 0.0f);  // head 0: zero keys
  std::fill(x.k.begin() + static_cast<std::ptrdiff_t>(x.k.size() / 2), x.k.end(), 0.5f);    // head 1: constant keys
  Device d = upload(ctx, x);
  SpargeStats st;
  SpargeParams p;
  p.pvthreshd = 4.0f;
  sparge_attention(ctx, d.q, d.k, d.v, d.out, SpargeOptions{}, {p}, &st);
  const auto got = download(ctx, d.out);
  CHECK(finite(got));
  CHECK(std::isfinite(st.block_sparsity));
  CHECK(rel_l1(got, exact_out(x)) <= 0.015);
}

TEST_CASE("predictor: NaN inputs make their blocks dense, never crash") {
  Context ctx = Context::create(Backend::Reference);
  Qkv x = grid_inputs(1, 16, 16, 1, 1, 1, 64, 20.0, 2.0, 4);
  x.q[static_cast<std::size_t>(5) * 64 + 3] = std::nanf("");     // query block 0
  x.k[static_cast<std::size_t>(200) * 64 + 1] = std::nanf("");   // key block 3
  Device d = upload(ctx, x);
  SpargeParams p;
  p.simthreshd = 0.0f;
  p.cdfthreshd = 0.5f;
  LutHost l = lut_of(ctx, predict_block_mask(ctx, d.q, d.k, SpargeOptions{}, {p}));
  CHECK(l.counts[0] == l.nkb);  // the query block with a NaN keeps everything
  for (int qb = 1; qb < l.nqb; ++qb) {
    const int32_t* idx = l.indices.data() + static_cast<std::size_t>(qb) * l.nkb;
    CHECK(std::count(idx, idx + l.counts[static_cast<std::size_t>(qb)], 3) == 1);  // the NaN key block
  }
  SpargeStats st;
  sparge_attention(ctx, d.q, d.k, d.v, d.out, SpargeOptions{}, {p}, &st);
  CHECK(std::isfinite(st.block_sparsity));
}

TEST_CASE("sparge_attention: dense parameters equal attention() bit for bit") {
  Context ctx = Context::create(Backend::Reference);
  Qkv x = random_inputs(2, 4, 2, 200, 64, 4);
  Device d = upload(ctx, x);
  for (bool causal : {false, true}) {
    SpargeOptions opt;
    opt.attention.causal = causal;
    SpargeParams dense;
    dense.dense = true;
    Tensor out2 = ctx.empty(DType::F16, {2, 4, 200, 64});
    SpargeStats st;
    sparge_attention(ctx, d.q, d.k, d.v, d.out, opt, {dense}, &st);
    attention(ctx, d.q, d.k, d.v, out2, opt.attention);
    CHECK(download(ctx, d.out) == download(ctx, out2));
    CHECK(st.block_sparsity == 0.0);
    CHECK(st.blocks_valid == st.blocks_computed);
    CHECK(st.blocks_valid == (causal ? 2 * 4 * (2 + 4) : 2 * 4 * 2 * 4));  // nQB = 2, nKB = 4
    // the LUT of dense heads lists every valid block: the same result through the mask path
    BlockMask m = predict_block_mask(ctx, d.q, d.k, opt, {dense});
    attention(ctx, d.q, d.k, d.v, out2, opt.attention, &m);
    CHECK(download(ctx, d.out) == download(ctx, out2));
  }
}

TEST_CASE("predict_block_mask: its LUT through attention() equals sparge_attention()") {
  Context ctx = Context::create(Backend::Reference);
  Qkv x = grid_inputs(1, 20, 30, 1, 4, 2, 64, 20.0, 3.0, 12);
  Device d = upload(ctx, x);
  for (bool causal : {false, true}) {
    SpargeOptions opt;
    opt.attention.causal = causal;
    SpargeParams a, b;
    a.cdfthreshd = 0.9f;
    a.simthreshd = 0.0f;
    b.topk = 0.3f;
    b.simthreshd = 0.2f;
    const std::vector<SpargeParams> per_head = {a, b, a, b};
    SpargeStats s1, s2;
    BlockMask m = predict_block_mask(ctx, d.q, d.k, opt, per_head, &s1);
    Tensor out2 = ctx.empty(DType::F16, {1, 4, x.N, 64});
    Tensor lse1 = ctx.empty(DType::F32, {1, 4, x.N}), lse2 = ctx.empty(DType::F32, {1, 4, x.N});
    attention(ctx, d.q, d.k, d.v, out2, opt.attention, &m, &lse2);
    sparge_attention(ctx, d.q, d.k, d.v, d.out, opt, per_head, &s2, &lse1);
    CHECK(download(ctx, d.out) == download(ctx, out2));
    CHECK(floats_of(ctx, lse1) == floats_of(ctx, lse2));
    CHECK(s1.blocks_computed == s2.blocks_computed);
    CHECK(s1.blocks_valid == s2.blocks_valid);
    CHECK(s1.block_sparsity > 0.2);
  }
}

TEST_CASE("sparge_attention: NHD layout and Hilbert order give the same result as HND") {
  Context ctx = Context::create(Backend::Reference);
  Qkv x = grid_inputs(1, 12, 20, 1, 2, 1, 64, 16.0, 3.0, 2);
  Device d = upload(ctx, x);
  SpargeOptions opt;
  opt.hilbert = TokenGrid{1, 12, 20};
  SpargeParams p;
  p.cdfthreshd = 0.9f;
  sparge_attention(ctx, d.q, d.k, d.v, d.out, opt, {p});
  const auto hnd = download(ctx, d.out);
  // the same data as NHD views: [B, N, H, D]
  auto nhd = [&](const std::vector<float>& v, int heads) {
    std::vector<float> r(v.size());
    for (int h = 0; h < heads; ++h)
      for (int n = 0; n < x.N; ++n)
        for (int c = 0; c < x.D; ++c)
          r[(static_cast<std::size_t>(n) * heads + h) * x.D + c] = v[(static_cast<std::size_t>(h) * x.N + n) * x.D + c];
    return r;
  };
  Tensor q = ctx.from_host(DType::F16, {1, x.N, 2, 64}, to_f16(nhd(x.q, 2)).data());
  Tensor k = ctx.from_host(DType::F16, {1, x.N, 1, 64}, to_f16(nhd(x.k, 1)).data());
  Tensor v = ctx.from_host(DType::F16, {1, x.N, 1, 64}, to_f16(nhd(x.v, 1)).data());
  Tensor out = ctx.empty(DType::F16, {1, x.N, 2, 64});
  opt.attention.layout = Layout::NHD;
  sparge_attention(ctx, q, k, v, out, opt, {p});
  CHECK(download(ctx, out) == nhd(hnd, 2));
}

// ---- stage 2 ------------------------------------------------------------------------------------------------

TEST_CASE("stage 2: P·V skip on structured inputs, statistics, and +inf / huge λ change nothing") {
  Context ctx = Context::create(Backend::Reference);
  Qkv x = grid_inputs(1, 32, 32, 1, 2, 2, 64, 28.0, 4.0, 21);
  Device d = upload(ctx, x);
  const auto ref = exact_out(x);
  SpargeParams p;
  p.simthreshd = 0.5f;
  p.cdfthreshd = 0.99f;
  SpargeOptions opt;
  SpargeStats base;
  sparge_attention(ctx, d.q, d.k, d.v, d.out, opt, {p}, &base);
  const auto out_base = download(ctx, d.out);
  CHECK(base.pv_total == 0);  // no stage 2: no statistics, the backends' plain path
  SpargeParams huge = p;
  huge.pvthreshd = 1e30f;
  SpargeStats st_huge;
  sparge_attention(ctx, d.q, d.k, d.v, d.out, opt, {huge}, &st_huge);
  CHECK(download(ctx, d.out) == out_base);
  CHECK(st_huge.pv_skipped == 0);
  CHECK(st_huge.pv_total > 0);
  SpargeParams skip = p;
  skip.pvthreshd = 8.0f;
  SpargeStats st;
  sparge_attention(ctx, d.q, d.k, d.v, d.out, opt, {skip}, &st);
  const double e0 = rel_l1(out_base, ref), e1 = rel_l1(download(ctx, d.out), ref);
  MESSAGE("stage 2 (λ=8): pv skip " << st.pv_skip_fraction << " of " << st.pv_total << ", rel L1 " << e0 << " -> "
                                    << e1 << ", block sparsity " << st.block_sparsity);
  CHECK(st.pv_skip_fraction > 0.05);
  CHECK(e1 <= e0 + 0.01);
  // per head: only head 1 skips
  SpargeStats st_one;
  sparge_attention(ctx, d.q, d.k, d.v, d.out, opt, {p, skip}, &st_one);
  CHECK(st_one.pv_skipped > 0);
  CHECK(st_one.pv_skipped < st.pv_skipped);
}

// ---- errors -------------------------------------------------------------------------------------------------

TEST_CASE("sparge_attention: invalid arguments are named and nothing is written") {
  Context ctx = Context::create(Backend::Reference);
  Qkv x = random_inputs(1, 4, 2, 130, 64, 8);
  Device d = upload(ctx, x);
  std::vector<uint16_t> sentinel(static_cast<std::size_t>(d.out.numel()), 0x3C00);
  ctx.from_host(d.out, sentinel.data());
  SpargeOptions opt;
  auto run = [&](const SpargeOptions& o, const std::vector<SpargeParams>& p) {
    return error_of([&] { sparge_attention(ctx, d.q, d.k, d.v, d.out, o, p); });
  };
  CHECK(contains(run(opt, {SpargeParams{}, SpargeParams{}}), "per_head has 2 entries, expected 1 or Hq = 4"));
  CHECK(contains(run(opt, {}), "per_head has 0 entries"));
  SpargeParams nan;
  nan.cdfthreshd = std::nanf("");
  CHECK(contains(run(opt, {nan}), "cdfthreshd"));
  SpargeParams big;
  big.simthreshd = 1.5f;
  CHECK(contains(run(opt, {SpargeParams{}, SpargeParams{}, big, SpargeParams{}}), "head 2: simthreshd"));
  SpargeParams neg;
  neg.pvthreshd = -1.0f;
  CHECK(contains(run(opt, {neg}), "pvthreshd"));
  SpargeParams topk;
  topk.topk = 2.0f;
  CHECK(contains(run(opt, {topk}), "topk"));
  SpargeOptions blocks;
  blocks.block_k = 96;
  CHECK(contains(run(blocks, {SpargeParams{}}), "block_q x block_k = 128x96"));
  blocks.block_k = 64;
  blocks.block_q = 0;
  CHECK(contains(run(blocks, {SpargeParams{}}), "must be positive multiples"));
  SpargeOptions hil;
  hil.hilbert = TokenGrid{1, 12, 12};
  CHECK(contains(run(hil, {SpargeParams{}}), "144 tokens, more than the 130"));
  hil.hilbert = TokenGrid{1, 0, 12};
  CHECK(contains(run(hil, {SpargeParams{}}), "positive sizes"));
  hil.hilbert = TokenGrid{1, 10, 13};
  hil.attention.causal = true;
  CHECK(contains(run(hil, {SpargeParams{}}), "causal"));
  // attention()'s own checks still apply
  Tensor bad_out = ctx.empty(DType::F16, {1, 4, 129, 64});
  CHECK(contains(error_of([&] { sparge_attention(ctx, d.q, d.k, d.v, bad_out, opt, {SpargeParams{}}); }),
                 "out has shape"));
  CHECK(download(ctx, d.out) == from_f16(sentinel));
}

// ---- hyper-parameter file -----------------------------------------------------------------------------------

TEST_CASE("hyperparams: save and load round-trip") {
  HyperParams hp;
  hp.block_q = 128;
  hp.block_k = 64;
  SpargeParams a;
  a.simthreshd = 0.37f;
  a.cdfthreshd = 0.9731f;
  a.pvthreshd = 12.5f;
  SpargeParams b;
  b.dense = true;
  SpargeParams c;
  c.topk = 0.3f;
  hp.set_layer("blocks.0.attn", {a, b, c});
  hp.set_layer("blocks.1.attn \"x\"", {b});
  const fs::path path = fs::temp_directory_path() / ("sparq-hp-" + std::to_string(::getpid()) + ".json");
  hp.save(path.string());
  HyperParams back = HyperParams::load(path.string());
  fs::remove(path);
  CHECK(back.block_q == 128);
  CHECK(back.block_k == 64);
  CHECK(back.layer_names() == hp.layer_names());
  const auto& l0 = back.layer("blocks.0.attn", 3);
  CHECK(l0[0].simthreshd == a.simthreshd);
  CHECK(l0[0].cdfthreshd == a.cdfthreshd);
  CHECK(l0[0].pvthreshd == a.pvthreshd);
  CHECK(!l0[0].dense);
  CHECK(l0[1].dense);
  CHECK(!l0[1].stage2());
  CHECK(l0[2].topk == c.topk);
  CHECK(back.to_json() == hp.to_json());
  CHECK(contains(error_of([&] { back.layer("nope"); }), "no layer \"nope\""));
  CHECK(contains(error_of([&] { back.layer("blocks.0.attn", 4); }), "has 3 heads, expected 4"));
  CHECK(contains(error_of([&] { back.set_layer("x", {}); }), "no heads"));
  CHECK(contains(error_of([&] { back.set_layer("", {a}); }), "empty"));
  SpargeParams bad;
  bad.cdfthreshd = 2.0f;
  CHECK(contains(error_of([&] { back.set_layer("x", {a, bad}); }), "head 1: cdfthreshd"));
  CHECK(contains(error_of([] { HyperParams::load("/nonexistent/sparq.json"); }), "cannot open"));
}

TEST_CASE("hyperparams: every malformed file is rejected with a precise message") {
  const std::string head = R"({"simthreshd": 0.5, "cdfthreshd": 0.9, "topk": 0, "pvthreshd": null, "dense": false})";
  auto file = [&](const std::string& layers, const std::string& extra = "") {
    return R"({"format": "sparq-sparge-hyperparams", "version": 1, )" + extra + R"("layers": )" + layers + "}";
  };
  auto with_head = [&](const std::string& h) { return file(R"({"L": {"heads": [)" + h + "]}}"); };
  auto err = [](const std::string& text) { return error_of([&] { HyperParams::parse(text, "hp.json"); }); };
  // the valid base parses
  CHECK(HyperParams::parse(with_head(head), "hp.json").layer("L", 1).size() == 1);
  struct Bad {
    std::string text, expect;
  };
  const std::vector<Bad> cases = {
      {"{\"format\": ", "hp.json: invalid JSON at line 1"},
      {"{\n  \"format\": \"x\",\n  \"version\": 1,,\n}", "invalid JSON at line 3"},
      {"[1, 2]", "expected a JSON object at the top level, got an array"},
      {R"({"version": 1, "layers": {}})", "missing key \"format\""},
      {R"({"format": "other", "version": 1, "layers": {}})", "format: expected \"sparq-sparge-hyperparams\", got a string (\"other\")"},
      {R"({"format": "sparq-sparge-hyperparams", "layers": {}})", "missing key \"version\""},
      {R"({"format": "sparq-sparge-hyperparams", "version": "1", "layers": {}})", "version: expected an integer, got a string"},
      {R"({"format": "sparq-sparge-hyperparams", "version": 2, "layers": {}})", "version 2 is not supported (this library reads version 1)"},
      {R"({"format": "sparq-sparge-hyperparams", "version": 1})", "missing key \"layers\""},
      {file("{}", R"("extra": 1, )"), "unknown key \"extra\""},
      {file("[]"), "layers: expected an object of layers, got an array"},
      {file("{}", R"("block_q": -5, )"), "block_q: expected a block size"},
      {file("{}", R"("block_k": 6.5, )"), "block_k: expected a block size"},
      {file(R"({"L": 3})"), "layers.\"L\": expected an object with \"heads\", got a number (3)"},
      {file(R"({"": {"heads": []}})"), "a layer name must not be empty"},
      {file(R"({"L": {}})"), "layers.\"L\": missing key \"heads\""},
      {file(R"({"L": {"heads": [], "x": 1}})"), "layers.\"L\": unknown key \"x\""},
      {file(R"({"L": {"heads": {}}})"), "layers.\"L\".heads: expected an array of heads, got an object"},
      {file(R"({"L": {"heads": []}})"), "layers.\"L\".heads: expected at least one head"},
      {with_head("1"), "layers.\"L\".heads[0]: expected an object, got a number (1)"},
      {with_head(head + R"(, {"simthreshd": 0.5, "cdfthreshd": 0.9, "topk": 0, "dense": false})"),
       "layers.\"L\".heads[1]: missing key \"pvthreshd\""},
      {with_head(R"({"simthreshd": 0.5, "cdfthreshd": 0.9, "topk": 0, "pvthreshd": null, "dense": false, "lambda": 3})"),
       "heads[0]: unknown key \"lambda\""},
      {with_head(R"({"simthreshd": 1.5, "cdfthreshd": 0.9, "topk": 0, "pvthreshd": null, "dense": false})"),
       "heads[0].simthreshd: expected a number in [0, 1], got 1.5"},
      {with_head(R"({"simthreshd": 0.5, "cdfthreshd": -0.1, "topk": 0, "pvthreshd": null, "dense": false})"),
       "heads[0].cdfthreshd: expected a number in [0, 1], got -0.1"},
      {with_head(R"({"simthreshd": 0.5, "cdfthreshd": "0.9", "topk": 0, "pvthreshd": null, "dense": false})"),
       "heads[0].cdfthreshd: expected a number in [0, 1], got a string"},
      {with_head(R"({"simthreshd": 0.5, "cdfthreshd": 0.9, "topk": 3, "pvthreshd": null, "dense": false})"),
       "heads[0].topk: expected a number in [0, 1] (0 = use cdfthreshd), got 3"},
      {with_head(R"({"simthreshd": 0.5, "cdfthreshd": 0.9, "topk": 0, "pvthreshd": -2, "dense": false})"),
       "heads[0].pvthreshd: expected a number in [0, 1e30] or null (no stage 2), got -2"},
      {with_head(R"({"simthreshd": 0.5, "cdfthreshd": 0.9, "topk": 0, "pvthreshd": true, "dense": false})"),
       "heads[0].pvthreshd: expected a number in [0, 1e30] or null (no stage 2), got a boolean"},
      {with_head(R"({"simthreshd": 0.5, "cdfthreshd": 0.9, "topk": 0, "pvthreshd": null, "dense": 0})"),
       "heads[0].dense: expected true or false, got a number (0)"},
      {with_head(R"({"simthreshd": 0.5, "simthreshd": 0.6, "cdfthreshd": 0.9, "topk": 0, "pvthreshd": null, "dense": false})"),
       "duplicated key \"simthreshd\""},
  };
  for (const Bad& b : cases) {
    const std::string e = err(b.text);
    INFO("file: " << b.text << "\nerror: " << e);
    CHECK(contains(e, b.expect));
    CHECK(contains(e, "hp.json"));
  }
}

// ---- tuner --------------------------------------------------------------------------------------------------

TEST_CASE("tuner: meets its bounds on held-out samples and finds sparsity where there is some") {
  SpargeOptions opt;
  TunerOptions topt;
  topt.l1 = 0.05;
  topt.pv_l1 = 0.06;
  std::vector<std::string> lines;
  topt.progress = [&](const std::string& l) { lines.push_back(l); };
  Tuner tuner(opt, topt);
  const int H = 32, W = 32;
  // calibration: 3 samples per layer; held out: 2 more from the same distribution (other seeds)
  for (uint64_t s = 0; s < 5; ++s) {
    Qkv g = grid_inputs(1, H, W, 1, 2, 1, 64, 20.0, 4.0, 100 + s);
    Qkv r = random_inputs(1, 2, 1, H * W, 64, 200 + s);
    // Hilbert order as sparge_attention would see it
    const auto order = hilbert_order(H, W);
    auto permute = [&](std::vector<float>& v, int heads) {
      std::vector<float> o(v.size());
      for (int h = 0; h < heads; ++h)
        for (int n = 0; n < g.N; ++n)
          std::copy_n(v.begin() + static_cast<std::ptrdiff_t>((static_cast<std::size_t>(h) * g.N + order[static_cast<std::size_t>(n)]) * 64), 64,
                      o.begin() + static_cast<std::ptrdiff_t>((static_cast<std::size_t>(h) * g.N + n) * 64));
      v = o;
    };
    permute(g.q, 2);
    permute(g.k, 1);
    permute(g.v, 1);
    const std::string suffix = s < 3 ? "" : ".heldout";
    tuner.observe_host("grid" + suffix, 1, 2, 1, g.N, g.N, 64, g.q.data(), g.k.data(), g.v.data());
    tuner.observe_host("random" + suffix, 1, 2, 1, r.N, r.N, 64, r.q.data(), r.k.data(), r.v.data());
  }
  const auto start = std::chrono::steady_clock::now();
  const auto grid = tuner.tune_layer("grid");
  const auto rnd = tuner.tune_layer("random");
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  MESSAGE("tuner: 4 heads x 3 samples of N=1024, D=64 in " << secs << " s (CPU, " << reference::thread_count()
                                                           << " threads)");
  for (const auto& l : lines) MESSAGE(l);
  CHECK(lines.size() == 4);
  const auto eg = tuner.evaluate("grid.heldout", grid);
  const auto er = tuner.evaluate("random.heldout", rnd);
  for (int h = 0; h < 2; ++h) {
    MESSAGE("held out, grid head " << h << ": l1 " << eg[h].l1 << ", pv_l1 " << eg[h].pv_l1 << ", sparsity "
                                   << eg[h].block_sparsity << ", pv skip " << eg[h].pv_skip_fraction);
    MESSAGE("held out, random head " << h << ": l1 " << er[h].l1 << ", pv_l1 " << er[h].pv_l1 << ", sparsity "
                                     << er[h].block_sparsity);
    CHECK(eg[h].l1 <= 0.05);
    CHECK(eg[h].pv_l1 <= 0.06);
    CHECK(eg[h].block_sparsity >= 0.5);
    CHECK(er[h].l1 <= 0.05);
    CHECK(er[h].pv_l1 <= 0.06);
  }
  // the tuned parameters through sparge_attention on the backend: within the bound plus the INT8 budget
  HyperParams hp = tuner.tune();
  CHECK(hp.layer_names().size() == 4);
  Context ctx = Context::create(Backend::Reference);
  Qkv g = grid_inputs(1, H, W, 1, 2, 1, 64, 20.0, 4.0, 104);
  Device d = upload(ctx, g);
  SpargeOptions run = opt;
  run.hilbert = TokenGrid{1, H, W};
  SpargeStats st;
  sparge_attention(ctx, d.q, d.k, d.v, d.out, run, hp.layer("grid", 2), &st);
  const double e = rel_l1(download(ctx, d.out), exact_out(g));
  MESSAGE("tuned sparge_attention on a held-out sample: rel L1 " << e << ", block sparsity " << st.block_sparsity
                                                                  << ", pv skip " << st.pv_skip_fraction);
  CHECK(e <= 0.06 + 0.015);
  CHECK(st.block_sparsity >= 0.5);
}

TEST_CASE("tuner: top-k search, GQA and causal") {
  SpargeOptions opt;
  opt.attention.causal = true;
  TunerOptions topt;
  topt.use_topk = true;
  Tuner tuner(opt, topt);
  for (uint64_t s = 0; s < 2; ++s) {
    Qkv g = grid_inputs(1, 16, 48, 1, 4, 2, 64, 20.0, 2.0, 300 + s);
    tuner.observe_host("L", 1, 4, 2, g.N, g.N, 64, g.q.data(), g.k.data(), g.v.data());
  }
  const auto params = tuner.tune_layer("L");
  REQUIRE(params.size() == 4);
  const auto ev = tuner.evaluate("L", params);
  for (int h = 0; h < 4; ++h) {
    CAPTURE(h);
    CHECK((params[h].dense || params[h].topk > 0));
    CHECK(ev[h].l1 <= topt.l1);
    CHECK(ev[h].pv_l1 <= topt.pv_l1);
  }
}

// 600 tokens: the last 128-row query block has 88 rows (and its 16-row stage-2 groups end early), with stage 2
// tuned. A short last block once made stage 2 read empty tables.
TEST_CASE("tuner: a short last query block, stage 2 on") {
  TunerOptions topt;  // pv_l1 > 0: stage 2 tuned
  Tuner tuner(SpargeOptions{}, topt);
  for (uint64_t s = 0; s < 2; ++s) {
    Qkv g = grid_inputs(1, 20, 30, 1, 2, 1, 64, 20.0, 2.0, 500 + s);
    REQUIRE(g.N % 128 != 0);
    tuner.observe_host("L", 1, 2, 1, g.N, g.N, 64, g.q.data(), g.k.data(), g.v.data());
  }
  const auto params = tuner.tune_layer("L");
  REQUIRE(params.size() == 2);
  const auto ev = tuner.evaluate("L", params);
  for (int h = 0; h < 2; ++h) {
    CAPTURE(h);
    CHECK(ev[h].l1 <= topt.l1);
    CHECK(ev[h].pv_l1 <= topt.pv_l1);
  }
}

TEST_CASE("tuner: sampled query blocks give about the same parameters") {
  TunerOptions all, sampled;
  all.max_query_blocks = 0;
  sampled.max_query_blocks = 4;
  Tuner ta(SpargeOptions{}, all), ts(SpargeOptions{}, sampled);
  Qkv g = grid_inputs(1, 32, 32, 1, 1, 1, 64, 20.0, 2.0, 77);  // 8 query blocks
  ta.observe_host("L", 1, 1, 1, g.N, g.N, 64, g.q.data(), g.k.data(), g.v.data());
  ts.observe_host("L", 1, 1, 1, g.N, g.N, 64, g.q.data(), g.k.data(), g.v.data());
  const auto pa = ta.tune_layer("L"), ps = ts.tune_layer("L");
  const auto ea = ta.evaluate("L", pa), es = ta.evaluate("L", ps);
  MESSAGE("all blocks: l1 " << ea[0].l1 << " sparsity " << ea[0].block_sparsity << "; 4 of 8 blocks: l1 " << es[0].l1
                            << " sparsity " << es[0].block_sparsity);
  CHECK(ea[0].l1 <= all.l1);
  CHECK(es[0].l1 <= 1.5 * sampled.l1);
  CHECK(std::fabs(ea[0].block_sparsity - es[0].block_sparsity) <= 0.15);
}

TEST_CASE("tuner: errors") {
  TunerOptions bad_pv;
  bad_pv.pv_l1 = 0.01;
  CHECK(contains(error_of([&] { Tuner t(SpargeOptions{}, bad_pv); }), "pv_l1"));
  TunerOptions bad_l1;
  bad_l1.l1 = 0.0;
  CHECK(contains(error_of([&] { Tuner t(SpargeOptions{}, bad_l1); }), "l1 must be > 0"));
  SpargeOptions bad;
  bad.block_k = 32;
  CHECK(contains(error_of([&] { Tuner t(bad); }), "multiples"));
  Tuner t{SpargeOptions{}};
  CHECK(contains(error_of([&] { t.tune_layer("x"); }), "no samples"));
  std::vector<float> q(2 * 64 * 64), k(64 * 64);
  t.observe_host("x", 1, 2, 1, 64, 64, 64, q.data(), k.data(), k.data());
  CHECK(contains(error_of([&] { t.observe_host("x", 1, 2, 2, 64, 64, 32, q.data(), k.data(), k.data()); }),
                 "earlier ones"));
  CHECK(contains(error_of([&] { t.observe_host("y", 1, 3, 2, 64, 64, 64, q.data(), k.data(), k.data()); }),
                 "not a multiple"));
  // observe through a context validates like attention()
  Context ctx = Context::create(Backend::Reference);
  Tensor tq = ctx.empty(DType::F16, {1, 2, 64, 64}), tk = ctx.empty(DType::F16, {1, 1, 64, 32});
  CHECK(contains(error_of([&] { t.observe(ctx, "z", tq, tk, tk); }), "head_dim"));
}

// ---- the sparq tool -----------------------------------------------------------------------------------------

TEST_CASE("sparq tune: .npy and .safetensors inputs, progress, a loadable file") {
  const char* build = std::getenv("SPARQ_BUILD_ROOT");
  if (!build) {
    MESSAGE("SPARQ_BUILD_ROOT is not set (run through meson test): skipping the tool test");
    return;
  }
  const fs::path tool = fs::path(build) / "tools" / "sparq";
  REQUIRE(fs::exists(tool));
  const fs::path dir = fs::temp_directory_path() / ("sparq-tune-" + std::to_string(::getpid()));
  fs::create_directories(dir);
  Qkv x = grid_inputs(1, 16, 16, 1, 2, 1, 64, 20.0, 3.0, 7);
  // .npy: layer "a" (fp32, [H, N, D]) -- two samples
  auto write_npy = [&](const fs::path& p, const std::vector<float>& data, std::vector<int> shape) {
    std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (";
    for (int s : shape) header += std::to_string(s) + ", ";
    header += "), }";
    while ((10 + header.size() + 1) % 64) header += ' ';
    header += '\n';
    std::ofstream f(p, std::ios::binary);
    f.write("\x93NUMPY\x01\x00", 8);
    const uint16_t len = static_cast<uint16_t>(header.size());
    f.write(reinterpret_cast<const char*>(&len), 2);
    f << header;
    f.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size() * 4));
  };
  for (const char* sample : {"a@0", "a@1"}) {
    write_npy(dir / (std::string(sample) + ".q.npy"), x.q, {2, x.N, 64});
    write_npy(dir / (std::string(sample) + ".k.npy"), x.k, {1, x.N, 64});
    write_npy(dir / (std::string(sample) + ".v.npy"), x.v, {1, x.N, 64});
  }
  // .safetensors: layer "b" as b.q / b.k / b.v in fp16 [B, H, N, D]
  {
    const auto q = to_f16(x.q), k = to_f16(x.k), v = to_f16(x.v);
    const std::size_t qb = q.size() * 2, kb = k.size() * 2;
    std::string header = "{\"b.q\": {\"dtype\": \"F16\", \"shape\": [1, 2, " + std::to_string(x.N) +
                         ", 64], \"data_offsets\": [0, " + std::to_string(qb) + "]}, \"b.k\": {\"dtype\": \"F16\", " +
                         "\"shape\": [1, 1, " + std::to_string(x.N) + ", 64], \"data_offsets\": [" + std::to_string(qb) +
                         ", " + std::to_string(qb + kb) + "]}, \"b.v\": {\"dtype\": \"F16\", \"shape\": [1, 1, " +
                         std::to_string(x.N) + ", 64], \"data_offsets\": [" + std::to_string(qb + kb) + ", " +
                         std::to_string(qb + 2 * kb) + "]}, \"__metadata__\": {\"by\": \"test\"}}";
    std::ofstream f(dir / "capture.safetensors", std::ios::binary);
    const uint64_t n = header.size();
    f.write(reinterpret_cast<const char*>(&n), 8);
    f << header;
    f.write(reinterpret_cast<const char*>(q.data()), static_cast<std::streamsize>(qb));
    f.write(reinterpret_cast<const char*>(k.data()), static_cast<std::streamsize>(kb));
    f.write(reinterpret_cast<const char*>(v.data()), static_cast<std::streamsize>(kb));
  }
  const fs::path out = dir / "hp.json", log = dir / "log.txt";
  const std::string cmd = "\"" + tool.string() + "\" tune --layers \"" + dir.string() + "\" --l1 0.05 --pv-l1 0.06 --out \"" +
                          out.string() + "\" --verify > \"" + log.string() + "\" 2>&1";
  const int rc = std::system(cmd.c_str());
  std::ifstream lf(log);
  const std::string text((std::istreambuf_iterator<char>(lf)), std::istreambuf_iterator<char>());
  MESSAGE(text);
  CHECK(rc == 0);
  CHECK(contains(text, "layer a head 2/2"));
  CHECK(contains(text, "layer b head 1/2"));
  CHECK(contains(text, "verify"));
  HyperParams hp = HyperParams::load(out.string());
  CHECK(hp.layer("a", 2).size() == 2);
  CHECK(hp.layer("b", 2).size() == 2);
  CHECK(hp.block_q == 128);
  // usage errors exit with status 2 and a message
  const std::string bad = "\"" + tool.string() + "\" tune --l1 abc > \"" + log.string() + "\" 2>&1";
  CHECK(std::system(bad.c_str()) != 0);
  std::ifstream lf2(log);
  const std::string text2((std::istreambuf_iterator<char>(lf2)), std::istreambuf_iterator<char>());
  CHECK(contains(text2, "--l1: expected a number"));
  fs::remove_all(dir);
}

// ---- device predictor and permutation (Vulkan, CUDA) -----------------------------------------------------
// The GPU predictors must produce the reference's LUT bit for bit (docs/SPARGE.md, "Exact arithmetic").

// A context of `backend`, or nothing (with a message) when this build or machine has none.
std::optional<Context> device_context(Backend backend) {
  try {
    return Context::create(backend);
  } catch (const Error& e) {
    if (e.status() != Status::BackendUnavailable) throw;
    MESSAGE("no " << std::string(to_string(backend)) << " device (" << std::string(e.what()) << "): skipping");
    return std::nullopt;
  }
}

enum class PredInput { Grid, Random, NonFinite, TinyBf16 };

struct PredCase {
  std::string name;
  int B = 1, Hq = 2, Hkv = 1, Nq = 1000, Nk = 1000, D = 64;
  bool causal = false;
  int block_q = 128, block_k = 64;
  bool sink = false, diagonal = true;
  Layout layout = Layout::HND;
  std::vector<SpargeParams> params = {SpargeParams{}};
  PredInput input = PredInput::Grid;
  int row_pad = 0;  // > 0: q and k are views whose rows are padded by this many elements (HND)
};

SpargeParams sp(float theta, float tau, float topk = 0.0f, bool dense = false) {
  SpargeParams p;
  p.simthreshd = theta;
  p.cdfthreshd = tau;
  p.topk = topk;
  p.dense = dense;
  return p;
}

std::vector<PredCase> predictor_cases() {
  std::vector<PredCase> c;
  c.push_back({"grid, partial last blocks, tau"});
  c.back().params = {sp(0.5f, 0.9f)};
  c.push_back({"Nq != Nk, causal, GQA, per-head tau / top-k / dense / theta", 1, 4, 2, 700, 1300, 64, true});
  c.back().params = {sp(0.3f, 0.95f), sp(0.0f, 0.0f, 0.3f), sp(0.6f, 0.9f, 0.0f, true), sp(0.9f, 0.5f)};
  c.push_back({"Nq > Nk, causal (rows without keys), sink", 1, 2, 2, 1300, 500, 64, true});
  c.back().sink = true;
  c.back().params = {sp(0.0f, 0.7f)};
  c.push_back({"blocks 192 x 128, top-k, sink, no diagonal", 2, 2, 1, 1000, 1000, 128});
  c.back().block_q = 192, c.back().block_k = 128, c.back().sink = true, c.back().diagonal = false;
  c.back().params = {sp(0.0f, 0.0f, 0.2f), sp(0.2f, 0.0f, 0.05f)};
  c.push_back({"random inputs, D = 128", 2, 2, 1, 600, 600, 128});
  c.back().input = PredInput::Random;
  c.back().params = {sp(0.0f, 0.98f)};
  c.push_back({"non-finite inputs", 1, 2, 1, 640, 640, 64});
  c.back().input = PredInput::NonFinite;
  c.back().params = {sp(0.0f, 0.6f)};
  c.push_back({"bf16 with subnormal fp32 values and a zero block", 1, 2, 2, 520, 520, 64});
  c.back().input = PredInput::TinyBf16;
  c.back().params = {sp(0.0f, 0.8f)};
  c.push_back({"NHD layout, tau 1", 1, 2, 2, 777, 777, 64});
  c.back().layout = Layout::NHD;
  c.back().params = {sp(0.4f, 1.0f)};
  c.push_back({"strided rows (padded by 4), D = 128", 2, 4, 2, 555, 700, 128});
  c.back().row_pad = 4;
  c.back().params = {sp(0.3f, 0.9f)};
  // More than 256 key blocks: the selection's wider rows (Vulkan: 2 query blocks per workgroup, not 4).
  c.push_back({"313 key blocks, Nq << Nk, tau and top-k", 1, 2, 1, 300, 20000, 64});
  c.back().params = {sp(0.2f, 0.95f), sp(0.0f, 0.0f, 0.1f)};
  return c;
}

// fp32 host data of a case, HND: q [B, Hq, Nq, D], k [B, Hkv, Nk, D].
void predictor_inputs(const PredCase& c, std::vector<float>& q, std::vector<float>& k) {
  const int N = std::max(c.Nq, c.Nk);
  Qkv x = c.input == PredInput::Random ? random_inputs(c.B, c.Hq, c.Hkv, N, c.D, 17)
                                       : grid_inputs(1, 1, N, c.B, c.Hq, c.Hkv, c.D, 20.0, 40.0, 23);
  auto take = [&](const std::vector<float>& all, int heads, int n) {
    std::vector<float> out;
    for (int bh = 0; bh < c.B * heads; ++bh)
      out.insert(out.end(), all.begin() + static_cast<std::ptrdiff_t>(bh) * N * c.D,
                 all.begin() + (static_cast<std::ptrdiff_t>(bh) * N + n) * c.D);
    return out;
  };
  q = take(x.q, c.Hq, c.Nq);
  k = take(x.k, c.Hkv, c.Nk);
  if (c.input == PredInput::NonFinite) {
    q[static_cast<std::size_t>(5) * c.D + 3] = std::nanf("");                                  // query block 0
    q[static_cast<std::size_t>(c.Nq + 300) * c.D + 7] = std::numeric_limits<float>::infinity();  // head 1
    k[static_cast<std::size_t>(200) * c.D + 1] = -std::numeric_limits<float>::infinity();
  }
  if (c.input == PredInput::TinyBf16) {
    for (float& e : q) e *= 1e-38f;  // fp32 subnormals and tiny normals
    for (std::size_t i = 0; i < k.size() / 2; ++i) k[i] *= 3e-38f;
    std::fill(k.begin() + 64 * c.D, k.begin() + 128 * c.D, 0.0f);  // key block 1 of kv head 0: zeros
    std::fill(q.begin(), q.begin() + 128 * c.D, 0.0f);              // query block 0 of head 0: zeros
  }
}

// x: HND [B, H, N, D] fp32. pad > 0 (HND only): a view of rows of D + pad elements.
Tensor upload_as(Context& ctx, const std::vector<float>& x, int B, int H, int N, int D, DType dtype, Layout layout,
                 int pad = 0) {
  const int W = D + pad;  // elements per stored row
  std::vector<uint16_t> bits(static_cast<std::size_t>(B) * H * N * W, 0);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      for (int n = 0; n < N; ++n)
        for (int c = 0; c < D; ++c) {
          const float e = x[((static_cast<std::size_t>(b) * H + h) * N + n) * D + c];
          const std::size_t at = layout == Layout::HND ? ((static_cast<std::size_t>(b) * H + h) * N + n) * W + c
                                                       : ((static_cast<std::size_t>(b) * N + n) * H + h) * W + c;
          bits[at] = dtype == DType::BF16 ? reference::float_to_bf16(e) : reference::float_to_half(e);
        }
  if (layout == Layout::NHD) return ctx.from_host(dtype, {B, N, H, D}, bits.data());
  Tensor t = ctx.from_host(dtype, {B, H, N, W}, bits.data());
  if (pad == 0) return t;
  return t.view({B, H, N, D}, {int64_t(H) * N * W, int64_t(N) * W, W, 1});
}

void check_device_predictor(Context& gpu) {
  Context ref = Context::create(Backend::Reference);
  for (const PredCase& c : predictor_cases()) {
    CAPTURE(c.name);
    std::vector<float> q, k;
    predictor_inputs(c, q, k);
    const DType dtype = c.input == PredInput::TinyBf16 ? DType::BF16 : DType::F16;
    SpargeOptions opt;
    opt.block_q = c.block_q;
    opt.block_k = c.block_k;
    opt.attention_sink = c.sink;
    opt.diagonal = c.diagonal;
    opt.attention.causal = c.causal;
    opt.attention.layout = c.layout;
    SpargeStats sg, sr;
    Tensor gq = upload_as(gpu, q, c.B, c.Hq, c.Nq, c.D, dtype, c.layout, c.row_pad);
    Tensor gk = upload_as(gpu, k, c.B, c.Hkv, c.Nk, c.D, dtype, c.layout, c.row_pad);
    Tensor rq = upload_as(ref, q, c.B, c.Hq, c.Nq, c.D, dtype, c.layout, c.row_pad);
    Tensor rk = upload_as(ref, k, c.B, c.Hkv, c.Nk, c.D, dtype, c.layout, c.row_pad);
    LutHost lg = lut_of(gpu, predict_block_mask(gpu, gq, gk, opt, c.params, &sg));
    LutHost lr = lut_of(ref, predict_block_mask(ref, rq, rk, opt, c.params, &sr));
    CHECK(sg.predicted_on_device);
    CHECK_FALSE(sr.predicted_on_device);
    MESSAGE(c.name << ": block sparsity " << sr.block_sparsity);
    REQUIRE(lg.counts.size() == lr.counts.size());
    std::size_t first = 0;
    while (first < lr.counts.size() && lg.counts[first] == lr.counts[first]) ++first;
    INFO("first differing row " << first);
    CHECK(lg.counts == lr.counts);
    CHECK(lg.indices == lr.indices);
    CHECK(sg.blocks_computed == sr.blocks_computed);
    CHECK(sg.blocks_valid == sr.blocks_valid);

    // The same prediction inside sparge_attention (fused into the attention's quantization passes where the
    // backend does that) against the separate passes: the same blocks and output, bit for bit (k serves as v).
    const std::vector<int64_t> oshape = c.layout == Layout::HND ? std::vector<int64_t>{c.B, c.Hq, c.Nq, c.D}
                                                                : std::vector<int64_t>{c.B, c.Nq, c.Hq, c.D};
    Tensor out = gpu.empty(dtype, oshape);
    SpargeStats fused, separate;
    sparge_attention(gpu, gq, gk, gk, out, opt, c.params, &fused);
    const auto fused_bits = bits_of(gpu, out);
    {
      test::ScopedEnv passes("SPARQ_SPARGE_FUSED_PREDICT", "0");
      sparge_attention(gpu, gq, gk, gk, out, opt, c.params, &separate);
    }
    CHECK(fused.blocks_computed == sr.blocks_computed);
    CHECK(separate.blocks_computed == sr.blocks_computed);
    CHECK(fused_bits == bits_of(gpu, out));
  }
}

// sparge_attention with the device predictor (and, with a grid, the device permutation) against the same call
// with the host predictor: the same LUT, hence the same output bit for bit.
void check_device_sparge_attention(Context& gpu) {
  const int H = 48, W = 48;
  Qkv x = grid_inputs(1, H, W, 1, 2, 2, 64, 20.0, 6.0, 11);
  Device d = upload(gpu, x);
  SpargeParams p = sp(0.5f, 0.99f);
  p.pvthreshd = 6.0f;
  for (bool hilbert : {false, true}) {
    CAPTURE(hilbert);
    SpargeOptions opt;
    if (hilbert) opt.hilbert = TokenGrid{1, H - 1, W};  // the first 47 rows; the last 48 tokens stay in place
    SpargeStats on_device, separate, on_host;
    Tensor lse = gpu.empty(DType::F32, {1, 2, x.N});
    sparge_attention(gpu, d.q, d.k, d.v, d.out, opt, {p}, &on_device, &lse);
    const auto a = download(gpu, d.out);
    const auto lse_a = floats_of(gpu, lse);
    {  // the device predictor's own passes instead of the attention's preprocessing, where a backend fuses it
      test::ScopedEnv passes("SPARQ_SPARGE_FUSED_PREDICT", "0");
      sparge_attention(gpu, d.q, d.k, d.v, d.out, opt, {p}, &separate, &lse);
    }
    const auto c = download(gpu, d.out);
    const auto lse_c = floats_of(gpu, lse);
    {
      test::ScopedEnv host("SPARQ_SPARGE_PREDICTOR", "host");
      sparge_attention(gpu, d.q, d.k, d.v, d.out, opt, {p}, &on_host, &lse);
    }
    const auto b = download(gpu, d.out);
    CHECK(lse_a == floats_of(gpu, lse));
    CHECK(lse_c == lse_a);
    CHECK(std::all_of(lse_a.begin(), lse_a.end(), [](float e) { return std::isfinite(e); }));
    CHECK(on_device.predicted_on_device);
    CHECK(separate.predicted_on_device);
    CHECK_FALSE(on_host.predicted_on_device);
    CHECK(on_device.blocks_computed == on_host.blocks_computed);
    CHECK(separate.blocks_computed == on_host.blocks_computed);
    CHECK(on_device.pv_skipped == on_host.pv_skipped);
    CHECK(test::bitwise_equal(a, b));
    CHECK(test::bitwise_equal(c, b));
    if (hilbert) CHECK(on_device.block_sparsity > 0.3);
    MESSAGE("device sparge_attention, hilbert " << hilbert << ": blocks " << on_device.blocks_computed << "/" << on_device.blocks_valid << " block sparsity " << on_device.block_sparsity
                                                << ", rel L1 " << rel_l1(a, exact_out(x)));
  }
}

// permute_tokens on the device: the host permutation's result, and the inverse restores the input exactly.
void check_device_permutation(Context& gpu) {
  Context host = Context::create(Backend::Reference);
  for (Layout layout : {Layout::HND, Layout::NHD}) {
    for (DType dtype : {DType::F16, DType::BF16}) {
      CAPTURE(static_cast<int>(layout));
      const int B = 2, H = 3, N = 301, D = 64;
      std::vector<uint16_t> src(static_cast<std::size_t>(B) * H * N * D);
      std::mt19937 rng(5);
      for (uint16_t& e : src) e = static_cast<uint16_t>(rng() & 0x7bff);  // any finite bits
      const std::vector<int64_t> shape = layout == Layout::HND ? std::vector<int64_t>{B, H, N, D}
                                                               : std::vector<int64_t>{B, N, H, D};
      const auto order = hilbert_order(1, 12, 23);  // 276 tokens: the last 25 stay in place
      Tensor a = gpu.from_host(dtype, shape, src.data());
      Tensor p = gpu.empty(dtype, shape), back = gpu.empty(dtype, shape);
      if (layout == Layout::HND && dtype == DType::BF16) {
        // a destination view with padded rows (strided tokens) for the forward permutation
        Tensor wide = gpu.empty(dtype, {B, H, N, D + 4});
        p = wide.view(shape, {int64_t(H) * N * (D + 4), int64_t(N) * (D + 4), D + 4, 1});
      }
      permute_tokens(gpu, a, p, order, layout);
      permute_tokens(gpu, p, back, inverse_permutation(order), layout);
      Tensor ha = host.from_host(dtype, shape, src.data());
      Tensor hp = host.empty(dtype, shape);
      permute_tokens(host, ha, hp, order, layout);
      std::vector<uint16_t> got(src.size()), want(src.size()), round(src.size());
      gpu.to_host(p, got.data());
      host.to_host(hp, want.data());
      gpu.to_host(back, round.data());
      CHECK(got == want);
      CHECK(round == src);
      CHECK(got != src);
    }
  }
}

// A problem beyond the device predictor's limits (more than 1024 key blocks) is predicted on the host: the
// result is the same LUT, and the statistics say where it ran.
void check_device_fallback(Context& gpu) {
  Context ref = Context::create(Backend::Reference);
  const int N = 1025 * 64 + 7, D = 64;
  Qkv x = random_inputs(1, 1, 1, N, D, 29);
  SpargeOptions opt;
  opt.block_q = 8192;
  SpargeStats sg, sr;
  Tensor gq = upload_as(gpu, x.q, 1, 1, N, D, DType::F16, Layout::HND);
  Tensor gk = upload_as(gpu, x.k, 1, 1, N, D, DType::F16, Layout::HND);
  Tensor rq = upload_as(ref, x.q, 1, 1, N, D, DType::F16, Layout::HND);
  Tensor rk = upload_as(ref, x.k, 1, 1, N, D, DType::F16, Layout::HND);
  const SpargeParams p = sp(0.0f, 0.5f);
  LutHost lg = lut_of(gpu, predict_block_mask(gpu, gq, gk, opt, {p}, &sg));
  LutHost lr = lut_of(ref, predict_block_mask(ref, rq, rk, opt, {p}, &sr));
  CHECK_FALSE(sg.predicted_on_device);
  CHECK(lg.counts == lr.counts);
  CHECK(lg.indices == lr.indices);
}

// sparge_attention with a Hilbert grid, called again and again on one context: shapes that grow and shrink,
// grids old and new (more than the context keeps cached), both dtypes and layouts, strided inputs, tokens
// beyond the grid, stage 2 on and off, and a dense layer (which skips the permutation). Every call must give
// bit for bit what the order applied by hand gives (permute_tokens into new tensors, sparge_attention without
// a grid, the inverse permutation) and leave its inputs alone; off the reference backend the output also stays
// close to the reference backend's for the same call (the same LUT: the same blocks computed).
struct HilbertCall {
  int B, Hq, Hkv, D;
  TokenGrid grid;
  int extra;  // tokens after the grid's
  DType dtype;
  Layout layout;
  int pad;  // > 0: q, k, v are views with rows padded by this many elements (HND)
  float pv;  // pvthreshd (inf: no stage 2)
  bool dense = false;
};

void check_hilbert_calls(Context& ctx, PVPrecision pv_precision = PVPrecision::Auto) {
  const float inf = std::numeric_limits<float>::infinity();
  const DType f16 = DType::F16, bf16 = DType::BF16;
  const Layout hnd = Layout::HND, nhd = Layout::NHD;
  std::vector<HilbertCall> calls = {
      {1, 2, 1, 64, {1, 12, 20}, 0, f16, hnd, 0, inf},
      {2, 4, 2, 64, {4, 10, 12}, 30, f16, hnd, 0, 6.0f},  // grows
      {1, 2, 2, 64, {1, 10, 15}, 0, bf16, hnd, 0, inf},   // shrinks, another dtype
      {1, 2, 1, 64, {1, 12, 20}, 20, f16, nhd, 0, inf},   // the first grid again (cached), NHD, longer sequence
      {1, 2, 1, 128, {2, 9, 11}, 5, f16, hnd, 4, 6.0f},   // D = 128, strided input rows
      {2, 4, 2, 64, {4, 10, 12}, 30, f16, hnd, 0, inf, true},  // dense, no stage 2: no permutation
      {1, 2, 1, 64, {1, 12, 20}, 0, f16, hnd, 0, inf},    // the first call again, into the larger buffers
  };
  for (int i = 0; i < 10; ++i) calls.push_back({1, 1, 1, 64, {1, 12 + i, 17}, i, f16, hnd, 0, inf});  // evicts
  calls.push_back({1, 2, 1, 64, {1, 12, 20}, 0, f16, hnd, 0, 6.0f});  // the first grid, computed again
  std::optional<Context> ref;
  if (ctx.backend() != Backend::Reference) ref = Context::create(Backend::Reference);
  for (std::size_t ci = 0; ci < calls.size(); ++ci) {
    const HilbertCall& c = calls[ci];
    CAPTURE(ci);
    const int N = static_cast<int>(c.grid.tokens()) + c.extra;
    // tokens with the grid's structure (so that the curve order makes blocks sparse), then the extra ones
    Qkv x = grid_inputs(c.grid.t, c.grid.h, c.grid.w, c.B, c.Hq, c.Hkv, c.D, 20.0, 3.0, 100 + ci);
    if (c.extra > 0) {
      const Qkv e = grid_inputs(1, 1, c.extra, c.B, c.Hq, c.Hkv, c.D, 20.0, 3.0, 200 + ci);
      auto append = [&](std::vector<float>& to, const std::vector<float>& from, int heads) {
        std::vector<float> r;
        for (int bh = 0; bh < c.B * heads; ++bh) {
          r.insert(r.end(), to.begin() + std::ptrdiff_t(bh) * x.N * c.D, to.begin() + std::ptrdiff_t(bh + 1) * x.N * c.D);
          r.insert(r.end(), from.begin() + std::ptrdiff_t(bh) * e.N * c.D, from.begin() + std::ptrdiff_t(bh + 1) * e.N * c.D);
        }
        to = std::move(r);
      };
      append(x.q, e.q, c.Hq);
      append(x.k, e.k, c.Hkv);
      append(x.v, e.v, c.Hkv);
      x.N = N;
    }
    const std::vector<int64_t> oshape = c.layout == hnd ? std::vector<int64_t>{c.B, c.Hq, N, c.D}
                                                         : std::vector<int64_t>{c.B, N, c.Hq, c.D};
    SpargeOptions opt;
    opt.attention.layout = c.layout;
    opt.attention.pv_precision = pv_precision;
    opt.hilbert = c.grid;
    opt.block_q = 64;  // more blocks of these short sequences (a multiple of every backend's tile)
    SpargeParams p = sp(0.3f, 0.95f, 0.0f, c.dense);
    p.pvthreshd = c.pv;
    Tensor q = upload_as(ctx, x.q, c.B, c.Hq, N, c.D, c.dtype, c.layout, c.pad);
    Tensor k = upload_as(ctx, x.k, c.B, c.Hkv, N, c.D, c.dtype, c.layout, c.pad);
    Tensor v = upload_as(ctx, x.v, c.B, c.Hkv, N, c.D, c.dtype, c.layout, c.pad);
    const auto q0 = bits_of(ctx, q), k0 = bits_of(ctx, k), v0 = bits_of(ctx, v);
    Tensor out = ctx.empty(c.dtype, oshape);
    const std::vector<int64_t> lse_shape = {c.B, c.Hq, N};
    Tensor lse = ctx.empty(DType::F32, lse_shape);
    SpargeStats st;
    sparge_attention(ctx, q, k, v, out, opt, {p}, &st, &lse);
    const auto got = bits_of(ctx, out);
    CHECK(bits_of(ctx, q) == q0);
    CHECK(bits_of(ctx, k) == k0);
    CHECK(bits_of(ctx, v) == v0);

    SpargeOptions plain = opt;
    plain.hilbert.reset();
    Tensor want = ctx.empty(c.dtype, oshape);
    Tensor want_lse = ctx.empty(DType::F32, lse_shape);
    std::vector<float> lse_want;
    SpargeStats st2;
    if (c.dense && !std::isfinite(c.pv)) {
      sparge_attention(ctx, q, k, v, want, plain, {p}, &st2, &want_lse);
      lse_want = floats_of(ctx, want_lse);
    } else {
      const auto order = hilbert_order(c.grid);
      Tensor qh = ctx.empty(c.dtype, q.shape()), kh = ctx.empty(c.dtype, k.shape()), vh = ctx.empty(c.dtype, v.shape());
      Tensor oh = ctx.empty(c.dtype, oshape);
      permute_tokens(ctx, q, qh, order, c.layout);
      permute_tokens(ctx, k, kh, order, c.layout);
      permute_tokens(ctx, v, vh, order, c.layout);
      sparge_attention(ctx, qh, kh, vh, oh, plain, {p}, &st2, &want_lse);
      permute_tokens(ctx, oh, want, inverse_permutation(order), c.layout);
      // the LSE rows back to their tokens' places by hand
      const auto h = floats_of(ctx, want_lse);
      lse_want = h;
      for (std::size_t bh = 0; bh < static_cast<std::size_t>(c.B) * c.Hq; ++bh)
        for (std::size_t i = 0; i < order.size(); ++i) lse_want[bh * N + std::size_t(order[i])] = h[bh * N + i];
    }
    CHECK(got == bits_of(ctx, want));
    CHECK(floats_of(ctx, lse) == lse_want);
    CHECK(st.blocks_computed == st2.blocks_computed);
    CHECK(st.pv_skipped == st2.pv_skipped);
    CHECK(st.pv_total == st2.pv_total);
    if (!c.dense) CHECK(st.block_sparsity > 0.0);

    if (ref) {
      Tensor rq = upload_as(*ref, x.q, c.B, c.Hq, N, c.D, c.dtype, c.layout, c.pad);
      Tensor rk = upload_as(*ref, x.k, c.B, c.Hkv, N, c.D, c.dtype, c.layout, c.pad);
      Tensor rv = upload_as(*ref, x.v, c.B, c.Hkv, N, c.D, c.dtype, c.layout, c.pad);
      Tensor ro = ref->empty(c.dtype, oshape);
      SpargeStats sr;
      sparge_attention(*ref, rq, rk, rv, ro, opt, {p}, &sr);
      const auto rb = bits_of(*ref, ro);
      double num = 0, den = 0;
      for (std::size_t i = 0; i < rb.size(); ++i) {
        const double a = reference::load_16(got[i], c.dtype), b = reference::load_16(rb[i], c.dtype);
        num += std::fabs(a - b), den += std::fabs(b);
      }
      // FP8 P·V (the CUDA default on sm_89+) against the reference's FP16 P·V: the e4m3 rounding of P and V
      const double tol = ctx.default_pv_precision() == PVPrecision::Fp8 ? 0.08 : 0.01;
      CHECK(num <= tol * den);
      CHECK(st.blocks_computed == sr.blocks_computed);
    }
  }
}

TEST_CASE("hilbert (reference): repeated sparge_attention calls, shapes growing and shrinking, many grids") {
  Context ctx = Context::create(Backend::Reference);
  check_hilbert_calls(ctx);
}
// Vulkan reads and writes through the order too (GATHER specializations of its preprocessing, predictor and
// attention kernels: no permuted copies); SPARQ_SPARGE_FUSED_ORDER=0 makes the copies instead. Both must equal
// the order applied by hand. Vulkan's P·V is FP16 (Auto is Fp16 there, Fp8 is not supported), so the variants
// run are the kernel flavours: the automatic choice (cooperative matrices on a GPU that has them) and the
// portable kernel.
TEST_CASE("hilbert (Vulkan): repeated sparge_attention calls, shapes growing and shrinking, many grids") {
  auto gpu = device_context(Backend::Vulkan);
  if (!gpu) return;
  test::ScopedEnv fused_order("SPARQ_SPARGE_FUSED_ORDER", nullptr);
  for (const char* fused : {"1", "0"})
    for (const char* kernels : {"", "portable"}) {
      CAPTURE(fused);
      CAPTURE(kernels);
      fused_order.set(fused);
      test::ScopedEnv kernel_choice("SPARQ_VULKAN_KERNELS", kernels);
      check_hilbert_calls(*gpu);
    }
  // The host predictor (where the device one does not cover a shape) on q and k read through the fused order.
  fused_order.set("1");
  {
    test::ScopedEnv host("SPARQ_SPARGE_PREDICTOR", "host");
    check_hilbert_calls(*gpu);
  }
  // fp16 Q·Kᵀ, where the attention kernel reads Q rows itself (and quant writes smoothed K in token order):
  // fused and copies agree bit for bit, with 16-byte aligned rows and with padded ones.
  for (int pad : {0, 3}) {
    CAPTURE(pad);
    const TokenGrid grid{1, 12, 20};
    const int B = 1, Hq = 2, Hkv = 1, D = 64, extra = 20;
    const int N = static_cast<int>(grid.tokens()) + extra;  // a 13 x 20 grid of inputs, 12 x 20 in curve order
    Qkv x = grid_inputs(1, 13, 20, B, Hq, Hkv, D, 20.0, 3.0, 300 + pad);
    SpargeOptions opt;
    opt.attention.qk_precision = QKPrecision::Fp16;
    opt.hilbert = grid;
    opt.block_q = 64;
    SpargeParams p = sp(0.3f, 0.95f, 0.0f, false);
    p.pvthreshd = 6.0f;
    Tensor q = upload_as(*gpu, x.q, B, Hq, N, D, DType::F16, Layout::HND, pad);
    Tensor k = upload_as(*gpu, x.k, B, Hkv, N, D, DType::F16, Layout::HND, pad);
    Tensor v = upload_as(*gpu, x.v, B, Hkv, N, D, DType::F16, Layout::HND, pad);
    std::vector<uint16_t> got[2];
    for (int m = 0; m < 2; ++m) {
      fused_order.set(m == 0 ? "1" : "0");
      Tensor out = gpu->empty(DType::F16, {B, Hq, N, D});
      sparge_attention(*gpu, q, k, v, out, opt, {p});
      got[m] = bits_of(*gpu, out);
    }
    CHECK(got[0] == got[1]);
    CHECK(std::any_of(got[0].begin(), got[0].end(), [](uint16_t b) { return (b & 0x7FFF) != 0; }));
  }
}
// CUDA reads and writes through the order (no permuted copies; FP16 P·V copies V in token order);
// SPARQ_SPARGE_FUSED_ORDER=0 makes the copies instead. Both must equal the order applied by hand.
TEST_CASE("hilbert (CUDA): repeated sparge_attention calls, shapes growing and shrinking, many grids") {
  auto gpu = device_context(Backend::Cuda);
  if (!gpu) return;
  test::ScopedEnv fused_order("SPARQ_SPARGE_FUSED_ORDER", nullptr);
  for (const char* fused : {"1", "0"})
    for (PVPrecision pv : {PVPrecision::Auto, PVPrecision::Fp16}) {
      CAPTURE(fused);
      CAPTURE(static_cast<int>(pv));
      fused_order.set(fused);
      check_hilbert_calls(*gpu, pv);
    }
  // The host predictor (where the device one does not cover a shape) on q and k read through the fused order.
  fused_order.set("1");
  test::ScopedEnv host("SPARQ_SPARGE_PREDICTOR", "host");
  check_hilbert_calls(*gpu);
}

TEST_CASE("device predictor (Vulkan): the reference's LUT bit for bit") {
  if (auto gpu = device_context(Backend::Vulkan)) check_device_predictor(*gpu);
}
TEST_CASE("device predictor (Vulkan): sparge_attention with it equals the host predictor's") {
  if (auto gpu = device_context(Backend::Vulkan)) check_device_sparge_attention(*gpu);
}
TEST_CASE("device permutation (Vulkan): matches the host and round-trips exactly") {
  if (auto gpu = device_context(Backend::Vulkan)) check_device_permutation(*gpu);
}
TEST_CASE("device predictor (Vulkan): beyond its limits the host predicts the same LUT") {
  if (auto gpu = device_context(Backend::Vulkan)) check_device_fallback(*gpu);
}
TEST_CASE("device predictor (CUDA): the reference's LUT bit for bit") {
  if (auto gpu = device_context(Backend::Cuda)) check_device_predictor(*gpu);
}
TEST_CASE("device predictor (CUDA): sparge_attention with it equals the host predictor's") {
  if (auto gpu = device_context(Backend::Cuda)) check_device_sparge_attention(*gpu);
}
TEST_CASE("device predictor (CUDA): beyond its limits the host predicts the same LUT") {
  if (auto gpu = device_context(Backend::Cuda)) check_device_fallback(*gpu);
}
TEST_CASE("device permutation (CUDA): matches the host and round-trips exactly") {
  if (auto gpu = device_context(Backend::Cuda)) check_device_permutation(*gpu);
}

}  // TEST_SUITE
