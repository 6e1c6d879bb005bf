// File formats grape reads and writes, on bytes: NumPy .npy, .safetensors, whole-file reads and atomic
// (temp + rename) writes. No LibTorch here, so that these parsers can be tested under sanitizers; the tensor
// adapters are in grape/io.hpp. Every parser validates the whole input before returning and throws
// std::runtime_error whose message names the file and the problem (bad magic, truncated, unsupported dtype,
// ...). Never a crash.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

namespace grape::io {

// Writes `bytes` to `path` atomically: a temporary file beside it, fsync, then rename over `path`.
// On any failure the temporary is removed, the old `path` is untouched, and std::runtime_error is thrown.
// `path` must be absent or a regular file: a FIFO, symlink, device or directory there is refused, never
// replaced.
void write_file_atomic(const std::string& path, const std::string& bytes);

// Caps on whole-file reads by what the file holds: inputs are regular files of plausible size.
inline constexpr std::uint64_t kMaxSettingsBytes = std::uint64_t{64} << 20;  // configs, run/state.json
inline constexpr std::uint64_t kMaxNameFileBytes = 4096;                     // checkpoints/latest
// Data, tensors, tokenizer models, metrics: 16 GiB, or GRAPE_MAX_FILE_MB (MiB) when set.
std::uint64_t max_data_bytes();

// Reads a whole regular file of at most `max_bytes` (0: max_data_bytes()). Throws std::runtime_error naming
// the path when it is missing or unreadable ("cannot open 'path': <reason>"), not a regular file (a FIFO,
// device or directory: opened without blocking, never read), or larger than the cap.
std::string read_file(const std::string& path, std::uint64_t max_bytes = 0);

// float32 values in C order and native byte order, as the writers take them: prod(shape) values at `data`.
struct F32Array {
  std::vector<std::int64_t> shape;  // non-negative dimensions; {} is a scalar
  const float* data = nullptr;      // may be null when the array is empty

  std::size_t nbytes() const {
    std::size_t n = 4;
    for (const std::int64_t d : shape) n *= static_cast<std::size_t>(d);
    return n;
  }
};

// A parsed .npy file. `data` points into the bytes given to parse_npy (keep them alive): prod(shape) * 4
// bytes of little-endian float32, not necessarily 4-byte aligned.
struct NpyFile {
  std::vector<std::int64_t> shape;
  std::string_view data;
  int item_bytes = 4;  // 4: float32 ('<f4'); 8: float64 ('<f8', numpy's default)
};

// .npy, format versions 1.0, 2.0 and 3.0, little-endian float32 ('<f4') or float64 ('<f8'), C order only.
// `file` holds the whole file's bytes; `path` only names it in error messages.
NpyFile parse_npy(std::string_view file, const std::string& path);
// The bytes of a .npy version 1.0 file holding `array`, header laid out as numpy writes it; `path` only
// names the file in error messages, as for every function below.
std::string encode_npy(const F32Array& array, const std::string& path);

// One tensor of a parsed .safetensors file: its bytes are data.substr(begin, end - begin).
struct SafetensorsEntry {
  std::string name;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0;
  std::uint64_t end = 0;
};

// A parsed .safetensors file. `data` is the data section, inside the bytes given to parse_safetensors
// (keep them alive); each entry's range lies within it, holds prod(shape) * 4 bytes of little-endian
// float32 (not necessarily 4-byte aligned), and no two non-empty ranges overlap.
struct SafetensorsFile {
  std::vector<SafetensorsEntry> entries;  // sorted by name
  std::map<std::string, std::string> metadata;
  std::string_view data;
};

// .safetensors: 8-byte little-endian header length, JSON header, raw little-endian data.
// Only F32 tensors are accepted; any other dtype is refused with its name in the message.
SafetensorsFile parse_safetensors(std::string_view file, const std::string& path);
// The bytes of a .safetensors file holding `tensors` (sorted by name) and string `metadata`, laid out as
// the reference implementation writes them. A tensor named "__metadata__" is refused.
std::string encode_safetensors(const std::map<std::string, F32Array>& tensors,
                               const std::map<std::string, std::string>& metadata, const std::string& path);

// Checks what libsentencepiece takes on trust in a model it loaded (a protobuf ModelProto): the normalizer's
// and denormalizer's precompiled character maps, tries the library walks without bounds checks. Throws
// std::runtime_error naming `path` and the damage; the library itself checks the rest.
void check_sentencepiece_model(std::string_view file, const std::string& path);

}  // namespace grape::io
