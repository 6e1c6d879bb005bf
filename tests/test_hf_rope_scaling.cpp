// Context extension as Hugging Face's transformers computes it. The references below are our own float64
// transcription of the formulas in transformers' src/transformers/modeling_rope_utils.py (read at the
// version with YaRN's `truncate`, `mscale`/`mscale_all_dim` and llama3; no code copied): inverse frequencies
// and attention factor of linear, dynamic, yarn, longrope and llama3, checked to 1e-12 against grape's
// spectrum read back from the rotation of unit vectors at position 1, for several (factor, original
// context, head_dim, base) including partial rotary; streaming == full for each; bad dictionaries refused
// naming the key; `grape eval --rope-scaling` on a trained run; HF key names accepted by --pe-set.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>
#include <numbers>
#include <string>
#include <vector>

#include "cli_runner.hpp"
#include "expect_invalid.hpp"
#include "grape/io.hpp"
#include "grape/pe.hpp"
#include "tensor_checks.hpp"

namespace grape {
namespace {

namespace fs = std::filesystem;
using grape::testing::f64;
using nlohmann::json;
constexpr double kPi = std::numbers::pi;

// ---- the references: transformers' formulas, in float64 ------------------------------------------------

// What a method gives: the inverse frequencies of the rotated pairs and the factor on cos/sin (= on q, k).
struct Rope {
  std::vector<double> inv_freq;
  double attention_factor = 1.0;
};

// default: 1 / base^(2i/dim), i < dim/2 (dim = the rotated dims: head_dim x partial_rotary_factor).
std::vector<double> hf_default(double base, int64_t dim) {
  std::vector<double> f;
  for (int64_t i = 0; i < dim; i += 2) f.push_back(1.0 / std::pow(base, double(i) / double(dim)));
  return f;
}

Rope hf_linear(double base, int64_t dim, double factor) {
  auto f = hf_default(base, dim);
  for (auto& x : f) x /= factor;
  return {f, 1.0};
}

// dynamic: base' = base ((factor seq_len / max_pos) - (factor - 1))^(dim / (dim - 2)), seq_len >= max_pos.
Rope hf_dynamic(double base, int64_t dim, double factor, int64_t max_pos, int64_t seq_len) {
  const double l = double(std::max(seq_len, max_pos));
  const double b =
      base * std::pow(factor * l / double(max_pos) - (factor - 1.0), double(dim) / double(dim - 2));
  return {hf_default(b, dim), 1.0};
}

double hf_get_mscale(double scale, double m = 1.0) {
  return scale <= 1.0 ? 1.0 : 0.1 * m * std::log(scale) + 1.0;
}

// yarn: a ramp over the pair index between the correction dims of beta_fast and beta_slow turns.
Rope hf_yarn(double base, int64_t dim, double factor, int64_t orig, double beta_fast = 32,
             double beta_slow = 1, bool truncate = true, double mscale = 0, double mscale_all_dim = 0,
             double attention_factor = 0) {
  Rope r;
  r.attention_factor = attention_factor != 0 ? attention_factor
                       : (mscale != 0 && mscale_all_dim != 0)
                           ? hf_get_mscale(factor, mscale) / hf_get_mscale(factor, mscale_all_dim)
                           : hf_get_mscale(factor);
  auto correction_dim = [&](double rotations) {
    return (double(dim) * std::log(double(orig) / (rotations * 2.0 * kPi))) / (2.0 * std::log(base));
  };
  double low = correction_dim(beta_fast), high = correction_dim(beta_slow);
  if (truncate) low = std::floor(low), high = std::ceil(high);
  low = std::max(low, 0.0), high = std::min(high, double(dim - 1));
  if (low == high) high += 0.001;
  for (int64_t i = 0; i < dim / 2; ++i) {
    const double pos_freq = std::pow(base, double(2 * i) / double(dim));
    const double extrapolation = 1.0 / pos_freq, interpolation = 1.0 / (factor * pos_freq);
    const double ramp = std::clamp((double(i) - low) / (high - low), 0.0, 1.0);
    const double extrapolation_factor = 1.0 - ramp;
    r.inv_freq.push_back(interpolation * (1.0 - extrapolation_factor) + extrapolation * extrapolation_factor);
  }
  return r;
}

// longrope: the short factors while seq_len <= original, the long ones beyond; sqrt(1 + ln s / ln L).
Rope hf_longrope(double base, int64_t dim, double factor, int64_t orig, const std::vector<double>& short_f,
                 const std::vector<double>& long_f, int64_t seq_len) {
  Rope r;
  r.attention_factor = factor <= 1.0 ? 1.0 : std::sqrt(1.0 + std::log(factor) / std::log(double(orig)));
  const auto& ext = seq_len > orig ? long_f : short_f;
  for (int64_t i = 0; i < dim / 2; ++i)
    r.inv_freq.push_back(1.0 / (ext[i] * std::pow(base, double(2 * i) / double(dim))));
  return r;
}

// llama3: by wavelength against old_context / high and old_context / low.
Rope hf_llama3(double base, int64_t dim, double factor, int64_t old_context, double low_ff, double high_ff) {
  Rope r;
  const double low_wavelen = double(old_context) / low_ff, high_wavelen = double(old_context) / high_ff;
  for (double f : hf_default(base, dim)) {
    const double wavelen = 2.0 * kPi / f;
    if (wavelen < high_wavelen) {
      r.inv_freq.push_back(f);
    } else if (wavelen > low_wavelen) {
      r.inv_freq.push_back(f / factor);
    } else {
      const double smooth = (double(old_context) / wavelen - low_ff) / (high_ff - low_ff);
      r.inv_freq.push_back((1.0 - smooth) * f / factor + smooth * f);
    }
  }
  return r;
}

// ---- grape's side
// ------------------------------------------------------------------------------------------

struct Geometry {
  int64_t head_dim;
  double base, fraction;
  int64_t rotated() const { return int64_t(std::llround(double(head_dim) * fraction)); }
};

// rope configured from a rope_scaling dictionary, float64.
EncodingPtr from_dict(const Geometry& g, const json& dict) {
  auto opts = hf_rope_scaling_options(dict.dump());
  opts["base"] = std::to_string(g.base);
  opts["fraction"] = std::to_string(g.fraction);
  auto e = make_encoding("rope", {1, g.head_dim, 8}, PeOptions(opts));
  e->to(f64);
  return e;
}

// The frequencies and q/k factor grape applies when the sequence is `length` tokens long: unit vectors on
// the first coordinate of each pair at positions 0..length-1, the angle of position 1 read back by atan2
// (every frequency is < pi), the factor as |q~| / |q|.
Rope grape_rope(Encoding& e, int64_t rotated, int64_t length = 2) {
  const int64_t D = e.shape().head_dim, P = rotated / 2;
  auto unit = torch::zeros({1, length, 1, D}, f64);
  unit.narrow(-1, 0, P).fill_(1.0);
  auto st = e.initial_state(1, 0);
  auto tok = e.encode(unit, unit, {}, st);
  auto q = e.attention_qk(tok, KeyCache::from(tok)).first[0][1][0];  // position 1, head 0: [D]
  auto angle = torch::atan2(q.narrow(0, P, P), q.narrow(0, 0, P));
  Rope r;
  r.attention_factor = std::hypot(q[0].item<double>(), q[P].item<double>());
  auto a = angle.contiguous();
  r.inv_freq.assign(a.data_ptr<double>(), a.data_ptr<double>() + P);
  return r;
}

void expect_same(const Rope& got, const Rope& want, const std::string& what) {
  ASSERT_EQ(got.inv_freq.size(), want.inv_freq.size()) << what;
  double worst = 0.0;
  for (size_t i = 0; i < want.inv_freq.size(); ++i)
    worst = std::max(worst, std::abs(got.inv_freq[i] - want.inv_freq[i]));
  EXPECT_LE(worst, 1e-12) << what << ": inverse frequencies";
  EXPECT_NEAR(got.attention_factor, want.attention_factor, 1e-12) << what << ": attention factor";
}

// Chunked encoding with a growing cache equals a full pass over each prefix (fp64), logits of every chunk.
double streaming_gap(Encoding& e, int64_t T) {
  torch::manual_seed(3);
  const auto& s = e.shape();
  auto q = torch::randn({2, T, s.heads, s.head_dim}, f64), k = torch::randn({2, T, s.heads, s.head_dim}, f64);
  // The reference for rows [start, start+len) is one full pass over the prefix [0, start+len): for a static
  // spectrum that is the full pass narrowed; a dynamic one (dynamic NTK, LongRoPE's switch) rotates with the
  // current length, as a model re-run on the prefix would.
  auto full_prefix = [&](int64_t n) {
    auto st = e.initial_state(2, 0);
    auto all = e.encode(q.narrow(1, 0, n), k.narrow(1, 0, n), {}, st);
    return attention_logits(e, all, KeyCache::from(all));
  };
  auto st2 = e.initial_state(2, 0);
  KeyCache cache;
  double worst = 0.0;
  int64_t start = 0;
  for (int64_t len : {1, 2, 5, 1, 9, int(T)}) {  // prefill, single tokens, chunks; the last one finishes
    len = std::min(len, T - start);
    if (len <= 0) break;
    auto tok = e.encode(q.narrow(1, start, len), k.narrow(1, start, len), {}, st2);
    cache.append(tok);
    auto rows = attention_logits(e, tok, cache);
    auto want = full_prefix(start + len).narrow(2, start, len);
    worst = std::max(worst, (rows - want).masked_fill(torch::isinf(want), 0).abs().max().item<double>());
    start += len;
  }
  return worst;
}

const std::vector<Geometry> kGeometries = {
    {64, 10000.0, 1.0}, {128, 500000.0, 1.0}, {32, 10000.0, 0.5}, {64, 1e6, 0.25}};

// ---- the methods
// -------------------------------------------------------------------------------------------

TEST(HfRopeScaling, LinearAndDefault) {
  for (const auto& g : kGeometries)
    for (double s : {1.0, 2.5, 8.0}) {
      auto e = from_dict(g, {{"rope_type", "linear"}, {"factor", s}});
      expect_same(grape_rope(*e, g.rotated()), hf_linear(g.base, g.rotated(), s),
                  "linear s=" + std::to_string(s));
    }
  auto e = from_dict(kGeometries[0], {{"type", "default"}});
  expect_same(grape_rope(*e, 64), {hf_default(10000.0, 64), 1.0}, "default");
}

TEST(HfRopeScaling, DynamicFollowsTheLength) {
  for (const auto& g : kGeometries)
    for (double s : {2.0, 4.0})
      for (int64_t L : {16, 64}) {
        auto e =
            from_dict(g, {{"rope_type", "dynamic"}, {"factor", s}, {"original_max_position_embeddings", L}});
        for (int64_t len : {L / 2, L, 3 * L})
          expect_same(
              grape_rope(*e, g.rotated(), len), hf_dynamic(g.base, g.rotated(), s, L, len),
              "dynamic s=" + std::to_string(s) + " L=" + std::to_string(L) + " len=" + std::to_string(len));
      }
}

TEST(HfRopeScaling, YarnWithHfRampTruncateAndMscale) {
  for (const auto& g : kGeometries)
    for (double s : {2.0, 4.0, 16.0})
      for (int64_t L : {128, 4096}) {
        const std::string what = "yarn s=" + std::to_string(s) + " L=" + std::to_string(L);
        json d = {{"rope_type", "yarn"}, {"factor", s}, {"original_max_position_embeddings", L}};
        expect_same(grape_rope(*from_dict(g, d), g.rotated()), hf_yarn(g.base, g.rotated(), s, L), what);
        d["truncate"] = false;
        expect_same(grape_rope(*from_dict(g, d), g.rotated()),
                    hf_yarn(g.base, g.rotated(), s, L, 32, 1, false), what + " truncate=false");
        json b = {{"rope_type", "yarn"},  {"factor", s},      {"original_max_position_embeddings", L},
                  {"beta_fast", 16.0},    {"beta_slow", 2.0}, {"mscale", 0.707},
                  {"mscale_all_dim", 1.0}};
        expect_same(grape_rope(*from_dict(g, b), g.rotated()),
                    hf_yarn(g.base, g.rotated(), s, L, 16, 2, true, 0.707, 1.0), what + " betas, mscale");
        b["attention_factor"] = 1.25;
        expect_same(grape_rope(*from_dict(g, b), g.rotated()),
                    hf_yarn(g.base, g.rotated(), s, L, 16, 2, true, 0.707, 1.0, 1.25),
                    what + " attention_factor");
      }
}

TEST(HfRopeScaling, YarnRampsDifferAndThePaperStaysTheDefault) {
  // The issue's finding: Hugging Face's ramp over pair indices is not the paper's continuous ramp over turns.
  const Geometry g{64, 10000.0, 1.0};
  auto hf = grape_rope(
      *from_dict(g, {{"rope_type", "yarn"}, {"factor", 4.0}, {"original_max_position_embeddings", 128}}), 64);
  auto paper_enc = make_encoding("rope", {1, 64, 8},
                                 PeOptions{{"extend", "yarn"}, {"factor", "4"}, {"original_context", "128"}});
  paper_enc->to(f64);
  auto paper = grape_rope(*paper_enc, 64);
  double gap = 0.0;
  for (size_t i = 0; i < hf.inv_freq.size(); ++i)
    gap = std::max(gap, std::abs(hf.inv_freq[i] - paper.inv_freq[i]));
  EXPECT_GT(gap, 1e-3);
  EXPECT_NEAR(hf.attention_factor, paper.attention_factor, 1e-15);
}

TEST(HfRopeScaling, LongRopeSwitchesFromShortToLongAtTheOriginalContext) {
  for (const auto& g : kGeometries) {
    const int64_t P = g.rotated() / 2, L = 32;
    std::vector<double> short_f, long_f;
    for (int64_t i = 0; i < P; ++i)
      short_f.push_back(1.0 + 0.05 * double(i)), long_f.push_back(1.5 + 0.4 * double(i));
    for (double s : {4.0, 1.0}) {
      json d = {{"rope_type", "longrope"},
                {"short_factor", short_f},
                {"long_factor", long_f},
                {"factor", s},
                {"original_max_position_embeddings", L}};
      auto e = from_dict(g, d);
      for (int64_t len : {L / 2, L, L + 1, 3 * L})
        expect_same(grape_rope(*e, g.rotated(), len),
                    hf_longrope(g.base, g.rotated(), s, L, short_f, long_f, len),
                    "longrope s=" + std::to_string(s) + " len=" + std::to_string(len));
      EXPECT_LE(streaming_gap(*e, 2 * L), 1e-10) << "longrope crossing L";
    }
    json d = {{"rope_type", "longrope"},
              {"short_factor", short_f},
              {"long_factor", long_f},
              {"attention_factor", 1.5},
              {"original_max_position_embeddings", L}};
    auto given = hf_longrope(g.base, g.rotated(), 4.0, L, short_f, long_f, 2 * L);
    given.attention_factor = 1.5;
    expect_same(grape_rope(*from_dict(g, d), g.rotated(), 2 * L), given, "longrope attention_factor");
  }
}

TEST(HfRopeScaling, Llama3) {
  for (const auto& g : kGeometries)
    for (auto [s, L, lo, hi] :
         {std::tuple<double, int64_t, double, double>{8, 8192, 1, 4}, {4, 64, 2, 8}, {32, 256, 1, 2}}) {
      json d = {{"rope_type", "llama3"},
                {"factor", s},
                {"original_max_position_embeddings", L},
                {"low_freq_factor", lo},
                {"high_freq_factor", hi}};
      expect_same(grape_rope(*from_dict(g, d), g.rotated()), hf_llama3(g.base, g.rotated(), s, L, lo, hi),
                  "llama3 s=" + std::to_string(s) + " L=" + std::to_string(L));
    }
}

TEST(HfRopeScaling, StreamingEqualsFullForEveryMethod) {
  const Geometry g{32, 10000.0, 1.0};
  const std::vector<json> dicts = {
      {{"rope_type", "linear"}, {"factor", 2.0}},
      {{"rope_type", "dynamic"}, {"factor", 2.0}, {"original_max_position_embeddings", 8}},
      {{"rope_type", "yarn"}, {"factor", 4.0}, {"original_max_position_embeddings", 16}},
      {{"rope_type", "llama3"},
       {"factor", 8.0},
       {"original_max_position_embeddings", 16},
       {"low_freq_factor", 1.0},
       {"high_freq_factor", 4.0}},
  };
  for (const auto& d : dicts) {
    EXPECT_LE(streaming_gap(*from_dict(g, d), 25), 1e-10) << d.dump();
  }
}

// ---- aliases and bad input
// ------------------------------------------------------------------------------------

using grape::testing::expect_invalid;

TEST(HfRopeScaling, PeSetTakesHuggingFaceKeyNames) {
  const HeadShape s{1, 32, 8};
  auto via_alias = make_encoding("rope", s,
                                 PeOptions{{"rope_type", "yarn"},
                                           {"factor", "4"},
                                           {"beta_fast", "16"},
                                           {"beta_slow", "2"},
                                           {"original_max_position_embeddings", "64"}});
  auto ours = make_encoding("rope", s,
                            PeOptions{{"extend", "yarn"},
                                      {"factor", "4"},
                                      {"yarn_beta", "16"},
                                      {"yarn_alpha", "2"},
                                      {"original_context", "64"}});
  via_alias->to(f64), ours->to(f64);
  auto a = grape_rope(*via_alias, 32), b = grape_rope(*ours, 32);
  expect_same(a, b, "aliases");
  auto linear = make_encoding("rope", s, PeOptions{{"type", "linear"}, {"factor", "2"}});
  auto pi = make_encoding("pi", s, PeOptions{{"factor", "2"}});
  linear->to(f64), pi->to(f64);
  expect_same(grape_rope(*linear, 32), grape_rope(*pi, 32), "type=linear == pi");
  expect_invalid(
      [&] {
        make_encoding("rope", s, PeOptions{{"beta_fast", "16"}, {"yarn_beta", "8"}, {"extend", "yarn"}});
      },
      {"yarn_beta", "beta_fast", "not both"});
  expect_invalid(
      [&] {
        make_encoding("rope", s, PeOptions{{"rope_type", "ntk-by-parts"}});
      },
      {"rope_type", "ntk-by-parts"});
  expect_invalid(
      [&] {
        make_encoding("yarn", s, PeOptions{{"rope_type", "linear"}});
      },
      {"its method is yarn", "pi"});
}

TEST(HfRopeScaling, BadDictionariesAreRefusedNamingTheKey) {
  expect_invalid([] { hf_rope_scaling_options(R"({"rope_type": "yarn"})"); },
                 {"rope_type 'yarn' needs 'factor'"});
  expect_invalid([] { hf_rope_scaling_options(R"({"rope_type": "linear", "factor": 0.5})"); },
                 {"'factor' must be >= 1", "0.5"});
  expect_invalid([] { hf_rope_scaling_options(R"({"rope_type": "ntk-by-parts", "factor": 2})"); },
                 {"rope_type 'ntk-by-parts'"});
  expect_invalid([] { hf_rope_scaling_options(R"({"rope_type": "yarn", "factor": 2, "betafast": 32})"); },
                 {"unknown key 'betafast'", "beta_fast"});
  expect_invalid([] { hf_rope_scaling_options(R"({"rope_type": "yarn", "factor": "4"})"); },
                 {"'factor' must be a number"});
  expect_invalid([] { hf_rope_scaling_options(R"({"factor": 4})"); }, {"missing 'rope_type'"});
  expect_invalid(
      [] { hf_rope_scaling_options(R"({"rope_type": "llama3", "factor": 8, "low_freq_factor": 1})"); },
      {"needs 'original_max_position_embeddings'"});
  expect_invalid(
      [] { hf_rope_scaling_options(R"({"rope_type": "longrope", "short_factor": [1], "long_factor": 2})"); },
      {"'long_factor' must be a list"});
  expect_invalid([] { hf_rope_scaling_options(R"([1, 2])"); }, {"expected a JSON object"});
  expect_invalid([] { hf_rope_scaling_options("{rope_type: yarn}"); }, {"not valid JSON"});
  // Factors of the wrong length are refused when the encoding is built (it knows the rotated dims).
  auto o = hf_rope_scaling_options(
      R"({"rope_type": "longrope", "short_factor": [1, 1], "long_factor": [2, 2], "factor": 2})");
  expect_invalid(
      [&] {
        make_encoding("rope", {1, 32, 8}, PeOptions(o));
      },
      {"longrope_short_factors has 2 factors, expected 16"});
}

// ---- grape eval --rope-scaling
// -------------------------------------------------------------------------------

TEST(HfRopeScaling, EvalAppliesADictionaryOrAConfigFile) {
  const fs::path dir = fs::temp_directory_path() / ("grape_hfrope_run_" + std::to_string(::getpid()));
  const std::string run = testing::train_tiny_rope_run(dir);

  auto r = testing::run_cli(
      "eval --run " + run +
      R"( --rope-scaling '{"rope_type":"yarn","factor":4,"original_max_position_embeddings":16}')" +
      " --factors 1,2 --tokens 256");
  ASSERT_EQ(r.code, 0) << r.output;
  // The results file the command names (one per checkpoint and setting).
  auto results_of = [](const std::string& out) {
    const auto at = out.find("results: ");
    return at == std::string::npos ? std::string() : out.substr(at + 9, out.find('\n', at) - at - 9);
  };
  auto j = json::parse(io::read_file(results_of(r.output)));
  EXPECT_EQ(j["extension"]["method"], "yarn");
  EXPECT_EQ(j["extension"]["options"]["yarn_ramp"], "hf");
  EXPECT_EQ(j["extension"]["rope_scaling"]["factor"], 4);
  ASSERT_EQ(j["lengths"].size(), 2u);

  // A model's config.json holding the dictionary; original context from the run (16) when absent.
  const std::string config = (dir / "config.json").string();
  io::write_file_atomic(
      config,
      R"({"hidden_size": 32, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,)"
      R"( "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}})");
  auto c = testing::run_cli("eval --run " + run + " --rope-scaling " + config + " --factors 1 --tokens 256");
  ASSERT_EQ(c.code, 0) << c.output;
  EXPECT_EQ(json::parse(io::read_file(results_of(c.output)))["extension"]["method"], "llama3");
  EXPECT_NE(results_of(c.output), results_of(r.output));  // another setting, another file

  auto bad = testing::run_cli("eval --run " + run + R"( --rope-scaling '{"rope_type":"yarn","factor":0.5}')");
  EXPECT_NE(bad.code, 0);
  EXPECT_NE(bad.output.find("'factor' must be >= 1"), std::string::npos) << bad.output;
  auto both = testing::run_cli("eval --run " + run +
                               R"( --extend pi --rope-scaling '{"rope_type":"linear","factor":2}')");
  EXPECT_NE(both.code, 0);
  EXPECT_NE(both.output.find("give one"), std::string::npos) << both.output;
  fs::remove_all(dir);
}

}  // namespace
}  // namespace grape
