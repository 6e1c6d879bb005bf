// `grape compare`: trains each encoding with the same data, seed and budget and writes a report directory.
#include <fmt/format.h>

#include <sstream>

#include "cli/commands.hpp"
#include "cli/run_flags.hpp"

namespace grape::cli {

namespace {

// The default comparison: the README's first command. Sized to finish in about 6 minutes on 2 cores (tiny
// preset, 200 steps of 16 x 128 tokens each); the short budget wants a higher lr and a short warmup.
const std::vector<std::string> kDefaultComparison = {"rope", "alibi", "fox", "grape-m", "grape-ap"};
void apply_compare_defaults(RunFlags& f) {
  if (f.steps == 0) f.steps = 200;
  if (f.warmup < 0) f.warmup = 20;
  if (f.lr == 0) f.lr = 3e-3;
  if (f.min_lr < 0) f.min_lr = 3e-4;
  if (f.eval_every < 0) f.eval_every = 50;
}

}  // namespace

void add_compare_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("compare", "train and evaluate several encodings on the same budget; write a report");
  struct Args {
    RunFlags flags;
    std::vector<std::string> pes;
    std::string out = "grape-compare";
    std::vector<int64_t> factors = {1, 2, 4, 8};
    int64_t eval_tokens = 16384;
    bool quiet = false;
  };
  auto a = std::make_shared<Args>();
  add_run_flags(cmd, a->flags, /*with_pe=*/false);
  cmd->add_option("--pe", a->pes, "encodings to compare, comma-separated (default: rope,alibi,fox,grape-m,grape-ap)")
      ->delimiter(',');
  cmd->add_option("--out", a->out, "report directory (an earlier report there is continued)")->capture_default_str();
  cmd->add_option("--factors", a->factors, "evaluation contexts as multiples of the training context")
      ->delimiter(',')->capture_default_str();
  cmd->add_option("--eval-tokens", a->eval_tokens, "validation tokens per length")->capture_default_str();
  cmd->add_flag("--quiet", a->quiet, "no progress output");
  cmd->callback([a] {
    train::CompareOptions opts;
    apply_compare_defaults(a->flags);
    std::tie(opts.model, opts.train) = resolve_run_flags(a->flags);
    opts.pes = a->pes.empty() ? kDefaultComparison : a->pes;
    opts.out_dir = a->out;
    opts.factors = a->factors;
    opts.eval_tokens = a->eval_tokens;
    opts.quiet = a->quiet;
    auto md = train::run_comparison(opts);
    fmt::print("\n{}\nreport: {}/report.md\n", md, a->out);
  });
}

}  // namespace grape::cli
