// The LibTorch-free decoder forward (decoder.hpp): one OpenMP team for the whole pass, the work of each step
// split between its threads (weight rows of the matrix products, rows of the norms, (sequence, head) pairs of
// the attention), with a barrier between steps. Batch-1 decoding is a few dozen small steps per token, so a
// parallel region per step would cost more than many of the steps themselves.
#include "kernels/cpu/decoder.hpp"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numbers>
#include <stdexcept>
#include <string>

#include "kernels/cpu/attention.hpp"
#include "kernels/cpu/rmsnorm.hpp"
#include "kernels/cpu/simd_math.hpp"
#include "kernels/cpu/swiglu.hpp"
#include "kernels/cpu/tile.hpp"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace grape::kernels::cpu {
namespace {

constexpr int64_t kRowsW = 4;  // weight rows per micro-kernel call: each is read once for kRowsX rows of x
constexpr int64_t kRowsX = 4;  // rows of x per micro-kernel call (4 x 4 accumulators)

// Weight rows per panel (panel_rows() in decoder.hpp): one 64-byte line per k with AVX2 as the widest unit,
// two zmm registers with AVX-512 (and in the portable build).
#if defined(__AVX2__) && !defined(__AVX512F__)
constexpr int64_t kPanel = 16;
#else
constexpr int64_t kPanel = 32;
#endif

// panel_min_rows() (decoder.hpp): 16-wide panels, one contiguous stream of whole lines, beat the rows' dot
// products at every row count (1.1-1.2x at 1 row, 1.3-1.5x at 4-8, a Zen 3, docs/performance.md); with
// AVX-512 the dot form is 4-6% faster at batch 1, so the panels wait for a batch there.
constexpr int64_t kPanelMinRows = kPanel == 16 ? 1 : 8;

// The portable micro-kernel: y[i][j] = W_i . x_j over 16 lanes, summed at the end (vectorises without
// reassociation; GRAPE_SIMD picks the widest unit at load time in a portable build).
template <int NW, int NX>
GRAPE_SIMD void dot_block_portable(const float* const* w, const float* const* x, int64_t K, float* y,
                                   int64_t y_stride) {
  float acc[NW][NX][kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes)
    for (int i = 0; i < NW; ++i)
      for (int j = 0; j < NX; ++j) {
        // Plain pointers: through w[i][k + l] the compiler reloads the row pointers and keeps acc in memory.
        const float *wi = w[i] + k, *xj = x[j] + k;
        float* a = acc[i][j];
#pragma omp simd
        for (int64_t l = 0; l < kLanes; ++l) a[l] += wi[l] * xj[l];
      }
  for (int i = 0; i < NW; ++i)
    for (int j = 0; j < NX; ++j) {
      float s = 0;
      for (int64_t l = 0; l < kLanes; ++l) s += acc[i][j][l];
      for (int64_t kk = k; kk < K; ++kk) s += w[i][kk] * x[j][kk];
      y[j * y_stride + i] = s;
    }
}

#if defined(__AVX512F__)
// y[j * y_stride + i] = w_i . x_j for NW rows of W and NX <= kRowsX rows of x: the
// 16 dot products run in 16 registers over K and are summed by one tree (sums16). While it runs, it
// prefetches the lines of W that the next block (rows next, next + K, ...; null: none) reads at the same k,
// in its rows pf_row, pf_row + pf_step, ..., so that streaming W from L3 overlaps the products (each weight
// line feeds R vector FMAs: at R = 16 only 8 cycles' worth).
template <int NW, int NX>
GRAPE_INLINE void dot_block_simd(const float* const* w, const float* const* x, int64_t K, float* y,
                                 int64_t y_stride, const float* next, int64_t pf_row, int64_t pf_step) {
  static_assert(NW * NX <= 16);
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    if (next)
      for (int64_t i = pf_row; i < NW; i += pf_step)
        _mm_prefetch(reinterpret_cast<const char*>(next + i * K + k), _MM_HINT_T0);
    __m512 xv[NX];
    for (int j = 0; j < NX; ++j) xv[j] = _mm512_loadu_ps(x[j] + k);
    for (int i = 0; i < NW; ++i) {
      const __m512 wv = _mm512_loadu_ps(w[i] + k);
      for (int j = 0; j < NX; ++j) acc[i * NX + j] = _mm512_fmadd_ps(wv, xv[j], acc[i * NX + j]);
    }
  }
  if (k < K) {  // masked tail
    const __mmask16 m = __mmask16((1u << (K - k)) - 1);
    __m512 xv[NX];
    for (int j = 0; j < NX; ++j) xv[j] = _mm512_maskz_loadu_ps(m, x[j] + k);
    for (int i = 0; i < NW; ++i) {
      const __m512 wv = _mm512_maskz_loadu_ps(m, w[i] + k);
      for (int j = 0; j < NX; ++j) acc[i * NX + j] = _mm512_fmadd_ps(wv, xv[j], acc[i * NX + j]);
    }
  }
  alignas(64) float s[16];
  _mm512_store_ps(s, sums16(acc));
  for (int i = 0; i < NW; ++i)
    for (int j = 0; j < NX; ++j) y[j * y_stride + i] = s[i * NX + j];
}
#elif defined(__AVX2__)
inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
// The same on 8-lane registers: plain loads with a masked tail, and the same prefetching of the next block's
// weight lines (the every-step masked loads and no prefetch left batch-1 decode of small at 47% of the copy
// bound on a Zen 3).
template <int NW, int NX>
GRAPE_INLINE void dot_block_simd(const float* const* w, const float* const* x, int64_t K, float* y,
                                 int64_t y_stride, const float* next, int64_t pf_row, int64_t pf_step) {
  __m256 acc[NW][NX];
  for (int i = 0; i < NW; ++i)
    for (int j = 0; j < NX; ++j) acc[i][j] = _mm256_setzero_ps();
  auto step = [&](int64_t k, auto load) {
    __m256 xv[NX];
    for (int j = 0; j < NX; ++j) xv[j] = load(x[j] + k);
    for (int i = 0; i < NW; ++i) {
      const __m256 wv = load(w[i] + k);
      for (int j = 0; j < NX; ++j) acc[i][j] = _mm256_fmadd_ps(wv, xv[j], acc[i][j]);
    }
  };
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    if (next && k % 16 == 0)  // one prefetch per 64-byte line
      for (int64_t i = pf_row; i < NW; i += pf_step)
        _mm_prefetch(reinterpret_cast<const char*>(next + i * K + k), _MM_HINT_T0);
    step(k, [](const float* p) { return _mm256_loadu_ps(p); });
  }
  if (k < K) {  // masked tail
    static const int32_t kMask[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
    const __m256i m = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kMask + 8 - (K - k)));
    step(k, [m](const float* p) { return _mm256_maskload_ps(p, m); });
  }
  for (int i = 0; i < NW; ++i)
    for (int j = 0; j < NX; ++j) y[j * y_stride + i] = hsum256(acc[i][j]);
}
#endif

// Rows [n0, n1) of y = x W^T, blocked kRowsW weight rows x kRowsX rows of x.
template <bool kSimd>
void linear_part(const float* x, int64_t R, int64_t K, const float* W, int64_t N, float* y, int64_t n0,
                 int64_t n1) {
#if defined(__AVX512F__) || defined(__AVX2__)
  // The passes over x share out the prefetching of the next block's weight rows: pass p takes rows p,
  // p + passes, ... (passes beyond kRowsW take none).
  const int64_t passes = (R + kRowsX - 1) / kRowsX;
#endif
  for (int64_t n = n0; n < n1; n += kRowsW) {
    const int64_t nw = std::min(kRowsW, n1 - n);
    const float* w[kRowsW];
    for (int64_t i = 0; i < kRowsW; ++i) w[i] = W + std::min(n + i, n1 - 1) * K;
    for (int64_t r = 0; r < R; r += kRowsX) {
      const int64_t nx = std::min(kRowsX, R - r);
      const float* xs[kRowsX];
      for (int64_t j = 0; j < kRowsX; ++j) xs[j] = x + std::min(r + j, R - 1) * K;
      float out[kRowsX * kRowsW];
      // Full blocks for the common shapes; a partial block computes the full one on clamped (repeated)
      // rows and keeps only its part, so one instantiation per x-row count suffices.
      auto run = [&](auto nx_const) {
        constexpr int NX = decltype(nx_const)::value;
#if defined(__AVX512F__) || defined(__AVX2__)
        if constexpr (kSimd) {
          const int64_t pass = r / kRowsX;
          const float* next = n + 2 * kRowsW <= n1 && pass < kRowsW ? W + (n + kRowsW) * K : nullptr;
          dot_block_simd<kRowsW, NX>(w, xs, K, out, kRowsW, next, pass, passes);
        } else
#endif
          dot_block_portable<kRowsW, NX>(w, xs, K, out, kRowsW);
      };
      switch (nx) {
        case 1:
          run(std::integral_constant<int, 1>{});
          break;
        case 2:
          run(std::integral_constant<int, 2>{});
          break;
        case 3:
          run(std::integral_constant<int, 3>{});
          break;
        default:
          run(std::integral_constant<int, 4>{});
          break;
      }
      for (int64_t j = 0; j < nx; ++j)
        for (int64_t i = 0; i < nw; ++i) y[(r + j) * N + n + i] = out[j * kRowsW + i];
    }
  }
}

// Rows [p0, p1) of y = x W^T from W's panels: per panel, MR rows of x at a time keep MR x kPanel sums in
// registers over the whole of k (per k: MR broadcasts of x, one load of the panel's kPanel weights).
template <int MR>
GRAPE_SIMD void panel_block_portable(const float* const* x, int64_t K, const float* panel, float* out) {
  float acc[MR][kPanel] = {};
  for (int64_t k = 0; k < K; ++k)
    for (int j = 0; j < MR; ++j) {
      const float xk = x[j][k];
#pragma omp simd
      for (int64_t i = 0; i < kPanel; ++i) acc[j][i] += xk * panel[k * kPanel + i];
    }
  for (int j = 0; j < MR; ++j)
    for (int64_t i = 0; i < kPanel; ++i) out[j * kPanel + i] = acc[j][i];
}

#if defined(__AVX512F__)
// As panel_block_portable; meanwhile prefetches `lines` cache lines per k from next on (null: none), so that
// streaming the weights from L3 overlaps the products.
template <int MR>
GRAPE_INLINE void panel_block_simd(const float* const* x, int64_t K, const float* panel, float* out,
                                   const float* next, int64_t lines) {
  static_assert(kPanel == 32);
  __m512 acc[MR][2];
  for (int j = 0; j < MR; ++j) acc[j][0] = acc[j][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    if (next)
      for (int64_t l = 0; l < lines; ++l)
        _mm_prefetch(reinterpret_cast<const char*>(next + (k * lines + l) * 16), _MM_HINT_T0);
    const __m512 w0 = _mm512_loadu_ps(panel + k * kPanel), w1 = _mm512_loadu_ps(panel + k * kPanel + 16);
    for (int j = 0; j < MR; ++j) {
      const __m512 xb = _mm512_set1_ps(x[j][k]);
      acc[j][0] = _mm512_fmadd_ps(xb, w0, acc[j][0]);
      acc[j][1] = _mm512_fmadd_ps(xb, w1, acc[j][1]);
    }
  }
  for (int j = 0; j < MR; ++j) {
    _mm512_storeu_ps(out + j * kPanel, acc[j][0]);
    _mm512_storeu_ps(out + j * kPanel + 16, acc[j][1]);
  }
}
#elif defined(__AVX2__)
// The same on 8-lane registers over 16-wide panels, MR <= 6: 2 MR accumulators (32 sums of a 32-wide panel
// would take 4 MR of the 16 ymm registers), 2 weight loads (one cache line) and MR broadcasts per 2 MR FMAs.
// A 32-wide panel in two half passes read every other line; 16-wide panels keep each pass contiguous
// (6-8% faster on small's products, docs/performance.md). Each sum runs over k in order, as in
// panel_block_portable.
template <int MR>
GRAPE_INLINE void panel_block_simd(const float* const* x, int64_t K, const float* panel, float* out,
                                   const float* next, int64_t lines) {
  static_assert(kPanel == 16 && MR <= 6);
  const float* xs[MR];
  for (int j = 0; j < MR; ++j) xs[j] = x[j];
  __m256 acc[MR][2];
  for (int j = 0; j < MR; ++j) acc[j][0] = acc[j][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    if (next)
      for (int64_t l = 0; l < lines; ++l)
        _mm_prefetch(reinterpret_cast<const char*>(next + (k * lines + l) * 16), _MM_HINT_T0);
    const __m256 w0 = _mm256_loadu_ps(panel + k * kPanel), w1 = _mm256_loadu_ps(panel + k * kPanel + 8);
    for (int j = 0; j < MR; ++j) {
      const __m256 xb = _mm256_broadcast_ss(xs[j] + k);
      acc[j][0] = _mm256_fmadd_ps(xb, w0, acc[j][0]);
      acc[j][1] = _mm256_fmadd_ps(xb, w1, acc[j][1]);
    }
  }
  for (int j = 0; j < MR; ++j) {
    _mm256_storeu_ps(out + j * kPanel, acc[j][0]);
    _mm256_storeu_ps(out + j * kPanel + 8, acc[j][1]);
  }
}
#endif

// Rows of x per panel block: as many as the block's accumulators leave registers for (16 zmm: 8 x 2; 16 ymm:
// 6 x 2).
#if defined(__AVX512F__) || !defined(__AVX2__)
constexpr int kPanelRows = 8;
#else
constexpr int kPanelRows = 6;
#endif

// Panels [p0, p1) of y = x W^T, in blocks of kPanelRows, 4, 2 or 1 rows of x.
template <bool kSimd>
void linear_panels_part(const float* x, int64_t R, int64_t K, const float* panels, int64_t N, float* y,
                        int64_t p0, int64_t p1) {
  for (int64_t pn = p0; pn < p1; ++pn) {
    const float* panel = panels + pn * K * kPanel;
    const int64_t n = pn * kPanel, nw = std::min(kPanel, N - n);
    for (int64_t r = 0, block = 0; r < R; ++block) {
      const int64_t mr = R - r >= kPanelRows ? kPanelRows : R - r >= 4 ? 4 : R - r >= 2 ? 2 : 1;
      const float* xs[kPanelRows];
      for (int64_t j = 0; j < mr; ++j) xs[j] = x + (r + j) * K;
      alignas(64) float out[kPanelRows * kPanel];
      auto run = [&](auto mr_const) {
        constexpr int MR = decltype(mr_const)::value;
#if defined(__AVX512F__) || defined(__AVX2__)
        if constexpr (kSimd) {
          // The next panel (kPanel / 16 K lines): each of the first kPanel / 16 blocks fetches K of them,
          // one per k, or a lone block all of them.
          constexpr int64_t shares = kPanel / 16;
          const bool lone = mr == R;
          const float* next = pn + 1 < p1 && block < shares ? panel + K * kPanel + block * K * 16 : nullptr;
          panel_block_simd<MR>(xs, K, panel, out, next, lone ? shares : 1);
        } else
#endif
          panel_block_portable<MR>(xs, K, panel, out);
      };
      if (mr == kPanelRows)
        run(std::integral_constant<int, kPanelRows>{});
      else if (mr == 4)
        run(std::integral_constant<int, 4>{});
      else if (mr == 2)
        run(std::integral_constant<int, 2>{});
      else
        run(std::integral_constant<int, 1>{});
      for (int64_t j = 0; j < mr; ++j)
        for (int64_t i = 0; i < nw; ++i) y[(r + j) * N + n + i] = out[j * kPanel + i];
      r += mr;
    }
  }
}

// This thread's share of y = x W^T from W's panels inside a parallel region (no barrier).
void linear_panels_shared(const float* x, int64_t R, int64_t K, const float* panels, int64_t N, float* y) {
  const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
  const int64_t n_panels = (N + kPanel - 1) / kPanel;
  linear_panels_part<true>(x, R, K, panels, N, y, n_panels * t / nt, n_panels * (t + 1) / nt);
}

// This thread's share of y = x W^T inside a parallel region (no barrier: the caller places it).
// With the matrix's panels (non-null) and enough rows, from those.
void linear_shared(const float* x, int64_t R, int64_t K, const float* W, int64_t N, float* y,
                   const float* panels = nullptr) {
  if (panels && R >= kPanelMinRows) return linear_panels_shared(x, R, K, panels, N, y);
  const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
  const int64_t blocks = (N + kRowsW - 1) / kRowsW;
  const int64_t b0 = blocks * t / nt, b1 = blocks * (t + 1) / nt;
  linear_part<true>(x, R, K, W, N, y, std::min(N, b0 * kRowsW), std::min(N, b1 * kRowsW));
}

// This thread's share of y = x W^T: from W's bf16 copy when the model has one (W16), else from fp32 W (its
// panels for a batch, when packed).
void product(const DecoderModel& m, const float* x, int64_t R, int64_t K, const float* W, const uint16_t* W16,
             const float* panels, int64_t N, float* y) {
  if (W16)
    linear_shared_bf16(m.bf16_kernel, x, R, K, W16, N, y);
  else
    linear_shared(x, R, K, W, N, y, panels);
}

// Rotation and YaRN's factor of one head's q or k (D values) at position pos, in place.
void rotate_head(const DecoderLayer& l, int64_t h, int64_t pos, int64_t D, float* x) {
  if (!l.cos) return;
  const int64_t row = (pos * l.G + (l.G == 1 ? 0 : h)) * l.P;
  const float *c = l.cos + row, *s = l.sin + row;
  for (int64_t i = 0; i < l.P; ++i) {
    const int64_t ia = l.interleaved ? 2 * i : i, ib = l.interleaved ? 2 * i + 1 : i + l.P;
    const float a = x[ia], b = x[ib];
    x[ia] = a * c[i] - b * s[i];
    x[ib] = a * s[i] + b * c[i];
  }
  if (l.mscale != 1.0f)
    for (int64_t d = 0; d < D; ++d) x[d] *= l.mscale;
}

// QK-norm, rotation and YaRN's factor of one head's q or k (D values) at position pos, in place; the norm
// comes first, or last with norm_after_rotation (the model's qk_norm order).
void encode_head(const DecoderLayer& l, const float* gain, int64_t h, int64_t pos, int64_t D, float eps,
                 float* x) {
  if (gain && !l.norm_after_rotation) rmsnorm_row(x, gain, D, eps, x);
  rotate_head(l, h, pos, D, x);
  if (gain && l.norm_after_rotation) rmsnorm_row(x, gain, D, eps, x);
}

// GRAPE-AP's probes of one (row, head) at position pos from its raw probe p (P values): the query keeps p,
// the key gets p's RMS-normalised p̂ turned by the angle pos in pairs (i, i + P/2), as its encode does.
void probe_head(const DecoderLayer& l, int64_t pos, const float* p, float* query, float* key) {
  const int64_t P = l.probe_dim, half = P / 2;
  float sq = 0;
  for (int64_t i = 0; i < P; ++i) sq += p[i] * p[i];
  const float inv = 1.0f / std::sqrt(sq / float(P) + l.probe_eps);
  // cos and sign * sin of the reduced angle, in double then fp32, as rotate_pairs forms them.
  const double angle = std::fmod(double(pos), 2.0 * std::numbers::pi);
  const float c = float(std::cos(angle)), s = float(std::sin(angle)) * l.probe_sign;
  for (int64_t i = 0; i < half; ++i) {
    const float a = p[i] * inv, b = p[i + half] * inv;
    key[i] = a * c - b * s;
    key[i + half] = a * s + b * c;
  }
  std::copy_n(p, P, query);
}

// Lap timer of DecoderWorkspace::phases: lap(bucket) adds the time since the last lap to that bucket. Only
// the team's first thread times, and only when asked (phases non-null).
struct PhaseClock {
  DecoderPhases* phases;
  std::chrono::steady_clock::time_point last;
  explicit PhaseClock(DecoderPhases* p) : phases(p && omp_get_thread_num() == 0 ? p : nullptr) {
    if (phases) last = std::chrono::steady_clock::now();
  }
  void lap(double DecoderPhases::*bucket) {
    if (!phases) return;
    const auto now = std::chrono::steady_clock::now();
    phases->*bucket += std::chrono::duration<double>(now - last).count();
    last = now;
  }
};

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("grape::kernels::cpu::decoder_forward: " + what);
}

}  // namespace

void linear_rows(const float* x, int64_t R, int64_t K, const float* W, int64_t N, float* y) {
#pragma omp parallel num_threads(team_size(N))
  linear_shared(x, R, K, W, N, y);
}

void linear_rows_portable(const float* x, int64_t R, int64_t K, const float* W, int64_t N, float* y) {
  linear_part<false>(x, R, K, W, N, y, 0, N);
}

int64_t panel_rows() { return kPanel; }

int64_t panel_min_rows() { return kPanelMinRows; }

bool makes_panels(int64_t sequences, int64_t rows) {
  return rows >= kPanelMinRows && (kPanelMinRows == 1 || sequences >= 2);
}

std::vector<float> pack_panels(const float* W, int64_t N, int64_t K) {
  const int64_t n_panels = (N + kPanel - 1) / kPanel;
  std::vector<float> out(size_t(n_panels * K * kPanel), 0.0f);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) out[size_t(((n / kPanel) * K + k) * kPanel + n % kPanel)] = W[n * K + k];
  return out;
}

void linear_rows_panels(const float* x, int64_t R, int64_t K, const float* panels, int64_t N, float* y) {
#pragma omp parallel num_threads(team_size((N + kPanel - 1) / kPanel))
  linear_panels_shared(x, R, K, panels, N, y);
}

void linear_rows_panels_portable(const float* x, int64_t R, int64_t K, const float* panels, int64_t N,
                                 float* y) {
  linear_panels_part<false>(x, R, K, panels, N, y, 0, (N + kPanel - 1) / kPanel);
}

void decoder_forward(const DecoderModel& m, const std::vector<DecoderRow>& rows, DecoderWorkspace& ws,
                     float* logits) {
  const int64_t C = m.C, H = m.H, D = m.D, HD = m.H * m.D, F = m.hidden, V = m.vocab;
  require(C > 0 && H > 0 && D > 0 && F > 0 && V > 0 && m.wte && m.norm_f, "incomplete model");
  require(!rows.empty(), "no rows");
  std::vector<int64_t> start(rows.size() + 1, 0);  // first new row of each sequence
  int64_t maxT = 0;
  for (size_t b = 0; b < rows.size(); ++b) {
    const auto& r = rows[b];
    require(r.T >= 1 && r.tokens && r.length >= 0 && r.capacity >= r.length + r.T, "a row without room");
    require(r.k.size() == m.layers.size() && r.v.size() == m.layers.size(), "a row's cache has other layers");
    for (size_t li = 0; li < m.layers.size(); ++li)
      require(!m.layers[li].gate_w || (r.key_b.size() == m.layers.size() &&
                                       r.gate_sum.size() == m.layers.size() && r.key_b[li] && r.gate_sum[li]),
              "a row's cache lacks the forget gate's terms");
    for (size_t li = 0; li < m.layers.size(); ++li)
      require(!m.layers[li].probe_w || (r.key_r.size() == m.layers.size() && r.key_r[li]),
              "a row's cache lacks the path integral's key probes");
    start[b + 1] = start[b] + r.T;
    maxT = std::max(maxT, r.T);
  }
  const int64_t R = start.back();
  int64_t maxP = 0;  // the widest probe of a path-integral layer
  for (const auto& l : m.layers)
    if (l.probe_w) {
      require(l.probe_m && l.probe_dim >= 2 && l.probe_dim % 2 == 0, "a path integral without even probes");
      maxP = std::max(maxP, l.probe_dim);
    }
  auto grow = [](std::vector<float>& v, int64_t n) {
    if (int64_t(v.size()) < n) v.resize(size_t(n));
  };
  grow(ws.x, R * C), grow(ws.xn, R * C), grow(ws.q, R * HD), grow(ws.k, R * HD), grow(ws.v, R * HD);
  grow(ws.qh, R * HD), grow(ws.yh, R * HD), grow(ws.y, R * HD), grow(ws.a, R * F), grow(ws.g, R * F);
  grow(ws.bias_c, H * maxT), grow(ws.bias_a, R * H), grow(ws.lse, R * H);
  grow(ws.probe, R * H * maxP), grow(ws.probe_q, R * H * maxP);
  const int64_t pairs = int64_t(rows.size()) * H;  // attention tasks
  const float scale = float(1.0 / std::sqrt(double(D)));
  float *x = ws.x.data(), *xn = ws.xn.data(), *q = ws.q.data(), *k = ws.k.data(), *v = ws.v.data();
  float *qh = ws.qh.data(), *yh = ws.yh.data(), *y = ws.y.data(), *a = ws.a.data(), *g = ws.g.data();
  float *bias_c = ws.bias_c.data(), *bias_a = ws.bias_a.data(), *lse = ws.lse.data();
  float *probe = ws.probe.data(), *probe_q = ws.probe_q.data();
  // The sequence and step of each new row.
  std::vector<int64_t> seq_of(size_t(R), 0);
  for (size_t b = 0; b < rows.size(); ++b)
    for (int64_t r = start[b]; r < start[b + 1]; ++r) seq_of[size_t(r)] = int64_t(b);

  if (ws.phases) ++ws.phases->passes;
#pragma omp parallel num_threads(team_size(F))
  {
    PhaseClock clock(ws.phases);
    constexpr auto products = &DecoderPhases::products, attention = &DecoderPhases::attention,
                   other = &DecoderPhases::other;
#pragma omp for
    for (int64_t r = 0; r < R; ++r) {
      const auto& row = rows[size_t(seq_of[size_t(r)])];
      const int64_t id = row.tokens[r - start[size_t(seq_of[size_t(r)])]];
      if (m.wte_bf16)
        for (int64_t c = 0; c < C; ++c) x[r * C + c] = bf16_to_float(m.wte_bf16[id * C + c]);
      else
        std::copy_n(m.wte + id * C, C, x + r * C);
    }
    for (size_t li = 0; li < m.layers.size(); ++li) {
      const DecoderLayer& l = m.layers[li];
#pragma omp for
      for (int64_t r = 0; r < R; ++r) rmsnorm_row(x + r * C, l.norm1, C, m.eps, xn + r * C);
      clock.lap(other);
      product(m, xn, R, C, l.wq, l.wq_bf16, l.panels.wq, HD, q);
      product(m, xn, R, C, l.wk, l.wk_bf16, l.panels.wk, HD, k);
      product(m, xn, R, C, l.wv, l.wv_bf16, l.panels.wv, HD, v);
      if (l.probe_w)
        product(m, xn, R, C, l.probe_w, nullptr, nullptr, H * l.probe_dim, probe);  // GRAPE-AP's probes
      if (l.slope) {
#pragma omp for nowait
        for (int64_t i = 0; i < H * maxT; ++i) bias_c[i] = l.slope[i / maxT];
      }
#pragma omp barrier
      clock.lap(products);
      if (l.gate_w) {  // the forget gate's running sum, in order along each sequence: a per query, b per key
#pragma omp for
        for (int64_t bh = 0; bh < pairs; ++bh) {
          const int64_t b = bh / H, h = bh % H;
          const auto& row = rows[size_t(b)];
          double c = row.gate_sum[li][h];
          for (int64_t t = 0; t < row.T; ++t) {
            const float* xr = xn + (start[size_t(b)] + t) * C;
            // float64 products summed in vector lanes (a serial sum waited on each add: ~0.3 ms a batch-16
            // step on small)
            const float* w = l.gate_w + h * C;
            double z = 0;
#pragma omp simd reduction(+ : z)
            for (int64_t i = 0; i < C; ++i) z += double(w[i]) * double(xr[i]);
            z += l.gate_b[h];
            c += z >= 0 ? -std::log1p(std::exp(-z)) : z - std::log1p(std::exp(z));  // logsigmoid(z)
            bias_a[start[size_t(b)] * H + h * row.T + t] = float(c);
            row.key_b[li][h * row.capacity + row.length + t] = float(-c);
          }
          row.gate_sum[li][h] = c;
        }
      }
      // Encode q and k per (row, head); q to [H][T][D] per sequence, k and v into the cache.
#pragma omp for
      for (int64_t rh = 0; rh < R * H; ++rh) {
        const int64_t r = rh / H, h = rh % H, b = seq_of[size_t(r)], t = r - start[size_t(b)];
        const auto& row = rows[size_t(b)];
        const int64_t pos = row.length + t;
        float* qd = qh + (start[size_t(b)] * H + h * row.T + t) * D;
        std::copy_n(q + r * HD + h * D, D, qd);
        encode_head(l, l.q_norm, h, pos, D, m.eps, qd);
        float* kd = row.k[li] + (h * row.capacity + pos) * D;
        std::copy_n(k + r * HD + h * D, D, kd);
        encode_head(l, l.k_norm, h, pos, D, m.eps, kd);
        std::copy_n(v + r * HD + h * D, D, row.v[li] + (h * row.capacity + pos) * D);
        if (l.probe_w) {  // the query's probe to [H][T][P] per sequence, the key's into the cache
          const int64_t P = l.probe_dim;
          probe_head(l, pos, probe + (r * H + h) * P, probe_q + (start[size_t(b)] * H + h * row.T + t) * P,
                     row.key_r[li] + (h * row.capacity + pos) * P);
        }
      }
      clock.lap(other);
#pragma omp for schedule(dynamic, 1)
      for (int64_t bh = 0; bh < pairs; ++bh) {
        const int64_t b = bh / H, h = bh % H;
        const auto& row = rows[size_t(b)];
        const int64_t base = start[size_t(b)] * H + h * row.T;
        ForwardParams p;
        p.shape = {1, 1, row.T, row.length + row.T, D, row.length, 0, scale};
        p.q = qh + base * D;
        p.k = row.k[li] + h * row.capacity * D;
        p.v = row.v[li] + h * row.capacity * D;
        if (l.slope) p.bias.c = bias_c + h * maxT;
        if (l.gate_w) p.bias.a = bias_a + base, p.bias.b = row.key_b[li] + h * row.capacity;
        if (l.dist) p.bias.dist = l.dist + h * l.W, p.bias.W = l.W;
        if (l.probe_w) {
          p.bias.p = probe_q + base * l.probe_dim, p.bias.r = row.key_r[li] + h * row.capacity * l.probe_dim;
          p.bias.m = l.probe_m + h, p.bias.P = l.probe_dim;
        }
        p.out = yh + base * D;
        p.lse = lse + base;
        // Nested inside this team, it runs on the calling thread. A few queries take the decode kernel even
        // against a short cache: the tiled forward would pack whole key tiles for one query row.
        if (row.T <= 16)
          attention_decode(p);
        else
          attention_forward(p);
      }
#pragma omp for
      for (int64_t rh = 0; rh < R * H; ++rh) {
        const int64_t r = rh / H, h = rh % H, b = seq_of[size_t(r)], t = r - start[size_t(b)];
        std::copy_n(yh + (start[size_t(b)] * H + h * rows[size_t(b)].T + t) * D, D, y + r * HD + h * D);
      }
      clock.lap(attention);
      product(m, y, R, HD, l.wo, l.wo_bf16, l.panels.wo, C, xn);
#pragma omp barrier
      clock.lap(products);
#pragma omp for
      for (int64_t r = 0; r < R; ++r) {
        for (int64_t c = 0; c < C; ++c) x[r * C + c] += xn[r * C + c];  // h = x + attention
        rmsnorm_row(x + r * C, l.norm2, C, m.eps, xn + r * C);
      }
      clock.lap(other);
      product(m, xn, R, C, l.w1, l.w1_bf16, l.panels.w1, F, a);
      product(m, xn, R, C, l.w2, l.w2_bf16, l.panels.w2, F, g);
#pragma omp barrier
      clock.lap(products);
#pragma omp for  // SwiGLU, a = silu(a) g, with training's kernel (its vectorised exp), per row
      for (int64_t r = 0; r < R; ++r) swiglu_forward_serial(a + r * F, g + r * F, F, a + r * F);
      clock.lap(other);
      product(m, a, R, F, l.w_out, l.w_out_bf16, l.panels.w_out, C, xn);
#pragma omp barrier
      clock.lap(products);
#pragma omp for
      for (int64_t i = 0; i < R * C; ++i) x[i] += xn[i];
    }
#pragma omp for
    for (int64_t r = 0; r < R; ++r) rmsnorm_row(x + r * C, m.norm_f, C, m.eps, xn + r * C);
    clock.lap(other);
    product(m, xn, R, C, m.wte, m.wte_bf16, m.wte_panels, V, logits);  // the tied head
    if (ws.phases) {                                                   // (every thread takes the same branch)
#pragma omp barrier
      clock.lap(products);
    }
  }
}

}  // namespace grape::kernels::cpu
