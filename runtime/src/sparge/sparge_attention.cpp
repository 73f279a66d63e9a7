// sparge_attention(): validate, (optionally) reorder tokens along a Hilbert curve, predict the block LUT (stage 1:
// on the device where the backend has a predictor, else on the host), run the sparse kernel with the per-head
// P·V threshold (stage 2), restore the order.
#include "sparge_internal.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <optional>

namespace sparq {
namespace sparge {

void check_blocks(const Context& ctx, const SpargeOptions& options, const char* what) {
  const auto g = ctx.mask_granularity();
  if (options.block_q <= 0 || options.block_k <= 0 || options.block_q % g[0] || options.block_k % g[1])
    bad(what, "options.block_q x block_k = " + std::to_string(options.block_q) + "x" + std::to_string(options.block_k) +
                  " must be positive multiples of the " + to_string(ctx.backend()) + " kernel tile " +
                  std::to_string(g[0]) + "x" + std::to_string(g[1]) + " (Context::mask_granularity())");
}

std::vector<SpargeParams> resolve_params(const std::vector<SpargeParams>& per_head, int heads_q, const char* what) {
  if (per_head.size() != 1 && per_head.size() != static_cast<std::size_t>(heads_q))
    bad(what, "per_head has " + std::to_string(per_head.size()) + " entries, expected 1 or Hq = " +
                  std::to_string(heads_q));
  for (std::size_t h = 0; h < per_head.size(); ++h) {
    try {
      validate(per_head[h], "head " + std::to_string(h));
    } catch (const Error& e) {
      bad(what, std::string("per_head: ") + e.what());
    }
  }
  if (per_head.size() == 1) return std::vector<SpargeParams>(static_cast<std::size_t>(heads_q), per_head[0]);
  return per_head;
}

void attention_with_stage2(Context& ctx, const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out,
                           const AttentionOptions& options, const BlockMask* mask,
                           const std::vector<float>& pv_threshold, detail::AttentionProblem::Stats* stats,
                           const Tensor* token_order, const detail::SpargePredictProblem* predict, Tensor* lse) {
  detail::AttentionProblem p = detail::make_problem(ctx, q, k, v, out, options, mask, lse);
  if (token_order) set_token_order(p, *token_order);
  p.predict = predict;
  if (!pv_threshold.empty() && !ctx.impl().supports_pv_skip())
    detail::not_supported(ctx.backend(), "the SpargeAttn stage-2 P·V skip (a finite pvthreshd)");
  if (!pv_threshold.empty() && pv_threshold.size() != static_cast<std::size_t>(p.heads_q))
    bad("sparge_attention", "internal: " + std::to_string(pv_threshold.size()) + " P·V thresholds for " +
                                std::to_string(p.heads_q) + " heads");
  p.pv_threshold = pv_threshold;
  p.stats = stats;
  ctx.impl().attention(p);
}

namespace {

BlockMask upload_lut(Context& ctx, const Lut& lut, const SpargeOptions& options) {
  Tensor counts = ctx.from_host(DType::I32, {lut.batch, lut.heads, lut.nqb}, lut.counts.data());
  Tensor indices = ctx.from_host(DType::I32, {lut.batch, lut.heads, lut.nqb, lut.nkb}, lut.indices.data());
  return BlockMask::from_lut(counts, indices, options.block_q, options.block_k);
}

// SPARQ_SPARGE_PREDICTOR=host keeps stage 1 on the host even where the backend has a device predictor
// (for comparisons and benchmarks).
bool host_predictor_forced() {
  const char* e = std::getenv("SPARQ_SPARGE_PREDICTOR");
  return e && std::strcmp(e, "host") == 0;
}

detail::Operand contiguous_operand(const Tensor& t) {
  detail::Operand op;
  op.storage = t.storage();
  op.offset_bytes = t.offset_bytes();
  op.dtype = t.dtype();
  return op;
}

// SPARQ_SPARGE_FUSED_ORDER=0 makes permuted copies even where the backend reads through the order (the tests
// compare both).
bool fused_order_disabled() {
  const char* e = std::getenv("SPARQ_SPARGE_FUSED_ORDER");
  return e && std::strcmp(e, "0") == 0;
}

// Host copies of q or k rows in the order (the host predictor's input when the order is fused on the device).
void permute_host(HostTensor& t, const std::vector<int64_t>& order) {
  const std::size_t D = static_cast<std::size_t>(t.dim), N = static_cast<std::size_t>(t.tokens);
  std::vector<float> row_buffer(N * D);
  for (int bh = 0; bh < t.batch * t.heads; ++bh) {
    float* head = t.data.data() + static_cast<std::size_t>(bh) * N * D;
    std::copy(head, head + N * D, row_buffer.begin());
    for (std::size_t i = 0; i < order.size(); ++i)
      std::copy_n(row_buffer.begin() + static_cast<std::ptrdiff_t>(static_cast<std::size_t>(order[i]) * D), D,
                  head + i * D);
  }
}

// SPARQ_SPARGE_FUSED_PREDICT=0 predicts in the backend's own passes (sparge_predict) even where attention() can
// predict in its preprocessing (the tests compare both).
bool fused_predict_disabled() {
  const char* e = std::getenv("SPARQ_SPARGE_FUSED_PREDICT");
  return e && std::strcmp(e, "0") == 0;
}

// Stage 1's device problem for the validated problem `p` of q and k; the LUT goes to `counts` and `indices`:
// the context's scratch (`scratch_lut`: sparge_attention, which consumes it at once) or new tensors (returned
// masks).
struct DevicePrediction {
  detail::SpargePredictProblem sp;
  Tensor counts, indices;
};
DevicePrediction device_prediction(Context& ctx, const detail::AttentionProblem& p, const SpargeOptions& options,
                                   const std::vector<SpargeParams>& params, bool scratch_lut) {
  const Geometry g = geometry(p.tokens_q, p.tokens_k, options);
  DevicePrediction d;
  detail::SpargePredictProblem& sp = d.sp;
  sp.batch = p.batch, sp.heads_q = p.heads_q, sp.heads_kv = p.heads_kv;
  sp.tokens_q = p.tokens_q, sp.tokens_k = p.tokens_k, sp.head_dim = p.head_dim;
  sp.q = p.q, sp.k = p.k;
  sp.token_order = p.token_order, sp.token_order_size = p.token_order_size;
  sp.block_q = g.block_q, sp.block_k = g.block_k, sp.blocks_q = g.blocks_q(), sp.blocks_k = g.blocks_k();
  sp.causal = g.causal, sp.sink = options.attention_sink, sp.diagonal = options.diagonal;
  sp.scale_log2 = scale_log2(p.scale);
  sp.inv_tokens_k = reciprocal(p.tokens_k);
  sp.inv_block_q = reciprocal(g.block_q);
  sp.inv_tail_q = reciprocal(p.tokens_q - (sp.blocks_q - 1) * g.block_q);
  sp.inv_block_k = reciprocal(g.block_k);
  sp.inv_tail_k = reciprocal(p.tokens_k - (sp.blocks_k - 1) * g.block_k);
  for (const SpargeParams& h : params) {
    sp.simthreshd.push_back(h.simthreshd);
    sp.cdfthreshd.push_back(h.cdfthreshd);
    sp.topk.push_back(h.topk);
    sp.dense.push_back(h.dense ? 1 : 0);
  }
  const std::vector<int64_t> counts_shape = {p.batch, p.heads_q, sp.blocks_q};
  const std::vector<int64_t> indices_shape = {p.batch, p.heads_q, sp.blocks_q, sp.blocks_k};
  d.counts = scratch_lut ? scratch(ctx, Scratch::Counts, DType::I32, counts_shape) : ctx.empty(DType::I32, counts_shape);
  d.indices =
      scratch_lut ? scratch(ctx, Scratch::Indices, DType::I32, indices_shape) : ctx.empty(DType::I32, indices_shape);
  sp.counts = contiguous_operand(d.counts);
  sp.indices = contiguous_operand(d.indices);
  return d;
}

// A device prediction's geometry in `lut`, and its computed blocks when `count_computed` (which downloads the
// counts once they are written).
void describe_device_lut(Context& ctx, const DevicePrediction& d, int64_t valid_per_head, bool count_computed,
                         Lut& lut) {
  lut.batch = d.sp.batch, lut.heads = d.sp.heads_q, lut.nqb = d.sp.blocks_q, lut.nkb = d.sp.blocks_k;
  lut.valid = static_cast<int64_t>(d.sp.batch) * d.sp.heads_q * valid_per_head;
  lut.computed = 0;
  lut.on_device = true;
  if (count_computed) {
    std::vector<int32_t> c(static_cast<std::size_t>(d.counts.numel()));
    ctx.to_host(d.counts, c.data());
    for (int32_t n : c) lut.computed += n;
  }
}

bool empty_prediction(const DevicePrediction& d) {
  return d.sp.batch == 0 || d.sp.heads_q == 0 || d.sp.blocks_q == 0 || d.sp.blocks_k == 0;
}

// Stage 1 on the device when the context's backend has a predictor (the LUT never leaves the device);
// nullopt otherwise. `p`: the validated problem of q and k.
std::optional<BlockMask> predict_on_device(Context& ctx, const detail::AttentionProblem& p, const SpargeOptions& options,
                                           const std::vector<SpargeParams>& params, bool count_computed, Lut& lut,
                                           bool scratch_lut) {
  if (host_predictor_forced()) return std::nullopt;
  DevicePrediction d = device_prediction(ctx, p, options, params, scratch_lut);
  if (empty_prediction(d) || !ctx.impl().sparge_predict(d.sp)) return std::nullopt;
  describe_device_lut(ctx, d, valid_blocks(geometry(p.tokens_q, p.tokens_k, options)), count_computed, lut);
  return BlockMask::from_lut(d.counts, d.indices, options.block_q, options.block_k);
}

}  // namespace
}  // namespace sparge

BlockMask predict_block_mask(Context& ctx, const Tensor& q, const Tensor& k, const SpargeOptions& options,
                             const std::vector<SpargeParams>& per_head, SpargeStats* stats) {
  const char* what = "predict_block_mask";
  // validate q and k like attention() does (k stands in for v and a scratch output for out)
  sparge::check_blocks(ctx, options, what);
  if (!q.defined() || !k.defined()) sparge::bad(what, "q and k must be defined tensors");
  // The context's output scratch (no allocation per call): never written, only validated as `out`.
  Tensor scratch = sparge::scratch(ctx, sparge::Scratch::Out, q.dtype() == DType::BF16 ? DType::BF16 : DType::F16, q.shape());
  detail::AttentionProblem p = detail::make_problem(ctx, q, k, k, scratch, options.attention, nullptr, nullptr);
  std::vector<SpargeParams> params = sparge::resolve_params(per_head, p.heads_q, what);
  sparge::Lut lut;
  std::optional<BlockMask> mask = sparge::predict_on_device(ctx, p, options, params, stats != nullptr, lut, false);
  if (!mask) {
    sparge::HostTensor hq = sparge::download(ctx, q, options.attention.layout);
    sparge::HostTensor hk = sparge::download(ctx, k, options.attention.layout);
    lut = sparge::predict_lut(hq, hk, options, p.scale, params);
    mask = sparge::upload_lut(ctx, lut, options);
  }
  if (stats) {
    *stats = SpargeStats{};
    stats->blocks_valid = lut.valid;
    stats->blocks_computed = lut.computed;
    stats->block_sparsity = lut.valid ? 1.0 - static_cast<double>(lut.computed) / static_cast<double>(lut.valid) : 0.0;
    stats->predicted_on_device = lut.on_device;
  }
  return *mask;
}

void sparge_attention(Context& ctx, const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out,
                      const SpargeOptions& options, const std::vector<SpargeParams>& per_head, SpargeStats* stats,
                      Tensor* lse) {
  const char* what = "sparge_attention";
  sparge::check_blocks(ctx, options, what);
  // Every argument of the dense problem first (nothing is written on error).
  detail::AttentionProblem p = detail::make_problem(ctx, q, k, v, out, options.attention, nullptr, lse);
  std::vector<SpargeParams> params = sparge::resolve_params(per_head, p.heads_q, what);
  const Layout layout = options.attention.layout;

  // Stage 2 thresholds: only when some head has one (an empty list keeps every backend's dense-tile path).
  std::vector<float> lambda;
  if (std::any_of(params.begin(), params.end(), [](const SpargeParams& s) { return s.stage2(); })) {
    lambda.resize(params.size());
    for (std::size_t h = 0; h < params.size(); ++h) lambda[h] = params[h].pvthreshd;
    if (!ctx.impl().supports_pv_skip()) detail::not_supported(ctx.backend(), "the SpargeAttn stage-2 P·V skip (a finite pvthreshd)");
  }
  const bool all_dense = std::all_of(params.begin(), params.end(), [](const SpargeParams& s) { return s.dense; });

  // Hilbert order: permuted copies of q, k, v and a scratch output (not needed by dense attention, which
  // does not depend on the order of tokens). The copies live in the context's grow-only scratch and the order
  // (with its inverse) is cached per grid on the device, so a call in steady state allocates nothing, uploads
  // nothing and does not wait for the device between the permutations.
  std::shared_ptr<const sparge::GridOrder> order;
  Tensor qp = q, kp = k, vp = v, outp = out;
  Tensor lsep = lse ? *lse : Tensor();
  const bool permute = options.hilbert && !(all_dense && lambda.empty());
  // Where the backend reads and writes through the order itself (the CUDA preprocessing, predictor and output
  // epilogue), no copies are made: the same arithmetic on the same rows, without three passes over q, k, v
  // and one over the output.
  const bool fused = permute && ctx.impl().reads_token_order() && !sparge::fused_order_disabled();
  if (options.hilbert) {
    const TokenGrid& g = *options.hilbert;
    if (g.t <= 0 || g.h <= 0 || g.w <= 0)
      sparge::bad(what, "options.hilbert grid " + std::to_string(g.t) + "x" + std::to_string(g.h) + "x" +
                            std::to_string(g.w) + " must have positive sizes");
    if (p.tokens_q != p.tokens_k)
      sparge::bad(what, "options.hilbert needs Nq == Nk, got Nq = " + std::to_string(p.tokens_q) +
                            " and Nk = " + std::to_string(p.tokens_k));
    if (g.tokens() > p.tokens_q)
      sparge::bad(what, "options.hilbert grid " + std::to_string(g.t) + "x" + std::to_string(g.h) + "x" +
                            std::to_string(g.w) + " has " + std::to_string(g.tokens()) + " tokens, more than the " +
                            std::to_string(p.tokens_q) + " of the sequence");
    if (options.attention.causal)
      sparge::bad(what, "options.hilbert cannot be combined with a causal mask (the order of tokens changes)");
  }
  if (permute) {
    order = sparge::grid_order(ctx, *options.hilbert);
  }
  if (permute && !fused) {
    qp = sparge::scratch(ctx, sparge::Scratch::Q, q.dtype(), q.shape());
    kp = sparge::scratch(ctx, sparge::Scratch::K, k.dtype(), k.shape());
    vp = sparge::scratch(ctx, sparge::Scratch::V, v.dtype(), v.shape());
    outp = sparge::scratch(ctx, sparge::Scratch::Out, out.dtype(), out.shape());
    if (lse) lsep = sparge::scratch(ctx, sparge::Scratch::Lse, DType::F32, lse->shape());
    sparge::permute_pairs(ctx, {{q, qp}, {k, kp}, {v, vp}}, order->order, &order->order_device, layout);
  }

  // Stage 1: in the attention's own preprocessing where the backend can (no pass of its own over q and k), else
  // on the device before it, else on the host. A layer of dense heads needs no prediction (and no mask).
  sparge::Lut lut;
  std::optional<BlockMask> mask;
  std::optional<sparge::DevicePrediction> in_attention;  // the fused prediction, when there is one
  const sparge::Geometry geometry = sparge::geometry(p.tokens_q, p.tokens_k, options);
  if (all_dense) {
    lut.valid = static_cast<int64_t>(p.batch) * p.heads_q * sparge::valid_blocks(geometry);
    lut.computed = lut.valid;
  } else {
    detail::AttentionProblem pp = p;
    if (permute && !fused) pp = detail::make_problem(ctx, qp, kp, vp, outp, options.attention, nullptr, nullptr);
    if (fused) sparge::set_token_order(pp, order->order_device);
    if (!sparge::host_predictor_forced() && !sparge::fused_predict_disabled()) {
      sparge::DevicePrediction d = sparge::device_prediction(ctx, pp, options, params, true);
      if (!sparge::empty_prediction(d) && ctx.impl().fuses_sparge_predict(d.sp)) {
        mask = BlockMask::from_lut(d.counts, d.indices, options.block_q, options.block_k);
        in_attention = std::move(d);
      }
    }
    if (!mask) mask = sparge::predict_on_device(ctx, pp, options, params, stats != nullptr, lut, true);
    if (!mask) {
      sparge::HostTensor hq = sparge::download(ctx, qp, layout);
      sparge::HostTensor hk = sparge::download(ctx, kp, layout);
      if (fused) {
        sparge::permute_host(hq, order->order);
        sparge::permute_host(hk, order->order);
      }
      lut = sparge::predict_lut(hq, hk, options, p.scale, params);
      mask = sparge::upload_lut(ctx, lut, options);
    }
  }

  detail::AttentionProblem::Stats backend_stats;
  sparge::attention_with_stage2(ctx, qp, kp, vp, outp, options.attention, mask ? &*mask : nullptr, lambda,
                                stats && !lambda.empty() ? &backend_stats : nullptr,
                                fused ? &order->order_device : nullptr, in_attention ? &in_attention->sp : nullptr,
                                lse ? &lsep : nullptr);
  if (in_attention)
    sparge::describe_device_lut(ctx, *in_attention, sparge::valid_blocks(geometry), stats != nullptr, lut);

  if (permute && !fused) {
    sparge::permute_pairs(ctx, {{outp, out}}, order->inverse, &order->inverse_device, layout);
    if (lse) {  // [B, Hq, N] (whatever the layout) as rows of one element: [B, Hq, N, 1]
      auto rows = [](const Tensor& t) {
        const auto& st = t.strides();
        return t.view({t.shape()[0], t.shape()[1], t.shape()[2], 1}, {st[0], st[1], st[2], 1});
      };
      sparge::permute_pairs(ctx, {{rows(lsep), rows(*lse)}}, order->inverse, &order->inverse_device, Layout::HND);
    }
  }
  if (stats) {
    *stats = SpargeStats{};
    stats->blocks_valid = lut.valid;
    stats->blocks_computed = lut.computed;
    stats->block_sparsity = lut.valid ? 1.0 - static_cast<double>(lut.computed) / static_cast<double>(lut.valid) : 0.0;
    stats->predicted_on_device = lut.on_device;
    stats->pv_skipped = backend_stats.pv_skipped;
    stats->pv_total = backend_stats.pv_total;
    stats->pv_skip_fraction =
        backend_stats.pv_total ? static_cast<double>(backend_stats.pv_skipped) / static_cast<double>(backend_stats.pv_total) : 0.0;
  }
}

}  // namespace sparq
