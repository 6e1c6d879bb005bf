// The laws of the encodings, checked on random inputs (fp64 unless a law names fp32).
#include <fmt/format.h>

#include <cmath>
#include <functional>
#include <limits>

#include "grape/check.hpp"
#include "grape/pe.hpp"

namespace grape::check {
namespace {

// Small but awkward sizes: odd T, H = 3 (ALiBi's non-power-of-two path), D = 12, C = 16.
const HeadShape kShape{3, 12, 16};
constexpr int64_t kBatch = 2, kLen = 13;

struct Inputs {
  torch::Tensor q, k, v, x;
};

Inputs random_inputs(torch::ScalarType dtype, uint64_t seed, int64_t T = kLen) {
  torch::manual_seed(seed);
  auto o = torch::TensorOptions().dtype(torch::kFloat64);
  Inputs in{torch::randn({kBatch, T, kShape.heads, kShape.head_dim}, o),
            torch::randn({kBatch, T, kShape.heads, kShape.head_dim}, o),
            torch::randn({kBatch, T, kShape.heads, kShape.head_dim}, o),
            torch::randn({kBatch, T, kShape.model_dim}, o)};
  return {in.q.to(dtype), in.k.to(dtype), in.v.to(dtype), in.x.to(dtype)};
}

// The same encoding for the same seed: init, then a seeded perturbation of every parameter.
EncodingPtr build(const std::string& name, torch::ScalarType dtype, uint64_t seed, const PeOptions& opts = {},
                  bool perturb = true) {
  torch::manual_seed(seed + 7);
  auto e = make_encoding(name, kShape, opts);
  if (perturb) {
    torch::NoGradGuard ng;
    for (auto& p : e->parameters()) p.add_(torch::randn_like(p) * 0.3);
  }
  e->to(dtype);
  return e;
}

// Max |a - b| over entries finite in both; infinite if the -inf patterns differ.
double max_diff(const torch::Tensor& a, const torch::Tensor& b) {
  auto fa = torch::isfinite(a), fb = torch::isfinite(b);
  if (!torch::equal(fa, fb)) return std::numeric_limits<double>::infinity();
  auto d = torch::where(fa, a.to(torch::kFloat64) - b.to(torch::kFloat64), torch::zeros({}, torch::kFloat64));
  return d.numel() ? d.abs().max().item<double>() : 0.0;
}

torch::Tensor logits_at(Encoding& e, const Inputs& in, int64_t offset, double phase_shift = 0.0) {
  auto st = e.initial_state(in.q.size(0), offset);
  if (phase_shift != 0.0) st.values["phi"] = st.values["phi"] + phase_shift;
  auto tok = e.encode(in.q, in.k, in.x, st);
  return attention_logits(e, tok, KeyCache::from(tok));
}

struct Table {
  std::string encoding;
  std::vector<LawResult> rows;
  void add(const std::string& law, double err, double tol) {
    rows.push_back({encoding, law, err, tol, err <= tol});
  }
};

void relative_law(Table& t, torch::ScalarType dtype, double tol, uint64_t seed) {
  auto e = build(t.encoding, dtype, seed);
  auto in = random_inputs(dtype, seed);
  const auto props = e->properties();
  double err = 0.0;
  for (int64_t shift : {1, 17, 977}) {
    auto base = logits_at(*e, in, 0);
    auto moved =
        props.phase_relative ? logits_at(*e, in, 0, 0.731 * double(shift)) : logits_at(*e, in, shift);
    err = std::max(err, max_diff(base, moved));
  }
  t.add(fmt::format("relative law ({})", dtype == torch::kFloat64 ? "fp64" : "fp32"), err, tol);
}

void norm_law(Table& t, uint64_t seed) {
  auto e = build(t.encoding, torch::kFloat64, seed);
  auto in = random_inputs(torch::kFloat64, seed);
  auto err_at = [&](int64_t offset) {
    auto st = e->initial_state(kBatch, offset);
    auto tok = e->encode(in.q, in.k, in.x, st);
    return std::max(max_diff(tok.q.norm(2, -1), in.q.norm(2, -1)),
                    max_diff(tok.k.norm(2, -1), in.k.norm(2, -1)));
  };
  t.add("norm preserved (n < 4096)", std::max(err_at(0), err_at(4096 - kLen)), 1e-10);
  // Far positions: grape-m-mix's float64 matrix exponential of n L loses orthogonality like n * 1e-15.
  t.add("norm preserved (n = 10^6)", err_at(1000000), 1e-8);
}

// Perturbing token s changes no logit or output of a query before s.
void causality_law(Table& t, uint64_t seed) {
  auto e = build(t.encoding, torch::kFloat64, seed);
  auto in = random_inputs(torch::kFloat64, seed);
  const int64_t s = 6;
  auto run = [&](const Inputs& x) {
    auto st = e->initial_state(kBatch, 0);
    auto tok = e->encode(x.q, x.k, x.x, st);
    auto logits = attention_logits(*e, tok, KeyCache::from(tok, x.v));
    auto y = torch::einsum("bhij,bjhd->bihd", {torch::softmax(logits, -1), x.v});
    return std::make_pair(logits.narrow(2, 0, s), y.narrow(1, 0, s));
  };
  auto [l0, y0] = run(in);
  Inputs changed{in.q.clone(), in.k.clone(), in.v.clone(), in.x.clone()};
  for (auto* x : {&changed.q, &changed.k, &changed.v, &changed.x})
    x->narrow(1, s, kLen - s).add_(torch::randn_like(x->narrow(1, s, kLen - s)));
  auto [l1, y1] = run(changed);
  t.add("causality", std::max(max_diff(l0, l1), max_diff(y0, y1)), 0.0);
}

// Chunked encoding with a carried state and a growing key cache equals one full pass.
void streaming_law(Table& t, uint64_t seed) {
  auto e = build(t.encoding, torch::kFloat64, seed);
  auto in = random_inputs(torch::kFloat64, seed);
  auto full = logits_at(*e, in, 0);
  auto st = e->initial_state(kBatch, 0);
  KeyCache cache;
  double err = 0.0;
  int64_t start = 0;
  for (int64_t len : {5, 1, 1, 4, 2}) {
    auto sl = [&](const torch::Tensor& x) { return x.narrow(1, start, len); };
    auto tok = e->encode(sl(in.q), sl(in.k), sl(in.x), st);
    cache.append(tok);
    auto rows = attention_logits(*e, tok, cache);
    err = std::max(err, max_diff(rows, full.narrow(2, start, len).narrow(3, 0, start + len)));
    start += len;
  }
  t.add("streaming == full", err, 1e-10);
}

// Central finite differences against autograd, along a random direction, for every input and parameter.
void gradient_law(Table& t, uint64_t seed) {
  auto e = build(t.encoding, torch::kFloat64, seed);
  auto in = random_inputs(torch::kFloat64, seed);
  const bool embeds = e->properties().embeds;
  torch::manual_seed(seed + 99);
  auto w = torch::randn_like(in.v);
  auto wh = torch::randn({kBatch, kLen, kShape.model_dim}, torch::kFloat64);
  auto loss = [&](const Inputs& x) {
    auto st = e->initial_state(kBatch, 0);
    auto y = reference_attention(*e, x.q, x.k, x.v, x.x, st);
    auto l = (y * w).sum();
    if (embeds) l = l + (e->embed(x.x, 0) * wh).sum();
    return l;
  };
  Inputs leaf{in.q.clone().requires_grad_(), in.k.clone().requires_grad_(), in.v.clone().requires_grad_(),
              in.x.clone().requires_grad_()};
  std::vector<std::pair<std::string, torch::Tensor>> targets = {{"q", leaf.q}, {"k", leaf.k}, {"v", leaf.v}};
  if (e->properties().contextual || embeds) targets.push_back({"x", leaf.x});
  for (auto& p : e->named_parameters()) targets.push_back({p.key(), p.value()});
  for (auto& [_, x] : targets) x.mutable_grad() = torch::Tensor();
  loss(leaf).backward();
  double worst = 0.0;
  // Two steps: the loss's roundoff (~1e-15 over its ~1000 terms) dominates at 1e-6 once a directional
  // derivative is below ~1e-3, truncation at 1e-5. A wrong gradient is off at both; the better one counts.
  for (auto& [name, x] : targets) {
    auto dir = torch::randn_like(x);
    double ad = (x.grad().defined() ? (x.grad() * dir).sum().item<double>() : 0.0);
    torch::NoGradGuard ng;
    auto saved = x.clone();
    double best = std::numeric_limits<double>::infinity();
    for (double eps : {1e-6, 1e-5}) {
      x.copy_(saved + dir * eps);
      double up = loss(leaf).item<double>();
      x.copy_(saved - dir * eps);
      double down = loss(leaf).item<double>();
      double fd = (up - down) / (2 * eps);
      best = std::min(best, std::abs(fd - ad) / std::max({std::abs(fd), std::abs(ad), 1e-3}));
    }
    x.copy_(saved);
    worst = std::max(worst, best);
  }
  t.add(fmt::format("gradient (fd, {} tensors)", targets.size()), worst, 1e-6);
}

// Additive biases are 0 on the diagonal and <= 0 below it.
void bias_sign_law(Table& t, uint64_t seed) {
  auto e = build(t.encoding, torch::kFloat64, seed);
  auto in = random_inputs(torch::kFloat64, seed);
  auto st = e->initial_state(kBatch, 0);
  auto tok = e->encode(in.q, in.k, in.x, st);
  auto b = e->bias(tok, KeyCache::from(tok));
  b = b.expand({kBatch, kShape.heads, kLen, kLen});
  auto diag = b.diagonal(0, 2, 3).abs().max().item<double>();
  auto below = torch::tril(b, -1).max().item<double>();
  t.add("bias: 0 on diagonal, <= 0 below", std::max(diag, std::max(below, 0.0)), 1e-12);
}

// Logit difference between two encodings (or one with two option sets) on the same inputs.
double logits_gap(const EncodingPtr& a, const EncodingPtr& b, const Inputs& in, int64_t offset = 0) {
  return max_diff(logits_at(*a, in, offset), logits_at(*b, in, offset));
}

// ALiBi logits whose slopes are multiplied per head by `factor` [H].
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

void reductions(Table& t, uint64_t seed) {
  const auto& n = t.encoding;
  const auto f64 = torch::kFloat64;
  auto in = random_inputs(f64, seed);
  auto fresh = [&](const std::string& name, PeOptions o = {}) { return build(name, f64, seed, o, false); };
  // Learned frequencies are float32 parameters: equalities with the fixed spectrum are exact in float32.
  auto in32 = random_inputs(torch::kFloat32, seed);
  auto fresh32 = [&](const std::string& name, PeOptions o = {}) {
    return build(name, torch::kFloat32, seed, o, false);
  };
  auto param = [](const EncodingPtr& e, const std::string& name) { return e->named_parameters()[name]; };
  if (n == "rope") {
    t.add("fraction=1, p=1 == rope",
          logits_gap(fresh("rope", PeOptions{{"fraction", "1"}, {"p", "1"}}), fresh("rope"), in, 5), 0.0);
    t.add("p=0 == nope", logits_gap(fresh("rope", PeOptions{{"p", "0"}}), fresh("nope"), in, 5), 0.0);
    // Interleaved pairing is half pairing conjugated by the fixed permutation (2i -> i, 2i+1 -> i+D/2).
    const int64_t D = kShape.head_dim;
    std::vector<int64_t> perm(D);
    for (int64_t i = 0; i < D / 2; ++i) perm[i] = 2 * i, perm[i + D / 2] = 2 * i + 1;
    auto idx = torch::tensor(perm);
    Inputs permuted{in.q.index_select(-1, idx), in.k.index_select(-1, idx), in.v, in.x};
    t.add("interleaved == permuted half",
          max_diff(logits_at(*fresh("rope", PeOptions{{"pairing", "interleaved"}}), in, 3),
                   logits_at(*fresh("rope"), permuted, 3)),
          1e-12);
    // Partial rotary leaves the unrotated dims alone.
    auto part = fresh("rope", PeOptions{{"fraction", "0.5"}});
    auto st = part->initial_state(kBatch, 7);
    auto tok = part->encode(in.q, in.k, in.x, st);
    t.add("fraction=0.5: last D/2 dims untouched",
          max_diff(tok.q.narrow(-1, D / 2, D / 2), in.q.narrow(-1, D / 2, D / 2)), 0.0);
  } else if (n == "xpos") {
    t.add("scale_base=1e30 == rope",
          logits_gap(fresh("xpos", PeOptions{{"scale_base", "1e30"}}), fresh("rope"), in, 9), 1e-12);
  } else if (n == "grape-m") {
    for (auto pairing : {"half", "interleaved"}) {
      PeOptions o{{"pairing", pairing}};
      t.add(fmt::format("at init == rope ({}, fp32)", pairing),
            logits_gap(fresh32("grape-m", o), fresh32("rope", o), in32, 11), 0.0);
    }
    t.add("per_head at init == rope (fp32)",
          logits_gap(fresh32("grape-m", PeOptions{{"per_head", "true"}}), fresh32("rope"), in32, 11), 0.0);
  } else if (n == "grape-m-planes") {
    auto planes = build("grape-m-planes", f64, seed);  // perturbed frequencies ...
    auto gm = fresh("grape-m");
    {
      torch::NoGradGuard ng;
      param(planes, "basis_logits").zero_();  // ... but the identity basis
      param(gm, "lambda").copy_(param(planes, "lambda"));
    }
    t.add("identity basis == grape-m", logits_gap(planes, gm, in, 4), 1e-13);
  } else if (n == "grape-m-mix") {
    t.add("rank=4 at init == rope (fp32)",
          logits_gap(fresh32("grape-m-mix", PeOptions{{"rank", "4"}}), fresh32("rope"), in32, 6), 1e-5);
    t.add("rank=D at init == rope (fp32)",
          logits_gap(fresh32("grape-m-mix", PeOptions{{"rank", "12"}}), fresh32("rope"), in32, 6), 1e-5);
    t.add("per_head at init == rope (fp32)",
          logits_gap(fresh32("grape-m-mix", PeOptions{{"per_head", "true"}}), fresh32("rope"), in32, 6),
          1e-5);
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
  } else if (n == "grape-m-ctx") {
    // w = 0: every step is c = sigmoid(b/16), so the phase is c*n: RoPE with frequencies scaled by c.
    auto ctx = fresh("grape-m-ctx");
    const double c = 1.0 / (1.0 + std::exp(-param(ctx, "b_omega").item<double>() / 16.0));
    auto st = ctx->initial_state(kBatch, 0);
    auto tok = ctx->encode(in.q, in.k, in.x, st);
    auto theta = torch::exp(param(ctx, "lambda").detach());
    auto ang = (torch::arange(kLen, f64) * c).view({1, kLen, 1, 1}) * theta;
    t.add("w=0 == rope with theta*sigmoid(b/16)", max_diff(tok.q, rotate_pairs(in.q, ang, "half")), 1e-12);
  } else if (n == "grape-a-q" || n == "grape-a-k" || n == "grape-a-qk") {
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
  } else if (n == "fox") {
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
    t.add("path-integral(psi = log f) == fox",
          (path - direct).masked_fill(~mask, 0).abs().max().item<double>(), 1e-12);
  } else if (n == "grape-ap") {
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
  } else if (n == "tape") {
    // Standalone (no stream from earlier layers) TAPE is layer 0: E^(0) is RoPE's table, for any shift.
    t.add("layer 0 == rope", logits_gap(fresh("tape"), fresh("rope"), in, 7), 1e-12);
    t.add("shift=1000 == shift=0", logits_gap(fresh("tape", PeOptions{{"shift", "1000"}}), fresh("tape"), in),
          1e-10);
  } else if (n == "pi" || n == "ntk" || n == "dynamic-ntk" || n == "yarn" || n == "longrope") {
    // Context extension (pe-zoo-spec.md §6 E-1..E-5). encode_of: q~ of `e` for q at positions offset..
    auto encode_of = [&](const EncodingPtr& e, const torch::Tensor& q, int64_t offset) {
      auto st = e->initial_state(q.size(0), offset);
      return e->encode(q, q, torch::Tensor(), st).q;
    };
    // The extended frequencies theta'_d, read back by atan2 from the turn of unit vectors at position 1.
    auto spectrum_of = [&](const EncodingPtr& e) {
      const int64_t P = kShape.head_dim / 2;
      auto unit = torch::zeros({1, 1, kShape.heads, kShape.head_dim}, f64);
      unit.narrow(-1, 0, P).fill_(1.0);
      auto r = encode_of(e, unit, 1)[0][0][0];
      return torch::atan2(r.narrow(0, P, P), r.narrow(0, 0, P));
    };
    auto theta = torch::exp(-(2.0 * torch::arange(kShape.head_dim / 2, f64) / double(kShape.head_dim)) *
                            std::log(10000.0));
    const int64_t P = kShape.head_dim / 2;
    if (n == "pi") {
      t.add("E-1: factor=1 == rope",
            logits_gap(fresh("pi", PeOptions{{"factor", "1"}}), fresh("rope"), in, 5), 0.0);
      // PI at s = 2, position 2m == RoPE at position m.
      auto even = torch::arange(0, kLen, 2);
      t.add("E-1: s=2 at 2m == rope at m",
            max_diff(encode_of(fresh("pi"), in.q, 0).index_select(1, even),
                     encode_of(fresh("rope"), in.q.index_select(1, even), 0)),
            1e-12);
    } else if (n == "ntk") {
      t.add("E-2: factor=1 == rope",
            logits_gap(fresh("ntk", PeOptions{{"factor", "1"}}), fresh("rope"), in, 5), 0.0);
      auto th = spectrum_of(fresh("ntk", PeOptions{{"factor", "3"}}));
      t.add("E-2: theta'_0 == theta_0", std::abs(th[0].item<double>() - theta[0].item<double>()), 1e-12);
      t.add("E-2: theta'_(D/2-1) == theta_(D/2-1)/s",
            std::abs(th[P - 1].item<double>() - theta[P - 1].item<double>() / 3.0), 1e-12);
    } else if (n == "dynamic-ntk") {
      t.add("E-3: l <= L == rope (bit-exact)",
            logits_gap(fresh("dynamic-ntk", PeOptions{{"original_context", std::to_string(kLen)}}),
                       fresh("rope"), in),
            0.0);
      // Past L the spectrum is NTK's with s -> s l/L - (s-1): here 2*13/5 - 1 = 4.2.
      t.add("E-3: l > L == ntk(s l/L - (s-1))",
            logits_gap(fresh("dynamic-ntk", PeOptions{{"original_context", "5"}}),
                       fresh("ntk", PeOptions{{"factor", "4.2"}}), in),
            1e-12);
      // A decode crossing L (cache of unrotated keys) equals a full recompute of each prefix.
      auto e = fresh("dynamic-ntk", PeOptions{{"original_context", "5"}});
      auto st = e->initial_state(kBatch, 0);
      KeyCache cache;
      double err = 0.0;
      int64_t start = 0;
      for (int64_t len : {3, 1, 1, 1, 4, 1, 2}) {
        auto sl = [&](const torch::Tensor& x, int64_t n0, int64_t n1) { return x.narrow(1, n0, n1); };
        auto tok = e->encode(sl(in.q, start, len), sl(in.k, start, len), torch::Tensor(), st);
        cache.append(tok);
        Inputs prefix{sl(in.q, 0, start + len), sl(in.k, 0, start + len), in.v, in.x};
        auto full = logits_at(*e, prefix, 0);
        err = std::max(err, max_diff(attention_logits(*e, tok, cache), full.narrow(2, start, len)));
        start += len;
      }
      t.add("E-3: decode across L == prefix recompute", err, 1e-10);
    } else if (n == "yarn") {
      t.add("E-4: factor=1 == rope",
            logits_gap(fresh("yarn", PeOptions{{"factor", "1"}}), fresh("rope"), in, 5), 0.0);
      const double m = 0.1 * std::log(4.0) + 1.0;
      auto yarn = fresh("yarn", PeOptions{{"factor", "4"}});
      auto parts = fresh("yarn", PeOptions{{"factor", "4"}, {"yarn_mscale", "1"}});
      t.add("E-4: logits == by-parts logits * mscale^2",
            max_diff(logits_at(*yarn, in, 3), logits_at(*parts, in, 3) * (m * m)), 1e-12);
      t.add("E-4: |q~| == (0.1 ln s + 1) |q|",
            max_diff(encode_of(yarn, in.q, 3).norm(2, -1), in.q.norm(2, -1) * m), 1e-12);
      // L = 1000, D = 12: pairs 0, 1 turn > 32 times within L (kept), pairs 4, 5 < 1 time (theta/s).
      auto th = spectrum_of(fresh("yarn", PeOptions{{"factor", "4"}, {"original_context", "1000"}}));
      t.add("E-4: r(d) > beta unchanged", max_diff(th.narrow(0, 0, 2), theta.narrow(0, 0, 2)), 1e-12);
      t.add("E-4: r(d) < alpha == theta/s", max_diff(th.narrow(0, 4, 2), theta.narrow(0, 4, 2) / 4.0), 1e-12);
    } else if (n == "longrope") {
      t.add("E-5: lambda = s, n_hat = 0 == pi",
            logits_gap(fresh("longrope", PeOptions{{"factor", "3"}}), fresh("pi", PeOptions{{"factor", "3"}}),
                       in, 5),
            0.0);
      t.add("E-5: lambda = 1 == rope",
            logits_gap(fresh("longrope", PeOptions{{"factor", "1"}}), fresh("rope"), in, 5), 0.0);
      // n_hat = 5: positions 0..4 as rope, 5.. as pi.
      auto lr = encode_of(fresh("longrope", PeOptions{{"factor", "3"}, {"longrope_start", "5"}}), in.q, 0);
      t.add("E-5: positions < n_hat unscaled",
            max_diff(lr.narrow(1, 0, 5), encode_of(fresh("rope"), in.q, 0).narrow(1, 0, 5)), 0.0);
      t.add("E-5: positions >= n_hat interpolated",
            max_diff(lr.narrow(1, 5, kLen - 5),
                     encode_of(fresh("pi", PeOptions{{"factor", "3"}}), in.q, 0).narrow(1, 5, kLen - 5)),
            0.0);
    }
  } else if (n == "hdd-rope") {
    // H-3: a fresh model turns every token by the static rate, i.e. RoPE: k = 2 (RoPE's planes), k = 4
    // (RoPE's planes inside the chunks), and the Cayley map (static coefficient tan(theta/2)).
    auto rope = fresh("rope");
    auto st = rope->initial_state(kBatch, 0);
    auto want = rope->encode(in.q, in.k, in.x, st);
    for (auto [k, map] :
         std::vector<std::pair<std::string, std::string>>{{"2", "exp"}, {"4", "exp"}, {"4", "cayley"}}) {
      auto e = fresh("hdd-rope", PeOptions{{"k", k}, {"map", map}});
      auto st2 = e->initial_state(kBatch, 0);
      auto got = e->encode(in.q, in.k, in.x, st2);
      t.add(fmt::format("k={} {} at init == rope (q~,k~,logits)", k, map),
            std::max({max_diff(got.q, want.q), max_diff(got.k, want.k), logits_gap(e, rope, in)}), 1e-12);
    }
    // H-4: every scan gives the sequential running product (perturbed, non-commuting rotations).
    auto seq = build(n, f64, seed, PeOptions{{"scan", "sequential"}});
    for (auto scan : {"loop", "hillis-steele", "brent-kung", "sklansky"})
      t.add(fmt::format("scan={} == sequential", scan),
            logits_gap(build(n, f64, seed, PeOptions{{"scan", scan}}), seq, in), 1e-12);
    // H-2: a prefix cancels: score(t, s) depends only on the tokens s..t-1.
    auto e = build(n, f64, seed);
    auto pre = random_inputs(f64, seed + 1, 4);
    Inputs longer{torch::cat({pre.q, in.q}, 1), torch::cat({pre.k, in.k}, 1), torch::cat({pre.v, in.v}, 1),
                  torch::cat({pre.x, in.x}, 1)};
    t.add("prefix of 4 tokens cancels",
          max_diff(logits_at(*e, longer, 0).narrow(2, 4, kLen).narrow(3, 4, kLen), logits_at(*e, in, 0)),
          1e-12);
  } else if (n == "t5") {
    // A table -m_h b, with every distance (< 13) in the exact buckets (< 16), is ALiBi.
    auto e = fresh("t5");
    {
      torch::NoGradGuard ng;
      auto slopes = torch::tensor(alibi_slopes(kShape.heads), f64);
      param(e, "table").copy_(-torch::arange(32, f64).unsqueeze(1) * slopes.unsqueeze(0));
    }
    t.add("table -m_h b == alibi",
          max_diff(logits_at(*e, in, 4), scaled_alibi_logits(torch::ones({kShape.heads}, f64), in)), 1e-12);
  } else if (n == "kerple") {
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
          err = std::max(err,
                         std::abs(b[0][h][i][j].item<double>() +
                                  r1[h].item<double>() * std::log1p(r2[h].item<double>() * double(i - j))));
    t.add("log: bias == -r1 log1p(r2 (i-j))", err, 1e-12);
    auto p = build("kerple", f64, seed, PeOptions{{"variant", "power"}});
    {
      torch::NoGradGuard ng;
      param(p, "rho2").zero_();
    }
    auto slopes = torch::tensor(alibi_slopes(kShape.heads), f64);
    auto factor = torch::softplus(param(p, "rho1").detach()) / slopes;
    t.add("power, r2 = 1 == alibi(r1)", max_diff(logits_at(*p, in, 0), scaled_alibi_logits(factor, in)),
          1e-12);
  } else if (n == "fire") {
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
  } else if (n == "cope") {
    auto e = build("cope", f64, seed);
    {
      torch::NoGradGuard ng;
      param(e, "e").zero_();
    }
    t.add("e = 0 == nope", logits_gap(e, fresh("nope"), in, 5), 0.0);
  } else if (n == "learned") {
    // The table row of each absolute position is added as it is, and positions past the table are refused.
    auto e = fresh("learned", PeOptions{{"max_len", "40"}});
    auto zeros = torch::zeros({1, 6, kShape.model_dim}, f64);
    t.add("embed adds table rows offset..",
          max_diff(e->embed(zeros, 30).squeeze(0), param(e, "table").narrow(0, 30, 6)), 0.0);
    bool refused = false;
    try {
      e->embed(zeros, 36);
    } catch (const std::invalid_argument&) {
      refused = true;
    }
    t.add("position >= max_len refused (1 = not refused)", refused ? 0.0 : 1.0, 0.0);
  } else if (n == "sinusoidal") {
    auto e = fresh("sinusoidal");
    auto zeros = torch::zeros({1, 64, kShape.model_dim}, f64);
    auto pe = e->embed(zeros, 3).squeeze(0);  // [64, C]
    t.add("|PE(n)|^2 == C/2", (pe.pow(2).sum(-1) - kShape.model_dim / 2.0).abs().max().item<double>(), 1e-12);
    // PE(n + k) is a fixed per-pair rotation of PE(n): |PE(n+k) - PE(m+k)| == |PE(n) - PE(m)|.
    auto a = pe.narrow(0, 0, 32), b = pe.narrow(0, 5, 32);
    auto pairwise = [](const torch::Tensor& x) { return (x.unsqueeze(0) - x.unsqueeze(1)).norm(2, -1); };
    auto d0 = pairwise(a), d1 = pairwise(b);
    t.add("PE(n+k) = rotation of PE(n)", max_diff(d0, d1), 1e-12);
  }
}

}  // namespace

std::vector<LawResult> run_laws(const std::string& encoding, uint64_t seed) {
  (void)encoding_info(encoding);  // throws for unknown names
  Table t{encoding, {}};
  auto props = build(encoding, torch::kFloat64, seed)->properties();
  if (props.relative || props.phase_relative) {
    relative_law(t, torch::kFloat64, 1e-10, seed);
    relative_law(t, torch::kFloat32, 1e-5, seed);
  }
  if (props.rotates) norm_law(t, seed);
  if (props.has_bias && !props.signed_bias) bias_sign_law(t, seed);
  causality_law(t, seed);
  streaming_law(t, seed);
  gradient_law(t, seed);
  reductions(t, seed);
  return t.rows;
}

}  // namespace grape::check
