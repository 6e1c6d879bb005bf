// The language model: streaming == full for every encoding, ragged batched decoding, causality,
// gradients, init, parameter counts, and the config's parsing, JSON and validation errors.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "expect_invalid.hpp"
#include "grape/attention.hpp"
#include "grape/model.hpp"
#include "model_fixture.hpp"
#include "tensor_checks.hpp"

namespace grape {
namespace {

// A small fp32 model: 2 layers, C = 64, 4 heads (D = 16).
ModelConfig test_config(const std::string& pe, bool kv_shift = false) {
  ModelConfig c;
  c.preset = "test";
  c.vocab_size = 257;
  c.n_layer = 2;
  c.n_head = 4;
  c.n_embd = 64;
  c.context = 32;
  c.pe = pe;
  c.kv_shift = kv_shift;
  return c;
}

Transformer make_model(const ModelConfig& c, uint64_t seed = 7) {
  return testing::perturbed_model(c, seed, 0.1);
}

torch::Tensor random_tokens(int64_t B, int64_t T, int64_t vocab, uint64_t seed) {
  auto gen = at::detail::createCPUGenerator(seed);
  return torch::randint(0, vocab, {B, T}, gen, torch::kInt64);
}

using grape::testing::max_diff;

using grape::testing::expect_invalid;

std::vector<std::string> all_encodings() {
  std::vector<std::string> names;
  for (const auto& e : encodings()) names.push_back(e.name);
  return names;
}

// ---- the key cache's growth buffers ----------------------------------------------------------------------

// A chunk of n keys at position pos: k, v [1,n,2,4] and one per-key term "c" [1,n,2], distinct values.
PeTokens cache_chunk(int64_t pos, int64_t n, torch::Tensor& v) {
  PeTokens t;
  t.k = torch::arange(pos * 8, (pos + n) * 8, torch::kFloat32).reshape({1, n, 2, 4});
  t.key["c"] = torch::arange(pos * 2, (pos + n) * 2, torch::kFloat32).reshape({1, n, 2}) * -1;
  t.offset = pos;
  t.length = n;
  v = t.k * 0.5;
  return t;
}

// What the cache must hold after chunks [0, len) (the same values cache_chunk made).
void expect_cache_is(const KeyCache& c, int64_t len) {
  torch::Tensor v;
  const PeTokens all = cache_chunk(0, len, v);
  ASSERT_EQ(c.length, len);
  EXPECT_TRUE(torch::equal(c.k, all.k));
  EXPECT_TRUE(torch::equal(c.v, v));
  EXPECT_TRUE(torch::equal(c.key.at("c"), all.key.at("c")));
  EXPECT_TRUE(c.k.is_contiguous());  // B = 1: the view of the buffer reaches the fused kernel without a copy
}

TEST(KeyCache, DecodingAppendsIntoGrowthBuffersWithoutCopyingTheCache) {
  torch::NoGradGuard no_grad;
  torch::Tensor v;
  KeyCache c;
  auto first = cache_chunk(0, 5, v);
  c.append(first, v);
  std::vector<const void*> storages;
  for (int64_t pos = 5; pos < 300; ++pos) {
    auto t = cache_chunk(pos, 1, v);
    c.append(t, v);
    if (storages.empty() || storages.back() != c.k.data_ptr()) storages.push_back(c.k.data_ptr());
  }
  expect_cache_is(c, 300);
  // Doubling capacity: a handful of buffers for 295 appends (16, 32, ..., 512 slots), not one per step.
  EXPECT_LE(storages.size(), 7u);
  ASSERT_TRUE(c.buffers);
  EXPECT_EQ(c.buffers->used, 300);
}

TEST(KeyCache, CopiesThatAppendDifferentKeysDoNotOverwriteEachOther) {
  torch::NoGradGuard no_grad;
  torch::Tensor v;
  KeyCache a;
  for (int64_t pos = 0; pos < 6; ++pos) {
    auto t = cache_chunk(pos, 1, v);
    a.append(t, v);
  }
  KeyCache b = a;  // shares a's buffers
  ASSERT_EQ(a.buffers, b.buffers);
  auto ta = cache_chunk(6, 1, v);
  a.append(ta, v);
  // b appends different keys at the same position: it must move to buffers of its own.
  torch::Tensor vb;
  PeTokens tb = cache_chunk(6, 1, vb);
  tb.k = tb.k + 1000, tb.key["c"] = tb.key["c"] + 1000, vb = vb + 1000;
  b.append(tb, vb);
  EXPECT_NE(a.buffers, b.buffers);
  expect_cache_is(a, 7);  // a still holds its own key 6
  EXPECT_TRUE(torch::equal(b.k.narrow(1, 0, 6), a.k.narrow(1, 0, 6)));
  EXPECT_TRUE(torch::equal(b.k.narrow(1, 6, 1), tb.k));
  EXPECT_TRUE(torch::equal(b.v.narrow(1, 6, 1), vb));
  EXPECT_TRUE(torch::equal(b.key.at("c").narrow(1, 6, 1), tb.key.at("c")));
  for (int64_t pos = 7; pos < 40; ++pos) {  // both keep growing independently
    auto t = cache_chunk(pos, 1, v);
    a.append(t, v);
  }
  expect_cache_is(a, 40);
  EXPECT_EQ(b.length, 7);
  EXPECT_TRUE(torch::equal(b.k.narrow(1, 6, 1), tb.k));
}

TEST(KeyCache, AppendsThatNeedAutogradConcatenate) {
  torch::Tensor v;
  KeyCache c;
  auto first = cache_chunk(0, 3, v);
  c.append(first, v);
  auto t = cache_chunk(3, 2, v);
  t.k.requires_grad_(true);
  c.append(t, v);
  EXPECT_FALSE(c.buffers);
  ASSERT_TRUE(c.k.requires_grad());
  c.k.sum().backward();  // the gradient reaches the appended chunk
  ASSERT_TRUE(t.k.grad().defined());
  EXPECT_TRUE(torch::equal(t.k.grad(), torch::ones_like(t.k)));
  torch::NoGradGuard no_grad;
  expect_cache_is(c, 5);
}

// ---- streaming == full ---------------------------------------------------------------------------

// Prefill 5 tokens, then decode one token at a time to length 70; every logit must match forward().
TEST(ModelStreaming, DecodeOneByOneEqualsFullForwardForEveryEncoding) {
  const int64_t L = 70, prefill = 5;
  for (const auto& name : all_encodings()) {
    for (bool kv : {false, true}) {
      SCOPED_TRACE(name + (kv ? " +kv_shift" : ""));
      auto m = make_model(test_config(name, kv));
      torch::NoGradGuard no_grad;
      auto seq = random_tokens(1, L, 257, 11);
      auto full = m->forward(seq);
      ASSERT_EQ(full.sizes(), (torch::IntArrayRef{1, L, 257}));
      EXPECT_EQ(full.scalar_type(), torch::kFloat32);
      auto cache = m->new_cache();
      std::vector<SequenceCache*> caches{&cache};
      std::vector<torch::Tensor> outs{m->forward_cached(seq.narrow(1, 0, prefill), caches)};
      for (int64_t t = prefill; t < L; ++t) outs.push_back(m->forward_cached(seq.narrow(1, t, 1), caches));
      auto streamed = torch::cat(outs, 1);
      EXPECT_EQ(cache.length, L);
      EXPECT_EQ(cache.layers[0].keys.length, L);
      const double d = max_diff(streamed, full);
      std::printf("  streaming %-16s kv_shift=%d  max |diff| = %.3g  (max |logit| %.3g)\n", name.c_str(), kv,
                  d, full.abs().max().item<double>());
      EXPECT_LE(d, 1e-4);
    }
  }
}

// Three sequences of different lengths decode together: a batched 3-token prefill, per-row rest of the
// prompt (lengths 3, 9, 17), then 8 batched one-token steps. Each row must match the same sequence run
// alone (1e-5) and forward() on the whole sequence (1e-4).
void check_ragged_batch(const std::string& name, bool kv) {
  SCOPED_TRACE(name + (kv ? " +kv_shift" : ""));
  const std::vector<int64_t> lens{3, 9, 17};
  const int64_t steps = 8, first = 3;
  auto m = make_model(test_config(name, kv));
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> seqs;
  for (size_t b = 0; b < lens.size(); ++b) seqs.push_back(random_tokens(1, lens[b] + steps, 257, 100 + b));

  // Batched: row b continues its own cache.
  std::vector<SequenceCache> caches(3, m->new_cache());
  std::vector<SequenceCache*> all{&caches[0], &caches[1], &caches[2]};
  std::vector<std::vector<torch::Tensor>> batched(3);
  auto head =
      torch::cat({seqs[0].narrow(1, 0, first), seqs[1].narrow(1, 0, first), seqs[2].narrow(1, 0, first)});
  auto lp = m->forward_cached(head, all);
  for (int64_t b = 0; b < 3; ++b) batched[b].push_back(lp.narrow(0, b, 1));
  for (int64_t b = 0; b < 3; ++b) {
    if (lens[b] == first) continue;
    std::vector<SequenceCache*> one{&caches[b]};
    batched[b].push_back(m->forward_cached(seqs[b].narrow(1, first, lens[b] - first), one));
  }
  for (int64_t s = 0; s < steps; ++s) {
    auto next = torch::cat({seqs[0].narrow(1, lens[0] + s, 1), seqs[1].narrow(1, lens[1] + s, 1),
                            seqs[2].narrow(1, lens[2] + s, 1)});
    auto ls = m->forward_cached(next, all);
    ASSERT_EQ(ls.sizes(), (torch::IntArrayRef{3, 1, 257}));
    for (int64_t b = 0; b < 3; ++b) batched[b].push_back(ls.narrow(0, b, 1));
  }

  for (int64_t b = 0; b < 3; ++b) {
    auto got = torch::cat(batched[b], 1);
    EXPECT_EQ(caches[b].length, lens[b] + steps);
    // Alone: the same chunks with batch 1.
    auto cache = m->new_cache();
    std::vector<SequenceCache*> one{&cache};
    std::vector<torch::Tensor> alone;
    alone.push_back(m->forward_cached(seqs[b].narrow(1, 0, first), one));
    if (lens[b] > first) alone.push_back(m->forward_cached(seqs[b].narrow(1, first, lens[b] - first), one));
    for (int64_t s = 0; s < steps; ++s)
      alone.push_back(m->forward_cached(seqs[b].narrow(1, lens[b] + s, 1), one));
    EXPECT_LE(max_diff(got, torch::cat(alone, 1)), 1e-5) << "row " << b << " vs alone";
    EXPECT_LE(max_diff(got, m->forward(seqs[b])), 1e-4) << "row " << b << " vs forward()";
  }
}

TEST(ModelStreaming, RaggedBatchEqualsEachSequenceAloneForEveryEncoding) {
  for (const auto& name : all_encodings()) check_ragged_batch(name, false);
}

TEST(ModelStreaming, RaggedBatchWithKVShift) {
  for (const auto& name : {"rope", "fox", "grape-ap", "alibi", "grape-m-ctx", "learned"})
    check_ragged_batch(name, true);
}

// For a relative encoding, starting every layer's state at position 1000 must not change the logits. This
// also pins the order "QK-norm, then encode": with the norm gains perturbed per coordinate, normalising
// after the rotation would break the law.
TEST(ModelStreaming, RelativeEncodingsAreShiftInvariantInTheModel) {
  int64_t tested = 0;
  for (const auto& name : all_encodings()) {
    auto c = test_config(name);
    const auto props = make_encoding(name, c.head_shape())->properties();
    if (!props.relative || props.embeds) continue;
    SCOPED_TRACE(name);
    auto m = make_model(c);
    torch::NoGradGuard no_grad;
    auto seq = random_tokens(1, 20, 257, 21);
    auto cache = m->new_cache();
    auto encs = m->encodings();
    for (size_t l = 0; l < encs.size(); ++l) cache.layers[l].pe = encs[l]->initial_state(1, 1000);
    std::vector<SequenceCache*> one{&cache};
    EXPECT_LE(max_diff(m->forward_cached(seq, one), m->forward(seq)), 1e-4);
    ++tested;
  }
  EXPECT_GE(tested, 5);  // rope, grape-m, alibi, the grape-a family, ...
}

TEST(ModelStreaming, RefusesMismatchedCaches) {
  auto m = make_model(test_config("rope"));
  torch::NoGradGuard no_grad;
  auto cache = m->new_cache();
  std::vector<SequenceCache*> one{&cache};
  expect_invalid([&] { m->forward_cached(random_tokens(2, 3, 257, 1), one); }, {"2 rows", "1 caches"});
  SequenceCache empty;
  std::vector<SequenceCache*> bad{&empty};
  expect_invalid([&] { m->forward_cached(random_tokens(1, 3, 257, 1), bad); }, {"new_cache()"});
  EXPECT_EQ(empty.length, 0);
}

// ---- the math of one layer, composed by hand ------------------------------------------------------------

torch::Tensor rms(const torch::Tensor& x, const torch::Tensor& g) {
  return x / torch::sqrt(x.pow(2).mean(-1, true) + 1e-5) * g;
}

// A 1-layer model with KV-shift against docs/encodings.md ("KV-shift") and docs/training.md written out from
// its parameters: KV-shift on the raw k, v (gates from x̂), QK-norm, then the encoding (fed x̂), reference
// attention, W_o, SwiGLU, final norm, tied head. Pins the order of operations, which streaming == full cannot
// see.
TEST(ModelReference, OneLayerMatchesTheSpecComposedByHand) {
  for (const auto& name : {"rope", "grape-m-ctx", "fox", "grape-ap", "grape-a-qk", "sinusoidal", "learned"}) {
    SCOPED_TRACE(name);
    auto c = test_config(name, true);
    c.n_layer = 1;
    auto m = make_model(c);
    torch::NoGradGuard no_grad;
    auto P = m->named_parameters();
    const int64_t B = 2, T = 9, H = c.n_head, D = c.head_dim();
    auto tokens = random_tokens(B, T, 257, 31);
    auto h = P["wte.weight"].index({tokens});  // [B,T,C]
    if (auto e = m->embedding_encoding()) h = e->embed(h, 0);
    auto xh = rms(h, P["blocks.0.norm1.weight"]);
    auto q = torch::matmul(xh, P["blocks.0.wq.weight"].t()).view({B, T, H, D});
    auto k = torch::matmul(xh, P["blocks.0.wk.weight"].t()).view({B, T, H, D});
    auto v = torch::matmul(xh, P["blocks.0.wv.weight"].t()).view({B, T, H, D});
    auto shift = [&](const torch::Tensor& z, const torch::Tensor& w) {  // z_t = a z_{t-1} + (1-a) z_t
      auto a = torch::sigmoid(torch::matmul(xh, w.t())).unsqueeze(-1);
      auto prev = torch::cat({torch::zeros_like(z.narrow(1, 0, 1)), z.narrow(1, 0, T - 1)}, 1);
      return a * prev + (1 - a) * z;
    };
    k = shift(k, P["blocks.0.kv_shift.w_k"]);
    v = shift(v, P["blocks.0.kv_shift.w_v"]);
    q = rms(q, P["blocks.0.q_norm.weight"]);
    k = rms(k, P["blocks.0.k_norm.weight"]);
    auto enc = m->encodings()[0];
    auto st = enc->initial_state(B, 0);
    auto y = reference_attention(*enc, q, k, v, xh, st).reshape({B, T, H * D});
    h = h + torch::matmul(y, P["blocks.0.wo.weight"].t());
    auto hn = rms(h, P["blocks.0.norm2.weight"]);
    auto mlp = torch::silu(torch::matmul(hn, P["blocks.0.w1.weight"].t())) *
               torch::matmul(hn, P["blocks.0.w2.weight"].t());
    h = h + torch::matmul(mlp, P["blocks.0.w_out.weight"].t());
    auto logits = torch::matmul(rms(h, P["norm_f.weight"]), P["wte.weight"].t());
    EXPECT_LE(max_diff(m->forward(tokens), logits), 1e-5);
  }
}

// ---- causality, gradients, loss -----------------------------------------------------------------------

TEST(ModelCausality, FutureTokenDoesNotChangeEarlierLogits) {
  const int64_t T = 12, at = 7;
  for (const auto& name : all_encodings()) {
    for (bool kv : {false, true}) {
      SCOPED_TRACE(name + (kv ? " +kv_shift" : ""));
      auto m = make_model(test_config(name, kv));
      torch::NoGradGuard no_grad;
      auto a = random_tokens(2, T, 257, 5);
      auto b = a.clone();
      b.index_put_({torch::indexing::Slice(), at}, (a.index({torch::indexing::Slice(), at}) + 1) % 257);
      auto la = m->forward(a), lb = m->forward(b);
      EXPECT_LE(max_diff(la.narrow(1, 0, at), lb.narrow(1, 0, at)), 1e-6);
      EXPECT_GE(max_diff(la.narrow(1, at, T - at), lb.narrow(1, at, T - at)),
                1e-4);  // the test can see a change
    }
  }
}

// Every parameter (with KV-shift on, so its gates are included) gets a finite, non-zero gradient.
TEST(ModelGradients, EveryParameterGetsAFiniteNonZeroGradient) {
  for (const auto& name : all_encodings()) {
    SCOPED_TRACE(name);
    auto m = make_model(test_config(name, true));
    auto tokens = random_tokens(2, 10, 257, 3), targets = random_tokens(2, 10, 257, 4);
    auto loss = m->loss(tokens, targets);
    ASSERT_TRUE(std::isfinite(loss.item<double>()));
    loss.backward();
    int64_t checked = 0;
    for (const auto& item : m->named_parameters()) {
      const auto& g = item.value().grad();
      ASSERT_TRUE(g.defined()) << item.key() << " has no gradient";
      EXPECT_TRUE(torch::isfinite(g).all().item<bool>()) << item.key();
      EXPECT_GT(g.abs().max().item<double>(), 0.0) << item.key() << " has a zero gradient";
      ++checked;
    }
    EXPECT_GE(checked, 2 + 2 * 13);  // wte, norm_f; per layer 7 weights, 4 gains, 2 KV-shift gates
  }
}

TEST(ModelLoss, EqualsCrossEntropyOfLogitsAndMaskWeights) {
  auto m = make_model(test_config("rope"));
  torch::NoGradGuard no_grad;
  auto tokens = random_tokens(2, 6, 257, 8), targets = random_tokens(2, 6, 257, 9);
  auto logp = torch::log_softmax(m->forward(tokens), -1);
  auto ce = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1);  // [2,6]
  EXPECT_NEAR(m->loss(tokens, targets).item<double>(), ce.mean().item<double>(), 1e-6);
  // At init the logits are small, so the loss is close to log(V).
  EXPECT_NEAR(m->loss(tokens, targets).item<double>(), std::log(257.0), 0.1);
  auto mask = torch::zeros({2, 6});
  mask.index_put_({0, torch::indexing::Slice(0, 3)}, 1.0);
  mask.index_put_({1, 5}, 2.0);
  const double want = (ce[0].narrow(0, 0, 3).sum() + 2.0 * ce[1][5]).item<double>() / 5.0;
  EXPECT_NEAR(m->loss(tokens, targets, mask).item<double>(), want, 1e-6);
  expect_invalid([&] { m->loss(tokens, targets, torch::zeros({2, 6})); }, {"mask selects no targets"});
  expect_invalid([&] { m->loss(tokens, targets.narrow(1, 0, 5)); }, {"targets [2,5]", "[2,6]"});
}

// ---- structure, init, parameter count -----------------------------------------------------------------

TEST(ModelStructure, TokenChecks) {
  auto m = make_model(test_config("rope"));
  torch::NoGradGuard no_grad;
  auto t = random_tokens(1, 4, 257, 2);
  t[0][2] = 300;
  expect_invalid([&] { m->forward(t); }, {"id 300", "[0, 257)"});
  t[0][2] = -1;
  expect_invalid([&] { m->forward(t); }, {"id -1"});
  expect_invalid([&] { m->forward(torch::zeros({4}, torch::kInt64)); }, {"[B,T]", "[4]"});
  expect_invalid([&] { m->forward(torch::zeros({1, 4})); }, {"int64", "Float"});
  auto ok = random_tokens(1, 4, 257, 2);
  EXPECT_EQ(max_diff(m->forward(ok.to(torch::kInt32)), m->forward(ok)), 0.0);  // int32 accepted
}

TEST(ModelStructure, AbsoluteEncodingsEmbedOnceAndLayersHoldTheirOwnEncodings) {
  for (const auto& name : all_encodings()) {
    SCOPED_TRACE(name);
    auto m = make_model(test_config(name));
    auto encs = m->encodings();
    ASSERT_EQ(encs.size(), 2u);
    const bool embeds = make_encoding(name, test_config(name).head_shape())->properties().embeds;
    if (embeds) {
      ASSERT_TRUE(m->embedding_encoding());
      EXPECT_EQ(m->embedding_encoding()->name(), name);
      for (const auto& e : encs) EXPECT_EQ(e->name(), "nope");
    } else {
      EXPECT_FALSE(m->embedding_encoding());
      for (const auto& e : encs) EXPECT_EQ(e->name(), name);
      EXPECT_NE(encs[0].get(), encs[1].get());  // each layer owns its encoding
      for (const auto& p : encs[0]->named_parameters())
        EXPECT_TRUE(m->named_parameters().contains("blocks.0.pe." + p.key())) << p.key();
    }
  }
}

// Hand count: V*C + L*(4C^2 + 3*C*hidden + 2C + qk_norm*2D + kv_shift*2HC) + C + encoding parameters
// (once when the encoding embeds, once per layer otherwise). The tied head adds nothing.
int64_t hand_count(const ModelConfig& c) {
  const int64_t V = c.vocab_size, C = c.n_embd, L = c.n_layer, D = c.head_dim(), H = c.n_head;
  auto enc = make_encoding(c.pe, c.head_shape(), PeOptions(c.pe_options));
  int64_t e = 0;
  for (const auto& p : enc->parameters()) e += p.numel();
  const int64_t per_layer = 4 * C * C + 3 * C * c.hidden() + 2 * C + (c.qk_norm != "off" ? 2 * D : 0) +
                            (c.kv_shift ? 2 * H * C : 0);
  return V * C + L * per_layer + C + (enc->properties().embeds ? e : L * e);
}

TEST(ModelStructure, NumParametersMatchesHandCount) {
  auto tiny = model_preset("tiny");
  EXPECT_EQ(tiny.hidden(), 341);
  // 257*128 + 4*(4*128^2 + 3*128*341 + 2*128 + 2*32) + 128
  EXPECT_EQ(Transformer(tiny)->num_parameters(), 820224);
  EXPECT_EQ(hand_count(tiny), 820224);
  auto fox = tiny;
  fox.pe = "fox", fox.kv_shift = true, fox.qk_norm = "off";
  EXPECT_EQ(Transformer(fox)->num_parameters(), hand_count(fox));
  EXPECT_EQ(hand_count(fox), 820224 - 4 * 64 + 4 * (4 * 128 + 4) + 4 * 2 * 4 * 128);
  auto learned = tiny;
  learned.pe = "learned";
  EXPECT_EQ(Transformer(learned)->num_parameters(), 820224 + 1024 * 128);
  auto gm = test_config("grape-m-planes");
  EXPECT_EQ(Transformer(gm)->num_parameters(), hand_count(gm));
}

TEST(ModelStructure, InitFollowsTheSpec) {
  torch::manual_seed(1);
  auto c = model_preset("tiny");
  Transformer m(c);
  auto params = m->named_parameters();
  const double C = 128, L = 4;
  auto std_of = [&](const std::string& n) { return params[n].std().item<double>(); };
  EXPECT_NEAR(std_of("blocks.1.wo.weight"), 0.5 / std::sqrt(C) / std::sqrt(L),
              0.1 * 0.5 / std::sqrt(C) / std::sqrt(L));
  EXPECT_NEAR(std_of("blocks.2.w_out.weight"), 0.5 / std::sqrt(C) / std::sqrt(L),
              0.1 * 0.5 / std::sqrt(C) / std::sqrt(L));
  for (const char* n : {"blocks.0.wq.weight", "blocks.0.wk.weight", "blocks.3.wv.weight",
                        "blocks.0.w1.weight", "blocks.0.w2.weight"})
    EXPECT_NEAR(std_of(n), 0.5 / std::sqrt(C), 0.1 * 0.5 / std::sqrt(C)) << n;
  EXPECT_NEAR(std_of("wte.weight"), 0.02, 0.002);
  EXPECT_NEAR(params["blocks.0.wq.weight"].mean().item<double>(), 0.0, 0.002);
  for (const char* n : {"blocks.0.norm1.weight", "blocks.0.norm2.weight", "blocks.0.q_norm.weight",
                        "blocks.0.k_norm.weight", "norm_f.weight"})
    EXPECT_EQ(params[n].eq(1).all().item<bool>(), true) << n;
  EXPECT_EQ(params["blocks.0.q_norm.weight"].numel(), 32);  // one gain over D shared by the heads
  for (const auto& p : params) EXPECT_EQ(p.value().scalar_type(), torch::kFloat32) << p.key();
}

TEST(ModelStructure, EncodingParametersKeepTheirOwnInit) {
  torch::manual_seed(3);
  auto c = test_config("grape-m-ctx");
  Transformer m(c);
  auto ref = make_encoding("grape-m-ctx", c.head_shape());
  auto params = m->named_parameters();
  EXPECT_EQ(params["blocks.0.pe.w_omega"].abs().max().item<double>(), 0.0);  // zeros, not N(0, 0.5^2/C)
  EXPECT_EQ(max_diff(params["blocks.1.pe.lambda"], ref->named_parameters()["lambda"]), 0.0);
}

TEST(ModelStructure, RMSNormMatchesFormula) {
  RMSNorm n(8, 1e-5);
  {
    torch::NoGradGuard no_grad;
    n->weight.copy_(torch::arange(1, 9, torch::kFloat32));
  }
  auto x = torch::randn({3, 8}, torch::kFloat64);
  auto want = x / torch::sqrt(x.pow(2).mean(-1, true) + 1e-5) * torch::arange(1, 9, torch::kFloat64);
  auto y = n(x);
  EXPECT_EQ(y.scalar_type(), torch::kFloat64);
  EXPECT_LE(max_diff(y, want), 1e-6);
  auto yb = n(x.to(torch::kBFloat16));
  EXPECT_EQ(yb.scalar_type(), torch::kBFloat16);
  EXPECT_LE(max_diff(yb.to(torch::kFloat64), want), 0.05 * want.abs().max().item<double>());
}

// The fused kernel (block=fused) against the composed reference, forward and both gradients, on rows of an
// odd length across several OpenMP blocks; dw is the same bit for bit at 1 and 2 threads (resume repeats).
TEST(ModelStructure, FusedRMSNormEqualsTheReferenceForwardAndBackward) {
  torch::manual_seed(11);
  RMSNorm fused(37, 1e-5, true), ref(37, 1e-5, false);
  {
    torch::NoGradGuard no_grad;
    fused->weight.copy_(torch::randn({37}));
    ref->weight.copy_(fused->weight);
  }
  auto x = (torch::randn({8, 300, 37}) * 3).requires_grad_(true);  // 2 threads' worth of rows
  auto dy = torch::randn({8, 300, 37});
  auto run = [&](RMSNorm& n) {
    x.mutable_grad() = torch::Tensor();
    n->weight.mutable_grad() = torch::Tensor();
    auto y = n(x);
    (y * dy).sum().backward();
    return std::vector<torch::Tensor>{y.detach(), x.grad().clone(), n->weight.grad().clone()};
  };
  auto want = run(ref), got = run(fused);
  EXPECT_LE(max_diff(got[0], want[0]), 1e-6 * want[0].abs().max().item<double>()) << "y";
  EXPECT_LE(max_diff(got[1], want[1]), 1e-5 * want[1].abs().max().item<double>()) << "dx";
  EXPECT_LE(max_diff(got[2], want[2]), 1e-5 * want[2].abs().max().item<double>()) << "dw";
  const int threads = torch::get_num_threads();
  torch::set_num_threads(1);
  auto one = run(fused);
  torch::set_num_threads(2);
  auto two = run(fused);
  torch::set_num_threads(threads);
  EXPECT_TRUE(torch::equal(one[2], two[2])) << "dw depends on the thread count";
  // fp64 (and bf16) inputs take the reference.
  auto x64 = torch::randn({2, 37}, torch::kFloat64);
  EXPECT_EQ(fused(x64).scalar_type(), torch::kFloat64);
}

// SwiGLU's gate on the kernel (block=fused) against silu(a) * b, forward and both gradients, over several
// OpenMP blocks and with gates far in both tails (the exp's clamps).
TEST(ModelStructure, FusedSwiGLUEqualsTheReferenceForwardAndBackward) {
  torch::manual_seed(12);
  auto a = (torch::randn({6, 50, 341}) * 4), b = torch::randn({6, 50, 341});
  a.view({-1}).narrow(0, 0, 4).copy_(torch::tensor({-100.0f, -88.5f, 87.6f, 100.0f}));
  a.requires_grad_(true), b.requires_grad_(true);
  auto dout = torch::randn({6, 50, 341});
  auto run = [&](bool fused) {
    a.mutable_grad() = torch::Tensor();
    b.mutable_grad() = torch::Tensor();
    auto y = swiglu(a, b, fused);
    (y * dout).sum().backward();
    return std::vector<torch::Tensor>{y.detach(), a.grad().clone(), b.grad().clone()};
  };
  auto want = run(false), got = run(true);
  const char* names[] = {"out", "da", "db"};
  for (int i = 0; i < 3; ++i)
    EXPECT_LE(max_diff(got[i], want[i]), 1e-6 * want[i].abs().max().item<double>()) << names[i];
  EXPECT_EQ(swiglu(a.to(torch::kFloat64), b.to(torch::kFloat64), true).scalar_type(), torch::kFloat64);
}

// The whole block fused (block=fused: the norms and SwiGLU on their kernels, the MLP sublayer as one node
// whose products carry the residual, q, k, v as one node) against block=reference, same weights: logits and
// every parameter's gradient. TAPE reads the MLP's output alone, so its MLP keeps the per-op kernels.
TEST(ModelStructure, FusedBlockEqualsTheReferenceLogitsAndGradients) {
  for (const std::string pe : {"rope", "grape-ap", "tape"}) {
    SCOPED_TRACE(pe);
    auto run = [&](const std::string& block) {
      auto c = test_config(pe);
      c.block = block, c.n_embd = 48, c.mlp_hidden = 100;  // head_dim 12 and hidden 100: ragged vectors
      auto m = make_model(c);
      auto tokens = random_tokens(3, 20, 257, 5), targets = random_tokens(3, 20, 257, 6);
      auto logits = m->forward(tokens);
      auto loss = torch::nn::functional::cross_entropy(logits.reshape({-1, 257}), targets.reshape({-1}));
      loss.backward();
      std::vector<std::pair<std::string, torch::Tensor>> out{{"logits", logits.detach()}};
      for (const auto& item : m->named_parameters()) out.emplace_back(item.key(), item.value().grad());
      return out;
    };
    const auto want = run("reference"), got = run("fused");
    ASSERT_EQ(got.size(), want.size());
    for (size_t i = 0; i < got.size(); ++i) {
      ASSERT_EQ(got[i].first, want[i].first);
      ASSERT_TRUE(got[i].second.defined()) << got[i].first;
      EXPECT_LE(max_diff(got[i].second, want[i].second), 1e-5 * want[i].second.abs().max().item<double>())
          << got[i].first;
    }
  }
}

// ---- config ---------------------------------------------------------------------------------------

TEST(ModelConfig, PresetsHaveTheSpecSizes) {
  auto t = model_preset("tiny");
  EXPECT_EQ(t.preset, "tiny");
  EXPECT_EQ(t.n_layer, 4);
  EXPECT_EQ(t.n_head, 4);
  EXPECT_EQ(t.n_embd, 128);
  EXPECT_EQ(t.head_dim(), 32);
  EXPECT_EQ(t.context, 128);
  EXPECT_EQ(t.vocab_size, 257);
  auto s = model_preset("small");
  EXPECT_EQ(s.head_dim(), 64);
  EXPECT_EQ(s.n_layer, 6);
  EXPECT_EQ(s.context, 256);
  auto md = model_preset("medium");
  EXPECT_EQ(md.preset, "medium");
  EXPECT_EQ(md.n_layer, 24);
  EXPECT_EQ(md.head_dim(), 128);
  EXPECT_EQ(md.hidden(), 2730);
  EXPECT_EQ(md.vocab_size, 50304);
  EXPECT_EQ(md.context, 4096);
  auto lg = model_preset("large");
  EXPECT_EQ(lg.n_layer, 36);
  EXPECT_EQ(lg.n_head, 10);
  EXPECT_EQ(lg.head_dim(), 128);
  EXPECT_EQ(lg.hidden(), 3413);
  // The paper's sizes: medium ~353.5M and large ~772M parameters (tied embedding counted once).
  EXPECT_NEAR(double(hand_count(md)) / 1e6, 353.5, 0.5);
  EXPECT_NEAR(double(hand_count(lg)) / 1e6, 772.0, 1.0);
  for (const auto& n : model_preset_names()) EXPECT_NO_THROW(model_preset(n).validate()) << n;
  expect_invalid([] { model_preset("huge"); }, {"unknown model preset 'huge'", "tiny, small, medium, large"});
}

TEST(ModelConfig, JsonRoundTrip) {
  auto c = model_preset("small");
  c.pe = "grape-m";
  c.pe_options = {{"pairing", "interleaved"}, {"base", "500000"}};
  c.kv_shift = true;
  c.qk_norm = "after_rotation";
  c.norm_eps = 1e-6;
  c.embed_std = 0.03;
  c.mlp_hidden = 1000;
  auto text = c.to_json();
  auto d = ModelConfig::from_json(text);
  EXPECT_EQ(d.to_json(), text);
  EXPECT_EQ(d.preset, "small");
  EXPECT_EQ(d.pe_options, c.pe_options);
  EXPECT_EQ(d.kv_shift, true);
  EXPECT_EQ(d.qk_norm, "after_rotation");
  EXPECT_DOUBLE_EQ(d.norm_eps, 1e-6);
  EXPECT_DOUBLE_EQ(d.embed_std, 0.03);
  EXPECT_EQ(d.mlp_hidden, 1000);
  EXPECT_NE(text.find("\n  \"n_layer\": 6"), std::string::npos) << text;  // pretty-printed
}

TEST(ModelConfig, JsonErrors) {
  expect_invalid([] { ModelConfig::from_json(R"({"n_layer": 2, "n_lyer": 3})"); },
                 {"unknown field 'n_lyer'", "n_layer"});
  expect_invalid([] { ModelConfig::from_json(R"({"n_layer": "2"})"); }, {"'n_layer'", "integer", "string"});
  expect_invalid([] { ModelConfig::from_json(R"({"n_layer": 2.5})"); }, {"'n_layer'", "integer"});
  expect_invalid([] { ModelConfig::from_json(R"({"kv_shift": 1})"); }, {"'kv_shift'", "boolean"});
  expect_invalid([] { ModelConfig::from_json(R"({"pe_options": {"base": 5}})"); },
                 {"pe_options.base", "string"});
  expect_invalid([] { ModelConfig::from_json(R"({"pe": "ropee"})"); }, {"unknown encoding 'ropee'"});
  expect_invalid([] { ModelConfig::from_json("{not json"); }, {"cannot parse"});
  expect_invalid([] { ModelConfig::from_json("[1, 2]"); }, {"expected an object"});
}

TEST(ModelConfig, SetParsesEveryFieldAndNamesErrors) {
  ModelConfig c;
  c.set("preset", "small");
  EXPECT_EQ(c.n_embd, 384);
  c.set("vocab_size", "300");
  c.set("n_layer", "3");
  c.set("n_head", "8");
  c.set("n_embd", "256");
  c.set("mlp_hidden", "512");
  c.set("context", "64");
  c.set("pe", "fox");
  c.set("kv_shift", "true");
  c.set("qk_norm", "off");
  c.set("norm_eps", "1e-6");
  c.set("embed_std", "0.01");
  c.set("pe.base", "500");
  EXPECT_EQ(c.vocab_size, 300);
  EXPECT_EQ(c.n_layer, 3);
  EXPECT_EQ(c.n_head, 8);
  EXPECT_EQ(c.n_embd, 256);
  EXPECT_EQ(c.mlp_hidden, 512);
  EXPECT_EQ(c.context, 64);
  EXPECT_EQ(c.pe, "fox");
  EXPECT_TRUE(c.kv_shift);
  EXPECT_EQ(c.qk_norm, "off");
  EXPECT_DOUBLE_EQ(c.norm_eps, 1e-6);
  EXPECT_DOUBLE_EQ(c.embed_std, 0.01);
  EXPECT_EQ(c.pe_options.at("base"), "500");
  expect_invalid([&] { c.validate(); }, {"unknown parameter 'base'", "fox"});  // fox has no base option
  c.pe = "rope";
  EXPECT_NO_THROW(c.validate());

  expect_invalid([&] { c.set("n_layer", "six"); }, {"n_layer='six'", "integer"});
  expect_invalid([&] { c.set("n_layer", "6x"); }, {"n_layer='6x'"});
  expect_invalid([&] { c.set("norm_eps", "abc"); }, {"norm_eps='abc'", "number"});
  expect_invalid([&] { c.set("kv_shift", "maybe"); }, {"kv_shift='maybe'", "boolean"});
  expect_invalid([&] { c.set("pe", "ropee"); }, {"unknown encoding 'ropee'", "rope"});
  expect_invalid([&] { c.set("n_layers", "2"); },
                 {"model config: unknown setting 'n_layers'", "n_layer", "pe.OPTION"});
  expect_invalid([&] { c.set("preset", "huge"); }, {"unknown model preset 'huge'"});
}

TEST(ModelConfig, OneTableDrivesSetJsonAndTheHelp) {
  // Every field of the table is listed with the default of a default-constructed config, in a form that set()
  // takes back unchanged; options fields are listed as set() takes them (pe.OPTION).
  const ModelConfig defaults;
  std::vector<std::string> names;
  for (const auto& f : ModelConfig::fields()) {
    names.push_back(f.name);
    EXPECT_FALSE(f.help.empty()) << f.name;
    if (f.name == "pe.OPTION") continue;
    ModelConfig c;
    c.set(f.name, f.default_value);
    EXPECT_EQ(c.to_json(), defaults.to_json()) << f.name << "=" << f.default_value;
  }
  EXPECT_EQ(names.front(), "preset");
  EXPECT_NE(std::find(names.begin(), names.end(), "pe.OPTION"), names.end());
  EXPECT_EQ(names.size(), 15u);  // every member of ModelConfig
  EXPECT_TRUE(ModelConfig::has_key("n_layer"));
  EXPECT_TRUE(ModelConfig::has_key("pe.base"));
  EXPECT_FALSE(ModelConfig::has_key("pe."));
  EXPECT_FALSE(ModelConfig::has_key("pe_options"));  // options are set one at a time
  EXPECT_FALSE(ModelConfig::has_key("lr"));
  expect_invalid([] { ModelConfig().set("attention", "fast"); },
                 {"model config: attention='fast' is not one of fused|reference"});
}

TEST(ModelConfig, ConfigFileSectionsNameTheFileAndTheKey) {
  // Typed or text values; the preset is applied first whatever the order, options one by one.
  ModelConfig c;
  c.set_section(R"({"n_layer": 2, "preset": "small", "pe_options": {"base": 500}, "kv_shift": "true"})",
                "run.toml [model]");
  EXPECT_EQ(c.preset, "small");
  EXPECT_EQ(c.n_embd, 384);  // from the preset
  EXPECT_EQ(c.n_layer, 2);   // not undone by the preset
  EXPECT_EQ(c.pe_options.at("base"), "500");
  EXPECT_TRUE(c.kv_shift);
  expect_invalid([] { ModelConfig().set_section(R"({"n_layer": "abc"})", "run.toml [model]"); },
                 {"run.toml [model]: n_layer='abc' is not an integer"});
  expect_invalid([] { ModelConfig().set_section(R"({"n_layer": 2.5})", "run.toml [model]"); },
                 {"run.toml [model]: n_layer='2.5' is not an integer"});
  expect_invalid([] { ModelConfig().set_section(R"({"layers": 3})", "run.toml [model]"); },
                 {"run.toml [model]: unknown setting 'layers'", "n_layer", "pe_options"});
  expect_invalid([] { ModelConfig().set_section(R"({"pe": "ropee"})", "c.json [model]"); },
                 {"c.json [model]: pe: unknown encoding 'ropee'"});
  expect_invalid([] { ModelConfig().set_section(R"({"preset": "huge"})", "c.json [model]"); },
                 {"c.json [model]: preset: unknown model preset 'huge'"});
  expect_invalid([] { ModelConfig().set_section(R"({"pe_options": 3})", "c.json [model]"); },
                 {"c.json [model]: pe_options must be a table of options"});
}

TEST(ModelConfig, ValidateNamesTheField) {
  auto bad = [](const std::function<void(ModelConfig&)>& edit, std::vector<std::string> parts) {
    auto c = model_preset("tiny");
    edit(c);
    expect_invalid([&] { c.validate(); }, parts);
    expect_invalid([&] { Transformer m(c); }, parts);  // the model validates too
  };
  bad([](ModelConfig& c) { c.n_embd = 130; }, {"n_embd=130", "n_head=4"});
  bad([](ModelConfig& c) { c.n_layer = 0; }, {"model config: n_layer must be >= 1, got 0"});
  bad([](ModelConfig& c) { c.n_head = -1; }, {"n_head must be >= 1, got -1"});
  bad([](ModelConfig& c) { c.context = 0; }, {"context must be >= 1"});
  bad([](ModelConfig& c) { c.vocab_size = 1; }, {"vocab_size must be >= 2"});
  bad([](ModelConfig& c) { c.mlp_hidden = -5; }, {"mlp_hidden"});
  bad([](ModelConfig& c) { c.norm_eps = 0; }, {"norm_eps"});
  bad([](ModelConfig& c) { c.pe = "nothing"; }, {"unknown encoding 'nothing'"});
  bad([](ModelConfig& c) { c.pe_options["bogus"] = "1"; }, {"unknown parameter 'bogus'", "rope"});
  bad([](ModelConfig& c) { c.pe_options["base"] = "0.5"; }, {"base"});
  // C = 60, H = 4: D = 15 is odd, and a rotation pairs coordinates.
  bad([](ModelConfig& c) { c.n_embd = 60; }, {"head_dim must be even", "15"});
  auto ok = model_preset("tiny");
  ok.n_embd = 60;
  ok.pe = "alibi";  // no rotation: an odd head_dim is fine
  EXPECT_NO_THROW(ok.validate());
}

}  // namespace
}  // namespace grape
