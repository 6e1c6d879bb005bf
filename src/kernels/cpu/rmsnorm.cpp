// RMSNorm forward and backward (the contract is in rmsnorm.hpp).
#include "kernels/cpu/rmsnorm.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace grape::kernels::cpu {
namespace {

constexpr int64_t kRowBlock = 64;           // rows per OpenMP iteration and per partial sum of dw
constexpr int64_t kMinPerThread = 1 << 15;  // floats per thread: below this, waking a thread costs more

int threads_for(int64_t floats) {
  return int(std::clamp<int64_t>(floats / kMinPerThread, 1, omp_get_max_threads()));
}

}  // namespace

float rmsnorm_row(const float* x, const float* w, int64_t n, float eps, float* y) {
  float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float inv = 1.0f / std::sqrt(ss / float(n) + eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * inv * w[i];
  return inv;
}

void rmsnorm_forward(const float* x, const float* w, int64_t rows, int64_t n, float eps, float* y,
                     float* rstd) {
  const int64_t blocks = (rows + kRowBlock - 1) / kRowBlock;
  const int nt = threads_for(rows * n);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t r = b * kRowBlock; r < std::min(rows, (b + 1) * kRowBlock); ++r)
      rstd[r] = rmsnorm_row(x + r * n, w, n, eps, y + r * n);
  }
}

void rmsnorm_backward(const float* x, const float* w, const float* rstd, const float* dy, int64_t rows,
                      int64_t n, float* dx, float* dw, const float* dres) {
  const int64_t blocks = (rows + kRowBlock - 1) / kRowBlock;
  std::vector<float> partial(size_t(blocks * n), 0.0f);  // dw of each block of rows
  const int nt = threads_for(rows * n);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t b = 0; b < blocks; ++b) {
    float* pw = partial.data() + b * n;
    for (int64_t r = b * kRowBlock; r < std::min(rows, (b + 1) * kRowBlock); ++r) {
      const float* xr = x + r * n;
      const float* dyr = dy + r * n;
      float* dxr = dx + r * n;
      const float inv = rstd[r];
      float dot = 0.0f;  // sum of (dy w) x over the row
#pragma omp simd reduction(+ : dot)
      for (int64_t i = 0; i < n; ++i) dot += dyr[i] * w[i] * xr[i];
      const float c = inv * inv * inv * dot / float(n);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        dxr[i] = inv * dyr[i] * w[i] - c * xr[i];
        pw[i] += dyr[i] * xr[i] * inv;
      }
      if (dres) {
        const float* dr = dres + r * n;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) dxr[i] += dr[i];
      }
    }
  }
  std::fill(dw, dw + n, 0.0f);
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t i = 0; i < n; ++i) dw[i] += partial[size_t(b * n + i)];
}

}  // namespace grape::kernels::cpu
