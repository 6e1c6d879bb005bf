// `grape compare`: trains each encoding with the same data, seed and budget and writes a report directory.
// `grape compare --study extrapolation`: the length-extrapolation study (src/train/study.cpp).
#include <fmt/format.h>
#include <fmt/ranges.h>

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

// The default extrapolation study: eight encodings, two runs each (language model, needle), in about 20
// minutes on 2 cores. The training context is short (32): the needle models learn retrieval within the
// budget there (at 64 they need about 3x the steps), and 16x is only 512 tokens, so the long evaluations
// stay cheap. Validation only at the end (the study reports the final models).
const std::vector<std::string> kDefaultStudy = {"nope",    "rope",     "alibi",    "fox",
                                                "grape-m", "grape-ap", "hdd-rope", "tape"};
constexpr int64_t kDefaultNeedleSteps = 400;
void apply_study_defaults(RunFlags& f) {
  if (f.context == 0) f.context = 32;
  if (f.steps == 0) f.steps = 400;
  if (f.batch == 0) f.batch = 16;
  if (f.warmup < 0) f.warmup = 20;
  if (f.lr == 0) f.lr = 3e-3;
  if (f.min_lr < 0) f.min_lr = 3e-4;
  if (f.eval_every < 0) f.eval_every = 0;
}

// The command as given (options in CLI11's order), recorded in the study's report.
std::string command_line(const CLI::App* cmd) {
  std::string s = "grape";
  if (const auto* threads = cmd->get_parent()->get_option_no_throw("--threads");
      threads && threads->count() > 0)
    s += " --threads " + threads->results().front();
  s += " compare";
  for (const auto* opt : cmd->get_options()) {
    if (opt->count() == 0 || opt->get_name() == "--help") continue;
    if (opt->get_items_expected_max() == 0) {  // a flag
      s += " " + opt->get_name();
      continue;
    }
    std::vector<std::string> values = opt->results();
    if (opt->get_expected_max() > 1 && opt->get_delimiter() == ',') {
      s += " " + opt->get_name() + " " + fmt::format("{}", fmt::join(values, ","));
    } else {
      for (const auto& v : values) s += " " + opt->get_name() + " " + v;
    }
  }
  return s;
}

}  // namespace

void add_compare_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("compare",
                                 "train and evaluate several encodings on the same budget; write a report");
  struct Args {
    RunFlags flags;
    std::vector<std::string> pes;
    std::string out;
    std::vector<int64_t> factors;
    int64_t eval_tokens = 0;
    bool quiet = false;
    std::string study;
    std::vector<std::string> extend;
    std::vector<double> depths;
    int64_t needle_steps = 0, needle_examples = 0;
    bool no_needle_extend = false;
  };
  auto a = std::make_shared<Args>();
  add_run_flags(cmd, a->flags, /*with_pe=*/false);
  cmd->add_option(
         "--pe", a->pes,
         "encodings to compare, comma-separated (default: rope,alibi,fox,grape-m,grape-ap; with --study "
         "extrapolation: nope,rope,alibi,fox,grape-m,grape-ap,hdd-rope,tape)")
      ->delimiter(',');
  cmd->add_option("--out", a->out,
                  "report directory (an earlier report there is continued; default: grape-compare, "
                  "with --study: grape-study)");
  cmd->add_option(
         "--factors", a->factors,
         "evaluation contexts as multiples of the training context (default: 1,2,4,8; study: 1,2,4,8,16)")
      ->delimiter(',');
  cmd->add_option("--eval-tokens", a->eval_tokens,
                  "validation tokens per length (default: 16384; study: 8192)")
      ->check(CLI::PositiveNumber);
  cmd->add_flag("--quiet", a->quiet, "no progress output");
  cmd->add_option("--study", a->study, "run a study instead of the plain comparison: extrapolation")
      ->check(CLI::IsMember({"extrapolation"}));
  cmd->add_option("--extend", a->extend,
                  "study: context-extension methods applied to encodings with an `extend` option "
                  "(default: pi,ntk,dynamic-ntk,yarn; also longrope, llama3, and yarn-hf: YaRN with Hugging "
                  "Face's ramp; 'none' for no extension)")
      ->delimiter(',');
  cmd->add_option("--depths", a->depths, "study: needle depths in [0,1] (default: 0,0.25,0.5,0.75,1)")
      ->delimiter(',');
  cmd->add_option("--needle-steps", a->needle_steps, "study: steps of the needle runs (default: 400)")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--needle-examples", a->needle_examples,
                  "study: needle examples per depth and length (default: 20)")
      ->check(CLI::PositiveNumber);
  cmd->add_flag("--no-needle-extend", a->no_needle_extend,
                "study: measure the needle grid without extension methods");
  cmd->callback([a, cmd] {
    if (a->study.empty()) {
      for (const char* name :
           {"--extend", "--depths", "--needle-steps", "--needle-examples", "--no-needle-extend"})
        if (cmd->get_option(name)->count() > 0)
          throw std::invalid_argument(
              fmt::format("compare: {} belongs to a study (add --study extrapolation)", name));
      train::CompareOptions opts;
      apply_compare_defaults(a->flags);
      std::tie(opts.model, opts.train) = resolve_run_flags(a->flags);
      opts.pes = a->pes.empty() ? kDefaultComparison : a->pes;
      opts.out_dir = a->out.empty() ? "grape-compare" : a->out;
      if (!a->factors.empty()) opts.factors = a->factors;
      if (a->eval_tokens > 0) opts.eval_tokens = a->eval_tokens;
      opts.quiet = a->quiet;
      auto md = train::run_comparison(opts);
      fmt::print("\n{}\nreport: {}/report.md\n", md, opts.out_dir);
      return;
    }
    train::StudyOptions opts;
    apply_study_defaults(a->flags);
    std::tie(opts.model, opts.train) = resolve_run_flags(a->flags);
    opts.pes = a->pes.empty() ? kDefaultStudy : a->pes;
    opts.out_dir = a->out.empty() ? "grape-study" : a->out;
    if (!a->factors.empty()) opts.factors = a->factors;
    if (a->eval_tokens > 0) opts.eval_tokens = a->eval_tokens;
    if (cmd->get_option("--extend")->count() > 0) {
      opts.extend = a->extend;
      if (opts.extend == std::vector<std::string>{"none"}) opts.extend.clear();
    }
    if (!a->depths.empty()) opts.depths = a->depths;
    opts.needle_steps = a->needle_steps > 0 ? a->needle_steps : kDefaultNeedleSteps;
    if (a->needle_examples > 0) opts.needle_examples = a->needle_examples;
    opts.needle_extend = !a->no_needle_extend;
    opts.quiet = a->quiet;
    opts.command = command_line(cmd);
    auto md = train::run_extrapolation_study(opts);
    fmt::print("\n{}\nreport: {}/report.md\n", md, opts.out_dir);
  });
}

}  // namespace grape::cli
