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

typedef double Vec4d __attribute__((vector_size(32)));
typedef uint64_t UVec4d __attribute__((vector_size(32)));
typedef float Vec4 __attribute__((vector_size(16)));

inline Vec4d fmad(Vec4d a, Vec4d b, Vec4d c) {
#if defined(__FMA__)
  return _mm256_fmadd_pd(a, b, c);
#else
  return a * b + c;
#endif
}

#if defined(__AVX512F__)
typedef double Vec8d __attribute__((vector_size(64)));
typedef uint64_t UVec8d __attribute__((vector_size(64)));
inline Vec8d fmad(Vec8d a, Vec8d b, Vec8d c) { return _mm512_fmadd_pd(a, b, c); }
#endif

// exp(x) of the floats xf in double precision (VD: as many doubles, UD: their bits): x = n ln2
// + r with |r| <= ln2 / 2 (fdlibm's two-part ln2, n ln2_hi exact), exp(r) by its Taylor series
// to r^8 (truncation < 2e-10 relative, 0.003 float ulp), times 2^n built in the exponent bits,
// then rounded once to float.
template <typename VD, typename UD, typename VF>
inline VF exp_in_double(VF xf) {
  const double kLog2e = 1.4426950408889634, kLn2Hi = 6.93147180369123816490e-01,
               kLn2Lo = 1.90821492927058770002e-10;
  const double kRound = 6755399441055744.0;  // 1.5 · 2^52: adding it rounds to an integer in the low bits
  const VD x = __builtin_convertvector(xf, VD);
  const VD t = fmad(x, VD{} + kLog2e, VD{} + kRound);  // constant operands: folded, no adds
  const VD n = t - kRound;  // round(x · log2 e)
  const VD r = fmad(n, VD{} - kLn2Lo, fmad(n, VD{} - kLn2Hi, x));
  constexpr double kInvFact[] = {1.0 / 40320, 1.0 / 5040, 1.0 / 720, 1.0 / 120,
                                 1.0 / 24, 1.0 / 6, 0.5, 1.0, 1.0};  // 1/8! .. 1/0!
  VD poly = VD{} + kInvFact[0];  // Σ_k r^k / k! by Horner
  for (int i = 1; i < 9; ++i) poly = fmad(poly, r, VD{} + kInvFact[i]);
  UD tbits;
  std::memcpy(&tbits, &t, sizeof(t));  // the low bits of t hold n + 2^51
  const UD pow2_bits = (tbits - 0x4338000000000000ull + 1023u) << 52;
  VD pow2;
  std::memcpy(&pow2, &pow2_bits, sizeof(pow2));
  return __builtin_convertvector(poly * pow2, VF);
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
#if defined(__AVX512F__)
  const Vec8 y = exp_in_double<Vec8d, UVec8d>(xc);  // one zmm of doubles
#else
  Vec4 half[2];
  std::memcpy(half, &xc, sizeof(xc));
  half[0] = exp_in_double<Vec4d, UVec4d>(half[0]);
  half[1] = exp_in_double<Vec4d, UVec4d>(half[1]);
  Vec8 y;
  std::memcpy(&y, half, sizeof(y));
#endif
  return x < kLo ? Vec8{} : y;
}

// The micro-kernel's vector: Lanes8 (one ymm, AVX2) everywhere, and Lanes16 (one zmm) for
// 16- and 32-column panels when built with AVX-512, which doubles the FMA width.
struct Lanes8 {
  using V = Vec8;
  static constexpr int64_t kWidth = 8;
  static constexpr int kRows = 6;  // 12 accumulators + 2 B vectors + a broadcast of 16 ymm
  static V load(const float* p) { return load8(p); }
  static void store(float* p, V v) { store8(p, v); }
  static V splat(float s) { return splat8(s); }
  static V fma(V a, V b, V c) { return fma8(a, b, c); }
};

#if defined(__AVX512F__)
typedef float Vec16 __attribute__((vector_size(64)));
struct Lanes16 {
  using V = Vec16;
  static constexpr int64_t kWidth = 16;
  static constexpr int kRows = 8;  // 16 accumulators of 32 zmm; 64-row tiles split evenly
  static V load(const float* p) {
    V v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static void store(float* p, V v) { std::memcpy(p, &v, sizeof(v)); }
  static V splat(float s) { return _mm512_set1_ps(s); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }  // -std=c++20: no contraction
};
#endif

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
#if defined(__AVX512F__)
  using Wide = Lanes16;
#else
  using Wide = Lanes8;
#endif
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
