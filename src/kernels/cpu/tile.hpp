// The tiling every fused attention pass shares: tile sizes, the geometry of one problem (which keys a query
// row sees), validation, thread workspaces, packing of strided head rows into zero-padded tiles, and the
// matrix products: one register-blocked micro-kernel for packed tiles, two plain loops for decode's few rows.
// Internal to src/kernels/cpu.
//
// Packed layouts (Dp = D rounded up to kNR):
//   Q, dO:  [kBQ][Dp]  row-major          K^T, V^T: [Dp][kBK]  (so q.k runs over contiguous keys)
//   K, V:   [kBK][Dp]  row-major          S, P, dS: [kBQ][kBK]
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>

#include "kernels/cpu/attention.hpp"
#include "kernels/cpu/simd_math.hpp"

#if defined(__SSE__)
#include <xmmintrin.h>  // the MXCSR flags of FlushSubnormals
#endif

namespace grape::kernels::cpu {

constexpr int64_t kBQ = 64;      // query rows per tile
constexpr int64_t kBK = 64;      // keys per tile (one online-softmax step)
constexpr int64_t kMR = 8;       // micro-kernel rows
constexpr int64_t kNR = kLanes;  // micro-kernel columns: one AVX-512 or two AVX2 registers
constexpr int64_t kAlign = 64;   // bytes: one cache line

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline int64_t ceil_div(int64_t x, int64_t m) { return (x + m - 1) / m; }

// The threads a parallel region opened here would get: omp_get_max_threads(), but 1 inside a team that cannot
// nest (the decoder calls the attention from its own team, where omp_get_max_threads() still says 2).
int usable_threads();
// Threads for a parallel region of n_tasks tasks: no idle team members (they would only spin at the barrier).
int team_size(int64_t n_tasks);

// ---------------------------------------------------------------------------------------------------------
// Geometry and validation
// ---------------------------------------------------------------------------------------------------------

struct Geometry {
  int64_t B, H, Tq, Tk, D, Dp;
  int64_t q_offset, k_offset;
  int64_t delta;  // q_offset - k_offset: query i sees key j iff j <= i + delta
  float scale;

  explicit Geometry(const AttentionShape& s)
      : B(s.B),
        H(s.H),
        Tq(s.Tq),
        Tk(s.Tk),
        D(s.D),
        Dp(round_up(s.D, kNR)),
        q_offset(s.q_offset),
        k_offset(s.k_offset),
        delta(s.q_offset - s.k_offset),
        scale(s.scale) {}

  const float* q_row(const float* x, int64_t b, int64_t h, int64_t i) const {
    return x + ((b * Tq + i) * H + h) * D;
  }
  int64_t q_stat(int64_t b, int64_t h) const { return (b * H + h) * Tq; }  // [B,H,Tq] base of (b,h)
  int64_t k_stat(int64_t b, int64_t h) const { return (b * H + h) * Tk; }  // [B,H,Tk] base of (b,h)
  // Keys [0, key_end(i)) are visible to some query row < i (the causal frontier of rows [.., i)).
  int64_t key_end(int64_t i) const { return std::clamp<int64_t>(i + delta, 0, Tk); }
  // How many keys of the tile starting at key j0 (with nk keys) query row i sees: a prefix of the tile.
  int64_t visible(int64_t i, int64_t j0, int64_t nk) const {
    return std::clamp<int64_t>(i + delta - j0 + 1, 0, nk);
  }
  // Causal tiles skip, per block of kMR rows, what the mask zeroes. Of the tile of `rows` query rows from i0
  // and nk keys from j0: the keys the block of rows from r0 sees (those its last row sees) ...
  int64_t block_visible(int64_t i0, int64_t rows, int64_t r0, int64_t j0, int64_t nk) const {
    return visible(i0 + std::min(r0 + kMR, rows) - 1, j0, nk);
  }
  // f(r0, nv) for every block of kMR rows (r0 < Mp, the rows padded) that sees nv > 0 keys of the tile.
  template <class F>
  void for_visible_blocks(int64_t i0, int64_t rows, int64_t Mp, int64_t j0, int64_t nk, F&& f) const {
    for (int64_t r0 = 0; r0 < Mp; r0 += kMR)
      if (const int64_t nv = block_visible(i0, rows, r0, j0, nk); nv > 0) f(r0, nv);
  }
  // ... and its first row that sees key `key` (rows when none does).
  int64_t first_row_seeing(int64_t i0, int64_t rows, int64_t key) const {
    return std::clamp<int64_t>(key - delta - i0, 0, rows);
  }
};

// Throw std::invalid_argument("grape::kernels::cpu::<fn>: <what>"): fail always, check unless ok.
[[noreturn]] void fail(const char* fn, const std::string& what);
void check(bool ok, const char* fn, const std::string& what);

// The invariants of attention.hpp every entry point shares: sizes, offsets, scale, q, k, v and the bias
// terms.
void validate(const char* fn, const AttentionShape& s, const float* q, const float* k, const float* v,
              const BiasTerms& bias);

// ---------------------------------------------------------------------------------------------------------
// Workspaces
// ---------------------------------------------------------------------------------------------------------

// One cache-line-aligned float buffer, carved into per-thread workspaces before the parallel region (so that
// nothing allocates, or throws, inside it).
struct Arena {
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  std::unique_ptr<float[], Free> mem;
  int64_t per_thread = 0;

  Arena(int64_t threads, int64_t floats);
  float* thread(int t) const { return mem.get() + t * per_thread; }
};

// Hands out cache-line-aligned sub-buffers of one workspace, in order. Without memory it only counts: a
// workspace's layout is one constructor taking a Carver, run once without memory to size the Arena
// (workspace_floats) and then on each thread's memory to carve it.
struct Carver {
  float* base = nullptr;
  int64_t used = 0;  // floats handed out so far, each buffer rounded up to a cache line

  float* take(int64_t n) {
    float* p = base ? base + used : nullptr;
    used += round_up(n, kAlign / int64_t(sizeof(float)));
    return p;
  }
  double* take_doubles(int64_t n) { return reinterpret_cast<double*>(take(2 * n)); }
  const float** take_pointers(int64_t n) {
    return reinterpret_cast<const float**>(take(n * int64_t(sizeof(void*) / sizeof(float))));
  }
};

// Flushes subnormals to zero on this thread (FTZ and DAZ) for the guard's lifetime, then restores the
// caller's mode. Each pass's threads hold one: on x86 every operation with a subnormal input or result costs
// a microcode assist (~100 cycles), and FoX's decayed probabilities, times dO, made them in most backward
// tiles (2.3x slower at B 8, H 6, T 256, D 64). Only values below FLT_MIN in magnitude change, to 0.
struct FlushSubnormals {
#if defined(__SSE__)
  const unsigned saved = _mm_getcsr();
  FlushSubnormals() { _mm_setcsr(saved | 0x8040u); }  // FTZ (bit 15) | DAZ (bit 6)
  ~FlushSubnormals() { _mm_setcsr(saved); }
#else
  FlushSubnormals() {}
#endif
  FlushSubnormals(const FlushSubnormals&) = delete;
  FlushSubnormals& operator=(const FlushSubnormals&) = delete;
};

// Floats of the workspace a Work lays out for these arguments (its constructor run on a counting Carver).
template <class Work, class... Args>
int64_t workspace_floats(const Args&... args) {
  Carver c;
  Work w(c, args...);
  return c.used;
}

// The Work laid out on mem (one thread's share of an Arena sized by workspace_floats).
template <class Work, class... Args>
Work carve(float* mem, const Args&... args) {
  Carver c{mem};
  return Work(c, args...);
}

// ---------------------------------------------------------------------------------------------------------
// Packing: strided head rows -> contiguous zero-padded tiles
// ---------------------------------------------------------------------------------------------------------

// n token rows (D floats each) -> dst[rows][Dp] (row-major), zero past n rows and past D columns.
void pack_rows(const float* const* src_rows, int64_t n, int64_t rows, int64_t D, int64_t Dp, float* dst);

// n token rows transposed -> dst[Dp][cols], zero past n columns and past D rows (Dp >= D; whole blocks of
// 16, or 8 with AVX2, go through register transposes).
void pack_cols(const float* const* src_rows, int64_t n, int64_t cols, int64_t D, int64_t Dp, float* dst);

// Pointers to the n token rows starting at t0 of head (b, h) of a [B,T,H,D] tensor.
void row_pointers(const float* x, int64_t T, int64_t H, int64_t D, int64_t b, int64_t h, int64_t t0,
                  int64_t n, const float** out);

// ---------------------------------------------------------------------------------------------------------
// Matrix products: the one micro-kernel for packed tiles, and decode's few rows read in place
// ---------------------------------------------------------------------------------------------------------

// Defined here, with internal linkage, so that GCC specialises each file's calls for their constant arguments
// (widths, strides, accumulate): one shared out-of-line copy made the forward and backward 3-5% slower.
namespace {

// One MR x (NB kNR) block of C (+)= A B, held in registers across the whole K loop: per k, MR broadcasts of
// A and NB contiguous kNR-wide loads of B feed MR * NB * kNR fused multiply-adds. Always inlined, so that it
// is vectorised with gemm_tile's target options (GRAPE_SIMD). Each C element sums over k in the same order
// whatever the block shape, so the shapes give the same results to the bit.
template <int MR, int NB>
GRAPE_INLINE void gemm_block(int64_t K, const float* a, int64_t ars, int64_t aks, const float* b, int64_t ldb,
                             float* C, int64_t ldc, bool accumulate) {
  constexpr int64_t W = NB * kNR;
  float acc[MR][W];
  for (int64_t r = 0; r < MR; ++r)
    for (int64_t c = 0; c < W; ++c) acc[r][c] = accumulate ? C[r * ldc + c] : 0.0f;
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t r = 0; r < MR; ++r) {
      const float ar = a[r * ars + k * aks];
#pragma omp simd
      for (int64_t c = 0; c < W; ++c) acc[r][c] += ar * b[k * ldb + c];
    }
  }
  for (int64_t r = 0; r < MR; ++r)
    for (int64_t c = 0; c < W; ++c) C[r * ldc + c] = acc[r][c];
}

// C[M x N] (+)= A B for tiles: A(r, k) = A[r * ars + k * aks] (so A may be read transposed), B row-major with
// leading dimension ldb. M % kMR == 0 and N % kNR == 0 (the tiles are padded); K is any length.
// With AVX-512 the blocks are kMR x 2 kNR (16 zmm accumulators: 10 loads per 16 FMAs, so the FMA units
// rather than the load ports set the pace), with a kMR x kNR tail. Otherwise they are kMR / 2 x kNR: 8 ymm
// accumulators, leaving registers for B and the broadcasts (kMR x kNR would take all 16 ymm registers, and
// GCC spilled the broadcasts to the stack: those stores drew half of the tile products' perf samples on a
// Zen 3).
GRAPE_SIMD
[[maybe_unused]] void gemm_tile(int64_t M, int64_t N, int64_t K, const float* A, int64_t ars, int64_t aks,
                                const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
#if defined(__AVX512F__)
  for (int64_t r0 = 0; r0 < M; r0 += kMR) {
    const float* a = A + r0 * ars;
    float* c = C + r0 * ldc;
    int64_t n0 = 0;
    for (; n0 + 2 * kNR <= N; n0 += 2 * kNR)
      gemm_block<kMR, 2>(K, a, ars, aks, B + n0, ldb, c + n0, ldc, accumulate);
    for (; n0 < N; n0 += kNR) gemm_block<kMR, 1>(K, a, ars, aks, B + n0, ldb, c + n0, ldc, accumulate);
  }
#else
  constexpr int64_t kHalf = kMR / 2;
  for (int64_t r0 = 0; r0 < M; r0 += kHalf)
    for (int64_t n0 = 0; n0 < N; n0 += kNR)
      gemm_block<kHalf, 1>(K, A + r0 * ars, ars, aks, B + n0, ldb, C + r0 * ldc + n0, ldc, accumulate);
#endif
}

}  // namespace

// For a few query rows (decode), the products with the key and value rows read in place, each used once per
// row (packing a key tile would cost more than the few products that reuse it):
// S[r][j] = q_r . k_j for the packed rows Q [rows][Dp] and the nk key rows krows (S: [rows][kBK]) ...
void dots_direct(int64_t rows, int64_t nk, int64_t D, int64_t Dp, const float* Q, const float* const* krows,
                 float* S);
// ... and O[r] += sum_j P[r][j] v_j for the nk value rows vrows (P in S, 0 where masked; O: [rows][Dp]).
void pv_direct(int64_t rows, int64_t nk, int64_t D, int64_t Dp, const float* S, const float* const* vrows,
               float* O);

}  // namespace grape::kernels::cpu
