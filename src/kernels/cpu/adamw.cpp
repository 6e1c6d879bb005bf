// The global gradient norm and AdamW's update (the contract is in adamw.hpp).
//
// Both split every array into fixed blocks of kBlock floats and hand the blocks of all arrays to one OpenMP
// loop, so small parameters share a thread and a large one is spread over all of them. The norm's partial
// sum of each block is kept and the partials added in block order: the split, hence the sum, does not
// depend on the thread count. (This file is compiled with -fno-math-errno, CMakeLists.txt: otherwise sqrt
// keeps a scalar call for errno and the update loop does not vectorise.)
#include "kernels/cpu/adamw.hpp"

#include <omp.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <vector>

#include "kernels/cpu/simd_math.hpp"

namespace grape::kernels::cpu {
namespace {

constexpr int64_t kBlock = 1 << 14;         // floats per block: per OpenMP iteration and per partial sum
constexpr int64_t kMinPerThread = 1 << 16;  // floats per thread: below this, waking a thread costs more
constexpr uint32_t kInfBits =
    0x7f800000u;  // a float is NaN or +-inf iff its bits without the sign are >= this

struct Block {
  int64_t array, begin, end;
};

// The blocks of arrays of these sizes, array by array; the floats in all.
template <class Sizes>
std::vector<Block> blocks_of(int64_t count, Sizes size, int64_t* total) {
  std::vector<Block> out;
  *total = 0;
  for (int64_t a = 0; a < count; ++a) {
    const int64_t n = size(a);
    for (int64_t b = 0; b < n; b += kBlock) out.push_back({a, b, std::min(n, b + kBlock)});
    *total += n;
  }
  return out;
}

int threads_for(int64_t floats) {
  return int(std::clamp<int64_t>(floats / kMinPerThread, 1, omp_get_max_threads()));
}

GRAPE_SIMD double block_sum_of_squares(const float* __restrict x, int64_t n) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += double(x[i]) * double(x[i]);
  return s;
}

// The float constants of one parameter's update, each rounded as LibTorch rounds its double arguments.
struct Constants {
  float grad_scale, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, sqrt_bc2, eps, neg_step_size;
};

Constants constants_of(const AdamWParam& p, float grad_scale) {
  const double bc1 = 1.0 - std::pow(p.beta1, double(p.step));
  const double bc2 = 1.0 - std::pow(p.beta2, double(p.step));
  return {.grad_scale = grad_scale,
          .decay = p.weight_decay != 0 ? float(1.0 - p.lr * p.weight_decay) : 1.0f,  // x * 1.0f == x
          .beta1 = float(p.beta1),
          .one_minus_beta1 = float(1.0 - p.beta1),
          .beta2 = float(p.beta2),
          .one_minus_beta2 = float(1.0 - p.beta2),
          .sqrt_bc2 = float(std::sqrt(bc2)),
          .eps = float(p.eps),
          .neg_step_size = float(-(p.lr / bc1))};
}

// Elements [0, n) of one parameter; returns the largest |p| bits after the update (>= kInfBits: not finite).
GRAPE_SIMD uint32_t update_block(const Constants& c, float* __restrict param, const float* __restrict grad,
                                 float* __restrict exp_avg, float* __restrict exp_avg_sq, int64_t n) {
  uint32_t bits = 0;
#pragma omp simd reduction(max : bits)
  for (int64_t i = 0; i < n; ++i) {
    const float g = grad[i] * c.grad_scale;                               // clip_grad_norm_'s grad.mul_
    const float p = param[i] * c.decay;                                   // p.mul_(1 - lr wd)
    const float m = c.beta1 * exp_avg[i] + c.one_minus_beta1 * g;         // exp_avg.mul_(b1).add_(g, 1 - b1)
    const float v = c.beta2 * exp_avg_sq[i] + c.one_minus_beta2 * g * g;  // .mul_(b2).addcmul_(g, g, 1 - b2)
    const float denom = std::sqrt(v) / c.sqrt_bc2 + c.eps;
    const float q = p + c.neg_step_size * m / denom;  // p.addcdiv_(exp_avg, denom, -step_size)
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    param[i] = q;
    bits = std::max(bits, std::bit_cast<uint32_t>(q) & 0x7fffffffu);
  }
  return bits;
}

}  // namespace

double sum_of_squares(std::span<const std::span<const float>> arrays) {
  int64_t total = 0;
  const auto blocks = blocks_of(
      int64_t(arrays.size()), [&](int64_t a) { return int64_t(arrays[a].size()); }, &total);
  std::vector<double> partial(blocks.size());
  const int nt = threads_for(total);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (size_t b = 0; b < blocks.size(); ++b) {
    const Block& k = blocks[b];
    partial[b] = block_sum_of_squares(arrays[k.array].data() + k.begin, k.end - k.begin);
  }
  double s = 0.0;
  for (double x : partial) s += x;
  return s;
}

bool adamw_update(std::span<const AdamWParam> params, float grad_scale) {
  std::vector<Constants> constants;
  constants.reserve(params.size());
  for (const auto& p : params) constants.push_back(constants_of(p, grad_scale));
  int64_t total = 0;
  const auto blocks = blocks_of(
      int64_t(params.size()), [&](int64_t a) { return params[a].n; }, &total);
  const int nt = threads_for(total);
  uint32_t bits = 0;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1) reduction(max : bits)
  for (size_t b = 0; b < blocks.size(); ++b) {
    const Block& k = blocks[b];
    const AdamWParam& p = params[k.array];
    bits = std::max(bits, update_block(constants[k.array], p.param + k.begin, p.grad + k.begin,
                                       p.exp_avg + k.begin, p.exp_avg_sq + k.begin, k.end - k.begin));
  }
  return bits < kInfBits;
}

}  // namespace grape::kernels::cpu
