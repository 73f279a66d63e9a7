// The quantized attention kernels of the sm90a path (wgmma + TMA), instantiated by the generated
// templates/cuda/attention_sm90a.cu.j2 translation units per head dim and P·V precision. The kernels share the
// per-warp numerics of the mma.sync kernel (attention_common.cuh, docs/NUMERICS.md) and its tile (64 keys):
//
// attention_sm90_wide_kernel ("wide", the default for no mask or a LUT, with or without the stage-2 skip): the
// serial kernel below with softmax steps of 128 keys (its comment further down). It alone also has the FP16/BF16
// P·V form (P and the caller's V rows in the input dtype, accumulated straight into O); the other cases of that
// precision run the sm89 path's kernel.
//
// attention_sm90_kernel ("serial", the default for bitmaps walked as such): one CTA = one warpgroup (4 warps)
// computes BLOCK_Q = 64 query rows of one (batch, query head); 3 CTAs share an SM at D128 (4 at D64).
// Thread 0 streams Q once, and (warp 0 walking the tile list) the K (INT8, [key][channel]) and transposed e4m3 V
// ([channel][key], keys permuted inside 32-key chunks) tiles of 64 keys with bulk tensor copies (TMA) into a ring
// of stages, each completing on its mbarrier. The TMA writes the wgmma 128B (128-byte rows) and 64B (64-byte rows)
// swizzles (SwizzledTile), so both operands are read by descriptor (wgmma.cuh). Per key tile: S = Q8·K8ᵀ as wgmma
// m64n64k32 s8·s8 -> s32 (D/32 steps, both operands in shared memory) -> base-2 logits -> online softmax (per
// warp) -> P·448 as e4m3 in registers (the wgmma A fragment equals the mma.sync one) -> per-tile P·V with wgmma
// m64nDk32 e4m3 (A from registers, Vᵀ from shared memory) -> O = O·alpha + tile (two-level accumulation, as on the
// sm89 path). The other CTAs of the SM fill the tensor cores while one runs its softmax.
//
// attention_sm90_ws_kernel ("ws"): warp-specialized, a producer warpgroup and 2 pipelined consumer
// warpgroups (its comment below). Correct and tested, but slower than the kernel above on the H100 (bench/
// RESULTS.md says by how much and why), so it runs only when SPARQ_SM90_KERNEL asks for it.
//
// The stage-2 P·V skip is decided per 16-row warp as on the other paths.
#pragma once

#include "attention_kernel.cuh"
#include "tma.cuh"
#include "wgmma.cuh"

#include <cudaTypedefs.h>

#include <cstdlib>
#include <string_view>

namespace sparq::cuda {

// How the sm90a kernels turn the s32 accumulator into floats (attention_common.cuh, dequantize_logits).
using Sm90IntToFloat = CvtIntToFloat;

template <int D>
struct Sm90Config {
  static constexpr int kBlockQ = 64;
  static constexpr int kKeys = kBlockK;  // keys per stage (the TMA boxes)
  static constexpr int kThreads = 128;
  static constexpr bool kV16 = false;  // e4m3 Vᵀ
  using KTile = SwizzledTile<kBlockK, D>;  // [key][channel] int8: 128B swizzle (D128) or 64B (D64)
  using VTile = SwizzledTile<D, kBlockK>;  // [channel][key] e4m3: 64B swizzle
  using QTile = SwizzledTile<kBlockQ, D>;
  static constexpr int kStageBytes = KTile::kBytes + VTile::kBytes;  // a multiple of 1024
  // 4 stages: 3 CTAs of 74 KiB fit an SM at D128 (H100, D128 N16K: 647 kernel TOPS against 638 with 3 stages).
  static constexpr int kStages = 4;
  static constexpr int kBarrierBytes = 8 * (kStages + 1);  // full[stage], Q
  static constexpr int kSmemBytes = kStages * kStageBytes + QTile::kBytes + kBarrierBytes + 1024;  // + alignment
  static constexpr int kMinBlocks = D <= 64 ? 4 : 3;
  static_assert(kStageBytes % 1024 == 0 && QTile::kBytes % 1024 == 0, "tiles must stay 1024-byte aligned");
};

// The row's base-2 log-sum-exp from its max m and its sum l of P·448, in this path's rounding order (the sm89
// kernel subtracts log2 448 from log2 l first; kept as they were, so neither path's LSE changes).
struct Sm90Log2Lse {
  __device__ __forceinline__ float operator()(float m, float l) const { return m + __log2f(l) - kLog2Of448; }
};

// The first key tile of Keys keys (64: a tile; 128: a step of the wide kernel) that needs per-element masking for
// the warp whose rows start at warp_row0: one with keys past the sequence end (tile·Keys + Keys > Nk) or, causal,
// past the diagonal of one of its rows (tile·Keys + Keys − 1 > warp_row0 + causal_offset). Both hold from some
// tile on, so the loop tests one integer per tile.
template <int Keys = kBlockK>
__device__ __forceinline__ int first_masked_tile(const AttentionParams& p, int warp_row0, int causal_offset) {
  int first = p.tokens_k / Keys;
  if (p.causal) {
    const int last_key = warp_row0 + causal_offset;  // the last key the warp's first row sees
    first = min(first, last_key < Keys - 1 ? 0 : (last_key - (Keys - 1)) / Keys + 1);
  }
  return first;
}

// tile_row_max from the s32 accumulator: per row the largest even- and odd-column integer (their K scales differ
// with per-thread groups), dequantized once. max(a)·s = max(a·s) for s >= 0 (rounding is monotonic), so this is
// the max of the dequantized logits bit for bit. thread_row_max_s32: this thread's part of row half h (rows g and
// g + 8 of the warp) before the quad reduction.
__device__ __forceinline__ float thread_row_max_s32(const int (&acc)[8][4], float qk_scale0, float qk_scale1, int h) {
  int even = acc[0][2 * h], odd = acc[0][2 * h + 1];
#pragma unroll
  for (int n = 1; n < 8; ++n) {
    even = max(even, acc[n][2 * h]);
    odd = max(odd, acc[n][2 * h + 1]);
  }
  return fmaxf(exact_int_to_float(even) * qk_scale0, exact_int_to_float(odd) * qk_scale1);
}

// The row's max over its quad (the 4 threads holding it).
__device__ __forceinline__ float quad_max(float mx) {
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
  return fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
}

__device__ __forceinline__ void tile_row_max_s32(const int (&acc)[8][4], float qk_scale0, float qk_scale1,
                                                 float (&tile_max)[2]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) tile_max[h] = quad_max(thread_row_max_s32(acc, qk_scale0, qk_scale1, h));
}

// S = Q8 · K8ᵀ of one 64-key tile (64 x 64, s32): D/32 s8 wgmma from shared memory, committed as one group.
template <int D>
__device__ __forceinline__ void issue_qk_wgmma(int (&acc)[32], uint64_t q_desc, uint64_t k_desc) {
  wgmma_fence();
  wgmma_s8_m64n64k32_zero(acc, q_desc, k_desc);
#pragma unroll
  for (int kk = 1; kk < D / 32; ++kk) wgmma_s8_m64n64k32(acc, q_desc + 2 * kk, k_desc + 2 * kk, 1);
  wgmma_commit();
}

// tile = P · V of one 64-key tile: P as two 32-key e4m3 fragments in registers (A), Vᵀ from shared memory,
// committed as one group.
template <int D>
__device__ __forceinline__ void issue_pv_wgmma(float (&tile_acc)[D / 2], const uint32_t (&pa)[2][4], uint64_t v_desc) {
  wgmma_fence();
  if constexpr (D == 128) {
    wgmma_e4m3_m64n128k32_rs_zero(tile_acc, pa[0], v_desc);
    wgmma_e4m3_m64n128k32_rs(tile_acc, pa[1], v_desc + 2, 1);
  } else {
    wgmma_e4m3_m64n64k32_rs_zero(tile_acc, pa[0], v_desc);
    wgmma_e4m3_m64n64k32_rs(tile_acc, pa[1], v_desc + 2, 1);
  }
  wgmma_commit();
}

// This thread's sums of P·448 over its 16 columns of each of its two rows (g, g + 8), as pairwise trees (4
// dependent adds instead of 16).
__device__ __forceinline__ void thread_row_sums(const float (&p448)[8][4], float (&sums)[2]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float part[8];
#pragma unroll
    for (int n = 0; n < 8; ++n) part[n] = p448[n][2 * h] + p448[n][2 * h + 1];
#pragma unroll
    for (int w = 4; w >= 1; w /= 2)
#pragma unroll
      for (int n = 0; n < w; ++n) part[n] += part[n + w];
    sums[h] = part[0];
  }
}

// The online softmax of one tile on the sm90a path (docs/NUMERICS.md): P·448 into p448, alpha, and the running
// max and sum of this thread's rows. Returns true, touching nothing, when SpargeAttn stage 2 (Stage2) skips the
// tile for the warp (stage2_skips_tile).
// - A tile that needs masking (masked) forms its logits acc · q_scale · k_scale in p448, -inf where masked, takes
//   the row maxima from them and P·448 = exp2(logit − shift). So does every tile of the stage-2 instantiation
//   (the fused form below, with the stage-2 test between the max and the exponentials, spills at D128).
// - An unmasked tile takes its maxima from the accumulator (tile_row_max_s32) and P·448 =
//   exp2(fma(float(acc), q_scale · k_scale, −shift)): one rounding where the contract's order has two (the logit,
//   then the shift). That saves an instruction per element and moves P by at most an ulp of the exponent, as the
//   hardware exp2 already does (tests/test_cuda.cpp states the tolerances).
// The two cases are separate branches: the accumulator and the logits are then never live together (merged, the
// D128 kernel spills).
// The row sums are pairwise trees (4 dependent adds instead of 16).
template <bool Stage2>
__device__ __forceinline__ bool tile_softmax_p448(const AttentionParams& p, bool masked, int tile, int warp_row0,
                                                  int g, int t, int causal_offset, const int (&acc)[32],
                                                  float qk_scale0, float qk_scale1, float pv_lambda,
                                                  unsigned& pv_skipped, unsigned& pv_total, float (&row_max)[2],
                                                  float (&row_sum)[2], float (&alpha)[2], float (&p448)[8][4]) {
  float tile_max[2], minus_shift[2];
  if (Stage2 || masked) {
    dequantize_logits<Sm90IntToFloat>(n_tiles(acc), qk_scale0, qk_scale1, p448);
    mask_tile_elements(p, tile * kBlockK, warp_row0, g, t, causal_offset, p448);
    tile_row_max(p448, tile_max);
    if (Stage2 && stage2_skips_tile(tile_max, row_max, pv_lambda, warp_row0, g, p.tokens_q, pv_skipped, pv_total))
      return true;
    update_row_max<true>(tile_max, row_max, alpha, minus_shift);
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) p448[n][e] = fast_exp2(p448[n][e] + minus_shift[e >> 1]);
  } else {
    const int (&a)[8][4] = n_tiles(acc);
    tile_row_max_s32(a, qk_scale0, qk_scale1, tile_max);
    update_row_max<true>(tile_max, row_max, alpha, minus_shift);
    const Sm90IntToFloat to_float;
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        p448[n][e] = fast_exp2(fmaf(to_float(a[n][e]), (e & 1) ? qk_scale1 : qk_scale0, minus_shift[e >> 1]));
  }
  float sums[2];
  thread_row_sums(p448, sums);
#pragma unroll
  for (int h = 0; h < 2; ++h) row_sum[h] = row_sum[h] * alpha[h] + sums[h];
  return false;
}

// The stage-2 instantiation keeps 3 CTAs per SM at D64 (its counters and λ do not fit 4 CTAs' 127 registers).
template <int D, bool Stage2>
__global__ void __launch_bounds__(Sm90Config<D>::kThreads, Stage2 ? 3 : Sm90Config<D>::kMinBlocks)
    attention_sm90_kernel(const __grid_constant__ AttentionParams p, const __grid_constant__ CUtensorMap q_map,
                          const __grid_constant__ CUtensorMap k_map, const __grid_constant__ CUtensorMap v_map) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Cfg = Sm90Config<D>;
  constexpr int kBlockQ = Cfg::kBlockQ;
  using KTile = typename Cfg::KTile;
  using VTile = typename Cfg::VTile;
  using QTile = typename Cfg::QTile;
  constexpr int kStages = Cfg::kStages;
  constexpr int kDTiles = D / 8;

  extern __shared__ __align__(1024) unsigned char smem[];

  const RowCoords rc = row_coords<kBlockQ>(p);
  const int hq = rc.hq, b = rc.b, hkv = rc.hkv, lane = rc.lane, g = rc.g, t = rc.t;
  const int q0 = rc.q0, warp_row0 = rc.warp_row0, causal_offset = rc.causal_offset;

  // ---- which key tiles this CTA visits ----------------------------------------------------------------------
  const TileList tiles = setup_tile_list<kBlockQ>(p, b, hq, q0, causal_offset);
  TileCursor walker = TileCursor::first(tiles);
  TileCursor loader = walker;  // warp 0's, kStages - 1 tiles ahead

  const KvSources<D, true> kv(p, b, hkv);
  // The swizzle is a function of the address bits: tiles start at 1024-byte aligned addresses.
  const uint32_t smem_base = (smem_address(smem) + 1023u) & ~1023u;
  const uint32_t q_smem = smem_base + kStages * Cfg::kStageBytes;
  const uint32_t bars = q_smem + QTile::kBytes;  // full[stage] at bars + 8·stage, Q's at bars + 8·kStages
  const uint32_t q_bar = bars + 8u * kStages;
  const int kv_row = b * p.heads_kv + hkv;

  // Thread 0 issues the bulk tensor copies (TMA): the copy engine writes the swizzled tiles and counts their
  // bytes on the stage's mbarrier, so the warps spend no instructions on loads.
  auto load_tile = [&](int tile, int stage) {
    const uint32_t k_dst = smem_base + stage * Cfg::kStageBytes;
    mbarrier_arrive_expect_tx(bars + 8u * stage, Cfg::kStageBytes);
    tma_load_3d(k_dst, &k_map, bars + 8u * stage, 0, tile * kBlockK, kv_row);
    tma_load_3d(k_dst + KTile::kBytes, &v_map, bars + 8u * stage, tile * kBlockK, 0, kv_row);
  };
  if (threadIdx.x == 0) {
    for (int s = 0; s <= kStages; ++s) mbarrier_init(bars + 8u * s, 1);
    fence_mbarrier_init();
    mbarrier_arrive_expect_tx(q_bar, QTile::kBytes);
    tma_load_3d(q_smem, &q_map, q_bar, 0, q0, b * p.heads_q + hq);
  }
  // Warp 0 walks the loader (a cursor moves by whole warps); its lane 0, which initialized the barriers,
  // issues the copies.
  if (threadIdx.x < 32) {
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (loader.tile >= 0) {
        if (threadIdx.x == 0) load_tile(loader.tile, s);
        loader.next(tiles);
      }
    }
  }
  __syncthreads();  // the barriers are initialized

  const float q_scale = load_q_scale(p, b, hq, q0, warp_row0, g, tiles.limit);
  const int mask_from = first_masked_tile(p, warp_row0, causal_offset);
  mbarrier_wait(q_bar, 0);

  const uint64_t q_desc = smem_descriptor<D>(q_smem);
  float o[kDTiles][4];
#pragma unroll
  for (int i = 0; i < kDTiles; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.0f, 0.0f};  // this thread's partial sums of P·448
  constexpr bool pv_skip = Stage2;  // p.pv_threshold != nullptr: a separate instantiation, without its registers
  const float pv_lambda = pv_skip ? p.pv_threshold[hq] : 0.0f;
  unsigned pv_skipped = 0, pv_total = 0;  // stage-2 statistics of this warp (32-bit: fewer registers)

  for (int it = 0; walker.tile >= 0; ++it) {
    const int stage = it % kStages;
    mbarrier_wait(bars + 8u * stage, (it / kStages) & 1);  // the tile is in shared memory
    __syncthreads();  // every wgmma of the previous iteration has completed: its stage is free
    if (threadIdx.x < 32 && loader.tile >= 0) {
      if (threadIdx.x == 0) load_tile(loader.tile, (it + kStages - 1) % kStages);
      loader.next(tiles);
    }

    const int tile = walker.tile;
    walker.next(tiles);
    const uint32_t k_smem = smem_base + stage * Cfg::kStageBytes;
    const uint32_t v_smem = k_smem + KTile::kBytes;

    // ---- S = Q8 · K8ᵀ (64 x 64, s32) ---------------------------------------------------------------------------
    int acc[32];
    issue_qk_wgmma<D>(acc, q_desc, smem_descriptor<D>(k_smem));

    // K scales while the MMAs run. The logit is acc · (q_scale · k_scale).
    float qk_scale0, qk_scale1;
    qk_scales(p.granularity, kv.k_scale, q_scale, tile, t, qk_scale0, qk_scale1);
    wgmma_wait<0>();
    register_fence(acc);

    // ---- dequantize to base-2 logits, mask, online softmax (per warp, as attention_kernel.cuh) ------------------
    // SpargeAttn stage 2, decided per warp (16 rows) exactly as attention_kernel.cuh: a skipping warp leaves its
    // rows' max, sum and O as they are (P = 0, alpha = 1) while the warpgroup's P·V runs for the others; the MMA
    // itself is skipped when all four warps skip.
    float alpha[2] = {1.0f, 1.0f};
    uint32_t pa[2][4] = {};  // two 32-key chunks, keys in permuted_key order (the layout of v8t)
    float p448[8][4];
    const bool warp_skip =
        tile_softmax_p448<pv_skip>(p, tile >= mask_from, tile, warp_row0, g, t, causal_offset, acc, qk_scale0,
                                   qk_scale1, pv_lambda, pv_skipped, pv_total, row_max, row_sum, alpha, p448);
    if (!warp_skip) pack_p_e4m3(p448, pa);
    if (pv_skip && __syncthreads_and(warp_skip)) continue;  // uniform: the CTA is one warpgroup

    // ---- tile = P · V (e4m3, A from registers), O = O·alpha + tile ----------------------------------------------
    float tile_acc[kDTiles * 4];
    issue_pv_wgmma<D>(tile_acc, pa, smem_descriptor<kBlockK>(v_smem));
    wgmma_wait<0>();
    register_fence(tile_acc);
#pragma unroll
    for (int d = 0; d < kDTiles; ++d) fold_tile(o[d], n_tiles(tile_acc)[d], alpha);
  }
  add_stage2_counters(p, lane, pv_skipped, pv_total);

  // ---- epilogue: O / l · v_scale, LSE (as attention_kernel.cuh) -------------------------------------------------
  float inv[2];
  finish_row_sums(row_sum, inv);
  const float* v_scale = p.v_scale + (static_cast<int64_t>(b) * p.heads_kv + hkv) * D;
  store_output_rows<kDTiles, true>(p, b, hq, warp_row0, g, t, o, inv, row_max, row_sum, v_scale, Sm90Log2Lse{});
#endif
}

// ==== The warp-specialized kernel ==================================================================================
//
// One CTA = one producer warpgroup + 2 consumer warpgroups; consumer c computes the 64 query rows
// q0 + 64c .. q0 + 64c + 63 with the numerics of the kernel above, so every K/Vᵀ tile the CTA loads serves 128
// rows (half the L2 -> shared-memory traffic per query row of 64-row CTAs, which at ~1000 TOPS would need
// ~8 TB/s).
// - Producer: warp 0 walks the tile list and its lane 0 issues bulk tensor copies (TMA) of Q once and of each
//   key tile's K (INT8, 128B/64B swizzle) and Vᵀ (e4m3, 64B swizzle) into a ring of kStages stages; full[s]
//   completes when a stage's bytes have landed, empty[s] when every consumer warp is done with it. The TMA
//   writes the swizzled layout of SwizzledTile, which the wgmma descriptors read (1024-byte aligned tiles).
// - Registers move from the producer (which needs few) to the consumers (setmaxnreg): O, the per-tile P·V
//   accumulator, the next S and P are live at once.
// - Each consumer pipelines its tiles: S(j) = Q·K(j)ᵀ and P(j-1)·V(j-1) are issued together, the softmax of
//   S(j) runs while P(j-1)·V(j-1) is on the tensor cores, then tile j-1 is folded into O. The other consumer's
//   work fills the remaining gaps.
// - Turns ("ws"): the consumers take turns to issue their wgmma (named barriers 1 and 2), so that one's softmax
//   runs while the other's matrix products are on the tensor cores; "ws-free" leaves the order to the hardware.
// - All consumers walk the CTA's tile list (causal: cut at the CTA's last row; the rows of the first consumers
//   see -inf in the one tile past their diagonal). Block masks must therefore have blocks of a multiple of 128
//   rows; the host takes the 64-row kernel above for others, and for the stage-2 P·V skip.
// - The softmax takes the row max of unmasked tiles from the s32 accumulator (tile_row_max_s32), otherwise the
//   arithmetic of the other paths (docs/NUMERICS.md), so the results match the emulation as theirs do.
template <int D>
struct Sm90WsConfig {
  static constexpr int kConsumers = 2;
  static constexpr int kBlockQ = 64 * kConsumers;
  static constexpr int kKeys = kBlockK;  // keys per stage (the TMA boxes)
  static constexpr int kThreads = 128 * (kConsumers + 1);
  static constexpr bool kV16 = false;  // e4m3 Vᵀ
  using KTile = SwizzledTile<kBlockK, D>;  // [key][channel] int8
  using VTile = SwizzledTile<D, kBlockK>;  // [channel][key] e4m3
  using QTile = SwizzledTile<kBlockQ, D>;
  static constexpr int kStageBytes = KTile::kBytes + VTile::kBytes;
  static constexpr int kStages = D <= 64 ? 8 : 6;
  static constexpr int kBarrierBytes = 8 * (2 * kStages + 1);
  static constexpr int kSmemBytes = kStages * kStageBytes + QTile::kBytes + kBarrierBytes + 1024;
  // 64K registers per SM: 168 per thread at entry (65536 / 384, rounded down to 8); the producer gives back what
  // the consumers take: 128·24 + 256·240 = 384·168.
  static constexpr int kProducerRegisters = 24;
  static constexpr int kConsumerRegisters = 240;
  static_assert(kProducerRegisters * 128 + kConsumerRegisters * 128 * kConsumers <= 65536 / kThreads / 8 * 8 * kThreads,
                "the warpgroups' registers must fit the CTA's");
  static_assert(kStageBytes % 1024 == 0 && QTile::kBytes % 1024 == 0, "tiles must stay 1024-byte aligned");
};

template <int D, bool Turns>
__global__ void __launch_bounds__(Sm90WsConfig<D>::kThreads, 1)
    attention_sm90_ws_kernel(const __grid_constant__ AttentionParams p, const __grid_constant__ CUtensorMap q_map,
                             const __grid_constant__ CUtensorMap k_map, const __grid_constant__ CUtensorMap v_map) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Cfg = Sm90WsConfig<D>;
  constexpr int Consumers = Cfg::kConsumers;
  using KTile = typename Cfg::KTile;
  using QTile = typename Cfg::QTile;
  constexpr int kBlockQ = Cfg::kBlockQ;
  constexpr int kStages = Cfg::kStages;
  constexpr int kStageBytes = Cfg::kStageBytes;
  constexpr int kDTiles = D / 8;

  extern __shared__ __align__(1024) unsigned char smem[];
  const uint32_t smem_base = (smem_address(smem) + 1023u) & ~1023u;
  const uint32_t q_smem = smem_base + kStages * kStageBytes;
  const uint32_t bars = q_smem + QTile::kBytes;
  auto full_bar = [&](int stage) { return bars + 8u * stage; };
  auto empty_bar = [&](int stage) { return bars + 8u * (kStages + stage); };
  const uint32_t q_bar = bars + 16u * kStages;

  const int q_tile = p.causal ? static_cast<int>(gridDim.x - 1 - blockIdx.x) : static_cast<int>(blockIdx.x);
  const int hq = blockIdx.y, b = blockIdx.z, hkv = hq / p.kv_group;
  const int q0 = q_tile * kBlockQ;
  const int causal_offset = p.tokens_k - p.tokens_q;
  const TileList tiles = setup_tile_list<kBlockQ>(p, b, hq, q0, causal_offset);

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(full_bar(s), 1);
      mbarrier_init(empty_bar(s), 4 * Consumers);  // one arrival per consumer warp
    }
    mbarrier_init(q_bar, 1);
    fence_mbarrier_init();
  }
  __syncthreads();

  if (threadIdx.x < 128) {
    // ---- producer ------------------------------------------------------------------------------------------
    warpgroup_release_registers<Cfg::kProducerRegisters>();
    if (threadIdx.x < 32) {  // warp 0 walks the tiles (a cursor moves by whole warps), lane 0 issues
      const bool leader = threadIdx.x == 0;
      if (leader) {
        prefetch_tensor_map(&q_map);
        prefetch_tensor_map(&k_map);
        prefetch_tensor_map(&v_map);
        mbarrier_arrive_expect_tx(q_bar, QTile::kBytes);
        tma_load_3d(q_smem, &q_map, q_bar, 0, q0, b * p.heads_q + hq);
      }
      const int kv_row = b * p.heads_kv + hkv;
      TileCursor loader = TileCursor::first(tiles);
      int stage = 0, round = 0;  // tile i goes to stage i % kStages in round i / kStages
      for (; loader.tile >= 0; loader.next(tiles)) {
        if (round > 0) mbarrier_wait(empty_bar(stage), (round - 1) & 1);  // the consumers released it
        if (leader) {
          const uint32_t k_dst = smem_base + stage * kStageBytes;
          mbarrier_arrive_expect_tx(full_bar(stage), kStageBytes);
          tma_load_3d(k_dst, &k_map, full_bar(stage), 0, loader.tile * kBlockK, kv_row);
          tma_load_3d(k_dst + KTile::kBytes, &v_map, full_bar(stage), loader.tile * kBlockK, 0, kv_row);
        }
        if (++stage == kStages) {
          stage = 0;
          ++round;
        }
      }
    }
    return;
  }

  // ---- consumer c: rows q0 + 64c .. q0 + 64c + 63 --------------------------------------------------------------
  warpgroup_claim_registers<Cfg::kConsumerRegisters>();
  const int c = threadIdx.x / 128 - 1;
  const int warp = (threadIdx.x - 128) / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int warp_row0 = q0 + 16 * warp;
  const float* k_scale = p.k_scale + (static_cast<int64_t>(b) * p.heads_kv + hkv) * p.k_groups;
  const float q_scale = load_q_scale(p, b, hq, q0 + 64 * c, warp_row0, g, tiles.limit);
  const int mask_from = first_masked_tile(p, warp_row0, causal_offset);

  float o[kDTiles][4];
#pragma unroll
  for (int i = 0; i < kDTiles; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.0f, 0.0f};

  mbarrier_wait(q_bar, 0);
  // Descriptors of stage 0; a stage's are these plus its offset >> 4 in the address field (below 2^18 bytes,
  // so the 14-bit field does not carry).
  const uint64_t q_desc = smem_descriptor<D>(q_smem + 64 * D * c);
  const uint64_t k_desc0 = smem_descriptor<D>(smem_base);
  const uint64_t v_desc0 = smem_descriptor<kBlockK>(smem_base + KTile::kBytes);
  auto issue_qk = [&](int stage, int (&acc)[32]) {
    issue_qk_wgmma<D>(acc, q_desc, k_desc0 + static_cast<uint32_t>(stage * (kStageBytes >> 4)));
  };
  auto issue_pv = [&](int stage, const uint32_t (&pa)[2][4], float (&tile_acc)[kDTiles * 4]) {
    issue_pv_wgmma<D>(tile_acc, pa, v_desc0 + static_cast<uint32_t>(stage * (kStageBytes >> 4)));
  };
  // The softmax of tile `tile` from its S accumulator: P(·448) as e4m3 fragments and alpha.
  auto softmax = [&](int tile, const int (&acc)[32], float s0, float s1, uint32_t (&pa)[2][4], float (&alpha)[2]) {
    float p448[8][4];
    unsigned no_counts = 0;
    tile_softmax_p448<false>(p, tile >= mask_from, tile, warp_row0, g, t, causal_offset, acc, s0, s1, 0.0f, no_counts,
                             no_counts, row_max, row_sum, alpha, p448);
    pack_p_e4m3(p448, pa);
  };

  // Per tile j: issue S(j) = Q·K(j)ᵀ and P(j-1)·V(j-1) together, run the softmax of S(j) while P(j-1)·V(j-1)
  // is on the tensor cores, then fold tile j-1 into O and release its stage. The wgmma sequence is the same
  // every iteration (ptxas serializes the wgmma pipeline around conditionally issued ones, and around wgmma
  // results carried across iterations): after the last tile, S is computed once more from the last stage and
  // dropped.
  TileCursor walker = TileCursor::first(tiles);
  const int tile = walker.tile;
  // Turns, round robin: consumer c issues after bar.sync on barrier 1 + c, then lets the next one go (bar.arrive
  // on its barrier); the last consumer starts by letting consumer 0 go and skips its last hand-over, which nobody
  // waits for. All walk the same tile list, so their turns pair up.
  const int my_turn = 1 + c, other_turn = 1 + (c + 1) % Consumers;
  const bool last_consumer = c == Consumers - 1;
  auto begin_turn = [&]() {
    if constexpr (Turns) named_barrier_sync<256>(my_turn);
  };
  auto end_turn = [&](bool last) {
    if constexpr (Turns)
      if (!(last && last_consumer)) named_barrier_arrive<256>(other_turn);
  };
  if (tile >= 0) {
    if (Turns && last_consumer) named_barrier_arrive<256>(other_turn);
    int acc[32];
    mbarrier_wait(full_bar(0), 0);
    begin_turn();
    issue_qk(0, acc);
    end_turn(false);
    float s0, s1;
    qk_scales(p.granularity, k_scale, q_scale, tile, t, s0, s1);
    wgmma_wait<0>();
    register_fence(acc);
    uint32_t pa[2][4];
    float alpha[2];
    softmax(tile, acc, s0, s1, pa, alpha);
    walker.next(tiles);

    static_assert(kStages >= 2, "tile j-1 and tile j are in different stages");
    int stage = 0, next_stage = 1;  // of tile j-1 and tile j
    uint32_t next_phase = 0;        // of the full barrier of next_stage
    while (true) {
      const int next = walker.tile;
      if (next >= 0) mbarrier_wait(full_bar(next_stage), next_phase);
      begin_turn();
      issue_qk(next >= 0 ? next_stage : stage, acc);
      float tile_acc[kDTiles * 4];
      issue_pv(stage, pa, tile_acc);
      end_turn(next < 0);
      wgmma_wait<1>();  // S(j), the older group; P(j-1)·V(j-1) keeps running
      register_fence(acc);
      uint32_t next_pa[2][4];
      float next_alpha[2];
      if (next >= 0) {
        qk_scales(p.granularity, k_scale, q_scale, next, t, s0, s1);
        softmax(next, acc, s0, s1, next_pa, next_alpha);
        walker.next(tiles);
      }
      wgmma_wait<0>();
      register_fence(tile_acc);
      register_fence(pa);  // the P·V read pa until here: its registers stay pa's
#pragma unroll
      for (int d = 0; d < kDTiles; ++d) fold_tile(o[d], n_tiles(tile_acc)[d], alpha);
      // Every wgmma reading this stage has completed: hand it back to the producer.
      __syncwarp();
      if (lane == 0) mbarrier_arrive(empty_bar(stage));
      if (next < 0) break;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        pa[0][i] = next_pa[0][i];
        pa[1][i] = next_pa[1][i];
      }
      alpha[0] = next_alpha[0];
      alpha[1] = next_alpha[1];
      stage = next_stage;
      if (++next_stage == kStages) {
        next_stage = 0;
        next_phase ^= 1u;
      }
    }
  }
  float inv[2];
  finish_row_sums(row_sum, inv);
  const float* v_scale = p.v_scale + (static_cast<int64_t>(b) * p.heads_kv + hkv) * D;
  store_output_rows<kDTiles, true>(p, b, hq, warp_row0, g, t, o, inv, row_max, row_sum, v_scale, Sm90Log2Lse{});
#endif
}


// ==== The wide kernel: softmax steps of 128 keys ===================================================================
//
// attention_sm90_wide_kernel ("wide", the default for no mask or a LUT, with or without the stage-2 skip): the
// serial kernel's structure with a softmax step of 128 keys (two 64-key S accumulators) instead of 64. Per 128 keys
// there is then one running-max update, one P·V accumulator (4 k-steps of e4m3 wgmma) and one fold into O, one
// barrier and one stage wait: the per-step overhead, about a third of the serial kernel's instructions, is paid
// half as often.
// The result differs from the 64-key order only in rounding (docs/NUMERICS.md, "Where the GPU kernels may round
// differently"). Stages of 32 KB (K 128 x D int8, Vᵀ D x 128 e4m3 with 128B swizzle), 2 of them.
// Pairs: a step is any two 64-key tiles of the list, in list order (LUTs of blocks of an odd number of 64-key
// tiles): K and Vᵀ come one tile per TMA box, Vᵀ as two [D][64] tiles (64B swizzle). Otherwise a step is the
// aligned keys [128·s, 128·s + 128), one box per operand.
// PV: e4m3 P·V (Fp8), or P and V in the input dtype (Fp16, Bf16: V16). V16 holds the caller's V rows, N-major: per
// 64 channels a [kStepKeys][64] tile of 128-byte rows with the 128B swizzle (Pairs: each tile's 64 keys, one TMA
// box). At D128 that is 32 KB per step: two stages of K and V would leave room for 2 CTAs per SM, so K keeps its two
// stages and V has one buffer (kSingleV), loaded at the top of its step once the previous P·V is done; 3 CTAs fit.
template <int D, bool Pairs = false, PVMode PV = PVMode::Fp8>
struct Sm90WideConfig {
  static constexpr int kBlockQ = 64;
  static constexpr int kStepKeys = 2 * kBlockK;           // one softmax step
  static constexpr int kKeys = Pairs ? kBlockK : kStepKeys;  // keys per TMA box
  static constexpr int kThreads = 128;
  static constexpr bool kV16 = PV != PVMode::Fp8;
  using KTile = SwizzledTile<kStepKeys, D>;  // [key][channel] int8
  using VTile = SwizzledTile<D, kKeys>;      // Fp8: [channel][key] e4m3, 128B swizzle (64B: Pairs, two of them)
  using QTile = SwizzledTile<kBlockQ, D>;
  static constexpr int kVGroupBytes = kStepKeys * 128;  // V16: one 64-channel group of the step's V rows
  static constexpr int kVBytes = (kV16 ? 2 : 1) * D * kStepKeys;
  static constexpr bool kSingleV = kV16 && D == 128;
  static constexpr int kStageBytes = KTile::kBytes + (kSingleV ? 0 : kVBytes);
  static constexpr int kStages = 2;
  static constexpr int kSmemBytes =
      kStages * kStageBytes + (kSingleV ? kVBytes : 0) + QTile::kBytes + 8 * (kStages + (kSingleV ? 2 : 1)) + 1024;
  // V16 at D64 takes 146-168 registers: 3 CTAs. Stage 2 at D128 V16 would spill at 3 (its counters and λ): 2.
  static constexpr int kMinBlocks = D <= 64 ? (kV16 ? 3 : 4) : 3;
  static constexpr int kMinBlocksStage2 = kV16 && D == 128 ? 2 : 3;
  static_assert(kStageBytes % 1024 == 0 && QTile::kBytes % 1024 == 0, "tiles must stay 1024-byte aligned");
};

// P of one 64-key half as 16-bit A fragments of four 16-key chunks (keys in order; the m64k16 fragment from the
// accumulator layout, as attention_kernel.cuh packs it for mma.sync).
template <bool Bf16>
__device__ __forceinline__ void pack_p_16bit(const float (&p)[8][4], uint32_t (&pa)[4][4]) {
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    pa[c][0] = pack_16bit_x2<Bf16>(p[2 * c][0], p[2 * c][1]);
    pa[c][1] = pack_16bit_x2<Bf16>(p[2 * c][2], p[2 * c][3]);
    pa[c][2] = pack_16bit_x2<Bf16>(p[2 * c + 1][0], p[2 * c + 1][1]);
    pa[c][3] = pack_16bit_x2<Bf16>(p[2 * c + 1][2], p[2 * c + 1][3]);
  }
}

// The A fragments of one 64-key half of P: two 32-key e4m3 chunks (Fp8), four 16-key 16-bit ones.
template <PVMode PV>
using HalfFragments = uint32_t[PV == PVMode::Fp8 ? 2 : 4][4];

// P (P·448 for Fp8) of one 64-key half into its A fragments, and its row sums (pairwise trees) added to sum.
// P = exp2(exponent(n, e)): from masked logits, or from the accumulator in one FFMA (tile_softmax_p448).
template <PVMode PV, typename Exponent>
__device__ __forceinline__ void half_p448(Exponent exponent, float (&sum)[2], HalfFragments<PV>& pa) {
  float p448[8][4];
#pragma unroll
  for (int n = 0; n < 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) p448[n][e] = fast_exp2(exponent(n, e));
  float sums[2];
  thread_row_sums(p448, sums);
  sum[0] += sums[0];
  sum[1] += sums[1];
  if constexpr (PV == PVMode::Fp8) pack_p_e4m3(p448, pa);
  else pack_p_16bit<PV == PVMode::Bf16>(p448, pa);
}

// The stage-2 instantiation of the wide kernel needs registers of its own (λ, its decisions). It keeps in shared
// memory what its loop only reads or counts once per step: each warp's counters and first masked step, and thread
// 0's place in the list. In registers they made the D128 instantiation spill at 3 CTAs per SM. A function-scope
// variable, so that only the kernels that call this allocate it.
struct Stage2Shared {
  struct Warp {
    unsigned skipped, total;
    int mask_from;
  } warps[4];
  int block_at, part;
};
__device__ __forceinline__ Stage2Shared& stage2_shared() {
  __shared__ Stage2Shared shared;
  return shared;
}

// A warp's stage-2 counter in shared memory (for stage2_skips_tile): lane 0 counts for the warp.
struct SharedCount {
  unsigned* slot;
  __device__ __forceinline__ void operator++() {
    if (threadIdx.x % 32 == 0) ++*slot;
  }
};

// SpargeAttn stage 2 for the two 64-key halves of a wide step, per warp, deciding exactly as the serial kernel does
// per tile (stage2_skips_tile): half 0 against the running max, half 1 against the running max after half 0. A
// skipped half's maxima become -inf, so that it adds nothing to the step's max. Counts into stage2_shared().
__device__ __forceinline__ void stage2_halves(float (&max0)[2], float (&max1)[2], const float (&row_max)[2],
                                              float pv_lambda, int warp_row0, int g, int tokens_q, bool& skip0,
                                              bool& skip1) {
  Stage2Shared::Warp& counts = stage2_shared().warps[threadIdx.x / 32];
  SharedCount pv_skipped{&counts.skipped}, pv_total{&counts.total};
  skip0 = stage2_skips_tile(max0, row_max, pv_lambda, warp_row0, g, tokens_q, pv_skipped, pv_total);
  float after0[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) after0[h] = skip0 ? row_max[h] : fmaxf(row_max[h], max0[h]);
  skip1 = stage2_skips_tile(max1, after0, pv_lambda, warp_row0, g, tokens_q, pv_skipped, pv_total);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if (skip0) max0[h] = -INFINITY;
    if (skip1) max1[h] = -INFINITY;
  }
}

// The stage-2 instantiation keeps 3 CTAs per SM at D64, as the serial kernel's (its counters and λ).
template <int D, bool Stage2, bool Pairs, PVMode PV = PVMode::Fp8>
__global__ void __launch_bounds__(Sm90WideConfig<D, Pairs, PV>::kThreads,
                                  Stage2 ? Sm90WideConfig<D, Pairs, PV>::kMinBlocksStage2
                                         : Sm90WideConfig<D, Pairs, PV>::kMinBlocks)
    attention_sm90_wide_kernel(const __grid_constant__ AttentionParams p, const __grid_constant__ CUtensorMap q_map,
                               const __grid_constant__ CUtensorMap k_map, const __grid_constant__ CUtensorMap v_map) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Cfg = Sm90WideConfig<D, Pairs, PV>;
  using KTile = typename Cfg::KTile;
  using QTile = typename Cfg::QTile;
  constexpr bool kV16 = Cfg::kV16;
  constexpr int kKeys = Cfg::kStepKeys;
  constexpr int kUnit = Pairs ? kBlockK : kKeys;  // the list's unit: a 64-key tile (Pairs) or a step
  constexpr int kStages = Cfg::kStages;
  constexpr int kDTiles = D / 8;
  extern __shared__ __align__(1024) unsigned char smem[];

  const RowCoords rc = row_coords<Cfg::kBlockQ>(p);
  const int hq = rc.hq, b = rc.b, hkv = rc.hkv, g = rc.g, t = rc.t;
  const int q0 = rc.q0, warp_row0 = rc.warp_row0, causal_offset = rc.causal_offset;
  // The units (steps, or with Pairs 64-key tiles) this CTA visits: those of [0, steps) (cut at the causal diagonal
  // of its last row) that its LUT row lists, each LUT block being `per_block` units, or all of them.
  int steps = (p.tokens_k + kUnit - 1) / kUnit;
  if (p.causal) {
    const int last_key = min(q0 + Cfg::kBlockQ, p.tokens_q) - 1 + causal_offset;
    steps = last_key < 0 ? 0 : min(steps, last_key / kUnit + 1);
  }
  const int32_t* lut = nullptr;
  int blocks = steps, per_block = 1;
  if (p.mask_mode == static_cast<int>(MaskMode::Lut)) {
    const int hm = hq / (p.heads_q / p.mask_heads);
    const int64_t row = (static_cast<int64_t>(b) * p.mask_heads + hm) * p.mask_blocks_q + q0 / p.mask_block_q;
    blocks = min(max(__ldg(p.mask_counts + row), 0), p.mask_blocks_k);
    lut = p.mask_indices + row * p.mask_blocks_k;
    per_block = Pairs ? p.mask_tiles_k : p.mask_tiles_k / 2;
  }

  const uint32_t smem_base = (smem_address(smem) + 1023u) & ~1023u;
  const uint32_t single_v = smem_base + kStages * Cfg::kStageBytes;  // kSingleV: V's buffer
  const uint32_t q_smem = single_v + (Cfg::kSingleV ? Cfg::kVBytes : 0);
  // full[stage] at bars + 8·stage, Q's at bars + 8·kStages, kSingleV: V's at bars + 8·(kStages + 1).
  const uint32_t bars = q_smem + QTile::kBytes;
  const uint32_t q_bar = bars + 8u * kStages;
  const uint32_t v_bar = q_bar + 8u;
  const int kv_row = b * p.heads_kv + hkv;
  // Thread 0 walks the step list kStages - 1 steps ahead and fills the stages: it records each stage's step in
  // stage_step (-1: the list is done, the stage's barrier completes with no bytes; Pairs: its two tiles, the second
  // -1 for a last odd tile) before its arrival on the stage's barrier, which orders the record before the other
  // threads' reads after their wait.
  __shared__ int stage_step[kStages];
  __shared__ int2 stage_tiles[Pairs ? kStages : 1];
  int block_at = 0, part = 0;  // thread 0's place in the list (Stage2: in stage2_shared())
  auto walk = [&](int& block_at, int& part) {
    if (block_at >= blocks) return -1;
    const int block = lut != nullptr ? __ldg(lut + block_at) : block_at;
    const int step = block * per_block + part;
    if (block < 0 || step >= steps) return -1;  // blocks ascend: the rest lies past the end or the diagonal
    if (++part == per_block) {
      part = 0;
      ++block_at;
    }
    return step;
  };
  auto next_step = [&]() {
    if constexpr (Stage2) return walk(stage2_shared().block_at, stage2_shared().part);
    else return walk(block_at, part);
  };
  // V of the TMA box of keys from key0 into slot `slot` (Pairs: the step's first or second tile) of the stage's V at
  // v_dst: the transposed e4m3 rows (Fp8), or the caller's rows per 64-channel group (V16).
  auto load_v = [&](uint32_t v_dst, uint32_t bar, int key0, int slot) {
    if constexpr (kV16) {
#pragma unroll
      for (int group = 0; group < D / 64; ++group)
        tma_load_4d(v_dst + group * Cfg::kVGroupBytes + slot * kBlockK * 128, &v_map, bar, 64 * group, key0, hkv, b);
    } else {
      tma_load_3d(v_dst + slot * D * kBlockK, &v_map, bar, key0, 0, kv_row);
    }
  };
  auto fill = [&](int stage) {
    if constexpr (Pairs) {
      const uint32_t bar = bars + 8u * stage;
      const uint32_t k_dst = smem_base + stage * Cfg::kStageBytes;
      const int first = next_step(), second = first < 0 ? -1 : next_step();
      stage_tiles[stage] = make_int2(first, second);
      if (first < 0) {
        mbarrier_arrive(bar);
        return;
      }
      const int other = second < 0 ? first : second;  // a last odd tile: its copy fills the masked half
      mbarrier_arrive_expect_tx(bar, Cfg::kStageBytes);
      tma_load_3d(k_dst, &k_map, bar, 0, first * kBlockK, kv_row);
      tma_load_3d(k_dst + kBlockK * D, &k_map, bar, 0, other * kBlockK, kv_row);
      if constexpr (!Cfg::kSingleV) {
        load_v(k_dst + KTile::kBytes, bar, first * kBlockK, 0);
        load_v(k_dst + KTile::kBytes, bar, other * kBlockK, 1);
      }
    } else {
      const int step = next_step();
      stage_step[stage] = step;
      const uint32_t bar = bars + 8u * stage;
      if (step < 0) {
        mbarrier_arrive(bar);
        return;
      }
      const uint32_t k_dst = smem_base + stage * Cfg::kStageBytes;
      mbarrier_arrive_expect_tx(bar, Cfg::kStageBytes);
      tma_load_3d(k_dst, &k_map, bar, 0, step * kKeys, kv_row);
      if constexpr (!Cfg::kSingleV) load_v(k_dst + KTile::kBytes, bar, step * kKeys, 0);
    }
  };
  if (threadIdx.x == 0) {
    for (int s = 0; s <= kStages + (Cfg::kSingleV ? 1 : 0); ++s) mbarrier_init(bars + 8u * s, 1);
    fence_mbarrier_init();
    if constexpr (Stage2) stage2_shared().block_at = stage2_shared().part = 0;
    mbarrier_arrive_expect_tx(q_bar, QTile::kBytes);
    tma_load_3d(q_smem, &q_map, q_bar, 0, q0, b * p.heads_q + hq);
    for (int s = 0; s < kStages - 1; ++s) fill(s);
  }
  __syncthreads();  // the barriers are initialized

  const float q_scale = load_q_scale(p, b, hq, q0, warp_row0, g, steps);
  const float* k_scale = p.k_scale + (static_cast<int64_t>(b) * p.heads_kv + hkv) * p.k_groups;
  const int warp_mask_from = first_masked_tile<kUnit>(p, warp_row0, causal_offset);
  if constexpr (Stage2)  // read after the loop's first barrier
    if (threadIdx.x % 32 == 0) stage2_shared().warps[threadIdx.x / 32] = Stage2Shared::Warp{0, 0, warp_mask_from};
  auto mask_from = [&]() {
    if constexpr (Stage2) return stage2_shared().warps[threadIdx.x / 32].mask_from;
    else return warp_mask_from;
  };
  mbarrier_wait(q_bar, 0);
  const uint64_t q_desc = smem_descriptor<D>(q_smem);

  float o[kDTiles][4];
#pragma unroll
  for (int i = 0; i < kDTiles; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.0f, 0.0f};  // this thread's partial sums of P·448
  const float pv_lambda = Stage2 ? p.pv_threshold[hq] : 0.0f;

  for (int it = 0;; ++it) {
    const int stage = it % kStages;
    mbarrier_wait(bars + 8u * stage, (it / kStages) & 1);  // the step's K and Vᵀ are in shared memory
    __syncthreads();  // every wgmma of the previous step has completed: its stage is free
    // The step: its two 64-key tiles are those of the two halves of the stage (Pairs: pair.y -1 for a last odd tile,
    // the other half then a copy of the first).
    int step = 0;
    int2 pair = make_int2(0, 0);
    if constexpr (Pairs) {
      pair = stage_tiles[stage];
      if (pair.x < 0) break;
    } else {
      step = stage_step[stage];
      if (step < 0) break;
    }
    if (threadIdx.x == 0) {
      fill((it + kStages - 1) % kStages);
      if constexpr (Cfg::kSingleV) {  // this step's V, into the buffer the previous P·V has finished with
        mbarrier_arrive_expect_tx(v_bar, Cfg::kVBytes);
        if constexpr (Pairs) {
          load_v(single_v, v_bar, pair.x * kBlockK, 0);
          load_v(single_v, v_bar, (pair.y < 0 ? pair.x : pair.y) * kBlockK, 1);
        } else {
          load_v(single_v, v_bar, step * kKeys, 0);
        }
      }
    }
    const uint32_t k_smem = smem_base + stage * Cfg::kStageBytes;
    const uint32_t v_smem = Cfg::kSingleV ? single_v : k_smem + KTile::kBytes;

    // ---- S = Q8 · K8ᵀ as two 64 x 64 halves (s32), one commit group ---------------------------------------------
    int acc0[32], acc1[32];
    const uint64_t k_desc = smem_descriptor<D>(k_smem);
    constexpr uint32_t kHalf = (kBlockK * D) >> 4;  // the second half's 64 key rows, in descriptor units
    wgmma_fence();
    wgmma_s8_m64n64k32_zero(acc0, q_desc, k_desc);
#pragma unroll
    for (int kk = 1; kk < D / 32; ++kk) wgmma_s8_m64n64k32(acc0, q_desc + 2 * kk, k_desc + 2 * kk, 1);
    wgmma_s8_m64n64k32_zero(acc1, q_desc, k_desc + kHalf);
#pragma unroll
    for (int kk = 1; kk < D / 32; ++kk) wgmma_s8_m64n64k32(acc1, q_desc + 2 * kk, k_desc + kHalf + 2 * kk, 1);
    wgmma_commit();

    // K scales of the two 64-key halves (the K groups' tiles) while the MMAs run. Without Pairs, tile 2·step + 1
    // may lie past the last key: its scales (another head's, or the workspace's padding after the last head's)
    // are then never used.
    float sc00, sc01, sc10, sc11;
    qk_scales(p.granularity, k_scale, q_scale, Pairs ? pair.x : 2 * step, t, sc00, sc01);
    qk_scales(p.granularity, k_scale, q_scale, Pairs ? max(pair.x, pair.y) : 2 * step + 1, t, sc10, sc11);
    wgmma_wait<0>();
    register_fence(acc0);
    register_fence(acc1);

    // ---- online softmax over the 128 keys --------------------------------------------------------------------
    // Masked and unmasked steps are separate branches, so that the accumulators and the logits are never live
    // together (D128 spills otherwise). Stage 2 (Stage2): a warp that skips a half leaves its P 0 (stage2_halves);
    // the P·V itself is skipped when all four warps skip both halves.
    float tile_max[2], alpha[2], minus_shift[2];
    float sum[2] = {0.0f, 0.0f};
    // The A fragments of P: Fp8 four 32-key chunks, keys in permuted_key order (the layout of v8t); V16 eight 16-key
    // chunks, keys in order.
    constexpr int kHalfChunks = kV16 ? 4 : 2;
    uint32_t pa[2 * kHalfChunks][4];
    auto& pa0 = reinterpret_cast<HalfFragments<PV>&>(pa[0]);
    auto& pa1 = reinterpret_cast<HalfFragments<PV>&>(pa[kHalfChunks]);
    bool skip0 = false, skip1 = false;
    // V16: half 1's exponents (logit − shift), so that its exponentials run after half 0's P·V is issued.
    float e1[8][4];
    auto half = [&](bool skip, HalfFragments<PV>& half_pa, auto exponent) {
      if (Stage2 && skip) {
#pragma unroll
        for (int c = 0; c < kHalfChunks; ++c)
#pragma unroll
          for (int i = 0; i < 4; ++i) half_pa[c][i] = 0u;
      } else {
        half_p448<PV>(exponent, sum, half_pa);
      }
    };
    if (Pairs ? max(pair.x, pair.y) >= mask_from() || pair.y < 0 : step >= mask_from()) {
      float s0[8][4], s1[8][4], max0[2], max1[2];
      dequantize_logits<Sm90IntToFloat>(n_tiles(acc0), sc00, sc01, s0);
      dequantize_logits<Sm90IntToFloat>(n_tiles(acc1), sc10, sc11, s1);
      const int key0 = Pairs ? pair.x * kBlockK : step * kKeys;
      const int key1 = Pairs ? max(pair.x, pair.y) * kBlockK : key0 + kBlockK;
      mask_tile_elements(p, key0, warp_row0, g, t, causal_offset, s0);
      mask_tile_elements(p, key1, warp_row0, g, t, causal_offset, s1);
      if (Pairs && pair.y < 0) {  // a last odd tile: the other half (its copy) adds nothing
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) s1[n][e] = -INFINITY;
      }
      tile_row_max(s0, max0);
      tile_row_max(s1, max1);
      if constexpr (Stage2)
        stage2_halves(max0, max1, row_max, pv_lambda, warp_row0, g, p.tokens_q, skip0, skip1);
      tile_max[0] = fmaxf(max0[0], max1[0]);
      tile_max[1] = fmaxf(max0[1], max1[1]);
      update_row_max<!kV16>(tile_max, row_max, alpha, minus_shift);
      half(skip0, pa0, [&](int n, int e) { return s0[n][e] + minus_shift[e >> 1]; });
      if constexpr (kV16) {
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) e1[n][e] = s1[n][e] + minus_shift[e >> 1];
      } else {
        half(skip1, pa1, [&](int n, int e) { return s1[n][e] + minus_shift[e >> 1]; });
      }
    } else {
      const int (&a0)[8][4] = n_tiles(acc0);
      const int (&a1)[8][4] = n_tiles(acc1);
      if constexpr (Stage2) {
        float max0[2], max1[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          max0[h] = quad_max(thread_row_max_s32(a0, sc00, sc01, h));
          max1[h] = quad_max(thread_row_max_s32(a1, sc10, sc11, h));
        }
        stage2_halves(max0, max1, row_max, pv_lambda, warp_row0, g, p.tokens_q, skip0, skip1);
        tile_max[0] = fmaxf(max0[0], max1[0]);
        tile_max[1] = fmaxf(max0[1], max1[1]);
      } else {
        // Both halves' maxima in the thread first: one quad reduction per row instead of two (the same max).
#pragma unroll
        for (int h = 0; h < 2; ++h)
          tile_max[h] =
              quad_max(fmaxf(thread_row_max_s32(a0, sc00, sc01, h), thread_row_max_s32(a1, sc10, sc11, h)));
      }
      update_row_max<!kV16>(tile_max, row_max, alpha, minus_shift);
      const Sm90IntToFloat to_float;
      half(skip0, pa0,
           [&](int n, int e) { return fmaf(to_float(a0[n][e]), (e & 1) ? sc01 : sc00, minus_shift[e >> 1]); });
      if constexpr (kV16) {
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) e1[n][e] = fmaf(to_float(a1[n][e]), (e & 1) ? sc11 : sc10, minus_shift[e >> 1]);
      } else {
        half(skip1, pa1,
             [&](int n, int e) { return fmaf(to_float(a1[n][e]), (e & 1) ? sc11 : sc10, minus_shift[e >> 1]); });
      }
    }

    if constexpr (kV16) {
      // kSingleV: every thread waits for each step's V, used or not, so that the barrier's phases stay in step.
      if constexpr (Cfg::kSingleV) mbarrier_wait(v_bar, it & 1);
      if (Stage2 && __syncthreads_and(skip0 && skip1)) continue;  // uniform; the row sums stay as they are
      // ---- O = O·alpha + P · V over the 128 keys (8 16-bit k-steps accumulating into O) ------------------------
      // O is rescaled first. Half 0's P·V is issued before half 1's exponentials, which then run beside it on the
      // tensor cores.
      rescale_o_on_new_max(o, alpha);
      auto& o_acc = reinterpret_cast<float (&)[kDTiles * 4]>(o);
      // Chunk c's 16 key rows start 16 · 128 bytes further in each 64-channel group.
      const uint64_t v_base = smem_descriptor_n_major128(v_smem, Cfg::kVGroupBytes);
      auto issue_pv_half = [&](int half_index) {
        wgmma_fence();
#pragma unroll
        for (int c = half_index * kHalfChunks; c < (half_index + 1) * kHalfChunks; ++c) {
          if constexpr (D == 128) wgmma_16bit_m64n128k16_rs<PV == PVMode::Bf16>(o_acc, pa[c], v_base + c * 128);
          else wgmma_16bit_m64n64k16_rs<PV == PVMode::Bf16>(o_acc, pa[c], v_base + c * 128);
        }
        wgmma_commit();
      };
      issue_pv_half(0);
      half(skip1, pa1, [&](int n, int e) { return e1[n][e]; });
      issue_pv_half(1);
      row_sum[0] = row_sum[0] * alpha[0] + sum[0];
      row_sum[1] = row_sum[1] * alpha[1] + sum[1];
      wgmma_wait<0>();
      register_fence(o_acc);
      register_fence(pa);  // the P·V read pa until here: its registers stay pa's
    } else {
      row_sum[0] = row_sum[0] * alpha[0] + sum[0];
      row_sum[1] = row_sum[1] * alpha[1] + sum[1];
      if (Stage2 && __syncthreads_and(skip0 && skip1)) continue;  // uniform: the CTA is one warpgroup

      // ---- tile = P · V over the 128 keys (4 e4m3 k-steps), O = O·alpha + tile ---------------------------------
      float tile_acc[kDTiles * 4];
      // The descriptor of 32-key chunk c: one [D][128] tile, or (Pairs) two [D][64] tiles of two chunks each (the
      // second tile's offset in the address field, in 16-byte units; shared memory is below 2^18 bytes).
      const uint64_t v_base = smem_descriptor<Pairs ? kBlockK : kKeys>(v_smem);
      auto v_desc = [&](int c) -> uint64_t {
        if constexpr (Pairs) return v_base + (c / 2) * ((D * kBlockK) >> 4) + 2 * (c % 2);
        return v_base + 2 * c;
      };
      wgmma_fence();
      if constexpr (D == 128) {
        wgmma_e4m3_m64n128k32_rs_zero(tile_acc, pa[0], v_desc(0));
#pragma unroll
        for (int c = 1; c < 4; ++c) wgmma_e4m3_m64n128k32_rs(tile_acc, pa[c], v_desc(c), 1);
      } else {
        wgmma_e4m3_m64n64k32_rs_zero(tile_acc, pa[0], v_desc(0));
#pragma unroll
        for (int c = 1; c < 4; ++c) wgmma_e4m3_m64n64k32_rs(tile_acc, pa[c], v_desc(c), 1);
      }
      wgmma_commit();
      wgmma_wait<0>();
      register_fence(tile_acc);
#pragma unroll
      for (int d = 0; d < kDTiles; ++d) fold_tile(o[d], n_tiles(tile_acc)[d], alpha);
    }
  }

  if constexpr (Stage2) {
    const Stage2Shared::Warp& counts = stage2_shared().warps[threadIdx.x / 32];
    add_stage2_counters(p, threadIdx.x % 32, counts.skipped, counts.total);
  }

  // ---- epilogue: O / l · v_scale, LSE (as attention_kernel.cuh) -------------------------------------------------
  float inv[2];
  finish_row_sums(row_sum, inv);
  if constexpr (kV16) {
    store_output_rows<kDTiles, false>(p, b, hq, warp_row0, g, t, o, inv, row_max, row_sum, nullptr,
                                      [](float m, float l) { return m + __log2f(l); });
  } else {
    const float* v_scale = p.v_scale + (static_cast<int64_t>(b) * p.heads_kv + hkv) * D;
    store_output_rows<kDTiles, true>(p, b, hq, warp_row0, g, t, o, inv, row_max, row_sum, v_scale, Sm90Log2Lse{});
  }
#endif
}

// ---- host side --------------------------------------------------------------------------------------------------

// cuTensorMapEncodeTiled from the driver, reached through the runtime (no link against libcuda).
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess)
      fn = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encode;
}

// A 3-D byte tensor [outer][middle][inner] (inner contiguous), read in boxes of box_inner x box_middle x 1 with
// the swizzle of box_inner-byte rows (64 or 128), zero fill out of range.
inline bool encode_byte_tensor_map(CUtensorMap& map, const void* base, uint64_t inner, uint64_t middle,
                                   uint64_t outer, uint32_t box_inner, uint32_t box_middle) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (encode == nullptr) return false;
  const cuuint64_t dims[3] = {inner, middle, outer};
  const cuuint64_t strides[2] = {inner, inner * middle};  // bytes, of dims 1 and 2
  const cuuint32_t box[3] = {box_inner, box_middle, 1};
  const cuuint32_t element_strides[3] = {1, 1, 1};
  const CUtensorMapSwizzle swizzle =
      box_inner == 128 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_64B;
  return encode(&map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 3, const_cast<void*>(base), dims, strides, box,
                element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// The caller's V rows (fp16 or bf16: 2 bytes) as a 4-D tensor [batch][head][token][channel], read in boxes of 64
// channels x box_keys tokens with the 128B swizzle, zero fill past the last token. The TMA needs a 16-byte aligned
// base and strides that are multiples of 16 bytes, which the backend ensures for FP16 P·V (else V is copied);
// false where the driver refuses the map anyway.
inline bool encode_v16_tensor_map(CUtensorMap& map, const AttentionParams& params, int head_dim, uint32_t box_keys) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (encode == nullptr) return false;
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(head_dim), static_cast<cuuint64_t>(params.tokens_k),
                              static_cast<cuuint64_t>(params.heads_kv), static_cast<cuuint64_t>(params.batch)};
  const cuuint64_t strides[3] = {2 * static_cast<cuuint64_t>(params.v_stride_t),
                                 2 * static_cast<cuuint64_t>(params.v_stride_h),
                                 2 * static_cast<cuuint64_t>(params.v_stride_b)};
  const cuuint32_t box[4] = {64, box_keys, 1, 1};
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  return encode(&map, CU_TENSOR_MAP_DATA_TYPE_UINT16, 4, const_cast<void*>(params.v), dims, strides, box,
                element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// Host side of a TMA kernel (configuration Cfg: kBlockQ query rows per CTA, kKeys keys per stage, kThreads,
// kSmemBytes): encodes the tensor maps of Q8 (boxes of kBlockQ rows), K8 and V (boxes of kKeys keys: Vᵀ8, whose
// rows of 128 keys take the 128B swizzle, or with Cfg::kV16 the caller's 16-bit rows) and launches one CTA per
// kBlockQ query rows of each (query head, batch). A map the driver refuses runs `fallback` where there is one.
template <typename Cfg, int D, typename Kernel>
int launch_tma_kernel(Kernel kernel, const AttentionParams& params, void* stream,
                      AttentionLauncher fallback = nullptr) {
  CUtensorMap q_map, k_map, v_map;
  bool v_encoded = false;
  if constexpr (Cfg::kV16) v_encoded = encode_v16_tensor_map(v_map, params, D, Cfg::kKeys);
  else
    v_encoded = encode_byte_tensor_map(v_map, params.v8t, params.vt_stride, D,
                                       static_cast<uint64_t>(params.batch) * params.heads_kv, Cfg::kKeys, D);
  const bool encoded =
      v_encoded &&
      encode_byte_tensor_map(q_map, params.q8, D, params.tokens_q,
                             static_cast<uint64_t>(params.batch) * params.heads_q, D, Cfg::kBlockQ) &&
      encode_byte_tensor_map(k_map, params.k8, D, params.tokens_k,
                             static_cast<uint64_t>(params.batch) * params.heads_kv, D, Cfg::kKeys);
  if (!encoded && fallback != nullptr) return fallback(params, stream);
  if (!encoded) return static_cast<int>(cudaErrorInvalidValue);
  if (const int e = allow_dynamic_smem<Cfg>(kernel); e != 0) return e;
  const dim3 grid((params.tokens_q + Cfg::kBlockQ - 1) / Cfg::kBlockQ, params.heads_q, params.batch);
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, static_cast<cudaStream_t>(stream)>>>(params, q_map, k_map, v_map);
  return static_cast<int>(cudaGetLastError());
}

// Which sm90a kernel runs: SPARQ_SM90_KERNEL unset or "wide" (the default): the wide kernel where it applies (no
// mask or a LUT; with or without the stage-2 skip), else (a bitmap walked as such) the serial one; "serial" (the
// 64-key kernel always), "ws" (warp-specialized, consumers taking turns) or "ws-free" (without the turns). Block
// masks whose blocks are not a multiple of 128 rows and the stage-2 P·V skip take the serial kernel under "ws" too.
// Read per launch, so tests can switch.
inline const char* sm90_kernel_choice() {
  const char* e = std::getenv("SPARQ_SM90_KERNEL");
  return e == nullptr || *e == '\0' ? "wide" : e;
}

// FP16/BF16 P·V (PV, V16): the wide kernel only. Where it does not apply (a bitmap walked as such, another
// SPARQ_SM90_KERNEL, a V the TMA cannot describe), `fallback` (the sm89 path's kernel of the same head dim) runs.
template <int D, PVMode PV>
int launch_attention_sm90_v16(const AttentionParams& params, void* stream, AttentionLauncher fallback) {
  if (std::string_view(sm90_kernel_choice()) != "wide" || params.mask_mode == static_cast<int>(MaskMode::Bitmap))
    return fallback(params, stream);
  const bool stage2 = params.pv_threshold != nullptr;
  if (params.mask_mode == static_cast<int>(MaskMode::Lut) && params.mask_tiles_k % 2 != 0) {
    using Cfg = Sm90WideConfig<D, true, PV>;
    return stage2 ? launch_tma_kernel<Cfg, D>(attention_sm90_wide_kernel<D, true, true, PV>, params, stream, fallback)
                  : launch_tma_kernel<Cfg, D>(attention_sm90_wide_kernel<D, false, true, PV>, params, stream, fallback);
  }
  using Cfg = Sm90WideConfig<D, false, PV>;
  return stage2 ? launch_tma_kernel<Cfg, D>(attention_sm90_wide_kernel<D, true, false, PV>, params, stream, fallback)
                : launch_tma_kernel<Cfg, D>(attention_sm90_wide_kernel<D, false, false, PV>, params, stream, fallback);
}

template <int D>
int launch_attention_sm90(const AttentionParams& params, void* stream) {
  const std::string_view choice = sm90_kernel_choice();
  // The wide kernel takes no mask or a LUT (a bitmap is walked by the serial kernel; the backend makes small
  // bitmaps LUTs); LUT blocks of an odd number of 64-key tiles take its Pairs form.
  if (choice == "wide" && params.mask_mode != static_cast<int>(MaskMode::Bitmap)) {
    const bool stage2 = params.pv_threshold != nullptr;
    if (params.mask_mode == static_cast<int>(MaskMode::Lut) && params.mask_tiles_k % 2 != 0) {
      using Cfg = Sm90WideConfig<D, true>;
      return stage2 ? launch_tma_kernel<Cfg, D>(attention_sm90_wide_kernel<D, true, true>, params, stream)
                    : launch_tma_kernel<Cfg, D>(attention_sm90_wide_kernel<D, false, true>, params, stream);
    }
    using Cfg = Sm90WideConfig<D, false>;
    return stage2 ? launch_tma_kernel<Cfg, D>(attention_sm90_wide_kernel<D, true, false>, params, stream)
                  : launch_tma_kernel<Cfg, D>(attention_sm90_wide_kernel<D, false, false>, params, stream);
  }
  const bool ws = (choice == "ws" || choice == "ws-free") && params.pv_threshold == nullptr &&
                  (params.mask_mode == static_cast<int>(MaskMode::None) || params.mask_block_q % 128 == 0);
  if (ws && choice == "ws") return launch_tma_kernel<Sm90WsConfig<D>, D>(attention_sm90_ws_kernel<D, true>, params, stream);
  if (ws) return launch_tma_kernel<Sm90WsConfig<D>, D>(attention_sm90_ws_kernel<D, false>, params, stream);
  if (params.pv_threshold != nullptr)
    return launch_tma_kernel<Sm90Config<D>, D>(attention_sm90_kernel<D, true>, params, stream);
  return launch_tma_kernel<Sm90Config<D>, D>(attention_sm90_kernel<D, false>, params, stream);
}

}  // namespace sparq::cuda
