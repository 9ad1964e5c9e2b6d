// The fp32 tile math under the CPU attention kernel (csrc/cpu/attention.cpp): 8- and 16-wide
// vectors, a vectorized exp and a register-blocked micro-GEMM.
//
// Vectors are GCC vector extensions, so the code compiles for any target; with the default
// build flags (-mavx2 -mfma) an f32x8 is one ymm register and fma8 one vfmadd. There is no
// -ffast-math, so every reduction here is written as lanes of independent sums.
//
// gemm_tile: C (rows, cols) = or += A (rows, kdim) · B (kdim, cols), cols a multiple of 8,
// B row-major, A read through a row and a column stride (so A or its transpose, with no copy).
// It runs a micro-kernel over kRows × (kPanel vectors) blocks of C held in accumulator
// registers: per k, kPanel B vectors and kRows broadcasts of A feed kPanel · kRows FMAs.
// AVX2: 6 × 16 blocks (12 of the 16 ymm registers). AVX-512 (built when the building CPU has
// it, setup.py): 6 × 64 blocks of zmm (24 of 32 registers), four times the flops per k, and
// the softmax's exp runs 16 lanes per instruction. The accumulators start at zero and are
// added to C at the end, so C += A·B sums each tile on its own first (blocked summation: the
// rounding of a long running sum stays at GEMM level).
#pragma once

#include <cstdint>
#include <cstring>

#include "numeric.h"

namespace fusedformer {
namespace {  // private to the one file that includes it: direct calls, no PLT

constexpr int64_t kLanes = 8;

inline int64_t round_up_lanes(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// The micro-kernel's blocking per vector type (numeric.h's Lanes8 / Lanes16): kRows rows of A by
// kPanel vectors of B per block of C.
template <typename L>
struct Blocking;
template <>
struct Blocking<Lanes8> {
  static constexpr int kPanel = 2;  // 12 accumulators + 2 B vectors + a broadcast of 16 ymm
  static constexpr int kRows = 6;
};
#if defined(__AVX512F__)
template <>
struct Blocking<Lanes16> {
  // 24 accumulators + 4 B vectors + a broadcast of 32 zmm: 10 loads per 24 FMAs (an 8 × 2
  // block needs 10 per 16). In L1 on the dev machine: 224 vs 209 GFLOP/s per core.
  static constexpr int kPanel = 4;
  static constexpr int kRows = 6;
};
#endif

// n rounded up to whole Wide vectors: the softmax steps run over the query columns in those.
inline int64_t round_up_wide(int64_t n) { return (n + Wide::kWidth - 1) / Wide::kWidth * Wide::kWidth; }

// For r < R, j < L::kWidth · NV, with A(r, k) = a[r · ars + k · aks] and AB = Σ_k A(r, k) B[k][j]:
// C[r][j] = alpha · AB, or (kAccumulate) C[r][j] = c_scale[r] · C[r][j] + AB, in one fma
// (c_scale null: 1, a plain C += AB).
template <typename L, int R, int NV, bool kAccumulate>
inline void micro_gemm(int64_t kdim, const float* a, int64_t ars, int64_t aks, const float* b,
                       int64_t ldb, float* c, int64_t ldc, float alpha, const float* c_scale) {
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
  for (int r = 0; r < R; ++r) {
    const V cs = L::splat(kAccumulate && c_scale ? c_scale[r] : 1.f);
    for (int v = 0; v < NV; ++v) {
      float* cv = c + r * ldc + v * L::kWidth;
      L::store(cv, kAccumulate ? L::fma(L::load(cv), cs, acc[r][v]) : acc[r][v] * alpha);
    }
  }
}

// One column panel (L::kWidth · NV wide) of C, kRows rows at a time, then the remaining rows.
template <typename L, int NV, bool kAccumulate>
void gemm_panel(int64_t rows, int64_t kdim, const float* a, int64_t ars, int64_t aks,
                const float* b, int64_t ldb, float* c, int64_t ldc, float alpha, const float* c_scale) {
  constexpr int kRows = Blocking<L>::kRows;
  static_assert(kRows <= 6, "the remainder switch below covers 1 to 5 rows");
  int64_t r = 0;
  for (; r + kRows <= rows; r += kRows)
    micro_gemm<L, kRows, NV, kAccumulate>(kdim, a + r * ars, ars, aks, b, ldb, c + r * ldc, ldc, alpha,
                                          c_scale ? c_scale + r : nullptr);
  const float* ar = a + r * ars;
  float* cr = c + r * ldc;
  const float* sr = c_scale ? c_scale + r : nullptr;
  switch (rows - r) {
    case 1: micro_gemm<L, 1, NV, kAccumulate>(kdim, ar, ars, aks, b, ldb, cr, ldc, alpha, sr); break;
    case 2: micro_gemm<L, 2, NV, kAccumulate>(kdim, ar, ars, aks, b, ldb, cr, ldc, alpha, sr); break;
    case 3: micro_gemm<L, 3, NV, kAccumulate>(kdim, ar, ars, aks, b, ldb, cr, ldc, alpha, sr); break;
    case 4: micro_gemm<L, 4, NV, kAccumulate>(kdim, ar, ars, aks, b, ldb, cr, ldc, alpha, sr); break;
    case 5: micro_gemm<L, 5, NV, kAccumulate>(kdim, ar, ars, aks, b, ldb, cr, ldc, alpha, sr); break;
    default: break;
  }
}

// C (rows, cols) = alpha · A·B, or when kAccumulate (alpha unused) C = c_scale[row] · C + A·B
// (C += A·B without c_scale). cols % 8 == 0. Panels of kPanel vectors, then halves of that,
// then one 8-wide vector: 64 + 32 + 16 + 8 columns with AVX-512, 16 + 8 with AVX2.
template <bool kAccumulate>
void gemm_tile(int64_t rows, int64_t cols, int64_t kdim, const float* a, int64_t ars, int64_t aks,
               const float* b, int64_t ldb, float* c, int64_t ldc, float alpha = 1.f,
               const float* c_scale = nullptr) {
  int64_t j = 0;
  const auto panels = [&]<int NV>() {
    if constexpr (NV >= 1)
      for (; j + NV * Wide::kWidth <= cols; j += NV * Wide::kWidth)
        gemm_panel<Wide, NV, kAccumulate>(rows, kdim, a, ars, aks, b + j, ldb, c + j, ldc, alpha, c_scale);
  };
  panels.template operator()<Blocking<Wide>::kPanel>();
  panels.template operator()<Blocking<Wide>::kPanel / 2>();
  panels.template operator()<Blocking<Wide>::kPanel / 4>();
  if (j < cols)
    gemm_panel<Lanes8, 1, kAccumulate>(rows, kdim, a, ars, aks, b + j, ldb, c + j, ldc, alpha, c_scale);
}

}  // namespace
}  // namespace fusedformer
