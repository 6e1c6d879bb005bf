// Matrix products with bf16 weights and fp32 accumulation, for the decode engine's optional bf16 weights
// (docs/decode.md): half the bytes of fp32 weights per token. A bf16 value is the top 16 bits of an fp32
// (same exponent range, 8 bits of mantissa), so widening it back is a 16-bit shift.
//
// Two kernels compute y[r, n] = sum_k x[r, k] W[n, k] with W bf16 [N, K] (row-major, as the fp32 weights it
// was rounded from) and x, y fp32, from the same products (fp32 x times the bf16 weight's exact fp32 value)
// summed in fp32; the faster one this CPU runs is picked at run time (whatever -march says):
//   portable  plain C++ (GRAPE_SIMD vectorises it): each weight widened to fp32
//   avx512    AVX-512F/BW: 32 weights per load split into their even and odd halves (a shift and a mask),
//             FMAs against x's even and odd elements
// AVX512_BF16's vdpbf16ps (x rounded to bf16 too) was measured and not kept: no faster at batch 1 on the
// whole model, 0.8x of the avx512 kernel at 16 rows, and it adds x's rounding (docs/decode.md).
#pragma once

#include <bit>
#include <cstdint>

namespace grape::kernels::cpu {

// fp32 -> bf16, rounded to nearest, ties to even (as LibTorch's kBFloat16); a NaN stays a (quiet) NaN, and a
// value past bf16's largest rounds to infinity.
inline uint16_t bf16_round(float f) {
  const uint32_t u = std::bit_cast<uint32_t>(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((u >> 16) | 0x0040u);  // NaN: set the quiet bit
  return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
inline float bf16_to_float(uint16_t b) { return std::bit_cast<float>(uint32_t(b) << 16); }
// out[i] = bf16_round(x[i]) for i < n.
void round_to_bf16(const float* x, int64_t n, uint16_t* out);

enum class Bf16Kernel { portable, avx512, avx2 };
const char* to_string(Bf16Kernel kernel);
bool bf16_kernel_available(Bf16Kernel kernel);  // whether this CPU runs it
Bf16Kernel bf16_kernel_best();                  // the one the decode engine uses on this CPU

// y = x W^T with `kernel` (which must be available), parallel over N (an OpenMP team of its own).
void linear_rows_bf16(Bf16Kernel kernel, const float* x, int64_t R, int64_t K, const uint16_t* W, int64_t N,
                      float* y);
// This thread's share of the same product inside a parallel region (split by weight rows as linear_rows
// splits them; no barrier: the caller places it).
void linear_shared_bf16(Bf16Kernel kernel, const float* x, int64_t R, int64_t K, const uint16_t* W, int64_t N,
                        float* y);

}  // namespace grape::kernels::cpu
