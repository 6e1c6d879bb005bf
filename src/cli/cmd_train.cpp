// `grape train`: trains (or with --resume continues) a run directory. With --nproc N it starts N worker
// processes on this host instead (data-parallel); a process started with RANK/WORLD_SIZE/MASTER_ADDR/
// MASTER_PORT in its environment (by --nproc, torchrun or a scheduler) joins that job as one rank.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cmath>
#include <nlohmann/json.hpp>
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
                "continue the run in --out from its latest checkpoint, with its own settings: a flag that "
                "contradicts them is refused, naming it; --steps sets a new budget, --data another path to "
                "the same data (checked)");
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
    opts.command = invocation();
    ResolvedRun r;
    if (*resume) {
      if (out->empty()) throw std::invalid_argument("--resume needs --out RUN_DIR");
      // The run's own settings with the flags given applied; run_training refuses any that conflicts.
      const auto run = train::read_run(*out);
      r = resolve_run_flags_on(*flags, run.model, run.train);
      if (!r.vocab_size_given) r.model.vocab_size = run.model.vocab_size;
      opts.resume_with_settings = true;
      if (flags->print_config) {
        if (const auto c = train::resume_conflicts(run, r.model, r.train); !c.empty())
          throw std::invalid_argument(
              fmt::format("--resume: {} was trained with {}", *out, fmt::join(c, ", ")));
        auto j = nlohmann::json::parse(run.json);
        const auto asked = nlohmann::json::parse(r.train.to_json());
        for (const auto& [key, value] : asked.items())
          if (train::may_change_on_resume(key) && key != "data") j["train"][key] = value;  // as resume_run
        fmt::print("{}\n", j.dump(2));
        return;
      }
    } else {
      r = resolve_run_flags(*flags);
      opts.vocab_size_given = r.vocab_size_given;
      if (flags->print_config) {
        std::string note;
        auto [m, t] = train::resolve_new_run(r.model, r.train, r.vocab_size_given, &note);
        if (!note.empty()) fmt::print(stderr, "grape train: {}\n", note);
        nlohmann::json j;
        j["model"] = nlohmann::json::parse(m.to_json());
        j["train"] = nlohmann::json::parse(t.to_json());
        j["out"] = out->empty() ? fmt::format("runs/{}-{}", m.pe, m.preset) : *out;
        fmt::print("{}\n", j.dump(2));
        return;
      }
    }
    opts.run_dir = out->empty() ? fmt::format("runs/{}-{}", r.model.pe, r.model.preset) : *out;
    train::TrainSummary s;
    try {
      s = train::run_training(r.model, r.train, opts);
    } catch (const std::exception& e) {
      // Several workers print into one terminal: say which one.
      if (!group || std::string(e.what()).rfind("rank ", 0) == 0) throw;
      throw std::runtime_error(fmt::format("rank {}: {}", rank, e.what()));
    }
    auto loss = [](double v) { return std::isfinite(v) ? fmt::format("{:.4f}", v) : std::string("n/a"); };
    const std::string bpb = s.tokenizer == "byte" && std::isfinite(s.val_loss)
                                ? fmt::format(" ({:.4f} bits/byte)", s.val_loss / std::log(2.0))
                                : "";
    if (rank == 0)
      fmt::print(
          "trained {} steps ({} parameters) in {:.1f} s, {:.0f} tokens/s; train loss {}, val loss {}{}\n"
          "checkpoint: {}\n",
          s.steps, s.parameters, s.seconds, s.tokens_per_s, loss(s.final_loss), loss(s.val_loss), bpb,
          s.checkpoint);
    if (s.interrupted) throw CLI::RuntimeError(130);
  });
}

}  // namespace grape::cli
