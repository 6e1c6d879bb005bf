// `grape train`: trains (or with --resume continues) a run directory.
#include <fmt/format.h>

#include "cli/commands.hpp"
#include "cli/run_flags.hpp"

namespace grape::cli {

void add_train_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("train", "train a language model with a chosen position encoding");
  auto flags = std::make_shared<RunFlags>();
  auto out = std::make_shared<std::string>();
  auto resume = std::make_shared<bool>(false);
  auto quiet = std::make_shared<bool>(false);
  add_run_flags(cmd, *flags, /*with_pe=*/true);
  cmd->add_option("--out", *out, "run directory (default: runs/<pe>-<preset>)");
  cmd->add_flag("--resume", *resume, "continue the run in --out from its latest checkpoint (its own settings; "
                                     "--steps sets a new step budget)");
  cmd->add_flag("--quiet", *quiet, "no progress output");
  cmd->callback([flags, out, resume, quiet] {
    train::TrainOptions opts;
    opts.resume = *resume;
    opts.quiet = *quiet;
    ModelConfig model;
    train::TrainConfig cfg;
    if (*resume) {
      if (out->empty()) throw std::invalid_argument("--resume needs --out RUN_DIR");
      opts.resume_steps = flags->steps;  // only the step budget may change on resume
    } else {
      std::tie(model, cfg) = resolve_run_flags(*flags);
    }
    opts.run_dir = out->empty() ? fmt::format("runs/{}-{}", model.pe, model.preset) : *out;
    auto s = train::run_training(model, cfg, opts);
    fmt::print("trained {} steps ({} parameters) in {:.1f} s, {:.0f} tokens/s; train loss {:.4f}, val loss {:.4f}\n"
               "checkpoint: {}\n", s.steps, s.parameters, s.seconds, s.tokens_per_s, s.final_loss, s.val_loss,
               s.checkpoint);
    if (s.interrupted) throw CLI::RuntimeError(130);
  });
}

}  // namespace grape::cli
