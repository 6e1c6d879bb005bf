// The fused attention kernels' scalar math and row reductions, written so that the compiler vectorises them:
// exp, log1p on [0, 1], the path bias's logsigmoid, horizontal max/sum and an in-register suffix scan.
// Internal to src/kernels/cpu (compiled with the kernel flags of the grape_kernels target).
#pragma once

#if defined(__AVX512F__) || defined(__AVX2__)
#pragma GCC diagnostic push  // GCC 12 warns inside its own headers' _mm512_undefined_ps (its bug 105593)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>  // horizontal reductions and an in-register scan (lanes_reduce, suffix_sums)
#pragma GCC diagnostic pop
#endif

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

// GRAPE_SIMD marks the hot tile functions. Built for a machine with AVX-512 (-march=native): use full 512-bit
// vectors (GCC prefers 256 on most such CPUs; the kMR x kNR accumulators fit 8 zmm registers but not 16 ymm
// ones). Built for baseline x86-64: compile them for AVX-512, AVX2 and baseline, picked at load time. It goes
// on definitions only: on a header's declaration, GCC 12 makes every caller's file emit a resolver of its own
// for clones that only the defining file has (undefined references at link time).
//
// GRAPE_SIMD_DEFAULT_WIDTH marks the two whose sums are split over vector lanes, so that the width sets their
// summation order (the softmax backward's dS reductions, the path bias's gradient): the same clones in a
// portable build, but the compiler's default width in a native one, the width they ran at before the kernel
// split (GCC inlined them into callers without GRAPE_SIMD), so that their results stay the same to the bit.
#ifndef GRAPE_SIMD
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__AVX512F__)
#define GRAPE_SIMD __attribute__((target("prefer-vector-width=512")))
#define GRAPE_SIMD_DEFAULT_WIDTH
#elif defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) && \
    defined(__linux__) && !defined(__AVX2__)
#define GRAPE_SIMD __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define GRAPE_SIMD_DEFAULT_WIDTH GRAPE_SIMD
#else
#define GRAPE_SIMD
#define GRAPE_SIMD_DEFAULT_WIDTH
#endif
#endif
#ifndef GRAPE_SIMD_DEFAULT_WIDTH
#define GRAPE_SIMD_DEFAULT_WIDTH
#endif

#if defined(__GNUC__)
#define GRAPE_INLINE inline __attribute__((always_inline))
#else
#define GRAPE_INLINE inline
#endif

namespace grape::kernels::cpu {

constexpr int64_t kLanes = 16;  // floats per AVX-512 register (two AVX2 ones): the width of every row loop
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------------------------------------
// exp, log1p, logsigmoid
// ---------------------------------------------------------------------------------------------------------

// exp(x) = 2^n e^r with n = round(x / ln2), |r| <= ln2 / 2; e^r by its degree-7 Taylor polynomial (truncation
// < 1e-8 relative). The kernels only exponentiate differences to a running max or to the log-sum-exp (<= 0 up
// to rounding), so the domain is x <= 88 (larger x is clamped to 88, keeping 2^n a normal float: one scale,
// no overflow branch). Results below FLT_MIN are flushed to 0 (no subnormal slow paths; softmax cannot see
// them); -inf gives 0; NaN gives NaN (the clamps pass it through, as does every later step).
inline float exp_inline(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693145751953125f;  // ln2's leading 15 bits: n * kLn2Hi is exact
  constexpr float kLn2Lo = 1.42860682030941723212e-6f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  const float xc = std::min(std::max(x, -87.5f), 88.0f);  // n in [-126, 127]; std::max/min keep a NaN x
  const float n = (xc * kLog2e + kRound) - kRound;
  const float r = (xc - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float y = p * std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
  return x < -87.33654475f ? 0.0f : y;  // ln(FLT_MIN)
}

// log(1 + e) for e in [0, 1] (NaN passes): e q(e) with q a degree-8 Chebyshev fit of log1p(e) / e on [0, 1]
// (fit error < 4e-8 relative; in fp32 within 2.4e-7 relative, also for tiny e). No division (a vector divide
// costs as much as the whole polynomial), branch-free, vectorises.
inline float log1p_unit(float e) {
  float q = 0.005126102141f;
  q = q * e - 0.02907406468f;
  q = q * e + 0.07751608674f;
  q = q * e - 0.1360224762f;
  q = q * e + 0.1907688074f;
  q = q * e - 0.2483539899f;
  q = q * e + 0.3331812171f;
  q = q * e - 0.4999944498f;
  q = q * e + 0.9999999659f;
  return e * q;
}

// The path bias's edge potential, psi = m logsigmoid(x) = m (min(x, 0) - log1p(exp(-|x|))), and, when wanted,
// m dlogsigmoid/dx = m sigmoid(-x) (= m e / (1 + e) for x >= 0, m / (1 + e) otherwise, e = exp(-|x|)).
inline float psi_inline(float x, float m) {
  const float e = exp_inline(-std::abs(x));
  return m * (std::min(x, 0.0f) - log1p_unit(e));
}
inline void psi_grad_inline(float x, float m, float& psi, float& dpsi_dx) {
  const float e = exp_inline(-std::abs(x));
  psi = m * (std::min(x, 0.0f) - log1p_unit(e));
  dpsi_dx = m * ((x >= 0.0f ? e : 1.0f) / (1.0f + e));
}

// ---------------------------------------------------------------------------------------------------------
// Reductions and scans along a row of N floats (N a multiple of kLanes: a tile row)
// ---------------------------------------------------------------------------------------------------------

#if defined(__AVX512F__)
// op over the 16 lanes of v (a horizontal max or sum): halving folds by shuffles.
template <class Op>
GRAPE_INLINE float lanes_reduce(__m512 v, Op op) {
  v = op(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(1, 0, 3, 2)));
  v = op(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(2, 3, 0, 1)));
  v = op(v, _mm512_permute_ps(v, _MM_SHUFFLE(1, 0, 3, 2)));
  v = op(v, _mm512_permute_ps(v, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm512_cvtss_f32(v);
}

// The 16 horizontal sums of a[0..15] in one vector, lane i = the sum of a[i]'s lanes: a tree of 30 lane
// shuffles and 15 adds (16 lanes_reduce calls take 64 and 64). Each sum adds its own vector's lanes in the
// same order whichever slot i it has, so a dot product does not depend on the block it was computed in.
GRAPE_INLINE __m512 sums16(const __m512* a) {
  // The tree leaves input j's sum in lane 4 (j % 4) + bitreverse2(j / 4): feeding it a permuted a undoes
  // that.
  constexpr int kIn[16] = {0, 4, 8, 12, 2, 6, 10, 14, 1, 5, 9, 13, 3, 7, 11, 15};
  __m512 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i) {  // 256-bit halves of pairs
    const __m512 x = a[kIn[2 * i]], y = a[kIn[2 * i + 1]];
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x44), _mm512_shuffle_f32x4(x, y, 0xEE));
  }
  for (int i = 0; i < 4; ++i)  // 128-bit quarters
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)  // pairs of floats
    d[i] =
        _mm512_add_ps(_mm512_unpacklo_ps(c[2 * i], c[2 * i + 1]), _mm512_unpackhi_ps(c[2 * i], c[2 * i + 1]));
  return _mm512_add_ps(_mm512_unpacklo_ps(d[0], d[1]), _mm512_unpackhi_ps(d[0], d[1]));  // floats
}
#endif

// Max of a row of N logits, skipping NaN (-inf if there is nothing else). With AVX-512 the horizontal step
// is lanes_reduce (the compiler turns the plain loop's tail into scalar steps through memory); otherwise
// kLanes-wide partial maxima and a halving tree.
template <int64_t N>
GRAPE_INLINE float row_max(const float* s) {
  static_assert(N % kLanes == 0);
#if defined(__AVX512F__)
  static_assert(kLanes == 16);
  __m512 mx = _mm512_set1_ps(kNegInf);
  for (int64_t k = 0; k < N; k += kLanes) mx = _mm512_max_ps(_mm512_loadu_ps(s + k), mx);  // NaN s: mx wins
  return lanes_reduce(mx, [](__m512 a, __m512 b) { return _mm512_max_ps(a, b); });
#else
  float part[kLanes];
  for (int64_t c = 0; c < kLanes; ++c) part[c] = kNegInf;
  for (int64_t k = 0; k < N; k += kLanes)
    for (int64_t c = 0; c < kLanes; ++c) part[c] = s[k + c] > part[c] ? s[k + c] : part[c];  // a NaN s loses
  for (int64_t w = kLanes / 2; w >= 1; w /= 2)
    for (int64_t c = 0; c < w; ++c) part[c] = part[c + w] > part[c] ? part[c + w] : part[c];
  return part[0];
#endif
}

// s[j] = exp(s[j] - mx) over a row of N logits (masked -inf entries -> 0); returns their sum, as row_max
// does.
template <int64_t N>
GRAPE_INLINE float row_exp_sum(float* s, float mx) {
  static_assert(N % kLanes == 0);
  float part[kLanes] = {};
  for (int64_t k = 0; k < N; k += kLanes)
#pragma omp simd
    for (int64_t c = 0; c < kLanes; ++c) {
      s[k + c] = exp_inline(s[k + c] - mx);
      part[c] += s[k + c];
    }
#if defined(__AVX512F__)
  return lanes_reduce(_mm512_loadu_ps(part), [](__m512 a, __m512 b) { return _mm512_add_ps(a, b); });
#else
  for (int64_t w = kLanes / 2; w >= 1; w /= 2)
    for (int64_t c = 0; c < w; ++c) part[c] += part[c + w];
  return part[0];
#endif
}

// Exclusive suffix sums of a row of N values: ex[j] = sum_{l > j} x[l] (ex may be x); returns the row's
// total. With AVX-512, per vector of kLanes: shift by one lane, then a log-step in-register scan (lane i adds
// lane i + 1, i + 2, i + 4, i + 8), plus the total of the vectors to its right; otherwise a serial loop.
template <int64_t N>
GRAPE_INLINE float suffix_sums(const float* x, float* ex) {
  static_assert(N % kLanes == 0);
#if defined(__AVX512F__)
  static_assert(kLanes == 16);
  const __m512i zero = _mm512_setzero_si512();
  auto shift = [&](__m512 v, auto lanes) {  // lane i <- lane i + lanes, 0 past the end
    return _mm512_castsi512_ps(_mm512_alignr_epi32(zero, _mm512_castps_si512(v), decltype(lanes)::value));
  };
  __m512 right = _mm512_setzero_ps();  // the sum of the vectors to the right, in every lane
  for (int64_t k = N - kLanes; k >= 0; k -= kLanes) {
    const __m512 v = _mm512_loadu_ps(x + k);
    __m512 e = shift(v, std::integral_constant<int, 1>{});
    e = _mm512_add_ps(e, shift(e, std::integral_constant<int, 1>{}));
    e = _mm512_add_ps(e, shift(e, std::integral_constant<int, 2>{}));
    e = _mm512_add_ps(e, shift(e, std::integral_constant<int, 4>{}));
    e = _mm512_add_ps(e, shift(e, std::integral_constant<int, 8>{}));
    _mm512_storeu_ps(ex + k, _mm512_add_ps(e, right));
    right =
        _mm512_add_ps(right, _mm512_permutexvar_ps(zero, _mm512_add_ps(e, v)));  // + lane 0's inclusive sum
  }
  return _mm512_cvtss_f32(right);
#elif defined(__AVX2__)
  // The same scan on 8-lane vectors, a lane shift being a permute and a blend of zeros (the serial loop
  // below, one dependent add per entry, was 8% of a tiny GRAPE-AP training step on a Zen 3).
  auto shift = [](__m256 v, auto lanes) {  // lane i <- lane i + lanes, 0 past the end
    constexpr int k = decltype(lanes)::value;
    const __m256i idx =
        _mm256_setr_epi32(std::min(k, 7), std::min(1 + k, 7), std::min(2 + k, 7), std::min(3 + k, 7),
                          std::min(4 + k, 7), std::min(5 + k, 7), std::min(6 + k, 7), 7);
    return _mm256_blend_ps(_mm256_permutevar8x32_ps(v, idx), _mm256_setzero_ps(), (0xFF << (8 - k)) & 0xFF);
  };
  __m256 right = _mm256_setzero_ps();  // the sum of the vectors to the right, in every lane
  for (int64_t k = N - 8; k >= 0; k -= 8) {
    const __m256 v = _mm256_loadu_ps(x + k);
    __m256 e = shift(v, std::integral_constant<int, 1>{});
    e = _mm256_add_ps(e, shift(e, std::integral_constant<int, 1>{}));
    e = _mm256_add_ps(e, shift(e, std::integral_constant<int, 2>{}));
    e = _mm256_add_ps(e, shift(e, std::integral_constant<int, 4>{}));
    _mm256_storeu_ps(ex + k, _mm256_add_ps(e, right));
    right = _mm256_add_ps(right, _mm256_permutevar8x32_ps(_mm256_add_ps(e, v), _mm256_setzero_si256()));
  }
  return _mm256_cvtss_f32(right);
#else
  float acc = 0.0f;
  for (int64_t j = N - 1; j >= 0; --j) {
    const float v = x[j];
    ex[j] = acc;
    acc += v;
  }
  return acc;
#endif
}

}  // namespace grape::kernels::cpu
