// Fused CPU attention kernels (src/kernels/cpu/attention.hpp) against a plain double-precision loop reference
// that materialises the logits of each (batch, head). The reference's own gradients are checked by finite
// differences, so the oracle is trusted. No LibTorch here.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/cpu/attention.hpp"

#if defined(__SSE__)
#include <xmmintrin.h>  // the caller's FTZ/DAZ mode (KernelSubnormals)
#endif

namespace {

namespace kc = grape::kernels::cpu;
using Vec = std::vector<double>;
using FVec = std::vector<float>;

constexpr double kInf = std::numeric_limits<double>::infinity();

// Which bias terms are present.
struct BiasMask {
  bool a = false, b = false, c = false, d = false;
  bool path = false;  // GRAPE-AP's path bias sum_{l=j+1..t} m_h logsigmoid(p_t . r_l / P)
  // The per-head table by distance, dist[h][min(pos_i - pos_j, W - 1)]: 0 absent, 1 W covers every distance
  // of the problem, 2 W is about half the distance range (the far pairs share the last entry).
  int dist = 0;
  bool any() const { return a || b || c || d || path || dist; }
};

// One problem in double: q [B,Tq,H,D], k, v [B,Tk,H,D], a, c [B,H,Tq], b, d [B,H,Tk] (empty when absent);
// the path bias's probes pp [B,Tq,H,P], pr [B,Tk,H,P] and slopes pm [H] (empty when absent); the distance
// table dist [H,W] (empty when absent).
struct Problem {
  kc::AttentionShape s;
  Vec q, k, v, a, b, c, d, dout;
  Vec pp, pr, pm;
  int64_t P = 0;
  Vec dist;
  int64_t W = 0;
  // The table entry of the pair (query i, key j) of head h (pos_j <= pos_i).
  int64_t dist_index(int64_t h, int64_t i, int64_t j) const {
    return h * W + std::min((s.q_offset + i) - (s.k_offset + j), W - 1);
  }
};

struct Grads {
  Vec dq, dk, dv, da, db, dc, dd, dp, dr, ddist;
};

// The path bias's edge potential psi(t, l) = m_h logsigmoid(x), x = p_t . r_l / P, and dpsi/dx.
struct Edge {
  double x, psi, dpsi_dx;
};
Edge edge(const Problem& p, int64_t b, int64_t h, int64_t i, int64_t l) {
  const auto& s = p.s;
  double dot = 0.0;
  for (int64_t e = 0; e < p.P; ++e)
    dot += p.pp[((b * s.Tq + i) * s.H + h) * p.P + e] * p.pr[((b * s.Tk + l) * s.H + h) * p.P + e];
  const double x = dot / double(p.P), m = p.pm[h];
  const double ls = std::min(x, 0.0) - std::log1p(std::exp(-std::abs(x)));
  return {x, m * ls, m / (1.0 + std::exp(x))};  // dlogsigmoid/dx = sigmoid(-x)
}

// The path bias of row i of head (b, h) against every key: bias[j] = sum_{l > j, l visible} psi(i, l).
Vec path_row(const Problem& p, int64_t b, int64_t h, int64_t i) {
  const auto& s = p.s;
  Vec bias(s.Tk, 0.0);
  if (p.pp.empty()) return bias;
  double suffix = 0.0;
  for (int64_t l = s.Tk - 1; l >= 0; --l) {
    bias[l] = suffix;
    if (s.k_offset + l <= s.q_offset + i) suffix += edge(p, b, h, i, l).psi;
  }
  return bias;
}

// ---- the reference --------------------------------------------------------------------------------------

struct RefForward {
  Vec out, lse;
  std::vector<Vec> P;  // per (b, h): [Tq][Tk] probabilities
};

RefForward ref_forward(const Problem& p) {
  const auto& s = p.s;
  const int64_t B = s.B, H = s.H, Tq = s.Tq, Tk = s.Tk, D = s.D;
  RefForward r{Vec(B * Tq * H * D, 0.0), Vec(B * H * Tq, 0.0), {}};
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      Vec P(Tq * Tk, 0.0);
      for (int64_t i = 0; i < Tq; ++i) {
        const int64_t pi = s.q_offset + i;
        const Vec path = path_row(p, b, h, i);
        Vec logit(Tk, -kInf);
        double mx = -kInf;
        for (int64_t j = 0; j < Tk; ++j) {
          const int64_t pj = s.k_offset + j;
          if (pj > pi) continue;
          double dot = 0.0;
          for (int64_t e = 0; e < D; ++e)
            dot += p.q[((b * Tq + i) * H + h) * D + e] * p.k[((b * Tk + j) * H + h) * D + e];
          double x = double(s.scale) * dot;
          const int64_t qi = (b * H + h) * Tq + i, kj = (b * H + h) * Tk + j;
          if (!p.a.empty()) x += p.a[qi];
          if (!p.b.empty()) x += p.b[kj];
          const double slope = (p.c.empty() ? 0.0 : p.c[qi]) + (p.d.empty() ? 0.0 : p.d[kj]);
          x += slope * double(pi - pj);
          x += path[j];
          if (!p.dist.empty()) x += p.dist[p.dist_index(h, i, j)];
          logit[j] = x;
          mx = std::max(mx, x);
        }
        double sum = 0.0;
        for (int64_t j = 0; j < Tk; ++j) sum += std::exp(logit[j] - mx);
        for (int64_t j = 0; j < Tk; ++j) P[i * Tk + j] = std::exp(logit[j] - mx) / sum;
        r.lse[(b * H + h) * Tq + i] = mx + std::log(sum);
        for (int64_t j = 0; j < Tk; ++j)
          for (int64_t e = 0; e < D; ++e)
            r.out[((b * Tq + i) * H + h) * D + e] += P[i * Tk + j] * p.v[((b * Tk + j) * H + h) * D + e];
      }
      r.P.push_back(std::move(P));
    }
  return r;
}

// Gradients of sum(dout * out) by the textbook formulas: dP = dout v^T, dS = P (dP - sum_j P dP).
Grads ref_backward(const Problem& p, const RefForward& f) {
  const auto& s = p.s;
  const int64_t B = s.B, H = s.H, Tq = s.Tq, Tk = s.Tk, D = s.D;
  Grads g{Vec(p.q.size(), 0.0),  Vec(p.k.size(), 0.0),   Vec(p.v.size(), 0.0), Vec(B * H * Tq, 0.0),
          Vec(B * H * Tk, 0.0),  Vec(B * H * Tq, 0.0),   Vec(B * H * Tk, 0.0), Vec(p.pp.size(), 0.0),
          Vec(p.pr.size(), 0.0), Vec(p.dist.size(), 0.0)};
  auto qx = [&](int64_t b, int64_t i, int64_t h) { return ((b * Tq + i) * H + h) * D; };
  auto kx = [&](int64_t b, int64_t j, int64_t h) { return ((b * Tk + j) * H + h) * D; };
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const Vec& P = f.P[b * H + h];
      for (int64_t i = 0; i < Tq; ++i) {
        Vec dP(Tk, 0.0);
        double delta = 0.0;
        for (int64_t j = 0; j < Tk; ++j) {
          for (int64_t e = 0; e < D; ++e) dP[j] += p.dout[qx(b, i, h) + e] * p.v[kx(b, j, h) + e];
          delta += P[i * Tk + j] * dP[j];
        }
        for (int64_t j = 0; j < Tk; ++j) {
          const double pij = P[i * Tk + j];
          if (pij == 0.0) continue;
          const double ds = pij * (dP[j] - delta);
          const double dist = double((s.q_offset + i) - (s.k_offset + j));
          for (int64_t e = 0; e < D; ++e) {
            g.dv[kx(b, j, h) + e] += pij * p.dout[qx(b, i, h) + e];
            g.dk[kx(b, j, h) + e] += double(s.scale) * ds * p.q[qx(b, i, h) + e];
            g.dq[qx(b, i, h) + e] += double(s.scale) * ds * p.k[kx(b, j, h) + e];
          }
          const int64_t qi = (b * H + h) * Tq + i, kj = (b * H + h) * Tk + j;
          g.da[qi] += ds, g.db[kj] += ds, g.dc[qi] += ds * dist, g.dd[kj] += ds * dist;
          if (!p.dist.empty()) g.ddist[p.dist_index(h, i, j)] += ds;
        }
        if (p.pp.empty()) continue;
        // Path bias: the bias of key j holds psi(i, l) for every visible l > j, so dpsi(i, l) = sum_{j<l} dS.
        double prefix = 0.0;  // sum of dS(i, j) over j < l
        for (int64_t l = 0; l < Tk; ++l) {
          const double pij = P[i * Tk + l];
          if (s.k_offset + l > s.q_offset + i) break;
          const Edge e = edge(p, b, h, i, l);
          const double gx = prefix * e.dpsi_dx / double(p.P);
          for (int64_t c = 0; c < p.P; ++c) {
            g.dp[((b * Tq + i) * H + h) * p.P + c] += gx * p.pr[((b * Tk + l) * H + h) * p.P + c];
            g.dr[((b * Tk + l) * H + h) * p.P + c] += gx * p.pp[((b * Tq + i) * H + h) * p.P + c];
          }
          prefix += pij * (dP[l] - delta);
        }
      }
    }
  if (p.a.empty()) std::fill(g.da.begin(), g.da.end(), 0.0);  // an absent term has gradient 0
  if (p.b.empty()) std::fill(g.db.begin(), g.db.end(), 0.0);
  if (p.c.empty()) std::fill(g.dc.begin(), g.dc.end(), 0.0);
  if (p.d.empty()) std::fill(g.dd.begin(), g.dd.end(), 0.0);
  return g;
}

// ---- problems and kernel calls ----------------------------------------------------------------------------

Problem make_problem(kc::AttentionShape s, BiasMask m, uint32_t seed) {
  std::mt19937 rng(seed);
  auto fill = [&](int64_t n, double sd) {
    std::normal_distribution<double> nd(0.0, sd);
    Vec x(n);
    for (auto& e : x) e = double(float(nd(rng)));  // exactly representable in fp32
    return x;
  };
  Problem p;
  p.s = s;
  const int64_t nq = s.B * s.Tq * s.H * s.D, nk = s.B * s.Tk * s.H * s.D;
  p.q = fill(nq, 1.0), p.k = fill(nk, 1.0), p.v = fill(nk, 1.0), p.dout = fill(nq, 1.0);
  if (m.a) p.a = fill(s.B * s.H * s.Tq, 2.0);
  if (m.b) p.b = fill(s.B * s.H * s.Tk, 2.0);
  if (m.c) p.c = fill(s.B * s.H * s.Tq, 0.05);
  if (m.d) p.d = fill(s.B * s.H * s.Tk, 0.05);
  if (m.path) {
    p.P = 8;
    p.pp = fill(s.B * s.Tq * s.H * p.P, 1.5), p.pr = fill(s.B * s.Tk * s.H * p.P, 1.5);
    p.pm = fill(s.H, 0.3);
    for (auto& e : p.pm) e = std::abs(e) + 0.05;  // ALiBi-like positive slopes
  }
  if (m.dist) {
    const int64_t range = s.q_offset + s.Tq - s.k_offset;  // distances 0 .. range - 1 occur
    p.W = m.dist == 1 ? range : std::max<int64_t>(1, range / 2 + 1);
    p.dist = fill(s.H * p.W, 1.0);
  }
  return p;
}

FVec to_f(const Vec& x) { return FVec(x.begin(), x.end()); }

// fp32 copies of a problem's inputs, and the bias view the kernels take.
struct FProblem {
  FVec q, k, v, a, b, c, d, dout, pp, pr, pm, dist;
  int64_t P, W;
  explicit FProblem(const Problem& p)
      : q(to_f(p.q)),
        k(to_f(p.k)),
        v(to_f(p.v)),
        a(to_f(p.a)),
        b(to_f(p.b)),
        c(to_f(p.c)),
        d(to_f(p.d)),
        dout(to_f(p.dout)),
        pp(to_f(p.pp)),
        pr(to_f(p.pr)),
        pm(to_f(p.pm)),
        dist(to_f(p.dist)),
        P(p.P),
        W(p.W) {}
  kc::BiasTerms bias() const {
    auto ptr = [](const FVec& x) { return x.empty() ? nullptr : x.data(); };
    kc::BiasTerms bias{ptr(a), ptr(b), ptr(c), ptr(d)};
    bias.p = ptr(pp), bias.r = ptr(pr), bias.m = ptr(pm), bias.P = P;
    bias.dist = ptr(dist), bias.W = W;
    return bias;
  }
  // The kernels' parameters: these inputs with the given shape, bias and outputs.
  kc::ForwardParams forward(const kc::AttentionShape& s, const kc::BiasTerms& terms, FVec& out,
                            FVec& lse) const {
    return {.shape = s,
            .q = q.data(),
            .k = k.data(),
            .v = v.data(),
            .bias = terms,
            .out = out.data(),
            .lse = lse.data()};
  }
  kc::BackwardParams backward(const kc::AttentionShape& s, const kc::BiasTerms& terms, const FVec& out,
                              const FVec& lse, FVec& dq, FVec& dk, FVec& dv,
                              const kc::BiasGrads& grads) const {
    return {.shape = s,
            .q = q.data(),
            .k = k.data(),
            .v = v.data(),
            .bias = terms,
            .out = out.data(),
            .dout = dout.data(),
            .lse = lse.data(),
            .dq = dq.data(),
            .dk = dk.data(),
            .dv = dv.data(),
            .bias_grads = grads};
  }
};

double max_abs(const Vec& x) {
  double m = 0.0;
  for (double e : x) m = std::max(m, std::abs(e));
  return m;
}

double max_err(const FVec& got, const Vec& want) {
  EXPECT_EQ(got.size(), want.size());
  double m = 0.0;
  for (size_t i = 0; i < got.size() && i < want.size(); ++i) {
    const double e = std::abs(double(got[i]) - want[i]);
    m = std::isnan(e) ? kInf : std::max(m, e);
  }
  return m;
}

std::string describe(const kc::AttentionShape& s, BiasMask m) {
  return "B=" + std::to_string(s.B) + " H=" + std::to_string(s.H) + " Tq=" + std::to_string(s.Tq) +
         " Tk=" + std::to_string(s.Tk) + " D=" + std::to_string(s.D) +
         " q_offset=" + std::to_string(s.q_offset) + " k_offset=" + std::to_string(s.k_offset) +
         " bias=" + (m.a ? "a" : "") + (m.b ? "b" : "") + (m.c ? "c" : "") + (m.d ? "d" : "") +
         (m.path ? "+path" : "") + (m.dist ? "+dist(W=" + std::to_string(m.dist) + ")" : "");
}

// Runs forward (and backward when asked) on one problem and compares every output with the reference.
void check_problem(kc::AttentionShape s, BiasMask m, bool backward, uint32_t seed) {
  SCOPED_TRACE(describe(s, m));
  const Problem p = make_problem(s, m, seed);
  const FProblem f(p);
  const RefForward ref = ref_forward(p);
  FVec out(p.q.size()), lse(s.B * s.H * s.Tq);
  kc::attention_forward(f.forward(s, f.bias(), out, lse));
  EXPECT_LE(max_err(out, ref.out) / std::max(1.0, max_abs(ref.out)), 1e-4);
  EXPECT_LE(max_err(lse, ref.lse), 1e-4);
  if (!backward) return;
  const Grads want = ref_backward(p, ref);
  FVec dq(p.q.size()), dk(p.k.size()), dv(p.v.size());
  FVec da(s.B * s.H * s.Tq, -1.f), dc(da), db(s.B * s.H * s.Tk, -1.f), dd(db);  // -1: must be overwritten
  FVec dp(p.pp.size(), -1.f), dr(p.pr.size(), -1.f), ddist(p.dist.size(), -1.f);
  kc::attention_backward(f.backward(s, f.bias(), out, lse, dq, dk, dv,
                                    {.da = da.data(),
                                     .db = db.data(),
                                     .dc = dc.data(),
                                     .dd = dd.data(),
                                     .dp = m.path ? dp.data() : nullptr,
                                     .dr = m.path ? dr.data() : nullptr,
                                     .ddist = m.dist ? ddist.data() : nullptr}));
  auto expect_close = [](const char* name, const FVec& got, const Vec& ref) {
    EXPECT_LE(max_err(got, ref), 1e-3 * std::max(1.0, max_abs(ref))) << name;
  };
  expect_close("dq", dq, want.dq);
  expect_close("dk", dk, want.dk);
  expect_close("dv", dv, want.dv);
  expect_close("da", da, want.da);
  expect_close("db", db, want.db);
  expect_close("dc", dc, want.dc);
  expect_close("dd", dd, want.dd);
  expect_close("dp", dp, want.dp);
  expect_close("dr", dr, want.dr);
  expect_close("ddist", ddist, want.ddist);
}

const BiasMask kBiasVariants[] = {
    {},                                  // none
    {true, true, false, false},          // a + b (FoX-like)
    {false, false, true, false},         // c only (ALiBi, GRAPE-A query gate)
    {false, false, false, true},         // d only (GRAPE-A key gate)
    {true, true, true, true},            // all four
    {false, false, false, false, true},  // the path bias alone (GRAPE-AP)
    {true, true, true, true, true},      // all four and the path bias
};

// With the per-head table by distance (kept apart so that the problems above keep their seeds).
const BiasMask kTableVariants[] = {
    {false, false, false, false, false, 1},  // a distance table alone (T5, KERPLE)
    {false, false, false, false, false, 2},  // a table shorter than the distance range (clamped)
    {true, true, true, true, false, 2},      // all four and a clamped table
    {true, true, true, true, true, 1},       // everything
};

// The three position layouts for a sequence of T keys.
kc::AttentionShape layout(int64_t B, int64_t H, int64_t T, int64_t D, int which) {
  kc::AttentionShape s;
  s.B = B, s.H = H, s.D = D, s.Tk = T, s.scale = float(1.0 / std::sqrt(double(D)));
  if (which == 0) {  // full sequence: Tq == Tk, equal offsets
    s.Tq = T, s.q_offset = s.k_offset = 0;
  } else if (which == 1) {  // a chunk of queries at the end of the keys (prefill with a cache)
    s.Tq = std::max<int64_t>(1, T / 3), s.k_offset = 0, s.q_offset = T - s.Tq;
  } else {  // k_offset > 0, and queries shifted further: the last keys are seen by no query
    s.Tq = T, s.k_offset = 11, s.q_offset = 14;
  }
  return s;
}

// ---- tests ---------------------------------------------------------------------------------------------

TEST(KernelExp, MatchesStdExp) {
  double worst = 0.0;
  for (float x = -87.0f; x <= 88.0f; x += 0.001237f) {
    const double want = std::exp(double(x));
    worst = std::max(worst, std::abs(double(kc::exp_f32(x)) - want) / want);
  }
  EXPECT_LE(worst, 2.5e-7);  // about 2 ulp
  EXPECT_EQ(kc::exp_f32(0.0f), 1.0f);
  EXPECT_EQ(kc::exp_f32(-std::numeric_limits<float>::infinity()), 0.0f);
  EXPECT_EQ(kc::exp_f32(-1000.0f), 0.0f);
  EXPECT_EQ(kc::exp_f32(std::numeric_limits<float>::infinity()), kc::exp_f32(88.0f));  // the documented clamp
  EXPECT_TRUE(std::isfinite(kc::exp_f32(1e30f)));
  EXPECT_EQ(kc::exp_f32(-87.4f), 0.0f);  // below FLT_MIN: flushed
  EXPECT_GT(kc::exp_f32(-87.3f), 0.0f);
  EXPECT_TRUE(std::isnan(kc::exp_f32(std::numeric_limits<float>::quiet_NaN())));
}

TEST(KernelReference, BackwardMatchesFiniteDifferences) {
  // Tiny case with every bias term and a chunked layout; loss = sum(dout * out).
  kc::AttentionShape s;
  s.B = 1, s.H = 2, s.Tq = 3, s.Tk = 5, s.D = 4, s.q_offset = 2, s.k_offset = 0, s.scale = 0.5f;
  Problem p = make_problem(s, {true, true, true, true, true, 2}, 7);
  ASSERT_LT(p.W, s.q_offset + s.Tq - s.k_offset);  // the table's last entry is shared
  for (auto& e : p.c) e *= 10.0;                   // make the distance slopes matter
  for (auto& e : p.d) e *= 10.0;
  for (auto& e : p.pm) e *= 5.0;  // and the path bias
  const Grads g = ref_backward(p, ref_forward(p));
  auto loss = [&](const Problem& x) {
    const Vec out = ref_forward(x).out;
    double l = 0.0;
    for (size_t i = 0; i < out.size(); ++i) l += out[i] * x.dout[i];
    return l;
  };
  auto check = [&](const char* name, Vec Problem::*field, const Vec& grad) {
    for (size_t i = 0; i < (p.*field).size(); ++i) {
      Problem hi = p, lo = p;
      const double h = 1e-6;
      (hi.*field)[i] += h, (lo.*field)[i] -= h;
      const double fd = (loss(hi) - loss(lo)) / (2 * h);
      EXPECT_NEAR(grad[i], fd, 1e-7 * std::max(1.0, std::abs(fd))) << name << "[" << i << "]";
    }
  };
  check("q", &Problem::q, g.dq);
  check("k", &Problem::k, g.dk);
  check("v", &Problem::v, g.dv);
  check("a", &Problem::a, g.da);
  check("b", &Problem::b, g.db);
  check("c", &Problem::c, g.dc);
  check("d", &Problem::d, g.dd);
  check("p", &Problem::pp, g.dp);
  check("r", &Problem::pr, g.dr);
  check("dist", &Problem::dist, g.ddist);
}

// The grid's problems whose head dim is one of Ds. The grid runs as two tests of about equal cost (the cost
// grows with D), which ctest runs side by side: under the sanitizers the whole grid took 197 s alone. Every
// problem keeps the seed of its place in the whole grid.
void check_grid(std::initializer_list<int64_t> Ds) {
  uint32_t seed = 100, table_seed = 50000;
  for (int64_t T : {1, 7, 64, 257})
    for (int64_t D : {32, 64, 128, 48, 20})
      for (auto [B, H] : {std::pair<int64_t, int64_t>{1, 1}, {2, 3}})
        for (int which = 0; which < 3; ++which) {
          const bool mine = std::find(Ds.begin(), Ds.end(), D) != Ds.end();
          for (const BiasMask& m : kBiasVariants) {
            if (mine) check_problem(layout(B, H, T, D, which), m, /*backward=*/true, seed);
            ++seed;
          }
          for (const BiasMask& m : kTableVariants) {
            if (mine) check_problem(layout(B, H, T, D, which), m, /*backward=*/true, table_seed);
            ++table_seed;
          }
        }
}

TEST(KernelForwardBackward, MatchReferenceOnGridD128AndD20) { check_grid({128, 20}); }
TEST(KernelForwardBackward, MatchReferenceOnGridD32D48D64) { check_grid({32, 48, 64}); }

TEST(KernelForwardBackward, LongSequence) {
  check_problem(layout(1, 1, 1024, 64, 0), {true, true, true, true}, /*backward=*/false, 1);
  check_problem(layout(1, 1, 1024, 64, 1), {false, false, true, false}, /*backward=*/true, 2);
  check_problem(layout(1, 2, 1024, 64, 2), {false, false, true, false, true}, /*backward=*/true, 3);
  check_problem(layout(2, 2, 1024, 64, 1), {false, false, false, false, false, 2}, /*backward=*/true, 4);
}

TEST(KernelForwardBackward, PartialBiasGradientsAndNullOutputs) {
  // Only c present; asking for da/db/dd gives zeros, null outputs are skipped.
  const kc::AttentionShape s = layout(2, 3, 70, 32, 0);
  const Problem p = make_problem(s, {false, false, true, false}, 3);
  const FProblem f(p);
  const RefForward ref = ref_forward(p);
  const Grads want = ref_backward(p, ref);
  FVec out(p.q.size()), lse(s.B * s.H * s.Tq), dq(out.size()), dk(p.k.size()), dv(p.v.size());
  FVec da(s.B * s.H * s.Tq, 5.f), dc(da), dd(s.B * s.H * s.Tk, 5.f);
  kc::attention_forward(f.forward(s, f.bias(), out, lse));
  kc::attention_backward(f.backward(s, f.bias(), out, lse, dq, dk, dv,
                                    {.da = da.data(), .db = nullptr, .dc = dc.data(), .dd = dd.data()}));
  EXPECT_EQ(max_abs(Vec(da.begin(), da.end())), 0.0);
  EXPECT_EQ(max_abs(Vec(dd.begin(), dd.end())), 0.0);
  EXPECT_LE(max_err(dc, want.dc), 1e-3 * std::max(1.0, max_abs(want.dc)));
  EXPECT_LE(max_err(dq, want.dq), 1e-3 * std::max(1.0, max_abs(want.dq)));
}

TEST(KernelBackward, OnePassAndTwoPassPathsMatchReference) {
  // attention_backward does one pass per (b, h) when there are enough heads for the threads and two passes
  // (key tiles, then query tiles) otherwise: with 2 threads (1,1) takes two passes and (2,3), (1,2) one; with
  // 1 thread every shape takes one pass. Likewise attention_forward runs one task per (b, h) (keys packed
  // once per head) or one per query tile. Both paths must match the reference and each other.
  const int saved = omp_get_max_threads();
  uint32_t seed = 900;
  for (auto [B, H] : {std::pair<int64_t, int64_t>{1, 1}, {2, 3}, {1, 2}})
    for (auto [T, D] : {std::pair<int64_t, int64_t>{257, 48}, {130, 64}})
      for (int which = 0; which < 3; ++which)
        for (const BiasMask& m :
             {BiasMask{}, BiasMask{true, true, true, true}, BiasMask{true, true, true, true, true},
              BiasMask{true, true, true, true, false, 2}}) {
          const kc::AttentionShape s = layout(B, H, T, D, which);
          const Problem p = make_problem(s, m, seed++);
          const FProblem f(p);
          const RefForward ref_fwd = ref_forward(p);
          const Grads want = ref_backward(p, ref_fwd);
          std::vector<FVec> first;  // dq, dk, dv, da, db, dc, dd, dp, dr, ddist of the 1-thread run
          for (int threads : {1, 2}) {
            SCOPED_TRACE(describe(s, m) + " threads=" + std::to_string(threads));
            omp_set_num_threads(threads);
            FVec out(p.q.size()), lse(s.B * s.H * s.Tq);
            kc::attention_forward(f.forward(s, f.bias(), out, lse));
            EXPECT_LE(max_err(out, ref_fwd.out) / std::max(1.0, max_abs(ref_fwd.out)), 1e-4);
            EXPECT_LE(max_err(lse, ref_fwd.lse), 1e-4);
            FVec dq(p.q.size()), dk(p.k.size()), dv(p.v.size());
            FVec da(s.B * s.H * s.Tq, -1.f), dc(da), db(s.B * s.H * s.Tk, -1.f), dd(db);
            FVec dp(p.pp.size(), -1.f), dr(p.pr.size(), -1.f), ddist(p.dist.size(), -1.f);
            kc::attention_backward(f.backward(s, f.bias(), out, lse, dq, dk, dv,
                                              {.da = da.data(),
                                               .db = db.data(),
                                               .dc = dc.data(),
                                               .dd = dd.data(),
                                               .dp = dp.data(),
                                               .dr = dr.data(),
                                               .ddist = ddist.data()}));
            omp_set_num_threads(saved);
            const std::vector<FVec> got{dq, dk, dv, da, db, dc, dd, dp, dr, ddist};
            const std::vector<const Vec*> ref{&want.dq, &want.dk, &want.dv, &want.da, &want.db,
                                              &want.dc, &want.dd, &want.dp, &want.dr, &want.ddist};
            const char* names[] = {"dq", "dk", "dv", "da", "db", "dc", "dd", "dp", "dr", "ddist"};
            for (size_t n = 0; n < got.size(); ++n) {
              const double tol = 1e-3 * std::max(1.0, max_abs(*ref[n]));
              EXPECT_LE(max_err(got[n], *ref[n]), tol) << names[n];
              if (!first.empty()) {  // the two thread counts (paths) agree
                EXPECT_LE(max_err(got[n], Vec(first[n].begin(), first[n].end())), tol) << names[n];
              }
            }
            if (first.empty()) first = got;
          }
        }
  EXPECT_EQ(omp_get_max_threads(), saved);
}

TEST(KernelForward, NanPropagatesAlongCausalOrder) {
  // A NaN in query 5 spoils only row 5; a NaN in key 9's value spoils every query that sees key 9.
  // (Like the materialised reference, a masked key shares its tile's product with 0 weight, so a NaN or inf
  // in a future key's value is not guaranteed to stay out of earlier rows: 0 * NaN = NaN.)
  kc::AttentionShape s = layout(1, 1, 100, 32, 0);
  const Problem p = make_problem(s, {}, 4);
  FProblem f(p);
  f.q[5 * 32 + 1] = std::numeric_limits<float>::quiet_NaN();
  f.v[9 * 32 + 3] = std::numeric_limits<float>::quiet_NaN();
  FVec out(p.q.size()), lse(s.Tq);
  kc::attention_forward(f.forward(s, f.bias(), out, lse));
  FVec out2(out), lse2(lse);  // decode propagates the same way
  kc::attention_decode(f.forward(s, f.bias(), out2, lse2));
  for (int64_t i = 0; i < s.Tq; ++i) {
    EXPECT_EQ(std::isnan(lse2[i]), i == 5) << i;
    EXPECT_EQ(std::isnan(lse[i]), i == 5) << i;
    EXPECT_EQ(std::isnan(out[i * 32]), i == 5) << i;  // column 0: only the NaN query
    if (i >= 9) {
      EXPECT_TRUE(std::isnan(out[i * 32 + 3])) << i;  // column 3: every query that sees key 9
    }
  }
}

TEST(KernelDecode, MatchesForward) {
  // Tq = 1, 4 read keys in place, 7 packs them; B x H = 6 heads give each thread whole heads, B = H = 1
  // splits the keys into blocks (at 2 threads) whose states are merged, with the path bias's carries between
  // blocks.
  const int saved = omp_get_max_threads();
  omp_set_num_threads(2);
  struct Heads {
    int64_t B, H, D;
  };
  for (const Heads& bh : {Heads{2, 3, 64}, Heads{1, 1, 20}})
    for (int64_t Tq : {1, 4, 7})
      for (int64_t Tk : {1, 5, 300, 2000})
        for (const BiasMask& m :
             {BiasMask{}, BiasMask{true, true, true, true}, BiasMask{false, false, false, false, true},
              BiasMask{true, true, true, true, true}, BiasMask{false, false, false, false, false, 2},
              BiasMask{true, true, true, true, true, 1}}) {
          kc::AttentionShape s;
          s.B = bh.B, s.H = bh.H, s.D = bh.D, s.Tq = Tq, s.Tk = Tk, s.scale = 0.125f;
          s.k_offset = 3,
          s.q_offset = 3 + std::max<int64_t>(0, Tk - Tq);  // the queries' own keys end the cache
          SCOPED_TRACE(describe(s, m));
          const Problem p = make_problem(s, m, uint32_t(Tq * 10000 + Tk));
          const FProblem f(p);
          FVec out(p.q.size()), lse(s.B * s.H * s.Tq), out2(out), lse2(lse);
          kc::attention_forward(f.forward(s, f.bias(), out, lse));
          kc::attention_decode(f.forward(s, f.bias(), out2, lse2));
          double scale_out = 1.0, err_out = 0.0, scale_lse = 1.0, err_lse = 0.0;
          for (size_t i = 0; i < out.size(); ++i) {
            scale_out = std::max(scale_out, double(std::abs(out[i])));
            err_out = std::max(err_out, double(std::abs(out[i] - out2[i])));
          }
          for (size_t i = 0; i < lse.size(); ++i) {
            scale_lse = std::max(scale_lse, double(std::abs(lse[i])));  // |lse| > 128: one fp32 ulp > 1e-5
            err_lse = std::max(err_lse, double(std::abs(lse[i] - lse2[i])));
          }
          EXPECT_LE(err_out / scale_out, 1e-5);
          EXPECT_LE(err_lse / scale_lse, 1e-5);
          if (Tk <= 300) {  // and against the reference, for good measure
            const RefForward ref = ref_forward(p);
            EXPECT_LE(max_err(out2, ref.out) / std::max(1.0, max_abs(ref.out)), 1e-4);
          }
        }
  omp_set_num_threads(saved);
}

TEST(KernelSubnormals, FlushedToZeroAndCallersModeRestored) {
#if !defined(__SSE__)
  GTEST_SKIP() << "the flush mode is x86's MXCSR";
#else
  // Key 0 gets a bias of -69, so query 1 gives it P = e^-69 ~ 1e-30; dout is 0 for query 0 and 1e-10 for
  // query 1, so dv of key 0 is P dout ~ 1e-40, a subnormal, which the kernels flush to 0 (the speed of FoX's
  // backward depends on it); key 1's dv (P ~ 1, ~1e-10) is unchanged. The calling thread's mode is restored.
  const int64_t D = 16;
  const kc::AttentionShape s{.B = 1, .H = 1, .Tq = 2, .Tk = 2, .D = D, .scale = 0.25f};
  const FVec q(2 * D, 0.0f), k(2 * D, 0.0f), v(2 * D, 1.0f), b{-69.0f, 0.0f};
  FVec dout(2 * D, 1e-10f), out(2 * D), lse(2), dq(2 * D), dk(2 * D), dv(2 * D), db(2);
  std::fill(dout.begin(), dout.begin() + D, 0.0f);
  kc::BiasTerms bias;
  bias.b = b.data();
  const int saved_threads = omp_get_max_threads();
  for (int threads : {1, 2}) {
    SCOPED_TRACE("threads=" + std::to_string(threads));
    omp_set_num_threads(threads);
    const unsigned mode = _mm_getcsr() & ~0x8040u;  // FTZ (bit 15) and DAZ (bit 6) off
    _mm_setcsr(mode);
    kc::attention_forward({.shape = s,
                           .q = q.data(),
                           .k = k.data(),
                           .v = v.data(),
                           .bias = bias,
                           .out = out.data(),
                           .lse = lse.data()});
    kc::attention_backward({.shape = s,
                            .q = q.data(),
                            .k = k.data(),
                            .v = v.data(),
                            .bias = bias,
                            .out = out.data(),
                            .dout = dout.data(),
                            .lse = lse.data(),
                            .dq = dq.data(),
                            .dk = dk.data(),
                            .dv = dv.data(),
                            .bias_grads = {.db = db.data()}});
    EXPECT_EQ(_mm_getcsr(), mode);
    for (int64_t d = 0; d < D; ++d) {
      EXPECT_EQ(dv[d], 0.0f) << d;                  // exactly ~1e-40
      EXPECT_NEAR(dv[D + d], 1e-10f, 1e-16f) << d;  // P(1, 1) = 1 - 1e-30
      EXPECT_FLOAT_EQ(out[D + d], 1.0f) << d;
    }
    volatile float tiny = 1e-30f;  // the caller still computes subnormals
    EXPECT_GT(tiny * 1e-10f, 0.0f);
  }
  omp_set_num_threads(saved_threads);
#endif
}

TEST(KernelValidation, BadInvariantsThrow) {
  const kc::AttentionShape good = layout(1, 2, 8, 16, 0);
  const Problem p = make_problem(good, {}, 5);
  const FProblem f(p);
  FVec out(p.q.size()), lse(16), dq(out), dk(out), dv(out);
  auto all_throw = [&](kc::AttentionShape s, const float* q, const char* what) {
    SCOPED_TRACE(what);
    kc::ForwardParams fp = f.forward(s, {}, out, lse);
    kc::BackwardParams bp = f.backward(s, {}, out, lse, dq, dk, dv, {});
    fp.q = bp.q = q;
    EXPECT_THROW(kc::attention_forward(fp), std::invalid_argument);
    EXPECT_THROW(kc::attention_decode(fp), std::invalid_argument);
    EXPECT_THROW(kc::attention_backward(bp), std::invalid_argument);
  };
  auto with = [&](auto change) {
    kc::AttentionShape s = good;
    change(s);
    return s;
  };
  all_throw(with([](auto& s) { s.B = 0; }), f.q.data(), "B = 0");
  all_throw(with([](auto& s) { s.H = -1; }), f.q.data(), "H < 0");
  all_throw(with([](auto& s) { s.Tq = 0; }), f.q.data(), "Tq = 0");
  all_throw(with([](auto& s) { s.Tk = 0; }), f.q.data(), "Tk = 0");
  all_throw(with([](auto& s) { s.D = 0; }), f.q.data(), "D = 0");
  all_throw(with([](auto& s) { s.k_offset = 1; }), f.q.data(), "q_offset < k_offset");
  all_throw(with([](auto& s) { s.scale = std::numeric_limits<float>::quiet_NaN(); }), f.q.data(),
            "scale NaN");
  all_throw(good, nullptr, "null q");
  kc::ForwardParams no_out = f.forward(good, {}, out, lse);
  no_out.out = nullptr;
  EXPECT_THROW(kc::attention_forward(no_out), std::invalid_argument);
  // A path bias needs r, m and P >= 1.
  kc::BiasTerms path;
  path.p = f.q.data(), path.r = f.k.data(), path.m = f.v.data(), path.P = 4;
  EXPECT_NO_THROW(kc::attention_forward(f.forward(good, path, out, lse)));
  for (int which = 0; which < 3; ++which) {
    kc::BiasTerms bad = path;
    if (which == 0) bad.r = nullptr;
    if (which == 1) bad.m = nullptr;
    if (which == 2) bad.P = 0;
    EXPECT_THROW(kc::attention_forward(f.forward(good, bad, out, lse)), std::invalid_argument);
    EXPECT_THROW(kc::attention_decode(f.forward(good, bad, out, lse)), std::invalid_argument);
    EXPECT_THROW(kc::attention_backward(f.backward(good, bad, out, lse, dq, dk, dv, {})),
                 std::invalid_argument);
  }
  // A distance table needs W >= 1.
  kc::BiasTerms table;
  table.dist = f.q.data(), table.W = 0;
  EXPECT_THROW(kc::attention_forward(f.forward(good, table, out, lse)), std::invalid_argument);
  EXPECT_THROW(kc::attention_decode(f.forward(good, table, out, lse)), std::invalid_argument);
  EXPECT_THROW(kc::attention_backward(f.backward(good, table, out, lse, dq, dk, dv, {})),
               std::invalid_argument);
  table.W = 3;
  EXPECT_NO_THROW(kc::attention_forward(f.forward(good, table, out, lse)));
  // The valid shape itself is accepted.
  EXPECT_NO_THROW(kc::attention_forward(f.forward(good, {}, out, lse)));
}

}  // namespace
