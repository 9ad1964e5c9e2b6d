// Device helpers shared by the CUDA kernels (torch-free): storage-type conversion, vector
// access, warp and block reductions, launch helpers and the one runtime-dtype switch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

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

// VEC elements as one (up to 16-byte) access; the caller guarantees alignment.
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* src, float (&dst)[VEC]) {
  const Vec<T, VEC> t = *reinterpret_cast<const Vec<T, VEC>*>(src);
#pragma unroll
  for (int e = 0; e < VEC; ++e) dst[e] = to_f(t.v[e]);
}
template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* dst, const float (&src)[VEC]) {
  Vec<T, VEC> t;
#pragma unroll
  for (int e = 0; e < VEC; ++e) t.v[e] = from_f<T>(src[e]);
  *reinterpret_cast<Vec<T, VEC>*>(dst) = t;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Block-wide sum (blockDim.x a multiple of 32); `red` holds 32 floats.
__device__ __forceinline__ float block_sum(float v, float* red) {
  v = warp_sum(v);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();  // `red` may still be read from the previous call
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = lane < int(blockDim.x >> 5) ? red[lane] : 0.f;
  return warp_sum(v);
}

// Row kernels (layer_norm.cu, softmax.cu): rows beyond this many blocks are grid-strided.
constexpr int64_t kMaxGrid = 1 << 20;

// Calls f(std::integral_constant<int, CHUNKS>) with the fewest chunks covering `per_lane`
// (at most MAX: what a 1024-column row needs, so no unreachable kernel is instantiated).
template <int MAX, typename F>
void chunks_switch(int64_t per_lane, F&& f) {
  if (per_lane <= 1) return f(std::integral_constant<int, 1>{});
  if (per_lane <= 2) return f(std::integral_constant<int, 2>{});
  if constexpr (MAX > 4) {
    if (per_lane <= 4) return f(std::integral_constant<int, 4>{});
  }
  return f(std::integral_constant<int, MAX>{});
}

// The dynamic shared memory each (kernel, device) has opted in to so far (launch_with_smem).
inline std::mutex opt_in_mutex;
inline std::map<std::pair<const void*, int>, size_t> opt_in_bytes;

// kernel<<<grid, block, smem, stream>>>(args...), opting in to its dynamic shared memory first:
// without the opt-in a launch may use at most 48 KiB minus the kernel's static shared memory,
// so exactly 48 KiB fails for a kernel with a static reduction buffer (LayerNorm's cached row at
// 12288 columns did). The opt-in is a driver call, made once per kernel and device and again
// only for a larger size. An error of either call surfaces through cudaGetLastError, as a
// launch error does.
template <typename... Params, typename... Args>
void launch_with_smem(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                      cudaStream_t stream, Args&&... args) {
  int device = 0;
  if (smem > 0 && cudaGetDevice(&device) == cudaSuccess) {
    const std::pair<const void*, int> key{reinterpret_cast<const void*>(kernel), device};
    const std::lock_guard<std::mutex> lock(opt_in_mutex);
    size_t& done = opt_in_bytes[key];
    if (smem > done &&
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)) == cudaSuccess)
      done = smem;
  }
  kernel<<<grid, block, smem, stream>>>(static_cast<Args&&>(args)...);
}

// Whether `kernel` runs on the current device as sm_90 code: the binary the runtime picks there
// is sm_90a SASS (the build's FUSEDFORMER_CUDA_ARCHS include 90a and the device is an sm_90).
// Hosts launch a kernel's warpgroup-MMA (wgmma) twin only then. Asked once per device.
template <typename Kernel>
bool binary_is_sm90(Kernel kernel) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> known[kMaxDevices];  // 0: not asked yet, 1: no, 2: yes
  auto check = [](cudaError_t err, const char* what) {
    if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
  };
  int device = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  const bool cached = device >= 0 && device < kMaxDevices;
  if (cached) {
    const int k = known[device].load(std::memory_order_relaxed);
    if (k != 0) return k == 2;
  }
  cudaFuncAttributes attr{};
  check(cudaFuncGetAttributes(&attr, kernel), "cudaFuncGetAttributes");
  const bool yes = attr.binaryVersion == 90;
  if (cached) known[device].store(yes ? 2 : 1, std::memory_order_relaxed);
  return yes;
}

// FUSEDFORMER_CUDA_WGMMA=0 keeps every op on its mma.sync kernels on sm_90 too (to compare the
// two, or to step around a wgmma one).
inline bool wgmma_allowed() {
  const char* v = std::getenv("FUSEDFORMER_CUDA_WGMMA");
  return v == nullptr || std::strcmp(v, "0") != 0;
}

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
