// Parsing of `--set key=value` encoding options; every error names the key and the bad value.
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
    auto eq = a.find('=');
    if (eq == std::string::npos || eq == 0)
      throw std::invalid_argument(fmt::format("option '{}' must look like key=value", a));
    o.values_[a.substr(0, eq)] = a.substr(eq + 1);
  }
  return o;
}

double PeOptions::get_double(const std::string& key, double def) const {
  auto it = values_.find(key);
  if (it == values_.end()) return def;
  const std::string& v = it->second;
  try {
    size_t used = 0;
    double d = std::stod(v, &used);
    if (used != v.size() || !std::isfinite(d)) throw std::invalid_argument("");
    return d;
  } catch (const std::exception&) {
    throw std::invalid_argument(fmt::format("option {}: '{}' is not a finite number", key, v));
  }
}

int64_t PeOptions::get_int(const std::string& key, int64_t def) const {
  auto it = values_.find(key);
  if (it == values_.end()) return def;
  const std::string& v = it->second;
  int64_t out = 0;
  auto [ptr, ec] = std::from_chars(v.data(), v.data() + v.size(), out);
  if (ec != std::errc() || ptr != v.data() + v.size())
    throw std::invalid_argument(fmt::format("option {}: '{}' is not an integer", key, v));
  return out;
}

bool PeOptions::get_bool(const std::string& key, bool def) const {
  auto it = values_.find(key);
  if (it == values_.end()) return def;
  const std::string& v = it->second;
  if (v == "true" || v == "1" || v == "yes") return true;
  if (v == "false" || v == "0" || v == "no") return false;
  throw std::invalid_argument(fmt::format("option {}: '{}' is not a boolean (true/false)", key, v));
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
