// The encoding's bias on a tile of logits (the contract is in attention.hpp), its three features behind one
// interface, TileBias:
//   - linear terms   bias(i, j) = a_i + b_j + (c_i + d_j) (pos_i - pos_j)
//   - distance table bias(i, j) += dist[h][min(pos_i - pos_j, W - 1)]: a tile's pairs lie on kDiag
//     diagonals, one distance each, so the tile copies those entries once and each row adds a slice of them
//   - GRAPE-AP path  bias(t, j) += sum_{l=j+1..t} psi(t, l), psi(t, l) = m_h logsigmoid(p_t . r_l / P): key
//     tiles are visited from the diagonal down, and each query row carries psi summed over those visited.
// Internal to src/kernels/cpu.
#pragma once

#include <cstdint>

#include "kernels/cpu/tile.hpp"

namespace grape::kernels::cpu {

constexpr int64_t kDiag = kBQ + kBK - 1;  // diagonals of a tile: the distinct distances of its pairs

// The bias of one thread's tiles. A pass calls keys() per key tile, tile() per (query tile, key tile) and
// logits_row() per row; the backward also grad_row() per row of dS and grad_tile() after each tile, and
// clears and stores the gradient sums per key tile and per range of query rows.
//
// Per-query-row state (the path bias's carries; the sums of da, dc, dp) covers query_rows rows: one query
// tile (forward, two-pass backward) or every query row of a head (one-pass backward); the current tile's
// first row is row qrow of that state.
struct TileBias {
  const Geometry& g;
  const BiasTerms& terms;
  const bool any, path, table;
  const int64_t P;           // probe dim, 0 without a path bias
  const int64_t query_rows;  // rows of the per-query-row state

  // Buffers, carved from the pass's workspace by the constructor (null where the pass or the bias needs
  // none).
  float *kb, *kd;  // [kBK] the key tile's b, d, zero-padded (all zero when absent)
  float* dt;       // [kDiag] the tile's table entries by diagonal
  float *Rt, *PB;  // path: the key tile's probes r transposed [P][kBK]; the tile's path bias [kBQ][kBK]
  double* carry;   // path: per query row, psi summed over the key tiles already visited
  // Backward only.
  float* SG;         // path: [kBQ][kBK] m sigmoid(-x) / P, then the gradient of p.r
  double* carry_ds;  // path: per query row, dS summed over the key tiles already visited
  float *dPq, *drT;  // path: dp of the query rows [query_rows][P]; dr of the key tile, transposed [P][kBK]
  double *col_b, *col_d;        // [kBK] per key: dS and dS (pos_i - pos_j) summed (db, dd)
  double *row_a, *row_c;        // [query_rows] the same per query row (da, dc)
  double* diag;                 // [kDiag] the tile's dS summed per diagonal (ddist)
  double* dist_grad = nullptr;  // [W] where the head's table gradient goes (the pass sets it per task)

  // The gradient sums this pass takes (set by grads()); the sums are in double.
  bool grad_a = false, grad_b = false, grad_c = false, grad_d = false, grad_dist = false;

  // The current tile: head (b, h), query rows from i0 (row qrow of the per-row state), keys [j0, j0 + nk).
  int64_t b = 0, h = 0, i0 = 0, qrow = 0, j0 = 0, nk = 0;
  const float *a_rows = nullptr, *c_rows = nullptr;  // a, c of the tile's query rows, or null

  TileBias(Carver& carver, const Geometry& g, const BiasTerms& terms, int64_t query_rows, bool backward);

  // Per key tile: its b, d and (path) probes r, packed.
  void keys(int64_t b, int64_t h, int64_t j0, int64_t nk);
  // Per tile: query rows [i0, i0 + rows) (padded to Mp) against the key tile of keys(): the table entries by
  // diagonal, and the path bias from the rows' carries (which advance past this key tile; in the backward
  // also m sigmoid(-x) / P).
  void tile(int64_t i0, int64_t rows, int64_t Mp, int64_t qrow);
  // Forward: the path bias's carries of query rows [0, rows) before the first key tile: carry0[r * stride]
  // (psi summed over the keys after the ones this task visits: decode's key blocks), or 0 when null.
  void start_carries(int64_t rows, const double* carry0, int64_t stride);

  float dist0(int64_t r) const {  // pos_i - pos_j0 for row r: distances are small integers, exact in fp32
    return float((g.q_offset + i0 + r) - (g.k_offset + j0));
  }

  // Row r of S: the raw dots -> logits, in place, over all kBK columns; the keys past the row's nv visible
  // ones get -inf. Fixed-length loops: the compiler unrolls them into whole vectors, and every later loop
  // over the row needs no remainder (the masked entries' exp is 0).
  GRAPE_INLINE void logits_row(int64_t r, int64_t nv, float* s) const {
    const float scale = g.scale;
    if (!any) {
#pragma omp simd
      for (int32_t j = 0; j < int32_t(kBK); ++j) s[j] = j < int32_t(nv) ? scale * s[j] : kNegInf;
      return;
    }
    const float ai = a_rows ? a_rows[r] : 0.0f, ci = c_rows ? c_rows[r] : 0.0f, d0 = dist0(r);
    const float* kb = this->kb;
    const float* kd = this->kd;
    // 32-bit column indices in this file's loops: AVX2 has no vector int64 -> float conversion (the loops
    // would stay scalar) and compares 4 int64 lanes at a time, not 8.
#pragma omp simd
    for (int32_t j = 0; j < int32_t(kBK); ++j)
      s[j] = scale * s[j] + ai + kb[j] + (ci + kd[j]) * (d0 - float(j));
    if (path) {
      const float* pb = PB + r * kBK;
#pragma omp simd
      for (int64_t j = 0; j < kBK; ++j) s[j] += pb[j];
    }
    if (table) {  // key j of row r lies on diagonal j - r + kBQ - 1
      const float* dtr = dt + (kBQ - 1 - r);
#pragma omp simd
      for (int64_t j = 0; j < kBK; ++j) s[j] += dtr[j];
    }
#pragma omp simd
    for (int32_t j = 0; j < int32_t(kBK); ++j) s[j] = j < int32_t(nv) ? s[j] : kNegInf;
  }

  // Backward.

  // Which gradient sums the pass takes: those of the key side (db, dd, ddist) and/or of the query side (da,
  // dc), each when out asks for it and its term is present.
  void grads(const BiasGrads& out, bool key_side, bool query_side);

  // Row r of dS (its nv visible keys) into the gradient sums: per key (col_b, col_d), per query row (row_a,
  // row_c) and per diagonal (diag), in double.
  GRAPE_INLINE void grad_row(int64_t r, int64_t nv, const float* ds) const {
    const double d0 = dist0(r);
    if (grad_b) {
      double* cb = col_b;
#pragma omp simd
      for (int64_t j = 0; j < nv; ++j) cb[j] += ds[j];
    }
    if (grad_d) {
      double* cd = col_d;
#pragma omp simd
      for (int32_t j = 0; j < int32_t(nv); ++j) cd[j] += double(ds[j]) * (d0 - double(j));
    }
    if (grad_a || grad_c) {
      double sa = 0.0, sc = 0.0;
#pragma omp simd reduction(+ : sa, sc)
      for (int32_t j = 0; j < int32_t(nv); ++j) {
        sa += ds[j];
        sc += double(ds[j]) * (d0 - double(j));
      }
      if (grad_a) row_a[qrow + r] += sa;
      if (grad_c) row_c[qrow + r] += sc;
    }
    if (grad_dist) {
      double* dg = diag + (kBQ - 1 - r);
#pragma omp simd
      for (int64_t j = 0; j < nv; ++j) dg[j] += ds[j];
    }
  }

  // After a tile's dS [kBQ][kBK] (rows past `rows`, up to Mp, are 0): the table's diagonal sums scattered to
  // dist_grad, and the path bias's gradients of the probes (dPq, drT).
  void grad_tile(int64_t rows, int64_t Mp, const float* dS);

  // Per key tile: clear col_b, col_d, drT before its query tiles; after them, store db, dd, dr of keys
  // [j0, j0 + nk) of head (b, h) where out asks for them.
  void clear_key_sums();
  void store_key_grads(int64_t b, int64_t h, int64_t j0, int64_t nk, const BiasGrads& out) const;
  // Per range of query rows: clear row_a, row_c and the path bias's carries and dPq before it; after it,
  // store da, dc, dp of query rows [i0, i0 + rows) of head (b, h) (rows 0.. of the state) where out asks for
  // them.
  void clear_query_sums();
  void store_query_grads(int64_t b, int64_t h, int64_t i0, int64_t rows, const BiasGrads& out) const;
};

// psi(t, l) of query row i of head (b, h) summed over the keys [l0, l1) (decode's path-bias pre-pass), per
// key tile in fp32, the tiles in double. Rt [P][kBK] and psi [kBK]: scratch.
double psi_sum(const Geometry& g, const BiasTerms& bias, int64_t b, int64_t h, int64_t i, int64_t l0,
               int64_t l1, float* Rt, float* psi);

}  // namespace grape::kernels::cpu
