// The fp32 tile math under the CPU attention kernel (csrc/cpu/attention.cpp): 8-wide vectors,
// a vectorized exp and a register-blocked micro-GEMM.
//
// Vectors are GCC vector extensions, so the code compiles for any target; with the default
// build flags (-mavx2 -mfma) a Vec8 is one ymm register and fma8 one vfmadd. There is no
// -ffast-math, so every reduction here is written as lanes of independent sums.
//
// gemm_tile: C (rows, cols) = or += A (rows, kdim) · B (kdim, cols), cols a multiple of 8,
// B row-major, A read through a row and a column stride (so A or its transpose, with no copy).
// It runs a micro-kernel over kMicroRows × 16 blocks of C held in 12 accumulator registers:
// per k, two B vectors and six broadcasts of A feed 12 FMAs (96 flops / 8 loads), the shape
// that keeps AVX2's two FMA pipes busy. The accumulators start at zero and are added to C at
// the end, so C += A·B sums each tile on its own first (blocked summation: the rounding of
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

typedef double Vec4d __attribute__((vector_size(32)));
typedef uint64_t UVec4d __attribute__((vector_size(32)));
typedef float Vec4 __attribute__((vector_size(16)));

inline Vec4d fma4d(Vec4d a, Vec4d b, Vec4d c) {
#if defined(__FMA__)
  return _mm256_fmadd_pd(a, b, c);
#else
  return a * b + c;
#endif
}

// exp(x) of four floats in double precision: x = n ln2 + r with |r| <= ln2 / 2 (fdlibm's
// two-part ln2, n ln2_hi exact), exp(r) by its Taylor series to r^8 (truncation < 2e-10
// relative, 0.003 float ulp), times 2^n built in the exponent bits, then rounded once to float.
inline Vec4 exp4_in_double(Vec4 xf) {
  const double kLog2e = 1.4426950408889634, kLn2Hi = 6.93147180369123816490e-01,
               kLn2Lo = 1.90821492927058770002e-10;
  const double kRound = 6755399441055744.0;  // 1.5 · 2^52: adding it rounds to an integer in the low bits
  const Vec4d x = __builtin_convertvector(xf, Vec4d);
  const Vec4d t = fma4d(x, Vec4d{kLog2e, kLog2e, kLog2e, kLog2e}, Vec4d{kRound, kRound, kRound, kRound});
  const Vec4d n = t - kRound;  // round(x · log2 e)
  const Vec4d r = fma4d(n, Vec4d{-kLn2Lo, -kLn2Lo, -kLn2Lo, -kLn2Lo}, fma4d(n, Vec4d{-kLn2Hi, -kLn2Hi, -kLn2Hi, -kLn2Hi}, x));
  constexpr double kInvFact[] = {1.0 / 40320, 1.0 / 5040, 1.0 / 720, 1.0 / 120,
                                 1.0 / 24, 1.0 / 6, 0.5, 1.0, 1.0};  // 1/8! .. 1/0!
  Vec4d poly = Vec4d{} + kInvFact[0];  // Σ_k r^k / k! by Horner
  for (int i = 1; i < 9; ++i) poly = fma4d(poly, r, Vec4d{} + kInvFact[i]);
  UVec4d tbits;
  std::memcpy(&tbits, &t, sizeof(t));  // the low bits of t hold n + 2^51
  const UVec4d pow2_bits = (tbits - 0x4338000000000000ull + 1023u) << 52;
  Vec4d pow2;
  std::memcpy(&pow2, &pow2_bits, sizeof(pow2));
  return __builtin_convertvector(poly * pow2, Vec4);
}

// exp(x) per lane, computed in double and rounded once (numeric.h's exp8, 1 ulp, serves the
// row kernels). Measured over every float in
// [-87.33, 0]: max error 0.5 ulp; on uniform x in [-20, 0] 0.024% of results are not the
// nearest float (libm's expf: 0.064%). A float-only Cephes polynomial (1.26 ulp max, 9.5% not
// nearest) was ~10% faster but biased the probabilities enough that the CPU backend's
// EncoderDecoder training curve left test_model's 1e-4 parameter tolerance. Below -87.33, where exp(x)
// leaves the normal floats, it returns 0, so exp(-inf) = 0; NaN stays NaN; arguments above 88
// are clamped (the kernels only pass x <= 0 plus rounding). Lanes below kLo (every masked
// score) compute exp(0), not exp(kLo): a result rounded to just under FLT_MIN is a denormal,
// and producing one costs a microcode assist on Intel (see numeric.h's exp8).
inline Vec8 exp8_nearest(Vec8 x) {
  const float kLo = -87.33654f, kHi = 88.f;  // ln(FLT_MIN); 2^127 still finite
  const Vec8 xc = x < kLo ? Vec8{} : (x > kHi ? splat8(kHi) : x);  // NaN passes through
  Vec4 half[2];
  std::memcpy(half, &xc, sizeof(xc));
  half[0] = exp4_in_double(half[0]);
  half[1] = exp4_in_double(half[1]);
  Vec8 y;
  std::memcpy(&y, half, sizeof(y));
  return x < kLo ? Vec8{} : y;
}

constexpr int kMicroRows = 6;   // rows of C per micro-kernel
constexpr int kMicroCols = 16;  // columns of C per micro-kernel (two vectors)

// C[r][j] (+)= alpha · Σ_k A(r, k) B[k][j] for r < R, j < 8 · NV, A(r, k) = a[r · ars + k · aks].
template <int R, int NV, bool kAccumulate>
inline void micro_gemm(int64_t kdim, const float* a, int64_t ars, int64_t aks, const float* b,
                       int64_t ldb, float* c, int64_t ldc, float alpha) {
  Vec8 acc[R][NV] = {};
  for (int64_t k = 0; k < kdim; ++k) {
    Vec8 bk[NV];
    for (int v = 0; v < NV; ++v) bk[v] = load8(b + k * ldb + v * kLanes);
    for (int r = 0; r < R; ++r) {
      const Vec8 ark = splat8(a[r * ars + k * aks]);
      for (int v = 0; v < NV; ++v) acc[r][v] = fma8(ark, bk[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) {
      float* cv = c + r * ldc + v * kLanes;
      store8(cv, kAccumulate ? load8(cv) + acc[r][v] : acc[r][v] * alpha);
    }
}

// One column panel (8 · NV wide) of C, kMicroRows rows at a time, then the remaining rows.
template <int NV, bool kAccumulate>
void gemm_panel(int64_t rows, int64_t kdim, const float* a, int64_t ars, int64_t aks,
                const float* b, int64_t ldb, float* c, int64_t ldc, float alpha) {
  int64_t r = 0;
  for (; r + kMicroRows <= rows; r += kMicroRows)
    micro_gemm<kMicroRows, NV, kAccumulate>(kdim, a + r * ars, ars, aks, b, ldb, c + r * ldc, ldc, alpha);
  const float* ar = a + r * ars;
  float* cr = c + r * ldc;
  switch (rows - r) {
    case 1: micro_gemm<1, NV, kAccumulate>(kdim, ar, ars, aks, b, ldb, cr, ldc, alpha); break;
    case 2: micro_gemm<2, NV, kAccumulate>(kdim, ar, ars, aks, b, ldb, cr, ldc, alpha); break;
    case 3: micro_gemm<3, NV, kAccumulate>(kdim, ar, ars, aks, b, ldb, cr, ldc, alpha); break;
    case 4: micro_gemm<4, NV, kAccumulate>(kdim, ar, ars, aks, b, ldb, cr, ldc, alpha); break;
    case 5: micro_gemm<5, NV, kAccumulate>(kdim, ar, ars, aks, b, ldb, cr, ldc, alpha); break;
    default: break;
  }
}

// C (rows, cols) = alpha · A·B, or C += A·B when kAccumulate (alpha unused). cols % 8 == 0.
template <bool kAccumulate>
void gemm_tile(int64_t rows, int64_t cols, int64_t kdim, const float* a, int64_t ars, int64_t aks,
               const float* b, int64_t ldb, float* c, int64_t ldc, float alpha = 1.f) {
  int64_t j = 0;
  for (; j + kMicroCols <= cols; j += kMicroCols)
    gemm_panel<2, kAccumulate>(rows, kdim, a, ars, aks, b + j, ldb, c + j, ldc, alpha);
  if (j < cols) gemm_panel<1, kAccumulate>(rows, kdim, a, ars, aks, b + j, ldb, c + j, ldc, alpha);
}

}  // namespace
}  // namespace fusedformer
