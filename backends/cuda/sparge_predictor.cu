// CUDA SpargeAttn stage 1 (docs/SPARGE.md) in the exact fp32 arithmetic of runtime/src/sparge/predictor_fp32.hpp
// (exact_fp32.cuh): every add/sub/mul rounds to nearest, is never contracted, and its result is flushed to a
// signed zero when subnormal; no division or library sqrt/exp; tree sums over power-of-two slots. Kernels:
//   (before them, the preprocessing of cuda_backend_kernels.cu: the raw K chunk sums in kv_stats, the
//   prediction's K mean in kv_finalize, and the pooling of Q and K − mean per 64-token chunk in the
//   quantization passes)
//   block_pool  per (block, head, batch): block means and self-similarities of Q and smoothed K from the chunks;
//   select      per 4 query blocks of a (query head, batch): logits, masses, rank by counting, τ / top-k, LUT rows;
//   permute     per (16-byte piece or element of a row, head, batch): the Hilbert permutation.
// Channel sums: a lane's balanced sub-tree of consecutive channels, then a butterfly over lanes; token sums: a
// thread's sub-tree of consecutive tokens, then the threads' sub-trees through shared memory, then 64-token
// chunks through a counter in registers. Each is the tree of the specification because aligned sub-trees stay
// together.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "exact_fp32.cuh"
#include "sparge_predictor.hpp"

namespace sparq::cuda {
namespace {

using namespace exact;

constexpr int kChunkLevels = 10;  // block tree counter levels: blocks up to 512 chunks of kPoolChunk tokens
constexpr int kSelectThreads = 256;

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

struct PoolArgs {
  SpargePredictParams p;
  float *kmean, *ksim, *qmean, *qsim;  // block means and self-similarities
  SpargePoolChunks chunks;
};

// Block means and self-similarities of Q (IsQ) or smoothed K blocks from the 64-token chunk sums that the
// quantization passes pooled (SpargePoolChunks): per channel, the block's tree over its chunk slots (a chunk past
// the sequence or the block's padding is +0), then the similarity's tree over channels. One block per CTA of D
// threads.
template <bool IsQ, int D>
__global__ void __launch_bounds__(D) block_pool_kernel(const PoolArgs a) {
  __shared__ float usq[D];
  const SpargePredictParams& p = a.p;
  const int c = threadIdx.x, lane = c % 32;
  const int blk = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int N = IsQ ? p.tokens_q : p.tokens_k, block = IsQ ? p.block_q : p.block_k;
  const int nblocks = IsQ ? p.blocks_q : p.blocks_k, H = IsQ ? p.heads_q : p.heads_kv;
  const int chunks = (N + kPoolChunk - 1) / kPoolChunk, per_block = block / kPoolChunk;
  const int64_t head = static_cast<int64_t>(b) * H + h;
  const float* sums = (IsQ ? a.chunks.q_sum : a.chunks.k_sum) + head * chunks * D + c;
  const float* units = (IsQ ? a.chunks.q_unit : a.chunks.k_unit) + head * chunks * D + c;
  const int* flags = (IsQ ? a.chunks.q_flags : a.chunks.k_flags) + head * chunks;
  int slots = kPoolChunk;  // token slots of the block's tree: the next power of two >= block
  while (slots < block) slots *= 2;
  exact::TreeCounter<kChunkLevels> sum, unit;
  int any = 0;
  for (int j = 0; j < slots / kPoolChunk; ++j) {
    const int chunk = blk * per_block + j;
    const bool real = j < per_block && chunk < chunks;
    sum.push(real ? sums[static_cast<int64_t>(chunk) * D] : 0.0f);
    unit.push(real ? units[static_cast<int64_t>(chunk) * D] : 0.0f);
    if (real) any |= flags[chunk];
  }
  const int64_t out = head * nblocks + blk;
  const float inv_m = blk + 1 == nblocks ? (IsQ ? p.inv_tail_q : p.inv_tail_k) : (IsQ ? p.inv_block_q : p.inv_block_k);
  (IsQ ? a.qmean : a.kmean)[out * D + c] = fmul(sum.total(slots / kPoolChunk), inv_m);
  const float u = unit.total(slots / kPoolChunk);
  usq[c] = fmul(u, u);
  __syncthreads();
  if (c < 32) {
    constexpr int Cpl = D / 32;
    float w[Cpl];
#pragma unroll
    for (int i = 0; i < Cpl; ++i) w[i] = usq[lane * Cpl + i];
    const float u2 = warp_tree<Cpl>(w);
    if (lane == 0) {
      float sim;
      if (any & kPoolNonFinite) sim = -1.0f;
      else if (!(any & kPoolNonZero)) sim = 1.0f;  // identical (zero) tokens: the mean is exact
      else sim = fmul(fmul(u2, inv_m), inv_m);
      (IsQ ? a.qsim : a.ksim)[out] = sim;
    }
  }
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
  float *kmean, *ksim, *qmean, *qsim;
  SpargePoolChunks chunks;
};

std::size_t carve(const SpargePredictParams& p, Workspace* w) {
  const std::size_t kv = std::size_t(p.batch) * p.heads_kv, q = std::size_t(p.batch) * p.heads_q;
  const std::size_t D = std::size_t(p.head_dim);
  const std::size_t k_chunks = kv * ((p.tokens_k + kPoolChunk - 1) / kPoolChunk);
  const std::size_t q_chunks = q * ((p.tokens_q + kPoolChunk - 1) / kPoolChunk);
  std::size_t at = 0;
  auto take = [&](auto*& part, std::size_t elems) {
    using T = std::remove_reference_t<decltype(*part)>;
    if (w) part = reinterpret_cast<T*>(static_cast<char*>(p.workspace) + at);
    at += (elems * sizeof(T) + 255) / 256 * 256;
  };
  Workspace unused{};
  Workspace& x = w ? *w : unused;
  take(x.kmean, kv * p.blocks_k * D);
  take(x.ksim, kv * p.blocks_k);
  take(x.qmean, q * p.blocks_q * D);
  take(x.qsim, q * p.blocks_q);
  take(x.chunks.k_raw, k_chunks * D);
  take(x.chunks.km, kv * D);
  take(x.chunks.k_sum, k_chunks * D);
  take(x.chunks.k_unit, k_chunks * D);
  take(x.chunks.k_flags, k_chunks);
  take(x.chunks.q_sum, q_chunks * D);
  take(x.chunks.q_unit, q_chunks * D);
  take(x.chunks.q_flags, q_chunks);
  x.chunks.block_k = p.block_k;
  x.chunks.blocks_k = p.blocks_k;
  x.chunks.inv_tokens_k = p.inv_tokens_k;
  return at;
}

PoolArgs pool_args(const SpargePredictParams& p) {
  PoolArgs a{};
  a.p = p;
  Workspace w{};
  carve(p, &w);
  a.kmean = w.kmean, a.ksim = w.ksim, a.qmean = w.qmean, a.qsim = w.qsim;
  a.chunks = w.chunks;
  return a;
}

template <int D>
cudaError_t launch_select_typed(const PoolArgs& a, cudaStream_t stream) {
  const SpargePredictParams& p = a.p;
  block_pool_kernel<false, D><<<dim3(p.blocks_k, p.heads_kv, p.batch), D, 0, stream>>>(a);
  block_pool_kernel<true, D><<<dim3(p.blocks_q, p.heads_q, p.batch), D, 0, stream>>>(a);
  select_kernel<D / 32><<<dim3((p.blocks_q + kSelectRows - 1) / kSelectRows, p.heads_q, p.batch), kSelectThreads, 0,
                           stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

bool sparge_supported(int head_dim, int blocks_k, int block_q, int block_k) {
  const bool pow2 = head_dim >= 64 && head_dim <= 256 && (head_dim & (head_dim - 1)) == 0;
  const int most = kPoolChunk << (kChunkLevels - 1);  // the chunk counter's top level
  return pow2 && blocks_k <= kSelectMaxKeyBlocks && block_q <= most && block_k <= most;
}

std::size_t sparge_workspace_bytes(const SpargePredictParams& p) { return carve(p, nullptr); }

SpargePoolChunks sparge_pool_chunks(const SpargePredictParams& p) { return pool_args(p).chunks; }

int launch_sparge_select(const SpargePredictParams& p, void* stream) {
  const PoolArgs a = pool_args(p);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p.head_dim) {
    case 64: return static_cast<int>(launch_select_typed<64>(a, s));
    case 128: return static_cast<int>(launch_select_typed<128>(a, s));
    default: return static_cast<int>(launch_select_typed<256>(a, s));
  }
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
