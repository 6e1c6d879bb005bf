// The optimizer tail's kernels (src/kernels/cpu/adamw.hpp): AdamW's update against a float64 AdamW over
// several steps, sizes that end inside a block and span several, decay on and off, a clip scale; the sum of
// squares against float64 and bit for bit at 1, 2 and 3 threads; the non-finite answers of both.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <span>
#include <vector>

#include "kernels/cpu/adamw.hpp"

namespace grape::kernels::cpu {
namespace {

std::vector<float> normal(size_t n, uint64_t seed, float scale) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> x(n);
  for (auto& v : x) v = d(rng);
  return x;
}

// A parameter with its moments, in float for the kernel and in double for the reference AdamW.
struct Param {
  std::vector<float> p, m, v;
  std::vector<double> p64, m64, v64;
  double weight_decay;
  Param(size_t n, uint64_t seed, double wd)
      : p(normal(n, seed, 1.0f)),
        m(n, 0.0f),
        v(n, 0.0f),
        p64(p.begin(), p.end()),
        m64(n, 0.0),
        v64(n, 0.0),
        weight_decay(wd) {}
};

// Decoupled AdamW in float64 (the textbook form of LibTorch's AdamW::step).
void reference_step(Param& q, const std::vector<float>& grad, double scale, double lr, double beta1,
                    double beta2, double eps, int64_t step) {
  const double bc1 = 1 - std::pow(beta1, double(step)), bc2 = 1 - std::pow(beta2, double(step));
  for (size_t i = 0; i < q.p64.size(); ++i) {
    const double g = double(grad[i]) * scale;
    q.p64[i] *= 1 - lr * q.weight_decay;
    q.m64[i] = beta1 * q.m64[i] + (1 - beta1) * g;
    q.v64[i] = beta2 * q.v64[i] + (1 - beta2) * g * g;
    q.p64[i] -= lr / bc1 * q.m64[i] / (std::sqrt(q.v64[i]) / std::sqrt(bc2) + eps);
  }
}

TEST(AdamWKernel, FiveStepsFollowAFloat64AdamW) {
  const double lr = 1e-2, beta1 = 0.9, beta2 = 0.95, eps = 1e-8;
  // One call updates all four: sizes of 1, inside one block, and over several blocks (1 << 14 floats).
  std::vector<Param> params;
  params.emplace_back(1, 1, 0.1);
  params.emplace_back(37, 2, 0.0);
  params.emplace_back(1000, 3, 0.1);
  params.emplace_back(3 * 16384 + 5, 4, 0.0);
  for (int64_t step = 1; step <= 5; ++step) {
    const float scale = step == 3 ? 0.25f : 1.0f;  // a clipped step
    std::vector<std::vector<float>> grads;
    std::vector<AdamWParam> arrays;
    for (size_t k = 0; k < params.size(); ++k) {
      auto& q = params[k];
      grads.push_back(normal(q.p.size(), 100 * uint64_t(step) + k, 0.1f * float(k + 1)));
      reference_step(q, grads.back(), scale, lr, beta1, beta2, eps, step);
    }
    for (size_t k = 0; k < params.size(); ++k) {
      auto& q = params[k];
      arrays.push_back({.param = q.p.data(),
                        .grad = grads[k].data(),
                        .exp_avg = q.m.data(),
                        .exp_avg_sq = q.v.data(),
                        .n = int64_t(q.p.size()),
                        .lr = lr,
                        .beta1 = beta1,
                        .beta2 = beta2,
                        .eps = eps,
                        .weight_decay = q.weight_decay,
                        .step = step});
    }
    ASSERT_TRUE(adamw_update(arrays, scale));
    for (size_t k = 0; k < params.size(); ++k) {
      const auto& q = params[k];
      double m_scale = 0, v_scale = 0;  // the moments' errors are float rounding of their largest terms
      for (size_t i = 0; i < q.p.size(); ++i)
        m_scale = std::max(m_scale, std::abs(q.m64[i])), v_scale = std::max(v_scale, q.v64[i]);
      for (size_t i = 0; i < q.p.size(); ++i) {
        // The float rounding of a few steps; a missing bias correction or decay is off by >= 1e-3.
        ASSERT_NEAR(q.p[i], q.p64[i], 2e-6 * std::max(1.0, std::abs(q.p64[i])))
            << "param " << k << " [" << i << "] step " << step;
        ASSERT_NEAR(q.m[i], q.m64[i], 1e-6 * m_scale) << "param " << k << " [" << i << "]";
        ASSERT_NEAR(q.v[i], q.v64[i], 1e-6 * v_scale) << "param " << k << " [" << i << "]";
      }
    }
  }
}

TEST(AdamWKernel, SaysWhenAnUpdatedParameterIsNotFinite) {
  std::vector<float> p(100, 1.0f), g(100, 0.5f), m(100, 0.0f), v(100, 0.0f);
  auto one = [&](int64_t step) {
    return std::vector<AdamWParam>{{.param = p.data(),
                                    .grad = g.data(),
                                    .exp_avg = m.data(),
                                    .exp_avg_sq = v.data(),
                                    .n = 100,
                                    .lr = 1e-3,
                                    .beta1 = 0.9,
                                    .beta2 = 0.95,
                                    .eps = 1e-8,
                                    .weight_decay = 0.1,
                                    .step = step}};
  };
  EXPECT_TRUE(adamw_update(one(1), 1.0f));
  // A huge first moment over a second moment of 0 (a damaged state) overflows float: inf in one element.
  m[97] = 3e38f, v[97] = 0.0f;
  g[97] = 0.0f;
  EXPECT_FALSE(adamw_update(one(2), 1.0f));
  EXPECT_TRUE(std::isinf(p[97]));
  // A NaN parameter stays NaN.
  std::fill(p.begin(), p.end(), 1.0f), std::fill(m.begin(), m.end(), 0.0f);
  std::fill(g.begin(), g.end(), 0.5f), std::fill(v.begin(), v.end(), 0.0f);
  p[0] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_FALSE(adamw_update(one(1), 1.0f));
  EXPECT_TRUE(adamw_update({}, 1.0f));
}

TEST(AdamWKernel, SumOfSquaresIsFloat64AndTheSameAtAnyThreadCount) {
  // Over 2 threads' worth of floats (the kernel wakes a thread per 1 << 16), in arrays of odd sizes.
  std::vector<std::vector<float>> data;
  for (size_t n : {size_t(1), size_t(5), size_t(70001), size_t(100003), size_t(3)})
    data.push_back(normal(n, n, 3.0f));
  std::vector<std::span<const float>> arrays(data.begin(), data.end());
  long double want = 0;
  for (const auto& a : data)
    for (float x : a) want += (long double)x * x;
  const int saved = omp_get_max_threads();
  std::vector<double> got;
  for (int threads : {1, 2, 3}) {
    omp_set_num_threads(threads);
    got.push_back(sum_of_squares(arrays));
  }
  omp_set_num_threads(saved);
  EXPECT_NEAR(got[0], double(want), 1e-12 * double(want));
  EXPECT_EQ(got[1], got[0]) << "2 threads";
  EXPECT_EQ(got[2], got[0]) << "3 threads";
  EXPECT_EQ(sum_of_squares({}), 0.0);
  // Float squares that overflow float stay finite in double; a NaN or an inf anywhere makes it so.
  data[1][2] = 3e38f;
  EXPECT_TRUE(std::isfinite(sum_of_squares(arrays)));
  data[3][77777] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_TRUE(std::isnan(sum_of_squares(arrays)));
  data[3][77777] = -std::numeric_limits<float>::infinity();
  EXPECT_TRUE(std::isinf(sum_of_squares(arrays)));
}

}  // namespace
}  // namespace grape::kernels::cpu
