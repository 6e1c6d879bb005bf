// Internal: the math of HDD-RoPE (src/pe/hdd_rope.cpp), exposed for its tests and its law checks.
#pragma once

#include <torch/torch.h>

#include <array>
#include <string>
#include <vector>

namespace grape::hdd {

// exp(A) of skew-symmetric A [..., k, k]: closed forms for k = 2 (plane rotation), 3 (Rodrigues) and
// 4 (self-dual / anti-self-dual split), Taylor with scaling and squaring beyond. Finite gradients at A = 0.
torch::Tensor skew_exp(const torch::Tensor& A);

// The Cayley map (I - A)^-1 (I + A) of skew-symmetric A [..., k, k] (a rotation by 2 atan(a) for k = 2).
torch::Tensor cayley(const torch::Tensor& A);

// The skew matrix A [..., k, k] of plane coefficients c [..., k(k-1)/2]: A_ji = c_m, A_ij = -c_m for the
// m-th pair i < j in lexicographic order (a positive c_m turns (x_i, x_j) counter-clockwise).
torch::Tensor skew_from_coefficients(const torch::Tensor& c, int64_t k);

// exp(skew_from_coefficients(c, k)) [..., k, k] in float64. For k = 2 and 4: skew_exp's closed forms as
// plain loops with a hand-written backward (the training path); for other k: skew_exp itself.
torch::Tensor rotations(const torch::Tensor& c, int64_t k);

// The names `scan` accepts: "loop", "sequential", "hillis-steele", "brent-kung", "sklansky".
const std::vector<std::string>& scan_names();

// Inclusive running products along dim -3 of M [..., T, k, k]: P_t = M_0 M_1 ... M_t (earlier factors on
// the left), by the named scan. Every scan gives the same products up to round-off (associativity).
// "loop" is the sequential product as one plain float64 loop with a hand-written backward
// (rotate_by_running_product without q and k); the others are LibTorch ops differentiated by autograd.
torch::Tensor running_product(const torch::Tensor& M, const std::string& scan);

// The encoding's fast path, scan "loop": P_0 = P0 and P_{t+1} = P_t R_t in one sequential float64 loop per
// (b, h, g), fused with q~_t = P_t q_t and k~_t = P_t k_t (chunk g = coordinates g + jG, G = D/k), with a
// hand-written backward. P0 [B,H,G,k,k] and R [B,H,G,T,k,k] float64, q and k [B,T,H,D]. Returns
// {q~, k~, P_T}.
std::array<torch::Tensor, 3> rotate_by_running_product(const torch::Tensor& P0, const torch::Tensor& R,
                                                       const torch::Tensor& q, const torch::Tensor& k);

}  // namespace grape::hdd
