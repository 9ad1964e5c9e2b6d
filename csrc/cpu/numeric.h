// Storage types for the torch-free C++ kernels: 16-bit floats with fp32 conversion.
//
// The CPU kernels load every element in its storage dtype, compute in fp32 and store back
// (the same contract as the CUDA and Triton kernels). These types are bit-compatible with
// at::BFloat16 / at::Half, so bindings.cpp hands us their data pointers reinterpreted.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

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
