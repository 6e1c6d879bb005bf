// The encoding base class: input validation, the default hooks, and the key cache.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cmath>
#include <limits>
#include <stdexcept>

#include "kernels/cpu/finite.hpp"
#include "pe/families.hpp"

namespace grape {

namespace {

// Contiguous fp32 CPU tensors (the usual q, k, x) take the one-pass kernel; others LibTorch's isfinite.
void require_finite(const torch::Tensor& t, const char* what, const std::string& enc) {
  const bool kernel = t.scalar_type() == torch::kFloat32 && t.device().is_cpu() && t.is_contiguous();
  if (kernel ? !kernels::cpu::all_finite(t.data_ptr<float>(), t.numel())
             : !torch::isfinite(t).all().item<bool>())
    throw std::invalid_argument(fmt::format("{}: {} contains NaN or Inf values", enc, what));
}

}  // namespace

std::string shape_string(const torch::Tensor& t) { return fmt::format("[{}]", fmt::join(t.sizes(), ",")); }

Encoding::Encoding(std::string name, HeadShape shape) : name_(std::move(name)), shape_(shape) {
  if (shape_.heads < 1 || shape_.head_dim < 1 || shape_.model_dim < 1)
    throw std::invalid_argument(
        fmt::format("{}: heads, head_dim and model_dim must be positive (got H={}, D={}, C={})", name_,
                    shape_.heads, shape_.head_dim, shape_.model_dim));
}

PeState Encoding::initial_state(int64_t batch, int64_t offset) const {
  if (offset < 0)
    throw std::invalid_argument(fmt::format("{}: position offset must be >= 0, got {}", name_, offset));
  PeState s;
  s.next_pos = offset;
  return s;
}

torch::Tensor Encoding::embed(const torch::Tensor& h, int64_t offset) const { return h; }

torch::Tensor Encoding::bias(const PeTokens&, const KeyCache&) const { return {}; }

const char* to_string(KernelBias kind) {
  switch (kind) {
    case KernelBias::none:
      return "none";
    case KernelBias::linear:
      return "linear";
    case KernelBias::distance_table:
      return "distance table";
    case KernelBias::path_sum:
      return "path sum";
    case KernelBias::unsupported:
      return "unsupported";
  }
  return "?";
}

std::optional<PositionalForm> Encoding::positional_form() const { return std::nullopt; }

BiasTerms Encoding::bias_terms(const PeTokens&, const KeyCache&) const {
  const auto kind = properties().kernel_bias;
  if (kind != KernelBias::none)
    throw std::invalid_argument(
        fmt::format("{}: its bias is declared '{}' but it gives no terms for the fused "
                    "kernels",
                    name_, to_string(kind)));
  return {};
}

std::pair<torch::Tensor, torch::Tensor> Encoding::attention_qk(const PeTokens& queries,
                                                               const KeyCache& keys) const {
  return {queries.q, keys.k};
}

torch::Tensor Encoding::initial_stream(int64_t, int64_t, int64_t, torch::ScalarType) const { return {}; }

torch::Tensor Encoding::stream_after_attention(const torch::Tensor& E, const torch::Tensor&) const {
  return E;
}

torch::Tensor Encoding::stream_after_mlp(const torch::Tensor& E, const torch::Tensor&) const { return E; }

torch::Tensor attention_logits(const Encoding& enc, const PeTokens& queries, const KeyCache& keys) {
  const double scale = 1.0 / std::sqrt(double(queries.q.size(-1)));
  auto [q, k] = enc.attention_qk(queries, keys);
  auto logits = torch::einsum("bihd,bjhd->bhij", {q, k}) * scale;
  auto b = enc.bias(queries, keys);
  if (b.defined()) logits = logits + b;
  auto qi = torch::arange(queries.offset, queries.offset + queries.length).unsqueeze(1);
  auto kj = torch::arange(keys.offset, keys.offset + keys.length).unsqueeze(0);
  return logits.masked_fill(kj > qi, -std::numeric_limits<double>::infinity());
}

std::vector<std::string> Encoding::describe_parameters() const {
  std::vector<std::string> lines;
  for (const auto& p : named_parameters(true))
    lines.push_back(fmt::format("{} {}", p.key(), shape_string(p.value())));
  return lines;
}

PeTokens Encoding::encode(const torch::Tensor& q, const torch::Tensor& k, const TokenContext& ctx,
                          PeState& state) {
  const torch::Tensor& x = ctx.x;
  const auto& s = shape_;
  if (!q.defined() || !k.defined()) throw std::invalid_argument(name_ + ": q and k are required");
  if (q.dim() != 4 || q.size(2) != s.heads || q.size(3) != s.head_dim)
    throw std::invalid_argument(
        fmt::format("{}: q must be [B,T,H={},D={}], got {}", name_, s.heads, s.head_dim, shape_string(q)));
  if (!q.sizes().equals(k.sizes()))
    throw std::invalid_argument(
        fmt::format("{}: q and k shapes differ: {} vs {}", name_, shape_string(q), shape_string(k)));
  if (q.scalar_type() != k.scalar_type())
    throw std::invalid_argument(fmt::format("{}: q and k dtypes differ: {} vs {}", name_,
                                            c10::toString(q.scalar_type()), c10::toString(k.scalar_type())));
  if (!at::isFloatingType(q.scalar_type()))
    throw std::invalid_argument(
        fmt::format("{}: q and k must be floating point, got {}", name_, c10::toString(q.scalar_type())));
  const auto params = parameters(true);
  if (!params.empty() && params.front().scalar_type() != q.scalar_type())
    throw std::invalid_argument(
        fmt::format("{}: inputs are {} but the encoding's parameters are {}; convert one with .to()", name_,
                    c10::toString(q.scalar_type()), c10::toString(params.front().scalar_type())));
  require_finite(q, "q", name_);
  require_finite(k, "k", name_);
  if (properties().contextual) {
    if (!x.defined())
      throw std::invalid_argument(name_ + ": this encoding is contextual and needs the layer input x");
    if (x.dim() != 3 || x.size(0) != q.size(0) || x.size(1) != q.size(1) || x.size(2) != s.model_dim)
      throw std::invalid_argument(fmt::format("{}: x must be [B={},T={},C={}], got {}", name_, q.size(0),
                                              q.size(1), s.model_dim, shape_string(x)));
    if (x.scalar_type() != q.scalar_type())
      throw std::invalid_argument(fmt::format("{}: x dtype {} differs from q dtype {}", name_,
                                              c10::toString(x.scalar_type()),
                                              c10::toString(q.scalar_type())));
    require_finite(x, "x", name_);
  }
  if (properties().reads_stream && ctx.stream.defined()) {
    const auto& E = ctx.stream;
    if (E.dim() != 4 || E.size(0) != q.size(0) || E.size(1) != q.size(1) || E.size(2) != s.heads ||
        E.size(3) != s.head_dim)
      throw std::invalid_argument(
          fmt::format("{}: the position state E must be [B={},T={},H={},D={}], got {}", name_, q.size(0),
                      q.size(1), s.heads, s.head_dim, shape_string(E)));
  }
  // Positions become float64 angles: each must be exact there (< 2^53), which also keeps offset + T from
  // overflowing int64.
  constexpr int64_t kMaxPosition = int64_t{1} << 53;
  if (state.next_pos > kMaxPosition - q.size(1))
    throw std::invalid_argument(
        fmt::format("{}: {} tokens at offset {} run past position 2^53, the largest one "
                    "grape represents exactly",
                    name_, q.size(1), state.next_pos));
  PeTokens out = encode_chunk(q, k, ctx, state);
  out.offset = state.next_pos;
  out.length = q.size(1);
  state.next_pos += q.size(1);
  return out;
}

namespace detail {

torch::Tensor& running_sum(PeState& st, const std::string& key, int64_t batch, int64_t width,
                           const std::string& enc) {
  auto& t = st.values[key];
  if (!t.defined()) t = torch::zeros({batch, width}, torch::kFloat64);
  if (t.size(0) != batch)
    throw std::invalid_argument(
        fmt::format("{}: state is for batch {}, input has batch {}", enc, t.size(0), batch));
  return t;
}

}  // namespace detail

namespace {

// Whether `add` (a chunk's n keys) can be written after `have` in a growth buffer: same layout but dim 1, and
// no autograd to keep (a buffer written in place would not carry it).
bool appendable(const torch::Tensor& have, const torch::Tensor& add, int64_t n) {
  if (!have.defined() || !add.defined() || have.dim() < 2 || have.dim() != add.dim() || add.size(1) != n ||
      have.scalar_type() != add.scalar_type() || have.device() != add.device())
    return false;
  if (torch::GradMode::is_enabled() && (have.requires_grad() || add.requires_grad())) return false;
  for (int64_t d = 0; d < have.dim(); ++d)
    if (d != 1 && have.size(d) != add.size(d)) return false;
  return true;
}

// Appends into the cache's growth buffers (KeyCache::Buffers); false, with nothing changed, when some tensor
// does not qualify (then the caller concatenates).
bool append_in_place(KeyCache& c, const PeTokens& chunk, const torch::Tensor& v_chunk) {
  const int64_t n = chunk.length, need = c.length + n;
  if (!appendable(c.k, chunk.k, n) || c.v.defined() != v_chunk.defined() ||
      (v_chunk.defined() && !appendable(c.v, v_chunk, n)) || c.key.size() != chunk.key.size())
    return false;
  for (const auto& [name, t] : c.key) {
    auto it = chunk.key.find(name);
    if (it == chunk.key.end() || !appendable(t, it->second, n)) return false;
  }
  auto& b = c.buffers;
  if (!b || b->used != c.length || b->k.size(1) < need) {  // none yet, full, or a copy has written past us
    const int64_t capacity = std::max<int64_t>(2 * need, 16);
    auto grow = [&](const torch::Tensor& t) {
      auto sizes = t.sizes().vec();
      sizes[1] = capacity;
      auto buf = torch::empty(sizes, t.options());
      buf.narrow(1, 0, c.length).copy_(t);
      return buf;
    };
    auto fresh = std::make_shared<KeyCache::Buffers>();
    fresh->k = grow(c.k);
    if (c.v.defined()) fresh->v = grow(c.v);
    for (const auto& [name, t] : c.key) fresh->key[name] = grow(t);
    b = fresh;
  }
  torch::NoGradGuard no_grad;
  b->k.narrow(1, c.length, n).copy_(chunk.k);
  c.k = b->k.narrow(1, 0, need);
  if (v_chunk.defined()) {
    b->v.narrow(1, c.length, n).copy_(v_chunk);
    c.v = b->v.narrow(1, 0, need);
  }
  for (auto& [name, t] : c.key) {
    b->key[name].narrow(1, c.length, n).copy_(chunk.key.at(name));
    t = b->key[name].narrow(1, 0, need);
  }
  b->used = need;
  return true;
}

}  // namespace

void KeyCache::append(const PeTokens& chunk, const torch::Tensor& v_chunk) {
  if (length == 0) {
    *this = from(chunk, v_chunk);
    return;
  }
  if (chunk.offset != offset + length)
    throw std::invalid_argument(fmt::format("key cache: chunk starts at position {} but the cache ends at {}",
                                            chunk.offset, offset + length));
  if (!append_in_place(*this, chunk, v_chunk)) {
    buffers.reset();
    k = torch::cat({k, chunk.k}, 1);
    if (v_chunk.defined()) v = v.defined() ? torch::cat({v, v_chunk}, 1) : v_chunk;
    for (auto& [name, t] : key) t = torch::cat({t, chunk.key.at(name)}, 1);
  }
  length += chunk.length;
}

KeyCache KeyCache::from(const PeTokens& chunk, const torch::Tensor& v_chunk) {
  KeyCache c;
  c.k = chunk.k;
  c.v = v_chunk;
  c.key = chunk.key;
  c.offset = chunk.offset;
  c.length = chunk.length;
  return c;
}

}  // namespace grape
