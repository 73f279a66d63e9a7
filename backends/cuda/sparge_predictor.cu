// CUDA SpargeAttn stage 1 (docs/SPARGE.md) in the exact fp32 arithmetic of runtime/src/sparge/predictor_fp32.hpp:
// every add/sub/mul is __fadd_rn/__fsub_rn/__fmul_rn (never contracted) flushed to a signed zero when subnormal,
// no division or library sqrt/exp, sums in the TreeSum order. Kernels:
//   pool     per (block, head, batch): raw K block sums, or block means and self-similarities of Q / smoothed K;
//   kmean    per (batch, kv head, channel): the prediction's K mean;
//   select   per (query block, query head, batch): logits, masses, rank by counting, τ / top-k, the LUT row;
//   permute  per (token, head, batch): a token row of the Hilbert permutation.
// The TreeSum over channels is a lane's balanced sub-tree of D/32 consecutive channels followed by a butterfly
// over the 32 lanes (equal to the TreeSum for a power-of-two D); the TreeSum over a block's tokens runs in chunks
// of 64 tokens per channel thread with the counter's levels in registers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "sparge_predictor.hpp"

namespace sparq::cuda {
namespace {

constexpr int kMaxKeyBlocks = 1024;  // per row in the select kernel's shared memory
constexpr int kChunk = 64;           // tokens per pool step
constexpr int kChunkLevels = 10;     // chunk counter levels: blocks up to 1023 chunks
constexpr int kSelectThreads = 256;

// ---- exact fp32 ------------------------------------------------------------------------------------------

__device__ __forceinline__ float ftz(float x) {
  const unsigned u = __float_as_uint(x);
  return (u & 0x7F800000u) == 0u ? __uint_as_float(u & 0x80000000u) : x;
}
__device__ __forceinline__ float fadd(float a, float b) { return ftz(__fadd_rn(a, b)); }
__device__ __forceinline__ float fsub(float a, float b) { return ftz(__fsub_rn(a, b)); }
__device__ __forceinline__ float fmul(float a, float b) { return ftz(__fmul_rn(a, b)); }

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

// The TreeSum counter of a block's tokens, for one channel: chunk[0..6] the current chunk's levels, block[k] the
// levels 6 + k (whole chunks).
struct BlockCounter {
  float chunk[7];
  float block[kChunkLevels];
  int chunks = 0;  // whole chunks pushed
  // Token i (0..63) of the current chunk.
  template <int I>
  __device__ __forceinline__ void push_static(float v) {
#pragma unroll
    for (int k = 0; k < 7; ++k) {
      if ((I >> k) & 1) {
        v = fadd(chunk[k], v);
      } else {
        chunk[k] = v;
        return;
      }
    }
  }
  // After a whole chunk of 64: its total joins the chunk-level counter.
  __device__ __forceinline__ void end_whole_chunk() {
    float v = chunk[6];
    bool placed = false;
#pragma unroll
    for (int k = 0; k < kChunkLevels; ++k) {
      if (placed) continue;
      if ((chunks >> k) & 1) {
        v = fadd(block[k], v);
      } else {
        block[k] = v;
        placed = true;
      }
    }
    ++chunks;
  }
  // The total with `tail` tokens (0..63) pushed into the current chunk after the whole chunks.
  __device__ __forceinline__ float total(int tail) const {
    float acc = 0.0f;
    bool have = false;
#pragma unroll
    for (int k = 0; k < 6; ++k)
      if ((tail >> k) & 1) {
        acc = have ? fadd(chunk[k], acc) : chunk[k];
        have = true;
      }
#pragma unroll
    for (int k = 0; k < kChunkLevels; ++k)
      if ((chunks >> k) & 1) {
        acc = have ? fadd(block[k], acc) : block[k];
        have = true;
      }
    return acc;
  }
};

// Pushes tile values t = 0..n-1 (n <= 64) of one channel into sum (v) and unit (v · inv[t]).
template <bool Unit, int I = 0>
__device__ __forceinline__ void push_chunk(BlockCounter& sum, BlockCounter& unit, const float* col, int ld,
                                           const float* inv, int n) {
  if constexpr (I < kChunk) {
    if (I < n) {
      const float v = col[I * ld];
      sum.push_static<I>(v);
      if constexpr (Unit) unit.push_static<I>(fmul(v, inv[I]));
      push_chunk<Unit, I + 1>(sum, unit, col, ld, inv, n);
    }
  }
}

struct PoolArgs {
  SpargePredictParams p;
  float *ksum, *km, *kmean, *ksim, *qmean, *qsim;
  int which;  // 0: raw K sums, 1: smoothed K, 2: Q
};

// One thread per channel (blockDim = D), D a power of two 32..256.
template <bool Bf16, int Cpl>
__global__ void pool_kernel(const PoolArgs a) {
  extern __shared__ float smem[];
  const SpargePredictParams& p = a.p;
  const int D = p.head_dim, ld = D + 1;
  float* tile = smem;              // [64][D + 1] values of the chunk (ftz, smoothed)
  float* inv = tile + kChunk * ld;  // [64] 1/|v| of each token (0 for zero or non-finite rows)
  float* usq = inv + kChunk;        // [D] unit_c²
  __shared__ int all_finite, nonzero;
  const int c = threadIdx.x, lane = c % 32, warp = c / 32, warps = blockDim.x / 32;
  const int blk = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const bool is_q = a.which == 2, raw = a.which == 0, smoothed = a.which == 1;
  const int N = is_q ? p.tokens_q : p.tokens_k;
  const int block = is_q ? p.block_q : p.block_k;
  const int nblocks = is_q ? p.blocks_q : p.blocks_k;
  const int H = is_q ? p.heads_q : p.heads_kv;
  const SpargeView& x = is_q ? p.q : p.k;
  const uint16_t* base = static_cast<const uint16_t*>(x.data) + b * x.stride_b + h * x.stride_h;
  const int t0 = blk * block, t1 = min(N, t0 + block);
  const float km = smoothed ? a.km[(static_cast<int64_t>(b) * p.heads_kv + h) * D + c] : 0.0f;
  if (c == 0) {
    all_finite = 1;
    nonzero = 0;
  }
  BlockCounter sum, unit;
  int tail = 0;
  for (int c0 = t0; c0 < t1; c0 += kChunk) {
    const int n = min(kChunk, t1 - c0);
    __syncthreads();  // the previous chunk's tile is consumed
    for (int t = 0; t < n; ++t) {
      float v = ftz(load16<Bf16>(base + static_cast<int64_t>(c0 + t) * x.stride_t + c));
      if (smoothed) v = fsub(v, km);
      tile[t * ld + c] = v;
    }
    __syncthreads();
    if (!raw) {
      for (int t = warp; t < n; t += warps) {
        float v[Cpl];
#pragma unroll
        for (int i = 0; i < Cpl; ++i) {
          const float e = tile[t * ld + lane * Cpl + i];
          v[i] = fmul(e, e);
        }
        const float n2 = warp_tree<Cpl>(v);
        if (lane == 0) {
          float r = 0.0f;  // zero rows (and non-finite ones, whose block is marked) add no direction
          if (isinf(n2) || isnan(n2)) {
            all_finite = 0;
          } else if (n2 > 0.0f) {
            atomicAdd(&nonzero, 1);
            r = rsqrt_exact(n2);
          }
          inv[t] = r;
        }
      }
      __syncthreads();
      push_chunk<true>(sum, unit, tile + c, ld, inv, n);
    } else {
      push_chunk<false>(sum, unit, tile + c, ld, inv, n);
    }
    if (n == kChunk) {
      sum.end_whole_chunk();
      if (!raw) unit.end_whole_chunk();
    } else {
      tail = n;
    }
  }
  const int64_t out = (static_cast<int64_t>(b) * H + h) * nblocks + blk;
  const float s = sum.total(tail);
  if (raw) {
    a.ksum[out * D + c] = s;
    return;
  }
  const float inv_m = blk + 1 == nblocks ? (is_q ? p.inv_tail_q : p.inv_tail_k) : (is_q ? p.inv_block_q : p.inv_block_k);
  (is_q ? a.qmean : a.kmean)[out * D + c] = fmul(s, inv_m);
  const float u = unit.total(tail);
  usq[c] = fmul(u, u);
  __syncthreads();
  if (warp == 0) {
    float v[Cpl];
#pragma unroll
    for (int i = 0; i < Cpl; ++i) v[i] = usq[lane * Cpl + i];
    const float u2 = warp_tree<Cpl>(v);
    if (lane == 0) {
      float sim;
      if (!all_finite) sim = -1.0f;
      else if (nonzero == 0) sim = 1.0f;  // identical (zero) tokens: the mean is exact
      else sim = fmul(fmul(u2, inv_m), inv_m);
      (is_q ? a.qsim : a.ksim)[out] = sim;
    }
  }
}

// The prediction's K mean: per (batch, kv head, channel), the TreeSum of the raw block sums times 1/Nk.
__global__ void kmean_kernel(const PoolArgs a) {
  const SpargePredictParams& p = a.p;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int D = p.head_dim;
  if (i >= static_cast<int64_t>(p.batch) * p.heads_kv * D) return;
  const int64_t bh = i / D;
  const int c = static_cast<int>(i % D);
  float level[kChunkLevels + 1];
  int count = 0;
  for (int j = 0; j < p.blocks_k; ++j) {
    float v = a.ksum[(bh * p.blocks_k + j) * D + c];
    int k = 0;
    for (int cc = count; cc & 1; cc >>= 1, ++k) v = fadd(level[k], v);
    level[k] = v;
    ++count;
  }
  float acc = 0.0f;
  bool have = false;
  for (int k = 0; k <= kChunkLevels; ++k)
    if ((count >> k) & 1) {
      acc = have ? fadd(level[k], acc) : level[k];
      have = true;
    }
  a.km[bh * D + c] = fmul(acc, p.inv_tokens_k);
}

struct SelectShared {
  float w[kMaxKeyBlocks];        // logits, then masses
  float by_rank[kMaxKeyBlocks];  // masses in rank order, then their running sums
  int rank[kMaxKeyBlocks];
  float mq[256];
  float warp_max[kSelectThreads / 32];
  int warp_count[kSelectThreads / 32];
  int row_finite, keep, first_reach;
  float row_max;
};

template <int Cpl>
__global__ void __launch_bounds__(kSelectThreads) select_kernel(const PoolArgs a) {
  __shared__ SelectShared sh;
  const SpargePredictParams& p = a.p;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  constexpr int kWarps = kSelectThreads / 32;
  const int qb = blockIdx.x, hq = blockIdx.y, b = blockIdx.z;
  const int kvh = hq / (p.heads_q / p.heads_kv);
  const int D = p.head_dim, nkb = p.blocks_k;
  const int Nq = p.tokens_q, Nk = p.tokens_k, bq = p.block_q, bk = p.block_k;
  const int q0 = qb * bq, q1 = min(Nq, q0 + bq) - 1;
  int end = nkb;
  if (p.causal) {
    const int last = q1 + Nk - Nq;  // the last key the block's last row sees
    end = last < 0 ? 0 : min(nkb, last / bk + 1);
  }
  const int shift = Nk - Nq;  // keys at the query block's own positions: key blocks [diag_b, diag_e)
  const int p0 = max(0, q0 + shift), p1 = min(Nk - 1, q1 + shift);
  const int diag_b = p0 <= p1 ? p0 / bk : 0, diag_e = p0 <= p1 ? p1 / bk + 1 : 0;
  const float theta = p.head[hq * 4 + 0], tau = p.head[hq * 4 + 1], topk = p.head[hq * 4 + 2];
  const bool dense = p.head[hq * 4 + 3] != 0.0f;
  const int64_t row = (static_cast<int64_t>(b) * p.heads_q + hq) * p.blocks_q + qb;
  const int64_t kv_row0 = (static_cast<int64_t>(b) * p.heads_kv + kvh) * nkb;
  float* const qmean = a.qmean;
  bool all = dense || a.qsim[row] < theta;

  for (int c = tid; c < D; c += kSelectThreads) sh.mq[c] = qmean[row * D + c];
  if (tid == 0) {
    sh.row_finite = 1;
    sh.first_reach = end;
  }
  __syncthreads();
  if (!all) {
    for (int j = warp; j < end; j += kWarps) {
      const float* mk = a.kmean + (kv_row0 + j) * D + lane * Cpl;
      float v[Cpl];
#pragma unroll
      for (int i = 0; i < Cpl; ++i) v[i] = fmul(sh.mq[lane * Cpl + i], mk[i]);
      const float s = fmul(warp_tree<Cpl>(v), p.scale_log2);
      if (lane == 0) {
        if (isinf(s) || isnan(s)) sh.row_finite = 0;
        sh.w[j] = s;
      }
    }
  }
  __syncthreads();
  all = all || !sh.row_finite;  // a non-finite map keeps the whole row
  int keep = 0;
  if (!all && end > 0) {
    // the row max (order does not matter: only the sign of a zero could differ, which 2^(s − max) ignores)
    float mx = -__int_as_float(0x7f800000);
    for (int j = tid; j < end; j += kSelectThreads) mx = sh.w[j] > mx ? sh.w[j] : mx;
#pragma unroll
    for (int off = 16; off > 0; off /= 2) {
      const float o = __shfl_xor_sync(0xffffffffu, mx, off);
      mx = o > mx ? o : mx;
    }
    if (lane == 0) sh.warp_max[warp] = mx;
    __syncthreads();
    if (tid == 0) {
      float m = sh.warp_max[0];
      for (int w = 1; w < kWarps; ++w) m = sh.warp_max[w] > m ? sh.warp_max[w] : m;
      sh.row_max = m;
    }
    __syncthreads();
    for (int j = tid; j < end; j += kSelectThreads) {
      const int keys = min(bk, Nk - j * bk);
      sh.w[j] = fmul(static_cast<float>(keys), exp2_neg(fsub(sh.w[j], sh.row_max)));
    }
    __syncthreads();
    for (int j = tid; j < end; j += kSelectThreads) {
      const float wj = sh.w[j];
      int r = 0;
      for (int i = 0; i < end; ++i) {
        const float wi = sh.w[i];
        r += (wi > wj || (wi == wj && i < j)) ? 1 : 0;
      }
      sh.rank[j] = r;
      sh.by_rank[r] = wj;
    }
    __syncthreads();
    if (tid == 0) {
      // running sums in rank order (sequential), in place: by_rank[r] becomes cum_{r+1}
      float cum = 0.0f;
      for (int r = 0; r < end; ++r) {
        cum = fadd(cum, sh.by_rank[r]);
        sh.by_rank[r] = cum;
      }
    }
    __syncthreads();
    int m;
    if (topk > 0.0f) {
      m = static_cast<int>(ceilf(fmul(topk, static_cast<float>(end))));
    } else {
      // the first m in [0, end] with cum_m >= τ·cum_end (cum_0 = 0)
      const float target = fmul(tau, sh.by_rank[end - 1]);
      if (0.0f >= target) {
        m = 0;
      } else {
        for (int r = tid; r < end; r += kSelectThreads)
          if (sh.by_rank[r] >= target) atomicMin(&sh.first_reach, r + 1);
        __syncthreads();
        m = sh.first_reach;
      }
    }
    keep = min(max(m, 1), end);
  }
  // The LUT row: the chosen blocks ascending (ballot per warp over consecutive blocks), then zeros.
  int written = 0;
  for (int j0 = 0; j0 < end; j0 += kSelectThreads) {
    const int j = j0 + tid;
    bool take = false;
    if (j < end)
      take = all || sh.rank[j] < keep || a.ksim[kv_row0 + j] < theta || (p.sink && j == 0) ||
             (p.diagonal && j >= diag_b && j < diag_e);
    const unsigned ballot = __ballot_sync(0xffffffffu, take);
    if (lane == 0) sh.warp_count[warp] = __popc(ballot);
    __syncthreads();
    int before = written;
    for (int w = 0; w < warp; ++w) before += sh.warp_count[w];
    int step = 0;
    for (int w = 0; w < kWarps; ++w) step += sh.warp_count[w];
    if (take) p.indices[row * nkb + before + __popc(ballot & ((1u << lane) - 1u))] = j;
    written += step;
    __syncthreads();
  }
  for (int i = written + tid; i < nkb; i += kSelectThreads) p.indices[row * nkb + i] = 0;
  if (tid == 0) p.counts[row] = written;
}

__global__ void permute_kernel(const PermuteParams p) {
  const int i = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int j = i < p.order_size ? p.order[i] : i;
  const uint16_t* src = static_cast<const uint16_t*>(p.src.data) + b * p.src.stride_b + h * p.src.stride_h +
                        static_cast<int64_t>(j) * p.src.stride_t;
  uint16_t* dst = static_cast<uint16_t*>(p.dst) + b * p.dst_stride_b + h * p.dst_stride_h +
                  static_cast<int64_t>(i) * p.dst_stride_t;
  for (int c = threadIdx.x; c < p.head_dim; c += blockDim.x) dst[c] = src[c];
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

template <bool Bf16, int Cpl>
cudaError_t launch_typed(const PoolArgs& base, cudaStream_t stream) {
  const SpargePredictParams& p = base.p;
  const int D = p.head_dim;
  const std::size_t smem = (std::size_t(kChunk) * (D + 1) + kChunk + D) * sizeof(float);
  auto pool = pool_kernel<Bf16, Cpl>;
  if (smem > 48 * 1024) {
    if (const cudaError_t e = cudaFuncSetAttribute(pool, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
        e != cudaSuccess)
      return e;
  }
  PoolArgs a = base;
  a.which = 0;
  pool<<<dim3(p.blocks_k, p.heads_kv, p.batch), D, smem, stream>>>(a);
  const int64_t channels = int64_t(p.batch) * p.heads_kv * D;
  kmean_kernel<<<static_cast<unsigned>((channels + 255) / 256), 256, 0, stream>>>(a);
  a.which = 1;
  pool<<<dim3(p.blocks_k, p.heads_kv, p.batch), D, smem, stream>>>(a);
  a.which = 2;
  pool<<<dim3(p.blocks_q, p.heads_q, p.batch), D, smem, stream>>>(a);
  select_kernel<Cpl><<<dim3(p.blocks_q, p.heads_q, p.batch), kSelectThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <bool Bf16>
cudaError_t launch_dim(const PoolArgs& a, cudaStream_t stream) {
  switch (a.p.head_dim) {
    case 32: return launch_typed<Bf16, 1>(a, stream);
    case 64: return launch_typed<Bf16, 2>(a, stream);
    case 128: return launch_typed<Bf16, 4>(a, stream);
    default: return launch_typed<Bf16, 8>(a, stream);
  }
}

}  // namespace

bool sparge_supported(int head_dim, int blocks_k, int block_q, int block_k) {
  const bool pow2 = head_dim >= 32 && head_dim <= 256 && (head_dim & (head_dim - 1)) == 0;
  const int most = kChunk * ((1 << kChunkLevels) - 1);
  return pow2 && blocks_k <= kMaxKeyBlocks && block_q <= most && block_k <= most;
}

std::size_t sparge_workspace_bytes(const SpargePredictParams& p) { return carve(p, nullptr); }

int launch_sparge_predict(const SpargePredictParams& p, void* stream) {
  PoolArgs a{};
  a.p = p;
  Workspace w{};
  carve(p, &w);
  a.ksum = w.ksum, a.km = w.km, a.kmean = w.kmean, a.ksim = w.ksim, a.qmean = w.qmean, a.qsim = w.qsim;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  return static_cast<int>(p.in_bf16 ? launch_dim<true>(a, s) : launch_dim<false>(a, s));
}

int launch_permute(const PermuteParams& p, void* stream) {
  if (p.tokens == 0 || p.heads == 0 || p.batch == 0) return 0;
  permute_kernel<<<dim3(p.tokens, p.heads, p.batch), 64, 0, static_cast<cudaStream_t>(stream)>>>(p);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace sparq::cuda
