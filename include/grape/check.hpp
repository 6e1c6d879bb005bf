// The laws every encoding must obey, checked on random inputs: `grape check` prints them, the tests assert
// them.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "grape/law_result.hpp"

namespace grape::check {

// Runs every law that applies to `encoding` (see docs/encodings.md, "How it is tested"). Learnable
// parameters are perturbed away from their init first, so laws are not checked only at a special point.
std::vector<LawResult> run_laws(const std::string& encoding, uint64_t seed = 1234);

}  // namespace grape::check
