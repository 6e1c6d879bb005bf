// Training: the schedule, one AdamW step, and the loop that logs, validates, checkpoints and resumes (the
// config is in config.cpp). A run is a pure function of its configs: batches depend only on (seed, step,
// micro-batch), so a resumed run repeats the uninterrupted one step for step.
#include <fmt/format.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>
#include <numbers>
#include <stdexcept>

#include "grape/distributed.hpp"
#include "grape/io.hpp"
#include "train/run_files.hpp"

namespace grape::train {

namespace fs = std::filesystem;
using nlohmann::json;

// ---- schedule and data order -----------------------------------------------------------------------

double lr_at(const TrainConfig& cfg, int64_t step) {
  if (step < cfg.warmup) return cfg.lr * double(step + 1) / double(cfg.warmup);
  const int64_t decay = std::max<int64_t>(cfg.steps - cfg.warmup, 1);
  const double t = std::min(1.0, double(step - cfg.warmup) / double(decay));
  return cfg.min_lr + 0.5 * (1.0 + std::cos(std::numbers::pi * t)) * (cfg.lr - cfg.min_lr);
}

std::mt19937_64 batch_rng(uint64_t seed, int64_t step, int64_t micro) {
  // splitmix64 of the triple: nearby steps get unrelated streams.
  uint64_t z = seed * 0x9E3779B97F4A7C15ull + uint64_t(step) * 0xBF58476D1CE4E5B9ull + uint64_t(micro) + 1;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return std::mt19937_64(z ^ (z >> 31));
}

// ---- one optimizer step ------------------------------------------------------------------------------

namespace {
// Test hook: GRAPE_FAULT=nan-at-step:N makes the loss of step N NaN, as a diverging run would.
int64_t fault_nan_at_step() {
  static const int64_t at = [] {
    const char* f = std::getenv("GRAPE_FAULT");
    const std::string prefix = "nan-at-step:";
    if (f == nullptr || std::string(f).rfind(prefix, 0) != 0) return int64_t(-1);
    return int64_t(std::atoll(f + prefix.size()));
  }();
  return at;
}
}  // namespace

Trainer::Trainer(Transformer model, const TrainConfig& cfg) : model_(std::move(model)), cfg_(cfg) {
  cfg_.validate();
  // Decay matrices only (embeddings, projections, PE weight matrices); not gains, frequencies or slopes.
  std::vector<torch::Tensor> decay, no_decay;
  for (auto& p : model_->parameters()) (p.dim() >= 2 ? decay : no_decay).push_back(p);
  auto options = [&](double wd) {
    return std::make_unique<torch::optim::AdamWOptions>(torch::optim::AdamWOptions(cfg_.lr)
                                                            .betas({cfg_.beta1, cfg_.beta2})
                                                            .eps(cfg_.adam_eps)
                                                            .weight_decay(wd));
  };
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(decay, options(cfg_.weight_decay));
  groups.emplace_back(no_decay, options(0.0));
  optimizer_ = std::make_unique<torch::optim::AdamW>(std::move(groups), *options(cfg_.weight_decay));
}

void Trainer::set_group(std::shared_ptr<dist::Group> group) {
  sync_.reset();
  group_.reset();
  if (!group || group->size() == 1) return;
  group_ = std::move(group);
  auto params = model_->parameters();
  group_->broadcast(params, 0);  // identical weights everywhere, whatever each rank initialised or loaded
  sync_ = std::make_shared<dist::GradientSync>(group_, params);
}

Trainer::StepStats Trainer::step(const std::vector<data::Batch>& micro_batches, int64_t step) {
  if (micro_batches.empty()) throw std::invalid_argument("train step: no micro-batches");
  model_->train();
  optimizer_->zero_grad();
  StepStats stats;
  const size_t count = micro_batches.size();
  const double n = double(count);
  const double world = group_ ? double(group_->size()) : 1.0;
  // Data-parallel, the gradients are averaged over the ranks, each rank's loss being the mean over its own
  // scored targets. With loss masks the ranks may score different numbers of targets, so rank r's mean is
  // weighted by world x (its targets / all targets): the average is then the mean over the whole batch,
  // as one process with the whole batch computes it.
  std::vector<double> weight(count, 1.0);
  if (group_ && micro_batches[0].mask.defined()) {
    auto local = torch::zeros({int64_t(count)}, torch::kFloat64);
    for (size_t i = 0; i < count; ++i) local[int64_t(i)] = micro_batches[i].mask.to(torch::kFloat64).sum();
    auto total = local.clone();
    group_->all_reduce_sum(total);
    for (size_t i = 0; i < count; ++i) {
      const double t = total[int64_t(i)].item<double>();
      if (!(t > 0)) throw std::invalid_argument("model: the loss mask selects no targets");
      weight[i] = world * local[int64_t(i)].item<double>() / t;
    }
  }
  bool finite = true;
  for (size_t i = 0; i < count; ++i) {
    const auto& mb = micro_batches[i];
    // Gradients are complete after the last micro-batch's backward: its hooks start the all-reduces.
    if (sync_ && i + 1 == count) sync_->arm();
    if (weight[i] == 0) continue;  // no target of this micro-batch is scored on this rank
    auto loss = model_->loss(mb.x, mb.y, mb.mask);
    if (fault_nan_at_step() == step + 1) loss = loss * std::numeric_limits<double>::quiet_NaN();
    const double value = loss.item<double>();
    if (!std::isfinite(value)) {
      if (!group_) {
        optimizer_->zero_grad();
        throw DivergedError(fmt::format("step {}: the loss is {} (diverged)", step + 1, value));
      }
      finite = false;  // the other ranks wait in the all-reduce: finish the step together, then all stop
    }
    if (weight[i] == 1.0)
      (loss / n).backward();
    else
      (loss * (weight[i] / n)).backward();
    stats.loss += value * weight[i] / n;
  }
  if (group_) {
    sync_->finish();
    auto t = torch::tensor({stats.loss, finite ? 0.0 : 1.0}, torch::kFloat64);
    group_->all_reduce_sum(t);
    stats.loss = t[0].item<double>() / world;
    if (t[1].item<double>() > 0) {
      optimizer_->zero_grad();
      throw DivergedError(fmt::format(
          "step {}: the loss is {} (diverged)", step + 1,
          std::isfinite(stats.loss) ? std::string("not finite on a rank") : fmt::format("{}", stats.loss)));
    }
  }
  const double clip = cfg_.grad_clip > 0 ? cfg_.grad_clip : std::numeric_limits<double>::infinity();
  stats.grad_norm = torch::nn::utils::clip_grad_norm_(model_->parameters(), clip);
  if (!std::isfinite(stats.grad_norm)) {
    optimizer_->zero_grad();
    throw DivergedError(
        fmt::format("step {}: the gradient norm is {} (diverged)", step + 1, stats.grad_norm));
  }
  stats.lr = lr_at(cfg_, step);
  for (auto& group : optimizer_->param_groups())
    static_cast<torch::optim::AdamWOptions&>(group.options()).lr(stats.lr);
  optimizer_->step();
  return stats;
}

// ---- the training loop -------------------------------------------------------------------------------

namespace {

volatile std::sig_atomic_t g_interrupted = 0;
extern "C" void on_sigint(int) {
  g_interrupted = 1;
  std::signal(SIGINT, SIG_DFL);  // a second Ctrl-C stops at once
}

std::string duration_text(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  const int64_t t = int64_t(s + 0.5);
  if (t >= 3600) return fmt::format("{}h{:02d}m", t / 3600, (t / 60) % 60);
  if (t >= 60) return fmt::format("{}m{:02d}s", t / 60, t % 60);
  return fmt::format("{}s", t);
}

// Progress: a bar redrawn in place on a terminal, plain lines every log_every steps otherwise.
class Progress {
 public:
  Progress(int64_t total, int64_t log_every, bool quiet)
      : total_(total), log_every_(log_every), quiet_(quiet), tty_(::isatty(::fileno(stderr)) != 0) {}
  void update(int64_t step, double loss, double tok_s, double eta_s) {
    if (quiet_) return;
    if (tty_) {
      const int width = 24;
      const int filled = int(width * double(step) / double(total_));
      std::fprintf(stderr, "\r[%s%s] step %lld/%lld | loss %.4f | %.0f tok/s | ETA %s   ",
                   std::string(filled, '#').c_str(), std::string(width - filled, '.').c_str(),
                   (long long)step, (long long)total_, loss, tok_s, duration_text(eta_s).c_str());
      std::fflush(stderr);
    } else if (step % log_every_ == 0 || step == total_) {
      std::printf("step %lld/%lld loss %.4f %.0f tok/s ETA %s\n", (long long)step, (long long)total_, loss,
                  tok_s, duration_text(eta_s).c_str());
      std::fflush(stdout);
    }
  }
  void message(const std::string& text) {
    if (quiet_) return;
    if (tty_)
      std::fprintf(stderr, "\r%-100s\n", text.c_str());
    else
      std::printf("%s\n", text.c_str());
    std::fflush(tty_ ? stderr : stdout);
  }
  void finish() {
    if (!quiet_ && tty_) std::fprintf(stderr, "\n");
  }

 private:
  int64_t total_, log_every_;
  bool quiet_, tty_;
};

// Rank r's rows of a batch drawn for all ranks: rows [r*b, (r+1)*b). The batch of `world` ranks is drawn
// whole from the step's rng (as one process with batch world x b draws it) and each rank keeps its share,
// so N ranks with batch b train on exactly the batches of one process with batch N x b.
data::Batch rank_share(const data::Batch& all, int rank, int64_t b) {
  auto rows = [&](const torch::Tensor& t) { return t.defined() ? t.narrow(0, rank * b, b).contiguous() : t; };
  return {rows(all.x), rows(all.y), rows(all.mask)};
}

// What a run starts from: its configs and tokenizer, and on --resume the checkpoint it continues from.
struct StartPoint {
  ModelConfig model;
  TrainConfig train;
  std::unique_ptr<data::Tokenizer> tok;
  std::optional<detail::LoadedCheckpoint> checkpoint;  // read and verified once; empty: from step 0
};

// A new run in opts.run_dir with these configs; the model's vocabulary comes from the tokenizer.
StartPoint new_run(const ModelConfig& model_cfg, const TrainConfig& cfg, const TrainOptions& opts,
                   bool lead) {
  if (lead && fs::exists(fs::path(opts.run_dir) / "run.json"))
    throw std::runtime_error(fmt::format(
        "{} already holds a run; continue it with --resume or choose another --out", opts.run_dir));
  StartPoint s{model_cfg, cfg, data::make_tokenizer(cfg.tokenizer), {}};
  s.model.vocab_size = s.tok->vocab_size();
  return s;
}

// --resume: the run's own settings (except an explicitly changed step budget) and its newest good
// checkpoint; damaged ones are passed over, and the lead rank says which and why.
StartPoint resume_run(const TrainOptions& opts, bool lead) {
  const RunInfo run = read_run(opts.run_dir);
  StartPoint s{run.model, run.train, run_tokenizer(run), {}};
  if (opts.resume_steps > 0) s.train.steps = opts.resume_steps;
  auto point = detail::find_resume_checkpoint(opts.run_dir);
  if (lead) {
    for (const auto& why : point.skipped) std::fprintf(stderr, "grape train: passed over: %s\n", why.c_str());
    if (!point.skipped.empty() && point.checkpoint)
      std::fprintf(stderr, "grape train: falling back to the previous good checkpoint %s\n",
                   point.checkpoint->dir.c_str());
    if (!point.checkpoint)
      std::fprintf(stderr, "grape train: %s has no checkpoint yet; starting it again from step 0\n",
                   opts.run_dir.c_str());
  }
  s.checkpoint = std::move(point.checkpoint);
  return s;
}

// Loads a resumed run's weights and AdamW state; returns the step it continues after and the tokens seen.
std::pair<int64_t, double> restore(Trainer& trainer, const detail::LoadedCheckpoint& ck,
                                   const TrainConfig& cfg, const TrainOptions& opts, int world, bool lead) {
  detail::load_weights(trainer.model(), ck);
  detail::load_optimizer(trainer.optimizer(), ck);
  if (ck.step > cfg.steps)
    throw std::invalid_argument(fmt::format("{}: the run is at step {}, beyond the requested --steps {}",
                                            opts.run_dir, ck.step, cfg.steps));
  const int64_t world_before = ck.state.value("world_size", int64_t(1));
  if (lead && world_before != world)
    std::fprintf(stderr,
                 "grape train: note: the run was at %lld process(es), now %d: the batch per step changes "
                 "from %lld to %lld sequences\n",
                 (long long)world_before, world, (long long)(world_before * cfg.batch),
                 (long long)(world * cfg.batch));
  return {ck.step, ck.state.value("tokens", 0.0)};
}

}  // namespace

TrainSummary run_training(const ModelConfig& model_cfg_in, const TrainConfig& cfg_in,
                          const TrainOptions& opts) {
  if (opts.run_dir.empty()) throw std::invalid_argument("train: no run directory (--out)");
  const std::shared_ptr<dist::Group> group = opts.group && opts.group->size() > 1 ? opts.group : nullptr;
  const int rank = group ? group->rank() : 0;
  const int world = group ? group->size() : 1;
  const bool lead = rank == 0;  // the one rank that writes the run's files and prints
  StartPoint from = opts.resume ? resume_run(opts, lead) : new_run(model_cfg_in, cfg_in, opts, lead);
  const ModelConfig& model_cfg = from.model;
  const TrainConfig& cfg = from.train;
  cfg.validate();
  model_cfg.validate();
  if (group) {
    // Every rank must train the same model on the same schedule; a rank started with other flags (or not
    // resuming when the others do) is refused here, naming the fields, before any collective.
    auto job = nlohmann::json{{"model", nlohmann::json::parse(model_cfg.to_json())},
                              {"train", nlohmann::json::parse(cfg.to_json())},
                              {"resume", opts.resume}};
    job["train"].erase("log_every");  // progress output is each rank's own
    group->agree("configuration", job.dump());
  }
  data::DataOptions dopt;
  dopt.val_fraction = cfg.val_fraction;
  auto data = data::open_data(cfg.data, *from.tok, dopt);

  torch::manual_seed(cfg.seed);
  Transformer model(model_cfg);
  Trainer trainer(model, cfg);
  int64_t start = 0;
  double tokens_before = 0;
  if (from.checkpoint)
    std::tie(start, tokens_before) = restore(trainer, *from.checkpoint, cfg, opts, world, lead);
  if (group) {
    // Every rank must continue from the same step (they read the same run directory: on several hosts it
    // must be a shared file system).
    auto t = torch::tensor({double(start)}, torch::kFloat64);
    group->broadcast({t}, 0);
    if (int64_t(t.item<double>()) != start)
      throw std::runtime_error(
          fmt::format("rank {}: resumes at step {} but rank 0 at step {} (is {} the same "
                      "directory on every host?)",
                      rank, start, int64_t(t.item<double>()), opts.run_dir));
  }
  if (lead) {
    if (opts.resume) {
      detail::remove_stale_temporaries(opts.run_dir);
      detail::truncate_metrics(opts.run_dir, start);
    }
    detail::write_run(opts.run_dir, model_cfg, cfg, *from.tok);  // on resume, records an extended budget
  }
  trainer.set_group(group);

  Progress progress(cfg.steps, cfg.log_every, opts.quiet || !lead);
  progress.message(fmt::format("grape train: {} | {} parameters | {} | steps {}..{} of {}{}", model_cfg.pe,
                               model->num_parameters(), data->describe(), start + 1, cfg.steps, cfg.steps,
                               world > 1 ? fmt::format(" | {} processes x batch {}", world, cfg.batch) : ""));
  g_interrupted = 0;
  auto previous = std::signal(SIGINT, on_sigint);

  TrainSummary summary;
  summary.parameters = model->num_parameters();
  const double tokens_per_step = double(cfg.batch * cfg.accum * model_cfg.context * world);
  const auto t0 = std::chrono::steady_clock::now();
  auto seconds = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); };
  std::string last_checkpoint = from.checkpoint ? from.checkpoint->dir : "";
  from.checkpoint.reset();  // its bytes are loaded: free them before training
  try {
    for (int64_t step = start; step < cfg.steps; ++step) {
      std::vector<data::Batch> micro;
      for (int64_t m = 0; m < cfg.accum; ++m) {
        auto rng = batch_rng(cfg.seed, step, m);
        auto batch = data->train_batch(cfg.batch * world, model_cfg.context, rng);
        micro.push_back(world == 1 ? batch : rank_share(batch, rank, cfg.batch));
      }
      Trainer::StepStats stats;
      try {
        stats = trainer.step(micro, step);
      } catch (const DivergedError& e) {
        throw std::runtime_error(fmt::format(
            "{}; stopped. {}", e.what(),
            last_checkpoint.empty() ? "No checkpoint was written yet."
                                    : "The last good checkpoint is " + last_checkpoint +
                                          " (continue with --resume, perhaps with a lower --lr)."));
      }
      const int64_t done = step + 1;
      const double elapsed = seconds();
      const double tok_s = tokens_per_step * double(done - start) / std::max(elapsed, 1e-9);
      if (lead)
        detail::append_metrics(opts.run_dir, {{"step", done},
                                              {"loss", stats.loss},
                                              {"lr", stats.lr},
                                              {"grad_norm", stats.grad_norm},
                                              {"tokens_per_s", tok_s},
                                              {"time_s", elapsed}});
      summary.final_loss = stats.loss;
      progress.update(done, stats.loss, tok_s, elapsed / double(done - start) * double(cfg.steps - done));

      const bool last = done == cfg.steps;
      bool stop = g_interrupted != 0 || (opts.stop_after > 0 && done >= opts.stop_after);
      if (group) stop = group->any(stop);  // Ctrl-C may reach the ranks at different steps: stop together
      if (lead && ((cfg.eval_every > 0 && done % cfg.eval_every == 0) || last)) {
        // The same validation windows as one process with the whole batch (world x batch) reads.
        summary.val_loss =
            validation_loss(model, *data, model_cfg.context, cfg.batch * world, cfg.eval_batches);
        detail::append_metrics(opts.run_dir, {{"step", done}, {"val_loss", summary.val_loss}});
        progress.message(fmt::format("step {}: val loss {:.4f} (perplexity {:.2f})", done, summary.val_loss,
                                     std::exp(summary.val_loss)));
      }
      if ((cfg.ckpt_every > 0 && done % cfg.ckpt_every == 0) || last || stop) {
        json state = {{"tokens", tokens_before + tokens_per_step * double(done - start)},
                      {"loss", stats.loss},
                      {"world_size", world}};
        last_checkpoint = lead ? detail::write_checkpoint(opts.run_dir, done, model, trainer.optimizer(),
                                                          state, cfg.keep_last)
                               : detail::checkpoint_path(opts.run_dir, done);
      }
      summary.steps = done;
      if (stop && !last) {
        summary.interrupted = true;
        progress.message(fmt::format("interrupted at step {}: checkpoint {} written; continue with --resume",
                                     done, last_checkpoint));
        break;
      }
    }
    // The other ranks finish when rank 0 has written the final checkpoint (or failed to: then they fail).
    if (group) group->barrier();
  } catch (...) {
    std::signal(SIGINT, previous);
    progress.finish();
    throw;
  }
  std::signal(SIGINT, previous);
  progress.finish();
  summary.seconds = seconds();
  summary.tokens_per_s = tokens_per_step * double(summary.steps - start) / std::max(summary.seconds, 1e-9);
  summary.checkpoint = last_checkpoint;
  return summary;
}

}  // namespace grape::train
