// GRAPE-M contextual: rotations by a data-dependent phase. Each token contributes a step
// omega_t = sigmoid((w . x_t + b) / s) in (0, 1); the phase of token t is the exclusive sum
// Phi_t = sum_{tau < t} omega_tau, and q_t, k_t turn by Phi_t * theta_i. Logits depend on Phi_j - Phi_i.
#include <fmt/format.h>

#include <cmath>
#include <stdexcept>

#include "pe/families.hpp"
#include "pe/laws.hpp"

namespace grape {
namespace {

using namespace detail;

class GrapeMCtx : public Encoding {
 public:
  GrapeMCtx(const HeadShape& s, const PeOptions& o) : Encoding("grape-m-ctx", s), layout_(rotary_layout(o)) {
    require_even_head_dim(name_, s.head_dim);
    const double base = o.get_double("base", 10000.0);
    if (base <= 1.0) throw std::invalid_argument(fmt::format("grape-m-ctx: base must be > 1, got {}", base));
    gate_scale_ = o.get_double("gate_scale", 16.0);
    if (gate_scale_ <= 0.0)
      throw std::invalid_argument(fmt::format("grape-m-ctx: gate_scale must be > 0, got {}", gate_scale_));
    groups_ = o.get_bool("per_head", false) ? s.heads : 1;
    // w = 0 and b = softplus^-1(1e-3) as the authors' code: every step starts at sigmoid(b/16) = 0.3937.
    w_ = register_parameter("w_omega", torch::zeros({groups_, s.model_dim}));
    b_ = register_parameter("b_omega", torch::full({groups_}, float(std::log(std::expm1(1e-3)))));
    lambda_ = register_parameter(
        "lambda", rope_log_theta(s.head_dim, base).to(torch::kFloat32));  // theta = exp(lambda)
  }
  Properties properties() const override {
    Properties p;
    p.rotates = p.contextual = p.phase_relative = p.qk_norm_after_encode = true;
    return p;
  }
  PeState initial_state(int64_t batch, int64_t offset) const override {
    auto st = Encoding::initial_state(batch, offset);
    running_sum(st, "phi", batch, groups_, name_);
    return st;
  }

 protected:
  PeTokens encode_chunk(const torch::Tensor& q, const torch::Tensor& k, const TokenContext& ctx,
                        PeState& st) override {
    const torch::Tensor& x = ctx.x;
    const int64_t B = q.size(0), T = q.size(1);
    auto& phi0 = running_sum(st, "phi", B, groups_, name_);
    auto omega = torch::sigmoid((torch::einsum("btc,gc->btg", {x, w_}) + b_) / gate_scale_);  // [B,T,G]
    auto cum = torch::cumsum(omega.to(torch::kFloat64), 1);  // float64 sum: the phase grows ~0.4 per token
    auto phi = phi0.unsqueeze(1) + (cum - omega.to(torch::kFloat64));  // exclusive: Phi_t excludes omega_t
    auto ang = phi.unsqueeze(-1) * torch::exp(lambda_.to(torch::kFloat64));  // [B,T,G,P]
    phi0 = phi0 + cum.select(1, T - 1);
    return {rotate_pairs(q, ang, layout_.pairing, layout_.sign),
            rotate_pairs(k, ang, layout_.pairing, layout_.sign)};
  }

 private:
  RotaryLayout layout_;
  double gate_scale_;
  int64_t groups_;
  torch::Tensor w_, b_, lambda_;
};

void grape_m_ctx_laws(LawTable& t) {
  using namespace laws;
  const auto f64 = torch::kFloat64;
  const uint64_t seed = t.seed;
  auto in = random_inputs(f64, seed);
  auto fresh = [&](const std::string& name, PeOptions o = {}) { return build(name, f64, seed, o, false); };
  // w = 0: every step is c = sigmoid(b/16), so the phase is c*n: RoPE with frequencies scaled by c.
  auto ctx = fresh("grape-m-ctx");
  const double c = 1.0 / (1.0 + std::exp(-param(ctx, "b_omega").item<double>() / 16.0));
  auto st = ctx->initial_state(kBatch, 0);
  auto tok = ctx->encode(in.q, in.k, in.x, st);
  auto theta = torch::exp(param(ctx, "lambda").detach());
  auto ang = (torch::arange(kLen, f64) * c).view({1, kLen, 1, 1}) * theta;
  t.add("w=0 == rope with theta*sigmoid(b/16)", max_diff(tok.q, rotate_pairs(in.q, ang, "half")), 1e-12);
}

void add_contextual(std::vector<EncodingInfo>& out) {
  auto opts =
      std::vector<OptionSpec>{{"base", "10000", "RoPE base of the initial frequencies"},
                              {"per_head", "false", "one phase per head instead of one shared by all heads"},
                              {"gate_scale", "16", "s in omega_t = sigmoid((w.x_t + b)/s)"}};
  for (auto& l : rotary_layout_options()) opts.push_back(l);
  out.push_back({"grape-m-ctx",
                 "multiplicative",
                 "GRAPE-M contextual: rotate by a phase Phi_t = sum_{tau<t} sigmoid((w.x_tau+b)/16)",
                 opts,
                 {"w_omega  [1 or H, C]  init 0", "b_omega  [1 or H]  init softplus^-1(1e-3) = -6.9072552",
                  "lambda  [D/2]  init log(base^(-2i/D)), theta = exp(lambda)"},
                 [](const HeadShape& s, const PeOptions& o) { return std::make_shared<GrapeMCtx>(s, o); },
                 grape_m_ctx_laws});
}

const detail::Registration contextual_registration(add_contextual);

}  // namespace
}  // namespace grape
