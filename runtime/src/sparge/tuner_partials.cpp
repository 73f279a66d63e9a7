// The tuner's exact attention partials (tuner_partials.hpp).
//
// Both products are one register-blocked micro-kernel: 4 rows x 2 vectors of fp32 accumulators, one row of b
// loaded per step and each a element broadcast, so that every loaded value feeds 4-8 multiply-adds (a plain
// row-at-a-time loop reloads and re-stores its accumulators each step). It is written once with the GCC/Clang
// vector extensions, templated on the vector width W (floats): W = 4 is the baseline (SSE2 on x86-64, NEON on
// AArch64); on x86-64, copies with W = 8 (AVX2 + FMA) and W = 16 (AVX-512) are compiled with target
// attributes and chosen at run time by what the CPU has, so the library stays portable (no -march) and still
// uses the wide units. (A wide vector type compiled for a narrower ISA is split badly by the compiler: 32-byte
// vectors on SSE2 measured 30x slower than 16-byte ones, hence one width per copy.) exp is evaluated once per
// visible logit, W at a time.
//
// Loop order: a tile's K and V (32 KiB each at D = 128) stay in cache while every row group of the query
// block passes over them; the rows (64 KiB at 128 x 128) stay in L2 across tiles.
#include "tuner_partials.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <limits>

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define SPARQ_TUNER_X86 1
#else
#define SPARQ_TUNER_X86 0
#endif

// GCC and Clang note that passing 32-byte vectors by value without AVX changes the ABI: every function here
// that does is inlined into its caller in this file, so no such value crosses a call.
#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace sparq::sparge {
namespace {

#define SPARQ_TUNER_INLINE inline __attribute__((always_inline))

template <int W>
struct Vec;
template <>
struct Vec<4> {
  typedef float F __attribute__((vector_size(16)));
  typedef int32_t I __attribute__((vector_size(16)));
  typedef double D __attribute__((vector_size(16)));
};
template <>
struct Vec<8> {
  typedef float F __attribute__((vector_size(32)));
  typedef int32_t I __attribute__((vector_size(32)));
  typedef double D __attribute__((vector_size(32)));
};
template <>
struct Vec<16> {
  typedef float F __attribute__((vector_size(64)));
  typedef int32_t I __attribute__((vector_size(64)));
  typedef double D __attribute__((vector_size(64)));
};

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Rows per micro-kernel call: 4 x 2 accumulator vectors + 2 loads + a broadcast fit 16 vector registers; with
// AVX2 the kernel runs at about the FMA peak (6 rows measured no faster).
constexpr int kRows = 4;

template <class T>
SPARQ_TUNER_INLINE T load(const void* p) {
  T x;
  std::memcpy(&x, p, sizeof x);
  return x;
}
template <class T>
SPARQ_TUNER_INLINE void store(void* p, T x) {
  std::memcpy(p, &x, sizeof x);
}
template <class T, class S>
SPARQ_TUNER_INLINE T splat(S x) {
  return T{} + x;
}

// c[r][0 .. 2W) = Σ_{k < n} a[r·lda + k] · b[k·ldb + 0 .. 2W) for r < R. Q·Kᵀ: a = query rows, b = the
// transposed K tile (n = d); P·V: a = the rows' probabilities, b = 2W channels of the V tile (n = visible keys).
template <int W, int R>
SPARQ_TUNER_INLINE void micro(const float* a, std::size_t lda, const float* b, std::size_t ldb, int n, float* c,
                              std::size_t ldc) {
  using F = typename Vec<W>::F;
  F acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = F{};
  for (int k = 0; k < n; ++k) {
    const F b0 = load<F>(b + static_cast<std::size_t>(k) * ldb), b1 = load<F>(b + static_cast<std::size_t>(k) * ldb + W);
    for (int r = 0; r < R; ++r) {
      const float x = a[static_cast<std::size_t>(r) * lda + static_cast<std::size_t>(k)];
      acc0[r] += x * b0;
      acc1[r] += x * b1;
    }
  }
  for (int r = 0; r < R; ++r) {
    store(c + static_cast<std::size_t>(r) * ldc, acc0[r]);
    store(c + static_cast<std::size_t>(r) * ldc + W, acc1[r]);
  }
}

// e^x for x <= 0 (x = -inf gives 0), within about 2 ulp of expf. x = n·ln2 + r with |r| <= ln2/2 (ln2 in
// two parts so that n·ln2_hi is exact), e^r by its degree-7 Taylor polynomial (truncation < 4e-9 relative),
// 2^n from exponent bits. Below -87 it returns 0: 2^n would leave the normal range there, and such a weight
// (< 2^-125 of the row max's weight 1) vanishes in any fp32 sum.
template <int W>
SPARQ_TUNER_INLINE typename Vec<W>::F exp_nonpositive(typename Vec<W>::F x) {
  using F = typename Vec<W>::F;
  using I = typename Vec<W>::I;
  const F shifter = splat<F>(12582912.0f);  // 1.5·2^23: adding and subtracting it rounds to an integer
  const F n = (x * 1.44269504f + shifter) - shifter;
  F r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  F p = splat<F>(1.0f / 5040.0f);
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const I bits = (__builtin_convertvector(n, I) + 127) << 23;
  const F y = p * (F)bits;  // a same-size vector cast reinterprets the bits
  return x < -87.0f ? F{} : y;
}

// One row of a tile: scales the logits s[0..64) and masks keys >= jn, writes p = exp(s - m) (0 where masked)
// and m, l. False when no logit is above -inf (the row then keeps m = -inf, l = 0, o = 0).
template <int W>
SPARQ_TUNER_INLINE bool softmax_row(const float* s, int jn, float scale, float* p, float& m_out, float& l_out) {
  using F = typename Vec<W>::F;
  using I = typename Vec<W>::I;
  constexpr int kVectors = kTunerTile / W;
  I lane;
  for (int i = 0; i < W; ++i) lane[i] = i;
  const F ninf = splat<F>(kNegInf);
  F x[kVectors];
  F mx = ninf;
  for (int v = 0; v < kVectors; ++v) {
    const F sv = load<F>(s + W * v) * scale;
    x[v] = lane + W * v < jn ? sv : ninf;
    mx = mx < x[v] ? x[v] : mx;
  }
  float m = kNegInf;
  for (int i = 0; i < W; ++i) m = std::max(m, mx[i]);
  if (!(m > kNegInf)) return false;
  F sum = F{};
  for (int v = 0; v < kVectors; ++v) {
    const F pv = exp_nonpositive<W>(x[v] - m);
    store(p + W * v, pv);
    sum += pv;
  }
  float l = 0.0f;
  for (int i = 0; i < W; ++i) l += sum[i];
  m_out = m;
  l_out = l;
  return true;
}

struct Job {
  const float* q;  // row r0
  int nq, nk, d, r0, rows;
  const float* kt;
  const float* v;
  float scale;
  bool causal;
  const int* tiles;
  std::size_t ntiles;
  float* m;
  float* l;
  float* o;
};

// R rows (g0 .. g0 + R - 1) of tile ti, every row seeing keys [0, jn) of it.
template <int W, int R>
SPARQ_TUNER_INLINE void rows_tile(const Job& job, int g0, std::size_t ti, int jn) {
  constexpr int kCols = 2 * W;  // columns per micro-kernel call
  const std::size_t D = static_cast<std::size_t>(job.d), T = job.ntiles;
  const std::size_t t = static_cast<std::size_t>(job.tiles[ti]);
  const float* kt = job.kt + t * D * kTunerTile;
  const float* vt = job.v + t * kTunerTile * D;
  alignas(32) float s[R][kTunerTile];
  alignas(32) float p[R][kTunerTile];
  for (int jc = 0; jc < kTunerTile; jc += kCols)
    micro<W, R>(job.q + static_cast<std::size_t>(g0) * D, D, kt + jc, kTunerTile, job.d, &s[0][jc], kTunerTile);
  bool seen[R];
  for (int r = 0; r < R; ++r) {
    const std::size_t at = static_cast<std::size_t>(g0 + r) * T + ti;
    seen[r] = softmax_row<W>(s[r], jn, job.scale, p[r], job.m[at], job.l[at]);
    if (!seen[r]) std::fill(p[r], p[r] + kTunerTile, 0.0f);
  }
  float* o = job.o + (static_cast<std::size_t>(g0) * T + ti) * D;
  std::size_t c = 0;
  for (; c + kCols <= D; c += kCols) micro<W, R>(&p[0][0], kTunerTile, vt + c, D, jn, o + c, T * D);
  if constexpr (W > 4)
    for (; c + W <= D; c += W) micro<W / 2, R>(&p[0][0], kTunerTile, vt + c, D, jn, o + c, T * D);
  for (; c < D; ++c)  // head dims that are not a multiple of 8
    for (int r = 0; r < R; ++r) {
      float acc = 0.0f;
      for (int j = 0; j < jn; ++j) acc += p[r][j] * vt[static_cast<std::size_t>(j) * D + c];
      o[static_cast<std::size_t>(r) * T * D + c] = acc;
    }
  for (int r = 0; r < R; ++r)
    if (!seen[r]) std::fill(o + static_cast<std::size_t>(r) * T * D, o + static_cast<std::size_t>(r) * T * D + D, 0.0f);
}

// o of a row and tile that sees no key: 0 (m and l keep their initial -inf and 0).
SPARQ_TUNER_INLINE void zero_row(const Job& job, int i, std::size_t ti) {
  float* o = job.o + (static_cast<std::size_t>(i) * job.ntiles + ti) * static_cast<std::size_t>(job.d);
  std::fill(o, o + job.d, 0.0f);
}

// Rows g0 .. g0 + R - 1 of tile ti: together when they see the same keys, else one at a time (a causal
// diagonal). vis(i): how many keys of the tile row i sees.
template <int W, int R, class Visible>
SPARQ_TUNER_INLINE void group(const Job& job, int g0, std::size_t ti, const Visible& vis) {
  const int jn = vis(g0);
  if (vis(g0 + R - 1) == jn) {  // visibility only grows with the row
    if (jn > 0) rows_tile<W, R>(job, g0, ti, jn);
    else
      for (int i = g0; i < g0 + R; ++i) zero_row(job, i, ti);
    return;
  }
  for (int i = g0; i < g0 + R; ++i) {
    if (const int n = vis(i); n > 0) rows_tile<W, 1>(job, i, ti, n);
    else zero_row(job, i, ti);
  }
}

template <int W>
SPARQ_TUNER_INLINE void run(const Job& job) {
  for (std::size_t ti = 0; ti < job.ntiles; ++ti) {
    const int64_t j0 = static_cast<int64_t>(job.tiles[ti]) * kTunerTile;
    auto visible = [&](int i) {
      const int64_t row = static_cast<int64_t>(job.r0) + i;
      const int64_t last = job.causal ? std::min<int64_t>(job.nk - 1, row + job.nk - job.nq) : job.nk - 1;
      return static_cast<int>(std::clamp<int64_t>(last - j0 + 1, 0, kTunerTile));
    };
    int g0 = 0;
    for (; g0 + kRows <= job.rows; g0 += kRows) group<W, kRows>(job, g0, ti, visible);
    for (; g0 < job.rows; ++g0) group<W, 1>(job, g0, ti, visible);
  }
}

// Online combination of one row's partials (fp64): running max M, Σ weight·l, Σ weight·o.
template <int W>
struct Combiner {
  using D = typename Vec<W>::D;  // W/2 doubles
  static constexpr int kLanes = W / 2;
  int d;
  double* O;  // [d]
  double M = -std::numeric_limits<double>::infinity(), L = 0;

  SPARQ_TUNER_INLINE void add(float m, float l, const float* o) {
    if (!(m > kNegInf)) return;
    if (m > M) {  // new running max: rescale what is there; the new tile's weight is then exactly 1
      const double r = std::isinf(M) ? 0.0 : std::exp(M - m);
      L = L * r + l;
      for (int c = 0; c < d; ++c) O[c] = O[c] * r + o[c];
      M = m;
      return;
    }
    const double w = std::exp(static_cast<double>(m) - M);
    L += w * l;
    for (int c = 0; c < d; ++c) O[c] += w * o[c];
  }
  // Σ_c |O/L - exact_c| (Σ |exact| when nothing was added), in interleaved partial sums so that it
  // vectorizes; the reciprocal of L is taken once.
  SPARQ_TUNER_INLINE double l1(const double* exact) const {
    D acc = D{};
    int c = 0;
    double e = 0;
    if (L > 0) {
      const double inv = 1.0 / L;
      for (; c + kLanes <= d; c += kLanes) {
        const D x = load<D>(O + c) * inv - load<D>(exact + c);
        acc += x < 0 ? -x : x;
      }
      for (int i = 0; i < kLanes; ++i) e += acc[i];
      for (; c < d; ++c) e += std::fabs(O[c] * inv - exact[c]);
      return e;
    }
    for (; c + kLanes <= d; c += kLanes) {
      const D x = load<D>(exact + c);
      acc += x < 0 ? -x : x;
    }
    for (int i = 0; i < kLanes; ++i) e += acc[i];
    for (; c < d; ++c) e += std::fabs(exact[c]);
    return e;
  }
};

template <int W>
SPARQ_TUNER_INLINE void prefix_errors(const TunerPartials& p, int row, const int* seq, const int* first, int steps,
                                      const double* exact, double* err, double* scratch) {
  const std::size_t T = static_cast<std::size_t>(p.tiles), D = static_cast<std::size_t>(p.d);
  Combiner<W> comb{p.d, scratch};
  std::fill(scratch, scratch + D, 0.0);
  err[0] += comb.l1(exact);
  for (int s = 0; s < steps; ++s) {
    for (int k = first[s]; k < first[s + 1]; ++k) {
      const std::size_t at = static_cast<std::size_t>(row) * T + static_cast<std::size_t>(seq[k]);
      comb.add(p.m[at], p.l[at], p.o.data() + at * D);
    }
    err[s + 1] += comb.l1(exact);
  }
}

template <int W>
SPARQ_TUNER_INLINE void combine_row(const TunerPartials& p, int row, double* out) {
  const std::size_t T = static_cast<std::size_t>(p.tiles), D = static_cast<std::size_t>(p.d);
  std::fill(out, out + D, 0.0);
  Combiner<W> comb{p.d, out};
  for (std::size_t t = 0; t < T; ++t) {
    const std::size_t at = static_cast<std::size_t>(row) * T + t;
    comb.add(p.m[at], p.l[at], p.o.data() + at * D);
  }
  for (std::size_t c = 0; c < D; ++c) out[c] = comb.L > 0 ? out[c] / comb.L : 0.0;
}

// Copies for AVX-512 and for AVX2 + FMA, used where the CPU has them (width()), else the baseline.
#if SPARQ_TUNER_X86
#define SPARQ_TUNER_AVX512 __attribute__((target("avx512f,avx2,fma")))
#define SPARQ_TUNER_AVX2 __attribute__((target("avx2,fma")))
SPARQ_TUNER_AVX512 void run16(const Job& job) { run<16>(job); }
SPARQ_TUNER_AVX2 void run8(const Job& job) { run<8>(job); }
SPARQ_TUNER_AVX512 void combine_row16(const TunerPartials& p, int row, double* out) { combine_row<16>(p, row, out); }
SPARQ_TUNER_AVX2 void combine_row8(const TunerPartials& p, int row, double* out) { combine_row<8>(p, row, out); }
SPARQ_TUNER_AVX512 void prefix_errors16(const TunerPartials& p, int row, const int* seq, const int* first, int steps,
                                        const double* exact, double* err, double* scratch) {
  prefix_errors<16>(p, row, seq, first, steps, exact, err, scratch);
}
SPARQ_TUNER_AVX2 void prefix_errors8(const TunerPartials& p, int row, const int* seq, const int* first, int steps,
                                     const double* exact, double* err, double* scratch) {
  prefix_errors<8>(p, row, seq, first, steps, exact, err, scratch);
}
int width() {
  static const int w = !__builtin_cpu_supports("fma")        ? 4
                       : __builtin_cpu_supports("avx512f") ? 16
                       : __builtin_cpu_supports("avx2")    ? 8
                                                           : 4;
  return w;
}
#endif

}  // namespace

void combine_tuner_row(const TunerPartials& p, int row, double* out) {
#if SPARQ_TUNER_X86
  if (width() == 16) return combine_row16(p, row, out);
  if (width() == 8) return combine_row8(p, row, out);
#endif
  combine_row<4>(p, row, out);
}

void tuner_prefix_errors(const TunerPartials& p, int row, const int* seq, const int* first, int steps,
                         const double* exact, double* err) {
  std::vector<double> scratch(static_cast<std::size_t>(p.d));
#if SPARQ_TUNER_X86
  if (width() == 16) return prefix_errors16(p, row, seq, first, steps, exact, err, scratch.data());
  if (width() == 8) return prefix_errors8(p, row, seq, first, steps, exact, err, scratch.data());
#endif
  prefix_errors<4>(p, row, seq, first, steps, exact, err, scratch.data());
}

TunerKV::TunerKV(int nk_, int d_) : nk(nk_), d(d_), tiles((nk_ + kTunerTile - 1) / kTunerTile) {
  const std::size_t n = static_cast<std::size_t>(tiles) * kTunerTile * static_cast<std::size_t>(d);
  kt.reset(new float[n]);  // no zeroing pass: prepare_tuner_tiles writes every element
  v.reset(new float[n]);
}

void prepare_tuner_tiles(const float* k, const float* v, int t0, int t1, TunerKV& kv) {
  const std::size_t D = static_cast<std::size_t>(kv.d);
  for (int t = t0; t < t1; ++t) {
    const int j0 = t * kTunerTile, jn = std::min(kTunerTile, kv.nk - j0);
    float* kt = kv.kt.get() + static_cast<std::size_t>(t) * D * kTunerTile;
    for (std::size_t c = 0; c < D; ++c) {
      for (int j = 0; j < jn; ++j) kt[c * kTunerTile + static_cast<std::size_t>(j)] = k[static_cast<std::size_t>(j0 + j) * D + c];
      std::fill(kt + c * kTunerTile + static_cast<std::size_t>(jn), kt + (c + 1) * kTunerTile, 0.0f);
    }
    float* vt = kv.v.get() + static_cast<std::size_t>(j0) * D;
    std::copy(v + static_cast<std::size_t>(j0) * D, v + static_cast<std::size_t>(j0 + jn) * D, vt);
    std::fill(vt + static_cast<std::size_t>(jn) * D, vt + kTunerTile * D, 0.0f);
  }
}

void compute_tuner_partials(const float* q, int nq, const TunerKV& kv, float scale, bool causal, int r0, int rows,
                            const std::vector<int>& tiles, TunerPartials& out) {
  const std::size_t D = static_cast<std::size_t>(kv.d), T = tiles.size();
  out.rows = rows;
  out.tiles = static_cast<int>(T);
  out.d = kv.d;
  out.m.assign(static_cast<std::size_t>(rows) * T, kNegInf);
  out.l.assign(static_cast<std::size_t>(rows) * T, 0.0f);
  out.o.resize(static_cast<std::size_t>(rows) * T * D);  // every entry is written (no zeroing pass)
  const Job job{q + static_cast<std::size_t>(r0) * D, nq, kv.nk, kv.d, r0, rows, kv.kt.get(), kv.v.get(), scale,
                causal, tiles.data(), T, out.m.data(), out.l.data(), out.o.data()};
#if SPARQ_TUNER_X86
  if (width() == 16) return run16(job);
  if (width() == 8) return run8(job);
#endif
  run<4>(job);
}

}  // namespace sparq::sparge
