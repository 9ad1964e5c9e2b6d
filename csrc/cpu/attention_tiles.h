// The fp32 tile math under the CPU attention kernel (csrc/cpu/attention.cpp): 8-wide vectors,
// a vectorized exp and a register-blocked micro-GEMM.
//
// Vectors are GCC vector extensions, so the code compiles for any target; with the default
// build flags (-mavx2 -mfma) a Vec8 is one ymm register and fma8 one vfmadd. There is no
// -ffast-math, so every reduction here is written as lanes of independent sums.
//
// gemm_tile: C (rows, cols) = or += A (rows, kdim) · B (kdim, cols), cols a multiple of 8,
// B row-major, A read through a row and a column stride (so A or its transpose, with no copy).
// It runs a micro-kernel over kRows × (2 vectors) blocks of C held in accumulator registers:
// per k, two B vectors and kRows broadcasts of A feed 2 · kRows FMAs. AVX2: 6 × 16 blocks
// (12 of the 16 ymm registers). AVX-512 (built when the building CPU has it, setup.py):
// 8 × 32 blocks of zmm (16 of 32 registers), twice the flops per instruction, and the exp
// runs 8 doubles per instruction instead of 4; [2, 4, 1024, 64] fp32 forward on the 2-core
// dev machine: 16.4 ms (AVX2) -> 12.4 ms. The accumulators start at zero and are added to C
// at the end, so C += A·B sums each tile on its own first (blocked summation: the rounding of
// a long running sum stays at GEMM level).
#pragma once

#include <cstdint>
#include <cstring>

#include "numeric.h"

namespace fusedformer {
namespace {  // private to the one file that includes it: direct calls, no PLT

using Vec8 = f32x8;  // numeric.h's 8-wide vector layer: load8, store8, splat8, max8, fma8
constexpr int64_t kLanes = 8;

inline int64_t round_up_lanes(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// The vector of the micro-kernel and of the softmax steps: Lanes8 (one ymm, AVX2) everywhere,
// and Lanes16 (one zmm) when built with AVX-512, which doubles the width of every instruction.
// exp is numeric.h's (1 ulp; exp(-inf) = 0, NaN stays NaN).
struct Lanes8 {
  using V = Vec8;
  static constexpr int64_t kWidth = 8;
  static constexpr int kRows = 6;  // 12 accumulators + 2 B vectors + a broadcast of 16 ymm
  static V load(const float* p) { return load8(p); }
  static void store(float* p, V v) { store8(p, v); }
  static V splat(float s) { return splat8(s); }
  static V fma(V a, V b, V c) { return fma8(a, b, c); }
  static V max(V a, V b) { return max8(a, b); }
  static V exp(V x) { return exp8(x); }
};

#if defined(__AVX512F__)
struct Lanes16 {
  using V = f32x16;
  static constexpr int64_t kWidth = 16;
  static constexpr int kRows = 8;  // 16 accumulators of 32 zmm; 64-row tiles split evenly
  static V load(const float* p) {
    V v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static void store(float* p, V v) { std::memcpy(p, &v, sizeof(v)); }
  static V splat(float s) { return _mm512_set1_ps(s); }
  static V fma(V a, V b, V c) { return fma16(a, b, c); }
  static V max(V a, V b) { return a > b ? a : b; }
  static V exp(V x) { return exp16(x); }
};
using Wide = Lanes16;  // the widest vector this build has
#else
using Wide = Lanes8;
#endif

// n rounded up to whole Wide vectors: the softmax steps run over the query columns in those.
inline int64_t round_up_wide(int64_t n) { return (n + Wide::kWidth - 1) / Wide::kWidth * Wide::kWidth; }

// C[r][j] (+)= alpha · Σ_k A(r, k) B[k][j] for r < R, j < L::kWidth · NV,
// A(r, k) = a[r · ars + k · aks].
template <typename L, int R, int NV, bool kAccumulate>
inline void micro_gemm(int64_t kdim, const float* a, int64_t ars, int64_t aks, const float* b,
                       int64_t ldb, float* c, int64_t ldc, float alpha) {
  using V = typename L::V;
  V acc[R][NV] = {};
  for (int64_t k = 0; k < kdim; ++k) {
    V bk[NV];
    for (int v = 0; v < NV; ++v) bk[v] = L::load(b + k * ldb + v * L::kWidth);
    for (int r = 0; r < R; ++r) {
      const V ark = L::splat(a[r * ars + k * aks]);
      for (int v = 0; v < NV; ++v) acc[r][v] = L::fma(ark, bk[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) {
      float* cv = c + r * ldc + v * L::kWidth;
      L::store(cv, kAccumulate ? L::load(cv) + acc[r][v] : acc[r][v] * alpha);
    }
}

// One column panel (L::kWidth · NV wide) of C, L::kRows rows at a time, then the remaining rows.
template <typename L, int NV, bool kAccumulate>
void gemm_panel(int64_t rows, int64_t kdim, const float* a, int64_t ars, int64_t aks,
                const float* b, int64_t ldb, float* c, int64_t ldc, float alpha) {
  int64_t r = 0;
  for (; r + L::kRows <= rows; r += L::kRows)
    micro_gemm<L, L::kRows, NV, kAccumulate>(kdim, a + r * ars, ars, aks, b, ldb, c + r * ldc, ldc, alpha);
  const float* ar = a + r * ars;
  float* cr = c + r * ldc;
  switch (rows - r) {
    case 1: micro_gemm<L, 1, NV, kAccumulate>(kdim, ar, ars, aks, b, ldb, cr, ldc, alpha); break;
    case 2: micro_gemm<L, 2, NV, kAccumulate>(kdim, ar, ars, aks, b, ldb, cr, ldc, alpha); break;
    case 3: micro_gemm<L, 3, NV, kAccumulate>(kdim, ar, ars, aks, b, ldb, cr, ldc, alpha); break;
    case 4: micro_gemm<L, 4, NV, kAccumulate>(kdim, ar, ars, aks, b, ldb, cr, ldc, alpha); break;
    case 5: micro_gemm<L, 5, NV, kAccumulate>(kdim, ar, ars, aks, b, ldb, cr, ldc, alpha); break;
    case 6: micro_gemm<L, 6, NV, kAccumulate>(kdim, ar, ars, aks, b, ldb, cr, ldc, alpha); break;
    case 7: micro_gemm<L, 7, NV, kAccumulate>(kdim, ar, ars, aks, b, ldb, cr, ldc, alpha); break;
    default: break;
  }
}

// C (rows, cols) = alpha · A·B, or C += A·B when kAccumulate (alpha unused). cols % 8 == 0.
// Panels of two vectors, then one: 32 + 16 + 8 columns with AVX-512, 16 + 8 with AVX2.
template <bool kAccumulate>
void gemm_tile(int64_t rows, int64_t cols, int64_t kdim, const float* a, int64_t ars, int64_t aks,
               const float* b, int64_t ldb, float* c, int64_t ldc, float alpha = 1.f) {
  int64_t j = 0;
  for (; j + 2 * Wide::kWidth <= cols; j += 2 * Wide::kWidth)
    gemm_panel<Wide, 2, kAccumulate>(rows, kdim, a, ars, aks, b + j, ldb, c + j, ldc, alpha);
  if (Wide::kWidth > 8 && j + Wide::kWidth <= cols) {
    gemm_panel<Wide, 1, kAccumulate>(rows, kdim, a, ars, aks, b + j, ldb, c + j, ldc, alpha);
    j += Wide::kWidth;
  }
  if (j < cols) gemm_panel<Lanes8, 1, kAccumulate>(rows, kdim, a, ars, aks, b + j, ldb, c + j, ldc, alpha);
}

}  // namespace
}  // namespace fusedformer
