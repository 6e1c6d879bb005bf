// The fused CPU attention against the LibTorch-composed reference, for every encoding over a grid of
// shapes (ggml test-backend-ops style): forward, every gradient (q, k, v, x and the encoding's own
// parameters), chunked queries against a cache, decode, non-contiguous inputs and bad input.
#include <gtest/gtest.h>

#include <cmath>

#include "grape/attention.hpp"
#include "grape/model.hpp"

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
  grape::PeOptions options = {};
};

// Forward and every gradient of the fused path equal the reference path's.
void check_against_reference(const Case& c) {
  SCOPED_TRACE(::testing::Message() << c.pe << " T=" << c.T << " D=" << c.D << " B=" << c.B << " H=" << c.H
                                    << (c.options.values().empty() ? "" : " (with options)"));
  torch::manual_seed(c.T * 1000 + c.D + c.B * 7 + c.H);
  auto enc = grape::make_encoding(c.pe, {c.H, c.D, kModelDim}, c.options);
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
    auto y = fused ? grape::fused_attention(*enc, q, k, v, x, st)
                   : grape::reference_attention(*enc, q, k, v, x, st);
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
    EXPECT_LE(rel_err(gr[i], g_ref[i]), 1e-3)
        << "gradient of " << (i < 4 ? names[i] : "parameter") << " " << i;
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

// Support is what the encoding declares (Properties::kernel_bias), never probed: unsupported encodings are
// refused by name (the model runs them on the reference attention), every other one runs fused. T5 and
// KERPLE, whose biases are not linear in the distance, run through the per-head table by distance.
TEST(FusedAttention, DeclaredKernelBiasDecidesSupport) {
  for (const char* n : {"t5", "kerple"})
    EXPECT_TRUE(grape::fused_supported(*grape::make_encoding(n, {2, 16, kModelDim}))) << n;
  int unsupported = 0;
  for (const auto& info : grape::encodings()) {
    auto enc = info.make({2, 16, kModelDim}, {});
    const auto kind = enc->properties().kernel_bias;
    EXPECT_EQ(grape::fused_supported(*enc), kind != grape::KernelBias::unsupported) << info.name;
    EXPECT_EQ(kind != grape::KernelBias::none, enc->properties().has_bias) << info.name;
    if (kind != grape::KernelBias::unsupported) continue;
    ++unsupported;
    auto q = torch::randn({1, 3, 2, 16});
    auto st = enc->initial_state(1);
    auto tok = enc->encode(q, q, torch::randn({1, 3, kModelDim}), st);
    try {
      grape::fused_attend(*enc, tok, grape::KeyCache::from(tok, q));
      ADD_FAILURE() << info.name << ": an unsupported bias was accepted";
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find("'" + info.name + "'"), std::string::npos) << e.what();
    }
  }
  EXPECT_EQ(supported_encodings().size() + unsupported, grape::encodings().size());
}

TEST(FusedAttention, MatchesReferenceForEveryEncodingOverTheGrid) {
  for (const auto& pe : supported_encodings())
    for (int64_t T : {1, 7, 64, 257})
      for (int64_t D : {32, 64, 128}) check_against_reference({pe, T, D, 2, 3});
}

TEST(FusedAttention, MatchesReferenceAtLongContextAndOtherBatchShapes) {
  for (const char* pe : {"rope", "alibi", "fox", "grape-a-qk", "grape-m-ctx", "grape-ap", "t5", "kerple"})
    check_against_reference({pe, 1024, 64, 1, 2});
  for (const char* pe : {"grape-m", "grape-a-k", "xpos", "grape-ap", "t5"})
    check_against_reference({pe, 33, 64, 3, 1});
  // KERPLE's power form, and T5 with few buckets (most distances share the last one).
  check_against_reference({"kerple", 257, 64, 2, 3, grape::PeOptions{{"variant", "power"}}});
  check_against_reference(
      {"t5", 257, 32, 2, 3, grape::PeOptions{{"num_buckets", "8"}, {"max_distance", "20"}}});
}

// Queries of a later chunk against the whole cache (prefill, then chunked prefill and one-token decode),
// starting at a non-zero position; decode with a long cache takes the split-key kernel.
TEST(FusedAttention, ChunksAndDecodeAgainstACacheEqualTheReference) {
  for (const char* pe :
       {"rope", "alibi", "fox", "grape-a-q", "grape-m-ctx", "nope", "grape-ap", "t5", "kerple"}) {
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
        auto rest = enc->encode(q.narrow(1, prefix, chunk), k.narrow(1, prefix, chunk),
                                x.narrow(1, prefix, chunk), st);
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
  EXPECT_LE(rel_err(grape::fused_attention(*enc, q, k, v, {}, s1),
                    grape::reference_attention(*enc, q, k, v, {}, s2)),
            1e-4);
}

// The path bias sum_{l=j+1..i} m_h logsigmoid(p_i . r_l / P) from the terms p, r, m, by a plain double loop
// (queries and keys at the same positions): [B,H,T,T].
torch::Tensor path_bias_from_terms(const grape::BiasTerms& t) {
  auto p = t.p.to(torch::kFloat64).contiguous(), r = t.r.to(torch::kFloat64).contiguous();
  auto m = t.m.to(torch::kFloat64).contiguous();
  const int64_t B = p.size(0), T = p.size(1), H = p.size(2), P = p.size(3);
  auto out = torch::zeros({B, H, T, T}, torch::kFloat64);
  auto pa = p.accessor<double, 4>(), ra = r.accessor<double, 4>();
  auto ma = m.accessor<double, 1>();
  auto oa = out.accessor<double, 4>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < T; ++i) {
        double suffix = 0.0;  // sum of psi(i, l) over l > j, l <= i
        for (int64_t j = i; j >= 0; --j) {
          oa[b][h][i][j] = suffix;
          double x = 0.0;
          for (int64_t e = 0; e < P; ++e) x += pa[b][i][h][e] * ra[b][j][h][e];
          x /= double(P);
          suffix += ma[h] * (std::min(x, 0.0) - std::log1p(std::exp(-std::abs(x))));
        }
      }
  return out;
}

// The per-token terms (linear family, path bias, distance table) of every encoding that declares some
// reproduce the encoding's own bias below the diagonal.
TEST(FusedAttention, BiasTermsReproduceTheBias) {
  for (const auto& info : grape::encodings()) {
    const std::string pe = info.name;
    const auto kind = info.make({4, 16, kModelDim}, {})->properties().kernel_bias;
    if (kind == grape::KernelBias::none || kind == grape::KernelBias::unsupported) continue;
    SCOPED_TRACE(pe);
    torch::manual_seed(9);
    auto enc = grape::make_encoding(pe, {4, 16, kModelDim});
    perturb(*enc);
    auto q = torch::randn({2, 40, 4, 16}), k = torch::randn({2, 40, 4, 16}),
         x = torch::randn({2, 40, kModelDim});
    auto st = enc->initial_state(2, 100);
    auto tok = enc->encode(q, k, x, st);
    auto cache = grape::KeyCache::from(tok);
    const grape::BiasTerms t = enc->bias_terms(tok, cache);
    auto pos = torch::arange(100, 140, torch::kFloat64);
    auto dist = (pos.unsqueeze(1) - pos.unsqueeze(0)).view({1, 1, 40, 40});
    auto zero = torch::zeros({2, 4, 40}, torch::kFloat64);
    auto f = [&](const torch::Tensor& t) { return t.defined() ? t.to(torch::kFloat64) : zero; };
    auto bias =
        f(t.a).unsqueeze(-1) + f(t.b).unsqueeze(-2) + (f(t.c).unsqueeze(-1) + f(t.d).unsqueeze(-2)) * dist;
    if (t.p.defined()) bias = bias + path_bias_from_terms(t);
    EXPECT_EQ(t.p.defined(), kind == grape::KernelBias::path_sum);
    EXPECT_EQ(t.dist.defined(), kind == grape::KernelBias::distance_table);
    if (t.dist.defined()) {  // dist[h][min(i - j, W - 1)], W = 40 distances here
      ASSERT_EQ(t.dist.sizes(), (std::vector<int64_t>{4, 40}));
      auto idx = (pos.unsqueeze(1) - pos.unsqueeze(0)).clamp(0, 39).to(torch::kLong).flatten();
      bias = bias + t.dist.to(torch::kFloat64).index_select(1, idx).view({1, 4, 40, 40});
    }
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
  // A bias declared unsupported is refused, by name.
  struct Opaque : grape::Encoding {
    Opaque() : grape::Encoding("opaque-bias", {2, 16, kModelDim}) {}
    grape::Properties properties() const override {
      grape::Properties p;
      p.has_bias = true;
      p.kernel_bias = grape::KernelBias::unsupported;
      return p;
    }
    torch::Tensor bias(const grape::PeTokens& qs, const grape::KeyCache& ks) const override {
      return torch::zeros({qs.q.size(0), qs.q.size(2), qs.length, ks.length});
    }

   protected:
    grape::PeTokens encode_chunk(const torch::Tensor& q, const torch::Tensor& k, const grape::TokenContext&,
                                 grape::PeState&) override {
      return {q, k};
    }
  } opaque;
  EXPECT_FALSE(grape::fused_supported(opaque));
  auto st2 = opaque.initial_state(1);
  auto t2 = opaque.encode(q, q, {}, st2);
  try {
    grape::fused_attend(opaque, t2, grape::KeyCache::from(t2, q));
    FAIL() << "an opaque bias was accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("opaque-bias"), std::string::npos) << e.what();
  }
  // Path-bias terms of the wrong shape are a clear error too.
  auto ap = grape::make_encoding("grape-ap", {2, 16, kModelDim});
  auto st3 = ap->initial_state(1);
  auto t3 = ap->encode(q, q, torch::randn({1, 5, kModelDim}), st3);
  auto cache3 = grape::KeyCache::from(t3, q);
  cache3.key["r"] = cache3.key["r"].narrow(1, 0, 3);
  EXPECT_THROW(grape::fused_attend(*ap, t3, cache3), std::invalid_argument);
  // So is a distance table that is not [H, W >= 1].
  struct BadTable : grape::Encoding {
    std::vector<int64_t> shape;
    explicit BadTable(std::vector<int64_t> s)
        : grape::Encoding("bad-table", {2, 16, kModelDim}), shape(std::move(s)) {}
    grape::Properties properties() const override {
      grape::Properties p;
      p.has_bias = true;
      p.kernel_bias = grape::KernelBias::distance_table;
      return p;
    }
    grape::BiasTerms bias_terms(const grape::PeTokens&, const grape::KeyCache&) const override {
      grape::BiasTerms out;
      out.dist = torch::zeros(shape);
      return out;
    }

   protected:
    grape::PeTokens encode_chunk(const torch::Tensor& q, const torch::Tensor& k, const grape::TokenContext&,
                                 grape::PeState&) override {
      return {q, k};
    }
  };
  for (auto shape : {std::vector<int64_t>{3, 5}, {2, 0}, {2, 5, 1}}) {
    BadTable bad(shape);
    auto st4 = bad.initial_state(1);
    auto t4 = bad.encode(q, q, {}, st4);
    try {
      grape::fused_attend(bad, t4, grape::KeyCache::from(t4, q));
      FAIL() << "a distance table of shape " << shape.size() << "-d was accepted";
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find("distance table of 'bad-table'"), std::string::npos) << e.what();
    }
  }
  BadTable good({2, 3});  // W = 3 < 5 distances: allowed, the far pairs share the last entry
  auto st5 = good.initial_state(1);
  auto t5 = good.encode(q, q, {}, st5);
  EXPECT_NO_THROW(grape::fused_attend(good, t5, grape::KeyCache::from(t5, q)));
}

// The model with fused attention gives the reference model's logits and gradients.
TEST(FusedAttention, ModelWithFusedAttentionEqualsReferenceModel) {
  for (const char* pe : {"rope", "fox", "grape-ap", "t5", "kerple"}) {
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
    for (auto& p : fused->named_parameters())
      EXPECT_LE(rel_err(p.value().grad(), gr[p.key()].grad()), 1e-3) << p.key();
  }
}

}  // namespace
