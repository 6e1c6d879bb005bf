// Training: the schedule, one AdamW step, and the loop that logs, validates, checkpoints and resumes (the
// config is in config.cpp). A run is a pure function of its configs: batches depend only on (seed, step,
// micro-batch), so a resumed run repeats the uninterrupted one step for step.
#include <ATen/ThreadLocalState.h>
#include <fmt/format.h>
#include <omp.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <limits>
#include <mutex>
#include <nlohmann/json.hpp>
#include <numbers>
#include <span>
#include <stdexcept>
#include <thread>

#include "grape/distributed.hpp"
#include "grape/io.hpp"
#include "kernels/cpu/adamw.hpp"
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
// The model's loss of a batch at `step`, NaN where the test hook above asks for it.
torch::Tensor step_loss(Transformer& model, const data::Batch& b, int64_t step) {
  auto loss = model->loss(b.x, b.y, b.mask);
  if (fault_nan_at_step() == step + 1) loss = loss * std::numeric_limits<double>::quiet_NaN();
  return loss;
}
// Test hook: GRAPE_FAULT=nan-val-at-step:N makes the validation loss after step N NaN.
int64_t fault_nan_val_at_step() {
  const char* f = std::getenv("GRAPE_FAULT");
  const std::string prefix = "nan-val-at-step:";
  if (f == nullptr || std::string(f).rfind(prefix, 0) != 0) return -1;
  return std::atoll(f + prefix.size());
}

// ---- optimizer=fused: the tail of a step on the kernels of src/kernels/cpu/adamw.hpp -------------------

// A parameter AdamW steps (it has a gradient), with its group's options and its gradient as fp32 floats.
struct Stepped {
  torch::Tensor param, grad;
  const torch::optim::AdamWOptions* options;
};

// The parameters torch::optim::AdamW::step would update, in its order (group by group); each an fp32 CPU
// tensor in one block, as the kernels read them.
std::vector<Stepped> stepped_parameters(torch::optim::AdamW& optimizer) {
  std::vector<Stepped> out;
  for (auto& group : optimizer.param_groups()) {
    const auto& options = static_cast<const torch::optim::AdamWOptions&>(group.options());
    if (options.amsgrad())  // only a loaded optimizer.pt could set it: the Trainer never does
      throw std::runtime_error(
          "optimizer=fused: the AdamW state asks for amsgrad, which the fused step does not implement (use "
          "--set optimizer=reference)");
    for (auto& p : group.params()) {
      if (!p.grad().defined()) continue;  // as AdamW::step (and clip_grad_norm_) skip it
      if (p.scalar_type() != torch::kFloat32 || !p.device().is_cpu() || !p.is_contiguous() ||
          p.grad().scalar_type() != torch::kFloat32)
        throw std::runtime_error(fmt::format(
            "optimizer=fused: a parameter of shape {} is not a contiguous float32 CPU tensor with a float32 "
            "gradient (use --set optimizer=reference)",
            c10::str(p.sizes())));
      out.push_back({p, p.grad().contiguous(), &options});
    }
  }
  return out;
}

// clip_grad_norm_'s total norm of the gradients (in double, summed in a fixed order).
double gradient_norm(const std::vector<Stepped>& params) {
  std::vector<std::span<const float>> grads;
  grads.reserve(params.size());
  for (const auto& s : params) grads.emplace_back(s.grad.data_ptr<float>(), size_t(s.grad.numel()));
  return std::sqrt(kernels::cpu::sum_of_squares(grads));
}

// AdamW::step on the kernel with the gradients scaled by grad_scale; the moments and step counts stay in the
// optimizer's state, created on a parameter's first step as AdamW::step creates it. False iff some updated
// parameter is not finite.
bool fused_adamw_step(torch::optim::AdamW& optimizer, const std::vector<Stepped>& params, float grad_scale) {
  auto& state = optimizer.state();
  std::vector<torch::optim::AdamWParamState*> states;  // all checked before any is changed
  for (const auto& s : params) {
    const auto key = c10::guts::to_string(s.param.unsafeGetTensorImpl());
    if (state.find(key) == state.end()) {
      auto fresh = std::make_unique<torch::optim::AdamWParamState>();
      fresh->step(0);
      fresh->exp_avg(torch::zeros_like(s.param, torch::MemoryFormat::Preserve));
      fresh->exp_avg_sq(torch::zeros_like(s.param, torch::MemoryFormat::Preserve));
      state[key] = std::move(fresh);
    }
    auto* st = static_cast<torch::optim::AdamWParamState*>(state[key].get());
    for (const auto* moment : {&st->exp_avg(), &st->exp_avg_sq()})
      if (moment->scalar_type() != torch::kFloat32 || !moment->is_contiguous() ||
          !moment->sizes().equals(s.param.sizes()))
        throw std::runtime_error(fmt::format(
            "optimizer=fused: the AdamW moments of a parameter of shape {} are not contiguous float32 "
            "tensors of its shape (use --set optimizer=reference)",
            c10::str(s.param.sizes())));
    states.push_back(st);
  }
  std::vector<kernels::cpu::AdamWParam> arrays;
  arrays.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    auto& st = *states[i];
    st.step(st.step() + 1);
    const auto& o = *params[i].options;
    arrays.push_back({.param = params[i].param.data_ptr<float>(),
                      .grad = params[i].grad.data_ptr<float>(),
                      .exp_avg = st.exp_avg().data_ptr<float>(),
                      .exp_avg_sq = st.exp_avg_sq().data_ptr<float>(),
                      .n = params[i].param.numel(),
                      .lr = o.lr(),
                      .beta1 = std::get<0>(o.betas()),
                      .beta2 = std::get<1>(o.betas()),
                      .eps = o.eps(),
                      .weight_decay = o.weight_decay(),
                      .step = st.step()});
  }
  return kernels::cpu::adamw_update(arrays, grad_scale);
}

}  // namespace

// ---- a micro-batch in row shards (TrainConfig::shards) ------------------------------------------------
//
// On a few cores, threads that split every op of a small model mostly wait for each other (OpenBLAS's and
// OpenMP's barriers after each of a step's hundreds of ops); threads that each take a share of the
// sequences through the whole forward and backward wait only once, at the end. The shards are fixed by the
// config, not by the threads, and their gradients are summed in shard order, so the step does not depend
// on how many shards run at once: on one thread they run one after the other. (With more threads than
// shards each shard's ops are split over a team again; OpenBLAS's OpenMP build runs one multi-threaded
// product at a time, so there the shards overlap only their other ops: set shards to the thread count.)

int64_t shard_workers(int64_t shards, int64_t rows, int threads) {
  return std::clamp<int64_t>(std::min<int64_t>(shards, rows), 1, std::max(threads, 1));
}

// Threads that run a step's shards beside the calling thread, asleep between steps. They live as long as
// the Trainer: a thread's first LibTorch parallel op resizes LibTorch's thread pools (it rebuilds its
// pthreadpool), which threads made per step would pay every step.
class ShardThreads {
 public:
  explicit ShardThreads(int64_t extra) {
    for (int64_t w = 1; w <= extra; ++w) threads_.emplace_back([this, w] { serve(w); });
  }
  ~ShardThreads() {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : threads_) t.join();
  }
  ShardThreads(const ShardThreads&) = delete;
  ShardThreads& operator=(const ShardThreads&) = delete;
  int64_t workers() const { return int64_t(threads_.size()) + 1; }

  // work(w) for every worker w: 0 on this thread, the others on theirs, each with this thread's
  // thread-local state (grad mode, profiler callbacks) and an OpenMP team of `team` threads. work must not
  // throw. Returns when every worker is done.
  void run(const std::function<void(int64_t)>& work, int team) {
    const at::ThreadLocalState state;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      job_ = {&work, &state, team};
      ++generation_;
      pending_ = int64_t(threads_.size());
    }
    wake_.notify_all();
    const int before = omp_get_max_threads();
    omp_set_num_threads(team);
    work(0);
    omp_set_num_threads(before);
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [&] { return pending_ == 0; });
  }

 private:
  struct Job {
    const std::function<void(int64_t)>* work = nullptr;
    const at::ThreadLocalState* state = nullptr;
    int team = 1;
  };
  void serve(int64_t w) {
    at::get_num_threads();  // LibTorch's set-up of a new thread (it sets the team size): before ours
    uint64_t seen = 0;
    for (;;) {
      Job job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_, job = job_;
      }
      {
        const at::ThreadLocalStateGuard guard(*job.state);
        omp_set_num_threads(job.team);
        (*job.work)(w);
      }
      const std::lock_guard<std::mutex> lock(mutex_);
      if (--pending_ == 0) done_.notify_one();
    }
  }
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  Job job_;
  uint64_t generation_ = 0;
  int64_t pending_ = 0;
  bool stop_ = false;
  std::vector<std::thread> threads_;
};

namespace {

// Rows of a micro-batch, and their share of its scored targets (of its rows, without a mask).
struct Shard {
  data::Batch rows;
  double share = 0;
};

std::vector<Shard> split_rows(const data::Batch& mb, int64_t shards) {
  const int64_t B = mb.x.size(0), S = std::min(shards, B);
  std::vector<Shard> out;
  double total = 0;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t r0 = s * B / S, n = (s + 1) * B / S - r0;
    Shard sh{{mb.x.narrow(0, r0, n), mb.y.narrow(0, r0, n), {}}, double(n)};
    if (mb.mask.defined()) {
      sh.rows.mask = mb.mask.narrow(0, r0, n);
      sh.share = sh.rows.mask.to(torch::kFloat64).sum().item<double>();
    }
    total += sh.share;
    out.push_back(std::move(sh));
  }
  if (!(total > 0)) throw std::invalid_argument("model: the loss mask selects no targets");
  for (auto& sh : out) sh.share /= total;
  return out;
}

// Forward and backward of a micro-batch's shards, its loss scaled by `scale`: returns the micro-batch's
// loss (its shards' losses weighted by their shares; not finite if any is not, and then no gradient is
// complete). The first shard's backward accumulates into the parameters' .grad; the others' gradients come
// from autograd::grad and are added to .grad here, in shard order, whichever thread computed them. With
// several threads, `pool` (made or remade to fit) runs the shards: worker w takes shards w, w + W, ...
// A shard's error is thrown once all have finished (the first shard's gradient may be in .grad by then).
double sharded_pass(Transformer& model, const data::Batch& mb, int64_t shards, double scale, int64_t step,
                    std::unique_ptr<ShardThreads>& pool) {
  const auto parts = split_rows(mb, shards);
  const int64_t S = int64_t(parts.size());
  auto params = model->parameters();
  struct Result {
    double value = 0;
    std::vector<torch::Tensor> grads;
    std::exception_ptr error;
  };
  std::vector<Result> results(static_cast<size_t>(S));
  int64_t first = 0;
  while (parts[size_t(first)].share == 0) ++first;  // some shard has a share: split_rows checked
  auto run = [&](int64_t s) {
    const Shard& sh = parts[size_t(s)];
    Result& r = results[size_t(s)];
    if (sh.share == 0) return;  // no scored target in these rows
    try {
      auto loss = step_loss(model, sh.rows, step);
      r.value = loss.item<double>();
      if (!std::isfinite(r.value)) return;  // the step stops: no backward
      auto scaled = loss * (scale * sh.share);
      if (s == first)
        scaled.backward();
      else
        r.grads = torch::autograd::grad({scaled}, params, {}, /*retain_graph=*/false,
                                        /*create_graph=*/false, /*allow_unused=*/true);
    } catch (...) {
      r.error = std::current_exception();
    }
  };
  const int threads = omp_get_max_threads();
  const int64_t W = shard_workers(shards, mb.x.size(0), threads);
  if (W == 1) {
    for (int64_t s = 0; s < S; ++s) run(s);
  } else {
    if (!pool || pool->workers() != W) pool = std::make_unique<ShardThreads>(W - 1);
    pool->run(
        [&](int64_t w) {
          for (int64_t s = w; s < S; s += W) run(s);
        },
        std::max(1, threads / int(W)));
  }
  for (const auto& r : results)
    if (r.error) std::rethrow_exception(r.error);
  double value = 0;
  for (int64_t s = 0; s < S; ++s) value += parts[size_t(s)].share * results[size_t(s)].value;
  if (!std::isfinite(value)) return value;
  for (int64_t s = first + 1; s < S; ++s)
    for (size_t j = 0; j < results[size_t(s)].grads.size(); ++j) {
      const auto& g = results[size_t(s)].grads[j];
      if (!g.defined()) continue;
      auto& grad = params[j].mutable_grad();
      if (grad.defined())
        grad.add_(g);
      else
        grad = g.contiguous();
    }
  return value;
}

}  // namespace

Trainer::Trainer(Transformer model, const TrainConfig& cfg) : model_(std::move(model)), cfg_(cfg) {
  cfg_.validate();
  // Shards after the first hold their own gradients until they are added (sharded_pass).
  const int shard_grads = int(std::min(cfg_.shards, cfg_.batch) - 1);
  model_->config().require_memory(
      4 + shard_grads, shard_grads > 0
                           ? "training (weights, gradients, AdamW's two moments, the shards' gradients)"
                           : "training (weights, gradients and AdamW's two moments)");
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

Trainer::~Trainer() = default;

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
    // In row shards (a data-parallel rank, already one thread, takes its share whole).
    const bool sharded = !group_ && cfg_.shards > 1 && mb.x.size(0) > 1;
    torch::Tensor loss;
    double value = 0;
    if (sharded) {
      try {
        value = sharded_pass(model_, mb, cfg_.shards, weight[i] / n, step, shard_threads_);
      } catch (...) {
        optimizer_->zero_grad();  // no shard's gradient left behind
        throw;
      }
    } else {
      loss = step_loss(model_, mb, step);
      value = loss.item<double>();
    }
    if (!std::isfinite(value)) {
      if (!group_) {
        optimizer_->zero_grad();
        throw DivergedError(fmt::format("step {}: the loss is {} (diverged)", step + 1, value));
      }
      finite = false;  // the other ranks wait in the all-reduce: finish the step together, then all stop
    }
    if (!sharded) {  // (the shards ran their backward already)
      if (weight[i] == 1.0)
        (loss / n).backward();
      else
        (loss * (weight[i] / n)).backward();
    }
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
  // optimizer=fused: the norm, then clipping, AdamW and the finite check in one pass per parameter (as
  // the reference below computes them, within float rounding).
  const bool fused = cfg_.optimizer == "fused";
  std::vector<Stepped> stepped;
  if (fused) {
    stepped = stepped_parameters(*optimizer_);
    stats.grad_norm = gradient_norm(stepped);
  } else {
    stats.grad_norm = torch::nn::utils::clip_grad_norm_(model_->parameters(), clip);
  }
  if (!std::isfinite(stats.grad_norm)) {
    optimizer_->zero_grad();
    throw DivergedError(
        fmt::format("step {}: the gradient norm is {} (diverged)", step + 1, stats.grad_norm));
  }
  stats.lr = lr_at(cfg_, step);
  for (auto& group : optimizer_->param_groups())
    static_cast<torch::optim::AdamWOptions&>(group.options()).lr(stats.lr);
  bool all_finite = false;  // unknown for the reference: checked below
  if (fused) {
    // clip_grad_norm_'s coefficient: max_norm / (norm + 1e-6), at most 1.
    all_finite =
        fused_adamw_step(*optimizer_, stepped, float(std::min(clip / (stats.grad_norm + 1e-6), 1.0)));
  } else {
    optimizer_->step();
  }
  // A damaged optimizer state (or an overflow) gives NaN weights from finite gradients: stop before any
  // checkpoint holds them, naming the first such parameter.
  if (!all_finite)
    for (const auto& p : model_->named_parameters())
      if (!torch::isfinite(p.value()).all().item<bool>())
        throw DivergedError(
            fmt::format("step {}: parameter '{}' is not finite after the optimizer step", step + 1, p.key()));
  return stats;
}

// ---- the training loop -------------------------------------------------------------------------------

namespace {

// The end of a "diverged; stopped." message: where the run can continue from.
std::string good_checkpoint_note(const std::string& last_checkpoint) {
  return last_checkpoint.empty() ? "No checkpoint was written yet."
                                 : "The last good checkpoint is " + last_checkpoint +
                                       " (continue with --resume, perhaps with a lower --lr).";
}

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
  json meta = json::object();  // run.json's entries besides the configs (provenance, resumes, fingerprint)
  bool data_moved = false;     // resume: --data names another path than run.json
  std::string data_before;     // resume: the data run.json named
};

void warn(const std::string& text) { std::fprintf(stderr, "grape train: %s\n", text.c_str()); }

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// The tokenizer of a new run's settings, and its vocabulary size rule (TrainOptions::vocab_size_given).
std::unique_ptr<data::Tokenizer> new_run_tokenizer(ModelConfig& model, const TrainConfig& cfg,
                                                   bool vocab_size_given, std::string* note) {
  std::unique_ptr<data::Tokenizer> tok;
  if (cfg.tokenizer == "none") {
    if (!vocab_size_given) {
      const int64_t max_id = data::max_token_id(cfg.data);
      model.vocab_size = round_up(max_id + 1, 64);
      if (note)
        *note = fmt::format(
            "tokenizer none: the largest token id in {} is {}; vocab_size = {} (rounded up to a multiple of "
            "64; --set vocab_size=N to choose)",
            cfg.data, max_id, model.vocab_size);
    }
    return data::make_id_tokenizer(model.vocab_size);
  }
  tok = data::make_tokenizer(cfg.tokenizer);
  if (!vocab_size_given) {
    model.vocab_size = tok->vocab_size();
  } else if (model.vocab_size < tok->vocab_size()) {
    throw std::invalid_argument(fmt::format(
        "vocab_size={} is smaller than the tokenizer's {} ids ({}); leave it out to take the tokenizer's",
        model.vocab_size, tok->vocab_size(), cfg.tokenizer));
  }
  return tok;
}

// A new run in opts.run_dir with these configs.
StartPoint new_run(const ModelConfig& model_cfg, const TrainConfig& cfg, const TrainOptions& opts,
                   bool lead) {
  if (lead && fs::exists(fs::path(opts.run_dir) / "run.json"))
    throw std::runtime_error(fmt::format(
        "{} already holds a run; continue it with --resume or choose another --out", opts.run_dir));
  StartPoint s{model_cfg, cfg, nullptr, {}};
  s.train.data = data::absolute_spec(s.train.data);
  s.train.tokenizer = data::absolute_spec(s.train.tokenizer);
  std::string note;
  s.tok = new_run_tokenizer(s.model, s.train, opts.vocab_size_given, &note);
  if (lead && !note.empty() && !opts.quiet) warn(note);
  s.meta["provenance"] = json::parse(provenance_json(opts.command));
  return s;
}

// --resume: the run's own settings (except an explicitly changed step budget, and what may change with
// resume_with_settings) and its newest good checkpoint; damaged ones are passed over, and the lead rank says
// which and why.
StartPoint resume_run(const ModelConfig& asked_model, const TrainConfig& asked, const TrainOptions& opts,
                      bool lead) {
  const RunInfo run = read_run(opts.run_dir);
  StartPoint s{run.model, run.train, nullptr, {}};
  s.meta = json::parse(run.json);
  for (const char* k : {"format", "model", "train", "tokenizer"}) s.meta.erase(k);
  if (opts.resume_with_settings) {
    if (const auto conflicts = resume_conflicts(run, asked_model, asked); !conflicts.empty()) {
      std::string list;
      for (const auto& c : conflicts) list += (list.empty() ? "" : ", ") + c;
      throw std::invalid_argument(fmt::format(
          "--resume: {} was trained with {}; a run keeps its settings (drop those flags, or start a new run "
          "with another --out)",
          opts.run_dir, list));
    }
    json mine = json::parse(s.train.to_json());
    const json theirs = json::parse(asked.to_json());
    for (const auto& [key, value] : theirs.items())
      if (may_change_on_resume(key) && key != "data") mine[key] = value;
    s.train = TrainConfig::from_json(mine.dump());
    const std::string data = data::absolute_spec(asked.data);
    if (data != data::absolute_spec(run.train.data)) {
      s.data_moved = true;
      s.data_before = run.train.data;
      s.train.data = data;
    }
  }
  if (opts.resume_steps > 0) s.train.steps = opts.resume_steps;
  if (!s.data_moved) {
    // Runs from before paths were stored absolute: a relative one only works from where the run started.
    const fs::path p(s.train.data);
    std::error_code ec;
    if (p.is_relative() && s.train.data != "bible" && !s.train.data.starts_with("synthetic") &&
        !fs::exists(p, ec))
      throw std::runtime_error(fmt::format(
          "{}: the run's data '{}' is a path relative to the directory the run was started from, and is "
          "not found from here; give it again with --data PATH",
          opts.run_dir, s.train.data));
  }
  s.tok = run_tokenizer(run);
  auto point = detail::find_resume_checkpoint(opts.run_dir);
  if (lead) {
    for (const auto& why : point.skipped) warn("passed over: " + why);
    if (!point.skipped.empty() && point.checkpoint)
      warn("falling back to the previous good checkpoint " + point.checkpoint->dir);
    if (!point.checkpoint) warn(opts.run_dir + " has no checkpoint yet; starting it again from step 0");
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
    warn(fmt::format(
        "note: the run was at {} process(es), now {}: the batch per step changes from {} to {} sequences",
        world_before, world, world_before * cfg.batch, world * cfg.batch));
  return {ck.step, ck.state.value("tokens", 0.0)};
}

// The data a resumed run continues on against the fingerprint run.json recorded.
void check_data(const StartPoint& s, const std::string& fingerprint, const TrainOptions& opts) {
  const std::string recorded = s.meta.value("data_fingerprint", "");
  if (recorded == fingerprint) {
    if (s.data_moved && !opts.quiet)
      warn(fmt::format("the run's data is now {} (the same tokens as {})", s.train.data, s.data_before));
    return;
  }
  if (recorded.empty()) {
    if (s.data_moved)
      warn(
          fmt::format("warning: cannot check that {} holds the data the run was trained on ({}): the run "
                      "recorded no fingerprint of it",
                      s.train.data, s.data_before));
    return;
  }
  warn(
      fmt::format("warning: {} is not the data this run was trained on{}: it recorded {}, this data is {}; "
                  "continuing on {}",
                  s.train.data, s.data_moved ? " (" + s.data_before + ")" : " (it changed since)", recorded,
                  fingerprint, s.train.data));
}

double nan() { return std::numeric_limits<double>::quiet_NaN(); }

}  // namespace

// Train fields a resumed run may change: the budget, when to validate, log and checkpoint, and the
// optimizer's implementation (both keep the same AdamW state); data is checked on its own.
bool may_change_on_resume(const std::string& key) {
  for (const char* k :
       {"steps", "eval_every", "eval_batches", "log_every", "ckpt_every", "keep_last", "data", "optimizer"})
    if (key == k) return true;
  return false;
}

std::pair<ModelConfig, TrainConfig> resolve_new_run(const ModelConfig& model_cfg, const TrainConfig& cfg,
                                                    bool vocab_size_given, std::string* note) {
  ModelConfig m = model_cfg;
  TrainConfig t = cfg;
  t.data = data::absolute_spec(t.data);
  t.tokenizer = data::absolute_spec(t.tokenizer);
  new_run_tokenizer(m, t, vocab_size_given, note);
  m.validate();
  t.validate();
  return {m, t};
}

std::vector<std::string> resume_conflicts(const RunInfo& run, const ModelConfig& asked_model,
                                          const TrainConfig& asked_train) {
  std::vector<std::string> out;
  auto compare = [&](const json& have, const json& want, bool train) {
    for (const auto& [key, value] : have.items()) {
      if (train && may_change_on_resume(key)) continue;
      json w = want.contains(key) ? want[key] : json();
      json h = value;
      if (train && key == "tokenizer") {  // paths compare by where they lead
        h = data::absolute_spec(h.get<std::string>());
        w = data::absolute_spec(w.get<std::string>());
      }
      if (h != w)
        out.push_back(fmt::format("{}={} (asked: {})", key, h.is_string() ? h.get<std::string>() : h.dump(),
                                  w.is_string() ? w.get<std::string>() : w.dump()));
    }
  };
  compare(json::parse(run.model.to_json()), json::parse(asked_model.to_json()), false);
  compare(json::parse(run.train.to_json()), json::parse(asked_train.to_json()), true);
  return out;
}

TrainSummary run_training(const ModelConfig& model_cfg_in, const TrainConfig& cfg_in,
                          const TrainOptions& opts) {
  if (opts.run_dir.empty()) throw std::invalid_argument("train: no run directory (--out)");
  const std::shared_ptr<dist::Group> group = opts.group && opts.group->size() > 1 ? opts.group : nullptr;
  const int rank = group ? group->rank() : 0;
  const int world = group ? group->size() : 1;
  const bool lead = rank == 0;  // the one rank that writes the run's files and prints
  StartPoint from =
      opts.resume ? resume_run(model_cfg_in, cfg_in, opts, lead) : new_run(model_cfg_in, cfg_in, opts, lead);
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
  const std::string fingerprint = data->fingerprint();
  if (lead && opts.resume) check_data(from, fingerprint, opts);
  from.meta["data_fingerprint"] = fingerprint;
  if (lead && cfg.steps <= cfg.warmup)
    warn(fmt::format(
        "warning: --steps {} ends inside the warmup ({} steps): the learning rate never reaches --lr {} "
        "and never decays; lower --warmup",
        cfg.steps, cfg.warmup, cfg.lr));

  torch::manual_seed(cfg.seed);
  Transformer model(model_cfg);
  Trainer trainer(model, cfg);
  int64_t start = 0;
  double tokens_before = 0, time_before = 0;
  if (from.checkpoint) {
    std::tie(start, tokens_before) = restore(trainer, *from.checkpoint, cfg, opts, world, lead);
    time_before = from.checkpoint->state.value("time_s", 0.0);
  }
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
      json resumed = json::parse(provenance_json(opts.command));
      resumed["step"] = start;
      from.meta["resumed"].push_back(resumed);
    }
    // On resume, records an extended budget, moved data and the resume itself.
    detail::write_run(opts.run_dir, model_cfg, cfg, *from.tok, from.meta);
  }
  trainer.set_group(group);

  Progress progress(cfg.steps, cfg.log_every, opts.quiet || !lead);
  const std::string span = start >= cfg.steps
                               ? fmt::format("already finished at step {}", start)
                               : fmt::format("steps {}..{} of {}", start + 1, cfg.steps, cfg.steps);
  progress.message(fmt::format("grape train: {} | {} parameters | {} | {}{}", model_cfg.pe,
                               model->num_parameters(), data->describe(), span,
                               world > 1 ? fmt::format(" | {} processes x batch {}", world, cfg.batch) : ""));
  g_interrupted = 0;
  auto previous = std::signal(SIGINT, on_sigint);

  TrainSummary summary;
  summary.parameters = model->num_parameters();
  summary.tokenizer = from.tok->kind();
  summary.steps = start;
  summary.final_loss = summary.val_loss = nan();
  if (start > 0) {  // what the log says so far: a finished run reports it as it is
    const auto [last_train, last_val] = detail::last_metrics(opts.run_dir, start);
    if (!last_train.is_null()) summary.final_loss = last_train["loss"].get<double>();
    if (!last_val.is_null()) summary.val_loss = last_val["val_loss"].get<double>();
    if (!last_train.is_null() && last_train.contains("tokens_per_s") &&
        last_train["tokens_per_s"].is_number())
      summary.tokens_per_s = last_train["tokens_per_s"].get<double>();
    if (!last_train.is_null() && last_train.contains("time_s") && last_train["time_s"].is_number())
      summary.seconds = last_train["time_s"].get<double>();
  }
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
        throw std::runtime_error(
            fmt::format("{}; stopped. {}", e.what(), good_checkpoint_note(last_checkpoint)));
      }
      const int64_t done = step + 1;
      const double elapsed = seconds();
      const double tok_s = tokens_per_step * double(done - start) / std::max(elapsed, 1e-9);
      const double tokens = tokens_before + tokens_per_step * double(done - start);
      if (lead)
        detail::append_metrics(opts.run_dir, {{"split", "train"},
                                              {"step", done},
                                              {"loss", stats.loss},
                                              {"lr", stats.lr},
                                              {"grad_norm", stats.grad_norm},
                                              {"tokens", tokens},
                                              {"tokens_per_s", tok_s},
                                              {"time_s", time_before + elapsed}});
      summary.final_loss = stats.loss;
      progress.update(done, stats.loss, tok_s, elapsed / double(done - start) * double(cfg.steps - done));

      const bool last = done == cfg.steps;
      bool stop = g_interrupted != 0 || (opts.stop_after > 0 && done >= opts.stop_after);
      if (group) stop = group->any(stop);  // Ctrl-C may reach the ranks at different steps: stop together
      if (lead && ((cfg.eval_every > 0 && done % cfg.eval_every == 0) || last)) {
        // The same validation windows as one process with the whole batch (world x batch) reads.
        summary.val_loss =
            validation_loss(model, *data, model_cfg.context, cfg.batch * world, cfg.eval_batches);
        if (fault_nan_val_at_step() == done) summary.val_loss = std::numeric_limits<double>::quiet_NaN();
        if (!std::isfinite(summary.val_loss))
          throw std::runtime_error(fmt::format("step {}: the validation loss is {} (diverged); stopped. {}",
                                               done, summary.val_loss,
                                               good_checkpoint_note(last_checkpoint)));
        detail::append_metrics(opts.run_dir, {{"split", "val"},
                                              {"step", done},
                                              {"val_loss", summary.val_loss},
                                              {"tokens", tokens},
                                              {"time_s", time_before + seconds()}});
        progress.message(fmt::format("step {}: val loss {:.4f} (perplexity {:.2f})", done, summary.val_loss,
                                     std::exp(summary.val_loss)));
      }
      if ((cfg.ckpt_every > 0 && done % cfg.ckpt_every == 0) || last || stop) {
        json state = {{"tokens", tokens},
                      {"loss", stats.loss},
                      {"world_size", world},
                      {"time_s", time_before + seconds()}};
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
  if (summary.steps > start) {
    summary.seconds = seconds();
    summary.tokens_per_s = tokens_per_step * double(summary.steps - start) / std::max(summary.seconds, 1e-9);
  }
  summary.checkpoint = last_checkpoint;
  return summary;
}

}  // namespace grape::train
