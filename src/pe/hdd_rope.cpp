// HDD-RoPE (High-Dimensional, Dynamic RoPE): the head dimension is cut into chunks of k coordinates, and
// each token tau contributes a data-dependent rotation R_tau = exp(A(x_tau)) in SO(k) per head and chunk.
// Token t is turned by the running product of the rotations of the tokens before it,
//     P_t = R_0 R_1 ... R_{t-1},   q~_t = P_t q_t,   k~_t = P_t k_t,
// so q~_t . k~_s = q_t^T (R_s ... R_{t-1})^T k_s depends only on the tokens s..t-1: the prefix cancels.
// With k = 2 and the same rotation R = rot(theta_b) for every token this is RoPE exactly.
#include "pe/hdd_rope.hpp"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "pe/families.hpp"
#include "pe/laws.hpp"

namespace grape {

namespace hdd {
namespace {

const auto kF64 = torch::TensorOptions().dtype(torch::kFloat64);

// cos(sqrt(x)) and sin(sqrt(x))/sqrt(x) of x = tau^2 >= 0. Below 1e-4 the Taylor series (error < 1e-20)
// takes over, so both are finite and differentiable at x = 0 (sqrt has an infinite slope there).
torch::Tensor cos_sqrt(const torch::Tensor& x) {
  auto small = x < 1e-4;
  auto t = torch::sqrt(torch::where(small, torch::ones_like(x), x));
  return torch::where(small, 1.0 - x / 2.0 * (1.0 - x / 12.0 * (1.0 - x / 30.0)), torch::cos(t));
}
torch::Tensor sinc_sqrt(const torch::Tensor& x) {
  auto small = x < 1e-4;
  auto t = torch::sqrt(torch::where(small, torch::ones_like(x), x));
  return torch::where(small, 1.0 - x / 6.0 * (1.0 - x / 20.0 * (1.0 - x / 42.0)), torch::sin(t) / t);
}

// exp(S) = cos(tau) I + sin(tau)/tau S for a skew S with S^2 = -tau^2 I (a plane rotation, and both halves
// of the so(4) split); tau^2 = |S|_F^2 / k.
torch::Tensor exp_of_complex_structure(const torch::Tensor& S) {
  const int64_t k = S.size(-1);
  auto tau2 = (S * S).sum({-2, -1}, true) / double(k);
  return cos_sqrt(tau2) * torch::eye(k, S.options()) + sinc_sqrt(tau2) * S;
}

// Half the Levi-Civita symbol of 4 indices: (*A)_ij = 1/2 eps_ijkl A_kl is the Hodge dual on so(4).
torch::Tensor half_levi_civita4() {
  auto eps = torch::zeros({4, 4, 4, 4}, kF64);
  std::array<int, 4> p{0, 1, 2, 3};
  do {
    int inversions = 0;
    for (int a = 0; a < 4; ++a)
      for (int b = a + 1; b < 4; ++b) inversions += p[a] > p[b];
    eps.index_put_({p[0], p[1], p[2], p[3]}, inversions % 2 ? -0.5 : 0.5);
  } while (std::next_permutation(p.begin(), p.end()));
  return eps;
}

}  // namespace

torch::Tensor skew_exp(const torch::Tensor& A) {
  const int64_t k = A.size(-1);
  if (k == 2) {  // the plane rotation by a = A_10 (counter-clockwise: rotate_pairs' standard orientation)
    auto a = A.select(-1, 0).select(-1, 1);
    auto c = torch::cos(a), s = torch::sin(a);
    auto sizes = a.sizes().vec();
    sizes.insert(sizes.end(), {2, 2});
    return torch::stack({c, -s, s, c}, -1).reshape(sizes);
  }
  if (k == 3) {  // Rodrigues: I + sinc(tau) A + (1 - cos tau)/tau^2 A^2, the last as sinc(tau/2)^2 / 2
    auto tau2 = (A * A).sum({-2, -1}, true) / 2.0;
    auto half = sinc_sqrt(tau2 / 4.0);
    return torch::eye(3, A.options()) + sinc_sqrt(tau2) * A + 0.5 * half * half * torch::matmul(A, A);
  }
  if (k == 4) {
    // A = A+ + A- with A+- = (A +- *A)/2 self-dual and anti-self-dual. They commute, and each squares to
    // -tau+-^2 I, so exp(A) = exp(A+) exp(A-) with both factors in closed form.
    static const auto eps = half_levi_civita4();
    auto star = torch::einsum("ijkl,...kl->...ij", {eps.to(A.scalar_type()), A});
    return torch::matmul(exp_of_complex_structure((A + star) / 2.0),
                         exp_of_complex_structure((A - star) / 2.0));
  }
  // Larger k: scaling and squaring, exp(A) = exp(A / 2^s)^(2^s) with |A / 2^s|_F <= 1/2 and the Taylor
  // series to degree 18 (remainder < 1e-22). torch::linalg_matrix_exp is not used: in LibTorch 1.13 its
  // degree-8 branch has a wrong coefficient and is off by up to ~1e-10 in float64 for norms near 0.01-0.3.
  const double norm = A.numel() ? torch::sqrt((A * A).sum({-2, -1}).max()).item<double>() : 0.0;
  const int s = norm > 0.5 ? int(std::ceil(std::log2(norm / 0.5))) : 0;
  auto X = A / std::ldexp(1.0, s);
  auto I = torch::eye(k, A.options());
  auto E = I + X / 18.0;
  for (int n = 17; n >= 1; --n) E = I + torch::matmul(X, E) / double(n);  // Horner: I + X(I + X/2(...))
  for (int i = 0; i < s; ++i) E = torch::matmul(E, E);
  return E;
}

torch::Tensor cayley(const torch::Tensor& A) {
  auto I = torch::eye(A.size(-1), A.options()).expand(A.sizes());
  return torch::linalg::solve(I - A, I + A,
                              /*left=*/true);  // I - A is invertible for skew A (eigenvalues 1 - i lambda)
}

// ---- The training path: plain loops over contiguous float64 buffers, with hand-written backwards
// ----------- Autograd through LibTorch ops on [N, T, k, k] tensors of 4x4 matrices spends its time in tiny
// kernels, copies and index ops; the same math as loops over one token at a time is far faster (see
// docs/encodings.md, hdd-rope, Cost). K > 0 fixes k at compile time so that the k x k loops unroll; K = 0
// reads k at run time.

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// out = op(a) op(b) for k x k row-major matrices, op = transpose where TA / TB.
template <int64_t K, bool TA = false, bool TB = false>
inline void matmul_k(const double* a, const double* b, int64_t k_, double* out) {
  const int64_t k = K ? K : k_;
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j < k; ++j) {
      double s = 0.0;
      for (int64_t l = 0; l < k; ++l)
        s += (TA ? a[l * k + i] : a[i * k + l]) * (TB ? b[j * k + l] : b[l * k + j]);
      out[i * k + j] = s;
    }
}

// A = skew_from_coefficients(c) for one token, row-major k x k.
template <int64_t K>
inline void fill_skew(const double* c, double* A) {
  for (int64_t i = 0; i < K; ++i) A[i * K + i] = 0.0;
  for (int64_t i = 0, m = 0; i < K; ++i)
    for (int64_t j = i + 1; j < K; ++j, ++m) A[j * K + i] = c[m], A[i * K + j] = -c[m];
}
// Its adjoint: dL/dc_m = dL/dA_ji - dL/dA_ij.
template <int64_t K>
inline void skew_adjoint(const double* dA, double* dc) {
  for (int64_t i = 0, m = 0; i < K; ++i)
    for (int64_t j = i + 1; j < K; ++j, ++m) dc[m] = dA[j * K + i] - dA[i * K + j];
}

// cos(sqrt x), sin(sqrt x)/sqrt x (the same branches as cos_sqrt and sinc_sqrt) and their x-derivatives.
struct CosSinc {
  double c, s, dc, ds;
};
inline CosSinc cos_sinc(double x) {
  CosSinc f;
  if (x < 1e-4) {
    f.c = 1.0 - x / 2.0 * (1.0 - x / 12.0 * (1.0 - x / 30.0));
    f.s = 1.0 - x / 6.0 * (1.0 - x / 20.0 * (1.0 - x / 42.0));
  } else {
    const double t = std::sqrt(x);
    f.c = std::cos(t), f.s = std::sin(t) / t;
  }
  f.dc = -f.s / 2.0;  // d/dx cos(sqrt x) = -sin(sqrt x) / (2 sqrt x)
  // d/dx sinc(sqrt x) = (cos - sinc) / (2x) cancels for small x: its series below 1e-2 (next term < 1e-19).
  f.ds = x < 1e-2 ? -1.0 / 6.0 + x * (1.0 / 60.0 - x * (1.0 / 1680.0 - x * (1.0 / 90720.0 - x / 7983360.0)))
                  : (f.c - f.s) / (2.0 * x);
  return f;
}

// exp_of_complex_structure for S = skew(u): E = cos(tau) I + sinc(tau) S, tau^2 = |S|_F^2 / k = 2|u|^2 / k.
template <int64_t K>
inline CosSinc structure_cos_sinc(const double* u) {
  double x = 0.0;
  for (int64_t m = 0; m < K * (K - 1) / 2; ++m) x += u[m] * u[m];
  return cos_sinc(2.0 * x / double(K));
}
template <int64_t K>
inline void structure_exp(const double* u, const CosSinc& f, double* E) {
  fill_skew<K>(u, E);
  for (int64_t i = 0; i < K * K; ++i) E[i] *= f.s;
  for (int64_t i = 0; i < K; ++i) E[i * K + i] = f.c;
}
// du from dE: the direct term sinc * g (g = skew_adjoint(dE)) plus dL/dtau^2 * dtau^2/du, with
// dL/dtau^2 = cos' tr(dE) + sinc' <dE, S> and <dE, S> = u.g.
template <int64_t K>
inline void structure_exp_backward(const double* u, const CosSinc& f, const double* dE, double* du) {
  constexpr int64_t M = K * (K - 1) / 2;
  double g[M], tr = 0.0, ug = 0.0;
  skew_adjoint<K>(dE, g);
  for (int64_t i = 0; i < K; ++i) tr += dE[i * K + i];
  for (int64_t m = 0; m < M; ++m) ug += u[m] * g[m];
  const double w = (f.dc * tr + f.ds * ug) * 4.0 / double(K);
  for (int64_t m = 0; m < M; ++m) du[m] = f.s * g[m] + w * u[m];
}

// The Hodge star of so(4) on coefficients (pairs 01 02 03 12 13 23): (*A)_01 = A_23, (*A)_02 = -A_13, ...
// It is its own inverse and symmetric, so it is its own adjoint too.
inline void hodge4(const double* c, double* out) {
  out[0] = c[5], out[1] = -c[4], out[2] = c[3], out[3] = c[2], out[4] = -c[1], out[5] = c[0];
}
// A+- = (A +- *A)/2 on coefficients.
inline void split4(const double* c, double* cp, double* cm) {
  double star[6];
  hodge4(c, star);
  for (int m = 0; m < 6; ++m) cp[m] = (c[m] + star[m]) / 2.0, cm[m] = (c[m] - star[m]) / 2.0;
}

// R = exp(skew(c)) for k = 2 (one complex structure) or 4 (exp(A+) exp(A-), as skew_exp), and its backward.
// The forward keeps cos/sinc and their derivatives (f[0], and f[1] for k = 4) so that the backward needs
// no trigonometry.
template <int64_t K>
inline void rotation_forward(const double* c, double* R, CosSinc* f) {
  if constexpr (K == 2) {
    f[0] = structure_cos_sinc<2>(c);
    structure_exp<2>(c, f[0], R);
  } else {
    double cp[6], cm[6], Ep[16], Em[16];
    split4(c, cp, cm);
    f[0] = structure_cos_sinc<4>(cp), f[1] = structure_cos_sinc<4>(cm);
    structure_exp<4>(cp, f[0], Ep);
    structure_exp<4>(cm, f[1], Em);
    matmul_k<4>(Ep, Em, 4, R);
  }
}
template <int64_t K>
inline void rotation_backward(const double* c, const CosSinc* f, const double* dR, double* dc) {
  if constexpr (K == 2) {
    structure_exp_backward<2>(c, f[0], dR, dc);
  } else {
    double cp[6], cm[6], Ep[16], Em[16], dEp[16], dEm[16], dcp[6], dcm[6], diff[6], sdiff[6];
    split4(c, cp, cm);
    structure_exp<4>(cp, f[0], Ep);
    structure_exp<4>(cm, f[1], Em);
    matmul_k<4, false, true>(dR, Em, 4, dEp);  // R = E+ E-: dE+ = dR E-^T, dE- = E+^T dR
    matmul_k<4, true, false>(Ep, dR, 4, dEm);
    structure_exp_backward<4>(cp, f[0], dEp, dcp);
    structure_exp_backward<4>(cm, f[1], dEm, dcm);
    for (int m = 0; m < 6; ++m) diff[m] = dcp[m] - dcm[m];
    hodge4(diff, sdiff);  // dc = (dc+ + dc-)/2 + *(dc+ - dc-)/2
    for (int m = 0; m < 6; ++m) dc[m] = (dcp[m] + dcm[m] + sdiff[m]) / 2.0;
  }
}

// Tokens per parallel task in the per-token kernels.
constexpr int64_t kGrain = 256;

class RotationsFn : public torch::autograd::Function<RotationsFn> {
 public:
  static_assert(sizeof(CosSinc) == 4 * sizeof(double), "CosSinc is kept in a float64 tensor");
  // c [n, M] float64 contiguous -> R [n, k, k], k = 2 or 4.
  static variable_list forward(AutogradContext* ctx, torch::Tensor c, int64_t k) {
    const int64_t n = c.size(0), M = c.size(1);
    auto R = torch::empty({n, k, k}, c.options());
    auto f = torch::empty({n, 2, 4}, c.options());  // CosSinc of A+ and A- (k = 4) or of A (k = 2)
    const double* cp = c.data_ptr<double>();
    double* Rp = R.data_ptr<double>();
    auto* fp = reinterpret_cast<CosSinc*>(f.data_ptr<double>());
    at::parallel_for(0, n, kGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i)
        k == 2 ? rotation_forward<2>(cp + i * M, Rp + i * 4, fp + 2 * i)
               : rotation_forward<4>(cp + i * M, Rp + i * 16, fp + 2 * i);
    });
    ctx->save_for_backward({c, f});
    ctx->saved_data["k"] = k;
    return {R};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto &c = saved[0], &f = saved[1];
    const int64_t k = ctx->saved_data["k"].toInt(), n = c.size(0), M = c.size(1);
    auto dR = grads[0].to(torch::kFloat64).contiguous();
    auto dc = torch::empty_like(c);
    const double *cp = c.data_ptr<double>(), *dRp = dR.data_ptr<double>();
    const auto* fp = reinterpret_cast<const CosSinc*>(f.data_ptr<double>());
    double* dcp = dc.data_ptr<double>();
    at::parallel_for(0, n, kGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i)
        k == 2 ? rotation_backward<2>(cp + i * M, fp + 2 * i, dRp + i * 4, dcp + i * M)
               : rotation_backward<4>(cp + i * M, fp + 2 * i, dRp + i * 16, dcp + i * M);
    });
    return {dc, torch::Tensor()};
  }
};

// The sequential running product, optionally fused with the rotation of q and k (the "loop" scan).
// Sequence n = (b, h, g) starts from P0[n] and takes P_{t+1} = P_t R_t. Outputs: the exclusive products
// Pall [N,T,k,k] (P_0 .. P_{T-1}), the last P_T [N,k,k] and, when q and k are given ([B,T,H,D], else empty),
// q~_t = P_t q_t and k~_t = P_t k_t for chunk g (coordinates g + jG). The rotation runs in float64.
struct ScanShape {
  int64_t N, T, k, B, H, G, D;
  bool rotate;
  // Offset of the first coordinate of sequence n's chunk at token t in q [B,T,H,D].
  int64_t coord(int64_t n, int64_t t) const { return ((n / (H * G) * T + t) * H + n / G % H) * D + n % G; }
};

template <int64_t K, typename scalar_t>
void scan_forward(const ScanShape& s, const double* P0, const double* R, const scalar_t* q,
                  const scalar_t* kv, double* Pall, double* PT, scalar_t* qo, scalar_t* ko) {
  const int64_t k = K ? K : s.k, kk = k * k, T = s.T, G = s.G;
  at::parallel_for(0, s.N, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t n = lo; n < hi; ++n) {
      if (T == 0) {
        std::copy(P0 + n * kk, P0 + (n + 1) * kk, PT + n * kk);
        continue;
      }
      std::copy(P0 + n * kk, P0 + (n + 1) * kk, Pall + n * T * kk);
      for (int64_t t = 0; t < T; ++t) {
        const double* P = Pall + (n * T + t) * kk;
        if (s.rotate) {
          const int64_t v = s.coord(n, t);
          for (int64_t i = 0; i < k; ++i) {
            double a = 0.0, b = 0.0;
            for (int64_t j = 0; j < k; ++j)
              a += P[i * k + j] * double(q[v + j * G]), b += P[i * k + j] * double(kv[v + j * G]);
            qo[v + i * G] = scalar_t(a), ko[v + i * G] = scalar_t(b);
          }
        }
        matmul_k<K>(P, R + (n * T + t) * kk, k, t + 1 < T ? Pall + (n * T + t + 1) * kk : PT + n * kk);
      }
    }
  });
}

// Backward, from t = T-1 down with B = dL/dP_{t+1} (everything that flows back from later tokens and the
// last product): dR_t = P_t^T B, dq_t = P_t^T dq~_t, and dL/dP_t = dPall_t + dq~_t q_t^T + dk~_t k_t^T +
// B R_t^T; finally dP0 = dL/dP_0. Absent gradients (nullptr) are zero.
template <int64_t K, typename scalar_t>
void scan_backward(const ScanShape& s, const double* Pall, const double* R, const scalar_t* q,
                   const scalar_t* kv, const double* dPall, const double* dPT, const scalar_t* dqo,
                   const scalar_t* dko, double* dP0, double* dR, scalar_t* dq, scalar_t* dk) {
  const int64_t k = K ? K : s.k, kk = k * k, T = s.T, G = s.G;
  at::parallel_for(0, s.N, 1, [&](int64_t lo, int64_t hi) {
    std::vector<double> B(kk), next(kk);
    for (int64_t n = lo; n < hi; ++n) {
      if (dPT)
        std::copy(dPT + n * kk, dPT + (n + 1) * kk, B.begin());
      else
        std::fill(B.begin(), B.end(), 0.0);
      for (int64_t t = T - 1; t >= 0; --t) {
        const int64_t at = (n * T + t) * kk;
        const double *P = Pall + at, *Rt = R + at;
        matmul_k<K, true, false>(P, B.data(), k, dR + at);
        matmul_k<K, false, true>(B.data(), Rt, k, next.data());
        if (dPall)
          for (int64_t e = 0; e < kk; ++e) next[e] += dPall[at + e];
        if (s.rotate) {
          const int64_t v = s.coord(n, t);
          for (int64_t i = 0; i < k; ++i) {
            const double gq = dqo ? double(dqo[v + i * G]) : 0.0, gk = dko ? double(dko[v + i * G]) : 0.0;
            for (int64_t j = 0; j < k; ++j)
              next[i * k + j] += gq * double(q[v + j * G]) + gk * double(kv[v + j * G]);
          }
          for (int64_t j = 0; j < k; ++j) {
            double a = 0.0, b = 0.0;
            for (int64_t i = 0; i < k; ++i) {
              if (dqo) a += P[i * k + j] * double(dqo[v + i * G]);
              if (dko) b += P[i * k + j] * double(dko[v + i * G]);
            }
            dq[v + j * G] = scalar_t(a), dk[v + j * G] = scalar_t(b);
          }
        }
        std::swap(B, next);
      }
      std::copy(B.begin(), B.end(), dP0 + n * kk);
    }
  });
}

// Calls f.template operator()<K>() with K = 2, 4 (unrolled) or 0 (any k).
template <class F>
void dispatch_k(int64_t k, F&& f) {
  if (k == 2)
    f(std::integral_constant<int64_t, 2>{});
  else if (k == 4)
    f(std::integral_constant<int64_t, 4>{});
  else
    f(std::integral_constant<int64_t, 0>{});
}

template <class T>
T* ptr_or_null(const torch::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.data_ptr<T>() : nullptr;
}

class ScanFn : public torch::autograd::Function<ScanFn> {
 public:
  // P0 [N,k,k], R [N,T,k,k] float64; q, k [B,T,H,D] (N = B*H*G) or both empty.
  static variable_list forward(AutogradContext* ctx, torch::Tensor P0, torch::Tensor R, torch::Tensor q,
                               torch::Tensor k) {
    P0 = P0.contiguous(), R = R.contiguous(), q = q.contiguous(), k = k.contiguous();
    const ScanShape s = shape(P0, R, q);
    auto Pall = torch::empty_like(R), PT = torch::empty_like(P0);
    auto qo = torch::empty_like(q), ko = torch::empty_like(k);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "hdd_scan", [&] {
      dispatch_k(s.k, [&](auto K) {
        scan_forward<decltype(K)::value, scalar_t>(s, P0.data_ptr<double>(), R.data_ptr<double>(),
                                                   ptr_or_null<scalar_t>(q), ptr_or_null<scalar_t>(k),
                                                   Pall.data_ptr<double>(), PT.data_ptr<double>(),
                                                   ptr_or_null<scalar_t>(qo), ptr_or_null<scalar_t>(ko));
      });
    });
    ctx->save_for_backward({Pall, R, q, k, P0});
    return {Pall, PT, qo, ko};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto &Pall = saved[0], &R = saved[1], &q = saved[2], &k = saved[3], &P0 = saved[4];
    const ScanShape s = shape(P0, R, q);
    auto grad = [](const torch::Tensor& g, const torch::Tensor& like) {
      return g.defined() ? g.to(like.scalar_type()).contiguous() : g;
    };
    auto dPall = grad(grads[0], Pall), dPT = grad(grads[1], P0), dqo = grad(grads[2], q),
         dko = grad(grads[3], k);
    auto dP0 = torch::empty_like(P0), dR = torch::empty_like(R), dq = torch::empty_like(q),
         dk = torch::empty_like(k);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "hdd_scan_backward", [&] {
      dispatch_k(s.k, [&](auto K) {
        scan_backward<decltype(K)::value, scalar_t>(
            s, Pall.data_ptr<double>(), R.data_ptr<double>(), ptr_or_null<scalar_t>(q),
            ptr_or_null<scalar_t>(k), ptr_or_null<double>(dPall), ptr_or_null<double>(dPT),
            ptr_or_null<scalar_t>(dqo), ptr_or_null<scalar_t>(dko), dP0.data_ptr<double>(),
            dR.data_ptr<double>(), ptr_or_null<scalar_t>(dq), ptr_or_null<scalar_t>(dk));
      });
    });
    if (!s.rotate) dq = dk = torch::Tensor();
    return {dP0, dR, dq, dk};
  }

 private:
  static ScanShape shape(const torch::Tensor& P0, const torch::Tensor& R, const torch::Tensor& q) {
    ScanShape s{P0.size(0), R.size(1), P0.size(1), 1, 1, 1, 0, q.numel() > 0};
    if (s.rotate) s.B = q.size(0), s.H = q.size(2), s.D = q.size(3), s.G = s.D / s.k;
    return s;
  }
};

}  // namespace

torch::Tensor skew_from_coefficients(const torch::Tensor& c, int64_t k) {
  const int64_t M = k * (k - 1) / 2;
  if (c.dim() < 1 || c.size(-1) != M)
    throw std::invalid_argument(
        fmt::format("hdd-rope: {} plane coefficients need [..., {}], got {}", k, M, shape_string(c)));
  auto basis = torch::zeros({M, k * k}, c.options());
  for (int64_t i = 0, m = 0; i < k; ++i)
    for (int64_t j = i + 1; j < k; ++j, ++m)
      basis.index_put_({m, j * k + i}, 1.0), basis.index_put_({m, i * k + j}, -1.0);
  auto sizes = c.sizes().vec();
  sizes.back() = k;
  sizes.push_back(k);
  return torch::matmul(c, basis).view(sizes);
}

torch::Tensor rotations(const torch::Tensor& c, int64_t k) {
  if (k != 2 && k != 4) return skew_exp(skew_from_coefficients(c.to(torch::kFloat64), k));
  const int64_t M = k * (k - 1) / 2;
  if (c.dim() < 1 || c.size(-1) != M)
    throw std::invalid_argument(
        fmt::format("hdd-rope: {} plane coefficients need [..., {}], got {}", k, M, shape_string(c)));
  auto sizes = c.sizes().vec();
  sizes.back() = k;
  sizes.push_back(k);
  return RotationsFn::apply(c.to(torch::kFloat64).reshape({-1, M}).contiguous(), k)[0].view(sizes);
}

std::array<torch::Tensor, 3> rotate_by_running_product(const torch::Tensor& P0, const torch::Tensor& R,
                                                       const torch::Tensor& q, const torch::Tensor& k) {
  const bool ok = P0.dim() == 5 && R.dim() == 6 && q.dim() == 4 && q.sizes().equals(k.sizes()) &&
                  q.scalar_type() == k.scalar_type() && P0.scalar_type() == torch::kFloat64 &&
                  R.scalar_type() == torch::kFloat64 && P0.size(3) == P0.size(4) &&
                  R.sizes().slice(0, 3).equals(P0.sizes().slice(0, 3)) &&
                  R.sizes().slice(4).equals(P0.sizes().slice(3)) && P0.size(0) == q.size(0) &&
                  P0.size(1) == q.size(2) && R.size(3) == q.size(1) && P0.size(2) * P0.size(3) == q.size(3);
  if (!ok)
    throw std::invalid_argument(
        fmt::format("hdd-rope: rotate_by_running_product needs float64 P0 [B,H,G,k,k] and R [B,H,G,T,k,k], "
                    "and q, k [B,T,H,D = kG] "
                    "of one dtype; got P0 {}, R {}, q {} {}, k {} {}",
                    shape_string(P0), shape_string(R), shape_string(q), c10::toString(q.scalar_type()),
                    shape_string(k), c10::toString(k.scalar_type())));
  const int64_t kk = P0.size(3), T = R.size(3);
  auto out = ScanFn::apply(P0.reshape({-1, kk, kk}), R.reshape({-1, T, kk, kk}), q, k);
  return {out[2], out[3], out[1].view(P0.sizes())};
}

const std::vector<std::string>& scan_names() {
  static const std::vector<std::string> names{"loop", "sequential", "hillis-steele", "brent-kung",
                                              "sklansky"};
  return names;
}

torch::Tensor running_product(const torch::Tensor& M, const std::string& scan) {
  const int64_t dim = M.dim() - 3, T = M.size(dim);
  if (scan == "loop") {  // P0 = M_0 and R = M_1 .. M_{T-1}: the exclusive products and the last are inclusive
    if (T == 0) return M;
    auto flat = M.to(torch::kFloat64).reshape({-1, T, M.size(-2), M.size(-1)});
    auto none = torch::empty({0}, torch::kFloat64);
    auto out = ScanFn::apply(flat.select(1, 0), flat.narrow(1, 1, T - 1), none, none);
    return torch::cat({out[0], out[1].unsqueeze(1)}, 1).view(M.sizes()).to(M.scalar_type());
  }
  if (scan == "sequential") {  // T - 1 dependent products: the reference
    std::vector<torch::Tensor> out{M.select(dim, 0)};
    for (int64_t t = 1; t < T; ++t) out.push_back(torch::matmul(out.back(), M.select(dim, t)));
    return torch::stack(out, dim);
  }
  if (scan == "hillis-steele") {  // log2 T steps, each P_t <- P_{t-d} P_t for every t >= d
    auto P = M;
    for (int64_t d = 1; d < T; d *= 2)
      P = torch::cat({P.narrow(dim, 0, d), torch::matmul(P.narrow(dim, 0, T - d), P.narrow(dim, d, T - d))},
                     dim);
    return P;
  }
  if (scan == "sklansky") {
    // log2 N steps over N = T rounded up to a power of two (identity padding): at step d every block of 2d
    // positions becomes a prefix of itself, its second half left-multiplied by the last product of its
    // first half. Blocks are reshapes, so a step is one broadcast matmul.
    int64_t N = 1;
    while (N < T) N *= 2;
    auto lead = M.sizes().slice(0, dim).vec();
    const int64_t k = M.size(-1);
    auto P = M;
    if (N > T) {
      auto pad = lead;
      pad.insert(pad.end(), {N - T, k, k});
      P = torch::cat({M, torch::eye(k, M.options()).expand(pad)}, dim);
    }
    for (int64_t d = 1; d < N; d *= 2) {
      auto blocks = lead;
      blocks.insert(blocks.end(), {N / (2 * d), 2, d, k, k});
      auto v = P.reshape(blocks);
      auto first = v.select(dim + 1, 0), second = v.select(dim + 1, 1);  // [..., N/2d, d, k, k]
      auto carry = first.narrow(dim + 1, d - 1, 1);
      auto whole = lead;
      whole.insert(whole.end(), {N, k, k});
      P = torch::stack({first, torch::matmul(carry, second)}, dim + 1).reshape(whole);
    }
    return P.narrow(dim, 0, T);
  }
  // Brent-Kung updates a subset of positions per step: P_i <- P_src(i) P_i.
  auto step = [&](const torch::Tensor& P, const std::vector<int64_t>& dst, const std::vector<int64_t>& src) {
    if (dst.empty()) return P;
    auto di = torch::tensor(dst), si = torch::tensor(src);
    return P.index_copy(dim, di, torch::matmul(P.index_select(dim, si), P.index_select(dim, di)));
  };
  auto P = M;
  if (scan == "brent-kung") {
    // Up-sweep: position i with (i+1) % 2d == 0 takes the product of its 2d-block. Down-sweep: the
    // positions halfway between those take the prefix that ends just before them. About 2T products.
    int64_t top = 1;
    for (int64_t d = 1; d < T; d *= 2) {
      std::vector<int64_t> dst, src;
      for (int64_t i = 2 * d - 1; i < T; i += 2 * d) dst.push_back(i), src.push_back(i - d);
      P = step(P, dst, src);
      top = d;
    }
    for (int64_t d = top; d >= 1; d /= 2) {
      std::vector<int64_t> dst, src;
      for (int64_t i = 3 * d - 1; i < T; i += 2 * d) dst.push_back(i), src.push_back(i - d);
      P = step(P, dst, src);
    }
    return P;
  }
  throw std::invalid_argument(fmt::format("hdd-rope: unknown scan '{}'", scan));
}

}  // namespace hdd

namespace {

using namespace detail;

class HddRope : public Encoding {
 public:
  HddRope(const HeadShape& s, const PeOptions& o) : Encoding("hdd-rope", s) {
    const int64_t D = s.head_dim;
    k_ = o.get_int("k", 4);
    if (k_ < 2 || k_ > D)
      throw std::invalid_argument(fmt::format("hdd-rope: k must be in [2, head_dim={}], got {}", D, k_));
    if (D % k_ != 0)
      throw std::invalid_argument(fmt::format(
          "hdd-rope: head_dim {} is not divisible by k={} (the head is cut into chunks of k)", D, k_));
    G_ = D / k_;
    M_ = k_ * (k_ - 1) / 2;
    cayley_ = o.get_choice("map", "exp", {"exp", "cayley"}) == "cayley";
    sign_ = rotary_layout(o).sign;  // grape: every rotation is transposed (exp(-A), cayley(-A))
    // "loop" (plain loops, hand-written backward) is far faster on CPU than the LibTorch scans.
    scan_ = o.get_choice("scan", "loop", hdd::scan_names());
    const bool static_rate = o.get_bool("static_rate", true);
    const double base = o.get_double("base", 10000.0);
    if (base <= 1.0) throw std::invalid_argument(fmt::format("hdd-rope: base must be > 1, got {}", base));
    rate_scale_ = o.get_double("rate_scale", 16.0);
    if (rate_scale_ <= 0.0)
      throw std::invalid_argument(fmt::format("hdd-rope: rate_scale must be > 0, got {}", rate_scale_));

    // Coefficient m belongs to the m-th pair i < j in lexicographic order (hdd::skew_from_coefficients).
    const int64_t P = k_ / 2;
    auto plane = torch::zeros({P, M_}, torch::kFloat64);  // the static planes (j, j+P) of a chunk
    for (int64_t i = 0, m = 0; i < k_; ++i)
      for (int64_t j = i + 1; j < k_; ++j, ++m)
        if (i < P && j == i + P) plane.index_put_({i, m}, 1.0);
    // Chunk g holds the coordinates {g + j G}, so plane (j, j+k/2) of chunk g is rope's half-pairing plane
    // (i, i + D/2) with i = g + j G, and turns at rope's theta_i = base^(-2i/D) (for odd k the spectrum is
    // spread over the G (k-1)/2 static planes the same way).
    static_plane_ = plane;
    log_theta_ = register_buffer(
        "log_theta", static_rate ? rope_log_theta(2 * G_ * P, base) : torch::empty({0}, torch::kFloat64));
    // Zero projection and bias: a fresh model is the static rotation (RoPE, or NoPE with static_rate=false).
    w_a_ = register_parameter("w_a", torch::zeros({s.heads, G_, M_, s.model_dim}));
    b_a_ = register_parameter("b_a", torch::zeros({s.heads, G_, M_}));
  }
  Properties properties() const override {
    Properties p;
    // The logits depend on the tokens between query and key, never on absolute positions.
    p.rotates = p.contextual = p.relative = p.qk_norm_after_encode = true;
    return p;
  }
  PeState initial_state(int64_t batch, int64_t offset) const override {
    auto st = Encoding::initial_state(batch, offset);
    running(st, batch);
    return st;
  }

 protected:
  PeTokens encode_chunk(const torch::Tensor& q, const torch::Tensor& k, const TokenContext& ctx,
                        PeState& st) override {
    const torch::Tensor& x = ctx.x;
    const int64_t B = q.size(0), T = q.size(1), H = shape_.heads, D = shape_.head_dim;
    auto& P0 = running(st, B);
    // Generator coefficients [B,H,G,T,M] in float64: static rate + (W_a x_t + b_a) / s.
    auto learned = (torch::einsum("btc,hgmc->bhgtm", {x, w_a_}) + b_a_.unsqueeze(2)) / rate_scale_;
    auto coef = learned.to(torch::kFloat64);
    if (log_theta_.numel() > 0) {
      // theta rounded to the input dtype first, as rope does, so that k = 2 is rope in either precision.
      auto theta =
          torch::exp(log_theta_.to(q.scalar_type())).to(torch::kFloat64).view({-1, G_}).t();  // [G,P]
      // The Cayley map turns a plane by 2 atan(c): coefficient tan(theta/2) keeps the static part RoPE.
      if (cayley_) theta = torch::tan(theta / 2.0);
      coef = coef + torch::matmul(theta, static_plane_).view({1, 1, G_, 1, M_});
    }
    if (sign_ < 0) coef = -coef;  // the GRAPE authors' clockwise turn: R^T = exp(-A)
    // [B,H,G,T,k,k]; exp for k = 2, 4 runs as plain loops (hdd::rotations).
    auto R = cayley_ ? hdd::cayley(hdd::skew_from_coefficients(coef, k_)) : hdd::rotations(coef, k_);
    if (scan_ == "loop") {  // the fast path: scan and rotation in one loop
      auto [qr, kr, next] = hdd::rotate_by_running_product(P0, R, q, k);
      P0 = next;
      return {qr, kr};
    }
    // Scan [P0, R_0, ..., R_{T-1}]: the first T products are the exclusive P_t, the last the next state.
    auto prods = hdd::running_product(torch::cat({P0.unsqueeze(3), R}, 3), scan_);
    P0 = prods.select(3, T);
    auto Pt = prods.narrow(3, 0, T).to(q.scalar_type());
    auto apply = [&](const torch::Tensor& v) {  // block-diagonal over chunks: chunk g = coordinates g + jG
      auto vc = v.reshape({B, T, H, k_, G_});
      return torch::einsum("bhgtij,bthjg->bthig", {Pt, vc}).reshape({B, T, H, D});
    };
    return {apply(q), apply(k)};
  }

 private:
  // The running product P [B,H,G,k,k] (float64) of every token seen: identity for a fresh state.
  torch::Tensor& running(PeState& st, int64_t B) const {
    auto& P = st.values["P"];
    if (!P.defined()) P = torch::eye(k_, torch::kFloat64).expand({B, shape_.heads, G_, k_, k_}).clone();
    const std::vector<int64_t> want{B, shape_.heads, G_, k_, k_};
    if (P.sizes().vec() != want)
      throw std::invalid_argument(fmt::format("hdd-rope: state P is {} but the input needs [{},{},{},{},{}]",
                                              shape_string(P), B, shape_.heads, G_, k_, k_));
    return P;
  }

  int64_t k_, G_, M_;
  bool cayley_;
  std::string scan_;
  double rate_scale_;
  double sign_ = 1.0;  // orientation: +1 standard, -1 grape
  torch::Tensor static_plane_, log_theta_, w_a_, b_a_;
};

void hdd_rope_laws(LawTable& t) {
  using namespace laws;
  const auto f64 = torch::kFloat64;
  const uint64_t seed = t.seed;
  const std::string& n = t.encoding;
  auto in = random_inputs(f64, seed);
  auto fresh = [&](const std::string& name, PeOptions o = {}) { return build(name, f64, seed, o, false); };
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
}

void add_hdd_rope(std::vector<EncodingInfo>& out) {
  std::string scans;
  for (const auto& n : hdd::scan_names()) scans += (scans.empty() ? "" : "|") + n;
  out.push_back(
      {"hdd-rope",
       "multiplicative",
       "HDD-RoPE: rotate k-dim chunks of q,k by the running product of data-dependent SO(k) rotations "
       "exp(A(x_tau)), tau < t",
       {{"k", "4", "chunk size (D % k == 0); k(k-1)/2 rotation axes per chunk; k = 2 is RoPE's planes"},
        {"map", "exp", "exp: R = exp(A) (closed forms for k <= 4); cayley: R = (I - A)^-1 (I + A)"},
        {"scan", "loop", "running product in training: " + scans},
        {"static_rate", "true", "add RoPE's spectrum on the planes (j, j+k/2) of each chunk"},
        {"base", "10000", "base of the static spectrum theta_i = base^(-2i/D)"},
        {"rate_scale", "16", "s in A = static + (W_a x + b_a)/s (slows Adam's step on the rates)"},
        {"orientation", "standard",
         "standard: R = exp(A), rope's turn; grape: R = exp(-A), the GRAPE authors'"}},
       {"w_a  [H, D/k, k(k-1)/2, C]  init 0 (a fresh model is the static rotation: RoPE)",
        "b_a  [H, D/k, k(k-1)/2]  init 0"},
       [](const HeadShape& s, const PeOptions& o) { return std::make_shared<HddRope>(s, o); },
       hdd_rope_laws});
}

const detail::Registration hdd_rope_registration(add_hdd_rope);

}  // namespace
}  // namespace grape
