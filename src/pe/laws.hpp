// Internal: the shared inputs and comparisons of the laws `grape check` runs. The generic laws (relative
// law, norms, causality, streaming, gradients) live in src/check/laws.cpp; each family file adds its own
// reductions (EncodingInfo::laws) with these helpers, next to the encoding they are about.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "grape/law_result.hpp"
#include "grape/pe.hpp"

namespace grape {

// The rows of one encoding's laws, filled by the generic laws and then by EncodingInfo::laws.
struct LawTable {
  std::string encoding;
  uint64_t seed = 0;
  std::vector<check::LawResult> rows;
  void add(const std::string& law, double err, double tol) {
    rows.push_back({encoding, law, err, tol, err <= tol});
  }
};

namespace laws {

// Small but awkward sizes: odd T, H = 3 (ALiBi's non-power-of-two path), D = 12, C = 16.
inline const HeadShape kShape{3, 12, 16};
inline constexpr int64_t kBatch = 2, kLen = 13;

struct Inputs {
  torch::Tensor q, k, v, x;
};

// q, k, v [kBatch,T,H,D] and x [kBatch,T,C], standard normal (drawn in float64, then cast) for `seed`.
Inputs random_inputs(torch::ScalarType dtype, uint64_t seed, int64_t T = kLen);

// The same encoding for the same seed: init, then (perturb) a seeded N(0, 0.3^2) move of every parameter.
EncodingPtr build(const std::string& name, torch::ScalarType dtype, uint64_t seed, const PeOptions& opts = {},
                  bool perturb = true);

// Max |a - b| over entries finite in both; infinite if the -inf patterns differ.
double max_diff(const torch::Tensor& a, const torch::Tensor& b);

// Causal logits of the inputs encoded from position `offset` (phase_shift is added to the state's "phi").
torch::Tensor logits_at(Encoding& e, const Inputs& in, int64_t offset, double phase_shift = 0.0);

// Logit difference between two encodings (or one with two option sets) on the same inputs.
double logits_gap(const EncodingPtr& a, const EncodingPtr& b, const Inputs& in, int64_t offset = 0);

// ALiBi logits (fp64, from position 0) whose slopes are multiplied per head by `factor` [H].
torch::Tensor scaled_alibi_logits(const torch::Tensor& factor, const Inputs& in);

// The parameter `name` of an encoding (a reference to it: tests zero or copy into it under NoGradGuard).
torch::Tensor param(const EncodingPtr& e, const std::string& name);

}  // namespace laws
}  // namespace grape
