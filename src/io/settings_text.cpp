// The text forms of settings (grape/settings_text.hpp): `key=value` splitting and whole-string numbers and
// booleans, shared by encoding options, the configs, the synthetic tasks and the CLI.
#include "grape/settings_text.hpp"

#include <fmt/format.h>

#include <charconv>
#include <cmath>
#include <stdexcept>

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

}  // namespace grape
