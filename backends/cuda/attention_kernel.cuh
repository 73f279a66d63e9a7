// The quantized attention kernel (mma.sync path, sm_80 and sm_89), instantiated by the generated
// templates/cuda/attention.cu.j2 translation units per (arch, head dim, P·V precision).
//
// One CTA computes BLOCK_Q = 16·warps query rows (64: 4 warps) of one (batch, query head), 16 rows per warp.
// Q (INT8) is loaded once into shared memory; K (INT8) and V (e4m3 transposed, or the caller's fp16/bf16)
// tiles of BLOCK_K = 64 keys stream through a multi-stage cp.async ring in shared memory (XOR-swizzled
// 16-byte chunks, conflict-free ldmatrix).
// Per key tile: S = Q8·K8ᵀ (int32, m16n8k32) -> dequantized base-2 logits -> online softmax -> P·V
// (m16n8k32 e4m3 with a per-tile accumulator added into O, or m16n8k16 fp16/bf16 straight into O).
// The key tiles visited come from a walker over the dense range, a LUT or a bitmap, cut at the causal limit,
// so a skipped tile costs one index read. Numerics: docs/NUMERICS.md.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_registry.hpp"
#include "mma.cuh"

namespace sparq::cuda {

enum class PVMode : int { Fp16 = 0, Bf16 = 1, Fp8 = 2 };

constexpr float kLog2E = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kLog2Of448 = 8.807354922057604f;  // the e4m3 offset: P·448 = exp2(s − m + log2 448)

// Shared-memory tile of `Rows` rows of `RowBytes` bytes, in 16-byte chunks whose index is XORed with a
// function of the row so that the 8 row addresses of one ldmatrix matrix fall in 8 distinct bank groups.
template <int Rows, int RowBytes>
struct SwizzledTile {
  static constexpr int kChunks = RowBytes / 16;
  static_assert(kChunks >= 2 && (kChunks & (kChunks - 1)) == 0, "row bytes must be a power of two >= 32");
  static constexpr int kRowsPerGroup = kChunks >= 8 ? 1 : 8 / kChunks;  // rows sharing one 128-byte line
  static constexpr int kXorSpan = kChunks >= 8 ? 8 : kChunks;
  static constexpr int kBytes = Rows * RowBytes;
  __device__ static __forceinline__ int offset(int row, int chunk) {
    return row * RowBytes + ((chunk ^ ((row / kRowsPerGroup) % kXorSpan)) << 4);
  }
  // The swizzle repeats every 8 rows, and row bits and chunk bits of an offset are disjoint, so for a row
  // r0 + 8k and a chunk c0 + 2j (c0 in {0, 1}): offset = offset(r0, c0) ^ (2j << 4) + 8k·RowBytes. Kernels
  // compute offset(r0, c0) once per lane and fold the rest into constants.
  // Copies the tile from global rows (row r at src + r·src_stride bytes; rows >= valid_rows are zero-filled)
  // with Threads threads, 16 bytes per cp.async. Each thread's rows advance by Threads/kChunks (a multiple of 8).
  template <int Threads>
  __device__ static __forceinline__ void load(uint32_t dst, const unsigned char* src, int64_t src_stride,
                                              int valid_rows) {
    static_assert(Rows * kChunks % Threads == 0 || Rows * kChunks < Threads, "tile must split evenly over the threads");
    constexpr int kIters = (Rows * kChunks + Threads - 1) / Threads;
    constexpr int kRowStep = Threads / kChunks;
    const int row0 = threadIdx.x / kChunks, chunk = threadIdx.x % kChunks;
    const uint32_t d0 = dst + offset(row0, chunk);
    const unsigned char* s0 = src + row0 * src_stride + chunk * 16;
#pragma unroll
    for (int j = 0; j < kIters; ++j) {
      const int row = row0 + j * kRowStep;
      if (Rows * kChunks >= Threads || row < Rows) {
        const bool ok = row < valid_rows;
        const uint32_t d = kRowStep % 8 == 0 ? d0 + j * kRowStep * RowBytes : dst + offset(row, chunk);
        cp_async_16(d, ok ? s0 + j * kRowStep * src_stride : src, ok ? 16 : 0);
      }
    }
  }
};

// float(x) for |x| < 2^22 on the full-rate FP32 pipe (I2F runs at a quarter of the rate): the bits of
// 1.5·2^23 + x read as a float are exactly 1.5·2^23 + x. |Q8·K8| <= 127²·256 < 2^22 for head dims <= 256.
__device__ __forceinline__ float exact_int_to_float(int x) {
  return __int_as_float(0x4B400000 + x) - 12582912.0f;
}

template <int D, PVMode PV, int Warps>
struct AttentionConfig {
  static constexpr bool kFp8 = PV == PVMode::Fp8;
  static constexpr int kBlockQ = Warps * 16;
  using KTile = SwizzledTile<kBlockK, D>;                          // [key][channel] int8
  using VTile = SwizzledTile<kFp8 ? D : kBlockK, kFp8 ? kBlockK : 2 * D>;  // [channel][key] e4m3 or [key][channel]
  using QTile = SwizzledTile<kBlockQ, D>;                          // [query][channel] int8, loaded once
  static constexpr int kStageBytes = KTile::kBytes + VTile::kBytes;
  // 3 stages while they fit in 96 KB; 2 for 4-warp FP16 P·V so that 3 CTAs (12 warps) share an SM.
  static constexpr int kStages = (Warps == 4 && !kFp8) || 3 * kStageBytes > 96 * 1024 ? 2 : 3;
  static constexpr int kSmemBytes = kStages * kStageBytes + QTile::kBytes;
  static constexpr int kThreads = Warps * 32;
  // CTAs per SM the registers must allow: 8 warps -> 1 (2 for D64); 4 warps -> 3 (4 for D64); 1 above D128.
  static constexpr int kMinBlocks = D > 128 ? 1 : Warps == 8 ? (D <= 64 ? 2 : 1) : (D <= 64 ? 4 : 3);
};

// Position p of a 32-key chunk of the transposed FP8 V holds key permuted_key(p): the e4m3 P fragment is built
// from the S accumulator without shuffles (a thread holds keys 2t, 2t+1, 8+2t, 9+2t of each 16), so V's keys
// are stored in that order instead. Shared with the preprocessing kernel.
__host__ __device__ constexpr int permuted_key(int p) {
  return (p / 16) * 16 + ((p % 4) / 2) * 8 + 2 * ((p % 16) / 4) + (p % 2);
}

// The key tiles one CTA visits, ascending: all of [0, limit), or those a LUT row or a bitmap row lists
// (each mask block covering `sub` tiles), stopping at `limit` (sequence end or causal diagonal). Two cursors
// walk it: the loader (kStages-1 tiles ahead) and the consumer.
struct TileList {
  int mode, limit, sub, count, blocks;
  const int32_t* indices;
  const uint8_t* bits;
};
struct TileCursor {
  int entry = 0, part = 0, tile = -1;

  __device__ __forceinline__ void settle(const TileList& l) {
    if (l.mode == static_cast<int>(MaskMode::None)) {
      tile = entry < l.limit ? entry : -1;
      return;
    }
    int block;
    if (l.mode == static_cast<int>(MaskMode::Lut)) {
      if (entry >= l.count) { tile = -1; return; }
      block = __ldg(l.indices + entry);
    } else {
      if (part == 0)
        while (entry < l.blocks && __ldg(l.bits + entry) == 0) ++entry;
      if (entry >= l.blocks) { tile = -1; return; }
      block = entry;
    }
    const int t = block * l.sub + part;
    tile = (block >= 0 && t < l.limit) ? t : -1;
  }
  __device__ __forceinline__ void next(const TileList& l) {
    if (l.mode == static_cast<int>(MaskMode::None)) {
      ++entry;
    } else if (++part == l.sub) {
      part = 0;
      ++entry;
    }
    settle(l);
  }
};

template <int D, PVMode PV, int Warps>
__global__ void __launch_bounds__(AttentionConfig<D, PV, Warps>::kThreads, AttentionConfig<D, PV, Warps>::kMinBlocks)
    attention_kernel(const AttentionParams p) {
  using Cfg = AttentionConfig<D, PV, Warps>;
  constexpr int kBlockQ = Cfg::kBlockQ;
  using KTile = typename Cfg::KTile;
  using VTile = typename Cfg::VTile;
  using QTile = typename Cfg::QTile;
  constexpr bool kFp8 = Cfg::kFp8;
  constexpr int kStages = Cfg::kStages;
  constexpr int kKSteps = D / 32;   // m16n8k32 steps over the head dim for S
  constexpr int kDTiles = D / 8;    // n-tiles of O

  extern __shared__ __align__(128) unsigned char smem[];

  const int tiles_q = gridDim.x;
  const int q_tile = p.causal ? tiles_q - 1 - static_cast<int>(blockIdx.x) : static_cast<int>(blockIdx.x);
  const int hq = blockIdx.y, b = blockIdx.z;
  const int hkv = hq / p.kv_group;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int q0 = q_tile * kBlockQ;
  const int warp_row0 = q0 + warp * 16;
  const int causal_offset = p.tokens_k - p.tokens_q;

  // ---- which key tiles this CTA visits -----------------------------------------------------------------
  int limit = (p.tokens_k + kBlockK - 1) / kBlockK;
  if (p.causal) {
    const int last_row = min(q0 + kBlockQ, p.tokens_q) - 1;
    const int last_key = last_row + causal_offset;
    limit = last_key < 0 ? 0 : min(limit, last_key / kBlockK + 1);
  }
  TileList tiles{p.mask_mode, limit, p.mask_tiles_k, 0, p.mask_blocks_k, nullptr, nullptr};
  if (p.mask_mode != static_cast<int>(MaskMode::None)) {
    const int mq = q0 / p.mask_block_q;
    if (p.mask_mode == static_cast<int>(MaskMode::Lut)) {
      const int64_t row = (static_cast<int64_t>(b) * p.heads_q + hq) * p.mask_blocks_q + mq;
      tiles.count = min(max(__ldg(p.mask_counts + row), 0), p.mask_blocks_k);
      tiles.indices = p.mask_indices + row * p.mask_blocks_k;
    } else {
      const int hm = hq / (p.heads_q / p.mask_heads);
      const int64_t row = (static_cast<int64_t>(b) * p.mask_heads + hm) * p.mask_blocks_q + mq;
      tiles.bits = p.mask_bitmap + row * p.mask_blocks_k;
    }
  }
  TileCursor walker;
  walker.settle(tiles);
  TileCursor loader = walker;

  // ---- global sources -----------------------------------------------------------------------------------
  const int8_t* k8 = p.k8 + (static_cast<int64_t>(b) * p.heads_kv + hkv) * p.tokens_k * D;
  const float* k_scale = p.k_scale + (static_cast<int64_t>(b) * p.heads_kv + hkv) * p.k_groups;
  const uint8_t* v8t = nullptr;
  const unsigned char* v16 = nullptr;
  if constexpr (kFp8) {
    v8t = p.v8t + (static_cast<int64_t>(b) * p.heads_kv + hkv) * D * static_cast<int64_t>(p.vt_stride);
  } else {
    v16 = static_cast<const unsigned char*>(p.v) + 2 * (b * p.v_stride_b + hkv * p.v_stride_h);
  }
  const uint32_t smem_base = smem_address(smem);

  auto load_tile = [&](int tile, int stage) {
    const uint32_t k_dst = smem_base + stage * Cfg::kStageBytes;
    const uint32_t v_dst = k_dst + KTile::kBytes;
    const int key0 = tile * kBlockK;
    const int valid = p.tokens_k - key0;
    const unsigned char* k_src = reinterpret_cast<const unsigned char*>(k8) + static_cast<int64_t>(key0) * D;
    KTile::template load<Cfg::kThreads>(k_dst, k_src, D, valid);
    if constexpr (kFp8) {
      VTile::template load<Cfg::kThreads>(v_dst, v8t + key0, p.vt_stride, D);
    } else {
      const unsigned char* v_src = v16 + 2 * static_cast<int64_t>(key0) * p.v_stride_t;
      VTile::template load<Cfg::kThreads>(v_dst, v_src, 2 * p.v_stride_t, valid);
    }
  };

  // Q (INT8) once into shared memory, in the first cp.async group; then the first kStages-1 key tiles.
  const uint32_t q_smem = smem_base + kStages * Cfg::kStageBytes;
  const int8_t* q8 = p.q8 + ((static_cast<int64_t>(b) * p.heads_q + hq) * p.tokens_q + q0) * D;
  QTile::template load<Cfg::kThreads>(q_smem, reinterpret_cast<const unsigned char*>(q8), D, p.tokens_q - q0);
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (loader.tile >= 0) {
      load_tile(loader.tile, s);
      loader.next(tiles);
    }
    cp_async_commit();
  }

  float q_scale = 0.0f;
  if (warp_row0 < p.tokens_q && limit > 0) {
    const float* qs = p.q_scale + (static_cast<int64_t>(b) * p.heads_q + hq) * p.q_groups;
    if (p.granularity == static_cast<int>(Granularity::PerBlock)) q_scale = qs[q0 / 128];
    else if (p.granularity == static_cast<int>(Granularity::PerWarp)) q_scale = qs[warp_row0 / 16];
    else q_scale = qs[(warp_row0 / 16) * 8 + g];
  }

  // Per-lane shared-memory offsets of the ldmatrix row addresses (see SwizzledTile).
  const int mi = lane / 8;
  const int q_lane = QTile::offset(warp * 16 + (mi % 2) * 8 + lane % 8, mi / 2);
  const int k_lane = KTile::offset((mi / 2) * 8 + lane % 8, mi % 2);
  const int v_lane = kFp8 ? VTile::offset(lane % 8, mi) : VTile::offset((mi % 2) * 8 + lane % 8, mi / 2);

  float o[kDTiles][4];
#pragma unroll
  for (int i = 0; i < kDTiles; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.0f, 0.0f};  // this thread's partial sums (of P·448 on the FP8 path)
  const bool pv_skip = p.pv_threshold != nullptr;
  const float pv_lambda = pv_skip ? p.pv_threshold[hq] : 0.0f;
  unsigned long long pv_skipped = 0, pv_total = 0;  // stage-2 statistics of this warp

  for (int it = 0; walker.tile >= 0; ++it) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    if (loader.tile >= 0) {
      load_tile(loader.tile, (it + kStages - 1) % kStages);
      loader.next(tiles);
    }
    cp_async_commit();

    const int tile = walker.tile;
    walker.next(tiles);  // here, so that a tile skipped by stage 2 can `continue`
    const int stage = it % kStages;
    const uint32_t k_smem = smem_base + stage * Cfg::kStageBytes;
    const uint32_t v_smem = k_smem + KTile::kBytes;

    // K scales first: their loads are in flight during the MMAs. The logit is acc · (q_scale · k_scale).
    float qk_scale0, qk_scale1;
    if (p.granularity == static_cast<int>(Granularity::PerThread)) {
      qk_scale0 = q_scale * __ldg(k_scale + tile * 8 + 2 * t);
      qk_scale1 = q_scale * __ldg(k_scale + tile * 8 + 2 * t + 1);
    } else {
      qk_scale0 = qk_scale1 = q_scale * __ldg(k_scale + tile);
    }

    // ---- S = Q8 · K8ᵀ over 64 keys (8 n-tiles of 8) --------------------------------------------------------
    int acc[8][4];
#pragma unroll
    for (int n = 0; n < 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0;
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
      // A fragment of rows warp*16..+15, channels 32kk..+31: matrices (rows 0-7 | 8-15) x (chunk 2kk | 2kk+1)
      uint32_t qa[4];
      ldmatrix_x4(qa, q_smem + (q_lane ^ (2 * kk << 4)));
#pragma unroll
      for (int n = 0; n < 8; n += 2) {
        // matrices: (n, chunk 2kk), (n, 2kk+1), (n+1, 2kk), (n+1, 2kk+1)
        uint32_t r[4];
        ldmatrix_x4(r, k_smem + n * 8 * D + (k_lane ^ (2 * kk << 4)));
        mma_s8_16x8x32(acc[n], qa, r[0], r[1]);
        mma_s8_16x8x32(acc[n + 1], qa, r[2], r[3]);
      }
    }

    // ---- dequantize to base-2 logits, mask, online softmax ----------------------------------------------------
    float s[8][4];
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      s[n][0] = exact_int_to_float(acc[n][0]) * qk_scale0;
      s[n][1] = exact_int_to_float(acc[n][1]) * qk_scale1;
      s[n][2] = exact_int_to_float(acc[n][2]) * qk_scale0;
      s[n][3] = exact_int_to_float(acc[n][3]) * qk_scale1;
    }
    const int key0 = tile * kBlockK;
    const bool needs_mask = key0 + kBlockK > p.tokens_k || (p.causal && key0 + kBlockK - 1 > warp_row0 + causal_offset);
    if (needs_mask) {
#pragma unroll
      for (int n = 0; n < 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = key0 + n * 8 + 2 * t + (e & 1);
          const int row = warp_row0 + g + 8 * (e >> 1);
          if (key >= p.tokens_k || (p.causal && key > row + causal_offset)) s[n][e] = -INFINITY;
        }
      }
    }
    float tile_max[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float mx = -INFINITY;
#pragma unroll
      for (int n = 0; n < 8; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * h], s[n][2 * h + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      tile_max[h] = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    }
    if (pv_skip) {
      // SpargeAttn stage 2: the warp (one 16-row group) skips exp, row sum and P·V of this tile when every
      // row that sees a key of it has its tile max more than λ below its running max.
      bool active = false, needed = false;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const bool row_active = warp_row0 + g + 8 * h < p.tokens_q && tile_max[h] != -INFINITY;
        active |= row_active;
        needed |= row_active && !(tile_max[h] < row_max[h] - pv_lambda);
      }
      const bool visited = __any_sync(0xffffffffu, active);
      if (visited) ++pv_total;
      if (visited && !__any_sync(0xffffffffu, needed)) {
        ++pv_skipped;
        continue;
      }
    }
    float alpha[2], shift[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float mx = fmaxf(row_max[h], tile_max[h]);
      const float use = mx == -INFINITY ? 0.0f : mx;
      alpha[h] = fast_exp2(row_max[h] - use);
      row_max[h] = mx;
      shift[h] = kFp8 ? use - kLog2Of448 : use;
    }
    float sum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int n = 0; n < 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[n][e] = fast_exp2(s[n][e] - shift[e >> 1]);
        sum[e >> 1] += s[n][e];
      }
    }
    row_sum[0] = row_sum[0] * alpha[0] + sum[0];
    row_sum[1] = row_sum[1] * alpha[1] + sum[1];
    // FP16 P·V accumulates into O in the MMA, so O is rescaled first, and only when some row of the warp got a
    // new maximum (most tiles, after the first few, do not). FP8 P·V folds it into O = O·alpha + tile below.
    if (!kFp8 && __any_sync(0xffffffffu, alpha[0] != 1.0f || alpha[1] != 1.0f)) {
#pragma unroll
      for (int d = 0; d < kDTiles; ++d) {
        o[d][0] *= alpha[0];
        o[d][1] *= alpha[0];
        o[d][2] *= alpha[1];
        o[d][3] *= alpha[1];
      }
    }

    // ---- O += P · V ---------------------------------------------------------------------------------------------
    if constexpr (kFp8) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 890
      uint32_t pa[2][4];  // two 32-key chunks, keys in permuted_key order
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        pa[c][0] = pack_e4m3x2(s[4 * c][0], s[4 * c][1]) | (pack_e4m3x2(s[4 * c + 1][0], s[4 * c + 1][1]) << 16);
        pa[c][1] = pack_e4m3x2(s[4 * c][2], s[4 * c][3]) | (pack_e4m3x2(s[4 * c + 1][2], s[4 * c + 1][3]) << 16);
        pa[c][2] =
            pack_e4m3x2(s[4 * c + 2][0], s[4 * c + 2][1]) | (pack_e4m3x2(s[4 * c + 3][0], s[4 * c + 3][1]) << 16);
        pa[c][3] =
            pack_e4m3x2(s[4 * c + 2][2], s[4 * c + 2][3]) | (pack_e4m3x2(s[4 * c + 3][2], s[4 * c + 3][3]) << 16);
      }
#pragma unroll
      for (int d = 0; d < kDTiles; ++d) {
        // matrices: channels 8d..8d+7, key chunks 0..3 (16 keys each) -> b0,b1 of chunk 0 and of chunk 1
        uint32_t r[4];
        ldmatrix_x4(r, v_smem + d * 8 * kBlockK + v_lane);
        float tile_acc[4];
        mma_e4m3_16x8x32_zero(tile_acc, pa[0], r[0], r[1]);
        mma_e4m3_16x8x32(tile_acc, pa[1], r[2], r[3]);
        o[d][0] = fmaf(o[d][0], alpha[0], tile_acc[0]);
        o[d][1] = fmaf(o[d][1], alpha[0], tile_acc[1]);
        o[d][2] = fmaf(o[d][2], alpha[1], tile_acc[2]);
        o[d][3] = fmaf(o[d][3], alpha[1], tile_acc[3]);
      }
#endif
    } else {
      constexpr bool kBf16 = PV == PVMode::Bf16;
#pragma unroll
      for (int c = 0; c < 4; ++c) {  // 16-key chunks
        uint32_t pa[4];
        pa[0] = pack_16bit_x2<kBf16>(s[2 * c][0], s[2 * c][1]);
        pa[1] = pack_16bit_x2<kBf16>(s[2 * c][2], s[2 * c][3]);
        pa[2] = pack_16bit_x2<kBf16>(s[2 * c + 1][0], s[2 * c + 1][1]);
        pa[3] = pack_16bit_x2<kBf16>(s[2 * c + 1][2], s[2 * c + 1][3]);
#pragma unroll
        for (int d = 0; d < kDTiles; d += 2) {
          // matrices: (keys 16c..+7, ch 8d), (keys 16c+8.., ch 8d), (16c.., 8d+8), (16c+8.., 8d+8)
          uint32_t r[4];
          ldmatrix_x4_trans(r, v_smem + c * 16 * 2 * D + (v_lane ^ (d << 4)));
          mma_16bit_16x8x16<kBf16>(o[d], pa, r[0], r[1]);
          mma_16bit_16x8x16<kBf16>(o[d + 1], pa, r[2], r[3]);
        }
      }
    }
  }
  cp_async_wait<0>();
  if (p.pv_counters != nullptr && lane == 0) {
    atomicAdd(p.pv_counters, pv_skipped);
    atomicAdd(p.pv_counters + 1, pv_total);
  }

  // ---- epilogue: O / l (· v_scale), LSE ------------------------------------------------------------------------
  float inv[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float l = row_sum[h];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    row_sum[h] = l;
    inv[h] = l > 0.0f ? 1.0f / l : 0.0f;
  }
  const float* v_scale = nullptr;
  if constexpr (kFp8) v_scale = p.v_scale + (static_cast<int64_t>(b) * p.heads_kv + hkv) * D;
  unsigned char* out = static_cast<unsigned char*>(p.out) + 2 * (b * p.o_stride_b + hq * p.o_stride_h);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = warp_row0 + g + 8 * h;
    if (row >= p.tokens_q) continue;
    unsigned char* out_row = out + 2 * (static_cast<int64_t>(row) * p.o_stride_t);
#pragma unroll
    for (int d = 0; d < kDTiles; ++d) {
      const int c = d * 8 + 2 * t;
      float x0 = o[d][2 * h] * inv[h], x1 = o[d][2 * h + 1] * inv[h];
      if constexpr (kFp8) {
        x0 *= __ldg(v_scale + c);
        x1 *= __ldg(v_scale + c + 1);
      }
      const uint32_t packed = p.out_bf16 ? pack_16bit_x2<true>(x0, x1) : pack_16bit_x2<false>(x0, x1);
      unsigned char* dst = out_row + 2 * c;
      if ((reinterpret_cast<uintptr_t>(dst) & 3u) == 0) {
        *reinterpret_cast<uint32_t*>(dst) = packed;
      } else {
        reinterpret_cast<uint16_t*>(dst)[0] = static_cast<uint16_t>(packed & 0xffffu);
        reinterpret_cast<uint16_t*>(dst)[1] = static_cast<uint16_t>(packed >> 16);
      }
    }
    if (p.lse != nullptr && t == 0) {
      float lse = -INFINITY;
      if (row_sum[h] > 0.0f) {
        const float log2_l = __log2f(row_sum[h]) - (kFp8 ? kLog2Of448 : 0.0f);
        lse = kLn2 * (row_max[h] + log2_l);
        if (p.q_km != nullptr) lse += p.q_km[(static_cast<int64_t>(b) * p.heads_q + hq) * p.tokens_q + row];
      }
      p.lse[b * p.l_stride_b + hq * p.l_stride_h + static_cast<int64_t>(row) * p.l_stride_t] = lse;
    }
  }
}

// Host side of one instantiation: raises the dynamic shared-memory limit and launches.
template <int D, PVMode PV, int Warps>
int launch_attention_warps(const AttentionParams& params, void* stream) {
  using Cfg = AttentionConfig<D, PV, Warps>;
  int device = 0, smem_limit = 0;
  if (const cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) return static_cast<int>(e);
  if (const cudaError_t e = cudaDeviceGetAttribute(&smem_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
      e != cudaSuccess)
    return static_cast<int>(e);
  if (Cfg::kSmemBytes > smem_limit) return kLaunchNeedsMoreSharedMemory;
  // Per call (cheap): the attribute belongs to the current device.
  const cudaError_t attribute_status = cudaFuncSetAttribute(
      attention_kernel<D, PV, Warps>, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes);
  if (attribute_status != cudaSuccess) return static_cast<int>(attribute_status);
  const dim3 grid((params.tokens_q + Cfg::kBlockQ - 1) / Cfg::kBlockQ, params.heads_q, params.batch);
  attention_kernel<D, PV, Warps><<<grid, Cfg::kThreads, Cfg::kSmemBytes, static_cast<cudaStream_t>(stream)>>>(params);
  return static_cast<int>(cudaGetLastError());
}

// Warps per CTA: 4 (BLOCK_Q = 64). Measured on the H100 (B=4 H=32 N=16K, dense, kernel-only TOPS, 8 warps ->
// 4 warps): D128 FP16 P·V 356 -> 373, D128 FP8 P·V 288 -> 322, D64 FP16 304 -> 313, D64 FP8 251 -> 265: with
// 168 registers three CTAs (12 warps) share an SM, against one CTA of 8 warps at 255 registers. The kernel
// template takes 8 as well (BLOCK_Q = 128).
constexpr int kAttentionWarps = kAttentionBlockQ / 16;

template <int D, PVMode PV>
int launch_attention(const AttentionParams& params, void* stream) {
  return launch_attention_warps<D, PV, kAttentionWarps>(params, stream);
}

}  // namespace sparq::cuda
