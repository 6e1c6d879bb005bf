// T5, KERPLE, FIRE and CoPE against hand-computed values and the invariants of docs/encodings.md (A-2,
// C-1..C-4), their refusal of bad options, the fused kernel's refusal, and a few training steps.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "expect_invalid.hpp"
#include "grape/attention.hpp"
#include "grape/model.hpp"
#include "tensor_checks.hpp"

namespace grape {
namespace {

using grape::testing::f64;

// An encoding in float64 with its parameters by name.
EncodingPtr make64(const std::string& name, const HeadShape& s, const PeOptions& o = {}) {
  auto e = make_encoding(name, s, o);
  e->to(f64);
  return e;
}

torch::Tensor param(const EncodingPtr& e, const std::string& name) { return e->named_parameters()[name]; }

void set_param(const EncodingPtr& e, const std::string& name, const torch::Tensor& value) {
  torch::NoGradGuard ng;
  param(e, name).copy_(value.to(f64));
}

// bias [B or 1,H,Tq,Tk] of T tokens (q, k given) starting at position `offset`, against themselves.
torch::Tensor bias_of(Encoding& e, const torch::Tensor& q, const torch::Tensor& k, int64_t offset = 0) {
  auto st = e.initial_state(q.size(0), offset);
  auto tok = e.encode(q, k, {}, st);
  return e.bias(tok, KeyCache::from(tok));
}

torch::Tensor bias_of(Encoding& e, int64_t T, int64_t offset = 0) {
  const auto& s = e.shape();
  auto q = torch::randn({1, T, s.heads, s.head_dim}, f64);
  return bias_of(e, q, torch::randn_like(q), offset);
}

using grape::testing::expect_invalid;

// ---- T5 (A-2) --------------------------------------------------------------------------------------

// The decoder bucket written out with std::log, independently of the library's tensor code.
int64_t t5_bucket(int64_t n, int64_t buckets, int64_t max_distance) {
  const int64_t exact = buckets / 2;
  if (n < exact) return n;
  const double f = std::log(double(n) / exact) / std::log(double(max_distance) / exact) * (buckets - exact);
  return std::min<int64_t>(buckets - 1, exact + int64_t(std::floor(f)));
}

// A table whose entry reads out the bucket: head 0 holds b, head 1 holds 2b + 1 (checks the head axis).
torch::Tensor bucket_readout(const EncodingPtr& e, int64_t buckets, int64_t T) {
  auto b = torch::arange(buckets, f64);
  set_param(e, "table", torch::stack({b, 2 * b + 1}, 1));
  auto bias = bias_of(*e, T);
  EXPECT_EQ(bias.sizes(), (torch::IntArrayRef{1, 2, T, T}));
  EXPECT_EQ((bias[0][1] - (2 * bias[0][0] + 1)).abs().max().item<double>(), 0.0);
  return bias[0][0][T - 1].flip(0);  // bucket(n) for n = 0..T-1: the last query row, read from its diagonal
}

TEST(RelativeBias, T5BucketsAreExactThenLogarithmicThenSaturate) {
  auto e = make64("t5", {2, 4, 8});
  auto bucket = bucket_readout(e, 32, 201);  // distances 0..200
  std::vector<int64_t> got(201);
  for (int64_t n = 0; n <= 200; ++n) got[n] = int64_t(bucket[n].item<double>());
  for (int64_t n = 0; n < 16; ++n) EXPECT_EQ(got[n], n) << "exact bucket " << n;
  for (int64_t n = 128; n <= 200; ++n) EXPECT_EQ(got[n], 31) << "last bucket " << n;
  for (int64_t n = 1; n <= 200; ++n) EXPECT_GE(got[n], got[n - 1]) << "monotone at " << n;
  // By hand: 16 + floor(16 ln(n/16) / ln 8).
  EXPECT_EQ(got[16], 16);   // ln 1 = 0
  EXPECT_EQ(got[20], 17);   // 16 ln 1.25 / ln 8 = 1.717
  EXPECT_EQ(got[32], 21);   // 16/3 = 5.333
  EXPECT_EQ(got[64], 26);   // 32/3 = 10.667
  EXPECT_EQ(got[100], 30);  // 16 ln 6.25 / ln 8 = 14.10
  EXPECT_EQ(got[127], 31);  // 15.94
  for (int64_t n = 0; n <= 200; ++n) EXPECT_EQ(got[n], t5_bucket(n, 32, 128)) << n;

  // Other options: 8 buckets (4 exact), max_distance 20: 4 + floor(4 ln(n/4) / ln 5).
  auto small = make64("t5", {2, 4, 8}, PeOptions{{"num_buckets", "8"}, {"max_distance", "20"}});
  auto b8 = bucket_readout(small, 8, 30);
  EXPECT_EQ(b8[3].item<double>(), 3);
  EXPECT_EQ(b8[5].item<double>(), 4);   // 0.554
  EXPECT_EQ(b8[9].item<double>(), 6);   // 2.015
  EXPECT_EQ(b8[14].item<double>(), 7);  // 3.113
  EXPECT_EQ(b8[29].item<double>(), 7);
  for (int64_t n = 0; n < 30; ++n) EXPECT_EQ(b8[n].item<double>(), t5_bucket(n, 8, 20)) << n;
}

TEST(RelativeBias, T5StartsAsNopeAndIsTheSameForEveryQueryContent) {
  auto e = make64("t5", {2, 4, 8});
  EXPECT_EQ(bias_of(*e, 9).abs().max().item<double>(), 0.0);  // zero table at init
  set_param(e, "table", torch::randn({32, 2}, f64));
  // A function of positions only: other q, k give the same bias, and a later start the same bias.
  EXPECT_EQ((bias_of(*e, 9) - bias_of(*e, 9, 1000)).abs().max().item<double>(), 0.0);
}

// ---- KERPLE (A-3) ----------------------------------------------------------------------------------

TEST(RelativeBias, KerpleLogAndPowerEqualTheirFormulas) {
  const double rho1[] = {0.3, -2.0}, rho2[] = {-0.5, 1.2};
  auto softplus = [](double x) { return std::log1p(std::exp(x)); };
  for (const std::string variant : {"log", "power"}) {
    SCOPED_TRACE(variant);
    auto e = make64("kerple", {2, 4, 8}, PeOptions{{"variant", variant}});
    set_param(e, "rho1", torch::tensor({rho1[0], rho1[1]}, f64));
    set_param(e, "rho2", torch::tensor({rho2[0], rho2[1]}, f64));
    const int64_t T = 40, offset = 57;
    auto b = bias_of(*e, T, offset)[0];  // [H,T,T]
    double worst = 0.0;
    for (int64_t h = 0; h < 2; ++h) {
      const double r1 = softplus(rho1[h]);
      const double r2 = variant == "log" ? softplus(rho2[h]) : 2.0 / (1.0 + std::exp(-rho2[h]));
      ASSERT_GT(r1, 0.0);
      ASSERT_GT(r2, 0.0);
      ASSERT_LE(r2, 2.0);
      for (int64_t i = 0; i < T; ++i)
        for (int64_t j = 0; j <= i; ++j) {
          const double d = double(i - j);
          const double want = variant == "log" ? -r1 * std::log1p(r2 * d) : -r1 * std::pow(d, r2);
          worst = std::max(worst, std::abs(b[h][i][j].item<double>() - want));
          if (j > 0) EXPECT_LE(b[h][i][j - 1].item<double>(), b[h][i][j].item<double>()) << "non-increasing";
        }
      EXPECT_EQ(b[h].diagonal().abs().max().item<double>(), 0.0) << "bias(0) = 0";
    }
    EXPECT_LE(worst, 1e-12);
  }
}

TEST(RelativeBias, KerpleStaysInRangeForExtremeParameters) {
  for (const std::string variant : {"log", "power"}) {
    auto e = make64("kerple", {2, 4, 8}, PeOptions{{"variant", variant}});
    set_param(e, "rho1", torch::tensor({-40.0, 40.0}, f64));
    set_param(e, "rho2", torch::tensor({-40.0, 40.0}, f64));
    auto b = torch::tril(bias_of(*e, 20)[0]);
    EXPECT_TRUE(torch::isfinite(b).all().item<bool>()) << variant;
    EXPECT_LE(b.max().item<double>(), 0.0) << variant;
    // The steep head (r1 = 40, r2 = 40 or 2) still decays; the flat head is tiny but negative.
    EXPECT_LT(b[1][19][0].item<double>(), -40.0) << variant;
    EXPECT_LT(b[0][19][0].item<double>(), 0.0) << variant;
  }
}

// ---- FIRE (A-4) ------------------------------------------------------------------------------------

// Sets the MLP to read out its input in head 0 (relu(u) = u for u >= 0) and 3u in head 1.
void fire_readout(const EncodingPtr& e, double c, double l_mult) {  // L = l_mult * 512
  const int64_t W = param(e, "mlp_w1").size(0);
  auto w1 = torch::zeros({W}, f64), w2 = torch::zeros({2, W}, f64);
  w1[0] = 1.0;
  w2[0][0] = 1.0;
  w2[1][0] = 3.0;
  set_param(e, "mlp_w1", w1);
  set_param(e, "mlp_b1", torch::zeros({W}, f64));
  set_param(e, "mlp_w2", w2);
  set_param(e, "log_c", torch::tensor({std::log(c)}, f64));
  set_param(e, "log_l", torch::tensor({std::log(l_mult)}, f64));
}

TEST(RelativeBias, FireInputIsTheNormalisedLogDistanceInZeroOne) {
  auto e = make64("fire", {2, 4, 8});
  EXPECT_FALSE(e->properties().relative);
  fire_readout(e, 0.25, 0.05);  // L = 0.05 * 512 = 25.6: queries 0..59 cross it
  auto b = bias_of(*e, 60)[0];
  EXPECT_EQ((b[1] - 3 * b[0]).abs().max().item<double>(), 0.0);
  auto psi = [](double x) { return std::log(0.25 * std::abs(x) + 1.0); };
  const double L = 0.05 * 512.0;
  double worst = 0.0, lo = 1.0, hi = 0.0;
  for (int64_t i = 0; i < 60; ++i)
    for (int64_t j = 0; j <= i; ++j) {
      const double u = b[0][i][j].item<double>();
      worst = std::max(worst, std::abs(u - psi(i - j) / (psi(std::max(L, double(i))) + 1e-6)));
      lo = std::min(lo, u);
      hi = std::max(hi, u);
    }
  EXPECT_LE(worst, 1e-12);
  EXPECT_EQ(lo, 0.0);  // the diagonal
  EXPECT_LE(hi, 1.0);  // j = 0 at i >= L: psi(i) / (psi(i) + eps)
  EXPECT_GT(hi, 0.99);
}

TEST(RelativeBias, FireDependsOnDistanceAndQueryPositionOnlyAndIsRelativeBelowL) {
  auto e = make64("fire", {2, 4, 8});  // L = 512, random MLP
  {
    torch::NoGradGuard ng;
    for (auto& p : e->parameters()) p.add_(torch::randn_like(p) * 0.1);
    param(e, "log_l").fill_(0.0);
  }
  const int64_t T = 20;
  // Below L: rows at positions 0.. and 300.. are the same (relative), to the last bit.
  EXPECT_EQ((bias_of(*e, T, 0) - bias_of(*e, T, 300)).abs().max().item<double>(), 0.0);
  // Beyond L the query position normalises: the same distances give another bias.
  EXPECT_GT((torch::tril(bias_of(*e, T, 600) - bias_of(*e, T, 700))).abs().max().item<double>(), 1e-4);
  // A function of (i - j, i) only: a cache starting elsewhere gives the same entries for the same positions.
  auto st = e->initial_state(1, 590);
  auto q = torch::randn({1, 30, 2, 4}, f64);
  auto tok = e->encode(q, torch::randn_like(q), {}, st);  // positions 590..619
  auto keys = KeyCache::from(tok);
  auto st2 = e->initial_state(1, 600);
  auto q2 = torch::randn({1, 20, 2, 4}, f64);
  auto tok2 = e->encode(q2, torch::randn_like(q2), {}, st2);  // positions 600..619
  auto part = e->bias(tok2, keys).narrow(3, 10, 20);          // keys 600..619 of the longer cache
  EXPECT_LE((part - e->bias(tok2, KeyCache::from(tok2))).abs().max().item<double>(), 1e-12);
}

TEST(RelativeBias, FireZeroOutputLayerGivesZeroBias) {
  auto e = make64("fire", {3, 4, 8});
  set_param(e, "mlp_w2", torch::zeros({3, 32}, f64));
  EXPECT_EQ(bias_of(*e, 15, 1000).abs().max().item<double>(), 0.0);
}

// ---- CoPE (C-1..C-4) -------------------------------------------------------------------------------

// D = 4. With e[p] = (p, 0, 0, 0) and q_i = (1, ...), q_i . e[p_ij] = p_ij exactly (interpolating a linear
// function is exact), so the bias reads out the positions p.
EncodingPtr cope_readout(int64_t p_max) {
  auto e = make64("cope", {2, 4, 8}, PeOptions{{"p_max", std::to_string(p_max)}});
  auto table = torch::zeros({1, p_max, 4}, f64);
  table.select(2, 0).copy_(torch::arange(p_max, f64).unsqueeze(0));
  set_param(e, "e", table);
  return e;
}

// The gate sigmoid(q_i . k_j / sqrt(4)) of head h, in plain double.
double gate(const torch::Tensor& q, const torch::Tensor& k, int64_t i, int64_t j, int64_t h) {
  return 1.0 / (1.0 + std::exp(-q[0][i][h].dot(k[0][j][h]).item<double>() / 2.0));
}

TEST(RelativeBias, CopeWithAllGatesOpenIsRelativePositionIMinusJPlusOne) {
  const int64_t T = 13;
  // q = (1, 1, 0, 0), k = (0, 100, 0, 0): q.k/2 = 50, sigmoid(50) = 1 in float64.
  auto q = torch::zeros({1, T, 2, 4}, f64), k = torch::zeros({1, T, 2, 4}, f64);
  q.select(3, 0).fill_(1.0);
  q.select(3, 1).fill_(1.0);
  k.select(3, 1).fill_(100.0);
  for (int64_t p_max : {64, 5}) {
    auto e = cope_readout(p_max);
    auto b = bias_of(*e, q, k, 40)[0];  // [H,T,T]
    for (int64_t h = 0; h < 2; ++h)
      for (int64_t i = 0; i < T; ++i)
        for (int64_t j = 0; j <= i; ++j)
          ASSERT_EQ(b[h][i][j].item<double>(), double(std::min(i - j + 1, p_max - 1))) << i << "," << j;
  }
  // C-3: at integer positions the interpolation is exact: bias = q_i . e[i - j + 1] for a random table.
  auto e = make64("cope", {2, 4, 8});
  auto table = torch::randn({1, 64, 4}, f64);
  set_param(e, "e", table);
  q.narrow(3, 2, 2).copy_(torch::randn({1, T, 2, 2}, f64));  // q.k unchanged: gates stay 1
  auto b = bias_of(*e, q, k)[0];
  double worst = 0.0;
  for (int64_t h = 0; h < 2; ++h)
    for (int64_t i = 0; i < T; ++i)
      for (int64_t j = 0; j <= i; ++j)
        worst = std::max(
            worst, std::abs(b[h][i][j].item<double>() - q[0][i][h].dot(table[0][i - j + 1]).item<double>()));
  EXPECT_LE(worst, 1e-12);
}

TEST(RelativeBias, CopePositionsAreReverseSumsOfGatesNonIncreasingInJ) {
  torch::manual_seed(5);
  const int64_t T = 13;
  auto q = torch::randn({1, T, 2, 4}, f64), k = torch::randn({1, T, 2, 4}, f64);
  q.select(3, 0).fill_(1.0);
  auto e = cope_readout(64);
  auto p = bias_of(*e, q, k)[0];
  double worst = 0.0;
  for (int64_t h = 0; h < 2; ++h)
    for (int64_t i = 0; i < T; ++i) {
      // C-2: p_ii = g_ii, and p non-increasing in j.
      worst = std::max(worst, std::abs(p[h][i][i].item<double>() - gate(q, k, i, i, h)));
      double sum = 0.0;
      for (int64_t j = i; j >= 0; --j) {
        sum += gate(q, k, i, j, h);
        worst = std::max(worst, std::abs(p[h][i][j].item<double>() - sum));
        if (j < i) EXPECT_GE(p[h][i][j].item<double>(), p[h][i][j + 1].item<double>());
      }
    }
  EXPECT_LE(worst, 1e-12);
  // C-4: masked (later) keys contribute nothing: changing keys after position 6 leaves rows 0..6 alone.
  auto k2 = k.clone();
  k2.narrow(1, 7, T - 7).add_(torch::randn({1, T - 7, 2, 4}, f64) * 5.0);
  auto p2 = bias_of(*e, q, k2)[0];
  EXPECT_EQ((p2.narrow(1, 0, 7) - p.narrow(1, 0, 7)).abs().max().item<double>(), 0.0);
  EXPECT_GT((p2.narrow(1, 7, T - 7) - p.narrow(1, 7, T - 7)).abs().max().item<double>(), 1e-3);
}

TEST(RelativeBias, CopeInterpolatesTheTableBetweenFloorAndCeil) {
  torch::manual_seed(6);
  const int64_t T = 11, P = 6;  // P < T: some positions clamp to P - 1
  auto e = make64("cope", {2, 4, 8}, PeOptions{{"p_max", std::to_string(P)}, {"per_head", "true"}});
  auto table = torch::randn({2, P, 4}, f64);
  set_param(e, "e", table);
  auto q = torch::randn({1, T, 2, 4}, f64) * 2.0, k = torch::randn({1, T, 2, 4}, f64) * 2.0;
  auto b = bias_of(*e, q, k)[0];
  double worst = 0.0;
  int64_t clamped = 0;
  for (int64_t h = 0; h < 2; ++h)
    for (int64_t i = 0; i < T; ++i) {
      double sum = 0.0;
      for (int64_t j = i; j >= 0; --j) {
        sum += gate(q, k, i, j, h);
        const double p = std::min(sum, double(P - 1));
        clamped += sum > P - 1;
        const double lo = std::floor(p), hi = std::ceil(p);
        auto ev = table[h][int64_t(lo)] * (1.0 - (p - lo)) + table[h][int64_t(hi)] * (p - lo);
        worst = std::max(worst, std::abs(b[h][i][j].item<double>() - q[0][i][h].dot(ev).item<double>()));
      }
    }
  EXPECT_LE(worst, 1e-12);
  EXPECT_GT(clamped, 0);  // the clamp was exercised
  // Per head: a table for head 1 only leaves head 0 without bias.
  {
    torch::NoGradGuard ng;
    param(e, "e")[0].zero_();
  }
  b = bias_of(*e, q, k)[0];
  EXPECT_EQ(b[0].abs().max().item<double>(), 0.0);
  EXPECT_GT(torch::tril(b[1]).abs().max().item<double>(), 0.1);
}

// ---- shared: options, the fused kernel, training ---------------------------------------------------

TEST(RelativeBias, BadOptionsAreRefusedNamingTheOption) {
  const HeadShape s{2, 4, 8};
  expect_invalid(
      [&] {
        make_encoding("t5", s, PeOptions{{"num_buckets", "1"}});
      },
      "num_buckets must be >= 2");
  expect_invalid(
      [&] {
        make_encoding("t5", s, PeOptions{{"max_distance", "16"}});
      },
      "max_distance must be > num_buckets/2");
  expect_invalid([&] { make_encoding("t5", s, PeOptions{{"num_buckets", "x"}}); }, "num_buckets");
  expect_invalid(
      [&] {
        make_encoding("kerple", s, PeOptions{{"variant", "cubic"}});
      },
      "option variant: 'cubic'");
  expect_invalid([&] { make_encoding("fire", s, PeOptions{{"mlp_width", "0"}}); }, "mlp_width must be >= 1");
  expect_invalid([&] { make_encoding("fire", s, PeOptions{{"c", "0"}}); }, "c must be > 0");
  expect_invalid([&] { make_encoding("fire", s, PeOptions{{"threshold", "-5"}}); }, "threshold must be > 0");
  expect_invalid([&] { make_encoding("cope", s, PeOptions{{"p_max", "0"}}); }, "p_max must be >= 1");
  expect_invalid([&] { make_encoding("cope", s, PeOptions{{"per_head", "maybe"}}); }, "per_head");
  expect_invalid([&] { make_encoding("cope", s, PeOptions{{"base", "2"}}); }, "unknown parameter 'base'");
}

// (t5 and kerple run fused, from a per-head table by distance: tests/test_fused.cpp.)
TEST(RelativeBias, FusedKernelRefusesThemAndTheModelUsesTheReference) {
  for (const char* name : {"fire", "cope"}) {
    auto e = make_encoding(name, {2, 8, 16});
    EXPECT_FALSE(fused_supported(*e)) << name;
    auto q = torch::randn({1, 3, 2, 8});
    auto st = e->initial_state(1, 0);
    auto tok = e->encode(q, q, {}, st);
    auto keys = KeyCache::from(tok, torch::randn_like(q));
    expect_invalid([&] { fused_attend(*e, tok, keys); }, std::string("the bias of '") + name + "'");
  }
}

// A tiny model with each encoding memorises a fixed batch: the loss stays finite and falls, and the
// encoding's own parameters move.
TEST(RelativeBias, TinyModelTrainsWithEachEncoding) {
  for (const char* name : {"t5", "kerple", "fire", "cope"}) {
    SCOPED_TRACE(name);
    torch::manual_seed(1);
    ModelConfig c;
    c.vocab_size = 32;
    c.n_layer = 1;
    c.n_head = 2;
    c.n_embd = 32;
    c.context = 24;
    c.pe = name;
    Transformer m(c);
    auto tokens = torch::randint(0, 32, {4, 24}, torch::kInt64);
    auto targets = tokens.roll(-1, 1);
    std::map<std::string, torch::Tensor> before;
    for (const auto& p : m->named_parameters())
      if (p.key().find(".pe.") != std::string::npos) before[p.key()] = p.value().detach().clone();
    ASSERT_FALSE(before.empty());
    torch::optim::Adam opt(m->parameters(), torch::optim::AdamOptions(1e-2));
    double first = 0.0, last = 0.0;
    for (int step = 0; step < 25; ++step) {
      opt.zero_grad();
      auto loss = m->loss(tokens, targets);
      last = loss.item<double>();
      ASSERT_TRUE(std::isfinite(last)) << "step " << step;
      if (step == 0) first = last;
      loss.backward();
      opt.step();
    }
    EXPECT_LT(last, 0.7 * first);
    for (const auto& p : m->named_parameters())
      if (before.count(p.key()))
        EXPECT_GT((p.value() - before[p.key()]).abs().max().item<double>(), 0.0) << p.key();
  }
}

}  // namespace
}  // namespace grape
