// The encoding's bias on the tiles (see tile_bias.hpp): packing of the per-token terms, the distance table by
// diagonal, GRAPE-AP's path bias and the gradients of all three.
#include "kernels/cpu/tile_bias.hpp"

#include <algorithm>

namespace grape::kernels::cpu {
namespace {

// Per-key bias quantities of one key tile (zero where the term is absent or past the tile's end).
void pack_key_terms(const float* src, int64_t n, float* dst) {
  for (int64_t j = 0; j < kBK; ++j) dst[j] = (src && j < n) ? src[j] : 0.0f;
}

// ---------------------------------------------------------------------------------------------------------
// Per-head bias by distance: bias(i, j) += dist[h][min(pos_i - pos_j, W - 1)]
// ---------------------------------------------------------------------------------------------------------

// The table entries of the tile of query rows from i0 and keys from j0 of head h, one per diagonal: row r and
// key j lie on diagonal e = j - r + kBQ - 1, at distance top - e with top = pos_{i0} - pos_{j0} + kBQ - 1. So
// row r reads dt[kBQ - 1 - r + j], a contiguous slice. Negative distances (masked pairs) get 0.
void pack_dist_tile(const Geometry& g, const BiasTerms& bias, int64_t h, int64_t i0, int64_t j0, float* dt) {
  const float* tab = bias.dist + h * bias.W;
  const int64_t top = (g.q_offset + i0) - (g.k_offset + j0) + kBQ - 1;
  for (int64_t e = 0; e < kDiag; ++e) {
    const int64_t n = top - e;
    dt[e] = n < 0 ? 0.0f : tab[std::min(n, bias.W - 1)];
  }
}

// Adds a tile's per-diagonal sums of dS (diag, filled by grad_row) to the gradient row of its head's table
// (grad [W], double), at the clamped distances, and clears diag for the next tile.
void scatter_dist_grad(const Geometry& g, int64_t W, int64_t i0, int64_t j0, double* diag, double* grad) {
  const int64_t top = (g.q_offset + i0) - (g.k_offset + j0) + kBQ - 1;
  for (int64_t e = 0; e < kDiag; ++e) {
    const int64_t n = top - e;
    if (n >= 0) grad[std::min(n, W - 1)] += diag[e];
    diag[e] = 0.0;
  }
}

// ---------------------------------------------------------------------------------------------------------
// GRAPE-AP path bias: bias(t, j) = sum_{l=j+1..t} psi(t, l), psi(t, l) = m_h logsigmoid(p_t . r_l / P)
// ---------------------------------------------------------------------------------------------------------

// The probes r of keys [j0, j0 + nk) of head (b, h), transposed: Rt [P][kBK], zero-padded. By pack_cols'
// register transposes where P allows (8 with AVX2): the element-wise copy was the largest part of GRAPE-AP's
// attention in batched decode, where each call packs a tile for a single query row.
void pack_probe_keys(const Geometry& g, const BiasTerms& bias, int64_t b, int64_t h, int64_t j0, int64_t nk,
                     float* Rt) {
  const float* rows[kBK];
  row_pointers(bias.r, g.Tk, g.H, bias.P, b, h, j0, nk, rows);
  pack_cols(rows, nk, kBK, bias.P, bias.P, Rt);
}

// psi(t, l) of one query row against a packed key tile: its nv visible keys -> out[0, nv) (out[nv, kBK) = 0),
// and m_h sigmoid(-x) / P (dpsi / d(p.r)) into dout when non-null. Only the first nv keys rounded up to
// whole kLanes groups are computed: on a diagonal tile a row sees r + 1 keys, and the masked rest was over a
// third of the tile's psi (each lane's value is the same either way).
GRAPE_INLINE void psi_row(const float* pt, const float* Rt, int64_t P, float mh, int64_t nv, float* out,
                          float* dout) {
  const int32_t nb = int32_t(round_up(nv, kLanes));  // <= kBK; 32-bit j: AVX2 compares 8 lanes at once
  float x[kBK];
#pragma omp simd
  for (int32_t j = 0; j < nb; ++j) x[j] = 0.0f;
  for (int64_t e = 0; e < P; ++e) {
    const float pe = pt[e];
    const float* re = Rt + e * kBK;
#pragma omp simd
    for (int32_t j = 0; j < nb; ++j) x[j] += pe * re[j];
  }
  const float invP = 1.0f / float(P);
  const int32_t n = int32_t(nv);
  if (dout) {
#pragma omp simd
    for (int32_t j = 0; j < nb; ++j) {
      float psi, dx;
      psi_grad_inline(x[j] * invP, mh, psi, dx);
      out[j] = j < n ? psi : 0.0f;
      dout[j] = j < n ? dx * invP : 0.0f;
    }
    std::fill(dout + nb, dout + kBK, 0.0f);
  } else {
#pragma omp simd
    for (int32_t j = 0; j < nb; ++j) out[j] = j < n ? psi_inline(x[j] * invP, mh) : 0.0f;
  }
  std::fill(out + nb, out + kBK, 0.0f);
}

// The path bias of a tile of query rows [i0, i0 + rows) (padded to Mp) against keys [j0, j0 + nk) of head
// (b, h), whose probes are packed in Rt: PB[r][j] = carry[r] + sum_{j < l < nv(r)} psi(i0 + r, j0 + l), where
// carry[r] holds the row's psi summed over the later key tiles; then carry[r] += the tile's psi. With SG,
// also m_h sigmoid(-x) / P per entry (0 where masked), for the backward.
GRAPE_SIMD
void path_tile(const Geometry& g, const BiasTerms& bias, int64_t b, int64_t h, int64_t i0, int64_t rows,
               int64_t Mp, int64_t j0, int64_t nk, const float* Rt, double* carry, float* PB, float* SG) {
  const float mh = bias.m[h];
  for (int64_t r = 0; r < Mp; ++r) {
    const int64_t nv = r < rows ? g.visible(i0 + r, j0, nk) : 0;
    float* pb = PB + r * kBK;
    if (nv == 0) {
      std::fill(pb, pb + kBK, 0.0f);
      if (SG) std::fill(SG + r * kBK, SG + (r + 1) * kBK, 0.0f);
      continue;
    }
    psi_row(bias.p + ((b * g.Tq + i0 + r) * g.H + h) * bias.P, Rt, bias.P, mh, nv, pb,
            SG ? SG + r * kBK : nullptr);
    const float total = suffix_sums<kBK>(pb, pb);  // psi is 0 past nv
    const double c = carry[r];
#pragma omp simd
    for (int64_t j = 0; j < kBK; ++j) pb[j] = float(c + double(pb[j]));
    carry[r] = c + double(total);
  }
}

// Backward of the path bias for one tile, after the softmax backward left dS in dS: dpsi(t, l) = sum_{j<l}
// dS(t, j) = -(carry_ds[r] + sum_{j >= l in the tile} dS(t, j)) (rows of dS sum to 0; carry_ds holds the
// row's dS summed over later key tiles, and is advanced here). G = dpsi * SG (in place of SG) feeds dp_t +=
// sum_l G r_l (dPq rows [rows][P]) and dr_l += sum_t G p_t (drT [P][kBK]).
GRAPE_SIMD_DEFAULT_WIDTH
void path_grad(const Geometry& g, const BiasTerms& bias, int64_t b, int64_t h, int64_t i0, int64_t rows,
               int64_t Mp, const float* dS, float* SG, double* carry_ds, const float* Rt, float* dPq,
               float* drT) {
  const int64_t P = bias.P;
  for (int64_t r = 0; r < Mp; ++r) {  // rows past `rows` have dS = SG = 0
    const float* ds = dS + r * kBK;
    float* sg = SG + r * kBK;
    float ex[kBK];
    const float total = suffix_sums<kBK>(ds, ex);
    const float cf = r < rows ? float(carry_ds[r]) : 0.0f;
#pragma omp simd
    for (int64_t j = 0; j < kBK; ++j) sg[j] *= -(cf + (ex[j] + ds[j]));  // the inclusive suffix sum
    if (r < rows) carry_ds[r] += double(total);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float* gr = SG + r * kBK;
    const float* pt = bias.p + ((b * g.Tq + i0 + r) * g.H + h) * P;
    float* dp = dPq + r * P;
    for (int64_t e = 0; e < P; ++e) {
      const float* re = Rt + e * kBK;
      float* dre = drT + e * kBK;
      const float pe = pt[e];
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < kBK; ++j) {
        sum += gr[j] * re[j];
        dre[j] += gr[j] * pe;
      }
      dp[e] += sum;
    }
  }
}

}  // namespace

GRAPE_SIMD
double psi_sum(const Geometry& g, const BiasTerms& bias, int64_t b, int64_t h, int64_t i, int64_t l0,
               int64_t l1, float* Rt, float* psi) {
  const float* pt = bias.p + ((b * g.Tq + i) * g.H + h) * bias.P;
  double sum = 0.0;
  for (int64_t j0 = l0; j0 < l1; j0 += kBK) {
    const int64_t nk = std::min(kBK, l1 - j0);
    pack_probe_keys(g, bias, b, h, j0, nk, Rt);
    psi_row(pt, Rt, bias.P, bias.m[h], nk, psi, nullptr);
    float tile = 0.0f;
#pragma omp simd reduction(+ : tile)
    for (int64_t j = 0; j < kBK; ++j) tile += psi[j];  // 0 past nk
    sum += double(tile);
  }
  return sum;
}

// ---------------------------------------------------------------------------------------------------------
// TileBias
// ---------------------------------------------------------------------------------------------------------

TileBias::TileBias(Carver& carver, const Geometry& g, const BiasTerms& terms, int64_t query_rows,
                   bool backward)
    : g(g),
      terms(terms),
      any(terms.any()),
      path(terms.path()),
      table(terms.dist != nullptr),
      P(terms.path() ? terms.P : 0),
      query_rows(query_rows) {
  const int64_t tile_floats = path ? kBQ * kBK : 0, path_rows = path ? query_rows : 0;
  kb = carver.take(kBK), kd = carver.take(kBK);
  dt = carver.take(kDiag);
  Rt = carver.take(P * kBK), PB = carver.take(tile_floats);
  carry = carver.take_doubles(path_rows);
  if (!backward) {
    SG = drT = dPq = nullptr;
    carry_ds = col_b = col_d = row_a = row_c = diag = nullptr;
    return;
  }
  SG = carver.take(tile_floats), carry_ds = carver.take_doubles(path_rows);
  dPq = carver.take(query_rows * P), drT = carver.take(P * kBK);
  col_b = carver.take_doubles(kBK), col_d = carver.take_doubles(kBK);
  row_a = carver.take_doubles(query_rows), row_c = carver.take_doubles(query_rows);
  diag = carver.take_doubles(kDiag);
  if (diag) std::fill(diag, diag + kDiag, 0.0);  // (null while sizing) then cleared by each tile's scatter
}

void TileBias::keys(int64_t b_, int64_t h_, int64_t j0_, int64_t nk_) {
  b = b_, h = h_, j0 = j0_, nk = nk_;
  if (!any) return;  // logits_row reads none of the key terms
  const int64_t ks = g.k_stat(b, h) + j0;
  pack_key_terms(terms.b ? terms.b + ks : nullptr, nk, kb);
  pack_key_terms(terms.d ? terms.d + ks : nullptr, nk, kd);
  if (path) pack_probe_keys(g, terms, b, h, j0, nk, Rt);
}

void TileBias::tile(int64_t i0_, int64_t rows, int64_t Mp, int64_t qrow_) {
  i0 = i0_, qrow = qrow_;
  const int64_t qs = g.q_stat(b, h) + i0;
  a_rows = terms.a ? terms.a + qs : nullptr;
  c_rows = terms.c ? terms.c + qs : nullptr;
  if (table) pack_dist_tile(g, terms, h, i0, j0, dt);
  if (path) path_tile(g, terms, b, h, i0, rows, Mp, j0, nk, Rt, carry + qrow, PB, SG);
}

void TileBias::start_carries(int64_t rows, const double* carry0, int64_t stride) {
  if (!path) return;
  for (int64_t r = 0; r < rows; ++r) carry[r] = carry0 ? carry0[r * stride] : 0.0;
}

void TileBias::grads(const BiasGrads& out, bool key_side, bool query_side) {
  grad_a = query_side && out.da && terms.a;
  grad_c = query_side && out.dc && terms.c;
  grad_b = key_side && out.db && terms.b;
  grad_d = key_side && out.dd && terms.d;
  grad_dist = key_side && out.ddist && terms.dist;
}

void TileBias::grad_tile(int64_t rows, int64_t Mp, const float* dS) {
  if (grad_dist) scatter_dist_grad(g, terms.W, i0, j0, diag, dist_grad);
  if (path) path_grad(g, terms, b, h, i0, rows, Mp, dS, SG, carry_ds + qrow, Rt, dPq + qrow * P, drT);
}

void TileBias::clear_key_sums() {
  std::fill(col_b, col_b + kBK, 0.0);
  std::fill(col_d, col_d + kBK, 0.0);
  if (path) std::fill(drT, drT + P * kBK, 0.0f);
}

void TileBias::store_key_grads(int64_t b_, int64_t h_, int64_t j0_, int64_t nk_, const BiasGrads& out) const {
  const int64_t ks = g.k_stat(b_, h_) + j0_;
  for (int64_t j = 0; j < nk_; ++j) {
    if (grad_b) out.db[ks + j] = float(col_b[j]);
    if (grad_d) out.dd[ks + j] = float(col_d[j]);
  }
  if (path && out.dr)
    for (int64_t j = 0; j < nk_; ++j)
      for (int64_t e = 0; e < P; ++e) out.dr[((b_ * g.Tk + j0_ + j) * g.H + h_) * P + e] = drT[e * kBK + j];
}

void TileBias::clear_query_sums() {
  std::fill(row_a, row_a + query_rows, 0.0);
  std::fill(row_c, row_c + query_rows, 0.0);
  if (!path) return;
  std::fill(carry, carry + query_rows, 0.0);
  std::fill(carry_ds, carry_ds + query_rows, 0.0);
  std::fill(dPq, dPq + query_rows * P, 0.0f);
}

void TileBias::store_query_grads(int64_t b_, int64_t h_, int64_t i0_, int64_t rows,
                                 const BiasGrads& out) const {
  const int64_t qs = g.q_stat(b_, h_) + i0_;
  for (int64_t i = 0; i < rows; ++i) {
    if (grad_a) out.da[qs + i] = float(row_a[i]);
    if (grad_c) out.dc[qs + i] = float(row_c[i]);
  }
  if (path && out.dp)
    for (int64_t i = 0; i < rows; ++i)
      std::copy(dPq + i * P, dPq + (i + 1) * P, out.dp + ((b_ * g.Tq + i0_ + i) * g.H + h_) * P);
}

}  // namespace grape::kernels::cpu
