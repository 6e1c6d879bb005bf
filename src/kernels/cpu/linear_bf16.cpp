// bf16-weight matrix products (linear_bf16.hpp). Blocked as linear_rows is: 4 weight rows x 4 rows of x per
// micro-kernel call, each weight row read once for all rows of x. The AVX-512 and AVX2 kernels carry their
// own target attributes and are picked by what the CPU reports at run time, so every build (-march=native or
// the portable one) has all three.
#include "kernels/cpu/linear_bf16.hpp"

#include <omp.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "kernels/cpu/simd_math.hpp"
#include "kernels/cpu/tile.hpp"

#if defined(__x86_64__) && defined(__GNUC__)
#define GRAPE_BF16_X86 1
#include <immintrin.h>
#endif

namespace grape::kernels::cpu {
namespace {

constexpr int kRowsW = 4;  // weight rows per micro-kernel call
constexpr int kRowsX = 4;  // rows of x per micro-kernel call

// A micro-kernel: out[j * kRowsW + i] = W_i . x_j for kRowsW weight rows and NX rows of x.
using BlockFn = void (*)(const uint16_t* const* w, const float* const* x, int64_t K, float* out);

// Portable: weights widened to fp32, 16 lanes of partial sums added at the end (vectorises without
// reassociation; GRAPE_SIMD picks the widest unit at load time in a portable build).
template <int NX>
GRAPE_SIMD void block_portable(const uint16_t* const* w, const float* const* x, int64_t K, float* out) {
  float acc[kRowsW][NX][kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes)
    for (int i = 0; i < kRowsW; ++i) {
      const uint16_t* wi = w[i] + k;
      float wf[kLanes];
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l) wf[l] = bf16_to_float(wi[l]);
      for (int j = 0; j < NX; ++j) {
        const float* xj = x[j] + k;
        float* a = acc[i][j];
#pragma omp simd
        for (int64_t l = 0; l < kLanes; ++l) a[l] += wf[l] * xj[l];
      }
    }
  for (int i = 0; i < kRowsW; ++i)
    for (int j = 0; j < NX; ++j) {
      float s = 0;
      for (int64_t l = 0; l < kLanes; ++l) s += acc[i][j][l];
      for (int64_t kk = k; kk < K; ++kk) s += bf16_to_float(w[i][kk]) * x[j][kk];
      out[j * kRowsW + i] = s;
    }
}

#if defined(GRAPE_BF16_X86)
// Shuffles and shifts take their maskz forms with a full mask here: in a function with a target attribute,
// GCC 12 reports the unmasked ones' _mm512_undefined_* as used uninitialized (its bug 105593).

// The sum of v's 16 lanes by halving folds.
__attribute__((target("avx512f"))) inline float sum_lanes(__m512 v) {
  const __mmask16 all = 0xFFFF;
  v = _mm512_add_ps(v, _mm512_maskz_shuffle_f32x4(all, v, v, _MM_SHUFFLE(1, 0, 3, 2)));
  v = _mm512_add_ps(v, _mm512_maskz_shuffle_f32x4(all, v, v, _MM_SHUFFLE(2, 3, 0, 1)));
  v = _mm512_add_ps(v, _mm512_maskz_permute_ps(all, v, _MM_SHUFFLE(1, 0, 3, 2)));
  v = _mm512_add_ps(v, _mm512_maskz_permute_ps(all, v, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm512_cvtss_f32(v);
}

// 32 values of x from k (zeros past K), split into even and odd elements: x[k + 2i] and x[k + 2i + 1].
__attribute__((target("avx512f,avx512bw"))) inline void load_even_odd(const float* x, int64_t k, int64_t K,
                                                                      __m512& even, __m512& odd) {
  const int64_t left = K - k;
  const __mmask16 m0 = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << std::max<int64_t>(left, 0)) - 1);
  const __mmask16 m1 =
      left >= 32 ? __mmask16(0xFFFF) : __mmask16((1u << std::max<int64_t>(left - 16, 0)) - 1);
  const __m512 lo = _mm512_maskz_loadu_ps(m0, x + k), hi = _mm512_maskz_loadu_ps(m1, x + k + 16);
  const __m512i ie = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i io = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  even = _mm512_permutex2var_ps(lo, ie, hi);
  odd = _mm512_permutex2var_ps(lo, io, hi);
}

__attribute__((target("avx512f,avx512bw"))) inline __mmask32 mask32(int64_t left) {
  return left >= 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << left) - 1);
}

// AVX-512F: a load of 32 bf16 weights is 16 fp32 lanes each holding two of them; the even one (low half) is
// the lane shifted left by 16, the odd one the lane with its low half cleared: exact fp32 values, FMAs with
// x's even and odd elements (products and sums as the portable kernel's, in another order).
template <int NX>
__attribute__((target("avx512f,avx512bw"))) void block_avx512(const uint16_t* const* w, const float* const* x,
                                                              int64_t K, float* out) {
  __m512 acc[kRowsW][NX];
  for (int i = 0; i < kRowsW; ++i)
    for (int j = 0; j < NX; ++j) acc[i][j] = _mm512_setzero_ps();
  const __m512i high = _mm512_set1_epi32(int32_t(0xFFFF0000u));
  for (int64_t k = 0; k < K; k += 32) {
    __m512 xe[NX], xo[NX];
    for (int j = 0; j < NX; ++j) load_even_odd(x[j], k, K, xe[j], xo[j]);
    const __mmask32 m = mask32(K - k);
    for (int i = 0; i < kRowsW; ++i) {
      const __m512i wv = _mm512_maskz_loadu_epi16(m, w[i] + k);
      const __m512 we = _mm512_castsi512_ps(_mm512_maskz_slli_epi32(__mmask16(0xFFFF), wv, 16));
      const __m512 wo = _mm512_castsi512_ps(_mm512_and_si512(wv, high));
      for (int j = 0; j < NX; ++j) {
        acc[i][j] = _mm512_fmadd_ps(we, xe[j], acc[i][j]);
        acc[i][j] = _mm512_fmadd_ps(wo, xo[j], acc[i][j]);
      }
    }
  }
  for (int i = 0; i < kRowsW; ++i)
    for (int j = 0; j < NX; ++j) out[j * kRowsW + i] = sum_lanes(acc[i][j]);
}

// The sum of v's 8 lanes by halving folds.
__attribute__((target("avx2"))) inline float sum_lanes8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// AVX2 + FMA: 8 bf16 weights zero-extended to 32-bit lanes and shifted left by 16 are their exact fp32
// values; FMAs with 8 plain floats of x. (The portable kernel, through a float buffer per 16 weights, ran
// batch-1 decode of small only 1.05x the fp32 path on a Zen 3.)
template <int NX>
__attribute__((target("avx2,fma"))) void block_avx2(const uint16_t* const* w, const float* const* x,
                                                    int64_t K, float* out) {
  // Two accumulators per product, alternating by 8 weights: at batch 1 one chain per product gives 4
  // dependent FMA chains, too few for two FMA units of latency 4 (alone, this measured within the machine's
  // noise; the prefetch below is what made the kernel faster).
  __m256 acc[2][kRowsW][NX];
  for (int a = 0; a < 2; ++a)
    for (int i = 0; i < kRowsW; ++i)
      for (int j = 0; j < NX; ++j) acc[a][i][j] = _mm256_setzero_ps();
  auto step = [&](int a, const uint16_t* const* wk, const float* const* xk, int64_t off) {
    __m256 xv[NX];
    for (int j = 0; j < NX; ++j) xv[j] = _mm256_loadu_ps(xk[j] + off);
    for (int i = 0; i < kRowsW; ++i) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wk[i] + off));
      const __m256 wf = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
      for (int j = 0; j < NX; ++j) acc[a][i][j] = _mm256_fmadd_ps(wf, xv[j], acc[a][i][j]);
    }
  };
  // The next block's weight rows follow these ones in memory (rows are contiguous): prefetch them line by
  // line at the same k, as the fp32 path does, so that streaming W overlaps the products (prefetches never
  // fault, past the matrix's end too).
  const uint16_t* next = w[kRowsW - 1] + K;
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    if (k % 32 == 0)
      for (int i = 0; i < kRowsW; ++i)
        _mm_prefetch(reinterpret_cast<const char*>(next + i * K + k), _MM_HINT_T0);
    step(0, w, x, k);
    step(1, w, x, k + 8);
  }
  if (k + 8 <= K) {
    step(0, w, x, k);
    k += 8;
  }
  if (k < K) {  // the last K % 8 through zero-padded copies
    alignas(32) uint16_t wt[kRowsW][8] = {};
    alignas(32) float xt[NX][8] = {};
    const uint16_t* wk[kRowsW];
    const float* xk[NX];
    for (int i = 0; i < kRowsW; ++i) {
      std::copy(w[i] + k, w[i] + K, wt[i]);
      wk[i] = wt[i];
    }
    for (int j = 0; j < NX; ++j) {
      std::copy(x[j] + k, x[j] + K, xt[j]);
      xk[j] = xt[j];
    }
    step(1, wk, xk, 0);
  }
  for (int i = 0; i < kRowsW; ++i)
    for (int j = 0; j < NX; ++j) out[j * kRowsW + i] = sum_lanes8(_mm256_add_ps(acc[0][i][j], acc[1][i][j]));
}
#endif

// The micro-kernels of one kernel, by the number of rows of x (1..4).
const BlockFn* blocks(Bf16Kernel kernel) {
  static const BlockFn portable[kRowsX] = {block_portable<1>, block_portable<2>, block_portable<3>,
                                           block_portable<4>};
#if defined(GRAPE_BF16_X86)
  static const BlockFn avx512[kRowsX] = {block_avx512<1>, block_avx512<2>, block_avx512<3>, block_avx512<4>};
  static const BlockFn avx2[kRowsX] = {block_avx2<1>, block_avx2<2>, block_avx2<3>, block_avx2<4>};
  if (kernel == Bf16Kernel::avx512) return avx512;
  if (kernel == Bf16Kernel::avx2) return avx2;
#endif
  return portable;
}

// Rows [n0, n1) of y = x W^T. A partial block computes the full one on clamped (repeated) rows and keeps
// only its part.
void linear_part(const BlockFn* fns, const float* x, int64_t R, int64_t K, const uint16_t* W, int64_t N,
                 float* y, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n += kRowsW) {
    const int64_t nw = std::min<int64_t>(kRowsW, n1 - n);
    const uint16_t* w[kRowsW];
    for (int64_t i = 0; i < kRowsW; ++i) w[i] = W + std::min(n + i, n1 - 1) * K;
    for (int64_t r = 0; r < R; r += kRowsX) {
      const int64_t nx = std::min<int64_t>(kRowsX, R - r);
      const float* xs[kRowsX];
      for (int64_t j = 0; j < kRowsX; ++j) xs[j] = x + std::min(r + j, R - 1) * K;
      float out[kRowsX * kRowsW];
      fns[nx - 1](w, xs, K, out);
      for (int64_t j = 0; j < nx; ++j)
        for (int64_t i = 0; i < nw; ++i) y[(r + j) * N + n + i] = out[j * kRowsW + i];
    }
  }
}

void require_available(Bf16Kernel kernel) {
  if (!bf16_kernel_available(kernel))
    throw std::invalid_argument(std::string("linear_rows_bf16: this CPU cannot run the ") +
                                to_string(kernel) + " kernel");
}

}  // namespace

void round_to_bf16(const float* x, int64_t n, uint16_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = bf16_round(x[i]);
}

const char* to_string(Bf16Kernel kernel) {
  switch (kernel) {
    case Bf16Kernel::avx512:
      return "avx512";
    case Bf16Kernel::avx2:
      return "avx2";
    default:
      return "portable";
  }
}

bool bf16_kernel_available(Bf16Kernel kernel) {
#if defined(GRAPE_BF16_X86)
  if (kernel == Bf16Kernel::avx512)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  if (kernel == Bf16Kernel::avx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  if (kernel != Bf16Kernel::portable) return false;
#endif
  return true;
}

Bf16Kernel bf16_kernel_best() {
  for (auto kernel : {Bf16Kernel::avx512, Bf16Kernel::avx2})
    if (bf16_kernel_available(kernel)) return kernel;
  return Bf16Kernel::portable;
}

void linear_rows_bf16(Bf16Kernel kernel, const float* x, int64_t R, int64_t K, const uint16_t* W, int64_t N,
                      float* y) {
  require_available(kernel);
#pragma omp parallel num_threads(team_size(N))
  linear_shared_bf16(kernel, x, R, K, W, N, y);
}

void linear_shared_bf16(Bf16Kernel kernel, const float* x, int64_t R, int64_t K, const uint16_t* W, int64_t N,
                        float* y) {
  const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
  const int64_t nblocks = (N + kRowsW - 1) / kRowsW;
  const int64_t b0 = nblocks * t / nt, b1 = nblocks * (t + 1) / nt;
  linear_part(blocks(kernel), x, R, K, W, N, y, std::min(N, b0 * kRowsW), std::min(N, b1 * kRowsW));
}

}  // namespace grape::kernels::cpu
