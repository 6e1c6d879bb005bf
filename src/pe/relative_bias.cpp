// Relative biases that are not linear in the distance: T5's bucketed table, KERPLE's log/power kernels and
// FIRE's MLP of a log-normalised distance. Each is a function of the positions only, formed per call from the
// query and key offsets, so the KV cache holds plain keys. T5 and KERPLE depend on i - j alone, so the fused
// kernels compute them from a per-head table by distance (bias_terms); FIRE also depends on i and runs on
// the reference attention.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

#include "pe/families.hpp"
#include "pe/laws.hpp"

namespace grape {
namespace {

using namespace detail;

// Distances 0..W-1 with W = last query position - first key position + 1: every distance a visible pair of
// this call can have, for the fused kernels' per-head table (BiasTerms::dist). [W], float64.
torch::Tensor distance_range(const PeTokens& queries, const KeyCache& keys) {
  const int64_t W = queries.offset + queries.length - keys.offset;
  return torch::arange(std::max<int64_t>(W, 1), torch::kFloat64);
}

// ---- T5 --------------------------------------------------------------------------------------------

// Decoder (unidirectional) buckets of n = max(i - j, 0): n itself below max_exact = num_buckets / 2, then
// logarithmically spaced up to max_distance, then the last bucket. Formed in float64.
torch::Tensor t5_buckets(const torch::Tensor& dist, int64_t num_buckets, int64_t max_distance) {
  const int64_t exact = num_buckets / 2;
  auto n = dist.to(torch::kFloat64).clamp_min(0.0);
  auto far =
      exact + torch::floor(torch::log(n.clamp_min(1.0) / double(exact)) /
                           std::log(double(max_distance) / double(exact)) * double(num_buckets - exact));
  auto b = torch::where(n < double(exact), n, far.clamp_max(double(num_buckets - 1)));
  return b.to(torch::kLong);
}

class T5 : public Encoding {
 public:
  T5(const HeadShape& s, const PeOptions& o) : Encoding("t5", s) {
    buckets_ = o.get_int("num_buckets", 32);
    max_distance_ = o.get_int("max_distance", 128);
    if (buckets_ < 2)
      throw std::invalid_argument(fmt::format("t5: num_buckets must be >= 2, got {}", buckets_));
    if (max_distance_ <= buckets_ / 2)
      throw std::invalid_argument(
          fmt::format("t5: max_distance must be > num_buckets/2 = {} (the exact buckets), got {}",
                      buckets_ / 2, max_distance_));
    // Zeros: the model starts as NoPE and the table learns from there (the gradient is not zero at init).
    table_ = register_parameter("table", torch::zeros({buckets_, s.heads}));
  }
  Properties properties() const override {
    Properties p;
    p.has_bias = p.relative = p.signed_bias = p.qk_norm_after_encode = true;
    p.kernel_bias = KernelBias::distance_table;
    return p;
  }
  torch::Tensor bias(const PeTokens& queries, const KeyCache& keys) const override {
    auto b = t5_buckets(distance(queries, keys, torch::kFloat64), buckets_, max_distance_);  // [Tq,Tk]
    auto rows = table_.index_select(0, b.flatten()).view({b.size(0), b.size(1), -1});        // [Tq,Tk,H]
    return rows.permute({2, 0, 1}).unsqueeze(0);
  }
  // The table gathered by the bucket of each distance 0..W-1: [H, W] (its gradient reaches table_).
  BiasTerms bias_terms(const PeTokens& queries, const KeyCache& keys) const override {
    auto b = t5_buckets(distance_range(queries, keys), buckets_, max_distance_);  // [W]
    BiasTerms out;
    out.dist = table_.index_select(0, b).t();
    return out;
  }

  // encode leaves q and k alone; bias_terms depends on distances only.
  std::optional<PositionalForm> positional_form() const override { return PositionalForm{}; }

 protected:
  PeTokens encode_chunk(const torch::Tensor& q, const torch::Tensor& k, const TokenContext&,
                        PeState&) override {
    return {q, k};
  }

 private:
  int64_t buckets_, max_distance_;
  torch::Tensor table_;
};

// ---- KERPLE ----------------------------------------------------------------------------------------

// log:   bias = -r1 log(1 + r2 n),  r1 = softplus(rho1), r2 = softplus(rho2)
// power: bias = -r1 n^r2,           r1 = softplus(rho1), r2 = 2 sigmoid(rho2) in (0, 2)
// with n = max(i - j, 0). Smooth maps keep r1, r2 in range without the reference's clamp, whose gradient
// is zero once a value sits at the floor.
class Kerple : public Encoding {
 public:
  Kerple(const HeadShape& s, const PeOptions& o) : Encoding("kerple", s) {
    power_ = o.get_choice("variant", "log", {"log", "power"}) == "power";
    // The reference draws r1 ~ U(0, 2) and r2 ~ U(0, 1) per head (floored at 1e-2); we draw the same and
    // store their preimages.
    auto r1 = torch::rand({s.heads}, torch::kFloat64) * 1.99 + 0.01;
    auto r2 = torch::rand({s.heads}, torch::kFloat64) * 0.99 + 0.01;
    rho1_ = register_parameter("rho1", torch::log(torch::expm1(r1)).to(torch::kFloat32));
    auto rho2 = power_ ? torch::log(r2 / (2.0 - r2)) : torch::log(torch::expm1(r2));
    rho2_ = register_parameter("rho2", rho2.to(torch::kFloat32));
  }
  Properties properties() const override {
    Properties p;
    p.has_bias = p.relative = p.qk_norm_after_encode = true;
    p.kernel_bias = KernelBias::distance_table;
    return p;
  }
  torch::Tensor r1() const { return torch::softplus(rho1_); }
  torch::Tensor r2() const { return power_ ? 2.0 * torch::sigmoid(rho2_) : torch::softplus(rho2_); }
  torch::Tensor bias(const PeTokens& queries, const KeyCache& keys) const override {
    auto n = distance(queries, keys, rho1_.scalar_type()).clamp_min(0.0);  // [Tq,Tk]
    return of_distance(n).unsqueeze(0);                                    // [1,H,Tq,Tk]
  }
  // The kernel at distances 0..W-1: [H, W] (its gradient reaches rho1, rho2).
  BiasTerms bias_terms(const PeTokens& queries, const KeyCache& keys) const override {
    BiasTerms out;
    out.dist = of_distance(distance_range(queries, keys).to(rho1_.scalar_type()));
    return out;
  }
  // The bias of distances n >= 0 of any shape, per head: [H, n's shape].
  torch::Tensor of_distance(const torch::Tensor& n) const {
    std::vector<int64_t> per_head(n.dim() + 1, 1);
    per_head[0] = -1;
    auto a = r1().view(per_head), p = r2().view(per_head);
    if (power_) {
      // n^r2 as exp(r2 ln n) on n >= 1 only: pow's exponent gradient at n = 0 would be 0 * (-inf).
      auto pos = n > 0;
      return torch::where(pos, -a * torch::exp(p * torch::log(n.clamp_min(1.0))), torch::zeros_like(a * n));
    }
    return -a * torch::log1p(p * n);
  }

  // encode leaves q and k alone; bias_terms depends on distances only.
  std::optional<PositionalForm> positional_form() const override { return PositionalForm{}; }

 protected:
  PeTokens encode_chunk(const torch::Tensor& q, const torch::Tensor& k, const TokenContext&,
                        PeState&) override {
    return {q, k};
  }

 private:
  bool power_ = false;
  torch::Tensor rho1_, rho2_;
};

// ---- FIRE ------------------------------------------------------------------------------------------

// bias(i, j) = f(psi(i - j) / (psi(max(L, i)) + eps)), psi(x) = log(c |x| + 1), f a 1 -> W -> H ReLU MLP,
// c = exp(log_c), L = threshold exp(log_l). The query position normalises the distance ("progressive
// interpolation"): the input of f is in [0, 1] for any length, and for i < L the bias depends on i - j
// only. f has no output bias: a per-head constant added to a whole row of logits cancels in the softmax,
// so it would never get a gradient.
class Fire : public Encoding {
 public:
  Fire(const HeadShape& s, const PeOptions& o) : Encoding("fire", s) {
    const int64_t W = o.get_int("mlp_width", 32);
    const double c = o.get_double("c", 0.1);
    threshold_ = o.get_double("threshold", 512.0);
    if (W < 1) throw std::invalid_argument(fmt::format("fire: mlp_width must be >= 1, got {}", W));
    if (c <= 0.0) throw std::invalid_argument(fmt::format("fire: c must be > 0, got {}", c));
    if (threshold_ <= 0.0)
      throw std::invalid_argument(fmt::format("fire: threshold must be > 0, got {}", threshold_));
    // nn.Linear's default init, as the authors' module: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for both layers.
    auto uniform = [](std::vector<int64_t> shape, int64_t fan_in) {
      const double r = 1.0 / std::sqrt(double(fan_in));
      return (torch::rand(shape) * 2.0 - 1.0) * r;
    };
    w1_ = register_parameter("mlp_w1", uniform({W}, 1));
    b1_ = register_parameter("mlp_b1", uniform({W}, 1));
    w2_ = register_parameter("mlp_w2", uniform({s.heads, W}, W));
    // c and L are learned in log space: both stay positive and Adam's steps on them are relative (the
    // authors learn c directly and L through a multiplier, taking absolute values).
    log_c_ = register_parameter("log_c", torch::full({1}, float(std::log(c))));
    log_l_ = register_parameter("log_l", torch::zeros({1}));
  }
  Properties properties() const override {
    Properties p;
    p.has_bias = p.signed_bias = true;  // not relative: beyond L the query position normalises
    p.qk_norm_after_encode = true;
    p.kernel_bias = KernelBias::unsupported;  // depends on i as well as i - j
    return p;
  }
  // The MLP's input u(i, j) in [0, 1] (for j <= i), [Tq,Tk].
  torch::Tensor input(const PeTokens& queries, const KeyCache& keys) const {
    const auto dt = log_c_.scalar_type();
    auto d = distance(queries, keys, dt);
    auto i = torch::arange(queries.offset, queries.offset + queries.length, torch::kFloat64).to(dt);
    auto norm = torch::maximum(torch::exp(log_l_) * threshold_, i);  // [Tq]
    auto c = torch::exp(log_c_);
    auto psi = [&](const torch::Tensor& x) { return torch::log1p(c * torch::abs(x)); };
    return psi(d) / (psi(norm).unsqueeze(1) + kEps);
  }
  torch::Tensor bias(const PeTokens& queries, const KeyCache& keys) const override {
    auto u = input(queries, keys).unsqueeze(-1);  // [Tq,Tk,1]
    auto h = torch::relu(u * w1_ + b1_);          // [Tq,Tk,W]
    auto out = torch::matmul(h, w2_.t());         // [Tq,Tk,H]
    return out.permute({2, 0, 1}).unsqueeze(0);
  }

 protected:
  PeTokens encode_chunk(const torch::Tensor& q, const torch::Tensor& k, const TokenContext&,
                        PeState&) override {
    return {q, k};
  }

 private:
  static constexpr double kEps = 1e-6;  // the authors' guard of the division
  double threshold_;
  torch::Tensor w1_, b1_, w2_, log_c_, log_l_;
};

void t5_laws(LawTable& t) {
  using namespace laws;
  const auto f64 = torch::kFloat64;
  const uint64_t seed = t.seed;
  auto in = random_inputs(f64, seed);
  auto fresh = [&](const std::string& name, PeOptions o = {}) { return build(name, f64, seed, o, false); };
  // A table -m_h b, with every distance (< 13) in the exact buckets (< 16), is ALiBi.
  auto e = fresh("t5");
  {
    torch::NoGradGuard ng;
    auto slopes = torch::tensor(alibi_slopes(kShape.heads), f64);
    param(e, "table").copy_(-torch::arange(32, f64).unsqueeze(1) * slopes.unsqueeze(0));
  }
  t.add("table -m_h b == alibi",
        max_diff(logits_at(*e, in, 4), scaled_alibi_logits(torch::ones({kShape.heads}, f64), in)), 1e-12);
}

void kerple_laws(LawTable& t) {
  using namespace laws;
  const auto f64 = torch::kFloat64;
  const uint64_t seed = t.seed;
  auto in = random_inputs(f64, seed);
  // Log form against -r1 log1p(r2 n) written out per entry; power form with r2 = 2 sigmoid(0) = 1 is ALiBi.
  auto e = build("kerple", f64, seed);
  auto r1 = torch::softplus(param(e, "rho1").detach()), r2 = torch::softplus(param(e, "rho2").detach());
  auto st = e->initial_state(kBatch, 30);
  auto tok = e->encode(in.q, in.k, in.x, st);
  auto b = e->bias(tok, KeyCache::from(tok));
  double err = 0.0;
  for (int64_t h = 0; h < kShape.heads; ++h)
    for (int64_t i = 0; i < kLen; ++i)
      for (int64_t j = 0; j <= i; ++j)
        err =
            std::max(err, std::abs(b[0][h][i][j].item<double>() +
                                   r1[h].item<double>() * std::log1p(r2[h].item<double>() * double(i - j))));
  t.add("log: bias == -r1 log1p(r2 (i-j))", err, 1e-12);
  auto p = build("kerple", f64, seed, PeOptions{{"variant", "power"}});
  {
    torch::NoGradGuard ng;
    param(p, "rho2").zero_();
  }
  auto slopes = torch::tensor(alibi_slopes(kShape.heads), f64);
  auto factor = torch::softplus(param(p, "rho1").detach()) / slopes;
  t.add("power, r2 = 1 == alibi(r1)", max_diff(logits_at(*p, in, 0), scaled_alibi_logits(factor, in)), 1e-12);
}

void fire_laws(LawTable& t) {
  using namespace laws;
  const auto f64 = torch::kFloat64;
  const uint64_t seed = t.seed;
  auto in = random_inputs(f64, seed);
  auto fresh = [&](const std::string& name, PeOptions o = {}) { return build(name, f64, seed, o, false); };
  auto e = build("fire", f64, seed);
  {
    torch::NoGradGuard ng;
    param(e, "mlp_w2").zero_();
  }
  t.add("zero output layer == nope", logits_gap(e, fresh("nope"), in, 3), 0.0);
  // Relative below the threshold L = 512, not beyond it (the query position normalises there).
  auto r = build("fire", f64, seed);
  {
    torch::NoGradGuard ng;
    param(r, "log_l").zero_();
  }
  auto base = logits_at(*r, in, 0);
  t.add("i < L: shift by 17, 300 == unshifted",
        std::max(max_diff(base, logits_at(*r, in, 17)), max_diff(base, logits_at(*r, in, 300))), 1e-12);
  t.add("i > L: shift changes logits: 1e-6 / |diff|",
        1e-6 / max_diff(logits_at(*r, in, 600), logits_at(*r, in, 700)), 1.0);
}

void add_relative_bias(std::vector<EncodingInfo>& out) {
  out.push_back(
      {"t5",
       "additive",
       "T5 relative bias: learned table[bucket(i-j), h], log-spaced decoder buckets",
       {{"num_buckets", "32", "buckets (>= 2); the first num_buckets/2 are exact distances"},
        {"max_distance", "128", "distances >= max_distance share the last bucket (> num_buckets/2)"}},
       {"table  [num_buckets, H]  init 0 (starts as nope)"},
       [](const HeadShape& s, const PeOptions& o) { return std::make_shared<T5>(s, o); },
       t5_laws});
  out.push_back({"kerple",
                 "additive",
                 "KERPLE: bias -r1 log(1 + r2 (i-j)) or -r1 (i-j)^r2, r1, r2 > 0 per head",
                 {{"variant", "log", "log: -r1 log(1 + r2 n); power: -r1 n^r2 with 0 < r2 < 2"}},
                 {"rho1  [H]  r1 = softplus(rho1), init r1 ~ U(0.01, 2)",
                  "rho2  [H]  r2 = softplus(rho2) (log) or 2 sigmoid(rho2) (power), init r2 ~ U(0.01, 1)"},
                 [](const HeadShape& s, const PeOptions& o) { return std::make_shared<Kerple>(s, o); },
                 kerple_laws});
  out.push_back(
      {"fire",
       "additive",
       "FIRE: bias MLP(psi(i-j)/psi(max(L,i))), psi(x) = log(c|x|+1); relative for i < L",
       {{"mlp_width", "32", "hidden width W of the 1 -> W -> H ReLU MLP"},
        {"c", "0.1", "init of the learned c of psi (> 0)"},
        {"threshold", "512", "init of the learned threshold L (> 0)"}},
       {"mlp_w1  [W]  init U(-1, 1)", "mlp_b1  [W]  init U(-1, 1)",
        "mlp_w2  [H, W]  init U(-1/sqrt(W), 1/sqrt(W)) (no output bias: it cancels in the softmax)",
        "log_c  [1]  init log(option c) (c = exp(log_c))", "log_l  [1]  init 0 (L = threshold exp(log_l))"},
       [](const HeadShape& s, const PeOptions& o) { return std::make_shared<Fire>(s, o); },
       fire_laws});
}

const detail::Registration relative_bias_registration(add_relative_bias);

}  // namespace
}  // namespace grape
