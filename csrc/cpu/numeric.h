// Storage types for the torch-free C++ kernels: 16-bit floats with fp32 conversion.
//
// The CPU kernels load every element in its storage dtype, compute in fp32 and store back
// (the same contract as the CUDA and Triton kernels). These types are bit-compatible with
// at::BFloat16 / at::Half, so bindings.cpp hands us their data pointers reinterpreted.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) || defined(__FMA__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include "../common.h"

namespace fusedformer {

struct bf16 {
  uint16_t bits;
};
struct fp16 {
  uint16_t bits;
};

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float to_float(float x) { return x; }
inline float to_float(bf16 x) { return bits_to_float(uint32_t(x.bits) << 16); }
inline float to_float(fp16 x) {
  const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16;
  const uint32_t exp = (x.bits >> 10) & 0x1fu;
  uint32_t mant = x.bits & 0x3ffu;
  if (exp == 0x1fu) return bits_to_float(sign | 0x7f800000u | (mant << 13));  // inf / nan
  if (exp != 0) return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
  if (mant == 0) return bits_to_float(sign);  // +-0
  int e = -1;  // subnormal: normalise the mantissa
  do {
    ++e;
    mant <<= 1;
  } while ((mant & 0x400u) == 0);
  return bits_to_float(sign | uint32_t(112 - e) << 23 | ((mant & 0x3ffu) << 13));
}

template <typename T>
inline T from_float(float f);

template <>
inline float from_float<float>(float f) {
  return f;
}

// Round to nearest even, NaN stays NaN.
template <>
inline bf16 from_float<bf16>(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{uint16_t((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{uint16_t(u >> 16)};
}

// Round to nearest even with overflow to inf and gradual underflow (IEEE binary16).
template <>
inline fp16 from_float<fp16>(float f) {
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return fp16{uint16_t(sign | 0x7e00u)};  // nan
  if (abs >= 0x477ff000u) return fp16{uint16_t(sign | 0x7c00u)};  // overflow (>= 65520) -> inf
  if (abs < 0x38800000u) {  // below the smallest normal half (2^-14): subnormal or zero
    // Scale into the subnormal grid (2^-24 per step) and let fp32 rounding do round-to-even.
    const float scaled = bits_to_float(abs) + 0.5f;  // 0.5 = 2^-1: aligns 2^-24 to the fp32 ulp
    return fp16{uint16_t(sign | (float_to_bits(scaled) - 0x3f000000u))};
  }
  uint32_t mant_odd = (abs >> 13) & 1u;
  uint32_t v = abs + 0xc8000fffu + mant_odd;  // rebias exponent (-112 << 23) and round
  return fp16{uint16_t(sign | (v >> 13))};
}

// ---- 8-wide fp32 vectors ------------------------------------------------------------------
//
// The row kernels (LayerNorm, softmax, the FFN epilogues) are memory-bound only once their
// inner loops run 8 lanes at a time; without -ffast-math GCC will not vectorize a float
// reduction or a libm call on its own. f32x8 is a GCC/Clang vector extension: one AVX2
// register in the default build (-mavx2 -mfma -mf16c), two SSE registers in a baseline build.
// Reductions keep 8 lane partials and add them in one fixed order (hsum8), so a row's result
// does not depend on the thread count.

// A baseline (non-AVX) build passes 32-byte vectors in memory, and GCC warns of the ABI change
// (-Wpsabi) on every function and lambda taking one, in the kernels too: all of them are built
// with the same flags, so the warning is silenced for every file that includes this header.
#pragma GCC diagnostic ignored "-Wpsabi"

typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));

inline f32x8 splat8(float s) { return f32x8{s, s, s, s, s, s, s, s}; }  // not {} + s: an add
inline f32x8 max8(f32x8 a, f32x8 b) { return a > b ? a : b; }
inline f32x8 fma8(f32x8 a, f32x8 b, f32x8 c) {  // a * b + c
#ifdef __FMA__
  return _mm256_fmadd_ps(a, b, c);
#else
  return a * b + c;
#endif
}

#if defined(__AVX512F__)
// 16 lanes (one zmm), for the attention kernel's tiles when built with AVX-512.
typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
inline f32x16 fma16(f32x16 a, f32x16 b, f32x16 c) { return _mm512_fmadd_ps(a, b, c); }
inline f32x16 fmav(f32x16 a, f32x16 b, f32x16 c) { return fma16(a, b, c); }
#endif
inline f32x8 fmav(f32x8 a, f32x8 b, f32x8 c) { return fma8(a, b, c); }

// Fixed-order horizontal reductions: ((0+4) + (2+6)) + ((1+5) + (3+7)).
inline float hsum8(f32x8 v) {
  const float a = (v[0] + v[4]) + (v[2] + v[6]), b = (v[1] + v[5]) + (v[3] + v[7]);
  return a + b;
}
inline float hmax8(f32x8 v) {
  float m = v[0];
  for (int i = 1; i < 8; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// v with lanes >= k replaced by fill (k in [0, 8]): masks the tail of a row.
inline f32x8 first8(f32x8 v, int k, float fill = 0.f) {
  if (k >= 8) return v;
  const i32x8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
  return lane < k ? v : splat8(fill);
}

// Storage <-> fp32x8. bf16 -> fp32 is a shift; fp32 -> bf16 rounds to nearest even, NaN stays
// NaN (as from_float<bf16>). fp16 uses F16C when built with it, else the scalar conversions.
inline f32x8 bf16x8_to_f32(u16x8 b) {
#ifdef __AVX2__
  // One vpmovzxwd (a load operand); GCC 12 splits the generic widen below into five ops.
  return (f32x8)_mm256_slli_epi32(_mm256_cvtepu16_epi32((__m128i)b), 16);
#else
  return (f32x8)(__builtin_convertvector(b, u32x8) << 16);
#endif
}
inline f32x8 round_bf16x8(f32x8 v) {  // v rounded to bf16 precision, still fp32
  const u32x8 u = (u32x8)v;
  const i32x8 is_nan = (i32x8)(u & 0x7fffffffu) > 0x7f800000;
  const u32x8 r = is_nan ? (u | 0x400000u) : (u + 0x7fffu + ((u >> 16) & 1u));
  return (f32x8)(r & 0xffff0000u);
}
inline u16x8 f32_to_bf16x8(f32x8 v) {
  return __builtin_convertvector((u32x8)round_bf16x8(v) >> 16, u16x8);
}
inline f32x8 fp16x8_to_f32(u16x8 b) {
#ifdef __F16C__
  return _mm256_cvtph_ps((__m128i)b);
#else
  f32x8 v;
  for (int i = 0; i < 8; ++i) v[i] = to_float(fp16{b[i]});
  return v;
#endif
}
inline u16x8 f32_to_fp16x8(f32x8 v) {
#ifdef __F16C__
  return (u16x8)_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
#else
  u16x8 b;
  for (int i = 0; i < 8; ++i) b[i] = from_float<fp16>(v[i]).bits;
  return b;
#endif
}

inline f32x8 load8(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline f32x8 load8(const bf16* p) {
  u16x8 b;
  std::memcpy(&b, p, sizeof(b));
  return bf16x8_to_f32(b);
}
inline f32x8 load8(const fp16* p) {
  u16x8 b;
  std::memcpy(&b, p, sizeof(b));
  return fp16x8_to_f32(b);
}
inline void store8(float* p, f32x8 v) { std::memcpy(p, &v, sizeof(v)); }
inline void store8(bf16* p, f32x8 v) {
  const u16x8 b = f32_to_bf16x8(v);
  std::memcpy(p, &b, sizeof(b));
}
inline void store8(fp16* p, f32x8 v) {
  const u16x8 b = f32_to_fp16x8(v);
  std::memcpy(p, &b, sizeof(b));
}

// The first k (<= 8) elements: a row's tail. Lanes >= k load as 0 and are not stored.
template <typename T>
inline f32x8 load8(const T* p, int k) {
  if (k >= 8) return load8(p);
  T tmp[8] = {};
  std::memcpy(tmp, p, sizeof(T) * k);
  return load8(tmp);
}
template <typename T>
inline void store8(T* p, f32x8 v, int k) {
  if (k >= 8) return store8(p, v);
  T tmp[8];
  store8(tmp, v);
  std::memcpy(p, tmp, sizeof(T) * k);
}

// v rounded to T's precision, still fp32 (what storing v as T and loading it back gives).
// After inlining, a store8 of the same v shares the rounding.
template <typename T>
inline f32x8 round8(f32x8 v);
template <>
inline f32x8 round8<float>(f32x8 v) {
  return v;
}
template <>
inline f32x8 round8<bf16>(f32x8 v) {
  return round_bf16x8(v);
}
template <>
inline f32x8 round8<fp16>(f32x8 v) {
  return fp16x8_to_f32(f32_to_fp16x8(v));
}

// n values of T as fp32: a view of p itself when T is float, else a converted copy in buf.
template <typename T>
inline const float* as_f32(const T* p, int64_t n, std::vector<float>& buf) {
  if (p == nullptr) return nullptr;
  if constexpr (std::is_same_v<T, float>) return p;
  buf.resize(size_t(n));
  for (int64_t j = 0; j < n; ++j) buf[j] = to_float(p[j]);
  return buf.data();
}

// Runs body(j, k) over [0, n) in blocks of 8: k = 8 for every full block, then k = n % 8 for
// the tail if any. body is inlined at both calls, so the full blocks see a constant k.
template <typename F>
inline void for_blocks8(int64_t n, F&& body) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) body(j, 8);
  if (j < n) body(j, int(n - j));
}

// ---- vectorized fp32 math --------------------------------------------------------------
// Max errors vs fp64, measured on a 1.3e-5 grid over [-10, 10] (exp8: its whole range):
//   exp8: 1 ulp (relative 1.2e-7)   erf8: 5.7e-7 absolute   tanh8: 8.9e-8 absolute
//   GELU via erf8 4.6e-7, torch CPU 3.7e-7;  GELU-tanh via tanh8 5.2e-7, torch CPU 4.3e-7;
//   sigmoid via exp8 8.9e-8, torch CPU 8.9e-8.

// exp(x) = 2^n · exp(r), n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2] (ln 2 split in
// two so r is exact), exp(r) by Cephes' degree-7 polynomial. 2^n is built in the exponent
// field in two halves, so the whole normal range is exact; results below the smallest normal
// (x < -87.34) flush to 0 and x > 88.72 gives inf; NaN stays NaN. Lanes out of range compute
// exp(0) and are replaced at the end: clamping them to lo made p · 2^n land just under FLT_MIN,
// and a multiply that produces a denormal takes a ~100-cycle microcode assist on Intel (a
// softmax with 10% of its keys masked, every -inf lane one assist, ran 5x slower).
// Constants are written VF{} + c: both operands are constants, so that folds to a broadcast
// constant (no add at run time).
inline f32x8 exp8(f32x8 x) {
  using VF = f32x8;
  using VI = i32x8;
  const float lo = -87.33654475f, hi = 88.72283905f;
  const VF xc = x < lo || x > hi ? VF{} : x;  // NaN passes through
  const VF magic = VF{} + 12582912.f;  // 1.5 · 2^23: adding it rounds to an integer
  const VF t = fmav(xc, VF{} + 1.44269504088896341f, magic);
  const VF n = t - magic;
  VF r = fmav(n, VF{} - 0.693359375f, xc);
  r = fmav(n, VF{} + 2.12194440e-4f, r);
  VF p = VF{} + 1.9875691500e-4f;
  p = fmav(p, r, VF{} + 1.3981999507e-3f);
  p = fmav(p, r, VF{} + 8.3334519073e-3f);
  p = fmav(p, r, VF{} + 4.1665795894e-2f);
  p = fmav(p, r, VF{} + 1.6666665459e-1f);
  p = fmav(p, r, VF{} + 5.0000001201e-1f);
  p = fmav(p, r * r, r + 1.f);
  const VI ni = (VI)t - (VI)magic;  // n as an integer, in [-126, 128]
  const VI n1 = ni >> 1, n2 = ni - n1;
  const VF s1 = (VF)((n1 + 127) << 23), s2 = (VF)((n2 + 127) << 23);
  const VF e = p * s1 * s2;
  return x < lo ? VF{} : (x > hi ? VF{} + __builtin_inff() : e);
}
#if defined(__AVX512F__)
// The AVX-512 exp: the same reduction and polynomial, with n rounded by vrndscaleps and 2^n
// applied by vscalefps, which covers the whole range in one instruction (p · 2^128 for x near
// ln FLT_MAX included, and +inf past it); lanes below lo become 0 at the end. Same 1.24 ulp
// worst case as exp8 on the grid above, and 1.5x its throughput (2.9 vs 4.5 ns per 16
// lanes, dev machine).
inline f32x16 exp16(f32x16 x) {
  const __m512 lo = _mm512_set1_ps(-87.33654475f), hi = _mm512_set1_ps(89.f);
  const __mmask16 below = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  // Lanes below lo compute exp(0) (not exp(lo): p · 2^-126 with p just under 1 is a denormal,
  // one microcode assist per masked score); NaN passes min as its second operand.
  const __m512 xc = _mm512_min_ps(hi, _mm512_mask_mov_ps(x, below, _mm512_setzero_ps()));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693359375f), xc);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  const __m512 e = _mm512_scalef_ps(p, n);
  return _mm512_mask_mov_ps(e, below, _mm512_setzero_ps());
}

// 2^x for x <= 0: a softmax's probability from its score minus the row max, in base-2 units
// (the scale and log2 e ride in the fma that forms x), which needs none of exp16's range
// handling. n = round(x), r = x - n in [-1/2, 1/2] (exact), 2^r by a degree-6 polynomial with
// its constant term 1 (fitted for least maximum relative error; 8.4e-8 in fp32 with FMA, under
// one ulp), 2^n by vscalefps. x below -125 (2^x < 2.4e-38 against the row max's 1) and -inf
// (a masked key) give 0, so no result is a denormal; NaN stays NaN. 12 instructions against
// exp16's 17 plus the fma before it.
inline f32x16 exp2_nonpositive16(f32x16 x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-125.f), _CMP_NLT_UQ);
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.5353324125e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3398859883e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(9.6184369177e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.5503323674e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(2.4022647738e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(6.9314718246e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_maskz_scalef_ps(live, p, n);
}
#endif

// erf(x) = sign(x) (1 - t P(t) exp(-x²)), t = 1 / (1 + 0.3275911 |x|): Abramowitz & Stegun
// 7.1.26 (1.5e-7 in exact arithmetic), the approximation ATen's own vectorized erf uses, so
// GELU's error matches torch's CPU one. exp_neg_x2 = exp(-x²) is passed in: GELU's backward
// reuses it. VF: f32x8 or f32x16.
// 1 / x for erf's t: a division on 8 lanes; on 16, vrcp14ps (14 bits) and one Newton step,
// r + r (1 - x r), within an ulp of the quotient (a 16-lane vdivps issues once per ~10 cycles
// on Intel, and was GELU's slowest instruction).
inline f32x8 recip_lanes(f32x8 x) { return 1.f / x; }
#if defined(__AVX512F__)
inline f32x16 recip_lanes(f32x16 x) {
  const __m512 r = _mm512_rcp14_ps(x);
  return _mm512_fmadd_ps(r, _mm512_fnmadd_ps(x, r, _mm512_set1_ps(1.f)), r);
}
#endif

template <typename VF>
inline VF erf_lanes(VF x, VF exp_neg_x2) {
  const VF ax = x < 0.f ? -x : x;
  const VF t = recip_lanes(fmav(VF{} + 0.3275911f, ax, VF{} + 1.f));
  VF q = VF{} + 1.061405429f;
  q = fmav(q, t, VF{} - 1.453152027f);
  q = fmav(q, t, VF{} + 1.421413741f);
  q = fmav(q, t, VF{} - 0.284496736f);
  q = fmav(q, t, VF{} + 0.254829592f);
  const VF e = 1.f - q * t * exp_neg_x2;
  return x < 0.f ? -e : e;
}
inline f32x8 erf8(f32x8 x, f32x8 exp_neg_x2) { return erf_lanes(x, exp_neg_x2); }

// tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2 |x|) in (0, 1]: no overflow; the error is
// absolute (ulps of 1), all that GELU's 1 + tanh needs. exp: exp8 or exp16.
template <typename VF, typename Exp>
inline VF tanh_lanes(VF x, Exp exp) {
  const VF ax = x < 0.f ? -x : x;
  const VF e = exp(-2.f * ax);
  const VF t = (1.f - e) / (1.f + e);
  return x < 0.f ? -t : t;
}
inline f32x8 tanh8(f32x8 x) { return tanh_lanes(x, exp8); }

// ---- one vector of floats, as a type: the kernels' loops are written once over L ---------
// L::V the vector, L::kWidth its lanes; load/store of any storage type T with a tail of k
// lanes (lanes >= k load as 0 and are not stored); round<T> as round8; splat, fma, max, exp,
// erf, tanh. Lanes8 is one ymm (AVX2); Lanes16 one zmm, built with AVX-512 (setup.py adds
// -mavx512f on a CPU that has it), where every instruction does twice the work.
struct Lanes8 {
  using V = f32x8;
  static constexpr int kWidth = 8;
  static V load(const float* p) { return load8(p); }
  static void store(float* p, V v) { store8(p, v); }
  template <typename T>
  static V load(const T* p, int k) { return load8(p, k); }
  template <typename T>
  static void store(T* p, V v, int k) { store8(p, v, k); }
  template <typename T>
  static V round(V v) { return round8<T>(v); }
  static V splat(float s) { return splat8(s); }
  static V fma(V a, V b, V c) { return fma8(a, b, c); }
  static V max(V a, V b) { return max8(a, b); }
  static V exp(V x) { return exp8(x); }
  static V erf(V x, V exp_neg_x2) { return erf8(x, exp_neg_x2); }
  static V tanh(V x) { return tanh8(x); }
  static V first(V v, int k) { return first8(v, k); }
  static float hsum(V v) { return hsum8(v); }
  static float hmax(V v) { return hmax8(v); }
};

#if defined(__AVX512F__)
struct Lanes16 {
  using V = f32x16;
  static constexpr int kWidth = 16;
  static f32x8 lo(V v) { return __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7); }
  static f32x8 hi(V v) { return __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15); }
  static V load(const float* p) {
    V v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static void store(float* p, V v) { std::memcpy(p, &v, sizeof(v)); }
  // Storage <-> fp32 16 lanes at a time, with the semantics of the 8-wide conversions above:
  // bf16 -> fp32 a shift, fp32 -> bf16 round to nearest even with NaN kept NaN (quieted), fp16
  // by vcvtph2ps / vcvtps2ph. (vcvtneps2bf16 would be one instruction on AVX512_BF16 CPUs, but
  // it flushes denormals, which neither torch's nor the GPU's conversion does.)
  static V from_bits(__m256i b, bf16) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
  }
  static V from_bits(__m256i b, fp16) { return _mm512_cvtph_ps(b); }
  static __m512i rne_bf16(V v) {  // v rounded to bf16, as fp32 bits (the low 16 still set)
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    return _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
  }
  static __m256i to_bits(V v, bf16) { return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rne_bf16(v), 16)); }
  static __m256i to_bits(V v, fp16) { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT); }
  template <typename T>
  static V load(const T* p, int k) {
    if constexpr (std::is_same_v<T, float>) {
      if (k >= 16) return load(p);
      float tmp[16] = {};
      std::memcpy(tmp, p, sizeof(float) * k);
      return load(tmp);
    } else {
      __m256i b = _mm256_setzero_si256();
      std::memcpy(&b, p, sizeof(T) * (k >= 16 ? 16 : k));
      return from_bits(b, T{});
    }
  }
  template <typename T>
  static void store(T* p, V v, int k) {
    if constexpr (std::is_same_v<T, float>) {
      if (k >= 16) return store(p, v);
      std::memcpy(p, &v, sizeof(float) * k);
    } else {
      const __m256i b = to_bits(v, T{});
      std::memcpy(p, &b, sizeof(T) * (k >= 16 ? 16 : k));
    }
  }
  template <typename T>
  static V round(V v) {
    if constexpr (std::is_same_v<T, float>) return v;
    else if constexpr (std::is_same_v<T, bf16>)
      return _mm512_castsi512_ps(_mm512_and_si512(rne_bf16(v), _mm512_set1_epi32(int(0xffff0000u))));
    else return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
  static V splat(float s) { return _mm512_set1_ps(s); }
  static V fma(V a, V b, V c) { return fma16(a, b, c); }
  static V max(V a, V b) { return a > b ? a : b; }
  static V exp(V x) { return exp16(x); }
  static V erf(V x, V exp_neg_x2) { return erf_lanes(x, exp_neg_x2); }
  static V tanh(V x) { return tanh_lanes(x, exp16); }
  static V first(V v, int k) {  // lanes >= k zeroed
    if (k >= 16) return v;
    const i32x16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    return lane < k ? v : V{};
  }
  static float hsum(V v) { return hsum8(lo(v) + hi(v)); }  // a fixed order
  static float hmax(V v) { return _mm512_reduce_max_ps(v); }
};
using Wide = Lanes16;  // the widest vector this build has
#else
using Wide = Lanes8;
#endif

// Runs body(j, k) over [0, n) in blocks of L::kWidth: k = kWidth for every full block, then
// the tail if any (for_blocks8 for any width).
template <typename L, typename F>
inline void for_blocks(int64_t n, F&& body) {
  int64_t j = 0;
  for (; j + L::kWidth <= n; j += L::kWidth) body(j, L::kWidth);
  if (j < n) body(j, int(n - j));
}

// Runs body(j, k, acc) over n columns in blocks of L::kWidth, as for_blocks, where body adds its
// block's terms into acc (kSums vector sums), rotating over four accumulator sets: one running
// vector sum is a chain of dependent adds, 4 cycles each, and that chain, not memory, bounded
// LayerNorm's row passes (fp32 2048 x 4096 forward, 1 thread: 8.0 ms vs torch's 5.5). Returns
// (acc0 + acc1) + (acc2 + acc3) per sum: a fixed order, so the result is deterministic.
template <typename L, int kSums, typename F>
inline std::array<typename L::V, kSums> sum_blocks(int64_t n, F&& body) {
  constexpr int W = L::kWidth;
  std::array<typename L::V, kSums> a0{}, a1{}, a2{}, a3{};
  int64_t j = 0;
  for (; j + 4 * W <= n; j += 4 * W) {
    body(j, W, a0);
    body(j + W, W, a1);
    body(j + 2 * W, W, a2);
    body(j + 3 * W, W, a3);
  }
  for (; j + W <= n; j += W) body(j, W, a0);
  if (j < n) body(j, int(n - j), a1);
  for (int s = 0; s < kSums; ++s) a0[s] = (a0[s] + a1[s]) + (a2[s] + a3[s]);
  return a0;
}
template <int kSums, typename F>
inline std::array<f32x8, kSums> sum_blocks8(int64_t n, F&& body) {
  return sum_blocks<Lanes8, kSums>(n, static_cast<F&&>(body));
}

// Calls f(T{}) with T the storage type of dt: the CPU kernels' one dtype switch.
template <typename F>
inline void dispatch_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32: f(float{}); return;
    case DType::kBFloat16: f(bf16{}); return;
    case DType::kFloat16: f(fp16{}); return;
  }
}

}  // namespace fusedformer
