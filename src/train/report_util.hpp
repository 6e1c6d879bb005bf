// Pieces shared by the report writers (`grape compare` in compare.cpp, the extrapolation study in study.cpp):
// training a run or continuing an interrupted one, gnuplot PNGs, markdown tables (report_util.cpp).
// Internal to src/train.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

#include "grape/train.hpp"

namespace grape::train::detail {

// Trains the run in run_dir with these settings, or continues it when an earlier, interrupted report left
// it there (a finished run is found finished). A run there with other settings, the step budget included, is
// refused, naming them (choose another --out); one stopped before its first checkpoint is started over.
// Throws when interrupted by Ctrl-C. `command` is recorded in run.json.
TrainSummary train_or_continue(const ModelConfig& model, const TrainConfig& train, const std::string& run_dir,
                               bool quiet, const std::string& what, const std::string& command = "");

// A gnuplot single-quoted string ('' stands for ').
std::string gnuplot_quote(const std::string& s);
// A POSIX shell single-quoted word.
std::string shell_quote(const std::string& s);

// Writes <dir>/<stem>.gp (terminal, output, grid and key, then `body`) and runs gnuplot in dir, so
// `gnuplot NAME.gp` there redraws it. The PNG appears only when gnuplot succeeded; returns whether it did.
bool plot(const std::filesystem::path& dir, const std::string& name, const std::string& body,
          const std::string& size = "900,560");

// A markdown table: the first column left-aligned, the others right-aligned (numbers).
std::string markdown_table(const std::vector<std::string>& header,
                           const std::vector<std::vector<std::string>>& rows);

}  // namespace grape::train::detail
