// `grape eval`: validation perplexity at the training context and longer (length extrapolation), and
// synthetic-task accuracy, for a run's checkpoint.
#include <fmt/format.h>

#include <filesystem>

#include "cli/commands.hpp"
#include "grape/io.hpp"
#include "grape/train.hpp"

namespace grape::cli {

void add_eval_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("eval", "evaluate a trained run: perplexity at 1x, 2x, 4x, 8x context, task accuracy");
  struct Args {
    std::string run, checkpoint, data, json;
    std::vector<int64_t> factors = {1, 2, 4, 8};
    int64_t tokens = 16384, examples = 200;
  };
  auto a = std::make_shared<Args>();
  cmd->add_option("--run", a->run, "run directory")->required();
  cmd->add_option("--checkpoint", a->checkpoint, "checkpoint directory (default: the run's latest)");
  cmd->add_option("--data", a->data, "evaluate on other data (default: the run's)");
  cmd->add_option("--factors", a->factors, "multiples of the training context")->delimiter(',')->capture_default_str();
  cmd->add_option("--tokens", a->tokens, "validation tokens per length")->capture_default_str();
  cmd->add_option("--examples", a->examples, "synthetic-task examples")->capture_default_str();
  cmd->add_option("--json", a->json, "write the results as JSON here (default: RUN/eval.json)");
  cmd->callback([a] {
    auto run = train::read_run(a->run);
    auto model = train::load_model(run, a->checkpoint);
    auto tok = train::run_tokenizer(run);
    data::DataOptions dopt;
    dopt.val_fraction = run.train.val_fraction;
    auto data = data::open_data(a->data.empty() ? run.train.data : a->data, *tok, dopt);
    auto report = train::evaluate(model, *data, a->factors, a->tokens, a->examples);
    fmt::print("{} ({}), training context {}\n{}", run.model.pe, data->describe(), run.model.context,
               train::eval_table(report));
    const std::string path = a->json.empty() ? (std::filesystem::path(a->run) / "eval.json").string() : a->json;
    io::write_file_atomic(path, train::eval_json(report) + "\n");
    fmt::print("results: {}\n", path);
  });
}

}  // namespace grape::cli
