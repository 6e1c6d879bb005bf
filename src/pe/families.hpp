// Internal: shared helpers of the encoding families and their registration.
#pragma once

#include <string>
#include <vector>

#include "grape/pe.hpp"

namespace grape::detail {

// Adds a family file's encodings to the registry when the program starts: each family file holds one
// `const Registration registration(add_its_encodings);`, so a new encoding touches no other source file.
// (The pe library is linked whole, see CMakeLists.txt, so no linker drops a file nothing else calls.)
struct Registration {
  explicit Registration(void (*add)(std::vector<EncodingInfo>& out));
};

// Options shared by every rotation: which coordinates pair up, and which way they turn.
struct RotaryLayout {
  std::string pairing = "half";  // "half" (i, i+P) or "interleaved" (2i, 2i+1)
  double sign = 1.0;             // +1 standard (RoFormer/HF/Meta), -1 the GRAPE authors' clockwise turn
};
RotaryLayout rotary_layout(const PeOptions& o);
std::vector<OptionSpec> rotary_layout_options();

// RoPE log-frequencies log(base^(-2i/r)), i < r/2, in float64: the one place this spectrum is computed.
// Fixed encodings keep it as a float64 buffer and round it to the input's dtype before exp; learned ones
// store it (times a power of two) as a float32 parameter. So in float32, grape-m at init equals rope bit
// for bit, and in float64 rope keeps its exact spectrum.
torch::Tensor rope_log_theta(int64_t rotated_dims, double base);

// Absolute positions offset..offset+T-1 as float64 (angles are formed in float64, then reduced mod 2pi).
torch::Tensor positions_f64(int64_t offset, int64_t length);

// Throws unless D is even (every rotation pairs coordinates).
void require_even_head_dim(const std::string& enc, int64_t head_dim);

// The normal init of every linear weight in the paper's model: N(0, (0.5/sqrt(C))^2).
torch::Tensor linear_init(std::vector<int64_t> shape, int64_t fan_in);

// The float64 running quantity `key` of a state, [B, width] (zeros when absent); refuses a state that was
// made for another batch size. Contextual encodings carry their cumulative sums across chunks in it.
torch::Tensor& running_sum(PeState& st, const std::string& key, int64_t batch, int64_t width,
                           const std::string& enc);

// Position differences i - j [Tq,Tk] of queries and keys, in `dtype`.
torch::Tensor distance(const PeTokens& queries, const KeyCache& keys, torch::ScalarType dtype);

}  // namespace grape::detail
