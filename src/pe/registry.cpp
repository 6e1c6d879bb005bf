// The registry of encodings: filled by each family file's Registration, read in display order.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <stdexcept>

#include "pe/families.hpp"

namespace grape {
namespace {

// Everything registered so far, in registration (link) order. A function-local static: family files
// register during static initialisation, whose order across files is unspecified.
std::vector<EncodingInfo>& registered() {
  static std::vector<EncodingInfo> all;
  return all;
}

int family_rank(const std::string& family) {
  static const std::vector<std::string> order = {"absolute", "multiplicative", "context extension",
                                                 "additive"};
  auto it = std::find(order.begin(), order.end(), family);
  if (it == order.end())
    throw std::logic_error(
        fmt::format("encoding family '{}' is not one of {}", family, fmt::join(order, ", ")));
  return int(it - order.begin());
}

}  // namespace

detail::Registration::Registration(void (*add)(std::vector<EncodingInfo>& out)) { add(registered()); }

const std::vector<EncodingInfo>& encodings() {
  static const std::vector<EncodingInfo> all = [] {
    auto v = registered();
    std::sort(v.begin(), v.end(), [](const EncodingInfo& a, const EncodingInfo& b) {
      const int fa = family_rank(a.family), fb = family_rank(b.family);
      return fa != fb ? fa < fb : a.name < b.name;
    });
    for (size_t i = 1; i < v.size(); ++i)
      if (v[i].name == v[i - 1].name)
        throw std::logic_error(fmt::format("encoding '{}' is registered twice", v[i].name));
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
  throw std::invalid_argument(fmt::format("unknown encoding '{}' ({}known: {})", name,
                                          did_you_mean(name, names), fmt::join(names, ", ")));
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
      throw std::invalid_argument(fmt::format(
          "unknown parameter '{}' for encoding '{}' ({}known: {})", key, name, did_you_mean(key, keys),
          keys.empty() ? "none" : fmt::format("{}", fmt::join(keys, ", "))));
  }
  return info.make(shape, options);
}

}  // namespace grape
