// Rotations against plainly written per-element loops, and their laws on explicit matrices.
#include <gtest/gtest.h>

#include <cmath>

#include "grape/pe.hpp"
#include "tensor_checks.hpp"

namespace {

using grape::HeadShape;
using grape::KeyCache;
using grape::PeOptions;

using grape::testing::f64;

// Plain loop: RoPE of one head vector at position n, standard orientation.
std::vector<double> rope_loop(const std::vector<double>& x, double n, double base, bool half) {
  const size_t D = x.size(), P = D / 2;
  std::vector<double> y(x);
  for (size_t i = 0; i < P; ++i) {
    const double th = n * std::pow(base, -2.0 * double(i) / double(D));
    const size_t a = half ? i : 2 * i, b = half ? i + P : 2 * i + 1;
    y[a] = x[a] * std::cos(th) - x[b] * std::sin(th);
    y[b] = x[a] * std::sin(th) + x[b] * std::cos(th);
  }
  return y;
}

grape::PeTokens encode(grape::Encoding& e, const torch::Tensor& q, int64_t offset) {
  auto st = e.initial_state(q.size(0), offset);
  return e.encode(q, q, {}, st);
}

TEST(Rope, MatchesPlainLoopBothPairings) {
  torch::manual_seed(1);
  for (bool half : {true, false}) {
    auto e = grape::make_encoding("rope", {2, 10, 20}, PeOptions{{"pairing", half ? "half" : "interleaved"}});
    e->to(f64);
    auto q = torch::randn({1, 6, 2, 10}, f64);
    auto out = encode(*e, q, 123).q;
    double worst = 0;
    for (int64_t t = 0; t < 6; ++t)
      for (int64_t h = 0; h < 2; ++h) {
        std::vector<double> x(10);
        for (int64_t d = 0; d < 10; ++d) x[d] = q[0][t][h][d].item<double>();
        auto y = rope_loop(x, double(123 + t), 10000.0, half);
        for (int64_t d = 0; d < 10; ++d)
          worst = std::max(worst, std::abs(y[d] - out[0][t][h][d].item<double>()));
      }
    EXPECT_LT(worst, 1e-12) << (half ? "half" : "interleaved");
  }
}

TEST(Rope, GrapeOrientationIsTheInverseTurn) {
  torch::manual_seed(2);
  auto std_e = grape::make_encoding("rope", {1, 8, 8});
  auto grape_e = grape::make_encoding("rope", {1, 8, 8}, PeOptions{{"orientation", "grape"}});
  std_e->to(f64);
  grape_e->to(f64);
  auto q = torch::randn({1, 1, 1, 8}, f64);
  // The authors' clockwise turn at position n equals the standard turn at -n; check via composition.
  auto fwd = encode(*grape_e, q, 37).q;
  auto back = encode(*std_e, fwd, 37).q;
  EXPECT_LT((back - q).abs().max().item<double>(), 1e-12);
}

TEST(Rope, PartialRotaryRespacesFrequencies) {
  // fraction 0.5 of D = 8: the first 4 dims rotate with theta_i = base^(-2i/4), pairs (0,2), (1,3).
  auto e = grape::make_encoding("rope", {1, 8, 8}, PeOptions{{"fraction", "0.5"}});
  e->to(f64);
  auto q = torch::zeros({1, 1, 1, 8}, f64);
  q[0][0][0][1] = 1.0;  // plane 1 = (1, 3), theta_1 = 10000^(-1/2) = 0.01
  auto y = encode(*e, q, 50).q;
  EXPECT_NEAR(y[0][0][0][1].item<double>(), std::cos(0.5), 1e-14);
  EXPECT_NEAR(y[0][0][0][3].item<double>(), std::sin(0.5), 1e-14);
}

TEST(Rope, PRopeZeroesTheLowestFrequencies) {
  // p = 0.5 of 4 pairs keeps pairs 0,1 (highest frequencies) and freezes pairs 2,3.
  auto e = grape::make_encoding("rope", {1, 8, 8}, PeOptions{{"p", "0.5"}});
  e->to(f64);
  torch::manual_seed(3);
  auto q = torch::randn({1, 3, 1, 8}, f64);
  auto y = encode(*e, q, 1000).q;
  for (int64_t d : {2, 3, 6, 7})
    EXPECT_EQ((y.select(-1, d) - q.select(-1, d)).abs().max().item<double>(), 0.0);
  EXPECT_GT((y.select(-1, 0) - q.select(-1, 0)).abs().max().item<double>(), 1e-3);
}

TEST(Rope, RelativeLawOnExplicitMatrices) {
  // G(m)^T G(n) = G(n - m), G(0) = I, G(a + b) = G(a) G(b), built column by column from the encoding.
  auto e = grape::make_encoding("rope", {1, 8, 8});
  e->to(f64);
  auto eye = torch::eye(8, f64).view({8, 1, 1, 8});  // 8 "batch" rows = basis vectors
  auto G = [&](int64_t n) { return encode(*e, eye, n).q.view({8, 8}).t(); };  // column j = G e_j
  EXPECT_LT((G(0) - torch::eye(8, f64)).abs().max().item<double>(), 1e-15);
  EXPECT_LT((G(5).t().matmul(G(12)) - G(7)).abs().max().item<double>(), 1e-12);
  EXPECT_LT((G(3).matmul(G(4)) - G(7)).abs().max().item<double>(), 1e-12);
  EXPECT_LT((G(900).t().matmul(G(900)) - torch::eye(8, f64)).abs().max().item<double>(), 1e-12);
}

TEST(Rope, MatchesMatrixExponentialOfTheGenerator) {
  // G(n) = expm(n sum_i theta_i (e_b e_a^T - e_a e_b^T)) for half pairs (a, b) = (i, i + 4).
  auto e = grape::make_encoding("rope", {1, 8, 8});
  e->to(f64);
  auto L = torch::zeros({8, 8}, f64);
  for (int64_t i = 0; i < 4; ++i) {
    const double th = std::pow(10000.0, -2.0 * double(i) / 8.0);
    L[i + 4][i] = th;
    L[i][i + 4] = -th;
  }
  auto eye = torch::eye(8, f64).view({8, 1, 1, 8});
  auto G = encode(*e, eye, 17).q.view({8, 8}).t();
  EXPECT_LT((G - torch::linalg_matrix_exp(L * 17.0)).abs().max().item<double>(), 1e-12);
}

TEST(XPos, ScalesAreReciprocalAndLogitsDecay) {
  auto e = grape::make_encoding("xpos", {1, 8, 8});
  e->to(f64);
  auto ones = torch::ones({1, 1, 1, 8}, f64);
  auto st = e->initial_state(1, 40);
  auto tok = e->encode(ones, ones, {}, st);
  // At equal positions, q and k scales are reciprocal: q~ . k~ = |x|^2 (the rotation cancels too).
  EXPECT_NEAR((tok.q * tok.k).sum().item<double>(), 8.0, 1e-12);
  // zeta_0 = gamma D / ((1+gamma) D) = 0.4/1.4, so the q scale of pair 0 at n = 40, S = 512 is zeta^(40/512).
  const double z0 = 0.4 / 1.4;
  const double pair0 = std::hypot(tok.q[0][0][0][0].item<double>(), tok.q[0][0][0][4].item<double>());
  EXPECT_NEAR(pair0, std::sqrt(2.0) * std::pow(z0, 40.0 / 512.0), 1e-12);
}

TEST(GrapeM, LambdaGradientMatchesAnalyticForm) {
  // d/d lambda_i of sum(w . rotate(q)) = (theta_i / s) sum_n n * d/dphi, checked against autograd.
  torch::manual_seed(5);
  auto e = grape::make_encoding("grape-m", {1, 4, 4});
  e->to(f64);
  auto q = torch::randn({1, 5, 1, 4}, f64), w = torch::randn({1, 5, 1, 4}, f64);
  auto st = e->initial_state(1, 0);
  (e->encode(q, q, {}, st).q * w).sum().backward();
  auto grad = e->named_parameters()["lambda"].grad();
  for (int64_t i = 0; i < 2; ++i) {
    const double th = std::pow(10000.0, -2.0 * double(i) / 4.0);
    double g = 0;
    for (int64_t n = 0; n < 5; ++n) {
      const double a = q[0][n][0][i].item<double>(), b = q[0][n][0][i + 2].item<double>();
      const double c = std::cos(n * th), s = std::sin(n * th);
      // y_a = a c - b s, y_b = a s + b c; dy/dphi = (-a s - b c, a c - b s)
      g += n * (w[0][n][0][i].item<double>() * (-a * s - b * c) +
                w[0][n][0][i + 2].item<double>() * (a * c - b * s));
    }
    EXPECT_NEAR(grad[0][i].item<double>(), g * th / 16.0, 1e-10);
  }
}

TEST(GrapeMPlanes, RandomBasisKeepsNormsAndRelativeLaw) {
  torch::manual_seed(6);
  auto e = grape::make_encoding("grape-m-planes", {2, 6, 12}, PeOptions{{"per_head_basis", "true"}});
  {
    torch::NoGradGuard ng;
    e->named_parameters()["basis_logits"].normal_(0, 0.5);
  }
  e->to(f64);
  auto q = torch::randn({1, 7, 2, 6}, f64), k = torch::randn({1, 7, 2, 6}, f64);
  auto logits = [&](int64_t off) {
    auto st = e->initial_state(1, off);
    auto tok = e->encode(q, k, {}, st);
    return std::make_pair(grape::attention_logits(*e, tok, KeyCache::from(tok)), tok.q);
  };
  auto [l0, q0] = logits(0);
  auto [l1, q1] = logits(333);
  auto fin = torch::isfinite(l0);
  EXPECT_LT((l0 - l1).masked_fill(~fin, 0).abs().max().item<double>(), 1e-10);
  EXPECT_LT((q0.norm(2, -1) - q.norm(2, -1)).abs().max().item<double>(), 1e-12);
  EXPECT_GT((q0 - q).abs().max().item<double>(), 1e-3);  // the basis really acts
}

}  // namespace
