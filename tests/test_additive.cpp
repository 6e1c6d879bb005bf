// Additive encodings against plainly written double loops, ALiBi slope tables, and KV-shift.
#include <gtest/gtest.h>

#include <cmath>

#include "grape/pe.hpp"
#include "tensor_checks.hpp"

namespace {

using grape::KeyCache;
using grape::PeOptions;
using grape::testing::f64;

double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }
double softplus(double z) { return std::log1p(std::exp(z)); }

TEST(ALiBi, SlopesMatchThePublishedSchedule) {
  auto s8 = grape::alibi_slopes(8);
  for (int h = 0; h < 8; ++h) EXPECT_DOUBLE_EQ(s8[h], std::pow(2.0, -(h + 1)));
  // H = 10: 2^-1..2^-8, then 2^-0.5, 2^-1.5 (every other slope of the 16-head schedule).
  auto s10 = grape::alibi_slopes(10);
  ASSERT_EQ(s10.size(), 10u);
  EXPECT_DOUBLE_EQ(s10[8], std::pow(2.0, -0.5));
  EXPECT_DOUBLE_EQ(s10[9], std::pow(2.0, -1.5));
  auto s12 = grape::alibi_slopes(12);
  for (int i = 0; i < 4; ++i) EXPECT_DOUBLE_EQ(s12[8 + i], std::pow(2.0, -0.5 - i));
  auto s1 = grape::alibi_slopes(1);
  EXPECT_DOUBLE_EQ(s1[0], std::pow(2.0, -8.0));
  auto s3 = grape::alibi_slopes(3);  // 2 heads: 2^-4, 2^-8; then 4-head schedule index 0: 2^-2
  EXPECT_DOUBLE_EQ(s3[0], 1.0 / 16);
  EXPECT_DOUBLE_EQ(s3[1], 1.0 / 256);
  EXPECT_DOUBLE_EQ(s3[2], 0.25);
}

struct Setup {
  grape::EncodingPtr e;
  torch::Tensor q, k, x, bias;
  grape::PeTokens tok;
};

Setup run(const std::string& name, int64_t T, int64_t offset = 0) {
  torch::manual_seed(11);
  Setup s;
  s.e = grape::make_encoding(name, {2, 4, 6});
  s.e->to(f64);
  s.q = torch::randn({1, T, 2, 4}, f64);
  s.k = torch::randn({1, T, 2, 4}, f64);
  s.x = torch::randn({1, T, 6}, f64);
  auto st = s.e->initial_state(1, offset);
  s.tok = s.e->encode(s.q, s.k, s.x, st);
  s.bias = s.e->bias(s.tok, KeyCache::from(s.tok)).expand({1, 2, T, T});
  return s;
}

double param(const grape::EncodingPtr& e, const std::string& n, std::vector<int64_t> idx) {
  auto t = e->named_parameters()[n];
  for (auto i : idx) t = t[i];
  return t.item<double>();
}

TEST(FoX, BiasIsTheSumOfLogGatesBetweenTheTokens) {
  const int64_t T = 9;
  auto s = run("fox", T);
  for (int64_t h = 0; h < 2; ++h)
    for (int64_t i = 0; i < T; ++i)
      for (int64_t j = 0; j <= i; ++j) {
        double want = 0;
        for (int64_t l = j + 1; l <= i; ++l) {
          double z = param(s.e, "b_f", {h});
          for (int64_t c = 0; c < 6; ++c) z += param(s.e, "w_f", {h, c}) * s.x[0][l][c].item<double>();
          want += std::log(sigmoid(z));
        }
        EXPECT_NEAR(s.bias[0][h][i][j].item<double>(), want, 1e-12);
      }
}

TEST(GrapeA, QueryKeyGatedBiasMatchesTheFormula) {
  const int64_t T = 7;
  auto s = run("grape-a-qk", T, 20);
  auto u = s.e->named_parameters()["u"], v = s.e->named_parameters()["v"];
  for (int64_t h = 0; h < 2; ++h) {
    const double m = grape::alibi_slopes(2)[h];
    const double omega = softplus(param(s.e, "rho", {h})) * m;
    auto gate = [&](const torch::Tensor& x, const torch::Tensor& dir) {
      return softplus((x * dir).sum().item<double>() / dir.norm().item<double>() / 2.0);  // sqrt(D) = 2
    };
    for (int64_t i = 0; i < T; ++i)
      for (int64_t j = 0; j <= i; ++j) {
        const double want = -double(i - j) * omega * (gate(s.q[0][i][h], v[h]) + gate(s.k[0][j][h], u[h]));
        EXPECT_NEAR(s.bias[0][h][i][j].item<double>(), want, 1e-12);
      }
  }
}

TEST(GrapeAP, BiasMatchesThePathSumLoop) {
  const int64_t T = 8, P = 8;
  auto s = run("grape-ap", T, 3);
  auto w = s.e->named_parameters()["w_p"];
  for (int64_t h = 0; h < 2; ++h) {
    const double m = grape::alibi_slopes(2)[h];
    auto probe = [&](int64_t t) { return torch::mv(w.narrow(0, h * P, P), s.x[0][t]); };  // [P]
    auto rotated = [&](int64_t t) {  // RMS-normalised probe turned by the absolute position (freq 1)
      auto p = probe(t);
      auto ph = p / torch::sqrt(p.pow(2).mean() + 1e-6);
      const double n = double(3 + t);
      auto r = ph.clone();
      for (int64_t i = 0; i < P / 2; ++i) {
        const double a = ph[i].item<double>(), b = ph[i + P / 2].item<double>();
        r[i] = a * std::cos(n) - b * std::sin(n);
        r[i + P / 2] = a * std::sin(n) + b * std::cos(n);
      }
      return r;
    };
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j <= t; ++j) {
        double want = 0;
        for (int64_t l = j + 1; l <= t; ++l) {
          const double sc = (probe(t) * rotated(l)).sum().item<double>() / double(P);
          want += m * std::log(sigmoid(sc));
        }
        EXPECT_NEAR(s.bias[0][h][t][j].item<double>(), want, 1e-12);
      }
  }
}

TEST(GrapeAP, UnipotentPathProductIsTheAdditiveBias) {
  // prod_{l=j+1..t} (I - psi_l E) = I - b E for nilpotent E (E^2 = 0), b = sum psi_l; and the lifted
  // score q^T (I - b E)^{-T} k = q.k + b with q_hat = [q; 1; 0], k_hat = [k; 0; 1].
  torch::manual_seed(12);
  const int64_t d = 4;
  auto E = torch::zeros({d + 2, d + 2}, f64);
  E[d + 1][d] = 1.0;
  auto psi = -torch::rand({5}, f64);
  auto prod = torch::eye(d + 2, f64);
  for (int64_t l = 0; l < 5; ++l) prod = prod.matmul(torch::eye(d + 2, f64) - psi[l] * E);
  const double b = psi.sum().item<double>();
  EXPECT_LT((prod - (torch::eye(d + 2, f64) - b * E)).abs().max().item<double>(), 1e-15);
  auto q = torch::randn({d}, f64), k = torch::randn({d}, f64);
  auto qh = torch::cat({q, torch::tensor({1.0, 0.0}, f64)}),
       kh = torch::cat({k, torch::tensor({0.0, 1.0}, f64)});
  auto lifted = torch::dot(qh, torch::linalg_inv(prod).t().matmul(kh)).item<double>();
  EXPECT_NEAR(lifted, torch::dot(q, k).item<double>() + b, 1e-12);
}

TEST(KVShift, GatesZeroAndOneAreIdentityAndDelay) {
  torch::manual_seed(13);
  grape::KVShift shift(grape::HeadShape{2, 4, 6});
  shift->to(f64);
  auto k = torch::randn({1, 5, 2, 4}, f64), v = torch::randn({1, 5, 2, 4}, f64);
  auto x = torch::randn({1, 5, 6}, f64);
  {
    torch::NoGradGuard ng;
    shift->w_k.zero_();  // alpha = sigmoid(0) = 0.5: the average of this and the previous token
  }
  grape::KVShiftState st;
  auto [k2, v2] = shift->forward(k, v, x, st);
  EXPECT_LT((k2[0][0] - 0.5 * k[0][0]).abs().max().item<double>(), 1e-15);
  EXPECT_LT((k2[0][3] - 0.5 * (k[0][2] + k[0][3])).abs().max().item<double>(), 1e-15);
  {
    torch::NoGradGuard ng;
    shift->w_k.copy_(torch::full({2, 6}, 0.0));
    shift->w_v.copy_(torch::full({2, 6}, 0.0));
  }
  // Saturated gates: alpha -> 0 is the identity, alpha -> 1 an exact one-token delay with zero at t = 0.
  auto big = torch::ones({1, 5, 6}, f64) * 1e3;
  {
    torch::NoGradGuard ng;
    shift->w_k.fill_(-1.0);
    shift->w_v.fill_(1.0);
  }
  grape::KVShiftState st2;
  auto [k3, v3] = shift->forward(k, v, big, st2);
  EXPECT_LT((k3 - k).abs().max().item<double>(), 1e-12);
  EXPECT_LT(v3[0][0].abs().max().item<double>(), 1e-12);
  EXPECT_LT((v3.narrow(1, 1, 4) - v.narrow(1, 0, 4)).abs().max().item<double>(), 1e-12);
}

TEST(KVShift, StreamingEqualsFullAndGradientsMatchFiniteDifferences) {
  torch::manual_seed(14);
  grape::KVShift shift(grape::HeadShape{2, 4, 6});
  shift->to(f64);
  auto k = torch::randn({2, 9, 2, 4}, f64), v = torch::randn({2, 9, 2, 4}, f64),
       x = torch::randn({2, 9, 6}, f64);
  grape::KVShiftState full_st;
  auto [kf, vf] = shift->forward(k, v, x, full_st);
  grape::KVShiftState st;
  std::vector<torch::Tensor> ks, vs;
  for (auto [a, n] : std::vector<std::pair<int64_t, int64_t>>{{0, 4}, {4, 1}, {5, 4}}) {
    auto [kc, vc] = shift->forward(k.narrow(1, a, n), v.narrow(1, a, n), x.narrow(1, a, n), st);
    ks.push_back(kc);
    vs.push_back(vc);
  }
  EXPECT_LT((torch::cat(ks, 1) - kf).abs().max().item<double>(), 1e-15);
  EXPECT_LT((torch::cat(vs, 1) - vf).abs().max().item<double>(), 1e-15);
  // d/dw_k along a random direction: autograd vs central differences.
  auto w = torch::randn_like(kf);
  auto loss = [&] {
    grape::KVShiftState s;
    return (shift->forward(k, v, x, s).first * w).sum();
  };
  loss().backward();
  auto dir = torch::randn_like(shift->w_k);
  const double ad = (shift->w_k.grad() * dir).sum().item<double>();
  torch::NoGradGuard ng;
  auto saved = shift->w_k.clone();
  shift->w_k.add_(dir * 1e-6);
  const double up = loss().item<double>();
  shift->w_k.copy_(saved - dir * 1e-6);
  const double down = loss().item<double>();
  EXPECT_NEAR((up - down) / 2e-6, ad, 1e-7 * std::max(1.0, std::abs(ad)));
}

TEST(KVShift, ComposesWithAnEncodingInStreaming) {
  // KV-shift, then FoX: chunked decoding with both states equals one full pass.
  torch::manual_seed(15);
  grape::HeadShape shape{2, 4, 6};
  grape::KVShift shift(shape);
  auto fox = grape::make_encoding("fox", shape);
  shift->to(f64);
  fox->to(f64);
  auto q = torch::randn({1, 8, 2, 4}, f64), k = torch::randn({1, 8, 2, 4}, f64),
       v = torch::randn({1, 8, 2, 4}, f64);
  auto x = torch::randn({1, 8, 6}, f64);
  auto full = [&] {
    grape::KVShiftState ss;
    auto [ks, vs] = shift->forward(k, v, x, ss);
    auto st = fox->initial_state(1, 0);
    auto tok = fox->encode(q, ks, x, st);
    return grape::attention_logits(*fox, tok, KeyCache::from(tok));
  }();
  grape::KVShiftState ss;
  auto st = fox->initial_state(1, 0);
  KeyCache cache;
  for (int64_t t = 0; t < 8; ++t) {
    auto [ks, vs] = shift->forward(k.narrow(1, t, 1), v.narrow(1, t, 1), x.narrow(1, t, 1), ss);
    auto tok = fox->encode(q.narrow(1, t, 1), ks, x.narrow(1, t, 1), st);
    cache.append(tok, vs);
    auto row = grape::attention_logits(*fox, tok, cache);
    EXPECT_LT((row - full.narrow(2, t, 1).narrow(3, 0, t + 1)).abs().max().item<double>(), 1e-12) << t;
  }
}

}  // namespace
