// `grape bench train|decode`: tokens/s of the presets on this machine, as a table and JSON.
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <functional>

#include "cli/bench_attention.hpp"
#include "cli/commands.hpp"
#include "cli/run_flags.hpp"
#include "grape/io.hpp"

namespace grape::cli {
namespace {

struct BenchArgs {
  std::vector<std::string> presets = {"tiny", "small"};
  std::string pe = "rope";
  std::string attention = "fused";
  std::vector<std::string> pe_sets;
  int64_t steps = 5, batch = 8, tokens = 64, context = 0;
  std::string json;
};

ModelConfig bench_model(const BenchArgs& a, const std::string& preset) {
  ModelConfig m = model_preset(preset);
  m.pe = a.pe;
  for (const auto& s : a.pe_sets) {
    const auto eq = s.find('=');
    if (eq == std::string::npos) throw std::invalid_argument("--pe-set expects key=value, got '" + s + "'");
    m.pe_options[s.substr(0, eq)] = s.substr(eq + 1);
  }
  if (a.context > 0) m.context = a.context;
  m.attention = a.attention;
  m.validate();
  return m;
}

void add_common(CLI::App* cmd, BenchArgs& a) {
  cmd->add_option("--preset", a.presets, "presets to measure (comma-separated)")->delimiter(',')->capture_default_str();
  cmd->add_option("--pe", a.pe, "position encoding")->capture_default_str();
  cmd->add_option("--pe-set", a.pe_sets, "encoding option key=value");
  cmd->add_option("--attention", a.attention, "fused or reference")
      ->check(CLI::IsMember({"fused", "reference"}))->capture_default_str();
  cmd->add_option("--batch", a.batch, "sequences")->capture_default_str();
  cmd->add_option("--context", a.context, "context length (default: the preset's)");
  cmd->add_option("--json", a.json, "also write the results as JSON here");
}

void finish(const BenchArgs& a, const std::string& table, const nlohmann::json& rows) {
  fmt::print("{}", table);
  if (!a.json.empty()) io::write_file_atomic(a.json, rows.dump(2) + "\n");
}

// One row per preset: builds the model (seed 0), measures tokens/s, prints the table and writes the JSON.
// `column` names the fourth column (context for training, generated tokens for decoding); measure sets it.
void measure_presets(const BenchArgs& a, const std::string& column,
                     const std::function<double(Transformer&, int64_t&)>& measure) {
  std::string table = "attention: " + a.attention + "\n" +
                      fmt::format("{:<8} {:<12} {:>12} {:>8} {:>8} {:>12}\n", "preset", "pe", "parameters", "batch",
                                  column, "tokens/s");
  nlohmann::json rows = nlohmann::json::array();
  for (const auto& preset : a.presets) {
    auto m = bench_model(a, preset);
    torch::manual_seed(0);
    Transformer model(m);
    int64_t value = 0;
    const double tps = measure(model, value);
    table += fmt::format("{:<8} {:<12} {:>12} {:>8} {:>8} {:>12.1f}\n", preset, m.pe, model->num_parameters(),
                         a.batch, value, tps);
    rows.push_back({{"preset", preset}, {"pe", m.pe}, {"parameters", model->num_parameters()}, {"batch", a.batch},
                    {column, value}, {"tokens_per_s", tps}, {"attention", a.attention},
                    {"threads", torch::get_num_threads()}});
  }
  finish(a, table, rows);
}

}  // namespace

void add_bench_command(CLI::App& app) {
  auto* bench = app.add_subcommand("bench", "measure throughput on this machine");
  bench->require_subcommand(1);
  add_bench_attention(bench);

  auto ta = std::make_shared<BenchArgs>();
  auto* tr = bench->add_subcommand("train", "training tokens/s (forward + backward + AdamW) per preset");
  add_common(tr, *ta);
  tr->add_option("--steps", ta->steps, "timed steps (after one warm-up step)")->capture_default_str();
  tr->callback([ta] {
    measure_presets(*ta, "context", [&](Transformer& model, int64_t& column) {
      const auto& m = model->config();
      column = m.context;
      train::TrainConfig cfg;
      cfg.batch = ta->batch;
      train::Trainer trainer(model, cfg);
      auto x = torch::randint(m.vocab_size, {ta->batch, m.context}, torch::kInt64);
      std::vector<data::Batch> mb = {{x, x.roll(-1, 1), {}}};
      trainer.step(mb, 0);  // warm-up: allocations, thread pool
      const auto t0 = std::chrono::steady_clock::now();
      for (int64_t s = 0; s < ta->steps; ++s) trainer.step(mb, s + 1);
      const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      return double(ta->steps * ta->batch * m.context) / sec;
    });
  });

  auto da = std::make_shared<BenchArgs>();
  da->batch = 1;
  auto* de = bench->add_subcommand("decode", "decoding tokens/s with the KV cache per preset");
  add_common(de, *da);
  de->add_option("--tokens", da->tokens, "tokens generated per sequence")->capture_default_str();
  de->callback([da] {
    measure_presets(*da, "tokens", [&](Transformer& model, int64_t& column) {
      column = da->tokens;
      return train::decode_tokens_per_s(model, da->batch, 16, da->tokens);
    });
  });
}

}  // namespace grape::cli
