// FoX, the Forgetting Transformer's forget gate, as additive GRAPE: log f_t = logsigmoid(w_h . x_t + b_h),
// c_t = sum_{l <= t} log f_l, bias(i, j) = c_i - c_j = sum_{l=j+1..i} log f_l <= 0.
#include <fmt/format.h>

#include <stdexcept>

#include "pe/families.hpp"

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
    p.has_bias = p.contextual = p.relative = true;
    return p;
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
  bool linear_bias(const PeTokens& queries, const KeyCache& keys, LinearBiasTerms& out) const override {
    // Re-based on the first cached key (in float64) so the float32 terms stay near the window's scale.
    auto base = keys.key.at("c").select(1, 0).unsqueeze(1);  // [B,1,H]
    out = {};
    out.a = (queries.query.at("c") - base).permute({0, 2, 1}).to(w_.scalar_type());  // [B,H,Tq]
    out.b = (base - keys.key.at("c")).permute({0, 2, 1}).to(w_.scalar_type());       // [B,H,Tk]
    return true;
  }

 protected:
  PeTokens encode_chunk(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& x,
                        PeState& st) override {
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

}  // namespace

namespace detail {

void add_fox(std::vector<EncodingInfo>& out) {
  out.push_back({"fox",
                 "additive",
                 "FoX forget gate: bias sum_{l=j+1..i} logsigmoid(w_h.x_l + b_h) (data-dependent decay)",
                 {},
                 {"w_f  [H, C]  init N(0, (0.5/sqrt(C))^2)", "b_f  [H]  init 0 (f = 0.5)"},
                 [](const HeadShape& s, const PeOptions& o) { return std::make_shared<FoX>(s, o); }});
}

}  // namespace detail
}  // namespace grape
