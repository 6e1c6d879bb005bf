// Fused causal attention on the CPU, backward, FlashAttention-2 order (the contract is in attention.hpp).
//
// P is recomputed from the forward's log-sum-exp. Work split: when there are enough (batch, head) pairs for
// the threads, each thread owns whole heads and runs one pass per head over its key tiles (5 tile products
// per tile pair, no races); otherwise two race-free passes split each head over all threads, over key tiles
// (dk, dv, db, dd, ddist) and over query tiles (dq, da, dc), at 7 products per pair. Both strategies run the
// same tile body, backward_tile, on rows packed into a BackwardWork.
#include <omp.h>

#include <algorithm>

#include "kernels/cpu/attention.hpp"
#include "kernels/cpu/tile.hpp"
#include "kernels/cpu/tile_bias.hpp"

namespace grape::kernels::cpu {
namespace {

// One tile of the softmax backward: S holds the raw dots and dP = dO V^T. On return S holds P = exp(logit -
// lse) and dP holds dS = P * (dP - Delta) (both 0 where masked and in padding rows up to Mp), and the bias
// has reduced dS into the gradient sums the pass takes (TileBias::grad_row).
GRAPE_SIMD_DEFAULT_WIDTH
void dsoftmax_step(const TileBias& t, int64_t rows, int64_t Mp, const float* lse, const float* delta,
                   float* S, float* dP) {
  for (int64_t r = 0; r < Mp; ++r) {
    float* s = S + r * kBK;
    float* ds = dP + r * kBK;
    const int64_t nv = r < rows ? t.g.visible(t.i0 + r, t.j0, t.nk) : 0;
    if (nv == 0) {
      std::fill(s, s + kBK, 0.0f);
      std::fill(ds, ds + kBK, 0.0f);
      continue;
    }
    t.logits_row(r, nv, s);
    const float li = lse[r], di = delta[r];
#pragma omp simd
    for (int32_t j = 0; j < int32_t(kBK); ++j) {  // 32-bit j: AVX2 compares 8 lanes at once, not 4
      const float p = exp_inline(s[j] - li);      // 0 where masked (-inf)
      s[j] = p;
      ds[j] = j < int32_t(nv) ? p * (ds[j] - di) : 0.0f;  // not 0 * dP: a masked key's dP may be inf or NaN
    }
    t.grad_row(r, nv, ds);
  }
}

// One thread's backward workspace: the query side of query_rows rows (Q, dO packed, lse, Delta and the dQ
// accumulator), one key tile (K, K^T, V^T packed and the dK, dV accumulators), the tile's S and dS, the
// bias's buffers and row pointers. The one-pass path holds every query row of a head (query_rows = Tq rounded
// up to kBQ), the two passes one query tile (query_rows = kBQ).
struct BackwardWork {
  float *Q, *dO, *dQ, *lse, *delta;
  float *K, *Kt, *Vt, *dK, *dV;
  float *S, *dS;
  TileBias bias;
  const float** rows;

  BackwardWork(Carver& c, const Geometry& g, const BiasTerms& terms, int64_t query_rows)
      : Q(c.take(query_rows * g.Dp)),
        dO(c.take(query_rows * g.Dp)),
        dQ(c.take(query_rows * g.Dp)),
        lse(c.take(query_rows)),
        delta(c.take(query_rows)),
        K(c.take(kBK * g.Dp)),
        Kt(c.take(g.Dp * kBK)),
        Vt(c.take(g.Dp * kBK)),
        dK(c.take(kBK * g.Dp)),
        dV(c.take(kBK * g.Dp)),
        S(c.take(kBQ * kBK)),
        dS(c.take(kBQ * kBK)),
        bias(c, g, terms, query_rows, /*backward=*/true),
        rows(c.take_pointers(std::max(query_rows, kBK))) {}
};

// Packs query rows [i0, i0 + n) of head (b, h) into w's query side: Q and dO (zero rows up to `padded`), lse
// and Delta.
void pack_queries(const Geometry& g, const BackwardParams& p, const float* delta, int64_t b, int64_t h,
                  int64_t i0, int64_t n, int64_t padded, BackwardWork& w) {
  const int64_t qs = g.q_stat(b, h) + i0;
  row_pointers(p.q, g.Tq, g.H, g.D, b, h, i0, n, w.rows);
  pack_rows(w.rows, n, padded, g.D, g.Dp, w.Q);
  row_pointers(p.dout, g.Tq, g.H, g.D, b, h, i0, n, w.rows);
  pack_rows(w.rows, n, padded, g.D, g.Dp, w.dO);
  std::copy(p.lse + qs, p.lse + qs + n, w.lse);
  std::copy(delta + qs, delta + qs + n, w.delta);
}

// Packs key tile [j0, j0 + nk) of head (b, h): K^T, V^T (and K row-major when with_k, for dQ += dS K) and the
// bias's key quantities.
void pack_keys(const Geometry& g, const BackwardParams& p, int64_t b, int64_t h, int64_t j0, int64_t nk,
               bool with_k, BackwardWork& w) {
  row_pointers(p.k, g.Tk, g.H, g.D, b, h, j0, nk, w.rows);
  pack_cols(w.rows, nk, kBK, g.D, g.Dp, w.Kt);
  if (with_k) pack_rows(w.rows, nk, kBK, g.D, g.Dp, w.K);
  row_pointers(p.v, g.Tk, g.H, g.D, b, h, j0, nk, w.rows);
  pack_cols(w.rows, nk, kBK, g.D, g.Dp, w.Vt);
  w.bias.keys(b, h, j0, nk);
}

// The body of every backward strategy, one (query tile, key tile) pair: the query tile is rows [i0, i0 +
// rows) of the head, held from row qrow of w's query side, the key tile is the one of pack_keys. S = Q K^T,
// dP = dO V^T, P and dS, the bias's gradient sums; then dV += P^T dO and dK += dS^T Q (key_side: the key
// tile's accumulators) and dQ += dS K (query_side: the query rows' accumulator).
void backward_tile(const Geometry& g, BackwardWork& w, int64_t i0, int64_t rows, int64_t qrow, bool key_side,
                   bool query_side) {
  const int64_t Dp = g.Dp, Mp = round_up(rows, kMR), j0 = w.bias.j0, nk = w.bias.nk, Np = round_up(nk, kMR);
  const float* Q = w.Q + qrow * Dp;
  const float* dO = w.dO + qrow * Dp;
  w.bias.tile(i0, rows, Mp, qrow);
  // Every product runs per block of kMR rows (or keys) over the part the causal mask leaves (on a diagonal
  // tile the rest of S and dP is never read, and P and dS are 0 there).
  g.for_visible_blocks(i0, rows, Mp, j0, nk, [&](int64_t r0, int64_t nv) {
    const int64_t n = round_up(nv, kNR);
    gemm_tile(kMR, n, Dp, Q + r0 * Dp, Dp, 1, w.Kt, kBK, w.S + r0 * kBK, kBK, false);    // S = Q K^T
    gemm_tile(kMR, n, Dp, dO + r0 * Dp, Dp, 1, w.Vt, kBK, w.dS + r0 * kBK, kBK, false);  // dP = dO V^T
  });
  dsoftmax_step(w.bias, rows, Mp, w.lse + qrow, w.delta + qrow, w.S, w.dS);
  w.bias.grad_tile(rows, Mp, w.dS);
  if (key_side) {
    for (int64_t k0 = 0; k0 < Np; k0 += kMR) {  // the query rows from q0 see some of keys [k0, k0 + kMR)
      const int64_t q0 = g.first_row_seeing(i0, rows, j0 + k0), n = rows - q0;
      if (n == 0) continue;
      const float* P = w.S + q0 * kBK + k0;
      const float* dS = w.dS + q0 * kBK + k0;
      gemm_tile(kMR, Dp, n, P, 1, kBK, dO + q0 * Dp, Dp, w.dV + k0 * Dp, Dp, true);  // dV += P^T dO
      gemm_tile(kMR, Dp, n, dS, 1, kBK, Q + q0 * Dp, Dp, w.dK + k0 * Dp, Dp, true);  // dK += dS^T Q
    }
  }
  if (!query_side) return;
  g.for_visible_blocks(i0, rows, Mp, j0, nk, [&](int64_t r0, int64_t nv) {
    gemm_tile(kMR, Dp, nv, w.dS + r0 * kBK, kBK, 1, w.K, Dp, w.dQ + (qrow + r0) * Dp, Dp,
              true);  // dQ += dS K
  });
}

// scale * acc rows [0, n) (leading dim Dp) -> n token rows of head (b, h) of a [B,T,H,D] tensor.
void store_rows(const Geometry& g, const float* acc, float scale, int64_t T, int64_t b, int64_t h, int64_t t0,
                int64_t n, float* dst) {
  for (int64_t r = 0; r < n; ++r) {
    float* o = dst + ((b * T + t0 + r) * g.H + h) * g.D;
    for (int64_t d = 0; d < g.D; ++d) o[d] = scale * acc[r * g.Dp + d];
  }
}

// The whole backward of head (b, h) in one pass over its key tiles: each (query tile, key tile) pair feeds
// the key tile's dK, dV and the head's dQ (5 tile products per pair). The key tiles go from the last down, so
// that the path bias's per-row carries (psi and dS summed over later keys) accumulate.
void backward_head(const Geometry& g, const BackwardParams& p, const float* delta, int64_t b, int64_t h,
                   BackwardWork& w) {
  const int64_t Dp = g.Dp, n_qt = ceil_div(g.Tq, kBQ), n_kt = ceil_div(g.Tk, kBK), Tqp = n_qt * kBQ;
  pack_queries(g, p, delta, b, h, 0, g.Tq, Tqp, w);
  std::fill(w.dQ, w.dQ + Tqp * Dp, 0.0f);
  w.bias.clear_query_sums();
  for (int64_t kt = n_kt - 1; kt >= 0; --kt) {
    const int64_t j0 = kt * kBK, nk = std::min(kBK, g.Tk - j0);
    std::fill(w.dK, w.dK + kBK * Dp, 0.0f);
    std::fill(w.dV, w.dV + kBK * Dp, 0.0f);
    w.bias.clear_key_sums();
    const int64_t first_row = std::max<int64_t>(0, j0 - g.delta);  // first query that sees key j0
    if (first_row < g.Tq) {
      pack_keys(g, p, b, h, j0, nk, /*with_k=*/true, w);
      for (int64_t qt = first_row / kBQ; qt < n_qt; ++qt) {
        const int64_t i0 = qt * kBQ, rows = std::min(kBQ, g.Tq - i0);
        backward_tile(g, w, i0, rows, /*qrow=*/i0, /*key_side=*/true, /*query_side=*/true);
      }
    }
    store_rows(g, w.dK, g.scale, g.Tk, b, h, j0, nk, p.dk);
    store_rows(g, w.dV, 1.0f, g.Tk, b, h, j0, nk, p.dv);
    w.bias.store_key_grads(b, h, j0, nk, p.bias_grads);
  }
  store_rows(g, w.dQ, g.scale, g.Tq, b, h, 0, g.Tq, p.dq);
  w.bias.store_query_grads(b, h, 0, g.Tq, p.bias_grads);
}

}  // namespace

void attention_backward(const BackwardParams& p) {
  validate("attention_backward", p.shape, p.q, p.k, p.v, p.bias);
  check(p.out && p.dout && p.lse, "attention_backward", "out, dout and lse must not be null");
  check(p.dq && p.dk && p.dv, "attention_backward", "dq, dk and dv must not be null");
  const Geometry g(p.shape);
  const BiasTerms& bias = p.bias;
  const BiasGrads& out = p.bias_grads;
  const int64_t Dp = g.Dp, n_qt = ceil_div(g.Tq, kBQ), n_kt = ceil_div(g.Tk, kBK);
  // A wanted gradient of an absent term is 0 (TileBias::grads leaves them out of the sums).
  if (out.da && !bias.a) std::fill(out.da, out.da + g.B * g.H * g.Tq, 0.0f);
  if (out.dc && !bias.c) std::fill(out.dc, out.dc + g.B * g.H * g.Tq, 0.0f);
  if (out.db && !bias.b) std::fill(out.db, out.db + g.B * g.H * g.Tk, 0.0f);
  if (out.dd && !bias.d) std::fill(out.dd, out.dd + g.B * g.H * g.Tk, 0.0f);
  if (out.dp && !bias.path()) std::fill(out.dp, out.dp + g.B * g.Tq * g.H * (bias.P > 0 ? bias.P : 0), 0.0f);
  if (out.dr && !bias.path()) std::fill(out.dr, out.dr + g.B * g.Tk * g.H * (bias.P > 0 ? bias.P : 0), 0.0f);
  const bool want_dist = out.ddist && bias.dist;
  if (out.ddist && !bias.dist) std::fill(out.ddist, out.ddist + g.H * std::max<int64_t>(bias.W, 0), 0.0f);

  // Delta_i = sum_d dout_id out_id (= sum_j P_ij dP_ij), in double.
  const Arena delta_buf(1, g.B * g.H * g.Tq);
  float* delta = delta_buf.thread(0);
  const int threads = team_size(g.B * g.H * std::max(n_qt, n_kt));
#pragma omp parallel for collapse(3) num_threads(threads)
  for (int64_t b = 0; b < g.B; ++b)
    for (int64_t h = 0; h < g.H; ++h)
      for (int64_t i = 0; i < g.Tq; ++i) {
        const float* o = g.q_row(p.out, b, h, i);
        const float* go = g.q_row(p.dout, b, h, i);
        double acc = 0.0;
#pragma omp simd reduction(+ : acc)
        for (int64_t d = 0; d < g.D; ++d) acc += double(o[d]) * go[d];
        delta[g.q_stat(b, h) + i] = float(acc);
      }

  // One pass per (b, h) (5 tile products per tile pair) when there are enough heads to keep every thread
  // busy; otherwise two passes that split each head's work by key tile and by query tile (7 products per
  // pair, but every thread has work). Cost model: the busiest thread's share of the work. The path bias
  // always takes the one pass (its carries run along each query row over all key tiles).
  const int64_t heads = g.B * g.H, max_threads = usable_threads();
  const int64_t Tqp = n_qt * kBQ;
  const int head_threads = team_size(heads);
  const int64_t head_floats = workspace_floats<BackwardWork>(g, bias, Tqp);
  const bool one_pass = bias.path() || (5 * max_threads * ceil_div(heads, max_threads) <= 7 * heads &&
                                        head_floats * head_threads <= (int64_t(1) << 28));
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
      out.ddist[e] = float(sum);
    }
  };
  if (one_pass) {
    const Arena arena(head_threads, head_floats);
#pragma omp parallel num_threads(head_threads)
    {
      const FlushSubnormals flush;
      BackwardWork w = carve<BackwardWork>(arena.thread(omp_get_thread_num()), g, bias, Tqp);
      w.bias.grads(out, /*key_side=*/true, /*query_side=*/true);
#pragma omp for collapse(2) schedule(dynamic, 1)
      for (int64_t b = 0; b < g.B; ++b)
        for (int64_t h = 0; h < g.H; ++h) {
          w.bias.dist_grad = part + (b * g.H + h) * W;
          backward_head(g, p, delta, b, h, w);
        }
    }
    reduce_dist();
    return;
  }

  const Arena arena(threads, workspace_floats<BackwardWork>(g, bias, kBQ));
#pragma omp parallel num_threads(threads)
  {
    const FlushSubnormals flush;
    // Both passes recompute P. Pass 1: each key tile gathers dk = scale dS^T Q, dv = P^T dO, db, dd and ddist
    // from the query tiles that see it. Pass 2: each query tile gathers dq = scale dS K, da and dc.
    BackwardWork w = carve<BackwardWork>(arena.thread(omp_get_thread_num()), g, bias, kBQ);
    w.bias.grads(out, /*key_side=*/true, /*query_side=*/false);
#pragma omp for collapse(3) schedule(dynamic, 1)
    for (int64_t b = 0; b < g.B; ++b)
      for (int64_t h = 0; h < g.H; ++h)
        for (int64_t kt = 0; kt < n_kt; ++kt) {
          const int64_t j0 = kt * kBK, nk = std::min(kBK, g.Tk - j0);
          std::fill(w.dK, w.dK + kBK * Dp, 0.0f);
          std::fill(w.dV, w.dV + kBK * Dp, 0.0f);
          w.bias.clear_key_sums();
          w.bias.dist_grad = part + (omp_get_thread_num() * g.H + h) * W;
          pack_keys(g, p, b, h, j0, nk, /*with_k=*/false, w);
          const int64_t first_row = std::max<int64_t>(0, j0 - g.delta);  // first query that sees key j0
          for (int64_t qt = first_row / kBQ; qt < n_qt; ++qt) {
            const int64_t i0 = qt * kBQ, rows = std::min(kBQ, g.Tq - i0);
            pack_queries(g, p, delta, b, h, i0, rows, round_up(rows, kMR), w);
            backward_tile(g, w, i0, rows, /*qrow=*/0, /*key_side=*/true, /*query_side=*/false);
          }
          store_rows(g, w.dK, g.scale, g.Tk, b, h, j0, nk, p.dk);
          store_rows(g, w.dV, 1.0f, g.Tk, b, h, j0, nk, p.dv);
          w.bias.store_key_grads(b, h, j0, nk, out);
        }

    w.bias.grads(out, /*key_side=*/false, /*query_side=*/true);
#pragma omp for collapse(3) schedule(dynamic, 1)
    for (int64_t b = 0; b < g.B; ++b)
      for (int64_t h = 0; h < g.H; ++h)
        for (int64_t qt = 0; qt < n_qt; ++qt) {
          const int64_t i0 = qt * kBQ, rows = std::min(kBQ, g.Tq - i0);
          std::fill(w.dQ, w.dQ + kBQ * Dp, 0.0f);
          w.bias.clear_query_sums();
          pack_queries(g, p, delta, b, h, i0, rows, round_up(rows, kMR), w);
          const int64_t kend = g.key_end(i0 + rows);
          for (int64_t j0 = 0; j0 < kend; j0 += kBK) {
            pack_keys(g, p, b, h, j0, std::min(kBK, kend - j0), /*with_k=*/true, w);
            backward_tile(g, w, i0, rows, /*qrow=*/0, /*key_side=*/false, /*query_side=*/true);
          }
          store_rows(g, w.dQ, g.scale, g.Tq, b, h, i0, rows, p.dq);
          w.bias.store_query_grads(b, h, i0, rows, out);
        }
  }
  reduce_dist();
}

}  // namespace grape::kernels::cpu
