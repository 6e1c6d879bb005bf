// HDD-RoPE: the invariants H-1..H-5 (docs/encodings.md, "Invariant labels") against independent references
// (hand-built generators, torch::linalg_matrix_exp, rope, plain loops over the product R_s ... R_{t-1}),
// streaming, gradients at the identity, and the refusal of bad input.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "expect_invalid.hpp"
#include "grape/attention.hpp"
#include "pe/hdd_rope.hpp"
#include "tensor_checks.hpp"

namespace grape {
namespace {

using grape::testing::f64;
const HeadShape kShape{2, 12, 10};  // H = 2, D = 12 (k = 2, 3, 4, 6 all divide it), C = 10

using grape::testing::max_diff;

EncodingPtr make(PeOptions o = {}, bool perturb = false, torch::ScalarType dtype = f64, uint64_t seed = 5) {
  torch::manual_seed(seed);
  auto e = make_encoding("hdd-rope", kShape, o);
  if (perturb) {
    torch::NoGradGuard ng;
    for (auto& p : e->parameters()) p.add_(torch::randn_like(p) * 0.3);
  }
  e->to(dtype);
  return e;
}

struct Inputs {
  torch::Tensor q, k, x;
};
Inputs random_inputs(int64_t B, int64_t T, uint64_t seed, torch::ScalarType dtype = f64) {
  torch::manual_seed(seed);
  return {torch::randn({B, T, kShape.heads, kShape.head_dim}, dtype),
          torch::randn({B, T, kShape.heads, kShape.head_dim}, dtype),
          torch::randn({B, T, kShape.model_dim}, dtype)};
}

PeTokens encode_all(Encoding& e, const Inputs& in, int64_t offset = 0) {
  auto st = e.initial_state(in.q.size(0), offset);
  return e.encode(in.q, in.k, in.x, st);
}
torch::Tensor logits(Encoding& e, const Inputs& in, int64_t offset = 0) {
  auto tok = encode_all(e, in, offset);
  return attention_logits(e, tok, KeyCache::from(tok));
}

double orthogonality_error(const torch::Tensor& R) {
  auto I = torch::eye(R.size(-1), f64);
  return (torch::matmul(R.transpose(-1, -2), R) - I).abs().max().item<double>();
}

using grape::testing::expect_invalid;

// Random skew-symmetric matrices [n, k, k] of a given scale.
torch::Tensor random_skew(int64_t n, int64_t k, double scale) {
  auto a = torch::randn({n, k, k}, f64) * scale;
  return a - a.transpose(1, 2);
}

// ---- H-5: closed forms ------------------------------------------------------------------------------

// Reference exponential written independently: the power series sum_n (A/2^s)^n / n! to degree 14 with
// |A/2^s|_F <= 0.1 (remainder < 1e-27), squared s times.
torch::Tensor reference_expm(const torch::Tensor& A) {
  const double norm = torch::sqrt((A * A).sum({-2, -1}).max()).item<double>();
  const int s = norm > 0.1 ? int(std::ceil(std::log2(norm / 0.1))) : 0;
  auto X = A / std::pow(2.0, s);
  auto term = torch::eye(A.size(-1), f64).expand(A.sizes()).clone(), sum = term.clone();
  for (int n = 1; n <= 14; ++n) {
    term = torch::matmul(term, X) / double(n);
    sum = sum + term;
  }
  for (int i = 0; i < s; ++i) sum = torch::matmul(sum, sum);
  return sum;
}

TEST(HddRope, ClosedFormExponentialsMatchMatrixExp) {
  torch::manual_seed(1);
  for (int64_t k : {2, 3, 4, 5, 6, 8}) {
    double worst = 0.0, vs_torch = 0.0, vs_torch_large = 0.0;
    for (double scale : {0.0, 1e-9, 1e-4, 1e-2, 0.3, 1.0, 3.0}) {
      auto A = random_skew(64, k, scale);
      auto R = hdd::skew_exp(A);
      worst = std::max(worst, max_diff(R, reference_expm(A)));
      auto dt = (R - torch::linalg_matrix_exp(A)).abs().amax({-2, -1});  // per matrix
      vs_torch = std::max(vs_torch, dt.max().item<double>());
      auto one_norm = A.abs().sum(-2).amax(-1);  // LibTorch picks its Taylor degree by the 1-norm
      auto big = one_norm > 1.1;                 // its scaled degree-18 branch
      if (big.any().item<bool>())
        vs_torch_large = std::max(vs_torch_large, dt.masked_select(big).max().item<double>());
    }
    std::printf("  skew_exp k=%ld: vs power series %.3g, vs linalg_matrix_exp %.3g (%.3g at 1-norm > 1.1)\n",
                long(k), worst, vs_torch, vs_torch_large);
    EXPECT_LE(worst, 1e-12) << "k=" << k;
    // LibTorch 1.13's matrix_exp is itself off by up to ~1e-10 in its unscaled low-degree branches (1-norm
    // below 1.09; visible at k = 2, where the closed form is cos/sin); its scaled branch agrees.
    EXPECT_LE(vs_torch_large, 1e-12) << "k=" << k;
  }
  // The general-k series on a block-diagonal generator equals the closed forms of its blocks.
  auto A4 = random_skew(16, 4, 1.5), A2 = random_skew(16, 2, 1.5);
  auto A6 = torch::zeros({16, 6, 6}, f64);
  A6.narrow(1, 0, 4).narrow(2, 0, 4).copy_(A4);
  A6.narrow(1, 4, 2).narrow(2, 4, 2).copy_(A2);
  auto R6 = hdd::skew_exp(A6);
  EXPECT_LE(max_diff(R6.narrow(1, 0, 4).narrow(2, 0, 4), hdd::skew_exp(A4)), 1e-13);
  EXPECT_LE(max_diff(R6.narrow(1, 4, 2).narrow(2, 4, 2), hdd::skew_exp(A2)), 1e-13);
  EXPECT_EQ(R6.narrow(1, 0, 4).narrow(2, 4, 2).abs().max().item<double>(), 0.0);
  // so(4) split on its special points: purely self-dual, purely anti-self-dual, a single plane.
  auto J = torch::zeros({3, 4, 4}, f64);
  J.index_put_({0, 1, 0}, 2.0), J.index_put_({0, 3, 2}, 2.0);   // self-dual (a01 = a23)
  J.index_put_({1, 1, 0}, 1.5), J.index_put_({1, 3, 2}, -1.5);  // anti-self-dual
  J.index_put_({2, 2, 1}, 0.7);                                 // one plane
  J = J - J.transpose(1, 2);
  EXPECT_LE(max_diff(hdd::skew_exp(J), reference_expm(J)), 1e-13);
}

TEST(HddRope, CayleyIsOrthogonalAndTurnsAPlaneByTwiceTheArctangent) {
  torch::manual_seed(2);
  for (int64_t k : {2, 3, 4, 6}) {
    auto A = random_skew(32, k, 1.0);
    auto R = hdd::cayley(A);
    EXPECT_LE(orthogonality_error(R), 1e-13) << "k=" << k;
    EXPECT_LE((torch::linalg_det(R) - 1.0).abs().max().item<double>(), 1e-12) << "k=" << k;
    auto I = torch::eye(k, f64);
    EXPECT_LE(max_diff(R, torch::matmul(torch::inverse(I - A), I + A)), 1e-12) << "k=" << k;
  }
  auto a = torch::linspace(-5, 5, 11, f64);
  auto A = torch::zeros({11, 2, 2}, f64);
  A.select(-1, 0).select(-1, 1).copy_(a);
  A.select(-1, 1).select(-1, 0).copy_(-a);
  auto phi = 2.0 * torch::atan(a);
  EXPECT_LE(max_diff(hdd::cayley(A),
                     hdd::skew_exp(A * (phi / a.where(a != 0, torch::ones_like(a))).view({11, 1, 1}))),
            1e-14);
}

// ---- H-1: orthogonality, det +1, norms -----------------------------------------------------------------

TEST(HddRope, RotationsAndRunningProductsAreOrthogonalWithDeterminantOne) {
  torch::manual_seed(3);
  for (int64_t k : {2, 3, 4, 5, 6}) {
    auto A = random_skew(40, k, 2.0);
    for (bool cay : {false, true}) {
      auto R = cay ? hdd::cayley(A) : hdd::skew_exp(A);
      auto P = hdd::running_product(R.unsqueeze(0), "sequential").squeeze(0);
      EXPECT_LE(orthogonality_error(R), 1e-13) << "k=" << k;
      EXPECT_LE(orthogonality_error(P), 1e-12) << "k=" << k;
      EXPECT_LE((torch::linalg_det(P) - 1.0).abs().max().item<double>(), 1e-12) << "k=" << k;
    }
  }
  for (const char* map : {"exp", "cayley"}) {
    auto e = make(PeOptions{{"map", map}}, true);
    auto in = random_inputs(2, 30, 4);
    auto tok = encode_all(*e, in);
    EXPECT_LE(max_diff(tok.q.norm(2, -1), in.q.norm(2, -1)), 1e-12) << map;
    EXPECT_LE(max_diff(tok.k.norm(2, -1), in.k.norm(2, -1)), 1e-12) << map;
    EXPECT_GE(max_diff(tok.q, in.q), 0.1) << map;  // it does turn them
  }
}

// ---- H-2: the score depends only on the tokens between key and query --------------------------------

// R_tau [B,H,G,T,k,k] from the encoding's parameters by hand: coefficient of plane (i, j) = static rate +
// (w_a x + b_a)/16, generator with A_ji = +c, A_ij = -c, exponential by torch::linalg_matrix_exp.
torch::Tensor rotations_by_hand(Encoding& e, const torch::Tensor& x, int64_t k) {
  auto w = e.named_parameters()["w_a"].detach(), b = e.named_parameters()["b_a"].detach();
  const int64_t B = x.size(0), T = x.size(1), H = kShape.heads, G = kShape.head_dim / k;
  auto coef = (torch::einsum("btc,hgmc->bhgtm", {x, w}) + b.unsqueeze(2)) / 16.0;
  auto A = torch::zeros({B, H, G, T, k, k}, f64);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i = 0, m = 0; i < k; ++i)
      for (int64_t j = i + 1; j < k; ++j, ++m) {
        auto c = coef.select(-1, m).select(2, g);  // [B,H,T]
        if (j == i + k / 2 && i < k / 2)           // static plane: rope's (g + iG, g + iG + D/2)
          c = c + std::pow(10000.0, -2.0 * double(g + i * G) / double(kShape.head_dim));
        A.select(2, g).select(-2, j).select(-1, i).copy_(c);  // A_ji = +c: (x_i, x_j) turns counter-clockwise
        A.select(2, g).select(-2, i).select(-1, j).copy_(-c);
      }
  return torch::linalg_matrix_exp(A);
}

TEST(HddRope, ScoreIsTheProductOfTheRotationsBetweenKeyAndQuery) {
  const int64_t k = 4, T = 9, G = kShape.head_dim / k;
  auto e = make({}, true);
  auto in = random_inputs(1, T, 6);
  auto got = logits(*e, in);
  auto R = rotations_by_hand(*e, in.x, k);  // [1,H,G,T,k,k]
  double err = 0.0;
  for (int64_t h = 0; h < kShape.heads; ++h)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t s = 0; s <= t; ++s) {
        double want = 0.0;
        for (int64_t g = 0; g < G; ++g) {
          auto prod = torch::eye(k, f64);
          for (int64_t tau = s; tau < t; ++tau) prod = torch::matmul(prod, R[0][h][g][tau]);  // R_s...R_{t-1}
          // Chunk g holds coordinates g + jG.
          auto idx = torch::arange(k) * G + g;
          auto qv = in.q[0][t][h].index_select(0, idx), kv = in.k[0][s][h].index_select(0, idx);
          want += torch::dot(qv, torch::mv(prod.t(), kv)).item<double>();
        }
        want /= std::sqrt(double(kShape.head_dim));
        err = std::max(err, std::abs(got[0][h][t][s].item<double>() - want));
      }
  std::printf("  score(t,s) vs q_t^T (R_s..R_{t-1})^T k_s: max |diff| = %.3g\n", err);
  EXPECT_LE(err, 1e-12);
}

TEST(HddRope, PrefixAndTokensOutsideTheRangeDoNotChangeTheScore) {
  auto e = make({}, true);
  auto in = random_inputs(2, 12, 7);
  auto pre = random_inputs(2, 5, 8);
  Inputs longer{torch::cat({pre.q, in.q}, 1), torch::cat({pre.k, in.k}, 1), torch::cat({pre.x, in.x}, 1)};
  auto base = logits(*e, in);
  auto with_prefix = logits(*e, longer).narrow(2, 5, 12).narrow(3, 5, 12);
  EXPECT_LE(max_diff(torch::tril(base), torch::tril(with_prefix)), 1e-12);

  // score(t = 9, s = 4) reads x only of tokens 4..8: change everything else (x and q, k of other tokens).
  const int64_t t = 9, s = 4;
  auto changed = Inputs{in.q.clone(), in.k.clone(), in.x.clone()};
  auto noise = random_inputs(2, 12, 9);
  for (int64_t tau = 0; tau < 12; ++tau) {
    if (tau < s || tau >= t) changed.x.select(1, tau).copy_(noise.x.select(1, tau));
    if (tau != t) changed.q.select(1, tau).copy_(noise.q.select(1, tau));
    if (tau != s) changed.k.select(1, tau).copy_(noise.k.select(1, tau));
  }
  auto l0 = logits(*e, in).select(2, t).select(2, s), l1 = logits(*e, changed).select(2, t).select(2, s);
  EXPECT_LE(max_diff(l0, l1), 1e-12);
  // ... while a token in between does change it (the test can see a change).
  changed.x.select(1, 6).copy_(noise.x.select(1, 6));
  EXPECT_GE(max_diff(l0, logits(*e, changed).select(2, t).select(2, s)), 1e-3);
}

// ---- H-3: RoPE as the special case -----------------------------------------------------------------------

TEST(HddRope, ConstantAnglesReproduceRope) {
  const int64_t T = 64;
  auto in = random_inputs(2, T, 10);
  auto rope = make_encoding("rope", kShape);
  rope->to(f64);
  auto want = encode_all(*rope, in);
  auto want_logits = attention_logits(*rope, want, KeyCache::from(want));
  // Fresh (w_a = b_a = 0): every token turns by the static rate. k = 2 is RoPE's planes; larger k place
  // RoPE's planes (j, j+k/2) inside the chunks, so they are RoPE too (k = 6 goes through matrix_exp).
  for (auto [kk, map] : std::vector<std::pair<std::string, std::string>>{
           {"2", "exp"}, {"4", "exp"}, {"6", "exp"}, {"2", "cayley"}, {"4", "cayley"}}) {
    auto e = make(PeOptions{{"k", kk}, {"map", map}});
    auto got = encode_all(*e, in);
    const double dq = std::max(max_diff(got.q, want.q), max_diff(got.k, want.k));
    const double dl =
        max_diff(torch::tril(attention_logits(*e, got, KeyCache::from(got))), torch::tril(want_logits));
    std::printf("  k=%s map=%s vs rope (T=%ld): q~,k~ %.3g, logits %.3g\n", kk.c_str(), map.c_str(), long(T),
                dq, dl);
    EXPECT_LE(dq, 1e-12) << kk << " " << map;
    EXPECT_LE(dl, 1e-12) << kk << " " << map;
  }
  // float32: k = 2 agrees with float32 rope to float32 round-off.
  auto in32 = random_inputs(2, T, 10, torch::kFloat32);
  auto rope32 = make_encoding("rope", kShape);
  auto e32 = make(PeOptions{{"k", "2"}}, false, torch::kFloat32);
  EXPECT_LE(max_diff(encode_all(*e32, in32).q, encode_all(*rope32, in32).q), 1e-5);
}

TEST(HddRope, TwoDimensionalChunksCommuteAndTurnByTheExclusiveSumOfAngles) {
  // k = 2 with data-dependent angles: P_t = rot(sum_{tau<t} a_tau), i.e. RoPE at a data-dependent phase.
  const int64_t T = 20, P = kShape.head_dim / 2;
  auto e = make(PeOptions{{"k", "2"}}, true);
  auto in = random_inputs(2, T, 11);
  auto w = e->named_parameters()["w_a"].detach(), b = e->named_parameters()["b_a"].detach();  // [H,P,1,C]
  auto a = (torch::einsum("btc,hgmc->bthg", {in.x, w}) + b.squeeze(-1)) / 16.0;               // [B,T,H,P]
  auto theta = torch::pow(10000.0, -2.0 * torch::arange(P, f64) / double(kShape.head_dim));
  auto step = a + theta;
  auto phase = torch::cumsum(step, 1) - step;  // exclusive
  auto tok = encode_all(*e, in);
  EXPECT_LE(max_diff(tok.q, rotate_pairs(in.q, phase, "half")), 1e-12);
  EXPECT_LE(max_diff(tok.k, rotate_pairs(in.k, phase, "half")), 1e-12);
}

// ---- H-4: scans and streaming -------------------------------------------------------------------------

TEST(HddRope, EveryScanEqualsTheSequentialProduct) {
  torch::manual_seed(12);
  double worst = 0.0;
  for (int64_t T = 1; T <= 40; ++T) {
    // General (non-orthogonal) matrices: only associativity is used, and a wrong order shows at once.
    auto M = torch::eye(3, f64) + 0.4 * torch::randn({2, T, 3, 3}, f64);
    auto ref = hdd::running_product(M, "sequential");
    const double size = ref.abs().max().item<double>();  // products of general matrices grow: relative error
    // The reference itself: P_t = M_0 ... M_t.
    auto p = torch::eye(3, f64).expand({2, 3, 3});
    for (int64_t t = 0; t < T; ++t) {
      p = torch::matmul(p, M.select(1, t));
      worst = std::max(worst, max_diff(ref.select(1, t), p) / size);
    }
    for (const auto& scan : hdd::scan_names())
      worst = std::max(worst, max_diff(hdd::running_product(M, scan), ref) / size);
  }
  std::printf("  scans vs sequential, T = 1..40: max |diff| / max |P| = %.3g\n", worst);
  EXPECT_LE(worst, 1e-12);
  // Through the encoding, with its gradients.
  auto in = random_inputs(2, 23, 13);
  auto ref_enc = make(PeOptions{{"scan", "sequential"}}, true);
  auto ref = encode_all(*ref_enc, in);
  for (const auto& scan : hdd::scan_names()) {
    auto e = make(PeOptions{{"scan", scan}}, true);
    auto tok = encode_all(*e, in);
    EXPECT_LE(std::max(max_diff(tok.q, ref.q), max_diff(tok.k, ref.k)), 1e-12) << scan;
    (tok.q.sum() + tok.k.pow(2).sum()).backward();
    auto g = e->named_parameters()["w_a"].grad();
    if (scan == "sequential") continue;
    auto r = make(PeOptions{{"scan", "sequential"}}, true);
    auto rt = encode_all(*r, in);
    (rt.q.sum() + rt.k.pow(2).sum()).backward();
    EXPECT_LE(max_diff(g, r->named_parameters()["w_a"].grad()), 1e-11) << scan;
  }
}

TEST(HddRope, StreamingWithTheRunningProductEqualsOneFullPass) {
  for (const char* scan : {"loop", "sklansky", "brent-kung", "hillis-steele"}) {
    auto e = make(PeOptions{{"scan", scan}}, true);
    auto in = random_inputs(2, 15, 14);
    auto full_st = e->initial_state(2, 0);
    auto full_tok = e->encode(in.q, in.k, in.x, full_st);
    auto full = attention_logits(*e, full_tok, KeyCache::from(full_tok));
    auto st = e->initial_state(2, 0);
    KeyCache cache;
    double err = 0.0;
    int64_t start = 0;
    for (int64_t len : {1, 3, 1, 7, 2, 1}) {
      auto tok =
          e->encode(in.q.narrow(1, start, len), in.k.narrow(1, start, len), in.x.narrow(1, start, len), st);
      cache.append(tok);
      err = std::max(err, max_diff(attention_logits(*e, tok, cache),
                                   full.narrow(2, start, len).narrow(3, 0, start + len)));
      start += len;
    }
    EXPECT_LE(err, 1e-12) << scan;
    EXPECT_LE(max_diff(st.values.at("P"), full_st.values.at("P")), 1e-12) << scan;
    EXPECT_EQ(st.values.at("P").sizes(), (torch::IntArrayRef{2, kShape.heads, 3, 4, 4}));
  }
}

// ---- gradients at the identity (tau = 0: the closed forms' series branch) -----------------------------

TEST(HddRope, GradientsAtTheIdentityAreFiniteAndMatchFiniteDifferences) {
  for (auto [kk, map] : std::vector<std::pair<std::string, std::string>>{
           {"2", "exp"}, {"3", "exp"}, {"4", "exp"}, {"6", "exp"}, {"4", "cayley"}}) {
    auto e = make(PeOptions{{"k", kk}, {"map", map}, {"static_rate", "false"}});  // R = I for every token
    auto in = random_inputs(1, 6, 15);
    auto w = torch::randn({1, 6, kShape.heads, kShape.head_dim}, f64);
    auto loss = [&] {
      auto tok = encode_all(*e, in);
      return (tok.q * w).sum() + (tok.k * tok.k.roll(1, -1)).sum();
    };
    auto wa = e->named_parameters()["w_a"];
    loss().backward();
    auto grad = wa.grad().clone();
    ASSERT_TRUE(torch::isfinite(grad).all().item<bool>()) << kk << " " << map;
    auto dir = torch::randn_like(wa);
    const double ad = (grad * dir).sum().item<double>(), h = 1e-6;
    torch::NoGradGuard ng;
    wa.add_(dir * h);
    const double up = loss().item<double>();
    wa.sub_(2 * h * dir);
    const double down = loss().item<double>();
    wa.add_(dir * h);
    const double fd = (up - down) / (2 * h);
    EXPECT_GT(std::abs(ad), 1e-3) << kk << " " << map;  // the rotations do depend on w_a at R = I
    EXPECT_LE(std::abs(fd - ad) / std::max(std::abs(fd), 1e-3), 1e-6) << kk << " " << map;
  }
}

// ---- the fast path's hand-written backwards -------------------------------------------------------------

// Central differences of f along random directions of every input, against sum(direction * grad):
// the worst relative gap. f is a scalar of the inputs; h = 1e-6 in float64 (error ~1e-10).
double fd_gap(const std::function<torch::Tensor(const std::vector<torch::Tensor>&)>& f,
              std::vector<torch::Tensor> inputs, uint64_t seed) {
  for (auto& t : inputs) t = t.detach().clone().requires_grad_();
  auto grads = torch::autograd::grad({f(inputs)}, inputs);
  torch::manual_seed(seed);
  double worst = 0.0;
  for (size_t i = 0; i < inputs.size(); ++i)
    for (int rep = 0; rep < 3; ++rep) {
      auto dir = torch::randn_like(inputs[i]);
      auto at = [&](double h) {
        torch::NoGradGuard ng;
        auto moved = inputs;
        moved[i] = inputs[i] + h * dir;
        return f(moved).item<double>();
      };
      const double h = 1e-6, fd = (at(h) - at(-h)) / (2 * h), ad = (grads[i] * dir).sum().item<double>();
      worst = std::max(worst, std::abs(fd - ad) / std::max({std::abs(fd), std::abs(ad), 1e-3}));
    }
  return worst;
}

TEST(HddRope, LoopRotationsEqualSkewExpWithExactGradients) {
  // hdd::rotations (plain loops, hand-written backward for k = 2, 4) against skew_exp of the same generator
  // differentiated by autograd, and against finite differences. Scales cover both cos/sinc branches
  // (tau^2 < 1e-4 and above) and the derivative's series (tau^2 < 1e-2).
  for (int64_t k : {2, 4}) {
    const int64_t M = k * (k - 1) / 2;
    for (double scale : {0.0, 1e-3, 0.05, 0.3, 1.0, 3.0}) {
      torch::manual_seed(20 + k);
      auto c = (torch::randn({7, M}, f64) * scale).requires_grad_();
      auto W = torch::randn({7, k, k}, f64);
      auto R = hdd::rotations(c, k);
      auto ref = hdd::skew_exp(hdd::skew_from_coefficients(c, k));
      EXPECT_LE(max_diff(R, ref), 1e-14) << k << " " << scale;
      auto g = torch::autograd::grad({(R * W).sum()}, {c})[0];
      auto g_ref = torch::autograd::grad({(ref * W).sum()}, {c})[0];
      const double gap = max_diff(g, g_ref);
      const double fd =
          fd_gap([&](const std::vector<torch::Tensor>& in) { return (hdd::rotations(in[0], k) * W).sum(); },
                 {c}, 30 + k);
      std::printf("  rotations k=%ld scale %g: grad vs autograd(skew_exp) %.3g, vs fd %.3g\n", long(k), scale,
                  gap, fd);
      EXPECT_LE(gap, 1e-12) << k << " " << scale;
      EXPECT_LE(fd, 1e-7) << k << " " << scale;
    }
  }
}

// The fast scan fused with the rotation against an explicit LibTorch loop, in values and in the gradients
// of P0, R, q and k (autograd of the loop, and finite differences), for k = 2, 4 (unrolled) and 3 (any k).
TEST(HddRope, LoopScanAndRotationMatchAnExplicitLoopWithExactGradients) {
  const int64_t B = 2, H = 2, T = 5;
  for (int64_t kk : {2, 3, 4}) {
    const int64_t G = 3, D = kk * G;
    torch::manual_seed(40 + kk);
    // General matrices (not rotations): a transposed factor or a wrong order shows at once.
    auto P0 = torch::eye(kk, f64) + 0.3 * torch::randn({B, H, G, kk, kk}, f64);
    auto R = torch::eye(kk, f64) + 0.3 * torch::randn({B, H, G, T, kk, kk}, f64);
    auto q = torch::randn({B, T, H, D}, f64), k = torch::randn({B, T, H, D}, f64);
    auto Wq = torch::randn({B, T, H, D}, f64), Wk = torch::randn({B, T, H, D}, f64);
    auto WP = torch::randn({B, H, G, kk, kk}, f64);
    auto reference = [&](const std::vector<torch::Tensor>& in) {
      auto P = in[0];
      std::vector<torch::Tensor> Ps;
      for (int64_t t = 0; t < T; ++t) Ps.push_back(P), P = torch::matmul(P, in[1].select(3, t));
      auto Pt = torch::stack(Ps, 3);            // [B,H,G,T,k,k]
      auto rot = [&](const torch::Tensor& v) {  // chunk g = coordinates g + jG
        return torch::einsum("bhgtij,bthjg->bthig", {Pt, v.reshape({B, T, H, kk, G})}).reshape({B, T, H, D});
      };
      return std::array<torch::Tensor, 3>{rot(in[2]), rot(in[3]), P};
    };
    auto fast = [&](const std::vector<torch::Tensor>& in) {
      return hdd::rotate_by_running_product(in[0], in[1], in[2], in[3]);
    };
    auto loss = [&](const std::array<torch::Tensor, 3>& o) {
      return (o[0] * Wq).sum() + (o[1] * Wk).sum() + (o[2] * WP).sum();
    };
    std::vector<torch::Tensor> in{P0, R, q, k};
    for (auto& t : in) t.requires_grad_();
    auto got = fast(in), want = reference(in);
    for (int i = 0; i < 3; ++i) EXPECT_LE(max_diff(got[i], want[i]), 1e-13) << kk << " output " << i;
    auto g = torch::autograd::grad({loss(got)}, in), g_ref = torch::autograd::grad({loss(want)}, in);
    double gap = 0.0;
    for (int i = 0; i < 4; ++i) gap = std::max(gap, max_diff(g[i], g_ref[i]));
    // Only q~ used: the other outputs' gradients are absent (undefined) and count as zero.
    auto g1 = torch::autograd::grad({(fast(in)[0] * Wq).sum()}, in);
    auto g1_ref =
        torch::autograd::grad({(reference(in)[0] * Wq).sum()}, in, {}, false, false, /*allow_unused=*/true);
    for (int i = 0; i < 3; ++i) gap = std::max(gap, max_diff(g1[i], g1_ref[i]));
    EXPECT_EQ(g1[3].abs().max().item<double>(), 0.0);  // k~ unused
    const double fd = fd_gap([&](const std::vector<torch::Tensor>& x) { return loss(fast(x)); }, in, 50 + kk);
    std::printf("  loop scan k=%ld: grads vs autograd of the loop %.3g, vs fd %.3g\n", long(kk), gap, fd);
    EXPECT_LE(gap, 1e-12) << kk;
    EXPECT_LE(fd, 1e-7) << kk;
    // float32 q and k: the same rotation (products stay float64), to float32 round-off.
    auto got32 = hdd::rotate_by_running_product(P0, R, q.to(torch::kFloat32), k.to(torch::kFloat32));
    EXPECT_EQ(got32[0].scalar_type(), torch::kFloat32);
    EXPECT_LE(std::max(max_diff(got32[0], want[0]), max_diff(got32[1], want[1])), 1e-5) << kk;
    EXPECT_LE(max_diff(got32[2], want[2]), 1e-13) << kk;
  }
  // The products alone (running_product "loop"): gradient of general matrices against "sequential".
  torch::manual_seed(60);
  auto M = (torch::eye(3, f64) + 0.4 * torch::randn({2, 9, 3, 3}, f64)).requires_grad_();
  auto W = torch::randn({2, 9, 3, 3}, f64);
  auto g = torch::autograd::grad({(hdd::running_product(M, "loop") * W).sum()}, {M})[0];
  auto g_ref = torch::autograd::grad({(hdd::running_product(M, "sequential") * W).sum()}, {M})[0];
  EXPECT_LE(max_diff(g, g_ref), 1e-12);
  // Mismatched shapes are refused.
  expect_invalid(
      [] {
        hdd::rotate_by_running_product(torch::zeros({1, 1, 2, 4, 4}, f64),
                                       torch::zeros({1, 1, 2, 3, 4, 4}, f64), torch::zeros({1, 3, 1, 6}),
                                       torch::zeros({1, 3, 1, 6}));
      },
      "rotate_by_running_product needs");
}

// ---- registry and bad input -----------------------------------------------------------------------------

TEST(HddRope, RegistryEntryAndInit) {
  const auto& info = encoding_info("hdd-rope");
  EXPECT_EQ(info.family, "multiplicative");
  auto e = make_encoding("hdd-rope", kShape);
  auto params = e->named_parameters();
  EXPECT_EQ(params["w_a"].sizes(), (torch::IntArrayRef{2, 3, 6, 10}));
  EXPECT_EQ(params["b_a"].sizes(), (torch::IntArrayRef{2, 3, 6}));
  EXPECT_EQ(params["w_a"].abs().max().item<double>(), 0.0);
  EXPECT_EQ(params["b_a"].abs().max().item<double>(), 0.0);
  const auto p = e->properties();
  EXPECT_TRUE(p.rotates && p.contextual && p.relative && !p.has_bias);
  EXPECT_TRUE(fused_supported(*e));  // no bias: the rotation is a pre-pass of the fused kernel
  // static_rate=false with zero weights is NoPE.
  auto none = make(PeOptions{{"static_rate", "false"}});
  auto in = random_inputs(1, 7, 16);
  auto tok = encode_all(*none, in);
  EXPECT_EQ(max_diff(tok.q, in.q), 0.0);
}

TEST(HddRope, RefusesBadInput) {
  auto bad = [&](HeadShape s, PeOptions o, const std::string& part) {
    expect_invalid([&] { make_encoding("hdd-rope", s, o); }, part);
  };
  bad({2, 13, 10}, {}, "head_dim 13 is not divisible by k=4");  // odd head_dim
  bad(kShape, {{"k", "5"}}, "head_dim 12 is not divisible by k=5");
  bad(kShape, {{"k", "1"}}, "k must be in [2, head_dim=12], got 1");
  bad(kShape, {{"k", "24"}}, "k must be in [2, head_dim=12], got 24");
  bad(kShape, {{"k", "four"}}, "option k: 'four' is not an integer");
  bad(kShape, {{"map", "polar"}}, "option map: 'polar' is not one of exp|cayley");
  bad(kShape, {{"scan", "blelloch"}},
      "option scan: 'blelloch' is not one of loop|sequential|hillis-steele|brent-kung|sklansky");
  bad(kShape, {{"base", "1"}}, "hdd-rope: base must be > 1, got 1");
  bad(kShape, {{"rate_scale", "0"}}, "hdd-rope: rate_scale must be > 0, got 0");
  bad(kShape, {{"static_rate", "maybe"}}, "option static_rate: 'maybe' is not a boolean");
  bad(kShape, {{"pairing", "half"}}, "unknown parameter 'pairing' for encoding 'hdd-rope'");
  expect_invalid(
      [] {
        hdd::running_product(torch::eye(2, f64).expand({3, 2, 2}), "blelloch");
      },
      "unknown scan 'blelloch'");

  auto e = make();
  auto in = random_inputs(2, 5, 17);
  auto st = e->initial_state(2, 0);
  auto nan_x = in.x.clone();
  nan_x[1][3][2] = std::nan("");
  expect_invalid([&] { e->encode(in.q, in.k, nan_x, st); }, "hdd-rope: x contains NaN or Inf values");
  expect_invalid([&] { e->encode(in.q, in.k, torch::Tensor(), st); }, "needs the layer input x");
  expect_invalid([&] { e->encode(in.q, in.k, in.x.narrow(2, 0, 9), st); },
                 "x must be [B=2,T=5,C=10], got [2,5,9]");
  EXPECT_EQ(st.next_pos, 0);  // refused inputs leave the state alone
  auto st3 = e->initial_state(3, 0);
  expect_invalid([&] { e->encode(in.q, in.k, in.x, st3); },
                 "state P is [3,2,3,4,4] but the input needs [2,2,3,4,4]");
  auto e32 = make_encoding("hdd-rope", kShape);
  expect_invalid([&] { e32->encode(in.q, in.k, in.x, st); },
                 "inputs are Double but the encoding's parameters are Float");
}

}  // namespace
}  // namespace grape
