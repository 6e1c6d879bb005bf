// Fused causal attention on the CPU, forward and decode, FlashAttention-2 order (the contract is in
// attention.hpp).
//
// Work split: when there are enough (batch, head) pairs for the threads, one OpenMP task is a whole (batch,
// head), which packs the head's keys once for all its query tiles; otherwise one task is a tile of kBQ query
// rows of one (batch, head) (forward) or a block of kDecodeBlock keys (decode). A task packs the rows it
// reads into contiguous, zero-padded, thread-local buffers (tile.hpp); only decode's few query rows (<=
// kDirectRows) read the key and value rows in place instead, since each is used once per query row. exp is
// exp_inline (simd_math.hpp), a branch-free polynomial that vectorises (std::exp does not without
// -ffast-math).
//
// Masking: within a key tile the keys a query row sees form a prefix (keys j <= i + q_offset - k_offset), so
// every softmax loop simply runs over that prefix; key tiles beyond a query tile's causal frontier are never
// visited.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "kernels/cpu/attention.hpp"
#include "kernels/cpu/tile.hpp"
#include "kernels/cpu/tile_bias.hpp"

namespace grape::kernels::cpu {
namespace {

// keys per decode task when the heads alone cannot keep the threads busy
constexpr int64_t kDecodeBlock = 256;
constexpr int64_t kDirectRows = 4;  // up to this many query rows, k and v rows are read in place, not packed

// One online-softmax step over a key tile: S [kBQ][kBK] holds the raw dots of the first `rows` query rows; on
// return it holds p = exp(logit - m_new) (0 where masked and in padding rows up to Mp), the running max m and
// sum l are updated and the accumulator O [kBQ][Dp] is rescaled by exp(m_old - m_new).
GRAPE_SIMD
void softmax_step(const TileBias& t, int64_t rows, int64_t Mp, int64_t Dp, float* S, float* m, float* l,
                  float* O) {
  // Three sweeps, so that the per-row scalar work (the new max, its correction factor alpha) runs as vectors
  // across the rows: logits and row maxima; alpha for every row; exponentials, sums and the rescale of O.
  float mnew[kBQ], alpha[kBQ];
  int64_t nvis[kBQ];
  for (int64_t r = 0; r < Mp; ++r) {
    float* s = S + r * kBK;
    nvis[r] = r < rows ? t.g.visible(t.i0 + r, t.j0, t.nk) : 0;
    if (nvis[r] == 0) {  // nothing visible: the row's state stays as it is
      std::fill(s, s + kBK, 0.0f);
      mnew[r] = m[r];
      continue;
    }
    t.logits_row(r, nvis[r], s);
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

// One thread's forward workspace: a query tile (Q, the scores S, the accumulator O, the running max m and sum
// l), one packed key tile (K^T, V), the bias's buffers, row pointers and, on the per-head path, every key
// tile of the head packed once (Kt_head [head_key_tiles][Dp][kBK], V_head [head_key_tiles kBK][Dp]).
struct ForwardWork {
  float *Q, *Kt, *V, *S, *O, *m, *l;
  TileBias bias;
  const float** rows;
  float *Kt_head, *V_head;

  ForwardWork(Carver& c, const Geometry& g, const BiasTerms& terms, int64_t head_key_tiles)
      : Q(c.take(kBQ * g.Dp)),
        Kt(c.take(g.Dp * kBK)),
        V(c.take(kBK * g.Dp)),
        S(c.take(kBQ * kBK)),
        O(c.take(kBQ * g.Dp)),
        m(c.take(kBQ)),
        l(c.take(kBQ)),
        bias(c, g, terms, kBQ, /*backward=*/false),
        rows(c.take_pointers(kBK)),
        Kt_head(c.take(head_key_tiles * g.Dp * kBK)),
        V_head(c.take(head_key_tiles * kBK * g.Dp)) {}
};

// Online softmax of query rows [i0, i0 + rows) of head (b, h) over keys [kbeg, kend): leaves the running max
// m, sum l and the unnormalised accumulator O (rows x Dp) in w. rows <= kBQ; kbeg is a multiple of kBK.
// With head_keys, w holds the head's keys already packed (pack_head_keys); otherwise each key tile is packed
// here, or, for at most kDirectRows rows, the key and value rows are read in place. The key tiles are visited
// from the last one down (the softmax does not mind the order), so that the path bias's per-row carry (psi
// summed over the keys after the tile) grows as it goes; it starts from carry0[r * carry_stride] (psi summed
// over keys from kend on; decode), or 0.
void flash_rows(const Geometry& g, const ForwardParams& p, int64_t b, int64_t h, int64_t i0, int64_t rows,
                int64_t kbeg, int64_t kend, ForwardWork& w, bool head_keys = false,
                const double* carry0 = nullptr, int64_t carry_stride = 0) {
  const int64_t Dp = g.Dp, Mp = round_up(rows, kMR);
  row_pointers(p.q, g.Tq, g.H, g.D, b, h, i0, rows, w.rows);
  pack_rows(w.rows, rows, Mp, g.D, Dp, w.Q);
  std::fill(w.m, w.m + Mp, kNegInf);  // the padded rows are all that a tile's steps touch
  std::fill(w.l, w.l + Mp, 0.0f);
  std::fill(w.O, w.O + Mp * Dp, 0.0f);
  w.bias.start_carries(rows, carry0, carry_stride);
  if (kend <= kbeg) return;
  const bool direct = !head_keys && rows <= kDirectRows;
  for (int64_t j0 = kbeg + (kend - 1 - kbeg) / kBK * kBK; j0 >= kbeg; j0 -= kBK) {
    const int64_t nk = std::min(kBK, kend - j0);
    w.bias.keys(b, h, j0, nk);
    w.bias.tile(i0, rows, Mp, /*qrow=*/0);
    if (direct) {  // S = Q K^T, softmax, O += P V with the key and value rows read where they are
      row_pointers(p.k, g.Tk, g.H, g.D, b, h, j0, nk, w.rows);
      dots_direct(rows, nk, g.D, Dp, w.Q, w.rows, w.S);
      softmax_step(w.bias, rows, Mp, Dp, w.S, w.m, w.l, w.O);
      row_pointers(p.v, g.Tk, g.H, g.D, b, h, j0, nk, w.rows);
      pv_direct(rows, nk, g.D, Dp, w.S, w.rows, w.O);
      continue;
    }
    const float* Kt = w.Kt;
    const float* V = w.V;
    if (head_keys) {
      Kt = w.Kt_head + (j0 / kBK) * Dp * kBK, V = w.V_head + j0 * Dp;
    } else {
      row_pointers(p.k, g.Tk, g.H, g.D, b, h, j0, nk, w.rows);
      pack_cols(w.rows, nk, kBK, g.D, Dp, w.Kt);
      row_pointers(p.v, g.Tk, g.H, g.D, b, h, j0, nk, w.rows);
      pack_rows(w.rows, nk, nk, g.D, Dp, w.V);
    }
    // S = Q K^T (raw dots), then S -> P and O rescaled, then O += P V: per block of kMR rows only over the
    // keys it sees (on a diagonal tile the rest is masked: its S is never read, its P is 0).
    g.for_visible_blocks(i0, rows, Mp, j0, nk, [&](int64_t r0, int64_t nv) {
      gemm_tile(kMR, round_up(nv, kNR), Dp, w.Q + r0 * Dp, Dp, 1, Kt, kBK, w.S + r0 * kBK, kBK, false);
    });
    softmax_step(w.bias, rows, Mp, Dp, w.S, w.m, w.l, w.O);
    g.for_visible_blocks(i0, rows, Mp, j0, nk, [&](int64_t r0, int64_t nv) {
      gemm_tile(kMR, Dp, nv, w.S + r0 * kBK, kBK, 1, V, Dp, w.O + r0 * Dp, Dp, true);
    });
  }
}

// Packs the first nkt key tiles of head (b, h) into w: Kt_head (each tile transposed, as flash_rows packs it)
// and V_head, zero-padded.
void pack_head_keys(const Geometry& g, const ForwardParams& p, int64_t b, int64_t h, int64_t nkt,
                    ForwardWork& w) {
  for (int64_t kt = 0; kt < nkt; ++kt) {
    const int64_t j0 = kt * kBK, nk = std::clamp<int64_t>(g.Tk - j0, 0, kBK);
    row_pointers(p.k, g.Tk, g.H, g.D, b, h, j0, nk, w.rows);
    pack_cols(w.rows, nk, kBK, g.D, g.Dp, w.Kt_head + kt * g.Dp * kBK);
    row_pointers(p.v, g.Tk, g.H, g.D, b, h, j0, nk, w.rows);
    pack_rows(w.rows, nk, kBK, g.D, g.Dp, w.V_head + j0 * g.Dp);
  }
}

// out = O / l, lse = m + log l for query rows [i0, i0 + rows) of head (b, h), from flash_rows' state.
void finish_rows(const Geometry& g, const ForwardParams& p, int64_t b, int64_t h, int64_t i0, int64_t rows,
                 const ForwardWork& w) {
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = 1.0f / w.l[r];
    float* o = p.out + ((b * g.Tq + i0 + r) * g.H + h) * g.D;
    for (int64_t d = 0; d < g.D; ++d) o[d] = w.O[r * g.Dp + d] * inv;
    p.lse[g.q_stat(b, h) + i0 + r] = w.m[r] + std::log(w.l[r]);
  }
}

// Decode's buffers shared by the threads: per (b, h, query row, key block) the block's softmax state [m, l,
// o_0 .. o_{D-1}] and, with a path bias over several blocks, its starting carry (psi summed over the later
// blocks).
struct DecodeStates {
  float* states;
  double* carries;
  DecodeStates(Carver& c, int64_t n_rows, int64_t n_blk, int64_t D, bool with_carries)
      : states(c.take(n_rows * n_blk * (D + 2))),
        carries(c.take_doubles(with_carries ? n_rows * n_blk : 0)) {}
};

// Scratch of decode's path-bias pre-pass (psi_sum): key probes Rt [P][kBK] and one row of psi.
struct PsiSumWork {
  float *Rt, *psi;
  PsiSumWork(Carver& c, int64_t P) : Rt(c.take(P * kBK)), psi(c.take(kBK)) {}
};

// One task per (b, h, query tile), each over every key it sees and finished in place: the forward when the
// heads alone cannot keep the threads busy, and decode when the keys are not split (finish_rows is what the
// merge gives for a single block: its weight exp(0) is exactly 1). One thread (as inside the decoder's team)
// runs the tasks without opening a team.
void query_tile_tasks(const Geometry& g, const ForwardParams& p) {
  const int64_t n_qt = ceil_div(g.Tq, kBQ), tasks = g.B * g.H * n_qt;
  const int threads = team_size(tasks);
  const Arena arena(threads, workspace_floats<ForwardWork>(g, p.bias, 0));
  auto task = [&](int64_t t, ForwardWork& w) {
    const int64_t b = t / (g.H * n_qt), h = t / n_qt % g.H, i0 = t % n_qt * kBQ;
    const int64_t rows = std::min(kBQ, g.Tq - i0);
    flash_rows(g, p, b, h, i0, rows, 0, g.key_end(i0 + rows), w);
    finish_rows(g, p, b, h, i0, rows, w);
  };
  if (threads == 1) {
    const FlushSubnormals flush;
    ForwardWork w = carve<ForwardWork>(arena.thread(0), g, p.bias, 0);
    for (int64_t t = 0; t < tasks; ++t) task(t, w);
    return;
  }
#pragma omp parallel num_threads(threads)
  {
    const FlushSubnormals flush;
    ForwardWork w = carve<ForwardWork>(arena.thread(omp_get_thread_num()), g, p.bias, 0);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) task(t, w);
  }
}

}  // namespace

float exp_f32(float x) { return exp_inline(x); }

// ---------------------------------------------------------------------------------------------------------
// Forward: one task per (b, h), or per (b, h, query tile)
// ---------------------------------------------------------------------------------------------------------

void attention_forward(const ForwardParams& p) {
  validate("attention_forward", p.shape, p.q, p.k, p.v, p.bias);
  check(p.out && p.lse, "attention_forward", "out and lse must not be null");
  const Geometry g(p.shape);
  const int64_t n_qt = ceil_div(g.Tq, kBQ);
  // With enough heads for the threads (at most 25% of the time idle on the last round), one task per (b, h)
  // packs the head's keys once (K^T tiles, V) and reuses them for every query tile; otherwise one task per
  // query tile packs the key tiles it visits.
  const int64_t heads = g.B * g.H, max_threads = usable_threads();
  const int64_t nkt = ceil_div(g.key_end(g.Tq), kBK);
  const int head_threads = team_size(heads);
  const int64_t head_floats = workspace_floats<ForwardWork>(g, p.bias, nkt);
  if (4 * max_threads * ceil_div(heads, max_threads) <= 5 * heads &&
      head_floats * head_threads <= (int64_t(1) << 28)) {  // <= 1 GiB
    const Arena arena(head_threads, head_floats);
#pragma omp parallel num_threads(head_threads)
    {
      const FlushSubnormals flush;
      ForwardWork w = carve<ForwardWork>(arena.thread(omp_get_thread_num()), g, p.bias, nkt);
#pragma omp for collapse(2) schedule(dynamic, 1)
      for (int64_t b = 0; b < g.B; ++b)
        for (int64_t h = 0; h < g.H; ++h) {
          pack_head_keys(g, p, b, h, nkt, w);
          for (int64_t qt = 0; qt < n_qt; ++qt) {
            const int64_t i0 = qt * kBQ, rows = std::min(kBQ, g.Tq - i0);
            flash_rows(g, p, b, h, i0, rows, 0, g.key_end(i0 + rows), w, /*head_keys=*/true);
            finish_rows(g, p, b, h, i0, rows, w);
          }
        }
    }
    return;
  }
  query_tile_tasks(g, p);
}

// ---------------------------------------------------------------------------------------------------------
// Decode: one task per (b, h, query tile), or the keys split into blocks whose softmax states are merged
// ---------------------------------------------------------------------------------------------------------

void attention_decode(const DecodeParams& p) {
  validate("attention_decode", p.shape, p.q, p.k, p.v, p.bias);
  check(p.out && p.lse, "attention_decode", "out and lse must not be null");
  const Geometry g(p.shape);
  const BiasTerms& bias = p.bias;
  const int64_t n_qt = ceil_div(g.Tq, kBQ), D = g.D;
  // With enough (batch, head, query tile) tasks for the threads (at most 20% idle), each task takes all its
  // keys; otherwise the keys are split into blocks of kDecodeBlock that threads take separately.
  const int64_t tasks = g.B * g.H * n_qt, max_threads = usable_threads();
  const int64_t block =
      4 * max_threads * ceil_div(tasks, max_threads) <= 5 * tasks ? round_up(g.Tk, kBK) : kDecodeBlock;
  const int64_t n_blk = ceil_div(g.Tk, block);
  if (n_blk == 1) return query_tile_tasks(g, p);  // no states to merge
  // Path bias over several blocks: the blocks run independently, so each starts from its carry, psi summed
  // over the later blocks (per query row): first every block's psi total (an O(Tq Tk P) pre-pass), then
  // exclusive suffix sums.
  const bool carries_needed = bias.path() && n_blk > 1;
  const int64_t n_rows = g.B * g.H * g.Tq;
  const Arena shared(1, workspace_floats<DecodeStates>(n_rows, n_blk, D, carries_needed));
  const DecodeStates st = carve<DecodeStates>(shared.thread(0), n_rows, n_blk, D, carries_needed);
  auto state = [&](int64_t b, int64_t h, int64_t i, int64_t blk) {
    return st.states + ((g.q_stat(b, h) + i) * n_blk + blk) * (D + 2);  // [m, l, o_0 .. o_{D-1}]
  };
  const int threads = team_size(tasks * n_blk);
  const int64_t Pp = bias.path() ? bias.P : 0;
  double* carry = st.carries;
  if (carries_needed) {
    const int pre_threads = team_size(n_rows);
    const Arena scratch(pre_threads, workspace_floats<PsiSumWork>(Pp));
#pragma omp parallel num_threads(pre_threads)
    {
      const FlushSubnormals flush;
      const PsiSumWork w = carve<PsiSumWork>(scratch.thread(omp_get_thread_num()), Pp);
#pragma omp for collapse(3)
      for (int64_t b = 0; b < g.B; ++b)
        for (int64_t h = 0; h < g.H; ++h)
          for (int64_t i = 0; i < g.Tq; ++i) {
            double* c = carry + (g.q_stat(b, h) + i) * n_blk;
            const int64_t kend = g.key_end(i + 1);  // the keys row i sees
            for (int64_t blk = 0; blk < n_blk; ++blk)
              c[blk] = psi_sum(g, bias, b, h, i, blk * block, std::min(kend, (blk + 1) * block), w.Rt, w.psi);
            double later = 0.0;
            for (int64_t blk = n_blk - 1; blk >= 0; --blk) {
              const double own = c[blk];
              c[blk] = later;
              later += own;
            }
          }
    }
  }
  const Arena arena(threads, workspace_floats<ForwardWork>(g, bias, 0));
#pragma omp parallel num_threads(threads)
  {
    const FlushSubnormals flush;
    ForwardWork w = carve<ForwardWork>(arena.thread(omp_get_thread_num()), g, bias, 0);
#pragma omp for collapse(4) schedule(dynamic, 1)
    for (int64_t b = 0; b < g.B; ++b)
      for (int64_t h = 0; h < g.H; ++h)
        for (int64_t qt = 0; qt < n_qt; ++qt)
          for (int64_t blk = 0; blk < n_blk; ++blk) {
            const int64_t i0 = qt * kBQ, rows = std::min(kBQ, g.Tq - i0);
            const int64_t kbeg = blk * block;
            const int64_t kend = std::min(kbeg + block, g.key_end(i0 + rows));
            if (kbeg < kend) {
              flash_rows(g, p, b, h, i0, rows, kbeg, kend, w, /*head_keys=*/false,
                         carries_needed ? carry + (g.q_stat(b, h) + i0) * n_blk + blk : nullptr, n_blk);
            } else {  // the whole block is in these queries' future
              std::fill(w.m, w.m + rows, kNegInf);
              std::fill(w.l, w.l + rows, 0.0f);
            }
            for (int64_t r = 0; r < rows; ++r) {
              float* s = state(b, h, i0 + r, blk);
              s[0] = w.m[r], s[1] = w.l[r];
              if (w.l[r] != 0.0f) std::memcpy(s + 2, w.O + r * g.Dp, size_t(D) * sizeof(float));
            }
          }
#pragma omp for collapse(3)
    for (int64_t b = 0; b < g.B; ++b)
      for (int64_t h = 0; h < g.H; ++h)
        for (int64_t i = 0; i < g.Tq; ++i) {  // merge: rescale every block to the common max
          float M = kNegInf;
          for (int64_t blk = 0; blk < n_blk; ++blk) {
            const float* s = state(b, h, i, blk);
            if (s[1] != 0.0f) M = std::max(M, s[0]);  // blocks with l = 0 saw no key
          }
          float L = 0.0f;
          float* o = p.out + ((b * g.Tq + i) * g.H + h) * D;
          std::fill(o, o + D, 0.0f);
          for (int64_t blk = 0; blk < n_blk; ++blk) {
            const float* s = state(b, h, i, blk);
            if (s[1] == 0.0f) continue;  // (a NaN l goes through, and poisons the row)
            const float wgt = exp_inline(s[0] - M);
            L += s[1] * wgt;
            for (int64_t d = 0; d < D; ++d) o[d] += s[2 + d] * wgt;
          }
          const float inv = 1.0f / L;
          for (int64_t d = 0; d < D; ++d) o[d] *= inv;
          p.lse[g.q_stat(b, h) + i] = M + std::log(L);
        }
  }
}

void attention(const ForwardParams& p) {
  // Few queries against a long cache (decoding): the keys are split over the threads.
  constexpr int64_t kDecodeMaxQueries = 16, kDecodeMinKeys = 256;
  if (p.shape.Tq <= kDecodeMaxQueries && p.shape.Tk >= kDecodeMinKeys)
    attention_decode(p);
  else
    attention_forward(p);
}

}  // namespace grape::kernels::cpu
