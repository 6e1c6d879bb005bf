// The fused CPU attention against the LibTorch-composed reference, for every encoding over a grid of
// shapes (ggml test-backend-ops style): forward, every gradient (q, k, v, x and the encoding's own
// parameters), chunked queries against a cache, decode, non-contiguous inputs and bad input.
#include <gtest/gtest.h>

#include <cmath>

#include "grape/model.hpp"
#include "grape/pe.hpp"

namespace {

constexpr int64_t kModelDim = 48;

// Parameters moved off their init so that no encoding sits at a degenerate point (e.g. equal gates).
void perturb(grape::Encoding& enc) {
  torch::NoGradGuard ng;
  for (auto& p : enc.parameters()) p.add_(torch::randn_like(p) * 0.1);
}

double rel_err(const torch::Tensor& got, const torch::Tensor& want) {
  auto scale = std::max(1.0, want.abs().max().item<double>());
  return (got.to(torch::kFloat64) - want.to(torch::kFloat64)).abs().max().item<double>() / scale;
}

struct Case {
  std::string pe;
  int64_t T, D, B, H;
};

// Forward and every gradient of the fused path equal the reference path's.
void check_against_reference(const Case& c) {
  SCOPED_TRACE(::testing::Message() << c.pe << " T=" << c.T << " D=" << c.D << " B=" << c.B << " H=" << c.H);
  torch::manual_seed(c.T * 1000 + c.D + c.B * 7 + c.H);
  auto enc = grape::make_encoding(c.pe, {c.H, c.D, kModelDim});
  perturb(*enc);
  ASSERT_TRUE(grape::fused_supported(*enc));
  auto q = torch::randn({c.B, c.T, c.H, c.D}).requires_grad_();
  auto k = torch::randn({c.B, c.T, c.H, c.D}).requires_grad_();
  auto v = torch::randn({c.B, c.T, c.H, c.D}).requires_grad_();
  auto x = torch::randn({c.B, c.T, kModelDim}).requires_grad_();
  auto g = torch::randn({c.B, c.T, c.H, c.D});
  std::vector<torch::Tensor> inputs = {q, k, v, x};
  for (const auto& p : enc->parameters()) inputs.push_back(p);

  auto run = [&](bool fused) {
    auto st = enc->initial_state(c.B, 0);
    auto y = fused ? grape::fused_attention(*enc, q, k, v, x, st) : grape::reference_attention(*enc, q, k, v, x, st);
    auto grads = torch::autograd::grad({(y * g).sum()}, inputs, {}, false, false, /*allow_unused=*/true);
    return std::make_pair(y.detach(), grads);
  };
  auto [y_ref, g_ref] = run(false);
  auto [y, gr] = run(true);
  EXPECT_LE(rel_err(y, y_ref), 1e-4) << "forward";
  const char* names[] = {"q", "k", "v", "x"};
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (!g_ref[i].defined()) {
      EXPECT_TRUE(!gr[i].defined() || gr[i].abs().max().item<double>() == 0) << "input " << i;
      continue;
    }
    ASSERT_TRUE(gr[i].defined()) << "input " << i;
    EXPECT_LE(rel_err(gr[i], g_ref[i]), 1e-3) << "gradient of " << (i < 4 ? names[i] : "parameter") << " " << i;
  }
}

std::vector<std::string> supported_encodings() {
  std::vector<std::string> out;
  for (const auto& info : grape::encodings()) {
    auto enc = info.make({2, 16, kModelDim}, {});
    if (grape::fused_supported(*enc)) out.push_back(info.name);
  }
  return out;
}

TEST(FusedAttention, EveryEncodingButThePathSumIsSupported) {
  auto names = supported_encodings();
  EXPECT_EQ(names.size(), grape::encodings().size() - 1);
  EXPECT_EQ(std::find(names.begin(), names.end(), "grape-ap"), names.end());
  for (const char* n : {"rope", "alibi", "fox", "grape-a-qk", "grape-m-ctx", "learned"})
    EXPECT_NE(std::find(names.begin(), names.end(), n), names.end()) << n;
}

TEST(FusedAttention, MatchesReferenceForEveryEncodingOverTheGrid) {
  for (const auto& pe : supported_encodings())
    for (int64_t T : {1, 7, 64, 257})
      for (int64_t D : {32, 64, 128}) check_against_reference({pe, T, D, 2, 3});
}

TEST(FusedAttention, MatchesReferenceAtLongContextAndOtherBatchShapes) {
  for (const char* pe : {"rope", "alibi", "fox", "grape-a-qk", "grape-m-ctx"}) check_against_reference({pe, 1024, 64, 1, 2});
  for (const char* pe : {"grape-m", "grape-a-k", "xpos"}) check_against_reference({pe, 33, 64, 3, 1});
}

// Queries of a later chunk against the whole cache (prefill, then chunked prefill and one-token decode),
// starting at a non-zero position; decode with a long cache takes the split-key kernel.
TEST(FusedAttention, ChunksAndDecodeAgainstACacheEqualTheReference) {
  for (const char* pe : {"rope", "alibi", "fox", "grape-a-q", "grape-m-ctx", "nope"}) {
    for (int64_t prefix : {5, 300}) {
      for (int64_t chunk : {1, 4, 37}) {
        SCOPED_TRACE(::testing::Message() << pe << " prefix=" << prefix << " chunk=" << chunk);
        torch::manual_seed(prefix + chunk);
        const int64_t B = 2, H = 2, D = 32, T = prefix + chunk;
        auto enc = grape::make_encoding(pe, {H, D, kModelDim});
        perturb(*enc);
        auto q = torch::randn({B, T, H, D}), k = torch::randn({B, T, H, D}), v = torch::randn({B, T, H, D});
        auto x = torch::randn({B, T, kModelDim});
        auto st = enc->initial_state(B, /*offset=*/11);
        auto first = enc->encode(q.narrow(1, 0, prefix), k.narrow(1, 0, prefix), x.narrow(1, 0, prefix), st);
        auto cache = grape::KeyCache::from(first, v.narrow(1, 0, prefix));
        auto rest = enc->encode(q.narrow(1, prefix, chunk), k.narrow(1, prefix, chunk), x.narrow(1, prefix, chunk), st);
        cache.append(rest, v.narrow(1, prefix, chunk));
        auto p = torch::softmax(grape::attention_logits(*enc, rest, cache), -1);
        auto want = torch::einsum("bhij,bjhd->bihd", {p, cache.v});
        EXPECT_LE(rel_err(grape::fused_attend(*enc, rest, cache), want), 1e-4);
      }
    }
  }
}

TEST(FusedAttention, NonContiguousInputsAreHandled) {
  torch::manual_seed(3);
  auto enc = grape::make_encoding("alibi", {3, 32, kModelDim});
  // [B,H,T,D] storage viewed as [B,T,H,D]: strided, not contiguous.
  auto q = torch::randn({2, 3, 20, 32}).transpose(1, 2), k = torch::randn({2, 3, 20, 32}).transpose(1, 2);
  auto v = torch::randn({2, 3, 20, 32}).transpose(1, 2);
  ASSERT_FALSE(q.is_contiguous());
  auto s1 = enc->initial_state(2), s2 = enc->initial_state(2);
  EXPECT_LE(rel_err(grape::fused_attention(*enc, q, k, v, {}, s1), grape::reference_attention(*enc, q, k, v, {}, s2)),
            1e-4);
}

// The per-token terms of the linear family reproduce the encoding's own bias below the diagonal.
TEST(FusedAttention, LinearBiasTermsReproduceTheBias) {
  for (const char* pe : {"alibi", "grape-a-q", "grape-a-k", "grape-a-qk", "fox"}) {
    SCOPED_TRACE(pe);
    torch::manual_seed(9);
    auto enc = grape::make_encoding(pe, {4, 16, kModelDim});
    perturb(*enc);
    auto q = torch::randn({2, 40, 4, 16}), k = torch::randn({2, 40, 4, 16}), x = torch::randn({2, 40, kModelDim});
    auto st = enc->initial_state(2, 100);
    auto tok = enc->encode(q, k, x, st);
    auto cache = grape::KeyCache::from(tok);
    grape::LinearBiasTerms t;
    ASSERT_TRUE(enc->linear_bias(tok, cache, t));
    auto pos = torch::arange(100, 140, torch::kFloat64);
    auto dist = (pos.unsqueeze(1) - pos.unsqueeze(0)).view({1, 1, 40, 40});
    auto zero = torch::zeros({2, 4, 40}, torch::kFloat64);
    auto f = [&](const torch::Tensor& t) { return t.defined() ? t.to(torch::kFloat64) : zero; };
    auto bias = f(t.a).unsqueeze(-1) + f(t.b).unsqueeze(-2) + (f(t.c).unsqueeze(-1) + f(t.d).unsqueeze(-2)) * dist;
    auto want = enc->bias(tok, cache).to(torch::kFloat64);
    auto causal = torch::ones({40, 40}, torch::kBool).tril();
    EXPECT_LE((bias - want).masked_fill(~causal, 0).abs().max().item<double>(), 1e-5);
  }
}

TEST(FusedAttention, BadInputIsAClearError) {
  auto enc = grape::make_encoding("rope", {2, 16, kModelDim});
  auto q = torch::randn({1, 5, 2, 16});
  auto st = enc->initial_state(1);
  auto tok = enc->encode(q, q, {}, st);
  auto cache = grape::KeyCache::from(tok);  // no values
  EXPECT_THROW(grape::fused_attend(*enc, tok, cache), std::invalid_argument);
  cache.v = torch::randn({1, 5, 2, 8});
  EXPECT_THROW(grape::fused_attend(*enc, tok, cache), std::invalid_argument);
  cache.v = torch::randn({1, 5, 2, 16}, torch::kFloat64);
  EXPECT_THROW(grape::fused_attend(*enc, tok, cache), std::invalid_argument);
  auto ap = grape::make_encoding("grape-ap", {2, 16, kModelDim});
  auto st2 = ap->initial_state(1);
  auto x = torch::randn({1, 5, kModelDim});
  auto t2 = ap->encode(q, q, x, st2);
  try {
    grape::fused_attend(*ap, t2, grape::KeyCache::from(t2, q));
    FAIL() << "grape-ap accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("grape-ap"), std::string::npos) << e.what();
  }
}

// The model with fused attention gives the reference model's logits and gradients.
TEST(FusedAttention, ModelWithFusedAttentionEqualsReferenceModel) {
  for (const char* pe : {"rope", "fox", "grape-ap"}) {
    SCOPED_TRACE(pe);
    grape::ModelConfig c = grape::model_preset("tiny");
    c.n_layer = 2;
    c.n_embd = 64;
    c.pe = pe;
    c.kv_shift = true;
    torch::manual_seed(1);
    grape::Transformer fused(c);
    c.attention = "reference";
    grape::Transformer ref(c);
    {
      torch::NoGradGuard ng;
      auto src = fused->named_parameters();
      for (auto& p : ref->named_parameters()) p.value().copy_(src[p.key()]);
    }
    auto tokens = torch::randint(257, {2, 50}, torch::kInt64);
    auto lf = fused->loss(tokens, tokens.roll(-1, 1)), lr = ref->loss(tokens, tokens.roll(-1, 1));
    EXPECT_NEAR(lf.item<double>(), lr.item<double>(), 1e-5);
    lf.backward();
    lr.backward();
    auto gr = ref->named_parameters();
    for (auto& p : fused->named_parameters()) EXPECT_LE(rel_err(p.value().grad(), gr[p.key()].grad()), 1e-3) << p.key();
  }
}

}  // namespace
