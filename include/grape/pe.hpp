// grape: position encodings for attention, as LibTorch modules with autograd.
//
// Every encoding is described by at most three hooks around ordinary causal attention
//     logits(i, j) = q~_i . k~_j / sqrt(D) + bias(i, j),   j <= i
//   embed     adds a vector to the token embeddings (sinusoidal, learned);
//   encode    maps q and k of a chunk of tokens per token (rotations, xPos scaling) and computes the
//             per-token quantities the bias needs (cumulative log-gates, gate values, probe vectors);
//   bias      forms bias(i, j) from those per-query and per-key quantities.
// A KV cache keeps, per key, exactly what `encode` returned for it (the transformed key and its
// per-key quantities); a chunk-by-chunk pass with a carried PeState equals one full pass.
#pragma once

#include <torch/torch.h>

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "grape/settings_text.hpp"

namespace grape {

using TensorMap = std::map<std::string, torch::Tensor>;

// The attention geometry an encoding is built for.
struct HeadShape {
  int64_t heads = 8;        // H
  int64_t head_dim = 64;    // D
  int64_t model_dim = 512;  // C, width of the layer input x (contextual encodings project from it)
};

// What a chunk of T tokens looks like after `encode`.
struct PeTokens {
  torch::Tensor q;     // [B,T,H,D] transformed queries
  torch::Tensor k;     // [B,T,H,D] transformed keys (what a KV cache stores)
  TensorMap query;     // per-query inputs of the bias hook, e.g. "c": [B,T,H]
  TensorMap key;       // per-key inputs of the bias hook, cached beside the keys
  int64_t offset = 0;  // absolute position of the first token of the chunk
  int64_t length = 0;  // T
};

// The per-token inputs an encoding may read besides q and k, for one chunk of T tokens. Every encoding gets
// the same context; each reads what its Properties say it needs (contextual: x; reads_stream: stream).
struct TokenContext {
  torch::Tensor x;  // [B,T,C] the layer input (the pre-attention RMSNorm output in the model)
  torch::Tensor
      stream;  // [B,T,H,D] this layer's position state (TAPE); undefined: the encoding's initial one
  TokenContext() = default;
  TokenContext(torch::Tensor x_) : x(std::move(x_)) {}  // NOLINT: implicit, encode(q, k, x, state) reads well
  TokenContext(torch::Tensor x_, torch::Tensor stream_) : x(std::move(x_)), stream(std::move(stream_)) {}
};

// Running state of one batch of sequences across chunks (positions, running phases, cumulative sums).
struct PeState {
  int64_t next_pos = 0;  // absolute position of the next token
  TensorMap values;      // encoding-specific running quantities, e.g. "phi": [B,G], "c": [B,H]
};

// Keys seen so far: the concatenation along T of every chunk's `k` and `key` map.
struct KeyCache {
  torch::Tensor k;     // [B,Tk,H,D]
  torch::Tensor v;     // [B,Tk,H,D] (optional for logits)
  TensorMap key;       // per-key bias inputs, concatenated along dim 1
  int64_t offset = 0;  // absolute position of the first cached key
  int64_t length = 0;

  void append(const PeTokens& chunk, const torch::Tensor& v_chunk = {});
  static KeyCache from(const PeTokens& chunk, const torch::Tensor& v_chunk = {});

  // Room to grow, used when an append needs no autograd (decoding): k, v and key are then views of the first
  // `length` positions (dim 1) of these buffers, which double when full, so a step copies only its own keys
  // instead of the whole cache. Copies of a cache share the buffers; `used` is how far they hold keys, and a
  // copy that finds them used beyond its own length moves to buffers of its own before writing.
  struct Buffers {
    torch::Tensor k, v;
    TensorMap key;
    int64_t used = 0;
  };
  std::shared_ptr<Buffers> buffers;
};

// How the fused kernels compute an encoding's bias. Rotations need nothing here: `encode` applies them (an
// O(T D) pre-pass) and the kernel sees the rotated q~ and k~.
enum class KernelBias {
  none,            // no bias
  linear,          // a_i + b_j + (c_i + d_j) (pos_i - pos_j): ALiBi, GRAPE-A, FoX
  distance_table,  // a per-head function of pos_i - pos_j given as a table: T5, KERPLE, Sandwich
  path_sum,        // GRAPE-AP's path integral of per-token probes
  unsupported,     // not computable per tile (FIRE depends on i as well, CoPE needs whole rows first)
};
const char* to_string(KernelBias kind);

// The bias as per-token terms the fused kernels compute per tile (the kind the encoding declares):
//   linear          a_i + b_j + (c_i + d_j) (pos_i - pos_j), a, c [B,H,Tq] per query, b, d [B,H,Tk] per key;
//   path_sum        sum_{l=j+1..i} m_h logsigmoid(p_i . r_l / P) over key positions l <= pos_i, with p
//                   [B,Tq,H,P] per query, r [B,Tk,H,P] per key, m [H] per head (no gradient reaches m);
//   distance_table  dist[h][min(pos_i - pos_j, W - 1)], dist [H,W] covering distances 0..W-1 with W = last
//                   query position - first key position + 1 (gradients flow to whatever built it).
// An undefined tensor is a zero term. ALiBi is c = -m_h, GRAPE-A c = -omega gq and/or d = -omega gk, FoX
// a = C_i, b = -C_j (C re-based to stay small), GRAPE-AP p, r, m; T5 its gathered buckets, KERPLE its kernel.
struct BiasTerms {
  torch::Tensor a, b, c, d;
  torch::Tensor p, r, m;
  torch::Tensor dist;
};

// Which hooks and laws apply; the model, `grape check` and the tests read this, never the encoding's type.
struct Properties {
  bool embeds = false;          // (c) adds to token embeddings
  bool rotates = false;         // q, k are rotated: norms are preserved
  bool scales = false;          // q, k are rescaled per token (xPos)
  bool has_bias = false;        // (b) adds a bias to the logits
  bool contextual = false;      // (d) needs the layer input x
  bool relative = false;        // logits depend on positions only through i - j
  bool phase_relative = false;  // relative in a data-dependent phase (the state "phi")
  bool signed_bias = false;   // the bias is learned freely (t5, fire, cope): no "0 on the diagonal, <= 0" law
  bool reads_stream = false;  // (e) reads a position state carried through the layers (TAPE)
  bool updates_stream = false;  // (e) and updates it after attention and the MLP (not in the last layer)
  // encode turns q and k by rotations or leaves them as they are, computes nothing else from them, and the
  // dot product uses its q~, k~: RMS-normalising q~, k~ instead of q, k then moves only where QK-norm's gain
  // applies, which is what the model's qk_norm=after_rotation needs (false: xPos, YaRN's temperature,
  // dynamic NTK, TAPE, GRAPE-A's gates on q and k).
  bool qk_norm_after_encode = false;
  KernelBias kernel_bias = KernelBias::none;  // how the fused kernels compute the bias (none iff !has_bias)
};

// An encoding whose `encode` and bias depend on positions alone, in the form the LibTorch-free decode engine
// (docs/decode.md) computes natively:  q~ = mscale R(n) q,  k~ = mscale R(n) k,  with R(n) turning pairs of
// the first 2P coordinates by angles(n) (no turn when `angles` is empty); and the bias of
// properties().kernel_bias: none, distance_table (bias_terms then depends on distances only), or linear
// with slope [H] (bias slope_h (pos_i - pos_j), ALiBi). encode must leave the keys' per-key map empty, but
// for the two input-dependent biases the engine computes itself from the layer's normalised input x:
// FoX's forget gate and GRAPE-AP's path-integral probes.
struct PositionalForm {
  // Angles [T,G,P] float64 of positions offset..offset+T-1, G = 1 (shared by the heads) or H.
  std::function<torch::Tensor(int64_t offset, int64_t T)> angles;
  bool interleaved = false;  // pairs (2i, 2i+1), else (i, i+P)
  double sign = 1.0;         // orientation, as rotate_pairs takes it
  double mscale = 1.0;       // YaRN's / LongRoPE's factor on the rotated q and k
  torch::Tensor slope;       // [H] float32 (linear bias only)
  // FoX's forget gate, the one input-dependent bias the engine runs: bias(i, j) = c_i - c_j with
  // c_t = sum_{l <= t} logsigmoid(gate_w[h] . x_l + gate_b[h]), x the layer's normalised input; undefined
  // when absent.
  torch::Tensor gate_w, gate_b;  // [H, C], [H] float32
  // GRAPE-AP's path integral (kernel_bias path_sum): bias(i, j) = sum_{l=j+1..i} probe_slope[h]
  // logsigmoid(p_i . r_l / P), p = probe_w x per head (P dims), r_l = R(l) (p_l RMS-normalised with
  // probe_eps), R(l) turning pairs (i, i + P/2) by the angle l with sin times probe_sign; undefined when
  // absent.
  torch::Tensor probe_w, probe_slope;  // [H*P, C], [H] float32
  double probe_eps = 1e-6;
  double probe_sign = 1.0;
};

// Base class of every encoding. Subclasses register their learnable parameters as usual.
class Encoding : public torch::nn::Module {
 public:
  Encoding(std::string name, HeadShape shape);
  ~Encoding() override = default;

  const std::string& name() const { return name_; }
  const HeadShape& shape() const { return shape_; }
  virtual Properties properties() const = 0;

  // A fresh state for a batch whose first token sits at absolute position `offset`.
  virtual PeState initial_state(int64_t batch, int64_t offset = 0) const;

  // (c) h: [B,T,C] token embeddings of tokens offset..offset+T-1; returns h + PE. Default: identity.
  virtual torch::Tensor embed(const torch::Tensor& h, int64_t offset) const;

  // (a)+(d) Encode one chunk. q, k: [B,T,H,D] (after QK-norm); ctx.x [B,T,C] is required when
  // properties().contextual, ctx.stream [B,T,H,D] is read when properties().reads_stream (undefined: the
  // initial stream). Positions are state.next_pos.., and the state advances by T. Checks shapes, dtypes and
  // finiteness and throws std::invalid_argument naming the problem.
  PeTokens encode(const torch::Tensor& q, const torch::Tensor& k, const TokenContext& ctx, PeState& state);

  // (b) bias [B,H,Tq,Tk] of a chunk of queries against cached keys, before the causal mask. Undefined
  // tensor when the encoding has no bias. Entries above the diagonal are unspecified (masked later).
  virtual torch::Tensor bias(const PeTokens& queries, const KeyCache& keys) const;

  // The bias as the per-token terms of properties().kernel_bias (see BiasTerms); empty terms when the
  // encoding has no bias. Throws std::invalid_argument when the kind is `unsupported`.
  virtual BiasTerms bias_terms(const PeTokens& queries, const KeyCache& keys) const;

  // The queries and keys the attention dot product uses, [B,Tq,H,D] and [B,Tk,H,D]. Default: exactly what
  // encode returned and the cache holds. Dynamic NTK caches pre-rotation keys and rotates queries and keys
  // here with the spectrum of the current length, so decoding stays exact when that spectrum changes.
  virtual std::pair<torch::Tensor, torch::Tensor> attention_qk(const PeTokens& queries,
                                                               const KeyCache& keys) const;

  // (e) A position state carried through the layers beside the hidden state (properties().reads_stream;
  // TAPE). The cache keeps each key's state as key["E"]; attention averages it with the weights of v (E~).
  // The state of layer 0 for tokens offset..offset+T-1, [B,T,H,D]. Default: undefined (no stream).
  virtual torch::Tensor initial_stream(int64_t batch, int64_t offset, int64_t length,
                                       torch::ScalarType dtype) const;
  // The state after attention, from E and the average E~ of the keys' states. Default: E.
  virtual torch::Tensor stream_after_attention(const torch::Tensor& E, const torch::Tensor& E_tilde) const;
  // The state after the MLP, whose output (before the residual) is y [B,T,C]. Default: E.
  virtual torch::Tensor stream_after_mlp(const torch::Tensor& E, const torch::Tensor& y) const;

  // Its PositionalForm, or nullopt (the default) when encode reads more than positions (x other than through
  // a forget gate, a stream, q or k themselves), the spectrum moves with the length, or the form is not
  // implemented: the decode engine then falls back to the reference path. The form must give what encode and
  // bias_terms give.
  virtual std::optional<PositionalForm> positional_form() const;

  // One line per learnable parameter with its actual shape, for `grape encodings NAME`.
  std::vector<std::string> describe_parameters() const;

 protected:
  // Subclasses implement the per-chunk math on validated inputs.
  virtual PeTokens encode_chunk(const torch::Tensor& q, const torch::Tensor& k, const TokenContext& ctx,
                                PeState& state) = 0;

  std::string name_;
  HeadShape shape_;
};

using EncodingPtr = std::shared_ptr<Encoding>;

// Causal pre-softmax logits [B,H,Tq,Tk] an encoding defines: q~.k~/sqrt(D) + bias, -inf where the key
// position > the query position. Composed of LibTorch ops: the oracle of every faster path.
torch::Tensor attention_logits(const Encoding& enc, const PeTokens& queries, const KeyCache& keys);

// key=value settings of an encoding (from `--set key=value`); parsing errors name the key.
class PeOptions {
 public:
  PeOptions() = default;
  explicit PeOptions(std::map<std::string, std::string> values) : values_(std::move(values)) {}
  PeOptions(std::initializer_list<std::pair<const std::string, std::string>> values) : values_(values) {}
  static PeOptions parse(const std::vector<std::string>& assignments);  // "key=value" each

  bool has(const std::string& key) const { return values_.count(key) != 0; }
  void set(const std::string& key, const std::string& value) { values_[key] = value; }
  double get_double(const std::string& key, double def) const;
  int64_t get_int(const std::string& key, int64_t def) const;
  bool get_bool(const std::string& key, bool def) const;
  std::string get_choice(const std::string& key, const std::string& def,
                         const std::vector<std::string>& allowed) const;
  const std::map<std::string, std::string>& values() const { return values_; }

 private:
  std::map<std::string, std::string> values_;
};

// One `--set` option of an encoding.
struct OptionSpec {
  std::string key;
  std::string default_value;
  std::string help;
};

struct LawTable;  // src/pe/laws.hpp: the rows `grape check` prints

// A registry entry: the CLI name, a one-line summary, options, a factory and the encoding's own laws.
// Each family file registers its entries (detail::Registration in src/pe/families.hpp); nothing else lists
// them.
struct EncodingInfo {
  std::string name;
  std::string family;  // "absolute", "multiplicative", "context extension", "additive"
  std::string summary;
  std::vector<OptionSpec> options;
  std::vector<std::string> parameters;  // learnable parameters: "name  shape  init"
  std::function<EncodingPtr(const HeadShape&, const PeOptions&)> make;
  // Its reductions and special laws (e.g. grape-m at init == rope), added to the generic ones `grape check`
  // runs for every encoding (src/check/laws.cpp). Optional.
  std::function<void(LawTable&)> laws;
};

// Every registered encoding, in display order: by family (absolute, multiplicative, context extension,
// additive), then by name.
const std::vector<EncodingInfo>& encodings();
const EncodingInfo& encoding_info(const std::string& name);  // throws, listing the known names
// Builds an encoding; unknown names and unknown or malformed options throw std::invalid_argument.
EncodingPtr make_encoding(const std::string& name, const HeadShape& shape, const PeOptions& options = {});

// ---- context extension as Hugging Face models declare it ----------------------------------------------

// The encoding options (for rope, grape-m, grape-m-planes) that compute what transformers computes for a
// model config's `rope_scaling` dictionary, given as JSON text: rope_type (or type) default, linear
// (= pi), dynamic (= dynamic-ntk), yarn (with Hugging Face's ramp, truncate, mscale/mscale_all_dim,
// attention_factor), longrope (short/long factors switching at the original context; attention factor
// sqrt(1 + ln s / ln L) unless given), llama3. Unknown types or keys, missing keys, a factor < 1 and
// mistyped values throw std::invalid_argument naming the key. Without original_max_position_embeddings
// the options have no original_context (the caller's default applies).
std::map<std::string, std::string> hf_rope_scaling_options(const std::string& json_text);

// ---- KV-shift: a data-dependent 2-tap mix of the raw key/value projections, usable with any encoding --
struct KVShiftState {
  torch::Tensor k_prev, v_prev;  // [B,H,D] raw projections of the last token seen (undefined: zeros)
};

class KVShiftImpl : public torch::nn::Module {
 public:
  explicit KVShiftImpl(HeadShape shape);
  // k_raw, v_raw: [B,T,H,D]; x: [B,T,C]. Returns the shifted (k, v); updates state for streaming.
  std::pair<torch::Tensor, torch::Tensor> forward(const torch::Tensor& k_raw, const torch::Tensor& v_raw,
                                                  const torch::Tensor& x, KVShiftState& state);
  HeadShape shape;
  torch::Tensor w_k, w_v;  // [H,C] gate weights, alpha = sigmoid(w . x)
};
TORCH_MODULE(KVShift);

// "[2,16,4,32]": the shape of a tensor as error messages print it.
std::string shape_string(const torch::Tensor& t);

// ---- shared math, exposed for tests and for the fused kernels' oracles -----------------------------

// ALiBi slopes m_h for H heads (also for H not a power of two).
std::vector<double> alibi_slopes(int64_t heads);

// x * rsqrt(mean(x^2) + eps) * weight over the last dim; fp16/bf16 computed in fp32. The one RMSNorm of
// the model, of QK-norm, of grape.nn's after_rotation QK-norm and of GRAPE-AP's probes. fused: fp32 CPU
// inputs run the one-pass kernel (forward and backward, block=fused); else LibTorch-composed.
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps, bool fused = false);

// Rotate the pairs of the first 2*P coordinates of x [..., D] by angles [..., P] (broadcast over the
// leading dims). pairing "half": (i, i+P); "interleaved": (2i, 2i+1). sign +1 is the standard
// orientation a' = a cos - b sin, b' = a sin + b cos; sign -1 the GRAPE authors' (clockwise).
torch::Tensor rotate_pairs(const torch::Tensor& x, const torch::Tensor& angles, const std::string& pairing,
                           double sign = 1.0);
// The same rotation composed of LibTorch ops, for any dtype and with LibTorch's autograd: rotate_pairs' path
// for non-float32 x and the oracle of its fp32 kernel (src/kernels/cpu/rotary.hpp). Angles broadcast as in
// LibTorch.
torch::Tensor rotate_pairs_composed(const torch::Tensor& x, const torch::Tensor& angles,
                                    const std::string& pairing, double sign = 1.0);

// exp(eta * (a b^T - b a^T)) x by the closed (Rodrigues) form, O(d). x, a, b: [..., d]; eta: [...] .
torch::Tensor rank2_rotate(const torch::Tensor& x, const torch::Tensor& a, const torch::Tensor& b,
                           const torch::Tensor& eta);

// Path-integral bias b(t, j) = sum_{l=j+1..t} psi(t, l) over key positions l, for psi [B,H,Tq,Tk] of
// queries at q_offset.. against keys at k_offset..; entries with l > t contribute nothing.
torch::Tensor path_sum_bias(const torch::Tensor& psi, int64_t q_offset, int64_t k_offset);

}  // namespace grape
