// The quantized attention kernel of the sm90a path (wgmma), instantiated by the generated
// templates/cuda/attention_sm90a.cu.j2 translation units per head dim (FP8 e4m3 P·V only).
//
// One CTA = one warpgroup (4 warps, 128 threads) computes BLOCK_Q = 64 query rows of one (batch, query head),
// the same tile, mask granularity and numerics (docs/NUMERICS.md) as the mma.sync kernel (attention_kernel.cuh),
// whose shared-memory tiles, tile walker and per-warp helpers (attention_common.cuh) it reuses. Q (INT8) is
// loaded once into shared memory; K (INT8, [key][channel]) and the transposed e4m3 V ([channel][key], keys
// permuted inside 32-key chunks) tiles
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

// The row's base-2 log-sum-exp from its max m and its sum l of P·448, in this path's rounding order (the sm89
// kernel subtracts log2 448 from log2 l first; kept as they were, so neither path's LSE changes).
struct Sm90Log2Lse {
  __device__ __forceinline__ float operator()(float m, float l) const { return m + __log2f(l) - kLog2Of448; }
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

  const RowCoords rc = row_coords<kBlockQ>(p);
  const int hq = rc.hq, b = rc.b, hkv = rc.hkv, lane = rc.lane, g = rc.g, t = rc.t;
  const int q0 = rc.q0, warp_row0 = rc.warp_row0, causal_offset = rc.causal_offset;

  // ---- which key tiles this CTA visits ----------------------------------------------------------------------
  const TileList tiles = setup_tile_list<kBlockQ>(p, b, hq, q0, causal_offset);
  TileCursor walker = TileCursor::first(tiles);
  TileCursor loader = walker;

  const KvSources<D, true> kv(p, b, hkv);
  // The swizzle is a function of the address bits: tiles start at 1024-byte aligned addresses.
  const uint32_t smem_base = (smem_address(smem) + 1023u) & ~1023u;

  auto load_tile = [&](int tile, int stage) {
    load_kv_tile<Cfg, D, true>(p, smem_base + stage * Cfg::kStageBytes, tile, kv.k8, kv.v8t, nullptr);
  };

  const uint32_t q_smem = smem_base + kStages * Cfg::kStageBytes;
  start_pipeline<QTile, Cfg::kThreads, D, kStages>(p, b, hq, q0, q_smem, tiles, loader, load_tile);

  const float q_scale = load_q_scale(p, b, hq, q0, warp_row0, g, tiles.limit);

  const uint64_t q_desc = smem_descriptor<D>(q_smem);
  float o[kDTiles][4];
#pragma unroll
  for (int i = 0; i < kDTiles; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
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
    qk_scales(p.granularity, kv.k_scale, q_scale, tile, t, qk_scale0, qk_scale1);
    wgmma_wait<0>();
    register_fence(acc);

    // ---- dequantize to base-2 logits, mask, online softmax (per warp, as attention_kernel.cuh) ------------------
    float s[8][4];
    dequantize_logits(n_tiles(acc), qk_scale0, qk_scale1, s);
    mask_tile_elements(p, tile * kBlockK, warp_row0, g, t, causal_offset, s);
    float tile_max[2];
    tile_row_max(s, tile_max);
    // SpargeAttn stage 2, decided per warp (16 rows) exactly as attention_kernel.cuh: a skipping warp leaves its
    // rows' max, sum and O as they are (P = 0, alpha = 1) while the warpgroup's P·V runs for the others; the MMA
    // itself is skipped when all four warps skip.
    bool warp_skip = false;
    if constexpr (pv_skip)
      warp_skip = stage2_skips_tile(tile_max, row_max, pv_lambda, warp_row0, g, p.tokens_q, pv_skipped, pv_total);
    float alpha[2] = {1.0f, 1.0f};
    uint32_t pa[2][4] = {};  // two 32-key chunks, keys in permuted_key order (the layout of v8t)
    if (!warp_skip) {
      online_softmax_update<true>(s, tile_max, row_max, row_sum, alpha);
      pack_p_e4m3(s, pa);
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
    for (int d = 0; d < kDTiles; ++d) fold_tile(o[d], n_tiles(tile_acc)[d], alpha);
  }
  cp_async_wait<0>();
  add_stage2_counters(p, lane, pv_skipped, pv_total);

  // ---- epilogue: O / l · v_scale, LSE (as attention_kernel.cuh) -------------------------------------------------
  float inv[2];
  finish_row_sums(row_sum, inv);
  const float* v_scale = p.v_scale + (static_cast<int64_t>(b) * p.heads_kv + hkv) * D;
  store_output_rows<kDTiles, true>(p, b, hq, warp_row0, g, t, o, inv, row_max, row_sum, v_scale, Sm90Log2Lse{});
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

  const RowCoords rc = row_coords<kBlockQ>(p);
  const int hq = rc.hq, b = rc.b, hkv = rc.hkv, g = rc.g, t = rc.t;
  const int q0 = rc.q0, warp_row0 = rc.warp_row0, causal_offset = rc.causal_offset;

  const TileList tiles = setup_tile_list<kBlockQ>(p, b, hq, q0, causal_offset);
  TileCursor walker = TileCursor::first(tiles);
  TileCursor loader = walker;

  const KvSources<D, true> kv(p, b, hkv);
  const uint32_t smem_base = (smem_address(smem) + 1023u) & ~1023u;

  auto load_tile = [&](int tile, int stage) {
    load_kv_tile<Cfg, D, true>(p, smem_base + stage * Cfg::kStageBytes, tile, kv.k8, kv.v8t, nullptr);
  };

  const uint32_t q_smem = smem_base + kStages * Cfg::kStageBytes;
  start_pipeline<QTile, Cfg::kThreads, D, kStages>(p, b, hq, q0, q_smem, tiles, loader, load_tile);

  const float q_scale = load_q_scale(p, b, hq, q0, warp_row0, g, tiles.limit);
  const uint64_t q_desc = smem_descriptor<D>(q_smem);

  auto issue_qk = [&](int acc_stage, int (&acc)[32]) {
    const uint64_t k_desc = smem_descriptor<D>(smem_base + acc_stage * Cfg::kStageBytes);
    wgmma_fence();
    wgmma_s8_m64n64k32_zero(acc, q_desc, k_desc);
#pragma unroll
    for (int kk = 1; kk < kKSteps; ++kk) wgmma_s8_m64n64k32(acc, q_desc + 2 * kk, k_desc + 2 * kk, 1);
    wgmma_commit();
  };
  // Base-2 logits of one tile, masked (as attention_kernel.cuh).
  auto dequantize = [&](const int (&acc)[32], int tile, float s0, float s1, float (&s)[8][4]) {
    dequantize_logits(n_tiles(acc), s0, s1, s);
    mask_tile_elements(p, tile * kBlockK, warp_row0, g, t, causal_offset, s);
  };

  float o[kDTiles][4];
#pragma unroll
  for (int i = 0; i < kDTiles; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
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
    qk_scales(p.granularity, kv.k_scale, q_scale, tile, t, s0, s1);
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
    qk_scales(p.granularity, kv.k_scale, q_scale, qk_tile, t, next_s0, next_s1);

    // ---- online softmax of tile it (as attention_kernel.cuh) ----------------------------------------------------
    float tile_max[2];
    tile_row_max(s, tile_max);
    float alpha[2];
    online_softmax_update<true>(s, tile_max, row_max, row_sum, alpha);
    uint32_t pa[2][4];
    pack_p_e4m3(s, pa);

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
    for (int d = 0; d < kDTiles; ++d) fold_tile(o[d], n_tiles(tile_acc)[d], alpha);
    tile = next;
  }
  cp_async_wait<0>();

  float inv[2];
  finish_row_sums(row_sum, inv);
  const float* v_scale = p.v_scale + (static_cast<int64_t>(b) * p.heads_kv + hkv) * D;
  store_output_rows<kDTiles, true>(p, b, hq, warp_row0, g, t, o, inv, row_max, row_sum, v_scale, Sm90Log2Lse{});
#endif
}

// SPARQ_SM90_OVERLAP=1 / 0 picks the kernel above or the serial one (read per launch, so tests can switch).
inline bool sm90_overlap_enabled() {
  const char* e = std::getenv("SPARQ_SM90_OVERLAP");
  return e == nullptr || *e == '\0' ? kSm90OverlapDefault : *e != '0';
}

template <int D>
int launch_attention_sm90(const AttentionParams& params, void* stream) {
  if (params.pv_threshold == nullptr && sm90_overlap_enabled())  // the overlap kernel has no stage 2
    return launch_attention_kernel<Sm90OverlapConfig<D>>(attention_sm90_overlap_kernel<D>, params, stream);
  if (params.pv_threshold != nullptr)
    return launch_attention_kernel<Sm90Config<D>>(attention_sm90_kernel<D, true>, params, stream);
  return launch_attention_kernel<Sm90Config<D>>(attention_sm90_kernel<D, false>, params, stream);
}

}  // namespace sparq::cuda
