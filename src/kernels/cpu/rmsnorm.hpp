// RMSNorm over the last dim of fp32 rows, forward and backward in one pass each: the model's norms (pre-
// attention, pre-MLP, QK-norm, final) without LibTorch's five forward and ~ten backward ops. Plain C++ +
// OpenMP; the caller is the autograd binding in src/nn/model.cpp.
#pragma once

#include <cstdint>

namespace grape::kernels::cpu {

// One row of n on the calling thread (for callers inside their own parallel region, as the decoder): y = x *
// r * w, r = 1 / sqrt(mean(x^2) + eps), returned. y may be x.
float rmsnorm_row(const float* x, const float* w, int64_t n, float eps, float* y);

// y = x * r * w per row of n, r = 1 / sqrt(mean(x^2) + eps); rstd[row] = r (the backward reads it).
void rmsnorm_forward(const float* x, const float* w, int64_t rows, int64_t n, float eps, float* y,
                     float* rstd);

// From dy: dx = r (dy w) - x r^3 mean(dy w x) per row, and dw = sum over rows of dy x r. dw is summed over
// fixed blocks of rows in a fixed order, so it does not depend on the thread count (resumed runs repeat).
// With dres, dx += dres: the gradient of a residual x + f(norm(x)) that bypasses the norm, added in the same
// pass (the same sums as adding it afterwards).
void rmsnorm_backward(const float* x, const float* w, const float* rstd, const float* dy, int64_t rows,
                      int64_t n, float* dx, float* dw, const float* dres = nullptr);

}  // namespace grape::kernels::cpu
