// The shared inputs and comparisons of the encodings' laws (see laws.hpp).
#include "pe/laws.hpp"

#include <cmath>
#include <limits>

namespace grape::laws {

Inputs random_inputs(torch::ScalarType dtype, uint64_t seed, int64_t T) {
  torch::manual_seed(seed);
  auto o = torch::TensorOptions().dtype(torch::kFloat64);
  Inputs in{torch::randn({kBatch, T, kShape.heads, kShape.head_dim}, o),
            torch::randn({kBatch, T, kShape.heads, kShape.head_dim}, o),
            torch::randn({kBatch, T, kShape.heads, kShape.head_dim}, o),
            torch::randn({kBatch, T, kShape.model_dim}, o)};
  return {in.q.to(dtype), in.k.to(dtype), in.v.to(dtype), in.x.to(dtype)};
}

EncodingPtr build(const std::string& name, torch::ScalarType dtype, uint64_t seed, const PeOptions& opts,
                  bool perturb) {
  torch::manual_seed(seed + 7);
  auto e = make_encoding(name, kShape, opts);
  if (perturb) {
    torch::NoGradGuard ng;
    for (auto& p : e->parameters()) p.add_(torch::randn_like(p) * 0.3);
  }
  e->to(dtype);
  return e;
}

double max_diff(const torch::Tensor& a, const torch::Tensor& b) {
  auto fa = torch::isfinite(a), fb = torch::isfinite(b);
  if (!torch::equal(fa, fb)) return std::numeric_limits<double>::infinity();
  auto d = torch::where(fa, a.to(torch::kFloat64) - b.to(torch::kFloat64), torch::zeros({}, torch::kFloat64));
  return d.numel() ? d.abs().max().item<double>() : 0.0;
}

torch::Tensor logits_at(Encoding& e, const Inputs& in, int64_t offset, double phase_shift) {
  auto st = e.initial_state(in.q.size(0), offset);
  if (phase_shift != 0.0) st.values["phi"] = st.values["phi"] + phase_shift;
  auto tok = e.encode(in.q, in.k, in.x, st);
  return attention_logits(e, tok, KeyCache::from(tok));
}

double logits_gap(const EncodingPtr& a, const EncodingPtr& b, const Inputs& in, int64_t offset) {
  return max_diff(logits_at(*a, in, offset), logits_at(*b, in, offset));
}

torch::Tensor scaled_alibi_logits(const torch::Tensor& factor, const Inputs& in) {
  auto alibi = make_encoding("alibi", kShape);
  alibi->to(torch::kFloat64);
  auto st = alibi->initial_state(kBatch, 0);
  auto tok = alibi->encode(in.q, in.k, in.x, st);
  auto keys = KeyCache::from(tok);
  auto plain = torch::einsum("bihd,bjhd->bhij", {tok.q, tok.k}) / std::sqrt(double(kShape.head_dim));
  auto b = alibi->bias(tok, keys) * factor.view({1, -1, 1, 1});
  auto qi = torch::arange(kLen).unsqueeze(1), kj = torch::arange(kLen).unsqueeze(0);
  return (plain + b).masked_fill(kj > qi, -std::numeric_limits<double>::infinity());
}

torch::Tensor param(const EncodingPtr& e, const std::string& name) { return e->named_parameters()[name]; }

}  // namespace grape::laws
