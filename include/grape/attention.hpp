// Causal attention with a position encoding (owned by src/nn): the LibTorch-composed reference, the oracle
// of every faster path (src/nn/reference_attention.cpp), and the fused CPU kernels (src/kernels/cpu, bound
// in src/nn/fused_attention.cpp). `attend` is the one place that chooses between them.
#pragma once

#include <string>

#include "grape/pe.hpp"

namespace grape {

// Which attention computes softmax(logits) v: the fused kernels where they can, or always the reference.
enum class AttentionImpl { fused, reference };
// "fused" or "reference"; anything else throws std::invalid_argument naming the choices.
AttentionImpl parse_attention_impl(const std::string& name);

// y [B,Tq,H,D] of encoded queries against a cache, and with `average_stream` also E~ [B,Tq,H,D], the same
// attention weights applied to the keys' position states (keys.key["E"], for encodings that carry one).
struct Attended {
  torch::Tensor y;
  torch::Tensor stream;
};
// The fused kernels run when `impl` is fused, the encoding is fused_supported and q is float32; otherwise
// the reference path (materialised [B,H,Tq,Tk] weights, softmax in at least fp32).
Attended attend(const Encoding& enc, const PeTokens& queries, const KeyCache& keys, AttentionImpl impl,
                bool average_stream = false);

// ---- reference (composed of LibTorch ops) ------------------------------------------------------------

// Causal attention weights [B,H,Tq,Tk] from attention_logits, softmax in at least fp32, in v's dtype.
torch::Tensor attention_probabilities(const Encoding& enc, const PeTokens& queries, const KeyCache& keys);

// Full causal attention over one chunk starting at `state`: returns y [B,T,H,D].
torch::Tensor reference_attention(Encoding& enc, const torch::Tensor& q, const torch::Tensor& k,
                                  const torch::Tensor& v, const TokenContext& ctx, PeState& state);

// ---- fused (src/kernels/cpu) -------------------------------------------------------------------------

// Whether the fused kernels compute this encoding's attention: its declared kernel_bias is not unsupported.
bool fused_supported(const Encoding& enc);
// softmax(q~.k~/sqrt(D) + bias, causal) v of encoded queries against a cache, y [B,Tq,H,D], by the fused
// CPU kernel (float32; O(T) extra memory; differentiable w.r.t. q~, k~, v and the bias terms). Throws
// std::invalid_argument when the encoding is not supported or the tensors are not float32.
torch::Tensor fused_attend(const Encoding& enc, const PeTokens& queries, const KeyCache& keys);
// Same contract as reference_attention, with fused_attend in place of the composed softmax.
torch::Tensor fused_attention(Encoding& enc, const torch::Tensor& q, const torch::Tensor& k,
                              const torch::Tensor& v, const TokenContext& ctx, PeState& state);

}  // namespace grape
