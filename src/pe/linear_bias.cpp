// Additive biases linear in the distance: ALiBi, bias = -m_h (i - j), and GRAPE-A, whose slope is gated
// by the query (Q), the key (K) or both (QK): bias = -(i - j) omega_h (gq_i + gk_j).
#include <fmt/format.h>

#include <cmath>
#include <stdexcept>

#include "pe/families.hpp"
#include "pe/laws.hpp"

namespace grape {

std::vector<double> alibi_slopes(int64_t heads) {
  if (heads < 1) throw std::invalid_argument(fmt::format("alibi: heads must be >= 1, got {}", heads));
  auto pow2 = [](int64_t n) {  // the geometric schedule 2^(-8h/n), h = 1..n
    std::vector<double> s;
    for (int64_t h = 1; h <= n; ++h) s.push_back(std::pow(2.0, -8.0 * double(h) / double(n)));
    return s;
  };
  int64_t p = 1;
  while (p * 2 <= heads) p *= 2;
  auto s = pow2(p);
  if (p < heads) {  // not a power of two: interleave slopes of the 2p schedule (every other one)
    auto extra = pow2(2 * p);
    for (int64_t i = 0; int64_t(s.size()) < heads; i += 2) s.push_back(extra[i]);
  }
  return s;
}

namespace {

using namespace detail;

torch::Tensor slopes_tensor(int64_t heads) {
  auto s = alibi_slopes(heads);
  return torch::tensor(s, torch::kFloat64).to(torch::kFloat32);
}

class ALiBi : public Encoding {
 public:
  ALiBi(const HeadShape& s, const PeOptions&) : Encoding("alibi", s) {
    slopes_ = register_buffer("slopes", slopes_tensor(s.heads));
  }
  Properties properties() const override {
    Properties p;
    p.has_bias = p.relative = p.qk_norm_after_encode = true;
    p.kernel_bias = KernelBias::linear;
    return p;
  }
  torch::Tensor bias(const PeTokens& queries, const KeyCache& keys) const override {
    auto dist = distance(queries, keys, slopes_.scalar_type());
    return -(slopes_.view({1, -1, 1, 1}) * dist.unsqueeze(0).unsqueeze(0));
  }
  BiasTerms bias_terms(const PeTokens& queries, const KeyCache&) const override {
    BiasTerms out;
    out.c = (-slopes_).view({1, -1, 1}).expand({queries.q.size(0), -1, queries.length});
    return out;
  }
  std::optional<PositionalForm> positional_form() const override {
    PositionalForm f;
    f.slope = (-slopes_).to(torch::kFloat32).contiguous();
    return f;
  }

 protected:
  PeTokens encode_chunk(const torch::Tensor& q, const torch::Tensor& k, const TokenContext&,
                        PeState&) override {
    return {q, k};
  }

 private:
  torch::Tensor slopes_;
};

// GRAPE-A as the authors' code: omega_h = softplus(rho_h) m_h; gates softplus(u_hat . k / sqrt(D)) on the
// QK-normalised q and k with L2-normalised directions.
class GrapeA : public Encoding {
 public:
  GrapeA(const HeadShape& s, const PeOptions&, bool query_gate, bool key_gate, std::string name)
      : Encoding(std::move(name), s), query_gate_(query_gate), key_gate_(key_gate) {
    slopes_ = register_buffer("slopes", slopes_tensor(s.heads));
    rho_ = register_parameter("rho", torch::full({s.heads}, float(std::log(std::expm1(1.0)))));
    const double sd = 1.0 / std::sqrt(double(s.head_dim));
    if (query_gate_) v_ = register_parameter("v", torch::randn({s.heads, s.head_dim}) * sd);
    if (key_gate_) u_ = register_parameter("u", torch::randn({s.heads, s.head_dim}) * sd);
  }
  Properties properties() const override {
    Properties p;
    p.has_bias = p.relative = true;  // not qk_norm_after_encode: the gates read q and k in encode
    p.kernel_bias = KernelBias::linear;
    return p;
  }
  torch::Tensor omega() const { return torch::softplus(rho_) * slopes_; }  // [H]
  torch::Tensor bias(const PeTokens& queries, const KeyCache& keys) const override {
    auto dist = distance(queries, keys, rho_.scalar_type()).unsqueeze(0).unsqueeze(0);  // [1,1,Tq,Tk]
    torch::Tensor gate;                                                                 // [B,H,Tq,Tk]
    if (query_gate_) gate = queries.query.at("gq").permute({0, 2, 1}).unsqueeze(-1);
    if (key_gate_) {
      auto gk = keys.key.at("gk").permute({0, 2, 1}).unsqueeze(-2);
      gate = gate.defined() ? gate + gk : gk;
    }
    return -(omega().view({1, -1, 1, 1}) * dist * gate);
  }
  BiasTerms bias_terms(const PeTokens& queries, const KeyCache& keys) const override {
    BiasTerms out;
    auto w = omega().view({1, -1, 1});
    if (query_gate_) out.c = -(w * queries.query.at("gq").permute({0, 2, 1}));  // [B,H,Tq]
    if (key_gate_) out.d = -(w * keys.key.at("gk").permute({0, 2, 1}));         // [B,H,Tk]
    return out;
  }

 protected:
  static torch::Tensor gate(const torch::Tensor& x, const torch::Tensor& dir) {  // [B,T,H]
    auto unit = dir / torch::clamp_min(dir.norm(2, -1, true), 1e-6);
    return torch::softplus(torch::einsum("bthd,hd->bth", {x, unit}) / std::sqrt(double(x.size(-1))));
  }
  PeTokens encode_chunk(const torch::Tensor& q, const torch::Tensor& k, const TokenContext&,
                        PeState&) override {
    PeTokens out{q, k};
    if (query_gate_) out.query["gq"] = gate(q, v_);
    if (key_gate_) out.key["gk"] = gate(k, u_);
    return out;
  }

 private:
  bool query_gate_, key_gate_;
  torch::Tensor slopes_, rho_, u_, v_;
};

void grape_a_laws(LawTable& t) {
  using namespace laws;
  const auto f64 = torch::kFloat64;
  const uint64_t seed = t.seed;
  const std::string& n = t.encoding;
  auto in = random_inputs(f64, seed);
  // Zero gate directions: every gate is softplus(0) = ln 2, so this is ALiBi with slopes ln2 softplus(rho)
  // m.
  auto e = build(n, f64, seed);
  {
    torch::NoGradGuard ng;
    for (auto& p : e->named_parameters())
      if (p.key() == "u" || p.key() == "v") p.value().zero_();
  }
  const double gates = n == "grape-a-qk" ? 2.0 : 1.0;
  auto factor = torch::softplus(param(e, "rho").detach()) * std::log(2.0) * gates;
  t.add("constant gates == alibi", max_diff(logits_at(*e, in, 0), scaled_alibi_logits(factor, in)), 1e-12);
}

void add_linear_bias(std::vector<EncodingInfo>& out) {
  out.push_back({"alibi",
                 "additive",
                 "ALiBi: bias -m_h (i - j) with the standard slope schedule",
                 {},
                 {},
                 [](const HeadShape& s, const PeOptions& o) { return std::make_shared<ALiBi>(s, o); }});
  const std::string rho = "rho  [H]  init softplus^-1(1) = 0.5413249 (omega_h = softplus(rho_h) m_h)";
  const std::string v = "v  [H, D]  init N(0, 1/D) (query-gate direction, L2-normalised)";
  const std::string u = "u  [H, D]  init N(0, 1/D) (key-gate direction, L2-normalised)";
  out.push_back({"grape-a-q",
                 "additive",
                 "GRAPE-A query-gated: bias -(i-j) omega_h softplus(v.q_i/sqrt(D))",
                 {},
                 {rho, v},
                 [](const HeadShape& s, const PeOptions& o) {
                   return std::make_shared<GrapeA>(s, o, true, false, "grape-a-q");
                 },
                 grape_a_laws});
  out.push_back({"grape-a-k",
                 "additive",
                 "GRAPE-A key-gated: bias -(i-j) omega_h softplus(u.k_j/sqrt(D))",
                 {},
                 {rho, u},
                 [](const HeadShape& s, const PeOptions& o) {
                   return std::make_shared<GrapeA>(s, o, false, true, "grape-a-k");
                 },
                 grape_a_laws});
  out.push_back({"grape-a-qk",
                 "additive",
                 "GRAPE-A query-key-gated: bias -(i-j) omega_h (gq_i + gk_j)",
                 {},
                 {rho, v, u},
                 [](const HeadShape& s, const PeOptions& o) {
                   return std::make_shared<GrapeA>(s, o, true, true, "grape-a-qk");
                 },
                 grape_a_laws});
}

const detail::Registration linear_bias_registration(add_linear_bias);

}  // namespace
}  // namespace grape
