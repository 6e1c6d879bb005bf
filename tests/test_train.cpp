// Training, checkpoints, resume, evaluation, generation and compare: the library functions and the CLI,
// on a very small model and a small generated text so the whole file runs in well under a minute.
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "cli_runner.hpp"
#include "grape/io.hpp"
#include "grape/train.hpp"
#include "run_dir_fixture.hpp"
#include "train/run_files.hpp"

namespace {

namespace fs = std::filesystem;
using grape::ModelConfig;
using grape::testing::run_cli;
using grape::train::TrainConfig;

class Train : public grape::testing::TinyRunTest {
 protected:
  Train() : TinyRunTest("grape_train_test_", 40000, 12, 2, 4, 2) {}
  // The CLI flags that give the same tiny model.
  std::string tiny_flags() const {
    return " --set n_layer=1 --set n_embd=32 --set n_head=2 --context 16 --batch 4 --warmup 2 --lr 3e-3"
           " --data " +
           path("text.txt") + " --set eval_batches=2";
  }

  std::vector<nlohmann::json> metrics(const std::string& run) const {
    std::vector<nlohmann::json> out;
    std::ifstream in(path(run) + "/metrics.jsonl");
    std::string line;
    while (std::getline(in, line)) out.push_back(nlohmann::json::parse(line));
    return out;
  }
};

TEST(TrainSchedule, WarmupThenCosineToTheMinimum) {
  TrainConfig c;
  c.lr = 1e-3;
  c.min_lr = 1e-4;
  c.warmup = 10;
  c.steps = 110;
  EXPECT_NEAR(grape::train::lr_at(c, 0), 1e-4, 1e-15);                  // 1/10 of the peak
  EXPECT_NEAR(grape::train::lr_at(c, 9), 1e-3, 1e-15);                  // peak at the end of warmup
  EXPECT_NEAR(grape::train::lr_at(c, 10), 1e-3, 1e-15);                 // cosine starts at the peak
  EXPECT_NEAR(grape::train::lr_at(c, 60), 0.5 * (1e-3 + 1e-4), 1e-12);  // half way
  EXPECT_NEAR(grape::train::lr_at(c, 110), 1e-4, 1e-15);
}

TEST(TrainConfigTest, JsonRoundTripAndClearErrors) {
  TrainConfig c;
  c.set("lr", "3e-4");
  c.set("steps", "77");
  c.set("data", "synthetic:copy");
  auto back = TrainConfig::from_json(c.to_json());
  EXPECT_EQ(back.to_json(), c.to_json());
  EXPECT_DOUBLE_EQ(back.lr, 3e-4);
  EXPECT_EQ(back.steps, 77);
  try {
    c.set("learning_rate", "1");
    FAIL() << "unknown key accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("known: steps"), std::string::npos) << e.what();
  }
  EXPECT_THROW(c.set("steps", "12x"), std::invalid_argument);
  EXPECT_THROW(c.set("seed", "-1"), std::invalid_argument);
  c.steps = 0;
  EXPECT_THROW(c.validate(), std::invalid_argument);
  EXPECT_THROW(TrainConfig::from_json("{\"lr\": [1]}"), std::invalid_argument);
  // The messages name the config (or the file) and the key.
  auto message = [](const std::function<void()>& fn) {
    try {
      fn();
    } catch (const std::invalid_argument& e) {
      return std::string(e.what());
    }
    return std::string("(no error)");
  };
  EXPECT_EQ(message([&] { c.set("steps", "12x"); }), "train config: steps='12x' is not an integer");
  EXPECT_EQ(message([&] { c.set("seed", "-1"); }), "train config: seed='-1' is not an integer >= 0");
  EXPECT_EQ(message([&] { c.set("lr", "fast", "run.toml [train]"); }),
            "run.toml [train]: lr='fast' is not a finite number");
  EXPECT_EQ(message([] {
              TrainConfig t;
              t.beta1 = 1;
              t.validate();
            }),
            "train config: beta1 must be in [0, 1), got 1");
  EXPECT_EQ(message([] { TrainConfig::from_json(R"({"lr": "3e-4"})"); }),
            "train config JSON: field 'lr' must be a number, got string (\"3e-4\")");
  EXPECT_EQ(message([] { TrainConfig::from_json(R"({"steps": 0})"); }),
            "train config: steps must be >= 1, got 0");
  EXPECT_NE(message([] {
              TrainConfig().set_section(R"({"learning_rate": 1})", "c.toml [train]");
            }).find("c.toml [train]: unknown setting 'learning_rate' (known: steps, batch"),
            std::string::npos);
  TrainConfig from_file;
  from_file.set_section(R"({"lr": "3e-4", "steps": 7, "data": "synthetic:copy"})", "c.toml [train]");
  EXPECT_DOUBLE_EQ(from_file.lr, 3e-4);
  EXPECT_EQ(from_file.steps, 7);
  // Every field: listed with its default, which set() takes back unchanged.
  for (const auto& f : TrainConfig::fields()) {
    TrainConfig t;
    t.set(f.name, f.default_value);
    EXPECT_EQ(t.to_json(), TrainConfig().to_json()) << f.name << "=" << f.default_value;
    EXPECT_TRUE(TrainConfig::has_key(f.name));
    EXPECT_FALSE(grape::ModelConfig::has_key(f.name)) << f.name << " is in both tables";
  }
  EXPECT_EQ(TrainConfig::fields().size(), 22u);
  EXPECT_EQ(TrainConfig().optimizer, "fused");
  EXPECT_EQ(TrainConfig().shards, 2);
  EXPECT_EQ(message([] { TrainConfig::from_json(R"({"shards": 0})"); }),
            "train config: shards must be >= 1, got 0");
  EXPECT_EQ(message([] { TrainConfig().set("optimizer", "sgd"); }),
            "train config: optimizer='sgd' is not one of fused|reference");
}

TEST(TrainSampling, GreedyTopKTopPAndTheDistribution) {
  auto logits = torch::tensor({1.0, 3.0, 2.0, 0.5}, torch::kFloat32);
  std::mt19937_64 rng(1);
  grape::train::SamplingOptions o;
  o.temperature = 0;
  EXPECT_EQ(grape::train::sample_token(logits, o, rng), 1);
  o.temperature = 1.0;
  o.top_k = 1;
  for (int i = 0; i < 20; ++i) EXPECT_EQ(grape::train::sample_token(logits, o, rng), 1);
  o.top_k = 0;
  o.top_p = 0.5;  // token 1 alone holds 0.64 of the mass
  for (int i = 0; i < 20; ++i) EXPECT_EQ(grape::train::sample_token(logits, o, rng), 1);
  // Plain sampling: frequencies within 4 standard errors of softmax over 20000 draws.
  o.top_p = 1.0;
  auto p = torch::softmax(logits.to(torch::kFloat64), 0);
  std::vector<int> count(4, 0);
  const int n = 20000;
  for (int i = 0; i < n; ++i) ++count[size_t(grape::train::sample_token(logits, o, rng))];
  for (int v = 0; v < 4; ++v) {
    const double pv = p[v].item<double>();
    EXPECT_NEAR(double(count[size_t(v)]) / n, pv, 4 * std::sqrt(pv * (1 - pv) / n)) << "token " << v;
  }
  // Same seed, same draws.
  std::mt19937_64 a(5), b(5);
  for (int i = 0; i < 50; ++i)
    EXPECT_EQ(grape::train::sample_token(logits, o, a), grape::train::sample_token(logits, o, b));
}

// `bench decode --ragged`'s path: 4 prompts of different lengths (bench_prompt_lengths) decoded greedily
// together give each sequence the logits of decoding it alone (1e-5), for a rotary, a linear-bias and a
// path-sum encoding.
TEST(TrainDecode, RaggedBatchedGreedyDecodeEqualsEachSequenceAlone) {
  EXPECT_EQ(grape::train::bench_prompt_lengths(16, 16, true).back(), 31);
  EXPECT_EQ(grape::train::bench_prompt_lengths(3, 16, false), (std::vector<int64_t>{16, 16, 16}));
  const auto lens = grape::train::bench_prompt_lengths(4, 6, true);
  ASSERT_EQ(lens, (std::vector<int64_t>{6, 7, 9, 10}));
  for (const std::string pe : {"rope", "fox", "grape-ap"}) {
    SCOPED_TRACE(pe);
    ModelConfig m;
    m.n_layer = 2, m.n_head = 2, m.n_embd = 32, m.pe = pe;
    torch::manual_seed(3);
    grape::Transformer model(m);
    std::vector<std::vector<int64_t>> prompts;
    for (size_t b = 0; b < lens.size(); ++b) {
      prompts.emplace_back();
      for (int64_t i = 0; i < lens[b]; ++i)
        prompts.back().push_back((int64_t(b) * 37 + i * 11) % m.vocab_size);
    }
    for (auto path :
         {grape::DecodePath::fast, grape::DecodePath::reference}) {  // all three run natively on fast
      SCOPED_TRACE(grape::to_string(path));
      grape::Decoder decoder(model, path);
      double seconds = -1;
      auto batched = grape::train::greedy_decode(decoder, prompts, 5, &seconds);
      EXPECT_GE(seconds, 0.0);
      ASSERT_EQ(batched.size(), prompts.size());
      for (size_t b = 0; b < prompts.size(); ++b) {
        auto alone = grape::train::greedy_decode(decoder, {prompts[b]}, 5);
        ASSERT_EQ(batched[b].sizes(), (torch::IntArrayRef{5, m.vocab_size}));
        EXPECT_LE((batched[b] - alone[0]).abs().max().item<double>(), 1e-5) << "row " << b;
        EXPECT_TRUE(torch::equal(batched[b].argmax(-1), alone[0].argmax(-1))) << "row " << b;
      }
    }
  }
}

// 50 AdamW steps of a 2-layer model on a learnable sequence task, with these block and optimizer settings;
// float64 runs the composed reference (block, attention, optimizer) in double precision: the oracle that
// tells how far float32 rounding alone moves the weights along this trajectory.
struct FiftySteps {
  std::vector<double> losses, grad_norms;
  grape::Transformer model;
  std::shared_ptr<grape::train::Trainer> trainer;
};
FiftySteps fifty_steps(const std::string& block, const std::string& optimizer, bool float64 = false) {
  ModelConfig m;
  m.n_layer = 2, m.n_head = 2, m.n_embd = 32, m.context = 32, m.block = block;
  if (float64) m.attention = "reference";
  torch::manual_seed(1);
  FiftySteps out{{}, {}, grape::Transformer(m), nullptr};
  if (float64) out.model->to(torch::kFloat64);
  TrainConfig cfg;
  cfg.batch = 4, cfg.steps = 50, cfg.warmup = 5, cfg.lr = 3e-3, cfg.optimizer = optimizer;
  out.trainer = std::make_shared<grape::train::Trainer>(out.model, cfg);
  for (int64_t s = 0; s < cfg.steps; ++s) {
    torch::manual_seed(1000 + s);  // x[b, t] = (start + t * stride) mod 31: the next token is learnable
    auto start = torch::randint(31, {4, 1}, torch::kInt64),
         stride = torch::randint(1, 4, {4, 1}, torch::kInt64);
    auto x = (start + torch::arange(33, torch::kInt64).unsqueeze(0) * stride).remainder(31);
    std::vector<grape::data::Batch> mb = {{x.narrow(1, 0, 32), x.narrow(1, 1, 32), {}}};
    const auto stats = out.trainer->step(mb, s);
    out.losses.push_back(stats.loss);
    out.grad_norms.push_back(stats.grad_norm);
  }
  return out;
}

// The float64 run of the reference, made once (the oracle of expect_same_training).
const FiftySteps& fifty_steps_in_float64() {
  static const FiftySteps oracle = fifty_steps("reference", "reference", /*float64=*/true);
  return oracle;
}

// The same losses (1e-4) and weights from two fifty_steps runs: each tensor within 1e-5 of its scale, or,
// where float32 rounding alone moves it further (AdamW's m / sqrt(v) turns rounding-level gradient
// differences into step-sized ones, and they compound over 50 steps: on an AVX2 machine the float32
// reference's w2 is 1.9e-5 from the float64 run's), within the reference's own distance from float64.
void expect_same_training(const FiftySteps& got, const FiftySteps& want) {
  EXPECT_LT(want.losses.back(), want.losses.front() - 1.0) << "the task is learnt";
  const auto& oracle = fifty_steps_in_float64();
  for (size_t s = 0; s < want.losses.size(); ++s) {
    EXPECT_NEAR(got.losses[s], want.losses[s], 1e-4) << "step " << s + 1;
    EXPECT_NEAR(oracle.losses[s], want.losses[s], 1e-4)
        << "step " << s + 1 << ": the oracle runs the same model";
  }
  auto weights = want.model->named_parameters(), exact = oracle.model->named_parameters();
  for (const auto& p : got.model->named_parameters()) {
    const auto& w = weights[p.key()];
    const double rounding = (w.to(torch::kFloat64) - exact[p.key()]).abs().max().item<double>();
    EXPECT_LE((p.value() - w).abs().max().item<double>(),
              std::max(1e-5 * std::max(1.0, w.abs().max().item<double>()), rounding))
        << p.key();
  }
}

// block=fused (the RMSNorm and SwiGLU kernels) against block=reference (LibTorch-composed).
TEST(TrainFused, FiftyStepsWithFusedBlockKernelsRepeatTheReference) {
  expect_same_training(fifty_steps("fused", "reference"), fifty_steps("reference", "reference"));
}

// optimizer=fused (the norm, clipping and AdamW on the kernels of src/kernels/cpu/adamw.hpp) against
// optimizer=reference (clip_grad_norm_ and torch::optim::AdamW::step), with clipping active in early steps:
// the same losses, gradient norms, weights, and AdamW state (kept in the optimizer, as resume needs).
TEST(TrainFused, FiftyStepsWithTheFusedOptimizerRepeatTheReference) {
  const auto want = fifty_steps("fused", "reference"), got = fifty_steps("fused", "fused");
  expect_same_training(got, want);
  EXPECT_GT(want.grad_norms.front(), 1.0) << "the first steps are clipped (grad_clip=1)";
  for (size_t s = 0; s < want.grad_norms.size(); ++s)
    EXPECT_NEAR(got.grad_norms[s], want.grad_norms[s], 1e-4 * want.grad_norms[s]) << "step " << s + 1;
  auto& a = got.trainer->optimizer();
  auto& b = want.trainer->optimizer();
  ASSERT_EQ(a.state().size(), got.model->parameters().size()) << "every parameter has its AdamW state";
  auto pa = got.model->parameters(), pb = want.model->parameters();
  for (size_t i = 0; i < pa.size(); ++i) {
    const auto& sa = static_cast<torch::optim::AdamWParamState&>(
        *a.state().at(c10::guts::to_string(pa[i].unsafeGetTensorImpl())));
    const auto& sb = static_cast<torch::optim::AdamWParamState&>(
        *b.state().at(c10::guts::to_string(pb[i].unsafeGetTensorImpl())));
    EXPECT_EQ(sa.step(), 50);
    EXPECT_EQ(sb.step(), 50);
    for (auto [ma, mb] : {std::pair{sa.exp_avg(), sb.exp_avg()}, std::pair{sa.exp_avg_sq(), sb.exp_avg_sq()}})
      EXPECT_LE((ma - mb).abs().max().item<double>(), 1e-4 * mb.abs().max().item<double>() + 1e-12)
          << "moment of parameter " << i;
  }
}

// ---- row shards (TrainConfig::shards) ---------------------------------------------------------------

// Three AdamW steps of a 1-layer model with `pe` on `threads` threads: the losses, the first step's
// gradients and the weights after the last. x has 5 rows (shards of uneven size); with a mask, the first
// two rows score nothing.
struct ShardedRun {
  std::vector<torch::Tensor> first_grads, weights;
  std::vector<double> losses;
};
ShardedRun sharded_run(const std::string& pe, int64_t shards, int threads, bool masked) {
  ModelConfig m;
  m.n_layer = 1, m.n_head = 2, m.n_embd = 32, m.context = 16, m.pe = pe;
  torch::manual_seed(3);
  grape::Transformer model(m);
  TrainConfig cfg;
  cfg.batch = 5, cfg.steps = 3, cfg.warmup = 1, cfg.shards = shards;
  grape::train::Trainer trainer(model, cfg);
  const int before = torch::get_num_threads();
  torch::set_num_threads(threads);
  ShardedRun out;
  for (int64_t s = 0; s < cfg.steps; ++s) {
    torch::manual_seed(50 + s);
    auto x = torch::randint(m.vocab_size, {5, 17}, torch::kInt64);
    grape::data::Batch b{x.narrow(1, 0, 16), x.narrow(1, 1, 16), {}};
    if (masked) {
      b.mask = torch::rand({5, 16});
      b.mask.narrow(0, 0, 2).zero_();
    }
    out.losses.push_back(trainer.step({b}, s).loss);
    if (s == 0)
      for (const auto& p : model->parameters()) out.first_grads.push_back(p.grad().clone());
  }
  torch::set_num_threads(before);
  for (const auto& p : model->parameters()) out.weights.push_back(p.detach().clone());
  return out;
}

TEST(TrainShards, ShardedStepsEqualOnePassAndAreTheSameAtAnyThreadCount) {
  // Every encoding: their forward and backward run on two threads at once, on shared weights.
  for (const auto& info : grape::encodings()) {
    SCOPED_TRACE(info.name);
    for (const bool masked : {false, true}) {
      SCOPED_TRACE(masked ? "masked" : "unmasked");
      const auto whole = sharded_run(info.name, 1, 1, masked);
      const auto two = sharded_run(info.name, 2, 2, masked);
      // The same sums, regrouped by rows: float rounding apart, the same loss and gradients (compared at
      // the first step: AdamW's m / sqrt(v) makes rounding-level differences of small gradients step-sized).
      EXPECT_NEAR(two.losses[0], whole.losses[0], 1e-6 * std::abs(whole.losses[0]));
      // (A tensor whose gradient is itself at rounding level, as some of FIRE's at init, 1e-10, is held to
      // 1e-7 of the largest gradient instead.)
      ASSERT_EQ(two.first_grads.size(), whole.first_grads.size());
      double largest = 0;
      for (const auto& g : whole.first_grads) largest = std::max(largest, g.abs().max().item<double>());
      for (size_t i = 0; i < whole.first_grads.size(); ++i) {
        const double scale = whole.first_grads[i].abs().max().item<double>();
        EXPECT_LE((two.first_grads[i] - whole.first_grads[i]).abs().max().item<double>(),
                  std::max(1e-5 * scale, 1e-7 * largest))
            << "gradient " << i;
      }
      // The shards' sums do not depend on the threads: bit for bit on 1 thread and on 2 (shards 2 and 3:
      // one shard each, and one thread taking two).
      for (const int64_t shards : {2, 3}) {
        const auto a = sharded_run(info.name, shards, 1, masked);
        const auto b = shards == 2 ? two : sharded_run(info.name, shards, 2, masked);
        EXPECT_EQ(a.losses, b.losses) << shards << " shards";
        for (size_t i = 0; i < a.weights.size(); ++i)
          EXPECT_TRUE(torch::equal(a.weights[i], b.weights[i])) << shards << " shards, weight " << i;
      }
    }
  }
}

TEST(TrainShards, AnErrorInALaterShardLeavesNoGradientBehind) {
  // Token ids out of the vocabulary in the last row only: the second shard throws after the first one's
  // backward; the step reports the model's error and the gradients are zero, as when one pass throws.
  ModelConfig m;
  m.n_layer = 1, m.n_head = 2, m.n_embd = 32, m.context = 16;
  torch::manual_seed(4);
  grape::Transformer model(m);
  TrainConfig cfg;
  cfg.batch = 4;
  grape::train::Trainer trainer(model, cfg);
  auto x = torch::randint(m.vocab_size, {4, 17}, torch::kInt64);
  trainer.step({{x.narrow(1, 0, 16), x.narrow(1, 1, 16), {}}}, 0);  // gradients defined and non-zero
  x[3][5] = m.vocab_size + 7;
  for (const int threads : {1, 2}) {
    const int before = torch::get_num_threads();
    torch::set_num_threads(threads);
    EXPECT_THROW(trainer.step({{x.narrow(1, 0, 16), x.narrow(1, 1, 16), {}}}, 1), std::invalid_argument)
        << threads << " threads";
    torch::set_num_threads(before);
    for (const auto& p : model->parameters())
      EXPECT_EQ(p.grad().abs().sum().item<double>(), 0.0) << threads << " threads";
  }
}

// What stops a step, in both implementations of the optimizer: a NaN gradient under a finite loss (the
// weights untouched, the gradients zeroed), a weight the step makes NaN (a damaged AdamW state: the
// parameter named), and amsgrad in a loaded state (the fused step refuses it).
TEST(TrainFused, NonFiniteGradientsAndWeightsStopTheStepInBothOptimizers) {
  for (const std::string optimizer : {"fused", "reference"}) {
    SCOPED_TRACE(optimizer);
    ModelConfig m;
    m.n_layer = 2, m.n_head = 2, m.n_embd = 32, m.context = 16;
    torch::manual_seed(2);
    grape::Transformer model(m);
    TrainConfig cfg;
    cfg.batch = 2, cfg.steps = 10, cfg.warmup = 1, cfg.optimizer = optimizer;
    grape::train::Trainer trainer(model, cfg);
    auto x = torch::randint(m.vocab_size, {2, 17}, torch::kInt64);
    std::vector<grape::data::Batch> mb = {{x.narrow(1, 0, 16), x.narrow(1, 1, 16), {}}};
    trainer.step(mb, 0);
    auto named = model->named_parameters();
    const auto keys = named.keys();
    auto error_of_step = [&](int64_t step) {
      try {
        trainer.step(mb, step);
      } catch (const grape::train::DivergedError& e) {
        return std::string(e.what());
      }
      return std::string("no error");
    };
    // A NaN gradient of one matrix.
    auto w = named[keys[3]];
    ASSERT_EQ(w.dim(), 2) << keys[3];
    const auto hook = w.register_hook([](torch::Tensor g) { return g * std::nan(""); });
    const auto before = model->parameters();
    std::vector<torch::Tensor> kept;
    for (const auto& p : before) kept.push_back(p.detach().clone());
    EXPECT_EQ(error_of_step(1), "step 2: the gradient norm is nan (diverged)");
    for (size_t i = 0; i < before.size(); ++i) {
      EXPECT_TRUE(torch::equal(before[i], kept[i])) << "weight " << i << " changed";
      EXPECT_EQ(before[i].grad().abs().sum().item<double>(), 0.0) << "gradient " << i << " not zeroed";
    }
    w.remove_hook(hook);
    // A NaN first moment of a parameter past the middle of the list.
    const auto& name = keys[keys.size() * 2 / 3];
    auto& state = static_cast<torch::optim::AdamWParamState&>(
        *trainer.optimizer().state().at(c10::guts::to_string(named[name].unsafeGetTensorImpl())));
    state.exp_avg().fill_(std::nan(""));
    EXPECT_EQ(error_of_step(2), "step 3: parameter '" + name + "' is not finite after the optimizer step");
  }
  // amsgrad only comes from a loaded optimizer.pt; the fused step says it does not implement it.
  ModelConfig m;
  m.n_layer = 1, m.n_head = 2, m.n_embd = 32, m.context = 16;
  grape::Transformer model(m);
  grape::train::Trainer trainer(model, TrainConfig{});
  static_cast<torch::optim::AdamWOptions&>(trainer.optimizer().param_groups()[1].options()).amsgrad(true);
  auto x = torch::randint(m.vocab_size, {2, 17}, torch::kInt64);
  try {
    trainer.step({{x.narrow(1, 0, 16), x.narrow(1, 1, 16), {}}}, 0);
    FAIL() << "stepped with amsgrad";
  } catch (const std::runtime_error& e) {
    EXPECT_EQ(
        std::string(e.what()),
        "optimizer=fused: the AdamW state asks for amsgrad, which the fused step does not implement (use "
        "--set optimizer=reference)");
  }
  // Moments of another type (a hand-made optimizer.pt) are refused, not misread.
  static_cast<torch::optim::AdamWOptions&>(trainer.optimizer().param_groups()[1].options()).amsgrad(false);
  trainer.step({{x.narrow(1, 0, 16), x.narrow(1, 1, 16), {}}}, 0);
  const auto first = model->parameters()[0];
  auto& state = static_cast<torch::optim::AdamWParamState&>(
      *trainer.optimizer().state().at(c10::guts::to_string(first.unsafeGetTensorImpl())));
  state.exp_avg(state.exp_avg().to(torch::kFloat64));
  try {
    trainer.step({{x.narrow(1, 0, 16), x.narrow(1, 1, 16), {}}}, 1);
    FAIL() << "stepped with float64 moments";
  } catch (const std::runtime_error& e) {
    EXPECT_EQ(std::string(e.what()),
              fmt::format("optimizer=fused: the AdamW moments of a parameter of shape {} are not contiguous "
                          "float32 tensors of its shape (use --set optimizer=reference)",
                          c10::str(first.sizes())));
  }
}

TEST_F(Train, LossFallsAndCheckpointsAreKeptLastK) {
  cfg.steps = 40;
  cfg.eval_every = 20;
  cfg.ckpt_every = 10;
  auto s = train("run");
  EXPECT_EQ(s.steps, 40);
  auto m = metrics("run");
  double first = -1, last = -1;
  for (const auto& r : m)
    if (r.contains("loss")) {
      if (first < 0) first = r["loss"];
      last = r["loss"];
    }
  EXPECT_NEAR(first, std::log(257.0), 0.3);  // starts near uniform over the byte vocabulary
  EXPECT_LT(last, first - 1.5) << "40 steps should learn the byte statistics";
  EXPECT_TRUE(std::isfinite(s.val_loss));
  EXPECT_LT(s.val_loss, first - 1.0);
  // keep_last = 2: steps 30 and 40 remain, latest points at 40.
  std::vector<std::string> kept;
  for (const auto& e : fs::directory_iterator(path("run/checkpoints")))
    if (e.is_directory()) kept.push_back(e.path().filename().string());
  std::sort(kept.begin(), kept.end());
  EXPECT_EQ(kept, (std::vector<std::string>{"step_00000030", "step_00000040"}));
  EXPECT_EQ(grape::train::latest_checkpoint(path("run")), path("run/checkpoints/step_00000040"));
}

TEST_F(Train, ResumedRunRepeatsTheUninterruptedOneExactly) {
  ASSERT_EQ(cfg.optimizer, "fused") << "the default optimizer is the one tested here";
  train("full");
  auto stopped = train("split", false, /*stop_after=*/6);
  EXPECT_TRUE(stopped.interrupted);
  EXPECT_EQ(stopped.steps, 6);
  auto resumed = train("split", /*resume=*/true);
  EXPECT_FALSE(resumed.interrupted);
  auto a = metrics("full"), b = metrics("split");
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_EQ(a[i]["step"], b[i]["step"]);
    for (const char* key : {"loss", "val_loss", "grad_norm", "lr"})
      if (a[i].contains(key))
        EXPECT_EQ(a[i][key].get<double>(), b[i][key].get<double>()) << key << " at " << a[i]["step"];
  }
  auto wa = grape::io::read_safetensors(path("full/checkpoints/step_00000012/model.safetensors"));
  auto wb = grape::io::read_safetensors(path("split/checkpoints/step_00000012/model.safetensors"));
  ASSERT_EQ(wa.size(), wb.size());
  for (const auto& [name, t] : wa) EXPECT_TRUE(torch::equal(t, wb.at(name))) << name;
}

// A run may change its optimizer's implementation on --resume: both keep AdamW's state in its own
// optimizer.pt, so 6 steps on the reference and 6 fused give the losses of 12 fused (within rounding).
TEST_F(Train, ResumeMaySwitchBetweenTheReferenceAndTheFusedOptimizer) {
  train("full");
  cfg.optimizer = "reference";
  train("split", false, /*stop_after=*/6);
  auto run = grape::train::read_run(path("split"));
  ASSERT_EQ(run.train.optimizer, "reference");
  // --print-config previews what the resume will run with (it once kept the run's optimizer).
  auto r = run_cli("train --resume --out " + path("split") + " --set optimizer=fused --print-config");
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_EQ(nlohmann::json::parse(r.output)["train"]["optimizer"], "fused") << r.output;
  grape::train::TrainOptions o;
  o.run_dir = path("split"), o.quiet = true, o.resume = true, o.resume_with_settings = true;
  auto asked = run.train;
  asked.optimizer = "fused";
  grape::train::run_training(run.model, asked, o);
  EXPECT_EQ(grape::train::read_run(path("split")).train.optimizer, "fused");
  auto a = metrics("full"), b = metrics("split");
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i)
    for (const char* key : {"loss", "val_loss"})
      if (a[i].contains(key))
        EXPECT_NEAR(a[i][key].get<double>(), b[i][key].get<double>(), 1e-4) << key << " at " << a[i]["step"];
}

// Reads of checkpoint files by read_checkpoint since `before` (the library counts them per path).
std::map<std::string, int> reads_since(const std::map<std::string, int>& before) {
  std::map<std::string, int> out;
  for (const auto& [file, n] : grape::train::detail::checkpoint_file_reads()) {
    const int d = n - (before.count(file) ? before.at(file) : 0);
    if (d != 0)
      out[fs::path(file).parent_path().filename().string() + "/" + fs::path(file).filename().string()] = d;
  }
  return out;
}

TEST_F(Train, ResumeAndLoadingReadEachCheckpointFileOnce) {
  cfg.ckpt_every = 2;
  train("run", false, /*stop_after=*/4);
  using Reads = std::map<std::string, int>;
  auto before = grape::train::detail::checkpoint_file_reads();
  train("run", /*resume=*/true, /*stop_after=*/6);
  EXPECT_EQ(reads_since(before), (Reads{{"step_00000004/state.json", 1},
                                        {"step_00000004/model.safetensors", 1},
                                        {"step_00000004/optimizer.pt", 1}}));
  // A damaged latest checkpoint is read as far as its damage, the previous one once.
  std::string bytes = grape::io::read_file(path("run/checkpoints/step_00000006/model.safetensors"));
  bytes[bytes.size() / 2] ^= 0x10;
  grape::io::write_file_atomic(path("run/checkpoints/step_00000006/model.safetensors"), bytes);
  before = grape::train::detail::checkpoint_file_reads();
  train("run", /*resume=*/true, /*stop_after=*/8);
  EXPECT_EQ(reads_since(before), (Reads{{"step_00000006/state.json", 1},
                                        {"step_00000006/model.safetensors", 1},
                                        {"step_00000004/state.json", 1},
                                        {"step_00000004/model.safetensors", 1},
                                        {"step_00000004/optimizer.pt", 1}}));
  // Loading a model for eval/generate: each file once as well.
  before = grape::train::detail::checkpoint_file_reads();
  grape::train::load_model(grape::train::read_run(path("run")));
  EXPECT_EQ(reads_since(before), (Reads{{"step_00000008/state.json", 1},
                                        {"step_00000008/model.safetensors", 1},
                                        {"step_00000008/optimizer.pt", 1}}));
}

TEST_F(Train, CorruptOrMismatchedCheckpointsAreRefusedByName) {
  train("run");
  const std::string ck = path("run/checkpoints/step_00000012");
  auto run = grape::train::read_run(path("run"));
  // Another encoding: the error names both.
  ModelConfig other = run.model;
  other.pe = "alibi";
  grape::Transformer m_alibi(other);
  try {
    grape::train::load_weights(m_alibi, ck);
    FAIL() << "accepted a rope checkpoint for alibi";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("'rope'"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("'alibi'"), std::string::npos) << e.what();
  }
  // Another shape: the error names the tensor and both shapes.
  ModelConfig wider = run.model;
  wider.n_embd = 64;
  grape::Transformer m_wide(wider);
  try {
    grape::train::load_weights(m_wide, ck);
    FAIL() << "accepted a checkpoint of another width";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("has shape"), std::string::npos) << e.what();
  }
  // One flipped byte, then a truncation: checksum mismatch.
  std::string bytes = grape::io::read_file(ck + "/model.safetensors");
  bytes[bytes.size() - 3] ^= 0x40;
  grape::io::write_file_atomic(ck + "/model.safetensors", bytes);
  grape::Transformer m(run.model);
  EXPECT_THROW(grape::train::load_weights(m, ck), std::runtime_error);
  grape::io::write_file_atomic(ck + "/model.safetensors", bytes.substr(0, bytes.size() / 2));
  try {
    grape::train::load_weights(m, ck);
    FAIL() << "accepted a truncated checkpoint";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("checksum mismatch"), std::string::npos) << e.what();
  }
}

TEST_F(Train, NonFiniteLossStopsAndKeepsTheLastGoodCheckpoint) {
  auto r = run_cli("train" + tiny_flags() + " --steps 12 --ckpt-every 2 --out " + path("run") + " --quiet",
                   "GRAPE_FAULT=nan-at-step:7");
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find("step 7: the loss is nan"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("step_00000006"), std::string::npos) << r.output;
  EXPECT_EQ(grape::train::latest_checkpoint(path("run")), path("run/checkpoints/step_00000006"));
  auto run = grape::train::read_run(path("run"));
  EXPECT_NO_THROW(grape::train::load_model(run));
}

TEST_F(Train, CrashWhileWritingACheckpointLeavesThePreviousOne) {
  auto first =
      run_cli("train" + tiny_flags() + " --steps 4 --ckpt-every 2 --out " + path("run") + " --quiet");
  ASSERT_EQ(first.code, 0) << first.output;
  auto crash =
      run_cli("train --resume --steps 6 --out " + path("run") + " --quiet", "GRAPE_FAULT=checkpoint");
  EXPECT_EQ(crash.code, 3) << crash.output;  // the fault hook's exit, half-way through writing step 6
  EXPECT_EQ(grape::train::latest_checkpoint(path("run")), path("run/checkpoints/step_00000004"));
  auto run = grape::train::read_run(path("run"));
  EXPECT_NO_THROW(grape::train::load_model(run));
  auto again = run_cli("train --resume --steps 6 --out " + path("run") + " --quiet");
  ASSERT_EQ(again.code, 0) << again.output;
  EXPECT_EQ(grape::train::latest_checkpoint(path("run")), path("run/checkpoints/step_00000006"));
  EXPECT_FALSE(fs::exists(path("run/checkpoints/.tmp.step_00000006")));
}

TEST_F(Train, CtrlCStopsWithACheckpointAndResumeFinishes) {
  const std::string log = path("train.log");
  const std::string cmd = std::string(GRAPE_CLI_PATH) + " --threads 1 train" + tiny_flags() +
                          " --steps 100000 --ckpt-every 1000 --eval-every 0 --out " + path("run") +
                          " --quiet > " + log + " 2>&1";
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    execl("/bin/sh", "sh", "-c", ("exec " + cmd).c_str(), (char*)nullptr);
    _exit(127);
  }
  // Wait until training has taken a few steps, then Ctrl-C.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (metrics("run").size() < 3 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  ASSERT_GE(metrics("run").size(), 3u) << grape::io::read_file(log);
  kill(pid, SIGINT);
  int status = 0;
  waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFEXITED(status)) << grape::io::read_file(log);
  EXPECT_EQ(WEXITSTATUS(status), 130) << grape::io::read_file(log);
  const auto ck = grape::train::latest_checkpoint(path("run"));
  const int64_t step = std::stoll(fs::path(ck).filename().string().substr(5));
  EXPECT_GE(step, 3);
  auto state = nlohmann::json::parse(grape::io::read_file(ck + "/state.json"));
  EXPECT_EQ(state["step"].get<int64_t>(), step);
  auto r =
      run_cli("train --resume --steps " + std::to_string(step + 2) + " --out " + path("run") + " --quiet");
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_EQ(grape::train::latest_checkpoint(path("run")),
            path("run/checkpoints/step_" + std::string(8 - std::to_string(step + 2).size(), '0') +
                 std::to_string(step + 2)));
}

TEST_F(Train, EvalAtLongerContextsAndGenerateFromTheRun) {
  train("run");
  auto r = run_cli("eval --run " + path("run") + " --factors 1,2,4 --tokens 512");
  ASSERT_EQ(r.code, 0) << r.output;
  // One file per checkpoint, named by its step, recording it (a later checkpoint's eval keeps this one).
  auto j = nlohmann::json::parse(grape::io::read_file(path("run/eval/step_00000012.json")));
  EXPECT_EQ(j["step"], 12);
  EXPECT_NE(r.output.find("checkpoint step_00000012"), std::string::npos) << r.output;
  ASSERT_EQ(j["lengths"].size(), 3u);
  for (const auto& l : j["lengths"]) {
    EXPECT_TRUE(l.contains("loss")) << l.dump();
    EXPECT_GT(l["loss"].get<double>(), 0.5);
    EXPECT_LT(l["loss"].get<double>(), std::log(257.0) + 0.5);
  }
  EXPECT_EQ(j["lengths"][2]["context"], 64);
  auto g = run_cli("generate --run " + path("run") + " --prompt 'the lord' --max-tokens 20 --seed 3");
  ASSERT_EQ(g.code, 0) << g.output;
  EXPECT_EQ(g.output.rfind("the lord", 0), 0u) << g.output;
  EXPECT_GT(g.output.size(), std::string("the lord").size() + 1) << g.output;
  // The speed goes to stderr after the text, and the context note: past 16 tokens.
  EXPECT_NE(g.output.find("\n20 tokens in "), std::string::npos) << g.output;
  EXPECT_NE(g.output.find(" tokens/s (prompt of up to 9 tokens included)"), std::string::npos) << g.output;
  EXPECT_NE(g.output.find("note: past 16 tokens the model read more than its training context"),
            std::string::npos)
      << g.output;
  // Same seed, same text.
  auto g2 = run_cli("generate --run " + path("run") + " --prompt 'the lord' --max-tokens 20 --seed 3");
  EXPECT_EQ(g.output.substr(0, g.output.find("\n20 tokens in ")),
            g2.output.substr(0, g2.output.find("\n20 tokens in ")));
}

TEST_F(Train, BatchedGenerationWithDifferentPromptLengthsEqualsEachAlone) {
  train("run");
  auto run = grape::train::read_run(path("run"));
  auto model = grape::train::load_model(run);
  grape::train::SamplingOptions o;
  o.temperature = 0;  // greedy: the same tokens must come out
  o.max_tokens = 24;
  std::vector<std::vector<int32_t>> prompts = {
      {256, 't', 'h', 'e'}, {256, 'm', 'o', 's', 'e', 's', ' ', 'a', 'n', 'd'}, {256}};
  auto together = grape::train::generate(model, prompts, o);
  for (size_t i = 0; i < prompts.size(); ++i) {
    auto alone = grape::train::generate(model, {prompts[i]}, o);
    EXPECT_EQ(together[i], alone[0]) << "prompt " << i;
    EXPECT_EQ(together[i].size(), 24u);
  }
}

// The fast decode path generates what the reference path (the oracle) generates, in the library and the CLI,
// for rope and for grape-ap (its path-integral probes computed in the engine).
TEST_F(Train, GenerationOnTheFastPathEqualsTheReferencePath) {
  for (const std::string pe : {"rope", "grape-ap"}) {
    SCOPED_TRACE(pe);
    model.pe = pe;
    const std::string run_dir = "run-" + pe;
    train(run_dir);
    auto run = grape::train::read_run(path(run_dir));
    auto m = grape::train::load_model(run);
    EXPECT_EQ(grape::fast_decode_unsupported(m), "");  // the fast path runs
    grape::train::SamplingOptions o;
    o.temperature = 0;
    o.max_tokens = 24;
    std::vector<std::vector<int32_t>> prompts = {{256, 't', 'h', 'e'}, {256, 'a', 'n', 'd', ' ', 'g', 'o'}};
    auto fast = grape::train::generate(m, prompts, o);
    o.decode = grape::DecodePath::reference;
    auto reference = grape::train::generate(m, prompts, o);
    EXPECT_EQ(fast, reference);
    auto f = run_cli("generate --run " + path(run_dir) + " --prompt 'the lord' --max-tokens 20 --seed 3");
    auto r = run_cli("generate --run " + path(run_dir) +
                     " --prompt 'the lord' --max-tokens 20 --seed 3 --decode reference");
    ASSERT_EQ(f.code, 0) << f.output;
    ASSERT_EQ(r.code, 0) << r.output;
    EXPECT_NE(f.output.find("decode: fast"), std::string::npos) << f.output;
    EXPECT_NE(r.output.find("decode: reference"), std::string::npos) << r.output;
    EXPECT_EQ(f.output.substr(0, f.output.find("\n20 tokens in ")),
              r.output.substr(0, r.output.find("\n20 tokens in ")));
  }
  auto bad = run_cli("generate --run " + path("run-rope") + " --prompt x --decode quick");
  EXPECT_NE(bad.code, 0);
  EXPECT_NE(bad.output.find("--decode"), std::string::npos) << bad.output;
}

TEST_F(Train, LearnedEncodingBeyondItsTableIsReportedNotFatal) {
  model.pe = "learned";
  model.pe_options = {{"max_len", "32"}};
  train("run");
  auto run = grape::train::read_run(path("run"));
  auto m = grape::train::load_model(run);
  auto tok = grape::train::run_tokenizer(run);
  auto data = grape::data::open_data(cfg.data, *tok);
  auto report = grape::train::evaluate(m, *data, {1, 2, 4}, 256);
  ASSERT_EQ(report.lengths.size(), 3u);
  EXPECT_TRUE(report.lengths[0].error.empty());
  EXPECT_TRUE(report.lengths[1].error.empty());
  EXPECT_NE(report.lengths[2].error.find("max_len"), std::string::npos) << report.lengths[2].error;
  EXPECT_NE(grape::train::eval_table(report).find("n/a"), std::string::npos);
}

TEST_F(Train, CompareWritesResultsReportAndPlots) {
  auto r = run_cli("compare --pe rope,alibi --steps 4" + tiny_flags() +
                   " --factors 1,2 --eval-tokens 256 --out " + path("cmp") + " --quiet");
  ASSERT_EQ(r.code, 0) << r.output;
  auto j = nlohmann::json::parse(grape::io::read_file(path("cmp/results.json")));
  ASSERT_EQ(j["runs"].size(), 2u);
  EXPECT_EQ(j["runs"][0]["pe"], "rope");
  EXPECT_EQ(j["runs"][1]["pe"], "alibi");
  for (const auto& run : j["runs"]) {
    EXPECT_GT(run["train_tokens_per_s"].get<double>(), 0);
    EXPECT_GT(run["decode_tokens_per_s"].get<double>(), 0);
    EXPECT_EQ(run["eval"]["lengths"].size(), 2u);
  }
  auto md = grape::io::read_file(path("cmp/report.md"));
  EXPECT_NE(md.find("| rope |"), std::string::npos) << md;
  EXPECT_NE(md.find("| alibi |"), std::string::npos) << md;
  EXPECT_NE(md.find("![training loss](loss.png)"), std::string::npos) << md;
  for (const char* png : {"cmp/loss.png", "cmp/perplexity.png"}) {
    auto bytes = grape::io::read_file(path(png));
    ASSERT_GT(bytes.size(), 1000u) << png;
    EXPECT_EQ(bytes.substr(1, 3), "PNG") << png;
  }
  // Running it again finds it complete: the report stays as it was (it once became val loss 0.0000 and
  // negative tokens/s).
  const std::string results = grape::io::read_file(path("cmp/results.json"));
  auto again = run_cli("compare --pe rope,alibi --steps 4" + tiny_flags() +
                       " --factors 1,2 --eval-tokens 256 --out " + path("cmp") + " --quiet");
  ASSERT_EQ(again.code, 0) << again.output;
  EXPECT_NE(again.output.find("grape compare: " + path("cmp") + " is complete"), std::string::npos)
      << again.output;
  EXPECT_EQ(grape::io::read_file(path("cmp/report.md")), md);
  EXPECT_EQ(grape::io::read_file(path("cmp/results.json")), results);
  // Another budget is refused, naming it, before anything trains (it once extended the old runs).
  auto longer = run_cli("compare --pe rope,alibi --steps 6" + tiny_flags() +
                        " --factors 1,2 --eval-tokens 256 --out " + path("cmp") + " --quiet");
  EXPECT_EQ(longer.code, 1) << longer.output;
  EXPECT_NE(
      longer.output.find(path("cmp/runs/rope") + " holds a run of an earlier compare with other settings: "
                                                 "steps=4 (asked: 6); choose another --out, or remove it"),
      std::string::npos)
      << longer.output;
  EXPECT_EQ(grape::train::read_run(path("cmp/runs/rope")).train.steps, 4);
  EXPECT_EQ(grape::train::latest_checkpoint(path("cmp/runs/rope")),
            path("cmp/runs/rope/checkpoints/step_00000004"));
  // Other evaluation settings reuse the finished runs: their numbers come from their logs, not garbage.
  auto more = run_cli("compare --pe rope,alibi --steps 4" + tiny_flags() +
                      " --factors 1 --eval-tokens 256 --out " + path("cmp") + " --quiet");
  ASSERT_EQ(more.code, 0) << more.output;
  auto j2 = nlohmann::json::parse(grape::io::read_file(path("cmp/results.json")));
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_DOUBLE_EQ(j2["runs"][i]["val_loss"].get<double>(), j["runs"][i]["val_loss"].get<double>());
    EXPECT_DOUBLE_EQ(j2["runs"][i]["final_train_loss"].get<double>(),
                     j["runs"][i]["final_train_loss"].get<double>());
    EXPECT_GT(j2["runs"][i]["train_tokens_per_s"].get<double>(), 0);
    EXPECT_EQ(j2["runs"][i]["eval"]["lengths"].size(), 1u);
  }
}

TEST_F(Train, ConfigFilesTomlAndJsonThenFlagsOverride) {
  grape::io::write_file_atomic(path("c.toml"),
                               "[model]\nn_layer = 1\nn_embd = 32\nn_head = 2\ncontext = 16\npe = \"alibi\"\n"
                               "[train]\nsteps = 3\nbatch = 2\nlr = 2e-3\ndata = \"" +
                                   path("text.txt") + "\"\n");
  auto r = run_cli("train --config " + path("c.toml") + " --batch 3 --out " + path("t") + " --quiet");
  ASSERT_EQ(r.code, 0) << r.output;
  auto run = grape::train::read_run(path("t"));
  EXPECT_EQ(run.model.pe, "alibi");
  EXPECT_EQ(run.model.n_layer, 1);
  EXPECT_EQ(run.model.context, 16);
  EXPECT_EQ(run.train.steps, 3);
  EXPECT_EQ(run.train.batch, 3);  // the flag wins over the file
  EXPECT_DOUBLE_EQ(run.train.lr, 2e-3);
  grape::io::write_file_atomic(path("c.json"),
                               "{\"model\": {\"n_layer\": 1, \"n_embd\": 32, \"n_head\": 2, "
                               "\"context\": 16, \"pe\": \"fox\"}, \"train\": {\"steps\": 2, "
                               "\"data\": \"" +
                                   path("text.txt") + "\"}}");
  r = run_cli("train --config " + path("c.json") + " --out " + path("j") + " --quiet");
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_EQ(grape::train::read_run(path("j")).model.pe, "fox");
  grape::io::write_file_atomic(path("bad.toml"), "[model]\nn_layer = = 3\n");
  r = run_cli("train --config " + path("bad.toml") + " --out " + path("b"));
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.output.find("not valid TOML"), std::string::npos) << r.output;
  grape::io::write_file_atomic(path("bad2.toml"), "[model]\nlayers = 3\n");
  r = run_cli("train --config " + path("bad2.toml") + " --out " + path("b"));
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.output.find("layers"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find(path("bad2.toml") + " [model]: unknown setting 'layers'"), std::string::npos)
      << r.output;
  // A bad value names the file, the section and the key.
  grape::io::write_file_atomic(path("bad3.toml"), "[model]\nn_layer = \"abc\"\n");
  r = run_cli("train --config " + path("bad3.toml") + " --out " + path("b"));
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.output.find(path("bad3.toml") + " [model]: n_layer='abc' is not an integer"), std::string::npos)
      << r.output;
  grape::io::write_file_atomic(path("bad4.json"), R"({"train": {"warmup": -1}})");
  r = run_cli("train --config " + path("bad4.json") + " --out " + path("b"));
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.output.find("train config: warmup must be >= 0, got -1"), std::string::npos) << r.output;
}

TEST_F(Train, SetHelpListsEveryFieldWithItsDefaultAndUnknownKeysListBothConfigs) {
  auto r = run_cli("train --help");
  ASSERT_EQ(r.code, 0) << r.output;
  for (const char* line : {"n_layer=4", "transformer blocks (>= 1)", "pe.OPTION=", "attention=fused",
                           "lr=0.001", "seed=42", "val_fraction=0.1", "data=bible"})
    EXPECT_NE(r.output.find(line), std::string::npos) << line << "\n" << r.output;
  r = run_cli("train --set n_layers=3 --out " + path("a"));
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(
      r.output.find(
          "--set: unknown setting 'n_layers' (did you mean 'n_layer'? model: preset, vocab_size, n_layer"),
      std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("; train: steps, batch"), std::string::npos) << r.output;
  r = run_cli("train --set lr=fast --out " + path("a"));
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.output.find("--set: lr='fast' is not a finite number"), std::string::npos) << r.output;
  r = run_cli("train --set n_layer --out " + path("a"));
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.output.find("--set 'n_layer' must look like key=value"), std::string::npos) << r.output;
}

TEST_F(Train, SyntheticTaskRunReportsExactMatchAccuracy) {
  cfg.data = "synthetic:addition:digits=2";
  cfg.steps = 6;
  train("run");
  auto run = grape::train::read_run(path("run"));
  auto m = grape::train::load_model(run);
  auto tok = grape::train::run_tokenizer(run);
  auto data = grape::data::open_data(cfg.data, *tok);
  auto report = grape::train::evaluate(m, *data, {1}, 256, /*task_examples=*/20);
  ASSERT_EQ(report.tasks.size(), 1u);
  EXPECT_EQ(report.tasks[0].label, "digits=2");
  EXPECT_EQ(report.tasks[0].total, 20);
  EXPECT_GE(report.tasks[0].correct, 0);
  EXPECT_LE(report.tasks[0].correct, 20);
  EXPECT_TRUE(std::isfinite(report.lengths[0].loss));  // val loss on the answer tokens only
  auto r = run_cli("eval --run " + path("run") + " --factors 1 --tokens 256 --examples 10");
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("digits=2"), std::string::npos) << r.output;
}

TEST_F(Train, SentencePieceRunKeepsItsTokenizer) {
  auto t = run_cli("tokenizer train --input " + path("text.txt") + " --vocab 320 --out " + path("tok.model"));
  ASSERT_EQ(t.code, 0) << t.output;
  auto r = run_cli("train" + tiny_flags() + " --steps 3 --tokenizer " + path("tok.model") + " --out " +
                   path("run") + " --quiet");
  ASSERT_EQ(r.code, 0) << r.output;
  auto run = grape::train::read_run(path("run"));
  EXPECT_EQ(run.model.vocab_size, 320);
  EXPECT_TRUE(fs::exists(path("run/tokenizer.model")));
  fs::remove(path("tok.model"));  // the run must not depend on the original file
  auto g = run_cli("generate --run " + path("run") + " --prompt 'the lord' --max-tokens 8 --seed 1");
  ASSERT_EQ(g.code, 0) << g.output;
  EXPECT_EQ(g.output.rfind("the lord", 0), 0u) << g.output;
}

TEST_F(Train, BadInputGetsOneClearLine) {
  struct Case {
    std::string args, expect;
  };
  const std::vector<Case> cases = {
      {"train --preset huge --out " + path("a"), "huge"},
      {"train --pe spiral --out " + path("a"), "spiral"},
      {"train --set n_layers=3 --out " + path("a"), "n_layers"},
      {"train --data " + path("missing.txt") + " --out " + path("a"), "missing.txt"},
      {"train --resume --out " + path("nothing"), "not a grape run directory"},
      {"eval --run " + path("nothing"), "not a grape run directory"},
      {"generate --run " + path("nothing"), "not a grape run directory"},
      {"compare --pe rope,spiral --out " + path("c"), "spiral"},
      {"train --config " + path("text.txt") + " --out " + path("a"), "not valid JSON"},
  };
  // Out-of-range numbers are refused by the flag parser (its own exit code), never silently ignored.
  for (const char* flag : {"--steps -5", "--batch 0", "--lr -1", "--warmup -2"}) {
    auto r = run_cli(std::string("train ") + flag + " --out " + path("a"));
    EXPECT_NE(r.code, 0) << flag << "\n" << r.output;
    EXPECT_NE(r.output.find(std::string(flag).substr(0, std::string(flag).find(' '))), std::string::npos)
        << r.output;
  }
  for (const auto& c : cases) {
    auto r = run_cli(c.args);
    EXPECT_EQ(r.code, 1) << c.args << "\n" << r.output;
    EXPECT_NE(r.output.find(c.expect), std::string::npos) << c.args << "\n" << r.output;
    EXPECT_NE(r.output.find("error"), std::string::npos) << c.args << "\n" << r.output;
  }
  // An existing run is never overwritten by a new one.
  train("run");
  auto r = run_cli("train" + tiny_flags() + " --steps 2 --out " + path("run"));
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.output.find("already holds a run"), std::string::npos) << r.output;
}

}  // namespace

// ---- issue 17: the CLI as researchers expect ------------------------------------------------------------

TEST_F(Train, ResumeRefusesConflictsKeepsTimeAndFindsItsDataFromAnywhere) {
  // Started with a relative --data from the test directory: run.json records it absolute.
  auto r = run_cli(
      "train --set n_layer=1 --set n_embd=32 --set n_head=2 --context 16 --batch 4 --warmup 2 --lr 3e-3 "
      "--set "
      "eval_batches=2 --steps 4 --eval-every 2 --data text.txt --out run --quiet",
      "cd " + dir.string() + " &&");
  ASSERT_EQ(r.code, 0) << r.output;
  auto run = grape::train::read_run(path("run"));
  EXPECT_EQ(run.train.data, path("text.txt"));
  EXPECT_FALSE(run.data_fingerprint.empty());
  // A conflicting setting is refused, naming it (it once trained rope silently).
  r = run_cli("train --resume --pe alibi --steps 6 --out " + path("run"));
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find("--resume: " + path("run") + " was trained with pe=rope (asked: alibi)"),
            std::string::npos)
      << r.output;
  r = run_cli("train --resume --set n_embd=64 --lr 1e-2 --out " + path("run"));
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find("n_embd=32 (asked: 64), lr=0.003 (asked: 0.01)"), std::string::npos) << r.output;
  // Resumed from another directory, with a new budget: time_s goes on from where it stopped.
  r = run_cli("train --resume --steps 6 --out " + path("run") + " --quiet", "cd / &&");
  ASSERT_EQ(r.code, 0) << r.output;
  auto m = metrics("run");
  double last_time = 0;
  for (const auto& rec : m) {
    EXPECT_GE(rec["time_s"].get<double>(), last_time) << rec.dump();
    last_time = rec["time_s"].get<double>();
  }
  // The same data under another path is taken (checked by its tokens); other data is named in a warning.
  fs::copy_file(path("text.txt"), path("copy.txt"));
  r = run_cli("train --resume --steps 8 --data " + path("copy.txt") + " --out " + path("run"));
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_NE(
      r.output.find("the run's data is now " + path("copy.txt") + " (the same tokens as " + path("text.txt")),
      std::string::npos)
      << r.output;
  grape::io::write_file_atomic(path("other.txt"), grape::io::read_file(path("text.txt")).substr(100));
  r = run_cli("train --resume --steps 10 --data " + path("other.txt") + " --out " + path("run"));
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("warning: " + path("other.txt") + " is not the data this run was trained on"),
            std::string::npos)
      << r.output;
  // Asked again, a finished run reports its own losses, not "val loss 0.0000".
  const auto last_val = metrics("run").back();
  ASSERT_EQ(last_val["split"], "val");
  r = run_cli("train --resume --out " + path("run"));
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("already finished at step 10"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find(fmt::format("val loss {:.4f}", last_val["val_loss"].get<double>())),
            std::string::npos)
      << r.output;
  EXPECT_EQ(r.output.find("val loss 0.0000"), std::string::npos) << r.output;
  // run.json keeps every resume with its command.
  auto j = nlohmann::json::parse(grape::io::read_file(path("run/run.json")));
  ASSERT_EQ(j["resumed"].size(), 4u) << j.dump();
  EXPECT_EQ(j["resumed"][0]["step"], 4);
}

TEST_F(Train, OutputsRecordSplitTokensProvenanceAndBitsPerByte) {
  auto r = run_cli("train" + tiny_flags() + " --steps 4 --eval-every 2 --out " + path("run"));
  ASSERT_EQ(r.code, 0) << r.output;
  // Training and validation records tell themselves apart, and count the tokens seen (4 x 16 per step).
  auto m = metrics("run");
  ASSERT_EQ(m.size(), 6u);
  EXPECT_EQ(m[0]["split"], "train");
  EXPECT_EQ(m[0]["tokens"], 64);
  EXPECT_EQ(m[2]["split"], "val");
  EXPECT_EQ(m[2]["step"], 2);
  EXPECT_EQ(m[2]["tokens"], 128);
  // Byte tokenizer: the summary gives bits per byte = val loss / ln 2.
  const double val = m.back()["val_loss"].get<double>();
  EXPECT_NE(r.output.find(fmt::format("val loss {:.4f} ({:.4f} bits/byte)", val, val / std::log(2.0))),
            std::string::npos)
      << r.output;
  // Where the numbers come from.
  auto j = nlohmann::json::parse(grape::io::read_file(path("run/run.json")));
  const auto& p = j["provenance"];
  EXPECT_EQ(p["command"].get<std::string>().rfind("grape --threads 1 train --set n_layer=1", 0), 0u)
      << p.dump();
  EXPECT_EQ(p["git_commit"], grape::train::git_commit());
  EXPECT_FALSE(p["host"].get<std::string>().empty());
  EXPECT_NE(p["blas"].get<std::string>().find("threads"), std::string::npos) << p.dump();
  EXPECT_EQ(p["threads"], 1);
  // Eval: bits per byte beside nats per token.
  r = run_cli("eval --run " + path("run") + " --factors 1 --tokens 256");
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("bits/byte"), std::string::npos) << r.output;
  auto e = nlohmann::json::parse(grape::io::read_file(path("run/eval/step_00000004.json")));
  EXPECT_NEAR(e["lengths"][0]["bits_per_byte"].get<double>(),
              e["lengths"][0]["loss"].get<double>() / std::log(2.0), 1e-12);
  // --steps ending inside the warmup is worth a warning.
  r = run_cli("train" + tiny_flags() + " --steps 2 --out " + path("short"));
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("warning: --steps 2 ends inside the warmup (2 steps)"), std::string::npos)
      << r.output;
}

TEST_F(Train, CliNamesVersionPrintConfigAndHelp) {
  auto r = run_cli("trian");
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.output.find("unknown command 'trian' (did you mean 'train'?"), std::string::npos) << r.output;
  r = run_cli("train --stpes 3");
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.output.find("unknown option --stpes (did you mean --steps?)"), std::string::npos) << r.output;
  r = run_cli("train --pe rpoe --out " + path("x"));
  EXPECT_NE(r.output.find("unknown encoding 'rpoe' (did you mean 'rope'?"), std::string::npos) << r.output;
  r = run_cli("--version");
  EXPECT_EQ(r.code, 0);
  EXPECT_EQ(r.output, "grape " + grape::train::version() + "\n");
  EXPECT_NE(r.output.find(grape::train::git_commit()), std::string::npos);
  // --print-config: the settings run.json would record, and nothing written.
  r = run_cli("train" + tiny_flags() + " --steps 3 --print-config --out " + path("p"));
  ASSERT_EQ(r.code, 0) << r.output;
  auto j = nlohmann::json::parse(r.output);
  EXPECT_EQ(j["model"]["vocab_size"], 257);
  EXPECT_EQ(j["model"]["n_embd"], 32);
  EXPECT_EQ(j["train"]["steps"], 3);
  EXPECT_EQ(j["train"]["data"], path("text.txt"));
  EXPECT_FALSE(fs::exists(path("p")));
  // Preset shapes in --help; the synthetic tasks with their options in `grape data`.
  r = run_cli("train --help");
  EXPECT_NE(r.output.find("small   6 layers, 6 heads, width 384, context 256"), std::string::npos)
      << r.output;
  r = run_cli("data");
  ASSERT_EQ(r.code, 0) << r.output;
  for (const char* s : {"copy", "length=16", "digits=3", "pairs=8", "depth=uniform", "loss=answer"})
    EXPECT_NE(r.output.find(s), std::string::npos) << s << "\n" << r.output;
  // compare: its own defaults are documented, and never override --set (they once did).
  r = run_cli("compare --help");
  EXPECT_NE(r.output.find("compare's own defaults"), std::string::npos) << r.output;
  r = run_cli("compare --pe rope --set steps=7 --set lr=0.01 --set warmup=3 --print-config");
  ASSERT_EQ(r.code, 0) << r.output;
  j = nlohmann::json::parse(r.output);
  EXPECT_EQ(j["train"]["steps"], 7);
  EXPECT_DOUBLE_EQ(j["train"]["lr"].get<double>(), 0.01);
  EXPECT_EQ(j["train"]["warmup"], 3);
  EXPECT_DOUBLE_EQ(j["train"]["min_lr"].get<double>(), 3e-4);  // compare's default where nothing was given
  r = run_cli("compare --pe rope --print-config");
  j = nlohmann::json::parse(r.output);
  EXPECT_EQ(j["train"]["steps"], 200);
  EXPECT_DOUBLE_EQ(j["train"]["lr"].get<double>(), 3e-3);
}

TEST_F(Train, ListOptionsTakeListsAndExtendNeedsAFactor) {
  auto r = run_cli("bench decode --preset tiny --pe rope,alibi --tokens 4 --batch 1");
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find(" rope "), std::string::npos) << r.output;
  EXPECT_NE(r.output.find(" alibi "), std::string::npos) << r.output;
  r = run_cli("bench decode --preset tiny --tokens 2 --batch 3 --ragged --profile --json " +
              path("decode.json"));
  ASSERT_EQ(r.code, 0) << r.output;
  auto rows = nlohmann::json::parse(grape::io::read_file(path("decode.json")));
  EXPECT_EQ(rows[0]["prompt_lengths"], nlohmann::json({16, 21, 26})) << rows.dump();
  // --profile: the steps' phases in ms, within the step's time (batch / tokens per second).
  const auto& prof = rows[0]["profile"];
  ASSERT_TRUE(prof.is_object()) << rows.dump();
  EXPECT_NEAR(prof["step_ms"].get<double>(), 3e3 / rows[0]["tokens_per_s"].get<double>(), 1e-9);
  EXPECT_GT(prof["products_ms"].get<double>(), 0.0);
  EXPECT_GT(prof["products_gflops"].get<double>(), 0.0);
  EXPECT_LE(
      prof["products_ms"].get<double>() + prof["attention_ms"].get<double>() + prof["other_ms"].get<double>(),
      prof["step_ms"].get<double>());
  EXPECT_NE(r.output.find("per step ("), std::string::npos) << r.output;
  r = run_cli("check --pe rope,alibi");
  ASSERT_EQ(r.code, 0) << r.output;
  train("run");
  r = run_cli("eval --run " + path("run") + " --extend yarn");
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find("--extend yarn needs --factor S"), std::string::npos) << r.output;
}

TEST_F(Train, GenerateCropSeesOnlyTheLastContextTokens) {
  // With crop, each token is predicted from the last `crop` tokens at positions 0.. (as nanoGPT does): the
  // same as a full forward pass over that window.
  torch::manual_seed(0);
  grape::Transformer net(model);
  grape::train::SamplingOptions s;
  s.temperature = 0;
  s.max_tokens = 30;
  s.crop = 8;
  const std::vector<int32_t> prompt = {256, 't', 'h', 'e'};
  const auto out = grape::train::generate(net, {prompt}, s)[0];
  ASSERT_EQ(out.size(), 30u);
  std::vector<int32_t> seq = prompt;
  torch::NoGradGuard no_grad;
  net->eval();
  for (size_t t = 0; t < out.size(); ++t) {
    const size_t n = std::min<size_t>(seq.size(), 8);
    std::vector<int64_t> window(seq.end() - int64_t(n), seq.end());
    auto logits = net->forward(torch::tensor(window, torch::kInt64).unsqueeze(0));
    const int32_t next = int32_t(logits[0][int64_t(n) - 1].argmax().item<int64_t>());
    ASSERT_EQ(out[t], next) << "token " << t;
    seq.push_back(next);
  }
  s.crop = 1;
  EXPECT_THROW(grape::train::generate(net, {prompt}, s), std::invalid_argument);
}

TEST_F(Train, PreTokenizedShardsTrainWithTheirVocabularyAndDecodeWithABpe) {
  // GPT-2 ids up to 1000 (once refused: "token ID ... >= vocab size 257").
  fs::create_directories(path("d"));
  std::vector<int32_t> train(3000), val(600);
  for (int i = 0; i < 3000; ++i) train[i] = (i * 37) % 1001;
  for (int i = 0; i < 600; ++i) val[i] = (i * 11) % 1001;
  grape::data::write_token_shard(path("d/x_train_000001.bin"), train);
  grape::data::write_token_shard(path("d/x_val_000000.bin"), val);
  const std::string flags =
      " --set n_layer=1 --set n_embd=32 --set n_head=2 --context 16 --batch 4 --warmup 1"
      " --steps 2 --set eval_batches=2 --tokenizer none --data " +
      path("d");
  auto r = run_cli("train" + flags + " --out " + path("a"));
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("the largest token id in " + path("d") + " is 1000; vocab_size = 1024"),
            std::string::npos)
      << r.output;
  EXPECT_EQ(grape::train::read_run(path("a")).model.vocab_size, 1024);
  EXPECT_EQ(grape::train::read_run(path("a")).tokenizer, "none");
  // --set vocab_size is kept (it was silently overwritten by the tokenizer's).
  r = run_cli("train" + flags + " --set vocab_size=50304 --out " + path("b") + " --quiet");
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_EQ(grape::train::read_run(path("b")).model.vocab_size, 50304);
  r = run_cli("train" + flags + " --set vocab_size=500 --out " + path("c") + " --quiet");
  EXPECT_EQ(r.code, 1) << r.output;
  r = run_cli("eval --run " + path("a") + " --factors 1 --tokens 128");
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_EQ(r.output.find("bits/byte"), std::string::npos) << r.output;  // ids are not bytes
  // generate needs the vocabulary the ids came from.
  r = run_cli("generate --run " + path("a") + " --max-tokens 3");
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find("give the vocabulary the data was tokenized with, e.g. --tokenizer"),
            std::string::npos)
      << r.output;
  // A GPT-2 style vocabulary of the model's size: 256 bytes, 767 merges of "a" runs, end-of-text last.
  nlohmann::json vocab = nlohmann::json::object(), merges = nlohmann::json::array();
  auto symbol = [](int b) {
    int next = 256;
    for (int c = 0; c < b; ++c)
      if (!((c >= '!' && c <= '~') || (c >= 0xA1 && c <= 0xAC) || (c >= 0xAE && c <= 0xFF))) ++next;
    const bool direct = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    const int cp = direct ? b : next;
    return cp < 0x80 ? std::string(1, char(cp))
                     : std::string{char(0xC0 | (cp >> 6)), char(0x80 | (cp & 0x3F))};
  };
  for (int b = 0; b < 256; ++b) vocab[symbol(b)] = b;
  for (int i = 2; i <= 768; ++i) {
    vocab[std::string(size_t(i), 'a')] = 254 + i;
    merges.push_back(std::string(size_t(i - 1), 'a') + " a");
  }
  vocab["<|endoftext|>"] = 1023;
  grape::io::write_file_atomic(
      path("tok.json"),
      nlohmann::json{{"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", merges}}}}.dump());
  r = run_cli("generate --run " + path("a") + " --tokenizer " + path("tok.json") +
              " --prompt aaaa --max-tokens 3");
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_EQ(r.output.rfind("aaaa", 0), 0u) << r.output;
  EXPECT_NE(r.output.find("3 tokens in "), std::string::npos) << r.output;
}

TEST_F(Train, CompareSeedsReportMeanSpreadAndValidationInThePlots) {
  auto r = run_cli("compare --pe rope,alibi --steps 3 --seeds 2 --eval-every 3" + tiny_flags() +
                   " --factors 1 --eval-tokens 128 --out " + path("cmp") + " --quiet");
  ASSERT_EQ(r.code, 0) << r.output;
  for (const char* run : {"cmp/runs/rope", "cmp/runs/rope-seed43", "cmp/runs/alibi", "cmp/runs/alibi-seed43"})
    EXPECT_TRUE(fs::exists(path(run) + "/run.json")) << run;
  EXPECT_EQ(grape::train::read_run(path("cmp/runs/rope-seed43")).train.seed, 43u);
  auto j = nlohmann::json::parse(grape::io::read_file(path("cmp/results.json")));
  ASSERT_EQ(j["runs"].size(), 2u);
  for (const auto& run : j["runs"]) {
    ASSERT_EQ(run["seeds"].size(), 2u) << run.dump();
    const double a = run["seeds"][0]["val_loss"], b = run["seeds"][1]["val_loss"];
    EXPECT_NE(a, b);  // other seeds, other runs
    EXPECT_NEAR(run["spread"]["val_loss"]["mean"].get<double>(), (a + b) / 2, 1e-12);
    EXPECT_NEAR(run["spread"]["val_loss"]["sd"].get<double>(), std::abs(a - b) / std::sqrt(2.0), 1e-12);
  }
  auto md = grape::io::read_file(path("cmp/report.md"));
  EXPECT_NE(md.find(" ± "), std::string::npos) << md;
  EXPECT_NE(md.find("val loss vs best"), std::string::npos) << md;
  EXPECT_NE(md.find("pairs beyond the seed spread"), std::string::npos) << md;
  EXPECT_NE(md.find("Command: `grape --threads 1 compare"), std::string::npos) << md;
  // The validation points beside the training curve: step, mean and sd over the seeds.
  auto val = grape::io::read_file(path("cmp/val_rope.dat"));
  const double mean = j["runs"][0]["spread"]["val_loss"]["mean"],
               sd = j["runs"][0]["spread"]["val_loss"]["sd"];
  EXPECT_EQ(val, fmt::format("3 {:.6f} {:.6f}\n", mean, sd));
}

TEST_F(Train, TrainingStepsReuseFreedMemoryUnlessTheUserSetsMalloc) {
  // glibc handed the activations of each step back to the system, and the next step page-faulted them in
  // again (22,000 faults per tiny step, ~10% of a small step): `grape` keeps freed memory (src/cli/main.cpp).
  auto faults = [&](const std::string& env) {
    auto r = run_cli("bench train --preset tiny --batch 16 --steps 2 --json " + path("faults.json"), env);
    EXPECT_EQ(r.code, 0) << r.output;
    return nlohmann::json::parse(grape::io::read_file(path("faults.json")))[0]["page_faults_per_step"]
        .get<double>();
  };
  const double kept = faults(""), user = faults("GLIBC_TUNABLES=glibc.malloc.check=0");
  EXPECT_LT(kept, 6000) << "page faults per step";      // measured 1,600
  EXPECT_GT(user, 3 * kept) << "page faults per step";  // glibc's defaults: measured 22,000
}

TEST_F(Train, BenchTrainTimesTheStepsMatrixProductsInTheStep) {
  // The GEMMs' seconds inside a step (docs/performance.md, "ceiling in step"): every product of the step is
  // counted once per shard — per linear layer (q, k, v, o, w1, w2, w_out) and the tied head: forward, dX and
  // dW — on whichever thread runs the shard.
  for (const int shards : {1, 2}) {
    auto r =
        run_cli(fmt::format("bench train --preset tiny --batch 2 --context 32 --steps 2 --shards {} "
                            "--json {}",
                            shards, path("gemm.json")));
    ASSERT_EQ(r.code, 0) << r.output;
    const auto row = nlohmann::json::parse(grape::io::read_file(path("gemm.json")))[0];
    EXPECT_EQ(row["shards"], shards) << row.dump();
    EXPECT_EQ(row["gemm_calls_per_step"].get<double>(), shards * (7 * 4 + 1) * 3) << row.dump();
    const double gemm = row["gemm_seconds_per_step"], step = row["clocked_step_seconds"];
    EXPECT_GT(gemm, 0.0) << row.dump();
    EXPECT_LT(gemm, step) << row.dump();
  }
}

TEST_F(Train, IdleOpenMpWorkersSpinBrieflyUnlessTheUserSaysOtherwise) {
  // libgomp's default spin (300,000 iterations) made 2 threads 2-95x slower than 1 when another process
  // kept a core busy: grape restarts itself with a short spin before libgomp reads it (src/cli/threads.cpp).
  auto r = run_cli("train" + tiny_flags() + " --steps 1 --out " + path("a") + " --quiet");
  ASSERT_EQ(r.code, 0) << r.output;
  auto p = nlohmann::json::parse(grape::io::read_file(path("a/run.json")))["provenance"];
  EXPECT_EQ(p["gomp_spincount"], "100000") << p.dump();
  // A value the user set is theirs.
  r = run_cli("train" + tiny_flags() + " --steps 1 --out " + path("b") + " --quiet", "GOMP_SPINCOUNT=777");
  ASSERT_EQ(r.code, 0) << r.output;
  p = nlohmann::json::parse(grape::io::read_file(path("b/run.json")))["provenance"];
  EXPECT_EQ(p["gomp_spincount"], "777") << p.dump();
  r = run_cli("train" + tiny_flags() + " --steps 1 --out " + path("c") + " --quiet",
              "OMP_WAIT_POLICY=active");
  ASSERT_EQ(r.code, 0) << r.output;
  p = nlohmann::json::parse(grape::io::read_file(path("c/run.json")))["provenance"];
  EXPECT_EQ(p["gomp_spincount"], "") << p.dump();
}
