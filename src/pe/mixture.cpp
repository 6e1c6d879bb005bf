// GRAPE-M non-commuting mixture: G(n) = exp(n L) with L a learned sum of rank-2 generators that need not
// commute, acting on an r-dim subspace (the compact form I + E (exp(n L_r) - I) E^T), and the Rodrigues
// closed form of a single rank-2 generator.
#include <fmt/format.h>

#include <cmath>
#include <stdexcept>

#include "pe/families.hpp"
#include "pe/laws.hpp"

namespace grape {

// exp(eta L) x with L = a b^T - b a^T: a rotation by eta*s in span{a, b}, s = |a||b| sin(angle(a, b)).
// exp(eta L) = I + f1 L + f2 L^2 with f1 = sin(z)/s, f2 = (1 - cos z)/s^2, z = eta s. Near s = 0 the
// series eta(1 - z^2/6) and eta^2(1/2 - z^2/24) keep it finite and differentiable.
torch::Tensor rank2_rotate(const torch::Tensor& x, const torch::Tensor& a, const torch::Tensor& b,
                           const torch::Tensor& eta) {
  auto dot = [](const torch::Tensor& u, const torch::Tensor& v) { return (u * v).sum(-1, true); };
  auto e = eta.unsqueeze(-1);
  auto al = dot(a, a), be = dot(b, b), ga = dot(a, b);
  auto delta = torch::clamp_min(al * be - ga * ga, 0.0);
  const double tiny =
      x.scalar_type() == torch::kFloat64 ? 1e-16 : 1e-8;  // (z^2 below which the series is exact)
  auto small = (e * e * delta) < tiny;
  auto safe_delta = torch::where(small, torch::ones_like(delta), delta);
  auto s = torch::sqrt(safe_delta);
  auto z = e * s;
  auto z2 = e * e * delta;
  auto f1 = torch::where(small, e * (1.0 - z2 / 6.0), torch::sin(z) / s);
  auto f2 = torch::where(small, e * e * (0.5 - z2 / 24.0), (1.0 - torch::cos(z)) / safe_delta);
  auto u = dot(a, x), v = dot(b, x);
  auto Lx = a * v - b * u;
  auto L2x = ga * (a * v + b * u) - be * a * u - al * b * v;
  return x + f1 * Lx + f2 * L2x;
}

namespace {

using namespace detail;

// The r mixed coordinates are the first r/2 planes of the chosen pairing (the highest RoPE frequencies),
// laid out locally as (first coordinates, second coordinates) so that plane m is (m, m + r/2). The other
// D - r coordinates keep plain RoPE at their own frequencies, which commutes with the mixture.
class GrapeMMix : public Encoding {
 public:
  GrapeMMix(const HeadShape& s, const PeOptions& o) : Encoding("grape-m-mix", s), layout_(rotary_layout(o)) {
    require_even_head_dim(name_, s.head_dim);
    const int64_t D = s.head_dim;
    rank_ = o.get_int("rank", std::min<int64_t>(D, 8));
    if (rank_ < 2 || rank_ % 2 != 0 || rank_ > D)
      throw std::invalid_argument(
          fmt::format("grape-m-mix: rank must be even and in [2, D={}], got {}", D, rank_));
    const int64_t M = o.get_int("generators", rank_ / 2);
    if (M < 1) throw std::invalid_argument(fmt::format("grape-m-mix: generators must be >= 1, got {}", M));
    const double base = o.get_double("base", 10000.0);
    if (base <= 1.0) throw std::invalid_argument(fmt::format("grape-m-mix: base must be > 1, got {}", base));
    scale_ = o.get_double("log_freq_scale", 16.0);
    const int64_t G = o.get_bool("per_head", false) ? s.heads : 1;
    const int64_t r = rank_, h = r / 2;

    // Permutation that puts the mixed coordinates first (local half layout), then the rest.
    std::vector<int64_t> perm;
    if (layout_.pairing == "half") {
      for (int64_t i = 0; i < h; ++i) perm.push_back(i);
      for (int64_t i = 0; i < h; ++i) perm.push_back(D / 2 + i);
      for (int64_t i = h; i < D / 2; ++i) perm.push_back(i);
      for (int64_t i = h; i < D / 2; ++i) perm.push_back(D / 2 + i);
    } else {
      for (int64_t i = 0; i < h; ++i) perm.push_back(2 * i);
      for (int64_t i = 0; i < h; ++i) perm.push_back(2 * i + 1);
      for (int64_t i = r; i < D; ++i) perm.push_back(i);  // still interleaved pairs
    }
    // Plain members, not buffers: Module::to(dtype) would turn integer buffers into floats.
    perm_ = torch::tensor(perm, torch::kLong);
    inv_perm_ = torch::argsort(perm_);

    auto log_theta = rope_log_theta(D, base);  // full-D spectrum: mixed planes take the first r/2
    rest_log_theta_ = register_buffer("rest_log_theta", log_theta.narrow(0, h, D / 2 - h).unsqueeze(0));
    // Generators m < r/2 start on the canonical planes (m, m + r/2) at the RoPE frequencies, so the
    // encoding starts as RoPE; further generators start as random directions with a tiny rate.
    auto a = torch::randn({G, M, r}) / std::sqrt(double(r));
    auto b = torch::randn({G, M, r}) / std::sqrt(double(r));
    auto logw = torch::full({G, M}, float(scale_ * std::log(1e-4)));
    for (int64_t m = 0; m < std::min(M, h); ++m) {
      a.select(1, m).zero_();
      b.select(1, m).zero_();
      a.select(1, m).select(1, m).fill_(1.0);
      b.select(1, m).select(1, m + h).fill_(1.0);
      logw.select(1, m).fill_(log_theta[m].item<double>() * scale_);
    }
    gen_a_ = register_parameter("gen_a", a);
    gen_b_ = register_parameter("gen_b", b);
    log_omega_ = register_parameter("log_omega", logw);
  }
  Properties properties() const override {
    Properties p;
    p.rotates = p.relative = p.qk_norm_after_encode = true;
    return p;
  }
  // L_r = sum_m omega_m (b_m a_m^T - a_m b_m^T) [G,r,r] (standard orientation; the GRAPE authors'
  // orientation flips the sign, matching their L(a, b) = a b^T - b a^T).
  torch::Tensor generator() const {
    auto w = torch::exp(log_omega_ / scale_).unsqueeze(-1).unsqueeze(-1);  // [G,M,1,1]
    auto ab = torch::einsum("gmi,gmj->gmij", {gen_a_, gen_b_});
    return (w * (ab.transpose(-1, -2) - ab)).sum(1) * layout_.sign;
  }
  int64_t rank() const { return rank_; }

 protected:
  PeTokens encode_chunk(const torch::Tensor& q, const torch::Tensor& k, const TokenContext&,
                        PeState& st) override {
    const int64_t T = q.size(1), r = rank_, D = shape_.head_dim;
    // exp(n L_r) for each position, in float64: the relative law G(i)^T G(j) = G(j-i) holds to
    // float64 round-off however far the positions reach.
    auto L = generator().to(torch::kFloat64);  // [G,r,r]
    auto n = positions_f64(st.next_pos, T).view({T, 1, 1, 1});
    auto Gn = torch::linalg_matrix_exp(n * L.unsqueeze(0)).to(q.scalar_type());  // [T,G,r,r]
    Gn = Gn.expand({T, shape_.heads, r, r});  // a shared mixture (G = 1) serves every head
    auto rest_ang = positions_f64(st.next_pos, T).view({1, T, 1, 1}) *
                    torch::exp(rest_log_theta_.to(q.scalar_type())).to(torch::kFloat64);
    auto apply = [&](const torch::Tensor& x) {
      auto xp = x.index_select(-1, perm_);
      auto mixed = torch::einsum("thij,bthj->bthi", {Gn, xp.narrow(-1, 0, r)});
      auto parts = std::vector<torch::Tensor>{mixed};
      if (D > r)
        parts.push_back(rotate_pairs(xp.narrow(-1, r, D - r), rest_ang, layout_.pairing, layout_.sign));
      return torch::cat(parts, -1).index_select(-1, inv_perm_);
    };
    return {apply(q), apply(k)};
  }

 private:
  RotaryLayout layout_;
  int64_t rank_;
  double scale_;
  torch::Tensor perm_, inv_perm_, rest_log_theta_, gen_a_, gen_b_, log_omega_;
};

void grape_m_mix_laws(LawTable& t) {
  using namespace laws;
  const auto f64 = torch::kFloat64;
  const uint64_t seed = t.seed;
  auto in32 = random_inputs(torch::kFloat32, seed);
  auto fresh32 = [&](const std::string& name, PeOptions o = {}) {
    return build(name, torch::kFloat32, seed, o, false);
  };
  t.add("rank=4 at init == rope (fp32)",
        logits_gap(fresh32("grape-m-mix", PeOptions{{"rank", "4"}}), fresh32("rope"), in32, 6), 1e-5);
  t.add("rank=D at init == rope (fp32)",
        logits_gap(fresh32("grape-m-mix", PeOptions{{"rank", "12"}}), fresh32("rope"), in32, 6), 1e-5);
  t.add("per_head at init == rope (fp32)",
        logits_gap(fresh32("grape-m-mix", PeOptions{{"per_head", "true"}}), fresh32("rope"), in32, 6), 1e-5);
  // Non-commuting: the perturbed generators do not commute, yet the law tests above hold.
  auto mix = build("grape-m-mix", f64, seed);
  auto a = param(mix, "gen_a").detach(), b = param(mix, "gen_b").detach();
  auto L0 = torch::outer(a[0][0], b[0][0]) - torch::outer(b[0][0], a[0][0]);
  auto L1 = torch::outer(a[0][1], b[0][1]) - torch::outer(b[0][1], a[0][1]);
  double comm = (L0.matmul(L1) - L1.matmul(L0)).norm().item<double>();
  t.add("generators do not commute: 1e-3 / |[L0,L1]|", 1e-3 / comm, 1.0);
  // Rodrigues closed form == dense matrix exponential, on random and nearly parallel planes.
  torch::manual_seed(seed);
  double err = 0.0;
  for (double tilt : {1.0, 1e-6, 0.0}) {
    auto av = torch::randn({5, 7}, f64);
    auto bv = av + tilt * torch::randn({5, 7}, f64);
    auto eta = torch::randn({5}, f64) * 3.0;
    auto x = torch::randn({5, 7}, f64);
    auto Lm = torch::einsum("ni,nj->nij", {av, bv}) - torch::einsum("ni,nj->nij", {bv, av});
    auto dense = torch::einsum("nij,nj->ni", {torch::linalg_matrix_exp(Lm * eta.view({5, 1, 1})), x});
    err = std::max(err, max_diff(rank2_rotate(x, av, bv, eta), dense));
  }
  t.add("rodrigues == matrix_exp", err, 1e-12);
}

void add_mixture(std::vector<EncodingInfo>& out) {
  auto opts = std::vector<OptionSpec>{
      {"rank", "8", "r: dimension of the mixed subspace (even, <= D); the first r/2 planes"},
      {"generators", "r/2", "number of rank-2 generators L(a_m, b_m) in the mixture"},
      {"base", "10000", "RoPE base for the init and for the D-r unmixed coordinates"},
      {"per_head", "false", "one mixture per head instead of shared"},
      {"log_freq_scale", "16", "s in omega = exp(log_omega/s)"}};
  for (auto& l : rotary_layout_options()) opts.push_back(l);
  out.push_back({"grape-m-mix",
                 "multiplicative",
                 "GRAPE-M non-commuting mixture: exp(n sum_m omega_m L(a_m,b_m)) on r dims, RoPE on the rest",
                 opts,
                 {"gen_a, gen_b  [1 or H, M, r]  init canonical planes (m, m+r/2); extra ones random",
                  "log_omega  [1 or H, M]  init s*log(theta_RoPE,m); extra ones s*log(1e-4)"},
                 [](const HeadShape& s, const PeOptions& o) { return std::make_shared<GrapeMMix>(s, o); },
                 grape_m_mix_laws});
}

const detail::Registration mixture_registration(add_mixture);

}  // namespace
}  // namespace grape
