// The per-warp pieces of the quantized attention kernels that the mma.sync kernel (attention_kernel.cuh) and the
// wgmma kernels (attention_sm90a.cuh) share: which key tiles a CTA visits, the Q and K scales, dequantization and
// masking of the logits, the online softmax update, the e4m3 P fragment, and the epilogue (O / l, LSE).
// Numerics: docs/NUMERICS.md. Every helper is __forceinline__ and takes its fragments by reference, so the
// kernels compile to the code they had with the pieces written inline.
//
// Per-thread layouts (mma.cuh; the wgmma accumulators of one warp are the same registers, wgmma.cuh):
// g = lane / 4, t = lane % 4; a warp owns 16 query rows warp_row0..warp_row0+15.
//   s[n][e] / acc[n][e], n-tile n of a 64-key tile: row warp_row0 + g + 8·(e >> 1), key 8n + 2t + (e & 1).
//   o[d][e], n-tile d of O:                         row warp_row0 + g + 8·(e >> 1), channel 8d + 2t + (e & 1).
//   Per-row values [h]: row warp_row0 + g + 8h.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_registry.hpp"
#include "mma.cuh"

namespace sparq::cuda {

constexpr float kLog2E = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kLog2Of448 = 8.807354922057604f;  // the e4m3 offset: P·448 = exp2(s − m + log2 448)

// float(x) for |x| < 2^22 on the full-rate FP32 pipe (I2F runs at a quarter of the rate): the bits of
// 1.5·2^23 + x read as a float are exactly 1.5·2^23 + x. |Q8·K8| <= 127²·256 < 2^22 for head dims <= 256.
__device__ __forceinline__ float exact_int_to_float(int x) {
  return __int_as_float(0x4B400000 + x) - 12582912.0f;
}

// Where the rows of a CTA and of this thread lie. A CTA computes BlockQ query rows of one (batch, query head);
// causal grids run the query tiles last-first (the longest rows start first).
struct RowCoords {
  int hq, b, hkv;        // query head, batch, kv head
  int warp, lane, g, t;  // g = lane / 4, t = lane % 4: the fragment coordinates (mma.cuh)
  int q0, warp_row0;     // the CTA's first query row, the warp's (16 rows each)
  int causal_offset;     // key k is visible to row r when k <= r + causal_offset
};
template <int BlockQ>
__device__ __forceinline__ RowCoords row_coords(const AttentionParams& p) {
  RowCoords c;
  const int tiles_q = gridDim.x;
  const int q_tile = p.causal ? tiles_q - 1 - static_cast<int>(blockIdx.x) : static_cast<int>(blockIdx.x);
  c.hq = blockIdx.y;
  c.b = blockIdx.z;
  c.hkv = c.hq / p.kv_group;
  c.warp = threadIdx.x / 32;
  c.lane = threadIdx.x % 32;
  c.g = c.lane / 4;
  c.t = c.lane % 4;
  c.q0 = q_tile * BlockQ;
  c.warp_row0 = c.q0 + c.warp * 16;
  c.causal_offset = p.tokens_k - p.tokens_q;
  return c;
}

// The key tiles one CTA visits, ascending: all of [0, limit), or those its mask row lists (a LUT row, or the set
// bytes of a bitmap row; each mask block covering `sub` tiles), stopping at `limit` (sequence end or causal
// diagonal). The loader walks it kStages-1 tiles ahead; the consumers walk it again (sm90a kernels) or read each
// stage's tile from shared memory (mma.sync).
struct TileList {
  int mode, limit, sub, count, blocks;
  const int32_t* indices;
  const uint8_t* bits;
};
// A cursor is advanced by whole warps (every lane, converged): the bitmap scan is warp-cooperative. The LUT entry
// after the current one is loaded one step early, so its latency hides behind a tile's work instead of stalling
// the walk. tile = -1: the list is done (blocks ascend, so a block past the limit ends it).
struct TileCursor {
  int entry = 0, part = 0, tile = -1;
  int ahead = -1;  // LUT: the block of entry + 1

  // A cursor on the first tile of the list.
  __device__ static __forceinline__ TileCursor first(const TileList& l) {
    TileCursor c;
    int block = -1;
    if (l.mode == static_cast<int>(MaskMode::Lut)) {
      if (l.count > 0) block = __ldg(l.indices);
      if (l.count > 1) c.ahead = __ldg(l.indices + 1);
    }
    c.settle(l, block);
    return c;
  }

  // The first tile of entry (part 0); lut_block: the LUT's block of entry.
  __device__ __forceinline__ void settle(const TileList& l, int lut_block) {
    if (l.mode == static_cast<int>(MaskMode::None)) {
      tile = entry < l.limit ? entry : -1;
      return;
    }
    int b;
    if (l.mode == static_cast<int>(MaskMode::Lut)) {
      if (entry >= l.count) { tile = -1; return; }
      b = lut_block;
    } else {
      // The next set byte at or after entry, 32 bytes per step: lane i tests entry + i.
      const int lane = threadIdx.x % 32;
      while (entry < l.blocks) {
        const int i = entry + lane;
        const unsigned set = __ballot_sync(0xffffffffu, i < l.blocks && __ldg(l.bits + i) != 0);
        if (set != 0) {
          entry += __ffs(set) - 1;
          break;
        }
        entry += 32;
      }
      if (entry >= l.blocks) { tile = -1; return; }
      b = entry;
    }
    const int t = b * l.sub;
    tile = (b >= 0 && t < l.limit) ? t : -1;
  }
  __device__ __forceinline__ void next(const TileList& l) {
    if (l.mode == static_cast<int>(MaskMode::None)) {
      ++entry;
      tile = entry < l.limit ? entry : -1;
      return;
    }
    if (++part < l.sub) {  // the block's next tile
      tile = tile >= 0 && tile + 1 < l.limit ? tile + 1 : -1;
      return;
    }
    part = 0;
    ++entry;
    int block = -1;
    if (l.mode == static_cast<int>(MaskMode::Lut)) {
      block = ahead;
      ahead = entry + 1 < l.count ? __ldg(l.indices + entry + 1) : -1;
    }
    settle(l, block);
  }
};

// The tile list of the CTA whose query rows start at q0 (BlockQ rows) in (batch b, query head hq): the key tiles
// up to the sequence end, cut at the causal diagonal of its last row, restricted to its mask row. A mask has one
// row set per mask head (Hq for a LUT; Hm for a bitmap, walked as it is or made a LUT by the backend).
template <int BlockQ>
__device__ __forceinline__ TileList setup_tile_list(const AttentionParams& p, int b, int hq, int q0,
                                                    int causal_offset) {
  int limit = (p.tokens_k + kBlockK - 1) / kBlockK;
  if (p.causal) {
    const int last_row = min(q0 + BlockQ, p.tokens_q) - 1;
    const int last_key = last_row + causal_offset;
    limit = last_key < 0 ? 0 : min(limit, last_key / kBlockK + 1);
  }
  TileList tiles{p.mask_mode, limit, p.mask_tiles_k, 0, p.mask_blocks_k, nullptr, nullptr};
  if (p.mask_mode != static_cast<int>(MaskMode::None)) {
    const int hm = hq / (p.heads_q / p.mask_heads);
    const int64_t row = (static_cast<int64_t>(b) * p.mask_heads + hm) * p.mask_blocks_q + q0 / p.mask_block_q;
    if (p.mask_mode == static_cast<int>(MaskMode::Lut)) {
      tiles.count = min(max(__ldg(p.mask_counts + row), 0), p.mask_blocks_k);
      tiles.indices = p.mask_indices + row * p.mask_blocks_k;
    } else {
      tiles.bits = p.mask_bitmap + row * p.mask_blocks_k;
    }
  }
  return tiles;
}

// The INT8 K rows and the K scales of kv head hkv of batch b, and its transposed e4m3 V (v8t, when Fp8).
template <int D, bool Fp8>
struct KvSources {
  const int8_t* k8;
  const float* k_scale;
  const uint8_t* v8t;
  __device__ __forceinline__ KvSources(const AttentionParams& p, int b, int hkv)
      : k8(p.k8 + (static_cast<int64_t>(b) * p.heads_kv + hkv) * p.tokens_k * D),
        k_scale(p.k_scale + (static_cast<int64_t>(b) * p.heads_kv + hkv) * p.k_groups),
        v8t(Fp8 ? p.v8t + (static_cast<int64_t>(b) * p.heads_kv + hkv) * D * static_cast<int64_t>(p.vt_stride)
                : nullptr) {}
};

// Q (INT8) once into shared memory at q_smem, in the first cp.async group; then the first Stages-1 tiles of the
// list, one group each (committed even when the list is shorter, so that the kernels' group counts hold).
// load_tile(tile, stage) issues the copies of one key tile; thread 0 records each stage's tile in stage_tile
// (-1 past the list's end), which the other threads read once a barrier has passed.
template <typename QTile, int Threads, int D, int Stages, typename LoadTile>
__device__ __forceinline__ void start_pipeline(const AttentionParams& p, int b, int hq, int q0, uint32_t q_smem,
                                               const TileList& tiles, TileCursor& loader, LoadTile& load_tile,
                                               int* stage_tile) {
  const int8_t* q8 = p.q8 + ((static_cast<int64_t>(b) * p.heads_q + hq) * p.tokens_q + q0) * D;
  QTile::template load<Threads>(q_smem, reinterpret_cast<const unsigned char*>(q8), D, p.tokens_q - q0);
#pragma unroll
  for (int s = 0; s < Stages - 1; ++s) {
    if (threadIdx.x == 0) stage_tile[s] = loader.tile;
    if (loader.tile >= 0) {
      load_tile(loader.tile, s);
      loader.next(tiles);
    }
    cp_async_commit();
  }
}

// The cp.async copies of key tile `tile` into the stage at k_dst (K, then V at k_dst + KTile::kBytes): INT8 K rows
// past the sequence end zero-filled; V as the transposed e4m3 v8t (Fp8) or the caller's fp16/bf16 rows (v16).
template <typename Cfg, int D, bool Fp8>
__device__ __forceinline__ void load_kv_tile(const AttentionParams& p, uint32_t k_dst, int tile, const int8_t* k8,
                                             const uint8_t* v8t, const unsigned char* v16) {
  using KTile = typename Cfg::KTile;
  using VTile = typename Cfg::VTile;
  const uint32_t v_dst = k_dst + KTile::kBytes;
  const int key0 = tile * kBlockK;
  const int valid = p.tokens_k - key0;
  const unsigned char* k_src = reinterpret_cast<const unsigned char*>(k8) + static_cast<int64_t>(key0) * D;
  KTile::template load<Cfg::kThreads>(k_dst, k_src, D, valid);
  if constexpr (Fp8) {
    VTile::template load<Cfg::kThreads>(v_dst, v8t + key0, p.vt_stride, D);
  } else {
    const unsigned char* v_src = v16 + 2 * static_cast<int64_t>(key0) * p.v_stride_t;
    VTile::template load<Cfg::kThreads>(v_dst, v_src, 2 * p.v_stride_t, valid);
  }
}

// This thread's Q scale (row group of warp_row0 + g); 0 for a warp past the last row or a CTA with no key tile.
__device__ __forceinline__ float load_q_scale(const AttentionParams& p, int b, int hq, int q0, int warp_row0, int g,
                                              int limit) {
  float q_scale = 0.0f;
  if (warp_row0 < p.tokens_q && limit > 0) {
    const float* qs = p.q_scale + (static_cast<int64_t>(b) * p.heads_q + hq) * p.q_groups;
    if (p.granularity == static_cast<int>(Granularity::PerBlock)) q_scale = qs[q0 / 128];
    else if (p.granularity == static_cast<int>(Granularity::PerWarp)) q_scale = qs[warp_row0 / 16];
    else q_scale = qs[(warp_row0 / 16) * 8 + g];
  }
  return q_scale;
}

// The logit factors q_scale · k_scale of this thread's two key columns (2t, 2t+1 of each n-tile) in `tile`.
// The lane offset 2t is added unsigned (t >= 0): this body is optimized before it is inlined, where t's range is
// unknown, and a signed offset there made the compiler form the addresses differently from the inline code it
// replaces, which cost the FP16 mma.sync kernels a 4-16 byte spill.
__device__ __forceinline__ void qk_scales(int granularity, const float* k_scale, float q_scale, int tile, int t,
                                          float& qk_scale0, float& qk_scale1) {
  if (granularity == static_cast<int>(Granularity::PerThread)) {
    const float* ks = k_scale + tile * 8 + 2 * static_cast<unsigned>(t);
    qk_scale0 = q_scale * __ldg(ks);
    qk_scale1 = q_scale * __ldg(ks + 1);
  } else {
    qk_scale0 = qk_scale1 = q_scale * __ldg(k_scale + tile);
  }
}

// Base-2 logits s = float(acc) · (q_scale · k_scale) of one 64-key tile. IntToFloat picks how float(acc) is formed
// (both exact for |acc| < 2^22): exact_int_to_float (two full-rate FP32/INT ops) or cvt.rn.f32.s32 (one
// instruction, I2FP on sm_90), whichever the kernel measured faster.
struct MagicIntToFloat {
  __device__ __forceinline__ float operator()(int x) const { return exact_int_to_float(x); }
};
struct CvtIntToFloat {
  __device__ __forceinline__ float operator()(int x) const { return __int2float_rn(x); }
};
template <typename IntToFloat = MagicIntToFloat>
__device__ __forceinline__ void dequantize_logits(const int (&acc)[8][4], float qk_scale0, float qk_scale1,
                                                  float (&s)[8][4]) {
  const IntToFloat to_float;
#pragma unroll
  for (int n = 0; n < 8; ++n) {
    s[n][0] = to_float(acc[n][0]) * qk_scale0;
    s[n][1] = to_float(acc[n][1]) * qk_scale1;
    s[n][2] = to_float(acc[n][2]) * qk_scale0;
    s[n][3] = to_float(acc[n][3]) * qk_scale1;
  }
}

// -inf for the keys of the tile at key0 past the sequence end or (causal) past the row's diagonal; the per-element
// test runs only for a tile that reaches either.
__device__ __forceinline__ void mask_tile_elements(const AttentionParams& p, int key0, int warp_row0, int g, int t,
                                                   int causal_offset, float (&s)[8][4]) {
  const bool needs_mask =
      key0 + kBlockK > p.tokens_k || (p.causal && key0 + kBlockK - 1 > warp_row0 + causal_offset);
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
}

// The max of each of this thread's two rows over the tile (the 4 threads of a row group reduce by shuffles).
__device__ __forceinline__ void tile_row_max(const float (&s)[8][4], float (&tile_max)[2]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float mx = -INFINITY;
#pragma unroll
    for (int n = 0; n < 8; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * h], s[n][2 * h + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    tile_max[h] = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
  }
}

// SpargeAttn stage 2: whether the warp (one 16-row group) skips exp, row sum and P·V of this tile, which it does
// when every row that sees a key of it has its tile max more than λ below its running max. Counts the tiles the
// warp visits and skips.
template <typename Count>
__device__ __forceinline__ bool stage2_skips_tile(const float (&tile_max)[2], const float (&row_max)[2],
                                                  float pv_lambda, int warp_row0, int g, int tokens_q,
                                                  Count& pv_skipped, Count& pv_total) {
  bool active = false, needed = false;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const bool row_active = warp_row0 + g + 8 * h < tokens_q && tile_max[h] != -INFINITY;
    active |= row_active;
    needed |= row_active && !(tile_max[h] < row_max[h] - pv_lambda);
  }
  const bool visited = __any_sync(0xffffffffu, active);
  if (visited) ++pv_total;
  if (visited && !__any_sync(0xffffffffu, needed)) {
    ++pv_skipped;
    return true;
  }
  return false;
}

// The new running maxima of a tile's rows, alpha = exp2(old max − new max) (the factor of the old O and l), and
// minus_shift, the negated shift that takes the logits to P = exp2(logit − shift) (P·448 when P448, for e4m3 P:
// the shift is then max − log2 448). A row with no key yet keeps max -inf and uses 0 for it. (Adding
// minus_shift is subtracting the shift, bit for bit.)
template <bool P448>
__device__ __forceinline__ void update_row_max(const float (&tile_max)[2], float (&row_max)[2], float (&alpha)[2],
                                               float (&minus_shift)[2]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float mx = fmaxf(row_max[h], tile_max[h]);
    const float use = mx == -INFINITY ? 0.0f : mx;
    alpha[h] = fast_exp2(row_max[h] - use);
    row_max[h] = mx;
    minus_shift[h] = P448 ? kLog2Of448 - use : -use;
  }
}

// Online softmax of one tile: update_row_max, s -> P = exp2(s − shift) in place, and this thread's partial row sums
// l = l·alpha + Σ P.
template <bool P448>
__device__ __forceinline__ void online_softmax_update(float (&s)[8][4], const float (&tile_max)[2],
                                                      float (&row_max)[2], float (&row_sum)[2], float (&alpha)[2]) {
  float minus_shift[2];
  update_row_max<P448>(tile_max, row_max, alpha, minus_shift);
  float sum[2] = {0.0f, 0.0f};
#pragma unroll
  for (int n = 0; n < 8; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s[n][e] = fast_exp2(s[n][e] + minus_shift[e >> 1]);
      sum[e >> 1] += s[n][e];
    }
  }
  row_sum[0] = row_sum[0] * alpha[0] + sum[0];
  row_sum[1] = row_sum[1] * alpha[1] + sum[1];
}

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 890
// P (·448) as the e4m3 A fragments of two 32-key chunks, keys in permuted_key order (the layout of v8t): built
// from the S accumulator without shuffles.
__device__ __forceinline__ void pack_p_e4m3(const float (&s)[8][4], uint32_t (&pa)[2][4]) {
#pragma unroll
  for (int c = 0; c < 2; ++c) {
    pa[c][0] = pack_e4m3x2(s[4 * c][0], s[4 * c][1]) | (pack_e4m3x2(s[4 * c + 1][0], s[4 * c + 1][1]) << 16);
    pa[c][1] = pack_e4m3x2(s[4 * c][2], s[4 * c][3]) | (pack_e4m3x2(s[4 * c + 1][2], s[4 * c + 1][3]) << 16);
    pa[c][2] =
        pack_e4m3x2(s[4 * c + 2][0], s[4 * c + 2][1]) | (pack_e4m3x2(s[4 * c + 3][0], s[4 * c + 3][1]) << 16);
    pa[c][3] =
        pack_e4m3x2(s[4 * c + 2][2], s[4 * c + 2][3]) | (pack_e4m3x2(s[4 * c + 3][2], s[4 * c + 3][3]) << 16);
  }
}
#endif

// O = O·alpha before FP16 P·V accumulates into O in the MMA, only where some row of the warp got a new maximum
// (after the first tiles, most do not): the check is warp-uniform.
template <int DTiles>
__device__ __forceinline__ void rescale_o_on_new_max(float (&o)[DTiles][4], const float (&alpha)[2]) {
  if (!__any_sync(0xffffffffu, alpha[0] != 1.0f || alpha[1] != 1.0f)) return;
#pragma unroll
  for (int d = 0; d < DTiles; ++d) {
    o[d][0] *= alpha[0];
    o[d][1] *= alpha[0];
    o[d][2] *= alpha[1];
    o[d][3] *= alpha[1];
  }
}

// O = O·alpha + tile for one n-tile of O (the two-level accumulation of e4m3 P·V).
__device__ __forceinline__ void fold_tile(float (&o)[4], const float (&tile)[4], const float (&alpha)[2]) {
  o[0] = fmaf(o[0], alpha[0], tile[0]);
  o[1] = fmaf(o[1], alpha[0], tile[1]);
  o[2] = fmaf(o[2], alpha[1], tile[2]);
  o[3] = fmaf(o[3], alpha[1], tile[3]);
}

// The stage-2 statistics of this warp into p.pv_counters (skipped, visited), when the caller asked for them.
__device__ __forceinline__ void add_stage2_counters(const AttentionParams& p, int lane, unsigned long long pv_skipped,
                                                    unsigned long long pv_total) {
  if (p.pv_counters != nullptr && lane == 0) {
    atomicAdd(p.pv_counters, pv_skipped);
    atomicAdd(p.pv_counters + 1, pv_total);
  }
}

// The full row sums l (the 4 threads of a row group add their partial sums) in place, and 1 / l (0 for a row
// that saw no key).
__device__ __forceinline__ void finish_row_sums(float (&row_sum)[2], float (&inv)[2]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float l = row_sum[h];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    row_sum[h] = l;
    inv[h] = l > 0.0f ? 1.0f / l : 0.0f;
  }
}

// The epilogue of this thread's two rows: O / l (· v_scale[channel] when ScaleV: e4m3 V) rounded to the
// output dtype, stored as channel pairs (4-byte stores where the row is aligned for them), and the LSE when asked
// for. log2_lse(m, l) gives the row's base-2 log-sum-exp from its max and sum (the kernels' own rounding order,
// less log2 448 for sums of P·448); LSE = ln 2 · log2_lse (+ q·km of smooth K), -inf for a row that saw no key.
template <int DTiles, bool ScaleV, typename Log2Lse>
__device__ __forceinline__ void store_output_rows(const AttentionParams& p, int b, int hq, int warp_row0, int g,
                                                  int t, const float (&o)[DTiles][4], const float (&inv)[2],
                                                  const float (&row_max)[2], const float (&row_sum)[2],
                                                  const float* v_scale, Log2Lse log2_lse) {
  unsigned char* out = static_cast<unsigned char*>(p.out) + 2 * (b * p.o_stride_b + hq * p.o_stride_h);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = warp_row0 + g + 8 * h;
    if (row >= p.tokens_q) continue;
    const int stored = p.out_rows != nullptr && row < p.out_rows_size ? __ldg(p.out_rows + row) : row;
    unsigned char* out_row = out + 2 * (static_cast<int64_t>(stored) * p.o_stride_t);
#pragma unroll
    for (int d = 0; d < DTiles; ++d) {
      const int c = d * 8 + 2 * t;
      float x0 = o[d][2 * h] * inv[h], x1 = o[d][2 * h + 1] * inv[h];
      if constexpr (ScaleV) {
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
        lse = kLn2 * log2_lse(row_max[h], row_sum[h]);
        if (p.q_km != nullptr) lse += p.q_km[(static_cast<int64_t>(b) * p.heads_q + hq) * p.tokens_q + row];
      }
      p.lse[b * p.l_stride_b + hq * p.l_stride_h + static_cast<int64_t>(stored) * p.l_stride_t] = lse;
    }
  }
}

// Lets `kernel` use Cfg::kSmemBytes of dynamic shared memory on the current device: 0, a cudaError_t, or
// kLaunchNeedsMoreSharedMemory when the device offers less. Per call (cheap): the attribute belongs to the
// current device.
template <typename Cfg, typename Kernel>
int allow_dynamic_smem(Kernel kernel) {
  int device = 0, smem_limit = 0;
  if (const cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) return static_cast<int>(e);
  if (const cudaError_t e = cudaDeviceGetAttribute(&smem_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
      e != cudaSuccess)
    return static_cast<int>(e);
  if (Cfg::kSmemBytes > smem_limit) return kLaunchNeedsMoreSharedMemory;
  return static_cast<int>(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes));
}

// Host side of one kernel instantiation (configuration Cfg): raises its dynamic shared-memory limit and launches
// one CTA per Cfg::kBlockQ query rows of each (query head, batch).
template <typename Cfg, typename Kernel>
int launch_attention_kernel(Kernel kernel, const AttentionParams& params, void* stream) {
  if (const int e = allow_dynamic_smem<Cfg>(kernel); e != 0) return e;
  const dim3 grid((params.tokens_q + Cfg::kBlockQ - 1) / Cfg::kBlockQ, params.heads_q, params.batch);
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, static_cast<cudaStream_t>(stream)>>>(params);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace sparq::cuda
