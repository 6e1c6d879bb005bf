// Reference causal attention composed in LibTorch: the plain, materialised oracle that fused kernels and
// streaming decode are checked against, and the one place that picks fused or reference (attend).
#include <fmt/format.h>

#include <stdexcept>

#include "grape/attention.hpp"

namespace grape {
namespace {

// Reduced-precision values are averaged with fp32 weights; fp32 and fp64 stay as they are.
torch::ScalarType softmax_dtype(torch::ScalarType t) {
  return (t == torch::kHalf || t == torch::kBFloat16) ? torch::kFloat32 : t;
}

torch::Tensor weighted(const torch::Tensor& p, const torch::Tensor& values) {
  return torch::einsum("bhij,bjhd->bihd", {p, values});
}

}  // namespace

AttentionImpl parse_attention_impl(const std::string& name) {
  if (name == "fused") return AttentionImpl::fused;
  if (name == "reference") return AttentionImpl::reference;
  throw std::invalid_argument(fmt::format("attention '{}' must be fused or reference", name));
}

torch::Tensor attention_probabilities(const Encoding& enc, const PeTokens& queries, const KeyCache& keys) {
  auto logits = attention_logits(enc, queries, keys);
  return torch::softmax(logits, -1, softmax_dtype(keys.v.scalar_type())).to(keys.v.scalar_type());
}

torch::Tensor reference_attention(Encoding& enc, const torch::Tensor& q, const torch::Tensor& k,
                                  const torch::Tensor& v, const TokenContext& ctx, PeState& state) {
  auto tokens = enc.encode(q, k, ctx, state);
  auto keys = KeyCache::from(tokens, v);
  return weighted(torch::softmax(attention_logits(enc, tokens, keys), -1), v);
}

Attended attend(const Encoding& enc, const PeTokens& queries, const KeyCache& keys, AttentionImpl impl,
                bool average_stream) {
  const bool fused =
      impl == AttentionImpl::fused && fused_supported(enc) && queries.q.scalar_type() == torch::kFloat32;
  Attended out;
  if (fused) {  // a second kernel call averages the states (both are [B,T,H,D] values)
    out.y = fused_attend(enc, queries, keys);
    if (average_stream) {
      KeyCache stream_keys = keys;
      stream_keys.v = keys.key.at("E");
      out.stream = fused_attend(enc, queries, stream_keys);
    }
    return out;
  }
  auto p = attention_probabilities(enc, queries, keys);  // formed once for both averages
  out.y = weighted(p, keys.v);
  if (average_stream) out.stream = weighted(p, keys.key.at("E"));
  return out;
}

}  // namespace grape
