// Shared by the model tests: a seeded model whose state-carrying parameters are moved off their init.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <map>
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

// The same with the decode and convention tests' seed and scale: moved well off the init (0.3).
inline Transformer perturbed_model(const ModelConfig& c) { return perturbed_model(c, 3, 0.3); }

// The decode tests' model: 2 layers, C = 48, 3 heads (D = 16), hidden 128 (8C/3), vocab 61, context 32: odd
// sizes reach the kernels' tails.
inline ModelConfig decode_test_config(const std::string& pe, std::map<std::string, std::string> opts = {},
                                      const std::string& qk_norm = "before_rotation") {
  ModelConfig c;
  c.preset = "test";
  c.vocab_size = 61;
  c.n_layer = 2;
  c.n_head = 3;
  c.n_embd = 48;
  c.context = 32;
  c.pe = pe;
  c.pe_options = std::move(opts);
  c.qk_norm = qk_norm;
  return c;
}

}  // namespace grape::testing
