// ModelConfig: its table of fields (behind validation, `--set`, config files and the JSON of run.json), and
// the named presets.
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <unistd.h>

#include <stdexcept>

#include "grape/model.hpp"
#include "nn/config_fields.hpp"

namespace grape {
namespace {

// Every field of ModelConfig, in declaration order: the one place a field is named (see config_fields.hpp).
const config::Table<ModelConfig>& model_fields() {
  using C = ModelConfig;
  using config::above, config::at_least;
  static const config::Table<C> table = {
      {"preset", &C::preset,
       "the preset the fields started from; setting it loads tiny, small, medium or large"},
      {"vocab_size", &C::vocab_size, "vocabulary size; training sets it from the tokenizer", at_least(2)},
      {"n_layer", &C::n_layer, "transformer blocks", at_least(1)},
      {"n_head", &C::n_head, "attention heads; head_dim = n_embd / n_head", at_least(1)},
      {"n_embd", &C::n_embd, "model width C", at_least(1)},
      {"mlp_hidden", &C::mlp_hidden, "SwiGLU hidden width; 0: floor(8C/3)", at_least(0)},
      {"context", &C::context, "training context length T", at_least(1)},
      {.name = "pe",
       .member = &C::pe,
       .help = "position encoding (see `grape encodings`)",
       .check = [](const std::string& name) { encoding_info(name); }},  // throws listing the known ones
      {.name = "pe_options",
       .member = &C::pe_options,
       .help = "an option of the encoding (see `grape encodings NAME`)",
       .prefix = "pe."},
      {"kv_shift", &C::kv_shift, "KV-shift on the keys and values of every layer"},
      {.name = "qk_norm",
       .member = &C::qk_norm,
       .help = "RMSNorm (one gain over head_dim) on each head's q and k: before_rotation normalises q, k "
               "before the encoding; after_rotation normalises the encoded q~, k~ (the GRAPE authors' "
               "order; true/false mean before_rotation/off)",
       .choices = {"before_rotation", "after_rotation", "off"},
       .bool_values = {"off", "before_rotation"}},
      {"norm_eps", &C::norm_eps, "RMSNorm epsilon", above(0)},
      {"embed_std", &C::embed_std, "std of the tied embedding's initialisation", above(0)},
      {.name = "attention",
       .member = &C::attention,
       .help = "fused: our CPU kernels; reference: LibTorch-composed",
       .choices = {"fused", "reference"}},
      {.name = "block",
       .member = &C::block,
       .help = "RMSNorm and SwiGLU: fused: one-pass CPU kernels (forward, backward); reference: "
               "LibTorch-composed",
       .choices = {"fused", "reference"}},
  };
  return table;
}

}  // namespace

void ModelConfig::validate() const {
  config::check_values(*this, model_fields(), "model config");
  if (n_embd % n_head != 0)
    throw std::invalid_argument(
        fmt::format("model config: n_embd={} is not divisible by n_head={} (head_dim = n_embd / n_head)",
                    n_embd, n_head));
  // Before building the encoding (whose tables grow with the shape): an absurd size is refused here, with
  // the memory it would need, not by the allocator.
  require_memory(1, "the weights");
  // Building the encoding checks its name, its options and its constraints (even head_dim, ...).
  auto enc = make_encoding(pe, head_shape(), PeOptions(pe_options));
  try {
    check_qk_norm(parse_qk_norm(qk_norm), *enc);
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(fmt::format("model config: {}", e.what()));
  }
}

double ModelConfig::weight_bytes() const {
  const double C = double(n_embd), V = double(vocab_size), L = double(n_layer), Hd = double(hidden());
  // Tied embedding; per block q, k, v, o (4 C^2), the SwiGLU MLP (3 C hidden) and two norms; the final norm.
  return 4.0 * (V * C + L * (4.0 * C * C + 3.0 * C * Hd + 2.0 * C) + C);
}

void ModelConfig::require_memory(int copies, const std::string& purpose) const {
  const double pages = double(::sysconf(_SC_PHYS_PAGES)), page = double(::sysconf(_SC_PAGE_SIZE));
  if (pages <= 0 || page <= 0) return;  // unknown: let the allocator decide
  const double need = double(copies) * weight_bytes(), have = pages * page;
  if (need > have)
    throw std::invalid_argument(fmt::format(
        "model config: n_layer={}, n_embd={}, vocab_size={} make {:.3g} GiB for {}, more than this machine's "
        "{:.3g} GiB of memory",
        n_layer, n_embd, vocab_size, need / double(1 << 30), purpose, have / double(1 << 30)));
}

void ModelConfig::set(const std::string& key, const std::string& value, const std::string& where) {
  if (key != "preset") return config::set_from_text(*this, model_fields(), key, value, where);
  try {
    *this = model_preset(value);  // a preset replaces every field
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(fmt::format("{}: preset: {}", where, e.what()));
  }
}

void ModelConfig::set_section(const std::string& section_json, const std::string& where) {
  config::set_section(*this, model_fields(), config::parse_object(section_json, where), where);
}

std::string ModelConfig::to_json() const { return config::to_json(*this, model_fields()).dump(2); }

ModelConfig ModelConfig::from_json(const std::string& text) {
  const std::string where = "model config JSON";
  ModelConfig c;  // fields absent from the JSON keep their defaults
  config::read_json(c, model_fields(), config::parse_object(text, where), where);
  c.validate();
  return c;
}

const std::vector<ConfigField>& ModelConfig::fields() {
  static const std::vector<ConfigField> described = config::describe(model_fields());
  return described;
}

bool ModelConfig::has_key(const std::string& key) {
  return config::find_set_key(model_fields(), key) != nullptr;
}

std::vector<std::string> model_preset_names() { return {"tiny", "small", "medium", "large"}; }

ModelConfig model_preset(const std::string& name) {
  ModelConfig c;
  c.preset = name;
  if (name == "tiny") {
    c.n_layer = 4, c.n_head = 4, c.n_embd = 128, c.context = 128, c.vocab_size = 257;
  } else if (name == "small") {
    c.n_layer = 6, c.n_head = 6, c.n_embd = 384, c.context = 256, c.vocab_size = 257;
  } else if (name == "medium") {  // the paper's 353M model
    c.n_layer = 24, c.n_head = 8, c.n_embd = 1024, c.mlp_hidden = 2730, c.context = 4096,
    c.vocab_size = 50304;
  } else if (name == "large") {  // the paper's 770M model
    c.n_layer = 36, c.n_head = 10, c.n_embd = 1280, c.mlp_hidden = 3413, c.context = 4096,
    c.vocab_size = 50304;
  } else {
    throw std::invalid_argument(fmt::format("unknown model preset '{}' ({}known: {})", name,
                                            did_you_mean(name, model_preset_names()),
                                            fmt::join(model_preset_names(), ", ")));
  }
  return c;
}

}  // namespace grape
