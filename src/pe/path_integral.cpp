// GRAPE-AP, path-integral additive GRAPE: bias(t, j) = sum_{l=j+1..t} psi(t, l) with the endpoint-dependent
// edge potential psi(t, l) = m_h logsigmoid(p_t . R_l p_hat_l / P), p = W_p x per head (P dims), p_hat its
// parameter-free RMS norm, R_l a half-split rotation by l (all frequencies 1).
#include <fmt/format.h>

#include <cmath>
#include <stdexcept>

#include "pe/families.hpp"
#include "pe/laws.hpp"

namespace grape {

torch::Tensor path_sum_bias(const torch::Tensor& psi, int64_t q_offset, int64_t k_offset) {
  const int64_t Tq = psi.size(-2), Tk = psi.size(-1);
  auto qi = torch::arange(q_offset, q_offset + Tq).unsqueeze(1);
  auto kl = torch::arange(k_offset, k_offset + Tk).unsqueeze(0);
  auto on_path = psi.masked_fill(kl > qi, 0.0);  // nodes past the query are not on any path
  // suffix[j] = sum_{l >= j} psi(t, l); the bias of key j excludes node j itself, so take suffix[j + 1].
  auto suffix = torch::flip(torch::cumsum(torch::flip(on_path, {-1}), -1), {-1});
  auto zero = torch::zeros_like(suffix.narrow(-1, 0, 1));
  return torch::cat({suffix.narrow(-1, 1, Tk - 1), zero}, -1);
}

namespace {

using namespace detail;

class GrapeAP : public Encoding {
 public:
  GrapeAP(const HeadShape& s, const PeOptions& o) : Encoding("grape-ap", s), layout_(rotary_layout(o)) {
    probe_ = o.get_int("probe_dim", 8);
    eps_ = o.get_double("eps", 1e-6);
    if (probe_ < 2 || probe_ % 2 != 0)
      throw std::invalid_argument(fmt::format("grape-ap: probe_dim must be even and >= 2, got {}", probe_));
    if (eps_ <= 0.0) throw std::invalid_argument(fmt::format("grape-ap: eps must be > 0, got {}", eps_));
    auto slopes = alibi_slopes(s.heads);
    slopes_ = register_buffer("slopes", torch::tensor(slopes, torch::kFloat64).to(torch::kFloat32));
    w_p_ = register_parameter("w_p", linear_init({s.heads * probe_, s.model_dim}, s.model_dim));
  }
  Properties properties() const override {
    Properties p;
    p.has_bias = p.contextual = true;  // not translation invariant: psi rotates with the key position
    p.qk_norm_after_encode = true;
    p.kernel_bias = KernelBias::path_sum;
    return p;
  }
  std::optional<PositionalForm> positional_form() const override {
    PositionalForm f;  // the decode engine computes the probes itself from w_p
    f.probe_w = w_p_;
    f.probe_slope = slopes_;
    f.probe_eps = eps_;
    f.probe_sign = layout_.sign;
    return f;
  }
  torch::Tensor bias(const PeTokens& queries, const KeyCache& keys) const override {
    auto s = torch::einsum("bihp,bjhp->bhij", {queries.query.at("p"), keys.key.at("r")}) / double(probe_);
    auto psi = slopes_.view({1, -1, 1, 1}) * torch::log_sigmoid(s);
    return path_sum_bias(psi, queries.offset, keys.offset);
  }
  // The fused kernels compute the same path sum per tile from the probes and slopes.
  BiasTerms bias_terms(const PeTokens& queries, const KeyCache& keys) const override {
    BiasTerms out;
    out.p = queries.query.at("p");
    out.r = keys.key.at("r");
    out.m = slopes_;
    return out;
  }

 protected:
  PeTokens encode_chunk(const torch::Tensor& q, const torch::Tensor& k, const TokenContext& ctx,
                        PeState& st) override {
    const torch::Tensor& x = ctx.x;
    const int64_t B = x.size(0), T = x.size(1);
    // One [B*T, C] x [C, H*P] product (matmul folds the batch; einsum took a bmm and permutes), and the
    // norm by the RMSNorm kernel (unit gain) where it applies, in place of five composed ops each way.
    auto p = torch::matmul(x, w_p_.t()).view({B, T, shape_.heads, probe_});
    auto p_hat = rms_norm(p, torch::ones({probe_}, p.options()), eps_, /*fused=*/true);
    auto ang = positions_f64(st.next_pos, T).view({1, T, 1, 1}).expand({1, T, 1, probe_ / 2});
    PeTokens out{q, k};
    out.query["p"] = p;  // the query side uses the raw probe, as the authors' code
    out.key["r"] = rotate_pairs(p_hat, ang, "half", layout_.sign);
    return out;
  }

 private:
  RotaryLayout layout_;
  int64_t probe_;
  double eps_;
  torch::Tensor slopes_, w_p_;
};

void grape_ap_laws(LawTable& t) {
  using namespace laws;
  const auto f64 = torch::kFloat64;
  const uint64_t seed = t.seed;
  auto in = random_inputs(f64, seed);
  // W_p = 0: p = 0, psi = -ln2 m_h: ALiBi with slopes ln2 m_h.
  auto e = build("grape-ap", f64, seed);
  {
    torch::NoGradGuard ng;
    param(e, "w_p").zero_();
  }
  t.add("W_p=0 == alibi(ln2 m)",
        max_diff(logits_at(*e, in, 0),
                 scaled_alibi_logits(torch::full({kShape.heads}, std::log(2.0), f64), in)),
        1e-12);
}

void add_path_integral(std::vector<EncodingInfo>& out) {
  out.push_back({"grape-ap",
                 "additive",
                 "GRAPE-AP path integral: bias sum_{l=j+1..t} m_h logsigmoid(p_t . R_l p_hat_l / P)",
                 {{"probe_dim", "8", "P: probe dimension per head (even)"},
                  {"eps", "1e-6", "epsilon of the probe's RMS norm"},
                  {"orientation", "standard", "turn direction of R_l (standard|grape)"}},
                 {"w_p  [H*P, C]  init N(0, (0.5/sqrt(C))^2)"},
                 [](const HeadShape& s, const PeOptions& o) { return std::make_shared<GrapeAP>(s, o); },
                 grape_ap_laws});
}

const detail::Registration path_integral_registration(add_path_integral);

}  // namespace
}  // namespace grape
