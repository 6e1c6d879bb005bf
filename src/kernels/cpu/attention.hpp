// Fused causal attention on the CPU: FlashAttention-2 order (online softmax over key tiles, O(T) extra
// memory), fp32 with fp32 accumulation, OpenMP over (batch, head, tile). Plain C++: no LibTorch here; the
// LibTorch binding is src/nn/fused_attention.cpp.
//
// The position encoding reaches the kernel in two ways:
//   - rotations (RoPE, GRAPE-M, xPos, contextual phases) are applied to q and k before the call (an O(T D)
//     pre-pass), so the kernel sees the encoded q~ and k~;
//   - additive biases of the linear family are computed per tile from per-token quantities, never as a
//     T x T array:   bias(i, j) = a_i + b_j + (c_i + d_j) * (pos_i - pos_j)
//     ALiBi: c_i = -m_h. GRAPE-A: c_i = -omega_h gq_i (query gate), d_j = -omega_h gk_j (key gate).
//     FoX: a_i = C_i, b_j = -C_j with C the cumulative log forget gate.
//   - GRAPE-AP's path-integral bias, also per tile, from per-token probes:
//       bias(t, j) += sum_{l = j+1 .. t} psi(t, l),   psi(t, l) = m_h logsigmoid(p_t . r_l / P)
//     (positions as below; only keys l the query sees count). The forward visits each query tile's key tiles
//     from the diagonal down, keeping per query row the sum of psi over the tiles already visited; the
//     backward (one pass per head, key tiles descending) keeps per row the same carry and the suffix sum of
//     dS, since dpsi(t, l) = sum_{j<l} dS(t, j) = -sum_{j>=l} dS(t, j) (each row of dS sums to 0).
//   - a per-head table by distance (T5's gathered buckets, KERPLE's kernel), also per tile:
//       bias(i, j) += dist[h][min(pos_i - pos_j, W - 1)]
//     A tile's pairs have at most kBQ + kBK - 1 distinct distances (one per diagonal), so each tile copies
//     those table entries once, in diagonal order, and every row adds a contiguous slice of that copy. The
//     backward sums dS per diagonal of the tile and scatters the sums to the clamped distances.
//
// Layouts (all contiguous, row-major): q, out, dq: [B, Tq, H, D]; k, v, dk, dv: [B, Tk, H, D];
// bias quantities a, c, da, dc: [B, H, Tq]; b, d, db, dd: [B, H, Tk]; lse, delta: [B, H, Tq];
// path-bias probes p, dp: [B, Tq, H, P]; r, dr: [B, Tk, H, P]; slopes m: [H]; distance table dist, ddist: [H,
// W]. Positions: query i sits at q_offset + i, key j at k_offset + j; key j is visible to query i iff
// k_offset + j <= q_offset + i. Every query must see at least one key (q_offset >= k_offset).
//
// The implementation, by role (see docs/kernels.md): simd_math.hpp (exp, logsigmoid, row reductions),
// tile.{hpp,cpp} (tile sizes, workspaces, packing, the matrix-product micro-kernels), tile_bias.{hpp,cpp}
// (the three bias features behind one tile interface), attention_forward.cpp (forward and decode),
// attention_backward.cpp (backward).
#pragma once

#include <cstdint>

namespace grape::kernels::cpu {

// The encoding's per-token bias terms; every pointer may be null (the term is absent).
struct BiasTerms {
  const float* a = nullptr;  // per query [B,H,Tq] or null (= 0)
  const float* b = nullptr;  // per key   [B,H,Tk] or null
  const float* c = nullptr;  // per query [B,H,Tq] or null: slope on the distance
  const float* d = nullptr;  // per key   [B,H,Tk] or null: slope on the distance
  // GRAPE-AP path bias sum_{l=j+1..t} m_h logsigmoid(p_t . r_l / P); absent when p is null (then r, m are
  // ignored), otherwise r and m must be given and P >= 1.
  const float* p = nullptr;  // per query probe [B,Tq,H,P]
  const float* r = nullptr;  // per key rotated probe [B,Tk,H,P]
  const float* m = nullptr;  // per head slope [H]
  int64_t P = 0;             // probe dim
  // Per-head bias by distance: + dist[h * W + min(pos_i - pos_j, W - 1)] for visible pairs (distances beyond
  // W - 1 share the last entry); absent when null, otherwise W >= 1.
  const float* dist = nullptr;  // [H, W]
  int64_t W = 0;
  bool path() const { return p != nullptr; }
  bool any() const { return a || b || c || d || p || dist; }
};

// Where the gradients of the bias terms go; null: not wanted. A wanted gradient whose term is absent is
// written as 0 (an absent term is a constant zero). No gradient for the slopes m.
struct BiasGrads {
  float* da = nullptr;  // [B,H,Tq]
  float* db = nullptr;  // [B,H,Tk]
  float* dc = nullptr;  // [B,H,Tq]
  float* dd = nullptr;  // [B,H,Tk]
  float* dp = nullptr;  // [B,Tq,H,P], the path-bias probes
  float* dr = nullptr;  // [B,Tk,H,P]
  // [H, W]: dS summed over the pairs (of every batch) whose clamped distance is that entry. Its per-head or
  // per-thread partial sums are kept in double and added in a fixed order.
  float* ddist = nullptr;
};

struct AttentionShape {
  int64_t B = 1, H = 1, Tq = 1, Tk = 1, D = 64;
  int64_t q_offset = 0, k_offset = 0;
  float scale = 0.125f;  // usually 1/sqrt(D)
};

// out = softmax(scale q k^T + bias, causal) v; lse[b,h,i] = log sum_j exp(logit_ij) (natural log).
// attention() is the entry point: it picks attention_decode for a few queries against a long cache, else
// attention_forward; the two give the same results and are exposed for tests.
struct ForwardParams {
  AttentionShape shape;
  const float* q = nullptr;  // [B,Tq,H,D]
  const float* k = nullptr;  // [B,Tk,H,D]
  const float* v = nullptr;  // [B,Tk,H,D]
  BiasTerms bias;
  float* out = nullptr;  // [B,Tq,H,D], written
  float* lse = nullptr;  // [B,H,Tq], written
};
void attention(const ForwardParams& p);
void attention_forward(const ForwardParams& p);

// Forward for a few queries (Tq small) against a long cache: the keys are split into blocks processed by
// different threads, then the partial softmax states are merged. Same inputs and results as
// attention_forward.
using DecodeParams = ForwardParams;
void attention_decode(const DecodeParams& p);

// Gradients from dout, recomputing the probabilities from lse. dq, dk, dv are overwritten, and every
// non-null pointer of bias_grads. With a path bias the backward always takes the one-pass-per-head path.
struct BackwardParams {
  AttentionShape shape;
  const float* q = nullptr;  // the forward's inputs
  const float* k = nullptr;
  const float* v = nullptr;
  BiasTerms bias;
  const float* out = nullptr;   // the forward's outputs: [B,Tq,H,D]
  const float* dout = nullptr;  // dL/dout [B,Tq,H,D]
  const float* lse = nullptr;   // [B,H,Tq]
  float* dq = nullptr;          // [B,Tq,H,D]
  float* dk = nullptr;          // [B,Tk,H,D]
  float* dv = nullptr;          // [B,Tk,H,D]
  BiasGrads bias_grads;
};
void attention_backward(const BackwardParams& p);

// Invalid shapes (a size < 1, q_offset < k_offset, non-finite scale), null required pointers, a path bias
// without r, m or with P < 1 and a distance table with W < 1 throw std::invalid_argument.

// The kernels' threads flush subnormals to zero (x86 FTZ/DAZ, the caller's mode restored on return): inputs
// and results below FLT_MIN in magnitude count as 0.

// The kernels' vectorisable exp (fp32, relative error < 2.5e-7) for the arguments they exponentiate, logit
// differences <= 0 up to rounding: x > 88 is clamped to 88; results below FLT_MIN are flushed to 0; -inf ->
// 0, NaN -> NaN. Exposed for tests.
float exp_f32(float x);

}  // namespace grape::kernels::cpu
