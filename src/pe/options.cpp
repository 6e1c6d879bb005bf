// The text forms of settings: `key=value` splitting and whole-string numbers and booleans, shared by encoding
// options, the model and training configs and the CLI; and the typed getters of encoding options, whose
// every error names the key and the bad value.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <charconv>
#include <cmath>
#include <stdexcept>

#include "grape/pe.hpp"

namespace grape {

std::pair<std::string, std::string> split_key_value(const std::string& text, const std::string& what) {
  const auto eq = text.find('=');
  if (eq == std::string::npos || eq == 0)
    throw std::invalid_argument(fmt::format("{} '{}' must look like key=value", what, text));
  return {text.substr(0, eq), text.substr(eq + 1)};
}

namespace {
template <typename T>
std::optional<T> whole_integer(const std::string& text) {
  T out = 0;
  const char* end = text.data() + text.size();
  auto [ptr, ec] = std::from_chars(text.data(), end, out);
  if (text.empty() || ec != std::errc() || ptr != end) return std::nullopt;
  return out;
}
}  // namespace

std::optional<int64_t> text_to_int(const std::string& text) { return whole_integer<int64_t>(text); }
std::optional<uint64_t> text_to_uint(const std::string& text) { return whole_integer<uint64_t>(text); }

std::optional<double> text_to_double(const std::string& text) {
  size_t used = 0;
  double out = 0;
  try {
    out = std::stod(text, &used);
  } catch (const std::exception&) {
    return std::nullopt;
  }
  if (text.empty() || used != text.size() || !std::isfinite(out)) return std::nullopt;
  return out;
}

std::optional<bool> text_to_bool(const std::string& text) {
  if (text == "true" || text == "1" || text == "yes" || text == "on") return true;
  if (text == "false" || text == "0" || text == "no" || text == "off") return false;
  return std::nullopt;
}

PeOptions PeOptions::parse(const std::vector<std::string>& assignments) {
  PeOptions o;
  for (const auto& a : assignments) {
    auto [key, value] = split_key_value(a, "option");
    o.values_[key] = value;
  }
  return o;
}

double PeOptions::get_double(const std::string& key, double def) const {
  auto it = values_.find(key);
  if (it == values_.end()) return def;
  if (auto d = text_to_double(it->second)) return *d;
  throw std::invalid_argument(fmt::format("option {}: '{}' is not a finite number", key, it->second));
}

int64_t PeOptions::get_int(const std::string& key, int64_t def) const {
  auto it = values_.find(key);
  if (it == values_.end()) return def;
  if (auto i = text_to_int(it->second)) return *i;
  throw std::invalid_argument(fmt::format("option {}: '{}' is not an integer", key, it->second));
}

bool PeOptions::get_bool(const std::string& key, bool def) const {
  auto it = values_.find(key);
  if (it == values_.end()) return def;
  if (auto b = text_to_bool(it->second)) return *b;
  throw std::invalid_argument(fmt::format("option {}: '{}' is not a boolean (true/false)", key, it->second));
}

std::string PeOptions::get_choice(const std::string& key, const std::string& def,
                                  const std::vector<std::string>& allowed) const {
  auto it = values_.find(key);
  if (it == values_.end()) return def;
  for (const auto& a : allowed)
    if (a == it->second) return a;
  throw std::invalid_argument(
      fmt::format("option {}: '{}' is not one of {}", key, it->second, fmt::join(allowed, "|")));
}

}  // namespace grape
