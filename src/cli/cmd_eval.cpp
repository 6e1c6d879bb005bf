// `grape eval`: validation perplexity at the training context and longer (length extrapolation), and
// synthetic-task accuracy, for a run's checkpoint; optionally with a RoPE context-extension method applied
// to the trained spectrum (--extend), which only changes encoding options, never the weights.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "cli/commands.hpp"
#include "grape/data.hpp"
#include "grape/io.hpp"
#include "grape/pe.hpp"
#include "grape/train.hpp"

namespace grape::cli {

namespace {

const std::vector<std::string> kMethods = {"none", "pi", "ntk", "dynamic-ntk", "yarn", "longrope", "llama3"};

// Options that belong to one method (they do not carry over when the method changes) or describe the
// extension in the report.
bool method_option(const std::string& key) {
  return key.rfind("yarn_", 0) == 0 || key.rfind("longrope_", 0) == 0 || key == "mscale" ||
         key == "mscale_all_dim" || key == "low_freq_factor" || key == "high_freq_factor";
}

// FNV-1a, 32 bits: a short stable tag of another data spec in an eval file's name.
uint32_t fnv32(const std::string& s) {
  uint32_t h = 2166136261u;
  for (unsigned char c : s) h = (h ^ c) * 16777619u;
  return h;
}

bool has_option(const EncodingInfo& info, const std::string& key) {
  for (const auto& o : info.options)
    if (o.key == key) return true;
  return false;
}

// Sets the method's options on the run's model config (before the model is built and loaded). Returns
// the options that describe the extension, for the report.
std::map<std::string, std::string> apply_extension(train::RunInfo& run, const std::string& method,
                                                   const std::map<std::string, std::string>& given) {
  if (std::find(kMethods.begin(), kMethods.end(), method) == kMethods.end())
    throw std::invalid_argument(fmt::format("--extend: unknown method '{}' ({}known: {})", method,
                                            did_you_mean(method, kMethods), fmt::join(kMethods, ", ")));
  const bool factor_files = std::any_of(given.begin(), given.end(),
                                        [](const auto& kv) { return kv.first.rfind("longrope_", 0) == 0; });
  if (method != "none" && !given.count("factor") && !factor_files)  // LongRoPE's factors may stand for it
    throw std::invalid_argument(
        fmt::format("--extend {} needs --factor S, the extension factor (e.g. --factor 4 to stretch the "
                    "training context {} to {})",
                    method, run.model.context, 4 * run.model.context));
  const auto& info = encoding_info(run.model.pe);
  const bool selectable = has_option(info, "extend");  // rope, grape-m, grape-m-planes
  const bool fixed =
      !selectable && has_option(info, "factor") && run.model.pe == method;  // pi, ntk, ... runs
  if (!selectable && !fixed) {
    if (has_option(info, "factor"))
      throw std::invalid_argument(
          fmt::format("--extend {}: the run was trained with '{}', whose method is fixed; use --extend {} to "
                      "change its options",
                      method, run.model.pe, run.model.pe));
    throw std::invalid_argument(
        fmt::format("--extend: the run's encoding '{}' has no RoPE frequency spectrum to extend (context "
                    "extension applies to "
                    "rope, grape-m and grape-m-planes runs)",
                    run.model.pe));
  }
  auto& opts = run.model.pe_options;
  const auto was = opts.count("extend") ? opts["extend"] : std::string("none");
  if (selectable && was != method)  // options of the run's previous method do not carry over
    std::erase_if(opts, [](const auto& kv) { return method_option(kv.first); });
  if (selectable) opts["extend"] = method;
  if (method == "none") opts.erase("factor");
  for (const auto& [key, value] : given)
    if (key != "extend") opts[key] = value;
  if (method != "none" && !opts.count("original_context"))
    opts["original_context"] = std::to_string(run.model.context);
  std::map<std::string, std::string> shown;
  for (const auto& [k, v] : opts)
    if (k == "factor" || k == "original_context" || method_option(k)) shown[k] = v;
  return shown;
}

// A Hugging Face rope_scaling dictionary: JSON text, or a file (a model's config.json holding one under
// "rope_scaling", or the dictionary itself).
std::string rope_scaling_text(const std::string& arg) {
  std::string text = arg;
  if (std::filesystem::is_regular_file(arg)) text = io::read_file(arg);
  auto j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded())
    throw std::invalid_argument(fmt::format("--rope-scaling: '{}' is neither a file nor valid JSON", arg));
  if (j.is_object() && j.contains("rope_scaling")) {
    if (!j["rope_scaling"].is_object())
      throw std::invalid_argument(fmt::format(
          "--rope-scaling: the config's rope_scaling is {}, not an object", j["rope_scaling"].dump()));
    j = j["rope_scaling"];
  }
  return j.dump();
}

// Perplexity at the training context through the fast decode engine, per weight type ("fp32", "bf16" or
// "both"), over the windows `grape eval` scores at 1x; prints a table and returns its rows (with both, also
// the bf16 / fp32 perplexity ratio).
nlohmann::json decode_perplexity(Transformer& model, const data::DataSource& data, const std::string& which,
                                 int64_t tokens, int64_t chunk) {
  const int64_t context = model->config().context;
  const auto windows = train::validation_windows(tokens, context);  // as evaluate() at 1x
  std::vector<DecodeWeights> weights = {DecodeWeights::fp32, DecodeWeights::bf16};
  if (which != "both") weights = {parse_decode_weights(which, "--decode-weights")};
  nlohmann::json out = {{"context", context}, {"tokens", windows.tokens(context)}, {"chunk", chunk}};
  fmt::print("through the decode engine at context {} ({} tokens, {} per call):\n{:>8} {:>10} {:>12}  path\n",
             context, windows.tokens(context),
             chunk == 0   ? "a window"
             : chunk == 1 ? "1 token"
                          : std::to_string(chunk) + " tokens",
             "weights", "val loss", "perplexity");
  std::map<std::string, double> ppl;
  for (auto w : weights) {
    Decoder decoder(model, DecodePath::fast, w);
    const double loss =
        train::decode_validation_loss(decoder, data, context, windows.batch, windows.batches, chunk);
    ppl[to_string(w)] = std::exp(loss);
    std::string path = to_string(decoder.path());
    if (!decoder.fallback_reason().empty()) path += " (" + decoder.fallback_reason() + ")";
    if (!decoder.bf16_kernel().empty()) path += ", " + decoder.bf16_kernel() + " kernel";
    fmt::print("{:>8} {:>10.5f} {:>12.4f}  {}\n", to_string(w), loss, std::exp(loss), path);
    out["rows"].push_back({{"weights", to_string(w)},
                           {"loss", loss},
                           {"perplexity", std::exp(loss)},
                           {"path", to_string(decoder.path())},
                           {"bf16_kernel", decoder.bf16_kernel()}});
  }
  if (ppl.size() == 2) {
    const double ratio = ppl["bf16"] / ppl["fp32"];
    fmt::print("bf16 / fp32 perplexity: {:.5f} ({:+.3f}%)\n", ratio, 100.0 * (ratio - 1));
    out["bf16_over_fp32"] = ratio;
  }
  return out;
}

}  // namespace

void add_eval_command(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "eval", "evaluate a trained run: perplexity at 1x, 2x, 4x, 8x context, task accuracy");
  struct Args {
    std::string run, checkpoint, data, json, tokenizer;
    std::vector<int64_t> factors = {1, 2, 4, 8};
    int64_t tokens = 16384, examples = 200;
    std::string extend, factor, rope_scaling;
    std::vector<std::string> extend_sets;
    std::string decode_weights;
    int64_t decode_chunk = 0;
  };
  auto a = std::make_shared<Args>();
  cmd->add_option("--run", a->run, "run directory")->required();
  cmd->add_option("--checkpoint", a->checkpoint, "checkpoint directory (default: the run's latest)");
  cmd->add_option("--data", a->data, "evaluate on other data (default: the run's)");
  cmd->add_option("--tokenizer", a->tokenizer,
                  "a tokenizer for --data text when the run has none (tokenizer none); else the run's own");
  cmd->add_option("--factors", a->factors, "multiples of the training context")
      ->delimiter(',')
      ->capture_default_str();
  cmd->add_option("--tokens", a->tokens, "validation tokens per length")->capture_default_str();
  cmd->add_option("--examples", a->examples, "synthetic-task examples")->capture_default_str();
  cmd->add_option(
      "--json", a->json,
      "write the results as JSON here (default: RUN/eval/step_N.json for checkpoint step N, with "
      "-extend-METHOD-xS and -data-HASH when --extend, --rope-scaling or --data are given: one file "
      "per checkpoint and setting, never another's)");
  cmd->add_option(
      "--extend", a->extend,
      "apply a context extension to a rope/grape-m run: none|pi|ntk|dynamic-ntk|yarn|longrope|llama3");
  cmd->add_option("--factor", a->factor, "extension factor s (with --extend)");
  cmd->add_option(
      "--extend-set", a->extend_sets,
      "more extension options key=value (original_context defaults to the run's context; yarn_alpha, "
      "yarn_beta, yarn_mscale, yarn_ramp, longrope_factors, longrope_start, low_freq_factor, ...; Hugging "
      "Face's key names work too)");
  cmd->add_option(
      "--rope-scaling", a->rope_scaling,
      "a Hugging Face rope_scaling dictionary (JSON text, or a config.json holding one) applied as "
      "transformers computes it: linear, dynamic, yarn, longrope, llama3; original context "
      "defaults to the run's");
  cmd->add_option("--decode-weights", a->decode_weights,
                  "also measure the perplexity at the training context through the fast decode engine with "
                  "these weights: fp32, bf16 or both (the same windows, teacher-forced; docs/decode.md)")
      ->check(CLI::IsMember({"fp32", "bf16", "both"}));
  cmd->add_option(
         "--decode-chunk", a->decode_chunk,
         "with --decode-weights: tokens per decode call (0: each window in one call; 1: token by token)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  cmd->callback([a] {
    auto run = train::read_run(a->run);
    if (a->extend.empty() && (!a->factor.empty() || !a->extend_sets.empty()))
      throw std::invalid_argument("--factor and --extend-set need --extend METHOD");
    if (!a->extend.empty() && !a->rope_scaling.empty())
      throw std::invalid_argument("--extend and --rope-scaling both set the extension: give one");
    std::map<std::string, std::string> shown, given;
    if (!a->rope_scaling.empty()) {
      given = hf_rope_scaling_options(rope_scaling_text(a->rope_scaling));
      a->extend = given.at("extend");
      // What transformers computes from the dictionary alone: no option of the run's own method carries over.
      std::erase_if(run.model.pe_options, [](const auto& kv) { return method_option(kv.first); });
    } else if (!a->extend.empty()) {
      if (!a->factor.empty()) given["factor"] = a->factor;
      for (const auto& s : a->extend_sets) {
        auto [key, value] = split_key_value(s, "--extend-set");
        given[key] = value;
      }
    }
    if (!a->extend.empty()) shown = apply_extension(run, a->extend, given);
    const std::string checkpoint = a->checkpoint.empty() ? train::latest_checkpoint(a->run) : a->checkpoint;
    auto model = train::load_model(run, checkpoint);
    auto tok = train::run_tokenizer(run);
    if (!a->tokenizer.empty()) {
      if (run.tokenizer != "none")
        throw std::invalid_argument(fmt::format("--tokenizer: the run has its own ({})", run.tokenizer));
      tok = data::make_tokenizer(a->tokenizer);
      if (tok->vocab_size() > run.model.vocab_size)
        throw std::invalid_argument(fmt::format("--tokenizer {}: {} ids, more than the model's vocab_size {}",
                                                a->tokenizer, tok->vocab_size(), run.model.vocab_size));
    }
    data::DataOptions dopt;
    dopt.val_fraction = run.train.val_fraction;
    const std::string data_spec = a->data.empty() ? run.train.data : a->data;
    auto data = data::open_data(data_spec, *tok, dopt);
    auto report = train::evaluate(model, *data, a->factors, a->tokens, a->examples, run.tokenizer == "byte");
    std::string extension;
    if (!a->extend.empty()) {
      std::vector<std::string> kv;
      for (const auto& [k, v] : shown) kv.push_back(k + "=" + v);
      extension = fmt::format(", context extension {} ({})", a->extend, fmt::join(kv, ", "));
    }
    // The checkpoint's step: from its directory name (step_NNNNNNNN), as the run wrote it.
    const std::string ck_name = std::filesystem::path(checkpoint).lexically_normal().filename().string();
    int64_t step = -1;
    if (ck_name.rfind("step_", 0) == 0) step = text_to_int(ck_name.substr(5)).value_or(-1);
    fmt::print("{} ({}), training context {}, checkpoint {}{}\n{}", run.model.pe, data->describe(),
               run.model.context, ck_name, extension, train::eval_table(report));
    auto j = nlohmann::json::parse(train::eval_json(report));
    j["step"] = step;
    j["checkpoint"] = std::filesystem::absolute(checkpoint).lexically_normal().string();
    j["data"] = data::absolute_spec(data_spec);
    j["factors"] = a->factors;
    j["tokens_per_length"] = a->tokens;
    if (!a->decode_weights.empty())
      j["decode"] = decode_perplexity(model, *data, a->decode_weights, a->tokens, a->decode_chunk);
    j["provenance"] = nlohmann::json::parse(train::provenance_json(invocation()));
    if (!a->extend.empty()) j["extension"] = {{"method", a->extend}, {"options", shown}};
    if (!a->rope_scaling.empty())
      j["extension"]["rope_scaling"] = nlohmann::json::parse(rope_scaling_text(a->rope_scaling));
    std::string path = a->json;
    if (path.empty()) {
      std::string name = ck_name;
      if (!a->extend.empty())
        name += fmt::format("-extend-{}-x{}", a->extend, shown.count("factor") ? shown.at("factor") : "1");
      if (!a->rope_scaling.empty())
        name += fmt::format("-rope-scaling-{:08x}", fnv32(rope_scaling_text(a->rope_scaling)));
      if (!a->data.empty() && data::absolute_spec(a->data) != data::absolute_spec(run.train.data))
        name += fmt::format("-data-{:08x}", fnv32(data::absolute_spec(a->data)));
      const auto dir = std::filesystem::path(a->run) / "eval";
      std::filesystem::create_directories(dir);
      path = (dir / (name + ".json")).string();
    }
    io::write_file_atomic(path, j.dump(2) + "\n");
    fmt::print("results: {}\n", path);
  });
}

}  // namespace grape::cli
