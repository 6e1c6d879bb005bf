// Context extension of RoPE-family spectra (docs/encodings.md, "Context extension"): the one place the
// methods' math lives. Every method is written per frequency index d on the encoding's own frequencies
// theta_d, so it applies unchanged to RoPE's fixed spectrum and to GRAPE-M's learned one:
//   pi           theta_d / s                                     (positions n -> n/s)
//   ntk          theta_d * s^(-2d/(r-2))                         (= base b' = b s^(r/(r-2)))
//   dynamic-ntk  ntk with s -> s l/L - (s-1) for the current length l > L; plain for l <= L
//   yarn         (1-g) theta_d/s + g theta_d, g = ramp(L theta_d / 2pi; alpha, beta); q, k times mscale
//   longrope     theta_d / lambda_d for positions >= n_hat, theta_d below
#include "pe/context_extension.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <numbers>
#include <sstream>
#include <stdexcept>

#include "pe/laws.hpp"

namespace grape::detail {

namespace {

// s^(-2d/(r-2)) for d < r/2: 1 at d = 0, exactly s^(-1) at d = r/2 - 1 (the exponent is -1.0 exactly).
torch::Tensor ntk_multiplier(double s, int64_t P, int64_t rotated_dims) {
  auto d = torch::arange(P, torch::kFloat64);
  auto exponent = -(2.0 * d) / double(rotated_dims - 2);
  return torch::pow(c10::Scalar(s), exponent);
}

bool is_method(const std::string& m) {
  for (const auto& x : extension_methods())
    if (x == m) return true;
  return false;
}

// Hugging Face's YaRN ramp (its truncate flag included): the weight of theta/s per pair index i < P, linear
// between the pair indices where a pair turns beta and alpha times within L, from the base's spectrum.
torch::Tensor hf_yarn_ramp(const ContextExtension& e, int64_t P) {
  const double r = double(e.rotated_dims);
  auto index_of = [&](double turns) {  // the (fractional) pair index turning `turns` times within L
    return r * std::log(double(e.original_context) / (turns * 2.0 * std::numbers::pi)) /
           (2.0 * std::log(e.base));
  };
  double low = index_of(e.yarn_beta), high = index_of(e.yarn_alpha);
  if (e.yarn_truncate) low = std::floor(low), high = std::ceil(high);
  low = std::max(low, 0.0), high = std::min(high, r - 1.0);
  if (low == high) high += 0.001;  // HF's guard against a zero-width ramp
  return ((torch::arange(P, torch::kFloat64) - low) / (high - low)).clamp(0.0, 1.0);
}

// LongRoPE factors given inline as a JSON array of numbers (Hugging Face's short_factor/long_factor).
torch::Tensor inline_factors(const std::string& text, const std::string& key, int64_t P) {
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_array())
    throw std::invalid_argument(fmt::format("{} must be a JSON array of {} numbers, got '{}'", key, P, text));
  std::vector<double> f;
  for (const auto& x : j) {
    if (!x.is_number() || !std::isfinite(x.get<double>()) || x.get<double>() <= 0.0)
      throw std::invalid_argument(
          fmt::format("{}: every factor must be a number > 0, got {}", key, x.dump()));
    f.push_back(x.get<double>());
  }
  if (int64_t(f.size()) != P)
    throw std::invalid_argument(
        fmt::format("{} has {} factors, expected {} (one per rotated pair)", key, f.size(), P));
  return torch::tensor(f, torch::kFloat64);
}

}  // namespace

const std::vector<std::string>& extension_methods() {
  static const std::vector<std::string> m = {"none", "pi",       "ntk",   "dynamic-ntk",
                                             "yarn", "longrope", "llama3"};
  return m;
}

double yarn_default_mscale(double s, double m) { return s <= 1.0 ? 1.0 : 0.1 * m * std::log(s) + 1.0; }

torch::Tensor ContextExtension::spectrum(const torch::Tensor& theta, int64_t length) const {
  auto th = theta.to(torch::kFloat64);
  const int64_t P = th.size(-1);
  if (method == "none") return th;
  if (method == "pi") return th / factor;
  if (method == "ntk") return th * ntk_multiplier(factor, P, rotated_dims);
  if (method == "dynamic-ntk") {
    if (length <= original_context) return th;  // inside the training context: plain RoPE, bit for bit
    const double k = factor * double(length) / double(original_context) - (factor - 1.0);
    return th * ntk_multiplier(k, P, rotated_dims);
  }
  if (method == "yarn") {
    if (factor == 1.0) return th;  // (1-g) theta + g theta need not round back to theta
    if (yarn_ramp == "hf") {       // the weight of theta/s ramps up over the pair indices
      auto ramp = hf_yarn_ramp(*this, P);
      return (th / factor) * ramp + th * (1.0 - ramp);
    }
    // r(d) = L / lambda_d = L theta_d / 2pi: how many turns the pair makes within the training context.
    auto turns = th * (double(original_context) / (2.0 * std::numbers::pi));
    auto g = ((turns - yarn_alpha) / (yarn_beta - yarn_alpha)).clamp(0.0, 1.0);
    return (1.0 - g) * (th / factor) + g * th;
  }
  if (method == "longrope")  // Hugging Face's switch: the short factors up to L, the long ones beyond
    return th / (longrope_short.defined() && length <= original_context ? longrope_short : longrope_lambda);
  if (method == "llama3") {
    // Wavelengths below L/high_freq_factor are kept, above L/low_freq_factor divided by s; in between the
    // weight of theta moves linearly with L / wavelength.
    const double L = double(original_context);
    auto wavelength = (2.0 * std::numbers::pi) / th;
    auto smooth = (L / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor);
    auto mid = (1.0 - smooth) * (th / factor) + smooth * th;
    return torch::where(wavelength < L / high_freq_factor, th,
                        torch::where(wavelength > L / low_freq_factor, th / factor, mid));
  }
  throw std::logic_error("context extension: unhandled method " + method);
}

torch::Tensor ContextExtension::angles(const torch::Tensor& theta, int64_t offset, int64_t T,
                                       int64_t length) const {
  auto pos = positions_f64(offset, T).view({1, T, 1, 1});
  if (method == "none") return pos * theta.to(torch::kFloat64).unsqueeze(0).unsqueeze(0);
  auto ext = pos * spectrum(theta, length).unsqueeze(0).unsqueeze(0);
  if (method != "longrope" || longrope_start <= 0) return ext;
  // LongRoPE's first n_hat positions keep the original rotation.
  auto plain = pos * theta.to(torch::kFloat64).unsqueeze(0).unsqueeze(0);
  return torch::where(pos < double(longrope_start), plain, ext);
}

std::string ContextExtension::describe() const {
  if (method == "none") return "none";
  if (method == "pi" || method == "ntk") return fmt::format("{} (s={})", method, factor);
  if (method == "dynamic-ntk") return fmt::format("dynamic-ntk (s={}, L={})", factor, original_context);
  if (method == "yarn")
    return fmt::format("yarn (s={}, L={}, alpha={}, beta={}, mscale={:.6g}, {} ramp)", factor,
                       original_context, yarn_alpha, yarn_beta, yarn_mscale, yarn_ramp);
  if (method == "llama3")
    return fmt::format("llama3 (s={}, L={}, low_freq_factor={}, high_freq_factor={})", factor,
                       original_context, low_freq_factor, high_freq_factor);
  if (longrope_short.defined())
    return fmt::format("longrope (short/long factors switching at L={}, mscale={:.6g}, n_hat={})",
                       original_context, longrope_mscale, longrope_start);
  return fmt::format("longrope ({}, n_hat={})",
                     longrope_file.empty() ? fmt::format("lambda=s={}", factor) : "factors " + longrope_file,
                     longrope_start);
}

std::vector<double> read_longrope_factors(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::invalid_argument(fmt::format("longrope_factors: cannot read '{}'", path));
  std::stringstream buf;
  buf << in.rdbuf();
  const std::string text = buf.str();
  std::vector<double> out;
  const auto first = text.find_first_not_of(" \t\r\n");
  if (first != std::string::npos && (text[first] == '[' || text[first] == '{')) {
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception& e) {
      throw std::invalid_argument(
          fmt::format("longrope_factors: '{}' is not valid JSON ({})", path, e.what()));
    }
    if (!j.is_array())
      throw std::invalid_argument(
          fmt::format("longrope_factors: '{}' must hold a JSON array of numbers", path));
    for (size_t i = 0; i < j.size(); ++i) {
      if (!j[i].is_number())
        throw std::invalid_argument(
            fmt::format("longrope_factors: '{}': entry {} is {}, not a number", path, i, j[i].dump()));
      out.push_back(j[i].get<double>());
    }
  } else {  // plain text: numbers separated by white space and/or commas
    std::string t = text;
    for (auto& c : t)
      if (c == ',') c = ' ';
    std::istringstream words(t);
    std::string w;
    while (words >> w) {
      size_t used = 0;
      double v = 0;
      try {
        v = std::stod(w, &used);
      } catch (const std::exception&) {
        used = 0;
      }
      if (used != w.size())
        throw std::invalid_argument(
            fmt::format("longrope_factors: '{}': entry {} '{}' is not a number", path, out.size(), w));
      out.push_back(v);
    }
  }
  if (out.empty()) throw std::invalid_argument(fmt::format("longrope_factors: '{}' holds no factors", path));
  for (size_t i = 0; i < out.size(); ++i)
    if (!std::isfinite(out[i]) || out[i] <= 0.0)
      throw std::invalid_argument(fmt::format(
          "longrope_factors: '{}': factor {} is {}; every factor must be finite and > 0", path, i, out[i]));
  return out;
}

const std::vector<std::pair<std::string, std::string>>& hf_option_aliases() {
  static const std::vector<std::pair<std::string, std::string>> aliases = {
      {"rope_type", "extend"},
      {"type", "extend"},
      {"original_max_position_embeddings", "original_context"},
      {"beta_fast", "yarn_beta"},
      {"beta_slow", "yarn_alpha"},
      {"attention_factor", "yarn_mscale or longrope_mscale"},
      {"short_factor", "longrope_short_factors"},
      {"long_factor", "longrope_long_factors"},
  };
  return aliases;
}

std::string method_of_rope_type(const std::string& rope_type) {
  static const std::map<std::string, std::string> m = {{"default", "none"},        {"linear", "pi"},
                                                       {"dynamic", "dynamic-ntk"}, {"yarn", "yarn"},
                                                       {"longrope", "longrope"},   {"llama3", "llama3"}};
  auto it = m.find(rope_type);
  if (it == m.end())
    throw std::invalid_argument(fmt::format(
        "rope_type '{}' is not one grape computes (default, linear, dynamic, yarn, longrope, llama3)",
        rope_type));
  return it->second;
}

namespace {

// The options with Hugging Face's key names replaced by ours (rope_type values mapped to methods); a key
// given under both names is refused.
PeOptions canonical_options(const PeOptions& o, const std::string& enc, const std::string& method_hint) {
  PeOptions out = o;
  for (const auto& [alias, _] : hf_option_aliases()) {
    if (!o.has(alias)) continue;
    std::string value = o.values().at(alias), key;
    if (alias == "rope_type" || alias == "type") {
      key = "extend";
      try {
        value = method_of_rope_type(value);
      } catch (const std::invalid_argument& e) {
        throw std::invalid_argument(fmt::format("{}: option {}: {}", enc, alias, e.what()));
      }
    } else if (alias == "original_max_position_embeddings") {
      key = "original_context";
    } else if (alias == "beta_fast") {
      key = "yarn_beta";
    } else if (alias == "beta_slow") {
      key = "yarn_alpha";
    } else if (alias == "short_factor") {
      key = "longrope_short_factors";
    } else if (alias == "long_factor") {
      key = "longrope_long_factors";
    } else {  // attention_factor: the q/k factor of whichever method has one
      const std::string m = out.has("extend") ? out.values().at("extend") : method_hint;
      key = m == "longrope" ? "longrope_mscale" : "yarn_mscale";
    }
    if (o.has(key))
      throw std::invalid_argument(
          fmt::format("{}: give either {} or its alias {}, not both", enc, key, alias));
    if (out.has(key) && out.values().at(key) != value)  // rope_type and type both given, and differing
      throw std::invalid_argument(fmt::format("{}: rope_type and type name different methods", enc));
    out.set(key, value);
  }
  return out;
}

}  // namespace

ContextExtension parse_context_extension(const PeOptions& given, const std::string& enc, int64_t rotated_dims,
                                         const std::string& fixed_method, double default_factor) {
  auto fail = [&](const std::string& msg) { throw std::invalid_argument(fmt::format("{}: {}", enc, msg)); };
  const PeOptions o = canonical_options(given, enc, fixed_method);
  ContextExtension e;
  e.rotated_dims = rotated_dims;
  e.base = o.get_double("base", 10000.0);
  if (!fixed_method.empty() && o.has("extend") && o.values().at("extend") != fixed_method)
    fail(fmt::format("its method is {}; rope_type names {}", fixed_method, o.values().at("extend")));
  e.method = fixed_method.empty() ? o.get_choice("extend", "none", extension_methods()) : fixed_method;
  if (!is_method(e.method)) fail("unknown context-extension method " + e.method);
  e.factor = o.get_double("factor", default_factor);
  if (!(e.factor > 0.0)) fail(fmt::format("factor must be > 0, got {}", e.factor));
  e.original_context = o.get_int("original_context", 128);
  if (e.original_context < 1) fail(fmt::format("original_context must be >= 1, got {}", e.original_context));
  // A method's own options given with another method would be silently ignored: refuse them.
  auto only_with = [&](const std::string& method, std::initializer_list<const char*> keys) {
    for (const char* key : keys)
      if (o.has(key) && e.method != method)
        fail(fmt::format("option {} applies only to extend={} (the method here is {})", key, method,
                         e.method));
  };
  only_with("yarn", {"yarn_alpha", "yarn_beta", "yarn_mscale", "yarn_ramp", "yarn_truncate", "mscale",
                     "mscale_all_dim"});
  only_with("longrope", {"longrope_factors", "longrope_start", "longrope_short_factors",
                         "longrope_long_factors", "longrope_mscale"});
  only_with("llama3", {"low_freq_factor", "high_freq_factor"});
  if (e.method == "none" && e.factor != 1.0)
    fail(fmt::format("factor {} needs a method: set extend=pi|ntk|dynamic-ntk|yarn|longrope|llama3",
                     e.factor));
  if ((e.method == "ntk" || e.method == "dynamic-ntk") && rotated_dims < 4)
    fail(fmt::format(
        "{} needs at least 4 rotated dims (it keeps theta_0 and divides theta_(r/2-1) by s), got {}",
        e.method, rotated_dims));
  if (e.method == "yarn") {
    e.yarn_alpha = o.get_double("yarn_alpha", 1.0);
    e.yarn_beta = o.get_double("yarn_beta", 32.0);
    if (e.yarn_alpha < 0.0 || !(e.yarn_beta > e.yarn_alpha))
      fail(fmt::format("yarn needs 0 <= yarn_alpha < yarn_beta, got alpha {} and beta {}", e.yarn_alpha,
                       e.yarn_beta));
    e.yarn_ramp = o.get_choice("yarn_ramp", "paper", {"paper", "hf"});
    if (o.has("yarn_truncate") && e.yarn_ramp != "hf")
      fail("option yarn_truncate applies only to yarn_ramp=hf (the paper's ramp is continuous)");
    e.yarn_truncate = o.get_bool("yarn_truncate", true);
    // Hugging Face (DeepSeek's configs): with mscale and mscale_all_dim both nonzero, the q/k factor is the
    // ratio of their temperatures; otherwise the paper's 0.1 ln s + 1.
    const double m = o.get_double("mscale", 0.0), m_all = o.get_double("mscale_all_dim", 0.0);
    const double automatic_mscale =
        m != 0.0 && m_all != 0.0 ? yarn_default_mscale(e.factor, m) / yarn_default_mscale(e.factor, m_all)
                                 : yarn_default_mscale(e.factor);
    const bool automatic = !o.has("yarn_mscale") || o.values().at("yarn_mscale") == "auto";
    e.yarn_mscale = automatic ? automatic_mscale : o.get_double("yarn_mscale", 1.0);
    if (!(e.yarn_mscale > 0.0)) fail(fmt::format("yarn_mscale must be > 0, got {}", e.yarn_mscale));
  }
  if (e.method == "llama3") {
    e.low_freq_factor = o.get_double("low_freq_factor", 1.0);
    e.high_freq_factor = o.get_double("high_freq_factor", 4.0);
    if (!(e.low_freq_factor > 0.0) || !(e.high_freq_factor > e.low_freq_factor))
      fail(fmt::format("llama3 needs 0 < low_freq_factor < high_freq_factor, got {} and {}",
                       e.low_freq_factor, e.high_freq_factor));
  }
  if (e.method == "longrope") {
    const int64_t P = rotated_dims / 2;
    e.longrope_start = o.get_int("longrope_start", 0);
    if (e.longrope_start < 0) fail(fmt::format("longrope_start must be >= 0, got {}", e.longrope_start));
    const bool by_file = o.has("longrope_factors");
    const bool short_long = o.has("longrope_short_factors") || o.has("longrope_long_factors");
    if (by_file && short_long)
      fail("give the longrope factors either as a file (longrope_factors) or as short/long lists, not both");
    if (short_long) {  // Hugging Face's form: short factors up to L, long ones beyond
      for (const char* key : {"longrope_short_factors", "longrope_long_factors"})
        if (!o.has(key)) fail(fmt::format("longrope with short/long factors needs {} too", key));
      try {
        e.longrope_short =
            inline_factors(o.values().at("longrope_short_factors"), "longrope_short_factors", P);
        e.longrope_lambda =
            inline_factors(o.values().at("longrope_long_factors"), "longrope_long_factors", P);
      } catch (const std::invalid_argument& err) {
        fail(err.what());
      }
      if (!o.has("factor")) e.factor = e.longrope_lambda.max().item<double>();
    } else if (by_file) {
      if (o.has("factor"))
        fail(
            "give the longrope factors either as factor=S (the same for every frequency) or as "
            "longrope_factors=FILE, not both");
      e.longrope_file = o.values().at("longrope_factors");
      std::vector<double> f;
      try {
        f = read_longrope_factors(e.longrope_file);
      } catch (const std::invalid_argument& err) {
        fail(err.what());
      }
      if (int64_t(f.size()) != P)
        fail(fmt::format(
            "longrope_factors: '{}' has {} factors, expected {} (one per rotated pair, r/2 = {}/2)",
            e.longrope_file, f.size(), P, rotated_dims));
      e.longrope_lambda = torch::tensor(f, torch::kFloat64);
      e.factor = *std::max_element(f.begin(), f.end());
    } else {
      e.longrope_lambda = torch::full({P}, e.factor, torch::kFloat64);
    }
    // auto: LongRoPE's (and Hugging Face's) sqrt(1 + ln s / ln L) for s > 1.
    const bool automatic = o.has("longrope_mscale") && o.values().at("longrope_mscale") == "auto";
    e.longrope_mscale =
        automatic
            ? (e.factor <= 1.0 ? 1.0
                               : std::sqrt(1.0 + std::log(e.factor) / std::log(double(e.original_context))))
            : o.get_double("longrope_mscale", 1.0);
    if (!(e.longrope_mscale > 0.0))
      fail(fmt::format("longrope_mscale must be > 0, got {}", e.longrope_mscale));
  }
  return e;
}

std::vector<OptionSpec> context_extension_options(const std::string& fixed_method,
                                                  const std::string& default_factor) {
  std::vector<OptionSpec> out;
  const bool all = fixed_method.empty();
  if (all)
    out.push_back({"extend", "none", "context extension: none|pi|ntk|dynamic-ntk|yarn|longrope|llama3"});
  out.push_back({"factor", default_factor, "s = L'/L, the extension factor"});
  out.push_back({"original_context", "128", "L, the training context (dynamic-ntk, yarn, longrope, llama3)"});
  if (all || fixed_method == "yarn") {
    out.push_back({"yarn_alpha", "1", "yarn: pairs turning fewer than alpha times within L get pure PI"});
    out.push_back({"yarn_beta", "32", "yarn: pairs turning more than beta times within L are not changed"});
    out.push_back({"yarn_mscale", "auto",
                   "yarn: factor on rotated q and k; auto: 0.1 ln s + 1, or from mscale/mscale_all_dim"});
    out.push_back(
        {"yarn_ramp", "paper",
         "yarn: paper (continuous in each pair's turns) or hf (Hugging Face's, over pair indices)"});
    out.push_back({"yarn_truncate", "true", "yarn_ramp=hf: floor/ceil the ramp's ends (HF's truncate)"});
    out.push_back(
        {"mscale", "0", "yarn: with mscale_all_dim, q,k factor (0.1 m ln s + 1)/(0.1 m_all ln s + 1)"});
    out.push_back({"mscale_all_dim", "0", "yarn: see mscale (Hugging Face / DeepSeek)"});
  }
  if (all || fixed_method == "longrope") {
    out.push_back({"longrope_factors", "",
                   "longrope: file of r/2 factors lambda_d (JSON array or text); "
                   "default lambda_d = factor"});
    out.push_back({"longrope_short_factors", "",
                   "longrope: JSON array of r/2 factors used while the length is <= L (with the long ones)"});
    out.push_back({"longrope_long_factors", "", "longrope: JSON array of r/2 factors used beyond L"});
    out.push_back({"longrope_start", "0", "longrope: n_hat, positions below it are not interpolated"});
    out.push_back(
        {"longrope_mscale", "1", "longrope: factor on rotated q and k; auto: sqrt(1 + ln s / ln L)"});
  }
  if (all || fixed_method == "llama3") {
    out.push_back({"low_freq_factor", "1", "llama3: wavelengths above L/low_freq_factor get theta/s"});
    out.push_back({"high_freq_factor", "4", "llama3: wavelengths below L/high_freq_factor are kept"});
  }
  for (const auto& [alias, ours] : hf_option_aliases())
    out.push_back({alias, "", "Hugging Face's name for " + ours});
  return out;
}

}  // namespace grape::detail

namespace grape {

std::map<std::string, std::string> hf_rope_scaling_options(const std::string& json_text) {
  using nlohmann::json;
  auto fail = [](const std::string& msg) { throw std::invalid_argument("rope_scaling: " + msg); };
  const json j = json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) fail("not valid JSON: " + json_text);
  if (!j.is_object()) fail("expected a JSON object such as {\"rope_type\": \"yarn\", \"factor\": 4}");
  if (!j.contains("rope_type") && !j.contains("type")) fail("missing 'rope_type' (or 'type')");
  std::string rope_type;
  for (const char* key : {"rope_type", "type"}) {
    if (!j.contains(key)) continue;
    if (!j[key].is_string()) fail(fmt::format("'{}' must be a string, got {}", key, j[key].dump()));
    if (!rope_type.empty() && j[key].get<std::string>() != rope_type)
      fail("'rope_type' and 'type' name different types");
    rope_type = j[key].get<std::string>();
  }
  // transformers' required and optional keys per type (its rope validation functions).
  static const std::map<std::string, std::pair<std::vector<std::string>, std::vector<std::string>>> keys = {
      {"default", {{}, {}}},
      {"linear", {{"factor"}, {}}},
      {"dynamic", {{"factor"}, {"original_max_position_embeddings"}}},
      {"yarn",
       {{"factor"},
        {"attention_factor", "beta_fast", "beta_slow", "original_max_position_embeddings", "mscale",
         "mscale_all_dim", "truncate"}}},
      {"longrope",
       {{"short_factor", "long_factor"}, {"attention_factor", "factor", "original_max_position_embeddings"}}},
      {"llama3", {{"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"}, {}}},
  };
  auto it = keys.find(rope_type);
  if (it == keys.end())
    fail(fmt::format(
        "rope_type '{}' is not one grape computes (default, linear, dynamic, yarn, longrope, llama3)",
        rope_type));
  const auto& [required, optional] = it->second;
  for (const auto& k : required)
    if (!j.contains(k)) fail(fmt::format("rope_type '{}' needs '{}'", rope_type, k));
  for (const auto& [k, v] : j.items()) {
    const bool known = k == "rope_type" || k == "type" ||
                       std::find(required.begin(), required.end(), k) != required.end() ||
                       std::find(optional.begin(), optional.end(), k) != optional.end();
    if (!known) {
      std::vector<std::string> all = required;
      all.insert(all.end(), optional.begin(), optional.end());
      fail(fmt::format("unknown key '{}' for rope_type '{}' (known: rope_type{}{})", k, rope_type,
                       all.empty() ? "" : ", ", fmt::join(all, ", ")));
    }
  }
  auto number = [&](const std::string& k) {
    if (!j[k].is_number()) fail(fmt::format("'{}' must be a number, got {}", k, j[k].dump()));
    const double v = j[k].get<double>();
    if (!std::isfinite(v)) fail(fmt::format("'{}' must be finite, got {}", k, j[k].dump()));
    return fmt::format("{}", v);
  };
  std::map<std::string, std::string> o;
  o["extend"] = detail::method_of_rope_type(rope_type);
  if (j.contains("factor")) {
    if (j["factor"].is_number() && j["factor"].get<double>() < 1.0)
      fail(fmt::format("'factor' must be >= 1, got {}", j["factor"].dump()));
    o["factor"] = number("factor");
  }
  if (j.contains("original_max_position_embeddings")) {
    const auto& v = j["original_max_position_embeddings"];
    if (!v.is_number_integer() || v.get<int64_t>() < 1)
      fail(fmt::format("'original_max_position_embeddings' must be a positive integer, got {}", v.dump()));
    o["original_context"] = std::to_string(v.get<int64_t>());
  }
  if (rope_type == "yarn") {
    o["yarn_ramp"] = "hf";  // what transformers computes
    if (j.contains("beta_fast")) o["yarn_beta"] = number("beta_fast");
    if (j.contains("beta_slow")) o["yarn_alpha"] = number("beta_slow");
    if (j.contains("attention_factor")) o["yarn_mscale"] = number("attention_factor");
    for (const char* k : {"mscale", "mscale_all_dim"})
      if (j.contains(k)) o[k] = number(k);
    if (j.contains("truncate")) {
      if (!j["truncate"].is_boolean())
        fail(fmt::format("'truncate' must be true or false, got {}", j["truncate"].dump()));
      o["yarn_truncate"] = j["truncate"].get<bool>() ? "true" : "false";
    }
  }
  if (rope_type == "longrope") {
    for (const auto& [k, ours] :
         {std::pair<std::string, std::string>{"short_factor", "longrope_short_factors"},
          {"long_factor", "longrope_long_factors"}}) {
      if (!j[k].is_array()) fail(fmt::format("'{}' must be a list of numbers, got {}", k, j[k].dump()));
      for (const auto& x : j[k])
        if (!x.is_number()) fail(fmt::format("'{}' must be a list of numbers, got {}", k, x.dump()));
      o[ours] = j[k].dump();
    }
    o["longrope_mscale"] = j.contains("attention_factor") ? number("attention_factor") : "auto";
    if (!j.contains("factor") && !j.contains("attention_factor"))
      fail("rope_type 'longrope' needs 'factor' (or 'attention_factor') for its attention scaling");
  }
  if (rope_type == "llama3") {
    o["low_freq_factor"] = number("low_freq_factor");
    o["high_freq_factor"] = number("high_freq_factor");
  }
  return o;
}

}  // namespace grape

namespace grape::detail {

namespace {

void context_extension_laws(LawTable& t) {
  using namespace laws;
  const auto f64 = torch::kFloat64;
  const uint64_t seed = t.seed;
  const std::string& n = t.encoding;
  auto in = random_inputs(f64, seed);
  auto fresh = [&](const std::string& name, PeOptions o = {}) { return build(name, f64, seed, o, false); };
  // Context extension, invariants E-1..E-5 (docs/encodings.md, "Invariant labels"). encode_of: q~ of `e` for
  // q at positions offset..
  auto encode_of = [&](const EncodingPtr& e, const torch::Tensor& q, int64_t offset) {
    auto st = e->initial_state(q.size(0), offset);
    return e->encode(q, q, torch::Tensor(), st).q;
  };
  // The extended frequencies theta'_d, read back by atan2 from the turn of unit vectors at position 1.
  auto spectrum_of = [&](const EncodingPtr& e) {
    const int64_t P = kShape.head_dim / 2;
    auto unit = torch::zeros({1, 1, kShape.heads, kShape.head_dim}, f64);
    unit.narrow(-1, 0, P).fill_(1.0);
    auto r = encode_of(e, unit, 1)[0][0][0];
    return torch::atan2(r.narrow(0, P, P), r.narrow(0, 0, P));
  };
  auto theta = torch::exp(-(2.0 * torch::arange(kShape.head_dim / 2, f64) / double(kShape.head_dim)) *
                          std::log(10000.0));
  const int64_t P = kShape.head_dim / 2;
  if (n == "pi") {
    t.add("E-1: factor=1 == rope", logits_gap(fresh("pi", PeOptions{{"factor", "1"}}), fresh("rope"), in, 5),
          0.0);
    // PI at s = 2, position 2m == RoPE at position m.
    auto even = torch::arange(0, kLen, 2);
    t.add("E-1: s=2 at 2m == rope at m",
          max_diff(encode_of(fresh("pi"), in.q, 0).index_select(1, even),
                   encode_of(fresh("rope"), in.q.index_select(1, even), 0)),
          1e-12);
  } else if (n == "ntk") {
    t.add("E-2: factor=1 == rope", logits_gap(fresh("ntk", PeOptions{{"factor", "1"}}), fresh("rope"), in, 5),
          0.0);
    auto th = spectrum_of(fresh("ntk", PeOptions{{"factor", "3"}}));
    t.add("E-2: theta'_0 == theta_0", std::abs(th[0].item<double>() - theta[0].item<double>()), 1e-12);
    t.add("E-2: theta'_(D/2-1) == theta_(D/2-1)/s",
          std::abs(th[P - 1].item<double>() - theta[P - 1].item<double>() / 3.0), 1e-12);
  } else if (n == "dynamic-ntk") {
    t.add("E-3: l <= L == rope (bit-exact)",
          logits_gap(fresh("dynamic-ntk", PeOptions{{"original_context", std::to_string(kLen)}}),
                     fresh("rope"), in),
          0.0);
    // Past L the spectrum is NTK's with s -> s l/L - (s-1): here 2*13/5 - 1 = 4.2.
    t.add("E-3: l > L == ntk(s l/L - (s-1))",
          logits_gap(fresh("dynamic-ntk", PeOptions{{"original_context", "5"}}),
                     fresh("ntk", PeOptions{{"factor", "4.2"}}), in),
          1e-12);
    // A decode crossing L (cache of unrotated keys) equals a full recompute of each prefix.
    auto e = fresh("dynamic-ntk", PeOptions{{"original_context", "5"}});
    auto st = e->initial_state(kBatch, 0);
    KeyCache cache;
    double err = 0.0;
    int64_t start = 0;
    for (int64_t len : {3, 1, 1, 1, 4, 1, 2}) {
      auto sl = [&](const torch::Tensor& x, int64_t n0, int64_t n1) { return x.narrow(1, n0, n1); };
      auto tok = e->encode(sl(in.q, start, len), sl(in.k, start, len), torch::Tensor(), st);
      cache.append(tok);
      Inputs prefix{sl(in.q, 0, start + len), sl(in.k, 0, start + len), in.v, in.x};
      auto full = logits_at(*e, prefix, 0);
      err = std::max(err, max_diff(attention_logits(*e, tok, cache), full.narrow(2, start, len)));
      start += len;
    }
    t.add("E-3: decode across L == prefix recompute", err, 1e-10);
  } else if (n == "yarn") {
    t.add("E-4: factor=1 == rope",
          logits_gap(fresh("yarn", PeOptions{{"factor", "1"}}), fresh("rope"), in, 5), 0.0);
    const double m = 0.1 * std::log(4.0) + 1.0;
    auto yarn = fresh("yarn", PeOptions{{"factor", "4"}});
    auto parts = fresh("yarn", PeOptions{{"factor", "4"}, {"yarn_mscale", "1"}});
    t.add("E-4: logits == by-parts logits * mscale^2",
          max_diff(logits_at(*yarn, in, 3), logits_at(*parts, in, 3) * (m * m)), 1e-12);
    t.add("E-4: |q~| == (0.1 ln s + 1) |q|",
          max_diff(encode_of(yarn, in.q, 3).norm(2, -1), in.q.norm(2, -1) * m), 1e-12);
    // L = 1000, D = 12: pairs 0, 1 turn > 32 times within L (kept), pairs 4, 5 < 1 time (theta/s).
    auto th = spectrum_of(fresh("yarn", PeOptions{{"factor", "4"}, {"original_context", "1000"}}));
    t.add("E-4: r(d) > beta unchanged", max_diff(th.narrow(0, 0, 2), theta.narrow(0, 0, 2)), 1e-12);
    t.add("E-4: r(d) < alpha == theta/s", max_diff(th.narrow(0, 4, 2), theta.narrow(0, 4, 2) / 4.0), 1e-12);
    // Hugging Face's ramp, same ends: L = 1000, D = 12 puts pair indices 0..1 before it, 4..5 after it.
    auto hf = spectrum_of(
        fresh("yarn", PeOptions{{"factor", "4"}, {"original_context", "1000"}, {"yarn_ramp", "hf"}}));
    t.add("E-4 (hf ramp): first pairs unchanged", max_diff(hf.narrow(0, 0, 1), theta.narrow(0, 0, 1)), 1e-12);
    t.add("E-4 (hf ramp): last pairs == theta/s", max_diff(hf.narrow(0, 5, 1), theta.narrow(0, 5, 1) / 4.0),
          1e-12);
    t.add("E-4 (hf ramp): factor=1 == rope",
          logits_gap(fresh("yarn", PeOptions{{"factor", "1"}, {"yarn_ramp", "hf"}}), fresh("rope"), in, 5),
          0.0);
  } else if (n == "llama3") {
    // L = 1000, D = 12: wavelengths 2pi/theta_d = 6.3, 29, 135 (< L/4: kept), 628 (blended), 2920, 13536
    // (> L/1: theta/s).
    auto th = spectrum_of(fresh("llama3", PeOptions{{"factor", "8"}, {"original_context", "1000"}}));
    t.add("llama3: short wavelengths kept", max_diff(th.narrow(0, 0, 3), theta.narrow(0, 0, 3)), 1e-12);
    t.add("llama3: long wavelengths == theta/s", max_diff(th.narrow(0, 4, 2), theta.narrow(0, 4, 2) / 8.0),
          1e-12);
    const double g = (1000.0 / (2.0 * std::numbers::pi / theta[3].item<double>()) - 1.0) / 3.0;
    t.add("llama3: blend (1-g) theta/s + g theta",
          std::abs(th[3].item<double>() -
                   ((1.0 - g) * theta[3].item<double>() / 8.0 + g * theta[3].item<double>())),
          1e-12);
    t.add("llama3: factor=1 == rope",
          logits_gap(fresh("llama3", PeOptions{{"factor", "1"}}), fresh("rope"), in, 5), 1e-12);
  } else if (n == "longrope") {
    t.add("E-5: lambda = s, n_hat = 0 == pi",
          logits_gap(fresh("longrope", PeOptions{{"factor", "3"}}), fresh("pi", PeOptions{{"factor", "3"}}),
                     in, 5),
          0.0);
    t.add("E-5: lambda = 1 == rope",
          logits_gap(fresh("longrope", PeOptions{{"factor", "1"}}), fresh("rope"), in, 5), 0.0);
    // n_hat = 5: positions 0..4 as rope, 5.. as pi.
    auto lr = encode_of(fresh("longrope", PeOptions{{"factor", "3"}, {"longrope_start", "5"}}), in.q, 0);
    t.add("E-5: positions < n_hat unscaled",
          max_diff(lr.narrow(1, 0, 5), encode_of(fresh("rope"), in.q, 0).narrow(1, 0, 5)), 0.0);
    t.add("E-5: positions >= n_hat interpolated",
          max_diff(lr.narrow(1, 5, kLen - 5),
                   encode_of(fresh("pi", PeOptions{{"factor", "3"}}), in.q, 0).narrow(1, 5, kLen - 5)),
          0.0);
  }
}

void add_context_extension(std::vector<EncodingInfo>& out) {
  struct Named {
    const char* name;
    const char* summary;
  };
  const Named named[] = {
      {"pi", "RoPE with Position Interpolation: theta_d / s (positions n -> n/s)"},
      {"ntk", "RoPE with NTK-aware scaling: base b' = b s^(D/(D-2)); theta_0 kept, theta_(D/2-1) / s"},
      {"dynamic-ntk",
       "RoPE with dynamic NTK: NTK with s -> s l/L - (s-1) at length l > L; caches unrotated keys"},
      {"yarn", "RoPE with YaRN: NTK-by-parts ramp between PI and RoPE per frequency, q,k times 0.1 ln s + 1"},
      {"longrope",
       "RoPE with LongRoPE: per-frequency factors lambda_d (a file, or HF's short/long lists switching at "
       "L)"},
      {"llama3", "RoPE with Llama 3's scaling: theta/s for wavelengths > L/low, kept below L/high, blended"},
  };
  auto layout = rotary_layout_options();
  for (const auto& n : named) {
    const std::string method = n.name;
    const std::string default_factor = method == "llama3" ? "8" : "2";  // Llama 3.1's own s is 8
    std::vector<OptionSpec> opts = context_extension_options(method, default_factor);
    opts.push_back({"base", "10000", "frequency base"});
    opts.push_back({"fraction", "1", "partial rotary: rotate only the first fraction*D dims"});
    opts.insert(opts.end(), layout.begin(), layout.end());
    out.push_back({method,
                   "context extension",
                   n.summary,
                   opts,
                   {},
                   [method](const HeadShape& s, const PeOptions& o) {
                     return make_extended_rope(s, o, method, method, method == "llama3" ? 8.0 : 2.0);
                   },
                   context_extension_laws});
  }
}

const Registration context_extension_registration(add_context_extension);

}  // namespace
}  // namespace grape::detail
