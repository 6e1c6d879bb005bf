// read_npy / write_npy: torch tensors over the .npy parser and encoder of grape/formats.hpp.
#include <cstring>
#include <stdexcept>
#include <string>

#include "grape/formats.hpp"
#include "grape/io.hpp"
#include "io/byte_order.hpp"

namespace grape::io {

torch::Tensor read_npy(const std::string& path) {
  const std::string file = read_file(path);
  const NpyFile npy = parse_npy(file, path);
  // A fresh tensor owns its memory; memcpy avoids assuming the file buffer is 4-byte aligned.
  torch::Tensor out = torch::empty(npy.shape, npy.item_bytes == 8 ? torch::kFloat64 : torch::kFloat32);
  if (!npy.data.empty()) {
    auto* dst = static_cast<char*>(out.data_ptr());
    std::memcpy(dst, npy.data.data(), npy.data.size());
    detail::to_or_from_little_endian(dst, npy.data.size(), size_t(npy.item_bytes));
  }
  return out.to(torch::kFloat32);  // float64 (numpy's default) is converted: grape computes in float32
}

void write_npy(const std::string& path, const torch::Tensor& tensor) {
  if (!tensor.defined()) throw std::runtime_error(path + ": cannot write an undefined tensor as .npy");
  if (tensor.scalar_type() != torch::kFloat32)
    throw std::runtime_error(path + ": cannot write dtype " + c10::toString(tensor.scalar_type()) +
                             " as .npy (grape writes float32 only; convert with .to(torch::kFloat32))");
  const torch::Tensor t = tensor.detach().to(torch::kCPU).contiguous();
  write_file_atomic(path, encode_npy({t.sizes().vec(), t.data_ptr<float>()}, path));
}

}  // namespace grape::io
