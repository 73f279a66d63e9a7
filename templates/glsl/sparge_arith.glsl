// The exact fp32 arithmetic of SpargeAttn stage 1 (docs/SPARGE.md, "Exact arithmetic"), the same as
// runtime/src/sparge/predictor_fp32.hpp: every add, sub and mul is `precise` (never contracted) and flushed to a
// signed zero when subnormal; no division, no library sqrt or exp; sums in the TreeSum order. No bindings here:
// included by sparge_common.glsl (the sparge_* kernels) and by quant.comp.j2 (the pooling fused into it).

// Subnormal -> zero of the same sign, in integers (cannot be folded or flushed differently).
float f_ftz(float x) {
  uint u = floatBitsToUint(x);
  return (u & 0x7F800000u) == 0u ? uintBitsToFloat(u & 0x80000000u) : x;
}
float f_add(float a, float b) { precise float r = a + b; return f_ftz(r); }
float f_sub(float a, float b) { precise float r = a - b; return f_ftz(r); }
float f_mul(float a, float b) { precise float r = a * b; return f_ftz(r); }

// 1/sqrt(x), x positive, normal and finite: integer first guess, three Newton steps.
float f_rsqrt(float x) {
  float y = uintBitsToFloat(0x5f3759dfu - (floatBitsToUint(x) >> 1));
  for (int i = 0; i < 3; ++i) {
    float t = f_mul(f_mul(x, y), y);
    y = f_mul(y, f_sub(1.5, f_mul(0.5, t)));
  }
  return y;
}

// 2^x for x <= 0: degree-7 Taylor polynomial of 2^f (coefficients as bits) times 2^floor(x) from bits.
float f_exp2_neg(float x) {
  if (!(x >= -126.0)) return 0.0;
  float n = floor(x);
  float f = f_sub(x, n);
  const uint coeff[8] = uint[8](0x3f800000u, 0x3f317218u, 0x3e75fdf0u, 0x3d635847u,
                                0x3c1d955bu, 0x3aaec3ffu, 0x39218489u, 0x377fe5feu);
  float p = uintBitsToFloat(coeff[7]);
  for (int k = 6; k >= 0; --k) p = f_add(f_mul(p, f), uintBitsToFloat(coeff[k]));
  int e = int(n);
  return f_mul(p, uintBitsToFloat(uint(e + 127) << 23));
}

// TreeSum (predictor_fp32.hpp): a balanced pairwise tree over `slots` (a power of two) leaves, the pushed values
// then +0, computed as a binary counter; TREE_LEVELS levels hold up to 2^(TREE_LEVELS - 1) leaves.
#define TREE_LEVELS 24
struct Tree {
  float level[TREE_LEVELS];
  uint count;
};
void tree_reset(inout Tree t) { t.count = 0u; }
void tree_push(inout Tree t, float v) {
  uint c = t.count;
  uint k = 0u;
  while ((c & 1u) != 0u) {
    v = f_add(t.level[k], v);
    c >>= 1u;
    ++k;
  }
  t.level[k] = v;
  t.count += 1u;
}
float tree_total(inout Tree t, uint slots) {
  while (t.count < slots) tree_push(t, 0.0);
  return t.level[findMSB(slots)];
}
// The smallest power of two >= n (1 for n <= 1).
uint tree_slots(uint n) { return n <= 1u ? 1u : 1u << uint(findMSB(n - 1u) + 1); }
