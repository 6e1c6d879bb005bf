// Fused causal attention on the CPU, FlashAttention-2 order (the contract is in attention.hpp).
//
// Work split: when there are at least as many (batch, head) pairs as threads, one OpenMP task is a whole
// (batch, head): the forward packs the head's keys once for all its query tiles, and the backward runs one
// pass over the head's key tiles (5 tile products per tile pair). Otherwise one task is a tile of kBQ query
// rows of one (batch, head) (forward, backward pass 2), a tile of kBK keys (backward pass 1), or a block of
// kDecodeBlock keys (decode). A task packs the rows it reads into contiguous, zero-padded, thread-local
// buffers (the head's rows are strided by H*D in memory); only decode's few query rows (<= kDirectRows) read
// the key and value rows in place instead, since each is used once per query row:
//   Q, dO:  [kBQ][Dp]  row-major          K^T, V^T: [Dp][kBK]  (so q.k runs over contiguous keys)
//   K, V:   [kBK][Dp]  row-major          S, P, dS: [kBQ][kBK]
// with Dp = D rounded up to kNR. Every matrix product is one call of gemm_tile, a register-blocked
// micro-kernel (kMR x 2 kNR with AVX-512, kMR x kNR otherwise) written as plain loops the compiler
// vectorises (see GRAPE_SIMD for the instruction sets), or for decode's few rows dots_direct/pv_direct
// (tile.hpp). exp is exp_inline (simd_math.hpp), a branch-free polynomial that vectorises (std::exp does not
// without -ffast-math).
//
// Masking: within a key tile the keys a query row sees form a prefix (keys j <= i + q_offset - k_offset), so
// every softmax loop simply runs over that prefix; key tiles beyond a query tile's causal frontier are
// never visited.
#include "kernels/cpu/attention.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "kernels/cpu/simd_math.hpp"
#include "kernels/cpu/tile.hpp"

namespace grape::kernels::cpu {
namespace {

// keys per decode task when the heads alone cannot keep the threads busy
constexpr int64_t kDecodeBlock = 256;
constexpr int64_t kDirectRows = 4;  // up to this many query rows, k and v rows are read in place, not packed
constexpr int64_t kDiag = kBQ + kBK - 1;  // diagonals of a tile: the distinct distances of its pairs

// Per-key bias quantities of one key tile (zero where the term is absent or past the tile's end).
void pack_key_bias(const float* src, int64_t n, float* dst) {
  for (int64_t j = 0; j < kBK; ++j) dst[j] = (src && j < n) ? src[j] : 0.0f;
}

// ---------------------------------------------------------------------------------------------------------
// Per-tile logits, softmax and its backward
// ---------------------------------------------------------------------------------------------------------

// Everything one tile needs to turn raw q.k dots into logits: logit = scale * dot + a_i + b_j +
// (c_i + d_j) * (pos_i - pos_j). Query quantities point at the tile's first row, key ones are packed.
struct TileLogits {
  const Geometry* g;
  int64_t i0, j0, nk;  // first query row, first key, keys in the tile
  const float* a;      // [rows] or null
  const float* c;      // [rows] or null
  const float* kb;     // [kBK], zero-padded (all zero if b is absent)
  const float* kd;     // [kBK], zero-padded
  const float* pb;     // [kBQ][kBK] path bias of the tile (path_tile), or null
  const float* dt;     // [kDiag] distance-table entries of the tile by diagonal (pack_dist_tile), or null
  bool has_bias;
  float dist0(int64_t r) const {  // pos_i - pos_j0 for row r: distances are small integers, exact in fp32
    return float((g->q_offset + i0 + r) - (g->k_offset + j0));
  }
};

void pack_dist_tile(const Geometry& g, const BiasTerms& bias, int64_t h, int64_t i0, int64_t j0, float* dt);

// The logits of the tile of query rows from i0 and keys [j0, j0 + nk) of head (b, h); kb, kd are the packed
// key quantities. With a distance table and a buffer dt [kDiag], the tile's table entries are packed there.
TileLogits tile_logits(const Geometry& g, const BiasTerms& bias, int64_t b, int64_t h, int64_t i0, int64_t j0,
                       int64_t nk, const float* kb, const float* kd, float* dt = nullptr) {
  const int64_t qs = g.q_stat(b, h) + i0;
  const bool with_dist = bias.dist && dt;
  if (with_dist) pack_dist_tile(g, bias, h, i0, j0, dt);
  return {.g = &g,
          .i0 = i0,
          .j0 = j0,
          .nk = nk,
          .a = bias.a ? bias.a + qs : nullptr,
          .c = bias.c ? bias.c + qs : nullptr,
          .kb = kb,
          .kd = kd,
          .pb = nullptr,
          .dt = with_dist ? dt : nullptr,
          .has_bias = bias.any()};
}

// Row r of S: the raw dots -> logits, in place, over all kBK columns; the keys past the row's nv visible ones
// get -inf. Fixed-length loops: the compiler unrolls them into whole vectors, and every later loop over the
// row needs no remainder (the masked entries' exp is 0).
inline void logits_row(const TileLogits& t, int64_t r, int64_t nv, float* s) {
  const float scale = t.g->scale;
  if (!t.has_bias) {
#pragma omp simd
    for (int64_t j = 0; j < kBK; ++j) s[j] = j < nv ? scale * s[j] : kNegInf;
    return;
  }
  const float ai = t.a ? t.a[r] : 0.0f, ci = t.c ? t.c[r] : 0.0f, d0 = t.dist0(r);
  const float* kb = t.kb;
  const float* kd = t.kd;
#pragma omp simd
  for (int64_t j = 0; j < kBK; ++j) s[j] = scale * s[j] + ai + kb[j] + (ci + kd[j]) * (d0 - float(j));
  if (t.pb) {
    const float* pb = t.pb + r * kBK;
#pragma omp simd
    for (int64_t j = 0; j < kBK; ++j) s[j] += pb[j];
  }
  if (t.dt) {  // key j of row r lies on diagonal j - r + kBQ - 1
    const float* dt = t.dt + (kBQ - 1 - r);
#pragma omp simd
    for (int64_t j = 0; j < kBK; ++j) s[j] += dt[j];
  }
#pragma omp simd
  for (int64_t j = 0; j < kBK; ++j) s[j] = j < nv ? s[j] : kNegInf;
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

// Adds a tile's per-diagonal sums of dS (diag, filled by dsoftmax_step) to the gradient row of its head's
// table (grad [W], double), at the clamped distances, and clears diag for the next tile.
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

// The probes r of keys [j0, j0 + nk) of head (b, h), transposed: Rt [P][kBK], zero-padded.
void pack_probe_keys(const Geometry& g, const BiasTerms& bias, int64_t b, int64_t h, int64_t j0, int64_t nk,
                     float* Rt) {
  const int64_t P = bias.P;
  std::fill(Rt, Rt + P * kBK, 0.0f);
  for (int64_t j = 0; j < nk; ++j) {
    const float* r = bias.r + ((b * g.Tk + j0 + j) * g.H + h) * P;
    for (int64_t e = 0; e < P; ++e) Rt[e * kBK + j] = r[e];
  }
}

// psi(t, l) of one query row against a packed key tile: its nv visible keys -> out[0, nv) (out[nv, kBK) = 0),
// and m_h sigmoid(-x) / P (dpsi / d(p.r)) into dout when non-null.
GRAPE_INLINE void psi_row(const float* pt, const float* Rt, int64_t P, float mh, int64_t nv, float* out,
                          float* dout) {
  float x[kBK];
#pragma omp simd
  for (int64_t j = 0; j < kBK; ++j) x[j] = 0.0f;
  for (int64_t e = 0; e < P; ++e) {
    const float pe = pt[e];
    const float* re = Rt + e * kBK;
#pragma omp simd
    for (int64_t j = 0; j < kBK; ++j) x[j] += pe * re[j];
  }
  const float invP = 1.0f / float(P);
  if (dout) {
#pragma omp simd
    for (int64_t j = 0; j < kBK; ++j) {
      float psi, dx;
      psi_grad_inline(x[j] * invP, mh, psi, dx);
      out[j] = j < nv ? psi : 0.0f;
      dout[j] = j < nv ? dx * invP : 0.0f;
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < kBK; ++j) out[j] = j < nv ? psi_inline(x[j] * invP, mh) : 0.0f;
  }
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

// Backward of the path bias for one tile, after dsoftmax_step left dS in dS: dpsi(t, l) = sum_{j<l} dS(t, j)
// = -(carry_ds[r] + sum_{j >= l in the tile} dS(t, j)) (rows of dS sum to 0; carry_ds holds the row's dS
// summed over later key tiles, and is advanced here). G = dpsi * SG (in place of SG) feeds
// dp_t += sum_l G r_l (dPq rows [rows][P]) and dr_l += sum_t G p_t (drT [P][kBK]).
GRAPE_SIMD
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

// psi(t, l) of query row i of head (b, h) summed over the keys [l0, l1) (decode's path-bias pre-pass), per
// key tile in fp32, the tiles in double. Rt [P][kBK] and psi [kBK]: scratch.
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

// Forward, one online-softmax step over a key tile: S [kBQ][kBK] holds the raw dots of the first `rows` query
// rows; on return it holds p = exp(logit - m_new) (0 where masked and in padding rows up to Mp), the running
// max m and sum l are updated and the accumulator O [kBQ][Dp] is rescaled by exp(m_old - m_new).
GRAPE_SIMD
void softmax_step(const TileLogits& t, int64_t rows, int64_t Mp, int64_t Dp, float* S, float* m, float* l,
                  float* O) {
  // Three sweeps, so that the per-row scalar work (the new max, its correction factor alpha) runs as vectors
  // across the rows: logits and row maxima; alpha for every row; exponentials, sums and the rescale of O.
  float mnew[kBQ], alpha[kBQ];
  int64_t nvis[kBQ];
  for (int64_t r = 0; r < Mp; ++r) {
    float* s = S + r * kBK;
    nvis[r] = r < rows ? t.g->visible(t.i0 + r, t.j0, t.nk) : 0;
    if (nvis[r] == 0) {  // nothing visible: the row's state stays as it is
      std::fill(s, s + kBK, 0.0f);
      mnew[r] = m[r];
      continue;
    }
    logits_row(t, r, nvis[r], s);
    mnew[r] = std::max(m[r], row_max<kBK>(s));  // a NaN m (a poisoned row) stays NaN
  }
#pragma omp simd
  for (int64_t r = 0; r < Mp; ++r)
    alpha[r] = exp_inline(m[r] - mnew[r]);  // 0 on a row's first tile (m = -inf)
  for (int64_t r = 0; r < Mp; ++r) {
    const int64_t nv = nvis[r];
    if (nv == 0) continue;
    float* s = S + r * kBK;
    if (mnew[r] == kNegInf) {  // every logit is -inf or NaN (the max skips NaN): nothing to add here
      if (std::any_of(s, s + nv, [](float x) { return std::isnan(x); })) {  // but NaN must poison the row
        m[r] = l[r] = std::numeric_limits<float>::quiet_NaN();
        std::fill(O + r * Dp, O + (r + 1) * Dp, m[r]);
      }
      std::fill(s, s + kBK, 0.0f);
      continue;
    }
    const float sum = row_exp_sum<kBK>(s, mnew[r]);
    m[r] = mnew[r];
    l[r] = l[r] * alpha[r] + sum;
    if (alpha[r] != 1.0f) {
      const float a = alpha[r];
      float* o = O + r * Dp;
#pragma omp simd
      for (int64_t d = 0; d < Dp; ++d) o[d] *= a;
    }
  }
}

// Backward, one tile: S holds the raw dots and dP = dO V^T. On return S holds P = exp(logit - lse) and dP
// holds dS = P * (dP - Delta) (both 0 where masked and in padding rows up to Mp). Optionally reduces dS for
// the bias gradients: per key (col_b += dS, col_d += dS * dist), per query (row_a, row_c likewise) or per
// diagonal of the tile (diag [kDiag], for the distance table), in double.
GRAPE_SIMD
void dsoftmax_step(const TileLogits& t, int64_t rows, int64_t Mp, const float* lse, const float* delta,
                   float* S, float* dP, double* col_b, double* col_d, double* row_a, double* row_c,
                   double* diag = nullptr) {
  for (int64_t r = 0; r < Mp; ++r) {
    float* s = S + r * kBK;
    float* ds = dP + r * kBK;
    const int64_t nv = r < rows ? t.g->visible(t.i0 + r, t.j0, t.nk) : 0;
    if (nv == 0) {
      std::fill(s, s + kBK, 0.0f);
      std::fill(ds, ds + kBK, 0.0f);
      continue;
    }
    logits_row(t, r, nv, s);
    const float li = lse[r], di = delta[r];
#pragma omp simd
    for (int64_t j = 0; j < kBK; ++j) {
      const float p = exp_inline(s[j] - li);  // 0 where masked (-inf)
      s[j] = p;
      ds[j] = j < nv ? p * (ds[j] - di) : 0.0f;  // not 0 * dP: a masked key's dP may be inf or NaN
    }
    const double d0 = t.dist0(r);
    if (col_b) {
#pragma omp simd
      for (int64_t j = 0; j < nv; ++j) col_b[j] += ds[j];
    }
    if (col_d) {
#pragma omp simd
      for (int64_t j = 0; j < nv; ++j) col_d[j] += double(ds[j]) * (d0 - double(j));
    }
    if (row_a || row_c) {
      double sa = 0.0, sc = 0.0;
#pragma omp simd reduction(+ : sa, sc)
      for (int64_t j = 0; j < nv; ++j) {
        sa += ds[j];
        sc += double(ds[j]) * (d0 - double(j));
      }
      if (row_a) row_a[r] += sa;
      if (row_c) row_c[r] += sc;
    }
    if (diag) {
      double* dg = diag + (kBQ - 1 - r);
#pragma omp simd
      for (int64_t j = 0; j < nv; ++j) dg[j] += ds[j];
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Forward core, shared by attention_forward and attention_decode
// ---------------------------------------------------------------------------------------------------------

struct ForwardWork {
  float *Q, *Kt, *V, *S, *O, *m, *l, *kb, *kd;
  float* dt;           // distance table: the tile's entries by diagonal [kDiag]
  float *Rt, *PB;      // path bias: key probes [P][kBK], the tile's bias [kBQ][kBK]
  double* carry;       // path bias: per query row, psi summed over the key tiles already visited
  const float** rows;  // scratch row pointers (kBQ or kBK of them)

  static int64_t floats(int64_t Dp, int64_t P) {
    const int64_t pb = P > 0 ? kBQ * kBK : 0;
    return Carver::size({kBQ * Dp, Dp * kBK, kBK * Dp, kBQ * kBK, kBQ * Dp, kBQ, kBQ, kBK, kBK, kDiag,
                         P * kBK, pb, 2 * kBQ, int64_t(kBK * sizeof(void*) / sizeof(float))});
  }
  ForwardWork(float* mem, int64_t Dp, int64_t P) {
    Carver c{mem};
    Q = c.take(kBQ * Dp), Kt = c.take(Dp * kBK), V = c.take(kBK * Dp), S = c.take(kBQ * kBK);
    O = c.take(kBQ * Dp), m = c.take(kBQ), l = c.take(kBQ), kb = c.take(kBK), kd = c.take(kBK);
    dt = c.take(kDiag);
    Rt = c.take(P * kBK), PB = c.take(P > 0 ? kBQ * kBK : 0);
    carry = reinterpret_cast<double*>(c.take(2 * kBQ));
    rows = reinterpret_cast<const float**>(c.take(int64_t(kBK * sizeof(void*) / sizeof(float))));
  }
};

// Online softmax of query rows [i0, i0 + rows) of head (b, h) over keys [kbeg, kend): leaves the running max
// m, sum l and the unnormalised accumulator O (rows x Dp) in w. rows <= kBQ; kbeg is a multiple of kBK.
// Kt_all / V_all, when given, hold the head's keys already packed (pack_head_keys); otherwise each key tile
// is packed here, or, for at most kDirectRows rows, the key and value rows are read in place. The key tiles
// are visited from the last one down (the softmax does not mind the order), so that the path bias's per-row
// carry (psi summed over the keys after the tile) grows as it goes; it starts from carry0[r * carry_stride]
// (psi summed over keys from kend on; decode), or 0.
void flash_rows(const Geometry& g, const float* q, const float* k, const float* v, const BiasTerms& bias,
                int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t kbeg, int64_t kend, ForwardWork& w,
                const float* Kt_all = nullptr, const float* V_all = nullptr, const double* carry0 = nullptr,
                int64_t carry_stride = 0) {
  const int64_t Dp = g.Dp, Mp = round_up(rows, kMR);
  row_pointers(q, g.Tq, g.H, g.D, b, h, i0, rows, w.rows);
  pack_rows(w.rows, rows, Mp, g.D, Dp, w.Q);
  std::fill(w.m, w.m + kBQ, kNegInf);
  std::fill(w.l, w.l + kBQ, 0.0f);
  std::fill(w.O, w.O + kBQ * Dp, 0.0f);
  const int64_t ks = g.k_stat(b, h);
  TileLogits t = tile_logits(g, bias, b, h, i0, 0, 0, w.kb, w.kd);
  if (bias.dist) t.dt = w.dt;
  if (bias.path()) {
    t.pb = w.PB;
    for (int64_t r = 0; r < rows; ++r) w.carry[r] = carry0 ? carry0[r * carry_stride] : 0.0;
  }
  if (kend <= kbeg) return;
  const bool direct = !Kt_all && rows <= kDirectRows;
  for (int64_t j0 = kbeg + (kend - 1 - kbeg) / kBK * kBK; j0 >= kbeg; j0 -= kBK) {
    const int64_t nk = std::min(kBK, kend - j0);
    t.j0 = j0, t.nk = nk;
    pack_key_bias(bias.b ? bias.b + ks + j0 : nullptr, nk, w.kb);
    pack_key_bias(bias.d ? bias.d + ks + j0 : nullptr, nk, w.kd);
    if (bias.dist) pack_dist_tile(g, bias, h, i0, j0, w.dt);
    if (bias.path()) {
      pack_probe_keys(g, bias, b, h, j0, nk, w.Rt);
      path_tile(g, bias, b, h, i0, rows, Mp, j0, nk, w.Rt, w.carry, w.PB, nullptr);
    }
    if (direct) {  // S = Q K^T, softmax, O += P V with the key and value rows read where they are
      row_pointers(k, g.Tk, g.H, g.D, b, h, j0, nk, w.rows);
      dots_direct(rows, nk, g.D, Dp, w.Q, w.rows, w.S);
      softmax_step(t, rows, Mp, Dp, w.S, w.m, w.l, w.O);
      row_pointers(v, g.Tk, g.H, g.D, b, h, j0, nk, w.rows);
      pv_direct(rows, nk, g.D, Dp, w.S, w.rows, w.O);
      continue;
    }
    const float* Kt = w.Kt;
    const float* V = w.V;
    if (Kt_all) {
      Kt = Kt_all + (j0 / kBK) * Dp * kBK, V = V_all + j0 * Dp;
    } else {
      row_pointers(k, g.Tk, g.H, g.D, b, h, j0, nk, w.rows);
      pack_cols(w.rows, nk, kBK, g.D, Dp, w.Kt);
      row_pointers(v, g.Tk, g.H, g.D, b, h, j0, nk, w.rows);
      pack_rows(w.rows, nk, nk, g.D, Dp, w.V);
    }
    gemm_tile(Mp, kBK, Dp, w.Q, Dp, 1, Kt, kBK, w.S, kBK, false);  // S = Q K^T (raw dots)
    softmax_step(t, rows, Mp, Dp, w.S, w.m, w.l, w.O);             // S -> P, rescale O
    gemm_tile(Mp, Dp, nk, w.S, kBK, 1, V, Dp, w.O, Dp, true);      // O += P V
  }
}

// Packs the first nkt key tiles of head (b, h): Kt_all [nkt][Dp][kBK] (each tile transposed, as flash_rows
// packs it) and V_all [nkt kBK][Dp], zero-padded.
void pack_head_keys(const Geometry& g, const float* k, const float* v, int64_t b, int64_t h, int64_t nkt,
                    const float** rows, float* Kt_all, float* V_all) {
  for (int64_t kt = 0; kt < nkt; ++kt) {
    const int64_t j0 = kt * kBK, nk = std::clamp<int64_t>(g.Tk - j0, 0, kBK);
    row_pointers(k, g.Tk, g.H, g.D, b, h, j0, nk, rows);
    pack_cols(rows, nk, kBK, g.D, g.Dp, Kt_all + kt * g.Dp * kBK);
    row_pointers(v, g.Tk, g.H, g.D, b, h, j0, nk, rows);
    pack_rows(rows, nk, kBK, g.D, g.Dp, V_all + j0 * g.Dp);
  }
}

}  // namespace

float exp_f32(float x) { return exp_inline(x); }

// ---------------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------------

void attention_forward(const ForwardParams& p) {
  const AttentionShape& s = p.shape;
  const float *q = p.q, *k = p.k, *v = p.v;
  const BiasTerms& bias = p.bias;
  float *out = p.out, *lse = p.lse;
  validate("attention_forward", s, q, k, v, bias);
  check(out && lse, "attention_forward", "out and lse must not be null");
  const Geometry g(s);
  const int64_t n_qt = ceil_div(g.Tq, kBQ);
  auto finish_rows = [&](int64_t b, int64_t h, int64_t i0, int64_t rows, const ForwardWork& w) {
    for (int64_t r = 0; r < rows; ++r) {  // out = O / l, lse = m + log l
      const float inv = 1.0f / w.l[r];
      float* o = out + ((b * g.Tq + i0 + r) * g.H + h) * g.D;
      for (int64_t d = 0; d < g.D; ++d) o[d] = w.O[r * g.Dp + d] * inv;
      lse[g.q_stat(b, h) + i0 + r] = w.m[r] + std::log(w.l[r]);
    }
  };
  // With enough heads for the threads (at most 25% of the time idle on the last round), one task per (b, h)
  // packs the head's keys once (K^T tiles, V) and reuses them for every query tile; otherwise one task per
  // query tile packs the key tiles it visits.
  const int64_t heads = g.B * g.H, max_threads = omp_get_max_threads();
  const int64_t nkt = ceil_div(g.key_end(g.Tq), kBK), head_floats = 2 * nkt * kBK * g.Dp;
  const int head_threads = team_size(heads);
  const int64_t P = bias.path() ? bias.P : 0, fw_floats = ForwardWork::floats(g.Dp, P);
  if (4 * max_threads * ceil_div(heads, max_threads) <= 5 * heads &&
      (fw_floats + head_floats) * head_threads <= (int64_t(1) << 28)) {  // <= 1 GiB
    const Arena arena(head_threads, fw_floats + head_floats);
#pragma omp parallel num_threads(head_threads)
    {
      float* mem = arena.thread(omp_get_thread_num());
      ForwardWork w(mem, g.Dp, P);
      float* Kt_all = mem + fw_floats;
      float* V_all = Kt_all + nkt * kBK * g.Dp;
#pragma omp for collapse(2) schedule(dynamic, 1)
      for (int64_t b = 0; b < g.B; ++b)
        for (int64_t h = 0; h < g.H; ++h) {
          pack_head_keys(g, k, v, b, h, nkt, w.rows, Kt_all, V_all);
          for (int64_t qt = 0; qt < n_qt; ++qt) {
            const int64_t i0 = qt * kBQ, rows = std::min(kBQ, g.Tq - i0);
            flash_rows(g, q, k, v, bias, b, h, i0, rows, 0, g.key_end(i0 + rows), w, Kt_all, V_all);
            finish_rows(b, h, i0, rows, w);
          }
        }
    }
    return;
  }
  const int threads = team_size(heads * n_qt);
  const Arena arena(threads, fw_floats);
#pragma omp parallel num_threads(threads)
  {
    ForwardWork w(arena.thread(omp_get_thread_num()), g.Dp, P);
#pragma omp for collapse(3) schedule(dynamic, 1)
    for (int64_t b = 0; b < g.B; ++b)
      for (int64_t h = 0; h < g.H; ++h)
        for (int64_t qt = 0; qt < n_qt; ++qt) {
          const int64_t i0 = qt * kBQ, rows = std::min(kBQ, g.Tq - i0);
          flash_rows(g, q, k, v, bias, b, h, i0, rows, 0, g.key_end(i0 + rows), w);
          finish_rows(b, h, i0, rows, w);
        }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Decode: one task per (b, h, query tile), or the keys split into blocks whose softmax states are merged
// ---------------------------------------------------------------------------------------------------------

void attention_decode(const DecodeParams& p) {
  const AttentionShape& s = p.shape;
  const float *q = p.q, *k = p.k, *v = p.v;
  const BiasTerms& bias = p.bias;
  float *out = p.out, *lse = p.lse;
  validate("attention_decode", s, q, k, v, bias);
  check(out && lse, "attention_decode", "out and lse must not be null");
  const Geometry g(s);
  const int64_t n_qt = ceil_div(g.Tq, kBQ), D = g.D;
  // With enough (batch, head, query tile) tasks for the threads (at most 20% idle), each task takes all its
  // keys; otherwise the keys are split into blocks of kDecodeBlock that threads take separately.
  const int64_t tasks = g.B * g.H * n_qt, max_threads = omp_get_max_threads();
  const int64_t block =
      4 * max_threads * ceil_div(tasks, max_threads) <= 5 * tasks ? round_up(g.Tk, kBK) : kDecodeBlock;
  const int64_t n_blk = ceil_div(g.Tk, block);
  // Partial states per (b, h, query row, block): m, l and the unnormalised output row.
  const int64_t part = D + 2, n_rows = g.B * g.H * g.Tq;
  const Arena partial(1, n_rows * n_blk * part);
  float* P = partial.thread(0);
  auto state = [&](int64_t b, int64_t h, int64_t i, int64_t blk) {
    return P + ((g.q_stat(b, h) + i) * n_blk + blk) * part;  // [m, l, o_0 .. o_{D-1}]
  };
  const int threads = team_size(tasks * n_blk);
  const int64_t Pp = bias.path() ? bias.P : 0;
  // Path bias over several blocks: the blocks run independently, so each starts from its carry, psi summed
  // over the later blocks (per query row): first every block's psi total (an O(Tq Tk P) pre-pass), then
  // exclusive suffix sums.
  const bool carries_needed = bias.path() && n_blk > 1;
  const Arena carries(1, carries_needed ? 2 * n_rows * n_blk : 0);
  double* carry = reinterpret_cast<double*>(carries.thread(0));
  if (carries_needed) {
    const int pre_threads = team_size(n_rows);
    const Arena scratch(pre_threads, Carver::size({Pp * kBK, kBK}));
#pragma omp parallel num_threads(pre_threads)
    {
      float* Rt = scratch.thread(omp_get_thread_num());
      float* psi = Rt + round_up(Pp * kBK, kAlign / 4);
#pragma omp for collapse(3)
      for (int64_t b = 0; b < g.B; ++b)
        for (int64_t h = 0; h < g.H; ++h)
          for (int64_t i = 0; i < g.Tq; ++i) {
            double* c = carry + (g.q_stat(b, h) + i) * n_blk;
            const int64_t kend = g.key_end(i + 1);  // the keys row i sees
            for (int64_t blk = 0; blk < n_blk; ++blk)
              c[blk] = psi_sum(g, bias, b, h, i, blk * block, std::min(kend, (blk + 1) * block), Rt, psi);
            double later = 0.0;
            for (int64_t blk = n_blk - 1; blk >= 0; --blk) {
              const double own = c[blk];
              c[blk] = later;
              later += own;
            }
          }
    }
  }
  const Arena arena(threads, ForwardWork::floats(g.Dp, Pp));
#pragma omp parallel num_threads(threads)
  {
    ForwardWork w(arena.thread(omp_get_thread_num()), g.Dp, Pp);
#pragma omp for collapse(4) schedule(dynamic, 1)
    for (int64_t b = 0; b < g.B; ++b)
      for (int64_t h = 0; h < g.H; ++h)
        for (int64_t qt = 0; qt < n_qt; ++qt)
          for (int64_t blk = 0; blk < n_blk; ++blk) {
            const int64_t i0 = qt * kBQ, rows = std::min(kBQ, g.Tq - i0);
            const int64_t kbeg = blk * block;
            const int64_t kend = std::min(kbeg + block, g.key_end(i0 + rows));
            if (kbeg < kend) {
              flash_rows(g, q, k, v, bias, b, h, i0, rows, kbeg, kend, w, nullptr, nullptr,
                         carries_needed ? carry + (g.q_stat(b, h) + i0) * n_blk + blk : nullptr, n_blk);
            } else {  // the whole block is in these queries' future
              std::fill(w.m, w.m + rows, kNegInf);
              std::fill(w.l, w.l + rows, 0.0f);
            }
            for (int64_t r = 0; r < rows; ++r) {
              float* st = state(b, h, i0 + r, blk);
              st[0] = w.m[r], st[1] = w.l[r];
              if (w.l[r] != 0.0f) std::memcpy(st + 2, w.O + r * g.Dp, size_t(D) * sizeof(float));
            }
          }
#pragma omp for collapse(3)
    for (int64_t b = 0; b < g.B; ++b)
      for (int64_t h = 0; h < g.H; ++h)
        for (int64_t i = 0; i < g.Tq; ++i) {  // merge: rescale every block to the common max
          float M = kNegInf;
          for (int64_t blk = 0; blk < n_blk; ++blk) {
            const float* st = state(b, h, i, blk);
            if (st[1] != 0.0f) M = std::max(M, st[0]);  // blocks with l = 0 saw no key
          }
          float L = 0.0f;
          float* o = out + ((b * g.Tq + i) * g.H + h) * D;
          std::fill(o, o + D, 0.0f);
          for (int64_t blk = 0; blk < n_blk; ++blk) {
            const float* st = state(b, h, i, blk);
            if (st[1] == 0.0f) continue;  // (a NaN l goes through, and poisons the row)
            const float wgt = exp_inline(st[0] - M);
            L += st[1] * wgt;
            for (int64_t d = 0; d < D; ++d) o[d] += st[2 + d] * wgt;
          }
          const float inv = 1.0f / L;
          for (int64_t d = 0; d < D; ++d) o[d] *= inv;
          lse[g.q_stat(b, h) + i] = M + std::log(L);
        }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward: one pass per (b, h) over its key tiles (all gradients), or, with fewer heads than threads,
// pass 1 over key tiles (dk, dv, db, dd, ddist) and pass 2 over query tiles (dq, da, dc)
// ---------------------------------------------------------------------------------------------------------

namespace {

struct BackwardWork {
  float *Q, *dO, *K, *Kt, *Vt, *S, *dS, *acc1, *acc2, *lse, *delta, *kb, *kd;
  double *sum1, *sum2;  // bias-gradient reductions
  float* dt;            // distance table: the tile's entries by diagonal [kDiag]
  double* diag;         // and the tile's dS summed per diagonal [kDiag]
  const float** rows;

  static int64_t floats(int64_t Dp) {
    const int64_t n = std::max(kBQ, kBK);
    return Carver::size({kBQ * Dp, kBQ * Dp, kBK * Dp, Dp * kBK, Dp * kBK, kBQ * kBK, kBQ * kBK, n * Dp,
                         n * Dp, kBQ, kBQ, kBK, kBK, 2 * n, 2 * n, kDiag, 2 * kDiag,
                         int64_t(n * sizeof(void*) / sizeof(float))});
  }
  BackwardWork(float* mem, int64_t Dp) {
    const int64_t n = std::max(kBQ, kBK);
    Carver c{mem};
    Q = c.take(kBQ * Dp), dO = c.take(kBQ * Dp), K = c.take(kBK * Dp), Kt = c.take(Dp * kBK);
    Vt = c.take(Dp * kBK), S = c.take(kBQ * kBK), dS = c.take(kBQ * kBK), acc1 = c.take(n * Dp);
    acc2 = c.take(n * Dp), lse = c.take(kBQ), delta = c.take(kBQ), kb = c.take(kBK), kd = c.take(kBK);
    sum1 = reinterpret_cast<double*>(c.take(2 * n)), sum2 = reinterpret_cast<double*>(c.take(2 * n));
    dt = c.take(kDiag), diag = reinterpret_cast<double*>(c.take(2 * kDiag));
    std::fill(diag, diag + kDiag, 0.0);
    rows = reinterpret_cast<const float**>(c.take(int64_t(n * sizeof(void*) / sizeof(float))));
  }
};

// Packs the query side of one query tile: Q, dO (rows padded to Mp), lse and Delta.
void pack_query_tile(const Geometry& g, const float* q, const float* dout, const float* lse,
                     const float* delta, int64_t b, int64_t h, int64_t i0, int64_t rows, BackwardWork& w) {
  const int64_t Mp = round_up(rows, kMR), qs = g.q_stat(b, h) + i0;
  row_pointers(q, g.Tq, g.H, g.D, b, h, i0, rows, w.rows);
  pack_rows(w.rows, rows, Mp, g.D, g.Dp, w.Q);
  row_pointers(dout, g.Tq, g.H, g.D, b, h, i0, rows, w.rows);
  pack_rows(w.rows, rows, Mp, g.D, g.Dp, w.dO);
  std::copy(lse + qs, lse + qs + rows, w.lse);
  std::copy(delta + qs, delta + qs + rows, w.delta);
}

// Packs the key side of one key tile: K^T, V^T (and K row-major when want_k), and the key bias quantities.
void pack_key_tile(const Geometry& g, const float* k, const float* v, const BiasTerms& bias, int64_t b,
                   int64_t h, int64_t j0, int64_t nk, bool want_k, BackwardWork& w) {
  const int64_t ks = g.k_stat(b, h) + j0;
  row_pointers(k, g.Tk, g.H, g.D, b, h, j0, nk, w.rows);
  pack_cols(w.rows, nk, kBK, g.D, g.Dp, w.Kt);
  if (want_k) pack_rows(w.rows, nk, kBK, g.D, g.Dp, w.K);
  row_pointers(v, g.Tk, g.H, g.D, b, h, j0, nk, w.rows);
  pack_cols(w.rows, nk, kBK, g.D, g.Dp, w.Vt);
  pack_key_bias(bias.b ? bias.b + ks : nullptr, nk, w.kb);
  pack_key_bias(bias.d ? bias.d + ks : nullptr, nk, w.kd);
}

// scale * acc rows [0, n) (leading dim Dp) -> n token rows of head (b, h) of a [B,T,H,D] tensor.
void store_rows(const Geometry& g, const float* acc, float scale, int64_t T, int64_t b, int64_t h, int64_t t0,
                int64_t n, float* dst) {
  for (int64_t r = 0; r < n; ++r) {
    float* o = dst + ((b * T + t0 + r) * g.H + h) * g.D;
    for (int64_t d = 0; d < g.D; ++d) o[d] = scale * acc[r * g.Dp + d];
  }
}

// One-pass backward workspace: the whole query side of one (b, h) (Q, dO packed, lse, Delta, and the dQ, da,
// dc accumulators) plus one key tile (K, K^T, V^T, bias terms, the dK, dV, db, dd accumulators) and S, dS.
struct OnePassWork {
  float *Q, *dO, *dQ, *lse, *delta, *K, *Kt, *Vt, *S, *dS, *dK, *dV, *kb, *kd;
  double *row_a, *row_c, *col_b, *col_d;
  // Path bias: key probes Rt [P][kBK], the tile's bias PB and m sigmoid(-x)/P -> G (SG) [kBQ][kBK],
  // per query row of the head the carries of psi and dS over later key tiles, and the dp [Tqp][P], dr^T
  // [P][kBK] accumulators.
  float *Rt, *PB, *SG, *dPq, *drT;
  double *carry_b, *carry_ds;
  float* dt;     // distance table: the tile's entries by diagonal [kDiag]
  double* diag;  // and the tile's dS summed per diagonal [kDiag]
  const float** rows;

  static int64_t floats(int64_t Tqp, int64_t Dp, int64_t P) {
    const int64_t pb = P > 0 ? kBQ * kBK : 0, pr = P > 0 ? 2 * Tqp : 0;
    return Carver::size(
        {Tqp * Dp,  Tqp * Dp,  Tqp * Dp,  Tqp,
         Tqp,       kBK * Dp,  Dp * kBK,  Dp * kBK,
         kBQ * kBK, kBQ * kBK, kBK * Dp,  kBK * Dp,
         kBK,       kBK,       2 * Tqp,   2 * Tqp,
         2 * kBK,   2 * kBK,   P * kBK,   pb,
         pb,        Tqp * P,   P * kBK,   pr,
         pr,        kDiag,     2 * kDiag, int64_t(std::max(Tqp, kBK) * sizeof(void*) / sizeof(float))});
  }
  OnePassWork(float* mem, int64_t Tqp, int64_t Dp, int64_t P) {
    const int64_t pb = P > 0 ? kBQ * kBK : 0, pr = P > 0 ? 2 * Tqp : 0;
    Carver c{mem};
    Q = c.take(Tqp * Dp), dO = c.take(Tqp * Dp), dQ = c.take(Tqp * Dp), lse = c.take(Tqp);
    delta = c.take(Tqp), K = c.take(kBK * Dp), Kt = c.take(Dp * kBK), Vt = c.take(Dp * kBK);
    S = c.take(kBQ * kBK), dS = c.take(kBQ * kBK), dK = c.take(kBK * Dp), dV = c.take(kBK * Dp);
    kb = c.take(kBK), kd = c.take(kBK);
    row_a = reinterpret_cast<double*>(c.take(2 * Tqp)), row_c = reinterpret_cast<double*>(c.take(2 * Tqp));
    col_b = reinterpret_cast<double*>(c.take(2 * kBK)), col_d = reinterpret_cast<double*>(c.take(2 * kBK));
    Rt = c.take(P * kBK), PB = c.take(pb), SG = c.take(pb), dPq = c.take(Tqp * P);
    drT = c.take(P * kBK);
    carry_b = reinterpret_cast<double*>(c.take(pr)), carry_ds = reinterpret_cast<double*>(c.take(pr));
    dt = c.take(kDiag), diag = reinterpret_cast<double*>(c.take(2 * kDiag));
    std::fill(diag, diag + kDiag, 0.0);
    rows =
        reinterpret_cast<const float**>(c.take(int64_t(std::max(Tqp, kBK) * sizeof(void*) / sizeof(float))));
  }
};

// The whole backward of head (b, h) in one pass over its key tiles: for each (query tile, key tile) pair
// S = Q K^T, P, dP = dO V^T and dS are computed once and feed dV += P^T dO, dK += dS^T Q (this key tile's
// accumulators) and dQ += dS K (the head's query accumulator): 5 tile products per pair. The key tiles go
// from the last down, so that the path bias's per-row carries (psi and dS summed over later keys) accumulate.
// gdist [W] (double), when non-null, accumulates this head's distance-table gradient.
void backward_head(const Geometry& g, const float* q, const float* k, const float* v, const BiasTerms& bias,
                   const float* dout, const float* lse, const float* delta, int64_t b, int64_t h, float* dq,
                   float* dk, float* dv, const BiasGrads& bg, OnePassWork& w, double* gdist) {
  const int64_t Dp = g.Dp, n_qt = ceil_div(g.Tq, kBQ), n_kt = ceil_div(g.Tk, kBK), Tqp = n_qt * kBQ;
  const int64_t qs = g.q_stat(b, h), ks0 = g.k_stat(b, h);
  row_pointers(q, g.Tq, g.H, g.D, b, h, 0, g.Tq, w.rows);
  pack_rows(w.rows, g.Tq, Tqp, g.D, Dp, w.Q);
  row_pointers(dout, g.Tq, g.H, g.D, b, h, 0, g.Tq, w.rows);
  pack_rows(w.rows, g.Tq, Tqp, g.D, Dp, w.dO);
  std::copy(lse + qs, lse + qs + g.Tq, w.lse);
  std::copy(delta + qs, delta + qs + g.Tq, w.delta);
  std::fill(w.dQ, w.dQ + Tqp * Dp, 0.0f);
  std::fill(w.row_a, w.row_a + Tqp, 0.0);
  std::fill(w.row_c, w.row_c + Tqp, 0.0);
  const bool path = bias.path();
  const int64_t P = path ? bias.P : 0;
  if (path) {
    std::fill(w.carry_b, w.carry_b + Tqp, 0.0);
    std::fill(w.carry_ds, w.carry_ds + Tqp, 0.0);
    std::fill(w.dPq, w.dPq + Tqp * P, 0.0f);
  }
  for (int64_t kt = n_kt - 1; kt >= 0; --kt) {
    const int64_t j0 = kt * kBK, nk = std::min(kBK, g.Tk - j0), Np = round_up(nk, kMR);
    std::fill(w.dK, w.dK + kBK * Dp, 0.0f);
    std::fill(w.dV, w.dV + kBK * Dp, 0.0f);
    std::fill(w.col_b, w.col_b + kBK, 0.0);
    std::fill(w.col_d, w.col_d + kBK, 0.0);
    if (path) std::fill(w.drT, w.drT + P * kBK, 0.0f);
    const int64_t first_row = std::max<int64_t>(0, j0 - g.delta);  // first query that sees key j0
    if (first_row < g.Tq) {
      if (path) pack_probe_keys(g, bias, b, h, j0, nk, w.Rt);
      const int64_t ks = ks0 + j0;
      row_pointers(k, g.Tk, g.H, g.D, b, h, j0, nk, w.rows);
      pack_cols(w.rows, nk, kBK, g.D, Dp, w.Kt);
      pack_rows(w.rows, nk, kBK, g.D, Dp, w.K);
      row_pointers(v, g.Tk, g.H, g.D, b, h, j0, nk, w.rows);
      pack_cols(w.rows, nk, kBK, g.D, Dp, w.Vt);
      pack_key_bias(bias.b ? bias.b + ks : nullptr, nk, w.kb);
      pack_key_bias(bias.d ? bias.d + ks : nullptr, nk, w.kd);
      for (int64_t qt = first_row / kBQ; qt < n_qt; ++qt) {
        const int64_t i0 = qt * kBQ, rows = std::min(kBQ, g.Tq - i0), Mp = round_up(rows, kMR);
        const float* Qt = w.Q + i0 * Dp;
        const float* dOt = w.dO + i0 * Dp;
        TileLogits t = tile_logits(g, bias, b, h, i0, j0, nk, w.kb, w.kd, w.dt);
        if (path) {
          path_tile(g, bias, b, h, i0, rows, Mp, j0, nk, w.Rt, w.carry_b + i0, w.PB, w.SG);
          t.pb = w.PB;
        }
        gemm_tile(Mp, kBK, Dp, Qt, Dp, 1, w.Kt, kBK, w.S, kBK, false);    // S = Q K^T
        gemm_tile(Mp, kBK, Dp, dOt, Dp, 1, w.Vt, kBK, w.dS, kBK, false);  // dP = dO V^T
        dsoftmax_step(t, rows, Mp, w.lse + i0, w.delta + i0, w.S, w.dS, bg.db ? w.col_b : nullptr,
                      bg.dd ? w.col_d : nullptr, bg.da ? w.row_a + i0 : nullptr,
                      bg.dc ? w.row_c + i0 : nullptr, gdist ? w.diag : nullptr);
        if (gdist) scatter_dist_grad(g, bias.W, i0, j0, w.diag, gdist);
        if (path)
          path_grad(g, bias, b, h, i0, rows, Mp, w.dS, w.SG, w.carry_ds + i0, w.Rt, w.dPq + i0 * P, w.drT);
        gemm_tile(Np, Dp, rows, w.S, 1, kBK, dOt, Dp, w.dV, Dp, true);           // dV += P^T dO
        gemm_tile(Np, Dp, rows, w.dS, 1, kBK, Qt, Dp, w.dK, Dp, true);           // dK += dS^T Q
        gemm_tile(Mp, Dp, nk, w.dS, kBK, 1, w.K, Dp, w.dQ + i0 * Dp, Dp, true);  // dQ += dS K
      }
    }
    store_rows(g, w.dK, g.scale, g.Tk, b, h, j0, nk, dk);
    store_rows(g, w.dV, 1.0f, g.Tk, b, h, j0, nk, dv);
    for (int64_t j = 0; j < nk; ++j) {
      if (bg.db) bg.db[ks0 + j0 + j] = float(w.col_b[j]);
      if (bg.dd) bg.dd[ks0 + j0 + j] = float(w.col_d[j]);
    }
    if (bg.dr)
      for (int64_t j = 0; j < nk; ++j)
        for (int64_t e = 0; e < P; ++e) bg.dr[((b * g.Tk + j0 + j) * g.H + h) * P + e] = w.drT[e * kBK + j];
  }
  store_rows(g, w.dQ, g.scale, g.Tq, b, h, 0, g.Tq, dq);
  for (int64_t i = 0; i < g.Tq; ++i) {
    if (bg.da) bg.da[qs + i] = float(w.row_a[i]);
    if (bg.dc) bg.dc[qs + i] = float(w.row_c[i]);
  }
  if (bg.dp)
    for (int64_t i = 0; i < g.Tq; ++i)
      std::copy(w.dPq + i * P, w.dPq + (i + 1) * P, bg.dp + ((b * g.Tq + i) * g.H + h) * P);
}

}  // namespace

void attention_backward(const BackwardParams& p) {
  const AttentionShape& s = p.shape;
  const float *q = p.q, *k = p.k, *v = p.v;
  const BiasTerms& bias = p.bias;
  const float *out = p.out, *dout = p.dout, *lse = p.lse;
  float *dq = p.dq, *dk = p.dk, *dv = p.dv;
  float *da = p.bias_grads.da, *db = p.bias_grads.db, *dc = p.bias_grads.dc, *dd = p.bias_grads.dd;
  float *dp = p.bias_grads.dp, *dr = p.bias_grads.dr, *ddist = p.bias_grads.ddist;
  validate("attention_backward", s, q, k, v, bias);
  check(out && dout && lse, "attention_backward", "out, dout and lse must not be null");
  check(dq && dk && dv, "attention_backward", "dq, dk and dv must not be null");
  const Geometry g(s);
  const int64_t Dp = g.Dp, n_qt = ceil_div(g.Tq, kBQ), n_kt = ceil_div(g.Tk, kBK);
  // Bias gradients wanted (an absent term's gradient is written as 0 when asked for).
  const bool want_a = da && bias.a, want_b = db && bias.b, want_c = dc && bias.c, want_d = dd && bias.d;
  if (da && !bias.a) std::fill(da, da + g.B * g.H * g.Tq, 0.0f);
  if (dc && !bias.c) std::fill(dc, dc + g.B * g.H * g.Tq, 0.0f);
  if (db && !bias.b) std::fill(db, db + g.B * g.H * g.Tk, 0.0f);
  if (dd && !bias.d) std::fill(dd, dd + g.B * g.H * g.Tk, 0.0f);
  const bool want_p = dp && bias.path(), want_r = dr && bias.path();
  if (dp && !bias.path()) std::fill(dp, dp + g.B * g.Tq * g.H * (bias.P > 0 ? bias.P : 0), 0.0f);
  if (dr && !bias.path()) std::fill(dr, dr + g.B * g.Tk * g.H * (bias.P > 0 ? bias.P : 0), 0.0f);
  const bool want_dist = ddist && bias.dist;
  if (ddist && !bias.dist) std::fill(ddist, ddist + g.H * std::max<int64_t>(bias.W, 0), 0.0f);

  // Delta_i = sum_d dout_id out_id (= sum_j P_ij dP_ij), in double.
  const Arena delta_buf(1, g.B * g.H * g.Tq);
  float* delta = delta_buf.thread(0);
  const int threads = team_size(g.B * g.H * std::max(n_qt, n_kt));
#pragma omp parallel for collapse(3) num_threads(threads)
  for (int64_t b = 0; b < g.B; ++b)
    for (int64_t h = 0; h < g.H; ++h)
      for (int64_t i = 0; i < g.Tq; ++i) {
        const float* o = g.q_row(out, b, h, i);
        const float* go = g.q_row(dout, b, h, i);
        double acc = 0.0;
#pragma omp simd reduction(+ : acc)
        for (int64_t d = 0; d < g.D; ++d) acc += double(o[d]) * go[d];
        delta[g.q_stat(b, h) + i] = float(acc);
      }

  // One pass per (b, h) (5 tile products per tile pair) when there are enough heads to keep every thread
  // busy; otherwise two passes that split each head's work by key tile and by query tile (7 products per
  // pair, but every thread has work). Cost model: the busiest thread's share of the work. The path bias
  // always takes the one pass (its carries run along each query row over all key tiles).
  const int64_t heads = g.B * g.H, max_threads = omp_get_max_threads();
  const int64_t Tqp = n_qt * kBQ, P = bias.path() ? bias.P : 0;
  const int head_threads = team_size(heads);
  const bool one_pass = bias.path() || (5 * max_threads * ceil_div(heads, max_threads) <= 7 * heads &&
                                        OnePassWork::floats(Tqp, Dp, P) * head_threads <= (int64_t(1) << 28));
  // The distance table's gradient sums dS over every (b, h) and both passes' tasks: each task adds into
  // partial sums of its own, [slots][H][W] in double (one pass: slot b, so (b, h) owns row h of slot b;
  // two passes: slot = thread), added up in slot order at the end. No atomics; the one-pass sums are
  // deterministic (the two-pass ones up to which thread ran which key tile, in double).
  const int64_t W = want_dist ? bias.W : 0, slots = one_pass ? g.B : threads;
  const Arena dist_part(1, 2 * slots * g.H * W);
  double* part = reinterpret_cast<double*>(dist_part.thread(0));
  std::fill(part, part + slots * g.H * W, 0.0);
  auto reduce_dist = [&] {
    if (!want_dist) return;
    for (int64_t e = 0; e < g.H * W; ++e) {
      double sum = 0.0;
      for (int64_t sl = 0; sl < slots; ++sl) sum += part[sl * g.H * W + e];
      ddist[e] = float(sum);
    }
  };
  if (one_pass) {
    const Arena arena(head_threads, OnePassWork::floats(Tqp, Dp, P));
    const BiasGrads bg{want_a ? da : nullptr, want_b ? db : nullptr, want_c ? dc : nullptr,
                       want_d ? dd : nullptr, want_p ? dp : nullptr, want_r ? dr : nullptr};
#pragma omp parallel num_threads(head_threads)
    {
      OnePassWork w(arena.thread(omp_get_thread_num()), Tqp, Dp, P);
#pragma omp for collapse(2) schedule(dynamic, 1)
      for (int64_t b = 0; b < g.B; ++b)
        for (int64_t h = 0; h < g.H; ++h)
          backward_head(g, q, k, v, bias, dout, lse, delta, b, h, dq, dk, dv, bg, w,
                        want_dist ? part + (b * g.H + h) * W : nullptr);
    }
    reduce_dist();
    return;
  }

  const Arena arena(threads, BackwardWork::floats(Dp));
#pragma omp parallel num_threads(threads)
  {
    // Both passes recompute P. Pass 1: each key tile gathers dk = scale dS^T Q, dv = P^T dO, db and dd
    // from the query tiles that see it. Pass 2: each query tile gathers dq = scale dS K, da and dc.
    BackwardWork w(arena.thread(omp_get_thread_num()), Dp);
#pragma omp for collapse(3) schedule(dynamic, 1)
    for (int64_t b = 0; b < g.B; ++b)
      for (int64_t h = 0; h < g.H; ++h)
        for (int64_t kt = 0; kt < n_kt; ++kt) {
          const int64_t j0 = kt * kBK, nk = std::min(kBK, g.Tk - j0), Np = round_up(nk, kMR);
          std::fill(w.acc1, w.acc1 + kBK * Dp, 0.0f);  // dK
          std::fill(w.acc2, w.acc2 + kBK * Dp, 0.0f);  // dV
          std::fill(w.sum1, w.sum1 + kBK, 0.0);        // db
          std::fill(w.sum2, w.sum2 + kBK, 0.0);        // dd
          pack_key_tile(g, k, v, bias, b, h, j0, nk, false, w);
          const int64_t first_row = std::max<int64_t>(0, j0 - g.delta);  // first query that sees key j0
          for (int64_t qt = first_row / kBQ; qt < n_qt; ++qt) {
            const int64_t i0 = qt * kBQ, rows = std::min(kBQ, g.Tq - i0), Mp = round_up(rows, kMR);
            pack_query_tile(g, q, dout, lse, delta, b, h, i0, rows, w);
            TileLogits t = tile_logits(g, bias, b, h, i0, j0, nk, w.kb, w.kd, w.dt);
            gemm_tile(Mp, kBK, Dp, w.Q, Dp, 1, w.Kt, kBK, w.S, kBK, false);    // S = Q K^T
            gemm_tile(Mp, kBK, Dp, w.dO, Dp, 1, w.Vt, kBK, w.dS, kBK, false);  // dP = dO V^T
            dsoftmax_step(t, rows, Mp, w.lse, w.delta, w.S, w.dS, want_b ? w.sum1 : nullptr,
                          want_d ? w.sum2 : nullptr, nullptr, nullptr, want_dist ? w.diag : nullptr);
            if (want_dist)
              scatter_dist_grad(g, W, i0, j0, w.diag, part + (omp_get_thread_num() * g.H + h) * W);
            gemm_tile(Np, Dp, rows, w.S, 1, kBK, w.dO, Dp, w.acc2, Dp, true);  // dV += P^T dO
            gemm_tile(Np, Dp, rows, w.dS, 1, kBK, w.Q, Dp, w.acc1, Dp, true);  // dK += dS^T Q
          }
          store_rows(g, w.acc1, g.scale, g.Tk, b, h, j0, nk, dk);
          store_rows(g, w.acc2, 1.0f, g.Tk, b, h, j0, nk, dv);
          const int64_t ks = g.k_stat(b, h) + j0;
          for (int64_t j = 0; j < nk; ++j) {
            if (want_b) db[ks + j] = float(w.sum1[j]);
            if (want_d) dd[ks + j] = float(w.sum2[j]);
          }
        }

#pragma omp for collapse(3) schedule(dynamic, 1)
    for (int64_t b = 0; b < g.B; ++b)
      for (int64_t h = 0; h < g.H; ++h)
        for (int64_t qt = 0; qt < n_qt; ++qt) {
          const int64_t i0 = qt * kBQ, rows = std::min(kBQ, g.Tq - i0), Mp = round_up(rows, kMR);
          std::fill(w.acc1, w.acc1 + kBQ * Dp, 0.0f);  // dQ
          std::fill(w.sum1, w.sum1 + kBQ, 0.0);        // da
          std::fill(w.sum2, w.sum2 + kBQ, 0.0);        // dc
          pack_query_tile(g, q, dout, lse, delta, b, h, i0, rows, w);
          const int64_t qs = g.q_stat(b, h) + i0, kend = g.key_end(i0 + rows);
          for (int64_t j0 = 0; j0 < kend; j0 += kBK) {
            const int64_t nk = std::min(kBK, kend - j0);
            pack_key_tile(g, k, v, bias, b, h, j0, nk, true, w);
            TileLogits t = tile_logits(g, bias, b, h, i0, j0, nk, w.kb, w.kd, w.dt);
            gemm_tile(Mp, kBK, Dp, w.Q, Dp, 1, w.Kt, kBK, w.S, kBK, false);    // S = Q K^T
            gemm_tile(Mp, kBK, Dp, w.dO, Dp, 1, w.Vt, kBK, w.dS, kBK, false);  // dP = dO V^T
            dsoftmax_step(t, rows, Mp, w.lse, w.delta, w.S, w.dS, nullptr, nullptr, want_a ? w.sum1 : nullptr,
                          want_c ? w.sum2 : nullptr);
            gemm_tile(Mp, Dp, nk, w.dS, kBK, 1, w.K, Dp, w.acc1, Dp, true);  // dQ += dS K
          }
          store_rows(g, w.acc1, g.scale, g.Tq, b, h, i0, rows, dq);
          for (int64_t r = 0; r < rows; ++r) {
            if (want_a) da[qs + r] = float(w.sum1[r]);
            if (want_c) dc[qs + r] = float(w.sum2[r]);
          }
        }
  }
  reduce_dist();
}

}  // namespace grape::kernels::cpu
