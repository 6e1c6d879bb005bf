// Absolute encodings and the trivial one: NoPE, sinusoidal and learned position embeddings.
// They act only through the embed hook (added to the token embeddings at the input); q and k pass
// through attention untouched.
#include <fmt/format.h>

#include <cmath>
#include <stdexcept>

#include "pe/families.hpp"
#include "pe/laws.hpp"

namespace grape {
namespace {

class Absolute : public Encoding {
 public:
  using Encoding::Encoding;
  Properties properties() const override {
    Properties p;
    p.embeds = name_ != "nope";
    p.relative = name_ == "nope";  // logits of NoPE do not depend on positions at all
    p.qk_norm_after_encode = true;
    return p;
  }
  // encode leaves q and k alone (the embedding, if any, is applied by the model before the layers).
  std::optional<PositionalForm> positional_form() const override { return PositionalForm{}; }

 protected:
  PeTokens encode_chunk(const torch::Tensor& q, const torch::Tensor& k, const TokenContext&,
                        PeState&) override {
    return {q, k};
  }
  void check_embedding_input(const torch::Tensor& h, int64_t offset) const {
    if (!h.defined() || h.dim() != 3 || h.size(2) != shape_.model_dim)
      throw std::invalid_argument(fmt::format("{}: embeddings must be [B,T,C={}], got {}", name_,
                                              shape_.model_dim, h.defined() ? shape_string(h) : "none"));
    if (offset < 0)
      throw std::invalid_argument(fmt::format("{}: offset must be >= 0, got {}", name_, offset));
  }
};

class NoPE : public Absolute {
 public:
  NoPE(const HeadShape& s, const PeOptions&) : Absolute("nope", s) {}
};

// PE(n, 2i) = sin(n / base^(2i/C)), PE(n, 2i+1) = cos(n / base^(2i/C)), added to the embeddings.
class Sinusoidal : public Absolute {
 public:
  Sinusoidal(const HeadShape& s, const PeOptions& o) : Absolute("sinusoidal", s) {
    base_ = o.get_double("base", 10000.0);
    if (base_ <= 1.0) throw std::invalid_argument(fmt::format("sinusoidal: base must be > 1, got {}", base_));
    if (s.model_dim % 2 != 0)
      throw std::invalid_argument(fmt::format("sinusoidal: model_dim must be even, got {}", s.model_dim));
  }
  torch::Tensor table(int64_t offset, int64_t T) const {  // [T,C] float64
    const int64_t C = shape_.model_dim;
    auto n = detail::positions_f64(offset, T).unsqueeze(1);
    auto i = torch::arange(C / 2, torch::kFloat64).unsqueeze(0);
    auto ang = torch::fmod(n * torch::exp(-(2.0 * i / double(C)) * std::log(base_)), 2.0 * M_PI);
    return torch::stack({torch::sin(ang), torch::cos(ang)}, -1).flatten(-2);
  }
  torch::Tensor embed(const torch::Tensor& h, int64_t offset) const override {
    check_embedding_input(h, offset);
    return h + table(offset, h.size(1)).to(h.scalar_type()).unsqueeze(0);
  }

 private:
  double base_;
};

// A learned table P [max_len, C], N(0, 0.02^2) as GPT-2. Positions past the table are refused.
class Learned : public Absolute {
 public:
  Learned(const HeadShape& s, const PeOptions& o) : Absolute("learned", s) {
    max_len_ = o.get_int("max_len", 1024);
    if (max_len_ < 1)
      throw std::invalid_argument(fmt::format("learned: max_len must be >= 1, got {}", max_len_));
    table_ = register_parameter("table", torch::randn({max_len_, s.model_dim}) * 0.02);
  }
  torch::Tensor embed(const torch::Tensor& h, int64_t offset) const override {
    check_embedding_input(h, offset);
    const int64_t T = h.size(1);
    if (offset + T > max_len_)
      throw std::invalid_argument(
          fmt::format("learned: positions {}..{} exceed the table of max_len={} rows (set max_len larger)",
                      offset, offset + T - 1, max_len_));
    return h + table_.narrow(0, offset, T).to(h.scalar_type()).unsqueeze(0);
  }

 private:
  int64_t max_len_;
  torch::Tensor table_;
};

void learned_laws(LawTable& t) {
  using namespace laws;
  const auto f64 = torch::kFloat64;
  const uint64_t seed = t.seed;
  auto fresh = [&](const std::string& name, PeOptions o = {}) { return build(name, f64, seed, o, false); };
  // The table row of each absolute position is added as it is, and positions past the table are refused.
  auto e = fresh("learned", PeOptions{{"max_len", "40"}});
  auto zeros = torch::zeros({1, 6, kShape.model_dim}, f64);
  t.add("embed adds table rows offset..",
        max_diff(e->embed(zeros, 30).squeeze(0), param(e, "table").narrow(0, 30, 6)), 0.0);
  bool refused = false;
  try {
    e->embed(zeros, 36);
  } catch (const std::invalid_argument&) {
    refused = true;
  }
  t.add("position >= max_len refused (1 = not refused)", refused ? 0.0 : 1.0, 0.0);
}

void sinusoidal_laws(LawTable& t) {
  using namespace laws;
  const auto f64 = torch::kFloat64;
  const uint64_t seed = t.seed;
  auto fresh = [&](const std::string& name, PeOptions o = {}) { return build(name, f64, seed, o, false); };
  auto e = fresh("sinusoidal");
  auto zeros = torch::zeros({1, 64, kShape.model_dim}, f64);
  auto pe = e->embed(zeros, 3).squeeze(0);  // [64, C]
  t.add("|PE(n)|^2 == C/2", (pe.pow(2).sum(-1) - kShape.model_dim / 2.0).abs().max().item<double>(), 1e-12);
  // PE(n + k) is a fixed per-pair rotation of PE(n): |PE(n+k) - PE(m+k)| == |PE(n) - PE(m)|.
  auto a = pe.narrow(0, 0, 32), b = pe.narrow(0, 5, 32);
  auto pairwise = [](const torch::Tensor& x) { return (x.unsqueeze(0) - x.unsqueeze(1)).norm(2, -1); };
  auto d0 = pairwise(a), d1 = pairwise(b);
  t.add("PE(n+k) = rotation of PE(n)", max_diff(d0, d1), 1e-12);
}

void add_absolute(std::vector<EncodingInfo>& out) {
  out.push_back({"nope",
                 "absolute",
                 "NoPE: no position signal; the causal mask alone orders tokens",
                 {},
                 {},
                 [](const HeadShape& s, const PeOptions& o) { return std::make_shared<NoPE>(s, o); }});
  out.push_back({"sinusoidal",
                 "absolute",
                 "sinusoidal absolute embedding added at the input (Vaswani et al.)",
                 {{"base", "10000", "frequency base"}},
                 {},
                 [](const HeadShape& s, const PeOptions& o) { return std::make_shared<Sinusoidal>(s, o); },
                 sinusoidal_laws});
  out.push_back({"learned",
                 "absolute",
                 "learned absolute embedding table added at the input (GPT-2)",
                 {{"max_len", "1024", "rows of the table; longer sequences are refused"}},
                 {"table  [max_len, C]  init N(0, 0.02^2)"},
                 [](const HeadShape& s, const PeOptions& o) { return std::make_shared<Learned>(s, o); },
                 learned_laws});
}

const detail::Registration absolute_registration(add_absolute);

}  // namespace
}  // namespace grape
