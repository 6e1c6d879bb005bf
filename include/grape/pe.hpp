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

// A bias the fused kernels compute per tile from per-token terms: the linear family
//     a_i + b_j + (c_i + d_j) (pos_i - pos_j)
// with a, c [B,H,Tq] per query, b, d [B,H,Tk] per key, plus GRAPE-AP's path-integral bias
//     sum_{l=j+1..i} m_h logsigmoid(p_i . r_l / P)   (key positions l <= pos_i only)
// with p [B,Tq,H,P] per query, r [B,Tk,H,P] per key, m [H] per head (no gradient reaches m). An undefined
// tensor is a zero term (p undefined: no path bias). ALiBi is c = -m_h, GRAPE-A c = -omega gq and/or
// d = -omega gk, FoX a = C_i, b = -C_j (C re-based to stay small), GRAPE-AP p, r, m. Plus a per-head
// function of the distance given as a table: + dist[h][min(pos_i - pos_j, W - 1)] (T5: its buckets gathered,
// KERPLE: its kernel, for distances 0..W-1 with W = last query position - first key position + 1).
struct LinearBiasTerms {
  torch::Tensor a, b, c, d;
  torch::Tensor p, r, m;
  torch::Tensor dist;  // [H, W] per-head bias by distance (gradient flows to whatever built it)
};

// Which hooks and laws apply; `grape check` and the tests read this.
struct Properties {
  bool embeds = false;          // (c) adds to token embeddings
  bool rotates = false;         // q, k are rotated: norms are preserved
  bool scales = false;          // q, k are rescaled per token (xPos)
  bool has_bias = false;        // (b) adds a bias to the logits
  bool contextual = false;      // (d) needs the layer input x
  bool relative = false;        // logits depend on positions only through i - j
  bool phase_relative = false;  // relative in a data-dependent phase (the state "phi")
  bool signed_bias = false;  // the bias is learned freely (t5, fire, cope): no "0 on the diagonal, <= 0" law
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

  // (a)+(d) Encode one chunk. q, k: [B,T,H,D] (after QK-norm); x: [B,T,C] layer input, required when
  // properties().contextual. Positions are state.next_pos.., and the state advances by T.
  // Checks shapes, dtypes and finiteness and throws std::invalid_argument naming the problem.
  PeTokens encode(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& x, PeState& state);

  // (b) bias [B,H,Tq,Tk] of a chunk of queries against cached keys, before the causal mask. Undefined
  // tensor when the encoding has no bias. Entries above the diagonal are unspecified (masked later).
  virtual torch::Tensor bias(const PeTokens& queries, const KeyCache& keys) const;

  // The bias as the per-token terms the fused kernels compute per tile (see LinearBiasTerms). Returns false
  // when the encoding's bias is not of that form; encodings without a bias return true with no terms.
  virtual bool linear_bias(const PeTokens& queries, const KeyCache& keys, LinearBiasTerms& out) const;

  // The queries and keys the attention dot product uses, [B,Tq,H,D] and [B,Tk,H,D]. Default: exactly what
  // encode returned and the cache holds. Dynamic NTK caches pre-rotation keys and rotates queries and keys
  // here with the spectrum of the current length, so decoding stays exact when that spectrum changes.
  virtual std::pair<torch::Tensor, torch::Tensor> attention_qk(const PeTokens& queries,
                                                               const KeyCache& keys) const;

  // One line per learnable parameter with its actual shape, for `grape encodings NAME`.
  std::vector<std::string> describe_parameters() const;

 protected:
  // Subclasses implement the per-chunk math on validated inputs.
  virtual PeTokens encode_chunk(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& x,
                                PeState& state) = 0;

  std::string name_;
  HeadShape shape_;
};

using EncodingPtr = std::shared_ptr<Encoding>;

// The text forms of every setting (encoding options, --set, --pe-set, config files, key=value lists), parsed
// in one place. split_key_value: "key=value" -> {key, value}; `what` names the setting in the error
// ("option 'base' must look like key=value"). The others parse the whole text ("6x", " 6" and "" are not
// numbers) and give nullopt when it is not one; doubles must be finite; booleans are true/false, 1/0,
// yes/no or on/off.
std::pair<std::string, std::string> split_key_value(const std::string& text, const std::string& what);
std::optional<int64_t> text_to_int(const std::string& text);
std::optional<uint64_t> text_to_uint(const std::string& text);
std::optional<double> text_to_double(const std::string& text);
std::optional<bool> text_to_bool(const std::string& text);

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

// A registry entry: the CLI name, a one-line summary, options and a factory.
struct EncodingInfo {
  std::string name;
  std::string family;  // "absolute", "multiplicative", "additive"
  std::string summary;
  std::vector<OptionSpec> options;
  std::vector<std::string> parameters;  // learnable parameters: "name  shape  init"
  std::function<EncodingPtr(const HeadShape&, const PeOptions&)> make;
};

const std::vector<EncodingInfo>& encodings();                // every registered encoding, in display order
const EncodingInfo& encoding_info(const std::string& name);  // throws, listing the known names
// Builds an encoding; unknown names and unknown or malformed options throw std::invalid_argument.
EncodingPtr make_encoding(const std::string& name, const HeadShape& shape, const PeOptions& options = {});

// ---- reference attention (LibTorch-composed: the oracle for fused kernels) -------------------------

// Causal pre-softmax logits [B,H,Tq,Tk]: q~.k~/sqrt(D) + bias, -inf where key position > query position.
torch::Tensor attention_logits(const Encoding& enc, const PeTokens& queries, const KeyCache& keys);

// Full causal attention over one chunk starting at `state`: returns y [B,T,H,D].
torch::Tensor reference_attention(Encoding& enc, const torch::Tensor& q, const torch::Tensor& k,
                                  const torch::Tensor& v, const torch::Tensor& x, PeState& state);

// ---- fused attention (src/kernels/cpu, bound in src/nn/fused_attention.cpp) --------------------------

// Whether the fused kernel computes this encoding's attention (its bias has LinearBiasTerms: the linear
// family, GRAPE-AP's path sum or a table by distance).
bool fused_supported(const Encoding& enc);
// softmax(q~.k~/sqrt(D) + bias, causal) v of encoded queries against a cache, y [B,Tq,H,D], by the fused
// CPU kernel (float32; O(T) extra memory; differentiable w.r.t. q~, k~, v and the bias terms). Throws
// std::invalid_argument when the encoding is not supported or the tensors are not float32.
torch::Tensor fused_attend(const Encoding& enc, const PeTokens& queries, const KeyCache& keys);
// Same contract as reference_attention, with fused_attend in place of the composed softmax.
torch::Tensor fused_attention(Encoding& enc, const torch::Tensor& q, const torch::Tensor& k,
                              const torch::Tensor& v, const torch::Tensor& x, PeState& state);

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

// ---- TAPE: a position state carried through the layers beside the hidden state (src/pe/tape.cpp) ------
// Each token has a position state E [B,T,H,D] per layer: D/2 complex numbers z_b = E[b] + i E[b+D/2] per head
// (the 2x2 blocks [[c,-s],[s,c]] of the TAPE paper stored once, so the rotate_half duplicate never drifts).
// q, k are multiplied by z (a rotation at layer 0, where E is RoPE's cos/sin table at the token's position);
// attention averages E with the same weights as v (E~), and E += A(E~); after the MLP, with its output y,
// E += W2 (SiLU(y Wx) * (W1 E)). Every update is linear in E with coefficients from x only, so a global
// rotation of every z_b (a position shift) leaves token outputs unchanged. With W1 = 0 and A = 0 (the init)
// E never changes and the model equals its RoPE backbone. The model drives the stream through this class.
class TapeEncoding : public Encoding {
 public:
  TapeEncoding(const HeadShape& shape, const PeOptions& options);
  Properties properties() const override;

  // E^(0) of tokens offset..offset+T-1 (positions shifted by the `shift` option): [B,T,H,D].
  torch::Tensor initial_stream(int64_t batch, int64_t offset, int64_t length, torch::ScalarType dtype) const;
  // encode() with this layer's position state of the chunk, stream [B,T,H,D]. The key map keeps it as "E"
  // (cached beside the keys: attention averages it). Plain encode() uses initial_stream (layer 0, = RoPE).
  PeTokens encode_with_stream(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& stream,
                              PeState& state);
  // E + A(E~): mode paper mixes heads with A [H,H]; mode code_compat scales head m by sum_e A[m,e].
  torch::Tensor attention_update(const torch::Tensor& E, const torch::Tensor& E_tilde) const;
  // E + W2 (SiLU(y Wx^T) * (W1 E)), y [B,T,C] the MLP output (before the residual).
  torch::Tensor mlp_update(const torch::Tensor& E, const torch::Tensor& y) const;

  // Whether this layer updates E (option `updates`; the model's last layer does not: nothing reads it).
  bool has_updates() const { return updates_; }

  torch::Tensor W1, Wx, W2, A;  // [I,H] zero, [I,C] N(0,0.02^2), [H,I] N(0,0.02^2), [H,H] zero

 protected:
  PeTokens encode_chunk(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& x,
                        PeState& state) override;

 private:
  torch::Tensor check_stream(const torch::Tensor& E, int64_t B, int64_t T, const char* what) const;
  void require_updates() const;
  bool updates_ = true;
  torch::Tensor log_theta_;  // [D/2] RoPE log-frequencies (float64 buffer)
  double shift_ = 0;
  bool code_compat_ = false;
  torch::Tensor pending_;  // the stream handed to encode_with_stream for the current call
};

// "[2,16,4,32]": the shape of a tensor as error messages print it.
std::string shape_string(const torch::Tensor& t);

// ---- shared math, exposed for tests and for the fused kernels' oracles -----------------------------

// ALiBi slopes m_h for H heads (also for H not a power of two).
std::vector<double> alibi_slopes(int64_t heads);

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
