// The generic laws of every encoding, checked on random inputs (fp64 unless a law names fp32). Each
// encoding adds its own reductions (EncodingInfo::laws, in its family file).
#include "pe/laws.hpp"

#include <fmt/format.h>

#include <cmath>
#include <functional>
#include <limits>

#include "grape/attention.hpp"
#include "grape/check.hpp"

namespace grape::check {
namespace {

using namespace laws;

void relative_law(LawTable& t, torch::ScalarType dtype, double tol, uint64_t seed) {
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

void norm_law(LawTable& t, uint64_t seed) {
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
void causality_law(LawTable& t, uint64_t seed) {
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
void streaming_law(LawTable& t, uint64_t seed) {
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
void gradient_law(LawTable& t, uint64_t seed) {
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
void bias_sign_law(LawTable& t, uint64_t seed) {
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

// The fused kernels' declaration agrees with the bias: a kind exactly when there is a bias, and terms that
// carry exactly the tensors of that kind (checked on a chunk against its own keys).
void kernel_bias_law(LawTable& t, uint64_t seed) {
  auto e = build(t.encoding, torch::kFloat64, seed);
  const auto props = e->properties();
  const bool declared = props.kernel_bias != KernelBias::none;
  double bad = declared != props.has_bias ? 1.0 : 0.0;
  if (props.kernel_bias != KernelBias::unsupported) {
    auto in = random_inputs(torch::kFloat64, seed);
    auto st = e->initial_state(kBatch, 0);
    auto tok = e->encode(in.q, in.k, in.x, st);
    const auto terms = e->bias_terms(tok, KeyCache::from(tok));
    const bool linear = terms.a.defined() || terms.b.defined() || terms.c.defined() || terms.d.defined();
    const bool path = terms.p.defined() || terms.r.defined() || terms.m.defined();
    const bool table = terms.dist.defined();
    const bool want_linear = props.kernel_bias == KernelBias::linear;
    const bool want_path = props.kernel_bias == KernelBias::path_sum;
    const bool want_table = props.kernel_bias == KernelBias::distance_table;
    if (linear != want_linear || path != want_path || table != want_table) bad = 1.0;
  }
  t.add(fmt::format("kernel bias declared: {} (1 = not)", to_string(props.kernel_bias)), bad, 0.0);
}

}  // namespace

std::vector<LawResult> run_laws(const std::string& encoding, uint64_t seed) {
  const auto& info = encoding_info(encoding);  // throws for unknown names
  LawTable t{encoding, seed, {}};
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
  kernel_bias_law(t, seed);
  if (info.laws) info.laws(t);  // the encoding's own reductions, from its family file
  return t.rows;
}

}  // namespace grape::check
