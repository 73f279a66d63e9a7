// The quantized attention kernel of the sm90a path (wgmma), instantiated by the generated
// templates/cuda/attention_sm90a.cu.j2 translation units per head dim (FP8 e4m3 P·V only).
//
// One CTA = one warpgroup (4 warps, 128 threads) computes BLOCK_Q = 64 query rows of one (batch, query head),
// the same tile, mask granularity and numerics (docs/NUMERICS.md) as the mma.sync kernel (attention_kernel.cuh),
// whose shared-memory tiles, tile walker and helpers it reuses. Q (INT8) is loaded once into shared memory;
// K (INT8, [key][channel]) and the transposed e4m3 V ([channel][key], keys permuted inside 32-key chunks) tiles
// of BLOCK_K = 64 keys stream through a cp.async ring. Their SwizzledTile layouts are the wgmma 128B (128-byte
// rows) and 64B (64-byte rows) swizzles, so both operands are read by descriptor (wgmma.cuh).
// Per key tile: S = Q8·K8ᵀ as wgmma m64n64k32 s8·s8 -> s32 (D/32 steps, both operands in shared memory) ->
// dequantized base-2 logits -> online softmax (per warp, as in attention_kernel.cuh) -> P·448 as e4m3 in
// registers (the wgmma A fragment equals the mma.sync one) -> per-tile P·V with wgmma m64nDk32 e4m3 (A from
// registers, Vᵀ from shared memory) -> O = O·alpha + tile (two-level accumulation, as on the sm89 path).
// Several CTAs share an SM, so one CTA's softmax overlaps another's wgmma.
// The stage-2 P·V skip is decided per 16-row warp as on the other paths (a skipping warp feeds P = 0 to the
// warpgroup MMA, which is skipped when all four skip). Not here: FP16/BF16 P·V (the host takes the sm89
// kernels for it).
#pragma once

#include "attention_kernel.cuh"
#include "wgmma.cuh"

#include <cstdlib>

namespace sparq::cuda {

// Which of the two kernels below runs when SPARQ_SM90_OVERLAP is unset: the serial one. H100, B=4 H=32
// N=16K dense, kernel TOPS serial -> overlap: D128 599 -> 530 (3 CTAs of 168 registers per SM against 2 of
// 255), D64 421 -> 373 (4 CTAs of 127 registers against 3 of 168): more resident warpgroups hide the serial
// kernel's MMA latency better than the overlap does with fewer of them.
constexpr bool kSm90OverlapDefault = false;

template <int D>
struct Sm90Config {
  static constexpr int kBlockQ = 64;
  static constexpr int kThreads = 128;
  using KTile = SwizzledTile<kBlockK, D>;  // [key][channel] int8: 128B swizzle (D128) or 64B (D64)
  using VTile = SwizzledTile<D, kBlockK>;  // [channel][key] e4m3: 64B swizzle
  using QTile = SwizzledTile<kBlockQ, D>;
  static constexpr int kStageBytes = KTile::kBytes + VTile::kBytes;  // a multiple of 1024
  static constexpr int kStages = D <= 64 ? 4 : 3;
  static constexpr int kSmemBytes = kStages * kStageBytes + QTile::kBytes + 1024;  // + alignment slack
  static constexpr int kMinBlocks = D <= 64 ? 4 : 3;
  static_assert(kStageBytes % 1024 == 0 && QTile::kBytes % 1024 == 0, "tiles must stay 1024-byte aligned");
};

template <int D, bool Stage2>
__global__ void __launch_bounds__(Sm90Config<D>::kThreads, Sm90Config<D>::kMinBlocks)
    attention_sm90_kernel(const AttentionParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Cfg = Sm90Config<D>;
  constexpr int kBlockQ = Cfg::kBlockQ;
  using KTile = typename Cfg::KTile;
  using VTile = typename Cfg::VTile;
  using QTile = typename Cfg::QTile;
  constexpr int kStages = Cfg::kStages;
  constexpr int kKSteps = D / 32;
  constexpr int kDTiles = D / 8;

  extern __shared__ __align__(1024) unsigned char smem[];

  const int tiles_q = gridDim.x;
  const int q_tile = p.causal ? tiles_q - 1 - static_cast<int>(blockIdx.x) : static_cast<int>(blockIdx.x);
  const int hq = blockIdx.y, b = blockIdx.z;
  const int hkv = hq / p.kv_group;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int q0 = q_tile * kBlockQ;
  const int warp_row0 = q0 + warp * 16;
  const int causal_offset = p.tokens_k - p.tokens_q;

  // ---- which key tiles this CTA visits (as attention_kernel.cuh) --------------------------------------------
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

  const int8_t* k8 = p.k8 + (static_cast<int64_t>(b) * p.heads_kv + hkv) * p.tokens_k * D;
  const float* k_scale = p.k_scale + (static_cast<int64_t>(b) * p.heads_kv + hkv) * p.k_groups;
  const uint8_t* v8t = p.v8t + (static_cast<int64_t>(b) * p.heads_kv + hkv) * D * static_cast<int64_t>(p.vt_stride);
  // The swizzle is a function of the address bits: tiles start at 1024-byte aligned addresses.
  const uint32_t smem_base = (smem_address(smem) + 1023u) & ~1023u;

  auto load_tile = [&](int tile, int stage) {
    const uint32_t k_dst = smem_base + stage * Cfg::kStageBytes;
    const uint32_t v_dst = k_dst + KTile::kBytes;
    const int key0 = tile * kBlockK;
    const unsigned char* k_src = reinterpret_cast<const unsigned char*>(k8) + static_cast<int64_t>(key0) * D;
    KTile::template load<Cfg::kThreads>(k_dst, k_src, D, p.tokens_k - key0);
    VTile::template load<Cfg::kThreads>(v_dst, v8t + key0, p.vt_stride, D);
  };

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

  const uint64_t q_desc = smem_descriptor<D>(q_smem);
  float o[kDTiles * 4];
#pragma unroll
  for (int i = 0; i < kDTiles * 4; ++i) o[i] = 0.0f;
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.0f, 0.0f};  // this thread's partial sums of P·448
  constexpr bool pv_skip = Stage2;  // p.pv_threshold != nullptr: a separate instantiation, without its registers
  const float pv_lambda = pv_skip ? p.pv_threshold[hq] : 0.0f;
  unsigned long long pv_skipped = 0, pv_total = 0;  // stage-2 statistics of this warp

  for (int it = 0; walker.tile >= 0; ++it) {
    cp_async_wait<kStages - 2>();
    fence_proxy_async_shared();
    __syncthreads();  // the tile is in shared memory; every wgmma of the previous iteration has completed
    if (loader.tile >= 0) {
      load_tile(loader.tile, (it + kStages - 1) % kStages);
      loader.next(tiles);
    }
    cp_async_commit();

    const int tile = walker.tile;
    walker.next(tiles);
    const int stage = it % kStages;
    const uint32_t k_smem = smem_base + stage * Cfg::kStageBytes;
    const uint32_t v_smem = k_smem + KTile::kBytes;

    // ---- S = Q8 · K8ᵀ (64 x 64, s32) ---------------------------------------------------------------------------
    int acc[32];
    const uint64_t k_desc = smem_descriptor<D>(k_smem);
    wgmma_fence();
    wgmma_s8_m64n64k32_zero(acc, q_desc, k_desc);
#pragma unroll
    for (int kk = 1; kk < kKSteps; ++kk) wgmma_s8_m64n64k32(acc, q_desc + 2 * kk, k_desc + 2 * kk, 1);
    wgmma_commit();

    // K scales while the MMAs run. The logit is acc · (q_scale · k_scale).
    float qk_scale0, qk_scale1;
    if (p.granularity == static_cast<int>(Granularity::PerThread)) {
      qk_scale0 = q_scale * __ldg(k_scale + tile * 8 + 2 * t);
      qk_scale1 = q_scale * __ldg(k_scale + tile * 8 + 2 * t + 1);
    } else {
      qk_scale0 = qk_scale1 = q_scale * __ldg(k_scale + tile);
    }
    wgmma_wait<0>();
    register_fence(acc);

    // ---- dequantize to base-2 logits, mask, online softmax (per warp, as attention_kernel.cuh) ------------------
    float s[8][4];
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      s[n][0] = exact_int_to_float(acc[4 * n + 0]) * qk_scale0;
      s[n][1] = exact_int_to_float(acc[4 * n + 1]) * qk_scale1;
      s[n][2] = exact_int_to_float(acc[4 * n + 2]) * qk_scale0;
      s[n][3] = exact_int_to_float(acc[4 * n + 3]) * qk_scale1;
    }
    const int key0 = tile * kBlockK;
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
    float tile_max[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float mx = -INFINITY;
#pragma unroll
      for (int n = 0; n < 8; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * h], s[n][2 * h + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      tile_max[h] = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    }
    // SpargeAttn stage 2, decided per warp (16 rows) exactly as attention_kernel.cuh: a skipping warp leaves its
    // rows' max, sum and O as they are (P = 0, alpha = 1) while the warpgroup's P·V runs for the others; the MMA
    // itself is skipped when all four warps skip.
    bool warp_skip = false;
    if constexpr (pv_skip) {
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
        warp_skip = true;
      }
    }
    float alpha[2] = {1.0f, 1.0f};
    uint32_t pa[2][4] = {};  // two 32-key chunks, keys in permuted_key order (the layout of v8t)
    if (!warp_skip) {
      float shift[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float mx = fmaxf(row_max[h], tile_max[h]);
        const float use = mx == -INFINITY ? 0.0f : mx;
        alpha[h] = fast_exp2(row_max[h] - use);
        row_max[h] = mx;
        shift[h] = use - kLog2Of448;
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
    if (pv_skip && __syncthreads_and(warp_skip)) continue;  // uniform: the CTA is one warpgroup

    // ---- tile = P · V (e4m3, A from registers), O = O·alpha + tile ----------------------------------------------
    const uint64_t v_desc = smem_descriptor<kBlockK>(v_smem);
    float tile_acc[kDTiles * 4];
    wgmma_fence();
    if constexpr (D == 128) {
      wgmma_e4m3_m64n128k32_rs_zero(tile_acc, pa[0], v_desc);
      wgmma_e4m3_m64n128k32_rs(tile_acc, pa[1], v_desc + 2, 1);
    } else {
      wgmma_e4m3_m64n64k32_rs_zero(tile_acc, pa[0], v_desc);
      wgmma_e4m3_m64n64k32_rs(tile_acc, pa[1], v_desc + 2, 1);
    }
    wgmma_commit();
    wgmma_wait<0>();
    register_fence(tile_acc);
#pragma unroll
    for (int d = 0; d < kDTiles; ++d) {
      o[4 * d + 0] = fmaf(o[4 * d + 0], alpha[0], tile_acc[4 * d + 0]);
      o[4 * d + 1] = fmaf(o[4 * d + 1], alpha[0], tile_acc[4 * d + 1]);
      o[4 * d + 2] = fmaf(o[4 * d + 2], alpha[1], tile_acc[4 * d + 2]);
      o[4 * d + 3] = fmaf(o[4 * d + 3], alpha[1], tile_acc[4 * d + 3]);
    }
  }
  cp_async_wait<0>();
  if (p.pv_counters != nullptr && lane == 0) {
    atomicAdd(p.pv_counters, pv_skipped);
    atomicAdd(p.pv_counters + 1, pv_total);
  }

  // ---- epilogue: O / l · v_scale, LSE (as attention_kernel.cuh) -------------------------------------------------
  float inv[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float l = row_sum[h];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    row_sum[h] = l;
    inv[h] = l > 0.0f ? 1.0f / l : 0.0f;
  }
  const float* v_scale = p.v_scale + (static_cast<int64_t>(b) * p.heads_kv + hkv) * D;
  unsigned char* out = static_cast<unsigned char*>(p.out) + 2 * (b * p.o_stride_b + hq * p.o_stride_h);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = warp_row0 + g + 8 * h;
    if (row >= p.tokens_q) continue;
    unsigned char* out_row = out + 2 * (static_cast<int64_t>(row) * p.o_stride_t);
#pragma unroll
    for (int d = 0; d < kDTiles; ++d) {
      const int c = d * 8 + 2 * t;
      const float x0 = o[4 * d + 2 * h] * inv[h] * __ldg(v_scale + c);
      const float x1 = o[4 * d + 2 * h + 1] * inv[h] * __ldg(v_scale + c + 1);
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
        lse = kLn2 * (row_max[h] + __log2f(row_sum[h]) - kLog2Of448);
        if (p.q_km != nullptr) lse += p.q_km[(static_cast<int64_t>(b) * p.heads_q + hq) * p.tokens_q + row];
      }
      p.lse[b * p.l_stride_b + hq * p.l_stride_h + static_cast<int64_t>(row) * p.l_stride_t] = lse;
    }
  }
#endif
}

// The same computation with the next tile's Q·Kᵀ in flight during this tile's softmax (intra-warpgroup overlap):
// per iteration, issue S(i+1) = Q·K(i+1)ᵀ, softmax of S(i) -> P(i), issue P(i)·V(i), wait for S(i+1) and
// dequantize and mask it while P(i)·V(i) runs, then fold the tile into O. S(i+1), the P·V accumulator and O are
// live together (about 200 registers at D128), so 2 CTAs share an SM (3 at D64), with one more pipeline stage
// (the load for tile i+1 must have landed one iteration earlier).
template <int D>
struct Sm90OverlapConfig : Sm90Config<D> {
  static constexpr int kStages = D <= 64 ? 5 : 4;
  static constexpr int kSmemBytes = kStages * Sm90Config<D>::kStageBytes + Sm90Config<D>::QTile::kBytes + 1024;
  static constexpr int kMinBlocks = D <= 64 ? 3 : 2;
};

template <int D>
__global__ void __launch_bounds__(Sm90OverlapConfig<D>::kThreads, Sm90OverlapConfig<D>::kMinBlocks)
    attention_sm90_overlap_kernel(const AttentionParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Cfg = Sm90OverlapConfig<D>;
  constexpr int kBlockQ = Cfg::kBlockQ;
  using KTile = typename Cfg::KTile;
  using VTile = typename Cfg::VTile;
  using QTile = typename Cfg::QTile;
  constexpr int kStages = Cfg::kStages;
  constexpr int kKSteps = D / 32;
  constexpr int kDTiles = D / 8;

  extern __shared__ __align__(1024) unsigned char smem[];

  const int tiles_q = gridDim.x;
  const int q_tile = p.causal ? tiles_q - 1 - static_cast<int>(blockIdx.x) : static_cast<int>(blockIdx.x);
  const int hq = blockIdx.y, b = blockIdx.z;
  const int hkv = hq / p.kv_group;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int q0 = q_tile * kBlockQ;
  const int warp_row0 = q0 + warp * 16;
  const int causal_offset = p.tokens_k - p.tokens_q;

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

  const int8_t* k8 = p.k8 + (static_cast<int64_t>(b) * p.heads_kv + hkv) * p.tokens_k * D;
  const float* k_scale = p.k_scale + (static_cast<int64_t>(b) * p.heads_kv + hkv) * p.k_groups;
  const uint8_t* v8t = p.v8t + (static_cast<int64_t>(b) * p.heads_kv + hkv) * D * static_cast<int64_t>(p.vt_stride);
  const uint32_t smem_base = (smem_address(smem) + 1023u) & ~1023u;

  auto load_tile = [&](int tile, int stage) {
    const uint32_t k_dst = smem_base + stage * Cfg::kStageBytes;
    const uint32_t v_dst = k_dst + KTile::kBytes;
    const int key0 = tile * kBlockK;
    const unsigned char* k_src = reinterpret_cast<const unsigned char*>(k8) + static_cast<int64_t>(key0) * D;
    KTile::template load<Cfg::kThreads>(k_dst, k_src, D, p.tokens_k - key0);
    VTile::template load<Cfg::kThreads>(v_dst, v8t + key0, p.vt_stride, D);
  };

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
  const uint64_t q_desc = smem_descriptor<D>(q_smem);

  auto issue_qk = [&](int acc_stage, int (&acc)[32]) {
    const uint64_t k_desc = smem_descriptor<D>(smem_base + acc_stage * Cfg::kStageBytes);
    wgmma_fence();
    wgmma_s8_m64n64k32_zero(acc, q_desc, k_desc);
#pragma unroll
    for (int kk = 1; kk < kKSteps; ++kk) wgmma_s8_m64n64k32(acc, q_desc + 2 * kk, k_desc + 2 * kk, 1);
    wgmma_commit();
  };
  auto k_scales = [&](int tile, float& s0, float& s1) {
    if (p.granularity == static_cast<int>(Granularity::PerThread)) {
      s0 = q_scale * __ldg(k_scale + tile * 8 + 2 * t);
      s1 = q_scale * __ldg(k_scale + tile * 8 + 2 * t + 1);
    } else {
      s0 = s1 = q_scale * __ldg(k_scale + tile);
    }
  };
  // Base-2 logits of one tile, masked (as attention_kernel.cuh).
  auto dequantize = [&](const int (&acc)[32], int tile, float s0, float s1, float (&s)[8][4]) {
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      s[n][0] = exact_int_to_float(acc[4 * n + 0]) * s0;
      s[n][1] = exact_int_to_float(acc[4 * n + 1]) * s1;
      s[n][2] = exact_int_to_float(acc[4 * n + 2]) * s0;
      s[n][3] = exact_int_to_float(acc[4 * n + 3]) * s1;
    }
    const int key0 = tile * kBlockK;
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
  };

  float o[kDTiles * 4];
#pragma unroll
  for (int i = 0; i < kDTiles * 4; ++i) o[i] = 0.0f;
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.0f, 0.0f};
  float s[8][4];
  int acc[32];

  // S of the first tile.
  int tile = walker.tile;
  if (tile >= 0) {
    walker.next(tiles);
    cp_async_wait<kStages - 2>();
    fence_proxy_async_shared();
    __syncthreads();
    issue_qk(0, acc);
    float s0, s1;
    k_scales(tile, s0, s1);
    wgmma_wait<0>();
    register_fence(acc);
    dequantize(acc, tile, s0, s1, s);
  }

  for (int it = 0; tile >= 0; ++it) {
    const int next = walker.tile;  // uniform over the CTA
    if (next >= 0) {
      walker.next(tiles);
      // Tile it+1 resident (committed groups: kStages-1+it; tile j is group j).
      cp_async_wait<kStages - 3>();
      fence_proxy_async_shared();
      __syncthreads();  // every wgmma of iteration it-1 (reading stage (it-1) % kStages) has completed
      if (loader.tile >= 0) {
        load_tile(loader.tile, (it + kStages - 1) % kStages);
        loader.next(tiles);
      }
      cp_async_commit();
    }
    // After the last tile the MMA runs on the current tile again and its result is dropped: the same
    // instruction sequence every iteration keeps the wgmma pipeline unserialized.
    const int qk_tile = next >= 0 ? next : tile;
    issue_qk((next >= 0 ? it + 1 : it) % kStages, acc);
    float next_s0, next_s1;
    k_scales(qk_tile, next_s0, next_s1);

    // ---- online softmax of tile it (as attention_kernel.cuh) ----------------------------------------------------
    float tile_max[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float mx = -INFINITY;
#pragma unroll
      for (int n = 0; n < 8; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * h], s[n][2 * h + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      tile_max[h] = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    }
    float alpha[2], shift[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float mx = fmaxf(row_max[h], tile_max[h]);
      const float use = mx == -INFINITY ? 0.0f : mx;
      alpha[h] = fast_exp2(row_max[h] - use);
      row_max[h] = mx;
      shift[h] = use - kLog2Of448;
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
    uint32_t pa[2][4];
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      pa[c][0] = pack_e4m3x2(s[4 * c][0], s[4 * c][1]) | (pack_e4m3x2(s[4 * c + 1][0], s[4 * c + 1][1]) << 16);
      pa[c][1] = pack_e4m3x2(s[4 * c][2], s[4 * c][3]) | (pack_e4m3x2(s[4 * c + 1][2], s[4 * c + 1][3]) << 16);
      pa[c][2] =
          pack_e4m3x2(s[4 * c + 2][0], s[4 * c + 2][1]) | (pack_e4m3x2(s[4 * c + 3][0], s[4 * c + 3][1]) << 16);
      pa[c][3] =
          pack_e4m3x2(s[4 * c + 2][2], s[4 * c + 2][3]) | (pack_e4m3x2(s[4 * c + 3][2], s[4 * c + 3][3]) << 16);
    }

    // ---- tile = P·V on the tensor cores while S(it+1) is dequantized --------------------------------------------
    const uint64_t v_desc = smem_descriptor<kBlockK>(smem_base + (it % kStages) * Cfg::kStageBytes + KTile::kBytes);
    float tile_acc[kDTiles * 4];
    wgmma_fence();
    if constexpr (D == 128) {
      wgmma_e4m3_m64n128k32_rs_zero(tile_acc, pa[0], v_desc);
      wgmma_e4m3_m64n128k32_rs(tile_acc, pa[1], v_desc + 2, 1);
    } else {
      wgmma_e4m3_m64n64k32_rs_zero(tile_acc, pa[0], v_desc);
      wgmma_e4m3_m64n64k32_rs(tile_acc, pa[1], v_desc + 2, 1);
    }
    wgmma_commit();
    wgmma_wait<1>();  // S(it+1), the older group
    register_fence(acc);
    dequantize(acc, qk_tile, next_s0, next_s1, s);
    wgmma_wait<0>();
    register_fence(tile_acc);
#pragma unroll
    for (int d = 0; d < kDTiles; ++d) {
      o[4 * d + 0] = fmaf(o[4 * d + 0], alpha[0], tile_acc[4 * d + 0]);
      o[4 * d + 1] = fmaf(o[4 * d + 1], alpha[0], tile_acc[4 * d + 1]);
      o[4 * d + 2] = fmaf(o[4 * d + 2], alpha[1], tile_acc[4 * d + 2]);
      o[4 * d + 3] = fmaf(o[4 * d + 3], alpha[1], tile_acc[4 * d + 3]);
    }
    tile = next;
  }
  cp_async_wait<0>();

  float inv[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float l = row_sum[h];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    row_sum[h] = l;
    inv[h] = l > 0.0f ? 1.0f / l : 0.0f;
  }
  const float* v_scale = p.v_scale + (static_cast<int64_t>(b) * p.heads_kv + hkv) * D;
  unsigned char* out = static_cast<unsigned char*>(p.out) + 2 * (b * p.o_stride_b + hq * p.o_stride_h);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = warp_row0 + g + 8 * h;
    if (row >= p.tokens_q) continue;
    unsigned char* out_row = out + 2 * (static_cast<int64_t>(row) * p.o_stride_t);
#pragma unroll
    for (int d = 0; d < kDTiles; ++d) {
      const int c = d * 8 + 2 * t;
      const float x0 = o[4 * d + 2 * h] * inv[h] * __ldg(v_scale + c);
      const float x1 = o[4 * d + 2 * h + 1] * inv[h] * __ldg(v_scale + c + 1);
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
        lse = kLn2 * (row_max[h] + __log2f(row_sum[h]) - kLog2Of448);
        if (p.q_km != nullptr) lse += p.q_km[(static_cast<int64_t>(b) * p.heads_q + hq) * p.tokens_q + row];
      }
      p.lse[b * p.l_stride_b + hq * p.l_stride_h + static_cast<int64_t>(row) * p.l_stride_t] = lse;
    }
  }
#endif
}

// SPARQ_SM90_OVERLAP=1 / 0 picks the kernel above or the serial one (read per launch, so tests can switch).
inline bool sm90_overlap_enabled() {
  const char* e = std::getenv("SPARQ_SM90_OVERLAP");
  return e == nullptr || *e == '\0' ? kSm90OverlapDefault : *e != '0';
}

template <typename Cfg, typename Kernel>
int launch_sm90_kernel(Kernel kernel, const AttentionParams& params, void* stream) {
  int device = 0, smem_limit = 0;
  if (const cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) return static_cast<int>(e);
  if (const cudaError_t e = cudaDeviceGetAttribute(&smem_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
      e != cudaSuccess)
    return static_cast<int>(e);
  if (Cfg::kSmemBytes > smem_limit) return kLaunchNeedsMoreSharedMemory;
  const cudaError_t attribute_status =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes);
  if (attribute_status != cudaSuccess) return static_cast<int>(attribute_status);
  const dim3 grid((params.tokens_q + Cfg::kBlockQ - 1) / Cfg::kBlockQ, params.heads_q, params.batch);
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, static_cast<cudaStream_t>(stream)>>>(params);
  return static_cast<int>(cudaGetLastError());
}

template <int D>
int launch_attention_sm90(const AttentionParams& params, void* stream) {
  if (params.pv_threshold == nullptr && sm90_overlap_enabled())  // the overlap kernel has no stage 2
    return launch_sm90_kernel<Sm90OverlapConfig<D>>(attention_sm90_overlap_kernel<D>, params, stream);
  if (params.pv_threshold != nullptr)
    return launch_sm90_kernel<Sm90Config<D>>(attention_sm90_kernel<D, true>, params, stream);
  return launch_sm90_kernel<Sm90Config<D>>(attention_sm90_kernel<D, false>, params, stream);
}

}  // namespace sparq::cuda
