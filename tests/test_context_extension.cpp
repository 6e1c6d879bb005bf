// Context extension of RoPE-family spectra (invariants E-1..E-5 of docs/encodings.md): PI, NTK-aware,
// dynamic NTK (exact decoding across the training context), YaRN and LongRoPE, on rope's fixed spectrum
// and grape-m's learned one; bad options; and `grape eval --extend` on a tiny trained run.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>
#include <numbers>
#include <string>
#include <vector>

#include "cli_runner.hpp"
#include "expect_invalid.hpp"
#include "grape/io.hpp"
#include "grape/model.hpp"
#include "grape/pe.hpp"
#include "grape/train.hpp"
#include "tensor_checks.hpp"

namespace grape {
namespace {

namespace fs = std::filesystem;
using grape::testing::f64;

// D = 64 (32 frequencies): wide enough that YaRN's ramp has pairs on both sides and in between.
const HeadShape kShape{2, 64, 32};

EncodingPtr make(const std::string& name, const PeOptions& o = {}, torch::ScalarType dt = f64) {
  auto e = make_encoding(name, kShape, o);
  e->to(dt);
  return e;
}

torch::Tensor randn(std::vector<int64_t> shape, uint64_t seed, torch::ScalarType dt = f64) {
  auto gen = at::detail::createCPUGenerator(seed);
  return torch::randn(shape, gen, torch::TensorOptions().dtype(f64)).to(dt);
}

// Encoded queries of q [B,T,H,D] at positions offset.. (q is used as k too).
torch::Tensor encode_q(Encoding& e, const torch::Tensor& q, int64_t offset) {
  auto st = e.initial_state(q.size(0), offset);
  return e.encode(q, q, torch::Tensor(), st).q;
}

// Causal logits of one chunk of T tokens from position offset.
torch::Tensor logits(Encoding& e, const torch::Tensor& q, const torch::Tensor& k, int64_t offset = 0) {
  auto st = e.initial_state(q.size(0), offset);
  auto tok = e.encode(q, k, torch::Tensor(), st);
  return attention_logits(e, tok, KeyCache::from(tok));
}

// Max |a - b| over the finite entries; infinite where a and b are not finite at the same places.
double max_diff_same_nonfinite(const torch::Tensor& a, const torch::Tensor& b) {
  auto fa = torch::isfinite(a), fb = torch::isfinite(b);
  if (!torch::equal(fa, fb)) return INFINITY;
  auto d = torch::where(fa, a.to(f64) - b.to(f64), torch::zeros({}, f64));
  return d.abs().max().item<double>();
}

// The frequencies an encoding turns pair d by per position, read back with atan2 from unit vectors at
// position 1 (every frequency is <= 1 < pi, so the angle is the frequency itself). Per head: [H, D/2].
torch::Tensor spectrum_of(Encoding& e) {
  const int64_t P = kShape.head_dim / 2;
  auto unit = torch::zeros({1, 1, kShape.heads, kShape.head_dim}, f64);
  unit.narrow(-1, 0, P).fill_(1.0);
  auto r =
      encode_q(e, unit.to(e.parameters().empty() ? f64 : e.parameters()[0].scalar_type()), 1)[0][0].to(f64);
  return torch::atan2(r.narrow(-1, P, P), r.narrow(-1, 0, P));
}

// RoPE's frequencies base^(-2d/D), computed here independently.
torch::Tensor rope_theta(double base = 10000.0) {
  const int64_t P = kShape.head_dim / 2;
  std::vector<double> t(P);
  for (int64_t d = 0; d < P; ++d) t[d] = std::pow(base, -2.0 * double(d) / double(kShape.head_dim));
  return torch::tensor(t, f64);
}

using grape::testing::expect_invalid;

std::string temp_file(const std::string& name, const std::string& text) {
  auto p = (fs::temp_directory_path() / ("grape_ctxext_" + std::to_string(::getpid()) + "_" + name)).string();
  io::write_file_atomic(p, text);
  return p;
}

std::string factors_text(const std::vector<double>& f, bool json) {
  std::string s = json ? "[" : "";
  for (size_t i = 0; i < f.size(); ++i) s += (i ? (json ? ", " : " ") : "") + std::to_string(f[i]);
  return s + (json ? "]\n" : "\n");
}

// ---- E-1: Position Interpolation ----------------------------------------------------------------------

TEST(ContextExtension, PiAtPositionNEqualsRopeAtNOverS) {
  auto q = randn({2, 9, 2, 64}, 1);
  const double s = 2.5;
  auto theta = rope_theta();
  for (auto* name : {"pi", "rope"}) {
    SCOPED_TRACE(name);
    PeOptions o{{"factor", "2.5"}};
    if (std::string(name) == "rope") o.set("extend", "pi");
    auto e = make(name, o);
    // RoPE at the fractional positions n/s, written out: angle (n/s) theta_d.
    auto pos = (torch::arange(100, 109, f64) / s).view({1, 9, 1, 1});
    auto expected = rotate_pairs(q, pos * theta, "half");
    EXPECT_LE(max_diff_same_nonfinite(encode_q(*e, q, 100), expected), 1e-12);
    EXPECT_TRUE(e->properties().rotates && e->properties().relative);
  }
  // s = 1 is RoPE exactly; s = 2 at position 2m is RoPE at m exactly.
  auto k = randn({2, 9, 2, 64}, 2);
  EXPECT_TRUE(torch::equal(logits(*make("pi", {{"factor", "1"}}), q, k, 7), logits(*make("rope"), q, k, 7)));
  auto even = torch::arange(0, 9, 2);
  EXPECT_TRUE(torch::equal(encode_q(*make("pi"), q, 0).index_select(1, even),
                           encode_q(*make("rope"), q.index_select(1, even), 0)));
}

// ---- E-2: NTK-aware -----------------------------------------------------------------------------------

TEST(ContextExtension, NtkKeepsTheHighestFrequencyAndDividesTheLowestByS) {
  const double s = 8.0;
  auto th = spectrum_of(*make("rope", {{"extend", "ntk"}, {"factor", "8"}}))[0];
  auto theta = rope_theta();
  const int64_t P = 32;
  EXPECT_NEAR(th[0].item<double>(), theta[0].item<double>(), 1e-12);
  EXPECT_NEAR(th[P - 1].item<double>() / (theta[P - 1].item<double>() / s), 1.0, 1e-12);
  // Every frequency is RoPE's with the base b' = b s^(D/(D-2)).
  auto ntk = rope_theta(10000.0 * std::pow(s, 64.0 / 62.0));
  EXPECT_LE((th / ntk - 1).abs().max().item<double>(), 1e-12);
  EXPECT_TRUE(torch::equal(encode_q(*make("ntk", {{"factor", "1"}}), randn({1, 5, 2, 64}, 3), 40),
                           encode_q(*make("rope"), randn({1, 5, 2, 64}, 3), 40)));
}

// On a learned spectrum the method acts per index d: theta'_d = theta_d s^(-2d/(D-2)).
TEST(ContextExtension, MethodsApplyPerIndexToGrapeMsLearnedFrequencies) {
  auto gm = make("grape-m", {{"extend", "ntk"}, {"factor", "4"}, {"per_head", "true"}});
  {
    torch::NoGradGuard ng;
    for (auto& p : gm->parameters()) p.add_(randn(p.sizes().vec(), 9) * 2.0);
  }
  auto learned = torch::exp(gm->named_parameters()["lambda"].detach() / 16.0);  // [H, P]
  auto d = torch::arange(32, f64);
  auto expected = learned * torch::pow(4.0, -2.0 * d / 62.0);
  EXPECT_LE((spectrum_of(*gm) - expected).abs().max().item<double>(), 1e-12);
  EXPECT_FALSE(torch::equal(learned[0], learned[1]));  // per-head spectra really differ
}

// At init grape-m is rope bit for bit in fp32; with the same method it stays so, for every method.
TEST(ContextExtension, GrapeMAtInitEqualsRopeUnderEveryMethodFp32) {
  auto q = randn({1, 40, 2, 64}, 4, torch::kFloat32), k = randn({1, 40, 2, 64}, 5, torch::kFloat32);
  for (auto* method : {"pi", "ntk", "dynamic-ntk", "yarn", "longrope"}) {
    SCOPED_TRACE(method);
    PeOptions o{{"extend", method}, {"factor", "3"}, {"original_context", "16"}};
    if (std::string(method) == "pi" || std::string(method) == "ntk" || std::string(method) == "longrope")
      o = PeOptions{{"extend", method}, {"factor", "3"}};
    for (auto* name : {"grape-m", "grape-m-planes"}) {
      auto gm = make(name, o, torch::kFloat32);
      auto rope = make("rope", o, torch::kFloat32);
      EXPECT_EQ(max_diff_same_nonfinite(logits(*gm, q, k, 3), logits(*rope, q, k, 3)), 0.0) << name;
      // and the method changed something: not plain rope
      EXPECT_GT(max_diff_same_nonfinite(logits(*rope, q, k, 3),
                                        logits(*make("rope", {}, torch::kFloat32), q, k, 3)),
                1e-4);
    }
  }
}

// ---- E-3: dynamic NTK ---------------------------------------------------------------------------------

TEST(ContextExtension, DynamicNtkIsRopeBitForBitUpToTheTrainingContext) {
  for (auto dt : {torch::kFloat32, torch::kFloat64}) {
    auto q = randn({2, 24, 2, 64}, 6, dt), k = randn({2, 24, 2, 64}, 7, dt);
    auto dyn = make("dynamic-ntk", {{"original_context", "24"}, {"factor", "4"}}, dt);
    auto rope = make("rope", {}, dt);
    EXPECT_TRUE(torch::equal(logits(*dyn, q, k), logits(*rope, q, k)));
    EXPECT_TRUE(torch::equal(encode_q(*dyn, q, 0), q));  // the cache holds pre-rotation keys
    // One token more and the spectrum moves.
    auto q2 = randn({2, 25, 2, 64}, 6, dt), k2 = randn({2, 25, 2, 64}, 7, dt);
    EXPECT_GT(max_diff_same_nonfinite(logits(*dyn, q2, k2), logits(*rope, q2, k2)), 1e-6);
  }
  EXPECT_FALSE(make("dynamic-ntk")->properties().relative);
}

// Past L the base is b' = b (s l/L - (s-1))^(D/(D-2)) for the current length l.
TEST(ContextExtension, DynamicNtkBaseFollowsTheCurrentLength) {
  auto q = randn({1, 40, 2, 64}, 8), k = randn({1, 40, 2, 64}, 9);
  auto dyn = make("rope", {{"extend", "dynamic-ntk"}, {"factor", "2"}, {"original_context", "16"}});
  const double kk = 2.0 * 40.0 / 16.0 - 1.0;
  auto ntk = make("rope", {{"extend", "ntk"}, {"factor", std::to_string(kk)}});
  EXPECT_LE(max_diff_same_nonfinite(logits(*dyn, q, k), logits(*ntk, q, k)), 1e-10);
}

// E-3 at the model level: a decode crossing L equals, at every step t, row t of a full forward over the
// prefix 0..t (whose spectrum is that of length t+1), for both the reference and the fused attention.
// One layer: the invariant is exact there. With more layers it cannot hold for any KV cache: the cached
// keys and values of layer 2 come from layer-1 outputs computed under the spectrum of their own time,
// while a prefix recompute redoes them under length t+1's (the per-layer form is the E-3 law in laws.cpp).
TEST(ContextExtension, DynamicNtkDecodeAcrossLEqualsPrefixRecomputeInTheModel) {
  for (auto* attention : {"fused", "reference"}) {
    SCOPED_TRACE(attention);
    ModelConfig c;
    c.preset = "test";
    c.vocab_size = 101;
    c.n_layer = 1;
    c.n_head = 2;
    c.n_embd = 32;
    c.context = 16;
    c.attention = attention;
    c.pe = "rope";
    c.pe_options = {{"extend", "dynamic-ntk"}, {"factor", "2"}, {"original_context", "16"}};
    torch::manual_seed(3);
    Transformer m(c);
    auto plain_cfg = c;
    plain_cfg.pe_options.clear();
    Transformer plain(plain_cfg);
    torch::NoGradGuard ng;
    {
      auto src = m->named_parameters();
      for (auto& p : plain->named_parameters()) p.value().copy_(src[p.key()]);
    }
    const int64_t T = 40, prefill = 5;
    auto gen = at::detail::createCPUGenerator(17);
    auto seq = torch::randint(0, 101, {1, T}, gen, torch::kInt64);
    auto cache = m->new_cache();
    std::vector<SequenceCache*> caches{&cache};
    std::vector<torch::Tensor> outs{m->forward_cached(seq.narrow(1, 0, prefill), caches)};
    for (int64_t t = prefill; t < T; ++t) outs.push_back(m->forward_cached(seq.narrow(1, t, 1), caches));
    auto decoded = torch::cat(outs, 1);
    double err = 0.0, vs_plain = 0.0;
    for (int64_t t = 0; t < T; ++t) {
      auto prefix = m->forward(seq.narrow(1, 0, t + 1));
      err = std::max(err, max_diff_same_nonfinite(decoded.select(1, t), prefix.select(1, t)));
      if (t < 16)  // inside L the model is plain RoPE
        EXPECT_LE(max_diff_same_nonfinite(decoded.select(1, t),
                                          plain->forward(seq.narrow(1, 0, t + 1)).select(1, t)),
                  1e-5)
            << t;
      else
        vs_plain =
            std::max(vs_plain, max_diff_same_nonfinite(decoded.select(1, t),
                                                       plain->forward(seq.narrow(1, 0, t + 1)).select(1, t)));
    }
    std::printf(
        "  dynamic-ntk decode vs prefix recompute (%s): max |diff| = %.3g, vs plain rope past L %.3g\n",
        attention, err, vs_plain);
    EXPECT_LE(err, 1e-4);
    EXPECT_GT(vs_plain, 1e-3);  // past L the spectrum really changed
    // A single full forward over all 40 tokens uses length 40's spectrum for every row: it is not the decode.
    EXPECT_GT(max_diff_same_nonfinite(decoded.narrow(1, 16, 10), m->forward(seq).narrow(1, 16, 10)), 1e-4);
  }
}

// ---- E-4: YaRN ----------------------------------------------------------------------------------------

TEST(ContextExtension, YarnRampTemperatureAndReductions) {
  const double s = 8.0, L = 4096.0;
  PeOptions o{{"factor", "8"}, {"original_context", "4096"}};
  auto yarn = make("yarn", o);
  auto th = spectrum_of(*yarn)[0];
  auto theta = rope_theta();
  int64_t kept = 0, interpolated = 0, ramped = 0;
  for (int64_t d = 0; d < 32; ++d) {
    const double t = theta[d].item<double>(), r = L * t / (2 * std::numbers::pi), got = th[d].item<double>();
    if (r > 32) {
      EXPECT_NEAR(got / t, 1.0, 1e-12) << d;
      ++kept;
    } else if (r < 1) {
      EXPECT_NEAR(got / (t / s), 1.0, 1e-12) << d;
      ++interpolated;
    } else {
      const double g = (r - 1) / 31;
      EXPECT_NEAR(got / ((1 - g) * t / s + g * t), 1.0, 1e-12) << d;
      ++ramped;
    }
  }
  EXPECT_GE(kept, 5);
  EXPECT_GE(interpolated, 5);
  EXPECT_GE(ramped, 5);
  // mscale = 0.1 ln s + 1 on both q and k: norms scale by it, logits by its square.
  const double m = 0.1 * std::log(s) + 1.0;
  auto q = randn({2, 11, 2, 64}, 10), k = randn({2, 11, 2, 64}, 11);
  EXPECT_LE(max_diff_same_nonfinite(encode_q(*yarn, q, 50).norm(2, -1), q.norm(2, -1) * m), 1e-12);
  auto by_parts = make("yarn", {{"factor", "8"}, {"original_context", "4096"}, {"yarn_mscale", "1"}});
  EXPECT_LE(max_diff_same_nonfinite(logits(*yarn, q, k, 50), logits(*by_parts, q, k, 50) * (m * m)), 1e-12);
  EXPECT_FALSE(yarn->properties().rotates);
  EXPECT_TRUE(yarn->properties().relative);
  EXPECT_TRUE(by_parts->properties().rotates);
  // s = 1 is RoPE exactly, mscale 1.
  auto one = make("rope", {{"extend", "yarn"}, {"factor", "1"}, {"original_context", "4096"}});
  EXPECT_TRUE(torch::equal(logits(*one, q, k, 50), logits(*make("rope"), q, k, 50)));
  EXPECT_TRUE(one->properties().rotates);
}

// ---- E-5: LongRoPE ------------------------------------------------------------------------------------

TEST(ContextExtension, LongRopeFactorsFromFiles) {
  auto q = randn({1, 12, 2, 64}, 12), k = randn({1, 12, 2, 64}, 13);
  auto uniform = temp_file("uniform.txt", factors_text(std::vector<double>(32, 4.0), false));
  auto ones = temp_file("ones.json", factors_text(std::vector<double>(32, 1.0), true));
  // lambda = s, n_hat = 0: PI; lambda = 1: RoPE.
  EXPECT_TRUE(torch::equal(logits(*make("longrope", {{"longrope_factors", uniform}}), q, k, 9),
                           logits(*make("pi", {{"factor", "4"}}), q, k, 9)));
  EXPECT_TRUE(
      torch::equal(logits(*make("rope", {{"extend", "longrope"}, {"longrope_factors", ones}}), q, k, 9),
                   logits(*make("rope"), q, k, 9)));
  // Non-uniform factors: theta_d / lambda_d per frequency.
  std::vector<double> lam(32);
  for (int64_t d = 0; d < 32; ++d) lam[d] = 1.0 + 0.25 * double(d);
  auto ramp = temp_file("ramp.txt", factors_text(lam, false));
  auto e = make("longrope", {{"longrope_factors", ramp}});
  auto expected = rope_theta() / torch::tensor(lam, f64);
  EXPECT_LE((spectrum_of(*e)[0] / expected - 1).abs().max().item<double>(), 1e-12);
  EXPECT_TRUE(e->properties().relative);
  // n_hat = 6: positions 0..5 as RoPE, 6.. interpolated.
  auto late = make("longrope", {{"longrope_factors", ramp}, {"longrope_start", "6"}});
  auto got = encode_q(*late, q, 0);
  EXPECT_TRUE(torch::equal(got.narrow(1, 0, 6), encode_q(*make("rope"), q, 0).narrow(1, 0, 6)));
  EXPECT_TRUE(torch::equal(got.narrow(1, 6, 6), encode_q(*e, q, 0).narrow(1, 6, 6)));
  EXPECT_FALSE(late->properties().relative);
  for (const auto& p : {uniform, ones, ramp}) fs::remove(p);
}

// ---- bad input ----------------------------------------------------------------------------------------

TEST(ContextExtension, BadOptionsGiveClearErrors) {
  expect_invalid(
      [] {
        make("rope", {{"extend", "ntk-by-parts"}});
      },
      {"extend", "ntk-by-parts", "none|pi|ntk"});
  expect_invalid(
      [] {
        make("rope", {{"extend", "pi"}, {"factor", "0"}});
      },
      {"rope", "factor must be > 0", "0"});
  expect_invalid([] { make("yarn", {{"factor", "-2"}}); }, {"yarn", "factor must be > 0"});
  expect_invalid([] { make("pi", {{"factor", "nan"}}); }, {"factor", "not a finite number"});
  expect_invalid([] { make("rope", {{"factor", "4"}}); }, {"factor 4 needs a method", "extend="});
  expect_invalid(
      [] {
        make("rope", {{"extend", "pi"}, {"yarn_beta", "16"}});
      },
      {"yarn_beta applies only to extend=yarn", "pi"});
  expect_invalid(
      [] {
        make("grape-m", {{"extend", "ntk"}, {"longrope_start", "3"}});
      },
      {"grape-m", "longrope_start applies only to extend=longrope"});
  expect_invalid([] { make("yarn", {{"yarn_alpha", "40"}}); }, {"yarn_alpha < yarn_beta", "40", "32"});
  expect_invalid([] { make("dynamic-ntk", {{"original_context", "0"}}); }, {"original_context must be >= 1"});
  expect_invalid([] { make("alibi", {{"extend", "yarn"}}); }, {"unknown parameter 'extend'", "alibi"});
  expect_invalid([] { make("xpos", {{"factor", "2"}}); }, {"unknown parameter 'factor'", "xpos"});
  expect_invalid([] { make("pi", {{"extend", "ntk"}}); }, {"unknown parameter 'extend'", "pi"});
  // LongRoPE files: missing, corrupt, wrong length, non-positive, and a factor given as well.
  expect_invalid(
      [] {
        make("longrope", {{"longrope_factors", "/nonexistent/grape/factors.txt"}});
      },
      {"longrope", "cannot read", "/nonexistent/grape/factors.txt"});
  auto bad = temp_file("bad.txt", "1.0 2.0 banana 3.0\n");
  expect_invalid(
      [&] {
        make("longrope", {{"longrope_factors", bad}});
      },
      {"entry 2 'banana' is not a number"});
  auto badjson = temp_file("bad.json", "[1.0, 2.0,");
  expect_invalid([&] { make("longrope", {{"longrope_factors", badjson}}); }, {"not valid JSON"});
  auto obj = temp_file("obj.json", "{\"factors\": [1, 2]}");
  expect_invalid([&] { make("longrope", {{"longrope_factors", obj}}); }, {"JSON array of numbers"});
  auto short_ = temp_file("short.txt", "1, 2, 3\n");
  expect_invalid([&] { make("longrope", {{"longrope_factors", short_}}); }, {"has 3 factors, expected 32"});
  auto neg = temp_file("neg.txt", factors_text(std::vector<double>(31, 2.0), false) + "-1\n");
  expect_invalid(
      [&] {
        make("longrope", {{"longrope_factors", neg}});
      },
      {"factor 31 is -1", "finite and > 0"});
  auto empty = temp_file("empty.txt", "\n");
  expect_invalid([&] { make("longrope", {{"longrope_factors", empty}}); }, {"holds no factors"});
  auto fine = temp_file("fine.txt", factors_text(std::vector<double>(32, 2.0), false));
  expect_invalid([&] { make("longrope", {{"longrope_factors", fine}, {"factor", "2"}}); }, {"not both"});
  expect_invalid([] { make("longrope", {{"longrope_start", "-1"}}); }, {"longrope_start must be >= 0"});
  for (const auto& p : {bad, badjson, obj, short_, neg, empty, fine}) fs::remove(p);
  // ntk needs two distinct ends of the spectrum.
  expect_invalid([] { make_encoding("ntk", HeadShape{1, 2, 4}); }, {"at least 4 rotated dims"});
}

// The options change no parameter or buffer: a plain rope / grape-m checkpoint loads into an extended model.
TEST(ContextExtension, OptionsKeepParameterAndBufferNames) {
  for (auto* name : {"rope", "grape-m", "grape-m-planes"}) {
    auto plain = make(name);
    auto ext = make(name, {{"extend", "yarn"}, {"factor", "4"}});
    auto keys = [](const auto& items) {
      std::vector<std::string> v;
      for (const auto& i : items) v.push_back(i.key() + shape_string(i.value()));
      return v;
    };
    EXPECT_EQ(keys(plain->named_parameters()), keys(ext->named_parameters())) << name;
    EXPECT_EQ(keys(plain->named_buffers()), keys(ext->named_buffers())) << name;
  }
  // The registry lists the named methods with their options.
  for (auto* name : {"pi", "ntk", "dynamic-ntk", "yarn", "longrope"}) {
    const auto& info = encoding_info(name);
    std::vector<std::string> keys;
    for (const auto& o : info.options) keys.push_back(o.key);
    EXPECT_NE(std::find(keys.begin(), keys.end(), "factor"), keys.end()) << name;
    EXPECT_NE(std::find(keys.begin(), keys.end(), "original_context"), keys.end()) << name;
    EXPECT_EQ(std::find(keys.begin(), keys.end(), "extend"), keys.end()) << name;
  }
}

// ---- grape eval --extend on a tiny trained run -----------------------------------------------------------

TEST(ContextExtension, EvalExtendOnATrainedRun) {
  const fs::path dir = fs::temp_directory_path() / ("grape_ctxext_run_" + std::to_string(::getpid()));
  const std::string run = testing::train_tiny_rope_run(dir);

  auto r = testing::run_cli("eval --run " + run + " --extend yarn --factor 2 --factors 1,2 --tokens 256");
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("context extension yarn (factor=2, original_context=16)"), std::string::npos)
      << r.output;
  // Named by checkpoint and extension: a plain eval of the same checkpoint does not overwrite it.
  auto j = nlohmann::json::parse(io::read_file(run + "/eval/step_00000003-extend-yarn-x2.json"));
  EXPECT_EQ(j["step"], 3);
  EXPECT_EQ(j["extension"]["method"], "yarn");
  EXPECT_EQ(j["extension"]["options"]["factor"], "2");
  EXPECT_EQ(j["extension"]["options"]["original_context"], "16");
  ASSERT_EQ(j["lengths"].size(), 2u);
  for (const auto& l : j["lengths"]) {
    EXPECT_GT(l["loss"].get<double>(), 0.1) << l.dump();
    EXPECT_LT(l["loss"].get<double>(), std::log(257.0) + 1.0) << l.dump();
  }

  // The same through the config, as library code does it; factor 1 changes nothing, factor 4 does.
  auto info = train::read_run(run);
  torch::NoGradGuard ng;
  auto seq = torch::arange(0, 48, torch::kInt64).remainder(97).view({1, 48});
  auto base = train::load_model(info)->forward(seq);
  auto with = [&](const std::string& method, const std::string& factor) {
    auto i = info;
    i.model.pe_options["extend"] = method;
    i.model.pe_options["factor"] = factor;
    i.model.pe_options["original_context"] = std::to_string(i.model.context);
    return train::load_model(i)->forward(seq);
  };
  EXPECT_EQ(max_diff_same_nonfinite(with("yarn", "1"), base), 0.0);
  EXPECT_GT(max_diff_same_nonfinite(with("yarn", "4"), base), 1e-4);
  EXPECT_GT(max_diff_same_nonfinite(with("dynamic-ntk", "2"), base), 1e-4);

  // Errors: a method the run's encoding cannot take, flags without --extend, an unknown method.
  auto cfg = nlohmann::json::parse(io::read_file(run + "/run.json"));
  cfg["model"]["pe"] = "alibi";
  fs::create_directories(dir / "alibi");
  io::write_file_atomic((dir / "alibi" / "run.json").string(), cfg.dump(2));
  auto e1 = testing::run_cli("eval --run " + (dir / "alibi").string() + " --extend yarn --factor 2");
  EXPECT_EQ(e1.code, 1);
  EXPECT_NE(e1.output.find("'alibi' has no RoPE frequency spectrum to extend"), std::string::npos)
      << e1.output;
  auto e2 = testing::run_cli("eval --run " + run + " --factor 2");
  EXPECT_EQ(e2.code, 1);
  EXPECT_NE(e2.output.find("need --extend METHOD"), std::string::npos) << e2.output;
  auto e3 = testing::run_cli("eval --run " + run + " --extend warp --factor 2");
  EXPECT_EQ(e3.code, 1);
  EXPECT_NE(e3.output.find("unknown method 'warp'"), std::string::npos) << e3.output;
  auto e4 = testing::run_cli("eval --run " + run + " --extend pi --factor=-1");
  EXPECT_EQ(e4.code, 1);
  EXPECT_NE(e4.output.find("factor must be > 0"), std::string::npos) << e4.output;
  fs::remove_all(dir);
}

}  // namespace
}  // namespace grape
