// Operand access, block masks, and exact fp64 attention: the accuracy oracle.
#include "reference.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace sparq::reference {

void load_rows(const detail::Operand& op, int b, int h, int64_t t0, int64_t n, int dim, float* dst) {
  const std::byte* base = host_data(op);
  for (int64_t i = 0; i < n; ++i) {
    int64_t off = b * op.stride_batch + h * op.stride_head + (t0 + i) * op.stride_token;
    float* row = dst + i * dim;
    if (op.dtype == DType::F32) {
      std::memcpy(row, reinterpret_cast<const float*>(base) + off, sizeof(float) * static_cast<std::size_t>(dim));
    } else {
      const uint16_t* src = reinterpret_cast<const uint16_t*>(base) + off;
      for (int c = 0; c < dim; ++c) row[c] = load_16(src[c], op.dtype);
    }
  }
}

int mask_block_k(const detail::AttentionProblem& p) {
  return p.mask_layout == detail::MaskLayout::None ? std::max(1, p.tokens_k) : p.mask_block_k;
}
int mask_block_q(const detail::AttentionProblem& p) {
  return p.mask_layout == detail::MaskLayout::None ? std::max(1, p.tokens_q) : p.mask_block_q;
}

void mask_key_blocks(const detail::AttentionProblem& p, int b, int h, int qb, std::vector<uint8_t>& allowed) {
  if (p.mask_layout == detail::MaskLayout::None) {
    allowed.assign(1, 1);
    return;
  }
  const int nkb = p.mask_blocks_k, nqb = p.mask_blocks_q;
  allowed.assign(static_cast<std::size_t>(nkb), 0);
  if (p.mask_layout == detail::MaskLayout::Bitmap) {
    const int hm_count = p.mask_heads > 0 ? p.mask_heads : 1;
    const int hm = h / (p.heads_q / hm_count);
    const uint8_t* bits = reinterpret_cast<const uint8_t*>(host_data(p.mask_bitmap));
    const std::size_t row = ((static_cast<std::size_t>(b) * hm_count + hm) * nqb + qb) * nkb;
    for (int kb = 0; kb < nkb; ++kb) allowed[static_cast<std::size_t>(kb)] = bits[row + kb] ? 1 : 0;
    return;
  }
  // LUT: [B, Hq, nQB] counts and [B, Hq, nQB, nKB] indices (a runtime may hand fewer mask heads)
  const int hl_count = p.mask_heads > 0 ? p.mask_heads : p.heads_q;
  const int hl = h / (p.heads_q / hl_count);
  const int32_t* counts = reinterpret_cast<const int32_t*>(host_data(p.mask_counts));
  const int32_t* indices = reinterpret_cast<const int32_t*>(host_data(p.mask_indices));
  const std::size_t row = (static_cast<std::size_t>(b) * hl_count + hl) * nqb + qb;
  const int count = std::clamp<int32_t>(counts[row], 0, nkb);
  for (int e = 0; e < count; ++e) {
    int32_t kb = indices[row * nkb + e];
    if (kb >= 0 && kb < nkb) allowed[static_cast<std::size_t>(kb)] = 1;
  }
}

namespace {

struct ExactKv {
  std::vector<double> kt;  // [D][Nk]
  std::vector<double> v;   // [Nk][D]
};

void prepare_exact(const detail::AttentionProblem& p, int b, int kvh, ExactKv& kv) {
  const int D = p.head_dim;
  const int64_t Nk = p.tokens_k;
  std::vector<float> rows(static_cast<std::size_t>(Nk) * D);
  load_rows(p.k, b, kvh, 0, Nk, D, rows.data());
  kv.kt.resize(rows.size());
  for (int64_t j = 0; j < Nk; ++j)
    for (int c = 0; c < D; ++c)
      kv.kt[static_cast<std::size_t>(c * Nk + j)] = rows[static_cast<std::size_t>(j * D + c)];
  load_rows(p.v, b, kvh, 0, Nk, D, rows.data());
  kv.v.assign(rows.begin(), rows.end());
}

void exact_rows(const detail::AttentionProblem& p, const ExactKv& kv, int b, int h, int64_t r0, int64_t n,
                double* out, double* lse) {
  const int D = p.head_dim;
  const int64_t Nq = p.tokens_q, Nk = p.tokens_k;
  const double scale = p.scale;
  const int bq = mask_block_q(p), bk = mask_block_k(p);
  std::vector<float> q(static_cast<std::size_t>(n) * D);
  load_rows(p.q, b, h, r0, n, D, q.data());
  std::vector<double> s(static_cast<std::size_t>(Nk)), qd(static_cast<std::size_t>(D));
  std::vector<uint8_t> allowed;
  int cached_qb = -1;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t row = r0 + i;
    const int qb = static_cast<int>(row / bq);
    if (qb != cached_qb) {
      mask_key_blocks(p, b, h, qb, allowed);
      cached_qb = qb;
    }
    double* o = out + i * D;
    std::fill(o, o + D, 0.0);
    int64_t end = p.causal ? std::min(Nk, row + (Nk - Nq) + 1) : Nk;
    if (end <= 0) {
      if (lse) lse[i] = -std::numeric_limits<double>::infinity();
      continue;
    }
    for (int c = 0; c < D; ++c) qd[static_cast<std::size_t>(c)] = q[static_cast<std::size_t>(i * D + c)];
    std::fill(s.begin(), s.begin() + end, 0.0);
    for (int c = 0; c < D; ++c) {
      const double qc = qd[static_cast<std::size_t>(c)];
      const double* kc = kv.kt.data() + static_cast<std::size_t>(c) * Nk;
      for (int64_t j = 0; j < end; ++j) s[static_cast<std::size_t>(j)] += qc * kc[j];
    }
    double mx = -std::numeric_limits<double>::infinity();
    bool any = false;
    for (int64_t j = 0; j < end; ++j) {
      if (!allowed[static_cast<std::size_t>(j / bk)]) continue;
      any = true;
      double x = s[static_cast<std::size_t>(j)] * scale;
      s[static_cast<std::size_t>(j)] = x;
      if (x > mx || std::isnan(x)) mx = x;
    }
    if (!any) {
      if (lse) lse[i] = -std::numeric_limits<double>::infinity();
      continue;
    }
    double sum = 0;
    for (int64_t j = 0; j < end; ++j) {
      if (!allowed[static_cast<std::size_t>(j / bk)]) continue;
      const double e = std::exp(s[static_cast<std::size_t>(j)] - mx);
      sum += e;
      const double* vj = kv.v.data() + static_cast<std::size_t>(j) * D;
      for (int c = 0; c < D; ++c) o[c] += e * vj[c];
    }
    for (int c = 0; c < D; ++c) o[c] /= sum;
    if (lse) lse[i] = mx + std::log(sum);
  }
}

}  // namespace

void exact_attention(const detail::AttentionProblem& p, std::vector<double>& out, std::vector<double>* lse) {
  const int D = p.head_dim;
  const int64_t Nq = p.tokens_q;
  const std::size_t rows_total = static_cast<std::size_t>(p.batch) * p.heads_q * static_cast<std::size_t>(Nq);
  out.assign(rows_total * static_cast<std::size_t>(D), 0.0);
  if (lse) lse->assign(rows_total, -std::numeric_limits<double>::infinity());
  if (rows_total == 0 || p.tokens_k <= 0 || D <= 0) return;
  const int group = p.kv_group();
  const int64_t chunks = (Nq + kQueryChunk - 1) / kQueryChunk;
  const std::size_t per_head = 16u * static_cast<std::size_t>(p.tokens_k) * static_cast<std::size_t>(D);
  const std::size_t budget = std::size_t(512) << 20;
  const int total_kv = p.batch * p.heads_kv;
  const int at_once = static_cast<int>(std::max<std::size_t>(1, std::min<std::size_t>(total_kv, budget / per_head)));
  for (int first = 0; first < total_kv; first += at_once) {
    const int count = std::min(at_once, total_kv - first);
    std::vector<ExactKv> kv(static_cast<std::size_t>(count));
    parallel_for(static_cast<std::size_t>(count), [&](std::size_t e) {
      const int id = first + static_cast<int>(e);
      prepare_exact(p, id / p.heads_kv, id % p.heads_kv, kv[e]);
    });
    parallel_for(static_cast<std::size_t>(count) * group * chunks, [&](std::size_t w) {
      const int64_t chunk = static_cast<int64_t>(w % chunks);
      const int g = static_cast<int>((w / chunks) % group);
      const int e = static_cast<int>(w / chunks / group);
      const int id = first + e;
      const int b = id / p.heads_kv, h = (id % p.heads_kv) * group + g;
      const int64_t r0 = chunk * kQueryChunk, n = std::min<int64_t>(kQueryChunk, Nq - r0);
      const std::size_t row = (static_cast<std::size_t>(b) * p.heads_q + h) * static_cast<std::size_t>(Nq) +
                              static_cast<std::size_t>(r0);
      exact_rows(p, kv[static_cast<std::size_t>(e)], b, h, r0, n, out.data() + row * D,
                 lse ? lse->data() + row : nullptr);
    });
  }
}

}  // namespace sparq::reference
