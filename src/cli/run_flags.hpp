// The flags that describe a model and its training, shared by `grape train`, `compare` and `bench`:
// a preset, then a JSON config file, then individual flags, each overriding the one before.
#pragma once

#include <CLI/CLI.hpp>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "grape/model.hpp"
#include "grape/train.hpp"

namespace grape::cli {

struct RunFlags {
  std::string preset;                // empty: tiny (or, on --resume, the run's own)
  std::string config_file;           // .json {"model": {...}, "train": {...}} or .toml [model] [train]
  std::vector<std::string> sets;     // model or train fields: key=value
  std::vector<std::string> pe_sets;  // encoding options: key=value
  std::string pe;
  bool kv_shift = false;
  int64_t context = 0, steps = 0, batch = 0, accum = 0, warmup = -1, eval_every = -1, ckpt_every = -1;
  double lr = 0, min_lr = -1;
  int64_t seed = -1;
  std::string data, tokenizer, attention;
  bool print_config = false;  // --print-config / --dry-run: show the resolved settings, do nothing
};

// Adds the flags to a subcommand; `with_pe` adds --pe/--pe-set (compare has its own --pe list).
void add_run_flags(CLI::App* cmd, RunFlags& flags, bool with_pe);

// A command's own defaults, applied after the preset and before the config file, --set and the flags (so
// any of those overrides them): compare's budget, the study's context.
using RunDefaults = std::function<void(ModelConfig&, train::TrainConfig&)>;

struct ResolvedRun {
  ModelConfig model;
  train::TrainConfig train;
  bool vocab_size_given = false;  // by --set vocab_size or the config file (else the tokenizer's)
};
// Resolves preset (default tiny) + defaults + config file + --set + flags into validated configs (the
// model's vocabulary is settled when the run starts: train::resolve_new_run).
ResolvedRun resolve_run_flags(const RunFlags& flags, const RunDefaults& defaults = {});
// The same onto a run's own settings (--resume): only what the flags give changes (--preset replaces the
// whole model config, as it does for a new run).
ResolvedRun resolve_run_flags_on(const RunFlags& flags, const ModelConfig& model,
                                 const train::TrainConfig& train);

// The --preset help: every preset with its shape.
std::string preset_help();

}  // namespace grape::cli
