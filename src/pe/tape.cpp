// TAPE (pe-zoo-spec.md §1): a contextualised, equivariant position state E per token and layer. The model
// (src/nn/model.cpp) carries E through the layers; this file holds its math: E^(0), how E turns q and k,
// and the two updates (after attention, after the MLP). Layout: E [B,T,H,D], first half Re z, second Im z.
#include <fmt/format.h>

#include <cmath>
#include <numbers>
#include <stdexcept>

#include "pe/families.hpp"

namespace grape {

using namespace detail;

namespace {

// q * z per head and pair: (a, b) -> (a c - b s, a s + b c), the rotate_half layout of rope (standard turn).
torch::Tensor multiply_by_stream(const torch::Tensor& x, const torch::Tensor& E) {
  const int64_t P = x.size(-1) / 2;
  auto a = x.narrow(-1, 0, P), b = x.narrow(-1, P, P);
  auto c = E.narrow(-1, 0, P), s = E.narrow(-1, P, P);
  return torch::cat({a * c - b * s, a * s + b * c}, -1);
}

}  // namespace

TapeEncoding::TapeEncoding(const HeadShape& s, const PeOptions& o) : Encoding("tape", s) {
  require_even_head_dim(name_, s.head_dim);
  const double base = o.get_double("base", 10000.0);
  if (base <= 1.0) throw std::invalid_argument(fmt::format("tape: base must be > 1, got {}", base));
  shift_ = o.get_double("shift", 0.0);
  if (shift_ < 0) throw std::invalid_argument(fmt::format("tape: shift must be >= 0, got {}", shift_));
  code_compat_ = o.get_choice("mode", "paper", {"paper", "code_compat"}) == "code_compat";
  const int64_t I = o.get_int("hidden", 4 * s.heads);
  if (I < 1) throw std::invalid_argument(fmt::format("tape: hidden must be >= 1, got {}", I));
  log_theta_ = register_buffer("log_theta", rope_log_theta(s.head_dim, base));
  updates_ = o.get_bool("updates", true);
  if (!updates_) return;  // the model's last layer: its updated E would never be read
  // The authors' init: W1 and A zero, so E never changes at step 0 and the model is its RoPE backbone.
  W1 = register_parameter("W1", torch::zeros({I, s.heads}));
  Wx = register_parameter("Wx", torch::randn({I, s.model_dim}) * 0.02);
  W2 = register_parameter("W2", torch::randn({s.heads, I}) * 0.02);
  A = register_parameter("A", torch::zeros({s.heads, s.heads}));
}

Properties TapeEncoding::properties() const {
  Properties p;
  p.relative = true;  // layer 0 is RoPE; later layers are invariant to a global shift (tests/test_tape.cpp)
  return p;           // not `rotates`: after an update |z| != 1, q and k are scaled as well as turned
}

torch::Tensor TapeEncoding::initial_stream(int64_t batch, int64_t offset, int64_t length,
                                           torch::ScalarType dtype) const {
  if (batch < 1 || length < 0 || offset < 0)
    throw std::invalid_argument(
        fmt::format("tape: bad stream request B={} offset={} T={}", batch, offset, length));
  auto pos = positions_f64(offset, length).unsqueeze(1) + shift_;  // [T,1]
  auto ang =
      torch::fmod(pos * torch::exp(log_theta_.to(torch::kFloat64)).unsqueeze(0), 2.0 * std::numbers::pi);
  auto E = torch::cat({torch::cos(ang), torch::sin(ang)}, -1).to(dtype);  // [T,D]
  return E.view({1, length, 1, shape_.head_dim}).expand({batch, length, shape_.heads, shape_.head_dim});
}

torch::Tensor TapeEncoding::check_stream(const torch::Tensor& E, int64_t B, int64_t T,
                                         const char* what) const {
  if (!E.defined() || E.dim() != 4 || E.size(0) != B || E.size(1) != T || E.size(2) != shape_.heads ||
      E.size(3) != shape_.head_dim)
    throw std::invalid_argument(fmt::format("tape: {} must be [B={},T={},H={},D={}], got {}", what, B, T,
                                            shape_.heads, shape_.head_dim,
                                            E.defined() ? shape_string(E) : "none"));
  return E;
}

PeTokens TapeEncoding::encode_with_stream(const torch::Tensor& q, const torch::Tensor& k,
                                          const torch::Tensor& stream, PeState& state) {
  if (q.defined() && q.dim() == 4) check_stream(stream, q.size(0), q.size(1), "the position state E");
  pending_ = stream;
  try {
    auto out = encode(q, k, {}, state);
    pending_ = torch::Tensor();
    return out;
  } catch (...) {
    pending_ = torch::Tensor();
    throw;
  }
}

PeTokens TapeEncoding::encode_chunk(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor&,
                                    PeState& st) {
  auto E = pending_.defined() ? pending_.to(q.scalar_type())
                              : initial_stream(q.size(0), st.next_pos, q.size(1), q.scalar_type());
  PeTokens out{multiply_by_stream(q, E), multiply_by_stream(k, E)};
  out.key["E"] = E;  // attention averages the keys' E with the same weights as v
  return out;
}

void TapeEncoding::require_updates() const {
  if (!updates_) throw std::invalid_argument("tape: this layer was built with updates=false (no E updates)");
}

torch::Tensor TapeEncoding::attention_update(const torch::Tensor& E, const torch::Tensor& E_tilde) const {
  require_updates();
  check_stream(E_tilde, E.size(0), E.size(1), "E~");
  if (code_compat_)  // the authors' einsum sums A's second index out: a per-head scalar, no mixing
    return E + E_tilde * A.sum(1).view({1, 1, -1, 1});
  return E + torch::einsum("me,bted->btmd", {A, E_tilde});
}

torch::Tensor TapeEncoding::mlp_update(const torch::Tensor& E, const torch::Tensor& y) const {
  require_updates();
  if (!y.defined() || y.dim() != 3 || y.size(0) != E.size(0) || y.size(1) != E.size(1) ||
      y.size(2) != shape_.model_dim)
    throw std::invalid_argument(fmt::format("tape: the MLP output must be [B,T,C={}], got {}",
                                            shape_.model_dim, y.defined() ? shape_string(y) : "none"));
  auto G = torch::silu(torch::einsum("btc,ic->bti", {y, Wx}));  // [B,T,I] token-conditioned gate
  auto U = torch::einsum("im,btmd->btid", {W1, E});             // heads -> I, the same for every (b, re/im)
  return E + torch::einsum("mi,btid->btmd", {W2, G.unsqueeze(-1) * U});
}

namespace detail {

void add_tape(std::vector<EncodingInfo>& out) {
  out.push_back(
      {"tape",
       "multiplicative",
       "TAPE: per-token position state E through the layers (RoPE at layer 0), updated by attention and "
       "the MLP; equivariant to rotations of E",
       {{"base", "10000", "RoPE base of E^(0)"},
        {"shift", "0", "start positions of E^(0) at this offset (outputs are invariant to it)"},
        {"mode", "paper", "paper: A mixes heads; code_compat: head m scaled by the row sum of A"},
        {"hidden", "4H", "I, width of the position MLP"},
        {"updates", "true", "false: E is used but never updated (the model sets it for its last layer)"}},
       {"W1  [I, H]  init 0", "Wx  [I, C]  init N(0, 0.02^2)", "W2  [H, I]  init N(0, 0.02^2)",
        "A  [H, H]  init 0  (none of the four in the model's last layer)"},
       [](const HeadShape& s, const PeOptions& o) { return std::make_shared<TapeEncoding>(s, o); }});
}

}  // namespace detail
}  // namespace grape
