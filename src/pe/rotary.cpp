// Rotations on canonical planes: RoPE (with partial rotary and p-RoPE), xPos, GRAPE-M with learned
// frequencies, and GRAPE-M with a learned commuting basis. All share rotate_pairs and one spectrum.
// RoPE and GRAPE-M(-planes) take a context-extension method (pi, ntk, dynamic-ntk, yarn, longrope); its
// math is in context_extension.cpp, these classes only ask it for angles and the q/k scale.
#include "kernels/cpu/rotary.hpp"

#include <fmt/format.h>

#include <cmath>
#include <numbers>
#include <stdexcept>

#include "pe/context_extension.hpp"
#include "pe/families.hpp"
#include "pe/laws.hpp"

namespace grape {

torch::Tensor rotate_pairs_composed(const torch::Tensor& x, const torch::Tensor& angles,
                                    const std::string& pairing, double sign) {
  const int64_t P = angles.size(-1), D = x.size(-1);
  if (2 * P > D)
    throw std::invalid_argument(fmt::format("rotate_pairs: {} pairs do not fit in {} dims", P, D));
  // Reduce the angle first (in its own, usually float64, precision) so cos/sin see a small argument.
  auto ang = torch::fmod(angles, 2.0 * std::numbers::pi);
  auto c = torch::cos(ang).to(x.scalar_type());
  auto s = (torch::sin(ang) * sign).to(x.scalar_type());
  torch::Tensor a, b;
  if (pairing == "half") {
    a = x.narrow(-1, 0, P);
    b = x.narrow(-1, P, P);
  } else if (pairing == "interleaved") {
    auto sizes = x.sizes().vec();
    sizes.back() = P;
    sizes.push_back(2);
    auto xr = x.narrow(-1, 0, 2 * P).reshape(sizes);
    a = xr.select(-1, 0);
    b = xr.select(-1, 1);
  } else {
    throw std::invalid_argument("rotate_pairs: pairing must be half or interleaved, got " + pairing);
  }
  auto a2 = a * c - b * s;  // standard orientation (sign = +1): a counter-clockwise turn of (a, b)
  auto b2 = a * s + b * c;
  auto rot = pairing == "half" ? torch::cat({a2, b2}, -1) : torch::stack({a2, b2}, -1).flatten(-2);
  return 2 * P == D ? rot : torch::cat({rot, x.narrow(-1, 2 * P, D - 2 * P)}, -1);
}

namespace {

namespace kcpu = kernels::cpu;

// The kernel's view of x [..., D] as rows and of c, s (the angles' shape [..., P], contiguous): the angles'
// dims align with x's from the right, and a dim the angles lack or hold once is broadcast (stride 0).
kcpu::RotaryRows rotary_rows(const torch::Tensor& x, const torch::Tensor& c, bool interleaved) {
  kcpu::RotaryRows r;
  r.D = x.size(-1);
  r.P = c.size(-1);
  r.pairing = interleaved ? kcpu::Pairing::interleaved : kcpu::Pairing::half;
  const int64_t L = x.dim() - 1, shift = x.dim() - c.dim();
  r.dims = L == 0 ? 1 : int(L);  // x [D] is one row: one leading dim of size 1
  r.sizes[0] = 1;
  for (int64_t k = 0; k < L; ++k) {
    r.sizes[k] = x.size(k);
    const int64_t ck = k - shift;
    r.strides[k] = ck < 0 || c.size(ck) == 1 ? 0 : c.stride(ck);
  }
  return r;
}

// y = rotate_pairs(x) by the fp32 kernel for given c = cos, s = sign * sin. Backward: dx is the inverse turn
// of dy; dc, ds (only when asked for) are formed per (row, pair) and summed over the dims c and s were
// broadcast along, so gradients still reach learned frequencies and contextual phases through c and s.
struct RotaryKernelFn : torch::autograd::Function<RotaryKernelFn> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& c, const torch::Tensor& s, bool interleaved) {
    ctx->save_for_backward({x, c, s});
    ctx->saved_data["interleaved"] = interleaved;
    auto y = torch::empty_like(x);
    kcpu::rotary_forward(rotary_rows(x, c, interleaved), x.data_ptr<float>(), c.data_ptr<float>(),
                         s.data_ptr<float>(), false, y.data_ptr<float>());
    return y;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &x = saved[0], &c = saved[1], &s = saved[2];
    const auto r = rotary_rows(x, c, ctx->saved_data["interleaved"].toBool());
    const auto dy = grads[0].to(torch::kFloat32).contiguous();
    torch::Tensor dx, dc, ds;
    if (ctx->needs_input_grad(0)) {
      dx = torch::empty_like(dy);
      kcpu::rotary_forward(r, dy.data_ptr<float>(), c.data_ptr<float>(), s.data_ptr<float>(), true,
                           dx.data_ptr<float>());
    }
    if (ctx->needs_input_grad(1) || ctx->needs_input_grad(2)) {
      auto sizes = x.sizes().vec();
      sizes.back() = r.P;
      auto dc_rows = torch::empty(sizes, dy.options()), ds_rows = torch::empty(sizes, dy.options());
      kcpu::rotary_angle_grad(r, x.data_ptr<float>(), dy.data_ptr<float>(), dc_rows.data_ptr<float>(),
                              ds_rows.data_ptr<float>());
      if (ctx->needs_input_grad(1)) dc = dc_rows.sum_to_size(c.sizes());
      if (ctx->needs_input_grad(2)) ds = ds_rows.sum_to_size(s.sizes());
    }
    return {dx, dc, ds, torch::Tensor()};
  }
};

}  // namespace

torch::Tensor rotate_pairs(const torch::Tensor& x, const torch::Tensor& angles, const std::string& pairing,
                           double sign) {
  if (!x.defined() || !angles.defined() || x.dim() < 1 || angles.dim() < 1)
    throw std::invalid_argument("rotate_pairs: x [..., D] and angles [..., P] need at least one dim each");
  if (pairing != "half" && pairing != "interleaved")
    throw std::invalid_argument("rotate_pairs: pairing must be half or interleaved, got " + pairing);
  const int64_t P = angles.size(-1), D = x.size(-1);
  if (2 * P > D)
    throw std::invalid_argument(fmt::format("rotate_pairs: {} pairs do not fit in {} dims", P, D));
  bool fits = angles.dim() <= x.dim();
  for (int64_t k = 2; fits && k <= angles.dim(); ++k)
    fits = angles.size(-k) == 1 || angles.size(-k) == x.size(-k);
  if (!fits)
    throw std::invalid_argument(
        fmt::format("rotate_pairs: angles {} do not broadcast to x's leading dims + [P] (x {})",
                    shape_string(angles), shape_string(x)));
  const bool kernel = x.scalar_type() == torch::kFloat32 && x.device().is_cpu() && angles.device().is_cpu() &&
                      at::isFloatingType(angles.scalar_type()) && x.dim() - 1 <= kcpu::kRotaryMaxDims &&
                      P > 0;
  if (!kernel) return rotate_pairs_composed(x, angles, pairing, sign);
  // c and s exactly as the composed form makes them: reduced and evaluated in the angles' precision.
  auto ang = torch::fmod(angles, 2.0 * std::numbers::pi);
  auto c = torch::cos(ang).to(torch::kFloat32).contiguous();
  auto s = (torch::sin(ang) * sign).to(torch::kFloat32).contiguous();
  return RotaryKernelFn::apply(x.contiguous(), c, s, pairing == "interleaved");
}

namespace detail {

RotaryLayout rotary_layout(const PeOptions& o) {
  RotaryLayout l;
  l.pairing = o.get_choice("pairing", "half", {"half", "interleaved"});
  l.sign = o.get_choice("orientation", "standard", {"standard", "grape"}) == "standard" ? 1.0 : -1.0;
  return l;
}

std::vector<OptionSpec> rotary_layout_options() {
  return {{"pairing", "half", "half: planes (i, i+D/2) as GPT-NeoX/HF; interleaved: (2i, 2i+1) as RoFormer"},
          {"orientation", "standard",
           "standard: a'=a cos-b sin (HF/Meta); grape: the GRAPE authors' clockwise turn"}};
}

torch::Tensor rope_log_theta(int64_t rotated_dims, double base) {
  const int64_t P = rotated_dims / 2;
  auto i = torch::arange(P, torch::kFloat64);
  return -(2.0 * i / double(rotated_dims)) * std::log(base);
}

torch::Tensor positions_f64(int64_t offset, int64_t length) {
  return torch::arange(offset, offset + length, torch::kFloat64);
}

void require_even_head_dim(const std::string& enc, int64_t head_dim) {
  if (head_dim % 2 != 0)
    throw std::invalid_argument(
        fmt::format("{}: head_dim must be even for a rotation (coordinates are rotated in pairs), got {}",
                    enc, head_dim));
}

torch::Tensor linear_init(std::vector<int64_t> shape, int64_t fan_in) {
  return torch::randn(shape) * (0.5 / std::sqrt(double(fan_in)));
}

torch::Tensor distance(const PeTokens& queries, const KeyCache& keys, torch::ScalarType dtype) {
  auto qi = torch::arange(queries.offset, queries.offset + queries.length, torch::kFloat64);
  auto kj = torch::arange(keys.offset, keys.offset + keys.length, torch::kFloat64);
  return (qi.unsqueeze(1) - kj.unsqueeze(0)).to(dtype);
}

}  // namespace detail

namespace {

using namespace detail;

// Angles [1,T,G,P] = position * theta for theta [G,P], formed in float64.
torch::Tensor position_angles(int64_t offset, int64_t T, const torch::Tensor& theta) {
  auto pos = positions_f64(offset, T).view({1, T, 1, 1});
  return pos * theta.to(torch::kFloat64).unsqueeze(0).unsqueeze(0);
}

// ---- rope -------------------------------------------------------------------------------------------
class RoPE : public Encoding {
 public:
  // fixed_method: the registered pi, ntk, ... encodings, whose method is not an option.
  RoPE(const HeadShape& s, const PeOptions& o, const std::string& name = "rope",
       const std::string& fixed_method = "", double default_factor = 1.0)
      : Encoding(name, s), layout_(rotary_layout(o)) {
    require_even_head_dim(name_, s.head_dim);
    const double base = o.get_double("base", 10000.0);
    const double fraction = o.get_double("fraction", 1.0);
    const double p = o.get_double("p", 1.0);
    if (base <= 1.0) throw std::invalid_argument(fmt::format("{}: base must be > 1, got {}", name_, base));
    if (!(fraction > 0.0 && fraction <= 1.0))
      throw std::invalid_argument(fmt::format("{}: fraction must be in (0, 1], got {}", name_, fraction));
    if (!(p >= 0.0 && p <= 1.0))
      throw std::invalid_argument(fmt::format("{}: p must be in [0, 1], got {}", name_, p));
    const double rd = fraction * double(s.head_dim);
    rotated_ = int64_t(std::llround(rd));
    if (std::abs(rd - double(rotated_)) > 1e-9 || rotated_ % 2 != 0 || rotated_ == 0)
      throw std::invalid_argument(fmt::format(
          "{}: fraction*head_dim = {} must be a positive even integer (head_dim {})", name_, rd, s.head_dim));
    ext_ = parse_context_extension(o, name_, rotated_, fixed_method, default_factor);
    const int64_t P = rotated_ / 2;
    const int64_t keep = int64_t(std::llround(p * double(P)));  // highest frequencies come first
    log_theta_ = register_buffer("log_theta", rope_log_theta(rotated_, base).unsqueeze(0));
    keep_ = register_buffer("keep", (torch::arange(P) < keep).to(torch::kFloat32).unsqueeze(0));
  }
  Properties properties() const override {
    Properties p;
    p.rotates = ext_.mscale() == 1.0;  // YaRN's temperature scales q and k
    p.relative = ext_.relative();
    p.qk_norm_after_encode = p.rotates && !ext_.dynamic();  // dynamic: attention_qk rotates
    return p;
  }
  // Frequencies [1,P]; dropped p-RoPE frequencies are exactly 0 (those pairs are never turned).
  torch::Tensor theta(torch::ScalarType dtype) const {
    return torch::exp(log_theta_.to(dtype)) * keep_.to(dtype);
  }

  std::optional<PositionalForm> positional_form() const override {
    if (ext_.dynamic()) return std::nullopt;  // the angles of cached keys change with the length
    PositionalForm f;
    f.angles = [this](int64_t offset, int64_t T) {
      return ext_.angles(theta(torch::kFloat32), offset, T, offset + T).squeeze(0);
    };
    f.interleaved = layout_.pairing == "interleaved";
    f.sign = layout_.sign;
    f.mscale = ext_.mscale();
    return f;
  }

  // A spectrum that depends on the length (dynamic NTK, LongRoPE's short/long switch): rotate the queries
  // and every cached (unrotated) key with the current length's spectrum.
  std::pair<torch::Tensor, torch::Tensor> attention_qk(const PeTokens& queries,
                                                       const KeyCache& keys) const override {
    if (!ext_.dynamic()) return Encoding::attention_qk(queries, keys);
    const auto th = theta(queries.q.scalar_type());
    const int64_t l = queries.offset + queries.length;
    return {ext_.temper(rotate(queries.q, ext_.angles(th, queries.offset, queries.length, l))),
            ext_.temper(rotate(keys.k, ext_.angles(th, keys.offset, keys.length, l)))};
  }

 protected:
  PeTokens encode_chunk(const torch::Tensor& q, const torch::Tensor& k, const TokenContext&,
                        PeState& st) override {
    if (ext_.dynamic()) return {q, k};  // the cache keeps pre-rotation keys; attention_qk rotates
    const int64_t T = q.size(1);
    auto ang = ext_.angles(theta(q.scalar_type()), st.next_pos, T, st.next_pos + T);
    return {ext_.temper(rotate(q, ang)), ext_.temper(rotate(k, ang))};
  }

 private:
  torch::Tensor rotate(const torch::Tensor& x, const torch::Tensor& ang) const {
    return rotate_pairs(x, ang, layout_.pairing, layout_.sign);
  }

  RotaryLayout layout_;
  int64_t rotated_ = 0;
  ContextExtension ext_;
  torch::Tensor log_theta_, keep_;
};

// ---- xpos -------------------------------------------------------------------------------------------
// RoPE times a per-pair decay: q scaled by zeta^((n-c)/S), k by zeta^(-(n-c)/S), so the logit carries
// zeta^((i-j)/S). The centre c is fixed, so cached keys keep consistent scales while decoding.
class XPos : public Encoding {
 public:
  XPos(const HeadShape& s, const PeOptions& o) : Encoding("xpos", s), layout_(rotary_layout(o)) {
    require_even_head_dim(name_, s.head_dim);
    const double base = o.get_double("base", 10000.0);
    gamma_ = o.get_double("gamma", 0.4);
    scale_base_ = o.get_double("scale_base", 512.0);
    center_ = o.get_double("center", 0.0);
    if (base <= 1.0) throw std::invalid_argument(fmt::format("xpos: base must be > 1, got {}", base));
    if (gamma_ <= 0.0) throw std::invalid_argument(fmt::format("xpos: gamma must be > 0, got {}", gamma_));
    if (scale_base_ <= 0.0)
      throw std::invalid_argument(fmt::format("xpos: scale_base must be > 0, got {}", scale_base_));
    const int64_t D = s.head_dim, P = D / 2;
    log_theta_ = register_buffer("log_theta", rope_log_theta(D, base).unsqueeze(0));
    auto b = torch::arange(P, torch::kFloat64);
    log_zeta_ = register_buffer("log_zeta", torch::log((2.0 * b + gamma_ * D) / ((1.0 + gamma_) * D)));
  }
  Properties properties() const override {
    Properties p;
    p.rotates = false;  // the decay changes norms
    p.scales = p.relative = true;
    return p;
  }

 protected:
  PeTokens encode_chunk(const torch::Tensor& q, const torch::Tensor& k, const TokenContext&,
                        PeState& st) override {
    const int64_t T = q.size(1);
    auto ang = position_angles(st.next_pos, T, torch::exp(log_theta_.to(q.scalar_type())));
    auto expo = ((positions_f64(st.next_pos, T) - center_) / scale_base_).view({1, T, 1, 1});
    auto per_pair = torch::exp(expo * log_zeta_.to(torch::kFloat64));  // [1,T,1,P]
    auto per_dim =
        layout_.pairing == "half" ? torch::cat({per_pair, per_pair}, -1) : per_pair.repeat_interleave(2, -1);
    auto sq = per_dim.to(q.scalar_type()), sk = per_dim.reciprocal().to(q.scalar_type());
    return {rotate_pairs(q, ang, layout_.pairing, layout_.sign) * sq,
            rotate_pairs(k, ang, layout_.pairing, layout_.sign) * sk};
  }

 private:
  RotaryLayout layout_;
  double gamma_, scale_base_, center_;
  torch::Tensor log_theta_, log_zeta_;
};

// ---- grape-m: learned log-frequencies -----------------------------------------------------------
// theta = exp(lambda / s) with lambda initialised to s * log(theta_RoPE); the scale s = 16 slows the
// effective Adam step on log(theta). Since s is a power of two, lambda / s is exactly log(theta_RoPE)
// at init, so grape-m at init equals rope bit for bit.
class GrapeM : public Encoding {
 public:
  GrapeM(const HeadShape& s, const PeOptions& o, std::string name = "grape-m")
      : Encoding(std::move(name), s), layout_(rotary_layout(o)) {
    require_even_head_dim(name_, s.head_dim);
    const double base = o.get_double("base", 10000.0);
    scale_ = o.get_double("log_freq_scale", 16.0);
    if (base <= 1.0) throw std::invalid_argument(fmt::format("{}: base must be > 1, got {}", name_, base));
    if (scale_ <= 0.0)
      throw std::invalid_argument(fmt::format("{}: log_freq_scale must be > 0, got {}", name_, scale_));
    const int64_t G = o.get_bool("per_head", false) ? s.heads : 1;
    lambda_ = register_parameter(
        "lambda",
        (rope_log_theta(s.head_dim, base) * scale_).to(torch::kFloat32).unsqueeze(0).repeat({G, 1}));
    // The method acts on the learned theta_d per index d (e.g. NTK: theta_d s^(-2d/(D-2))).
    ext_ = parse_context_extension(o, name_, s.head_dim);
  }
  Properties properties() const override {
    Properties p;
    p.rotates = ext_.mscale() == 1.0;
    p.relative = ext_.relative();
    p.qk_norm_after_encode = p.rotates && !ext_.dynamic();
    return p;
  }
  torch::Tensor theta() const { return torch::exp(lambda_ / scale_); }  // [G,P]
  std::optional<PositionalForm> positional_form() const override {
    if (ext_.dynamic()) return std::nullopt;
    PositionalForm f;
    f.angles = [this](int64_t offset, int64_t T) {
      torch::NoGradGuard no_grad;
      return ext_.angles(theta(), offset, T, offset + T).squeeze(0);
    };
    f.interleaved = layout_.pairing == "interleaved";
    f.sign = layout_.sign;
    f.mscale = ext_.mscale();
    return f;
  }

  // Dynamic NTK: encode left q and k unrotated (in the basis's local frame for grape-m-planes, where
  // B R B^T q . B R B^T k = R B^T q . R B^T k); rotate them here with the current length's spectrum.
  std::pair<torch::Tensor, torch::Tensor> attention_qk(const PeTokens& queries,
                                                       const KeyCache& keys) const override {
    if (!ext_.dynamic()) return Encoding::attention_qk(queries, keys);
    const int64_t l = queries.offset + queries.length;
    return {ext_.temper(rotate(queries.q, queries.offset, l)), ext_.temper(rotate(keys.k, keys.offset, l))};
  }

 protected:
  // x [B,T,H,D] at positions offset.. rotated by the (extended) spectrum for sequence length `length`.
  torch::Tensor rotate(const torch::Tensor& x, int64_t offset, int64_t length) const {
    return rotate_pairs(x, ext_.angles(theta(), offset, x.size(1), length), layout_.pairing, layout_.sign);
  }
  // Rotation plus YaRN's temperature; the identity under dynamic NTK (attention_qk rotates).
  torch::Tensor encode_one(const torch::Tensor& x, int64_t offset) const {
    if (ext_.dynamic()) return x;
    return ext_.temper(rotate(x, offset, offset + x.size(1)));
  }
  PeTokens encode_chunk(const torch::Tensor& q, const torch::Tensor& k, const TokenContext&,
                        PeState& st) override {
    return {encode_one(q, st.next_pos), encode_one(k, st.next_pos)};
  }

  RotaryLayout layout_;
  double scale_;
  torch::Tensor lambda_;
  ContextExtension ext_;
};

// ---- grape-m-planes: learned commuting planes ---------------------------------------------------
// G(n) = B R(n) B^T with B = exp(S - S^T) in SO(D): the exponential of a skew matrix is orthogonal by
// construction, so no re-orthogonalisation is needed, and S = 0 at init gives B = I (= grape-m).
class GrapeMPlanes : public GrapeM {
 public:
  GrapeMPlanes(const HeadShape& s, const PeOptions& o) : GrapeM(s, o, "grape-m-planes") {
    const int64_t G = o.get_bool("per_head_basis", false) ? s.heads : 1;
    basis_logits_ = register_parameter("basis_logits", torch::zeros({G, s.head_dim, s.head_dim}));
  }
  // The learned basis mixes all D coordinates: not a rotation of fixed pairs.
  std::optional<PositionalForm> positional_form() const override { return std::nullopt; }
  torch::Tensor basis() const {  // [H,D,D] (shared bases are expanded)
    auto b = torch::linalg_matrix_exp(basis_logits_ - basis_logits_.transpose(1, 2));
    return b.expand({shape_.heads, shape_.head_dim, shape_.head_dim});
  }

 protected:
  PeTokens encode_chunk(const torch::Tensor& q, const torch::Tensor& k, const TokenContext&,
                        PeState& st) override {
    auto B = basis();
    auto apply = [&](const torch::Tensor& x) {
      auto local = torch::einsum("bthd,hde->bthe", {x, B});  // B^T x per head
      if (ext_.dynamic()) return local;  // attention_qk rotates the local frame (see GrapeM)
      return torch::einsum("bthe,hde->bthd", {encode_one(local, st.next_pos), B});  // B (R(n) B^T x)
    };
    return {apply(q), apply(k)};
  }

 private:
  torch::Tensor basis_logits_;
};

}  // namespace

namespace detail {

EncodingPtr make_extended_rope(const HeadShape& s, const PeOptions& o, const std::string& name,
                               const std::string& fixed_method, double default_factor) {
  return std::make_shared<RoPE>(s, o, name, fixed_method, default_factor);
}

}  // namespace detail

namespace {

void rope_laws(LawTable& t) {
  using namespace laws;
  const auto f64 = torch::kFloat64;
  const uint64_t seed = t.seed;
  auto in = random_inputs(f64, seed);
  auto fresh = [&](const std::string& name, PeOptions o = {}) { return build(name, f64, seed, o, false); };
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
}

void xpos_laws(LawTable& t) {
  using namespace laws;
  const auto f64 = torch::kFloat64;
  const uint64_t seed = t.seed;
  auto in = random_inputs(f64, seed);
  auto fresh = [&](const std::string& name, PeOptions o = {}) { return build(name, f64, seed, o, false); };
  t.add("scale_base=1e30 == rope",
        logits_gap(fresh("xpos", PeOptions{{"scale_base", "1e30"}}), fresh("rope"), in, 9), 1e-12);
}

void grape_m_laws(LawTable& t) {
  using namespace laws;
  const uint64_t seed = t.seed;
  auto in32 = random_inputs(torch::kFloat32, seed);
  auto fresh32 = [&](const std::string& name, PeOptions o = {}) {
    return build(name, torch::kFloat32, seed, o, false);
  };
  for (auto pairing : {"half", "interleaved"}) {
    PeOptions o{{"pairing", pairing}};
    t.add(fmt::format("at init == rope ({}, fp32)", pairing),
          logits_gap(fresh32("grape-m", o), fresh32("rope", o), in32, 11), 0.0);
  }
  t.add("per_head at init == rope (fp32)",
        logits_gap(fresh32("grape-m", PeOptions{{"per_head", "true"}}), fresh32("rope"), in32, 11), 0.0);
}

void grape_m_planes_laws(LawTable& t) {
  using namespace laws;
  const auto f64 = torch::kFloat64;
  const uint64_t seed = t.seed;
  auto in = random_inputs(f64, seed);
  auto fresh = [&](const std::string& name, PeOptions o = {}) { return build(name, f64, seed, o, false); };
  auto planes = build("grape-m-planes", f64, seed);  // perturbed frequencies ...
  auto gm = fresh("grape-m");
  {
    torch::NoGradGuard ng;
    param(planes, "basis_logits").zero_();  // ... but the identity basis
    param(gm, "lambda").copy_(param(planes, "lambda"));
  }
  t.add("identity basis == grape-m", logits_gap(planes, gm, in, 4), 1e-13);
}

void add_rotary(std::vector<EncodingInfo>& out) {
  auto layout = rotary_layout_options();
  const auto extension = context_extension_options();
  auto with = [&](std::vector<OptionSpec> extra, bool extendable = false) {
    extra.insert(extra.end(), layout.begin(), layout.end());
    if (extendable) extra.insert(extra.end(), extension.begin(), extension.end());
    return extra;
  };
  out.push_back(
      {"rope",
       "multiplicative",
       "RoPE: rotate planes of q,k by n*theta_i, theta_i = base^(-2i/r); partial rotary and p-RoPE",
       with({{"base", "10000", "frequency base"},
             {"fraction", "1", "partial rotary: rotate only the first fraction*D dims (GPT-NeoX)"},
             {"p", "1", "p-RoPE: keep the highest-frequency fraction p of frequencies, zero the rest"}},
            true),
       {},
       [](const HeadShape& s, const PeOptions& o) { return std::make_shared<RoPE>(s, o); },
       rope_laws});
  out.push_back({"xpos",
                 "multiplicative",
                 "xPos: RoPE with a per-frequency decay zeta^((i-j)/S) (fixed centre, exact when decoding)",
                 with({{"base", "10000", "frequency base"},
                       {"gamma", "0.4", "zeta_b = (2b + gamma*D) / ((1+gamma)*D)"},
                       {"scale_base", "512", "S: decay length scale"},
                       {"center", "0", "c: fixed centre of the q/k scales (numerical range only)"}}),
                 {},
                 [](const HeadShape& s, const PeOptions& o) { return std::make_shared<XPos>(s, o); },
                 xpos_laws});
  out.push_back({"grape-m",
                 "multiplicative",
                 "GRAPE-M: RoPE planes with learned log-frequencies theta = exp(lambda/16), RoPE init",
                 with({{"base", "10000", "base of the RoPE spectrum used at init"},
                       {"per_head", "false", "one frequency vector per head instead of shared"},
                       {"log_freq_scale", "16", "s in theta = exp(lambda/s)"}},
                      true),
                 {"lambda  [1 or H, D/2]  init s*log(base^(-2i/D))"},
                 [](const HeadShape& s, const PeOptions& o) { return std::make_shared<GrapeM>(s, o); },
                 grape_m_laws});
  out.push_back(
      {"grape-m-planes",
       "multiplicative",
       "GRAPE-M with learned commuting planes: B R(n) B^T, B = exp(S - S^T) in SO(D)",
       with({{"base", "10000", "base of the RoPE spectrum used at init"},
             {"per_head", "false", "one frequency vector per head instead of shared"},
             {"per_head_basis", "false", "one basis per head instead of shared"},
             {"log_freq_scale", "16", "s in theta = exp(lambda/s)"}},
            true),
       {"lambda  [1 or H, D/2]  init s*log(base^(-2i/D))", "basis_logits  [1 or H, D, D]  init 0 (B = I)"},
       [](const HeadShape& s, const PeOptions& o) { return std::make_shared<GrapeMPlanes>(s, o); },
       grape_m_planes_laws});
}

const detail::Registration rotary_registration(add_rotary);

}  // namespace
}  // namespace grape
