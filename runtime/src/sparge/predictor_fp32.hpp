// The fp32 arithmetic of the SpargeAttn stage-1 predictor (docs/SPARGE.md, "Exact arithmetic"). The host
// reference (predictor.cpp) and the GPU predictors (templates/glsl/sparge_*.comp.j2, backends/cuda/sparge_*)
// evaluate exactly these operations in exactly this order, so that their LUTs are equal bit for bit:
//   - every result of an add, sub or mul is flushed to a signed zero when it is subnormal (ftz), so that devices
//     that flush subnormals and devices that keep them agree;
//   - no division and no library sqrt or exp: 1/sqrt by Newton steps from an integer first guess, exp2 by a
//     polynomial and an exponent built from bits; reciprocals of token counts come from the host;
//   - sums in a fixed tree order (TreeSum) whatever the thread layout.
// Compiled without FMA contraction (see the pragmas below and runtime/src/sparge/meson.build).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__clang__)
#pragma clang fp contract(off)
#endif

namespace sparq::sparge::fp32 {

inline float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint32_t to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// Subnormal -> zero of the same sign (x * 0 keeps the sign; NaN and infinities pass through).
inline float ftz(float x) { return std::fabs(x) < from_bits(0x00800000u) ? x * 0.0f : x; }
inline float add(float a, float b) { return ftz(a + b); }
inline float sub(float a, float b) { return ftz(a - b); }
inline float mul(float a, float b) { return ftz(a * b); }

// 1/sqrt(x) for a positive normal finite x: first guess from the bits, three Newton steps
// y <- y·(1.5 − (0.5·((x·y)·y))). Within a few ulp of the true value; identical on every device.
inline float rsqrt(float x) {
  float y = from_bits(0x5f3759dfu - (to_bits(x) >> 1));
  for (int i = 0; i < 3; ++i) {
    const float t = mul(mul(x, y), y);
    y = mul(y, sub(1.5f, mul(0.5f, t)));
  }
  return y;
}

// Taylor coefficients ln(2)^k / k! of 2^f, as bits (decimal literals may round differently per compiler).
constexpr uint32_t kExp2Coeff[8] = {0x3f800000u, 0x3f317218u, 0x3e75fdf0u, 0x3d635847u,
                                    0x3c1d955bu, 0x3aaec3ffu, 0x39218489u, 0x377fe5feu};

// 2^x for x <= 0 (or -inf): 0 below -126; else 2^floor(x) (from bits) times a degree-7 polynomial of the
// fraction in [0, 1) (Horner). Relative error about 2e-6, enough for a prediction.
inline float exp2_neg(float x) {
  if (!(x >= -126.0f)) return 0.0f;
  const float n = std::floor(x);
  const float f = sub(x, n);
  float p = from_bits(kExp2Coeff[7]);
  for (int k = 6; k >= 0; --k) p = add(mul(p, f), from_bits(kExp2Coeff[k]));
  const int e = static_cast<int>(n);  // -126..0
  return mul(p, from_bits(static_cast<uint32_t>(e + 127) << 23));
}

// The sum of a stream of values as a balanced pairwise tree over `slots` leaves (a power of two): the values in
// order, then +0 in the remaining slots. Computed as a binary counter of partial sums (the value pushed k-th
// joins the pending partials of k's trailing one bits); a GPU may evaluate it with any layout that keeps aligned
// sub-trees together.
struct TreeSum {
  float level[32];
  uint32_t count = 0;
  void push(float v) {
    uint32_t c = count, k = 0;
    while (c & 1u) {
      v = add(level[k], v);
      c >>= 1;
      ++k;
    }
    level[k] = v;
    ++count;
  }
  // slots: a power of two >= the values pushed.
  float total(uint32_t slots) {
    while (count < slots) push(0.0f);
    uint32_t k = 0;
    while ((1u << k) < slots) ++k;
    return level[k];
  }
};

// The smallest power of two >= n (1 for n <= 1): the leaves of a tree sum over n values.
inline uint32_t tree_slots(int64_t n) {
  uint32_t s = 1;
  while (s < n) s <<= 1;
  return s;
}

// The greater of two values, the second on ties (NaN never reaches it).
inline float greater(float a, float b) { return a > b ? a : b; }

}  // namespace sparq::sparge::fp32
