// The fp32 rotation kernel (src/kernels/cpu/rotary.cpp, bound as rotate_pairs) against its LibTorch oracle
// rotate_pairs_composed in float64, forward and backward; and the finite check behind every encode.
#include <gtest/gtest.h>

#include <cfloat>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "grape/pe.hpp"
#include "kernels/cpu/finite.hpp"
#include "kernels/cpu/rotary.hpp"
#include "tensor_checks.hpp"

namespace {

using grape::rotate_pairs;
using grape::rotate_pairs_composed;

const auto f32 = torch::kFloat32;
using grape::testing::f64;

// max |a - b| / max |b| (b is the float64 reference).
double rel_err(const torch::Tensor& a, const torch::Tensor& b) {
  const double scale = b.abs().max().item<double>();
  return (a.to(f64) - b.to(f64)).abs().max().item<double>() / (scale > 0 ? scale : 1.0);
}

struct Case {
  std::string pairing;
  double sign;
  int64_t D, P;
  std::vector<int64_t> x_shape, ang_shape;
  double angle_scale = 3.0;  // angles ~ N(0, 1) * angle_scale
  bool strided_x = false;    // x a non-contiguous view
};

std::string describe(const Case& c) {
  return c.pairing + " sign " + std::to_string(int(c.sign)) + " D " + std::to_string(c.D) + " P " +
         std::to_string(c.P) + " x " + grape::shape_string(torch::empty(c.x_shape)) + " angles " +
         grape::shape_string(torch::empty(c.ang_shape)) + " scale " + std::to_string(c.angle_scale) +
         (c.strided_x ? " strided" : "");
}

// x as Case says: contiguous, or the transpose of a contiguous [.., H, T, D] tensor (a strided view).
torch::Tensor make_x(const Case& c, torch::ScalarType dtype) {
  if (!c.strided_x) return torch::randn(c.x_shape, dtype);
  auto s = c.x_shape;
  std::swap(s[1], s[2]);
  return torch::randn(s, dtype).transpose(1, 2);
}

// The shapes the encodings pass (grep rotate_pairs in src/pe): x [B,T,H,D] with angles [1,T,1,P] (rope,
// grape-m, xpos, mixture's rest, path-integral probes), [1,T,H,P] (per-head frequencies), [B,T,G,P]
// (contextual phases); plus fewer angle dims ([T,1,P], [P]) and x [T,D].
std::vector<Case> grid() {
  std::vector<Case> cases;
  const int64_t B = 2, T = 5, H = 3;
  for (const std::string pairing : {"half", "interleaved"})
    for (double sign : {1.0, -1.0})
      for (int64_t D : {2, 6, 32, 64, 128})
        for (int64_t P : {D / 2, D / 2 - 1, D / 4}) {
          if (P < 1 || (P == D / 4 && D < 32)) continue;
          const std::vector<std::vector<int64_t>> angs = {{1, T, 1, P}, {1, T, H, P}, {B, T, H, P},
                                                          {B, T, 1, P}, {T, 1, P},    {P}};
          for (const auto& a : angs) cases.push_back({pairing, sign, D, P, {B, T, H, D}, a});
          cases.push_back({pairing, sign, D, P, {B, T, H, D}, {1, T, 1, P}, 1e4});  // fmod path
          cases.push_back({pairing, sign, D, P, {B, T, H, D}, {1, T, 1, P}, 3.0, true});
          cases.push_back({pairing, sign, D, P, {T, D}, {T, P}});
          cases.push_back({pairing, sign, D, P, {D}, {P}});  // one row
        }
  // Big enough for two OpenMP threads in the kernel.
  for (const std::string pairing : {"half", "interleaved"}) {
    cases.push_back({pairing, 1.0, 64, 32, {2, 64, 8, 64}, {1, 64, 1, 32}});
    cases.push_back({pairing, -1.0, 64, 16, {2, 64, 8, 64}, {2, 64, 8, 16}, 1e4, true});
  }
  return cases;
}

TEST(RotaryKernel, ForwardMatchesComposedFloat64OverGrid) {
  torch::manual_seed(11);
  const auto cases = grid();
  ASSERT_GT(cases.size(), 300u);
  for (const auto& c : cases) {
    SCOPED_TRACE(describe(c));
    auto x = make_x(c, f32);
    auto ang = torch::randn(c.ang_shape, f64) * c.angle_scale;
    auto y = rotate_pairs(x, ang, c.pairing, c.sign);
    ASSERT_EQ(y.sizes(), x.sizes());
    ASSERT_EQ(y.scalar_type(), f32);
    auto ref = rotate_pairs_composed(x.to(f64), ang, c.pairing, c.sign);
    EXPECT_LE(rel_err(y, ref), 1e-5);
    // The coordinates past 2P are copied exactly.
    if (2 * c.P < c.D)
      EXPECT_TRUE(torch::equal(y.narrow(-1, 2 * c.P, c.D - 2 * c.P), x.narrow(-1, 2 * c.P, c.D - 2 * c.P)));
  }
}

TEST(RotaryKernel, NonFloat32KeepsTheComposedPath) {
  torch::manual_seed(12);
  auto x = torch::randn({2, 4, 3, 8}, f64);
  auto ang = torch::randn({1, 4, 1, 3}, f64) * 5;
  for (const std::string pairing : {"half", "interleaved"})
    EXPECT_TRUE(
        torch::equal(rotate_pairs(x, ang, pairing, -1.0), rotate_pairs_composed(x, ang, pairing, -1.0)));
}

TEST(RotaryKernel, EmptyInputsGiveEmptyOutputsAndGradients) {
  auto x = torch::randn({2, 0, 3, 8}, f32).requires_grad_(true);
  auto ang = torch::randn({1, 0, 1, 4}, f64).requires_grad_(true);
  auto y = rotate_pairs(x, ang, "half");
  EXPECT_EQ(y.sizes(), x.sizes());
  y.sum().backward();
  EXPECT_EQ(x.grad().sizes(), x.sizes());
  EXPECT_EQ(ang.grad().sizes(), ang.sizes());
}

TEST(RotaryKernel, InverseTurnUndoesTheForward) {
  // Direct kernel call: rows of x [4,3,10] against c, s [4,1,4] (stride 0 on the middle dim), P = 4 < D/2.
  torch::manual_seed(13);
  for (auto pairing : {grape::kernels::cpu::Pairing::half, grape::kernels::cpu::Pairing::interleaved}) {
    auto x = torch::randn({4, 3, 10}, f32);
    auto ang = torch::randn({4, 1, 4}, f64) * 3;
    auto c = torch::cos(ang).to(f32), s = torch::sin(ang).to(f32);
    grape::kernels::cpu::RotaryRows r;
    r.dims = 2;
    r.sizes[0] = 4, r.sizes[1] = 3;
    r.strides[0] = 4, r.strides[1] = 0;
    r.D = 10, r.P = 4, r.pairing = pairing;
    auto y = torch::empty_like(x), back = torch::empty_like(x);
    grape::kernels::cpu::rotary_forward(r, x.data_ptr<float>(), c.data_ptr<float>(), s.data_ptr<float>(),
                                        false, y.data_ptr<float>());
    grape::kernels::cpu::rotary_forward(r, y.data_ptr<float>(), c.data_ptr<float>(), s.data_ptr<float>(),
                                        true, back.data_ptr<float>());
    EXPECT_LE(rel_err(back, x), 1e-6);
    EXPECT_GT(rel_err(y, x), 0.1);  // it did turn
    const bool half = pairing == grape::kernels::cpu::Pairing::half;
    EXPECT_LE(rel_err(y, rotate_pairs_composed(x.to(f64), torch::atan2(s, c).to(f64),
                                               half ? "half" : "interleaved")),
              1e-6);
  }
}

// Gradients of sum(y * w) with respect to x and to the angles' source, through the kernel (x fp32) and
// through the composed op in float64.
struct Grads {
  torch::Tensor dx, dlog;
};
Grads grads(const torch::Tensor& x0, const torch::Tensor& pos, const torch::Tensor& log_freq0,
            const torch::Tensor& w, const std::string& pairing, double sign, bool kernel, bool x_grad = true,
            bool ang_grad = true) {
  auto x = x0.detach().clone().requires_grad_(x_grad);
  auto log_freq = log_freq0.detach().clone().requires_grad_(ang_grad);
  auto ang = pos * torch::exp(log_freq);  // float64 angles, as the encodings form them
  auto y = kernel ? rotate_pairs(x, ang, pairing, sign) : rotate_pairs_composed(x, ang, pairing, sign);
  (y * w).sum().backward();
  return {x_grad ? x.grad() : torch::Tensor(), ang_grad ? log_freq.grad() : torch::Tensor()};
}

TEST(RotaryKernel, GradientsMatchComposedFloat64) {
  torch::manual_seed(14);
  const int64_t B = 2, T = 6, H = 3;
  struct G {
    int64_t D, P;
    std::vector<int64_t> freq_shape;  // the learned log-frequencies; angles = pos [1,T,1,1] * exp(freq)
  };
  const std::vector<G> gs = {
      {8, 4, {1, 4}}, {10, 3, {H, 3}}, {64, 32, {1, 32}}, {6, 2, {B, T, H, 2}}, {2, 1, {1}}};
  for (const std::string pairing : {"half", "interleaved"})
    for (double sign : {1.0, -1.0})
      for (const auto& g : gs) {
        SCOPED_TRACE(pairing + " sign " + std::to_string(int(sign)) + " D " + std::to_string(g.D) + " P " +
                     std::to_string(g.P) + " freq " + grape::shape_string(torch::empty(g.freq_shape)));
        auto x = torch::randn({B, T, H, g.D}, f32);
        auto pos = torch::arange(100, 100 + T, f64).view({1, T, 1, 1});
        auto log_freq = torch::randn(g.freq_shape, f64) * 0.5 - 1.0;
        auto w = torch::randn({B, T, H, g.D}, f64);
        auto k = grads(x, pos, log_freq, w.to(f32), pairing, sign, true);
        auto ref = grads(x.to(f64), pos, log_freq, w, pairing, sign, false);
        EXPECT_LE(rel_err(k.dx, ref.dx), 1e-4);
        EXPECT_LE(rel_err(k.dlog, ref.dlog), 1e-4);
        // Only one of the two asked for.
        EXPECT_LE(rel_err(grads(x, pos, log_freq, w.to(f32), pairing, sign, true, true, false).dx, ref.dx),
                  1e-4);
        EXPECT_LE(
            rel_err(grads(x, pos, log_freq, w.to(f32), pairing, sign, true, false, true).dlog, ref.dlog),
            1e-4);
      }
}

TEST(RotaryKernel, GradientsOfStridedXAndBroadcastAngles) {
  // x a transposed view, angles [T,1,P] directly as the leaf (sum over B and H in the backward).
  torch::manual_seed(15);
  for (const std::string pairing : {"half", "interleaved"}) {
    auto xs = torch::randn({2, 3, 5, 12}, f32).transpose(1, 2);  // [2,5,3,12], not contiguous
    auto ang = torch::randn({5, 1, 5}, f64) * 2;
    auto w = torch::randn({2, 5, 3, 12}, f64);
    auto run = [&](const torch::Tensor& x0, bool kernel) {
      auto x = x0.detach().clone().requires_grad_(true);
      auto a = ang.clone().requires_grad_(true);
      auto y = kernel ? rotate_pairs(x, a, pairing) : rotate_pairs_composed(x, a, pairing);
      (y * w.to(x0.scalar_type())).sum().backward();
      return std::make_pair(x.grad(), a.grad());
    };
    auto [dx, da] = run(xs, true);
    auto [rdx, rda] = run(xs.to(f64), false);
    EXPECT_EQ(da.sizes(), ang.sizes());
    EXPECT_LE(rel_err(dx, rdx), 1e-4) << pairing;
    EXPECT_LE(rel_err(da, rda), 1e-4) << pairing;
  }
}

TEST(RotaryKernel, AnalyticGradientMatchesFiniteDifferencesOfComposedFloat64) {
  // Central differences of L = sum(w * rotate_pairs_composed(x, angles)) in float64 are the oracle of the
  // fp32 kernel's analytic gradient, for every entry of x and of the angles.
  torch::manual_seed(16);
  for (const std::string pairing : {"half", "interleaved"}) {
    auto x = torch::randn({1, 3, 2, 8}, f64);
    auto ang = torch::randn({1, 3, 1, 3}, f64) * 2;
    auto w = torch::randn({1, 3, 2, 8}, f64);
    auto loss = [&](const torch::Tensor& xx, const torch::Tensor& aa) {
      return (rotate_pairs_composed(xx, aa, pairing, -1.0) * w).sum().item<double>();
    };
    auto fd = [&](torch::Tensor& t, bool is_x) {
      auto g = torch::zeros_like(t);
      auto flat = t.view(-1);
      const double h = 1e-6;
      for (int64_t i = 0; i < flat.numel(); ++i) {
        const double v = flat[i].item<double>();
        flat[i] = v + h;
        const double up = is_x ? loss(t, ang) : loss(x, t);
        flat[i] = v - h;
        const double down = is_x ? loss(t, ang) : loss(x, t);
        flat[i] = v;
        g.view(-1)[i] = (up - down) / (2 * h);
      }
      return g;
    };
    auto fd_x = fd(x, true), fd_a = fd(ang, false);
    auto xk = x.to(f32).requires_grad_(true);
    auto ak = ang.clone().requires_grad_(true);
    (rotate_pairs(xk, ak, pairing, -1.0) * w.to(f32)).sum().backward();
    EXPECT_LE(rel_err(xk.grad(), fd_x), 1e-4) << pairing;
    EXPECT_LE(rel_err(ak.grad(), fd_a), 1e-4) << pairing;
  }
}

TEST(RotaryKernel, BadShapesAreClearErrors) {
  auto x = torch::randn({2, 5, 3, 8});
  auto expect_error = [](auto fn, const std::string& needle) {
    try {
      fn();
      ADD_FAILURE() << "no error, expected one naming: " << needle;
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_error([&] { rotate_pairs(x, torch::zeros({1, 5, 1, 5}), "half"); }, "5 pairs do not fit in 8 dims");
  expect_error([&] { rotate_pairs(x, torch::zeros({3, 5, 1, 4}), "half"); }, "do not broadcast");
  expect_error([&] { rotate_pairs(x, torch::zeros({1, 2, 5, 3, 4}), "half"); }, "do not broadcast");
  expect_error([&] { rotate_pairs(x, torch::zeros({5, 4}), "half"); }, "do not broadcast");  // 5 vs H = 3
  expect_error(
      [&] {
        rotate_pairs(x, torch::zeros({1, 5, 1, 4}), "diagonal");
      },
      "pairing must be half or interleaved");
  expect_error([&] { rotate_pairs(x, torch::zeros({}), "half"); }, "at least one dim");
}

// ---- the finite check ------------------------------------------------------------------------------

TEST(FiniteCheck, FiniteDataOfOddLengths) {
  EXPECT_TRUE(grape::kernels::cpu::all_finite(nullptr, 0));
  for (int64_t n : {1, 15, 17, 1000003}) {
    auto t = torch::randn({n}, f32) * 1e30;
    t[n / 2] = FLT_MAX;
    t[0] = -FLT_MAX;
    t[n - 1] = n > 2 ? FLT_TRUE_MIN : -0.0f;  // subnormal / negative zero are finite
    EXPECT_TRUE(grape::kernels::cpu::all_finite(t.data_ptr<float>(), n)) << n;
  }
}

TEST(FiniteCheck, OneNonFiniteValueAnywhereIsFound) {
  const float bad[] = {std::numeric_limits<float>::quiet_NaN(), -std::numeric_limits<float>::quiet_NaN(),
                       std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity()};
  for (int64_t n : {1, 15, 17, 1000003}) {
    auto t = torch::randn({n}, f32);
    for (float v : bad)
      for (int64_t at : {int64_t(0), n / 2, n - 1}) {
        const float keep = t[at].item<float>();
        t[at] = v;
        EXPECT_FALSE(grape::kernels::cpu::all_finite(t.data_ptr<float>(), n))
            << "n " << n << " at " << at << " " << v;
        t[at] = keep;
      }
    EXPECT_TRUE(grape::kernels::cpu::all_finite(t.data_ptr<float>(), n));
  }
}

TEST(FiniteCheck, EncodeRejectsNonFiniteInputsWithTheSameMessage) {
  const int64_t H = 2, D = 8, C = 16;
  for (auto dtype : {f32, f64})
    for (const std::string name : {"rope", "grape-m", "grape-m-ctx"})
      for (const std::string which : {"q", "k", "x"}) {
        auto e = grape::make_encoding(name, {H, D, C});
        e->to(dtype);
        const bool contextual = e->properties().contextual;
        if (which == "x" && !contextual) continue;
        auto q = torch::randn({1, 4, H, D}, dtype), k = torch::randn({1, 4, H, D}, dtype);
        auto x = torch::randn({1, 4, C}, dtype);
        auto& bad = which == "q" ? q : which == "k" ? k : x;
        bad.view(-1)[5] = which == "k" ? -std::numeric_limits<double>::infinity() : std::nan("");
        auto st = e->initial_state(1);
        const std::string want = name + ": " + which + " contains NaN or Inf values";
        try {
          e->encode(q, k, contextual ? x : torch::Tensor(), st);
          ADD_FAILURE() << name << " accepted a non-finite " << which;
        } catch (const std::invalid_argument& err) {
          EXPECT_EQ(std::string(err.what()), want);
        }
        // Non-contiguous inputs (the LibTorch path) give the same message.
        if (which == "q") {
          auto qs = q.transpose(1, 2).contiguous().transpose(1, 2);
          ASSERT_FALSE(qs.is_contiguous());
          auto st2 = e->initial_state(1);
          EXPECT_THROW(
              {
                try {
                  e->encode(qs, k, contextual ? x : torch::Tensor(), st2);
                } catch (const std::invalid_argument& err) {
                  EXPECT_EQ(std::string(err.what()), want);
                  throw;
                }
              },
              std::invalid_argument);
        }
      }
}

// ---- through the encodings --------------------------------------------------------------------------

TEST(RotaryKernel, EncodingsInFloat32MatchFloat64WithGradients) {
  // rope, grape-m (per-head learned frequencies) and grape-m-ctx (contextual phases [B,T,G,P]) encoded in
  // fp32 (kernel) and, after e->to(f64), in float64 (composed): outputs and the gradients of q, k and the
  // parameters agree.
  const int64_t B = 2, T = 7, H = 4, D = 16, C = 32;
  for (const std::string name : {"rope", "grape-m", "grape-m-ctx"})
    for (const std::string pairing : {"half", "interleaved"}) {
      SCOPED_TRACE(name + " " + pairing);
      torch::manual_seed(17);
      grape::PeOptions o{{"pairing", pairing}};
      if (name == "grape-m") o.set("per_head", "true");
      auto e = grape::make_encoding(name, {H, D, C}, o);
      auto q = torch::randn({B, T, H, D}, f64), k = torch::randn({B, T, H, D}, f64),
           x = torch::randn({B, T, C}, f64);
      auto wq = torch::randn({B, T, H, D}, f64), wk = torch::randn({B, T, H, D}, f64);
      auto run = [&](torch::ScalarType dt) {
        e->to(dt);
        e->zero_grad();
        auto st = e->initial_state(B, 50);
        auto qd = q.to(dt).requires_grad_(true), kd = k.to(dt).requires_grad_(true);
        auto tok = e->encode(qd, kd, x.to(dt), st);
        ((tok.q * wq.to(dt)).sum() + (tok.k * wk.to(dt)).sum()).backward();
        std::vector<torch::Tensor> g{qd.grad().to(f64), kd.grad().to(f64)};
        for (auto& p : e->parameters()) g.push_back(p.grad().to(f64).clone());
        return std::make_pair(
            torch::cat({tok.q.detach().to(f64).flatten(), tok.k.detach().to(f64).flatten()}), g);
      };
      auto [out32, g32] = run(f32);
      auto [out64, g64] = run(f64);
      EXPECT_LE(rel_err(out32, out64), 1e-5);
      ASSERT_EQ(g32.size(), g64.size());
      for (size_t i = 0; i < g32.size(); ++i)
        EXPECT_LE(rel_err(g32[i], g64[i]), 1e-4) << "gradient " << i << " (q, k, then the parameters)";
    }
}

}  // namespace
