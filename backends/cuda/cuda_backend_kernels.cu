// Arch-neutral preprocessing kernels of the CUDA backend (compiled for every path):
//   kv_stats      per (batch, kv head, token range): channel sums of K and channel maxima of |V|;
//   kv_finalize   per (batch, kv head): the K channel means and the V channel scales from those;
//   quantize_kv   per 64-token tile: K' = K − mean, INT8 per group; V / v_scale -> e4m3, transposed;
//   quantize_q    per 128-token tile: INT8 per group, scale·log2 e folded into the scale; q·mean(K) for LSE.
// Exact formulas: docs/NUMERICS.md. Thread layout of every pass: a token row is read by D/8 consecutive
// threads (8 channels each, one 16-byte load when aligned), 256 / (D/8) rows at a time.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "attention_kernel.cuh"  // permuted_key, kLog2E, Granularity, tile sizes
#include "exact_fp32.cuh"
#include "preprocess.hpp"

namespace sparq::cuda {
namespace {

constexpr int kThreads = 256;

template <bool Bf16>
__device__ __forceinline__ float to_float(uint16_t bits) {
  if constexpr (Bf16) return __uint_as_float(static_cast<uint32_t>(bits) << 16);
  else return __half2float(__ushort_as_half(bits));
}

// The stored row of a token: a fused token order (Gather) maps it. A separate instantiation, so that the kernels
// without an order keep their registers (and no spill).
template <bool Gather>
__device__ __forceinline__ int stored_row(const InputView& x, int token) {
  if constexpr (Gather) return token < x.rows_size ? __ldg(x.rows + token) : token;
  return token;
}

// ---- Quotients by a divisor shared by many values ---------------------------------------------------------------
//
// Every value is divided by its group's step or its channel's V scale, correctly rounded (docs/NUMERICS.md). An
// IEEE division per value (`x / d`) took about a dozen instructions and a slow-path branch each, most of both
// passes' instructions, and its slow path spilled when the passes were held to 64 registers. Here no division is
// left: with r = RN(1/d) once per divisor, Markstein's correction gives x / d in three operations,
// q0 = RN(x·r), e = q0·d − x (exact in one fma), q = RN(q0 − e·r).
// Checked against IEEE division (throwaway checks, not in the tree): on the host, every fp16 and every bf16
// dividend over every divisor amax/127 and amax/448 of an fp16 or bf16 amax in the range below, 2·10^9 quotients
// next to rounding midpoints over every divisor significand, 4·10^8 random fp32 pairs; on the H100, the fp16
// dividends again, and the whole INT8 and e4m3 paths of 4·10^9 values each over scales of every magnitude. For d
// in [2^-64, 2^64] the quotient is RN(x / d) bit for bit, except that a quotient below 2^-11 (then the residual
// can fall below the subnormal spacing) may differ in its last bits: it keeps its sign, and both round to 0 in
// INT8 (|q| < 0.5) and to ±0 in e4m3 (|q| < 2^-10). Other divisors are brought into that range by a power of two
// applied to both operands (Divisor::scale).
__device__ __forceinline__ bool fast_divisor(float d) { return d >= 0x1p-64f && d <= 0x1p64f; }

// RN(1/d) for d in [2^-64, 2^64]: the hardware approximation, a Newton step and Markstein's correction (checked
// on the device for every significand against 1.0f / d).
__device__ __forceinline__ float rcp_rn(float d) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(d));
  y = __fmaf_rn(y, __fmaf_rn(-d, y, 1.0f), y);
  return __fmaf_rn(y, __fmaf_rn(-d, y, 1.0f), y);
}

// The zero's sign matters to e4m3 (−0 is 0x80): with e = q0·d − x (not x − q0·d), x = ±0 gives e = +0 and
// q0 − (+0)·r keeps q0's sign. asm: no rewriting of the negations.
__device__ __forceinline__ float quotient(float x, float d, float r) {
  float q0, e, q;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(q0) : "f"(x), "f"(r));
  asm("fma.rn.f32 %0, %1, %2, %3;" : "=f"(e) : "f"(q0), "f"(d), "f"(-x));
  asm("fma.rn.f32 %0, %1, %2, %3;" : "=f"(q) : "f"(-e), "f"(r), "f"(q0));
  return q;
}

// A divisor v >= 0 (or +inf) for quotient(): x / v = quotient(x·scale, d, r). v beyond fast_divisor is scaled by
// 2^100 (v < 2^-64: exact, and so is x·2^100, |x| <= 448·v) or 2^-64 (v > 2^64: exact; x·2^-64 rounds only when
// |x| < 2^-62, where x / v < 2^-126 quantizes to a signed 0 either way). v = +inf: d = r = 0 give x·0 = x / inf
// (±0 for finite x, NaN for an infinite or NaN one). v = 0: scale 0 marks it for the callers (a zero V scale
// writes 0; a zero step of a nonzero amax, amax < 63.5·2^-149, quantizes x / 0 as ±127 / 1).
struct Divisor {
  float d, r, scale;
};
__device__ __forceinline__ Divisor divisor(float v) {
  if (fast_divisor(v)) return {v, rcp_rn(v), 1.0f};
  if (v == 0.0f) return {1.0f, 1.0f, 0.0f};
  if (isinf(v)) return {0.0f, 0.0f, 1.0f};
  const float scale = v < 0x1p-64f ? 0x1p100f : 0x1p-64f, d = v * scale;
  return {d, rcp_rn(d), scale};
}

// RN(a / 127) for a >= 0 or +inf (a group's step, a scale's factor), bit for bit as the IEEE division (checked on
// the device for every such a): quotient() where it is exact; below 2^-100 scaled by 2^100 while the result is
// normal, and below 2^-119 (a subnormal result) by integer division of a's multiples of 2^-149.
__device__ __forceinline__ float div127(float a) {
  constexpr float kRcp127 = 0x1.020408p-7f;  // RN(1/127)
  if (a >= 0x1p-100f) return a <= 0x1.fffffep127f ? quotient(a, 127.0f, kRcp127) : a;
  if (a >= 0x1p-119f) return quotient(a * 0x1p100f, 127.0f, kRcp127) * 0x1p-100f;
  const uint32_t n = __float2uint_rz(a * 0x1p100f * 0x1p49f);  // a / 2^-149 < 2^30, exact
  const uint32_t k = n / 127u;
  return __uint_as_float(k + (n - 127u * k > 63u ? 1u : 0u));  // 127 is odd: no ties
}

// The INT8 byte of a quotient q = x / step in the low byte of the result: clamp(rint(q), ±127) of the
// specification, the upper clamp at `high` (see quantize_int8x8). fmaxf first takes NaN to −127, as the clamp of
// rint(NaN) did; adding 1.5·2^23 rounds to an integer, ties to even, in the low mantissa bits.
__device__ __forceinline__ uint32_t int8_bits(float q, float high) {
  return __float_as_uint(__fadd_rn(fminf(fmaxf(q, -127.0f), high), 0x1.8p23f));
}

// The low bytes of four words as one word, in order.
__device__ __forceinline__ uint32_t pack_low_bytes(uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
  return __byte_perm(__byte_perm(a, b, 0x0040), __byte_perm(c, d, 0x0040), 0x5410);
}

// amax of nonnegative floats through their bit patterns (ordered like unsigned ints).
__device__ __forceinline__ void shared_max(unsigned* slot, float value) { atomicMax(slot, __float_as_uint(value)); }

// The max of m over the `lanes` consecutive threads of one token row (lanes = D/8, a power of two <= 32), in
// each of them. Only the row's lanes take part, so the rows of one warp may diverge. Reducing here first leaves
// one shared atomic per row instead of one per thread (per-block groups put every atomic of a CTA on one word).
__device__ __forceinline__ float row_lanes_max(float m, int lanes) {
  const unsigned lane = threadIdx.x % 32;
  const unsigned mask = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u) << (lane & ~(lanes - 1u));
  for (int off = 1; off < lanes; off *= 2) m = fmaxf(m, __shfl_xor_sync(mask, m, off));
  return m;
}

// The largest |x| of one token row: this thread's 8 channels, then the row's `lanes` threads.
__device__ __forceinline__ float row_abs_max(const float (&x)[8], int lanes) {
  float m = 0.0f;
#pragma unroll
  for (int i = 0; i < 8; ++i) m = fmaxf(m, fabsf(x[i]));
  return row_lanes_max(m, lanes);
}

// 8 channels as INT8 steps of their group (the divisor of its step amax / 127; all 0 for an all-zero group),
// packed for one 8-byte store. Scaled divisors (steps beyond 2^±64, or 0) first scale the values in place (x is
// not the input afterwards), in a branch uniform per group.
__device__ __forceinline__ uint2 quantize_int8x8(float (&x)[8], float amax, const Divisor& step) {
  if (amax == 0.0f) return make_uint2(0u, 0u);
  // With a normal step |x / step| <= 127.00002 (|x| <= amax, step = RN(amax / 127)), the upper clamp never binds;
  // a subnormal step (amax < 2^-119) has few bits and amax / step can pass 127.5: then the clamp is at 127.
  float high = 0x1p30f;
  if (step.scale != 1.0f) {
    // A zero step (d = r = 1): x / 0 is ±inf (±127), or NaN for x = ±0 or NaN (−127); ±127 / 1 quantizes so.
#pragma unroll
    for (int i = 0; i < 8; ++i) x[i] = step.scale == 0.0f ? (x[i] > 0.0f ? 127.0f : -127.0f) : x[i] * step.scale;
    high = 127.0f;
  }
  uint32_t b[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) b[i] = int8_bits(quotient(x[i], step.d, step.r), high);
  return make_uint2(pack_low_bytes(b[0], b[1], b[2], b[3]), pack_low_bytes(b[4], b[5], b[6], b[7]));
}

// Eight consecutive channels of one token row as they are stored (loaded before they are needed, so that a
// thread has all its rows' loads in flight at once), and as floats.
__device__ __forceinline__ uint4 load_stored_raw8(const InputView& x, int b, int h, int stored, int c) {
  const uint16_t* row = static_cast<const uint16_t*>(x.data) + b * x.stride_b + h * x.stride_h +
                        static_cast<int64_t>(stored) * x.stride_t + c;
  if (x.aligned16) return *reinterpret_cast<const uint4*>(row);
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) w[i] = static_cast<uint32_t>(row[2 * i]) | static_cast<uint32_t>(row[2 * i + 1]) << 16;
  return make_uint4(w[0], w[1], w[2], w[3]);
}

template <bool Gather>
__device__ __forceinline__ uint4 load_raw8(const InputView& x, int b, int h, int token, int c) {
  return load_stored_raw8(x, b, h, stored_row<Gather>(x, token), c);
}

template <bool Bf16>
__device__ __forceinline__ void unpack8(const uint4& v, float (&out)[8]) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = to_float<Bf16>(static_cast<uint16_t>(w[i] & 0xffffu));
    out[2 * i + 1] = to_float<Bf16>(static_cast<uint16_t>(w[i] >> 16));
  }
}

// ---- SpargeAttn stage 1, fused into the quantization passes (docs/SPARGE.md) ---------------------------------
//
// A pooling pass's thread holds kIters consecutive token rows of the tile, [lane_r·kIters, +kIters), 8 channels
// each, as loaded. In the exact arithmetic of exact_fp32.cuh it forms v = ftz(x) − km (K) or ftz(x) (Q), per token
// n² = the tree over channels of v·v (its 8 channels, then a butterfly over the row's lanes), 1/‖v‖, and per
// channel the trees over its tokens of v and v/‖v‖; the tile's rows then meet per 64-token chunk in shared memory.
// Each step is an aligned sub-tree of the specification's trees (the predictor combines the chunks per block).

// Tree sums over tokens [Lo, Lo + N) of this thread (an aligned power-of-two range) of v and v·inv, per channel
// (depth first: one value of v per token, and one partial per level, live at a time).
template <int Lo, int N, typename Values>
__device__ __forceinline__ void token_trees(const Values& values, float (&sum)[8], float (&unit)[8]) {
  if constexpr (N == 1) {
    values(Lo, sum, unit);
  } else {
    float s1[8], u1[8];
    token_trees<Lo, N / 2>(values, sum, unit);
    token_trees<Lo + N / 2, N / 2>(values, s1, u1);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      sum[i] = exact::fadd(sum[i], s1[i]);
      unit[i] = exact::fadd(unit[i], u1[i]);
    }
  }
}

// Pools one tile of Tile tokens (a multiple of 64) starting at token0 of a head with `tokens` tokens; `raw` are this
// thread's rows. `out_*` point at the head's chunk 0. `smem`: 2·kRows·D floats; `chunk_flags`: Tile/64 ints, zeroed
// before a barrier that precedes the call. Every thread of the CTA calls it (it has barriers).
template <bool Bf16, int D, int Tile, bool Smooth, int Iters>
__device__ __forceinline__ void pool_tile(const uint4 (&raw)[Iters], int token0, int tokens, const float (&km)[8],
                                          float* smem, int* chunk_flags, float* out_sum, float* out_unit,
                                          int* out_flags) {
  constexpr int kLanes = D / 8, kRows = kThreads / kLanes;
  static_assert(Iters * kRows == Tile && kPoolChunk % Iters == 0, "a thread's rows stay inside one chunk");
  constexpr int kRowsPerChunk = kPoolChunk / Iters, kChunks = Tile / kPoolChunk;
  const int lane_c = threadIdx.x % kLanes, lane_r = threadIdx.x / kLanes;
  const int row_lane0 = (threadIdx.x % 32) & ~(kLanes - 1);
  auto value = [&](int it, float (&v)[8]) {
    const bool present = token0 + lane_r * Iters + it < tokens;
    float x[8];
    unpack8<Bf16>(raw[it], x);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      // The flush on load is the identity for fp16 (never subnormal in fp32): Q skips it; K keeps it (without it
      // ptxas spilled the D256 K pass).
      v[i] = present ? (Bf16 || Smooth ? exact::ftz(x[i]) : x[i]) : 0.0f;  // padding rows are +0
      if (Smooth && present) v[i] = exact::fsub(v[i], km[i]);
    }
  };
  // n² of every row; lane `it` of a row takes 1/‖v‖ of its token it (kIters <= lanes), the others follow.
  float n2[Iters];
#pragma unroll
  for (int it = 0; it < Iters; ++it) {
    float v[8], sq[8];
    value(it, v);
#pragma unroll
    for (int i = 0; i < 8; ++i) sq[i] = exact::fmul_pool<Bf16>(v[i], v[i]);
    float t = exact::tree8(sq);
#pragma unroll
    for (int off = 1; off < kLanes; off *= 2) t = exact::fadd(t, __shfl_xor_sync(0xffffffffu, t, off));
    n2[it] = t;
  }
  static_assert(Iters <= kLanes, "one lane per token of a thread's rows");
  float mine = 0.0f;
#pragma unroll
  for (int it = 0; it < Iters; ++it)
    if (it == lane_c) mine = n2[it];
  float r_inv = 0.0f;  // zero rows, padding and non-finite rows (whose chunk is marked) add no direction
  if (lane_c < Iters) {
    int flags = 0;
    if (isinf(mine) || isnan(mine)) {
      flags = kPoolNonFinite;
    } else if (mine > 0.0f) {
      flags = kPoolNonZero;
      r_inv = exact::rsqrt_exact(mine);
    }
    if (flags) atomicOr(&chunk_flags[lane_r / kRowsPerChunk], flags);
  }
  float inv[Iters];
#pragma unroll
  for (int it = 0; it < Iters; ++it) inv[it] = __shfl_sync(0xffffffffu, r_inv, row_lane0 + it);

  float sum[8], unit[8];
  token_trees<0, Iters>(
      [&](int it, float (&v)[8], float (&u)[8]) {
        value(it, v);
#pragma unroll
        for (int i = 0; i < 8; ++i) u[i] = exact::fmul_pool<Bf16>(v[i], inv[it]);
      },
      sum, unit);
  float* part_s = smem;               // [kRows][D]
  float* part_u = smem + kRows * D;   // [kRows][D]
#pragma unroll
  for (int i = 0; i < 8; i += 4) {
    *reinterpret_cast<float4*>(part_s + lane_r * D + lane_c * 8 + i) = make_float4(sum[i], sum[i + 1], sum[i + 2], sum[i + 3]);
    *reinterpret_cast<float4*>(part_u + lane_r * D + lane_c * 8 + i) =
        make_float4(unit[i], unit[i + 1], unit[i + 2], unit[i + 3]);
  }
  __syncthreads();
  // Per (chunk, sum or unit, channel): the tree over the chunk's kRowsPerChunk thread sub-trees.
  const int chunk0 = token0 / kPoolChunk, chunks = (tokens + kPoolChunk - 1) / kPoolChunk;
  for (int task = threadIdx.x; task < kChunks * 2 * D; task += kThreads) {
    const int c = task % D, which = (task / D) % 2, chunk = task / (2 * D);
    if (chunk0 + chunk >= chunks) continue;
    const float* part = (which ? part_u : part_s) + chunk * kRowsPerChunk * D + c;
    float t[kRowsPerChunk];
#pragma unroll
    for (int r = 0; r < kRowsPerChunk; ++r) t[r] = part[r * D];
#pragma unroll
    for (int w = 1; w < kRowsPerChunk; w *= 2)
#pragma unroll
      for (int r = 0; r < kRowsPerChunk; r += 2 * w) t[r] = exact::fadd(t[r], t[r + w]);
    (which ? out_unit : out_sum)[static_cast<int64_t>(chunk0 + chunk) * D + c] = t[0];
  }
  if (threadIdx.x < kChunks && chunk0 + static_cast<int>(threadIdx.x) < chunks)
    out_flags[chunk0 + threadIdx.x] = chunk_flags[threadIdx.x];
}

// The transposed e4m3 V tile in shared memory, [D][kBlockK] bytes: a thread writes kIters consecutive key
// positions of each of its 8 channels as one store (a word at D128), 16-byte pieces of a channel row go out to the
// global tile. Row pairs and words are swizzled so that a warp's word stores at D128 (16 channel groups c = 8·lane_c
// + i, 2 words each) hit 32 different banks: channel c's row is c with bit 0 flipped by bit 3 (the parity of
// lane_c), its word w is w ^ 2·(bits 4..6 of c). The 16-byte pieces stay whole (their word pairs may swap).
__device__ __forceinline__ int vt_row(int c) { return c ^ ((c >> 3) & 1); }
__device__ __forceinline__ int vt_word_xor(int c) { return ((c >> 4) & 7) << 1; }
__device__ __forceinline__ int vt_offset(int c, int pos) {
  return vt_row(c) * kBlockK + (((pos >> 2) ^ vt_word_xor(c)) << 2) + (pos & 3);
}

// The key of permuted position pos (the inverse of the kernels' permuted_key within each 32-key chunk): positions
// 4q4 + 2hi + lo of a 16-key half hold keys 8hi + 2q4 + lo.
__device__ __forceinline__ int key_at_position(int pos) {
  const int w = pos % 32;
  return (pos / 32) * 32 + (w / 16) * 16 + ((w % 4) / 2) * 8 + ((w % 16) / 4) * 2 + w % 2;
}

// The tokens of each K/V statistics split: whole 64-token chunks (stage 1's raw K sums never straddle two); the
// last split may be shorter or empty.
__host__ __device__ inline int split_tokens(int tokens_k, int splits) {
  const int per_split = (tokens_k + splits - 1) / splits;
  return (per_split + kPoolChunk - 1) / kPoolChunk * kPoolChunk;
}

// Per (batch, kv head, split of whole 64-token chunks): channel sums of K and channel maxima of |V|. A step
// covers kStepTokens tokens; thread row lane_r holds kT consecutive ones, [lane_r·kT, +kT), all their loads
// issued first. Pool: also stage 1's raw K chunk sums (SpargePoolChunks::k_raw) in the exact arithmetic: the
// thread's tree over its kT tokens, then per chunk the tree over its threads' sub-trees through shared memory.
// The plain sums follow the same token order with and without it, so the kernel's K mean does not depend on
// whether the call predicts.
template <bool Bf16, int D, bool Gather, bool Pool>
__global__ void __launch_bounds__(kThreads) kv_stats_kernel(const PreprocessParams p) {
  extern __shared__ float stats_smem[];  // [rows][D] sums, then [rows][D] maxima
  constexpr int kLanes = D / 8, kRows = kThreads / kLanes;
  constexpr int kT = kRows * 4 >= kPoolChunk ? 4 : kPoolChunk / kRows;  // tokens per thread per step
  constexpr int kStepTokens = kT * kRows;                                // whole chunks
  constexpr int kRowsPerChunk = kPoolChunk / kT;
  __shared__ float part[Pool ? kRows * D : 1];
  const int bh = blockIdx.y, b = bh / p.heads_kv, h = bh % p.heads_kv;
  const int split = blockIdx.x;
  const int per_split = split_tokens(p.tokens_k, p.splits);
  const int begin = split * per_split, end = min(p.tokens_k, begin + per_split);
  const int lane_c = threadIdx.x % kLanes, lane_r = threadIdx.x / kLanes;
  const bool want_k = p.smooth_k || Pool;
  float sum[8] = {}, vmax[8] = {};
  const uint4 zero = make_uint4(0, 0, 0, 0);
  for (int step = begin; step < end; step += kStepTokens) {
    const int first = step + lane_r * kT;
    uint4 k_raw[kT], v_raw[kT];
#pragma unroll
    for (int u = 0; u < kT; ++u) {
      const bool in = first + u < end;
      k_raw[u] = want_k && in ? load_raw8<Gather>(p.k, b, h, first + u, lane_c * 8) : zero;
      v_raw[u] = p.fp8_v && in ? load_raw8<Gather>(p.v, b, h, first + u, lane_c * 8) : zero;
    }
#pragma unroll
    for (int u = 0; u < kT; ++u) {
      if (first + u >= end) continue;
      float x[8];
      if (p.smooth_k) {
        unpack8<Bf16>(k_raw[u], x);
#pragma unroll
        for (int i = 0; i < 8; ++i) sum[i] += x[i];
      }
      if (p.fp8_v) {
        unpack8<Bf16>(v_raw[u], x);
#pragma unroll
        for (int i = 0; i < 8; ++i) vmax[i] = fmaxf(vmax[i], fabsf(x[i]));
      }
    }
    if constexpr (Pool) {
      float t[kT][8];  // flushed K values; the tokens past the split are +0
#pragma unroll
      for (int u = 0; u < kT; ++u) {
        unpack8<Bf16>(k_raw[u], t[u]);
#pragma unroll
        for (int i = 0; i < 8; ++i) t[u][i] = exact::ftz(t[u][i]);
      }
#pragma unroll
      for (int w = 1; w < kT; w *= 2)
#pragma unroll
        for (int u = 0; u < kT; u += 2 * w)
#pragma unroll
          for (int i = 0; i < 8; ++i) t[u][i] = exact::fadd(t[u][i], t[u + w][i]);
#pragma unroll
      for (int i = 0; i < 8; i += 4)
        *reinterpret_cast<float4*>(part + lane_r * D + lane_c * 8 + i) =
            make_float4(t[0][i], t[0][i + 1], t[0][i + 2], t[0][i + 3]);
      __syncthreads();
      const int chunks = (p.tokens_k + kPoolChunk - 1) / kPoolChunk;
      for (int task = threadIdx.x; task < (kStepTokens / kPoolChunk) * D; task += kThreads) {
        const int c = task % D, in_step = task / D;
        const int chunk = step / kPoolChunk + in_step;
        float v[kRowsPerChunk];
#pragma unroll
        for (int r = 0; r < kRowsPerChunk; ++r) v[r] = part[(in_step * kRowsPerChunk + r) * D + c];
#pragma unroll
        for (int w = 1; w < kRowsPerChunk; w *= 2)
#pragma unroll
          for (int r = 0; r < kRowsPerChunk; r += 2 * w) v[r] = exact::fadd(v[r], v[r + w]);
        if (chunk * kPoolChunk < end)
          p.pool.k_raw[(static_cast<int64_t>(bh) * chunks + chunk) * D + c] = v[0];
      }
      __syncthreads();
    }
  }
  if (!p.smooth_k && !p.fp8_v) return;  // stage 1's raw K sums only (a prediction without attention)
  float* sums = stats_smem;
  float* maxs = stats_smem + kRows * D;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    sums[lane_r * D + lane_c * 8 + i] = sum[i];
    maxs[lane_r * D + lane_c * 8 + i] = vmax[i];
  }
  __syncthreads();
  for (int c = threadIdx.x; c < D; c += kThreads) {
    float s = 0.0f, m = 0.0f;
    for (int r = 0; r < kRows; ++r) {
      s += stats_smem[r * D + c];
      m = fmaxf(m, stats_smem[kRows * D + r * D + c]);
    }
    const int64_t at = (static_cast<int64_t>(bh) * p.splits + split) * D + c;
    p.partial_sum[at] = s;
    p.partial_vmax[at] = m;
  }
}

// Per (batch, kv head): the K channel means (the kv_stats partial sums in split order, then / Nk) and the V
// channel scales max|V| / 448, once, so that each quantization CTA reads D floats instead of every split; and
// with stage 1 (pool.k_raw) the prediction's K mean (docs/SPARGE.md): the tree over each key block's chunk slots,
// then over the blocks' slots, which is one balanced tree over (block, chunk slot) leaves in order, times 1/Nk.
__global__ void kv_finalize_kernel(const PreprocessParams p) {
  const int bh = blockIdx.x, D = p.head_dim;
  for (int c = threadIdx.x; c < D; c += blockDim.x) {
    const float* sums = p.partial_sum + static_cast<int64_t>(bh) * p.splits * D + c;
    const float* maxs = p.partial_vmax + static_cast<int64_t>(bh) * p.splits * D + c;
    if (p.smooth_k) {
      float s = 0.0f;
      for (int i = 0; i < p.splits; ++i) s += sums[static_cast<int64_t>(i) * D];
      p.k_mean[static_cast<int64_t>(bh) * D + c] = s / static_cast<float>(p.tokens_k);
    }
    if (p.fp8_v) {
      float m = 0.0f;
      for (int i = 0; i < p.splits; ++i) m = fmaxf(m, maxs[static_cast<int64_t>(i) * D]);
      p.v_scale[static_cast<int64_t>(bh) * D + c] = m / 448.0f;
    }
    if (p.pool.k_raw) {
      const SpargePoolChunks& q = p.pool;
      const int chunks = (p.tokens_k + kPoolChunk - 1) / kPoolChunk, per_block = q.block_k / kPoolChunk;
      int chunk_slots = 1;  // the block's token slots (the next power of two >= block_k, at least 64) / 64
      while (chunk_slots * kPoolChunk < q.block_k) chunk_slots *= 2;
      int block_slots = 1;
      while (block_slots < q.blocks_k) block_slots *= 2;
      const int leaves = chunk_slots * block_slots;
      const float* raw = q.k_raw + static_cast<int64_t>(bh) * chunks * D + c;
      auto leaf = [&](int i) {
        const int j = i / chunk_slots, slot = i % chunk_slots, chunk = j * per_block + slot;
        return j < q.blocks_k && slot < per_block && chunk < chunks ? raw[static_cast<int64_t>(chunk) * D] : 0.0f;
      };
      float total;
      if (leaves >= 8) {
        // aligned groups of 8 leaves are sub-trees: their loads go out together
        exact::TreeCounter<20> groups;
        for (int i = 0; i < leaves; i += 8) {
          float v[8];
#pragma unroll
          for (int r = 0; r < 8; ++r) v[r] = leaf(i + r);
          groups.push(exact::tree8(v));
        }
        total = groups.total(leaves / 8);
      } else {
        float v[8];
#pragma unroll
        for (int r = 0; r < 8; ++r) v[r] = r < leaves ? leaf(r) : 0.0f;
        total = leaves == 1 ? v[0] : leaves == 2 ? exact::fadd(v[0], v[1])
                                                 : exact::fadd(exact::fadd(v[0], v[1]), exact::fadd(v[2], v[3]));
      }
      q.km[static_cast<int64_t>(bh) * D + c] = exact::fmul(total, q.inv_tokens_k);
    }
  }
}

// Eight consecutive floats of a [.., D] array (16-byte aligned: D and the offset are multiples of 8).
__device__ __forceinline__ void load_floats8(const float* at, float (&out)[8]) {
  const float4 a = *reinterpret_cast<const float4*>(at), b = *reinterpret_cast<const float4*>(at + 4);
  out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w, out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
}

// The tile's rows are loaded once, all at the start (kIters 16-byte loads in flight per thread, for K and for
// V), and kept in registers for the group maxima and the quantization. A thread's K rows are consecutive tokens
// (the pooling's sub-trees, Pool); its V rows are the keys of kIters consecutive permuted positions (one store per
// channel into the transposed tile). Pool: stage 1's pooling of K − km (p.pool); with p.k8 null it only pools. The
// pass waits on its loads, so its instantiations are held to 64 registers (4 CTAs per SM) at D <= 128 and to 128
// (2 CTAs) at D256 (unbounded, the divisors of the D256 pass took 162; bf16 with pooling spilled at 128).
template <bool Bf16, int D, bool Pool>
constexpr int quantize_kv_ctas() {
  return D <= 128 ? 4 : Pool && Bf16 ? 1 : 2;
}

template <bool Bf16, int D, bool Gather, bool Pool>
__global__ void __launch_bounds__(kThreads, quantize_kv_ctas<Bf16, D, Pool>()) quantize_kv_kernel(const PreprocessParams p) {
  extern __shared__ __align__(16) uint8_t vt[];  // the transposed e4m3 V tile [D][kBlockK], swizzled (vt_offset)
  __shared__ unsigned amax_bits[8];
  constexpr int kLanes = D / 8, kRows = kThreads / kLanes, kIters = (kBlockK + kRows - 1) / kRows;
  static_assert(kIters * kRows == kBlockK && kIters <= 8, "a thread's V positions are within one 16-key half");
  __shared__ float pool_smem[Pool ? 2 * kRows * D : 1];
  __shared__ int chunk_flags[1];
  const int bh = blockIdx.y, b = bh / p.heads_kv, h = bh % p.heads_kv;
  const int tile = blockIdx.x, token0 = tile * kBlockK;
  const int lane_c = threadIdx.x % kLanes, lane_r = threadIdx.x / kLanes;
  const bool per_thread = p.granularity == static_cast<int>(Granularity::PerThread);
  const bool quantize = p.k8 != nullptr;
  auto k_row = [&](int it) { return lane_r * kIters + it; };
  auto v_row = [&](int it) { return key_at_position(lane_r * kIters + it); };
  auto present = [&](int r) { return r < kBlockK && token0 + r < p.tokens_k; };

  uint4 k_raw[kIters], v_raw[kIters];
#pragma unroll
  for (int it = 0; it < kIters; ++it)
    k_raw[it] = present(k_row(it)) ? load_raw8<Gather>(p.k, b, h, token0 + k_row(it), lane_c * 8) : make_uint4(0, 0, 0, 0);
  auto load_v = [&] {
#pragma unroll
    for (int it = 0; it < kIters; ++it)
      v_raw[it] = present(v_row(it)) ? load_raw8<Gather>(p.v, b, h, token0 + v_row(it), lane_c * 8) : make_uint4(0, 0, 0, 0);
  };
  // With pooling, V's rows are loaded after it (fewer registers live through it: 4 CTAs per SM, not 3).
  if (p.fp8_v && !Pool) load_v();
  float km[8] = {};
  if (p.smooth_k) load_floats8(p.k_mean + static_cast<int64_t>(bh) * D + lane_c * 8, km);
  if (threadIdx.x < 8) amax_bits[threadIdx.x] = 0u;
  if (Pool && threadIdx.x == 0) chunk_flags[0] = 0;
  __syncthreads();

  // K' = K − mean: group maxima, then quantize.
  auto smoothed = [&](int it, float (&x)[8]) {
    unpack8<Bf16>(k_raw[it], x);
#pragma unroll
    for (int i = 0; i < 8; ++i) x[i] -= km[i];
  };
  if (quantize) {
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      if (!present(k_row(it))) continue;  // the same for every lane of a row
      float x[8];
      smoothed(it, x);
      const float m = row_abs_max(x, kLanes);
      if (lane_c == 0) shared_max(&amax_bits[per_thread ? k_row(it) % 8 : 0], m);
    }
    __syncthreads();
    auto store_row = [&](int it, float amax, const Divisor& step) {
      const int r = k_row(it);
      if (!present(r)) return;
      float x[8];
      smoothed(it, x);
      *reinterpret_cast<uint2*>(p.k8 + (static_cast<int64_t>(bh) * p.tokens_k + token0 + r) * D + lane_c * 8) =
          quantize_int8x8(x, amax, step);
    };
    if (per_thread) {
#pragma unroll
      for (int it = 0; it < kIters; ++it) {
        const float amax = __uint_as_float(amax_bits[k_row(it) % 8]);
        store_row(it, amax, divisor(div127(amax)));
      }
    } else {
      const float amax = __uint_as_float(amax_bits[0]);
      const Divisor step = divisor(div127(amax));  // one per tile
#pragma unroll
      for (int it = 0; it < kIters; ++it) store_row(it, amax, step);
    }
    if (threadIdx.x < (per_thread ? 8 : 1)) {
      const int group = per_thread ? tile * 8 + threadIdx.x : tile;
      p.k_scale[static_cast<int64_t>(bh) * p.k_groups + group] = div127(__uint_as_float(amax_bits[threadIdx.x]));
    }
  }
  if constexpr (Pool) {
    float pkm[8];
    load_floats8(p.pool.km + static_cast<int64_t>(bh) * D + lane_c * 8, pkm);
    const int64_t at = static_cast<int64_t>(bh) * ((p.tokens_k + kPoolChunk - 1) / kPoolChunk);
    pool_tile<Bf16, D, kBlockK, true>(k_raw, token0, p.tokens_k, pkm, pool_smem, chunk_flags, p.pool.k_sum + at * D,
                                      p.pool.k_unit + at * D, p.pool.k_flags + at);
  }

  // V: e4m3 of v / v_scale, written transposed with keys permuted inside each 32-key chunk.
  if (!p.fp8_v) return;
  if (Pool) load_v();
  float vs[8];
  load_floats8(p.v_scale + static_cast<int64_t>(bh) * D + lane_c * 8, vs);
  // This thread's bytes of channel c: kIters consecutive positions from pos0, one store (kIters <= 8 bytes,
  // aligned, inside one swizzled word pair).
  const int pos0 = lane_r * kIters;
  auto store_bytes = [&](int c, const uint32_t (&w)[(kIters + 3) / 4]) {
    uint8_t* at = vt + vt_offset(c, pos0);
    if constexpr (kIters == 1) *at = static_cast<uint8_t>(w[0]);
    else if constexpr (kIters == 2) *reinterpret_cast<uint16_t*>(at) = static_cast<uint16_t>(w[0]);
    else if constexpr (kIters == 4) *reinterpret_cast<uint32_t*>(at) = w[0];
    else *reinterpret_cast<uint2*>(at) = make_uint2(w[0], w[1]);
  };
  auto v_value = [&](int it, int i) {
    const uint32_t word = i / 2 == 0 ? v_raw[it].x : i / 2 == 1 ? v_raw[it].y : i / 2 == 2 ? v_raw[it].z : v_raw[it].w;
    return to_float<Bf16>(static_cast<uint16_t>(i % 2 ? word >> 16 : word & 0xffffu));
  };
  // Per channel: quotient()'s d and r (a zero scale's bytes are 0 whatever they give), and whether any channel's scale
  // is beyond fast_divisor (then x is scaled first: divisor(), uniform per thread).
  float vd[8], vr[8];
  bool scaled = false;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const Divisor s = divisor(vs[i]);
    vd[i] = s.d, vr[i] = s.r;
    scaled = scaled || (s.scale != 1.0f && vs[i] != 0.0f);
  }
  // The tail's missing keys were loaded as +0: their quotients are +0, e4m3 0x00, as written for them before.
  auto store_channels = [&](auto scale_of) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      uint32_t w[(kIters + 3) / 4] = {};
#pragma unroll
      for (int it = 0; it < kIters; it += 2) {
        const float lo = quotient(v_value(it, i) * scale_of(i), vd[i], vr[i]);
        const float hi = kIters > 1 ? quotient(v_value(it + 1, i) * scale_of(i), vd[i], vr[i]) : 0.0f;
        const uint32_t pair = __nv_cvt_float2_to_fp8x2(make_float2(lo, hi), __NV_SATFINITE, __NV_E4M3);
        w[it / 4] |= pair << (8 * (it % 4));
      }
#pragma unroll
      for (int k = 0; k < (kIters + 3) / 4; ++k) w[k] = vs[i] > 0.0f ? w[k] : 0u;
      store_bytes(lane_c * 8 + i, w);
    }
  };
  if (!scaled) store_channels([](int) { return 1.0f; });
  else store_channels([&](int i) { return divisor(vs[i]).scale; });
  __syncthreads();
  // 16-byte pieces of the channel rows; a piece whose word pairs the swizzle swapped is put back in order.
  for (int i = threadIdx.x; i < D * (kBlockK / 16); i += kThreads) {
    const int c = i / (kBlockK / 16), piece = i % (kBlockK / 16), x = vt_word_xor(c);
    const uint4 s = *reinterpret_cast<const uint4*>(vt + vt_row(c) * kBlockK + ((piece ^ (x >> 2)) << 4));
    *reinterpret_cast<uint4*>(p.v8t + (static_cast<int64_t>(bh) * D + c) * p.vt_stride + token0 + piece * 16) =
        x & 2 ? make_uint4(s.z, s.w, s.x, s.y) : s;
  }
}

// CTAs per SM that quantize_q must fit. When it pools, as quantize_kv: 2 CTAs (fp16 at D128 takes 91 registers
// unbounded) left the memory idle; 3 fit without spilling (bf16 and D256 would spill). Without pooling 4 at
// D <= 128 (64 registers) and 2 at D256: with no division left there is no slow path to spill (it did before).
template <bool Bf16, int D, bool Pool>
constexpr int quantize_q_ctas() {
  return Pool ? (!Bf16 && D <= 128 ? 3 : 1) : (D <= 128 ? 4 : 2);
}

// As quantize_kv: the tile's rows loaded once, at the start, and kept in registers; a thread's rows are
// consecutive tokens. Pool: stage 1's pooling of Q (p.pool); with p.q8 null it only pools.
template <bool Bf16, int D, bool Gather, bool Pool>
__global__ void __launch_bounds__(kThreads, quantize_q_ctas<Bf16, D, Pool>()) quantize_q_kernel(const PreprocessParams p) {
  __shared__ unsigned amax_bits[64];
  constexpr int kTile = kBlockQ;
  constexpr int kLanes = D / 8, kRows = kThreads / kLanes, kIters = (kTile + kRows - 1) / kRows;
  __shared__ float pool_smem[Pool ? 2 * kRows * D : 1];
  __shared__ int chunk_flags[kTile / kPoolChunk];
  const int bh = blockIdx.y, b = bh / p.heads_q, h = bh % p.heads_q;
  const int kv_bh = b * p.heads_kv + h / (p.heads_q / p.heads_kv);
  const int tile = blockIdx.x, token0 = tile * kTile;
  const int lane_c = threadIdx.x % kLanes, lane_r = threadIdx.x / kLanes;
  const bool quantize = p.q8 != nullptr;
  auto row = [&](int it) { return lane_r * kIters + it; };
  auto valid = [&](int it) { return row(it) < kTile && token0 + row(it) < p.tokens_q; };
  auto local_group = [&](int r) {
    if (p.granularity == static_cast<int>(Granularity::PerBlock)) return 0;
    if (p.granularity == static_cast<int>(Granularity::PerWarp)) return r / 16;
    return (r / 16) * 8 + r % 8;
  };

  // A fused order's rows of the tile go through shared memory first: with the index loads in registers the
  // compiler's division slowpath spilled.
  __shared__ int stored_rows[Gather ? kTile : 1];
  if constexpr (Gather) {
    for (int r = threadIdx.x; r < kTile; r += kThreads)
      stored_rows[r] = token0 + r < p.tokens_q ? stored_row<true>(p.q, token0 + r) : 0;
    __syncthreads();
  }
  uint4 raw[kIters];
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int r = row(it);
    raw[it] = valid(it) ? load_stored_raw8(p.q, b, h, Gather ? stored_rows[r] : token0 + r, lane_c * 8)
                        : make_uint4(0, 0, 0, 0);
  }
  float km[8] = {};
  if (p.want_q_km) load_floats8(p.k_mean + static_cast<int64_t>(kv_bh) * D + lane_c * 8, km);
  if (threadIdx.x < 64) amax_bits[threadIdx.x] = 0u;
  if (Pool && threadIdx.x < kTile / kPoolChunk) chunk_flags[threadIdx.x] = 0;
  __syncthreads();

  if (quantize) {
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      if (!valid(it)) continue;  // the same for every lane of a row
      float x[8];
      unpack8<Bf16>(raw[it], x);
      const float m = row_abs_max(x, kLanes);
      if (lane_c == 0) shared_max(&amax_bits[local_group(row(it))], m);
    }
    __syncthreads();
    auto store_row = [&](int it, float amax, const Divisor& step) {
      const int r = row(it);
      const int token = token0 + r;
      const bool active = valid(it);
      float dot = 0.0f;
      if (active) {
        float x[8];
        unpack8<Bf16>(raw[it], x);
        if (p.want_q_km) {  // before the quantization, which may scale x in place
#pragma unroll
          for (int i = 0; i < 8; ++i) dot += x[i] * km[i];
        }
        *reinterpret_cast<uint2*>(p.q8 + (static_cast<int64_t>(bh) * p.tokens_q + token) * D + lane_c * 8) =
            quantize_int8x8(x, amax, step);
      }
      if (p.want_q_km) {
        // lanes of one row are consecutive and aligned to a power of two (kLanes = D/8 <= 32)
        for (int off = 1; off < kLanes; off *= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
        if (active && lane_c == 0) p.q_km[static_cast<int64_t>(bh) * p.tokens_q + token] = p.scale * dot;
      }
    };
    // A thread's rows (kIters <= 16 consecutive, aligned) share one group unless per thread.
    static_assert(kIters <= 16 && 16 % kIters == 0, "a thread's rows inside one 16-row group");
    if (p.granularity == static_cast<int>(Granularity::PerThread)) {
#pragma unroll
      for (int it = 0; it < kIters; ++it) {
        const float amax = __uint_as_float(amax_bits[local_group(row(it))]);
        store_row(it, amax, divisor(div127(amax)));
      }
    } else {
      const float amax = __uint_as_float(amax_bits[local_group(row(0))]);
      const Divisor step = divisor(div127(amax));
#pragma unroll
      for (int it = 0; it < kIters; ++it) store_row(it, amax, step);
    }
    const int groups_here = p.granularity == static_cast<int>(Granularity::PerBlock) ? 1
                            : p.granularity == static_cast<int>(Granularity::PerWarp) ? 8 : 64;
    if (threadIdx.x < groups_here) {
      const int group = tile * groups_here + threadIdx.x;
      if (group < p.q_groups) {
        const float step = div127(__uint_as_float(amax_bits[threadIdx.x]));
        p.q_scale[static_cast<int64_t>(bh) * p.q_groups + group] = step * p.scale * kLog2E;
      }
    }
  }
  if constexpr (Pool) {
    const float no_mean[8] = {};
    const int64_t at = static_cast<int64_t>(bh) * ((p.tokens_q + kPoolChunk - 1) / kPoolChunk);
    pool_tile<Bf16, D, kTile, false>(raw, token0, p.tokens_q, no_mean, pool_smem, chunk_flags, p.pool.q_sum + at * D,
                                     p.pool.q_unit + at * D, p.pool.q_flags + at);
  }
}

template <bool Bf16, int D, bool Gather, bool Pool>
cudaError_t launch_all(const PreprocessParams& p, cudaStream_t stream, cudaStream_t q_stream) {
  constexpr int rows = kThreads / (D / 8);
  if (p.smooth_k || p.fp8_v || Pool) {
    const dim3 grid(p.splits, p.batch * p.heads_kv);
    kv_stats_kernel<Bf16, D, Gather, Pool><<<grid, kThreads, 2 * rows * D * sizeof(float), stream>>>(p);
    if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
    kv_finalize_kernel<<<p.batch * p.heads_kv, std::min(D, kThreads), 0, stream>>>(p);
    if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  }
  {
    const dim3 grid((p.tokens_k + kBlockK - 1) / kBlockK, p.batch * p.heads_kv);
    const size_t smem = p.fp8_v ? D * kBlockK : 0;
    quantize_kv_kernel<Bf16, D, Gather, Pool><<<grid, kThreads, smem, stream>>>(p);
    if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  }
  {
    const dim3 grid((p.tokens_q + kBlockQ - 1) / kBlockQ, p.batch * p.heads_q);
    quantize_q_kernel<Bf16, D, Gather, Pool><<<grid, kThreads, 0, q_stream>>>(p);
    if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

// Stage 1's pooling (p.pool.k_raw set) is built for the predictor's head dims 64, 128 and 256.
template <bool Bf16, bool Gather>
cudaError_t launch_for_dim(const PreprocessParams& p, cudaStream_t stream, cudaStream_t q) {
  const bool pool = p.pool.k_raw != nullptr;
  switch (p.head_dim) {
    case 32: return pool ? cudaErrorInvalidValue : launch_all<Bf16, 32, Gather, false>(p, stream, q);
    case 64: return pool ? launch_all<Bf16, 64, Gather, true>(p, stream, q) : launch_all<Bf16, 64, Gather, false>(p, stream, q);
    case 128: return pool ? launch_all<Bf16, 128, Gather, true>(p, stream, q) : launch_all<Bf16, 128, Gather, false>(p, stream, q);
    case 256: return pool ? launch_all<Bf16, 256, Gather, true>(p, stream, q) : launch_all<Bf16, 256, Gather, false>(p, stream, q);
    default: return cudaErrorInvalidValue;  // the runtime only builds power-of-two head dims 32..256
  }
}

template <bool Bf16>
cudaError_t launch_preprocess_typed(const PreprocessParams& p, cudaStream_t stream, cudaStream_t q_stream) {
  const bool gather = p.q.rows != nullptr || p.k.rows != nullptr || p.v.rows != nullptr;
  return gather ? launch_for_dim<Bf16, true>(p, stream, q_stream) : launch_for_dim<Bf16, false>(p, stream, q_stream);
}

}  // namespace

int q_scale_groups(int tokens_q, int granularity) {
  const int per16 = (tokens_q + 15) / 16;
  if (granularity == static_cast<int>(Granularity::PerBlock)) return (tokens_q + 127) / 128;
  if (granularity == static_cast<int>(Granularity::PerWarp)) return per16;
  return per16 * 8;
}

int k_scale_groups(int tokens_k, int granularity) {
  const int per64 = (tokens_k + 63) / 64;
  return granularity == static_cast<int>(Granularity::PerThread) ? per64 * 8 : per64;
}

int stats_splits(int tokens_k) {
  // A function of the sequence alone: the K mean's summation order, hence every result of a head, must not
  // depend on the batch size or the head count (a head gives the same bits alone or in a batch; test_cuda).
  // 1024 keys per split give B·Hkv·Nk/1024 CTAs: thousands at the sizes where the pass takes time.
  return std::max(1, std::min(64, (tokens_k + 1023) / 1024));
}

namespace {
// One warp per mask row: 32 bytes per step, set blocks compacted by ballot and popcount.
__global__ void __launch_bounds__(kThreads) bitmap_to_lut_kernel(const uint8_t* bits, int64_t rows, int blocks_k,
                                                                 int32_t* counts, int32_t* indices) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;  // whole warps
  const uint8_t* in = bits + row * blocks_k;
  int32_t* out = indices + row * blocks_k;
  int count = 0;
  for (int base = 0; base < blocks_k; base += 32) {
    const int i = base + lane;
    const bool set = i < blocks_k && in[i] != 0;
    const unsigned found = __ballot_sync(0xffffffffu, set);
    if (set) out[count + __popc(found & ((1u << lane) - 1u))] = i;
    count += __popc(found);
  }
  if (lane == 0) counts[row] = count;
}
}  // namespace

int launch_bitmap_to_lut(const uint8_t* bits, int64_t rows, int blocks_k, int32_t* counts, int32_t* indices,
                         void* stream) {
  if (rows <= 0) return 0;
  const int64_t blocks = (rows * 32 + kThreads - 1) / kThreads;
  bitmap_to_lut_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      bits, rows, blocks_k, counts, indices);
  return static_cast<int>(cudaGetLastError());
}

int launch_preprocess(const PreprocessParams& params, void* stream, void* q_stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const cudaStream_t q = q_stream != nullptr ? static_cast<cudaStream_t>(q_stream) : s;
  if (q != s && (params.want_q_km || params.pool.k_raw != nullptr)) return static_cast<int>(cudaErrorInvalidValue);
  return static_cast<int>(params.in_bf16 ? launch_preprocess_typed<true>(params, s, q)
                                         : launch_preprocess_typed<false>(params, s, q));
}

}  // namespace sparq::cuda
