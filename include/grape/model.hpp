// The LLaMA-style decoder language model whose position encoding is one option (docs/training.md):
// tied token embedding, pre-RMSNorm blocks  x += Attn(RMSNorm(x)); x += SwiGLU(RMSNorm(x)),  RMSNorm on
// each head's q and k (gain shared across heads), no biases, final RMSNorm, optional KV-shift.
// Full forward passes and streaming decoding with a per-sequence KV cache run the same math, so they
// give the same logits.
#pragma once

#include <torch/torch.h>

#include <map>
#include <string>
#include <vector>

#include "grape/attention.hpp"
#include "grape/pe.hpp"

namespace grape {

// One field of a config as a user meets it: a `--set NAME=VALUE` key, a key of a --config file section and
// of run.json. Each config's table of fields (src/nn/config_fields.hpp) is the one place a field is declared;
// this is its description for help texts.
struct ConfigField {
  std::string name;           // "n_layer"; an options field is set as "PREFIX.KEY" (pe.OPTION)
  std::string kind;           // "integer", "number", "boolean", "text", the choices "fused|reference", ...
  std::string default_value;  // of a default-constructed config, as --set takes it
  std::string help;           // one line, with the allowed range
};

struct ModelConfig {
  std::string preset = "tiny";
  int64_t vocab_size = 257;  // from the tokenizer
  int64_t n_layer = 4;
  int64_t n_head = 4;
  int64_t n_embd = 128;                           // C; head_dim = C / n_head
  int64_t mlp_hidden = 0;                         // SwiGLU hidden width; 0: floor(8C/3)
  int64_t context = 128;                          // training context length T
  std::string pe = "rope";                        // any name from grape::encodings()
  std::map<std::string, std::string> pe_options;  // its --pe-set key=value options
  bool kv_shift = false;
  std::string qk_norm = "before_rotation";  // before_rotation|after_rotation|off (see docs/training.md)
  double norm_eps = 1e-5;
  double embed_std = 0.02;          // tied embedding init N(0, embed_std^2)
  std::string attention = "fused";  // "fused": CPU kernels where the encoding allows; "reference": composed
  std::string block = "fused";      // "fused": RMSNorm, SwiGLU on the CPU kernels, the MLP sublayer and the
                                    // q, k, v projections each one autograd node; "reference": composed

  int64_t head_dim() const { return n_embd / n_head; }
  int64_t hidden() const { return mlp_hidden > 0 ? mlp_hidden : (8 * n_embd) / 3; }
  HeadShape head_shape() const { return {n_head, head_dim(), n_embd}; }

  // Throws std::invalid_argument naming the field: a value outside its range, C not divisible by n_head, an
  // unknown encoding or encoding option (checked by building it), weights larger than this machine's
  // memory (see require_memory), ...
  void validate() const;
  // The float32 weights' bytes, from the shapes of the embedding, the blocks and the norms (an encoding's
  // own few parameters aside): a double, so that absurd sizes do not overflow.
  double weight_bytes() const;
  // Throws std::invalid_argument when `copies` x weight_bytes() exceed the machine's physical memory,
  // saying how much they need and what for (`purpose`: "the weights", "training (weights, gradients and
  // AdamW's two moments)").
  void require_memory(int copies, const std::string& purpose) const;
  // Sets one field from text, as `--set n_layer=6` or `--pe-set base=500000` give it. Keys "pe.NAME" set
  // encoding options; "preset" loads that preset (every field), so set it before the others. Errors start
  // with `where` and name the key: "model config: n_layer='6x' is not an integer"; an unknown key lists the
  // known ones.
  void set(const std::string& key, const std::string& value, const std::string& where = "model config");
  // Sets the fields of a config file's [model] section, given as a JSON object: values typed (6, true) or
  // text ("6"), pe_options an object of options; "preset" is applied first. `where` names the file and
  // section in errors ("run.toml [model]").
  void set_section(const std::string& section_json, const std::string& where);
  std::string to_json() const;  // every field, pretty-printed (run.json)
  // The inverse of to_json: every value of its own JSON type; unknown or mistyped fields throw.
  static ModelConfig from_json(const std::string& text);
  static const std::vector<ConfigField>& fields();  // in declaration order, for help texts
  static bool has_key(const std::string& key);      // whether set() takes it (a field or pe.OPTION)
};

// "tiny" (CPU demo and tests), "small", "medium" (353M, paper), "large" (770M, paper).
ModelConfig model_preset(const std::string& name);
std::vector<std::string> model_preset_names();

// The KV cache of one sequence: per layer the encoding's running state, the encoded keys and values
// seen so far, and the KV-shift state. Sequences of one batch may have different lengths.
struct SequenceCache {
  struct Layer {
    PeState pe;
    KeyCache keys;
    KVShiftState shift;
  };
  std::vector<Layer> layers;
  int64_t length = 0;  // tokens consumed
};

class RMSNormImpl : public torch::nn::Module {
 public:
  // fused: fp32 inputs run the one-pass CPU kernel (forward and backward); others, and fused=false, the
  // LibTorch-composed reference.
  RMSNormImpl(int64_t dim, double eps, bool fused = false);
  torch::Tensor forward(const torch::Tensor& x);  // rms_norm(x, weight, eps, fused)
  torch::Tensor weight;
  double eps;
  bool fused;
};
TORCH_MODULE(RMSNorm);

// Where QK-norm acts (ModelConfig::qk_norm): on q, k before `encode`, on the encoded q~, k~ (the GRAPE
// authors' order; the encoding must declare Properties::qk_norm_after_encode), or nowhere.
enum class QKNorm { before_rotation, after_rotation, off };
// "before_rotation", "after_rotation", "off" (or true/false for before_rotation/off); else throws naming
// the choices.
QKNorm parse_qk_norm(const std::string& text);
// Throws std::invalid_argument naming the encoding when `qk_norm` cannot apply to it (after_rotation on an
// encoding that scales q and k or rotates them inside attention).
void check_qk_norm(QKNorm qk_norm, const Encoding& enc);

// The rows [row, row+rows) of a batch that share one position-encoding state, key cache and KV-shift state:
// the whole batch in a full forward, one sequence per group when streaming.
struct RowGroup {
  int64_t row, rows;
  PeState* pe;
  KeyCache* keys;
  KVShiftState* shift;
};

// The attention sublayer of a block: x̂ [B,T,C] (the normalised layer input) -> wo(Attn(x̂)). Not a module
// of its own: it registers wq, wk, wv, wo, q_norm, k_norm, kv_shift and pe in `owner` under those names (a
// block's checkpoint names, the weights `grape attn forward` reads). The model's blocks and `grape attn
// forward` run this one implementation.
class AttentionSublayer {
 public:
  AttentionSublayer(torch::nn::Module& owner, const ModelConfig& c, EncodingPtr pe);
  struct Output {
    torch::Tensor y;       // [B,T,C], after wo
    torch::Tensor stream;  // the position state after attention (encodings that update one), else undefined
  };
  // `groups` partition the rows and carry their state. stream: the position state [B,T,H,D] of these tokens
  // when the encoding reads one (TAPE), else null. logits (optional): receives per group the pre-softmax
  // logits [rows,H,T,Tk] (-inf where masked).
  Output forward(const torch::Tensor& xh, const std::vector<RowGroup>& groups, const torch::Tensor* stream,
                 std::vector<torch::Tensor>* logits = nullptr);
  const EncodingPtr& pe() const { return pe_; }
  torch::nn::Linear& wo() { return wo_; }

 private:
  int64_t H_, D_;
  QKNorm qk_norm_;
  EncodingPtr pe_;
  Properties props_;    // what the encoding reads (x, a position stream) and whether it updates the stream
  AttentionImpl impl_;  // fused where the kernels compute the encoding, or always the reference
  bool fused_projections_;  // block=fused: q, k, v as one autograd node (fp32 CPU)
  torch::nn::Linear wq_{nullptr}, wk_{nullptr}, wv_{nullptr}, wo_{nullptr};
  RMSNorm q_norm_{nullptr}, k_norm_{nullptr};
  KVShift kv_shift_{nullptr};
};

// SwiGLU's gate silu(a) * b: with fused, fp32 inputs of one shape run the one-pass CPU kernel (forward and
// backward); others, and fused=false, LibTorch's silu and mul.
torch::Tensor swiglu(const torch::Tensor& a, const torch::Tensor& b, bool fused);

class BlockImpl;  // one transformer block (defined in src/nn/model.cpp)

class TransformerImpl : public torch::nn::Module {
 public:
  explicit TransformerImpl(const ModelConfig& config);  // validates; initialises as docs/training.md says

  const ModelConfig& config() const { return config_; }
  int64_t num_parameters() const;  // tied embedding counted once

  // tokens [B,T] int64 (ids < vocab, checked), positions 0..T-1 → logits [B,T,V] float32.
  torch::Tensor forward(const torch::Tensor& tokens);
  // Mean cross-entropy of logits(tokens) against targets [B,T]; mask [B,T] (optional) weights each target.
  torch::Tensor loss(const torch::Tensor& tokens, const torch::Tensor& targets,
                     const torch::Tensor& mask = {});

  SequenceCache new_cache() const;
  // Streaming: feeds tokens [B,T] where row b continues caches[b] (caches.size() == B; their lengths may
  // differ). Dense layers run batched; attention runs per sequence against its own cache. Returns
  // logits [B,T,V]. Prefill is a call with the whole prompt, decoding a call with T = 1.
  // Run it under torch::NoGradGuard when decoding (the caches would otherwise keep the autograd graph).
  // Inputs are checked before any cache changes.
  torch::Tensor forward_cached(const torch::Tensor& tokens, std::vector<SequenceCache*>& caches);

  // The encodings of the layers (for `grape encodings`-style descriptions and tests), one per layer.
  // For an encoding that embeds (sinusoidal, learned) the layers hold "nope" and the real one, applied
  // once to the token embeddings, is embedding_encoding().
  std::vector<EncodingPtr> encodings() const;
  // The model-level encoding added to the token embeddings, or nullptr when the encoding does not embed.
  EncodingPtr embedding_encoding() const { return embed_pe_; }

 private:
  ModelConfig config_;
  torch::nn::Embedding wte_{nullptr};
  std::vector<std::shared_ptr<BlockImpl>> blocks_;
  RMSNorm norm_f_{nullptr};
  EncodingPtr embed_pe_;
  // The layer-0 position state of rows starting at `offsets`, [B,T,H,D], when the encoding carries one
  // (Properties::reads_stream, TAPE); undefined otherwise.
  torch::Tensor initial_stream(const std::vector<int64_t>& offsets, int64_t T, torch::ScalarType dtype)
      const;  // the encoding when it embeds (sinusoidal, learned), applied once after wte
};
TORCH_MODULE(Transformer);

}  // namespace grape
