// `grape compare`: the same model, data, seed and budget for each encoding; then one report directory with
// results.json, report.md and two gnuplot PNGs (loss curves with validation points; perplexity vs
// evaluation context). With several seeds per encoding, the report gives mean +- standard deviation over the
// seeds and says which differences are larger than that spread.
#include <fmt/format.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
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

// One training run: an encoding at one seed.
struct SeedRun {
  uint64_t seed = 0;
  TrainSummary train;
  EvalReport eval;
  double decode_tokens_per_s = 0;
  std::vector<std::pair<int64_t, double>> loss_curve, val_curve;
};

struct EncodingResult {
  std::string pe;
  std::vector<SeedRun> runs;  // the first is the base seed (runs/PE)
};

// Mean and sample standard deviation (n - 1; 0 for one value) of the finite values.
struct Spread {
  double mean = std::numeric_limits<double>::quiet_NaN(), sd = 0;
  size_t n = 0;
};
Spread spread(const std::vector<double>& values) {
  Spread s;
  double sum = 0;
  for (double v : values)
    if (std::isfinite(v)) sum += v, ++s.n;
  if (s.n == 0) return s;
  s.mean = sum / double(s.n);
  double ss = 0;
  for (double v : values)
    if (std::isfinite(v)) ss += (v - s.mean) * (v - s.mean);
  s.sd = s.n > 1 ? std::sqrt(ss / double(s.n - 1)) : 0;
  return s;
}

template <class F>
Spread over_seeds(const EncodingResult& r, F value) {
  std::vector<double> v;
  for (const auto& run : r.runs) v.push_back(value(run));
  return spread(v);
}

Spread val_loss(const EncodingResult& r) {
  return over_seeds(r, [](const SeedRun& s) { return s.train.val_loss; });
}
Spread perplexity(const EncodingResult& r, size_t length) {
  return over_seeds(r, [&](const SeedRun& s) {
    const auto& l = s.eval.lengths.at(length);
    return l.error.empty() ? l.perplexity : std::numeric_limits<double>::quiet_NaN();
  });
}

// Two encodings differ by more than the seed spread when their mean +- sd intervals do not overlap.
bool beyond_spread(const Spread& a, const Spread& b) { return std::abs(a.mean - b.mean) > a.sd + b.sd; }

void read_curves(const std::string& run_dir, SeedRun& r) {
  for (auto& rec : detail::read_metrics(run_dir)) {
    if (rec.contains("loss"))
      r.loss_curve.emplace_back(rec["step"].get<int64_t>(), rec["loss"].get<double>());
    if (rec.contains("val_loss"))
      r.val_curve.emplace_back(rec["step"].get<int64_t>(), rec["val_loss"].get<double>());
  }
}

std::string run_dir_of(const fs::path& out, const std::string& pe, size_t k, uint64_t seed) {
  return (out / "runs" / (k == 0 ? pe : fmt::format("{}-seed{}", pe, seed))).string();
}

SeedRun train_and_measure(const CompareOptions& opts, const std::string& pe, const std::string& run_dir,
                          uint64_t seed) {
  SeedRun r;
  r.seed = seed;
  ModelConfig model_cfg = opts.model;
  model_cfg.pe = pe;
  model_cfg.pe_options.clear();
  TrainConfig train_cfg = opts.train;
  train_cfg.seed = seed;
  r.train = detail::train_or_continue(model_cfg, train_cfg, run_dir, opts.quiet, "compare", opts.command);
  auto run = read_run(run_dir);
  auto model = load_model(run);
  auto tok = run_tokenizer(run);
  data::DataOptions dopt;
  dopt.val_fraction = run.train.val_fraction;
  auto data = data::open_data(run.train.data, *tok, dopt);
  r.eval = evaluate(model, *data, opts.factors, opts.eval_tokens, 200, run.tokenizer == "byte");
  r.decode_tokens_per_s = decode_tokens_per_s(model, 1, 16, opts.decode_tokens);
  read_curves(run_dir, r);
  if (!opts.quiet) std::printf("%s", eval_table(r.eval).c_str());
  return r;
}

json seed_json(const SeedRun& r) {
  return {{"seed", r.seed},
          {"parameters", r.train.parameters},
          {"final_train_loss", r.train.final_loss},
          {"val_loss", r.train.val_loss},
          {"train_tokens_per_s", r.train.tokens_per_s},
          {"train_seconds", r.train.seconds},
          {"decode_tokens_per_s", r.decode_tokens_per_s},
          {"eval", json::parse(eval_json(r.eval))}};
}

json spread_json(const Spread& s) { return {{"mean", s.mean}, {"sd", s.sd}, {"n", s.n}}; }

// The plots: training loss (EMA of the mean over seeds) with validation points, and perplexity per context
// (with error bars over seeds when there are several).
std::pair<bool, bool> write_plots(const fs::path& out, const std::vector<EncodingResult>& results,
                                  const std::vector<int64_t>& factors, bool several) {
  std::string loss_plot =
      "set xlabel 'step'\nset ylabel 'loss (nats/token): train EMA 0.9, validation points'\nplot ";
  std::string ppl_plot =
      "set logscale x 2\nset xlabel 'evaluation context (tokens)'\nset ylabel 'validation perplexity" +
      std::string(several ? " (mean +- sd over seeds)" : "") + "'\nplot ";
  for (size_t i = 0; i < results.size(); ++i) {
    const auto& r = results[i];
    const std::string color = fmt::format(" lc {}", i + 1);
    // Mean over seeds at each logged step (every seed logs the same steps).
    std::map<int64_t, std::vector<double>> train_at, val_at;
    for (const auto& run : r.runs) {
      for (const auto& [step, loss] : run.loss_curve) train_at[step].push_back(loss);
      for (const auto& [step, loss] : run.val_curve) val_at[step].push_back(loss);
    }
    std::string loss_dat, val_dat, ppl_dat;
    double ema = std::numeric_limits<double>::quiet_NaN();
    for (const auto& [step, losses] : train_at) {
      const double mean = spread(losses).mean;
      ema = std::isnan(ema) ? mean : 0.9 * ema + 0.1 * mean;  // smoothed: per-step losses are noisy
      loss_dat += fmt::format("{} {:.6f}\n", step, ema);
    }
    for (const auto& [step, losses] : val_at) {
      const auto s = spread(losses);
      val_dat += fmt::format("{} {:.6f} {:.6f}\n", step, s.mean, s.sd);
    }
    for (size_t l = 0; l < factors.size(); ++l) {
      const auto s = perplexity(r, l);
      if (s.n > 0)
        ppl_dat += fmt::format("{} {:.6f} {:.6f}\n", r.runs[0].eval.lengths[l].context, s.mean, s.sd);
    }
    const std::string loss_file = "loss_" + r.pe + ".dat", val_file = "val_" + r.pe + ".dat",
                      ppl_file = "ppl_" + r.pe + ".dat";
    io::write_file_atomic((out / loss_file).string(), loss_dat);
    io::write_file_atomic((out / val_file).string(), val_dat);
    io::write_file_atomic((out / ppl_file).string(), ppl_dat);
    const std::string sep = i + 1 < results.size() ? ", \\\n     " : "\n";
    loss_plot += detail::gnuplot_quote(loss_file) + " using 1:2 with lines lw 2" + color + " title " +
                 detail::gnuplot_quote(r.pe) + ", \\\n     " + detail::gnuplot_quote(val_file) +
                 (several ? " using 1:2:3 with yerrorbars" : " using 1:2 with points") + " pt 7 ps 1.2" +
                 color + " title " + detail::gnuplot_quote(r.pe + " val") + sep;
    ppl_plot += detail::gnuplot_quote(ppl_file) +
                (several ? " using 1:2:3 with yerrorlines" : " using 1:2 with linespoints") + " lw 2 pt 7" +
                color + " title " + detail::gnuplot_quote(r.pe) + sep;
  }
  return {detail::plot(out, "loss.png", loss_plot), detail::plot(out, "perplexity.png", ppl_plot)};
}

// The report.md of a finished comparison in `out` whose results.json records these settings; empty when
// there is none (a comparison still to run, interrupted, or asked with other settings).
std::optional<std::string> finished_report(const fs::path& out, const json& settings) {
  std::error_code ec;
  if (!fs::is_regular_file(out / "results.json", ec) || !fs::is_regular_file(out / "report.md", ec))
    return {};
  json done;
  try {
    done = json::parse(io::read_file((out / "results.json").string()));
  } catch (const json::exception&) {
    return {};  // damaged: run it again
  }
  if (!done.is_object() || !done.contains("settings") || done["settings"] != settings) return {};
  return io::read_file((out / "report.md").string());
}

std::string mean_sd(const Spread& s, const char* format) {
  if (s.n == 0) return "n/a";
  return fmt::format(fmt::runtime(format), s.mean) + " ± " + fmt::format(fmt::runtime(format), s.sd);
}

}  // namespace

std::string run_comparison(const CompareOptions& opts) {
  if (opts.pes.empty()) throw std::invalid_argument("compare: no encodings given");
  for (const auto& pe : opts.pes) encoding_info(pe);  // unknown names fail before any training
  if (opts.seeds < 1 || opts.seeds > 1000)
    throw std::invalid_argument(fmt::format("compare: seeds must be in 1..1000, got {}", opts.seeds));
  opts.train.validate();
  const fs::path out(opts.out_dir);
  // Everything the report depends on: a finished comparison with the same settings is complete as it is.
  json settings = {{"model", json::parse(opts.model.to_json())},
                   {"train", json::parse(opts.train.to_json())},
                   {"pe", opts.pes},
                   {"seeds", opts.seeds},
                   {"factors", opts.factors},
                   {"eval_tokens", opts.eval_tokens},
                   {"decode_tokens", opts.decode_tokens}};
  settings["train"]["data"] = data::absolute_spec(opts.train.data);  // as the runs record them
  settings["train"]["tokenizer"] = data::absolute_spec(opts.train.tokenizer);
  if (const auto done = finished_report(out, settings)) {
    std::fprintf(stderr,
                 "grape compare: %s is complete (every run finished with these settings); its report is "
                 "unchanged (remove the directory to run it again)\n",
                 opts.out_dir.c_str());
    return *done;
  }
  fs::create_directories(out / "runs");
  const bool several = opts.seeds > 1;
  std::vector<EncodingResult> results;
  for (const auto& pe : opts.pes) {
    EncodingResult r;
    r.pe = pe;
    for (int64_t k = 0; k < opts.seeds; ++k) {
      const uint64_t seed = opts.train.seed + uint64_t(k);
      if (!opts.quiet)
        std::printf("\n== %s%s ==\n", pe.c_str(), several ? fmt::format(", seed {}", seed).c_str() : "");
      r.runs.push_back(train_and_measure(opts, pe, run_dir_of(out, pe, size_t(k), seed), seed));
    }
    results.push_back(std::move(r));
  }

  // results.json: per encoding the base seed's run as before, and with several seeds every seed and the
  // spread.
  json j;
  j["model"] = json::parse(opts.model.to_json());
  j["train"] = json::parse(opts.train.to_json());
  j["seeds"] = opts.seeds;
  j["settings"] = settings;
  j["provenance"] = json::parse(provenance_json(opts.command));
  j["runs"] = json::array();
  for (const auto& r : results) {
    json e = seed_json(r.runs[0]);
    e.erase("seed");
    e["pe"] = r.pe;
    if (several) {
      e["seeds"] = json::array();
      for (const auto& run : r.runs) e["seeds"].push_back(seed_json(run));
      e["spread"]["val_loss"] = spread_json(val_loss(r));
      e["spread"]["perplexity"] = json::array();
      for (size_t l = 0; l < opts.factors.size(); ++l)
        e["spread"]["perplexity"].push_back(spread_json(perplexity(r, l)));
    }
    j["runs"].push_back(e);
  }
  io::write_file_atomic((out / "results.json").string(), j.dump(2) + "\n");

  const auto [have_loss_png, have_ppl_png] = write_plots(out, results, opts.factors, several);

  // report.md
  const auto& m = opts.model;
  const auto& t = opts.train;
  std::string md = "# grape compare\n\n";
  md += fmt::format(
      "Model: preset `{}`, {} layers, {} heads, width {}, head dim {}, training context {}. Data: `{}` "
      "(tokenizer `{}`). Training: {} steps x {} sequences x {} micro-batches, lr {} -> {} (warmup {}), "
      "seed {}. Same data order and initialisation seed for every encoding.\n\n",
      m.preset, m.n_layer, m.n_head, m.n_embd, m.head_dim(), m.context, t.data, t.tokenizer, t.steps, t.batch,
      t.accum, t.lr, t.min_lr, t.warmup,
      several ? fmt::format("{}..{} ({} seeds per encoding, each setting initialisation and data order)",
                            t.seed, t.seed + uint64_t(opts.seeds) - 1, opts.seeds)
              : std::to_string(t.seed));
  std::vector<std::string> header = {"encoding", "parameters", "val loss"};
  for (int64_t f : opts.factors) header.push_back(fmt::format("ppl {}x", f));
  header.insert(header.end(), {"train tokens/s", "decode tokens/s"});
  if (several) header.push_back("val loss vs best");
  size_t best = 0;
  for (size_t i = 1; i < results.size(); ++i)
    if (val_loss(results[i]).mean < val_loss(results[best]).mean) best = i;
  std::vector<std::vector<std::string>> rows;
  for (size_t i = 0; i < results.size(); ++i) {
    const auto& r = results[i];
    std::vector<std::string> row = {r.pe, std::to_string(r.runs[0].train.parameters)};
    if (!several) {
      row.push_back(fmt::format("{:.4f}", r.runs[0].train.val_loss));
      for (const auto& l : r.runs[0].eval.lengths)
        row.push_back(l.error.empty() ? fmt::format("{:.2f}", l.perplexity) : "n/a");
      row.push_back(fmt::format("{:.0f}", r.runs[0].train.tokens_per_s));
      row.push_back(fmt::format("{:.1f}", r.runs[0].decode_tokens_per_s));
    } else {
      row.push_back(mean_sd(val_loss(r), "{:.4f}"));
      for (size_t l = 0; l < opts.factors.size(); ++l) row.push_back(mean_sd(perplexity(r, l), "{:.2f}"));
      row.push_back(
          fmt::format("{:.0f}", over_seeds(r, [](const SeedRun& s) { return s.train.tokens_per_s; }).mean));
      row.push_back(
          fmt::format("{:.1f}", over_seeds(r, [](const SeedRun& s) { return s.decode_tokens_per_s; }).mean));
      const auto a = val_loss(r), b = val_loss(results[best]);
      row.push_back(i == best ? "best"
                              : fmt::format("{:+.4f} ({})", a.mean - b.mean,
                                            beyond_spread(a, b) ? "beyond the spread" : "within the spread"));
    }
    rows.push_back(std::move(row));
  }
  md += detail::markdown_table(header, rows);
  md += fmt::format(
      "\nPerplexity at Nx is measured on validation windows of N x {} tokens (about {} tokens per length); "
      "`val loss` is at the training context. Throughput is this machine's, measured during the run "
      "(training) and with the KV cache for one sequence (decode).\n\n",
      m.context, opts.eval_tokens);
  if (several) {
    md += fmt::format(
        "Values are mean ± sample standard deviation over the {} seeds (throughput: mean). A difference "
        "counts "
        "as larger than the seed spread when the two mean ± sd intervals do not overlap.\n\n",
        opts.seeds);
    std::vector<std::string> beyond, within;
    for (size_t a = 0; a < results.size(); ++a)
      for (size_t b = a + 1; b < results.size(); ++b) {
        const auto sa = val_loss(results[a]), sb = val_loss(results[b]);
        const bool a_lower = sa.mean <= sb.mean;
        const std::string pair = fmt::format(
            "{} {} {} ({:+.4f})", a_lower ? results[a].pe : results[b].pe, beyond_spread(sa, sb) ? "<" : "~",
            a_lower ? results[b].pe : results[a].pe, std::abs(sa.mean - sb.mean));
        (beyond_spread(sa, sb) ? beyond : within).push_back(pair);
      }
    auto list = [](const std::vector<std::string>& v) {
      std::string s;
      for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
      return s.empty() ? std::string("none") : s;
    };
    md += "Validation loss, pairs beyond the seed spread (lower first): " + list(beyond) + ".\n\n";
    md += "Within the seed spread: " + list(within) + ".\n\n";
  }
  for (const auto& r : results)
    for (const auto& l : r.runs[0].eval.lengths)
      if (!l.error.empty()) md += fmt::format("- {} at {}x: {}\n", r.pe, l.factor, l.error);
  md += have_loss_png ? "![training loss](loss.png)\n\n"
                      : "(loss.png not drawn: gnuplot failed or is missing)\n\n";
  md += have_ppl_png ? "![perplexity vs context](perplexity.png)\n"
                     : "(perplexity.png not drawn: gnuplot failed or is missing)\n";
  const json prov = j["provenance"];
  md +=
      fmt::format("\nCommand: `{}`. grape {} (git {}) on {}, {} threads; BLAS: {}.\n",
                  opts.command.empty() ? "(library call)" : opts.command, prov["version"].get<std::string>(),
                  prov["git_commit"].get<std::string>(), prov["host"].get<std::string>(),
                  prov["threads"].get<int>(), prov["blas"].get<std::string>());
  io::write_file_atomic((out / "report.md").string(), md);
  return md;
}

}  // namespace grape::train
