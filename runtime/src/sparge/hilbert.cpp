// Generalized Hilbert curves over grids of any size (2-D and 3-D), and token permutation with them.
//
// The construction is the generalized ("gilbert") recursion: a box is described by a corner and two (2-D) or
// three (3-D) axis vectors; the curve enters at the corner and leaves at the far end of the first (major)
// axis. A box is split in halves along its long axis (or in an L/U shape of sub-boxes) and each part is
// walked recursively with axes chosen so that every part ends next to where the next one starts. Where the
// halves would have an odd length, the split point moves by one so that the parts stay traversable without
// diagonal steps.
#include "sparge_internal.hpp"

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <memory>

namespace sparq {
namespace {

struct V3 {
  int x = 0, y = 0, z = 0;
};
V3 operator+(V3 a, V3 b) { return {a.x + b.x, a.y + b.y, a.z + b.z}; }
V3 operator-(V3 a, V3 b) { return {a.x - b.x, a.y - b.y, a.z - b.z}; }
V3 operator-(V3 a) { return {-a.x, -a.y, -a.z}; }
int sgn(int v) { return (v > 0) - (v < 0); }
V3 sgn(V3 a) { return {sgn(a.x), sgn(a.y), sgn(a.z)}; }
V3 half(V3 a) { return {a.x / 2, a.y / 2, a.z / 2}; }  // truncation toward 0, as the axes are signed
int len(V3 a) { return std::abs(a.x + a.y + a.z); }     // an axis vector has one nonzero component

struct Box {
  V3 p, a, b, c;
};
struct Split {
  std::vector<Box> parts;
};

// A walk from the corner p to p + a - sign(a) through every cell with unit steps exists only if the box is
// non-empty and, when it has an even number of cells, its major axis has an even length (colour the cells
// like a chessboard: the two ends must differ in colour exactly when the cell count is even).
bool feasible(const Box& bx) {
  const int64_t wa = len(bx.a), hb = len(bx.b), dc = len(bx.c);
  if (wa == 0 || hb == 0 || dc == 0) return false;
  const int64_t cells = wa * hb * dc;
  if (cells == 1) return true;
  if (wa == 1) return false;
  return cells % 2 == 1 || wa % 2 == 0;
}

class Walker {
 public:
  Walker(int w, int h, int d, std::vector<int64_t>& out) : w_(w), h_(h), out_(out) { (void)d; }
  void emit(V3 p) { out_.push_back((static_cast<int64_t>(p.z) * h_ + p.y) * w_ + p.x); }

  void line(V3 p, V3 step, int n) {
    for (int i = 0; i < n; ++i, p = p + step) emit(p);
  }

  // 2-D box at p with major axis a and minor axis b (the third component stays constant).
  void box2(V3 p, V3 a, V3 b) {
    const int wa = len(a), hb = len(b);
    const V3 da = sgn(a), db = sgn(b);
    if (hb == 1) return line(p, da, wa);
    if (wa == 1) return line(p, db, hb);
    V3 a2 = half(a), b2 = half(b);
    if (2 * wa > 3 * hb) {
      // long box: two halves along a
      if ((len(a2) & 1) && wa > 2) a2 = a2 + da;
      box2(p, a2, b);
      box2(p + a2, a - a2, b);
      return;
    }
    // a U of three parts: up the first half of b, across along a, back down
    if ((len(b2) & 1) && hb > 2) b2 = b2 + db;
    box2(p, b2, a2);
    box2(p + b2, a, b - b2);
    box2(p + (a - da) + (b2 - db), -b2, -(a - a2));
  }

  // 3-D box at p with axes a (major: the curve ends at its far end), b, c.
  void box3(V3 p, V3 a, V3 b, V3 c) {
    const int wa = len(a), hb = len(b), dc = len(c);
    const V3 da = sgn(a), db = sgn(b), dcv = sgn(c);
    if (hb == 1 && dc == 1) return line(p, da, wa);
    if (wa == 1 && dc == 1) return line(p, db, hb);
    if (wa == 1 && hb == 1) return line(p, dcv, dc);
    // flat boxes are 2-D problems
    if (dc == 1) return box2(p, a, b);
    if (hb == 1) return box2(p, a, c);
    V3 a2 = half(a), b2 = half(b), c2 = half(c);
    if ((len(a2) & 1) && wa > 2) a2 = a2 + da;
    if ((len(b2) & 1) && hb > 2) b2 = b2 + db;
    if ((len(c2) & 1) && dc > 2) c2 = c2 + dcv;
    // The ways to cut the box, each a list of sub-boxes walked in turn (every one ends next to where the
    // next begins). The shape picks the preferred cut; a cut is used only if each of its parts can be walked
    // without a diagonal step (see feasible()), else the next one that can.
    const Split halves{{{p, a2, b, c}, {p + a2, a - a2, b, c}}};
    const Split u_b{{{p, b2, c, a2}, {p + b2, a, b - b2, c}, {p + (a - da) + (b2 - db), -b2, c, -(a - a2)}}};
    const Split u_c{{{p, c2, a2, b}, {p + c2, a, b, c - c2}, {p + (a - da) + (c2 - dcv), -c2, -(a - a2), b}}};
    const Split all_b{{{p, b2, c2, a2},
                       {p + b2, c, a2, b - b2},
                       {p + (b2 - db) + (c - dcv), a, -b2, -(c - c2)},
                       {p + (a - da) + b2 + (c - dcv), -c, -(a - a2), b - b2},
                       {p + (a - da) + (b2 - db), -b2, c2, -(a - a2)}}};
    const Split all_c{{{p, c2, b2, a2},
                       {p + c2, b, a2, c - c2},
                       {p + (c2 - dcv) + (b - db), a, -c2, -(b - b2)},
                       {p + (a - da) + c2 + (b - db), -b, -(a - a2), c - c2},
                       {p + (a - da) + (c2 - dcv), -c2, b2, -(a - a2)}}};
    using Prefs = std::array<const Split*, 5>;
    const Prefs prefs = 2 * wa > 3 * hb && 2 * wa > 3 * dc ? Prefs{&halves, &all_b, &all_c, &u_b, &u_c}
                        : 3 * hb > 4 * dc                  ? Prefs{&u_b, &all_b, &all_c, &halves, &u_c}
                        : 3 * dc > 4 * hb                  ? Prefs{&u_c, &all_c, &all_b, &halves, &u_b}
                                                           : Prefs{&all_b, &all_c, &halves, &u_b, &u_c};
    const Split* chosen = prefs.front();
    for (const Split* sp : prefs)
      if (std::all_of(sp->parts.begin(), sp->parts.end(), [](const Box& bx) { return feasible(bx); })) {
        chosen = sp;
        break;
      }
    for (const Box& bx : chosen->parts) box3(bx.p, bx.a, bx.b, bx.c);
  }

 private:
  int w_, h_;
  std::vector<int64_t>& out_;
};

void check_dims(int t, int h, int w) {
  if (t <= 0 || h <= 0 || w <= 0)
    sparge::bad("hilbert_order", "grid " + std::to_string(t) + "x" + std::to_string(h) + "x" + std::to_string(w) +
                                     " must have positive sizes");
  if (static_cast<int64_t>(t) * h * w > (int64_t{1} << 40))
    sparge::bad("hilbert_order", "grid " + std::to_string(t) + "x" + std::to_string(h) + "x" + std::to_string(w) +
                                     " is too large");
}

}  // namespace

std::vector<int64_t> hilbert_order(int h, int w) {
  check_dims(1, h, w);
  std::vector<int64_t> out;
  out.reserve(static_cast<std::size_t>(h) * w);
  Walker walker(w, h, 1, out);
  // The curve runs from a corner to the far end of its major axis. Such a path without diagonal steps exists
  // unless the grid has an even number of cells and the major axis an odd length: prefer an even major axis
  // then, otherwise the longer one.
  bool along_w = w >= h;
  if ((static_cast<int64_t>(w) * h) % 2 == 0 && (along_w ? w : h) % 2 == 1) along_w = !along_w;
  if (along_w) walker.box2({0, 0, 0}, {w, 0, 0}, {0, h, 0});
  else walker.box2({0, 0, 0}, {0, h, 0}, {w, 0, 0});
  return out;
}

std::vector<int64_t> hilbert_order(int t, int h, int w) {
  check_dims(t, h, w);
  if (t == 1) return hilbert_order(h, w);
  std::vector<int64_t> out;
  out.reserve(static_cast<std::size_t>(t) * h * w);
  Walker walker(w, h, t, out);
  // Major axis: the longest, preferring an even length when the cell count is even (see the 2-D case).
  const int sizes[3] = {w, h, t};
  const bool even_cells = (static_cast<int64_t>(t) * h * w) % 2 == 0;
  int major = 0;
  for (int i = 1; i < 3; ++i) {
    const bool better_parity = even_cells && (sizes[i] % 2 == 0) && (sizes[major] % 2 == 1);
    const bool worse_parity = even_cells && (sizes[i] % 2 == 1) && (sizes[major] % 2 == 0);
    if (better_parity || (!worse_parity && sizes[i] > sizes[major])) major = i;
  }
  const V3 axes[3] = {{w, 0, 0}, {0, h, 0}, {0, 0, t}};
  const V3 a = axes[major], b = axes[(major + 1) % 3], c = axes[(major + 2) % 3];
  walker.box3({0, 0, 0}, a, b, c);
  return out;
}

std::vector<int64_t> hilbert_order(const TokenGrid& grid) { return hilbert_order(grid.t, grid.h, grid.w); }

std::vector<int64_t> inverse_permutation(const std::vector<int64_t>& order) {
  const int64_t n = static_cast<int64_t>(order.size());
  std::vector<int64_t> inv(order.size(), -1);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t o = order[static_cast<std::size_t>(i)];
    if (o < 0 || o >= n || inv[static_cast<std::size_t>(o)] != -1)
      sparge::bad("inverse_permutation", "the order is not a permutation of 0.." + std::to_string(n - 1) +
                                              " (entry " + std::to_string(i) + " is " + std::to_string(o) + ")");
    inv[static_cast<std::size_t>(o)] = i;
  }
  return inv;
}

namespace sparge {
namespace {

// The per-context state behind grid_order() and scratch().
struct Cache : detail::RuntimeCache {
  // Most recently used first. A model sees few grids (one per resolution); 8 covers alternating between them.
  static constexpr std::size_t kGrids = 8;
  std::vector<std::shared_ptr<const GridOrder>> grids;
  std::array<Tensor, 7> slots;  // indexed by Scratch
  static_assert(static_cast<std::size_t>(Scratch::Indices) + 1 == 7, "one slot per Scratch");
};

Cache& cache_of(Context& ctx) {
  auto& c = ctx.impl().runtime_cache;
  if (!c) c = std::make_unique<Cache>();
  auto* mine = dynamic_cast<Cache*>(c.get());
  if (!mine) detail::fail(Status::Internal, "sparge: the context's runtime cache holds something else");
  return *mine;
}

// Through host memory: for backends without a device permutation and for rows that are not contiguous.
void permute_on_host(Context& ctx, const Tensor& src, Tensor& dst, const std::vector<int64_t>& order, Layout layout) {
  const auto& s = src.shape();
  const int64_t tokens = layout == Layout::HND ? s[2] : s[1];
  const std::size_t elem = dtype_size(src.dtype());
  std::vector<std::byte> in(static_cast<std::size_t>(src.numel()) * elem), out(in.size());
  ctx.to_host(src, in.data());
  // contiguous host copy: token stride and the number of outer "slices" depend on the layout
  const int64_t B = s[0];
  const int64_t inner = layout == Layout::HND ? s[3] : s[2] * s[3];  // elements per token in one slice
  const int64_t outer = layout == Layout::HND ? B * s[1] : B;
  const std::size_t token_bytes = static_cast<std::size_t>(inner) * elem;
  for (int64_t o = 0; o < outer; ++o) {
    const std::byte* from = in.data() + static_cast<std::size_t>(o * tokens) * token_bytes;
    std::byte* to = out.data() + static_cast<std::size_t>(o * tokens) * token_bytes;
    for (int64_t i = 0; i < tokens; ++i) {
      const int64_t j = i < static_cast<int64_t>(order.size()) ? order[static_cast<std::size_t>(i)] : i;
      std::memcpy(to + static_cast<std::size_t>(i) * token_bytes, from + static_cast<std::size_t>(j) * token_bytes,
                  token_bytes);
    }
  }
  ctx.from_host(dst, out.data());
}

}  // namespace

std::shared_ptr<const GridOrder> grid_order(Context& ctx, const TokenGrid& grid) {
  Cache& c = cache_of(ctx);
  for (std::size_t i = 0; i < c.grids.size(); ++i) {
    const GridOrder& g = *c.grids[i];
    if (g.grid.t == grid.t && g.grid.h == grid.h && g.grid.w == grid.w) {
      std::rotate(c.grids.begin(), c.grids.begin() + static_cast<std::ptrdiff_t>(i),
                  c.grids.begin() + static_cast<std::ptrdiff_t>(i) + 1);
      return c.grids.front();
    }
  }
  auto g = std::make_shared<GridOrder>();
  g->grid = grid;
  g->order = hilbert_order(grid);
  g->inverse = inverse_permutation(g->order);
  // int32 on the device: the grid has at most Nq (an int) tokens, checked by the caller
  std::vector<int32_t> o32(g->order.begin(), g->order.end()), i32(g->inverse.begin(), g->inverse.end());
  const int64_t n = static_cast<int64_t>(o32.size());
  g->order_device = ctx.from_host(DType::I32, {n}, o32.data());
  g->inverse_device = ctx.from_host(DType::I32, {n}, i32.data());
  // An evicted order may still be read by queued work: its memory is freed like any tensor's, after that work.
  if (c.grids.size() == Cache::kGrids) c.grids.pop_back();
  c.grids.insert(c.grids.begin(), std::move(g));
  return c.grids.front();
}

Tensor scratch(Context& ctx, Scratch slot, DType dtype, const std::vector<int64_t>& shape) {
  Tensor& t = cache_of(ctx).slots.at(static_cast<std::size_t>(slot));
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  const std::size_t bytes = static_cast<std::size_t>(numel) * dtype_size(dtype);
  if (!t.defined() || t.dtype() != dtype || t.storage()->bytes < bytes) {
    t = Tensor();  // free the old buffer first (a device waits for queued work that reads it): a lower peak
    t = ctx.empty(dtype, {std::max<int64_t>(numel, 1)});
  }
  return t.view(shape, detail::contiguous_strides(shape));
}

void permute_pairs(Context& ctx, const std::vector<std::pair<Tensor, Tensor>>& pairs, const std::vector<int64_t>& order,
                   const Tensor* order_device, Layout layout) {
  // One backend call for the pairs whose rows are contiguous (all of them in sparge_attention: q, k and v have
  // one batch, token count and head dim there); the others, and all of them if the backend declines, on the host.
  detail::PermuteProblem pp;
  std::vector<const std::pair<Tensor, Tensor>*> on_device, on_host;
  for (const auto& pr : pairs) {
    const Tensor& src = pr.first;
    const Tensor& dst = pr.second;
    if (src.numel() == 0) continue;
    const auto& s = src.shape();
    const int batch = static_cast<int>(s[0]);
    const int heads = static_cast<int>(layout == Layout::HND ? s[1] : s[2]);
    const int tokens = static_cast<int>(layout == Layout::HND ? s[2] : s[1]);
    const int dim = static_cast<int>(s[3]);
    const std::size_t elem = dtype_size(src.dtype());
    const bool same = pp.pairs.empty() || (pp.batch == batch && pp.tokens == tokens && pp.head_dim == dim &&
                                           pp.elem_bytes == elem);
    if (src.strides()[3] != 1 || dst.strides()[3] != 1 || !same) {
      on_host.push_back(&pr);
      continue;
    }
    pp.batch = batch, pp.tokens = tokens, pp.head_dim = dim, pp.elem_bytes = elem;
    detail::PermuteProblem::Pair p;
    p.heads = heads;
    p.src = detail::operand(src, layout);
    p.dst = detail::operand(dst, layout);
    pp.pairs.push_back(p);
    on_device.push_back(&pr);
  }
  if (!pp.pairs.empty()) {
    pp.order = &order;
    if (order_device) {
      pp.order_device.storage = order_device->storage();
      pp.order_device.offset_bytes = order_device->offset_bytes();
      pp.order_device.dtype = DType::I32;
    }
    if (!ctx.impl().permute_tokens(pp)) on_host.insert(on_host.end(), on_device.begin(), on_device.end());
  }
  for (const auto* pr : on_host) {
    Tensor dst = pr->second;
    permute_on_host(ctx, pr->first, dst, order, layout);
  }
}

}  // namespace sparge

void permute_tokens(Context& ctx, const Tensor& src, Tensor& dst, const std::vector<int64_t>& order, Layout layout) {
  const char* what = "permute_tokens";
  if (!src.defined() || !dst.defined()) sparge::bad(what, "src and dst must be defined tensors");
  if (src.rank() != 4) sparge::bad(what, "src must have 4 dimensions, got shape " + detail::shape_string(src.shape()));
  if (dst.shape() != src.shape() || dst.dtype() != src.dtype())
    sparge::bad(what, "dst (" + std::string(to_string(dst.dtype())) + " " + detail::shape_string(dst.shape()) +
                          ") must have src's dtype and shape (" + to_string(src.dtype()) + " " +
                          detail::shape_string(src.shape()) + ")");
  if (dst.storage() == src.storage()) sparge::bad(what, "dst must not share memory with src");
  const auto& s = src.shape();
  const int64_t tokens = layout == Layout::HND ? s[2] : s[1];
  if (static_cast<int64_t>(order.size()) > tokens)
    sparge::bad(what, "the order has " + std::to_string(order.size()) + " entries, more than the " +
                          std::to_string(tokens) + " tokens");
  inverse_permutation(order);  // checks it is a permutation
  // An order given by hand is not cached: the backend uploads it (and, on CUDA, waits for the copy).
  sparge::permute_pairs(ctx, {{src, dst}}, order, nullptr, layout);
}

}  // namespace sparq
