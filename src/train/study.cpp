// `grape compare --study extrapolation`: how each encoding does beyond its training length.
//
// Per encoding two runs with the same model, seed and budget, both at the short training context T:
//   runs/lm/PE       a language model on the study's data: validation perplexity at T x each factor, and
//                    for encodings that offer context extension (an `extend` option: the RoPE family) the
//                    same with each method applied at evaluation, factor = the length factor;
//   runs/needle/PE   a model trained on synthetic:needle at T (uniform depths): exact-match retrieval of the
//                    number over a grid of depths x lengths T x factor (with each extension method, too).
// A separate needle model because a language model never sees the task format: zero-shot it scores zero
// everywhere and the heat map would say nothing about positions.
// Writes results.json (every number), report.md (tables, the command, the seed), perplexity.png,
// perplexity_extension.png, needle.png (one heat map per encoding and method). Running the same command
// again continues unfinished training runs (the evaluation is redone; it is a small part of the time).
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <stdexcept>

#include "grape/io.hpp"
#include "grape/train.hpp"
#include "train/report_util.hpp"

namespace grape::train {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr const char* kBase = "none";  // the method name of the unextended model

// Needle prompts are about `length` bytes; with the end-of-text before and the answer "dddd\n" after, an
// example of length L is at most L + 6 tokens (byte tokenizer), so L = n - 6 fills a window of n tokens.
constexpr int64_t kNeedleOverhead = 6;
constexpr int64_t kNeedleMinLength = 16;  // the smallest length synthetic:needle accepts

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

bool has_extend_option(const std::string& pe) {
  for (const auto& o : encoding_info(pe).options)
    if (o.key == "extend") return true;
  return false;
}

// The encoding options that extend a model trained at `context` by `factor` (the extension contract). A
// method name is an `extend` value, or yarn-hf: YaRN with Hugging Face's ramp (beside the paper's, yarn).
std::map<std::string, std::string> extension_options(const std::map<std::string, std::string>& base,
                                                     const std::string& method, int64_t factor,
                                                     int64_t context) {
  auto o = base;
  o["extend"] = method == "yarn-hf" ? "yarn" : method;
  if (method == "yarn-hf") o["yarn_ramp"] = "hf";
  o["factor"] = std::to_string(factor);
  o["original_context"] = std::to_string(context);
  return o;
}

// Training: uniform depths, loss on the answer only (without the random haystack's noise retrieval is
// learned in a few hundred steps). Evaluation: one depth.
std::string needle_train_spec(int64_t length) {
  return fmt::format("synthetic:needle:length={},loss=answer", length);
}
std::string needle_eval_spec(int64_t length, double depth) {
  return fmt::format("synthetic:needle:depth={},length={}", depth, length);
}

struct PplPoint {
  std::string pe, method;
  LengthResult r;
};
struct NeedleCell {
  std::string pe, method;
  double depth = 0;
  int64_t factor = 1, length = 0, correct = 0, total = 0;
  std::string error;
  double accuracy() const { return total > 0 ? double(correct) / double(total) : std::nan(""); }
};
struct RunRecord {
  std::string pe, kind;  // kind: "lm" or "needle"
  TrainSummary train;
  double eval_seconds = 0;
};

// The (pe, method) pairs in report order: each encoding, then its extensions.
struct Variant {
  std::string pe, method;
  std::string title() const { return method == kBase ? pe : pe + " + " + method; }
};

void validate(const StudyOptions& o) {
  if (o.pes.empty()) throw std::invalid_argument("study: no encodings given");
  std::set<std::string> seen;
  for (const auto& pe : o.pes) {
    encoding_info(pe);  // unknown names fail before any training, listing the known ones
    if (!seen.insert(pe).second)
      throw std::invalid_argument(fmt::format("study: encoding '{}' given twice", pe));
  }
  if (o.factors.empty()) throw std::invalid_argument("study: no length factors given");
  for (size_t i = 0; i < o.factors.size(); ++i) {
    if (o.factors[i] < 1)
      throw std::invalid_argument(fmt::format("study: length factor {} must be >= 1", o.factors[i]));
    if (i > 0 && o.factors[i] <= o.factors[i - 1])
      throw std::invalid_argument(
          fmt::format("study: length factors must increase, got {}", fmt::join(o.factors, ",")));
  }
  if (o.depths.empty()) throw std::invalid_argument("study: no needle depths given");
  for (double d : o.depths)
    if (!(d >= 0 && d <= 1))
      throw std::invalid_argument(fmt::format("study: needle depth {} must be in [0, 1]", d));
  for (const auto& m : o.extend)
    if (m.empty() || m == kBase)
      throw std::invalid_argument(fmt::format("study: '{}' is not an extension method", m));
  if (o.eval_tokens < 1) throw std::invalid_argument("study: --eval-tokens must be >= 1");
  if (o.needle_examples < 1) throw std::invalid_argument("study: --needle-examples must be >= 1");
  if (o.needle_steps < 0) throw std::invalid_argument("study: --needle-steps must be >= 0");
  if (o.model.context - kNeedleOverhead < kNeedleMinLength)
    throw std::invalid_argument(
        fmt::format("study: training context {} is too short for the needle task (>= {})", o.model.context,
                    kNeedleMinLength + kNeedleOverhead));
  if (o.train.data.rfind("synthetic:", 0) == 0)
    throw std::invalid_argument(
        "study: --data must be text for the perplexity part (the needle runs are separate)");
  o.train.validate();
  o.model.validate();
}

// Which extension methods each encoding accepts. A method no encoding accepts is a mistake (a typo):
// refused before any training with the encoding's own message. One that some encodings accept and
// others refuse is reported per encoding.
std::map<std::string, std::map<std::string, std::string>> check_extensions(const StudyOptions& o) {
  std::map<std::string, std::map<std::string, std::string>> refused;  // pe -> method -> reason
  std::map<std::string, std::string> last_reason;
  std::set<std::string> accepted;
  bool any = false;
  for (const auto& pe : o.pes) {
    if (!has_extend_option(pe)) continue;
    any = true;
    for (const auto& m : o.extend) {
      try {
        make_encoding(pe, o.model.head_shape(), PeOptions(extension_options({}, m, 2, o.model.context)));
        accepted.insert(m);
      } catch (const std::invalid_argument& e) {
        refused[pe][m] = e.what();
        last_reason[m] = e.what();
      }
    }
  }
  if (any)
    for (const auto& m : o.extend)
      if (!accepted.count(m))
        throw std::invalid_argument(
            fmt::format("study: no encoding accepts extension method '{}': {}", m, last_reason[m]));
  return refused;
}

std::string fmt_ppl(const LengthResult& r) {
  return r.error.empty() ? fmt::format("{:.2f}", r.perplexity) : "n/a";
}
std::string fmt_acc(int64_t correct, int64_t total) {
  return total > 0 ? fmt::format("{:.0f}%", 100.0 * double(correct) / double(total)) : "n/a";
}

// Everything the study measures, filled in encoding by encoding, then written out.
struct Study {
  TrainConfig needle_train;       // the settings of the needle runs
  std::vector<Variant> variants;  // (encoding, method) in report order
  std::vector<RunRecord> runs;
  std::vector<PplPoint> ppl;
  std::vector<NeedleCell> needle;
  std::vector<std::string> notes;
  double train_seconds = 0, eval_seconds = 0, total_seconds = 0;
};

// The variants the needle grid reports: every one, or only the plain models (--no-needle-extend).
std::vector<Variant> needle_variants_of(const StudyOptions& opts, const Study& s) {
  std::vector<Variant> out;
  for (const auto& v : s.variants)
    if (v.method == kBase || opts.needle_extend) out.push_back(v);
  return out;
}

// The extension methods an encoding is evaluated with; the ones it refuses become notes.
std::vector<std::string> methods_for(const StudyOptions& opts, const std::string& pe,
                                     const std::map<std::string, std::map<std::string, std::string>>& refused,
                                     std::vector<std::string>& notes) {
  std::vector<std::string> methods;
  if (!has_extend_option(pe)) return methods;
  for (const auto& m : opts.extend) {
    auto it = refused.find(pe);
    if (it != refused.end() && it->second.count(m)) {
      notes.push_back(fmt::format("{} does not take extension '{}': {}", pe, m, it->second.at(m)));
      continue;
    }
    methods.push_back(m);
  }
  return methods;
}

// Phase 1, training: one run of the study trained (or continued), its time added to the training total.
RunRecord train_run(const StudyOptions& opts, const ModelConfig& model_cfg, const TrainConfig& train,
                    const std::string& pe, const std::string& kind, const std::string& dir, Study& s) {
  RunRecord r{pe, kind};
  const auto t0 = std::chrono::steady_clock::now();
  r.train = detail::train_or_continue(model_cfg, train, dir, opts.quiet, "study");
  s.train_seconds += seconds_since(t0);
  return r;
}

// Phase 2, perplexity: the language model's validation perplexity at each length, plain and extended.
std::vector<PplPoint> evaluate_perplexity(const StudyOptions& opts, const std::string& pe,
                                          const std::vector<std::string>& methods,
                                          const std::string& lm_dir) {
  const int64_t T = opts.model.context;
  std::vector<PplPoint> out;
  auto run = read_run(lm_dir);
  auto tok = run_tokenizer(run);
  data::DataOptions dopt;
  dopt.val_fraction = run.train.val_fraction;
  auto data = data::open_data(run.train.data, *tok, dopt);
  auto model = load_model(run);
  for (const auto& r : evaluate(model, *data, opts.factors, opts.eval_tokens, 0).lengths)
    out.push_back({pe, kBase, r});
  for (const auto& m : methods)
    for (int64_t f : opts.factors) {
      if (f < 2) continue;  // an extension by 1 is the model itself
      LengthResult r;
      r.factor = f;
      r.context = T * f;
      try {
        RunInfo ext = run;
        ext.model.pe_options = extension_options(run.model.pe_options, m, f, T);
        auto em = load_model(ext);
        r = evaluate(em, *data, {f}, opts.eval_tokens, 0).lengths.at(0);
      } catch (const std::exception& e) {  // e.g. the encoding cannot be extended this way
        r.loss = r.perplexity = std::numeric_limits<double>::quiet_NaN();
        r.error = e.what();
      }
      out.push_back({pe, m, r});
    }
  return out;
}

// Phase 3, needle grid: exact-match retrieval over depths x lengths, plain and with each method.
std::vector<NeedleCell> evaluate_needle(const StudyOptions& opts, const std::string& pe,
                                        const std::vector<std::string>& methods,
                                        const std::string& needle_dir) {
  const int64_t T = opts.model.context;
  std::vector<NeedleCell> out;
  auto run = read_run(needle_dir);
  auto tok = run_tokenizer(run);
  auto base_model = load_model(run);
  std::vector<std::string> needle_methods = {kBase};
  if (opts.needle_extend) needle_methods.insert(needle_methods.end(), methods.begin(), methods.end());
  for (const auto& m : needle_methods)
    for (int64_t f : opts.factors) {
      if (m != kBase && f < 2) continue;
      Transformer em{nullptr};
      std::string load_error;
      if (m != kBase) {
        try {
          RunInfo ext = run;
          ext.model.pe_options = extension_options(run.model.pe_options, m, f, T);
          em = load_model(ext);
        } catch (const std::exception& e) {
          load_error = e.what();
        }
      }
      Transformer& model = m == kBase ? base_model : em;
      for (double d : opts.depths) {
        NeedleCell c{pe, m, d, f, T * f - kNeedleOverhead};
        c.error = load_error;
        if (c.error.empty()) {
          try {
            auto src = data::open_data(needle_eval_spec(c.length, d), *tok);
            for (const auto& t : evaluate(model, *src, {}, 0, opts.needle_examples).tasks) {
              c.correct += t.correct;
              c.total += t.total;
            }
          } catch (const std::exception& e) {  // a length the encoding cannot handle
            c.error = e.what();
          }
        }
        out.push_back(c);
      }
    }
  return out;
}

// One encoding: its language model trained and evaluated, then its needle model (printing as it goes).
void study_encoding(const StudyOptions& opts, const std::string& pe, const std::vector<std::string>& methods,
                    Study& s) {
  ModelConfig model_cfg = opts.model;
  model_cfg.pe = pe;
  model_cfg.pe_options.clear();
  const fs::path runs = fs::path(opts.out_dir) / "runs";

  // -- language model: perplexity vs length --
  const std::string lm_dir = (runs / "lm" / pe).string();
  if (!opts.quiet) std::printf("\n== %s: language model ==\n", pe.c_str());
  RunRecord lm = train_run(opts, model_cfg, opts.train, pe, "lm", lm_dir, s);
  auto t0 = std::chrono::steady_clock::now();
  const auto ppl = evaluate_perplexity(opts, pe, methods, lm_dir);
  lm.eval_seconds = seconds_since(t0);
  s.eval_seconds += lm.eval_seconds;
  if (!opts.quiet)
    for (const auto& p : ppl)
      std::printf("  %-14s %3lldx  ppl %s%s\n", p.method.c_str(), (long long)p.r.factor, fmt_ppl(p.r).c_str(),
                  p.r.error.empty() ? "" : ("  (" + p.r.error + ")").c_str());
  s.ppl.insert(s.ppl.end(), ppl.begin(), ppl.end());
  s.runs.push_back(std::move(lm));

  // -- needle: retrieval accuracy over depths x lengths --
  const std::string needle_dir = (runs / "needle" / pe).string();
  if (!opts.quiet) std::printf("\n== %s: needle ==\n", pe.c_str());
  RunRecord nr = train_run(opts, model_cfg, s.needle_train, pe, "needle", needle_dir, s);
  t0 = std::chrono::steady_clock::now();
  const auto needle = evaluate_needle(opts, pe, methods, needle_dir);
  nr.eval_seconds = seconds_since(t0);
  s.eval_seconds += nr.eval_seconds;
  if (!opts.quiet)
    for (const auto& c : needle)
      std::printf("  %-14s %3lldx depth %.2f  %s\n", c.method.c_str(), (long long)c.factor, c.depth,
                  c.error.empty() ? fmt_acc(c.correct, c.total).c_str() : ("n/a (" + c.error + ")").c_str());
  s.needle.insert(s.needle.end(), needle.begin(), needle.end());
  s.runs.push_back(std::move(nr));
}

// Notes on what could not be measured: no extendable encoding, n/a points and cells.
void add_unmeasured_notes(const StudyOptions& opts, Study& s) {
  if (std::none_of(opts.pes.begin(), opts.pes.end(), has_extend_option) && !opts.extend.empty())
    s.notes.push_back(
        fmt::format("No encoding among {} offers context extension (an `extend` option), so no "
                    "extension method was evaluated.",
                    fmt::join(opts.pes, ", ")));
  for (const auto& p : s.ppl)
    if (!p.r.error.empty())
      s.notes.push_back(fmt::format("{} at {}x: perplexity n/a: {}", Variant{p.pe, p.method}.title(),
                                    p.r.factor, p.r.error));
  for (const auto& c : s.needle)
    if (!c.error.empty())
      s.notes.push_back(fmt::format("{} needle at {}x, depth {}: n/a: {}", Variant{c.pe, c.method}.title(),
                                    c.factor, c.depth, c.error));
}

// Phase 4a, results.json: every number of the study.
void write_results(const StudyOptions& opts, const Study& s) {
  const fs::path out(opts.out_dir);
  json j;
  j["study"] = "extrapolation";
  j["command"] = opts.command;
  j["seed"] = opts.train.seed;
  j["model"] = json::parse(opts.model.to_json());
  j["train"] = json::parse(opts.train.to_json());
  j["needle_train"] = json::parse(s.needle_train.to_json());
  j["factors"] = opts.factors;
  j["depths"] = opts.depths;
  j["extend"] = opts.extend;
  j["eval_tokens"] = opts.eval_tokens;
  j["needle_examples"] = opts.needle_examples;
  j["runs"] = json::array();
  for (const auto& r : s.runs)
    j["runs"].push_back({{"pe", r.pe},
                         {"kind", r.kind},
                         {"parameters", r.train.parameters},
                         {"steps", r.train.steps},
                         {"final_train_loss", r.train.final_loss},
                         {"val_loss", r.train.val_loss},
                         {"train_tokens_per_s", r.train.tokens_per_s},
                         {"train_seconds", r.train.seconds},
                         {"eval_seconds", r.eval_seconds}});
  j["perplexity"] = json::array();
  for (const auto& p : s.ppl) {
    json e = {{"pe", p.pe},
              {"method", p.method},
              {"factor", p.r.factor},
              {"context", p.r.context},
              {"tokens", p.r.tokens}};
    if (p.r.error.empty()) {
      e["loss"] = p.r.loss;
      e["perplexity"] = p.r.perplexity;
    } else {
      e["error"] = p.r.error;
    }
    j["perplexity"].push_back(e);
  }
  j["needle"] = json::array();
  for (const auto& c : s.needle) {
    json e = {{"pe", c.pe},         {"method", c.method},   {"depth", c.depth}, {"factor", c.factor},
              {"length", c.length}, {"correct", c.correct}, {"total", c.total}};
    if (c.error.empty())
      e["accuracy"] = c.accuracy();
    else
      e["error"] = c.error;
    j["needle"].push_back(e);
  }
  j["seconds"] = {{"total", s.total_seconds}, {"training", s.train_seconds}, {"evaluation", s.eval_seconds}};
  io::write_file_atomic((out / "results.json").string(), j.dump(2) + "\n");
}

struct Plots {
  bool perplexity = false, extension = false, needle = false;  // which PNGs gnuplot drew
};

// Phase 4b, the plots: perplexity vs length (plain, extended) and one needle heat map per variant.
Plots draw_plots(const StudyOptions& opts, const Study& s) {
  const int64_t T = opts.model.context;
  const fs::path out(opts.out_dir);
  auto ppl_of = [&](const Variant& v) {
    std::string dat;
    for (const auto& p : s.ppl)
      if (p.pe == v.pe && (p.method == v.method || (p.method == kBase && p.r.factor == 1)) &&
          p.r.error.empty())
        dat += fmt::format("{} {:.6f}\n", p.r.context, p.r.perplexity);
    return dat;
  };
  auto file_name = [](const std::string& prefix, const Variant& v) {
    return prefix + v.pe + (v.method == kBase ? "" : "_" + v.method) + ".dat";
  };
  const std::string ppl_axes = fmt::format(
      "set logscale x 2\nset logscale y\nset xlabel 'evaluation context (tokens)'\n"
      "set ylabel 'validation perplexity'\nset arrow from {0}, graph 0 to {0}, graph 1 nohead dt 2 lc rgb "
      "'gray'\n"
      "set label 'training context' at {0}, graph 0.97 offset 0.5,0 font ',9' tc rgb 'gray'\nplot ",
      T);
  std::string base_plot = ppl_axes, ext_plot = ppl_axes;
  bool any_ext = false;
  {
    std::vector<std::string> base_terms, ext_terms;
    for (const auto& v : s.variants) {
      const std::string file = file_name("ppl_", v);
      io::write_file_atomic((out / file).string(), ppl_of(v));
      const std::string term = detail::gnuplot_quote(file) + " using 1:2 with linespoints lw 2 pt 7" +
                               (v.method == kBase ? "" : " dt 2") + " title " +
                               detail::gnuplot_quote(v.title());
      if (v.method == kBase) base_terms.push_back(term);
      const bool extendable = std::any_of(s.variants.begin(), s.variants.end(), [&](const Variant& w) {
        return w.pe == v.pe && w.method != kBase;
      });
      if (extendable) ext_terms.push_back(term);
      any_ext = any_ext || v.method != kBase;
    }
    base_plot += fmt::format("{}\n", fmt::join(base_terms, ", \\\n     "));
    ext_plot += fmt::format("{}\n", fmt::join(ext_terms, ", \\\n     "));
  }
  Plots drawn;
  drawn.perplexity = detail::plot(out, "perplexity.png", base_plot);
  drawn.extension = any_ext && detail::plot(out, "perplexity_extension.png", ext_plot);

  // One heat map per (encoding, method): x = length factor, y = depth, colour and label = accuracy.
  const std::vector<Variant> needle_variants = needle_variants_of(opts, s);
  const size_t cols = std::min<size_t>(4, needle_variants.size());
  const size_t rows = (needle_variants.size() + cols - 1) / cols;
  std::string xtics, ytics;
  for (size_t i = 0; i < opts.factors.size(); ++i)
    xtics += fmt::format("{}'{}x' {}", i ? ", " : "", opts.factors[i], i);
  for (size_t i = 0; i < opts.depths.size(); ++i)
    ytics += fmt::format("{}'{}' {}", i ? ", " : "", opts.depths[i], i);
  std::string heat = fmt::format(
      "unset grid\nunset key\nset cbrange [0:1]\nset palette defined (0 '#fff7ec', 0.5 '#fdbb84', 1 "
      "'#41ab5d')\n"
      "unset colorbox\nset xtics ({})\nset ytics ({})\nset xrange [-0.5:{}]\nset yrange [-0.5:{}]\n"
      "set xlabel 'length (x training context {})' font ',9'\nset ylabel 'needle depth' font ',9'\n"
      "set multiplot layout {},{} title 'needle retrieval: exact-match accuracy (%)'\n",
      xtics, ytics, double(opts.factors.size()) - 0.5, double(opts.depths.size()) - 0.5, T, rows, cols);
  for (const auto& v : needle_variants) {
    std::string dat;
    for (size_t fi = 0; fi < opts.factors.size(); ++fi) {
      for (size_t di = 0; di < opts.depths.size(); ++di) {
        double acc = std::nan("");
        for (const auto& c : s.needle)
          if (c.pe == v.pe && c.method == v.method && c.factor == opts.factors[fi] &&
              c.depth == opts.depths[di] && c.error.empty())
            acc = c.accuracy();
        // Columns: factor index, depth index, accuracy (NaN: not measured), the cell's label.
        dat += std::isnan(acc) ? fmt::format("{} {} NaN -\n", fi, di)
                               : fmt::format("{} {} {:.4f} {:.0f}\n", fi, di, acc, 100 * acc);
      }
      dat += "\n";
    }
    const std::string file = file_name("needle_", v);
    io::write_file_atomic((out / file).string(), dat);
    heat +=
        fmt::format("set title {}\nplot {} using 1:2:3 with image, '' using 1:2:4 with labels font ',9'\n",
                    detail::gnuplot_quote(v.title()), detail::gnuplot_quote(file));
  }
  heat += "unset multiplot\n";
  drawn.needle =
      detail::plot(out, "needle.png", heat, fmt::format("{},{}", 40 + 300 * cols, 60 + 250 * rows));
  return drawn;
}

// Phase 4c, report.md: the command, the tables and the plots.
std::string report_markdown(const StudyOptions& opts, const Study& s, const Plots& plots) {
  const int64_t T = opts.model.context;
  const auto& m = opts.model;
  const auto& t = opts.train;
  std::string md = "# Length extrapolation study\n\n";
  md +=
      "```sh\n" +
      (opts.command.empty() ? std::string("(run from the library: run_extrapolation_study)") : opts.command) +
      "\n```\n\n";
  md += fmt::format(
      "Model: preset `{}`, {} layers, {} heads, width {}, training context **{}** tokens. Every run: {} "
      "steps x {} "
      "sequences x {} micro-batches, lr {} -> {} (warmup {}), **seed {}**, the same data order and "
      "initialisation "
      "for every encoding. Language models on `{}` (tokenizer `{}`); needle models on `{}` ({} steps). Total "
      "time "
      "{:.0f} s (training {:.0f} s, evaluation {:.0f} s) on this machine.\n\n",
      m.preset, m.n_layer, m.n_head, m.n_embd, T, t.steps, t.batch, t.accum, t.lr, t.min_lr, t.warmup, t.seed,
      t.data, t.tokenizer, s.needle_train.data, s.needle_train.steps, s.total_seconds, s.train_seconds,
      s.eval_seconds);

  md += "## Perplexity vs evaluation length\n\n";
  md += fmt::format(
      "Validation perplexity on windows of N x {} tokens (about {} tokens per length). Rows with an "
      "extension "
      "method evaluate the same checkpoint with that method and factor N (the first column is the plain "
      "model's, as an extension by 1 is the model itself).\n\n",
      T, opts.eval_tokens);
  {
    std::vector<std::string> header = {"encoding", "extension"};
    for (int64_t f : opts.factors) header.push_back(fmt::format("{}x", f));
    std::vector<std::vector<std::string>> rows_md;
    for (const auto& v : s.variants) {
      std::vector<std::string> row = {v.pe, v.method == kBase ? "-" : v.method};
      for (int64_t f : opts.factors) {
        std::string cell = "-";
        for (const auto& p : s.ppl)
          if (p.pe == v.pe && p.method == v.method && p.r.factor == f) cell = fmt_ppl(p.r);
        row.push_back(cell);
      }
      rows_md.push_back(std::move(row));
    }
    md += detail::markdown_table(header, rows_md) + "\n";
  }
  md += plots.perplexity ? "![perplexity vs length](perplexity.png)\n\n"
                         : "(perplexity.png not drawn: gnuplot failed or is missing)\n\n";
  if (plots.extension) md += "![perplexity with context extension](perplexity_extension.png)\n\n";

  md += "## Needle retrieval vs length and depth\n\n";
  md += fmt::format(
      "Exact-match accuracy of the 4-digit number (chance: 1 in 9000) hidden at a depth of a haystack of "
      "random "
      "two-letter words, by models trained on the task at {} tokens (`{}`, uniform depths). Each cell of the "
      "heat "
      "map is {} examples; the table gives the mean over the depths {}.\n\n",
      T, s.needle_train.data, opts.needle_examples, fmt::join(opts.depths, ", "));
  {
    std::vector<std::string> header = {"encoding", "extension"};
    for (int64_t f : opts.factors) header.push_back(fmt::format("{}x", f));
    header.push_back("needle val loss");
    std::vector<std::vector<std::string>> rows_md;
    for (const auto& v : needle_variants_of(opts, s)) {
      std::vector<std::string> row = {v.pe, v.method == kBase ? "-" : v.method};
      for (int64_t f : opts.factors) {
        int64_t correct = 0, total = 0;
        bool any = false;
        for (const auto& c : s.needle)
          if (c.pe == v.pe && c.method == v.method && c.factor == f && c.error.empty()) {
            correct += c.correct;
            total += c.total;
            any = true;
          }
        row.push_back(any ? fmt_acc(correct, total) : (v.method != kBase && f < 2 ? "-" : "n/a"));
      }
      std::string val = "-";
      for (const auto& r : s.runs)
        if (r.pe == v.pe && r.kind == "needle" && v.method == kBase)
          val = fmt::format("{:.3f}", r.train.val_loss);
      row.push_back(val);
      rows_md.push_back(std::move(row));
    }
    md += detail::markdown_table(header, rows_md) + "\n";
  }
  md += plots.needle ? "![needle accuracy heat map](needle.png)\n\n"
                     : "(needle.png not drawn: gnuplot failed or is missing)\n\n";

  md += "## Runs\n\n";
  {
    std::vector<std::vector<std::string>> rows_md;
    for (const auto& r : s.runs)
      rows_md.push_back({r.pe, r.kind, std::to_string(r.train.parameters),
                         fmt::format("{:.4f}", r.train.final_loss), fmt::format("{:.4f}", r.train.val_loss),
                         fmt::format("{:.0f}", r.train.tokens_per_s), fmt::format("{:.0f}", r.train.seconds),
                         fmt::format("{:.0f}", r.eval_seconds)});
    md += detail::markdown_table(
        {"encoding", "run", "parameters", "train loss", "val loss", "train tokens/s", "train s", "eval s"},
        rows_md);
  }
  md +=
      "\nRun directories: `runs/lm/PE`, `runs/needle/PE` (`grape eval --run DIR` evaluates one further). "
      "Every "
      "number above is in `results.json`.\n";
  if (!s.notes.empty()) {
    md += "\n## Notes\n\n";
    for (const auto& n : s.notes) md += "- " + n + "\n";
  }
  return md;
}

}  // namespace

std::string run_extrapolation_study(const StudyOptions& opts) {
  validate(opts);
  const auto refused = check_extensions(opts);
  const auto t_start = std::chrono::steady_clock::now();
  const fs::path out(opts.out_dir);
  fs::create_directories(out / "runs" / "lm");
  fs::create_directories(out / "runs" / "needle");

  Study s;
  s.needle_train = opts.train;
  s.needle_train.data = needle_train_spec(opts.model.context - kNeedleOverhead);  // one example per window
  if (opts.needle_steps > 0) s.needle_train.steps = opts.needle_steps;
  for (const auto& pe : opts.pes) {
    const auto methods = methods_for(opts, pe, refused, s.notes);
    s.variants.push_back({pe, kBase});
    for (const auto& m : methods) s.variants.push_back({pe, m});
    study_encoding(opts, pe, methods, s);
  }
  s.total_seconds = seconds_since(t_start);
  add_unmeasured_notes(opts, s);

  write_results(opts, s);
  const Plots plots = draw_plots(opts, s);
  const std::string md = report_markdown(opts, s, plots);
  io::write_file_atomic((out / "report.md").string(), md);
  if (!opts.quiet)
    std::printf("\nstudy: %.0f s in all (training %.0f s, evaluation %.0f s)\n", s.total_seconds,
                s.train_seconds, s.eval_seconds);
  return md;
}

}  // namespace grape::train
