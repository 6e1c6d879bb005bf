// TAPE (docs/encodings.md, "tape"): a contextualised, equivariant position state E per token and layer. The
// model (src/nn/model.cpp) carries E through the layers; this file holds its math: E^(0), how E turns q and
// k, and the two updates (after attention, after the MLP). Layout: E [B,T,H,D], first half Re z, second Im z.
#include <fmt/format.h>

#include <cmath>
#include <numbers>
#include <stdexcept>

#include "pe/families.hpp"
#include "pe/laws.hpp"

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

// Each token has a position state E [B,T,H,D] per layer: D/2 complex numbers z_b = E[b] + i E[b+D/2] per head
// (the 2x2 blocks [[c,-s],[s,c]] of the TAPE paper stored once, so the rotate_half duplicate never drifts).
// q, k are multiplied by z (a rotation at layer 0, where E is RoPE's cos/sin table at the token's position);
// attention averages E with the same weights as v (E~), and E += A(E~); after the MLP, with its output y,
// E += W2 (SiLU(y Wx) * (W1 E)). Every update is linear in E with coefficients from x only, so a global
// rotation of every z_b (a position shift) leaves token outputs unchanged. With W1 = 0 and A = 0 (the init)
// E never changes and the model equals its RoPE backbone. The model drives the stream through the
// Encoding's stream hooks.
class Tape : public Encoding {
 public:
  Tape(const HeadShape& s, const PeOptions& o) : Encoding("tape", s) {
    require_even_head_dim(name_, s.head_dim);
    const double base = o.get_double("base", 10000.0);
    if (base <= 1.0) throw std::invalid_argument(fmt::format("tape: base must be > 1, got {}", base));
    shift_ = o.get_double("shift", 0.0);
    if (shift_ < 0) throw std::invalid_argument(fmt::format("tape: shift must be >= 0, got {}", shift_));
    code_compat_ = o.get_choice("mode", "paper", {"paper", "code_compat"}) == "code_compat";
    const int64_t I = o.get_int("hidden", 4 * s.heads);
    if (I < 1) throw std::invalid_argument(fmt::format("tape: hidden must be >= 1, got {}", I));
    log_theta_ = register_buffer("log_theta", rope_log_theta(s.head_dim, base));
    sign_ = rotary_layout(o).sign;  // grape: E^(0) = cos - i sin, the authors' clockwise layer-0 turn
    updates_ = o.get_bool("updates", true);
    if (!updates_) return;  // the model's last layer: its updated E would never be read
    // The authors' init: W1 and A zero, so E never changes at step 0 and the model is its RoPE backbone.
    W1_ = register_parameter("W1", torch::zeros({I, s.heads}));
    Wx_ = register_parameter("Wx", torch::randn({I, s.model_dim}) * 0.02);
    W2_ = register_parameter("W2", torch::randn({s.heads, I}) * 0.02);
    A_ = register_parameter("A", torch::zeros({s.heads, s.heads}));
  }

  Properties properties() const override {
    Properties p;
    p.relative = true;  // layer 0 is RoPE; later layers are invariant to a global shift (tests/test_tape.cpp)
    p.reads_stream = true;
    p.updates_stream = updates_;
    return p;  // not `rotates`: after an update |z| != 1, q and k are scaled as well as turned
  }

  // E^(0) of tokens offset..offset+T-1 (positions shifted by the `shift` option): [B,T,H,D].
  torch::Tensor initial_stream(int64_t batch, int64_t offset, int64_t length,
                               torch::ScalarType dtype) const override {
    if (batch < 1 || length < 0 || offset < 0)
      throw std::invalid_argument(
          fmt::format("tape: bad stream request B={} offset={} T={}", batch, offset, length));
    auto pos = positions_f64(offset, length).unsqueeze(1) + shift_;  // [T,1]
    auto ang =
        torch::fmod(pos * torch::exp(log_theta_.to(torch::kFloat64)).unsqueeze(0), 2.0 * std::numbers::pi);
    auto E = torch::cat({torch::cos(ang), sign_ * torch::sin(ang)}, -1).to(dtype);  // [T,D]
    return E.view({1, length, 1, shape_.head_dim}).expand({batch, length, shape_.heads, shape_.head_dim});
  }

  // E + A(E~): mode paper mixes heads with A [H,H]; mode code_compat scales head m by sum_e A[m,e].
  torch::Tensor stream_after_attention(const torch::Tensor& E, const torch::Tensor& E_tilde) const override {
    require_updates();
    check_stream(E_tilde, E.size(0), E.size(1), "E~");
    if (code_compat_)  // the authors' einsum sums A's second index out: a per-head scalar, no mixing
      return E + E_tilde * A_.sum(1).view({1, 1, -1, 1});
    return E + torch::einsum("me,bted->btmd", {A_, E_tilde});
  }

  // E + W2 (SiLU(y Wx^T) * (W1 E)), y [B,T,C] the MLP output (before the residual).
  torch::Tensor stream_after_mlp(const torch::Tensor& E, const torch::Tensor& y) const override {
    require_updates();
    if (!y.defined() || y.dim() != 3 || y.size(0) != E.size(0) || y.size(1) != E.size(1) ||
        y.size(2) != shape_.model_dim)
      throw std::invalid_argument(fmt::format("tape: the MLP output must be [B,T,C={}], got {}",
                                              shape_.model_dim, y.defined() ? shape_string(y) : "none"));
    auto G = torch::silu(torch::einsum("btc,ic->bti", {y, Wx_}));  // [B,T,I] token-conditioned gate
    auto U = torch::einsum("im,btmd->btid", {W1_, E});  // heads -> I, the same for every (b, re/im)
    return E + torch::einsum("mi,btid->btmd", {W2_, G.unsqueeze(-1) * U});
  }

 protected:
  // q, k times this layer's position state (ctx.stream; layer 0's when not given). The key map keeps E
  // (cached beside the keys: attention averages it).
  PeTokens encode_chunk(const torch::Tensor& q, const torch::Tensor& k, const TokenContext& ctx,
                        PeState& st) override {
    auto E = ctx.stream.defined() ? ctx.stream.to(q.scalar_type())
                                  : initial_stream(q.size(0), st.next_pos, q.size(1), q.scalar_type());
    PeTokens out{multiply_by_stream(q, E), multiply_by_stream(k, E)};
    out.key["E"] = E;
    return out;
  }

 private:
  void check_stream(const torch::Tensor& E, int64_t B, int64_t T, const char* what) const {
    if (!E.defined() || E.dim() != 4 || E.size(0) != B || E.size(1) != T || E.size(2) != shape_.heads ||
        E.size(3) != shape_.head_dim)
      throw std::invalid_argument(fmt::format("tape: {} must be [B={},T={},H={},D={}], got {}", what, B, T,
                                              shape_.heads, shape_.head_dim,
                                              E.defined() ? shape_string(E) : "none"));
  }
  void require_updates() const {
    if (!updates_)
      throw std::invalid_argument("tape: this layer was built with updates=false (no E updates)");
  }

  bool updates_ = true;
  torch::Tensor log_theta_;  // [D/2] RoPE log-frequencies (float64 buffer)
  double shift_ = 0;
  double sign_ = 1.0;  // orientation of E^(0): +1 standard, -1 grape
  bool code_compat_ = false;
  torch::Tensor W1_, Wx_, W2_, A_;  // [I,H] zero, [I,C] N(0,0.02^2), [H,I] N(0,0.02^2), [H,H] zero
};

void tape_laws(LawTable& t) {
  using namespace laws;
  const auto f64 = torch::kFloat64;
  const uint64_t seed = t.seed;
  auto in = random_inputs(f64, seed);
  auto fresh = [&](const std::string& name, PeOptions o = {}) { return build(name, f64, seed, o, false); };
  // Standalone (no stream from earlier layers) TAPE is layer 0: E^(0) is RoPE's table, for any shift.
  t.add("layer 0 == rope", logits_gap(fresh("tape"), fresh("rope"), in, 7), 1e-12);
  t.add("shift=1000 == shift=0", logits_gap(fresh("tape", PeOptions{{"shift", "1000"}}), fresh("tape"), in),
        1e-10);
}

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
        {"updates", "true", "false: E is used but never updated (the model sets it for its last layer)"},
        {"orientation", "standard", "turn of E^(0): standard as rope; grape: the GRAPE authors' clockwise"}},
       {"W1  [I, H]  init 0", "Wx  [I, C]  init N(0, 0.02^2)", "W2  [H, I]  init N(0, 0.02^2)",
        "A  [H, H]  init 0  (none of the four in the model's last layer)"},
       [](const HeadShape& s, const PeOptions& o) { return std::make_shared<Tape>(s, o); },
       tape_laws});
}

const detail::Registration tape_registration(add_tape);

}  // namespace
}  // namespace grape
