// Internal: float32 data in .npy and .safetensors files is little-endian.
#pragma once

#include <bit>
#include <cstddef>
#include <utility>

namespace grape::io::detail {

// The file holds little-endian floats; on a big-endian host each 4-byte group is reversed.
inline void to_or_from_little_endian(char* data, std::size_t nbytes) {
  if constexpr (std::endian::native == std::endian::big) {
    for (std::size_t i = 0; i + 4 <= nbytes; i += 4) {
      std::swap(data[i], data[i + 3]);
      std::swap(data[i + 1], data[i + 2]);
    }
  } else {
    (void)data;
    (void)nbytes;
  }
}

}  // namespace grape::io::detail
