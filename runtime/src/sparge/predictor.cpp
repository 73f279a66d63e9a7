// SpargeAttn stage 1 on the host: block means and self-similarities of Q and (smoothed) K, the compressed
// attention map P̂, block selection, and the LUT the sparse kernels consume.
#include "sparge_internal.hpp"

#include "predictor_fp32.hpp"
#include "reference.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace sparq::sparge {

[[noreturn]] void bad(const std::string& what, const std::string& message) {
  detail::fail(Status::InvalidArgument, what + ": " + message);
}

HostTensor download(Context& ctx, const Tensor& t, Layout layout) {
  if (t.rank() != 4) bad("sparge", "expected a 4-dimensional tensor, got shape " + detail::shape_string(t.shape()));
  const auto& s = t.shape();
  HostTensor h;
  h.batch = static_cast<int>(s[0]);
  h.heads = static_cast<int>(layout == Layout::HND ? s[1] : s[2]);
  h.tokens = static_cast<int>(layout == Layout::HND ? s[2] : s[1]);
  h.dim = static_cast<int>(s[3]);
  const std::size_t n = static_cast<std::size_t>(t.numel());
  h.data.resize(n);
  std::vector<uint16_t> raw;
  const float* src = nullptr;
  std::vector<float> f32;
  if (t.dtype() == DType::F32) {
    f32.resize(n);
    ctx.to_host(t, f32.data());
    src = f32.data();
  } else if (t.dtype() == DType::F16 || t.dtype() == DType::BF16) {
    raw.resize(n);
    ctx.to_host(t, raw.data());
    f32.resize(n);
    for (std::size_t i = 0; i < n; ++i) f32[i] = reference::load_16(raw[i], t.dtype());
    src = f32.data();
  } else {
    bad("sparge", std::string("expected an f16, bf16 or f32 tensor, got ") + to_string(t.dtype()));
  }
  if (layout == Layout::HND) {
    h.data = std::move(f32);
    return h;
  }
  // [B, N, H, D] -> [B, H, N, D]
  const std::size_t D = static_cast<std::size_t>(h.dim);
  for (int b = 0; b < h.batch; ++b)
    for (int tok = 0; tok < h.tokens; ++tok)
      for (int hd = 0; hd < h.heads; ++hd) {
        const float* from = src + ((static_cast<std::size_t>(b) * h.tokens + tok) * h.heads + hd) * D;
        float* to = h.data.data() + ((static_cast<std::size_t>(b) * h.heads + hd) * h.tokens + tok) * D;
        std::copy(from, from + D, to);
      }
  return h;
}

// Every floating-point step below is one of predictor_fp32.hpp's (docs/SPARGE.md, "Exact arithmetic"); the
// GPU predictors repeat them in the same order.
using fp32::add;
using fp32::mul;
using fp32::sub;

float reciprocal(int n) { return n > 0 ? 1.0f / static_cast<float>(n) : 0.0f; }  // host only, correctly rounded

float scale_log2(float scale) { return mul(scale, fp32::from_bits(0x3fb8aa3bu) /* log2(e) */); }

std::vector<float> token_mean(const float* x, int n, int d, int block) {
  std::vector<float> mean(static_cast<std::size_t>(d), 0.0f);
  if (n <= 0) return mean;
  const float inv_n = reciprocal(n);
  for (int c = 0; c < d; ++c) {
    fp32::TreeSum blocks;
    for (int t0 = 0; t0 < n; t0 += block) {
      fp32::TreeSum tokens;
      for (int t = t0; t < std::min(n, t0 + block); ++t) tokens.push(fp32::ftz(x[static_cast<std::size_t>(t) * d + c]));
      blocks.push(tokens.total(fp32::tree_slots(block)));
    }
    mean[static_cast<std::size_t>(c)] = mul(blocks.total(fp32::tree_slots((n + block - 1) / block)), inv_n);
  }
  return mean;
}

BlockSummary summarize_blocks(const float* x, int n, int d, int block, const float* shift) {
  BlockSummary s;
  s.blocks = (n + block - 1) / block;
  s.dim = d;
  s.mean.assign(static_cast<std::size_t>(s.blocks) * d, 0.0f);
  s.sim.assign(static_cast<std::size_t>(s.blocks), 0.0f);
  std::vector<float> v(static_cast<std::size_t>(d));
  std::vector<fp32::TreeSum> sum(static_cast<std::size_t>(d)), unit(static_cast<std::size_t>(d));
  for (int bl = 0; bl < s.blocks; ++bl) {
    const int t0 = bl * block, t1 = std::min(n, t0 + block);
    for (int c = 0; c < d; ++c) sum[static_cast<std::size_t>(c)].count = unit[static_cast<std::size_t>(c)].count = 0;
    bool finite = true;
    int nonzero = 0;
    for (int t = t0; t < t1; ++t) {
      const float* r = x + static_cast<std::size_t>(t) * d;
      fp32::TreeSum norm2;
      for (int c = 0; c < d; ++c) {
        const float xc = fp32::ftz(r[c]);
        v[static_cast<std::size_t>(c)] = shift ? sub(xc, shift[c]) : xc;
        norm2.push(mul(v[static_cast<std::size_t>(c)], v[static_cast<std::size_t>(c)]));
      }
      const float n2 = norm2.total(fp32::tree_slots(d));
      float inv = 0.0f;  // zero rows (and non-finite ones, whose block is marked) add no direction
      if (!std::isfinite(n2)) {
        finite = false;
      } else if (n2 > 0.0f) {
        ++nonzero;
        inv = fp32::rsqrt(n2);
      }
      for (int c = 0; c < d; ++c) {
        sum[static_cast<std::size_t>(c)].push(v[static_cast<std::size_t>(c)]);
        unit[static_cast<std::size_t>(c)].push(mul(v[static_cast<std::size_t>(c)], inv));
      }
    }
    const float inv_m = reciprocal(t1 - t0);
    float* mean = s.mean.data() + static_cast<std::size_t>(bl) * d;
    fp32::TreeSum u2;
    for (int c = 0; c < d; ++c) {
      mean[c] = mul(sum[static_cast<std::size_t>(c)].total(fp32::tree_slots(block)), inv_m);
      const float u = unit[static_cast<std::size_t>(c)].total(fp32::tree_slots(block));
      u2.push(mul(u, u));
    }
    float& sim = s.sim[static_cast<std::size_t>(bl)];
    if (!finite) sim = -1.0f;
    else if (nonzero == 0) sim = 1.0f;  // identical (zero) tokens: the mean is exact
    else sim = mul(mul(u2.total(fp32::tree_slots(d)), inv_m), inv_m);
  }
  return s;
}

Geometry geometry(int tokens_q, int tokens_k, const SpargeOptions& options) {
  Geometry g;
  g.tokens_q = tokens_q;
  g.tokens_k = tokens_k;
  g.block_q = options.block_q;
  g.block_k = options.block_k;
  g.causal = options.attention.causal;
  return g;
}

namespace {
// Key blocks [0, end) that query block qb sees.
int valid_end(const Geometry& g, int qb) {
  const int nkb = g.blocks_k();
  if (!g.causal) return nkb;
  const int64_t q1 = std::min<int64_t>(g.tokens_q, static_cast<int64_t>(qb + 1) * g.block_q) - 1;
  const int64_t last = q1 + g.tokens_k - g.tokens_q;  // the last key the block's last row sees
  return last < 0 ? 0 : static_cast<int>(std::min<int64_t>(nkb, last / g.block_k + 1));
}
}  // namespace

int64_t valid_blocks(const Geometry& g) {
  int64_t n = 0;
  for (int qb = 0; qb < g.blocks_q(); ++qb) n += valid_end(g, qb);
  return n;
}

HeadMap head_map(const BlockSummary& qs, const BlockSummary& ks, const Geometry& g, float scale) {
  HeadMap map;
  map.nqb = g.blocks_q();
  map.nkb = g.blocks_k();
  map.q_sim = qs.sim;
  map.k_sim = ks.sim;
  map.mass.assign(static_cast<std::size_t>(map.nqb) * map.nkb, 0.0f);
  map.valid_end.assign(static_cast<std::size_t>(map.nqb), 0);
  map.diag_begin.assign(static_cast<std::size_t>(map.nqb), 0);
  map.diag_end.assign(static_cast<std::size_t>(map.nqb), 0);
  map.row_dense.assign(static_cast<std::size_t>(map.nqb), 0);
  const int d = qs.dim;
  const float s2 = scale_log2(scale);
  const int64_t shift = static_cast<int64_t>(g.tokens_k) - g.tokens_q;  // bottom-right alignment
  std::vector<float> logit(static_cast<std::size_t>(map.nkb));
  for (int qb = 0; qb < map.nqb; ++qb) {
    const int64_t q0 = static_cast<int64_t>(qb) * g.block_q;
    const int64_t q1 = std::min<int64_t>(g.tokens_q, q0 + g.block_q) - 1;
    // keys at the query block's own positions
    const int64_t p0 = std::max<int64_t>(0, q0 + shift), p1 = std::min<int64_t>(g.tokens_k - 1, q1 + shift);
    if (p0 <= p1) {
      map.diag_begin[static_cast<std::size_t>(qb)] = static_cast<int>(p0 / g.block_k);
      map.diag_end[static_cast<std::size_t>(qb)] = static_cast<int>(p1 / g.block_k) + 1;
    }
    const int end = valid_end(g, qb);
    map.valid_end[static_cast<std::size_t>(qb)] = end;
    if (end == 0) continue;
    const float* mq = qs.mean.data() + static_cast<std::size_t>(qb) * d;
    bool finite = true;
    for (int kb = 0; kb < end; ++kb) {
      const float* mk = ks.mean.data() + static_cast<std::size_t>(kb) * d;
      fp32::TreeSum dot;
      for (int c = 0; c < d; ++c) dot.push(mul(mq[c], mk[c]));
      const float s = mul(dot.total(fp32::tree_slots(d)), s2);  // base-2 logit of the block means
      if (!std::isfinite(s)) finite = false;
      logit[static_cast<std::size_t>(kb)] = s;
    }
    float* row = map.mass.data() + static_cast<std::size_t>(qb) * map.nkb;
    if (!finite) {
      map.row_dense[static_cast<std::size_t>(qb)] = 1;
      continue;
    }
    float mx = logit[0];
    for (int kb = 1; kb < end; ++kb) mx = fp32::greater(logit[static_cast<std::size_t>(kb)], mx);
    // A block's predicted mass: its real key count times 2^(its logit − the row max).
    for (int kb = 0; kb < end; ++kb) {
      const int keys = std::min(g.block_k, g.tokens_k - kb * g.block_k);
      row[kb] = mul(static_cast<float>(keys), fp32::exp2_neg(sub(logit[static_cast<std::size_t>(kb)], mx)));
    }
  }
  return map;
}

void plan_row(const HeadMap& map, int qb, float simthreshd, bool dense, bool sink, bool diagonal, RowPlan& plan) {
  plan.order.clear();
  plan.forced = 0;
  plan.cum.assign(1, 0.0f);
  plan.extra.assign(1, 0);
  const int end = map.valid_end[static_cast<std::size_t>(qb)];
  if (end <= 0) return;
  const bool all = dense || map.row_dense[static_cast<std::size_t>(qb)] || map.q_sim[static_cast<std::size_t>(qb)] < simthreshd;
  std::vector<uint8_t> forced(static_cast<std::size_t>(end), all ? 1 : 0);
  if (!all) {
    for (int kb = 0; kb < end; ++kb)
      if (map.k_sim[static_cast<std::size_t>(kb)] < simthreshd) forced[static_cast<std::size_t>(kb)] = 1;
    if (sink) forced[0] = 1;
    if (diagonal)
      for (int kb = map.diag_begin[static_cast<std::size_t>(qb)];
           kb < std::min(end, map.diag_end[static_cast<std::size_t>(qb)]); ++kb)
        forced[static_cast<std::size_t>(kb)] = 1;
  }
  for (int kb = 0; kb < end; ++kb)
    if (forced[static_cast<std::size_t>(kb)]) plan.order.push_back(kb);
  plan.forced = static_cast<int>(plan.order.size());
  if (all) return;  // every valid block is kept; no ranking needed
  const float* row = map.mass.data() + static_cast<std::size_t>(qb) * map.nkb;
  // Rank by decreasing mass, ties by the lower index (= a stable sort; the GPUs rank by counting).
  auto by_mass = [row](int a, int b) { return row[a] > row[b]; };
  for (int kb = 0; kb < end; ++kb)
    if (!forced[static_cast<std::size_t>(kb)]) plan.order.push_back(kb);
  std::stable_sort(plan.order.begin() + plan.forced, plan.order.end(), by_mass);
  // The top-m blocks by mass over all valid blocks (forced included): their mass (summed in rank order) and
  // how many are not forced. The non-forced ones among them are exactly the first extra[m] non-forced entries.
  std::vector<int> all_sorted(static_cast<std::size_t>(end));
  std::iota(all_sorted.begin(), all_sorted.end(), 0);
  std::stable_sort(all_sorted.begin(), all_sorted.end(), by_mass);
  plan.cum.resize(static_cast<std::size_t>(end) + 1);
  plan.extra.resize(static_cast<std::size_t>(end) + 1);
  for (int m = 0; m < end; ++m) {
    const int kb = all_sorted[static_cast<std::size_t>(m)];
    plan.cum[static_cast<std::size_t>(m) + 1] = add(plan.cum[static_cast<std::size_t>(m)], row[kb]);
    plan.extra[static_cast<std::size_t>(m) + 1] = plan.extra[static_cast<std::size_t>(m)] + (forced[static_cast<std::size_t>(kb)] ? 0 : 1);
  }
}

int top_count(const SpargeParams& p, const float* cum, int end) {
  int m;
  if (p.topk > 0) {
    m = static_cast<int>(std::ceil(mul(p.topk, static_cast<float>(end))));
  } else {
    // the fewest top blocks whose mass reaches τ of the row's
    const float target = mul(p.cdfthreshd, cum[end]);
    m = static_cast<int>(std::lower_bound(cum, cum + end + 1, target) - cum);
  }
  return std::clamp(m, 1, end);
}

int RowPlan::kept(const SpargeParams& p) const {
  const int end = static_cast<int>(order.size());
  if (end == 0 || forced >= end) return end;
  return forced + extra[static_cast<std::size_t>(top_count(p, cum.data(), end))];
}

void select_blocks(const HeadMap& map, int qb, const SpargeParams& p, bool sink, bool diagonal,
                   std::vector<int>& selected) {
  RowPlan plan;
  plan_row(map, qb, p.simthreshd, p.dense, sink, diagonal, plan);
  const int kept = plan.kept(p);
  selected.assign(plan.order.begin(), plan.order.begin() + kept);
  std::sort(selected.begin(), selected.end());
}

Lut predict_lut(const HostTensor& q, const HostTensor& k, const SpargeOptions& options, float scale,
                const std::vector<SpargeParams>& per_head) {
  const Geometry g = geometry(q.tokens, k.tokens, options);
  Lut lut;
  lut.batch = q.batch;
  lut.heads = q.heads;
  lut.nqb = g.blocks_q();
  lut.nkb = g.blocks_k();
  const std::size_t rows = static_cast<std::size_t>(lut.batch) * lut.heads * lut.nqb;
  lut.counts.assign(rows, 0);
  lut.indices.assign(rows * static_cast<std::size_t>(lut.nkb), 0);
  if (rows == 0 || lut.nkb == 0) return lut;
  const int group = q.heads / k.heads;
  // K summaries once per (batch, kv head), after smoothing.
  std::vector<BlockSummary> kblocks(static_cast<std::size_t>(k.batch) * k.heads);
  reference::parallel_for(kblocks.size(), [&](std::size_t e) {
    const float* kx = k.head(static_cast<int>(e) / k.heads, static_cast<int>(e) % k.heads);
    std::vector<float> km = token_mean(kx, k.tokens, k.dim, g.block_k);
    kblocks[e] = summarize_blocks(kx, k.tokens, k.dim, g.block_k, km.data());
  });
  std::vector<int64_t> valid(static_cast<std::size_t>(lut.batch) * lut.heads, 0), computed(valid.size(), 0);
  reference::parallel_for(valid.size(), [&](std::size_t e) {
    const int b = static_cast<int>(e) / lut.heads, h = static_cast<int>(e) % lut.heads;
    const BlockSummary qsum = summarize_blocks(q.head(b, h), q.tokens, q.dim, g.block_q, nullptr);
    const HeadMap map = head_map(qsum, kblocks[static_cast<std::size_t>(b) * k.heads + h / group], g, scale);
    std::vector<int> sel;
    for (int qb = 0; qb < lut.nqb; ++qb) {
      select_blocks(map, qb, per_head[static_cast<std::size_t>(h)], options.attention_sink, options.diagonal, sel);
      const std::size_t row = e * lut.nqb + qb;
      lut.counts[row] = static_cast<int32_t>(sel.size());
      std::copy(sel.begin(), sel.end(), lut.indices.begin() + static_cast<std::ptrdiff_t>(row * lut.nkb));
      valid[e] += map.valid_end[static_cast<std::size_t>(qb)];
      computed[e] += static_cast<int64_t>(sel.size());
    }
  });
  lut.valid = std::accumulate(valid.begin(), valid.end(), int64_t{0});
  lut.computed = std::accumulate(computed.begin(), computed.end(), int64_t{0});
  return lut;
}

}  // namespace sparq::sparge
