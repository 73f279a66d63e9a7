#include "harness.hpp"

#include "reference.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <sstream>

namespace sparq::test {

namespace {

// splitmix64: a small generator whose stream is the same with every standard library.
struct Rng {
  uint64_t state;
  explicit Rng(uint64_t seed) : state(seed * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull) {}
  uint64_t next() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform() { return static_cast<double>(next() >> 11) * (1.0 / 9007199254740992.0); }  // [0, 1)
  double normal() {
    double u1 = uniform(), u2 = uniform();
    if (u1 < 1e-300) u1 = 1e-300;
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }
  int integer(int lo, int hi) { return lo + static_cast<int>(next() % static_cast<uint64_t>(hi - lo + 1)); }
};

const char* name(Layout l) { return l == Layout::HND ? "HND" : "NHD"; }
const char* name(QKPrecision p) { return p == QKPrecision::Int8 ? "int8" : "fp16"; }
const char* name(QKGranularity g) {
  switch (g) {
    case QKGranularity::PerBlock: return "per-block";
    case QKGranularity::PerWarp: return "per-warp";
    case QKGranularity::PerThread: return "per-thread";
  }
  return "?";
}
const char* name(PVPrecision p) {
  switch (p) {
    case PVPrecision::Auto: return "auto";
    case PVPrecision::Fp16: return "fp16";
    case PVPrecision::Fp8: return "fp8";
  }
  return "?";
}
const char* name(MaskKind m) {
  switch (m) {
    case MaskKind::None: return "none";
    case MaskKind::Bitmap: return "bitmap";
    case MaskKind::Lut: return "lut";
  }
  return "?";
}

uint16_t encode(float x, DType dtype) {
  return dtype == DType::BF16 ? reference::float_to_bf16(x) : reference::float_to_half(x);
}

// The shape of q (query) or k/v in the case's layout, optionally with padded rows.
std::vector<int64_t> shape_of(const Case& c, bool query) {
  int64_t H = query ? c.Hq : c.Hkv, N = query ? c.Nq : c.Nk;
  if (c.layout == Layout::HND) return {c.B, H, N, c.D};
  return {c.B, N, H, c.D};
}

// Strides (elements) of a contiguous buffer of `shape` whose last dimension is padded to `row`.
std::vector<int64_t> padded_strides(const std::vector<int64_t>& shape, int64_t row) {
  return {shape[1] * shape[2] * row, shape[2] * row, row, 1};
}

// Canonical [b, h, t, channel] strides of a contiguous host buffer in the case's layout.
void canonical_strides(const Case& c, bool query, int64_t& sb, int64_t& sh, int64_t& st) {
  int64_t H = query ? c.Hq : c.Hkv, N = query ? c.Nq : c.Nk;
  if (c.layout == Layout::HND) {
    sb = H * N * c.D, sh = N * c.D, st = c.D;
  } else {
    sb = N * H * c.D, sh = c.D, st = H * c.D;
  }
}

struct HostProblem {
  detail::AttentionProblem p;
  std::vector<std::unique_ptr<detail::HostStorage>> storages;

  detail::Operand wrap(const void* data, std::size_t bytes, DType dtype) {
    auto s = std::make_unique<detail::HostStorage>();
    s->data = static_cast<std::byte*>(const_cast<void*>(data));
    s->bytes = bytes;
    s->owned = false;
    detail::Operand op;
    op.storage = s.get();
    op.dtype = dtype;
    storages.push_back(std::move(s));
    return op;
  }
};

// An AttentionProblem over the Inputs' host vectors (read only); out and lse are set by the caller.
void build_problem(const Case& c, const Inputs& in, HostProblem& hp) {
  detail::AttentionProblem& p = hp.p;
  p.batch = c.B, p.heads_q = c.Hq, p.heads_kv = c.Hkv, p.tokens_q = c.Nq, p.tokens_k = c.Nk, p.head_dim = c.D;
  p.q = hp.wrap(in.q.data(), in.q.size() * 2, c.dtype);
  p.k = hp.wrap(in.k.data(), in.k.size() * 2, c.dtype);
  p.v = hp.wrap(in.v.data(), in.v.size() * 2, c.dtype);
  canonical_strides(c, true, p.q.stride_batch, p.q.stride_head, p.q.stride_token);
  canonical_strides(c, false, p.k.stride_batch, p.k.stride_head, p.k.stride_token);
  canonical_strides(c, false, p.v.stride_batch, p.v.stride_head, p.v.stride_token);
  p.causal = c.causal;
  p.scale = c.resolved_scale();
  p.smooth_k = c.smooth_k;
  p.qk_precision = c.qk_precision;
  p.qk_granularity = c.qk_granularity;
  p.pv_precision = c.pv_precision == PVPrecision::Fp8 ? PVPrecision::Fp8 : PVPrecision::Fp16;
  if (c.mask != MaskKind::None) {
    p.mask_block_q = c.block_q, p.mask_block_k = c.block_k;
    p.mask_blocks_q = in.nqb, p.mask_blocks_k = in.nkb;
    if (c.mask == MaskKind::Bitmap) {
      p.mask_layout = detail::MaskLayout::Bitmap;
      p.mask_heads = c.mask_heads;
      p.mask_bitmap = hp.wrap(in.bitmap.data(), in.bitmap.size(), DType::U8);
    } else {
      p.mask_layout = detail::MaskLayout::Lut;
      p.mask_heads = c.Hq;
      p.mask_counts = hp.wrap(in.lut_counts.data(), in.lut_counts.size() * 4, DType::I32);
      p.mask_indices = hp.wrap(in.lut_indices.data(), in.lut_indices.size() * 4, DType::I32);
    }
  }
}

template <class T>
Accuracy compare_impl(const std::vector<float>& got, const std::vector<T>& ref) {
  Accuracy a;
  if (got.size() != ref.size()) {
    a.rel_l1 = a.max_abs = std::numeric_limits<double>::quiet_NaN();
    a.cosine = std::numeric_limits<double>::quiet_NaN();
    return a;
  }
  double diff = 0, norm = 0, dot = 0, gg = 0, rr = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    double g = got[i], r = static_cast<double>(ref[i]);
    double d = std::fabs(g - r);
    diff += d;
    norm += std::fabs(r);
    dot += g * r;
    gg += g * g;
    rr += r * r;
    if (!(d <= a.max_abs)) a.max_abs = d;  // NaN sticks
  }
  a.rel_l1 = norm > 0 ? diff / norm : diff;
  if (gg == 0 && rr == 0) a.cosine = 1;
  else if (gg == 0 || rr == 0) a.cosine = 0;
  else a.cosine = dot / std::sqrt(gg * rr);
  return a;
}

template <class T>
LseDiff compare_lse_impl(const std::vector<float>& got, const std::vector<T>& ref) {
  LseDiff d;
  if (got.size() != ref.size()) {
    d.inf_mismatch = std::max(got.size(), ref.size());
    return d;
  }
  for (std::size_t i = 0; i < got.size(); ++i) {
    double g = got[i], r = static_cast<double>(ref[i]);
    if (std::isnan(g)) {
      if (!std::isnan(r)) ++d.nan;
      continue;
    }
    if (std::isinf(g) || std::isinf(r)) {
      if (g != r) ++d.inf_mismatch;
      continue;
    }
    d.max_abs = std::max(d.max_abs, std::fabs(g - r));
    const float rf = std::fabs(static_cast<float>(r));
    d.max_ulps = std::max(d.max_ulps, std::fabs(g - r) / (std::nextafter(rf, INFINITY) - rf));
  }
  return d;
}

}  // namespace

std::string Case::describe() const {
  std::ostringstream s;
  s << "B=" << B << " Hq=" << Hq << " Hkv=" << Hkv << " Nq=" << Nq << " Nk=" << Nk << " D=" << D << ' '
    << name(layout) << ' ' << to_string(dtype) << (causal ? " causal" : "") << " scale=" << resolved_scale()
    << (smooth_k ? " smooth_k" : " no-smooth") << " qk=" << name(qk_precision);
  if (qk_precision == QKPrecision::Int8) s << '(' << name(qk_granularity) << ')';
  s << " pv=" << name(pv_precision);
  if (mask != MaskKind::None)
    s << " mask=" << name(mask) << ' ' << block_q << 'x' << block_k << " density=" << density
      << " Hm=" << mask_heads << (empty_rows ? " empty-rows" : "");
  s << (want_lse ? " lse" : "") << " seed=" << seed << " mag=" << magnitude << " vmag=" << v_magnitude
    << " kbias=" << k_bias;
  if (integer_inputs) s << " integer";
  if (outliers > 0) s << " outliers=" << outliers;
  if (row_pad > 0) s << " row_pad=" << row_pad;
  return s.str();
}

float Case::resolved_scale() const {
  return scale != 0.0f ? scale : 1.0f / std::sqrt(static_cast<float>(D));  // as the runtime resolves it
}

std::size_t input_index(const Case& c, bool query, int b, int h, int t, int ch) {
  int64_t sb, sh, st;
  canonical_strides(c, query, sb, sh, st);
  return static_cast<std::size_t>(b * sb + h * sh + t * st + ch);
}

float input_value(const Case& c, const std::vector<uint16_t>& data, bool query, int b, int h, int t, int ch) {
  return reference::load_16(data[input_index(c, query, b, h, t, ch)], c.dtype);
}

void set_input_value(const Case& c, std::vector<uint16_t>& data, bool query, int b, int h, int t, int ch, float x) {
  data[input_index(c, query, b, h, t, ch)] = encode(x, c.dtype);
}

Inputs make_inputs(const Case& c) {
  Inputs in;
  Rng rng(c.seed);
  const double limit = c.dtype == DType::F16 ? 60000.0 : 1e38;
  auto clampv = [&](double x) { return static_cast<float>(std::max(-limit, std::min(limit, x))); };
  auto fill = [&](std::vector<uint16_t>& data, bool query, bool is_v) {
    const int H = query ? c.Hq : c.Hkv, N = query ? c.Nq : c.Nk;
    data.assign(static_cast<std::size_t>(c.B) * H * N * c.D, 0);
    std::vector<double> bias(static_cast<std::size_t>(c.D), 0.0);
    for (int b = 0; b < c.B; ++b)
      for (int h = 0; h < H; ++h) {
        bool is_k = !query && !is_v;
        for (int ch = 0; ch < c.D; ++ch)
          bias[static_cast<std::size_t>(ch)] = (is_k && !c.integer_inputs) ? c.magnitude * c.k_bias * rng.normal() : 0.0;
        for (int t = 0; t < N; ++t) {
          if (c.integer_inputs && !is_v) {
            for (int ch = 0; ch < c.D; ++ch) set_input_value(c, data, query, b, h, t, ch, static_cast<float>(rng.integer(-127, 127)));
            int big = rng.integer(0, c.D - 1);
            set_input_value(c, data, query, b, h, t, big, (rng.next() & 1) ? 127.0f : -127.0f);
            continue;
          }
          double factor = 1.0;
          if (!is_v && c.outliers > 0 && rng.integer(0, 15) == 0) factor = c.outliers;
          for (int ch = 0; ch < c.D; ++ch) {
            double x = is_v ? c.v_magnitude * rng.normal()
                            : factor * c.magnitude * rng.normal() + bias[static_cast<std::size_t>(ch)];
            set_input_value(c, data, query, b, h, t, ch, clampv(x));
          }
        }
      }
  };
  fill(in.q, true, false);
  fill(in.k, false, false);
  fill(in.v, false, true);

  if (c.mask != MaskKind::None) {
    in.nqb = (c.Nq + c.block_q - 1) / c.block_q;
    in.nkb = (c.Nk + c.block_k - 1) / c.block_k;
    const int Hm = c.mask_heads;
    in.bitmap.assign(static_cast<std::size_t>(c.B) * Hm * in.nqb * in.nkb, 0);
    for (int b = 0; b < c.B; ++b)
      for (int hm = 0; hm < Hm; ++hm)
        for (int qb = 0; qb < in.nqb; ++qb) {
          uint8_t* row = in.bitmap.data() + ((static_cast<std::size_t>(b) * Hm + hm) * in.nqb + qb) * in.nkb;
          bool empty = c.empty_rows && (qb + b + hm) % 3 == 1;
          int count = 0;
          for (int kb = 0; kb < in.nkb; ++kb) {
            row[kb] = rng.uniform() < c.density ? 1 : 0;
            count += row[kb];
          }
          if (empty) std::fill(row, row + in.nkb, 0);
          else if (count == 0) row[rng.integer(0, in.nkb - 1)] = 1;
        }
    in.lut_counts.assign(static_cast<std::size_t>(c.B) * c.Hq * in.nqb, 0);
    in.lut_indices.assign(static_cast<std::size_t>(c.B) * c.Hq * in.nqb * in.nkb, 0);
    for (int b = 0; b < c.B; ++b)
      for (int h = 0; h < c.Hq; ++h) {
        int hm = h / (c.Hq / Hm);
        for (int qb = 0; qb < in.nqb; ++qb) {
          const uint8_t* row = in.bitmap.data() + ((static_cast<std::size_t>(b) * Hm + hm) * in.nqb + qb) * in.nkb;
          std::size_t lrow = (static_cast<std::size_t>(b) * c.Hq + h) * in.nqb + qb;
          int n = 0;
          for (int kb = 0; kb < in.nkb; ++kb)
            if (row[kb]) in.lut_indices[lrow * in.nkb + n++] = kb;
          in.lut_counts[lrow] = n;
        }
      }
  }
  return in;
}

Result run_case(Context& ctx, const Case& c, const Inputs& in) {
  auto upload = [&](const std::vector<int64_t>& shape, const void* data) {
    if (c.row_pad <= 0) return ctx.from_host(c.dtype, shape, data);
    const int64_t row = c.D + c.row_pad;
    Tensor backing = ctx.empty(c.dtype, {shape[0], shape[1], shape[2], row});
    Tensor t = backing.view(shape, padded_strides(shape, row));
    ctx.from_host(t, data);
    return t;
  };
  const std::vector<int64_t> qshape = shape_of(c, true), kshape = shape_of(c, false);
  Tensor q = upload(qshape, in.q.data());
  Tensor k = upload(kshape, in.k.data());
  Tensor v = upload(kshape, in.v.data());
  Tensor out;
  if (c.row_pad <= 0) {
    out = ctx.empty(c.dtype, qshape);
  } else {
    const int64_t row = c.D + c.row_pad;
    out = ctx.empty(c.dtype, {qshape[0], qshape[1], qshape[2], row}).view(qshape, padded_strides(qshape, row));
  }
  Tensor lse;
  if (c.want_lse) lse = ctx.empty(DType::F32, {c.B, c.Hq, c.Nq});

  BlockMask mask;
  if (c.mask == MaskKind::Bitmap) {
    Tensor bits = ctx.from_host(DType::U8, {c.B, c.mask_heads, in.nqb, in.nkb}, in.bitmap.data());
    mask = BlockMask::from_bitmap(bits, c.block_q, c.block_k);
  } else if (c.mask == MaskKind::Lut) {
    Tensor counts = ctx.from_host(DType::I32, {c.B, c.Hq, in.nqb}, in.lut_counts.data());
    Tensor indices = ctx.from_host(DType::I32, {c.B, c.Hq, in.nqb, in.nkb}, in.lut_indices.data());
    mask = BlockMask::from_lut(counts, indices, c.block_q, c.block_k);
  }

  AttentionOptions opt;
  opt.layout = c.layout;
  opt.causal = c.causal;
  opt.scale = c.scale;
  opt.smooth_k = c.smooth_k;
  opt.qk_precision = c.qk_precision;
  opt.qk_granularity = c.qk_granularity;
  opt.pv_precision = c.pv_precision;
  attention(ctx, q, k, v, out, opt, c.mask == MaskKind::None ? nullptr : &mask, c.want_lse ? &lse : nullptr);
  ctx.synchronize();

  std::vector<uint16_t> raw(static_cast<std::size_t>(out.numel()));
  ctx.to_host(out, raw.data());
  Result r;
  r.out.resize(raw.size());
  for (int b = 0; b < c.B; ++b)
    for (int h = 0; h < c.Hq; ++h)
      for (int t = 0; t < c.Nq; ++t)
        for (int ch = 0; ch < c.D; ++ch)
          r.out[((static_cast<std::size_t>(b) * c.Hq + h) * c.Nq + t) * c.D + ch] =
              reference::load_16(raw[input_index(c, true, b, h, t, ch)], c.dtype);
  if (c.want_lse) {
    r.lse.resize(static_cast<std::size_t>(lse.numel()));
    ctx.to_host(lse, r.lse.data());
  }
  return r;
}

Result emulate(const Case& c, const Inputs& in) {
  HostProblem hp;
  build_problem(c, in, hp);
  std::vector<uint16_t> out(in.q.size(), 0);
  Result r;
  if (c.want_lse) r.lse.assign(static_cast<std::size_t>(c.B) * c.Hq * c.Nq, 0.0f);
  hp.p.out = hp.wrap(out.data(), out.size() * 2, c.dtype);
  canonical_strides(c, true, hp.p.out.stride_batch, hp.p.out.stride_head, hp.p.out.stride_token);
  if (c.want_lse) {
    hp.p.has_lse = true;
    hp.p.lse = hp.wrap(r.lse.data(), r.lse.size() * 4, DType::F32);
    hp.p.lse.stride_batch = static_cast<int64_t>(c.Hq) * c.Nq;
    hp.p.lse.stride_head = c.Nq;
    hp.p.lse.stride_token = 1;
  }
  reference::quantized_attention(hp.p);
  r.out.resize(out.size());
  for (int b = 0; b < c.B; ++b)
    for (int h = 0; h < c.Hq; ++h)
      for (int t = 0; t < c.Nq; ++t)
        for (int ch = 0; ch < c.D; ++ch)
          r.out[((static_cast<std::size_t>(b) * c.Hq + h) * c.Nq + t) * c.D + ch] =
              reference::load_16(out[input_index(c, true, b, h, t, ch)], c.dtype);
  return r;
}

Exact exact(const Case& c, const Inputs& in) {
  HostProblem hp;
  build_problem(c, in, hp);
  Exact e;
  reference::exact_attention(hp.p, e.out, &e.lse);
  return e;
}

std::vector<double> round_output(const std::vector<double>& exact_out, DType dtype) {
  std::vector<double> r(exact_out.size());
  for (std::size_t i = 0; i < r.size(); ++i) r[i] = reference::round_to(static_cast<float>(exact_out[i]), dtype);
  return r;
}

std::string Accuracy::describe() const {
  std::ostringstream s;
  s << "rel_l1=" << rel_l1 << " cos=" << cosine << " max_abs=" << max_abs;
  return s.str();
}

Accuracy compare(const std::vector<float>& got, const std::vector<double>& ref) { return compare_impl(got, ref); }
Accuracy compare(const std::vector<float>& got, const std::vector<float>& ref) { return compare_impl(got, ref); }

Budget budget(QKPrecision qk, PVPrecision pv) {
  if (pv == PVPrecision::Fp8) return {0.03, 0.9995};
  if (qk == QKPrecision::Int8) return {0.015, 0.9999};
  return {0.001, 0.99999};
}

Budget contract_bound(const Case& c) {
  if (c.pv_precision == PVPrecision::Fp8) return {0.05, 0.999};
  if (c.dtype == DType::BF16 && c.qk_precision == QKPrecision::Fp16) return {0.004, 0.99999};
  return budget(c.qk_precision, c.pv_precision);
}

bool within(const Accuracy& a, const Budget& b) { return a.rel_l1 <= b.rel_l1 && a.cosine >= b.cosine; }

std::string LseDiff::describe() const {
  std::ostringstream s;
  s << "lse max_abs=" << max_abs << " max_ulps=" << max_ulps << " inf_mismatch=" << inf_mismatch << " nan=" << nan;
  return s.str();
}

LseDiff compare_lse(const std::vector<float>& got, const std::vector<double>& ref) {
  return compare_lse_impl(got, ref);
}
LseDiff compare_lse(const std::vector<float>& got, const std::vector<float>& ref) {
  return compare_lse_impl(got, ref);
}

bool all_finite(const std::vector<float>& x) {
  return std::all_of(x.begin(), x.end(), [](float v) { return std::isfinite(v); });
}

bool bitwise_equal(const std::vector<float>& a, const std::vector<float>& b, std::size_t* first_diff) {
  if (a.size() != b.size()) {
    if (first_diff) *first_diff = std::min(a.size(), b.size());
    return false;
  }
  for (std::size_t i = 0; i < a.size(); ++i)
    if (std::memcmp(&a[i], &b[i], sizeof(float)) != 0) {
      if (first_diff) *first_diff = i;
      return false;
    }
  return true;
}

std::vector<Case> odd_size_cases(const Case& base) {
  struct Size {
    int nq, nk, B, Hq, Hkv;
  };
  const Size sizes[] = {
      {1, 1, 2, 4, 2},      {17, 17, 2, 4, 2},   {1000, 1000, 1, 2, 1}, {4097, 4097, 1, 1, 1},
      {1, 1000, 1, 2, 2},   {17, 4097, 1, 2, 1}, {1000, 17, 1, 2, 1},
  };
  std::vector<Case> cases;
  for (const Size& s : sizes) {
    Case c = base;
    c.Nq = s.nq, c.Nk = s.nk, c.B = s.B, c.Hq = s.Hq, c.Hkv = s.Hkv;
    if (c.mask_heads != 1) c.mask_heads = c.Hq;
    cases.push_back(c);
  }
  return cases;
}

namespace {
void set_env(const std::string& name, const char* value) {
#ifdef _WIN32
  _putenv_s(name.c_str(), value ? value : "");  // an empty value removes the variable
#else
  if (value) setenv(name.c_str(), value, 1);
  else unsetenv(name.c_str());
#endif
}
}  // namespace

ScopedEnv::ScopedEnv(const char* name, const char* value) : name_(name) {
  const char* before = std::getenv(name);
  had_ = before != nullptr;
  if (had_) saved_ = before;
  set(value);
}

ScopedEnv::~ScopedEnv() { set_env(name_, had_ ? saved_.c_str() : nullptr); }

void ScopedEnv::set(const char* value) { set_env(name_, value); }

}  // namespace sparq::test
