// The LibTorch binding of the fused CPU attention kernels (src/kernels/cpu/attention.hpp): checks tensors,
// makes them contiguous float32, and wraps forward/backward in an autograd Function. Thin on purpose: the
// math lives in the kernels, the encoding's per-token terms come from Encoding::bias_terms.
#include <fmt/format.h>

#include <cmath>
#include <stdexcept>

#include "grape/attention.hpp"
#include "kernels/cpu/attention.hpp"

namespace grape {
namespace {

namespace kc = kernels::cpu;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool present(const torch::Tensor& t) { return t.defined() && t.numel() > 0; }
const float* ptr(const torch::Tensor& t) { return present(t) ? t.data_ptr<float>() : nullptr; }
float* mut(torch::Tensor& t) { return present(t) ? t.data_ptr<float>() : nullptr; }

// [B,H,T] (or the path bias's [B,T,H,P], [H], the distance table's [H,W]) float32 contiguous, or empty.
torch::Tensor term(const torch::Tensor& t) {
  return t.defined() ? t.to(torch::kFloat32).contiguous() : torch::empty({0}, torch::kFloat32);
}

// The encoding's bias terms as the kernel reads them (kc::BiasTerms), or their gradients. An absent term
// travels through the autograd Function as an empty tensor (LibTorch 1.13's custom functions cannot take
// undefined inputs) and reaches the kernel as a null pointer.
struct BiasTensors {
  torch::Tensor a, b, c, d;  // [B,H,Tq], [B,H,Tk], [B,H,Tq], [B,H,Tk]
  torch::Tensor p, r, m;     // path bias: [B,Tq,H,P], [B,Tk,H,P], [H]
  torch::Tensor dist;        // distance table [H,W]

  // The one order in which the terms travel through the Function: its inputs, saved tensors and gradients.
  std::vector<torch::Tensor> list() const { return {a, b, c, d, p, r, m, dist}; }
  static BiasTensors from_list(torch::TensorList x) {
    return {x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7]};
  }

  kc::BiasTerms terms() const {
    kc::BiasTerms bias{ptr(a), ptr(b), ptr(c), ptr(d)};
    if (present(p)) bias.p = ptr(p), bias.r = ptr(r), bias.m = ptr(m), bias.P = p.size(3);
    if (present(dist)) bias.dist = ptr(dist), bias.W = dist.size(1);
    return bias;
  }
  kc::BiasGrads grads() {
    return {.da = mut(a),
            .db = mut(b),
            .dc = mut(c),
            .dd = mut(d),
            .dp = mut(p),
            .dr = mut(r),
            .ddist = mut(dist)};
  }
};

// What the backward needs, by name; save() and load() fix its order in the context's list.
struct Saved {
  torch::Tensor q, k, v, out, lse;
  BiasTensors bias;

  void save(AutogradContext* ctx) const {
    variable_list s{q, k, v, out, lse};
    for (const auto& t : bias.list()) s.push_back(t);
    ctx->save_for_backward(std::move(s));
  }
  static Saved load(AutogradContext* ctx) {
    const variable_list s = ctx->get_saved_variables();
    return {s[0], s[1], s[2], s[3], s[4], BiasTensors::from_list(torch::TensorList(s).slice(5))};
  }
};

kc::AttentionShape attention_shape(const torch::Tensor& q, const torch::Tensor& k, int64_t q_offset,
                                   int64_t k_offset) {
  return {q.size(0), q.size(2), q.size(1), k.size(1),
          q.size(3), q_offset,  k_offset,  float(1.0 / std::sqrt(double(q.size(3))))};
}

class FusedAttentionFn : public torch::autograd::Function<FusedAttentionFn> {
 public:
  // terms: BiasTensors::list(); their gradients come back in the same order.
  static variable_list forward(AutogradContext* ctx, torch::Tensor q, torch::Tensor k, torch::Tensor v,
                               torch::TensorList terms, int64_t q_offset, int64_t k_offset) {
    const kc::AttentionShape s = attention_shape(q, k, q_offset, k_offset);
    q = q.contiguous(), k = k.contiguous(), v = v.contiguous();
    const BiasTensors bias = BiasTensors::from_list(terms);
    auto out = torch::empty_like(q);
    auto lse = torch::empty({s.B, s.H, s.Tq}, q.options());
    torch::NoGradGuard no_grad;
    const kc::ForwardParams params{.shape = s,
                                   .q = q.data_ptr<float>(),
                                   .k = k.data_ptr<float>(),
                                   .v = v.data_ptr<float>(),
                                   .bias = bias.terms(),
                                   .out = out.data_ptr<float>(),
                                   .lse = lse.data_ptr<float>()};
    kc::attention(params);  // the kernels pick decode or the tiled forward
    Saved{q, k, v, out, lse, bias}.save(ctx);
    ctx->saved_data["q_offset"] = q_offset;
    ctx->saved_data["k_offset"] = k_offset;
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Saved saved = Saved::load(ctx);
    const auto& [q, k, v, out, lse, bias] = saved;
    auto dout = grads[0].to(torch::kFloat32).contiguous();
    auto dq = torch::empty_like(q), dk = torch::empty_like(k), dv = torch::empty_like(v);
    // A bias term gets a gradient only when it was given (an absent term is a constant zero); the slopes m
    // are a fixed buffer: no gradient.
    auto like = [](const torch::Tensor& t) { return present(t) ? torch::empty_like(t) : torch::Tensor(); };
    BiasTensors dbias{like(bias.a), like(bias.b), like(bias.c),    like(bias.d),
                      like(bias.p), like(bias.r), torch::Tensor(), like(bias.dist)};
    kc::attention_backward({.shape = attention_shape(q, k, ctx->saved_data["q_offset"].toInt(),
                                                     ctx->saved_data["k_offset"].toInt()),
                            .q = q.data_ptr<float>(),
                            .k = k.data_ptr<float>(),
                            .v = v.data_ptr<float>(),
                            .bias = bias.terms(),
                            .out = out.data_ptr<float>(),
                            .dout = dout.data_ptr<float>(),
                            .lse = lse.data_ptr<float>(),
                            .dq = dq.data_ptr<float>(),
                            .dk = dk.data_ptr<float>(),
                            .dv = dv.data_ptr<float>(),
                            .bias_grads = dbias.grads()});
    variable_list result{dq, dk, dv};
    for (const auto& t : dbias.list()) result.push_back(t);
    result.resize(result.size() + 2);  // q_offset, k_offset: not tensors
    return result;
  }
};

void check_float32(const torch::Tensor& t, const char* what) {
  if (!t.defined()) throw std::invalid_argument(fmt::format("fused attention: {} is missing", what));
  if (t.scalar_type() != torch::kFloat32)
    throw std::invalid_argument(
        fmt::format("fused attention: {} must be float32, got {} (use the reference "
                    "attention for other dtypes)",
                    what, c10::toString(t.scalar_type())));
}

}  // namespace

bool fused_supported(const Encoding& enc) { return enc.properties().kernel_bias != KernelBias::unsupported; }

torch::Tensor fused_attend(const Encoding& enc, const PeTokens& queries, const KeyCache& keys) {
  const auto [q, k] = enc.attention_qk(queries, keys);
  check_float32(q, "q");
  check_float32(k, "k");
  check_float32(keys.v, "v (the cache holds no values)");
  if (q.dim() != 4 || k.dim() != 4 || !k.sizes().equals(keys.v.sizes()) || q.size(0) != k.size(0) ||
      q.size(2) != k.size(2) || q.size(3) != k.size(3))
    throw std::invalid_argument(
        fmt::format("fused attention: q {} and k, v {} must be [B,T,H,D] with equal B, H, D", shape_string(q),
                    shape_string(k)));
  if (queries.offset < keys.offset)
    throw std::invalid_argument(
        fmt::format("fused attention: the first query (position {}) precedes every cached "
                    "key (from position {})",
                    queries.offset, keys.offset));
  const auto kind = enc.properties().kernel_bias;
  if (kind == KernelBias::unsupported)
    throw std::invalid_argument(
        fmt::format("fused attention: the bias of '{}' is not one the fused kernels "
                    "compute; use the reference attention",
                    enc.name()));
  const BiasTerms t = enc.bias_terms(queries, keys);
  const bool linear = t.a.defined() || t.b.defined() || t.c.defined() || t.d.defined();
  if (linear != (kind == KernelBias::linear) || t.p.defined() != (kind == KernelBias::path_sum) ||
      t.dist.defined() != (kind == KernelBias::distance_table))
    throw std::invalid_argument(
        fmt::format("fused attention: the bias terms of '{}' do not match its declared "
                    "kernel bias '{}'",
                    enc.name(), to_string(kind)));
  if (t.p.defined()) {  // the path bias: p [B,Tq,H,P], r [B,Tk,H,P], m [H]
    const bool ok = t.r.defined() && t.m.defined() && t.p.dim() == 4 && t.r.dim() == 4 && t.m.dim() == 1 &&
                    t.p.size(0) == q.size(0) && t.p.size(1) == q.size(1) && t.p.size(2) == q.size(2) &&
                    t.r.size(0) == k.size(0) && t.r.size(1) == k.size(1) && t.r.size(2) == k.size(2) &&
                    t.r.size(3) == t.p.size(3) && t.p.size(3) >= 1 && t.m.size(0) == q.size(2);
    auto sh = [](const torch::Tensor& x) { return x.defined() ? shape_string(x) : std::string("undefined"); };
    if (!ok)
      throw std::invalid_argument(
          fmt::format("fused attention: path-bias terms of '{}' must be p [B,Tq,H,P], r "
                      "[B,Tk,H,P] and m [H] (got p {}, r {}, m {})",
                      enc.name(), sh(t.p), sh(t.r), sh(t.m)));
  }
  if (t.dist.defined() && !(t.dist.dim() == 2 && t.dist.size(0) == q.size(2) && t.dist.size(1) >= 1))
    throw std::invalid_argument(
        fmt::format("fused attention: the distance table of '{}' must be [H,W] with H = {} "
                    "and W >= 1 (got {})",
                    enc.name(), q.size(2), shape_string(t.dist)));
  const BiasTensors bias{term(t.a), term(t.b), term(t.c), term(t.d),
                         term(t.p), term(t.r), term(t.m), term(t.dist)};
  const auto terms = bias.list();
  return FusedAttentionFn::apply(q, k, keys.v, torch::TensorList(terms), queries.offset, keys.offset)[0];
}

torch::Tensor fused_attention(Encoding& enc, const torch::Tensor& q, const torch::Tensor& k,
                              const torch::Tensor& v, const TokenContext& ctx, PeState& state) {
  auto tokens = enc.encode(q, k, ctx, state);
  return fused_attend(enc, tokens, KeyCache::from(tokens, v));
}

}  // namespace grape
