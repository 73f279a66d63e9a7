// Shared by the SpargeAttn stage-1 kernels (sparge_*.comp.j2): their parameter block and buffers (struct
// SpgParams in backends/vulkan/vulkan_backend.cpp: keep both in the same order) and the exact fp32 arithmetic
// of docs/SPARGE.md ("Exact arithmetic", sparge_arith.glsl).
#extension GL_EXT_shader_explicit_arithmetic_types_int16 : require
#extension GL_EXT_shader_16bit_storage : require
#extension GL_EXT_control_flow_attributes : enable

layout(std140, set = 0, binding = 0) uniform SpgParamsBlock {
  uint B, Hq, Hkv, Nq, Nk, D, group_size;
  uint q_off, q_sb, q_sh, q_st;
  uint k_off, k_sb, k_sh, k_st;
  uint bq, bk, nqb, nkb;
  uint causal, sink, diagonal;
  float scale_log2, inv_nk, inv_bq, inv_tail_q, inv_bk, inv_tail_k;
  uint counts_off, indices_off;
  uint p_off, p_sb, p_sh, p_st, d_off, d_sb, d_sh, d_st, p_heads, p_tokens, p_order;  // permutation
  // The pooled 64-token chunks in spg_pool (binding 19; the same fields as common.glsl's ParamsBlock, which the
  // quantization pass that writes them reads): regions of the prediction's K mean, the K and Q chunk rows, the
  // K and Q chunk flags, and the chunks per head.
  uint pool_kmu, pool_k, pool_q, pool_kf, pool_qf, pool_nkc, pool_nqc;
} S;

layout(std430, set = 0, binding = 1) readonly buffer SpgQ { uint16_t q_in[]; };
layout(std430, set = 0, binding = 2) readonly buffer SpgK { uint16_t k_in[]; };
// Pooled rows hold DP = tree_slots(D) floats (the channel slots of the tree over channels; padding slots +0).
layout(std430, set = 0, binding = 5) buffer SpgKMean { float k_bmean[]; };   // [B, Hkv, nKB, DP] smoothed K block means
layout(std430, set = 0, binding = 6) buffer SpgKSim { float k_bsim[]; };     // [B, Hkv, nKB]
layout(std430, set = 0, binding = 7) buffer SpgQMean { float q_bmean[]; };   // [B, Hq, nQB, DP]
layout(std430, set = 0, binding = 8) buffer SpgQSim { float q_bsim[]; };     // [B, Hq, nQB]
layout(std430, set = 0, binding = 9) readonly buffer SpgHead { float head_params[]; };  // [Hq][4]: θ, τ, topk, dense
layout(std430, set = 0, binding = 10) buffer SpgCounts { int lut_counts[]; };
layout(std430, set = 0, binding = 11) buffer SpgIndices { int lut_indices[]; };
layout(std430, set = 0, binding = 12) buffer SpgDst { uint16_t perm_dst[]; };
layout(std430, set = 0, binding = 13) readonly buffer SpgOrder { int perm_order[]; };
// The pooling buffer (sparge_pool.glsl says what the quantization pass writes there), as floats and as uints.
layout(std430, set = 0, binding = 19) buffer SpgPool { float spg_pool[]; };
layout(std430, set = 0, binding = 19) buffer SpgPoolU { uint spg_pool_u[]; };

{% include "glsl/sparge_arith.glsl" %}
