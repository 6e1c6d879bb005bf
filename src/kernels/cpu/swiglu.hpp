// SwiGLU's gate, silu(a) * b, forward and backward in one pass each over fp32 buffers (the MLP's two
// up-projections a = W1 x, b = W2 x): LibTorch's silu, mul and their three backward ops in one. Plain C++ +
// OpenMP; the caller is the autograd binding in src/nn/model.cpp.
#pragma once

#include <cstdint>

namespace grape::kernels::cpu {

// out = a sigmoid(a) b, elementwise over n floats.
void swiglu_forward(const float* a, const float* b, int64_t n, float* out);
// The same on the calling thread alone (inside a caller's team); out may be a or b.
void swiglu_forward_serial(const float* a, const float* b, int64_t n, float* out);

// From dout: da = dout b s (1 + a (1 - s)) and db = dout a s, with s = sigmoid(a).
void swiglu_backward(const float* a, const float* b, const float* dout, int64_t n, float* da, float* db);

}  // namespace grape::kernels::cpu
