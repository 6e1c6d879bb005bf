// File formats grape reads and writes, as torch tensors: NumPy .npy, .safetensors, and (from
// grape/formats.hpp, which parses and encodes the bytes without LibTorch) read_file and write_file_atomic.
// Every reader validates the whole file before returning and throws std::runtime_error whose message
// names the file and the problem (bad magic, truncated, unsupported dtype, ...). Never a crash.
#pragma once

#include <torch/torch.h>

#include <map>
#include <string>

#include "grape/formats.hpp"

namespace grape::io {

// .npy, format versions 1.0, 2.0 and 3.0, little-endian float32 ('<f4'), C order only.
torch::Tensor read_npy(const std::string& path);
// Writes a float32 tensor (any shape, made contiguous) as .npy version 1.0, atomically.
void write_npy(const std::string& path, const torch::Tensor& tensor);

// .safetensors: 8-byte little-endian header length, JSON header, raw little-endian data.
// Only F32 tensors are accepted on read; any other dtype is refused with its name in the message, and so is
// a NaN or Inf value (named with its tensor and index): what grape reads from these files is weights.
std::map<std::string, torch::Tensor> read_safetensors(const std::string& path,
                                                      std::map<std::string, std::string>* metadata = nullptr);
// The same from a file's bytes already in memory (read once, e.g. to verify a checksum first); `name`
// stands for the file in error messages.
std::map<std::string, torch::Tensor> safetensors_tensors(
    const std::string& bytes, const std::string& name,
    std::map<std::string, std::string>* metadata = nullptr);
// Writes float32 tensors (others are refused), sorted by name, with optional string metadata, atomically.
void write_safetensors(const std::string& path, const std::map<std::string, torch::Tensor>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace grape::io
