// Range checks for numeric options. CLI11's PositiveNumber and NonNegativeNumber print their bounds with
// std::to_string, so `--lr -1` answered with a 309-digit number; these say what the value must be.
#pragma once

#include <CLI/CLI.hpp>
#include <string>

namespace grape::cli {

// A number > 0 (strict) or >= 0; the message names the bound and the text given.
inline CLI::Validator number_check(bool strict, const std::string& name) {
  return CLI::Validator(
      [strict](std::string& text) -> std::string {
        double v = 0;
        if (CLI::detail::lexical_cast(text, v) && (strict ? v > 0 : v >= 0)) return {};
        return std::string("must be a number ") + (strict ? "> 0" : ">= 0") + ", got '" + text + "'";
      },
      "", name);
}

inline const CLI::Validator kPositive = number_check(true, "POSITIVE");
inline const CLI::Validator kNonNegative = number_check(false, "NONNEGATIVE");

}  // namespace grape::cli
