// The flags that describe a model and its training, shared by `grape train`, `compare` and `bench`:
// a preset, then a JSON config file, then individual flags, each overriding the one before.
#pragma once

#include <CLI/CLI.hpp>
#include <memory>
#include <string>
#include <vector>

#include "grape/model.hpp"
#include "grape/train.hpp"

namespace grape::cli {

struct RunFlags {
  std::string preset = "tiny";
  std::string config_file;           // .json {"model": {...}, "train": {...}} or .toml [model] [train]
  std::vector<std::string> sets;     // model or train fields: key=value
  std::vector<std::string> pe_sets;  // encoding options: key=value
  std::string pe;
  bool kv_shift = false;
  int64_t context = 0, steps = 0, batch = 0, accum = 0, warmup = -1, eval_every = -1, ckpt_every = -1;
  double lr = 0, min_lr = -1;
  int64_t seed = -1;
  std::string data, tokenizer, attention;
};

// Adds the flags to a subcommand; `with_pe` adds --pe/--pe-set (compare has its own --pe list).
void add_run_flags(CLI::App* cmd, RunFlags& flags, bool with_pe);
// Resolves preset + config file + flags into validated configs (the model's vocab is set when training).
std::pair<ModelConfig, train::TrainConfig> resolve_run_flags(const RunFlags& flags);

}  // namespace grape::cli
