// The CPU reference backend: exact fp64 attention (the accuracy oracle) and a bit-faithful emulation of the
// quantized kernels as docs/NUMERICS.md describes them. Internal; the test suites include it.
#pragma once

#include "backend.hpp"

#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

namespace sparq::reference {

// ---- number formats -----------------------------------------------------------------------------------
// All conversions to a narrower format round to nearest, ties to even, subnormals included.

float half_to_float(uint16_t h);
uint16_t float_to_half(float f);  // overflow -> ±inf, NaN -> quiet NaN
float bf16_to_float(uint16_t b);
uint16_t float_to_bf16(float f);  // overflow -> ±inf, NaN -> quiet NaN

// FP8 e4m3 (1 sign, 4 exponent bits with bias 7, 3 mantissa bits, no infinities; 0x7F / 0xFF are NaN).
float e4m3_to_float(uint8_t x);
uint8_t float_to_e4m3(float f);  // saturates to ±448 (±inf included); NaN -> 0x7F
constexpr float kE4m3Max = 448.0f;

// F16 or BF16 element <-> float.
float load_16(uint16_t bits, DType dtype);
uint16_t store_16(float x, DType dtype);
// Rounds a float to the nearest value of dtype (F16 or BF16) and back.
float round_to(float x, DType dtype);

// ---- INT8 quantization (NUMERICS.md, "INT8 Q·Kᵀ") ------------------------------------------------------

// Group of token t of a sequence: Q (query == true) or K.
int q_group(QKGranularity g, int64_t t);
int k_group(QKGranularity g, int64_t t);
// Number of group indices used by a sequence of n tokens (some may be empty for PerThread tails).
int group_count(QKGranularity g, int64_t n, bool query);

// One value: clamp(rint(x / step), -127, 127); 0 when step == 0 or x / step is NaN.
int8_t quantize_value(float x, float step);
// Symmetric quantization of one group of n values: returns step = max|x| / 127 (0 when the group is all
// zeros) and writes q[i] = quantize_value(x[i], step). NaNs are ignored by the max.
float quantize_group(const float* x, std::size_t n, int8_t* q);

// The tokens t0 .. t0+n-1 of one sequence (rows of `dim` floats, `x` points at token t0) quantized with
// their groups. t0 must not split a group: a multiple of 128 for queries, of 64 for keys (0 is always fine).
struct QuantizedTokens {
  int first_group = 0;              // group index of token t0
  std::vector<int8_t> values;       // [n, dim]
  std::vector<float> steps;         // per group, from first_group on
  std::vector<float> token_step;    // [n]: the step of each token's group
};
QuantizedTokens quantize_tokens(const float* x, int64_t t0, int64_t n, int dim, bool query, QKGranularity g);

// ---- operands (host memory) ---------------------------------------------------------------------------

inline const std::byte* host_data(const detail::Operand& op) {
  return static_cast<const detail::HostStorage*>(op.storage)->data + op.offset_bytes;
}
inline std::byte* host_data_mut(const detail::Operand& op) {
  return static_cast<detail::HostStorage*>(op.storage)->data + op.offset_bytes;
}
// Tokens t0 .. t0+n-1 of (batch b, head h) of a F16/BF16/F32 operand as dense float rows [n, dim].
void load_rows(const detail::Operand& op, int b, int h, int64_t t0, int64_t n, int dim, float* dst);

// ---- masks ----------------------------------------------------------------------------------------------

// For batch b, query head h and mask query block qb, allowed[kb] = 1 for the key blocks (of the mask's
// block_k; of the whole sequence when there is no mask) that are computed. Resizes `allowed`.
void mask_key_blocks(const detail::AttentionProblem& p, int b, int h, int qb, std::vector<uint8_t>& allowed);
// The key-block size used for `allowed` (mask_block_k, or tokens_k when there is no mask) and the query one.
int mask_block_k(const detail::AttentionProblem& p);
int mask_block_q(const detail::AttentionProblem& p);

// ---- the two computations -------------------------------------------------------------------------------

// Exact softmax attention in fp64 from the input values (q, k, v operands, masks, causal, GQA, scale).
// out: dense [B, Hq, Nq, D]; lse (optional): [B, Hq, Nq], natural log, -inf for rows that see no key (O = 0).
void exact_attention(const detail::AttentionProblem& p, std::vector<double>& out, std::vector<double>* lse);

// The quantized kernels' numerics, emulated: writes p.out (F16/BF16) and, when p.has_lse, p.lse (F32).
// Smoothing, INT8 (or FP16) Q·Kᵀ, base-2 online softmax over 64-key tiles, FP16 or FP8 P·V.
// Where NUMERICS.md leaves an order of fp32 operations open, this reads it as:
// - km[c] = float(Σ_j k[j,c]) / float(Nk): the sum rounded once to fp32 (no particular summation order);
// - scale·log2(e) is folded first: q_scale = step_q · (scale · log2e), FP16 Q·Kᵀ s = dot · (scale · log2e);
// - s = (float(int32 dot) · q_scale) · k_scale; the int32 dot is computed exactly (|dot| <= 127²·256 < 2^24);
// - dots, Σ_j p and tile(P·V) are summed sequentially (c, then j ascending) in fp32; O = O·alpha + tile;
// - quantization of NaN gives 0 (as cvt.rni.sat.s8.f32 does), and the group max ignores NaN.
// Q rows are quantized in chunks of kQueryChunk rows, so the result is independent of the threading.
void quantized_attention(const detail::AttentionProblem& p);

constexpr int kKeyTile = 64;      // BK: keys per online-softmax step
constexpr int kQueryChunk = 128;  // rows per work item (never splits a Q quantization group)

// Runs fn(0) .. fn(count-1) on up to thread_count() threads; rethrows the first exception.
void parallel_for(std::size_t count, const std::function<void(std::size_t)>& fn);
int thread_count();

}  // namespace sparq::reference
