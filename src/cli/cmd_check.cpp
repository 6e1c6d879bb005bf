// `grape check [--encoding NAME]`: the laws of each encoding on random inputs, as a table.
#include <fmt/format.h>

#include "cli/commands.hpp"
#include "grape/check.hpp"
#include "grape/pe.hpp"

namespace grape::cli {

void add_check_command(CLI::App& app) {
  auto* cmd =
      app.add_subcommand("check", "check every encoding's laws on random inputs (exit 1 on a failure)");
  auto names = std::make_shared<std::vector<std::string>>();
  auto seed = std::make_shared<uint64_t>(1234);
  cmd->add_option("--pe,-e,--encoding", *names, "encodings to check, comma-separated (default: all)")
      ->delimiter(',');
  cmd->add_option("--seed", *seed, "random seed of the inputs and perturbations");
  cmd->callback([names, seed] {
    if (names->empty())
      for (const auto& e : encodings()) names->push_back(e.name);
    for (const auto& n : *names) (void)encoding_info(n);  // unknown names fail before any work
    int failed = 0, total = 0;
    fmt::print("{:<15} {:<42} {:>10} {:>10}  {}\n", "encoding", "law", "max error", "tolerance", "result");
    for (const auto& n : *names) {
      for (const auto& r : check::run_laws(n, *seed)) {
        ++total;
        failed += !r.passed;
        fmt::print("{:<15} {:<42} {:>10.2e} {:>10.1e}  {}\n", r.encoding, r.law, r.error, r.tolerance,
                   r.passed ? "pass" : "FAIL");
      }
    }
    fmt::print("\n{} laws checked over {} encodings: {} passed, {} failed\n", total, names->size(),
               total - failed, failed);
    if (failed) throw CLI::RuntimeError(1);
  });
}

}  // namespace grape::cli
