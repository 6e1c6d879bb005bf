// Internal: float32 data in .npy and .safetensors files is little-endian.
#pragma once

#include <bit>
#include <cstddef>
#include <utility>

namespace grape::io::detail {

// The file holds little-endian floats of `width` bytes; on a big-endian host each group is reversed.
inline void to_or_from_little_endian(char* data, std::size_t nbytes, std::size_t width = 4) {
  if constexpr (std::endian::native == std::endian::big) {
    for (std::size_t i = 0; i + width <= nbytes; i += width)
      for (std::size_t a = i, b = i + width - 1; a < b; ++a, --b) std::swap(data[a], data[b]);
  } else {
    (void)data;
    (void)nbytes;
    (void)width;
  }
}

}  // namespace grape::io::detail
