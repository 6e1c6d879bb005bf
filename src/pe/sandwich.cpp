// Sandwich (Chi, Fan, Rudnicky and Ramadge, "Dissecting Transformer Length Extrapolation via the Lens of
// Receptive Field Analysis", ACL 2023): of the sinusoidal embeddings' contribution to q.k only the cross
// term p_i . p_j is kept, as a parameter-free bias, shifted to 0 on the diagonal and scaled per head:
//     bias_h(i, j) = (sum_{k=1..d'/2} cos((i - j) w_k) - d'/2) / (8 h / H),   w_k = base^(-2k/d'), h = 1..H.
// Every cosine is <= 1, so the bias is 0 at distance 0 and <= 0 beyond; it decays roughly logarithmically
// with the distance and heads with small h decay fastest (as ALiBi's slopes do). A function of i - j only:
// the fused kernels read it as a per-head table by distance.
#include <fmt/format.h>

#include <cmath>
#include <stdexcept>

#include "pe/families.hpp"
#include "pe/laws.hpp"

namespace grape {
namespace {

using namespace detail;

class Sandwich : public Encoding {
 public:
  Sandwich(const HeadShape& s, const PeOptions& o) : Encoding("sandwich", s) {
    dim_ = o.get_int("dim", s.head_dim);
    const double base = o.get_double("base", 10000.0);
    if (dim_ < 2 || dim_ % 2 != 0)
      throw std::invalid_argument(fmt::format("sandwich: dim must be even and >= 2, got {}", dim_));
    if (base <= 1.0) throw std::invalid_argument(fmt::format("sandwich: base must be > 1, got {}", base));
    auto k = torch::arange(1, dim_ / 2 + 1, torch::kFloat64);
    freqs_ = torch::exp(-(2.0 * k / double(dim_)) * std::log(base));  // [d'/2], float64
    auto h = torch::arange(1, s.heads + 1, torch::kFloat64);
    head_scale_ = double(s.heads) / (8.0 * h);  // [H] = 1 / (8h/H)
  }
  Properties properties() const override {
    Properties p;
    p.has_bias = p.relative = p.qk_norm_after_encode = true;
    p.kernel_bias = KernelBias::distance_table;
    return p;
  }
  torch::Tensor bias(const PeTokens& queries, const KeyCache& keys) const override {
    auto n = distance(queries, keys, torch::kFloat64).clamp_min(0.0);  // [Tq,Tk]
    return of_distance(n).unsqueeze(0).to(queries.q.scalar_type());    // [1,H,Tq,Tk]
  }
  BiasTerms bias_terms(const PeTokens& queries, const KeyCache& keys) const override {
    const int64_t W = std::max<int64_t>(queries.offset + queries.length - keys.offset, 1);
    BiasTerms out;
    out.dist = of_distance(torch::arange(W, torch::kFloat64)).to(queries.q.scalar_type());  // [H,W]
    return out;
  }
  // The bias at distances n >= 0 of any shape, per head: [H, n's shape], float64.
  torch::Tensor of_distance(const torch::Tensor& n) const {
    auto angles = n.unsqueeze(-1) * freqs_;                      // [..., d'/2]
    auto cross = torch::cos(angles).sum(-1) - double(dim_ / 2);  // p_i . p_j - d'/2
    std::vector<int64_t> per_head(n.dim() + 1, 1);
    per_head[0] = -1;
    return cross.unsqueeze(0) * head_scale_.view(per_head);
  }

  // encode leaves q and k alone; bias_terms depends on distances only.
  std::optional<PositionalForm> positional_form() const override { return PositionalForm{}; }

 protected:
  PeTokens encode_chunk(const torch::Tensor& q, const torch::Tensor& k, const TokenContext&,
                        PeState&) override {
    return {q, k};
  }

 private:
  int64_t dim_;
  torch::Tensor freqs_, head_scale_;  // float64, fixed
};

// Sandwich is the cross term of sinusoidal embeddings: with p_n = (sin n w_k, cos n w_k)_k written out as
// vectors, (p_i . p_j - d'/2) H / (8h) is the bias, for every head and pair.
void sandwich_laws(LawTable& t) {
  using namespace laws;
  const auto f64 = torch::kFloat64;
  for (int64_t dim : {2, 8, 12}) {
    auto e = build("sandwich", f64, t.seed, PeOptions{{"dim", std::to_string(dim)}}, false);
    auto in = random_inputs(f64, t.seed);
    auto st = e->initial_state(kBatch, 40);
    auto tok = e->encode(in.q, in.k, in.x, st);
    auto b = e->bias(tok, KeyCache::from(tok))[0];  // [H,T,T]
    auto pos = torch::arange(40, 40 + kLen, f64);
    auto w = torch::exp(-(2.0 * torch::arange(1, dim / 2 + 1, f64) / double(dim)) * std::log(10000.0));
    auto ang = pos.unsqueeze(1) * w.unsqueeze(0);                 // [T, d'/2]
    auto p = torch::cat({torch::sin(ang), torch::cos(ang)}, -1);  // [T, d']
    auto cross = p.matmul(p.t()) - double(dim / 2);               // [T,T]
    auto h = torch::arange(1, kShape.heads + 1, f64);
    auto want = cross.unsqueeze(0) * (double(kShape.heads) / (8.0 * h)).view({-1, 1, 1});
    auto causal = torch::ones({kLen, kLen}, torch::kBool).tril();
    t.add(fmt::format("dim={}: bias == (p_i.p_j - d'/2) H/(8h)", dim),
          (b - want).masked_fill(~causal, 0).abs().max().item<double>(), 1e-12);
  }
}

void add_sandwich(std::vector<EncodingInfo>& out) {
  out.push_back({"sandwich",
                 "additive",
                 "Sandwich: bias (sum_k cos((i-j) w_k) - d'/2) H/(8h), the sinusoidal cross term per head",
                 {{"dim", "D", "d', the sinusoidal dimension (even)"}, {"base", "10000", "frequency base"}},
                 {},
                 [](const HeadShape& s, const PeOptions& o) { return std::make_shared<Sandwich>(s, o); },
                 sandwich_laws});
}

const Registration sandwich_registration(add_sandwich);

}  // namespace
}  // namespace grape
