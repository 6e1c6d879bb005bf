// The decode paths (grape/decode.hpp): the LibTorch-free engine equals the full forward for every encoding it
// claims, ragged batches equal each sequence alone, every other encoding and option falls back to the
// reference path (and says why), and bad inputs are clear errors.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include "expect_invalid.hpp"
#include "grape/decode.hpp"
#include "kernels/cpu/decoder.hpp"
#include "model_fixture.hpp"
#include "tensor_checks.hpp"

namespace grape {
namespace {

using grape::testing::expect_invalid;

ModelConfig config(const std::string& pe, std::map<std::string, std::string> opts = {},
                   const std::string& qk_norm = "before_rotation") {
  return testing::decode_test_config(pe, std::move(opts), qk_norm);
}

torch::Tensor random_tokens(int64_t T, int64_t vocab, uint64_t seed) {
  auto gen = at::detail::createCPUGenerator(seed);
  return torch::randint(0, vocab, {1, T}, gen, torch::kInt64);
}

// max |a - b| / max |b|
using grape::testing::relative_gap;

struct Case {
  std::string pe;
  std::map<std::string, std::string> opts;
};

// Every encoding (and option) the engine claims.
std::vector<Case> native_cases() {
  return {{"nope", {}},
          {"rope", {}},
          {"rope", {{"pairing", "interleaved"}, {"orientation", "grape"}, {"fraction", "0.5"}}},
          {"rope", {{"extend", "yarn"}, {"factor", "4"}, {"original_context", "8"}}},
          {"pi", {}},
          {"grape-m", {{"per_head", "true"}}},
          {"alibi", {}},
          {"fox", {}},
          {"grape-ap", {}},
          {"grape-ap", {{"probe_dim", "4"}, {"orientation", "grape"}}},
          {"t5", {{"num_buckets", "8"}, {"max_distance", "12"}}},
          {"kerple", {}},
          {"kerple", {{"variant", "power"}}},
          {"sandwich", {}}};
}

// Prefill `prefill` tokens, then T = 1 steps to L: every logit equals forward() on the whole sequence.
TEST(FastDecode, EqualsFullForwardForEveryClaimedEncoding) {
  const int64_t L = 40;
  for (const auto& cs : native_cases())
    for (std::string qk_norm : {"before_rotation", "after_rotation", "off"})
      for (int64_t prefill : {1, 6, 17}) {
        SCOPED_TRACE(cs.pe + " qk_norm=" + qk_norm + " prefill=" + std::to_string(prefill));
        const auto c = config(cs.pe, cs.opts, qk_norm);
        // Some encodings refuse after_rotation (YaRN's temperature scales q and k; tested in
        // test_conventions).
        if (qk_norm == "after_rotation" && [&] {
              try {
                c.validate();
                return false;
              } catch (const std::invalid_argument&) {
                return true;
              }
            }())
          continue;
        auto m = testing::perturbed_model(c);
        torch::NoGradGuard no_grad;
        auto seq = random_tokens(L, 61, 5 + uint64_t(prefill));
        auto full = m->forward(seq);
        Decoder dec(m);
        ASSERT_EQ(dec.path(), DecodePath::fast) << dec.fallback_reason();
        EXPECT_EQ(dec.fallback_reason(), "");
        auto cache = dec.new_cache();
        std::vector<DecodeCache*> caches{&cache};
        std::vector<torch::Tensor> outs{dec.forward(seq.narrow(1, 0, prefill), caches)};
        for (int64_t t = prefill; t < L; ++t) outs.push_back(dec.forward(seq.narrow(1, t, 1), caches));
        auto got = torch::cat(outs, 1);
        EXPECT_EQ(cache.length, L);
        ASSERT_EQ(got.sizes(), full.sizes());
        const double gap = relative_gap(got, full);
        if (prefill == 6)
          std::printf("  fast %-9s qk_norm=%-15s  relative gap %.2g\n", cs.pe.c_str(), qk_norm.c_str(), gap);
        EXPECT_LE(gap, 1e-4);
      }
}

// Whatever path each registered encoding takes (with its default options), decoding equals the full forward;
// the ones this build runs natively are listed.
TEST(FastDecode, EveryRegisteredEncodingDecodesExactlyOnItsPath) {
  const int64_t L = 12;
  std::string native;
  for (const auto& info : encodings()) {
    SCOPED_TRACE(info.name);
    auto m = testing::perturbed_model(config(info.name));
    torch::NoGradGuard no_grad;
    auto seq = random_tokens(L, 61, 21);
    Decoder dec(m);
    if (dec.path() == DecodePath::fast) native += " " + info.name;
    auto cache = dec.new_cache();
    std::vector<DecodeCache*> caches{&cache};
    std::vector<torch::Tensor> outs{dec.forward(seq.narrow(1, 0, 4), caches)};
    for (int64_t t = 4; t < L; ++t) outs.push_back(dec.forward(seq.narrow(1, t, 1), caches));
    EXPECT_LE(relative_gap(torch::cat(outs, 1), m->forward(seq)), 1e-4) << to_string(dec.path());
  }
  std::printf("  fast path:%s\n", native.c_str());
  EXPECT_NE(native.find(" rope"), std::string::npos);
}

// A cache that outgrows its buffers and the tables (256 positions) keeps its keys.
TEST(FastDecode, GrowsPastItsFirstBuffers) {
  const int64_t L = 300;
  for (const Case& cs :
       {Case{"t5", {{"num_buckets", "8"}, {"max_distance", "12"}}}, Case{"fox", {}}, Case{"grape-ap", {}}}) {
    SCOPED_TRACE(cs.pe);  // fox's per-key terms and grape-ap's key probes move with the keys
    auto m = testing::perturbed_model(config(cs.pe, cs.opts));
    torch::NoGradGuard no_grad;
    auto seq = random_tokens(L, 61, 9);
    auto full = m->forward(seq);
    Decoder dec(m);
    ASSERT_EQ(dec.path(), DecodePath::fast) << dec.fallback_reason();
    auto cache = dec.new_cache();
    std::vector<DecodeCache*> caches{&cache};
    std::vector<torch::Tensor> outs{dec.forward(seq.narrow(1, 0, 60), caches)};
    for (int64_t t = 60; t < L; ++t) outs.push_back(dec.forward(seq.narrow(1, t, 1), caches));
    EXPECT_LE(relative_gap(torch::cat(outs, 1), full), 1e-4);
    EXPECT_GE(cache.capacity, L);
  }
}

// 16 sequences with prompts of 1..31 tokens, each prefilled alone, then 6 batched one-token steps: every
// row equals the same sequence decoded alone (1e-5), and the fast batch equals the reference batch.
TEST(FastDecode, RaggedBatchEqualsEachSequenceAlone) {
  const int64_t B = 16, steps = 6;
  for (const std::string pe : {"rope", "alibi", "fox", "grape-ap"}) {
    SCOPED_TRACE(pe);
    auto m = testing::perturbed_model(config(pe));
    torch::NoGradGuard no_grad;
    Decoder dec(m), ref(m, DecodePath::reference);
    ASSERT_EQ(dec.path(), DecodePath::fast);
    std::vector<torch::Tensor> seqs;
    std::vector<DecodeCache> caches, ref_caches;
    for (int64_t b = 0; b < B; ++b) {
      seqs.push_back(random_tokens(1 + 2 * b + steps, 61, 40 + uint64_t(b)));
      caches.push_back(dec.new_cache());
      ref_caches.push_back(ref.new_cache());
    }
    std::vector<DecodeCache*> all, ref_all;
    for (int64_t b = 0; b < B; ++b) {
      all.push_back(&caches[b]), ref_all.push_back(&ref_caches[b]);
      std::vector<DecodeCache*> one{&caches[b]}, ref_one{&ref_caches[b]};
      dec.forward(seqs[b].narrow(1, 0, 1 + 2 * b), one);
      ref.forward(seqs[b].narrow(1, 0, 1 + 2 * b), ref_one);
    }
    // One sequence at a time (prefills of 1..31 rows) packs the panels only where they serve batch 1 too.
    EXPECT_EQ(dec.panel_bytes() > 0, kernels::cpu::makes_panels(1, 1));
    std::vector<torch::Tensor> batched, ref_batched;
    for (int64_t s = 0; s < steps; ++s) {
      std::vector<torch::Tensor> next;
      for (int64_t b = 0; b < B; ++b) next.push_back(seqs[b].narrow(1, 1 + 2 * b + s, 1));
      batched.push_back(dec.forward(torch::cat(next), all));
      ref_batched.push_back(ref.forward(torch::cat(next), ref_all));
    }
    auto got = torch::cat(batched, 1), got_ref = torch::cat(ref_batched, 1);  // [B, steps, V]
    EXPECT_LE(relative_gap(got, got_ref), 1e-4);
    // The batch of 16 made the panel copy: every matrix [N, K] with N padded to whole panels, in fp32.
    const auto& c = m->config();
    const int64_t C = c.n_embd, F = c.hidden(), P = kernels::cpu::panel_rows();
    auto padded = [P](int64_t n) { return (n + P - 1) / P * P; };
    const int64_t floats =
        c.n_layer * (4 * padded(C) * C + 2 * padded(F) * C + padded(C) * F) + padded(c.vocab_size) * C;
    EXPECT_EQ(dec.panel_bytes(), 4 * floats);
    for (int64_t b = 0; b < B; ++b) {
      auto cache = dec.new_cache();
      std::vector<DecodeCache*> one{&cache};
      dec.forward(seqs[b].narrow(1, 0, 1 + 2 * b), one);
      std::vector<torch::Tensor> alone;
      for (int64_t s = 0; s < steps; ++s)
        alone.push_back(dec.forward(seqs[b].narrow(1, 1 + 2 * b + s, 1), one));
      EXPECT_LE((torch::cat(alone, 1) - got.narrow(0, b, 1)).abs().max().item<double>(), 1e-5) << "row " << b;
      if (kernels::cpu::panel_min_rows() == 1)  // every pass on the panels: the same sums, to the bit
        EXPECT_TRUE(torch::equal(torch::cat(alone, 1), got.narrow(0, b, 1))) << "row " << b;
    }
  }
}

// The profile splits the profiled passes' time into products, attention and the rest: each part positive,
// together within the passes' wall time; profiling changes no logit; the reference path has none.
TEST(FastDecode, ProfileSplitsThePassesTimeByPhase) {
  auto m = testing::perturbed_model(config("fox"));
  torch::NoGradGuard no_grad;
  Decoder dec(m), plain(m), ref(m, DecodePath::reference);
  std::vector<DecodeCache> caches, plain_caches;
  std::vector<DecodeCache*> all, plain_all;
  for (int64_t b = 0; b < 4; ++b)
    caches.push_back(dec.new_cache()), plain_caches.push_back(plain.new_cache());
  for (int64_t b = 0; b < 4; ++b) all.push_back(&caches[b]), plain_all.push_back(&plain_caches[b]);
  auto prompt = random_tokens(4 * 5, 61, 7).view({4, 5});
  dec.forward(prompt, all), plain.forward(prompt, plain_all);
  EXPECT_EQ(dec.profile().passes, 0) << "off by default";
  dec.set_profiling(true);
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<torch::Tensor> got, want;
  for (int64_t s = 0; s < 3; ++s) {
    auto next = random_tokens(4, 61, 20 + uint64_t(s)).view({4, 1});
    got.push_back(dec.forward(next, all));
    want.push_back(plain.forward(next, plain_all));
  }
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  dec.set_profiling(false);
  const auto p = dec.profile();
  EXPECT_EQ(p.passes, 3);
  EXPECT_GT(p.products_s, 0.0);
  EXPECT_GT(p.attention_s, 0.0);
  EXPECT_GT(p.other_s, 0.0);
  EXPECT_LE(p.products_s + p.attention_s + p.other_s, wall);  // the plain passes are in `wall` too
  EXPECT_TRUE(torch::equal(torch::cat(got, 1), torch::cat(want, 1)));
  dec.forward(random_tokens(4, 61, 30).view({4, 1}), all);
  EXPECT_EQ(dec.profile().passes, 3) << "set_profiling(false) stops adding and keeps the figures";
  ref.set_profiling(true);
  auto ref_cache = ref.new_cache();
  std::vector<DecodeCache*> one{&ref_cache};
  ref.forward(random_tokens(3, 61, 8), one);
  EXPECT_EQ(ref.profile().passes, 0);
  EXPECT_EQ(ref.profile().products_s, 0.0);
}

// prepare_batch makes the panel copy that the first batched pass would make (for 8+ rows, or any where the
// panels serve every pass; nothing with bf16 weights or on the reference path); that pass then finds it made.
TEST(FastDecode, PrepareBatchMakesThePanelsAheadOfTheFirstBatchedPass) {
  auto m = testing::perturbed_model(config("rope"));
  torch::NoGradGuard no_grad;
  Decoder dec(m);
  dec.prepare_batch(4);  // 4 rows multiply the row-major weights, unless the panels serve every pass
  EXPECT_EQ(dec.panel_bytes() > 0, kernels::cpu::panel_min_rows() <= 4);
  dec.prepare_batch(16);
  const int64_t bytes = dec.panel_bytes();
  EXPECT_GT(bytes, 0);
  std::vector<DecodeCache> caches;
  std::vector<DecodeCache*> all;
  for (int64_t b = 0; b < 16; ++b) caches.push_back(dec.new_cache());
  for (auto& c : caches) all.push_back(&c);
  dec.forward(random_tokens(16, 61, 3).view({16, 1}), all);
  EXPECT_EQ(dec.panel_bytes(), bytes);
  Decoder bf16(m, DecodePath::fast, DecodeWeights::bf16), ref(m, DecodePath::reference);
  bf16.prepare_batch(16), ref.prepare_batch(16);
  EXPECT_EQ(bf16.panel_bytes(), 0);
  EXPECT_EQ(ref.panel_bytes(), 0);
}

// What the engine cannot do exactly runs on the reference path, which says why, and still decodes.
TEST(FastDecode, FallsBackAndSaysWhy) {
  struct Fallback {
    Case cs;
    bool kv_shift;
    std::string why;
  };
  const std::vector<Fallback> all = {
      {{"grape-m-ctx", {}}, false, "contextual"},
      {{"grape-a-qk", {}}, false, "no positional form"},
      {{"grape-m-planes", {}}, false, "no positional form"},
      {{"xpos", {}}, false, "no positional form"},
      {{"fire", {}}, false, "no positional form"},
      {{"cope", {}}, false, "no positional form"},
      {{"grape-m-mix", {}}, false, "no positional form"},
      {{"hdd-rope", {}}, false, "contextual"},
      {{"tape", {}}, false, "stream"},
      {{"rope", {{"extend", "dynamic-ntk"}, {"factor", "2"}, {"original_context", "8"}}},
       false,
       "no positional form"},
      {{"sinusoidal", {}}, false, "adds to the token embeddings"},
      {{"rope", {}}, true, "kv_shift"},
  };
  for (const auto& f : all) {
    SCOPED_TRACE(f.cs.pe);
    auto c = config(f.cs.pe, f.cs.opts);
    c.kv_shift = f.kv_shift;
    auto m = testing::perturbed_model(c);
    const auto reason = fast_decode_unsupported(m);
    Decoder dec(m);
    EXPECT_EQ(dec.path(), DecodePath::reference);
    EXPECT_EQ(dec.fallback_reason(), reason);
    EXPECT_NE(reason.find(f.why), std::string::npos) << reason;
  }
  // The fallback still decodes exactly.
  auto m = testing::perturbed_model(config("grape-m-ctx"));
  torch::NoGradGuard no_grad;
  auto seq = random_tokens(12, 61, 2);
  Decoder dec(m);
  ASSERT_EQ(dec.path(), DecodePath::reference);
  auto cache = dec.new_cache();
  std::vector<DecodeCache*> caches{&cache};
  auto got =
      torch::cat({dec.forward(seq.narrow(1, 0, 5), caches), dec.forward(seq.narrow(1, 5, 7), caches)}, 1);
  EXPECT_LE(relative_gap(got, m->forward(seq)), 1e-4);
  // Asked for the reference path, it takes it without a reason.
  Decoder forced(testing::perturbed_model(config("rope")), DecodePath::reference);
  EXPECT_EQ(forced.path(), DecodePath::reference);
  EXPECT_EQ(forced.fallback_reason(), "");
  EXPECT_EQ(parse_decode_path("fast"), DecodePath::fast);
  expect_invalid([] { parse_decode_path("quick", "--decode"); }, {"--decode", "quick", "fast or reference"});
  auto m64 = testing::perturbed_model(config("rope"));
  m64->to(torch::kFloat64);
  EXPECT_NE(fast_decode_unsupported(m64).find("not float32"), std::string::npos);
}

// Room made up front (new_cache(positions)) changes no logit: the same bits as a cache that grew by doubling,
// with the gate's and probes' per-key terms, and the cache still grows past the room it was given.
TEST(FastDecode, CacheMadeWithRoomEqualsOneThatGrew) {
  for (const std::string pe : {"rope", "fox", "grape-ap"}) {
    SCOPED_TRACE(pe);
    auto m = testing::perturbed_model(config(pe));
    torch::NoGradGuard no_grad;
    Decoder dec(m);
    ASSERT_EQ(dec.path(), DecodePath::fast);
    auto seq = random_tokens(100, 61, 9);
    auto decode = [&](DecodeCache& cache) {  // a prefill of 5, then one token at a time
      std::vector<DecodeCache*> one{&cache};
      std::vector<torch::Tensor> parts{dec.forward(seq.narrow(1, 0, 5), one)};
      for (int64_t t = 5; t < 100; ++t) parts.push_back(dec.forward(seq.narrow(1, t, 1), one));
      return torch::cat(parts, 1);
    };
    auto grown = dec.new_cache();
    EXPECT_EQ(grown.capacity, 0);
    const auto expected = decode(grown);
    EXPECT_LE(relative_gap(expected, m->forward(seq)), 1e-4);
    // Room for 3: grown to 64 by the prefill (the smallest doubling), then 128; 70: doubled once; 100:
    // enough.
    for (auto [room, last] : {std::pair<int64_t, int64_t>{3, 128}, {70, 140}, {100, 100}}) {
      auto cache = dec.new_cache(room);
      EXPECT_EQ(cache.capacity, room);
      EXPECT_TRUE(torch::equal(decode(cache), expected)) << "room " << room;
      EXPECT_EQ(cache.length, 100);
      EXPECT_EQ(cache.capacity, last);
    }
    expect_invalid([&] { dec.new_cache(-1); }, {"positions >= 0", "-1"});
  }
}

TEST(FastDecode, BadInputsAreClearErrors) {
  for (auto path : {DecodePath::fast, DecodePath::reference}) {
    SCOPED_TRACE(to_string(path));
    auto m = testing::perturbed_model(config("rope"));
    Decoder dec(m, path), other(testing::perturbed_model(config("rope")), path);
    auto mine = dec.new_cache(), theirs = other.new_cache();
    std::vector<DecodeCache*> foreign{&theirs}, one{&mine};
    auto ids = torch::tensor({{1, 2}}, torch::kInt64);
    expect_invalid([&] { dec.forward(ids, foreign); }, {"cache", "did not make"});
    expect_invalid(
        [&] {
          dec.forward(torch::tensor({{1, 61}}, torch::kInt64), one);
        },
        {"id 61", "outside the vocabulary [0, 61)"});
    expect_invalid([&] { dec.forward(torch::tensor({{-1}}, torch::kInt64), one); }, {"id -1"});
    std::vector<DecodeCache*> two{&mine, &mine};
    expect_invalid([&] { dec.forward(ids, two); }, {"2 caches for a batch of 1"});
    expect_invalid([&] { dec.forward(torch::ones({1, 2}), one); }, {"int64"});
    EXPECT_EQ(mine.length, 0);  // nothing was consumed
    dec.forward(ids, one);
    EXPECT_EQ(mine.length, 2);
  }
}

}  // namespace
}  // namespace grape
