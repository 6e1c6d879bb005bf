// `grape bench train|decode`: tokens/s of the presets on this machine, as a table and JSON.
#include <ATen/record_function.h>
#include <fmt/format.h>
#include <sys/resource.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>

#include "cli/bench_attention.hpp"
#include "cli/bench_decode.hpp"
#include "cli/commands.hpp"
#include "cli/run_flags.hpp"
#include "grape/attention.hpp"
#include "grape/distributed.hpp"
#include "grape/io.hpp"

namespace grape::cli {
namespace {

struct StepClock {  // bench train: the GEMMs' seconds in a step, from extra steps timed with a GemmClock
  double gemm_seconds = -1, gemm_calls = -1, step_seconds = -1;
};

struct BenchArgs {
  std::vector<std::string> presets = {"tiny", "small"};
  std::vector<std::string> pes = {"rope"};
  std::string attention = "fused";
  std::string block = "fused";
  std::string optimizer;  // bench train: the trainer's optimizer setting (fused or reference)
  int64_t shards = 0;     // bench train: the trainer's row shards per batch (0 elsewhere)
  std::vector<std::string> pe_sets;
  int64_t steps = 5, batch = 8, tokens = 64, context = 0;
  int nproc = 1;                // bench train: also N data-parallel processes x 1 thread
  double faults_per_step = -1;  // bench train: set by each measurement, written to its JSON row
  StepClock clock;              // bench train: likewise
  std::string json;
};

// The (preset, encoding) pairs measured, presets outermost.
std::vector<std::pair<std::string, std::string>> cases(const BenchArgs& a) {
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& preset : a.presets)
    for (const auto& pe : a.pes) out.emplace_back(preset, pe);
  return out;
}

ModelConfig bench_model(const BenchArgs& a, const std::string& preset, const std::string& pe) {
  ModelConfig m = model_preset(preset);
  m.pe = pe;
  for (const auto& s : a.pe_sets) {
    auto [key, value] = split_key_value(s, "--pe-set");
    m.pe_options[key] = value;
  }
  if (a.context > 0) m.context = a.context;
  m.attention = a.attention;
  m.block = a.block;
  m.validate();
  return m;
}

void add_common(CLI::App* cmd, BenchArgs& a) {
  cmd->add_option("--preset", a.presets, "presets to measure (comma-separated)")
      ->delimiter(',')
      ->capture_default_str();
  cmd->add_option("--pe", a.pes, "position encodings (comma-separated)")
      ->delimiter(',')
      ->capture_default_str();
  cmd->add_option("--pe-set", a.pe_sets, "encoding option key=value (applied to each encoding)");
  cmd->add_option("--attention", a.attention, "fused or reference")
      ->check(CLI::IsMember({"fused", "reference"}))
      ->capture_default_str();
  cmd->add_option("--block", a.block, "RMSNorm and SwiGLU: fused or reference")
      ->check(CLI::IsMember({"fused", "reference"}))
      ->capture_default_str();
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
  std::string table = "attention: " + a.attention + "; block: " + a.block +
                      (a.optimizer.empty() ? "" : "; optimizer: " + a.optimizer) +
                      (a.shards > 0 ? "; shards: " + std::to_string(a.shards) : "") +
                      "; threads: " + std::to_string(torch::get_num_threads()) +
                      "; BLAS: " + train::blas_description() + "\n" +
                      fmt::format("{:<8} {:<12} {:>12} {:>8} {:>8} {:>12}\n", "preset", "pe", "parameters",
                                  "batch", column, "tokens/s");
  nlohmann::json rows = nlohmann::json::array();
  for (const auto& [preset, pe] : cases(a)) {
    auto m = bench_model(a, preset, pe);
    torch::manual_seed(0);
    Transformer model(m);
    int64_t value = 0;
    const double tps = measure(model, value);
    table += fmt::format("{:<8} {:<12} {:>12} {:>8} {:>8} {:>12.1f}\n", preset, m.pe, model->num_parameters(),
                         a.batch, value, tps);
    rows.push_back({{"preset", preset},
                    {"pe", m.pe},
                    {"parameters", model->num_parameters()},
                    {"batch", a.batch},
                    {column, value},
                    {"tokens_per_s", tps},
                    {"attention", a.attention},
                    {"block", a.block},
                    {"threads", torch::get_num_threads()}});
    if (!a.optimizer.empty()) rows.back()["optimizer"] = a.optimizer;
    if (a.shards > 0) rows.back()["shards"] = a.shards;
    if (a.faults_per_step >= 0) rows.back()["page_faults_per_step"] = a.faults_per_step;
    if (a.clock.gemm_seconds >= 0) {
      rows.back()["gemm_seconds_per_step"] = a.clock.gemm_seconds;
      rows.back()["gemm_calls_per_step"] = a.clock.gemm_calls;
      rows.back()["clocked_step_seconds"] = a.clock.step_seconds;
    }
  }
  finish(a, table, rows);
}

long minor_faults() {
  rusage u{};
  ::getrusage(RUSAGE_SELF, &u);
  return u.ru_minflt;
}

// Seconds spent inside the matrix-product operators (aten::mm, addmm(_), bmm, baddbmm) while a GemmClock
// lives, by this thread and the threads that run a training step's shards (they inherit its thread-local
// callbacks): the time the GEMMs of a step take in the step itself, with the caches as the step leaves them
// (the same products timed alone, hot, run faster). The backward's products are counted too: LibTorch runs
// a CPU backward on the calling thread. One clock at a time.
class GemmClock {
 public:
  GemmClock() {
    nanoseconds_ = 0, calls_ = 0;
    handle_ = at::addThreadLocalCallback(
        at::RecordFunctionCallback(&started, &ended).scopes({at::RecordScope::FUNCTION}));
  }
  ~GemmClock() { at::removeCallback(handle_); }
  GemmClock(const GemmClock&) = delete;
  GemmClock& operator=(const GemmClock&) = delete;
  double seconds() const { return 1e-9 * double(nanoseconds_); }
  int64_t calls() const { return calls_; }

 private:
  struct Started : at::ObserverContext {
    std::chrono::steady_clock::time_point at = std::chrono::steady_clock::now();
  };
  static std::unique_ptr<at::ObserverContext> started(const at::RecordFunction& fn) {
    for (const char* name : {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm"})
      if (std::strcmp(fn.name(), name) == 0) return std::make_unique<Started>();
    return nullptr;
  }
  static void ended(const at::RecordFunction&, at::ObserverContext* ctx) {
    if (ctx == nullptr) return;
    nanoseconds_ += std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() -
                                                                         static_cast<Started*>(ctx)->at)
                        .count();
    ++calls_;
  }
  static std::atomic<int64_t> nanoseconds_, calls_;
  at::CallbackHandle handle_;
};
std::atomic<int64_t> GemmClock::nanoseconds_ = 0, GemmClock::calls_ = 0;

// Training tokens/s of `model`: one warm-up step, then a.steps timed AdamW steps on a fixed random batch.
// With a group, each rank steps on its own batch of a.batch sequences and the gradients are averaged
// (the real data-parallel step); the figure is then for all ranks together.
// faults_per_step (if given): the minor page faults of this process per timed step (memory the allocator
// handed back to the system and takes again; near 0 when freed memory is kept, see main.cpp).
double train_tokens_per_s(const BenchArgs& a, Transformer& model, const std::shared_ptr<dist::Group>& group,
                          double* faults_per_step = nullptr, StepClock* clock = nullptr) {
  const auto& m = model->config();
  train::TrainConfig cfg;
  cfg.batch = a.batch;
  cfg.optimizer = a.optimizer;
  if (a.shards > 0) cfg.shards = a.shards;
  train::Trainer trainer(model, cfg);
  trainer.set_group(group);
  const int world = group ? group->size() : 1;
  torch::manual_seed(group ? 100 + group->rank() : 100);
  auto x = torch::randint(m.vocab_size, {a.batch, m.context}, torch::kInt64);
  std::vector<data::Batch> mb = {{x, x.roll(-1, 1), {}}};
  trainer.step(mb, 0);  // warm-up: allocations, thread pool, Gloo buffers
  if (group) group->barrier();
  const long faults0 = minor_faults();
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t s = 0; s < a.steps; ++s) trainer.step(mb, s + 1);
  if (group) group->barrier();
  const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (faults_per_step)
    *faults_per_step = double(minor_faults() - faults0) / double(std::max<int64_t>(a.steps, 1));
  if (clock && !group) {  // after the timed steps, so the clock's own cost stays out of tokens/s
    GemmClock gemms;
    const auto c0 = std::chrono::steady_clock::now();
    for (int64_t s = 0; s < a.steps; ++s) trainer.step(mb, a.steps + s + 1);
    const double steps = double(std::max<int64_t>(a.steps, 1));
    clock->step_seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - c0).count() / steps;
    // Shards running at once overlap their products: seconds of the step's wall time, as if evenly spread.
    const auto workers = train::shard_workers(cfg.shards, a.batch, torch::get_num_threads());
    clock->gemm_seconds = gemms.seconds() / steps / double(workers);
    clock->gemm_calls = double(gemms.calls()) / steps;
  }
  return double(world * a.steps * a.batch * m.context) / sec;
}

// Seconds of the attention alone in one training step of `m`: n_layer x (forward + backward) of the fused or
// reference attention, encoding included, on random q, k, v of the step's shape (best of 3 rounds of 3
// calls).
double attention_seconds_per_step(const ModelConfig& m, int64_t batch, bool fused) {
  const auto sh = m.head_shape();
  torch::manual_seed(0);
  auto enc = make_encoding(m.pe, sh, PeOptions(m.pe_options));
  auto leaf = [&](std::vector<int64_t> size) { return torch::randn(size).requires_grad_(true); };
  auto q = leaf({batch, m.context, sh.heads, sh.head_dim}),
       k = leaf({batch, m.context, sh.heads, sh.head_dim});
  auto v = leaf({batch, m.context, sh.heads, sh.head_dim}), x = leaf({batch, m.context, sh.model_dim});
  auto g = torch::randn({batch, m.context, sh.heads, sh.head_dim});
  auto call = [&] {
    auto state = enc->initial_state(batch);
    auto y = fused ? fused_attention(*enc, q, k, v, x, state) : reference_attention(*enc, q, k, v, x, state);
    (y * g).sum().backward();
  };
  call();  // warm-up
  double best = 1e300;
  for (int round = 0; round < 3; ++round) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < 3; ++i) call();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / 3);
  }
  return best * double(m.n_layer);
}

// `bench train --breakdown`: fused and reference steps side by side, and how much of a reference step the
// attention takes. Amdahl: with attention at a share f of the step, no attention kernel can speed the step up
// by more than 1 / (1 - f). f comes from the attention timed alone, which is cheaper than inside the model's
// step (there the composed path's T x T tensors of every layer stay alive until the backward), so at long
// contexts the measured fused/reference can exceed this estimate; at short ones it is the limit.
void bench_train_breakdown(const BenchArgs& a) {
  std::string table =
      fmt::format(
          "BLAS: {}\ntraining step, batch {}; attention = n_layer x (forward + backward) of the attention "
          "alone, encoding included\n",
          train::blas_description(), a.batch) +
      fmt::format("{:<8} {:<10} {:>8} {:>11} {:>11} {:>8} {:>9} {:>9} {:>9} {:>8} {:>10}\n", "preset", "pe",
                  "context", "ref tok/s", "fused tok/s", "f/r", "step ref", "attn ref", "attn fus", "share",
                  "amdahl f/r");
  nlohmann::json rows = nlohmann::json::array();
  for (const auto& [preset, pe] : cases(a)) {
    double tps[2] = {0, 0};  // reference, fused: the better of two alternating measurements each
    ModelConfig m;
    for (int round = 0; round < 2; ++round)
      for (int fused = 0; fused < 2; ++fused) {
        BenchArgs b = a;
        b.attention = fused ? "fused" : "reference";
        m = bench_model(b, preset, pe);
        torch::manual_seed(0);
        Transformer model(m);
        tps[fused] = std::max(tps[fused], train_tokens_per_s(b, model, nullptr));
      }
    const double step_ref = double(a.batch * m.context) / tps[0];
    const double att_ref = attention_seconds_per_step(m, a.batch, false);
    const double att_fused = attention_seconds_per_step(m, a.batch, true);
    const double share = att_ref / step_ref, amdahl = 1.0 / std::max(1e-9, 1.0 - share);
    table += fmt::format(
        "{:<8} {:<10} {:>8} {:>11.1f} {:>11.1f} {:>7.2f}x {:>7.1f}ms {:>7.1f}ms {:>7.1f}ms {:>7.0f}% "
        "{:>10.2f}x\n",
        preset, m.pe, m.context, tps[0], tps[1], tps[1] / tps[0], step_ref * 1e3, att_ref * 1e3,
        att_fused * 1e3, 100 * share, amdahl);
    rows.push_back({{"preset", preset},
                    {"pe", m.pe},
                    {"context", m.context},
                    {"batch", a.batch},
                    {"reference_tokens_per_s", tps[0]},
                    {"fused_tokens_per_s", tps[1]},
                    {"fused_over_reference", tps[1] / tps[0]},
                    {"reference_step_ms", step_ref * 1e3},
                    {"reference_attention_ms", att_ref * 1e3},
                    {"fused_attention_ms", att_fused * 1e3},
                    {"attention_share", share},
                    {"amdahl_fused_over_reference", amdahl},
                    {"threads", torch::get_num_threads()}});
  }
  finish(a, table, rows);
}

// A worker of `bench train --nproc N`: measures every preset data-parallel; rank 0 writes the figures to
// the file the launcher named in GRAPE_BENCH_RESULT.
void bench_train_worker(const BenchArgs& a, const dist::Env& env) {
  torch::set_num_threads(1);
  auto group = dist::Group::join(env);
  nlohmann::json rows = nlohmann::json::array();
  for (const auto& [preset, pe] : cases(a)) {
    auto m = bench_model(a, preset, pe);
    torch::manual_seed(0);
    Transformer model(m);
    rows.push_back({{"preset", preset}, {"pe", pe}, {"tokens_per_s", train_tokens_per_s(a, model, group)}});
  }
  const char* out = std::getenv("GRAPE_BENCH_RESULT");
  if (group->rank() == 0 && out != nullptr) io::write_file_atomic(out, rows.dump() + "\n");
}

// `bench train --nproc N`: 1 process x 1 thread, measured here, then N processes x 1 thread, side by side.
// Efficiency = tokens/s of N processes / (N x tokens/s of one): 1 is perfect scaling.
void bench_train_scaling(const BenchArgs& a) {
  torch::set_num_threads(1);
  std::vector<double> single;
  std::vector<int64_t> params, contexts;
  for (const auto& [preset, pe] : cases(a)) {
    auto m = bench_model(a, preset, pe);
    torch::manual_seed(0);
    Transformer model(m);
    params.push_back(model->num_parameters());
    contexts.push_back(m.context);
    single.push_back(train_tokens_per_s(a, model, nullptr));
  }
  const auto result =
      (std::filesystem::temp_directory_path() / ("grape-bench-" + std::to_string(::getpid()) + ".json"))
          .string();
  const int code =
      dist::launch_local(a.nproc, dist::own_arguments_without("--nproc"), {{"GRAPE_BENCH_RESULT", result}});
  if (code != 0)
    throw std::runtime_error(fmt::format("bench train --nproc {}: a worker failed (see above)", a.nproc));
  const auto multi = nlohmann::json::parse(io::read_file(result));
  std::filesystem::remove(result);
  std::string table = fmt::format(
                          "attention: {}; data-parallel on c10d/Gloo over 127.0.0.1, every process 1 thread, "
                          "batch {} per process\n",
                          a.attention, a.batch) +
                      fmt::format("{:<8} {:<12} {:>12} {:>8} {:>16} {:>16} {:>9} {:>11}\n", "preset", "pe",
                                  "parameters", "context", "1 proc tok/s",
                                  fmt::format("{} procs tok/s", a.nproc), "speed-up", "efficiency");
  nlohmann::json rows = nlohmann::json::array();
  const auto all = cases(a);
  for (size_t i = 0; i < all.size(); ++i) {
    const double n = multi.at(i).at("tokens_per_s").get<double>();
    const double speedup = n / single[i];
    table +=
        fmt::format("{:<8} {:<12} {:>12} {:>8} {:>16.1f} {:>16.1f} {:>8.2f}x {:>10.1f}%\n", all[i].first,
                    all[i].second, params[i], contexts[i], single[i], n, speedup, 100.0 * speedup / a.nproc);
    rows.push_back({{"preset", all[i].first},
                    {"pe", all[i].second},
                    {"parameters", params[i]},
                    {"context", contexts[i]},
                    {"batch_per_process", a.batch},
                    {"nproc", a.nproc},
                    {"threads_per_process", 1},
                    {"tokens_per_s_1proc", single[i]},
                    {"tokens_per_s_nproc", n},
                    {"speedup", speedup},
                    {"efficiency", speedup / a.nproc},
                    {"attention", a.attention}});
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
  ta->optimizer = "fused";
  tr->add_option("--optimizer", ta->optimizer, "gradient norm, clipping and AdamW: fused or reference")
      ->check(CLI::IsMember({"fused", "reference"}))
      ->capture_default_str();
  ta->shards = train::TrainConfig{}.shards;
  tr->add_option("--shards", ta->shards, "row shards per batch, run in parallel on the threads (1: one pass)")
      ->check(CLI::Range(int64_t(1), int64_t(1) << 20))
      ->capture_default_str();
  tr->add_option("--nproc", ta->nproc,
                 "also measure N data-parallel processes x 1 thread against 1 process x "
                 "1 thread (scaling efficiency)")
      ->check(CLI::Range(1, 64));
  auto breakdown = std::make_shared<bool>(false);
  tr->add_flag(
      "--breakdown", *breakdown,
      "fused and reference side by side, with the attention's share of a reference step and the Amdahl "
      "estimate of the most any kernel could gain (ignores --attention)");
  tr->callback([ta, breakdown] {
    if (auto env = dist::env_from_environment(); env && env->world_size > 1)
      return bench_train_worker(*ta, *env);
    if (*breakdown) return bench_train_breakdown(*ta);
    if (ta->nproc > 1) return bench_train_scaling(*ta);
    measure_presets(*ta, "context", [&](Transformer& model, int64_t& column) {
      column = model->config().context;
      return train_tokens_per_s(*ta, model, nullptr, &ta->faults_per_step, &ta->clock);
    });
  });

  add_bench_decode(bench);
}

}  // namespace grape::cli
