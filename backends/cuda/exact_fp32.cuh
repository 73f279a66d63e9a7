// The exact fp32 arithmetic of SpargeAttn stage 1 (docs/SPARGE.md, "Exact arithmetic"), shared by the predictor
// (sparge_predictor.cu) and the quantization passes that pool Q and K for it (cuda_backend_kernels.cu): every
// add/sub/mul rounds to nearest, is never contracted, and its result is flushed to a signed zero when subnormal;
// 1/sqrt by Newton steps from bits; tree sums over power-of-two slots.
#pragma once

#include <cuda_runtime.h>

namespace sparq::cuda::exact {

__device__ __forceinline__ float ftz(float x) {
  const unsigned u = __float_as_uint(x);
  return (u & 0x7F800000u) == 0u ? __uint_as_float(u & 0x80000000u) : x;
}
// add/sub with .ftz: inputs are never subnormal here (every value is flushed), and a sum or difference of two
// normal floats that is below 2^-126 is exact, so flushing the result in hardware equals ftz(round(a ± b)).
// (mul keeps the explicit ftz: a product can round up to the smallest normal, where hardware and ftz() could
// disagree.)
__device__ __forceinline__ float fadd(float a, float b) {
  float r;
  asm("add.rn.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float fsub(float a, float b) {
  float r;
  asm("sub.rn.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float fmul(float a, float b) { return ftz(__fmul_rn(a, b)); }
// The products of the pooling loop, v·v and v·(1/‖row‖), where the flush never applies to fp16 inputs, so one
// FMUL is the exact operation: fp16 values are multiples of 2^-24, so are their tree sums, so a K mean is 0 or
// at least 2^-24/2^31 = 2^-55; a difference k − mean is then 0, or at least the fp32 spacing near k (>= 2^-48),
// or |mean| (k = 0); so every nonzero v has |v| >= 2^-55, v·v >= 2^-110, and v/‖row‖ >= 2^-55/2^21 (‖row‖ of
// fp16 values <= 2^21) — all normal. bf16 reaches 2^-133, so it keeps the flush.
template <bool Bf16>
__device__ __forceinline__ float fmul_pool(float a, float b) {
  if constexpr (Bf16) return fmul(a, b);
  else return __fmul_rn(a, b);
}

__device__ __forceinline__ float rsqrt_exact(float x) {
  float y = __uint_as_float(0x5f3759dfu - (__float_as_uint(x) >> 1));
#pragma unroll
  for (int i = 0; i < 3; ++i) {
    const float t = fmul(fmul(x, y), y);
    y = fmul(y, fsub(1.5f, fmul(0.5f, t)));
  }
  return y;
}

// TreeSum over D channels held by a warp: lane l owns channels [l·cpl, (l+1)·cpl) in v[0..cpl) (cpl = D/32, a
// power of two); the balanced sub-tree of each lane, then the butterfly (all lanes end with the total).
template <int Cpl>
__device__ __forceinline__ float warp_tree(float (&v)[Cpl]) {
#pragma unroll
  for (int w = 1; w < Cpl; w *= 2)
#pragma unroll
    for (int i = 0; i < Cpl; i += 2 * w) v[i] = fadd(v[i], v[i + w]);
  float s = v[0];
#pragma unroll
  for (int off = 1; off < 32; off *= 2) s = fadd(s, __shfl_xor_sync(0xffffffffu, s, off));
  return s;
}

// A balanced tree over the 8 values of v (the sub-tree of 8 aligned leaves).
__device__ __forceinline__ float tree8(const float (&v)[8]) {
  return fadd(fadd(fadd(v[0], v[1]), fadd(v[2], v[3])), fadd(fadd(v[4], v[5]), fadd(v[6], v[7])));
}

// A tree counter of one channel: sub-tree totals pushed in order; after a power of two of pushes the total is the
// balanced tree of them (up to 2^(Levels-1) pushes). Levels stay in registers (indices unrolled).
template <int Levels>
struct TreeCounter {
  float level[Levels];
  int count = 0;
  __device__ __forceinline__ void push(float v) {
    bool placed = false;
#pragma unroll
    for (int k = 0; k < Levels; ++k) {
      if (placed) continue;
      if ((count >> k) & 1) {
        v = fadd(level[k], v);
      } else {
        level[k] = v;
        placed = true;
      }
    }
    ++count;
  }
  // After `slots` (a power of two) pushes.
  __device__ __forceinline__ float total(int slots) const {
    float r = 0.0f;
#pragma unroll
    for (int k = 0; k < Levels; ++k)
      if ((1 << k) == slots) r = level[k];
    return r;
  }
};

}  // namespace sparq::cuda::exact
