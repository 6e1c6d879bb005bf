// The table of a config's fields, and the one piece of code behind every use of a field: `--set key=value`,
// the sections of a --config file, run.json (to_json / from_json), range checks, unknown-key errors and the
// `--set` help. ModelConfig (src/nn/config.cpp) and TrainConfig (src/train/config.cpp) each declare one
// table; a field added to it is known everywhere. Internal to the library.
#pragma once

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <variant>
#include <vector>

#include "grape/model.hpp"

namespace grape::config {

using json = nlohmann::json;
using Options = std::map<std::string, std::string>;
constexpr double kInf = std::numeric_limits<double>::infinity();

// The allowed values of a number, each end open or closed; NaN is outside every range.
struct Range {
  double lo = -kInf, hi = kInf;
  bool lo_open = false, hi_open = false;
  bool any() const { return lo == -kInf && hi == kInf; }
  bool contains(double v) const { return (lo_open ? v > lo : v >= lo) && (hi_open ? v < hi : v <= hi); }
  std::string text() const {  // ">= 1", "> 0", "in [0, 1)"
    if (hi == kInf) return fmt::format("{} {}", lo_open ? ">" : ">=", lo);
    return fmt::format("in {}{}, {}{}", lo_open ? "(" : "[", lo, hi, hi_open ? ")" : "]");
  }
};
inline Range at_least(double lo) { return {.lo = lo}; }
inline Range above(double lo) { return {.lo = lo, .lo_open = true}; }

// A field's member; its type is the field's kind. Options (a map) are set one entry at a time.
template <class C>
using Member =
    std::variant<int64_t C::*, uint64_t C::*, double C::*, bool C::*, std::string C::*, Options C::*>;

template <class C>
struct Field {
  const char* name;
  Member<C> member;
  const char* help;
  Range range = {};                       // numbers: checked by validate
  std::vector<std::string> choices = {};  // text: the allowed values, when they are a few
  void (*check)(const std::string&) =
      nullptr;                   // text: a check of its own that throws (pe: the encoding exists)
  const char* prefix = nullptr;  // options: `--set PREFIX.KEY=VALUE` sets one entry
  // text that was once a boolean: the values false and true stand for, so old run.json files and
  // `--set KEY=true` keep working (qk_norm: {"off", "before_rotation"}).
  std::vector<std::string> bool_values = {};
};

// A once-boolean text field's value for `text` when it is a boolean (true/false, 1/0, ...), else `text`.
template <class C>
std::string from_bool_alias(const Field<C>& f, const std::string& text) {
  if (f.bool_values.size() != 2 || std::find(f.choices.begin(), f.choices.end(), text) != f.choices.end())
    return text;
  const auto b = text_to_bool(text);
  return b ? f.bool_values[*b ? 1 : 0] : text;
}

template <class C>
using Table = std::vector<Field<C>>;

template <class... F>
struct Overloaded : F... {
  using F::operator()...;
};

template <class C>
bool is_options(const Field<C>& f) {
  return std::holds_alternative<Options C::*>(f.member);
}

// The name a user types: options fields as "PREFIX.OPTION".
template <class C>
std::string set_name(const Field<C>& f) {
  return is_options(f) ? std::string(f.prefix) + "OPTION" : std::string(f.name);
}

// The keys set() takes, or (json_names) the keys of run.json and config-file sections, for error messages.
template <class C>
std::vector<std::string> key_names(const Table<C>& table, bool json_names) {
  std::vector<std::string> keys;
  for (const auto& f : table) keys.push_back(json_names ? std::string(f.name) : set_name(f));
  return keys;
}
template <class C>
std::string known_keys(const Table<C>& table, bool json_names) {
  return fmt::format("{}", fmt::join(key_names(table, json_names), ", "));
}
// "unknown setting 'n_layers' (did you mean 'n_layer'? known: ...)".
template <class C>
std::string unknown_key(const Table<C>& table, const std::string& what, const std::string& key,
                        bool json_names) {
  return fmt::format("unknown {} '{}' ({}known: {})", what, key,
                     did_you_mean(key, key_names(table, json_names)), known_keys(table, json_names));
}

template <class C>
const Field<C>* find(const Table<C>& table, const std::string& name) {
  for (const auto& f : table)
    if (name == f.name) return &f;
  return nullptr;
}

// The table's field that set() sends `key` to: a field by name, or an options field by its prefix.
template <class C>
const Field<C>* find_set_key(const Table<C>& table, const std::string& key) {
  for (const auto& f : table) {
    if (!is_options(f) && key == f.name) return &f;
    const std::string prefix = f.prefix ? f.prefix : "";
    if (is_options(f) && key.size() > prefix.size() && key.compare(0, prefix.size(), prefix) == 0) return &f;
  }
  return nullptr;
}

// A text field's value against its choices and its own check.
template <class C>
void check_text(const Field<C>& f, const std::string& value, const std::string& where) {
  if (!f.choices.empty() && std::find(f.choices.begin(), f.choices.end(), value) == f.choices.end())
    throw std::invalid_argument(
        fmt::format("{}: {}='{}' is not one of {}", where, f.name, value, fmt::join(f.choices, "|")));
  if (f.check == nullptr) return;
  try {
    f.check(value);
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(fmt::format("{}: {}: {}", where, f.name, e.what()));
  }
}

// Sets `key` from text (`--set`, config files): "model config: n_layer='6x' is not an integer".
template <class C>
void set_from_text(C& c, const Table<C>& table, const std::string& key, const std::string& text,
                   const std::string& where) {
  const Field<C>* f = find_set_key(table, key);
  if (f == nullptr)
    throw std::invalid_argument(fmt::format("{}: {}", where, unknown_key(table, "setting", key, false)));
  auto bad = [&](const char* what) {
    throw std::invalid_argument(fmt::format("{}: {}='{}' is not {}", where, key, text, what));
  };
  std::visit(Overloaded{
                 [&](int64_t C::*m) {
                   const auto v = text_to_int(text);
                   if (!v) bad("an integer");
                   c.*m = *v;
                 },
                 [&](uint64_t C::*m) {
                   const auto v = text_to_uint(text);
                   if (!v) bad("an integer >= 0");
                   c.*m = *v;
                 },
                 [&](double C::*m) {
                   const auto v = text_to_double(text);
                   if (!v) bad("a finite number");
                   c.*m = *v;
                 },
                 [&](bool C::*m) {
                   const auto v = text_to_bool(text);
                   if (!v) bad("a boolean (true/false, 1/0, yes/no, on/off)");
                   c.*m = *v;
                 },
                 [&](std::string C::*m) {
                   const auto value = from_bool_alias(*f, text);
                   check_text(*f, value, where);
                   c.*m = value;
                 },
                 // One option; the encoding checks it when it is built (validate).
                 [&](Options C::*m) { (c.*m)[key.substr(std::string(f->prefix).size())] = text; },
             },
             f->member);
}

// Every field as its own JSON type (run.json, results.json).
template <class C>
json to_json(const C& c, const Table<C>& table) {
  json j = json::object();
  for (const auto& f : table) std::visit([&](auto m) { j[f.name] = c.*m; }, f.member);
  return j;
}

// `text` as a JSON object, or an error naming `where`.
inline json parse_object(const std::string& text, const std::string& where) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::parse_error& e) {
    throw std::invalid_argument(fmt::format("{}: cannot parse: {}", where, e.what()));
  }
  if (!j.is_object())
    throw std::invalid_argument(fmt::format("{}: expected an object, got {}", where, j.type_name()));
  return j;
}

// Sets the fields of a JSON object whose values have their fields' own types (run.json): strict, so a
// hand-edited file with "n_layer": "2" is refused rather than guessed at. Options are replaced whole.
template <class C>
void read_json(C& c, const Table<C>& table, const json& j, const std::string& where) {
  auto wrong_type = [&](const std::string& key, const char* expected, const json& v) {
    throw std::invalid_argument(
        fmt::format("{}: field '{}' must be {}, got {} ({})", where, key, expected, v.type_name(), v.dump()));
  };
  for (const auto& [key, v] : j.items()) {
    const Field<C>* f = find(table, key);
    if (f == nullptr)
      throw std::invalid_argument(fmt::format("{}: {}", where, unknown_key(table, "field", key, true)));
    std::visit(Overloaded{
                   [&](int64_t C::*m) {
                     if (!v.is_number_integer()) wrong_type(key, "an integer", v);
                     c.*m = v.template get<int64_t>();
                   },
                   [&](uint64_t C::*m) {
                     if (!v.is_number_unsigned()) wrong_type(key, "an integer >= 0", v);
                     c.*m = v.template get<uint64_t>();
                   },
                   [&](double C::*m) {
                     if (!v.is_number()) wrong_type(key, "a number", v);
                     c.*m = v.template get<double>();
                   },
                   [&](bool C::*m) {
                     if (!v.is_boolean()) wrong_type(key, "a boolean", v);
                     c.*m = v.template get<bool>();
                   },
                   [&](std::string C::*m) {
                     if (v.is_boolean() && f->bool_values.size() == 2) {  // a run.json from before the choice
                       c.*m = f->bool_values[v.template get<bool>() ? 1 : 0];
                       return;
                     }
                     if (!v.is_string()) wrong_type(key, "a string", v);
                     check_text(*f, v.template get<std::string>(), where);
                     c.*m = v.template get<std::string>();
                   },
                   [&](Options C::*m) {
                     if (!v.is_object()) wrong_type(key, "an object of strings", v);
                     Options o;
                     for (const auto& [ok, ov] : v.items()) {
                       if (!ov.is_string()) wrong_type(key + "." + ok, "a string", ov);
                       o[ok] = ov.template get<std::string>();
                     }
                     c.*m = std::move(o);
                   },
               },
               f->member);
  }
}

// A config-file value as --set would give it: text as it is, numbers and booleans as JSON writes them.
inline std::string as_text(const json& v) { return v.is_string() ? v.get<std::string>() : v.dump(); }

// Sets the fields of a config file's section (values typed or text) through C::set, in table order, so a
// field with side effects (ModelConfig's preset, which loads every field) comes first whatever the file's
// order. Errors name `where` (the file and the section) and the key.
template <class C>
void set_section(C& c, const Table<C>& table, const json& section, const std::string& where) {
  for (const auto& [key, v] : section.items())
    if (find(table, key) == nullptr)
      throw std::invalid_argument(fmt::format("{}: {}", where, unknown_key(table, "setting", key, true)));
  for (const auto& f : table) {
    const auto it = section.find(f.name);
    if (it == section.end()) continue;
    if (!is_options(f)) {
      c.set(f.name, as_text(*it), where);
      continue;
    }
    if (!it->is_object())
      throw std::invalid_argument(
          fmt::format("{}: {} must be a table of options (KEY = VALUE), got {}", where, f.name, it->dump()));
    for (const auto& [ok, ov] : it->items()) c.set(f.prefix + ok, as_text(ov), where);
  }
}

// Numbers against their ranges (finite, too), text against its choices and checks.
template <class C>
void check_values(const C& c, const Table<C>& table, const std::string& where) {
  auto number = [&](const Field<C>& f, auto v) {
    if (!std::isfinite(double(v)) || !f.range.contains(double(v)))
      throw std::invalid_argument(fmt::format("{}: {} must be {}, got {}", where, f.name, f.range.text(), v));
  };
  for (const auto& f : table)
    std::visit(Overloaded{
                   [&](int64_t C::*m) { number(f, c.*m); },
                   [&](uint64_t C::*m) { number(f, c.*m); },
                   [&](double C::*m) { number(f, c.*m); },
                   [](bool C::*) {},
                   [&](std::string C::*m) { check_text(f, c.*m, where); },
                   [](Options C::*) {},
               },
               f.member);
}

// The table as users read it (help texts), defaults from a default-constructed C.
template <class C>
std::vector<ConfigField> describe(const Table<C>& table) {
  const C defaults{};
  std::vector<ConfigField> out;
  for (const auto& f : table) {
    ConfigField d;
    d.name = set_name(f);
    d.help = f.help;
    if (!f.range.any()) d.help += " (" + f.range.text() + ")";
    std::visit(Overloaded{
                   [&](int64_t C::*m) { d.kind = "integer", d.default_value = std::to_string(defaults.*m); },
                   [&](uint64_t C::*m) { d.kind = "integer", d.default_value = std::to_string(defaults.*m); },
                   [&](double C::*m) { d.kind = "number", d.default_value = fmt::format("{}", defaults.*m); },
                   [&](bool C::*m) { d.kind = "boolean", d.default_value = defaults.*m ? "true" : "false"; },
                   [&](std::string C::*m) {
                     d.kind = f.choices.empty() ? "text" : fmt::format("{}", fmt::join(f.choices, "|"));
                     d.default_value = defaults.*m;
                   },
                   [&](Options C::*) { d.kind = "text"; },
               },
               f.member);
    out.push_back(std::move(d));
  }
  return out;
}

}  // namespace grape::config
