// attention(): validates every argument, resolves layout and defaults into one AttentionProblem, and hands it
// to the context's backend. Nothing is written unless every check passed.
#include "backend.hpp"

#include <cmath>

namespace sparq {
namespace {

using detail::fail;
using detail::shape_string;

[[noreturn]] void bad(const std::string& message) { fail(Status::InvalidArgument, "attention: " + message); }

void check_tensor(const Context& ctx, const Tensor& t, const char* name) {
  if (!t.defined()) bad(std::string(name) + " is an empty tensor (default-constructed)");
  if (t.storage()->owner != &ctx.impl())
    bad(std::string(name) + " belongs to another context (" + to_string(t.storage()->backend) + "), not this " +
        to_string(ctx.backend()) + " context");
}

void check_dtype(const Tensor& t, const char* name, std::initializer_list<DType> allowed) {
  std::string list;
  for (DType d : allowed) {
    if (t.dtype() == d) return;
    list += (list.empty() ? "" : " or ") + std::string(to_string(d));
  }
  bad(std::string(name) + " has dtype " + to_string(t.dtype()) + ", expected " + list);
}

// [B, H, N, D] sizes of an attention operand under the layout.
struct Dims {
  int64_t batch, heads, tokens, dim;
};

Dims attention_dims(const Tensor& t, Layout layout, const char* name) {
  if (t.rank() != 4)
    bad(std::string(name) + " must have 4 dimensions (" + (layout == Layout::HND ? "[B, H, N, D]" : "[B, N, H, D]") +
        "), got shape " + shape_string(t.shape()));
  if (t.strides()[3] != 1)
    bad(std::string(name) + " must have a contiguous last (head_dim) dimension, got strides " +
        shape_string(t.strides()));
  const auto& s = t.shape();
  return layout == Layout::HND ? Dims{s[0], s[1], s[2], s[3]} : Dims{s[0], s[2], s[1], s[3]};
}

// Byte range [begin, end) of a view inside its storage.
std::pair<std::size_t, std::size_t> byte_range(const Tensor& t) {
  std::size_t span = detail::checked_extent_bytes(t.dtype(), t.shape(), t.strides(), "tensor");
  return {t.offset_bytes(), t.offset_bytes() + span};
}

void check_no_overlap(const Tensor& out, const char* out_name, const Tensor& in, const char* in_name) {
  if (out.storage() != in.storage()) return;
  auto [a0, a1] = byte_range(out);
  auto [b0, b1] = byte_range(in);
  if (a0 < b1 && b0 < a1) bad(std::string(out_name) + " overlaps " + in_name + " in memory; outputs must not alias inputs");
}

void check_shape(const Tensor& t, const char* name, const std::vector<int64_t>& expected, const std::string& meaning) {
  if (t.shape() != expected)
    bad(std::string(name) + " has shape " + shape_string(t.shape()) + ", expected " + shape_string(expected) + " " +
        meaning);
  if (!t.is_contiguous()) bad(std::string(name) + " must be contiguous, got strides " + shape_string(t.strides()));
}

void fill_mask(const Context& ctx, const BlockMask& mask, detail::AttentionProblem& p) {
  auto granularity = ctx.mask_granularity();
  if (mask.block_q() <= 0 || mask.block_k() <= 0)
    bad("mask block size " + std::to_string(mask.block_q()) + "x" + std::to_string(mask.block_k()) +
        " must be positive");
  if (mask.block_q() % granularity[0] || mask.block_k() % granularity[1])
    bad("mask block size " + std::to_string(mask.block_q()) + "x" + std::to_string(mask.block_k()) +
        " is not a multiple of the " + to_string(ctx.backend()) + " kernel tile " + std::to_string(granularity[0]) +
        "x" + std::to_string(granularity[1]) + " (Context::mask_granularity())");
  p.mask_block_q = mask.block_q();
  p.mask_block_k = mask.block_k();
  p.mask_blocks_q = (p.tokens_q + mask.block_q() - 1) / mask.block_q();
  p.mask_blocks_k = (p.tokens_k + mask.block_k() - 1) / mask.block_k();
  auto canonical = [](const Tensor& t) {
    detail::Operand op;
    op.storage = t.storage();
    op.offset_bytes = t.offset_bytes();
    op.dtype = t.dtype();
    return op;
  };
  const std::string blocks = "(ceil(Nq/block_q), ceil(Nk/block_k))";
  if (mask.kind() == BlockMask::Kind::Bitmap) {
    const Tensor& b = mask.bitmap();
    check_tensor(ctx, b, "mask bitmap");
    check_dtype(b, "mask bitmap", {DType::U8});
    if (b.rank() != 4) bad("mask bitmap must be [B, Hm, nQB, nKB], got shape " + shape_string(b.shape()));
    int64_t hm = b.shape()[1];
    if (hm != 1 && hm != p.heads_kv && hm != p.heads_q)
      bad("mask bitmap has " + std::to_string(hm) + " heads, expected 1, Hkv = " + std::to_string(p.heads_kv) +
          " or Hq = " + std::to_string(p.heads_q));
    check_shape(b, "mask bitmap", {p.batch, hm, p.mask_blocks_q, p.mask_blocks_k}, "[B, Hm, nQB, nKB] " + blocks);
    p.mask_layout = detail::MaskLayout::Bitmap;
    p.mask_heads = static_cast<int>(hm);
    p.mask_bitmap = canonical(b);
  } else {
    const Tensor& c = mask.counts();
    const Tensor& i = mask.indices();
    check_tensor(ctx, c, "mask counts");
    check_tensor(ctx, i, "mask indices");
    check_dtype(c, "mask counts", {DType::I32});
    check_dtype(i, "mask indices", {DType::I32});
    check_shape(c, "mask counts", {p.batch, p.heads_q, p.mask_blocks_q}, "[B, Hq, nQB] " + blocks);
    check_shape(i, "mask indices", {p.batch, p.heads_q, p.mask_blocks_q, p.mask_blocks_k},
                "[B, Hq, nQB, nKB] " + blocks);
    p.mask_layout = detail::MaskLayout::Lut;
    p.mask_heads = p.heads_q;
    p.mask_counts = canonical(c);
    p.mask_indices = canonical(i);
  }
}

}  // namespace

namespace detail {

Operand operand(const Tensor& t, Layout layout) {
  Operand op;
  op.storage = t.storage();
  op.offset_bytes = t.offset_bytes();
  op.dtype = t.dtype();
  const auto& st = t.strides();
  op.stride_batch = st[0];
  op.stride_head = layout == Layout::HND ? st[1] : st[2];
  op.stride_token = layout == Layout::HND ? st[2] : st[1];
  return op;
}

AttentionProblem make_problem(Context& ctx, const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out,
                              const AttentionOptions& options, const BlockMask* mask, Tensor* lse) {
  check_tensor(ctx, q, "q");
  check_tensor(ctx, k, "k");
  check_tensor(ctx, v, "v");
  check_tensor(ctx, out, "out");
  if (options.layout != Layout::HND && options.layout != Layout::NHD) bad("options.layout is not HND or NHD");
  check_dtype(q, "q", {DType::F16, DType::BF16});
  if (k.dtype() != q.dtype()) bad(std::string("k has dtype ") + to_string(k.dtype()) + ", expected q's " + to_string(q.dtype()));
  if (v.dtype() != q.dtype()) bad(std::string("v has dtype ") + to_string(v.dtype()) + ", expected q's " + to_string(q.dtype()));
  check_dtype(out, "out", {DType::F16, DType::BF16});

  Dims dq = attention_dims(q, options.layout, "q");
  Dims dk = attention_dims(k, options.layout, "k");
  Dims dv = attention_dims(v, options.layout, "v");
  Dims dout = attention_dims(out, options.layout, "out");
  if (dk.batch != dq.batch) bad("k has batch " + std::to_string(dk.batch) + ", expected q's " + std::to_string(dq.batch));
  if (dk.dim != dq.dim) bad("k has head_dim " + std::to_string(dk.dim) + ", expected q's " + std::to_string(dq.dim));
  if (dq.heads % dk.heads)
    bad("q has " + std::to_string(dq.heads) + " heads, which is not a multiple of k's " + std::to_string(dk.heads) +
        " heads (GQA needs Hq % Hkv == 0)");
  if (dv.batch != dk.batch || dv.heads != dk.heads || dv.tokens != dk.tokens || dv.dim != dk.dim)
    bad("v has shape " + shape_string(v.shape()) + ", expected k's shape " + shape_string(k.shape()));
  if (out.shape() != q.shape()) bad("out has shape " + shape_string(out.shape()) + ", expected q's shape " + shape_string(q.shape()));
  if (dq.dim > 256) bad("head_dim " + std::to_string(dq.dim) + " is larger than the supported 256");
  if (!std::isfinite(options.scale) || options.scale < 0)
    bad("options.scale is " + std::to_string(options.scale) + ", expected a finite value > 0 (or 0 for 1/sqrt(head_dim))");
  check_no_overlap(out, "out", q, "q");
  check_no_overlap(out, "out", k, "k");
  check_no_overlap(out, "out", v, "v");

  detail::AttentionProblem p;
  p.batch = static_cast<int>(dq.batch);
  p.heads_q = static_cast<int>(dq.heads);
  p.heads_kv = static_cast<int>(dk.heads);
  p.tokens_q = static_cast<int>(dq.tokens);
  p.tokens_k = static_cast<int>(dk.tokens);
  p.head_dim = static_cast<int>(dq.dim);
  p.q = operand(q, options.layout);
  p.k = operand(k, options.layout);
  p.v = operand(v, options.layout);
  p.out = operand(out, options.layout);
  p.causal = options.causal;
  p.scale = options.scale > 0 ? options.scale : 1.0f / std::sqrt(static_cast<float>(dq.dim));
  p.smooth_k = options.smooth_k;
  p.qk_precision = options.qk_precision;
  p.qk_granularity = options.qk_granularity;
  p.pv_precision =
      options.pv_precision == PVPrecision::Auto ? ctx.impl().default_pv_precision() : options.pv_precision;
  (void)dout;

  if (mask) fill_mask(ctx, *mask, p);
  if (lse) {
    check_tensor(ctx, *lse, "lse");
    check_dtype(*lse, "lse", {DType::F32});
    if (lse->shape() != std::vector<int64_t>{dq.batch, dq.heads, dq.tokens})
      bad("lse has shape " + shape_string(lse->shape()) + ", expected [B, Hq, Nq] = " +
          shape_string({dq.batch, dq.heads, dq.tokens}));
    if (lse->strides()[2] != 1) bad("lse must have a contiguous last dimension, got strides " + shape_string(lse->strides()));
    for (const Tensor* in : {&q, &k, &v, static_cast<const Tensor*>(&out)}) check_no_overlap(*lse, "lse", *in, in == &out ? "out" : "an input");
    p.has_lse = true;
    p.lse.storage = lse->storage();
    p.lse.offset_bytes = lse->offset_bytes();
    p.lse.dtype = DType::F32;
    p.lse.stride_batch = lse->strides()[0];
    p.lse.stride_head = lse->strides()[1];
    p.lse.stride_token = 1;
  }
  return p;
}

}  // namespace detail

void attention(Context& ctx, const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out,
               const AttentionOptions& options, const BlockMask* mask, Tensor* lse) {
  detail::AttentionProblem p = detail::make_problem(ctx, q, k, v, out, options, mask, lse);
  ctx.impl().attention(p);
}

}  // namespace sparq
