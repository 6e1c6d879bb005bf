// The typed getters of encoding options, whose every error names the key and the bad value (the text
// parsers themselves are in src/io/settings_text.cpp).
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <charconv>
#include <cmath>
#include <stdexcept>

#include "grape/pe.hpp"

namespace grape {

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
