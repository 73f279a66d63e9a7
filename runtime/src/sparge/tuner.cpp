// The SpargeAttn tuner: per head, the sparsest (θ, τ or k, λ) whose output stays within relative-L1 bounds of
// exact attention on every calibration sample.
//
// How it stays fast (docs/SPARGE.md):
// - exact attention of a head is computed once per sample as per-(row, 64-key tile) partials (max, sum,
//   P·V; tuner_partials.cpp, vectorized); any block selection's output is a combination of those partials,
//   which costs 1/128 of attention;
// - for a given θ every τ (or k) keeps a prefix of one fixed per-row block order (forced blocks, then by
//   decreasing P̂), so one pass over that order gives the error of every τ at once (a table per query
//   block); choosing τ is then a grid scan plus bisection over table look-ups;
// - stage 2 is the same idea: a tile of a 16-row group is skipped for λ below a critical value that does not
//   depend on λ (the running max ignores skipped tiles), so the error of every λ is a prefix table too.
#include "sparge_internal.hpp"

#include "reference.hpp"
#include "tuner_partials.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <numeric>

namespace sparq {
namespace {

constexpr int kTile = sparge::kTunerTile;
constexpr int kGroup = 16;  // rows of a warp: the stage-2 decision unit
constexpr double kLog2e = 1.44269504088896340736;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Sample {
  int batch = 0, heads_q = 0, heads_kv = 0, tokens_q = 0, tokens_k = 0, dim = 0;
  std::vector<float> q, k, v;  // HND
};

// One (sample, batch, query head) instance.
struct Instance {
  const float* q = nullptr;
  const float* k = nullptr;
  const float* v = nullptr;
  int nq = 0, nk = 0, d = 0;
};

using Partials = sparge::TunerPartials;
using Prepared = sparge::TunerKV;

void compute_partials(const Instance& in, const Prepared& pr, float scale, bool causal, int r0, int rows,
                      const std::vector<int>& tiles, Partials& out) {
  sparge::compute_tuner_partials(in.q, in.nq, pr, scale, causal, r0, rows, tiles, out);
}

// fn(i, partials) for i = 0 .. count-1 on the reference backend's threads, last item first (with causal masks the
// last query blocks cost the most: started first, they do not finish alone). Each thread reuses one Partials
// buffer (tens of MiB at long sequences; a fresh one per item costs page faults and zeroing).
void for_each_with_partials(std::size_t count, const std::function<void(std::size_t, Partials&)>& fn) {
  std::atomic<std::size_t> next{0};
  const std::size_t workers = std::min<std::size_t>(count, static_cast<std::size_t>(reference::thread_count()));
  reference::parallel_for(workers, [&](std::size_t) {
    Partials part;
    for (std::size_t k = next++; k < count; k = next++) fn(count - 1 - k, part);
  });
}

std::string lambda_text(float x) {
  char b[32];
  std::snprintf(b, sizeof b, "%.3g", static_cast<double>(x));
  return b;
}

double ratio(double err, double norm) {
  if (norm > 0) return err / norm;
  return err > 0 ? std::numeric_limits<double>::infinity() : 0.0;
}

// What pass 1 keeps of one instance.
struct Pass1 {
  sparge::HeadMap map;
  std::vector<int> qbs;                          // the query blocks evaluated (all, or an even sample)
  // [evaluated query blocks][block_q][d]: row i of qbs[b] at (b·block_q + i)·d. Written by the workers (no
  // zeroing pass); the rows past the end of a short last block are never read.
  std::unique_ptr<double[]> exact;
  double norm = 0;                               // Σ |exact|
  std::vector<std::vector<sparge::RowPlan>> plans;  // [θ][i]: query block qbs[i]
  std::vector<std::vector<std::vector<double>>> err;  // [θ][i][kept blocks 0..order size]: Σ |O - exact|
  int64_t valid = 0;
};

// Stage-2 tables of one instance for a fixed selection.
struct Pass2 {
  std::vector<std::vector<float>> crit;  // per 16-row group: critical λ of its visible tiles, ascending
  std::vector<std::vector<double>> err;  // per group: Σ |O - exact| with the first p tiles (by crit) included
  double norm = 0;
  int64_t visible = 0;  // group x tile pairs with a visible key
};

}  // namespace

struct Tuner::Impl {
  SpargeOptions options;
  TunerOptions topt;
  std::map<std::string, std::vector<Sample>> layers;

  sparge::Geometry geometry(const Instance& in) const { return sparge::geometry(in.nq, in.nk, options); }
  float scale(int d) const {
    return options.attention.scale > 0 ? options.attention.scale : 1.0f / std::sqrt(static_cast<float>(d));
  }

  std::vector<Instance> instances(const std::string& layer, int h) const {
    std::vector<Instance> out;
    for (const Sample& s : layers.at(layer)) {
      const int group = s.heads_q / s.heads_kv;
      const std::size_t D = static_cast<std::size_t>(s.dim);
      for (int b = 0; b < s.batch; ++b) {
        Instance in;
        in.nq = s.tokens_q;
        in.nk = s.tokens_k;
        in.d = s.dim;
        in.q = s.q.data() + (static_cast<std::size_t>(b) * s.heads_q + h) * s.tokens_q * D;
        in.k = s.k.data() + (static_cast<std::size_t>(b) * s.heads_kv + h / group) * s.tokens_k * D;
        in.v = s.v.data() + (static_cast<std::size_t>(b) * s.heads_kv + h / group) * s.tokens_k * D;
        out.push_back(in);
      }
    }
    return out;
  }

  // The partials' K/V layout of an instance and, when `map` is given, its block map, as parallel jobs (serial,
  // they would be a large part of the tuner's time on many threads): the K and Q summaries (started first,
  // they are the longest) and the K/V tiles in one range per thread.
  void prepare(const Instance& in, Prepared& pr, sparge::HeadMap* map) const {
    const sparge::Geometry g = geometry(in);
    pr = Prepared(in.nk, in.d);
    const int summaries = map ? 2 : 0;
    const int ranges = std::min(pr.tiles, reference::thread_count());
    sparge::BlockSummary ks, qs;
    reference::parallel_for(static_cast<std::size_t>(summaries + ranges), [&](std::size_t job) {
      const int j = static_cast<int>(job) - summaries;
      if (j >= 0) {
        sparge::prepare_tuner_tiles(in.k, in.v, j * pr.tiles / ranges, (j + 1) * pr.tiles / ranges, pr);
      } else if (job == 0) {
        std::vector<float> km = sparge::token_mean(in.k, in.nk, in.d, g.block_k);
        ks = sparge::summarize_blocks(in.k, in.nk, in.d, g.block_k, km.data());
      } else {
        qs = sparge::summarize_blocks(in.q, in.nq, in.d, g.block_q, nullptr);
      }
    });
    if (map) *map = sparge::head_map(qs, ks, g, scale(in.d));
  }

  // All query blocks, or max_query_blocks of them evenly spread.
  std::vector<int> sample_blocks(int nqb, bool all) const {
    std::vector<int> qbs;
    const int most = topt.max_query_blocks;
    if (all || most <= 0 || nqb <= most) {
      for (int qb = 0; qb < nqb; ++qb) qbs.push_back(qb);
    } else {
      for (int i = 0; i < most; ++i)
        qbs.push_back(static_cast<int>((static_cast<int64_t>(2 * i + 1) * nqb) / (2 * static_cast<int64_t>(most))));
    }
    return qbs;
  }

  // Exact outputs and, for every θ, the error of every prefix of the block order.
  Pass1 pass1(const Instance& in, const std::vector<float>& thetas, const Prepared& pr, sparge::HeadMap map,
              bool all_blocks) const {
    Pass1 r;
    const sparge::Geometry g = geometry(in);
    r.map = std::move(map);
    r.qbs = sample_blocks(r.map.nqb, all_blocks);
    const int nqb = static_cast<int>(r.qbs.size()), D = in.d;
    const int tiles_per_block = g.block_k / kTile;
    const int ntiles = (in.nk + kTile - 1) / kTile;
    r.exact.reset(new double[static_cast<std::size_t>(nqb) * g.block_q * D]);
    r.plans.assign(thetas.size(), std::vector<sparge::RowPlan>(static_cast<std::size_t>(nqb)));
    r.err.assign(thetas.size(), std::vector<std::vector<double>>(static_cast<std::size_t>(nqb)));
    std::vector<double> norms(static_cast<std::size_t>(nqb), 0.0);
    for (int qb : r.qbs) r.valid += r.map.valid_end[static_cast<std::size_t>(qb)];
    const float sc = scale(D);
    for_each_with_partials(static_cast<std::size_t>(nqb), [&](std::size_t qbi, Partials& part) {
      const int qb = r.qbs[qbi];
      const int q0 = qb * g.block_q, rows = std::min(g.block_q, in.nq - q0);
      const int vend = r.map.valid_end[static_cast<std::size_t>(qb)];
      std::vector<int> tiles;
      for (int t = 0; t < std::min(ntiles, vend * tiles_per_block); ++t) tiles.push_back(t);
      compute_partials(in, pr, sc, g.causal, q0, rows, tiles, part);
      const int T = static_cast<int>(tiles.size());
      // Per θ its plan, and the table it shares: θ values that force the same blocks give the same table.
      // own[th]: the θ whose table it is; seq/first: the tiles added at each step of the θ's block order.
      std::vector<std::size_t> own(thetas.size());
      std::vector<std::vector<int>> seq(thetas.size()), first(thetas.size());
      for (std::size_t th = 0; th < thetas.size(); ++th) {
        sparge::RowPlan& plan = r.plans[th][qbi];
        sparge::plan_row(r.map, qb, thetas[th], false, options.attention_sink, options.diagonal, plan);
        own[th] = th;
        for (std::size_t prev = 0; prev < th; ++prev)
          if (r.plans[prev][qbi].forced == plan.forced && r.plans[prev][qbi].order == plan.order) {
            own[th] = own[prev];
            break;
          }
        if (own[th] != th) continue;
        r.err[th][qbi].assign(plan.order.size() + 1, 0.0);
        first[th].push_back(0);
        for (int kb : plan.order) {  // the partials hold tiles 0 .. T-1 in order
          for (int t = kb * tiles_per_block; t < std::min(T, (kb + 1) * tiles_per_block); ++t) seq[th].push_back(t);
          first[th].push_back(static_cast<int>(seq[th].size()));
        }
      }
      // Row by row: a row's partials (T·D floats) stay in cache for its exact output and every table.
      double norm = 0;
      for (int i = 0; i < rows; ++i) {
        double* ex = r.exact.get() + (qbi * g.block_q + static_cast<std::size_t>(i)) * D;
        sparge::combine_tuner_row(part, i, ex);
        for (int c = 0; c < D; ++c) norm += std::fabs(ex[c]);
        for (std::size_t th = 0; th < thetas.size(); ++th)
          if (own[th] == th)
            sparge::tuner_prefix_errors(part, i, seq[th].data(), first[th].data(),
                                        static_cast<int>(r.plans[th][qbi].order.size()), ex, r.err[th][qbi].data());
      }
      norms[qbi] = norm;
      for (std::size_t th = 0; th < thetas.size(); ++th)
        if (own[th] != th) r.err[th][qbi] = r.err[own[th]][qbi];
    });
    r.norm = std::accumulate(norms.begin(), norms.end(), 0.0);
    return r;
  }

  // Stage-2 tables for the blocks `params` selects.
  Pass2 pass2(const Instance& in, const Pass1& p1, const SpargeParams& params, const Prepared& pr) const {
    Pass2 r;
    r.norm = p1.norm;
    const sparge::HeadMap& map = p1.map;
    const sparge::Geometry g = geometry(in);
    const int nqb = static_cast<int>(p1.qbs.size()), D = in.d;
    const int tiles_per_block = g.block_k / kTile;
    const int ntiles = (in.nk + kTile - 1) / kTile;
    const int groups_per_block = (g.block_q + kGroup - 1) / kGroup;
    r.crit.assign(static_cast<std::size_t>(nqb) * groups_per_block, {});
    // {0}: the groups past the last row of a short (last) query block skip nothing and add no error
    r.err.assign(r.crit.size(), std::vector<double>(1, 0.0));
    const float sc = scale(D);
    for_each_with_partials(static_cast<std::size_t>(nqb), [&](std::size_t qbi, Partials& part) {
      const int qb = p1.qbs[qbi];
      const int q0 = qb * g.block_q, rows = std::min(g.block_q, in.nq - q0);
      std::vector<int> sel, tiles;
      sparge::select_blocks(map, qb, params, options.attention_sink, options.diagonal, sel);
      for (int kb : sel)
        for (int t = kb * tiles_per_block; t < std::min(ntiles, (kb + 1) * tiles_per_block); ++t) tiles.push_back(t);
      compute_partials(in, pr, sc, g.causal, q0, rows, tiles, part);
      const std::size_t T = tiles.size();
      std::vector<int> seq, first;
      for (int g0 = 0; g0 < rows; g0 += kGroup) {
        const int gn = std::min(kGroup, rows - g0);
        std::vector<double> mr(static_cast<std::size_t>(gn), -std::numeric_limits<double>::infinity());
        std::vector<std::pair<float, int>> crit;  // (critical λ, tile)
        for (std::size_t t = 0; t < T; ++t) {
          double c = std::numeric_limits<double>::infinity();
          bool visible = false;
          for (int i = 0; i < gn; ++i) {
            const float m = part.m[static_cast<std::size_t>(g0 + i) * T + t];
            if (!(m > kNegInf)) continue;
            visible = true;
            const double m2 = m * kLog2e;
            c = std::min(c, mr[static_cast<std::size_t>(i)] - m2);  // skipped iff λ < running max - tile max
            mr[static_cast<std::size_t>(i)] = std::max(mr[static_cast<std::size_t>(i)], m2);
          }
          if (visible) crit.emplace_back(static_cast<float>(c), static_cast<int>(t));
        }
        std::stable_sort(crit.begin(), crit.end(),
                         [](const std::pair<float, int>& a, const std::pair<float, int>& b) { return a.first < b.first; });
        const std::size_t gi = qbi * groups_per_block + static_cast<std::size_t>(g0 / kGroup);
        std::vector<float>& cv = r.crit[gi];
        std::vector<double>& ev = r.err[gi];
        for (const auto& c : crit) cv.push_back(c.first);
        ev.assign(crit.size() + 1, 0.0);
        seq.clear();
        first.assign(1, 0);
        for (const auto& c : crit) {  // one tile per step, by critical λ
          seq.push_back(c.second);
          first.push_back(static_cast<int>(seq.size()));
        }
        for (int i = 0; i < gn; ++i)
          sparge::tuner_prefix_errors(part, g0 + i, seq.data(), first.data(), static_cast<int>(crit.size()),
                                      p1.exact.get() + (qbi * g.block_q + static_cast<std::size_t>(g0 + i)) * D,
                                      ev.data());
      }
    });
    for (const auto& c : r.crit) r.visible += static_cast<int64_t>(c.size());
    return r;
  }

  // Error of one λ on a Pass2 (and the skipped pairs).
  static double pass2_error(const Pass2& p2, float lambda, int64_t* skipped) {
    double e = 0;
    int64_t sk = 0;
    for (std::size_t gi = 0; gi < p2.crit.size(); ++gi) {
      const auto& cv = p2.crit[gi];
      const std::size_t in = static_cast<std::size_t>(std::upper_bound(cv.begin(), cv.end(), lambda) - cv.begin());
      e += p2.err[gi][in];
      sk += static_cast<int64_t>(cv.size() - in);
    }
    if (skipped) *skipped = sk;
    return ratio(e, p2.norm);
  }

  std::vector<SpargeParams> tune_layer(const std::string& layer) {
    auto it = layers.find(layer);
    if (it == layers.end() || it->second.empty())
      sparge::bad("Tuner::tune_layer", "no samples were observed for layer \"" + layer + "\"");
    const int heads = it->second.front().heads_q;
    std::vector<SpargeParams> out;
    for (int h = 0; h < heads; ++h) out.push_back(tune_head(layer, h, heads));
    return out;
  }

  SpargeParams tune_head(const std::string& layer, int h, int heads) {
    const auto start = std::chrono::steady_clock::now();
    const std::vector<Instance> inst = instances(layer, h);
    std::vector<float> thetas = topt.simthreshd_candidates;
    if (thetas.empty()) thetas.push_back(0.0f);
    for (float th : thetas) validate(SpargeParams{th}, "TunerOptions::simthreshd_candidates");

    std::vector<Pass1> p1;
    for (const Instance& in : inst) {
      Prepared pr;
      sparge::HeadMap map;
      prepare(in, pr, &map);
      p1.push_back(pass1(in, thetas, pr, std::move(map), false));
    }
    int64_t valid = 0;
    for (const Pass1& r : p1) valid += r.valid;

    // err / blocks of (θ index, parameter) over all instances: the worst error, the total kept blocks
    auto measure = [&](std::size_t th, const SpargeParams& sp, int64_t* blocks) {
      double worst = 0;
      int64_t kept = 0;
      for (const Pass1& r : p1) {
        double e = 0;
        for (std::size_t i = 0; i < r.qbs.size(); ++i) {
          const sparge::RowPlan& plan = r.plans[th][i];
          const int k = plan.kept(sp);
          kept += k;
          e += r.err[th][i][static_cast<std::size_t>(k)];
        }
        worst = std::max(worst, ratio(e, r.norm));
      }
      if (blocks) *blocks = kept;
      return worst;
    };
    auto with = [&](float theta, float x) {
      SpargeParams sp;
      sp.simthreshd = theta;
      if (topt.use_topk) sp.topk = std::max(x, 1e-6f), sp.cdfthreshd = 1.0f;
      else sp.cdfthreshd = x;
      return sp;
    };
    // the grid: τ = 1 - 10^-x, fine near 1 (or k linear), ascending
    std::vector<float> grid;
    if (topt.use_topk) {
      for (int i = 1; i <= 100; ++i) grid.push_back(static_cast<float>(i) / 100.0f);
    } else {
      grid.push_back(0.0f);
      for (int i = 1; i <= 100; ++i) grid.push_back(static_cast<float>(1.0 - std::pow(10.0, -0.05 * i)));
      grid.push_back(1.0f);
    }
    bool found = false;
    SpargeParams best;
    double best_err = 0;
    int64_t best_blocks = std::numeric_limits<int64_t>::max();
    for (std::size_t th = 0; th < thetas.size(); ++th) {
      std::size_t pass = grid.size();
      for (std::size_t i = 0; i < grid.size(); ++i)
        if (measure(th, with(thetas[th], grid[i]), nullptr) <= topt.l1) {
          pass = i;
          break;
        }
      if (pass == grid.size()) continue;
      float hi = grid[pass];
      if (pass > 0) {
        float lo = grid[pass - 1];  // fails
        for (int it = 0; it < 24 && hi - lo > 1e-7f; ++it) {
          const float mid = 0.5f * (lo + hi);
          if (measure(th, with(thetas[th], mid), nullptr) <= topt.l1) hi = mid;
          else lo = mid;
        }
      }
      int64_t blocks = 0;
      const SpargeParams sp = with(thetas[th], hi);
      const double e = measure(th, sp, &blocks);
      if (!found || blocks < best_blocks || (blocks == best_blocks && e < best_err)) {
        found = true;
        best = sp;
        best_err = e;
        best_blocks = blocks;
      }
    }
    if (!found || static_cast<double>(best_blocks) > (1.0 - topt.min_sparsity) * static_cast<double>(valid) ||
        best_blocks >= valid) {
      best = SpargeParams{};
      best.dense = true;
      best_err = 0;
      best_blocks = valid;
    }

    // Stage 2 on top of the chosen selection.
    double pv_err = best_err, pv_skip = 0;
    if (topt.pv_l1 > 0) {
      std::vector<Pass2> p2;
      for (std::size_t i = 0; i < inst.size(); ++i) {
        Prepared pr;
        prepare(inst[i], pr, nullptr);
        p2.push_back(pass2(inst[i], p1[i], best, pr));
      }
      std::vector<float> cands{0.0f};
      for (const Pass2& r : p2)
        for (const auto& cv : r.crit)
          for (float c : cv)
            if (c >= 0.0f && c <= topt.max_pvthreshd) cands.push_back(c);
      std::sort(cands.begin(), cands.end());
      cands.erase(std::unique(cands.begin(), cands.end()), cands.end());
      if (cands.size() > 4096) {
        std::vector<float> sub;
        for (std::size_t i = 0; i < 4096; ++i) sub.push_back(cands[i * (cands.size() - 1) / 4095]);
        cands = sub;
      }
      int64_t total = 0;
      for (const Pass2& r : p2) total += r.visible;
      for (float lambda : cands) {
        double worst = 0;
        int64_t skipped = 0;
        for (const Pass2& r : p2) {
          int64_t s = 0;
          worst = std::max(worst, pass2_error(r, lambda, &s));
          skipped += s;
        }
        if (worst <= topt.pv_l1) {
          if (skipped > 0 && static_cast<double>(skipped) >= topt.min_pv_skip * static_cast<double>(total)) {
            best.pvthreshd = lambda;
            pv_err = worst;
            pv_skip = total ? static_cast<double>(skipped) / static_cast<double>(total) : 0.0;
          }
          break;
        }
      }
    }

    if (topt.progress) {
      const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      char line[512];
      std::snprintf(line, sizeof line,
                    "layer %s head %d/%d: %s simthreshd=%.2f %s=%.4f pvthreshd=%s | block sparsity %.3f, l1 %.4f, "
                    "pv skip %.3f, pv_l1 %.4f (%zu samples, %.2f s)",
                    layer.c_str(), h + 1, heads, best.dense ? "dense" : "sparse", best.simthreshd,
                    topt.use_topk ? "topk" : "cdfthreshd", topt.use_topk ? best.topk : best.cdfthreshd,
                    best.stage2() ? lambda_text(best.pvthreshd).c_str() : "off",
                    valid ? 1.0 - static_cast<double>(best_blocks) / static_cast<double>(valid) : 0.0, best_err,
                    pv_skip, pv_err, inst.size(), secs);
      topt.progress(line);
    }
    return best;
  }

  std::vector<Evaluation> evaluate(const std::string& layer, const std::vector<SpargeParams>& per_head) {
    auto it = layers.find(layer);
    if (it == layers.end() || it->second.empty())
      sparge::bad("Tuner::evaluate", "no samples were observed for layer \"" + layer + "\"");
    const int heads = it->second.front().heads_q;
    const std::vector<SpargeParams> params = sparge::resolve_params(per_head, heads, "Tuner::evaluate");
    std::vector<Evaluation> out(static_cast<std::size_t>(heads));
    for (int h = 0; h < heads; ++h) {
      Evaluation& ev = out[static_cast<std::size_t>(h)];
      int64_t valid = 0, kept = 0, skipped = 0, visible = 0;
      for (const Instance& in : instances(layer, h)) {
        Prepared pr;
        sparge::HeadMap map;
        prepare(in, pr, &map);
        const Pass1 r = pass1(in, {}, pr, std::move(map), true);
        const Pass2 r2 = pass2(in, r, params[static_cast<std::size_t>(h)], pr);
        std::vector<int> sel;
        for (int qb = 0; qb < r.map.nqb; ++qb) {
          sparge::select_blocks(r.map, qb, params[static_cast<std::size_t>(h)], options.attention_sink,
                                options.diagonal, sel);
          kept += static_cast<int64_t>(sel.size());
        }
        valid += r.valid;
        ev.l1 = std::max(ev.l1, pass2_error(r2, std::numeric_limits<float>::infinity(), nullptr));
        int64_t s = 0;
        ev.pv_l1 = std::max(ev.pv_l1, pass2_error(r2, params[static_cast<std::size_t>(h)].pvthreshd, &s));
        skipped += s;
        visible += r2.visible;
      }
      ev.block_sparsity = valid ? 1.0 - static_cast<double>(kept) / static_cast<double>(valid) : 0.0;
      ev.pv_skip_fraction = visible ? static_cast<double>(skipped) / static_cast<double>(visible) : 0.0;
    }
    return out;
  }
};

Tuner::Tuner(SpargeOptions options, TunerOptions tuner_options) : impl_(std::make_unique<Impl>()) {
  if (options.block_q <= 0 || options.block_q % kGroup || options.block_k <= 0 || options.block_k % kTile)
    sparge::bad("Tuner", "options.block_q x block_k = " + std::to_string(options.block_q) + "x" +
                             std::to_string(options.block_k) + " must be positive multiples of 16 x 64");
  if (!(tuner_options.l1 > 0)) sparge::bad("Tuner", "tuner_options.l1 must be > 0, got " + std::to_string(tuner_options.l1));
  if (tuner_options.pv_l1 > 0 && tuner_options.pv_l1 < tuner_options.l1)
    sparge::bad("Tuner", "tuner_options.pv_l1 (" + std::to_string(tuner_options.pv_l1) +
                             ") bounds stages 1 and 2 together and must be >= l1 (" + std::to_string(tuner_options.l1) +
                             "), or <= 0 to disable stage 2");
  if (options.hilbert)
    sparge::bad("Tuner", "options.hilbert: observe the samples in Hilbert order instead (permute_tokens)");
  impl_->options = std::move(options);
  impl_->topt = std::move(tuner_options);
}
Tuner::~Tuner() = default;
Tuner::Tuner(Tuner&&) noexcept = default;
Tuner& Tuner::operator=(Tuner&&) noexcept = default;

void Tuner::observe_host(const std::string& layer, int batch, int heads_q, int heads_kv, int tokens_q, int tokens_k,
                         int head_dim, const float* q, const float* k, const float* v) {
  const char* what = "Tuner::observe";
  if (layer.empty()) sparge::bad(what, "the layer name is empty");
  if (batch <= 0 || heads_q <= 0 || heads_kv <= 0 || tokens_q <= 0 || tokens_k <= 0 || head_dim <= 0)
    sparge::bad(what, "sizes must be positive (B=" + std::to_string(batch) + ", Hq=" + std::to_string(heads_q) +
                          ", Hkv=" + std::to_string(heads_kv) + ", Nq=" + std::to_string(tokens_q) +
                          ", Nk=" + std::to_string(tokens_k) + ", D=" + std::to_string(head_dim) + ")");
  if (heads_q % heads_kv)
    sparge::bad(what, "Hq = " + std::to_string(heads_q) + " is not a multiple of Hkv = " + std::to_string(heads_kv));
  auto& samples = impl_->layers[layer];
  if (!samples.empty()) {
    const Sample& f = samples.front();
    if (f.heads_q != heads_q || f.heads_kv != heads_kv || f.dim != head_dim)
      sparge::bad(what, "layer \"" + layer + "\": this sample has Hq=" + std::to_string(heads_q) + ", Hkv=" +
                            std::to_string(heads_kv) + ", D=" + std::to_string(head_dim) + " but earlier ones Hq=" +
                            std::to_string(f.heads_q) + ", Hkv=" + std::to_string(f.heads_kv) + ", D=" +
                            std::to_string(f.dim));
  }
  if (impl_->options.attention.causal && tokens_k < tokens_q)
    sparge::bad(what, "causal samples need Nk >= Nq");
  Sample s;
  s.batch = batch;
  s.heads_q = heads_q;
  s.heads_kv = heads_kv;
  s.tokens_q = tokens_q;
  s.tokens_k = tokens_k;
  s.dim = head_dim;
  const std::size_t nq = static_cast<std::size_t>(batch) * heads_q * tokens_q * head_dim;
  const std::size_t nk = static_cast<std::size_t>(batch) * heads_kv * tokens_k * head_dim;
  s.q.assign(q, q + nq);
  s.k.assign(k, k + nk);
  s.v.assign(v, v + nk);
  samples.push_back(std::move(s));
}

void Tuner::observe(Context& ctx, const std::string& layer, const Tensor& q, const Tensor& k, const Tensor& v) {
  // validate like attention() (a scratch output stands in for out)
  const Layout layout = impl_->options.attention.layout;
  if (!q.defined()) sparge::bad("Tuner::observe", "q is an empty tensor");
  Tensor scratch = ctx.empty(q.dtype() == DType::BF16 ? DType::BF16 : DType::F16, q.shape());
  detail::AttentionProblem p = detail::make_problem(ctx, q, k, v, scratch, impl_->options.attention, nullptr, nullptr);
  sparge::HostTensor hq = sparge::download(ctx, q, layout);
  sparge::HostTensor hk = sparge::download(ctx, k, layout);
  sparge::HostTensor hv = sparge::download(ctx, v, layout);
  observe_host(layer, p.batch, p.heads_q, p.heads_kv, p.tokens_q, p.tokens_k, p.head_dim, hq.data.data(),
               hk.data.data(), hv.data.data());
}

std::vector<std::string> Tuner::layers() const {
  std::vector<std::string> names;
  for (const auto& [n, _] : impl_->layers) names.push_back(n);
  return names;
}

std::vector<SpargeParams> Tuner::tune_layer(const std::string& layer) { return impl_->tune_layer(layer); }

HyperParams Tuner::tune() {
  HyperParams hp;
  hp.block_q = impl_->options.block_q;
  hp.block_k = impl_->options.block_k;
  for (const auto& [name, samples] : impl_->layers) {
    if (samples.empty()) continue;
    hp.set_layer(name, impl_->tune_layer(name));
  }
  return hp;
}

std::vector<Tuner::Evaluation> Tuner::evaluate(const std::string& layer, const std::vector<SpargeParams>& per_head) {
  return impl_->evaluate(layer, per_head);
}

}  // namespace sparq
