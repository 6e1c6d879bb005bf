// Shared by the model tests: a seeded model whose state-carrying parameters are moved off their init.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <string>

#include "grape/model.hpp"

namespace grape::testing {

// The model of `c`, seeded, with its norm gains and every encoding / KV-shift parameter moved off its init
// by N(0, scale^2) noise: degenerate inits (zero tables, unit gains, equal frequencies) would hide a bug in
// how state is carried or where QK-norm acts. The dense weights keep their init.
inline Transformer perturbed_model(const ModelConfig& c, uint64_t seed, double scale) {
  torch::manual_seed(int64_t(seed));
  Transformer m(c);
  torch::NoGradGuard no_grad;
  for (auto& item : m->named_parameters()) {
    const auto& name = item.key();
    const bool moved = name.find("norm") != std::string::npos || name.find("pe.") != std::string::npos ||
                       name.find("kv_shift.") != std::string::npos;
    if (moved) item.value().add_(torch::randn_like(item.value()) * scale);
  }
  return m;
}

}  // namespace grape::testing
