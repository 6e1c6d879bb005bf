// FoX, the Forgetting Transformer's forget gate, as additive GRAPE: log f_t = logsigmoid(w_h . x_t + b_h),
// c_t = sum_{l <= t} log f_l, bias(i, j) = c_i - c_j = sum_{l=j+1..i} log f_l <= 0.
#include <fmt/format.h>

#include <stdexcept>

#include "pe/families.hpp"
#include "pe/laws.hpp"

namespace grape {
namespace {

using namespace detail;

class FoX : public Encoding {
 public:
  FoX(const HeadShape& s, const PeOptions&) : Encoding("fox", s) {
    w_ = register_parameter("w_f", linear_init({s.heads, s.model_dim}, s.model_dim));
    b_ = register_parameter("b_f", torch::zeros({s.heads}));  // f = 0.5 at init
  }
  Properties properties() const override {
    Properties p;
    p.has_bias = p.contextual = p.relative = p.qk_norm_after_encode = true;
    p.kernel_bias = KernelBias::linear;
    return p;
  }
  std::optional<PositionalForm> positional_form() const override {
    PositionalForm f;  // the decode engine computes c_t itself from the gate's weights
    f.gate_w = w_;
    f.gate_b = b_;
    return f;
  }
  PeState initial_state(int64_t batch, int64_t offset) const override {
    auto st = Encoding::initial_state(batch, offset);
    running_sum(st, "c", batch, shape_.heads, name_);
    return st;
  }
  torch::Tensor log_forget(const torch::Tensor& x) const {  // [B,T,H]
    return torch::log_sigmoid(torch::einsum("btc,hc->bth", {x, w_}) + b_);
  }
  torch::Tensor bias(const PeTokens& queries, const KeyCache& keys) const override {
    auto ci = queries.query.at("c").permute({0, 2, 1}).unsqueeze(-1);  // [B,H,Tq,1]
    auto cj = keys.key.at("c").permute({0, 2, 1}).unsqueeze(-2);       // [B,H,1,Tk]
    return (ci - cj).to(w_.scalar_type());
  }
  BiasTerms bias_terms(const PeTokens& queries, const KeyCache& keys) const override {
    // Re-based on the first cached key (in float64) so the float32 terms stay near the window's scale.
    auto base = keys.key.at("c").select(1, 0).unsqueeze(1);  // [B,1,H]
    BiasTerms out;
    out.a = (queries.query.at("c") - base).permute({0, 2, 1}).to(w_.scalar_type());  // [B,H,Tq]
    out.b = (base - keys.key.at("c")).permute({0, 2, 1}).to(w_.scalar_type());       // [B,H,Tk]
    return out;
  }

 protected:
  PeTokens encode_chunk(const torch::Tensor& q, const torch::Tensor& k, const TokenContext& ctx,
                        PeState& st) override {
    const torch::Tensor& x = ctx.x;
    auto& c0 = running_sum(st, "c", q.size(0), shape_.heads, name_);
    // The cumulative sum grows like -0.7 t; keep it in float64 so c_i - c_j stays exact for long streams.
    auto c = c0.unsqueeze(1) + torch::cumsum(log_forget(x).to(torch::kFloat64), 1);  // [B,T,H]
    c0 = c.select(1, q.size(1) - 1);
    PeTokens out{q, k};
    out.query["c"] = c;
    out.key["c"] = c;
    return out;
  }

 private:
  torch::Tensor w_, b_;
};

void fox_laws(LawTable& t) {
  using namespace laws;
  const auto f64 = torch::kFloat64;
  const uint64_t seed = t.seed;
  auto in = random_inputs(f64, seed);
  // W_f = 0, b_f = beta: a constant forget gate is ALiBi with slope softplus(-beta).
  auto e = build("fox", f64, seed);
  {
    torch::NoGradGuard ng;
    param(e, "w_f").zero_();
  }
  auto slopes = torch::tensor(alibi_slopes(kShape.heads), f64);
  auto factor = torch::softplus(-param(e, "b_f").detach()) / slopes;
  t.add("constant gate == alibi(softplus(-b))",
        max_diff(logits_at(*e, in, 0), scaled_alibi_logits(factor, in)), 1e-12);
  // The FoX parameterisation of additive GRAPE: an endpoint-independent edge potential psi(t,l) = log f_l
  // in the path-integral sum gives exactly the FoX bias.
  auto fox = build("fox", f64, seed);
  auto st2 = fox->initial_state(kBatch, 0);
  auto tok = fox->encode(in.q, in.k, in.x, st2);
  auto logf = torch::log_sigmoid(torch::einsum("btc,hc->bht", {in.x, param(fox, "w_f")}) +
                                 param(fox, "b_f").view({1, -1, 1}));
  auto psi = logf.unsqueeze(2).expand({kBatch, kShape.heads, kLen, kLen});
  auto path = path_sum_bias(psi, 0, 0);
  auto mask = torch::tril(torch::ones({kLen, kLen}, torch::kBool));
  auto direct = fox->bias(tok, KeyCache::from(tok));
  t.add("path-integral(psi = log f) == fox", (path - direct).masked_fill(~mask, 0).abs().max().item<double>(),
        1e-12);
}

void add_fox(std::vector<EncodingInfo>& out) {
  out.push_back({"fox",
                 "additive",
                 "FoX forget gate: bias sum_{l=j+1..i} logsigmoid(w_h.x_l + b_h) (data-dependent decay)",
                 {},
                 {"w_f  [H, C]  init N(0, (0.5/sqrt(C))^2)", "b_f  [H]  init 0 (f = 0.5)"},
                 [](const HeadShape& s, const PeOptions& o) { return std::make_shared<FoX>(s, o); },
                 fox_laws});
}

const detail::Registration fox_registration(add_fox);

}  // namespace
}  // namespace grape
