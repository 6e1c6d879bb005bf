// SwiGLU forward and backward (the contract is in swiglu.hpp). sigmoid(a) = 1 / (1 + exp(-a)) with the
// kernels' vectorised exp (simd_math.hpp): for a < -88 exp(-a) is clamped and s is ~1e-38, for a > 87 s = 1.
#include "kernels/cpu/swiglu.hpp"

#include <omp.h>

#include <algorithm>

#include "kernels/cpu/simd_math.hpp"

namespace grape::kernels::cpu {
namespace {

constexpr int64_t kBlock = 1 << 14;         // floats per OpenMP iteration
constexpr int64_t kMinPerThread = 1 << 15;  // floats per thread: below this, waking a thread costs more

GRAPE_SIMD void backward_block(const float* __restrict a, const float* __restrict b,
                               const float* __restrict dout, int64_t n, float* __restrict da,
                               float* __restrict db) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float s = 1.0f / (1.0f + exp_inline(-a[i]));
    da[i] = dout[i] * b[i] * s * (1.0f + a[i] * (1.0f - s));
    db[i] = dout[i] * a[i] * s;
  }
}

template <class F>
void over_blocks(int64_t n, F&& f) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  const int nt = int(std::clamp<int64_t>(n / kMinPerThread, 1, omp_get_max_threads()));
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t blk = 0; blk < blocks; ++blk) f(blk * kBlock, std::min(kBlock, n - blk * kBlock));
}

}  // namespace

GRAPE_SIMD void swiglu_forward_serial(const float* a, const float* b, int64_t n, float* out) {
#pragma omp simd  // each out[i] reads only a[i] and b[i], so out may be a or b
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] / (1.0f + exp_inline(-a[i])) * b[i];
}

void swiglu_forward(const float* a, const float* b, int64_t n, float* out) {
  over_blocks(n, [&](int64_t i0, int64_t m) { swiglu_forward_serial(a + i0, b + i0, m, out + i0); });
}

void swiglu_backward(const float* a, const float* b, const float* dout, int64_t n, float* da, float* db) {
  over_blocks(n,
              [&](int64_t i0, int64_t m) { backward_block(a + i0, b + i0, dout + i0, m, da + i0, db + i0); });
}

}  // namespace grape::kernels::cpu
