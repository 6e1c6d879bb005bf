// File formats grape reads and writes: NumPy .npy, .safetensors, and atomic (temp + rename) writes.
// Every reader validates the whole file before returning and throws std::runtime_error whose message
// names the file and the problem (bad magic, truncated, unsupported dtype, ...). Never a crash.
#pragma once

#include <torch/torch.h>

#include <map>
#include <string>

namespace grape::io {

// Writes `bytes` to `path` atomically: a temporary file beside it, fsync, then rename over `path`.
// On any failure the temporary is removed, the old `path` is untouched, and std::runtime_error is thrown.
void write_file_atomic(const std::string& path, const std::string& bytes);

// Reads a whole file; throws std::runtime_error("cannot open 'path': <reason>") when missing/unreadable.
std::string read_file(const std::string& path);

// .npy, format versions 1.0, 2.0 and 3.0, little-endian float32 ('<f4'), C order only.
torch::Tensor read_npy(const std::string& path);
// Writes a float32 tensor (any shape, made contiguous) as .npy version 1.0, atomically.
void write_npy(const std::string& path, const torch::Tensor& tensor);

// .safetensors: 8-byte little-endian header length, JSON header, raw little-endian data.
// Only F32 tensors are accepted on read; any other dtype is refused with its name in the message.
std::map<std::string, torch::Tensor> read_safetensors(const std::string& path,
                                                      std::map<std::string, std::string>* metadata = nullptr);
// The same from a file's bytes already in memory (read once, e.g. to verify a checksum first); `name`
// stands for the file in error messages.
std::map<std::string, torch::Tensor> parse_safetensors(
    const std::string& bytes, const std::string& name,
    std::map<std::string, std::string>* metadata = nullptr);
// Writes float32 tensors (others are refused), sorted by name, with optional string metadata, atomically.
void write_safetensors(const std::string& path, const std::map<std::string, torch::Tensor>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace grape::io
