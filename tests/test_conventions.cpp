// The GRAPE authors' conventions as options. QK-norm's place (ModelConfig::qk_norm): before_rotation (grape's
// order), after_rotation (theirs: the encoded q~, k~ are normalised) and off; the once-boolean field's old
// spellings; the encodings after_rotation refuses; streaming == full forward with after_rotation. The
// rotation's orientation on every rotary encoding. `grape attn forward`, which loads such sublayers.
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <unistd.h>

#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "cli_runner.hpp"
#include "expect_invalid.hpp"
#include "grape/attention.hpp"
#include "grape/io.hpp"
#include "grape/model.hpp"
#include "model_fixture.hpp"
#include "tensor_checks.hpp"

namespace grape {
namespace {

using grape::testing::expect_invalid;

ModelConfig small_config(const std::string& pe, const std::string& qk_norm, bool kv_shift = false) {
  ModelConfig c;
  c.vocab_size = 257;
  c.n_layer = 2;
  c.n_head = 4;
  c.n_embd = 64;
  c.context = 32;
  c.pe = pe;
  c.qk_norm = qk_norm;
  c.kv_shift = kv_shift;
  return c;
}

// Unit gains would make the two QK-norm orders agree for every rotation: move them off their init.
// `to` gets every parameter of `from` (same names and shapes).
void copy_weights(Transformer& from, Transformer& to) {
  torch::NoGradGuard no_grad;
  auto src = from->named_parameters();
  for (auto& item : to->named_parameters()) item.value().copy_(src[item.key()]);
}

torch::Tensor tokens(int64_t B, int64_t T, uint64_t seed) {
  auto gen = at::detail::createCPUGenerator(seed);
  return torch::randint(0, 257, {B, T}, gen, torch::kInt64);
}

using grape::testing::max_diff;

// Encodings that do not touch q and k: normalising before or after encode is the same computation.
TEST(QKNorm, AfterRotationEqualsBeforeExactlyForAdditiveEncodings) {
  for (const auto* name : {"alibi", "fox", "nope", "grape-ap", "t5"}) {
    SCOPED_TRACE(name);
    auto before = testing::perturbed_model(small_config(name, "before_rotation", true));
    torch::manual_seed(0);
    Transformer after(small_config(name, "after_rotation", true));
    copy_weights(before, after);
    torch::NoGradGuard no_grad;
    auto x = tokens(2, 19, 5);
    EXPECT_TRUE(torch::equal(before->forward(x), after->forward(x)));
  }
}

// A rotation keeps the RMS, so the orders differ only through the gain: equal with uniform gains, different
// with per-dimension ones.
TEST(QKNorm, AfterRotationDiffersForRopeOnlyThroughNonUniformGains) {
  for (const auto* name : {"rope", "grape-m", "grape-m-ctx"}) {
    SCOPED_TRACE(name);
    auto before = testing::perturbed_model(small_config(name, "before_rotation"));
    torch::manual_seed(0);
    Transformer after(small_config(name, "after_rotation"));
    copy_weights(before, after);
    torch::NoGradGuard no_grad;
    auto x = tokens(2, 23, 6);
    const double d = max_diff(before->forward(x), after->forward(x));
    EXPECT_GT(d, 1e-3) << "non-uniform gains must make the orders differ";
    for (auto& item : before->named_parameters())
      if (item.key().find("q_norm") != std::string::npos || item.key().find("k_norm") != std::string::npos)
        item.value().fill_(1.7);  // the same uniform gain on every dimension
    copy_weights(before, after);
    EXPECT_LE(max_diff(before->forward(x), after->forward(x)), 2e-5);
  }
}

// after_rotation against the order written out: rotate (rope, the authors' orientation), then RMSNorm with
// the per-dimension gain, then attention.
TEST(QKNorm, AfterRotationNormalisesTheRotatedQueriesAndKeys) {
  auto c = small_config("rope", "after_rotation");
  c.n_layer = 1;
  c.pe_options = {{"orientation", "grape"}};
  auto m = testing::perturbed_model(c);
  torch::NoGradGuard no_grad;
  auto P = m->named_parameters();
  const int64_t B = 2, T = 7, H = c.n_head, D = c.head_dim();
  auto ids = tokens(B, T, 9);
  auto rms = [](const torch::Tensor& x, const torch::Tensor& g) {
    return x / torch::sqrt(x.pow(2).mean(-1, true) + 1e-5) * g;
  };
  auto h = P["wte.weight"].index({ids});
  auto xh = rms(h, P["blocks.0.norm1.weight"]);
  auto q = torch::matmul(xh, P["blocks.0.wq.weight"].t()).view({B, T, H, D});
  auto k = torch::matmul(xh, P["blocks.0.wk.weight"].t()).view({B, T, H, D});
  auto v = torch::matmul(xh, P["blocks.0.wv.weight"].t()).view({B, T, H, D});
  // Clockwise turn of the planes (i, i + D/2) by n * base^(-2i/D): the authors' apply_rotary_emb.
  auto inv = torch::pow(10000.0, -torch::arange(0, D, 2, torch::kFloat64) / double(D)).to(torch::kFloat32);
  auto ang = torch::outer(torch::arange(T, torch::kFloat32), inv).view({1, T, 1, D / 2});
  auto turn = [&](const torch::Tensor& x) {
    auto a = x.narrow(-1, 0, D / 2), b = x.narrow(-1, D / 2, D / 2);
    return torch::cat({a * ang.cos() + b * ang.sin(), -a * ang.sin() + b * ang.cos()}, -1);
  };
  q = rms(turn(q), P["blocks.0.q_norm.weight"]).transpose(1, 2);
  k = rms(turn(k), P["blocks.0.k_norm.weight"]).transpose(1, 2);
  auto logits = torch::matmul(q, k.transpose(-1, -2)) / std::sqrt(double(D));
  logits = logits.masked_fill(torch::ones({T, T}, torch::kBool).triu(1), -INFINITY);
  auto y =
      torch::matmul(torch::softmax(logits, -1), v.transpose(1, 2)).transpose(1, 2).reshape({B, T, H * D});
  h = h + torch::matmul(y, P["blocks.0.wo.weight"].t());
  auto hn = rms(h, P["blocks.0.norm2.weight"]);
  auto mlp = torch::silu(torch::matmul(hn, P["blocks.0.w1.weight"].t())) *
             torch::matmul(hn, P["blocks.0.w2.weight"].t());
  h = h + torch::matmul(mlp, P["blocks.0.w_out.weight"].t());
  auto expected = torch::matmul(rms(h, P["norm_f.weight"]), P["wte.weight"].t());
  EXPECT_LE(max_diff(m->forward(ids), expected), 1e-5);
}

TEST(QKNorm, StreamingEqualsFullForwardWithAfterRotation) {
  const int64_t L = 29, prefill = 4;
  for (const auto* name : {"rope", "grape-m", "grape-m-ctx", "grape-m-mix", "hdd-rope", "fox", "grape-ap"}) {
    for (bool kv : {false, true}) {
      SCOPED_TRACE(std::string(name) + (kv ? " +kv_shift" : ""));
      auto m = testing::perturbed_model(small_config(name, "after_rotation", kv));
      torch::NoGradGuard no_grad;
      auto seq = tokens(1, L, 12);
      auto full = m->forward(seq);
      auto cache = m->new_cache();
      std::vector<SequenceCache*> caches{&cache};
      std::vector<torch::Tensor> outs{m->forward_cached(seq.narrow(1, 0, prefill), caches)};
      for (int64_t t = prefill; t < L; ++t) outs.push_back(m->forward_cached(seq.narrow(1, t, 1), caches));
      EXPECT_LE(max_diff(torch::cat(outs, 1), full), 1e-4);
    }
  }
}

TEST(QKNorm, AfterRotationRefusesEncodingsWhereItIsIllDefined) {
  struct Case {
    std::string pe;
    std::map<std::string, std::string> options;
  };
  for (const auto& c : std::vector<Case>{{"xpos", {}},
                                         {"tape", {}},
                                         {"grape-a-qk", {}},
                                         {"rope", {{"extend", "dynamic-ntk"}}},
                                         {"rope", {{"extend", "yarn"}, {"factor", "4"}}}}) {
    SCOPED_TRACE(c.pe);
    auto cfg = small_config(c.pe, "after_rotation");
    cfg.pe_options = c.options;
    expect_invalid([&] { cfg.validate(); },
                   {"model config: qk_norm=after_rotation", "'" + c.pe + "'", "before_rotation"});
    cfg.qk_norm = "before_rotation";
    EXPECT_NO_THROW(cfg.validate());
  }
}

TEST(QKNorm, OldBooleanSpellingsStillWork) {
  ModelConfig c;
  c.set("qk_norm", "true");
  EXPECT_EQ(c.qk_norm, "before_rotation");
  c.set("qk_norm", "false");
  EXPECT_EQ(c.qk_norm, "off");
  c.set("qk_norm", "after_rotation");
  EXPECT_EQ(c.qk_norm, "after_rotation");
  expect_invalid([&] { c.set("qk_norm", "sideways"); },
                 {"qk_norm='sideways'", "before_rotation|after_rotation|off"});
  EXPECT_EQ(ModelConfig::from_json(R"({"qk_norm": true})").qk_norm, "before_rotation");
  EXPECT_EQ(ModelConfig::from_json(R"({"qk_norm": false})").qk_norm, "off");
  EXPECT_EQ(ModelConfig::from_json(R"({"qk_norm": "after_rotation"})").qk_norm, "after_rotation");
  expect_invalid([] { ModelConfig::from_json(R"({"qk_norm": 1})"); }, {"'qk_norm'", "string"});
  ModelConfig s;
  s.set_section(R"({"qk_norm": false})", "run.toml [model]");
  EXPECT_EQ(s.qk_norm, "off");
  EXPECT_EQ(parse_qk_norm("true"), QKNorm::before_rotation);
  expect_invalid([] { parse_qk_norm("on_the_side"); }, {"qk_norm='on_the_side'"});
}

// A run directory written before qk_norm was a choice ("qk_norm": true in run.json) still evaluates,
// resumes and generates, as before_rotation.
TEST(QKNorm, OldRunDirectoryWithBooleanQKNormLoadsResumesAndEvaluates) {
  const auto dir =
      std::filesystem::temp_directory_path() / ("grape_qk_norm_old_run_" + std::to_string(::getpid()));
  const std::string run = testing::train_tiny_rope_run(dir);
  auto j = nlohmann::json::parse(io::read_file(run + "/run.json"));
  ASSERT_EQ(j["model"]["qk_norm"], "before_rotation") << j.dump();
  j["model"]["qk_norm"] = true;  // as the file was written before
  io::write_file_atomic(run + "/run.json", j.dump(2));
  auto e = testing::run_cli("eval --run " + run + " --tokens 256");
  EXPECT_EQ(e.code, 0) << e.output;
  auto r = testing::run_cli("train --resume --steps 4 --out " + run + " --quiet");
  EXPECT_EQ(r.code, 0) << r.output;
  auto g = testing::run_cli("generate --run " + run + " --prompt the --max-tokens 4 --temperature 0");
  EXPECT_EQ(g.code, 0) << g.output;
  std::filesystem::remove_all(dir);
}

// Every encoding that turns q and k (or a probe) has the option, and orientation=grape is the transposed
// turn: hdd-rope (k = 2, at init) and TAPE (layer 0) equal rope with the same orientation.
TEST(Orientation, EveryRotaryEncodingTakesIt) {
  const HeadShape shape{2, 8, 16};
  for (const auto& info : encodings()) {
    auto e = make_encoding(info.name, shape);
    const auto p = e->properties();
    if (!(p.rotates || p.scales || p.reads_stream || info.name == "grape-ap" || info.name == "yarn"))
      continue;
    bool has = false;
    for (const auto& o : info.options) has = has || o.key == "orientation";
    EXPECT_TRUE(has) << info.name << " has no orientation option";
  }
  torch::manual_seed(4);
  auto q = torch::randn({1, 6, 2, 8}, torch::kFloat64), k = torch::randn({1, 6, 2, 8}, torch::kFloat64);
  auto x = torch::randn({1, 6, 16}, torch::kFloat64);
  auto encode = [&](const std::string& name, PeOptions o) {
    auto e = make_encoding(name, shape, o);
    e->to(torch::kFloat64);
    auto st = e->initial_state(1, 0);
    return e->encode(q, k, x, st);
  };
  for (const auto* orientation : {"standard", "grape"}) {
    SCOPED_TRACE(orientation);
    auto rope = encode("rope", {{"orientation", orientation}});
    auto hdd = encode("hdd-rope", {{"k", "2"}, {"orientation", orientation}});
    auto tape = encode("tape", {{"updates", "false"}, {"orientation", orientation}});
    EXPECT_LE(max_diff(hdd.q, rope.q), 1e-12);
    EXPECT_LE(max_diff(hdd.k, rope.k), 1e-12);
    EXPECT_LE(max_diff(tape.q, rope.q), 1e-12);
    EXPECT_LE(max_diff(tape.k, rope.k), 1e-12);
  }
  EXPECT_GT(max_diff(encode("rope", {{"orientation", "grape"}}).q, encode("rope", {}).q), 0.1);
}

// ---- grape attn forward ---------------------------------------------------------------------------------

// The sublayer wired here by hand from the library's pieces (projections, KV-shift as docs/encodings.md
// writes it, RMSNorm before or after encode, attention_logits, softmax, W_o) against `grape attn forward`
// (which runs the model's AttentionSublayer): output and logits to 1e-5.
TEST(AttnForwardCli, EqualsTheSublayerWiredByHand) {
  const auto dir = std::filesystem::temp_directory_path() / ("grape_attn_cli_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  auto file = [&](const std::string& name) { return (dir / name).string(); };
  const int64_t B = 2, T = 9, C = 32, H = 4, D = C / H;
  struct Case {
    std::string pe, qk_norm;
    bool kv_shift;
  };
  for (const auto& c : std::vector<Case>{{"rope", "after_rotation", true},
                                         {"grape-m-ctx", "before_rotation", true},
                                         {"fox", "off", false},
                                         {"grape-ap", "after_rotation", false}}) {
    SCOPED_TRACE(c.pe + " " + c.qk_norm);
    torch::manual_seed(2);
    auto enc = make_encoding(c.pe, {H, D, C});
    std::map<std::string, torch::Tensor> w;
    for (const auto* name : {"wq.weight", "wk.weight", "wv.weight", "wo.weight"})
      w[name] = torch::randn({C, C}) / std::sqrt(double(C));
    if (c.qk_norm != "off")
      w["q_norm.weight"] = 1 + 0.3 * torch::randn({D}), w["k_norm.weight"] = 1 + 0.3 * torch::randn({D});
    if (c.kv_shift)
      w["kv_shift.w_k"] = torch::randn({H, C}) * 0.3, w["kv_shift.w_v"] = torch::randn({H, C}) * 0.3;
    {
      torch::NoGradGuard ng;
      for (auto& p : enc->named_parameters()) {
        p.value().add_(0.3 * torch::randn_like(p.value()));
        w["pe." + p.key()] = p.value().detach().clone();
      }
    }
    auto x = torch::randn({B, T, C});
    io::write_safetensors(file("w.safetensors"), w);
    io::write_npy(file("x.npy"), x);
    auto r = testing::run_cli("attn forward --x " + file("x.npy") + " --weights " + file("w.safetensors") +
                              " --n-head 4 --pe " + c.pe + (c.kv_shift ? " --kv-shift" : "") + " --qk-norm " +
                              c.qk_norm + " --out " + file("y.npy") + " --logits " + file("l.npy"));
    ASSERT_EQ(r.code, 0) << r.output;

    torch::NoGradGuard ng;
    auto q = torch::matmul(x, w["wq.weight"].t()).view({B, T, H, D});
    auto k = torch::matmul(x, w["wk.weight"].t()).view({B, T, H, D});
    auto v = torch::matmul(x, w["wv.weight"].t()).view({B, T, H, D});
    if (c.kv_shift) {
      auto shift = [&](const torch::Tensor& z, const torch::Tensor& g) {  // z_t = a z_{t-1} + (1-a) z_t
        auto a = torch::sigmoid(torch::matmul(x, g.t())).unsqueeze(-1);
        auto prev = torch::cat({torch::zeros_like(z.narrow(1, 0, 1)), z.narrow(1, 0, T - 1)}, 1);
        return a * prev + (1 - a) * z;
      };
      k = shift(k, w["kv_shift.w_k"]);
      v = shift(v, w["kv_shift.w_v"]);
    }
    auto rms = [](const torch::Tensor& z, const torch::Tensor& g) {
      return z / torch::sqrt(z.pow(2).mean(-1, true) + 1e-5) * g;
    };
    if (c.qk_norm == "before_rotation") q = rms(q, w["q_norm.weight"]), k = rms(k, w["k_norm.weight"]);
    auto st = enc->initial_state(B, 0);
    auto tokens = enc->encode(q, k, x, st);
    if (c.qk_norm == "after_rotation")
      tokens.q = rms(tokens.q, w["q_norm.weight"]), tokens.k = rms(tokens.k, w["k_norm.weight"]);
    auto logits = attention_logits(*enc, tokens, KeyCache::from(tokens));
    auto y = torch::matmul(torch::softmax(logits, -1), v.transpose(1, 2)).transpose(1, 2).reshape({B, T, C});
    y = torch::matmul(y, w["wo.weight"].t());
    EXPECT_LE(max_diff(io::read_npy(file("y.npy")), y), 1e-5);
    auto got = io::read_npy(file("l.npy"));
    ASSERT_EQ(got.sizes(), logits.sizes());
    auto low = torch::ones({T, T}, torch::kBool).tril();
    EXPECT_LE(max_diff(got.masked_select(low), logits.masked_select(low)), 1e-5);
    EXPECT_TRUE(torch::all(got.masked_select(low.logical_not()) == -INFINITY).item<bool>());
  }
  // A weight the sublayer does not have, and one it lacks, are named.
  io::write_safetensors(file("w.safetensors"), {{"wq.weight", torch::zeros({C, C})}});
  auto r = testing::run_cli("attn forward --x " + file("x.npy") + " --weights " + file("w.safetensors") +
                            " --n-head 4 --qk-norm off --out " + file("z.npy"));
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.output.find("missing weights wk.weight, wv.weight, wo.weight"), std::string::npos) << r.output;
  EXPECT_FALSE(std::filesystem::exists(file("z.npy")));
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace grape
