// Number formats, INT8 quantization and the emulation of the quantized kernels (docs/NUMERICS.md).
#include "reference.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>

namespace sparq::reference {

namespace {

uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

constexpr float kLog2e = 1.44269504088896340736f;
constexpr float kLn2 = 0.693147180559945309417f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

}  // namespace

// ---- number formats -----------------------------------------------------------------------------------

float half_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t man = h & 0x3FFu;
  if (exp == 0x1F) return float_of(sign | 0x7F800000u | (man << 13));  // inf / NaN (payload kept)
  if (exp == 0) {
    // zero or subnormal: man · 2^-24, exact in fp32
    float v = static_cast<float>(man) * (1.0f / 16777216.0f);
    return sign ? -v : v;
  }
  return float_of(sign | ((exp + 112u) << 23) | (man << 13));
}

uint16_t float_to_half(float f) {
  uint32_t x = bits_of(f);
  uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  uint32_t ax = x & 0x7FFFFFFFu;
  if (ax > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00u | ((ax >> 13) & 0x3FFu));  // quiet NaN
  if (ax >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // >= 65520 rounds to inf
  if (ax < 0x38800000u) {
    // below 2^-14: a half subnormal, quantum 2^-24; the scaling is exact, nearbyint rounds ties to even
    float a = float_of(ax) * 16777216.0f;
    return static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(a)));
  }
  uint32_t r = (ax + 0xFFFu + ((ax >> 13) & 1u)) >> 13;  // round the 13 dropped bits to nearest even
  return static_cast<uint16_t>(sign | (r - (112u << 10)));
}

float bf16_to_float(uint16_t b) { return float_of(static_cast<uint32_t>(b) << 16); }

uint16_t float_to_bf16(float f) {
  uint32_t x = bits_of(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((x >> 16) | 0x0040u);  // quiet NaN
  return static_cast<uint16_t>((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

float e4m3_to_float(uint8_t x) {
  float sign = (x & 0x80u) ? -1.0f : 1.0f;
  int exp = (x >> 3) & 0xF;
  int man = x & 0x7;
  if (exp == 15 && man == 7) return std::numeric_limits<float>::quiet_NaN();
  if (exp == 0) return sign * std::ldexp(static_cast<float>(man), -9);  // subnormal: man/8 · 2^-6
  return sign * std::ldexp(static_cast<float>(8 + man), exp - 10);    // (1 + man/8) · 2^(exp-7)
}

uint8_t float_to_e4m3(float f) {
  uint32_t x = bits_of(f);
  uint8_t sign = static_cast<uint8_t>((x >> 24) & 0x80u);
  uint32_t ax = x & 0x7FFFFFFFu;
  if (ax > 0x7F800000u) return 0x7F;
  float a = float_of(ax);
  if (a >= kE4m3Max) return static_cast<uint8_t>(sign | 0x7E);  // saturate (inf included)
  if (a < 0.015625f) {
    // below 2^-6: subnormal, quantum 2^-9; 8 · 2^-9 = 2^-6 is code 0x08, so a carry lands right
    return static_cast<uint8_t>(sign | static_cast<uint8_t>(std::nearbyint(a * 512.0f)));
  }
  uint32_t r = (ax + 0x7FFFFu + ((ax >> 20) & 1u)) >> 20;  // keep 3 mantissa bits, ties to even
  // r = float exponent (8 bits) << 3 | mantissa; e4m3 exponent = float exponent - 127 + 7
  return static_cast<uint8_t>(sign | (r - (120u << 3)));
}

float load_16(uint16_t bits, DType dtype) {
  return dtype == DType::BF16 ? bf16_to_float(bits) : half_to_float(bits);
}
uint16_t store_16(float x, DType dtype) { return dtype == DType::BF16 ? float_to_bf16(x) : float_to_half(x); }
float round_to(float x, DType dtype) {
  if (dtype == DType::BF16) return bf16_to_float(float_to_bf16(x));
  if (dtype == DType::F16) return half_to_float(float_to_half(x));
  return x;
}

// ---- INT8 quantization --------------------------------------------------------------------------------

int q_group(QKGranularity g, int64_t t) {
  switch (g) {
    case QKGranularity::PerBlock: return static_cast<int>(t / 128);
    case QKGranularity::PerWarp: return static_cast<int>(t / 16);
    case QKGranularity::PerThread: return static_cast<int>((t / 16) * 8 + t % 8);
  }
  return 0;
}

int k_group(QKGranularity g, int64_t t) {
  switch (g) {
    case QKGranularity::PerBlock:
    case QKGranularity::PerWarp: return static_cast<int>(t / 64);
    case QKGranularity::PerThread: return static_cast<int>((t / 64) * 8 + t % 8);
  }
  return 0;
}

int group_count(QKGranularity g, int64_t n, bool query) {
  if (n <= 0) return 0;
  int most = 0;
  // the largest group index is reached within the last 8 tokens
  for (int64_t t = std::max<int64_t>(0, n - 8); t < n; ++t) most = std::max(most, query ? q_group(g, t) : k_group(g, t));
  return most + 1;
}

int8_t quantize_value(float x, float step) {
  if (step == 0.0f) return 0;
  float r = std::nearbyint(x / step);
  if (!(r == r)) return 0;  // NaN
  r = std::min(127.0f, std::max(-127.0f, r));
  return static_cast<int8_t>(r);
}

float quantize_group(const float* x, std::size_t n, int8_t* q) {
  float amax = 0.0f;
  for (std::size_t i = 0; i < n; ++i) {
    float a = std::fabs(x[i]);
    if (a > amax) amax = a;
  }
  float step = amax / 127.0f;
  for (std::size_t i = 0; i < n; ++i) q[i] = quantize_value(x[i], step);
  return step;
}

QuantizedTokens quantize_tokens(const float* x, int64_t t0, int64_t n, int dim, bool query, QKGranularity g) {
  QuantizedTokens r;
  if (n <= 0) return r;
  auto group = [&](int64_t t) { return query ? q_group(g, t) : k_group(g, t); };
  r.first_group = group(t0);
  int last = group_count(g, t0 + n, query) - 1;
  std::vector<float> amax(static_cast<std::size_t>(last - r.first_group + 1), 0.0f);
  for (int64_t i = 0; i < n; ++i) {
    float& m = amax[static_cast<std::size_t>(group(t0 + i) - r.first_group)];
    const float* row = x + i * dim;
    for (int c = 0; c < dim; ++c) {
      float a = std::fabs(row[c]);
      if (a > m) m = a;
    }
  }
  r.steps.resize(amax.size());
  for (std::size_t gi = 0; gi < amax.size(); ++gi) r.steps[gi] = amax[gi] / 127.0f;
  r.values.resize(static_cast<std::size_t>(n) * dim);
  r.token_step.resize(static_cast<std::size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    float step = r.steps[static_cast<std::size_t>(group(t0 + i) - r.first_group)];
    r.token_step[static_cast<std::size_t>(i)] = step;
    for (int c = 0; c < dim; ++c)
      r.values[static_cast<std::size_t>(i * dim + c)] = quantize_value(x[i * dim + c], step);
  }
  return r;
}

// ---- the emulation ------------------------------------------------------------------------------------

namespace {

constexpr int BK = kKeyTile;

// What one (batch, kv head) needs, prepared once and shared by its query heads.
struct KvHead {
  std::vector<float> km;       // [D] mean of K over tokens (0 without smoothing)
  std::vector<float> kt;       // [tiles][D][BK]: k8 (as float, exact) or round(K - km); padded with 0
  std::vector<float> k_step;   // [tiles * BK]: INT8 step of each key's group (0 for padding)
  std::vector<float> v;        // [tiles * BK][D]: V (fp16 path) or the decoded e4m3 v8 (fp8 path); padded
  std::vector<float> v_scale;  // [D] (fp8 path)
};

void prepare_kv(const detail::AttentionProblem& p, int b, int kvh, KvHead& kv) {
  const int D = p.head_dim;
  const int64_t Nk = p.tokens_k;
  const int64_t tiles = (Nk + BK - 1) / BK;
  const std::size_t padded = static_cast<std::size_t>(tiles * BK);
  std::vector<float> k(static_cast<std::size_t>(Nk) * D);
  load_rows(p.k, b, kvh, 0, Nk, D, k.data());

  kv.km.assign(D, 0.0f);
  if (p.smooth_k) {
    for (int c = 0; c < D; ++c) {
      double sum = 0;  // the fp32 sum, computed exactly and rounded once
      for (int64_t j = 0; j < Nk; ++j) sum += k[static_cast<std::size_t>(j * D + c)];
      kv.km[c] = static_cast<float>(sum) / static_cast<float>(Nk);
    }
    for (int64_t j = 0; j < Nk; ++j)
      for (int c = 0; c < D; ++c) k[static_cast<std::size_t>(j * D + c)] -= kv.km[c];
  }

  kv.kt.assign(padded * D, 0.0f);
  kv.k_step.assign(padded, 0.0f);
  auto kt_at = [&](int64_t j, int c) -> float& {
    return kv.kt[static_cast<std::size_t>(((j / BK) * D + c) * BK + j % BK)];
  };
  if (p.qk_precision == QKPrecision::Int8) {
    QuantizedTokens qk = quantize_tokens(k.data(), 0, Nk, D, false, p.qk_granularity);
    for (int64_t j = 0; j < Nk; ++j) {
      kv.k_step[static_cast<std::size_t>(j)] = qk.token_step[static_cast<std::size_t>(j)];
      for (int c = 0; c < D; ++c) kt_at(j, c) = static_cast<float>(qk.values[static_cast<std::size_t>(j * D + c)]);
    }
  } else {
    for (int64_t j = 0; j < Nk; ++j)
      for (int c = 0; c < D; ++c) kt_at(j, c) = round_to(k[static_cast<std::size_t>(j * D + c)], p.k.dtype);
  }

  kv.v.assign(padded * D, 0.0f);
  load_rows(p.v, b, kvh, 0, Nk, D, kv.v.data());
  if (p.pv_precision == PVPrecision::Fp8) {
    kv.v_scale.assign(D, 0.0f);
    for (int c = 0; c < D; ++c) {
      float amax = 0.0f;
      for (int64_t j = 0; j < Nk; ++j) {
        float a = std::fabs(kv.v[static_cast<std::size_t>(j * D + c)]);
        if (a > amax) amax = a;
      }
      kv.v_scale[c] = amax / kE4m3Max;
    }
    for (int64_t j = 0; j < Nk; ++j)
      for (int c = 0; c < D; ++c) {
        float& x = kv.v[static_cast<std::size_t>(j * D + c)];
        x = kv.v_scale[c] == 0.0f ? 0.0f : e4m3_to_float(float_to_e4m3(x / kv.v_scale[c]));
      }
  }
}

void store_row(const detail::Operand& op, int b, int h, int64_t t, const float* x, int dim) {
  std::byte* base = host_data_mut(op);
  int64_t off = b * op.stride_batch + h * op.stride_head + t * op.stride_token;
  if (op.dtype == DType::F32) {
    std::memcpy(reinterpret_cast<float*>(base) + off, x, sizeof(float) * static_cast<std::size_t>(dim));
    return;
  }
  uint16_t* dst = reinterpret_cast<uint16_t*>(base) + off;
  for (int c = 0; c < dim; ++c) dst[c] = store_16(x[c], op.dtype);
}

void store_lse(const detail::Operand& op, int b, int h, int64_t t, float x) {
  float* base = reinterpret_cast<float*>(host_data_mut(op));
  base[b * op.stride_batch + h * op.stride_head + t * op.stride_token] = x;
}

// Rows r0 .. r0+n-1 of query head h (kv head kvh) of batch b.
void attend_rows(const detail::AttentionProblem& p, const KvHead& kv, int b, int h, int64_t r0, int64_t n) {
  const int D = p.head_dim;
  const int64_t Nq = p.tokens_q, Nk = p.tokens_k;
  const int64_t tiles = (Nk + BK - 1) / BK;
  const bool int8 = p.qk_precision == QKPrecision::Int8;
  const bool fp8 = p.pv_precision == PVPrecision::Fp8;
  const float scale_log2 = p.scale * kLog2e;
  const DType p_dtype = p.v.dtype;  // P is rounded to the input dtype on the FP16 path
  const std::size_t Ds = static_cast<std::size_t>(D);

  // Q rows: INT8 values (as float, exact) with their scale, or the input values.
  std::vector<float> q(static_cast<std::size_t>(n) * Ds), qs(static_cast<std::size_t>(n), scale_log2);
  load_rows(p.q, b, h, r0, n, D, q.data());
  std::vector<float> qkm(static_cast<std::size_t>(n), 0.0f);
  if (p.smooth_k && p.has_lse)
    for (int64_t i = 0; i < n; ++i) {
      float dot = 0.0f;
      for (int c = 0; c < D; ++c) dot += q[static_cast<std::size_t>(i) * Ds + c] * kv.km[c];
      qkm[static_cast<std::size_t>(i)] = dot;
    }
  if (int8) {
    QuantizedTokens qq = quantize_tokens(q.data(), r0, n, D, true, p.qk_granularity);
    for (std::size_t e = 0; e < q.size(); ++e) q[e] = static_cast<float>(qq.values[e]);
    for (int64_t i = 0; i < n; ++i)
      qs[static_cast<std::size_t>(i)] = qq.token_step[static_cast<std::size_t>(i)] * scale_log2;
  }

  // Visible keys: per mask query block touched, one byte per key (padded to whole tiles) and one per tile.
  const int bq = mask_block_q(p), bk = mask_block_k(p);
  const int qb0 = static_cast<int>(r0 / bq), qb1 = static_cast<int>((r0 + n - 1) / bq);
  const std::size_t padded = static_cast<std::size_t>(tiles * BK);
  std::vector<std::vector<uint8_t>> key_ok(static_cast<std::size_t>(qb1 - qb0 + 1));
  std::vector<std::vector<uint8_t>> tile_ok(key_ok.size());
  std::vector<uint8_t> allowed;
  for (int qb = qb0; qb <= qb1; ++qb) {
    mask_key_blocks(p, b, h, qb, allowed);
    auto& ko = key_ok[static_cast<std::size_t>(qb - qb0)];
    auto& to = tile_ok[static_cast<std::size_t>(qb - qb0)];
    ko.assign(padded, 0);
    to.assign(static_cast<std::size_t>(tiles), 0);
    for (int64_t j = 0; j < Nk; ++j)
      if (allowed[static_cast<std::size_t>(j / bk)]) {
        ko[static_cast<std::size_t>(j)] = 1;
        to[static_cast<std::size_t>(j / BK)] = 1;
      }
  }

  std::vector<float> m(static_cast<std::size_t>(n), kNegInf), l(static_cast<std::size_t>(n), 0.0f);
  std::vector<float> O(static_cast<std::size_t>(n) * Ds, 0.0f);
  // Rows are processed per 16-row group (a warp's rows): SpargeAttn stage 2 lets a group skip exp, row sum
  // and P·V of a tile when every row's tile max is more than λ (log2 units) below its running max.
  // Without pv_threshold nothing is skipped and every row computes exactly as it would alone.
  constexpr int kGroupRows = 16;
  const bool stage2 = !p.pv_threshold.empty();
  const float lambda = stage2 ? p.pv_threshold[static_cast<std::size_t>(h)] : 0.0f;
  int64_t pv_skipped = 0, pv_total = 0;
  float s_group[kGroupRows][BK], mx_group[kGroupRows], pr[BK];
  uint8_t vis_group[kGroupRows][BK];
  bool active[kGroupRows];
  std::vector<float> acc(Ds);

  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t j0 = t * BK;
    const float* ktile = kv.kt.data() + static_cast<std::size_t>(t) * Ds * BK;
    const float* kstep = kv.k_step.data() + j0;
    const float* vtile = kv.v.data() + static_cast<std::size_t>(j0) * Ds;
    for (int64_t g0 = 0; g0 < n; g0 += kGroupRows) {
      const int gn = static_cast<int>(std::min<int64_t>(kGroupRows, n - g0));
      for (int gi = 0; gi < gn; ++gi) {
        const int64_t i = g0 + gi;
        active[gi] = false;
        float* s = s_group[gi];
        uint8_t* vis = vis_group[gi];
        const int64_t row = r0 + i;
        const std::size_t qbl = static_cast<std::size_t>(row / bq - qb0);
        if (!tile_ok[qbl][static_cast<std::size_t>(t)]) continue;
        // the last key this row sees (bottom-right aligned causal), relative to the tile
        int64_t last = p.causal ? row + (Nk - Nq) : Nk - 1;
        last = std::min(last, Nk - 1);
        if (last < j0) continue;
        const int jn = static_cast<int>(std::min<int64_t>(BK, last - j0 + 1));
        const uint8_t* ko = key_ok[qbl].data() + j0;
        bool any = false;
        for (int jj = 0; jj < BK; ++jj) {
          vis[jj] = (jj < jn && ko[jj]) ? 1 : 0;
          any = any || vis[jj];
        }
        if (!any) continue;

        // logits in base-2 units
        for (int jj = 0; jj < BK; ++jj) s[jj] = 0.0f;
        const float* qi = q.data() + static_cast<std::size_t>(i) * Ds;
        for (int c = 0; c < D; ++c) {
          const float qc = qi[c];
          const float* kc = ktile + static_cast<std::size_t>(c) * BK;
          for (int jj = 0; jj < BK; ++jj) s[jj] += qc * kc[jj];
        }
        const float qscale = qs[static_cast<std::size_t>(i)];
        if (int8) {
          for (int jj = 0; jj < BK; ++jj) s[jj] = (s[jj] * qscale) * kstep[jj];
        } else {
          for (int jj = 0; jj < BK; ++jj) s[jj] = s[jj] * qscale;
        }
        float mx = kNegInf;
        for (int jj = 0; jj < BK; ++jj) {
          if (!vis[jj]) s[jj] = kNegInf;
          else if (s[jj] > mx) mx = s[jj];
        }
        mx_group[gi] = mx;
        active[gi] = true;
      }
      if (stage2) {
        bool visited = false, needed = false;
        for (int gi = 0; gi < gn; ++gi) {
          if (!active[gi]) continue;
          visited = true;
          if (!(mx_group[gi] < m[static_cast<std::size_t>(g0 + gi)] - lambda)) needed = true;
        }
        if (visited) ++pv_total;
        if (visited && !needed) {
          ++pv_skipped;
          continue;  // the running max stays: every tile max is below it
        }
      }
      for (int gi = 0; gi < gn; ++gi) {
        if (!active[gi]) continue;
        const int64_t i = g0 + gi;
        const float* s = s_group[gi];
        const uint8_t* vis = vis_group[gi];
        const float mx = mx_group[gi];
        float& mi = m[static_cast<std::size_t>(i)];
        const float m_new = std::max(mi, mx);
        if (m_new == kNegInf) continue;
        const float alpha = mi == kNegInf ? 0.0f : std::exp2(mi - m_new);
        float sum = 0.0f;
        for (int jj = 0; jj < BK; ++jj) {
          const float pj = vis[jj] ? std::exp2(s[jj] - m_new) : 0.0f;
          sum += pj;
          pr[jj] = fp8 ? e4m3_to_float(float_to_e4m3(pj * kE4m3Max)) : round_to(pj, p_dtype);
        }
        float& li = l[static_cast<std::size_t>(i)];
        li = li * alpha + sum;
        // tile(P·V), fp32 accumulation over the tile's keys (keys past Nk have V = 0 here)
        std::fill(acc.begin(), acc.end(), 0.0f);
        const int jend = static_cast<int>(std::min<int64_t>(BK, Nk - j0));
        for (int jj = 0; jj < jend; ++jj) {
          const float pj = pr[jj];
          const float* vj = vtile + static_cast<std::size_t>(jj) * Ds;
          for (int c = 0; c < D; ++c) acc[c] += pj * vj[c];
        }
        float* oi = O.data() + static_cast<std::size_t>(i) * Ds;
        for (int c = 0; c < D; ++c) oi[c] = oi[c] * alpha + acc[c];
        mi = m_new;
      }
    }
  }
  if (stage2 && p.stats) {
    static std::mutex stats_mutex;
    std::lock_guard<std::mutex> lock(stats_mutex);
    p.stats->pv_skipped += pv_skipped;
    p.stats->pv_total += pv_total;
  }

  std::vector<float> out(Ds);
  for (int64_t i = 0; i < n; ++i) {
    const float li = l[static_cast<std::size_t>(i)];
    const float* oi = O.data() + static_cast<std::size_t>(i) * Ds;
    if (li == 0.0f) {
      std::fill(out.begin(), out.end(), 0.0f);
    } else if (fp8) {
      for (int c = 0; c < D; ++c) out[c] = oi[c] * kv.v_scale[c] / (kE4m3Max * li);
    } else {
      for (int c = 0; c < D; ++c) out[c] = oi[c] / li;
    }
    store_row(p.out, b, h, r0 + i, out.data(), D);
    if (p.has_lse) {
      float lse = kNegInf;
      if (li != 0.0f) {
        lse = kLn2 * (m[static_cast<std::size_t>(i)] + std::log2(li));
        if (p.smooth_k) lse += p.scale * qkm[static_cast<std::size_t>(i)];
      }
      store_lse(p.lse, b, h, r0 + i, lse);
    }
  }
}

}  // namespace

void quantized_attention(const detail::AttentionProblem& p) {
  if (p.batch <= 0 || p.heads_q <= 0 || p.heads_kv <= 0 || p.tokens_q <= 0 || p.head_dim <= 0) return;
  const int group = p.kv_group();
  const int64_t chunks = (p.tokens_q + kQueryChunk - 1) / kQueryChunk;
  if (p.tokens_k <= 0) {
    // no keys at all: every row is empty
    std::vector<float> zero(static_cast<std::size_t>(p.head_dim), 0.0f);
    for (int b = 0; b < p.batch; ++b)
      for (int h = 0; h < p.heads_q; ++h)
        for (int64_t i = 0; i < p.tokens_q; ++i) {
          store_row(p.out, b, h, i, zero.data(), p.head_dim);
          if (p.has_lse) store_lse(p.lse, b, h, i, kNegInf);
        }
    return;
  }
  // Prepared kv heads take about 8·Nk·D bytes each: prepare a bounded number of them at a time.
  const std::size_t per_head = 8u * static_cast<std::size_t>(p.tokens_k + kKeyTile) * static_cast<std::size_t>(p.head_dim);
  const std::size_t budget = std::size_t(512) << 20;
  const int total_kv = p.batch * p.heads_kv;
  const int at_once = static_cast<int>(std::max<std::size_t>(1, std::min<std::size_t>(total_kv, budget / per_head)));
  for (int first = 0; first < total_kv; first += at_once) {
    const int count = std::min(at_once, total_kv - first);
    std::vector<KvHead> kv(static_cast<std::size_t>(count));
    parallel_for(static_cast<std::size_t>(count), [&](std::size_t e) {
      const int id = first + static_cast<int>(e);
      prepare_kv(p, id / p.heads_kv, id % p.heads_kv, kv[e]);
    });
    const std::size_t items = static_cast<std::size_t>(count) * group * chunks;
    parallel_for(items, [&](std::size_t w) {
      const int64_t chunk = static_cast<int64_t>(w % chunks);
      const int g = static_cast<int>((w / chunks) % group);
      const int e = static_cast<int>(w / chunks / group);
      const int id = first + e;
      const int b = id / p.heads_kv, kvh = id % p.heads_kv;
      const int64_t r0 = chunk * kQueryChunk;
      attend_rows(p, kv[static_cast<std::size_t>(e)], b, kvh * group + g, r0,
                  std::min<int64_t>(kQueryChunk, p.tokens_q - r0));
    });
  }
}

}  // namespace sparq::reference
