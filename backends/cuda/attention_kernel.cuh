// The quantized attention kernel (mma.sync path, sm_80 and sm_89), instantiated by the generated
// templates/cuda/attention.cu.j2 translation units per (arch, head dim, P·V precision).
//
// One CTA computes BLOCK_Q = 16·warps query rows (64: 4 warps) of one (batch, query head), 16 rows per warp.
// Q (INT8) is loaded once into shared memory; K (INT8) and V (e4m3 transposed, or the caller's fp16/bf16)
// tiles of BLOCK_K = 64 keys stream through a multi-stage cp.async ring in shared memory (XOR-swizzled
// 16-byte chunks, conflict-free ldmatrix).
// Per key tile: S = Q8·K8ᵀ (int32, m16n8k32) -> dequantized base-2 logits -> online softmax -> P·V
// (m16n8k32 e4m3 with a per-tile accumulator added into O, or m16n8k16 fp16/bf16 straight into O).
// The key tiles visited come from a cursor over the dense range or a LUT (bitmaps arrive as LUTs), cut at the
// causal limit, so a skipped tile costs one index read. Numerics: docs/NUMERICS.md.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "attention_common.cuh"
#include "cuda_registry.hpp"
#include "mma.cuh"

namespace sparq::cuda {

enum class PVMode : int { Fp16 = 0, Bf16 = 1, Fp8 = 2 };

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
  static constexpr int kSmemBytes = kStages * kStageBytes + QTile::kBytes + 4 * kStages;  // + each stage's tile
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

  const RowCoords rc = row_coords<kBlockQ>(p);
  const int hq = rc.hq, b = rc.b, hkv = rc.hkv, warp = rc.warp, lane = rc.lane, g = rc.g, t = rc.t;
  const int q0 = rc.q0, warp_row0 = rc.warp_row0, causal_offset = rc.causal_offset;

  // ---- which key tiles this CTA visits -----------------------------------------------------------------
  // One cursor, the loader's (kStages - 1 tiles ahead); the tile in each stage is kept in shared memory, so the
  // consumers need no cursor of their own (its registers made the FP16 D128 kernel spill).
  const TileList tiles = setup_tile_list<kBlockQ>(p, b, hq, q0, causal_offset);
  TileCursor loader = TileCursor::first(tiles);

  // ---- global sources -----------------------------------------------------------------------------------
  const KvSources<D, kFp8> kv(p, b, hkv);
  const int8_t* k8 = kv.k8;
  const float* k_scale = kv.k_scale;
  const uint8_t* v8t = kv.v8t;
  const unsigned char* v16 = nullptr;
  if constexpr (!kFp8) v16 = static_cast<const unsigned char*>(p.v) + 2 * (b * p.v_stride_b + hkv * p.v_stride_h);
  const uint32_t smem_base = smem_address(smem);

  auto load_tile = [&](int tile, int stage) {
    load_kv_tile<Cfg, D, kFp8>(p, smem_base + stage * Cfg::kStageBytes, tile, k8, v8t, v16);
  };

  // Q (INT8) once into shared memory, in the first cp.async group; then the first kStages-1 key tiles.
  const uint32_t q_smem = smem_base + kStages * Cfg::kStageBytes;
  int* const stage_tile = reinterpret_cast<int*>(smem + kStages * Cfg::kStageBytes + QTile::kBytes);
  start_pipeline<QTile, Cfg::kThreads, D, kStages>(p, b, hq, q0, q_smem, tiles, loader, load_tile, stage_tile);

  const float q_scale = load_q_scale(p, b, hq, q0, warp_row0, g, tiles.limit);

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

  for (int it = 0;; ++it) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // the tile is in shared memory, and its stage_tile entry written (before an earlier barrier)
    const int stage = it % kStages;
    const int tile = stage_tile[stage];
    if (tile < 0) break;  // uniform
    {
      // The stage of tile it - 1, which every thread has finished with (the barrier above).
      const int refill = (it + kStages - 1) % kStages;
      if (threadIdx.x == 0) stage_tile[refill] = loader.tile;
      if (loader.tile >= 0) {
        load_tile(loader.tile, refill);
        loader.next(tiles);
      }
    }
    cp_async_commit();

    const uint32_t k_smem = smem_base + stage * Cfg::kStageBytes;
    const uint32_t v_smem = k_smem + KTile::kBytes;

    // K scales first: their loads are in flight during the MMAs. The logit is acc · (q_scale · k_scale).
    float qk_scale0, qk_scale1;
    qk_scales(p.granularity, k_scale, q_scale, tile, t, qk_scale0, qk_scale1);

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
    dequantize_logits(acc, qk_scale0, qk_scale1, s);
    mask_tile_elements(p, tile * kBlockK, warp_row0, g, t, causal_offset, s);
    float tile_max[2];
    tile_row_max(s, tile_max);
    // SpargeAttn stage 2 (per warp): a skipped tile costs no exp, row sum or P·V.
    if (pv_skip && stage2_skips_tile(tile_max, row_max, pv_lambda, warp_row0, g, p.tokens_q, pv_skipped, pv_total))
      continue;
    float alpha[2];
    online_softmax_update<kFp8>(s, tile_max, row_max, row_sum, alpha);
    // FP16 P·V accumulates into O in the MMA, so O is rescaled first. FP8 P·V folds it into O = O·alpha + tile
    // below.
    if constexpr (!kFp8) rescale_o_on_new_max(o, alpha);

    // ---- O += P · V ---------------------------------------------------------------------------------------------
    if constexpr (kFp8) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 890
      uint32_t pa[2][4];  // two 32-key chunks, keys in permuted_key order
      pack_p_e4m3(s, pa);
#pragma unroll
      for (int d = 0; d < kDTiles; ++d) {
        // matrices: channels 8d..8d+7, key chunks 0..3 (16 keys each) -> b0,b1 of chunk 0 and of chunk 1
        uint32_t r[4];
        ldmatrix_x4(r, v_smem + d * 8 * kBlockK + v_lane);
        float tile_acc[4];
        mma_e4m3_16x8x32_zero(tile_acc, pa[0], r[0], r[1]);
        mma_e4m3_16x8x32(tile_acc, pa[1], r[2], r[3]);
        fold_tile(o[d], tile_acc, alpha);
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
  add_stage2_counters(p, lane, pv_skipped, pv_total);

  // ---- epilogue: O / l (· v_scale), LSE ------------------------------------------------------------------------
  float inv[2];
  finish_row_sums(row_sum, inv);
  const float* v_scale = nullptr;
  if constexpr (kFp8) v_scale = p.v_scale + (static_cast<int64_t>(b) * p.heads_kv + hkv) * D;
  store_output_rows<kDTiles, kFp8>(p, b, hq, warp_row0, g, t, o, inv, row_max, row_sum, v_scale,
                                   [](float m, float l) { return m + (__log2f(l) - (kFp8 ? kLog2Of448 : 0.0f)); });
}

// Host side of one instantiation: raises the dynamic shared-memory limit and launches (attention_common.cuh).
template <int D, PVMode PV, int Warps>
int launch_attention_warps(const AttentionParams& params, void* stream) {
  return launch_attention_kernel<AttentionConfig<D, PV, Warps>>(attention_kernel<D, PV, Warps>, params, stream);
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
