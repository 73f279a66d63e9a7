// SpargeAttn stage-1 pooling (docs/SPARGE.md, "Exact arithmetic"), fused into the quantization pass
// (quant.comp.j2, POOL != 0): the pass that reads q and k rows to quantize them also pools them, so the
// prediction makes no read of its own over them (its raw-K pass is this code too, with QUANT off).
//
// The unit is a chunk of 64 consecutive tokens (of the problem's order: rows through token_row with GATHER).
// Prediction blocks are multiples of 64 tokens and start at multiples of 64, so a chunk lies in one block and
// is an aligned sub-tree of the block's tree over tree_slots(block) token slots; the quantization workgroups
// cover spans of 16, 64 or 128 tokens and pool the chunks that start in their span (none, one or two). Per
// chunk and channel slot it writes the 64-token sub-trees of v (and of v·(1/‖v‖)), and per chunk two flags;
// sparge_kmean and sparge_finalize combine the chunks of a block through the rest of the tree (padding chunks
// +0), so the block sums are exactly the specification's whatever the span.
//
// Includer provides: common.glsl (P, q_in, k_in, token_row) and the specialization constants IN_BF16, GATHER,
// POOL (1: block statistics of q, or of k − km with the prediction's K mean km; 2: sums of raw k only),
// DP (the channel slots of the tree over channels: the next power of two >= D, 8..256) and VEC (16-byte loads).
//
// Buffer spg_pool (binding 19), float offsets from the parameter block:
//   pool_kmu: [B, Hkv, DP] the prediction's K mean (written by sparge_kmean);
//   pool_k / pool_q: [B, H, chunks, 2, DP] per chunk the sub-trees of v, then of v·(1/‖v‖), by channel
//     (padding channels +0); the raw pass writes the first half of the K rows (consumed by sparge_kmean before
//     the smoothed pass overwrites them);
//   pool_kf / pool_qf: [B, H, chunks] flags: bit 0 a token with non-finite n², bit 1 a token with n² > 0.
//
// Thread layout per chunk (as the former separate pool kernel): item (tg, cg), tg < 8, cg < G = DP / 8, holds
// the 8 tokens [8·tg, 8·tg + 8) x the 8 channels [8·cg, 8·cg + 8) as packed 16-bit words; 8·G items on the 128
// threads of the quantization workgroup (two per thread when DP = 256).
//   - token norms: the balanced sub-tree of an item's 8 channels, then one thread per token takes the tree over
//     its G sub-trees (and 1/‖v‖);
//   - token sums: per item and channel the sub-tree of its 8 tokens, then per channel slot the tree over the 8
//     token groups (the chunk's 64-token sub-tree).
layout(std430, set = 0, binding = 19) buffer Pool { float spg_pool[]; };
layout(std430, set = 0, binding = 19) buffer PoolU { uint spg_pool_u[]; };
// 16-byte views of the q and k bindings (aliasing one binding is allowed).
layout(std430, set = 0, binding = 1) readonly buffer QIn4 { uvec4 q_in4[]; };
layout(std430, set = 0, binding = 2) readonly buffer KIn4 { uvec4 k_in4[]; };

{% include "glsl/sparge_arith.glsl" %}

const uint PG = DP / 8u;       // G: threads (items) per token row
const uint POOL_ITEMS = 8u * PG;
const uint POOL_PER = (POOL_ITEMS + 127u) / 128u;  // items per thread (1, or 2 when DP = 256)

shared float part_n[64u * (PG + 1u)];  // [token][cg]: channel sub-trees of n² (stride G + 1: no bank conflicts)
shared float part_s[8u * DP];          // [token group][slot]: 8-token sub-trees of v
shared float part_u[8u * DP];          // the same of v·(1/‖v‖)
shared float inv_norm[64];
shared uint chunk_flags;

// The add, sub and mul of the pooling (loads, smoothing, squares, unit vectors, their tree sums). With fp16
// inputs none of them can produce a subnormal, so the flush is the identity and is left out: an fp16 value is 0
// or at least 2^-24 in magnitude and a multiple of 2^-24, and so is every rounded sum of them, so the K mean
// (such a sum times 1/Nk >= 2^-31) is 0 or at least 2^-55 and a multiple of 2^-78; a difference k − km is then 0,
// or |km| (k = 0), or |k|/2 or more, or a multiple of ulp(km) >= 2^-48 (|km| > |k|/2 >= 2^-25): |v| >= 2^-55 and
// v is a multiple of 2^-78. Squares are then >= 2^-110 and their sums only grow; v·(1/‖v‖) >= 2^-55·2^-21
// (‖v‖ <= 2^21 for fp16 rows of D <= 256) = 2^-76, a multiple of 2^-99, and sums of multiples of 2^-78 or
// 2^-99 are 0 or at least that. Infinities and NaN pass either way. bf16 reaches 2^-133: it keeps the flush.
float p_ftz(float x) { return IN_BF16 ? f_ftz(x) : x; }
float p_add(float a, float b) { precise float r = a + b; return p_ftz(r); }
float p_sub(float a, float b) { precise float r = a - b; return p_ftz(r); }
float p_mul(float a, float b) { precise float r = a * b; return p_ftz(r); }
// The balanced tree over 8 aligned leaves.
float p_tree8(float v[8]) {
  return p_add(p_add(p_add(v[0], v[1]), p_add(v[2], v[3])), p_add(p_add(v[4], v[5]), p_add(v[6], v[7])));
}

// 1/sqrt(x) exactly as f_rsqrt (sparge_arith.glsl) but without its flushes, which are the identity here: for a
// positive normal finite x (n² is flushed, so n² > 0 means normal) the first guess is within 4% of 1/√x, so
// x·y stays near √x in [2^-63, 2^64], (x·y)·y near 1, then 0.5, 1, and y near 1/√x in [2^-64, 2^63]: no step
// can produce a subnormal. (Per token, in the one serial step of a chunk: its latency counts.)
float p_rsqrt(float x) {
  float y = uintBitsToFloat(0x5f3759dfu - (floatBitsToUint(x) >> 1));
  for (int i = 0; i < 3; ++i) {
    precise float xy = x * y;
    precise float t = xy * y;
    precise float h = 0.5 * t;
    precise float d = 1.5 - h;
    precise float yn = y * d;
    y = yn;
  }
  return y;
}

// The packed 16-bit values of channels [c, c + 8) of the row starting at element `row`; 0 at channels >= D.
uvec4 pool_load8(bool is_k, uint row, uint c) {
  uint D = P.D;
  if (c >= D) return uvec4(0u);
  if (VEC) {
    uint i = (row + c) >> 3u;
    return is_k ? k_in4[i] : q_in4[i];
  }
  uint w[4];
  [[unroll]] for (uint i = 0u; i < 4u; ++i) {
    uint c0 = c + 2u * i;
    // (each 16-bit load converted on its own: selecting between 16-bit values would need the Int16 capability)
    uint lo = c0 < D ? (is_k ? uint(k_in[row + c0]) : uint(q_in[row + c0])) : 0u;
    uint hi = c0 + 1u < D ? (is_k ? uint(k_in[row + c0 + 1u]) : uint(q_in[row + c0 + 1u])) : 0u;
    w[i] = lo | (hi << 16u);
  }
  return uvec4(w[0], w[1], w[2], w[3]);
}

// The two channels of a packed word as the values v of the specification: x = ftz(input), smoothed x − km.
// Token slots past the last token hold zero words and are not smoothed: they are the +0 padding.
vec2 pool_values2(uint word, bool smooth_it, float k0, float k1) {
  vec2 x = IN_BF16 ? vec2(uintBitsToFloat(word << 16u), uintBitsToFloat(word & 0xffff0000u)) : unpackHalf2x16(word);
  x = vec2(p_ftz(x.x), p_ftz(x.y));  // fp16 values are never subnormal in fp32
  if (smooth_it) x = vec2(p_sub(x.x, k0), p_sub(x.y, k1));
  return x;
}
// One channel of a packed word (the high half when `hi`), the same way.
float pool_value1(uint word, bool hi, bool smooth_it, float k) {
  uint bits = hi ? word >> 16u : word & 0xffffu;
  float x = IN_BF16 ? uintBitsToFloat(bits << 16u) : unpackHalf2x16(bits).x;
  x = p_ftz(x);
  return smooth_it ? p_sub(x, k) : x;
}

// The quantization fused into the pooling (quant.comp.j2's FUSE): the group maxima from the rows the pooling
// loaded (pass 1 of quant.comp.j2) and, with `store`, the INT8 values from them (its pass 2).
struct QuantCtx {
  bool on, inner8, store, smooth_it;  // inner8: 8 groups per span (group of token t: t % 8), else 1
  uint km_base, out_row;              // the kernel's smoothing mean row; ((b·H + h)·N): the output rows
};
// The kernel's smoothing mean of the item's 8 channels (0 where not smoothed or past D).
void quant_kmean8(QuantCtx qc, uint cg, out float kq[8]) {
  [[unroll]] for (uint e = 0u; e < 8u; ++e) kq[e] = qc.smooth_it && cg * 8u + e < P.D ? k_mean[qc.km_base + cg * 8u + e] : 0.0;
}
// Group maxima of an item's 8 tokens (from token t8) x 8 channels, into group_amax.
void quant_amax(QuantCtx qc, uvec4 words[8], uint t8, uint cg, uint N) {
  float kq[8];
  quant_kmean8(qc, cg, kq);
  float gmax = 0.0;
  [[unroll]] for (uint r = 0u; r < 8u; ++r) {
    float m = 0.0;
    if (t8 + r < N) {
      [[unroll]] for (uint e = 0u; e < 8u; ++e) {
        if (cg * 8u + e < P.D) {
          uint word = words[r][e / 2u];
          float x = to_f32((e & 1u) != 0u ? word >> 16u : word & 0xffffu, IN_BF16);
          if (qc.smooth_it) x -= kq[e];
          m = max(m, abs(x));
        }
      }
    }
    if (qc.inner8) atomicMax(group_amax[r], floatBitsToUint(m));
    else gmax = max(gmax, m);
  }
  if (!qc.inner8) atomicMax(group_amax[0], floatBitsToUint(gmax));
}
// The INT8 values of an item's 8 tokens (from token t8) x 8 channels (the group maxima complete), four channels
// packed per word: pass 2 of quant.comp.j2, element by element the same arithmetic.
void quant_item(bool is_k, QuantCtx qc, uvec4 words[8], uint t8, uint cg, uint N) {
  uint W = P.D / 4u;
  float kq[8];
  quant_kmean8(qc, cg, kq);
  [[unroll]] for (uint r = 0u; r < 8u; ++r) {
    if (t8 + r < N) {
      float step = div_rn(uintBitsToFloat(group_amax[qc.inner8 ? r : 0u]), 127.0);
      [[unroll]] for (uint j = 0u; j < 2u; ++j) {
        uint w = cg * 2u + j;
        if (w < W) {
          uint packed = 0u;
          [[unroll]] for (uint e = 0u; e < 4u; ++e) {
            uint word = words[r][2u * j + e / 2u];
            float x = to_f32((e & 1u) != 0u ? word >> 16u : word & 0xffffu, IN_BF16);
            if (qc.smooth_it) x -= kq[4u * j + e];
            int x8 = 0;
            if (step > 0.0) x8 = int(clamp(roundEven(div_rn(x, step)), -127.0, 127.0));
            packed |= (uint(x8) & 0xFFu) << (8u * e);
          }
          uint dst = (qc.out_row + t8 + r) * W + w;
          if (is_k) k8[dst] = packed;
          else q8[dst] = packed;
        }
      }
    }
  }
}

// Pools chunk `chunk` (tokens [64·chunk, 64·chunk + 64) ∩ [0, N)) of head h of batch b. `in_base`, `st`: the
// operand's row base and token stride. Every thread of the workgroup calls it (it has barriers).
void pool_chunk(bool is_k, uint chunk, uint N, uint H, uint h, uint b, uint in_base, uint st, QuantCtx qc) {
  uint tid = gl_LocalInvocationID.x;
  bool raw = POOL == 2u;
  bool smoothed = is_k && !raw;
  uint c0 = chunk * 64u;
  uint nchunks = is_k ? P.pool_nkc : P.pool_nqc;
  uint row = (b * H + h) * nchunks + chunk;  // this chunk's row of the region

  // Loads (registers, kept for both phases) and the squares' channel sub-trees.
  uvec4 words[POOL_PER][8];
  float km[POOL_PER][8];
  if (tid == 0u) chunk_flags = 0u;
  [[unroll]] for (uint i = 0u; i < POOL_PER; ++i) {
    uint item = tid + 128u * i;
    if (item < POOL_ITEMS) {
      uint tg = item / PG, cg = item % PG;
      [[unroll]] for (uint e = 0u; e < 8u; ++e)
        km[i][e] = smoothed ? spg_pool[P.pool_kmu + (b * P.Hkv + h) * DP + cg * 8u + e] : 0.0;
      [[unroll]] for (uint r = 0u; r < 8u; ++r) {
        uint t = c0 + tg * 8u + r;
        words[i][r] = t < N ? pool_load8(is_k, in_base + token_row(t, GATHER) * st, cg * 8u) : uvec4(0u);
      }
      if (qc.on) quant_amax(qc, words[i], c0 + tg * 8u, cg, N);
      if (!raw) {
        [[unroll]] for (uint r = 0u; r < 8u; ++r) {
          bool valid = c0 + tg * 8u + r < N;
          float sq[8];
          [[unroll]] for (uint p = 0u; p < 4u; ++p) {
            vec2 x = pool_values2(words[i][r][p], smoothed && valid, km[i][2u * p], km[i][2u * p + 1u]);
            sq[2u * p] = p_mul(x.x, x.x);
            sq[2u * p + 1u] = p_mul(x.y, x.y);
          }
          part_n[(tg * 8u + r) * (PG + 1u) + cg] = p_tree8(sq);
        }
      }
    }
  }
  barrier();
  // Token norms: the balanced tree over a token's G channel sub-trees, then the chunk's flags and 1/‖v‖ (0 for
  // zero rows, padding and non-finite rows, which add no direction).
  if (!raw && tid < 64u) {
    float e[32];
    [[unroll]] for (uint i = 0u; i < PG; ++i) e[i] = part_n[tid * (PG + 1u) + i];
    [[unroll]] for (uint w = 1u; w < PG; w *= 2u)
      [[unroll]] for (uint i = 0u; i < PG; i += 2u * w) e[i] = p_add(e[i], e[i + w]);
    float n2 = e[0], inv = 0.0;
    if (isinf(n2) || isnan(n2)) {
      atomicOr(chunk_flags, 1u);
    } else if (n2 > 0.0) {
      atomicOr(chunk_flags, 2u);
      inv = p_rsqrt(n2);
    }
    inv_norm[tid] = inv;
  }
  barrier();
  // Token sums: per item, one channel at a time (fewer live registers), the sub-trees of its 8 tokens. The
  // slot of channel 8·cg + i is i·G + cg, so the slot threads below read consecutive words.
  [[unroll]] for (uint i = 0u; i < POOL_PER; ++i) {
    uint item = tid + 128u * i;
    if (item < POOL_ITEMS) {
      uint tg = item / PG, cg = item % PG;
      float inv8[8];
      [[unroll]] for (uint r = 0u; r < 8u; ++r) inv8[r] = raw ? 0.0 : inv_norm[tg * 8u + r];
      [[unroll]] for (uint ch = 0u; ch < 8u; ++ch) {
        float sv[8], uv[8];
        [[unroll]] for (uint r = 0u; r < 8u; ++r) {
          bool valid = c0 + tg * 8u + r < N;
          sv[r] = pool_value1(words[i][r][ch / 2u], (ch & 1u) != 0u, smoothed && valid, km[i][ch]);
          uv[r] = raw ? 0.0 : p_mul(sv[r], inv8[r]);
        }
        uint at = tg * DP + ch * PG + cg;
        part_s[at] = p_tree8(sv);
        if (!raw) part_u[at] = p_tree8(uv);
      }
    }
  }
  barrier();
  // Per channel slot: the tree over the 8 token groups, the chunk's 64-token sub-tree.
  uint base = (is_k ? P.pool_k : P.pool_q) + row * 2u * DP;
  for (uint slot = tid; slot < DP; slot += 128u) {
    uint c = (slot % PG) * 8u + slot / PG;
    float col[8];
    [[unroll]] for (uint g = 0u; g < 8u; ++g) col[g] = part_s[g * DP + slot];
    spg_pool[base + c] = p_tree8(col);
    if (!raw) {
      [[unroll]] for (uint g = 0u; g < 8u; ++g) col[g] = part_u[g * DP + slot];
      spg_pool[base + DP + c] = p_tree8(col);
    }
  }
  if (!raw && tid == 0u) spg_pool_u[(is_k ? P.pool_kf : P.pool_qf) + row] = chunk_flags;
  // The quantization of a span of one chunk, from the rows still in registers (the group maxima are complete:
  // every atomicMax came before the first barrier).
  if (qc.store) {
    [[unroll]] for (uint i = 0u; i < POOL_PER; ++i) {
      uint item = tid + 128u * i;
      if (item < POOL_ITEMS) quant_item(is_k, qc, words[i], c0 + (item / PG) * 8u, item % PG, N);
    }
  }
  barrier();  // the next chunk (or the quantization) reuses the shared arrays and chunk_flags
}
