// `grape compare`: the same model, data, seed and budget for each encoding; then one report directory with
// results.json, report.md and two gnuplot PNGs (loss curves; perplexity vs evaluation context).
#include <fmt/format.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>

#include "grape/io.hpp"
#include "grape/train.hpp"
#include "train/report_util.hpp"
#include "train/run_files.hpp"

namespace grape::train {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

struct RunResult {
  std::string pe;
  TrainSummary train;
  EvalReport eval;
  double decode_tokens_per_s = 0;
  std::vector<std::pair<int64_t, double>> loss_curve, val_curve;
};

void read_curves(const std::string& run_dir, RunResult& r) {
  for (auto& rec : detail::read_metrics(run_dir)) {
    if (rec.contains("loss"))
      r.loss_curve.emplace_back(rec["step"].get<int64_t>(), rec["loss"].get<double>());
    if (rec.contains("val_loss"))
      r.val_curve.emplace_back(rec["step"].get<int64_t>(), rec["val_loss"].get<double>());
  }
}

std::string fmt_or_na(const LengthResult& l) {
  return l.error.empty() ? fmt::format("{:.2f}", l.perplexity) : "n/a";
}

}  // namespace

std::string run_comparison(const CompareOptions& opts) {
  if (opts.pes.empty()) throw std::invalid_argument("compare: no encodings given");
  for (const auto& pe : opts.pes) encoding_info(pe);  // unknown names fail before any training
  opts.train.validate();
  const fs::path out(opts.out_dir);
  fs::create_directories(out / "runs");
  std::vector<RunResult> results;
  for (const auto& pe : opts.pes) {
    RunResult r;
    r.pe = pe;
    ModelConfig model_cfg = opts.model;
    model_cfg.pe = pe;
    model_cfg.pe_options.clear();
    const std::string run_dir = (out / "runs" / pe).string();
    if (!opts.quiet) std::printf("\n== %s ==\n", pe.c_str());
    r.train = detail::train_or_continue(model_cfg, opts.train, run_dir, opts.quiet, "compare");
    auto run = read_run(run_dir);
    auto model = load_model(run);
    auto tok = run_tokenizer(run);
    data::DataOptions dopt;
    dopt.val_fraction = run.train.val_fraction;
    auto data = data::open_data(run.train.data, *tok, dopt);
    r.eval = evaluate(model, *data, opts.factors, opts.eval_tokens);
    r.decode_tokens_per_s = decode_tokens_per_s(model, 1, 16, opts.decode_tokens);
    read_curves(run_dir, r);
    if (!opts.quiet) std::printf("%s", eval_table(r.eval).c_str());
    results.push_back(std::move(r));
  }

  // results.json
  json j;
  j["model"] = json::parse(opts.model.to_json());
  j["train"] = json::parse(opts.train.to_json());
  j["runs"] = json::array();
  for (const auto& r : results) {
    json e = {{"pe", r.pe},
              {"parameters", r.train.parameters},
              {"final_train_loss", r.train.final_loss},
              {"val_loss", r.train.val_loss},
              {"train_tokens_per_s", r.train.tokens_per_s},
              {"train_seconds", r.train.seconds},
              {"decode_tokens_per_s", r.decode_tokens_per_s},
              {"eval", json::parse(eval_json(r.eval))}};
    j["runs"].push_back(e);
  }
  io::write_file_atomic((out / "results.json").string(), j.dump(2) + "\n");

  // Plots: data files, then gnuplot.
  std::string loss_plot = "set xlabel 'step'\nset ylabel 'train loss (nats/token, EMA 0.9)'\nplot ";
  std::string ppl_plot =
      "set logscale x 2\nset xlabel 'evaluation context (tokens)'\nset ylabel 'validation perplexity'\nplot ";
  for (size_t i = 0; i < results.size(); ++i) {
    const auto& r = results[i];
    std::string loss_dat, ppl_dat;
    double ema = r.loss_curve.empty() ? 0 : r.loss_curve.front().second;
    for (const auto& [step, loss] : r.loss_curve) {
      ema = 0.9 * ema + 0.1 * loss;  // smoothed: per-step losses of a tiny model are noisy
      loss_dat += fmt::format("{} {:.6f}\n", step, ema);
    }
    for (const auto& l : r.eval.lengths)
      if (l.error.empty()) ppl_dat += fmt::format("{} {:.6f}\n", l.context, l.perplexity);
    const std::string loss_file = "loss_" + r.pe + ".dat", ppl_file = "ppl_" + r.pe + ".dat";
    io::write_file_atomic((out / loss_file).string(), loss_dat);
    io::write_file_atomic((out / ppl_file).string(), ppl_dat);
    const std::string sep = i + 1 < results.size() ? ", \\\n     " : "\n";
    loss_plot += detail::gnuplot_quote(loss_file) + " using 1:2 with lines lw 2 title " +
                 detail::gnuplot_quote(r.pe) + sep;
    ppl_plot += detail::gnuplot_quote(ppl_file) + " using 1:2 with linespoints lw 2 pt 7 title " +
                detail::gnuplot_quote(r.pe) + sep;
  }
  const bool have_loss_png = detail::plot(out, "loss.png", loss_plot);
  const bool have_ppl_png = detail::plot(out, "perplexity.png", ppl_plot);

  // report.md
  const auto& m = opts.model;
  const auto& t = opts.train;
  std::string md = "# grape compare\n\n";
  md += fmt::format(
      "Model: preset `{}`, {} layers, {} heads, width {}, head dim {}, training context {}. Data: `{}` "
      "(tokenizer `{}`). Training: {} steps x {} sequences x {} micro-batches, lr {} -> {} (warmup {}), "
      "seed {}. Same data order and initialisation seed for every encoding.\n\n",
      m.preset, m.n_layer, m.n_head, m.n_embd, m.head_dim(), m.context, t.data, t.tokenizer, t.steps, t.batch,
      t.accum, t.lr, t.min_lr, t.warmup, t.seed);
  std::vector<std::string> header = {"encoding", "parameters", "val loss"};
  for (int64_t f : opts.factors) header.push_back(fmt::format("ppl {}x", f));
  header.insert(header.end(), {"train tokens/s", "decode tokens/s"});
  std::vector<std::vector<std::string>> rows;
  for (const auto& r : results) {
    std::vector<std::string> row = {r.pe, std::to_string(r.train.parameters),
                                    fmt::format("{:.4f}", r.train.val_loss)};
    for (const auto& l : r.eval.lengths) row.push_back(fmt_or_na(l));
    row.push_back(fmt::format("{:.0f}", r.train.tokens_per_s));
    row.push_back(fmt::format("{:.1f}", r.decode_tokens_per_s));
    rows.push_back(std::move(row));
  }
  md += detail::markdown_table(header, rows);
  md += fmt::format(
      "\nPerplexity at Nx is measured on validation windows of N x {} tokens (about {} tokens per length); "
      "`val loss` is at the training context. Throughput is this machine's, measured during the run "
      "(training) and with the KV cache for one sequence (decode).\n\n",
      m.context, opts.eval_tokens);
  for (const auto& r : results)
    for (const auto& l : r.eval.lengths)
      if (!l.error.empty()) md += fmt::format("- {} at {}x: {}\n", r.pe, l.factor, l.error);
  md += have_loss_png ? "![training loss](loss.png)\n\n"
                      : "(loss.png not drawn: gnuplot failed or is missing)\n\n";
  md += have_ppl_png ? "![perplexity vs context](perplexity.png)\n"
                     : "(perplexity.png not drawn: gnuplot failed or is missing)\n";
  io::write_file_atomic((out / "report.md").string(), md);
  return md;
}

}  // namespace grape::train
