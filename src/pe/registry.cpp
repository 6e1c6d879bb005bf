// The registry of encodings: names, summaries, options, and construction with validated options.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <stdexcept>

#include "pe/families.hpp"

namespace grape {

const std::vector<EncodingInfo>& encodings() {
  static const std::vector<EncodingInfo> all = [] {
    std::vector<EncodingInfo> v;
    detail::add_absolute(v);
    detail::add_rotary(v);
    detail::add_context_extension(v);
    detail::add_mixture(v);
    detail::add_contextual(v);
    detail::add_hdd_rope(v);
    detail::add_tape(v);
    detail::add_linear_bias(v);
    detail::add_relative_bias(v);
    detail::add_cope(v);
    detail::add_fox(v);
    detail::add_path_integral(v);
    return v;
  }();
  return all;
}

const EncodingInfo& encoding_info(const std::string& name) {
  std::vector<std::string> names;
  for (const auto& e : encodings()) {
    if (e.name == name) return e;
    names.push_back(e.name);
  }
  throw std::invalid_argument(fmt::format("unknown encoding '{}' (known: {})", name, fmt::join(names, ", ")));
}

EncodingPtr make_encoding(const std::string& name, const HeadShape& shape, const PeOptions& options) {
  const auto& info = encoding_info(name);
  for (const auto& [key, value] : options.values()) {
    bool known = false;
    std::vector<std::string> keys;
    for (const auto& o : info.options) {
      known |= o.key == key;
      keys.push_back(o.key);
    }
    if (!known)
      throw std::invalid_argument(
          fmt::format("unknown parameter '{}' for encoding '{}' (known: {})", key, name,
                      keys.empty() ? "none" : fmt::format("{}", fmt::join(keys, ", "))));
  }
  return info.make(shape, options);
}

}  // namespace grape
