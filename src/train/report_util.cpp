// The pieces shared by the report writers (`grape compare` in compare.cpp, the extrapolation study in
// study.cpp): training a run or continuing an interrupted one, gnuplot PNGs, markdown tables.
#include "train/report_util.hpp"

#include <fmt/format.h>

#include <cstdlib>
#include <nlohmann/json.hpp>
#include <stdexcept>

#include "grape/io.hpp"

namespace grape::train {

namespace fs = std::filesystem;

namespace detail {

// A run directory left by an earlier report with the same --out is continued, but only with the same
// settings.
TrainSummary train_or_continue(const ModelConfig& model, const TrainConfig& train, const std::string& run_dir,
                               bool quiet, const std::string& what, const std::string& command) {
  TrainOptions topts;
  topts.command = command;
  topts.run_dir = run_dir;
  topts.quiet = quiet;
  if (fs::exists(fs::path(run_dir) / "run.json")) {
    auto run = read_run(run_dir);
    ModelConfig m = model;
    m.vocab_size = run.model.vocab_size;
    TrainConfig t = train;
    t.data = data::absolute_spec(t.data);  // as run.json records them
    t.tokenizer = data::absolute_spec(t.tokenizer);
    // Every setting must match, the step budget included: extending old runs under another schedule would
    // compare them with runs trained under a different one.
    std::vector<std::string> differ;
    auto compare = [&](const std::string& have, const std::string& want) {
      const auto h = nlohmann::json::parse(have), w = nlohmann::json::parse(want);
      for (const auto& [key, value] : h.items())
        if (!w.contains(key) || w[key] != value)
          differ.push_back(
              fmt::format("{}={} (asked: {})", key, value.dump(), w.contains(key) ? w[key].dump() : "-"));
    };
    compare(run.model.to_json(), m.to_json());
    compare(run.train.to_json(), t.to_json());
    if (!differ.empty()) {
      std::string list;
      for (const auto& d : differ) list += (list.empty() ? "" : ", ") + d;
      throw std::runtime_error(
          fmt::format("{} holds a run of an earlier {} with other settings: {}; choose another --out, or "
                      "remove it to start "
                      "fresh",
                      run_dir, what, list));
    }
    try {
      latest_checkpoint(run_dir);
      topts.resume = true;
    } catch (const std::runtime_error&) {
      fs::remove_all(run_dir);  // stopped before its first checkpoint: nothing to continue from
    }
  }
  auto summary = run_training(model, train, topts);
  if (summary.interrupted)
    throw std::runtime_error(fmt::format("{}: interrupted; run it again to continue", what));
  return summary;
}

std::string gnuplot_quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("''") : std::string(1, c);
  return out + "'";
}

std::string shell_quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

bool plot(const fs::path& dir, const std::string& name, const std::string& body, const std::string& size) {
  const fs::path png = dir / name, tmp = dir / ("." + name + ".tmp");
  // Paths in the script are relative to the report directory, so `gnuplot NAME.gp` there redraws it.
  const std::string script = "set terminal pngcairo size " + size + " font 'sans,11'\nset output " +
                             gnuplot_quote(tmp.filename().string()) +
                             "\nset grid\nset key outside right top\n" + body;
  const std::string script_name = fs::path(name).stem().string() + ".gp";
  io::write_file_atomic((dir / script_name).string(), script);
  const std::string cmd =
      "cd " + shell_quote(dir.string()) + " && gnuplot " + shell_quote(script_name) + " 2>/dev/null";
  if (std::system(cmd.c_str()) != 0 || !fs::exists(tmp)) {
    fs::remove(tmp);
    return false;
  }
  fs::rename(tmp, png);
  return true;
}

std::string markdown_table(const std::vector<std::string>& header,
                           const std::vector<std::vector<std::string>>& rows) {
  std::string md, rule;
  for (size_t c = 0; c < header.size(); ++c) {
    md += "| " + header[c] + " ";
    rule += c == 0 ? "|---" : "|---:";
  }
  md += "|\n" + rule + "|\n";
  for (const auto& row : rows) {
    if (row.size() != header.size())
      throw std::logic_error(
          fmt::format("markdown_table: a row of {} cells under {} columns", row.size(), header.size()));
    for (const auto& cell : row) md += "| " + cell + " ";
    md += "|\n";
  }
  return md;
}

}  // namespace detail

}  // namespace grape::train
