// Rotation of coordinate pairs on the CPU, fp32: the O(N D) pre-pass that turns q, k into the rotated q~, k~
// (RoPE, GRAPE-M, xPos, contextual phases) before the attention kernel. Plain C++: no LibTorch here; the
// LibTorch binding, with its autograd, is rotate_pairs in src/pe/rotary.cpp, whose composed LibTorch form
// (rotate_pairs_composed) is the oracle of the tests (tests/test_rotary_kernel.cpp).
//
// x is [N, D] contiguous: the rows are the flattened leading dims of a [..., D] tensor. Each row turns its
// first 2P coordinates in P pairs (a_i, b_i), pairing half: (i, i + P), interleaved: (2i, 2i + 1):
//     a' = a c - b s,   b' = a s + b c          (coordinates 2P .. D-1 are copied)
// c and s (cos and sign * sin of the angle) are per (row, pair): pair i of the row with multi-index
// (j_0, .., j_{L-1}) in the leading dims reads c[sum_k j_k strides[k] + i] (likewise s), so a broadcast
// dim has stride 0 and angles [1,T,1,P] serve x [B,T,H,D] without being materialised.
#pragma once

#include <cstdint>

namespace grape::kernels::cpu {

enum class Pairing { half, interleaved };

constexpr int kRotaryMaxDims = 8;  // leading dims of x; the binding falls back to LibTorch beyond

struct RotaryRows {
  int dims = 1;                          // L: number of leading dims, 1 .. kRotaryMaxDims
  int64_t sizes[kRotaryMaxDims] = {};    // leading sizes; N is their product
  int64_t strides[kRotaryMaxDims] = {};  // element strides of c and s per leading dim (0: broadcast)
  int64_t D = 0;                         // row length
  int64_t P = 0;                         // pairs turned, 2P <= D
  Pairing pairing = Pairing::half;
  int64_t rows() const;
};

// y = R(c, s) x, or with inverse the transposed turn R(c, -s) (the backward's dx = R^T dy). y must not
// overlap x, c or s.
void rotary_forward(const RotaryRows& r, const float* x, const float* c, const float* s, bool inverse,
                    float* y);

// Gradients of the angles' cos and sin for the forward above, given x and dy = dL/dy, per (row, pair):
//     dc = da' a + db' b,   ds = -da' b + db' a
// dc, ds: [N, P] contiguous (the binding sums them over broadcast dims).
void rotary_angle_grad(const RotaryRows& r, const float* x, const float* dy, float* dc, float* ds);

}  // namespace grape::kernels::cpu
