// Device helpers shared by the CUDA kernels (torch-free): storage-type conversion, vector
// access types and the one runtime-dtype switch of the entry points.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../common.h"

namespace fusedformer {
namespace cuda_common {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }

// fp32 -> storage type, round to nearest even.
template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }

// VEC elements moved as one (up to 16-byte) access.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

// Calls f(T{}) with T the CUDA storage type of dt.
template <typename F>
inline void dispatch_cuda_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32: f(float{}); return;
    case DType::kBFloat16: f(__nv_bfloat16{}); return;
    case DType::kFloat16: f(__half{}); return;
  }
}

}  // namespace cuda_common
}  // namespace fusedformer
