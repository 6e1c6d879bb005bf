// The text forms of settings (grape/settings_text.hpp): `key=value` splitting and whole-string numbers and
// booleans, shared by encoding options, the configs, the synthetic tasks and the CLI.
#include "grape/settings_text.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cctype>
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

namespace {
// Optimal string alignment distance (Levenshtein plus adjacent transpositions), case-insensitive.
size_t edit_distance(const std::string& a, const std::string& b) {
  auto lower = [](char c) { return char(std::tolower(static_cast<unsigned char>(c))); };
  const size_t n = a.size(), m = b.size();
  std::vector<std::vector<size_t>> d(n + 1, std::vector<size_t>(m + 1));
  for (size_t i = 0; i <= n; ++i) d[i][0] = i;
  for (size_t j = 0; j <= m; ++j) d[0][j] = j;
  for (size_t i = 1; i <= n; ++i)
    for (size_t j = 1; j <= m; ++j) {
      const size_t cost = lower(a[i - 1]) == lower(b[j - 1]) ? 0 : 1;
      d[i][j] = std::min({d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost});
      if (i > 1 && j > 1 && lower(a[i - 1]) == lower(b[j - 2]) && lower(a[i - 2]) == lower(b[j - 1]))
        d[i][j] = std::min(d[i][j], d[i - 2][j - 2] + 1);
    }
  return d[n][m];
}
}  // namespace

std::string closest_name(const std::string& name, const std::vector<std::string>& known) {
  if (name.empty()) return {};
  const size_t limit = name.size() <= 4 ? 1 : name.size() <= 8 ? 2 : 3;
  std::string best;
  size_t best_distance = limit + 1;
  for (const auto& k : known) {
    const size_t dist = edit_distance(name, k);
    if (dist < best_distance) best_distance = dist, best = k;
  }
  if (!best.empty()) return best;
  std::string prefixed;  // "grape-a" -> the one known name it starts, if only one
  for (const auto& k : known)
    if (k.size() > name.size() && k.compare(0, name.size(), name) == 0) {
      if (!prefixed.empty()) return {};
      prefixed = k;
    }
  return prefixed;
}

std::string did_you_mean(const std::string& name, const std::vector<std::string>& known) {
  const std::string best = closest_name(name, known);
  return best.empty() ? std::string() : fmt::format("did you mean '{}'? ", best);
}

}  // namespace grape
