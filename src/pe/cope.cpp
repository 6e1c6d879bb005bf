// CoPE, contextual position encoding: positions are counted by gates instead of tokens.
//   g_ij = sigmoid(q_i . k_j / sqrt(D)) for j <= i (0 for later keys)
//   p_ij = min(sum_{t=j..i} g_it, p_max - 1)            (a reverse cumulative sum along the keys)
//   bias(i, j) = q_i . e[p_ij], e linearly interpolated between e[floor p] and e[ceil p]
// The bias is formed as z_i[p] = q_i . e[p] for the p_max integer positions, then gathered and interpolated,
// so the [Tq,Tk,D] tensor of interpolated vectors is never built. Every query row needs all of its gates
// before the softmax, so the fused single-pass kernel cannot compute it (the model uses the reference path).
#include <fmt/format.h>

#include <cmath>
#include <stdexcept>

#include "pe/families.hpp"
#include "pe/laws.hpp"

namespace grape {
namespace {

class CoPE : public Encoding {
 public:
  CoPE(const HeadShape& s, const PeOptions& o) : Encoding("cope", s) {
    p_max_ = o.get_int("p_max", 64);
    const bool per_head = o.get_bool("per_head", false);
    if (p_max_ < 1) throw std::invalid_argument(fmt::format("cope: p_max must be >= 1, got {}", p_max_));
    // Zeros: the model starts as NoPE (causal mask only), as the authors' init.
    e_ = register_parameter("e", torch::zeros({per_head ? s.heads : 1, p_max_, s.head_dim}));
  }
  Properties properties() const override {
    Properties p;
    // Positions enter only through the causal mask, so shifting all of them changes nothing: relative.
    p.has_bias = p.relative = p.signed_bias = true;
    p.qk_norm_after_encode = true;            // its gates read the q~, k~ of the dot product (attention_qk)
    p.kernel_bias = KernelBias::unsupported;  // a query's gates sum over its whole row before the softmax
    return p;
  }
  torch::Tensor bias(const PeTokens& queries, const KeyCache& keys) const override {
    auto [q, k] = attention_qk(queries, keys);  // [B,Tq,H,D], [B,Tk,H,D]
    const double scale = 1.0 / std::sqrt(double(q.size(-1)));
    auto qi = torch::arange(queries.offset, queries.offset + queries.length).unsqueeze(1);
    auto kj = torch::arange(keys.offset, keys.offset + keys.length).unsqueeze(0);
    auto gates = torch::sigmoid(torch::einsum("bihd,bjhd->bhij", {q, k}) * scale).masked_fill(kj > qi, 0.0);
    // p_ij = sum over keys t >= j of row i (later keys are gated 0): a reverse cumulative sum. Recomputed
    // for every query over the whole cache, so decoding needs no state beyond the cached keys.
    auto p = gates.flip(-1).cumsum(-1).flip(-1).clamp_max(double(p_max_ - 1));  // [B,H,Tq,Tk]
    auto z = e_.size(0) == 1 ? torch::einsum("bihd,pd->bhip", {q, e_[0]})       // shared table
                             : torch::einsum("bihd,hpd->bhip", {q, e_});        // [B,H,Tq,p_max]
    auto lo = p.detach().floor(), hi = p.detach().ceil();
    auto w = p - lo;  // the gradient to the gates flows through the interpolation weight
    auto z_lo = z.gather(-1, lo.to(torch::kLong)), z_hi = z.gather(-1, hi.to(torch::kLong));
    return z_lo * (1.0 - w) + z_hi * w;
  }

 protected:
  PeTokens encode_chunk(const torch::Tensor& q, const torch::Tensor& k, const TokenContext&,
                        PeState&) override {
    return {q, k};
  }

 private:
  int64_t p_max_;
  torch::Tensor e_;
};

void cope_laws(LawTable& t) {
  using namespace laws;
  const auto f64 = torch::kFloat64;
  const uint64_t seed = t.seed;
  auto in = random_inputs(f64, seed);
  auto fresh = [&](const std::string& name, PeOptions o = {}) { return build(name, f64, seed, o, false); };
  auto e = build("cope", f64, seed);
  {
    torch::NoGradGuard ng;
    param(e, "e").zero_();
  }
  t.add("e = 0 == nope", logits_gap(e, fresh("nope"), in, 5), 0.0);
}

void add_cope(std::vector<EncodingInfo>& out) {
  out.push_back(
      {"cope",
       "additive",
       "CoPE: bias q_i.e[p_ij], p_ij = sum_{t=j..i} sigmoid(q_i.k_t/sqrt(D)) (counts gated tokens)",
       {{"p_max", "64", "number of learned position vectors; p is clamped to p_max - 1 (>= 1)"},
        {"per_head", "false", "one table e per head (default: one shared by the heads, as the authors)"}},
       {"e  [1 or H, p_max, D]  init 0 (starts as nope)"},
       [](const HeadShape& s, const PeOptions& o) { return std::make_shared<CoPE>(s, o); },
       cope_laws});
}

const detail::Registration cope_registration(add_cope);

}  // namespace
}  // namespace grape
