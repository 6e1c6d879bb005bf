// Internal: context extension of a RoPE-family spectrum (docs/encodings.md, "Context extension"): Position
// Interpolation, NTK-aware scaling, dynamic NTK, YaRN (NTK-by-parts + attention temperature, with the paper's
// or Hugging Face's ramp), LongRoPE (one factor set, or Hugging Face's short/long switch) and Llama 3's.
// All the math of the methods lives in context_extension.cpp; rotary.cpp (rope, grape-m, grape-m-planes and
// the named encodings pi, ntk, dynamic-ntk, yarn, longrope) only asks it for angles and the q/k scale.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "pe/families.hpp"

namespace grape::detail {

// A method with its settings, resolved and validated. method "none" leaves the spectrum alone.
struct ContextExtension {
  std::string method = "none";     // none | pi | ntk | dynamic-ntk | yarn | longrope | llama3
  double factor = 1.0;             // s = L'/L
  int64_t original_context = 128;  // L, the training context
  int64_t rotated_dims = 2;        // r: theta_d = b^(-2d/r), d < r/2 (D, or fraction*D for partial rotary)
  double yarn_alpha = 1.0, yarn_beta = 32.0;  // the ramp's ends, in rotations r(d) = L theta_d / 2pi
  double yarn_mscale = 1.0;  // YaRN's factor on the rotated q and k (resolved: 0.1 ln s + 1 unless set)
  // YaRN's ramp between PI (slow pairs) and RoPE (fast pairs). "paper": continuous in the pair's turns
  // within L; "hf": Hugging Face's, linear in the pair index between the floor/ceil (yarn_truncate) of the
  // indices whose pairs turn yarn_beta and yarn_alpha times, found from the base.
  std::string yarn_ramp = "paper";
  bool yarn_truncate = true;
  double base = 10000.0;          // the spectrum's base (the hf ramp locates its pair indices with it)
  double low_freq_factor = 1.0;   // llama3: pairs whose wavelength exceeds L/low_freq_factor get theta/s
  double high_freq_factor = 4.0;  // llama3: pairs whose wavelength is below L/high_freq_factor are kept
  torch::Tensor longrope_lambda;  // [r/2] float64 per-frequency factors lambda_d (the long ones)
  torch::Tensor longrope_short;   // [r/2] factors used while the length is <= L (undefined: no switch)
  std::string longrope_file;      // where they came from ("" : lambda_d = factor for every d)
  int64_t longrope_start = 0;     // n_hat: positions below it are not interpolated
  double longrope_mscale = 1.0;   // LongRoPE's factor on rotated q and k (Hugging Face's attention_factor)

  bool active() const { return method != "none"; }
  // A spectrum that depends on the current length (dynamic NTK; LongRoPE switching from its short to its
  // long factors at L): cached keys must stay unrotated.
  bool dynamic() const {
    return method == "dynamic-ntk" || (method == "longrope" && longrope_short.defined());
  }
  // Whether the logits depend on positions only through i - j.
  bool relative() const { return !dynamic() && !(method == "longrope" && longrope_start > 0); }
  // The factor on both rotated q and k (logits scale by its square); 1 except for YaRN and LongRoPE.
  double mscale() const {
    return method == "yarn" ? yarn_mscale : method == "longrope" ? longrope_mscale : 1.0;
  }
  // Rotated q or k times the method's factor (YaRN's temperature, LongRoPE's); as it is when that is 1.
  torch::Tensor temper(const torch::Tensor& rotated) const {
    return mscale() != 1.0 ? rotated * mscale() : rotated;
  }

  // The extended frequencies theta' [G,P] (float64, differentiable in theta) for base frequencies theta
  // [G,P] when the sequence seen so far has `length` tokens (only dynamic-ntk reads it). LongRoPE's
  // interpolated part theta/lambda is returned; its first n_hat positions use theta itself (see angles).
  torch::Tensor spectrum(const torch::Tensor& theta, int64_t length) const;
  // Angles [1,T,G,P] (float64) of positions offset..offset+T-1. With method none this is exactly
  // position * theta, so an unextended encoding is bit for bit what it was.
  torch::Tensor angles(const torch::Tensor& theta, int64_t offset, int64_t T, int64_t length) const;
  // "yarn (s=4, L=128)" for reports; "none" when inactive.
  std::string describe() const;
};

// The method names, in display order ("none" first).
const std::vector<std::string>& extension_methods();

// Hugging Face's `rope_scaling` key names that our options accept as aliases: {HF name, our option}.
const std::vector<std::pair<std::string, std::string>>& hf_option_aliases();
// Our method for HF's rope_type: default -> none, linear -> pi, dynamic -> dynamic-ntk, yarn, longrope,
// llama3; anything else throws std::invalid_argument.
std::string method_of_rope_type(const std::string& rope_type);

// Reads the options extend (unless `fixed_method` names it), factor, original_context and the methods' own
// (yarn_*, mscale, mscale_all_dim, longrope_*, low/high_freq_factor), also under Hugging Face's key names
// (rope_type, original_max_position_embeddings, beta_fast, ...: see hf_option_aliases). `default_factor`
// is s when factor is not given.
// Throws std::invalid_argument naming `enc` and the option for any bad value, for a method-specific option
// given with another method, and for a missing, corrupt or wrong-length longrope_factors file.
ContextExtension parse_context_extension(const PeOptions& o, const std::string& enc, int64_t rotated_dims,
                                         const std::string& fixed_method = "", double default_factor = 1.0);

// The OptionSpecs of those options for the registry: with an empty fixed_method, "extend" and every
// method's options (rope, grape-m); else factor, original_context and that method's own options.
std::vector<OptionSpec> context_extension_options(const std::string& fixed_method = "",
                                                  const std::string& default_factor = "1");

// RoPE (rotary.cpp) with a fixed extension method, registered under `name` (pi, ntk, ...).
EncodingPtr make_extended_rope(const HeadShape& s, const PeOptions& o, const std::string& name,
                               const std::string& fixed_method, double default_factor);

// YaRN's temperature factor on q and k: 0.1 m ln s + 1 for s > 1, else 1 (m = 1 in the paper).
double yarn_default_mscale(double s, double m = 1.0);

// LongRoPE factors from a file: a JSON array of numbers, or numbers separated by white space or commas.
std::vector<double> read_longrope_factors(const std::string& path);

}  // namespace grape::detail
