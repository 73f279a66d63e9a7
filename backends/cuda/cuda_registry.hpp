// The CUDA backend's kernel registry and the params struct its attention kernels take. Shared by the host
// code (g++), the generated registry (g++) and the generated kernels (nvcc); no CUDA headers needed here.
#pragma once

#include <cstddef>
#include <cstdint>

namespace sparq::cuda {

// Attention tile: kAttentionBlockQ query rows per CTA (4 warps x 16 rows; attention_kernel.cuh says why),
// kBlockK keys per pipeline step; together the mask granularity. kBlockQ is the query block of the PerBlock
// INT8 groups (docs/NUMERICS.md), the tile of the Q quantization kernel.
constexpr int kBlockQ = 128;
constexpr int kAttentionBlockQ = 64;
constexpr int kBlockK = 64;

enum class Granularity : int { PerBlock = 0, PerWarp = 1, PerThread = 2 };
// Bitmap masks reach the kernels as a LUT made on the device when it is small (cuda_backend.cpp says when),
// else as the bitmap itself.
enum class MaskMode : int { None = 0, Lut = 1, Bitmap = 2 };

// What one attention launch reads and writes. Quantized operands live in the backend's workspace:
//   q8 [B, Hq, Nq, D] int8, k8 [B, Hkv, Nk, D] int8 (contiguous),
//   q_scale [B, Hq, q_groups], k_scale [B, Hkv, k_groups] (docs/NUMERICS.md groups; q_scale folds scale·log2 e),
//   FP8 P·V: v8t [B, Hkv, D, vt_stride] e4m3, tokens permuted within each 32-token chunk (attention_kernel.cuh),
//            v_scale [B, Hkv, D];
//   FP16 P·V: v is the caller's V (input dtype) with its strides (elements).
// Strides are in elements.
struct AttentionParams {
  const int8_t* q8 = nullptr;
  const int8_t* k8 = nullptr;
  const float* q_scale = nullptr;
  const float* k_scale = nullptr;
  const uint8_t* v8t = nullptr;
  const float* v_scale = nullptr;
  const void* v = nullptr;
  int64_t v_stride_b = 0, v_stride_h = 0, v_stride_t = 0;
  const float* q_km = nullptr;  // [B, Hq, Nq]: scale·(q·km), added to the LSE; null when not smoothing
  void* out = nullptr;
  int64_t o_stride_b = 0, o_stride_h = 0, o_stride_t = 0;
  float* lse = nullptr;  // null: no LSE
  int64_t l_stride_b = 0, l_stride_h = 0, l_stride_t = 0;
  // A fused token order: the output and LSE of token i go to row out_rows[i] (i < out_rows_size; row i beyond).
  const int32_t* out_rows = nullptr;
  int out_rows_size = 0;

  int batch = 0, heads_q = 0, heads_kv = 0, tokens_q = 0, tokens_k = 0, kv_group = 1;
  int q_groups = 0, k_groups = 0, vt_stride = 0;
  int granularity = 0;  // Granularity
  int causal = 0;
  int in_bf16 = 0, out_bf16 = 0;

  int mask_mode = 0;  // MaskMode
  int mask_heads = 1;
  int mask_blocks_q = 0, mask_blocks_k = 0;
  int mask_block_q = kAttentionBlockQ;  // rows of a mask block (a multiple of the kernel's BLOCK_Q)
  int mask_tiles_k = 1;        // mask block columns / BLOCK_K
  const int32_t* mask_counts = nullptr;    // [B, Hq, nQB]
  const int32_t* mask_indices = nullptr;   // [B, Hq, nQB, nKB] (a bitmap made a LUT: [B, Hm, nQB, nKB])
  const uint8_t* mask_bitmap = nullptr;    // [B, Hm, nQB, nKB]

  // SpargeAttn stage 2 (P·V skip): λ per query head (log2 units), null = off; counters [skipped, visited]
  // of (16-row group, key tile) pairs, added to when not null.
  const float* pv_threshold = nullptr;
  unsigned long long* pv_counters = nullptr;
};

// Launches the kernel on `stream` (a cudaStream_t); returns the cudaError_t of the launch as an int, or
// kLaunchNeedsMoreSharedMemory when the device cannot give the kernel its shared memory (large head dims on
// GPUs with ~100 KB per block).
using AttentionLauncher = int (*)(const AttentionParams& params, void* stream);
constexpr int kLaunchNeedsMoreSharedMemory = -1;

struct AttentionKernel {
  const char* name;   // the variant name, e.g. attention_sm89_d128_fp8
  int arch;           // the path: 80, 89 or 90 (sm90a, wgmma: compute capability 9.0 only)
  int head_dim;
  bool pv_fp8;        // FP8 P·V (else FP16/BF16 P·V, chosen by params.in_bf16)
  AttentionLauncher launch;
};

extern const AttentionKernel kAttentionKernels[];
extern const std::size_t kAttentionKernelCount;

}  // namespace sparq::cuda
