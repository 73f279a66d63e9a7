// sparq SpargeAttn: training-free sparse attention with a cheap block predictor (stage 1), an in-kernel
// P·V skip (stage 2), per-layer/per-head hyper-parameters (a versioned JSON file), a tuner that finds them
// against an error bound, and a generalized Hilbert token order for image/video tokens.
//
// docs/SPARGE.md describes the algorithm, the hyper-parameter file and the `sparq tune` command.
#pragma once

#include <sparq/sparq.hpp>

#include <cstdint>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace sparq {

// Per query head hyper-parameters.
struct SpargeParams {
  // θ: a key block whose self-similarity (mean pairwise cosine of its tokens) is below θ is always computed
  // for every query block, and a query block below θ computes all its key blocks. 0 disables the rule.
  float simthreshd = 0.6f;
  // τ: per query block, keep the key blocks of highest predicted attention mass until they hold τ of it.
  float cdfthreshd = 0.98f;
  // If > 0: keep this fraction of the valid key blocks of each query block instead of using τ.
  float topk = 0.0f;
  // λ (log2 units of the logits): stage 2 skips a key tile's P·V for a 16-row group when every row's tile
  // maximum is more than λ below its running maximum. +inf = no stage 2.
  float pvthreshd = std::numeric_limits<float>::infinity();
  // Compute every block (no stage 1). Stage 2 still applies if pvthreshd is finite.
  bool dense = false;

  bool stage2() const { return pvthreshd < std::numeric_limits<float>::infinity(); }
};

// Tokens laid out on a (t, h, w) grid in row-major order (w fastest); t = 1 for images.
struct TokenGrid {
  int t = 1, h = 0, w = 0;
  int64_t tokens() const { return static_cast<int64_t>(t) * h * w; }
};

struct SpargeOptions {
  AttentionOptions attention;
  // Stage-1 block sizes; multiples of Context::mask_granularity().
  int block_q = 128, block_k = 64;
  bool attention_sink = false;  // always compute the first key block
  bool diagonal = true;         // always compute the key blocks at the query block's own positions
  // Reorder the first grid.tokens() tokens of q, k and v along a generalized Hilbert curve of the grid before
  // attention and restore the order of out after it (tokens beyond the grid keep their place). Needs
  // Nq == Nk and no causal mask.
  std::optional<TokenGrid> hilbert;
};

struct SpargeStats {
  double block_sparsity = 0;    // skipped / valid (query block, key block) pairs (causal-invisible ones excluded)
  double pv_skip_fraction = 0;  // 16-row groups x 64-key tiles whose P·V stage 2 skipped / those visited
  int64_t blocks_valid = 0, blocks_computed = 0;
  int64_t pv_skipped = 0, pv_total = 0;
  bool predicted_on_device = false;  // stage 1 ran on the device (else on the host; see docs/SPARGE.md)
};

// out = attention restricted to the predicted blocks, with the stage-2 P·V skip. per_head: Hq entries, or one
// for every head. On error nothing is written. Every backend runs stage 2 (a finite pvthreshd); stage 1 (the
// predictor) runs on the device where the backend has one (Vulkan, CUDA; SPARQ_SPARGE_PREDICTOR=host keeps it
// on the host), else on the host, reading q and k back from the device; both give the same LUT bit for bit.
// lse (optional): F32 [B, Hq, Nq] as attention()'s, of the computed blocks, each row at its token's place
// (also with options.hilbert).
void sparge_attention(Context& ctx, const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out,
                      const SpargeOptions& options, const std::vector<SpargeParams>& per_head,
                      SpargeStats* stats = nullptr, Tensor* lse = nullptr);

// Stage 1 alone: the LUT mask (counts [B,Hq,nQB], ascending indices [B,Hq,nQB,nKB], blocks
// options.block_q x options.block_k) of q and k as given (options.hilbert is not applied). Each query head
// predicts its own map from its own Q against its (shared, GQA) K head. stats: block sparsity only.
BlockMask predict_block_mask(Context& ctx, const Tensor& q, const Tensor& k, const SpargeOptions& options,
                             const std::vector<SpargeParams>& per_head, SpargeStats* stats = nullptr);

// ---- hyper-parameter file ------------------------------------------------------------------------------

// Per layer (any name, e.g. "blocks.3.attn"), per head parameters; a versioned JSON file (docs/SPARGE.md).
// Every malformed, out-of-range or mismatched content is an Error(InvalidArgument) naming where it is.
class HyperParams {
 public:
  static constexpr int kVersion = 1;

  static HyperParams load(const std::string& path);
  // `source` names the text in error messages.
  static HyperParams parse(const std::string& json_text, const std::string& source = "<string>");
  void save(const std::string& path) const;
  std::string to_json() const;

  bool contains(const std::string& layer) const { return layers_.count(layer) != 0; }
  // The layer's parameters; an error if the layer is missing or (heads > 0) has another number of heads.
  const std::vector<SpargeParams>& layer(const std::string& name, int heads = 0) const;
  void set_layer(const std::string& name, std::vector<SpargeParams> heads);  // validated
  std::vector<std::string> layer_names() const;

  // The block sizes the parameters were tuned with (0 = unknown); sparge_attention should use the same.
  int block_q = 0, block_k = 0;

 private:
  std::map<std::string, std::vector<SpargeParams>> layers_;
};

// Throws Error(InvalidArgument) naming `where` (e.g. "head 3") when a parameter is NaN or out of range.
void validate(const SpargeParams& params, const std::string& where);

// ---- tuner ---------------------------------------------------------------------------------------------

struct TunerOptions {
  double l1 = 0.05;     // stage 1: relative L1 of the sparse output against exact attention, worst sample
  double pv_l1 = 0.06;  // stages 1 + 2 together (>= l1); <= 0 disables stage-2 tuning
  bool use_topk = false;  // search a top-k fraction instead of cdfthreshd
  // θ values tried (each with the best τ or k); the sparsest candidate that meets the bound wins.
  std::vector<float> simthreshd_candidates = {0.0f, 0.3f, 0.5f, 0.6f, 0.7f, 0.8f, 0.9f};
  float max_pvthreshd = 30.0f;  // the largest λ considered
  // Savings too small to be worth the risk of a selection that generalizes badly: a head whose best block
  // sparsity is below min_sparsity is made dense, a λ that skips less than min_pv_skip is dropped.
  double min_sparsity = 0.05;
  double min_pv_skip = 0.05;
  // Errors are measured on at most this many query blocks per sample, evenly spread (0 = all): the cost
  // of a sample is that of exact attention for those rows. Sparsity is measured on the same blocks.
  int max_query_blocks = 64;
  // Called with one line per finished head (its parameters, sparsity, errors and seconds).
  std::function<void(const std::string&)> progress;
};

// Observes calibration samples (q, k, v of a layer) and finds, per head, the sparsest parameters whose output
// stays within the bounds of exact attention on every sample. The error of a candidate is the error its
// block selection (and stage-2 skip) causes, computed in fp32/fp64 on the host: quantization error is not
// included. SpargeOptions (block sizes, causal, scale, sink, diagonal) must be those used at inference.
class Tuner {
 public:
  Tuner(SpargeOptions options, TunerOptions tuner_options = {});
  ~Tuner();
  Tuner(Tuner&&) noexcept;
  Tuner& operator=(Tuner&&) noexcept;

  // One sample; tensors of any context (copied to the host). Shapes as for attention (options.attention
  // .layout); every sample of a layer has the same head counts and head_dim.
  void observe(Context& ctx, const std::string& layer, const Tensor& q, const Tensor& k, const Tensor& v);
  // The same from host data: fp32, contiguous, layout HND [B, H, N, D].
  void observe_host(const std::string& layer, int batch, int heads_q, int heads_kv, int tokens_q, int tokens_k,
                    int head_dim, const float* q, const float* k, const float* v);

  std::vector<std::string> layers() const;
  std::vector<SpargeParams> tune_layer(const std::string& layer);
  // Every observed layer; block_q/block_k recorded.
  HyperParams tune();

  // Error of given parameters on the layer's samples (worst sample), with the measured block sparsity:
  // {l1 of stage 1 alone, l1 with stage 2, block sparsity, P·V skip fraction} per head.
  struct Evaluation {
    double l1 = 0, pv_l1 = 0, block_sparsity = 0, pv_skip_fraction = 0;
  };
  std::vector<Evaluation> evaluate(const std::string& layer, const std::vector<SpargeParams>& per_head);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// ---- Hilbert token order -------------------------------------------------------------------------------

// order[i] = the row-major index (w fastest) of the i-th cell on a generalized Hilbert curve covering an
// h x w (or t x h x w) grid of any size. Consecutive cells are grid neighbours (for 2-D grids always except
// the rare shapes where no such path exists, see docs/SPARGE.md).
std::vector<int64_t> hilbert_order(int h, int w);
std::vector<int64_t> hilbert_order(int t, int h, int w);
std::vector<int64_t> hilbert_order(const TokenGrid& grid);
// inverse[order[i]] = i.
std::vector<int64_t> inverse_permutation(const std::vector<int64_t>& order);

// dst token i = src token order[i] for i < order.size(); later tokens are copied unchanged. src, dst:
// [B, H, N, D] (HND) or [B, N, H, D] (NHD) of the same shape and dtype, in one context, not overlapping.
// On the device where the backend can (16-bit dtypes, contiguous rows), else through host memory.
void permute_tokens(Context& ctx, const Tensor& src, Tensor& dst, const std::vector<int64_t>& order,
                    Layout layout = Layout::HND);

}  // namespace sparq
