// The decoder kernels' matrix product (src/kernels/cpu/decoder.hpp): the SIMD path this build dispatches to
// and the portable loop both equal a float64 product, on shapes that reach every tail (K not a multiple of
// the vector width, N not a multiple of the 4-row block, rows of x from 1 to past the 16 of a batched decode
// step); and a row's product does not depend on the rows batched with it (ragged batched decode == alone).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "kernels/cpu/decoder.hpp"

namespace grape::kernels::cpu {
namespace {

// Both results of y = x W^T (R x K times N x K) equal the float64 product within 4e-5 sqrt(K) (fp32 sums of K
// terms of unit size).
void expect_float64_product(const std::vector<float>& x, const std::vector<float>& W, int64_t R, int64_t K,
                            int64_t N, const std::vector<float>& fast, const std::vector<float>& portable) {
  const double tol = 1e-5 * std::sqrt(double(K)) * 4;
  for (int64_t r = 0; r < R; ++r)
    for (int64_t n = 0; n < N; ++n) {
      double want = 0;
      for (int64_t k = 0; k < K; ++k) want += double(x[size_t(r * K + k)]) * double(W[size_t(n * K + k)]);
      ASSERT_NEAR(fast[size_t(r * N + n)], want, tol) << "r=" << r << " n=" << n;
      ASSERT_NEAR(portable[size_t(r * N + n)], want, tol) << "r=" << r << " n=" << n;
    }
}

TEST(DecoderLinear, SimdAndPortableEqualFloat64Product) {
  std::mt19937 rng(4);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (int64_t K : {1, 7, 16, 37, 341, 384})
    for (int64_t N : {1, 5, 13, 64, 259})
      for (int64_t R : {1, 2, 3, 4, 5, 9, 16, 17}) {
        SCOPED_TRACE(testing::Message() << "K=" << K << " N=" << N << " R=" << R);
        std::vector<float> x(size_t(R * K)), W(size_t(N * K));
        for (auto& v : x) v = nd(rng);
        for (auto& v : W) v = nd(rng);
        std::vector<float> fast(size_t(R * N), -1.0f), portable(size_t(R * N), -1.0f);
        linear_rows(x.data(), R, K, W.data(), N, fast.data());
        linear_rows_portable(x.data(), R, K, W.data(), N, portable.data());
        expect_float64_product(x, W, R, K, N, fast, portable);
      }
}

// The batched products' layout: W packed into panels of panel_rows() rows; the dispatched and the portable
// kernel equal a float64 product for every row-block size (8, 4, 2, 1 and their sums) and panel tail.
TEST(DecoderLinear, PanelsEqualFloat64Product) {
  std::mt19937 rng(6);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (int64_t K : {1, 7, 37, 384})
    for (int64_t N : {1, 13, 32, 64, 259})
      for (int64_t R : {1, 2, 3, 4, 5, 7, 9, 15, 16, 17}) {
        SCOPED_TRACE(testing::Message() << "K=" << K << " N=" << N << " R=" << R);
        std::vector<float> x(size_t(R * K)), W(size_t(N * K));
        for (auto& v : x) v = nd(rng);
        for (auto& v : W) v = nd(rng);
        const std::vector<float> panels = pack_panels(W.data(), N, K);
        const int64_t P = panel_rows();
        ASSERT_TRUE(P == 16 || P == 32) << P;
        ASSERT_EQ(int64_t(panels.size()), (N + P - 1) / P * P * K);
        std::vector<float> fast(size_t(R * N), -1.0f), portable(size_t(R * N), -1.0f);
        linear_rows_panels(x.data(), R, K, panels.data(), N, fast.data());
        linear_rows_panels_portable(x.data(), R, K, panels.data(), N, portable.data());
        expect_float64_product(x, W, R, K, N, fast, portable);
      }
}

// Each row of a batched product equals, to the bit, that row's product alone: the batched decode's rows are
// exactly the sequences decoded alone.
TEST(DecoderLinear, ABatchedRowEqualsThatRowAloneToTheBit) {
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (int64_t K : {37, 384})
    for (int64_t N : {13, 384})
      for (int64_t R : {2, 5, 16, 17}) {
        SCOPED_TRACE(testing::Message() << "K=" << K << " N=" << N << " R=" << R);
        std::vector<float> x(size_t(R * K)), W(size_t(N * K)), batched(size_t(R * N)),
            alone(static_cast<size_t>(N));
        for (auto& v : x) v = nd(rng);
        for (auto& v : W) v = nd(rng);
        linear_rows(x.data(), R, K, W.data(), N, batched.data());
        for (int64_t r = 0; r < R; ++r) {
          linear_rows(x.data() + r * K, 1, K, W.data(), N, alone.data());
          for (int64_t n = 0; n < N; ++n)
            ASSERT_EQ(batched[size_t(r * N + n)], alone[size_t(n)]) << "r=" << r << " n=" << n;
        }
      }
}

}  // namespace
}  // namespace grape::kernels::cpu
