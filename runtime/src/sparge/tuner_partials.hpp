// Exact attention partials for the SpargeAttn tuner: per (query row, 64-key tile) the max logit, the sum of
// exp(s - max) and the P·V row of that tile alone. Any block selection's output is a combination of these
// (tuner.cpp), so they are computed once per sample; they are the bulk of the tuner's time.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

namespace sparq::sparge {

constexpr int kTunerTile = 64;  // the kernels' key tile (BK)

// K and V of one (sample, kv head), laid out for the partials: K transposed per tile, both zero padded to
// whole tiles. Not initialized by the constructor: fill every tile with prepare_tuner_tiles (the tiles are
// independent, so ranges of them can be filled by different threads).
struct TunerKV {
  int nk = 0, d = 0, tiles = 0;
  std::unique_ptr<float[]> kt;  // [tiles][d][64]
  std::unique_ptr<float[]> v;   // [tiles * 64][d]
  TunerKV() = default;
  TunerKV(int nk, int d);
};
// Tiles [t0, t1) of kv from k and v ([nk][d] each).
void prepare_tuner_tiles(const float* k, const float* v, int t0, int t1, TunerKV& kv);

// Partials of a range of rows for a list of tiles.
struct TunerPartials {
  int rows = 0, tiles = 0, d = 0;
  std::vector<float> m, l;  // [rows][tiles]: max logit (natural units; -inf: no visible key), Σ exp(s - m)
  std::vector<float> o;     // [rows][tiles][d]: Σ exp(s - m) v (0 where no key is visible)
};

// Rows r0 .. r0 + rows - 1 of q ([nq][d], the instance's first row) against the tiles listed (any order).
// Causal masks are bottom-right aligned (row i sees keys j <= i + nk - nq).
void compute_tuner_partials(const float* q, int nq, const TunerKV& kv, float scale, bool causal, int r0, int rows,
                            const std::vector<int>& tiles, TunerPartials& out);

// The exact output of row `row` of p: all its tiles combined (fp64), O / L (0 when no key is visible).
void combine_tuner_row(const TunerPartials& p, int row, double* out);

// The error of every prefix of one combination order of a row's tiles: step s adds the tiles
// seq[first[s]] .. seq[first[s + 1] - 1] (indices into p's tiles); err[s] += Σ_c |O/L - exact_c| after steps
// 0 .. s - 1 (err[0]: nothing combined, Σ |exact|), for s = 0 .. steps. Combination in fp64, online (running
// max), in the given order.
void tuner_prefix_errors(const TunerPartials& p, int row, const int* seq, const int* first, int steps,
                         const double* exact, double* err);

}  // namespace sparq::sparge
