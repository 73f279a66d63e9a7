// Host interface of the arch-neutral preprocessing kernels (cuda_backend_kernels.cu): K mean, smoothing and
// INT8 quantization of Q and K, FP8 e4m3 quantization and transposition of V (docs/NUMERICS.md).
// No CUDA headers here: included by the g++-compiled host code.
#pragma once

#include <cstdint>

namespace sparq::cuda {

// One strided fp16/bf16 input tensor [B, H, N, D] (element strides; the channel stride is 1).
struct InputView {
  const void* data = nullptr;
  int64_t stride_b = 0, stride_h = 0, stride_t = 0;
  bool aligned16 = false;  // base and strides allow 16-byte loads
  // Token i is stored row rows[i] (i < rows_size; row i beyond): a fused token order (backend.hpp).
  const int32_t* rows = nullptr;
  int rows_size = 0;
};

// SpargeAttn stage 1 fused into the quantization passes (docs/SPARGE.md): per chunk of 64 tokens, the exact tree
// sums (exact_fp32.cuh) that the predictor combines into block means and self-similarities (launch_sparge_select
// in sparge_predictor.cu). A chunk is an aligned sub-tree of every block's tree: blocks are multiples of 64.
constexpr int kPoolChunk = 64;
enum PoolChunkFlag { kPoolNonFinite = 1, kPoolNonZero = 2 };  // a row with a non-finite n², a row with n² > 0
struct SpargePoolChunks {
  float* k_raw = nullptr;                     // [B·Hkv, K chunks, D]: tree sums of the raw K (kv_stats)
  float* km = nullptr;                        // [B·Hkv, D]: the prediction's K mean from them (kv_finalize);
                                              // K is pooled as K − km (quantize_kv)
  int block_k = 0, blocks_k = 0;              // the prediction's key blocks (the K mean's tree)
  float inv_tokens_k = 0;                     // 1/Nk, rounded on the host
  float *k_sum = nullptr, *k_unit = nullptr;  // [B·Hkv, K chunks, D]: tree sums of v and of v / ‖v‖ over a chunk
  int* k_flags = nullptr;                     // [B·Hkv, K chunks]: PoolChunkFlag bits
  float *q_sum = nullptr, *q_unit = nullptr;  // [B·Hq, Q chunks, D]
  int* q_flags = nullptr;                     // [B·Hq, Q chunks]
};

struct PreprocessParams {
  InputView q, k, v;
  bool in_bf16 = false;
  int batch = 0, heads_q = 0, heads_kv = 0, tokens_q = 0, tokens_k = 0, head_dim = 0;
  int granularity = 0;  // Granularity
  bool smooth_k = true;
  bool want_q_km = false;  // write q_km (the LSE correction of smoothing)
  bool fp8_v = false;      // quantize V (FP8 P·V)
  float scale = 1.0f;

  // Workspace outputs (layouts in cuda_registry.hpp).
  int8_t* q8 = nullptr;
  float* q_scale = nullptr;
  int q_groups = 0;
  int8_t* k8 = nullptr;
  float* k_scale = nullptr;
  int k_groups = 0;
  uint8_t* v8t = nullptr;
  float* v_scale = nullptr;
  int vt_stride = 0;
  float* q_km = nullptr;
  // Per-(batch, kv head, split) channel sums of K and maxima of |V|: [B·Hkv, splits, D] each.
  float* partial_sum = nullptr;
  float* partial_vmax = nullptr;
  int splits = 1;
  float* k_mean = nullptr;  // [B·Hkv, D]: the K channel means (smoothing)
  // Stage 1's pooling, when pool.k_raw is set (head dims 64, 128, 256). With q8 / k8 null (a prediction without
  // attention) the passes pool only: no quantized writes.
  SpargePoolChunks pool;
};

// Scale groups per head (docs/NUMERICS.md).
int q_scale_groups(int tokens_q, int granularity);
int k_scale_groups(int tokens_k, int granularity);
// How many token ranges the K/V statistics pass splits each (batch, kv head) into.
int stats_splits(int tokens_k);

// Enqueues the preprocessing kernels on `stream` (a cudaStream_t); returns a cudaError_t as an int. With q_stream
// set, the Q pass goes there instead (the caller orders it after earlier work on `stream` and before the
// attention); it must not need the K mean (want_q_km) or pool (pool.k_raw).
int launch_preprocess(const PreprocessParams& params, void* stream, void* q_stream = nullptr);

// A bitmap block mask [rows][blocks_k] (bytes, nonzero = computed) as the LUT the kernels walk: counts[rows] and
// indices[rows][blocks_k] (ascending, only the first counts[row] written). The kernels walk a LUT with the next
// entry already loaded; a bitmap would need a dependent scan per block.
int launch_bitmap_to_lut(const uint8_t* bits, int64_t rows, int blocks_k, int32_t* counts, int32_t* indices,
                         void* stream);

}  // namespace sparq::cuda
