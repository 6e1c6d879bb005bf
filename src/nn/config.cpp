// ModelConfig: validation, `--set key=value` parsing, JSON round trip, and the named presets.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <charconv>
#include <cmath>
#include <nlohmann/json.hpp>
#include <stdexcept>

#include "grape/model.hpp"

namespace grape {
namespace {

using json = nlohmann::json;

// Every key set() and the JSON form know, in declaration order (error messages list them).
const std::vector<std::string>& field_names() {
  static const std::vector<std::string> names = {
      "preset", "vocab_size", "n_layer",  "n_head",  "n_embd",   "mlp_hidden", "context",
      "pe",     "pe_options", "kv_shift", "qk_norm", "norm_eps", "embed_std",  "attention"};
  return names;
}

std::string known_set_keys() {
  std::vector<std::string> keys;
  for (const auto& n : field_names())
    if (n != "pe_options") keys.push_back(n);
  keys.push_back("pe.OPTION");
  return fmt::format("{}", fmt::join(keys, ", "));
}

// Whole-string parses: "12x" or "" are errors, not 12 or 0.
int64_t parse_int(const std::string& key, const std::string& value) {
  int64_t out = 0;
  const char* end = value.data() + value.size();
  auto [ptr, ec] = std::from_chars(value.data(), end, out);
  if (value.empty() || ec != std::errc() || ptr != end)
    throw std::invalid_argument(fmt::format("model config: {}='{}' is not an integer", key, value));
  return out;
}

double parse_double(const std::string& key, const std::string& value) {
  size_t used = 0;
  double out = 0;
  try {
    out = std::stod(value, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (value.empty() || used != value.size() || !std::isfinite(out))
    throw std::invalid_argument(fmt::format("model config: {}='{}' is not a finite number", key, value));
  return out;
}

bool parse_bool(const std::string& key, const std::string& value) {
  if (value == "true" || value == "1" || value == "yes" || value == "on") return true;
  if (value == "false" || value == "0" || value == "no" || value == "off") return false;
  throw std::invalid_argument(
      fmt::format("model config: {}='{}' is not a boolean (true/false, 1/0, yes/no, on/off)", key, value));
}

void require_positive(const char* field, int64_t v) {
  if (v <= 0) throw std::invalid_argument(fmt::format("model config: {} must be positive, got {}", field, v));
}

// JSON readers that name the field and the expected type on a mismatch.
[[noreturn]] void wrong_type(const std::string& key, const char* expected, const json& v) {
  throw std::invalid_argument(fmt::format("model config JSON: field '{}' must be {}, got {} ({})", key,
                                          expected, v.type_name(), v.dump()));
}
int64_t json_int(const std::string& key, const json& v) {
  if (!v.is_number_integer()) wrong_type(key, "an integer", v);
  return v.get<int64_t>();
}
double json_double(const std::string& key, const json& v) {
  if (!v.is_number()) wrong_type(key, "a number", v);
  return v.get<double>();
}
bool json_bool(const std::string& key, const json& v) {
  if (!v.is_boolean()) wrong_type(key, "a boolean", v);
  return v.get<bool>();
}
std::string json_string(const std::string& key, const json& v) {
  if (!v.is_string()) wrong_type(key, "a string", v);
  return v.get<std::string>();
}

}  // namespace

void ModelConfig::validate() const {
  require_positive("vocab_size", vocab_size);
  if (vocab_size < 2)
    throw std::invalid_argument(fmt::format("model config: vocab_size must be >= 2, got {}", vocab_size));
  require_positive("n_layer", n_layer);
  require_positive("n_head", n_head);
  require_positive("n_embd", n_embd);
  require_positive("context", context);
  if (mlp_hidden < 0)
    throw std::invalid_argument(
        fmt::format("model config: mlp_hidden must be >= 0 (0: floor(8C/3)), got {}", mlp_hidden));
  if (n_embd % n_head != 0)
    throw std::invalid_argument(
        fmt::format("model config: n_embd={} is not divisible by n_head={} (head_dim = n_embd / n_head)",
                    n_embd, n_head));
  if (!(norm_eps > 0) || !std::isfinite(norm_eps))
    throw std::invalid_argument(fmt::format("model config: norm_eps must be > 0, got {}", norm_eps));
  if (!(embed_std > 0) || !std::isfinite(embed_std))
    throw std::invalid_argument(fmt::format("model config: embed_std must be > 0, got {}", embed_std));
  // Building the encoding checks its name, its options and its constraints (even head_dim, ...).
  make_encoding(pe, head_shape(), PeOptions(pe_options));
}

void ModelConfig::set(const std::string& key, const std::string& value) {
  if (key.rfind("pe.", 0) == 0 && key.size() > 3) {
    pe_options[key.substr(3)] = value;  // checked by validate(), which builds the encoding
  } else if (key == "preset") {
    *this = model_preset(value);  // a preset replaces every field, so set it first
  } else if (key == "vocab_size") {
    vocab_size = parse_int(key, value);
  } else if (key == "n_layer") {
    n_layer = parse_int(key, value);
  } else if (key == "n_head") {
    n_head = parse_int(key, value);
  } else if (key == "n_embd") {
    n_embd = parse_int(key, value);
  } else if (key == "mlp_hidden") {
    mlp_hidden = parse_int(key, value);
  } else if (key == "context") {
    context = parse_int(key, value);
  } else if (key == "pe") {
    encoding_info(value);  // throws listing the known encodings
    pe = value;
  } else if (key == "kv_shift") {
    kv_shift = parse_bool(key, value);
  } else if (key == "qk_norm") {
    qk_norm = parse_bool(key, value);
  } else if (key == "norm_eps") {
    norm_eps = parse_double(key, value);
  } else if (key == "embed_std") {
    embed_std = parse_double(key, value);
  } else if (key == "attention") {
    if (value != "fused" && value != "reference")
      throw std::invalid_argument(
          fmt::format("model config: attention='{}' must be fused or reference", value));
    attention = value;
  } else {
    throw std::invalid_argument(fmt::format("unknown model setting '{}' (known: {})", key, known_set_keys()));
  }
}

std::string ModelConfig::to_json() const {
  json j;
  j["preset"] = preset;
  j["vocab_size"] = vocab_size;
  j["n_layer"] = n_layer;
  j["n_head"] = n_head;
  j["n_embd"] = n_embd;
  j["mlp_hidden"] = mlp_hidden;
  j["context"] = context;
  j["pe"] = pe;
  j["pe_options"] = json::object();
  for (const auto& [k, v] : pe_options) j["pe_options"][k] = v;
  j["kv_shift"] = kv_shift;
  j["qk_norm"] = qk_norm;
  j["norm_eps"] = norm_eps;
  j["embed_std"] = embed_std;
  j["attention"] = attention;
  return j.dump(2);
}

ModelConfig ModelConfig::from_json(const std::string& text) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::parse_error& e) {
    throw std::invalid_argument(fmt::format("model config JSON: cannot parse: {}", e.what()));
  }
  if (!j.is_object())
    throw std::invalid_argument(fmt::format("model config JSON: expected an object, got {}", j.type_name()));
  ModelConfig c;  // fields absent from the JSON keep their defaults
  for (const auto& [key, v] : j.items()) {
    if (key == "preset")
      c.preset = json_string(key, v);
    else if (key == "vocab_size")
      c.vocab_size = json_int(key, v);
    else if (key == "n_layer")
      c.n_layer = json_int(key, v);
    else if (key == "n_head")
      c.n_head = json_int(key, v);
    else if (key == "n_embd")
      c.n_embd = json_int(key, v);
    else if (key == "mlp_hidden")
      c.mlp_hidden = json_int(key, v);
    else if (key == "context")
      c.context = json_int(key, v);
    else if (key == "pe")
      c.pe = json_string(key, v);
    else if (key == "kv_shift")
      c.kv_shift = json_bool(key, v);
    else if (key == "qk_norm")
      c.qk_norm = json_bool(key, v);
    else if (key == "norm_eps")
      c.norm_eps = json_double(key, v);
    else if (key == "embed_std")
      c.embed_std = json_double(key, v);
    else if (key == "attention")
      c.set(key, json_string(key, v));
    else if (key == "pe_options") {
      if (!v.is_object()) wrong_type(key, "an object of strings", v);
      c.pe_options.clear();
      for (const auto& [ok, ov] : v.items()) c.pe_options[ok] = json_string("pe_options." + ok, ov);
    } else {
      throw std::invalid_argument(fmt::format("model config JSON: unknown field '{}' (known: {})", key,
                                              fmt::join(field_names(), ", ")));
    }
  }
  c.validate();
  return c;
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
    throw std::invalid_argument(
        fmt::format("unknown model preset '{}' (known: {})", name, fmt::join(model_preset_names(), ", ")));
  }
  return c;
}

}  // namespace grape
