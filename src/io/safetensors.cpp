// read_safetensors / write_safetensors: torch tensors over the .safetensors parser and encoder of
// grape/formats.hpp.
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "grape/formats.hpp"
#include "grape/io.hpp"
#include "io/byte_order.hpp"

namespace grape::io {

std::map<std::string, torch::Tensor> read_safetensors(const std::string& path,
                                                      std::map<std::string, std::string>* metadata) {
  return safetensors_tensors(read_file(path), path, metadata);
}

std::map<std::string, torch::Tensor> safetensors_tensors(const std::string& bytes, const std::string& name,
                                                         std::map<std::string, std::string>* metadata) {
  SafetensorsFile st = parse_safetensors(bytes, name);
  // Only now, with everything validated, allocate; each tensor owns its memory.
  std::map<std::string, torch::Tensor> out;
  for (const SafetensorsEntry& e : st.entries) {
    torch::Tensor t = torch::empty(e.shape, torch::kFloat32);
    const std::size_t n = e.end - e.begin;
    if (n > 0) {
      auto* dst = static_cast<char*>(t.data_ptr());
      std::memcpy(dst, st.data.data() + e.begin, n);
      detail::to_or_from_little_endian(dst, n);
    }
    // Weights are always finite: NaN or Inf in a file is damage, refused here rather than met later as a
    // NaN perplexity or an encoding's "q contains NaN".
    if (n > 0 && !torch::isfinite(t).all().item<bool>()) {
      const int64_t at = torch::logical_not(torch::isfinite(t)).reshape(-1).nonzero()[0][0].item<int64_t>();
      throw std::runtime_error(name + ": tensor '" + e.name + "' holds " +
                               std::to_string(t.reshape(-1)[at].item<float>()) + " at flat index " +
                               std::to_string(at) + "; weights must be finite");
    }
    out.emplace(e.name, std::move(t));
  }
  if (metadata != nullptr) *metadata = std::move(st.metadata);
  return out;
}

void write_safetensors(const std::string& path, const std::map<std::string, torch::Tensor>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  std::vector<torch::Tensor> contiguous;  // keeps the data that `arrays` points at alive
  std::map<std::string, F32Array> arrays;
  for (const auto& [name, tensor] : tensors) {
    if (!tensor.defined()) throw std::runtime_error(path + ": tensor '" + name + "' is undefined");
    if (tensor.scalar_type() != torch::kFloat32)
      throw std::runtime_error(path + ": tensor '" + name + "' has dtype " +
                               c10::toString(tensor.scalar_type()) + " (grape writes float32 only)");
    contiguous.push_back(tensor.detach().to(torch::kCPU).contiguous());
    arrays[name] = {contiguous.back().sizes().vec(), contiguous.back().data_ptr<float>()};
  }
  write_file_atomic(path, encode_safetensors(arrays, metadata, path));
}

}  // namespace grape::io
