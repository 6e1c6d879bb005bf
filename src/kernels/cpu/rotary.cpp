// Rotation of coordinate pairs on the CPU, fp32 (the contract is in rotary.hpp).
//
// Memory-bound: per pair it reads a, b, c, s and writes a', b' with 6 flops. Rows are split into blocks of
// kBlockRows for OpenMP; a block finds the c/s offset of its first row by division and then steps a cursor
// over the leading dims, so the inner loops are plain contiguous loops over the pairs (the interleaved ones
// with stride-2 loads), which GCC vectorises at -O3 (check: -fopt-info-vec-optimized).
#include "kernels/cpu/rotary.hpp"

#include <omp.h>

#include <algorithm>
#include <cstring>

namespace grape::kernels::cpu {
namespace {

constexpr int64_t kBlockRows = 64;          // rows per OpenMP iteration
constexpr int64_t kMinPerThread = 1 << 15;  // floats of x per thread: below this, waking a thread costs more

int threads_for(int64_t floats) {
  return int(std::clamp<int64_t>(floats / kMinPerThread, 1, omp_get_max_threads()));
}

// The offset of the c/s row for a row of x, stepped row by row through the leading dims (odometer order).
struct RowCursor {
  const RotaryRows& r;
  int64_t idx[kRotaryMaxDims] = {};
  int64_t off = 0;
  RowCursor(const RotaryRows& rows, int64_t row) : r(rows) {
    for (int k = r.dims - 1; k >= 0; --k) {
      idx[k] = row % r.sizes[k];
      row /= r.sizes[k];
      off += idx[k] * r.strides[k];
    }
  }
  void next() {
    for (int k = r.dims - 1; k >= 0; --k) {
      off += r.strides[k];
      if (++idx[k] < r.sizes[k]) return;
      off -= r.strides[k] * r.sizes[k];
      idx[k] = 0;
    }
  }
};

// fn(row, cs_offset) for every row, in parallel when the tensor is big enough to pay for the threads.
template <class RowFn>
void for_rows(const RotaryRows& r, int64_t floats_per_row, RowFn fn) {
  const int64_t N = r.rows();
  const int64_t blocks = (N + kBlockRows - 1) / kBlockRows;
  const int nt = threads_for(N * floats_per_row);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t r0 = blk * kBlockRows, r1 = std::min(N, r0 + kBlockRows);
    RowCursor cur(r, r0);
    for (int64_t row = r0; row < r1; ++row, cur.next()) fn(row, cur.off);
  }
}

// One row: pairs (i, i + P) or (2i, 2i + 1). kInverse turns by -angle (s negated).
template <bool kInverse>
void turn_half(const float* __restrict x, const float* __restrict c, const float* __restrict s,
               float* __restrict y, int64_t P) {
  for (int64_t i = 0; i < P; ++i) {
    const float a = x[i], b = x[i + P], cc = c[i], ss = kInverse ? -s[i] : s[i];
    y[i] = a * cc - b * ss;
    y[i + P] = a * ss + b * cc;
  }
}

template <bool kInverse>
void turn_interleaved(const float* __restrict x, const float* __restrict c, const float* __restrict s,
                      float* __restrict y, int64_t P) {
  for (int64_t i = 0; i < P; ++i) {
    const float a = x[2 * i], b = x[2 * i + 1], cc = c[i], ss = kInverse ? -s[i] : s[i];
    y[2 * i] = a * cc - b * ss;
    y[2 * i + 1] = a * ss + b * cc;
  }
}

template <bool kInverse>
void forward_impl(const RotaryRows& r, const float* x, const float* c, const float* s, float* y) {
  const int64_t D = r.D, P = r.P;
  const bool half = r.pairing == Pairing::half;
  for_rows(r, 2 * D, [&](int64_t row, int64_t off) {
    const float* xr = x + row * D;
    float* yr = y + row * D;
    if (half)
      turn_half<kInverse>(xr, c + off, s + off, yr, P);
    else
      turn_interleaved<kInverse>(xr, c + off, s + off, yr, P);
    if (D > 2 * P) std::memcpy(yr + 2 * P, xr + 2 * P, sizeof(float) * size_t(D - 2 * P));
  });
}

void grad_half(const float* __restrict x, const float* __restrict dy, float* __restrict dc,
               float* __restrict ds, int64_t P) {
  for (int64_t i = 0; i < P; ++i) {
    const float a = x[i], b = x[i + P], da = dy[i], db = dy[i + P];
    dc[i] = da * a + db * b;
    ds[i] = db * a - da * b;
  }
}

void grad_interleaved(const float* __restrict x, const float* __restrict dy, float* __restrict dc,
                      float* __restrict ds, int64_t P) {
  for (int64_t i = 0; i < P; ++i) {
    const float a = x[2 * i], b = x[2 * i + 1], da = dy[2 * i], db = dy[2 * i + 1];
    dc[i] = da * a + db * b;
    ds[i] = db * a - da * b;
  }
}

}  // namespace

int64_t RotaryRows::rows() const {
  int64_t n = 1;
  for (int k = 0; k < dims; ++k) n *= sizes[k];
  return n;
}

void rotary_forward(const RotaryRows& r, const float* x, const float* c, const float* s, bool inverse,
                    float* y) {
  if (inverse)
    forward_impl<true>(r, x, c, s, y);
  else
    forward_impl<false>(r, x, c, s, y);
}

void rotary_angle_grad(const RotaryRows& r, const float* x, const float* dy, float* dc, float* ds) {
  const int64_t D = r.D, P = r.P;
  const bool half = r.pairing == Pairing::half;
  for_rows(r, 2 * D + 2 * P, [&](int64_t row, int64_t) {
    if (half)
      grad_half(x + row * D, dy + row * D, dc + row * P, ds + row * P, P);
    else
      grad_interleaved(x + row * D, dy + row * D, dc + row * P, ds + row * P, P);
  });
}

}  // namespace grape::kernels::cpu
