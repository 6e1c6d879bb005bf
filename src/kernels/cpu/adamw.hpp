// The optimizer tail of a training step on fp32 arrays: the global gradient norm and AdamW's update of
// every parameter, one memory pass each instead of ~15 LibTorch ops per parameter. Plain C++ + OpenMP; the
// caller is Trainer::step (src/train/trainer.cpp, optimizer=fused), which keeps the moments in
// torch::optim::AdamW's own state.
#pragma once

#include <cstdint>
#include <span>

namespace grape::kernels::cpu {

// The sum of x^2 over every element of every array, accumulated in double per fixed block of each array and
// the blocks added in a fixed order: the same bits at any thread count. It is NaN or inf iff some element is
// (a float's square cannot overflow a double, nor can any count of them that fits in memory).
double sum_of_squares(std::span<const std::span<const float>> arrays);

// One parameter of adamw_update: n floats each; param, exp_avg and exp_avg_sq are updated in place. The
// settings are its AdamW group's; step counts this update (1 on the first), as AdamWParamState::step after
// its increment.
struct AdamWParam {
  float* param;
  const float* grad;
  float* exp_avg;
  float* exp_avg_sq;
  int64_t n;
  double lr, beta1, beta2, eps, weight_decay;
  int64_t step;
};

// One AdamW step of every parameter with the gradient g = grad * grad_scale (the clip coefficient), in the
// order of LibTorch 1.13's torch::optim::AdamW::step (no amsgrad), with bc_i = 1 - beta_i^step:
//   p *= 1 - lr wd (when wd != 0);  m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g g;
//   p += -(lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps),
// in float, with each constant rounded to float as LibTorch's scalar arguments are. Returns false iff some
// updated parameter is not finite (NaN or inf); which one is for the caller to find on that rare path.
bool adamw_update(std::span<const AdamWParam> params, float grad_scale);

}  // namespace grape::kernels::cpu
