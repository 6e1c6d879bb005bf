// The text forms of every setting (encoding options, --set, --pe-set, config files, synthetic-task options,
// key=value lists), parsed in one place. No LibTorch: every layer may use it.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace grape {

// split_key_value: "key=value" -> {key, value}; `what` names the setting in the error
// ("option 'base' must look like key=value"). The others parse the whole text ("6x", " 6" and "" are not
// numbers) and give nullopt when it is not one; doubles must be finite; booleans are true/false, 1/0,
// yes/no or on/off.
std::pair<std::string, std::string> split_key_value(const std::string& text, const std::string& what);
std::optional<int64_t> text_to_int(const std::string& text);
std::optional<uint64_t> text_to_uint(const std::string& text);
std::optional<double> text_to_double(const std::string& text);
std::optional<bool> text_to_bool(const std::string& text);

// The name in `known` closest to `name` when it is close enough to be a typo of it (edit distance with
// transpositions, ignoring case: at most 1 for names of up to 4 characters, 2 up to 8, else 3; or `name` is
// a prefix of exactly one known name); empty when none is.
std::string closest_name(const std::string& name, const std::vector<std::string>& known);
// "did you mean 'rope'? " when closest_name finds one, else "": for unknown-name errors, before the list of
// known names ("unknown encoding 'rpoe' (did you mean 'rope'? known: ...)").
std::string did_you_mean(const std::string& name, const std::vector<std::string>& known);

}  // namespace grape
