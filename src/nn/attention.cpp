// Reference causal attention composed in LibTorch: the plain, materialised oracle that fused kernels and
// streaming decode are checked against.
#include <cmath>
#include <limits>

#include "grape/pe.hpp"

namespace grape {

torch::Tensor attention_logits(const Encoding& enc, const PeTokens& queries, const KeyCache& keys) {
  const double scale = 1.0 / std::sqrt(double(queries.q.size(-1)));
  auto [q, k] = enc.attention_qk(queries, keys);
  auto logits = torch::einsum("bihd,bjhd->bhij", {q, k}) * scale;
  auto b = enc.bias(queries, keys);
  if (b.defined()) logits = logits + b;
  auto qi = torch::arange(queries.offset, queries.offset + queries.length).unsqueeze(1);
  auto kj = torch::arange(keys.offset, keys.offset + keys.length).unsqueeze(0);
  return logits.masked_fill(kj > qi, -std::numeric_limits<double>::infinity());
}

torch::Tensor reference_attention(Encoding& enc, const torch::Tensor& q, const torch::Tensor& k,
                                  const torch::Tensor& v, const torch::Tensor& x, PeState& state) {
  auto tokens = enc.encode(q, k, x, state);
  auto keys = KeyCache::from(tokens, v);
  auto p = torch::softmax(attention_logits(enc, tokens, keys), -1);
  return torch::einsum("bhij,bjhd->bihd", {p, v});
}

}  // namespace grape
