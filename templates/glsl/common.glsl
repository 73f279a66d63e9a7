// Shared by every sparq Vulkan kernel (included by the .comp.j2 templates at generation time).
// Parameters come in one uniform block written by the backend (struct VkParams in vulkan_backend.cpp:
// keep both in the same order). Strides and offsets are in elements of the buffer's type.
#extension GL_EXT_shader_explicit_arithmetic_types_int16 : require
#extension GL_EXT_shader_16bit_storage : require
#extension GL_EXT_control_flow_attributes : enable

layout(std140, set = 0, binding = 0) uniform ParamsBlock {
  uint B, Hq, Hkv, Nq, Nk, D, group_size;
  float scale;
  uint q_off, q_sb, q_sh, q_st;
  uint k_off, k_sb, k_sh, k_st;
  uint v_off, v_sb, v_sh, v_st;
  uint o_off, o_sb, o_sh, o_st;
  uint lse_off, lse_sb, lse_sh, has_lse;
  uint smooth_k, q_span, q_inner, k_span, k_inner, nqg, nkg;
  uint mask_bq, mask_bk, mask_hm, mask_nqb, mask_nkb, mask_off, mask_off2;
  uint pv_skip;  // SpargeAttn stage 2 on: thresholds in pv_thr
  uint order_off, order_size;  // a fused token order in token_order (token_row below)
  // SpargeAttn stage-1 pooling in quant.comp.j2 (sparge_pool.glsl): its regions of the pooling buffer and the
  // 64-token chunks per head (the same fields as sparge_common.glsl's SpgParamsBlock).
  uint pool_kmu, pool_k, pool_q, pool_kf, pool_qf, pool_nkc, pool_nqc;
} P;

layout(std430, set = 0, binding = 1) readonly buffer QIn { uint16_t q_in[]; };
layout(std430, set = 0, binding = 2) readonly buffer KIn { uint16_t k_in[]; };
layout(std430, set = 0, binding = 3) readonly buffer VIn { uint16_t v_in[]; };
layout(std430, set = 0, binding = 4) writeonly buffer OOut { uint16_t o_out[]; };
layout(std430, set = 0, binding = 5) writeonly buffer LseOut { float lse_out[]; };
layout(std430, set = 0, binding = 6) buffer Q8 { uint q8[]; };          // [B, Hq, Nq, D/4] packed int8
layout(std430, set = 0, binding = 7) buffer K8 { uint k8[]; };          // [B, Hkv, Nk, D/4] packed int8
layout(std430, set = 0, binding = 8) buffer QScale { float q_scale[]; };  // [B, Hq, nqg]
layout(std430, set = 0, binding = 9) buffer KScale { float k_scale[]; };  // [B, Hkv, nkg]
layout(std430, set = 0, binding = 10) buffer KMean { float k_mean[]; };   // [B, Hkv, D]
layout(std430, set = 0, binding = 11) buffer QKm { float q_km[]; };       // [B, Hq, Nq]: scale·(q·km)
layout(std430, set = 0, binding = 12) readonly buffer MaskBits { uint mask_bits[]; };   // u8 bitmap
layout(std430, set = 0, binding = 13) readonly buffer MaskCounts { int mask_counts[]; };
layout(std430, set = 0, binding = 14) readonly buffer MaskIdx { int mask_idx[]; };
layout(std430, set = 0, binding = 15) buffer K16 { uint16_t k16[]; };   // [B, Hkv, Nk, D] smoothed K (fp16 QK)
// 16-byte views of the same bindings, for aligned vector loads (aliasing one binding is allowed).
layout(std430, set = 0, binding = 3) readonly buffer VIn4 { uvec4 v_in4[]; };
layout(std430, set = 0, binding = 7) readonly buffer K84 { uvec4 k8_4[]; };
layout(std430, set = 0, binding = 15) readonly buffer K164 { uvec4 k16_4[]; };
layout(std430, set = 0, binding = 16) readonly buffer PvThr { float pv_thr[]; };  // [Hq] λ, log2 units
layout(std430, set = 0, binding = 17) buffer PvStats { uint pv_stats[]; };      // [total, skipped]
layout(std430, set = 0, binding = 18) readonly buffer TokenOrder { int token_order[]; };  // I32 [order_size]
// V in a fused token order, contiguous [B, Hkv, Nk, D] (written by order_v.comp.j2; the attention kernels'
// V_ORDERED specialization reads it instead of v through the order).
layout(std430, set = 0, binding = 20) readonly buffer VOrd4 { uvec4 v_ord4[]; };

// A fused token order (AttentionProblem::token_order, SpargeAttn's Hilbert order): token t of the problem is
// stored in row token_row(t) of q, k, v and of the output (row t beyond the order). `gather` is each kernel's
// GATHER specialization constant: false folds this to t at pipeline creation, so the plain path reads no index.
uint token_row(uint t, bool gather) {
  return gather && t < P.order_size ? uint(token_order[P.order_off + t]) : t;
}

const float LOG2E = 1.4426950408889634;
const float LN2 = 0.6931471805599453;
#define NEG_INF uintBitsToFloat(0xFF800000u)

// fp16 / bf16 bits -> fp32 (exact).
float to_f32(uint bits, bool bf16) {
  return bf16 ? uintBitsToFloat(bits << 16) : unpackHalf2x16(bits).x;
}
vec2 to_f32x2(uint bits2, bool bf16) {
  return bf16 ? vec2(uintBitsToFloat(bits2 << 16), uintBitsToFloat(bits2 & 0xFFFF0000u)) : unpackHalf2x16(bits2);
}

// fp32 -> fp16 bits, round to nearest even (done in integers so that it is exact on every device).
uint f32_to_f16(float f) {
  uint x = floatBitsToUint(f);
  uint sign = (x >> 16) & 0x8000u;
  uint ax = x & 0x7FFFFFFFu;
  if (ax >= 0x7F800000u) return sign | (ax > 0x7F800000u ? 0x7E00u : 0x7C00u);
  if (ax >= 0x477FF000u) return sign | 0x7C00u;  // >= 65520 rounds to infinity
  if (ax < 0x38800000u) {                         // below 2^-14: subnormal half or zero
    uint e = ax >> 23;
    if (e < 102u) return sign;
    uint m = (ax & 0x7FFFFFu) | 0x800000u;
    uint shift = 126u - e;
    uint n = m >> shift;
    uint rem = m & ((1u << shift) - 1u);
    uint halfway = 1u << (shift - 1u);
    if (rem > halfway || (rem == halfway && (n & 1u) != 0u)) n += 1u;
    return sign | n;
  }
  uint h = (ax - 0x38000000u) >> 13;
  uint rem = ax & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u) != 0u)) h += 1u;
  return sign | h;
}

// fp32 -> bf16 bits, round to nearest even.
uint f32_to_bf16(float f) {
  uint x = floatBitsToUint(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return ((x >> 16) & 0x8000u) | 0x7FC0u;
  return (x + 0x7FFFu + ((x >> 16) & 1u)) >> 16;
}

uint f32_to_bits(float f, bool bf16) { return bf16 ? f32_to_bf16(f) : f32_to_f16(f); }

// a / b correctly rounded in nearly every case (GPU division may be off by a few ulp; the quantization
// rounding must see the same quotient as the reference).
float div_rn(float a, float b) {
  precise float q = a / b;
  precise float r = fma(-q, b, a);
  precise float q1 = fma(r, 1.0 / b, q);
  return q1;
}
