// TrainConfig: its table of fields, behind validation, `--set`, config files and the JSON of run.json (the
// machinery is shared with ModelConfig, src/nn/config_fields.hpp).
#include "grape/train.hpp"
#include "nn/config_fields.hpp"

namespace grape::train {
namespace {

// Every field of TrainConfig, in declaration order: the one place a field is named.
const config::Table<TrainConfig>& train_fields() {
  using C = TrainConfig;
  using config::above, config::at_least;
  static const config::Table<C> table = {
      {"steps", &C::steps, "optimizer steps", at_least(1)},
      {"batch", &C::batch, "sequences per micro-batch (per process)", at_least(1)},
      {"accum", &C::accum, "micro-batches per optimizer step", at_least(1)},
      {"shards", &C::shards,
       "row shards per micro-batch, run in parallel on the threads (the step does not depend on how many run "
       "at once); 1: one pass",
       at_least(1)},
      {"lr", &C::lr, "peak learning rate", above(0)},
      {"min_lr", &C::min_lr, "learning rate at the end of the cosine decay", at_least(0)},
      {"warmup", &C::warmup, "linear warmup steps", at_least(0)},
      {"weight_decay", &C::weight_decay, "AdamW weight decay, on matrices only", at_least(0)},
      {"beta1", &C::beta1, "AdamW beta1", {.lo = 0, .hi = 1, .hi_open = true}},
      {"beta2", &C::beta2, "AdamW beta2", {.lo = 0, .hi = 1, .hi_open = true}},
      {"adam_eps", &C::adam_eps, "AdamW epsilon", above(0)},
      {"grad_clip", &C::grad_clip, "clip the global gradient norm to this; 0: off", at_least(0)},
      {.name = "optimizer",
       .member = &C::optimizer,
       .help = "gradient norm, clipping and AdamW: fused: one-pass CPU kernels; reference: LibTorch's",
       .choices = {"fused", "reference"}},
      {"eval_every", &C::eval_every, "validate every N steps and at the end; 0: at the end only",
       at_least(0)},
      {"eval_batches", &C::eval_batches, "validation batches", at_least(1)},
      {"ckpt_every", &C::ckpt_every, "checkpoint every N steps and at the end; 0: at the end only",
       at_least(0)},
      {"keep_last", &C::keep_last, "checkpoints kept", at_least(1)},
      {"log_every", &C::log_every, "a progress line every N steps (without a terminal)", at_least(1)},
      {"seed", &C::seed, "seed of the initialisation and the data order"},
      {"data", &C::data, "bible | FILE.txt | DIR | FILE.bin | synthetic:NAME[:key=value,...]"},
      {"tokenizer", &C::tokenizer, "byte | PATH.model (SentencePiece)"},
      {"val_fraction",
       &C::val_fraction,
       "share of the tokens held out for validation",
       {.lo = 0, .hi = 1, .lo_open = true, .hi_open = true}},
  };
  return table;
}

}  // namespace

void TrainConfig::validate() const { config::check_values(*this, train_fields(), "train config"); }

void TrainConfig::set(const std::string& key, const std::string& value, const std::string& where) {
  config::set_from_text(*this, train_fields(), key, value, where);
}

void TrainConfig::set_section(const std::string& section_json, const std::string& where) {
  config::set_section(*this, train_fields(), config::parse_object(section_json, where), where);
}

std::string TrainConfig::to_json() const { return config::to_json(*this, train_fields()).dump(2); }

TrainConfig TrainConfig::from_json(const std::string& text) {
  const std::string where = "train config JSON";
  TrainConfig c;  // fields absent from the JSON keep their defaults
  config::read_json(c, train_fields(), config::parse_object(text, where), where);
  c.validate();
  return c;
}

const std::vector<ConfigField>& TrainConfig::fields() {
  static const std::vector<ConfigField> described = config::describe(train_fields());
  return described;
}

bool TrainConfig::has_key(const std::string& key) {
  return config::find_set_key(train_fields(), key) != nullptr;
}

}  // namespace grape::train
