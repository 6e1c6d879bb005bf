// Internal: context extension of a RoPE-family spectrum (docs/encodings.md, "Context extension"): Position
// Interpolation, NTK-aware scaling, dynamic NTK, YaRN (NTK-by-parts + attention temperature) and LongRoPE.
// All the math of the methods lives in context_extension.cpp; rotary.cpp (rope, grape-m, grape-m-planes and
// the named encodings pi, ntk, dynamic-ntk, yarn, longrope) only asks it for angles and the q/k scale.
#pragma once

#include <string>
#include <vector>

#include "pe/families.hpp"

namespace grape::detail {

// A method with its settings, resolved and validated. method "none" leaves the spectrum alone.
struct ContextExtension {
  std::string method = "none";     // none | pi | ntk | dynamic-ntk | yarn | longrope
  double factor = 1.0;             // s = L'/L
  int64_t original_context = 128;  // L, the training context
  int64_t rotated_dims = 2;        // r: theta_d = b^(-2d/r), d < r/2 (D, or fraction*D for partial rotary)
  double yarn_alpha = 1.0, yarn_beta = 32.0;  // the ramp's ends, in rotations r(d) = L theta_d / 2pi
  double yarn_mscale = 1.0;       // YaRN's factor on the rotated q and k (resolved: 0.1 ln s + 1 unless set)
  torch::Tensor longrope_lambda;  // [r/2] float64 per-frequency factors lambda_d
  std::string longrope_file;      // where they came from ("" : lambda_d = factor for every d)
  int64_t longrope_start = 0;     // n_hat: positions below it are not interpolated

  bool active() const { return method != "none"; }
  // Dynamic NTK's spectrum depends on the current length, so cached keys must stay unrotated.
  bool dynamic() const { return method == "dynamic-ntk"; }
  // Whether the logits depend on positions only through i - j.
  bool relative() const { return !dynamic() && !(method == "longrope" && longrope_start > 0); }
  // The factor on both rotated q and k (logits scale by its square); 1 except for YaRN with s > 1.
  double mscale() const { return method == "yarn" ? yarn_mscale : 1.0; }
  // Rotated q or k times YaRN's temperature (as it is when mscale is 1).
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

// Reads the options extend (unless `fixed_method` names it), factor, original_context, yarn_alpha,
// yarn_beta, yarn_mscale, longrope_factors, longrope_start. `default_factor` is s when factor is not given.
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

// YaRN's temperature factor on q and k: 0.1 ln s + 1 for s > 1, else 1.
double yarn_default_mscale(double s);

// LongRoPE factors from a file: a JSON array of numbers, or numbers separated by white space or commas.
std::vector<double> read_longrope_factors(const std::string& path);

}  // namespace grape::detail
