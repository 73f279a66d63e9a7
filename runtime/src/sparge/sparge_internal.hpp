// SpargeAttn internals shared by the predictor, sparge_attention() and the tuner. Not installed.
#pragma once

#include <sparq/sparge.hpp>

#include "backend.hpp"

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace sparq::sparge {

[[noreturn]] void bad(const std::string& what, const std::string& message);  // Error(InvalidArgument, what: message)

// ---- host data -------------------------------------------------------------------------------------------

// A q/k/v tensor copied to the host as fp32, canonical [B, H, N, D] (HND) whatever its layout.
struct HostTensor {
  int batch = 0, heads = 0, tokens = 0, dim = 0;
  std::vector<float> data;
  const float* head(int b, int h) const {
    return data.data() + (static_cast<std::size_t>(b) * heads + h) * static_cast<std::size_t>(tokens) * dim;
  }
};
HostTensor download(Context& ctx, const Tensor& t, Layout layout);

// ---- stage 1 ---------------------------------------------------------------------------------------------

// Per block of `block` tokens of one sequence x [n, d]: the mean row (of x - shift when shift is given) and
// the self-similarity ||Σ u_i||² / m² (u_i = row / ||row||, m = real rows of the block; zero rows count in
// m but add nothing; a block of zero rows has similarity 1; a block with a non-finite value -1).
// All of stage 1 is computed in the exact fp32 arithmetic of predictor_fp32.hpp (docs/SPARGE.md), which the
// GPU predictors reproduce bit for bit.
struct BlockSummary {
  int blocks = 0, dim = 0;
  std::vector<float> mean;  // [blocks, dim]
  std::vector<float> sim;   // [blocks]
};
BlockSummary summarize_blocks(const float* x, int n, int d, int block, const float* shift);
// Per channel mean over the n tokens (K smoothing of the prediction): tree sums per block of `block` tokens,
// a tree sum of those, times the host's 1/n.
std::vector<float> token_mean(const float* x, int n, int d, int block);
// 1/n rounded correctly (0 for n <= 0): the only division, done on the host and handed to the GPU kernels.
float reciprocal(int n);
// scale·log2(e) in fp32: the factor from a dot product of block means to a base-2 logit.
float scale_log2(float scale);

struct Geometry {
  int tokens_q = 0, tokens_k = 0, block_q = 0, block_k = 0;
  bool causal = false;
  int blocks_q() const { return (tokens_q + block_q - 1) / block_q; }
  int blocks_k() const { return (tokens_k + block_k - 1) / block_k; }
};
// The blocks of Nq queries and Nk keys under the options (block sizes, causal).
Geometry geometry(int tokens_q, int tokens_k, const SpargeOptions& options);

// Σ over query blocks of the causally valid key blocks (nQB · nKB without causal).
int64_t valid_blocks(const Geometry& g);

// The parameter-independent stage-1 map of one (batch, query head).
struct HeadMap {
  int nqb = 0, nkb = 0;
  std::vector<float> q_sim;     // [nqb]
  std::vector<float> k_sim;     // [nkb]
  std::vector<float> mass;      // [nqb, nkb]: keys_j · 2^(logit_j − row max) over the valid blocks (unnormalized P̂)
  std::vector<int> valid_end;   // [nqb]: the valid (causally visible) key blocks are [0, valid_end)
  std::vector<int> diag_begin;  // [nqb]: key blocks [diag_begin, diag_end) hold the query block's positions
  std::vector<int> diag_end;
  std::vector<uint8_t> row_dense;  // [nqb]: the map is not finite (non-finite inputs): compute everything
};
// scale: the softmax scale (natural units). q_blocks/k_blocks from summarize_blocks (K smoothed).
HeadMap head_map(const BlockSummary& q_blocks, const BlockSummary& k_blocks, const Geometry& g, float scale);

// How query block qb takes key blocks. order: first the forced blocks (ascending), then the others by
// decreasing P̂ (ties: lower index first); a parameter setting keeps a prefix of it. Rows with no valid key
// block have an empty order.
struct RowPlan {
  std::vector<int> order;
  int forced = 0;
  std::vector<float> cum;   // cum[m]: mass of the m most massive valid blocks (forced included), summed in rank order
  std::vector<int> extra;   // extra[m]: how many of those m are not forced
  // How many leading entries of `order` the parameters keep (forced + the non-forced part of the top set).
  int kept(const SpargeParams& p) const;
};
void plan_row(const HeadMap& map, int qb, float simthreshd, bool dense, bool sink, bool diagonal, RowPlan& plan);
// How many of the most massive blocks τ (first m with cum[m] >= τ·cum[end]) or top-k (ceil(k·end)) takes,
// clamped to [1, end]. cum: end + 1 entries.
int top_count(const SpargeParams& p, const float* cum, int end);
// The selected key blocks of qb, ascending.
void select_blocks(const HeadMap& map, int qb, const SpargeParams& p, bool sink, bool diagonal,
                   std::vector<int>& selected);

// The LUT of all (b, hq): counts [B, Hq, nQB], indices [B, Hq, nQB, nKB] (rest filled with 0).
struct Lut {
  int batch = 0, heads = 0, nqb = 0, nkb = 0;
  std::vector<int32_t> counts, indices;
  int64_t valid = 0, computed = 0;  // (query block, key block) pairs
  bool on_device = false;           // predicted by the backend's device predictor
};
// q: [B, Hq, Nq, D], k: [B, Hkv, Nk, D] on the host; per_head resolved to Hq entries.
Lut predict_lut(const HostTensor& q, const HostTensor& k, const SpargeOptions& options, float scale,
                const std::vector<SpargeParams>& per_head);

// Checks block sizes and per-head parameters; returns them resolved to Hq entries. `what` prefixes errors.
std::vector<SpargeParams> resolve_params(const std::vector<SpargeParams>& per_head, int heads_q, const char* what);
void check_blocks(const Context& ctx, const SpargeOptions& options, const char* what);

// ---- per-context state of sparge_attention (hilbert.cpp) ---------------------------------------------------
// Kept in the backend's runtime cache, dropped with the last copy of the Context. Not locked: a Context (with
// its copies) is used by one thread at a time, which the backends' own grow-only workspaces already require.

// The Hilbert order of one grid: order and inverse on the host, and int32 copies in the context's memory (read
// by the device permutation without an upload per call).
struct GridOrder {
  TokenGrid grid;
  std::vector<int64_t> order, inverse;
  Tensor order_device, inverse_device;  // I32 [grid.tokens()]
};
// The order of `grid`, computed and uploaded on its first use; the context keeps the most recently used grids.
std::shared_ptr<const GridOrder> grid_order(Context& ctx, const TokenGrid& grid);

// Grow-only scratch of the context: one buffer per slot, reused by every call.
enum class Scratch { Q, K, V, Out, Lse, Counts, Indices };
// A contiguous tensor of `dtype` and `shape` in the slot's buffer (its contents are whatever the last user left),
// which grows when it is too small (or holds another dtype). Valid until the next scratch() of the same slot;
// work queued on it is ordered before later work of the context (one stream / queue), so reuse is safe.
Tensor scratch(Context& ctx, Scratch slot, DType dtype, const std::vector<int64_t>& shape);

// permute_tokens() for several (src, dst) pairs with one order, already validated (src and dst of a pair have
// one shape and dtype and do not overlap; the order is a permutation of at most N tokens). One backend call
// for all pairs where the backend can; `order_device` (I32, may be null) is the order in the context's memory.
void permute_pairs(Context& ctx, const std::vector<std::pair<Tensor, Tensor>>& pairs, const std::vector<int64_t>& order,
                   const Tensor* order_device, Layout layout);

// ---- stage 2 -----------------------------------------------------------------------------------------------

// attention() with a block mask (nullptr: none), a per query head P·V threshold (empty = no stage 2) and optional statistics.
// `token_order` (I32, may be null): read and write through it (AttentionProblem::token_order).
void attention_with_stage2(Context& ctx, const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out,
                           const AttentionOptions& options, const BlockMask* mask,
                           const std::vector<float>& pv_threshold, detail::AttentionProblem::Stats* stats,
                           const Tensor* token_order = nullptr,
                           const detail::SpargePredictProblem* predict = nullptr, Tensor* lse = nullptr);
// Sets p.token_order to a contiguous I32 tensor of the context's backend.
inline void set_token_order(detail::AttentionProblem& p, const Tensor& order) {
  p.token_order.storage = order.storage();
  p.token_order.offset_bytes = order.offset_bytes();
  p.token_order.dtype = DType::I32;
  p.token_order_size = order.numel();
}

}  // namespace sparq::sparge
