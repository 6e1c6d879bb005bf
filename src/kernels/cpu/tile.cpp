// The tiling shared by the fused attention passes (see tile.hpp): validation, workspaces, packing and
// decode's few-row products (the micro-kernel itself is defined in tile.hpp).
#include "kernels/cpu/tile.hpp"

#include <omp.h>

#include <cmath>
#include <cstring>
#include <new>
#include <stdexcept>

#if defined(__AVX2__) && !defined(__AVX512F__)
#include <immintrin.h>  // pack_cols' 8 x 8 transposes, decode's 8-lane products
#endif

namespace grape::kernels::cpu {

int usable_threads() {
  return omp_get_active_level() >= omp_get_max_active_levels() ? 1 : omp_get_max_threads();
}

int team_size(int64_t n_tasks) { return int(std::clamp<int64_t>(n_tasks, 1, usable_threads())); }

// ---------------------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------------------

void fail(const char* fn, const std::string& what) {
  throw std::invalid_argument(std::string("grape::kernels::cpu::") + fn + ": " + what);
}

void check(bool ok, const char* fn, const std::string& what) {
  if (!ok) fail(fn, what);
}

// The messages are built only on failure: decode calls this per (sequence, head) and layer.
void validate(const char* fn, const AttentionShape& s, const float* q, const float* k, const float* v,
              const BiasTerms& bias) {
  if (s.B < 1 || s.H < 1 || s.Tq < 1 || s.Tk < 1)
    fail(fn, "B, H, Tq and Tk must be >= 1 (got B=" + std::to_string(s.B) + " H=" + std::to_string(s.H) +
                 " Tq=" + std::to_string(s.Tq) + " Tk=" + std::to_string(s.Tk) + ")");
  if (s.D < 1) fail(fn, "head dim D must be >= 1 (got " + std::to_string(s.D) + ")");
  if (s.q_offset < s.k_offset)
    fail(fn, "every query must see a key: need q_offset >= k_offset (got q_offset=" +
                 std::to_string(s.q_offset) + ", k_offset=" + std::to_string(s.k_offset) + ")");
  if (!std::isfinite(s.scale)) fail(fn, "scale must be finite");
  if (!q || !k || !v) fail(fn, "q, k and v must not be null");
  if (bias.dist && bias.W < 1)
    fail(fn, "a distance table needs W >= 1 entries per head (got " + std::to_string(bias.W) + ")");
  if (!bias.path()) return;
  if (!bias.r || !bias.m) fail(fn, "a path bias (p given) needs r and m");
  if (bias.P < 1) fail(fn, "path-bias probe dim P must be >= 1 (got " + std::to_string(bias.P) + ")");
}

// ---------------------------------------------------------------------------------------------------------
// Workspaces
// ---------------------------------------------------------------------------------------------------------

Arena::Arena(int64_t threads, int64_t floats) : per_thread(round_up(floats, kAlign / 4)) {
  const size_t bytes = size_t(threads * per_thread) * sizeof(float);
  mem.reset(static_cast<float*>(std::aligned_alloc(kAlign, std::max<size_t>(bytes, kAlign))));
  if (!mem) throw std::bad_alloc();
}

// ---------------------------------------------------------------------------------------------------------
// Packing
// ---------------------------------------------------------------------------------------------------------

void pack_rows(const float* const* src_rows, int64_t n, int64_t rows, int64_t D, int64_t Dp, float* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    float* d = dst + r * Dp;
    if (r < n) {
      std::memcpy(d, src_rows[r], size_t(D) * sizeof(float));
      std::fill(d + D, d + Dp, 0.0f);
    } else {
      std::fill(d, d + Dp, 0.0f);
    }
  }
}

#if defined(__AVX512F__)
namespace {

// Mask of the valid floats in chunk c of a D-float row (the rows read in place are not padded to Dp).
inline __mmask16 chunk_mask(int64_t D, int64_t c) {
  const int64_t n = std::min<int64_t>(16, D - 16 * c);
  return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
}

// r[i] lane c -> r[c] lane i: a 16 x 16 transpose in registers (pairs of floats, then of doubles, then
// 128-bit lanes twice: 64 shuffles for 256 floats).
GRAPE_INLINE void transpose16(__m512* r) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int i = 0; i < 2; ++i)
    for (int k = 0; k < 4; ++k) {
      t[8 * i + k] = _mm512_shuffle_f32x4(r[8 * i + k], r[8 * i + 4 + k], 0x88);
      t[8 * i + 4 + k] = _mm512_shuffle_f32x4(r[8 * i + k], r[8 * i + 4 + k], 0xDD);
    }
  for (int k = 0; k < 8; ++k) {
    r[k] = _mm512_shuffle_f32x4(t[k], t[8 + k], 0x88);
    r[8 + k] = _mm512_shuffle_f32x4(t[k], t[8 + k], 0xDD);
  }
}

}  // namespace
#elif defined(__AVX2__)
namespace {

// r[i] lane c -> r[c] lane i: an 8 x 8 transpose in registers (pairs of floats, then of doubles, then the
// 128-bit halves: 24 shuffles for 64 floats).
GRAPE_INLINE void transpose8(__m256* r) {
  __m256 t[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    const __m256d a = _mm256_castps_pd(t[4 * i]), b = _mm256_castps_pd(t[4 * i + 1]);
    const __m256d c = _mm256_castps_pd(t[4 * i + 2]), d = _mm256_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm256_castpd_ps(_mm256_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm256_castpd_ps(_mm256_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm256_castpd_ps(_mm256_unpacklo_pd(b, d));
    r[4 * i + 3] = _mm256_castpd_ps(_mm256_unpackhi_pd(b, d));
  }
  for (int k = 0; k < 4; ++k) {
    const __m256 lo = r[k], hi = r[4 + k];
    r[k] = _mm256_permute2f128_ps(lo, hi, 0x20);
    r[4 + k] = _mm256_permute2f128_ps(lo, hi, 0x31);
  }
}

}  // namespace
#endif

void pack_cols(const float* const* src_rows, int64_t n, int64_t cols, int64_t D, int64_t Dp, float* dst) {
#if defined(__AVX512F__)
  // By 16 x 16 blocks transposed in registers, masked loads giving the zero padding: the element-wise copy
  // below was ~10% of a forward and of a backward at T = 128..256 (it stores with a stride of cols floats).
  if (cols % 16 == 0 && Dp % 16 == 0) {
    for (int64_t j0 = 0; j0 < cols; j0 += 16)
      for (int64_t c = 0; c < Dp / 16; ++c) {
        const __mmask16 mask = chunk_mask(D, c);
        __m512 r[16];
        for (int64_t j = 0; j < 16; ++j)
          r[j] = j0 + j < n ? _mm512_maskz_loadu_ps(mask, src_rows[j0 + j] + 16 * c) : _mm512_setzero_ps();
        transpose16(r);
        for (int64_t e = 0; e < 16; ++e) _mm512_storeu_ps(dst + (16 * c + e) * cols + j0, r[e]);
      }
    return;
  }
#elif defined(__AVX2__)
  // The same by 8 x 8 blocks (the element-wise copy was 3% of a tiny training step on a Zen 3).
  if (cols % 8 == 0 && Dp % 8 == 0) {
    for (int64_t j0 = 0; j0 < cols; j0 += 8)
      for (int64_t c = 0; c < Dp / 8; ++c) {
        const int64_t valid = std::clamp<int64_t>(D - 8 * c, 0, 8);
        const __m256i mask =
            _mm256_cmpgt_epi32(_mm256_set1_epi32(int(valid)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        __m256 r[8];
        for (int64_t j = 0; j < 8; ++j)
          r[j] = j0 + j < n && valid > 0 ? _mm256_maskload_ps(src_rows[j0 + j] + 8 * c, mask)
                                         : _mm256_setzero_ps();
        transpose8(r);
        for (int64_t e = 0; e < 8; ++e) _mm256_storeu_ps(dst + (8 * c + e) * cols + j0, r[e]);
      }
    return;
  }
#endif
  std::fill(dst, dst + Dp * cols, 0.0f);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t d = 0; d < D; ++d) dst[d * cols + j] = src_rows[j][d];
}

void row_pointers(const float* x, int64_t T, int64_t H, int64_t D, int64_t b, int64_t h, int64_t t0,
                  int64_t n, const float** out) {
  for (int64_t r = 0; r < n; ++r) out[r] = x + ((b * T + t0 + r) * H + h) * D;
}

// ---------------------------------------------------------------------------------------------------------
// Decode's few-row products
// ---------------------------------------------------------------------------------------------------------

namespace {

// Calls f(std::integral_constant<int, n>) for 1 <= n <= 8; false (nothing called) otherwise.
template <class F>
[[maybe_unused]] bool with_count(int64_t n, F f) {
  switch (n) {
    case 1:
      f(std::integral_constant<int, 1>{});
      return true;
    case 2:
      f(std::integral_constant<int, 2>{});
      return true;
    case 3:
      f(std::integral_constant<int, 3>{});
      return true;
    case 4:
      f(std::integral_constant<int, 4>{});
      return true;
    case 5:
      f(std::integral_constant<int, 5>{});
      return true;
    case 6:
      f(std::integral_constant<int, 6>{});
      return true;
    case 7:
      f(std::integral_constant<int, 7>{});
      return true;
    case 8:
      f(std::integral_constant<int, 8>{});
      return true;
    default:
      return false;
  }
}

}  // namespace

#if defined(__AVX512F__)
namespace {

// dots_direct with the query row in NC registers (Dp = 16 NC): 16 keys' products at a time, summed by one
// tree (sums16) instead of a horizontal sum per key.
template <int NC>
GRAPE_INLINE void dots_direct_regs(int64_t rows, int64_t nk, int64_t D, const float* Q,
                                   const float* const* krows, float* S) {
  const __mmask16 last = chunk_mask(D, NC - 1);
  for (int64_t r = 0; r < rows; ++r) {
    __m512 q[NC];
    for (int c = 0; c < NC; ++c) q[c] = _mm512_loadu_ps(Q + r * NC * 16 + 16 * c);
    for (int64_t j0 = 0; j0 < nk; j0 += 16) {
      const int64_t n = std::min<int64_t>(16, nk - j0);
      __m512 acc[16];
      for (int j = 0; j < 16; ++j) {
        acc[j] = _mm512_setzero_ps();
        if (j >= n) continue;
        const float* k = krows[j0 + j];
        for (int c = 0; c < NC; ++c)
          acc[j] = _mm512_fmadd_ps(
              q[c], _mm512_maskz_loadu_ps(c == NC - 1 ? last : __mmask16(0xFFFF), k + 16 * c), acc[j]);
      }
      _mm512_mask_storeu_ps(S + r * kBK + j0, __mmask16((1u << n) - 1), sums16(acc));
    }
  }
}

// pv_direct with the output row in NC registers over all nk keys.
template <int NC>
GRAPE_INLINE void pv_direct_regs(int64_t rows, int64_t nk, int64_t D, const float* S,
                                 const float* const* vrows, float* O) {
  const __mmask16 last = chunk_mask(D, NC - 1);
  for (int64_t r = 0; r < rows; ++r) {
    float* o = O + r * NC * 16;
    __m512 acc[NC];
    for (int c = 0; c < NC; ++c) acc[c] = _mm512_loadu_ps(o + 16 * c);
    for (int64_t j = 0; j < nk; ++j) {
      const __m512 p = _mm512_set1_ps(S[r * kBK + j]);
      for (int c = 0; c < NC; ++c)
        acc[c] = _mm512_fmadd_ps(
            p, _mm512_maskz_loadu_ps(c == NC - 1 ? last : __mmask16(0xFFFF), vrows[j] + 16 * c), acc[c]);
    }
    for (int c = 0; c < NC; ++c) _mm512_storeu_ps(o + 16 * c, acc[c]);
  }
}

}  // namespace
#elif defined(__AVX2__)
namespace {

// The 8 horizontal sums of a[0..7] in one vector, lane i = the sum of a[i]'s lanes, each summed in the same
// order ((0 + 1) + (2 + 3)) + ((4 + 5) + (6 + 7)) whichever slot it has (as sums16 does).
GRAPE_INLINE __m256 sums8(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  // halves: a0..a3, a4..a7
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// Loads of the D floats of a row in 8-lane chunks: chunk c < full plainly, the last one masked.
struct Chunks8 {
  int64_t full, n;  // whole chunks, all chunks
  __m256i last;
  explicit Chunks8(int64_t D) : full(D / 8), n((D + 7) / 8) {
    static const int32_t kMask[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
    last = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kMask + 8 - (D - 8 * full)));
  }
  GRAPE_INLINE __m256 load(const float* row, int64_t c) const {
    return c < full ? _mm256_loadu_ps(row + 8 * c) : _mm256_maskload_ps(row + 8 * c, last);
  }
};

// dots_direct on 8-lane registers: 8 keys' products at a time, summed by one tree (sums8) instead of a
// horizontal sum per key; the query chunk is reloaded from L1 per chunk (8 accumulators stay in registers).
// kWhole: D is a multiple of 8, every load plain (GCC keeps a per-load branch between plain and masked
// loads otherwise, in the innermost loop).
template <bool kWhole>
GRAPE_INLINE void dots_direct_regs(int64_t rows, int64_t nk, const Chunks8& ch, int64_t Dp, const float* Q,
                                   const float* const* krows, float* S) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j0 = 0; j0 < nk; j0 += 8) {
      const int64_t n = std::min<int64_t>(8, nk - j0);
      const float* k[8];
      for (int j = 0; j < 8; ++j)
        k[j] = krows[j0 + std::min<int64_t>(j, n - 1)];  // repeats: computed, unused
      __m256 acc[8];
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
      for (int64_t c = 0; c < ch.n; ++c) {
        const __m256 q = _mm256_loadu_ps(Q + r * Dp + 8 * c);
        for (int j = 0; j < 8; ++j)
          acc[j] = _mm256_fmadd_ps(q, kWhole ? _mm256_loadu_ps(k[j] + 8 * c) : ch.load(k[j], c), acc[j]);
      }
      if (n == 8) {  // (a copy loop of 8 floats became `rep movs`, slow to start)
        _mm256_storeu_ps(S + r * kBK + j0, sums8(acc));
        continue;
      }
      alignas(32) float s[8];
      _mm256_store_ps(s, sums8(acc));
      for (int64_t j = 0; j < n; ++j) S[r * kBK + j0 + j] = s[j];
    }
}

// pv_direct on 8-lane registers: NC chunks of the output row from chunk c0 on in registers over all nk keys;
// kWhole: the NC chunks are whole, every load plain.
template <int NC, bool kWhole>
GRAPE_INLINE void pv_direct_regs(int64_t r, int64_t nk, const Chunks8& ch, int64_t c0, int64_t Dp,
                                 const float* S, const float* const* vrows, float* O) {
  float* o = O + r * Dp + 8 * c0;
  __m256 acc[NC];
  for (int c = 0; c < NC; ++c) acc[c] = _mm256_loadu_ps(o + 8 * c);
  for (int64_t j = 0; j < nk; ++j) {
    const __m256 p = _mm256_broadcast_ss(S + r * kBK + j);
    for (int c = 0; c < NC; ++c)
      acc[c] = _mm256_fmadd_ps(
          p, kWhole ? _mm256_loadu_ps(vrows[j] + 8 * (c0 + c)) : ch.load(vrows[j], c0 + c), acc[c]);
  }
  for (int c = 0; c < NC; ++c) _mm256_storeu_ps(o + 8 * c, acc[c]);
}

}  // namespace
#endif

GRAPE_SIMD
void dots_direct(int64_t rows, int64_t nk, int64_t D, int64_t Dp, const float* Q, const float* const* krows,
                 float* S) {
#if defined(__AVX512F__)
  if (with_count(Dp / 16, [&](auto nc) { dots_direct_regs<decltype(nc)::value>(rows, nk, D, Q, krows, S); }))
    return;
#elif defined(__AVX2__)
  const Chunks8 ch(D);
  if (ch.full == ch.n)
    dots_direct_regs<true>(rows, nk, ch, Dp, Q, krows, S);
  else
    dots_direct_regs<false>(rows, nk, ch, Dp, Q, krows, S);
  return;
#endif
  for (int64_t j = 0; j < nk; ++j) {
    const float* kj = krows[j];
    for (int64_t r = 0; r < rows; ++r) {
      const float* q = Q + r * Dp;
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t d = 0; d < D; ++d) sum += q[d] * kj[d];
      S[r * kBK + j] = sum;
    }
  }
}

GRAPE_SIMD
void pv_direct(int64_t rows, int64_t nk, int64_t D, int64_t Dp, const float* S, const float* const* vrows,
               float* O) {
#if defined(__AVX512F__)
  if (with_count(Dp / 16, [&](auto nc) { pv_direct_regs<decltype(nc)::value>(rows, nk, D, S, vrows, O); }))
    return;
#elif defined(__AVX2__)
  const Chunks8 ch(D);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c0 = 0; c0 < ch.n; c0 += 8)  // groups of up to 8 chunks (8 registers)
      with_count(std::min<int64_t>(8, ch.n - c0), [&](auto nc) {
        constexpr int NC = decltype(nc)::value;
        if (c0 + NC <= ch.full)
          pv_direct_regs<NC, true>(r, nk, ch, c0, Dp, S, vrows, O);
        else
          pv_direct_regs<NC, false>(r, nk, ch, c0, Dp, S, vrows, O);
      });
  return;
#endif
  for (int64_t j = 0; j < nk; ++j) {
    const float* vj = vrows[j];
    for (int64_t r = 0; r < rows; ++r) {
      const float p = S[r * kBK + j];
      float* o = O + r * Dp;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) o[d] += p * vj[d];
    }
  }
}

}  // namespace grape::kernels::cpu
