// Finite check (the contract is in finite.hpp).
//
// A float is NaN or +-inf iff its exponent bits are all ones, i.e. iff its bits without the sign are
// >= 0x7f800000 (the bits of +inf). So the check is a max over (bits & 0x7fffffff), an integer reduction
// that vectorises (torch::isfinite(t).all() instead allocates a bool tensor and reduces it: ~6x slower).
#include "kernels/cpu/finite.hpp"

#include <omp.h>

#include <algorithm>
#include <bit>
#include <cstdint>

namespace grape::kernels::cpu {
namespace {

constexpr int64_t kBlock = 1 << 14;         // floats per OpenMP iteration
constexpr int64_t kMinPerThread = 1 << 16;  // floats per thread: below this, waking a thread costs more
constexpr uint32_t kInfBits = 0x7f800000u;

uint32_t max_magnitude_bits(const float* __restrict x, int64_t n) {
  uint32_t m = 0;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, std::bit_cast<uint32_t>(x[i]) & 0x7fffffffu);
  return m;
}

}  // namespace

bool all_finite(const float* x, int64_t n) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  const int nt = int(std::clamp<int64_t>(n / kMinPerThread, 1, omp_get_max_threads()));
  uint32_t m = 0;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1) reduction(max : m)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t i0 = b * kBlock;
    m = std::max(m, max_magnitude_bits(x + i0, std::min(kBlock, n - i0)));
  }
  return m < kInfBits;
}

}  // namespace grape::kernels::cpu
