// Host interface of the CUDA SpargeAttn kernels (sparge_predictor.cu): the stage-1 predictor in the exact fp32
// arithmetic of docs/SPARGE.md (the same LUT as the host reference, bit for bit) and the token permutation.
// No CUDA headers here: included by the g++-compiled host code.
#pragma once

#include <cstddef>
#include <cstdint>

#include "preprocess.hpp"

namespace sparq::cuda {

// One strided fp16/bf16 tensor [B, H, N, D] (element strides; the channel stride is 1).
struct SpargeView {
  const void* data = nullptr;
  int64_t stride_b = 0, stride_h = 0, stride_t = 0;
  const int32_t* rows = nullptr;  // a fused token order: token i is stored row rows[i] (i < rows_size)
  int rows_size = 0;
};

struct SpargePredictParams {
  SpargeView q, k;
  bool in_bf16 = false;
  int batch = 0, heads_q = 0, heads_kv = 0, tokens_q = 0, tokens_k = 0, head_dim = 0;
  int block_q = 0, block_k = 0, blocks_q = 0, blocks_k = 0;
  bool causal = false, sink = false, diagonal = true;
  float scale_log2 = 0, inv_tokens_k = 0, inv_block_q = 0, inv_tail_q = 0, inv_block_k = 0, inv_tail_k = 0;
  const float* head = nullptr;  // device [Hq][4]: θ, τ, top-k, dense (0/1)
  // Workspace (sparge_workspace_bytes; its parts are carved by the launch functions below).
  void* workspace = nullptr;
  int32_t* counts = nullptr;   // [B, Hq, nQB]
  int32_t* indices = nullptr;  // [B, Hq, nQB, nKB]
};

// Whether the kernels cover this problem (head dim 64, 128 or 256, at most 512 key blocks, blocks of at most
// 32768 tokens); otherwise the runtime predicts on the host.
bool sparge_supported(int head_dim, int blocks_k, int block_q, int block_k);
std::size_t sparge_workspace_bytes(const SpargePredictParams& p);
// Stage 1 runs in the preprocessing passes (cuda_backend_kernels.cu: the raw K chunk sums in kv_stats, the
// prediction's K mean in kv_finalize, the pooling of Q and K − mean in the quantization passes), which write
// the chunks of sparge_pool_chunks(p) (pointers into p.workspace; PreprocessParams::pool), and then in
// launch_sparge_select: the block means and self-similarities from the chunks, then the LUT. It enqueues on
// `stream` (a cudaStream_t) and returns a cudaError_t as an int.
SpargePoolChunks sparge_pool_chunks(const SpargePredictParams& p);
int launch_sparge_select(const SpargePredictParams& p, void* stream);

struct PermuteParams {
  SpargeView src;
  void* dst = nullptr;
  int64_t dst_stride_b = 0, dst_stride_h = 0, dst_stride_t = 0;
  int batch = 0, heads = 0, tokens = 0, head_dim = 0;
  const int32_t* order = nullptr;  // device
  int order_size = 0;
};
// dst token i = src token order[i] (i < order_size), src token i beyond; 16-bit elements.
int launch_permute(const PermuteParams& p, void* stream);

}  // namespace sparq::cuda
