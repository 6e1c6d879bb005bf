// Shared by the LibTorch tests: the float64 dtype they compute references in, and the distances they assert.
#pragma once

#include <torch/torch.h>

namespace grape::testing {

inline constexpr auto f64 = torch::kFloat64;

// Largest |a - b|, in float64.
inline double max_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(f64) - b.to(f64)).abs().max().item<double>();
}

// Largest |a - b| over the largest |b|.
inline double relative_gap(const torch::Tensor& a, const torch::Tensor& b) {
  return (a - b).abs().max().item<double>() / b.abs().max().item<double>();
}

}  // namespace grape::testing
