// bf16 decode weights (grape/decode.hpp, DecodeWeights): the engine's bf16 rounding is LibTorch's, its logits
// equal an fp32 model whose matrices were rounded to bf16 and stay close to the fp32 model's, ragged batches
// equal each sequence alone, decode perplexity through the engine equals the model's, and bad requests (bf16
// on the reference path, unknown weight types) are clear errors, in the library and the CLI.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "cli_runner.hpp"
#include "expect_invalid.hpp"
#include "grape/decode.hpp"
#include "grape/train.hpp"
#include "kernels/cpu/linear_bf16.hpp"
#include "model_fixture.hpp"
#include "tensor_checks.hpp"

namespace grape {
namespace {

using grape::testing::expect_invalid;

// The decode tests' model (odd sizes reach the kernels' tails), its state-carrying parameters moved off init.
Transformer make_model(const std::string& pe) {
  return testing::perturbed_model(testing::decode_test_config(pe), 3, 0.3);
}

// The same model with the matrices the engine keeps in bf16 (the projections and the tied embedding/head)
// rounded to bf16 by LibTorch: what the bf16 engine computes, in fp32.
Transformer rounded_copy(const Transformer& m) {
  auto r = make_model(m->config().pe);
  torch::NoGradGuard no_grad;
  auto src = m->named_parameters();
  for (auto& p : r->named_parameters()) {
    const std::string& n = p.key();
    const bool matrix = n == "wte.weight" || n.ends_with(".wq.weight") || n.ends_with(".wk.weight") ||
                        n.ends_with(".wv.weight") || n.ends_with(".wo.weight") || n.ends_with(".w1.weight") ||
                        n.ends_with(".w2.weight") || n.ends_with(".w_out.weight");
    p.value().copy_(matrix ? src[n].to(torch::kBFloat16).to(torch::kFloat32) : src[n]);
  }
  return r;
}

torch::Tensor random_tokens(int64_t T, uint64_t seed) {
  auto gen = at::detail::createCPUGenerator(seed);
  return torch::randint(0, 61, {1, T}, gen, torch::kInt64);
}

using grape::testing::relative_gap;

// Prefill 6 tokens, then one-token steps to L: the logits of every position.
torch::Tensor decode_all(Decoder& dec, const torch::Tensor& seq) {
  auto cache = dec.new_cache();
  std::vector<DecodeCache*> caches{&cache};
  std::vector<torch::Tensor> outs{dec.forward(seq.narrow(1, 0, 6), caches)};
  for (int64_t t = 6; t < seq.size(1); ++t) outs.push_back(dec.forward(seq.narrow(1, t, 1), caches));
  return torch::cat(outs, 1);
}

TEST(Bf16Decode, RoundingIsLibTorchs) {
  // Random values, exact ties (a mantissa ending in 0x8000) and values near bf16's largest.
  auto x = torch::randn({4096}) * 100;
  auto bits = x.view(torch::kInt32);
  bits.narrow(0, 0, 1024).bitwise_and_(int32_t(0xFFFF0000)).bitwise_or_(int32_t(0x8000));
  x[1024] = 3.3895e38f, x[1025] = -3.3895e38f;
  std::vector<uint16_t> ours(size_t(x.numel()));
  kernels::cpu::round_to_bf16(x.data_ptr<float>(), x.numel(), ours.data());
  auto theirs = x.to(torch::kBFloat16).contiguous();
  const auto* t = reinterpret_cast<const uint16_t*>(theirs.data_ptr());
  for (int64_t i = 0; i < x.numel(); ++i) ASSERT_EQ(ours[size_t(i)], t[i]) << "x = " << x[i].item<float>();
}

// The bf16 engine computes the model with bf16 matrices: its products are fp32 sums of fp32 activations
// times the bf16 weights' exact values, so it equals the fp32 model with its matrices rounded to bf16 within
// the fp32 path's own 1e-4. Against the unrounded fp32 model: 3e-2 (measured below 1.1e-2 on these models),
// bf16's rounding (2^-9 relative per weight) carried through two layers.
TEST(Bf16Decode, EqualsTheRoundedModelAndIsCloseToFp32) {
  const int64_t L = 24;
  for (const std::string pe : {"rope", "alibi", "fox", "t5", "grape-ap"}) {
    SCOPED_TRACE(pe);
    auto m = make_model(pe);
    torch::NoGradGuard no_grad;
    auto seq = random_tokens(L, 7);
    Decoder dec(m, DecodePath::fast, DecodeWeights::bf16);
    ASSERT_EQ(dec.path(), DecodePath::fast);
    EXPECT_EQ(dec.weights(), DecodeWeights::bf16);
    EXPECT_EQ(dec.bf16_kernel(), kernels::cpu::to_string(kernels::cpu::bf16_kernel_best()));
    auto got = decode_all(dec, seq);
    const double to_rounded = relative_gap(got, rounded_copy(m)->forward(seq));
    const double to_fp32 = relative_gap(got, m->forward(seq));
    std::printf("  bf16 %-6s (%s kernel): relative gap to the rounded model %.2g, to fp32 %.2g\n", pe.c_str(),
                dec.bf16_kernel().c_str(), to_rounded, to_fp32);
    EXPECT_LE(to_rounded, 1e-4);
    EXPECT_LE(to_fp32, 3e-2);
    EXPECT_GT(to_fp32, 1e-6);  // the weights did change
  }
}

// 16 sequences with prompts of 1..31 tokens, each prefilled alone, then batched one-token steps: each row
// equals the sequence decoded alone on bf16 (1e-5, as fp32: the products of a row do not depend on the
// batch).
TEST(Bf16Decode, RaggedBatchEqualsEachSequenceAlone) {
  const int64_t B = 16, steps = 4;
  auto m = make_model("rope");
  torch::NoGradGuard no_grad;
  Decoder dec(m, DecodePath::fast, DecodeWeights::bf16);
  std::vector<torch::Tensor> seqs;
  std::vector<DecodeCache> caches;
  std::vector<DecodeCache*> all;
  for (int64_t b = 0; b < B; ++b) {
    seqs.push_back(random_tokens(1 + 2 * b + steps, 40 + uint64_t(b)));
    caches.push_back(dec.new_cache());
  }
  for (int64_t b = 0; b < B; ++b) {
    all.push_back(&caches[size_t(b)]);
    std::vector<DecodeCache*> one{&caches[size_t(b)]};
    dec.forward(seqs[size_t(b)].narrow(1, 0, 1 + 2 * b), one);
  }
  std::vector<torch::Tensor> batched;
  for (int64_t s = 0; s < steps; ++s) {
    std::vector<torch::Tensor> next;
    for (int64_t b = 0; b < B; ++b) next.push_back(seqs[size_t(b)].narrow(1, 1 + 2 * b + s, 1));
    batched.push_back(dec.forward(torch::cat(next), all));
  }
  auto got = torch::cat(batched, 1);
  EXPECT_EQ(dec.panel_bytes(), 0) << "a bf16 batch reads the bf16 rows, never an fp32 panel copy";
  for (int64_t b = 0; b < B; ++b) {
    auto cache = dec.new_cache();
    std::vector<DecodeCache*> one{&cache};
    dec.forward(seqs[size_t(b)].narrow(1, 0, 1 + 2 * b), one);
    std::vector<torch::Tensor> alone;
    for (int64_t s = 0; s < steps; ++s)
      alone.push_back(dec.forward(seqs[size_t(b)].narrow(1, 1 + 2 * b + s, 1), one));
    EXPECT_LE((torch::cat(alone, 1) - got.narrow(0, b, 1)).abs().max().item<double>(), 1e-5) << "row " << b;
  }
}

TEST(Bf16Decode, BadRequestsAreClearErrors) {
  auto m = make_model("rope");
  expect_invalid([&] { Decoder d(m, DecodePath::reference, DecodeWeights::bf16); },
                 {"bf16", "fast decode path", "not the reference"});
  expect_invalid([] { Decoder d(make_model("grape-m-ctx"), DecodePath::fast, DecodeWeights::bf16); },
                 {"bf16", "cannot run this model", "grape-m-ctx", "contextual"});
  EXPECT_EQ(parse_decode_weights("bf16"), DecodeWeights::bf16);
  EXPECT_EQ(parse_decode_weights("fp32"), DecodeWeights::fp32);
  expect_invalid([] { parse_decode_weights("fp16", "--decode-weights"); },
                 {"--decode-weights", "'fp16'", "fp32 or bf16"});
  Decoder fp32(m);
  EXPECT_EQ(fp32.weights(), DecodeWeights::fp32);
  EXPECT_EQ(fp32.bf16_kernel(), "");
}

// A run trained by `grape train`: `grape eval --decode-weights both` gives the decode engine's perplexity per
// weight type (fp32 equal to the model's own at 1x, bf16 close), in the table and the JSON; chunked
// teacher forcing equals one call per window; generate and bench refuse bf16 on the reference path.
TEST(Bf16Decode, CliEvalGenerateAndBench) {
  const auto dir = std::filesystem::temp_directory_path() / "grape_test_bf16_decode";
  const std::string run = testing::train_tiny_rope_run(dir);
  const std::string json = (dir / "eval.json").string();
  auto e = testing::run_cli("eval --run " + run +
                            " --factors 1 --tokens 128 --examples 0 --decode-weights both --json " + json);
  ASSERT_EQ(e.code, 0) << e.output;
  EXPECT_NE(e.output.find("through the decode engine at context 16"), std::string::npos) << e.output;
  EXPECT_NE(e.output.find("bf16 / fp32 perplexity"), std::string::npos) << e.output;
  auto j = nlohmann::json::parse(io::read_file(json));
  ASSERT_EQ(j["decode"]["rows"].size(), 2u);
  const double model_ppl = j["lengths"][0]["perplexity"].get<double>();
  const double fp32 = j["decode"]["rows"][0]["perplexity"].get<double>();
  const double bf16 = j["decode"]["rows"][1]["perplexity"].get<double>();
  EXPECT_EQ(j["decode"]["rows"][1]["weights"], "bf16");
  EXPECT_NEAR(fp32 / model_ppl, 1.0, 1e-5);
  EXPECT_NEAR(bf16 / fp32, 1.0, 1e-2);
  EXPECT_NEAR(j["decode"]["bf16_over_fp32"].get<double>(), bf16 / fp32, 1e-12);
  // Token by token: the same perplexity as one call per window.
  auto e1 =
      testing::run_cli("eval --run " + run + " --factors 1 --tokens 128 --examples 0 --decode-weights bf16 " +
                       "--decode-chunk 1 --json " + json);
  ASSERT_EQ(e1.code, 0) << e1.output;
  auto j1 = nlohmann::json::parse(io::read_file(json));
  EXPECT_NEAR(j1["decode"]["rows"][0]["perplexity"].get<double>() / bf16, 1.0, 1e-5);
  auto g = testing::run_cli("generate --run " + run +
                            " --prompt the --max-tokens 5 --temperature 0 --decode-weights bf16");
  EXPECT_EQ(g.code, 0) << g.output;
  EXPECT_NE(g.output.find("weights bf16"), std::string::npos) << g.output;
  auto bad = testing::run_cli("generate --run " + run + " --decode reference --decode-weights bf16");
  EXPECT_NE(bad.code, 0);
  EXPECT_NE(bad.output.find("--decode-weights bf16 needs --decode fast"), std::string::npos) << bad.output;
  auto unknown = testing::run_cli("generate --run " + run + " --decode-weights fp16");
  EXPECT_NE(unknown.code, 0);
  EXPECT_NE(unknown.output.find("--decode-weights: 'fp16' is not a weight type"), std::string::npos)
      << unknown.output;
  auto bench = testing::run_cli("bench decode --preset tiny --tokens 2 --decode reference --weights bf16");
  EXPECT_NE(bench.code, 0);
  EXPECT_NE(bench.output.find("--weights bf16 needs the fast decode path"), std::string::npos)
      << bench.output;
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace grape
