// `grape train`: trains (or with --resume continues) a run directory. With --nproc N it starts N worker
// processes on this host instead (data-parallel); a process started with RANK/WORLD_SIZE/MASTER_ADDR/
// MASTER_PORT in its environment (by --nproc, torchrun or a scheduler) joins that job as one rank.
#include <fmt/format.h>

#include <thread>

#include "cli/commands.hpp"
#include "cli/run_flags.hpp"
#include "grape/distributed.hpp"

namespace grape::cli {

void add_train_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("train", "train a language model with a chosen position encoding");
  auto flags = std::make_shared<RunFlags>();
  auto out = std::make_shared<std::string>();
  auto resume = std::make_shared<bool>(false);
  auto quiet = std::make_shared<bool>(false);
  auto nproc = std::make_shared<int>(1);
  add_run_flags(cmd, *flags, /*with_pe=*/true);
  cmd->add_option("--out", *out, "run directory (default: runs/<pe>-<preset>)");
  cmd->add_flag("--resume", *resume,
                "continue the run in --out from its latest checkpoint (its own settings; "
                "--steps sets a new step budget)");
  cmd->add_flag("--quiet", *quiet, "no progress output");
  cmd->add_option("--nproc", *nproc,
                  "data-parallel worker processes on this host (each takes --batch sequences "
                  "of every step; see docs/distributed.md)")
      ->check(CLI::Range(1, 1024));
  cmd->callback([cmd, flags, out, resume, quiet, nproc] {
    if (*nproc > 1) {
      // The launcher: the same command line in every worker, minus --nproc, plus the torchrun variables.
      auto args = dist::own_arguments_without("--nproc");
      if (cmd->get_parent()->get_option("--threads")->count() == 0) {
        const int cores = int(std::max(1u, std::thread::hardware_concurrency()));
        args.insert(args.begin() + 1, {"--threads", std::to_string(std::max(1, cores / *nproc))});
      }
      const int code = dist::launch_local(*nproc, args);
      if (code != 0) throw CLI::RuntimeError(code);
      return;
    }
    std::shared_ptr<dist::Group> group;
    if (auto env = dist::env_from_environment(); env && env->world_size > 1) group = dist::Group::join(*env);
    const int rank = group ? group->rank() : 0;
    train::TrainOptions opts;
    opts.resume = *resume;
    opts.quiet = *quiet;
    opts.group = group;
    ModelConfig model;
    train::TrainConfig cfg;
    if (*resume) {
      if (out->empty()) throw std::invalid_argument("--resume needs --out RUN_DIR");
      opts.resume_steps = flags->steps;  // only the step budget may change on resume
    } else {
      std::tie(model, cfg) = resolve_run_flags(*flags);
    }
    opts.run_dir = out->empty() ? fmt::format("runs/{}-{}", model.pe, model.preset) : *out;
    train::TrainSummary s;
    try {
      s = train::run_training(model, cfg, opts);
    } catch (const std::exception& e) {
      // Several workers print into one terminal: say which one.
      if (!group || std::string(e.what()).rfind("rank ", 0) == 0) throw;
      throw std::runtime_error(fmt::format("rank {}: {}", rank, e.what()));
    }
    if (rank == 0)
      fmt::print(
          "trained {} steps ({} parameters) in {:.1f} s, {:.0f} tokens/s; train loss {:.4f}, val loss "
          "{:.4f}\n"
          "checkpoint: {}\n",
          s.steps, s.parameters, s.seconds, s.tokens_per_s, s.final_loss, s.val_loss, s.checkpoint);
    if (s.interrupted) throw CLI::RuntimeError(130);
  });
}

}  // namespace grape::cli
