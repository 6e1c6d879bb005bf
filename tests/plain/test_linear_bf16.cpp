// The bf16-weight matrix products (src/kernels/cpu/linear_bf16.hpp): rounding of known values, and every
// kernel this CPU runs against a float64 product of the same bf16 weights, on shapes that reach every tail
// (K not a multiple of 16 or 32, N not a multiple of the 4-row block, 1..9 rows of x), called alone and as
// a share of a team.
#include <gtest/gtest.h>
#include <omp.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "kernels/cpu/linear_bf16.hpp"

namespace grape::kernels::cpu {
namespace {

float from_bits(uint32_t u) { return std::bit_cast<float>(u); }

TEST(Bf16Round, KnownValues) {
  EXPECT_EQ(bf16_round(1.0f), 0x3F80);
  EXPECT_EQ(bf16_round(-2.5f), 0xC020);
  EXPECT_EQ(bf16_round(0.0f), 0x0000);
  EXPECT_EQ(bf16_round(-0.0f), 0x8000);
  // Halfway between two bf16 values: to the even one (down from 1 + 2^-8, up from 1 + 3 * 2^-8).
  EXPECT_EQ(bf16_round(from_bits(0x3F808000)), 0x3F80);
  EXPECT_EQ(bf16_round(from_bits(0x3F818000)), 0x3F82);
  // Just off halfway: to the nearer one.
  EXPECT_EQ(bf16_round(from_bits(0x3F808001)), 0x3F81);
  EXPECT_EQ(bf16_round(from_bits(0x3F807FFF)), 0x3F80);
  // pi = 0x40490FDB -> 0x4049 (3.140625), and a carry through the mantissa into the exponent.
  EXPECT_EQ(bf16_round(3.14159265f), 0x4049);
  EXPECT_EQ(bf16_round(from_bits(0x3FFFFFFF)), 0x4000);
  // Subnormals keep their bits; the largest float rounds to infinity; infinities and NaN stay.
  EXPECT_EQ(bf16_round(from_bits(0x00012345)), 0x0001);
  EXPECT_EQ(bf16_round(std::numeric_limits<float>::max()), 0x7F80);
  EXPECT_EQ(bf16_round(from_bits(0x7F7F7FFF)), 0x7F7F);
  EXPECT_EQ(bf16_round(-std::numeric_limits<float>::infinity()), 0xFF80);
  const uint16_t nan =
      bf16_round(from_bits(0x7F800001));  // a signalling NaN whose payload is in the low bits
  EXPECT_TRUE(std::isnan(bf16_to_float(nan))) << std::hex << nan;
  EXPECT_EQ(bf16_to_float(0x3F81), 1.0078125f);
  std::vector<float> x = {1.0f, from_bits(0x3F818000), -2.5f};
  std::vector<uint16_t> out(3);
  round_to_bf16(x.data(), 3, out.data());
  EXPECT_EQ(out, (std::vector<uint16_t>{0x3F80, 0x3F82, 0xC020}));
}

std::vector<Bf16Kernel> runnable_kernels() {
  std::vector<Bf16Kernel> out;
  for (auto k : {Bf16Kernel::portable, Bf16Kernel::avx512, Bf16Kernel::avx2})
    if (bf16_kernel_available(k)) out.push_back(k);
  return out;
}

TEST(LinearBf16, EveryKernelEqualsFloat64Product) {
  const auto kernels = runnable_kernels();
  ASSERT_FALSE(kernels.empty());
  EXPECT_EQ(kernels[0], Bf16Kernel::portable);
  EXPECT_TRUE(bf16_kernel_available(bf16_kernel_best()));
  std::mt19937 rng(11);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (auto kernel : kernels)
    for (int64_t K : {1, 15, 16, 17, 31, 32, 33, 70, 341})
      for (int64_t N : {1, 5, 13, 64})
        for (int64_t R : {1, 2, 3, 4, 5, 9}) {
          SCOPED_TRACE(testing::Message() << to_string(kernel) << " K=" << K << " N=" << N << " R=" << R);
          std::vector<float> x(size_t(R * K)), Wf(size_t(N * K));
          for (auto& v : x) v = nd(rng);
          for (auto& v : Wf) v = nd(rng);
          std::vector<uint16_t> W(Wf.size());
          round_to_bf16(Wf.data(), int64_t(Wf.size()), W.data());
          std::vector<float> y(size_t(R * N), -1.0f);
          linear_rows_bf16(kernel, x.data(), R, K, W.data(), N, y.data());
          for (int64_t r = 0; r < R; ++r)
            for (int64_t n = 0; n < N; ++n) {
              double want = 0;
              for (int64_t k = 0; k < K; ++k) {
                want += double(x[size_t(r * K + k)]) * double(bf16_to_float(W[size_t(n * K + k)]));
              }
              EXPECT_NEAR(y[size_t(r * N + n)], want, 4e-5 * std::sqrt(double(K)) + 1e-6)
                  << "r=" << r << " n=" << n;
            }
        }
}

// The decode engine calls the kernel as one thread's share inside its team: with a team of 3 on 37 weight
// rows, the shares (of 4-row blocks) cover y exactly.
TEST(LinearBf16, SharesOfATeamCoverEveryRow) {
  const int saved = omp_get_max_threads();
  omp_set_num_threads(3);
  const int64_t R = 3, K = 40, N = 37;
  std::vector<float> x(size_t(R * K)), Wf(size_t(N * K));
  for (size_t i = 0; i < x.size(); ++i) x[i] = float(int(i % 7) - 3) * 0.25f;
  for (size_t i = 0; i < Wf.size(); ++i) Wf[i] = float(int(i % 5) - 2) * 0.5f;  // exact in bf16
  std::vector<uint16_t> W(Wf.size());
  round_to_bf16(Wf.data(), int64_t(Wf.size()), W.data());
  for (auto kernel : runnable_kernels()) {
    std::vector<float> y(size_t(R * N), -1.0f);
    linear_rows_bf16(kernel, x.data(), R, K, W.data(), N, y.data());
    for (int64_t r = 0; r < R; ++r)
      for (int64_t n = 0; n < N; ++n) {
        float want = 0;  // small integers times powers of two: every order of summation is exact
        for (int64_t k = 0; k < K; ++k) want += x[size_t(r * K + k)] * Wf[size_t(n * K + k)];
        EXPECT_EQ(y[size_t(r * N + n)], want) << to_string(kernel) << " r=" << r << " n=" << n;
      }
  }
  omp_set_num_threads(saved);
}

TEST(LinearBf16, AKernelThisCpuLacksIsRefused) {
  if (bf16_kernel_available(Bf16Kernel::avx512)) GTEST_SKIP() << "this CPU runs every kernel";
  float x = 1, y = 0;
  uint16_t w = 0x3F80;
  EXPECT_THROW(linear_rows_bf16(Bf16Kernel::avx512, &x, 1, 1, &w, 1, &y), std::invalid_argument);
}

}  // namespace
}  // namespace grape::kernels::cpu
