// KV-shift: k_t = alpha_t k_raw_{t-1} + (1 - alpha_t) k_raw_t per head, alpha_t = sigmoid(w_h . x_t), and the
// same for v with its own gate. Applied to the raw projections, before any encoding, so it composes with all.
#include <fmt/format.h>

#include <stdexcept>

#include "pe/families.hpp"

namespace grape {

KVShiftImpl::KVShiftImpl(HeadShape s) : shape(s) {
  w_k = register_parameter("w_k", detail::linear_init({s.heads, s.model_dim}, s.model_dim));
  w_v = register_parameter("w_v", detail::linear_init({s.heads, s.model_dim}, s.model_dim));
}

std::pair<torch::Tensor, torch::Tensor> KVShiftImpl::forward(const torch::Tensor& k_raw,
                                                             const torch::Tensor& v_raw,
                                                             const torch::Tensor& x, KVShiftState& state) {
  if (k_raw.dim() != 4 || !k_raw.sizes().equals(v_raw.sizes()) || k_raw.size(2) != shape.heads)
    throw std::invalid_argument("kv-shift: k and v must both be [B,T,H,D] with H = " +
                                std::to_string(shape.heads));
  if (x.dim() != 3 || x.size(0) != k_raw.size(0) || x.size(1) != k_raw.size(1) ||
      x.size(2) != shape.model_dim)
    throw std::invalid_argument(fmt::format("kv-shift: x must be [B,T,C={}] matching k", shape.model_dim));
  auto mix = [&](const torch::Tensor& raw, const torch::Tensor& w, torch::Tensor& prev) {
    auto alpha = torch::sigmoid(torch::einsum("btc,hc->bth", {x, w})).unsqueeze(-1);  // [B,T,H,1]
    auto first = prev.defined() ? prev.unsqueeze(1) : torch::zeros_like(raw.narrow(1, 0, 1));
    auto shifted = torch::cat({first, raw.narrow(1, 0, raw.size(1) - 1)}, 1);  // raw of token t-1
    prev = raw.select(1, raw.size(1) - 1);
    return alpha * shifted + (1.0 - alpha) * raw;
  };
  auto k = mix(k_raw, w_k, state.k_prev);
  auto v = mix(v_raw, w_v, state.v_prev);
  return {k, v};
}

}  // namespace grape
