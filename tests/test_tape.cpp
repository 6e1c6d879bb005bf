// TAPE (invariants T-1..T-7 of docs/encodings.md): the model at init equals its RoPE backbone; token outputs
// are invariant to a global position shift; one layer is equivariant to rotations of E; the attention
// update's two modes; streaming with cached (K~, V, E) equals the full forward; gradients by finite
// differences; fused == reference.
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <numbers>

#include "grape/model.hpp"

namespace grape {
namespace {

ModelConfig tape_config(const std::string& pe = "tape") {
  ModelConfig c;
  c.preset = "test";
  c.vocab_size = 257;
  c.n_layer = 3;
  c.n_head = 4;
  c.n_embd = 64;
  c.context = 32;
  c.pe = pe;
  return c;
}

torch::Tensor tokens(int64_t B, int64_t T, uint64_t seed) {
  auto gen = at::detail::createCPUGenerator(seed);
  return torch::randint(0, 257, {B, T}, gen, torch::kInt64);
}

// Max |a - b| over entries finite in both (masked logits are -inf in both).
double max_finite_diff(const torch::Tensor& a, const torch::Tensor& b) {
  auto d = a.to(torch::kFloat64) - b.to(torch::kFloat64);
  return torch::where(torch::isfinite(a) & torch::isfinite(b), d, torch::zeros_like(d))
      .abs()
      .max()
      .item<double>();
}

// Moves TAPE's parameters (W1, A start at zero) off their init so every update is active.
void perturb_tape(Transformer& m, double scale = 0.3) {
  torch::NoGradGuard ng;
  for (auto& item : m->named_parameters())
    if (item.key().find(".pe.") != std::string::npos)
      item.value().add_(torch::randn_like(item.value()) * scale);
}

// A TAPE model with a RoPE model's weights (TAPE's own parameters as initialised).
std::pair<Transformer, Transformer> tape_and_rope(uint64_t seed = 5) {
  torch::manual_seed(seed);
  Transformer rope(tape_config("rope"));
  torch::manual_seed(seed + 1);
  Transformer tape(tape_config("tape"));
  torch::NoGradGuard ng;
  auto src = rope->named_parameters();
  for (auto& item : tape->named_parameters())
    if (src.contains(item.key())) item.value().copy_(src[item.key()]);
  return {tape, rope};
}

TEST(Tape, AtInitTheModelEqualsItsRopeBackbone) {  // T-1
  auto [tape, rope] = tape_and_rope();
  torch::NoGradGuard ng;
  auto seq = tokens(2, 40, 1);
  const double d0 = max_finite_diff(tape->forward(seq), rope->forward(seq));
  std::printf("  tape at init vs rope: max |diff| = %.3g\n", d0);
  EXPECT_LE(d0, 1e-5);
  // W2 alone does nothing while W1 = 0 and A = 0 (U = W1 E = 0, A E~ = 0) ...
  auto params = tape->named_parameters();
  params["blocks.0.pe.W2"].add_(1.0);
  EXPECT_LE(max_finite_diff(tape->forward(seq), rope->forward(seq)), 1e-5);
  // ... while W1 or A turn the position state into something RoPE cannot express.
  params["blocks.0.pe.W1"].add_(0.5);
  EXPECT_GE(max_finite_diff(tape->forward(seq), rope->forward(seq)), 1e-3);
  params["blocks.0.pe.W1"].zero_();
  params["blocks.0.pe.A"].add_(0.5);
  EXPECT_GE(max_finite_diff(tape->forward(seq), rope->forward(seq)), 1e-3);
}

// T-2: E^(0) started at position c (the option `shift`) multiplies every z_b by e^{i c theta_b}; token
// outputs must not change. fp64 so that the comparison is tight.
TEST(Tape, TokenOutputsAreInvariantToAGlobalPositionShift) {
  torch::NoGradGuard ng;
  auto seq = tokens(2, 24, 2);
  torch::Tensor ref;
  for (double c : {0.0, 3.0, 1000.0, 123457.0}) {
    auto cfg = tape_config();
    cfg.pe_options["shift"] = fmt::format("{}", c);
    torch::manual_seed(9);
    Transformer m(cfg);
    perturb_tape(m);
    m->to(torch::kFloat64);
    auto out = m->forward(seq);
    if (!ref.defined()) {
      ref = out;
      continue;
    }
    const double d = max_finite_diff(out, ref);
    std::printf("  tape shift %.0f: max |diff| = %.3g (max |logit| %.3g)\n", c, d,
                ref.abs().max().item<double>());
    EXPECT_LE(d, 1e-9);
  }
  // The perturbed model is not RoPE: the check above is not vacuous.
  auto cfg = tape_config("rope");
  torch::manual_seed(9);
  Transformer rope(cfg);
  rope->to(torch::kFloat64);
  EXPECT_GE(max_finite_diff(rope->forward(seq), ref), 1e-3);
}

// T-3: one layer's pieces are equivariant to a rotation u_b of every z_b (random unit complex numbers, not
// a shift): logits unchanged, both updates commute with u.
TEST(Tape, OneLayerIsEquivariantToRotationsOfE) {
  torch::manual_seed(4);
  const HeadShape s{3, 8, 12};
  auto enc_ptr = make_encoding("tape", s);
  auto& enc = *enc_ptr;
  {
    torch::NoGradGuard ng;
    for (auto& p : enc.parameters()) p.add_(torch::randn_like(p) * 0.3);
  }
  enc.to(torch::kFloat64);
  auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  const int64_t B = 2, T = 9, P = s.head_dim / 2;
  auto q = torch::randn({B, T, s.heads, s.head_dim}, f64), k = torch::randn({B, T, s.heads, s.head_dim}, f64);
  auto E = torch::randn({B, T, s.heads, s.head_dim}, f64),
       Et = torch::randn({B, T, s.heads, s.head_dim}, f64);
  auto y = torch::randn({B, T, s.model_dim}, f64);
  auto phase = torch::rand({P}, f64) * 2 * std::numbers::pi;
  auto rotate = [&](const torch::Tensor& x) {  // z_b -> u_b z_b
    auto c = torch::cos(phase), sn = torch::sin(phase);
    auto re = x.narrow(-1, 0, P), im = x.narrow(-1, P, P);
    return torch::cat({re * c - im * sn, re * sn + im * c}, -1);
  };
  auto logits = [&](const torch::Tensor& stream) {
    auto st = enc.initial_state(B, 0);
    auto tok = enc.encode(q, k, TokenContext({}, stream), st);
    return attention_logits(enc, tok, KeyCache::from(tok));
  };
  EXPECT_LE(max_finite_diff(logits(rotate(E)), logits(E)), 1e-12);
  EXPECT_GE(max_finite_diff(logits(E), logits(torch::randn_like(E))), 1e-3);  // E does matter
  EXPECT_LE(max_finite_diff(enc.stream_after_attention(rotate(E), rotate(Et)),
                            rotate(enc.stream_after_attention(E, Et))),
            1e-12);
  EXPECT_LE(max_finite_diff(enc.stream_after_mlp(rotate(E), y), rotate(enc.stream_after_mlp(E, y))), 1e-12);
  // Without the update terms the identity: E + 0.
  torch::NoGradGuard ng;
  enc.named_parameters()["A"].zero_();
  enc.named_parameters()["W1"].zero_();
  EXPECT_EQ(max_finite_diff(enc.stream_after_attention(E, Et), E), 0.0);
  EXPECT_EQ(max_finite_diff(enc.stream_after_mlp(E, y), E), 0.0);
}

// T-7 and the paper's mode: A mixes heads (E_m += sum_e A[m,e] E~_e) or, code_compat, scales head m by the
// row sum of A. Checked against loops over heads.
TEST(Tape, AttentionUpdateModes) {
  const HeadShape s{3, 6, 10};
  auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  auto E = torch::randn({1, 4, 3, 6}, f64), Et = torch::randn({1, 4, 3, 6}, f64);
  for (const char* mode : {"paper", "code_compat"}) {
    auto enc_ptr = make_encoding("tape", s, PeOptions{{"mode", mode}});
    auto& enc = *enc_ptr;
    enc.to(torch::kFloat64);
    torch::NoGradGuard ng;
    auto A = enc.named_parameters()["A"];
    A.copy_(torch::randn({3, 3}, f64));
    auto got = enc.stream_after_attention(E, Et);
    auto want = E.clone();
    for (int64_t m = 0; m < 3; ++m)
      for (int64_t e = 0; e < 3; ++e) {
        auto a = A[m][e].item<double>();
        want.select(2, m) += a * (std::string(mode) == "paper" ? Et.select(2, e) : Et.select(2, m));
      }
    EXPECT_LE(max_finite_diff(got, want), 1e-12) << mode;
  }
}

// T-5: prefill + one-token decoding with cached (K~, V, E) equals the full forward, at layer 3 of a model
// whose TAPE updates are all active; with the fused kernels and the reference path.
TEST(Tape, StreamingEqualsFullForward) {
  for (const char* attention : {"fused", "reference"}) {
    auto cfg = tape_config();
    cfg.attention = attention;
    torch::manual_seed(11);
    Transformer m(cfg);
    perturb_tape(m);
    torch::NoGradGuard ng;
    auto seq = tokens(1, 50, 6);
    auto full = m->forward(seq);
    auto cache = m->new_cache();
    std::vector<SequenceCache*> caches{&cache};
    std::vector<torch::Tensor> outs{m->forward_cached(seq.narrow(1, 0, 7), caches)};
    for (int64_t t = 7; t < 50; ++t) outs.push_back(m->forward_cached(seq.narrow(1, t, 1), caches));
    const double d = max_finite_diff(torch::cat(outs, 1), full);
    std::printf("  tape streaming (%s): max |diff| = %.3g\n", attention, d);
    EXPECT_LE(d, 1e-4) << attention;
    EXPECT_EQ(cache.layers[2].keys.key.at("E").size(1), 50);  // E cached beside K~ and V
  }
}

TEST(Tape, FusedEqualsReferenceWithGradients) {
  auto run = [](const char* attention) {
    auto cfg = tape_config();
    cfg.attention = attention;
    torch::manual_seed(12);
    Transformer m(cfg);
    perturb_tape(m);
    auto loss = m->loss(tokens(2, 33, 7), tokens(2, 33, 8));
    loss.backward();
    std::map<std::string, torch::Tensor> g;
    for (auto& item : m->named_parameters()) g[item.key()] = item.value().grad().clone();
    return std::make_pair(loss.item<double>(), g);
  };
  auto [lf, gf] = run("fused");
  auto [lr, gr] = run("reference");
  EXPECT_NEAR(lf, lr, 1e-5);
  for (const auto& [name, g] : gr) {
    const double rel = max_finite_diff(gf.at(name), g) / std::max(1e-12, g.abs().max().item<double>());
    EXPECT_LE(rel, 1e-3) << name;
  }
}

// Finite differences (fp64) of one layer's TAPE math: encode with a stream, attention to y and E~, both
// updates, against autograd, for the inputs and every parameter. (The model's logits are float32, too coarse
// for differences; the glue around these functions is plain autograd.)
TEST(Tape, GradientsMatchFiniteDifferences) {
  torch::manual_seed(13);
  const HeadShape s{3, 8, 12};
  auto enc_ptr = make_encoding("tape", s);
  auto& enc = *enc_ptr;
  auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  {
    torch::NoGradGuard ng;
    for (auto& p : enc.parameters()) p.add_(torch::randn_like(p) * 0.3);
  }
  enc.to(torch::kFloat64);
  const int64_t B = 2, T = 7;
  std::vector<std::pair<std::string, torch::Tensor>> xs = {{"q", torch::randn({B, T, 3, 8}, f64)},
                                                           {"k", torch::randn({B, T, 3, 8}, f64)},
                                                           {"v", torch::randn({B, T, 3, 8}, f64)},
                                                           {"E", torch::randn({B, T, 3, 8}, f64)},
                                                           {"y", torch::randn({B, T, 12}, f64)}};
  for (auto& p : enc.named_parameters()) xs.push_back({p.key(), p.value()});
  for (auto& [_, x] : xs) x.requires_grad_(true);
  auto wy = torch::randn({B, T, 3, 8}, f64), wE = torch::randn({B, T, 3, 8}, f64);
  auto loss = [&] {
    auto st = enc.initial_state(B, 0);
    auto tok = enc.encode(xs[0].second, xs[1].second, TokenContext({}, xs[3].second), st);
    auto keys = KeyCache::from(tok, xs[2].second);
    auto p = torch::softmax(attention_logits(enc, tok, keys), -1);
    auto y = torch::einsum("bhij,bjhd->bihd", {p, keys.v});
    auto Et = torch::einsum("bhij,bjhd->bihd", {p, keys.key.at("E")});
    auto E2 = enc.stream_after_mlp(enc.stream_after_attention(xs[3].second, Et), xs[4].second);
    return (y * wy).sum() + (E2 * wE).sum();
  };
  loss().backward();
  for (auto& [name, x] : xs) {
    auto dir = torch::randn_like(x);
    const double analytic = (x.grad() * dir).sum().item<double>();
    const double h = 1e-6;
    torch::NoGradGuard ng;
    x.add_(dir * h);
    const double up = loss().item<double>();
    x.sub_(dir * (2 * h));
    const double down = loss().item<double>();
    x.add_(dir * h);
    const double numeric = (up - down) / (2 * h);
    EXPECT_NEAR(analytic, numeric, 1e-7 * std::max(1.0, std::abs(numeric))) << name;
    EXPECT_GT(std::abs(numeric), 1e-6) << name << ": the loss must depend on it";
  }
  EXPECT_EQ(xs.size(), 5u + 4u);  // q, k, v, E, y; W1, Wx, W2, A
}

TEST(Tape, BadInputIsRefusedClearly) {
  const HeadShape s{2, 8, 10};
  EXPECT_THROW(make_encoding("tape", {2, 7, 10}), std::invalid_argument);  // odd head_dim
  EXPECT_THROW(make_encoding("tape", s, PeOptions{{"mode", "both"}}), std::invalid_argument);
  EXPECT_THROW(make_encoding("tape", s, PeOptions{{"hidden", "0"}}), std::invalid_argument);
  auto enc_ptr = make_encoding("tape", s);
  auto& enc = *enc_ptr;
  auto q = torch::randn({1, 5, 2, 8});
  auto st = enc.initial_state(1, 0);
  try {
    enc.encode(q, q, TokenContext({}, torch::randn({1, 4, 2, 8})), st);
    FAIL() << "a stream of the wrong length was accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("position state E"), std::string::npos) << e.what();
  }
  EXPECT_THROW(enc.stream_after_mlp(torch::randn({1, 5, 2, 8}), torch::randn({1, 5, 9})),
               std::invalid_argument);
}

}  // namespace
}  // namespace grape
