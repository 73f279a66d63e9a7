// CUDA SpargeAttn stage 1 (docs/SPARGE.md) in the exact fp32 arithmetic of runtime/src/sparge/predictor_fp32.hpp:
// every add/sub/mul rounds to nearest, is never contracted, and its result is flushed to a signed zero when
// subnormal; no division or library sqrt/exp; tree sums over power-of-two slots. Kernels:
//   pool     per (block, head, batch): raw K block sums, or block means and self-similarities of Q / smoothed K;
//   kmean    per (batch, kv head, channel): the prediction's K mean;
//   select   per 4 query blocks of a (query head, batch): logits, masses, rank by counting, τ / top-k, LUT rows;
//   permute  per (16-byte piece or element of a row, head, batch): the Hilbert permutation.
// Channel sums: a lane's balanced sub-tree of consecutive channels, then a butterfly over lanes; token sums: a
// thread's sub-tree of 8 consecutive tokens, then 8-token groups through shared memory, then 64-token chunks
// through a counter in registers. Each is the tree of the specification because aligned sub-trees stay together.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "sparge_predictor.hpp"

namespace sparq::cuda {
namespace {

constexpr int kChunk = 64;           // tokens per pool step
constexpr int kChunkLevels = 10;     // chunk counter levels: blocks up to 1023 chunks
constexpr int kSelectThreads = 256;

// ---- exact fp32 ------------------------------------------------------------------------------------------

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

__device__ __forceinline__ float exp2_neg(float x) {
  if (!(x >= -126.0f)) return 0.0f;
  const float n = floorf(x);
  const float f = fsub(x, n);
  constexpr unsigned kCoeff[8] = {0x3f800000u, 0x3f317218u, 0x3e75fdf0u, 0x3d635847u,
                                  0x3c1d955bu, 0x3aaec3ffu, 0x39218489u, 0x377fe5feu};
  float p = __uint_as_float(kCoeff[7]);
#pragma unroll
  for (int k = 6; k >= 0; --k) p = fadd(fmul(p, f), __uint_as_float(kCoeff[k]));
  const int e = static_cast<int>(n);
  return fmul(p, __uint_as_float(static_cast<unsigned>(e + 127) << 23));
}

template <bool Bf16>
__device__ __forceinline__ float load16(const uint16_t* p) {
  const uint16_t bits = *p;
  if constexpr (Bf16) return __uint_as_float(static_cast<uint32_t>(bits) << 16);
  else return __half2float(__ushort_as_half(bits));
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

// Chunk-level tree counter of one channel: chunk totals (64-token sub-trees) pushed in order; after a power of
// two of pushes the total is the balanced tree of them. Levels stay in registers (indices unrolled).
struct ChunkCounter {
  float level[kChunkLevels];
  int count = 0;
  __device__ __forceinline__ void push(float v) {
    bool placed = false;
#pragma unroll
    for (int k = 0; k < kChunkLevels; ++k) {
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
    for (int k = 0; k < kChunkLevels; ++k)
      if ((1 << k) == slots) r = level[k];
    return r;
  }
};

struct PoolArgs {
  SpargePredictParams p;
  float *ksum, *km, *kmean, *ksim, *qmean, *qsim;
  int which;  // 0: raw K sums, 1: smoothed K, 2: Q
};

// One block of tokens per CTA of D = 8·G threads: thread (tg, cg) holds, per chunk of 64 token slots, the 8 tokens
// [8·tg, 8·tg + 8) x the 8 channels [8·cg, 8·cg + 8) in registers (one 16-byte load per token when aligned).
// Token norms: a sub-tree over its 8 channels, then a butterfly over the G threads of the row group; sums over
// tokens: a sub-tree over its 8 tokens, then the 8 token groups combined per channel through shared memory, and
// the chunks through a ChunkCounter. Missing token slots (past the sequence, or padding to a power of two) are +0.
// 4 CTAs of 128 threads per SM at D128 (128 registers, no spill): at 168 registers only 3 fit, too few loads in
// flight. (A raw-sum-only instantiation with fewer registers spilled its chunk counters.)
template <bool Bf16, int G, bool Gather>
__global__ void __launch_bounds__(8 * G, 384 / (8 * G)) pool_kernel(const PoolArgs a) {
  constexpr int D = 8 * G;
  __shared__ float part_s[8][D];  // per token group: 8-token sub-tree of every channel
  __shared__ float part_u[8][D];
  __shared__ float usq[D];
  __shared__ int all_finite, nonzero;
  const SpargePredictParams& p = a.p;
  const int tid = threadIdx.x, tg = tid / G, cg = tid % G, lane = tid % 32;
  const int group_lane0 = lane & ~(G - 1);  // the row group's first lane in the warp (G <= 32)
  const int blk = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const bool is_q = a.which == 2, raw = a.which == 0, smoothed = a.which == 1;
  const int N = is_q ? p.tokens_q : p.tokens_k;
  const int block = is_q ? p.block_q : p.block_k;
  const int nblocks = is_q ? p.blocks_q : p.blocks_k;
  const int H = is_q ? p.heads_q : p.heads_kv;
  const SpargeView& x = is_q ? p.q : p.k;
  const uint16_t* base = static_cast<const uint16_t*>(x.data) + b * x.stride_b + h * x.stride_h;
  const bool vec = reinterpret_cast<std::uintptr_t>(base) % 16 == 0 && x.stride_t % 8 == 0;
  const int t0 = blk * block, t1 = min(N, t0 + block);
  int slots = kChunk;  // token slots of the block's tree: the next power of two >= block
  while (slots < block) slots *= 2;
  float km[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) km[i] = smoothed ? a.km[(static_cast<int64_t>(b) * p.heads_kv + h) * D + cg * 8 + i] : 0.0f;
  if (tid == 0) {
    all_finite = 1;
    nonzero = 0;
  }
  ChunkCounter sum, unit;
  for (int c0 = t0; c0 < t0 + slots; c0 += kChunk) {
    if (c0 >= t1) {  // a chunk of padding: its sub-trees are +0
      sum.push(0.0f);
      unit.push(0.0f);
      continue;
    }
    float v[8][8];  // [token][channel]
    // The 8 rows' 16-byte loads are all issued before any is used (predicated, not branched), so each thread
    // has 128 bytes in flight.
    uint4 raw8[8];
    if (vec) {
#pragma unroll
      for (int r = 0; r < 8; ++r) {
        const int t = c0 + tg * 8 + r;
        const int tt = t < t1 ? t : t0;
        const int stored = Gather && tt < x.rows_size ? __ldg(x.rows + tt) : tt;
        const uint16_t* row = base + static_cast<int64_t>(stored) * x.stride_t + cg * 8;
        raw8[r] = __ldg(reinterpret_cast<const uint4*>(row));
        if (t >= t1) raw8[r] = make_uint4(0u, 0u, 0u, 0u);
      }
    }
#pragma unroll
    for (int r = 0; r < 8; ++r) {
      const int t = c0 + tg * 8 + r;
      if (vec) {
        const uint32_t w[4] = {raw8[r].x, raw8[r].y, raw8[r].z, raw8[r].w};
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const uint16_t bits = static_cast<uint16_t>(i % 2 ? w[i / 2] >> 16 : w[i / 2] & 0xffffu);
          v[r][i] = ftz(load16<Bf16>(&bits));
        }
      } else {
        const int stored = Gather && t < x.rows_size ? __ldg(x.rows + t) : t;
        const uint16_t* row = base + static_cast<int64_t>(stored) * x.stride_t + cg * 8;
#pragma unroll
        for (int i = 0; i < 8; ++i) v[r][i] = t < t1 ? ftz(load16<Bf16>(row + i)) : 0.0f;
      }
      if (smoothed && t < t1) {
#pragma unroll
        for (int i = 0; i < 8; ++i) v[r][i] = fsub(v[r][i], km[i]);
      }
    }
    float inv[8];
    if (!raw) {
      float n2[8];
#pragma unroll
      for (int r = 0; r < 8; ++r) {
        float sq[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) sq[i] = fmul_pool<Bf16>(v[r][i], v[r][i]);
        float s = tree8(sq);
#pragma unroll
        for (int off = 1; off < G; off *= 2) s = fadd(s, __shfl_xor_sync(0xffffffffu, s, off));
        n2[r] = s;
      }
      // thread cg < 8 of the row group takes token cg; the others follow through shuffles
      float mine = 0.0f;
#pragma unroll
      for (int r = 0; r < 8; ++r)
        if (r == cg) mine = n2[r];
      float r_inv = 0.0f;  // zero rows, padding and non-finite rows (whose block is marked) add no direction
      if (cg < 8) {
        if (isinf(mine) || isnan(mine)) {
          all_finite = 0;
        } else if (mine > 0.0f) {
          atomicAdd(&nonzero, 1);
          r_inv = rsqrt_exact(mine);
        }
      }
#pragma unroll
      for (int r = 0; r < 8; ++r) inv[r] = __shfl_sync(0xffffffffu, r_inv, group_lane0 + r);
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      float col[8];
#pragma unroll
      for (int r = 0; r < 8; ++r) col[r] = v[r][i];
      part_s[tg][cg * 8 + i] = tree8(col);
      if (!raw) {
#pragma unroll
        for (int r = 0; r < 8; ++r) col[r] = fmul_pool<Bf16>(v[r][i], inv[r]);
        part_u[tg][cg * 8 + i] = tree8(col);
      }
    }
    __syncthreads();
    {
      const int c = tid;  // one channel per thread
      float col[8];
#pragma unroll
      for (int r = 0; r < 8; ++r) col[r] = part_s[r][c];
      sum.push(tree8(col));
      if (!raw) {
#pragma unroll
        for (int r = 0; r < 8; ++r) col[r] = part_u[r][c];
        unit.push(tree8(col));
      }
    }
    __syncthreads();
  }
  const int c = tid;
  const int64_t out = (static_cast<int64_t>(b) * H + h) * nblocks + blk;
  const int chunk_slots = slots / kChunk;
  const float s = sum.total(chunk_slots);
  if (raw) {
    a.ksum[out * D + c] = s;
    return;
  }
  const float inv_m = blk + 1 == nblocks ? (is_q ? p.inv_tail_q : p.inv_tail_k) : (is_q ? p.inv_block_q : p.inv_block_k);
  (is_q ? a.qmean : a.kmean)[out * D + c] = fmul(s, inv_m);
  const float u = unit.total(chunk_slots);
  usq[c] = fmul(u, u);
  __syncthreads();
  if (tid < 32) {
    constexpr int Cpl = D / 32;
    float w[Cpl];
#pragma unroll
    for (int i = 0; i < Cpl; ++i) w[i] = usq[lane * Cpl + i];
    const float u2 = warp_tree<Cpl>(w);
    if (lane == 0) {
      float sim;
      if (!all_finite) sim = -1.0f;
      else if (nonzero == 0) sim = 1.0f;  // identical (zero) tokens: the mean is exact
      else sim = fmul(fmul(u2, inv_m), inv_m);
      (is_q ? a.qsim : a.ksim)[out] = sim;
    }
  }
}

// The prediction's K mean: per (batch, kv head, channel), the tree sum of the raw block sums (padded to a power of
// two) times 1/Nk.
__global__ void kmean_kernel(const PoolArgs a) {
  const SpargePredictParams& p = a.p;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int D = p.head_dim;
  if (i >= static_cast<int64_t>(p.batch) * p.heads_kv * D) return;
  const int64_t bh = i / D;
  const int c = static_cast<int>(i % D);
  int slots = 1;
  while (slots < p.blocks_k) slots *= 2;
  const float* sums = a.ksum + bh * p.blocks_k * D + c;
  float total;
  if (slots >= 8) {
    // Aligned groups of 8 leaves are balanced sub-trees of the tree: their 8 loads go out together, and the
    // group totals combine through a counter (levels in registers).
    ChunkCounter groups;
    for (int j = 0; j < slots; j += 8) {
      float v[8];
#pragma unroll
      for (int r = 0; r < 8; ++r) v[r] = j + r < p.blocks_k ? sums[int64_t(j + r) * D] : 0.0f;
      groups.push(tree8(v));
    }
    total = groups.total(slots / 8);
  } else {
    float v[8] = {};
    for (int j = 0; j < p.blocks_k; ++j) v[j] = sums[int64_t(j) * D];
    total = slots == 1 ? v[0] : slots == 2 ? fadd(v[0], v[1]) : fadd(fadd(v[0], v[1]), fadd(v[2], v[3]));
  }
  a.km[bh * D + c] = fmul(total, p.inv_tokens_k);
}

// Query block rows per select CTA: they share the K block means read from L2, and each has its own 64 threads
// (two warps) for the ranking and the LUT row, so the rows' sequential steps overlap.
constexpr int kSelectRows = 4;
constexpr int kRowThreads = kSelectThreads / kSelectRows;
constexpr int kSelectMaxKeyBlocks = 512;

struct SelectShared {
  float w[kSelectRows][kSelectMaxKeyBlocks];        // logits, then masses
  float by_rank[kSelectRows][kSelectMaxKeyBlocks];  // masses in rank order, then their running sums
  int rank[kSelectRows][kSelectMaxKeyBlocks];
  float mq[kSelectRows][256];
  float part_max[kSelectRows][2];
  int part_count[kSelectRows][2];
  int row_finite[kSelectRows];
  int first_reach[kSelectRows];
};

template <int Cpl>
__global__ void __launch_bounds__(kSelectThreads) select_kernel(const PoolArgs a) {
  __shared__ SelectShared sh;
  const SpargePredictParams& p = a.p;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  constexpr int kWarps = kSelectThreads / 32;
  const int hq = blockIdx.y, b = blockIdx.z;
  const int kvh = hq / (p.heads_q / p.heads_kv);
  const int D = p.head_dim, nkb = p.blocks_k;
  const int Nq = p.tokens_q, Nk = p.tokens_k, bq = p.block_q, bk = p.block_k;
  const float theta = p.head[hq * 4 + 0], tau = p.head[hq * 4 + 1], topk = p.head[hq * 4 + 2];
  const bool dense = p.head[hq * 4 + 3] != 0.0f;
  const int64_t kv_row0 = (static_cast<int64_t>(b) * p.heads_kv + kvh) * nkb;
  const int qb0 = blockIdx.x * kSelectRows;
  const int rows = min(kSelectRows, p.blocks_q - qb0);
  // The valid key blocks [0, end) of query block qb.
  auto row_end = [&](int qb) {
    if (!p.causal) return nkb;
    const int q1 = min(Nq, (qb + 1) * bq) - 1;
    const int last = q1 + Nk - Nq;  // the last key the block's last row sees
    return last < 0 ? 0 : min(nkb, last / bk + 1);
  };
  auto row_index = [&](int qb) { return (static_cast<int64_t>(b) * p.heads_q + hq) * p.blocks_q + qb; };
  int max_end = 0;
  for (int r = 0; r < rows; ++r) max_end = max(max_end, row_end(qb0 + r));
  for (int i = tid; i < rows * D; i += kSelectThreads) sh.mq[i / D][i % D] = a.qmean[row_index(qb0 + i / D) * D + i % D];
  if (tid < kSelectRows) sh.row_finite[tid] = 1;
  __syncthreads();
  // Logits of every row against every valid key block: one warp per key block, its means read once.
  if (!dense) {
    for (int j = warp; j < max_end; j += kWarps) {
      const float* mk = a.kmean + (kv_row0 + j) * D + lane * Cpl;
      float kv[Cpl];
#pragma unroll
      for (int i = 0; i < Cpl; ++i) kv[i] = mk[i];
      for (int r = 0; r < rows; ++r) {
        float v[Cpl];
#pragma unroll
        for (int i = 0; i < Cpl; ++i) v[i] = fmul(sh.mq[r][lane * Cpl + i], kv[i]);
        const float s = fmul(warp_tree<Cpl>(v), p.scale_log2);
        if (lane == 0) {
          if ((isinf(s) || isnan(s)) && j < row_end(qb0 + r)) sh.row_finite[r] = 0;
          sh.w[r][j] = s;
        }
      }
    }
  }
  __syncthreads();

  // From here on, row r belongs to threads [64r, 64r + 64); every __syncthreads is reached by all threads.
  const int r = tid / kRowThreads, rt = tid % kRowThreads, rw = rt / 32;
  const bool active = r < rows;
  const int qb = qb0 + r;
  const int end = active ? row_end(qb) : 0;
  const int64_t row = row_index(qb);
  const bool all = !active || dense || a.qsim[row] < theta || sh.row_finite[r] == 0;
  const bool ranked = !all && end > 0;
  float* w = sh.w[r];
  float* by_rank = sh.by_rank[r];
  int* rank = sh.rank[r];
  // the row max (order does not matter: only the sign of a zero could differ, which 2^(s − max) ignores)
  if (ranked) {
    float mx = -__int_as_float(0x7f800000);
    for (int j = rt; j < end; j += kRowThreads) mx = w[j] > mx ? w[j] : mx;
#pragma unroll
    for (int off = 16; off > 0; off /= 2) {
      const float o = __shfl_xor_sync(0xffffffffu, mx, off);
      mx = o > mx ? o : mx;
    }
    if (lane == 0) sh.part_max[r][rw] = mx;
  }
  __syncthreads();
  if (ranked) {
    const float m0 = sh.part_max[r][0], m1 = sh.part_max[r][1];
    const float mx = m1 > m0 ? m1 : m0;
    for (int j = rt; j < end; j += kRowThreads) {
      const int keys = min(bk, Nk - j * bk);
      w[j] = fmul(static_cast<float>(keys), exp2_neg(fsub(w[j], mx)));
    }
  }
  __syncthreads();
  if (ranked) {
    for (int j = rt; j < end; j += kRowThreads) {
      const float wj = w[j];
      int rk = 0;
      for (int i = 0; i < end; ++i) {
        const float wi = w[i];
        rk += (wi > wj || (wi == wj && i < j)) ? 1 : 0;
      }
      rank[j] = rk;
      by_rank[rk] = wj;
    }
  }
  __syncthreads();
  if (ranked && rt == 0) {
    // running sums in rank order (sequential), in place: by_rank[k] becomes cum_{k+1}
    float cum = 0.0f;
    for (int k = 0; k < end; ++k) {
      cum = fadd(cum, by_rank[k]);
      by_rank[k] = cum;
    }
    sh.first_reach[r] = end;
  }
  __syncthreads();
  int keep = 0;
  if (ranked) {
    int m;
    if (topk > 0.0f) {
      m = static_cast<int>(ceilf(fmul(topk, static_cast<float>(end))));
    } else {
      // the first m in [0, end] with cum_m >= τ·cum_end (cum_0 = 0)
      const float target = fmul(tau, by_rank[end - 1]);
      if (0.0f >= target) {
        m = 0;
      } else {
        for (int k = rt; k < end; k += kRowThreads)
          if (by_rank[k] >= target) atomicMin(&sh.first_reach[r], k + 1);
        m = -1;  // read after the barrier
      }
    }
    keep = m;
  }
  __syncthreads();
  if (ranked) {
    if (keep < 0) keep = sh.first_reach[r];
    keep = min(max(keep, 1), end);
  }
  // The LUT row: the chosen blocks ascending (a ballot per warp over consecutive blocks), then zeros.
  const int q0 = qb * bq, q1 = min(Nq, q0 + bq) - 1;
  const int shift = Nk - Nq;  // keys at the query block's own positions: key blocks [diag_b, diag_e)
  const int p0 = max(0, q0 + shift), p1 = min(Nk - 1, q1 + shift);
  const int diag_b = p0 <= p1 ? p0 / bk : 0, diag_e = p0 <= p1 ? p1 / bk + 1 : 0;
  int written = 0;
  for (int j0 = 0; j0 < max_end; j0 += kRowThreads) {
    const int j = j0 + rt;
    bool take = false;
    if (j < end)
      take = all || rank[j] < keep || a.ksim[kv_row0 + j] < theta || (p.sink && j == 0) ||
             (p.diagonal && j >= diag_b && j < diag_e);
    const unsigned ballot = __ballot_sync(0xffffffffu, take);
    if (lane == 0) sh.part_count[r][rw] = __popc(ballot);
    __syncthreads();
    const int before = written + (rw == 1 ? sh.part_count[r][0] : 0);
    if (take) p.indices[row * nkb + before + __popc(ballot & ((1u << lane) - 1u))] = j;
    written += sh.part_count[r][0] + sh.part_count[r][1];
    __syncthreads();
  }
  if (active) {
    for (int i = written + rt; i < nkb; i += kRowThreads) p.indices[row * nkb + i] = 0;
    if (rt == 0) p.counts[row] = written;
  }
}

// One thread per 16-byte piece of a row (Vec = uint4, when every row start is 16-byte aligned) or per element
// (Vec = uint16_t): consecutive threads copy consecutive pieces, so a warp moves whole rows with wide accesses.
template <typename Vec>
__global__ void __launch_bounds__(256) permute_kernel(const PermuteParams p) {
  constexpr int kPer = sizeof(Vec) / 2;  // elements per piece
  const int pieces = p.head_dim / kPer;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (item >= static_cast<int64_t>(p.tokens) * pieces) return;
  const int i = static_cast<int>(item / pieces), c = static_cast<int>(item % pieces) * kPer;
  const int h = blockIdx.y, b = blockIdx.z;
  const int j = i < p.order_size ? __ldg(p.order + i) : i;
  const uint16_t* src = static_cast<const uint16_t*>(p.src.data) + b * p.src.stride_b + h * p.src.stride_h +
                        static_cast<int64_t>(j) * p.src.stride_t + c;
  uint16_t* dst = static_cast<uint16_t*>(p.dst) + b * p.dst_stride_b + h * p.dst_stride_h +
                  static_cast<int64_t>(i) * p.dst_stride_t + c;
  *reinterpret_cast<Vec*>(dst) = *reinterpret_cast<const Vec*>(src);
}

struct Workspace {
  float *ksum, *km, *kmean, *ksim, *qmean, *qsim;
};

std::size_t carve(const SpargePredictParams& p, Workspace* w) {
  const std::size_t kv = std::size_t(p.batch) * p.heads_kv, q = std::size_t(p.batch) * p.heads_q;
  const std::size_t D = std::size_t(p.head_dim);
  const std::size_t sizes[6] = {kv * p.blocks_k * D, kv * D, kv * p.blocks_k * D, kv * p.blocks_k, q * p.blocks_q * D,
                                q * p.blocks_q};
  float** parts[6] = {nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
  if (w) {
    parts[0] = &w->ksum, parts[1] = &w->km, parts[2] = &w->kmean, parts[3] = &w->ksim, parts[4] = &w->qmean;
    parts[5] = &w->qsim;
  }
  std::size_t at = 0;
  for (int i = 0; i < 6; ++i) {
    if (w) *parts[i] = reinterpret_cast<float*>(static_cast<char*>(p.workspace) + at);
    at += (sizes[i] * sizeof(float) + 255) / 256 * 256;
  }
  return at;
}

// Gather: q and k are read through a fused token order (a separate instantiation: the dependent index load
// costs the plain kernel nothing).
template <bool Bf16, int G, bool Gather>
cudaError_t launch_typed(const PoolArgs& base, cudaStream_t stream) {
  const SpargePredictParams& p = base.p;
  constexpr int D = 8 * G;
  PoolArgs a = base;
  a.which = 0;
  pool_kernel<Bf16, G, Gather><<<dim3(p.blocks_k, p.heads_kv, p.batch), D, 0, stream>>>(a);
  const int64_t channels = int64_t(p.batch) * p.heads_kv * D;
  kmean_kernel<<<static_cast<unsigned>((channels + 127) / 128), 128, 0, stream>>>(a);
  a.which = 1;
  pool_kernel<Bf16, G, Gather><<<dim3(p.blocks_k, p.heads_kv, p.batch), D, 0, stream>>>(a);
  a.which = 2;
  pool_kernel<Bf16, G, Gather><<<dim3(p.blocks_q, p.heads_q, p.batch), D, 0, stream>>>(a);
  select_kernel<D / 32><<<dim3((p.blocks_q + kSelectRows - 1) / kSelectRows, p.heads_q, p.batch), kSelectThreads, 0,
                           stream>>>(a);
  return cudaGetLastError();
}

template <bool Bf16, bool Gather>
cudaError_t launch_dim(const PoolArgs& a, cudaStream_t stream) {
  switch (a.p.head_dim) {
    case 64: return launch_typed<Bf16, 8, Gather>(a, stream);
    case 128: return launch_typed<Bf16, 16, Gather>(a, stream);
    default: return launch_typed<Bf16, 32, Gather>(a, stream);
  }
}

}  // namespace

bool sparge_supported(int head_dim, int blocks_k, int block_q, int block_k) {
  const bool pow2 = head_dim >= 64 && head_dim <= 256 && (head_dim & (head_dim - 1)) == 0;
  const int most = kChunk << (kChunkLevels - 1);  // the chunk counter's top level
  return pow2 && blocks_k <= kSelectMaxKeyBlocks && block_q <= most && block_k <= most;
}

std::size_t sparge_workspace_bytes(const SpargePredictParams& p) { return carve(p, nullptr); }

int launch_sparge_predict(const SpargePredictParams& p, void* stream) {
  PoolArgs a{};
  a.p = p;
  Workspace w{};
  carve(p, &w);
  a.ksum = w.ksum, a.km = w.km, a.kmean = w.kmean, a.ksim = w.ksim, a.qmean = w.qmean, a.qsim = w.qsim;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const bool gather = p.q.rows != nullptr || p.k.rows != nullptr;
  if (gather) return static_cast<int>(p.in_bf16 ? launch_dim<true, true>(a, s) : launch_dim<false, true>(a, s));
  return static_cast<int>(p.in_bf16 ? launch_dim<true, false>(a, s) : launch_dim<false, false>(a, s));
}

int launch_permute(const PermuteParams& p, void* stream) {
  if (p.tokens == 0 || p.heads == 0 || p.batch == 0) return 0;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  auto aligned = [](const void* base, int64_t sb, int64_t sh, int64_t st) {
    return reinterpret_cast<std::uintptr_t>(base) % 16 == 0 && sb % 8 == 0 && sh % 8 == 0 && st % 8 == 0;
  };
  const bool wide = p.head_dim % 8 == 0 && aligned(p.src.data, p.src.stride_b, p.src.stride_h, p.src.stride_t) &&
                    aligned(p.dst, p.dst_stride_b, p.dst_stride_h, p.dst_stride_t);
  const int64_t items = static_cast<int64_t>(p.tokens) * (wide ? p.head_dim / 8 : p.head_dim);
  const dim3 grid(static_cast<unsigned>((items + 255) / 256), p.heads, p.batch);
  if (wide) permute_kernel<uint4><<<grid, 256, 0, s>>>(p);
  else permute_kernel<uint16_t><<<grid, 256, 0, s>>>(p);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace sparq::cuda
