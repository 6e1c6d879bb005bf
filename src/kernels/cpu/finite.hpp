// Finite check of an fp32 buffer on the CPU: the input validation of every encode (q, k, and x for contextual
// encodings). Plain C++: no LibTorch here; the caller is require_finite in src/pe/encoding.cpp.
#pragma once

#include <cstdint>

namespace grape::kernels::cpu {

// True iff none of x[0 .. n) is NaN, +inf or -inf. Reads every element (no early exit: one vectorised pass).
bool all_finite(const float* x, int64_t n);

}  // namespace grape::kernels::cpu
