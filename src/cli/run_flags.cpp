// Resolution of the model/training flags: preset, then config file, then flags.
#include "cli/run_flags.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <toml++/toml.h>

#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>

#include "cli/number_checks.hpp"
#include "grape/io.hpp"

namespace grape::cli {

namespace {

// The --set help: every field of both configs with its default, from their tables.
std::string set_help() {
  std::string help =
      "a model or training field, key=value (repeatable; the same keys as the [model] and [train] "
      "sections of --config). The fields and their defaults:";
  auto section = [&](const char* title, const std::vector<ConfigField>& fields) {
    help += fmt::format("\n {}:", title);
    for (const auto& f : fields)
      help += fmt::format("\n   {:<22} {}",
                          f.name + "=" + (f.default_value.empty() ? "VALUE" : f.default_value), f.help);
  };
  section("model (the tiny preset)", ModelConfig::fields());
  section("train", train::TrainConfig::fields());
  return help;
}

std::string field_names(const std::vector<ConfigField>& fields) {
  std::vector<std::string> names;
  for (const auto& f : fields) names.push_back(f.name);
  return fmt::format("{}", fmt::join(names, ", "));
}

// `--set key=value`: the tables say which config the key belongs to.
void apply_set(ModelConfig& model, train::TrainConfig& train, const std::string& assignment) {
  const auto [key, value] = split_key_value(assignment, "--set");
  if (train::TrainConfig::has_key(key)) {
    train.set(key, value, "--set");
  } else if (ModelConfig::has_key(key)) {
    model.set(key, value, "--set");
  } else {
    std::vector<std::string> all;
    for (const auto* fields : {&ModelConfig::fields(), &train::TrainConfig::fields()})
      for (const auto& f : *fields) all.push_back(f.name);
    throw std::invalid_argument(fmt::format("--set: unknown setting '{}' ({}model: {}; train: {})", key,
                                            did_you_mean(key, all), field_names(ModelConfig::fields()),
                                            field_names(train::TrainConfig::fields())));
  }
}

// A TOML table as the equivalent JSON object (configs hold tables, strings, numbers and booleans only).
nlohmann::json toml_to_json(const toml::table& table, const std::string& file) {
  nlohmann::json out = nlohmann::json::object();
  for (const auto& [key, node] : table) {
    const std::string k(key.str());
    if (const auto* t = node.as_table())
      out[k] = toml_to_json(*t, file);
    else if (const auto* v = node.as_string())
      out[k] = v->get();
    else if (const auto* v = node.as_integer())
      out[k] = v->get();
    else if (const auto* v = node.as_floating_point())
      out[k] = v->get();
    else if (const auto* v = node.as_boolean())
      out[k] = v->get();
    else
      throw std::invalid_argument(
          fmt::format("{}: '{}' must be a table, string, number or boolean", file, k));
  }
  return out;
}

// {"model": {...}, "train": {...}} from a .json or .toml file.
nlohmann::json read_config_file(const std::string& path) {
  const std::string text = io::read_file(path, io::kMaxSettingsBytes);
  if (path.size() > 5 && path.substr(path.size() - 5) == ".toml") {
    try {
      return toml_to_json(toml::parse(text, path), path);
    } catch (const toml::parse_error& e) {
      std::ostringstream where;
      where << e.source().begin;
      throw std::invalid_argument(
          fmt::format("{}: not valid TOML ({} at {})", path, e.description(), where.str()));
    }
  }
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw std::invalid_argument(fmt::format("{}: not valid JSON ({})", path, e.what()));
  }
}

}  // namespace

std::string preset_help() {
  std::string help = "model preset (default tiny):";
  for (const auto& name : model_preset_names()) {
    const auto m = model_preset(name);
    help += fmt::format("\n  {:<7} {} layers, {} heads, width {}, context {}{}", name, m.n_layer, m.n_head,
                        m.n_embd, m.context, m.mlp_hidden > 0 ? fmt::format(", mlp {}", m.mlp_hidden) : "");
  }
  return help;
}

void add_run_flags(CLI::App* cmd, RunFlags& f, bool with_pe) {
  cmd->add_option("--preset", f.preset, preset_help());
  cmd->add_option("--config", f.config_file,
                  "config file applied after the preset: .json {\"model\": {...}, \"train\": {...}} or .toml "
                  "with [model] and [train] tables");
  cmd->add_option("--set", f.sets, set_help());
  if (with_pe) {
    cmd->add_option("--pe", f.pe, "position encoding (see `grape encodings`)");
    cmd->add_option("--pe-set", f.pe_sets, "encoding option key=value (see `grape encodings NAME`)");
  }
  cmd->add_flag("--kv-shift", f.kv_shift, "add KV-shift to every layer");
  cmd->add_option("--attention", f.attention, "fused (CPU kernels, default) or reference (LibTorch-composed)")
      ->check(CLI::IsMember({"fused", "reference"}));
  cmd->add_option("--context", f.context, "training context length")->check(grape::cli::kPositive);
  cmd->add_option("--steps", f.steps, "optimizer steps")->check(grape::cli::kPositive);
  cmd->add_option("--batch", f.batch, "sequences per micro-batch")->check(grape::cli::kPositive);
  cmd->add_option("--accum", f.accum, "micro-batches per step (gradient accumulation)")
      ->check(grape::cli::kPositive);
  cmd->add_option("--lr", f.lr, "peak learning rate")->check(grape::cli::kPositive);
  cmd->add_option("--min-lr", f.min_lr, "final learning rate of the cosine decay")
      ->check(grape::cli::kNonNegative);
  cmd->add_option("--warmup", f.warmup, "linear warmup steps")->check(grape::cli::kNonNegative);
  cmd->add_option("--eval-every", f.eval_every, "validate every N steps (0: at the end only)")
      ->check(grape::cli::kNonNegative);
  cmd->add_option("--ckpt-every", f.ckpt_every, "checkpoint every N steps (0: at the end only)")
      ->check(grape::cli::kNonNegative);
  cmd->add_option("--seed", f.seed, "seed of initialisation and data order")->check(grape::cli::kNonNegative);
  cmd->add_option(
      "--data", f.data,
      "bible (default) | FILE.txt | DIR | FILE.bin | synthetic:TASK[:key=value,...] (`grape data` "
      "lists the tasks and their options)");
  cmd->add_option(
      "--tokenizer", f.tokenizer,
      "byte (default) | PATH.model (SentencePiece) | tokenizer.json or vocab.json,merges.txt (GPT-2 "
      "byte-level BPE) | none (.bin token ids only; vocab_size from --set or the data's largest id)");
  cmd->add_flag("--print-config,--dry-run", f.print_config,
                "print the resolved settings (as run.json would record them) and exit without training");
}

namespace {

ResolvedRun resolve(const RunFlags& f, ModelConfig model, train::TrainConfig tr,
                    const RunDefaults& defaults) {
  ResolvedRun out;
  if (!f.preset.empty()) model = model_preset(f.preset);
  if (defaults) defaults(model, tr);
  if (!f.config_file.empty()) {
    const nlohmann::json j = read_config_file(f.config_file);
    if (!j.is_object())
      throw std::invalid_argument(fmt::format("{}: expected an object with model/train", f.config_file));
    for (const auto& [key, value] : j.items()) {
      if (key != "model" && key != "train")
        throw std::invalid_argument(
            fmt::format("{}: unknown section '{}' (expected model, train)", f.config_file, key));
      if (!value.is_object())
        throw std::invalid_argument(fmt::format("{}: section '{}' must be an object", f.config_file, key));
      const std::string where = fmt::format("{} [{}]", f.config_file, key);
      if (key == "model") {
        model.set_section(value.dump(), where);
        out.vocab_size_given |= value.contains("vocab_size");
      } else {
        tr.set_section(value.dump(), where);
      }
    }
  }
  for (const auto& s : f.sets) {
    apply_set(model, tr, s);
    out.vocab_size_given |= s.rfind("vocab_size=", 0) == 0;
  }
  if (!f.pe.empty() && f.pe != model.pe) {
    model.pe = f.pe;
    model.pe_options.clear();  // options of the preset's encoding do not carry over
  }
  for (const auto& s : f.pe_sets) {
    auto [key, value] = split_key_value(s, "--pe-set");
    model.pe_options[key] = value;
  }
  if (f.kv_shift) model.kv_shift = true;
  if (!f.attention.empty()) model.attention = f.attention;
  if (f.context > 0) model.context = f.context;
  if (f.steps > 0) tr.steps = f.steps;
  if (f.batch > 0) tr.batch = f.batch;
  if (f.accum > 0) tr.accum = f.accum;
  if (f.lr > 0) tr.lr = f.lr;
  if (f.min_lr >= 0) tr.min_lr = f.min_lr;
  if (f.warmup >= 0) tr.warmup = f.warmup;
  if (f.eval_every >= 0) tr.eval_every = f.eval_every;
  if (f.ckpt_every >= 0) tr.ckpt_every = f.ckpt_every;
  if (f.seed >= 0) tr.seed = uint64_t(f.seed);
  if (!f.data.empty()) tr.data = f.data;
  if (!f.tokenizer.empty()) tr.tokenizer = f.tokenizer;
  model.validate();
  tr.validate();
  out.model = std::move(model);
  out.train = std::move(tr);
  return out;
}

}  // namespace

ResolvedRun resolve_run_flags(const RunFlags& f, const RunDefaults& defaults) {
  return resolve(f, model_preset("tiny"), train::TrainConfig{}, defaults);
}

ResolvedRun resolve_run_flags_on(const RunFlags& f, const ModelConfig& model,
                                 const train::TrainConfig& train) {
  return resolve(f, model, train, {});
}

}  // namespace grape::cli
