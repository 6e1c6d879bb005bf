// The Decoder (grape/decode.hpp): the fast path's setup around the LibTorch-free forward of
// src/kernels/cpu/decoder.hpp, and the reference path (forward_cached) behind the same interface. LibTorch
// runs here only once per model (gathering weight pointers) and when a table of angles or distance biases
// must grow (doubling, so rarely); a decode step itself runs no LibTorch op but the logits' allocation.
#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <numbers>
#include <stdexcept>

#include "grape/decode.hpp"
#include "kernels/cpu/decoder.hpp"

namespace grape {

namespace kc = kernels::cpu;

const char* to_string(DecodePath path) { return path == DecodePath::fast ? "fast" : "reference"; }

DecodePath parse_decode_path(const std::string& text, const std::string& where) {
  if (text == "fast") return DecodePath::fast;
  if (text == "reference") return DecodePath::reference;
  throw std::invalid_argument(fmt::format("{}: '{}' is not a decode path (fast or reference)", where, text));
}

const char* to_string(DecodeWeights weights) { return weights == DecodeWeights::fp32 ? "fp32" : "bf16"; }

DecodeWeights parse_decode_weights(const std::string& text, const std::string& where) {
  if (text == "fp32") return DecodeWeights::fp32;
  if (text == "bf16") return DecodeWeights::bf16;
  throw std::invalid_argument(fmt::format("{}: '{}' is not a weight type (fp32 or bf16)", where, text));
}

namespace {

std::map<std::string, torch::Tensor> parameters_by_name(const Transformer& model) {
  std::map<std::string, torch::Tensor> out;
  for (const auto& p : model->named_parameters(/*recurse=*/true)) out[p.key()] = p.value();
  return out;
}

// Why one layer's encoding cannot run natively ("" when it can).
std::string encoding_unsupported(const Encoding& pe) {
  const Properties p = pe.properties();
  const std::string name = "the encoding '" + pe.name() + "'";
  const auto form = pe.positional_form();
  const bool gate = form && form->gate_w.defined();     // FoX: reads x only through its forget gate
  const bool probes = form && form->probe_w.defined();  // GRAPE-AP: only through its path-integral probes
  if (p.contextual && !gate && !probes) return name + " reads the layer input x (contextual)";
  if (p.reads_stream || p.updates_stream) return name + " carries a position stream through the layers";
  if (!form) return name + " has no positional form (its encode reads more than positions)";
  switch (p.kernel_bias) {
    case KernelBias::none:
      return "";
    case KernelBias::distance_table:
      return "";
    case KernelBias::linear:
      return form->slope.defined() || gate ? ""
                                           : name +
                                                 " has a linear bias that is neither a per-head slope nor a "
                                                 "forget gate";
    case KernelBias::path_sum:
      return probes ? "" : name + " has a path_sum bias without probes";
    default:
      return name + " has a " + to_string(p.kernel_bias) + " bias";
  }
}

std::atomic<uint64_t> next_decoder_id{1};

// Reallocates a fast-path cache's buffers to hold `cap` positions, moving each head's keys and values (and
// the gate's and probes' per-key terms) to their place in the wider rows.
void grow_cache(DecodeCache& cache, const std::vector<kc::DecoderLayer>& layers, int64_t H, int64_t D,
                int64_t cap) {
  // One buffer [H][capacity][width] -> [H][cap][width], each head's first `length` positions kept.
  auto widen = [&](std::vector<float>& buf, int64_t width) {
    std::vector<float> grown(size_t(H * cap * width));
    for (int64_t h = 0; h < H && cache.length > 0; ++h)
      std::copy_n(buf.data() + h * cache.capacity * width, cache.length * width,
                  grown.data() + h * cap * width);
    buf.swap(grown);
  };
  for (size_t l = 0; l < cache.k.size(); ++l) {
    widen(cache.k[l], D), widen(cache.v[l], D);
    if (!cache.gate_sum[l].empty()) widen(cache.key_b[l], 1);           // the forget gate's per-key terms
    if (layers[l].probe_w) widen(cache.key_r[l], layers[l].probe_dim);  // the path integral's key probes
  }
  cache.capacity = cap;
}

}  // namespace

std::string fast_decode_unsupported(const Transformer& model) {
  const auto& c = model->config();
  if (c.kv_shift) return "kv_shift mixes the raw projections of neighbouring tokens";
  if (model->embedding_encoding())
    return "the encoding '" + model->embedding_encoding()->name() + "' adds to the token embeddings";
  for (const auto& pe : model->encodings())
    if (auto why = encoding_unsupported(*pe); !why.empty()) return why;
  for (const auto& [name, t] : parameters_by_name(model)) {
    if (t.scalar_type() != torch::kFloat32)
      return fmt::format("the weight {} is {}, not float32", name, c10::toString(t.scalar_type()));
    if (!t.device().is_cpu()) return fmt::format("the weight {} is not on the CPU", name);
    if (!t.is_contiguous()) return fmt::format("the weight {} is not contiguous", name);
  }
  return "";
}

// The fast path: the kernels' view of the model, and per layer the encoding's tables.
struct Decoder::Engine {
  kc::DecoderModel model;
  std::vector<EncodingPtr> pes;
  std::vector<PositionalForm> forms;
  std::vector<std::vector<float>> cos, sin, dist;  // per layer: [positions][G][P], [H][W]
  int64_t positions = 0;                           // the rotation tables cover positions < this
  int64_t width = 0;                               // the distance tables cover distances < this
  std::vector<std::vector<float>> panels;          // the matrices in kc::pack_panels' layout (a batch's)
  kc::DecoderWorkspace ws;
  kc::DecoderPhases phases;                 // ws.phases points here while profiling
  std::vector<std::vector<uint16_t>> bf16;  // the matrices' bf16 copies (DecodeWeights::bf16)

  // The panels of W [N, K], kept here.
  const float* pack(const float* W, int64_t N, int64_t K) {
    panels.push_back(kc::pack_panels(W, N, K));
    return panels.back().data();
  }

  // A copy of every fp32 matrix as panels, made by the first pass that would use them (kc::makes_panels: any
  // pass where AVX2 is the widest unit, else the first batch of 8+ rows; as much memory again as the weights;
  // bf16 copies are not packed: their passes read the bf16 rows).
  void pack_panels_for(int64_t sequences, int64_t rows) {
    if (!panels.empty() || model.wte_bf16 || !kc::makes_panels(sequences, rows)) return;
    const int64_t C = model.C, HD = model.H * model.D, F = model.hidden;
    for (auto& l : model.layers) {
      l.panels.wq = pack(l.wq, HD, C), l.panels.wk = pack(l.wk, HD, C);
      l.panels.wv = pack(l.wv, HD, C), l.panels.wo = pack(l.wo, C, HD);
      l.panels.w1 = pack(l.w1, F, C), l.panels.w2 = pack(l.w2, F, C);
      l.panels.w_out = pack(l.w_out, C, F);
    }
    model.wte_panels = pack(model.wte, model.vocab, C);
  }

  // Tables covering every position < n (grown to at least double, so that growing is rare).
  void cover(int64_t n) {
    if (n <= positions && n <= width) return;
    const int64_t want = std::max<int64_t>({n, 2 * positions, 256});
    torch::NoGradGuard no_grad;
    const int64_t H = model.H, D = model.D;
    for (size_t l = 0; l < pes.size(); ++l) {
      auto& layer = model.layers[l];
      if (forms[l].angles && n > positions) {
        auto ang = forms[l].angles(0, want).to(torch::kFloat64).contiguous();  // [want, G, P]
        // cos and sign * sin of the reduced angle, in float64, as rotate_pairs forms them.
        ang = torch::fmod(ang, 2.0 * std::numbers::pi);
        auto c = torch::cos(ang).to(torch::kFloat32).contiguous();
        auto s = (torch::sin(ang) * forms[l].sign).to(torch::kFloat32).contiguous();
        cos[l].assign(c.data_ptr<float>(), c.data_ptr<float>() + c.numel());
        sin[l].assign(s.data_ptr<float>(), s.data_ptr<float>() + s.numel());
        layer.cos = cos[l].data(), layer.sin = sin[l].data();
        layer.G = ang.size(1), layer.P = ang.size(2);
      }
      if (pes[l]->properties().kernel_bias == KernelBias::distance_table && n > width) {
        // The bias of one query at position want - 1 against keys 0..want-1: distances 0..want-1.
        PeTokens q;
        q.q = torch::zeros({1, 1, H, D});
        q.offset = want - 1, q.length = 1;
        KeyCache keys;
        keys.length = want;
        auto t = pes[l]->bias_terms(q, keys).dist.to(torch::kFloat32).contiguous();  // [H, want]
        dist[l].assign(t.data_ptr<float>(), t.data_ptr<float>() + t.numel());
        layer.dist = dist[l].data(), layer.W = t.size(1);
      }
    }
    positions = std::max(positions, want), width = std::max(width, want);
  }
};

Decoder::Decoder(Transformer model, DecodePath requested, DecodeWeights weights)
    : model_(std::move(model)), path_(requested), weights_(weights), id_(next_decoder_id++) {
  if (requested == DecodePath::fast) fallback_reason_ = fast_decode_unsupported(model_);
  if (!fallback_reason_.empty()) path_ = DecodePath::reference;
  if (weights == DecodeWeights::bf16 && path_ != DecodePath::fast)
    throw std::invalid_argument(
        requested == DecodePath::reference
            ? "bf16 decode weights need the fast decode path, not the reference one (the oracle is fp32)"
            : "bf16 decode weights need the fast decode path, which cannot run this model: " +
                  fallback_reason_);
  model_->eval();
  if (path_ != DecodePath::fast) return;
  const auto& c = model_->config();
  auto params = parameters_by_name(model_);
  auto param = [&](const std::string& name) -> const torch::Tensor& {
    auto it = params.find(name);
    if (it == params.end()) throw std::logic_error("decoder: the model has no parameter " + name);
    return it->second;
  };
  auto ptr = [&](const std::string& name) { return param(name).data_ptr<float>(); };
  engine_ = std::make_unique<Engine>();
  // A matrix's bf16 copy, owned by the engine (null with fp32 weights).
  auto bf16 = [&](const std::string& name) -> const uint16_t* {
    if (weights != DecodeWeights::bf16) return nullptr;
    const auto& t = param(name);
    auto& copy = engine_->bf16.emplace_back(size_t(t.numel()));
    kc::round_to_bf16(t.data_ptr<float>(), t.numel(), copy.data());
    return copy.data();
  };
  auto& m = engine_->model;
  m.vocab = c.vocab_size, m.C = c.n_embd, m.H = c.n_head, m.D = c.head_dim(), m.hidden = c.hidden();
  m.eps = float(c.norm_eps);
  m.wte = ptr("wte.weight"), m.norm_f = ptr("norm_f.weight");
  m.wte_bf16 = bf16("wte.weight");
  m.bf16_kernel = kc::bf16_kernel_best();
  engine_->pes = model_->encodings();
  for (int64_t l = 0; l < c.n_layer; ++l) {
    const std::string b = fmt::format("blocks.{}.", l);
    kc::DecoderLayer layer;
    layer.norm1 = ptr(b + "norm1.weight"), layer.norm2 = ptr(b + "norm2.weight");
    layer.wq = ptr(b + "wq.weight"), layer.wk = ptr(b + "wk.weight"), layer.wv = ptr(b + "wv.weight");
    layer.wo = ptr(b + "wo.weight"), layer.w1 = ptr(b + "w1.weight"), layer.w2 = ptr(b + "w2.weight");
    layer.w_out = ptr(b + "w_out.weight");
    layer.wq_bf16 = bf16(b + "wq.weight"), layer.wk_bf16 = bf16(b + "wk.weight");
    layer.wv_bf16 = bf16(b + "wv.weight"), layer.wo_bf16 = bf16(b + "wo.weight");
    layer.w1_bf16 = bf16(b + "w1.weight"), layer.w2_bf16 = bf16(b + "w2.weight");
    layer.w_out_bf16 = bf16(b + "w_out.weight");
    if (c.qk_norm != "off") layer.q_norm = ptr(b + "q_norm.weight"), layer.k_norm = ptr(b + "k_norm.weight");
    layer.norm_after_rotation = c.qk_norm == "after_rotation";
    auto form = *engine_->pes[size_t(l)]->positional_form();
    layer.mscale = float(form.mscale);
    layer.interleaved = form.interleaved;
    engine_->forms.push_back(form);
    m.layers.push_back(layer);
  }
  // The slopes point into the stored forms' tensors.
  for (size_t l = 0; l < m.layers.size(); ++l) {
    const auto& form = engine_->forms[l];
    if (form.slope.defined()) m.layers[l].slope = form.slope.data_ptr<float>();
    if (form.gate_w.defined())  // the gate's parameters, read in place
      m.layers[l].gate_w = form.gate_w.data_ptr<float>(), m.layers[l].gate_b = form.gate_b.data_ptr<float>();
    if (form.probe_w.defined()) {  // GRAPE-AP's probe weights and slopes, read in place
      auto& layer = m.layers[l];
      layer.probe_w = form.probe_w.data_ptr<float>(), layer.probe_m = form.probe_slope.data_ptr<float>();
      layer.probe_dim = form.probe_w.size(0) / m.H;
      layer.probe_eps = float(form.probe_eps), layer.probe_sign = float(form.probe_sign);
    }
  }
  engine_->cos.resize(m.layers.size()), engine_->sin.resize(m.layers.size());
  engine_->dist.resize(m.layers.size());
  engine_->cover(1);
}

Decoder::~Decoder() = default;

std::string Decoder::bf16_kernel() const {
  return weights_ == DecodeWeights::bf16 ? kc::to_string(engine_->model.bf16_kernel) : "";
}

int64_t Decoder::panel_bytes() const {
  int64_t n = 0;
  if (engine_)
    for (const auto& p : engine_->panels) n += int64_t(p.size() * sizeof(float));
  return n;
}

void Decoder::prepare_batch(int64_t sequences) {
  if (engine_) engine_->pack_panels_for(sequences, sequences);
}

void Decoder::set_profiling(bool on) {
  if (!engine_) return;
  if (on) engine_->phases = {};
  engine_->ws.phases = on ? &engine_->phases : nullptr;
}

Decoder::Profile Decoder::profile() const {
  if (!engine_) return {};
  const auto& p = engine_->phases;
  return {p.products, p.attention, p.other, p.passes};
}

DecodeCache Decoder::new_cache(int64_t positions) const {
  if (positions < 0)
    throw std::invalid_argument(fmt::format("decoder: new_cache needs positions >= 0, got {}", positions));
  DecodeCache cache;
  cache.owner = id_;
  if (path_ == DecodePath::reference) {
    cache.reference = model_->new_cache();
  } else {
    const auto& layers = engine_->model.layers;
    cache.k.resize(layers.size());
    cache.v.resize(layers.size());
    cache.key_b.resize(layers.size());
    cache.gate_sum.resize(layers.size());
    cache.key_r.resize(layers.size());
    for (size_t l = 0; l < layers.size(); ++l)
      if (layers[l].gate_w) cache.gate_sum[l].assign(size_t(engine_->model.H), 0.0);
    if (positions > 0) grow_cache(cache, layers, engine_->model.H, engine_->model.D, positions);
  }
  return cache;
}

torch::Tensor Decoder::forward(const torch::Tensor& tokens, const std::vector<DecodeCache*>& caches) {
  const auto& c = model_->config();
  if (!tokens.defined() || tokens.dim() != 2 || tokens.size(0) < 1 || tokens.size(1) < 1)
    throw std::invalid_argument(fmt::format("decoder: tokens must be a non-empty [B,T] tensor, got {}",
                                            tokens.defined() ? shape_string(tokens) : "none"));
  if (tokens.scalar_type() != torch::kInt64 && tokens.scalar_type() != torch::kInt32)
    throw std::invalid_argument(
        fmt::format("decoder: tokens must be int64 (or int32), got {}", c10::toString(tokens.scalar_type())));
  const int64_t B = tokens.size(0), T = tokens.size(1);
  if (int64_t(caches.size()) != B)
    throw std::invalid_argument(
        fmt::format("decoder: got {} caches for a batch of {} rows", caches.size(), B));
  for (auto* cache : caches)
    if (!cache || cache->owner != id_)
      throw std::invalid_argument(
          "decoder: a cache that this Decoder did not make (new_cache() of another decoder or model)");
  auto ids = tokens.to(torch::kInt64).contiguous();
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < B * T; ++i)
    if (id[i] < 0 || id[i] >= c.vocab_size)
      throw std::invalid_argument(
          fmt::format("decoder: tokens contain id {} outside the vocabulary [0, {})", id[i], c.vocab_size));

  if (path_ == DecodePath::reference) {
    torch::NoGradGuard no_grad;
    std::vector<SequenceCache*> ref;
    for (auto* cache : caches) ref.push_back(&cache->reference);
    auto logits = model_->forward_cached(ids, ref);
    for (auto* cache : caches) cache->length += T;
    return logits;
  }

  auto& e = *engine_;
  const int64_t H = e.model.H, D = e.model.D;
  const auto& layers = e.model.layers;
  int64_t longest = 0;
  std::vector<kc::DecoderRow> rows(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    auto& cache = *caches[size_t(b)];
    const int64_t need = cache.length + T;
    longest = std::max(longest, need);
    if (need > cache.capacity)  // double the buffers
      grow_cache(cache, layers, H, D, std::max<int64_t>({need, 2 * cache.capacity, 64}));
    auto& row = rows[size_t(b)];
    row.tokens = id + b * T, row.T = T, row.length = cache.length, row.capacity = cache.capacity;
    for (size_t l = 0; l < cache.k.size(); ++l) {
      row.k.push_back(cache.k[l].data());
      row.v.push_back(cache.v[l].data());
      const bool gated = !cache.gate_sum[l].empty();
      row.key_b.push_back(gated ? cache.key_b[l].data() : nullptr);
      row.gate_sum.push_back(gated ? cache.gate_sum[l].data() : nullptr);
      row.key_r.push_back(layers[l].probe_w ? cache.key_r[l].data() : nullptr);
    }
  }
  e.cover(longest);
  e.pack_panels_for(B, B * T);
  auto logits = torch::empty({B, T, c.vocab_size}, torch::kFloat32);
  kc::decoder_forward(e.model, rows, e.ws, logits.data_ptr<float>());
  for (auto* cache : caches) cache->length += T;
  return logits;
}

}  // namespace grape
