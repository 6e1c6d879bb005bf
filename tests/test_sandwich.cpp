// Sandwich against a plain double loop of its formula, through the reference and the fused attention, with
// gradients, chunked decoding, a short training run, and its refusal of bad options.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <stdexcept>
#include <string>

#include "grape/attention.hpp"
#include "grape/model.hpp"

namespace grape {
namespace {

// bias_h(n) = (sum_{k=1..d/2} cos(n base^(-2k/d)) - d/2) H / (8h), h = 1..H, written out with std::cos.
double sandwich_bias(int64_t n, int64_t head, int64_t H, int64_t d, double base = 10000.0) {
  double sum = 0.0;
  for (int64_t k = 1; k <= d / 2; ++k)
    sum += std::cos(double(n) * std::pow(base, -2.0 * double(k) / double(d)));
  return (sum - double(d / 2)) * double(H) / (8.0 * double(head + 1));  // h = head + 1
}

TEST(Sandwich, BiasEqualsTheFormulaPerEntry) {
  for (auto [D, dim, base] :
       {std::tuple<int64_t, int64_t, double>{16, 16, 10000.0}, {16, 6, 10000.0}, {8, 32, 500.0}}) {
    const HeadShape s{5, D, 20};
    auto e =
        make_encoding("sandwich", s, PeOptions{{"dim", std::to_string(dim)}, {"base", std::to_string(base)}});
    e->to(torch::kFloat64);
    auto q = torch::randn({1, 30, s.heads, s.head_dim}, torch::kFloat64);
    auto st = e->initial_state(1, 1000);  // a far offset: the bias depends on i - j only
    auto tok = e->encode(q, q, {}, st);
    auto b = e->bias(tok, KeyCache::from(tok));
    double err = 0.0;
    for (int64_t h = 0; h < s.heads; ++h)
      for (int64_t i = 0; i < 30; ++i)
        for (int64_t j = 0; j <= i; ++j)
          err = std::max(
              err, std::abs(b[0][h][i][j].item<double>() - sandwich_bias(i - j, h, s.heads, dim, base)));
    EXPECT_LE(err, 1e-12) << "dim=" << dim;
    EXPECT_EQ(b[0][0][7][7].item<double>(), 0.0);                              // 0 at distance 0
    EXPECT_LT(b[0][0][29][0].item<double>(), b[0][0][29][28].item<double>());  // decays with distance
  }
}

TEST(Sandwich, FusedEqualsReferenceWithGradientsAndDecode) {
  torch::manual_seed(3);
  const int64_t B = 2, H = 4, D = 32, C = 24, T = 300;
  auto enc = make_encoding("sandwich", {H, D, C});
  ASSERT_TRUE(fused_supported(*enc));
  auto q = torch::randn({B, T, H, D}).requires_grad_(), k = torch::randn({B, T, H, D}).requires_grad_();
  auto v = torch::randn({B, T, H, D}).requires_grad_();
  auto g = torch::randn({B, T, H, D});
  auto run = [&](bool fused) {
    auto st = enc->initial_state(B, 5);
    auto y = fused ? fused_attention(*enc, q, k, v, {}, st) : reference_attention(*enc, q, k, v, {}, st);
    auto grads = torch::autograd::grad({(y * g).sum()}, {q, k, v});
    return std::make_pair(y.detach(), grads);
  };
  auto [yr, gr] = run(false);
  auto [yf, gf] = run(true);
  auto rel = [](const torch::Tensor& a, const torch::Tensor& b) {
    return (a - b).abs().max().item<double>() / std::max(1.0, b.abs().max().item<double>());
  };
  EXPECT_LE(rel(yf, yr), 1e-5);
  for (int i = 0; i < 3; ++i) EXPECT_LE(rel(gf[i], gr[i]), 1e-4) << "gradient " << i;
  // One query against the whole cache (the decode kernel) equals the full pass's last row.
  torch::NoGradGuard ng;
  auto st = enc->initial_state(B, 5);
  auto prefix = enc->encode(q.narrow(1, 0, T - 1), k.narrow(1, 0, T - 1), {}, st);
  auto cache = KeyCache::from(prefix, v.narrow(1, 0, T - 1));
  auto last = enc->encode(q.narrow(1, T - 1, 1), k.narrow(1, T - 1, 1), {}, st);
  cache.append(last, v.narrow(1, T - 1, 1));
  EXPECT_LE(rel(fused_attend(*enc, last, cache), yr.narrow(1, T - 1, 1)), 1e-5);
}

TEST(Sandwich, TrainsInTheModel) {
  ModelConfig c = model_preset("tiny");
  c.n_layer = 2, c.n_embd = 64, c.context = 32, c.pe = "sandwich";
  torch::manual_seed(1);
  Transformer m(c);
  torch::optim::AdamW opt(m->parameters(), torch::optim::AdamWOptions(3e-3));
  auto x = torch::randint(0, 257, {4, 32}), y = torch::roll(x, -1, 1);
  double first = 0.0, last = 0.0;
  for (int step = 0; step < 30; ++step) {
    opt.zero_grad();
    auto loss = m->loss(x, y);
    loss.backward();
    opt.step();
    (step == 0 ? first : last) = loss.item<double>();
  }
  EXPECT_LT(last, first - 1.0) << "30 steps on one batch should fit it";
}

TEST(Sandwich, BadOptionsAreRefused) {
  for (const char* dim : {"7", "0", "-2"}) {
    try {
      make_encoding("sandwich", {2, 8, 8}, PeOptions{{"dim", dim}});
      ADD_FAILURE() << "dim=" << dim << " was accepted";
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find("dim must be even"), std::string::npos) << e.what();
    }
  }
  EXPECT_THROW(make_encoding("sandwich", {2, 8, 8}, PeOptions{{"base", "1"}}), std::invalid_argument);
  EXPECT_THROW(make_encoding("sandwich", {2, 8, 8}, PeOptions{{"slope", "1"}}), std::invalid_argument);
}

}  // namespace
}  // namespace grape
