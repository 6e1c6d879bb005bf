// One row of an encoding's laws: what `grape check` prints and the tests assert. Filled by the generic laws
// (grape/check.hpp) and by each encoding's own (EncodingInfo::laws).
#pragma once

#include <string>

namespace grape::check {

struct LawResult {
  std::string encoding;
  std::string law;
  double error = 0.0;  // the measured deviation (max abs, or relative where the law says so)
  double tolerance = 0.0;
  bool passed = false;
};

}  // namespace grape::check
