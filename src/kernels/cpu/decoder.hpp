// The decoder language model's forward pass for a few new tokens per sequence against each sequence's KV
// cache, in plain C++ + OpenMP (no LibTorch): the LibTorch-free decode path (docs/decode.md). The model's
// fp32 weights are read in place; src/nn/decode_engine.cpp owns the caches and the encoding's tables and
// fills these structs.
//
// Per layer, for the R = sum_b T_b new rows of all sequences (one OpenMP team for the whole pass):
//   x^ = RMSNorm(x); q, k, v = x^ Wq^T, x^ Wk^T, x^ Wv^T      matrix products reading each weight row once
//   q, k per head: RMSNorm(., gain) (QK-norm), rotation by position (RoPE family), YaRN's factor
//   k, v appended to the sequence's cache; attention per (sequence, head) by attention(), with the bias
//   h = x + y Wo^T;  x = h + W_out (silu(W1 h^) * (W2 h^)),  h^ = RMSNorm(h)
// then logits = RMSNorm(x) wte^T (the tied head).
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/cpu/linear_bf16.hpp"

namespace grape::kernels::cpu {

// y[r, n] = sum_k x[r, k] W[n, k] for r < R, n < N: a linear layer without bias, W row-major [N, K] as
// LibTorch stores it. Each row of W is read once for all R rows of x (matrix-vector at R = 1, a blocked
// matrix product for a batch). Parallel over N. linear_rows uses AVX-512 or AVX2 when the build has them
// (-march=native), the portable loop otherwise; the portable one is exposed so tests compare the two.
void linear_rows(const float* x, int64_t R, int64_t K, const float* W, int64_t N, float* y);
void linear_rows_portable(const float* x, int64_t R, int64_t K, const float* W, int64_t N, float* y);

// W [N, K] copied into panels of panel_rows() rows, each [K][panel_rows()] (a panel's rows interleaved per k,
// rows past N zero): the layout of the batched products. A batch multiplies each loaded vector of weights by
// every row of x (broadcast), with no horizontal sums. The width is the kernels' build's: 16 where AVX2 is
// the widest (a panel row is one cache line, so a block streams its panel contiguously), else 32.
int64_t panel_rows();
std::vector<float> pack_panels(const float* W, int64_t N, int64_t K);
// y = x W^T from pack_panels(W); each output is one sequential sum over k. Parallel over panels.
void linear_rows_panels(const float* x, int64_t R, int64_t K, const float* panels, int64_t N, float* y);
void linear_rows_panels_portable(const float* x, int64_t R, int64_t K, const float* panels, int64_t N,
                                 float* y);
// Passes of at least panel_min_rows() rows multiply the panels when the model has them: 1 where AVX2 is the
// widest (the panels' one contiguous stream is faster at every row count, batch 1 included), else 8 (with
// AVX-512 batch 1's dot form over the row-major W is 4-6% faster).
int64_t panel_min_rows();
// Whether a pass of `rows` rows over `sequences` sequences makes the panel copy (as much memory again as the
// fp32 weights): where the panels serve every pass, any pass; else one of two or more sequences with
// panel_min_rows() rows or more, so that one sequence alone never pays for a copy it would not use.
bool makes_panels(int64_t sequences, int64_t rows);

struct DecoderLayer {
  const float *norm1 = nullptr, *wq = nullptr, *wk = nullptr, *wv = nullptr, *wo = nullptr;
  const float *norm2 = nullptr, *w1 = nullptr, *w2 = nullptr, *w_out = nullptr;
  // bf16 copies of the matrices above (null: the products read the fp32 ones), with DecoderModel::bf16_kernel
  const uint16_t *wq_bf16 = nullptr, *wk_bf16 = nullptr, *wv_bf16 = nullptr, *wo_bf16 = nullptr;
  const uint16_t *w1_bf16 = nullptr, *w2_bf16 = nullptr, *w_out_bf16 = nullptr;
  const float *q_norm = nullptr, *k_norm = nullptr;  // [D] gains shared by the heads; null: no QK-norm
  bool norm_after_rotation = false;                  // QK-norm of the rotated q~, k~ (qk_norm=after_rotation)
  // Rotation of q and k by position: cos, sin [positions][G][P] (sin carries the orientation's sign), G = 1
  // (shared) or H; pairs (i, i + P) ("half") or (2i, 2i + 1) (interleaved); then both times mscale. Null
  // cos: no rotation. The tables must cover every position of the step.
  const float *cos = nullptr, *sin = nullptr;
  int64_t G = 1, P = 0;
  bool interleaved = false;
  float mscale = 1.0f;
  // Bias: slope [H] adds slope_h * (pos_i - pos_j) (ALiBi: -m_h); dist [H, W] adds dist[h][min(pos_i -
  // pos_j, W - 1)] (T5, KERPLE, Sandwich). Null: absent.
  const float* slope = nullptr;
  const float* dist = nullptr;
  int64_t W = 0;
  // FoX's forget gate: bias c_i - c_j, c_t = sum_{l <= t} logsigmoid(gate_w[h] . x̂_l + gate_b[h]), x̂ the
  // normalised layer input; gate_w [H, C], gate_b [H]. Null: absent.
  const float *gate_w = nullptr, *gate_b = nullptr;
  // GRAPE-AP's path integral: bias sum_{l=j+1..i} probe_m[h] logsigmoid(p_i . r_l / P) with the probes
  // p = probe_w x̂ per head (P dims) and r_l = R(l) p̂_l, p̂ = p / sqrt(mean(p^2) + probe_eps), R(l) turning
  // pairs (i, i + P/2) by the angle l (sin times probe_sign); probe_w [H*P, C], probe_m [H]. Null: absent.
  const float *probe_w = nullptr, *probe_m = nullptr;
  int64_t probe_dim = 0;
  float probe_eps = 1e-6f, probe_sign = 1.0f;
  // The matrices as pack_panels lays them out, for passes of panel_min_rows() rows or more. Null: row-major
  // only.
  struct Panels {
    const float *wq = nullptr, *wk = nullptr, *wv = nullptr, *wo = nullptr, *w1 = nullptr, *w2 = nullptr,
                *w_out = nullptr;
  } panels;
};

struct DecoderModel {
  int64_t vocab = 0, C = 0, H = 0, D = 0, hidden = 0;
  float eps = 1e-5f;
  const float* wte = nullptr;          // [vocab, C], also the LM head
  const float* norm_f = nullptr;       // [C]
  const uint16_t* wte_bf16 = nullptr;  // wte's bf16 copy for the embedding and the head (null: fp32)
  Bf16Kernel bf16_kernel = Bf16Kernel::portable;  // the kernel of the products with bf16 weights
  const float* wte_panels = nullptr;              // pack_panels(wte), or null
  std::vector<DecoderLayer> layers;
};

// One sequence's part of a pass: T new tokens at positions length .. length + T - 1.
struct DecoderRow {
  const int64_t* tokens = nullptr;  // [T], each in [0, vocab) (checked by the caller)
  int64_t T = 0;
  int64_t length = 0;        // tokens already cached
  int64_t capacity = 0;      // positions the cache buffers hold: >= length + T
  std::vector<float*> k, v;  // per layer [H][capacity][D]
  // Per layer with a forget gate (else null): each key's bias term -c_j [H][capacity], and c of the last
  // cached token per head [H] (float64, advanced by the pass: the sum grows like -0.7 t).
  std::vector<float*> key_b;
  std::vector<double*> gate_sum;
  // Per layer with path-integral probes (else null): each key's rotated probe r [H][capacity][P].
  std::vector<float*> key_r;
};

// Wall seconds of passes in the matrix products (the head included), the attention (with the copy of its
// outputs) and everything else (embedding, norms, encode, gates, SwiGLU, residuals), summed over passes.
struct DecoderPhases {
  double products = 0, attention = 0, other = 0;
  int64_t passes = 0;
};

// Scratch buffers reused across passes (grown as needed).
struct DecoderWorkspace {
  std::vector<float> x, xn, q, k, v, qh, yh, y, a, g, bias_c, bias_a, lse;
  std::vector<float> probe, probe_q;  // the probes W_p x̂ [R][H*P]; the queries' per sequence [H][T][P]
  // Non-null: each pass adds its phases here, timed on the team's first thread after the barrier that ends
  // each phase (so each is the team's wall time).
  DecoderPhases* phases = nullptr;
};

// Runs the new tokens of every row through the model, writes their keys and values into the rows' caches
// (positions length .. length + T - 1) and the logits of every new token to logits [sum_b T_b, vocab], rows
// in order. Does not advance `length` (the caller does, once the pass succeeded).
void decoder_forward(const DecoderModel& m, const std::vector<DecoderRow>& rows, DecoderWorkspace& ws,
                     float* logits);

}  // namespace grape::kernels::cpu
