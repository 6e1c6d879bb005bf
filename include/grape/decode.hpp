// Decoding with a KV cache on one of two paths (docs/decode.md):
//   fast       the LibTorch-free engine (src/kernels/cpu/decoder.hpp): the model's fp32 weights read in
//              place (or bf16 copies, DecodeWeights), preallocated per-sequence caches, OpenMP matrix
//              products; for the encodings whose encode depends on positions alone
//              (Encoding::positional_form);
//   reference  TransformerImpl::forward_cached, for every model: the oracle of the fast path.
// The path is decided once, when the Decoder is built; path() and fallback_reason() say which runs and why.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "grape/model.hpp"

namespace grape {

enum class DecodePath { fast, reference };
const char* to_string(DecodePath path);
// "fast" or "reference"; anything else throws std::invalid_argument naming `where` (e.g. "--decode").
DecodePath parse_decode_path(const std::string& text, const std::string& where = "decode path");

// The matrices' precision on the fast path: fp32 (the model's own weights, read in place) or bf16 (copies
// rounded to nearest even once, when the Decoder is built; products accumulate in fp32; norms, gains and the
// encodings' parameters stay fp32). The reference path is fp32 only.
enum class DecodeWeights { fp32, bf16 };
const char* to_string(DecodeWeights weights);
// "fp32" or "bf16"; anything else throws std::invalid_argument naming `where` (e.g. "--decode-weights").
DecodeWeights parse_decode_weights(const std::string& text, const std::string& where = "decode weights");

// Why the fast engine cannot decode this model exactly: "" when it can. E.g. "the encoding 'grape-m-ctx'
// reads the layer input x (contextual)", "kv_shift", "the weights are float64, not float32".
std::string fast_decode_unsupported(const Transformer& model);

// One sequence's KV cache on the path of the Decoder that made it (Decoder::new_cache).
struct DecodeCache {
  int64_t length = 0;                    // tokens consumed
  SequenceCache reference;               // the reference path's cache
  std::vector<std::vector<float>> k, v;  // the fast path's: per layer [H][capacity][D]
  // and, per layer with a forget gate (FoX; else empty), each key's bias term [H][capacity] and the running
  // sum of its log gates per head [H]
  std::vector<std::vector<float>> key_b;
  std::vector<std::vector<double>> gate_sum;
  // and, per layer with path-integral probes (GRAPE-AP; else empty), each key's rotated probe
  // [H][capacity][P]
  std::vector<std::vector<float>> key_r;
  int64_t capacity = 0;
  uint64_t owner = 0;  // the id of the Decoder that made it
};

class Decoder {
 public:
  // `requested` fast: the engine when fast_decode_unsupported(model) is "", else the reference path. The
  // fast path reads the weights in place and tabulates the encodings' angles and distance biases: build the
  // Decoder after training, and keep the model alive and unchanged while it decodes.
  // bf16 `weights` need the fast path: with DecodePath::reference, or a model that only the reference path
  // decodes, the constructor throws std::invalid_argument saying why.
  explicit Decoder(Transformer model, DecodePath requested = DecodePath::fast,
                   DecodeWeights weights = DecodeWeights::fp32);
  ~Decoder();
  Decoder(const Decoder&) = delete;
  Decoder& operator=(const Decoder&) = delete;

  DecodePath path() const { return path_; }
  // Why the fast path was asked for but not taken ("" otherwise).
  const std::string& fallback_reason() const { return fallback_reason_; }
  DecodeWeights weights() const { return weights_; }
  // The matrix-product kernel of bf16 weights on this CPU (avx512 or portable); "" for fp32.
  std::string bf16_kernel() const;
  // Bytes of the fp32 weights' panel copy that the products multiply (as much memory again as the weights):
  // where AVX2 is the kernels' widest unit, made by the first pass; elsewhere by the first pass of two or
  // more sequences with 8+ rows (one sequence alone never makes it there). Always 0 with bf16 weights.
  int64_t panel_bytes() const;
  // Makes now what the first pass of `sequences` one-token rows would make on its way (the panel copy with
  // fp32 weights on the fast path, as panel_bytes() says; nothing otherwise), so that a server's or a
  // benchmark's first step does not carry it.
  void prepare_batch(int64_t sequences);
  const Transformer& model() const { return model_; }

  // Where the fast path's passes spend their time (`grape bench decode --profile`): wall seconds in the
  // matrix products (the tied head included), the attention, and the rest (embedding, norms, encode, gates,
  // SwiGLU, residuals), summed over the passes since set_profiling(true) zeroed them (until
  // set_profiling(false)). Timed on the first thread after each phase's barrier; off by default (about 60
  // clock reads a pass). All zero on the reference path.
  struct Profile {
    double products_s = 0, attention_s = 0, other_s = 0;
    int64_t passes = 0;
  };
  void set_profiling(bool on);
  Profile profile() const;

  // A cache on this Decoder's path; on the fast path with room for `positions` tokens made now (prompt plus
  // the tokens to generate: no buffer doubles and moves on the way; it still grows past them). >= 0.
  DecodeCache new_cache(int64_t positions = 0) const;
  // As TransformerImpl::forward_cached: row b of tokens [B,T] (int64 or int32, ids < vocab) continues
  // caches[b] (lengths may differ); returns logits [B,T,V] float32. Dense layers run batched, attention per
  // sequence. Inputs (ids, the number of caches, caches of another Decoder) are checked before any cache
  // changes and throw std::invalid_argument.
  torch::Tensor forward(const torch::Tensor& tokens, const std::vector<DecodeCache*>& caches);

  struct Engine;  // the fast path's weights, tables and workspace (src/nn/decode_engine.cpp)

 private:
  Transformer model_;
  DecodePath path_;
  DecodeWeights weights_;
  std::string fallback_reason_;
  uint64_t id_;
  std::unique_ptr<Engine> engine_;
};

}  // namespace grape
