// The CUDA language and runtime subset that csrc/cuda/*.cu use, on the CPU, for tests/cuda_emu.
// The stub headers in include/ (cuda_runtime.h, cuda_bf16.h, cuda_fp16.h) include this file,
// so the real kernel sources compile with g++ unchanged, apart from what
// tests/test_cuda_emulated.py rewrites at build time (C++ has no syntax for these):
//   kernel<<<grid, block, smem, stream>>>(args)  ->  ::emu::launch(kernel, grid, block, smem, stream)(args)
//   extern __shared__ T name[];                 ->  T* const name = ::emu::dynamic_shared<T>();
//   __shared__ T name[N];                       ->  static T name[N]; ::emu::static_shared(name);
//
// Faithful:
//   - a launch runs every block of the grid, one after the other, each block's threads as
//     fibers (fibers.h) with real __syncthreads / __syncwarp / __shfl_xor_sync semantics;
//   - the launch checks of the runtime: block size <= 1024, grid limits, dynamic shared memory
//     <= 48 KiB unless opted in with cudaFuncSetAttribute, and at most 163 KiB (sm_80; 227 on
//     the emulated sm_90a device) per block (static + dynamic); a failed launch runs nothing
//     and sets cudaGetLastError;
//   - shared memory is exactly as large as requested and starts as 0xff bytes (NaN in every
//     float type), re-poisoned for each block, so reading what no thread wrote shows up as NaN
//     in the outputs; writes past the dynamic size are caught by a guard zone;
//   - bf16 / fp16 storage and round-to-nearest-even conversions, bit-exact;
//   - cp.async (cp_async.h): per-thread copies that land only at that thread's wait_group,
//     into 16-byte-aligned shared memory, zero-filled for src-size 0;
//   - shared-memory bank conflicts of ldmatrix (mma.h) and cp.async writes (cp_async.h), the
//     accesses the emulator sees a whole warp instruction of; the drivers fail on any;
//   - sm_90a warpgroup MMA (wgmma.h) and the shared-window addresses its descriptors hold: the
//     dynamic buffer starts at window address kDynamicWindowBase, deliberately off the 1024-byte
//     swizzle-pattern boundary, so a kernel must align its swizzled tiles itself;
//   - two devices (cudaSetDevice / cudaGetDevice): 0 runs every kernel as sm_80 code, 1 as
//     sm_90a code (cudaFuncGetAttributes' binaryVersion), which is how a host picks between the
//     sm_80 and sm_90a kernels, and the device's shared memory a block (163 or 227 KiB), and
//     its SM count (cudaDeviceGetAttribute: 108 or 132).
// Not emulated: timing, occupancy, register limits (__launch_bounds__ is ignored), bank
// conflicts of plain shared loads and stores, the fast-math intrinsics' approximation errors
// (__expf, __logf, rsqrtf are the libm functions here), concurrency between blocks (they run
// in sequence), streams.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "fibers.h"

// ---- the language --------------------------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__  // empty: libstdc++ spells __attribute__((__noinline__)), which must survive
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __CUDA_ARCH__ 800  // device branches of shared headers (csrc/philox.h) are the ones tested

struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace emu {
inline uint3 block_idx;
inline dim3 block_dim, grid_dim;
inline uint3 thread_idx() { return {self().tid, 0, 0}; }
}  // namespace emu

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::block_idx)
#define blockDim (::emu::block_dim)
#define gridDim (::emu::grid_dim)

inline void __syncthreads() { emu::block_barrier(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) throw std::logic_error("emu: __syncwarp with a partial mask");
  emu::warp_barrier();
}

// Every lane publishes v, then reads lane ^ lane_mask's value (full warp only, as the kernels use).
template <typename V>
inline V __shfl_xor_sync(unsigned mask, V v, int lane_mask, int width = emu::kWarpSize) {
  static_assert(sizeof(V) <= sizeof(uint64_t), "emu: shuffle of a type over 8 bytes");
  if (mask != 0xffffffffu || width != emu::kWarpSize)
    throw std::logic_error("emu: __shfl_xor_sync with a partial mask or width");
  emu::warp_barrier();
  memcpy(emu::exchange_slots(emu::lane_id()), &v, sizeof(V));
  emu::warp_barrier();
  V out;
  memcpy(&out, emu::exchange_slots(emu::lane_id() ^ (lane_mask & 31)), sizeof(V));
  return out;
}

inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
inline unsigned __umulhi(unsigned a, unsigned b) { return unsigned((uint64_t(a) * b) >> 32); }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }

// ---- 16-bit storage types --------------------------------------------------------------------

struct __nv_bfloat16 {
  uint16_t bits;
};
struct __half {
  uint16_t bits;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;  // x in the low 16 bits, as on the device
};
struct __half2 {
  __half x, y;
};

inline float __bfloat162float(__nv_bfloat16 v) {
  const uint32_t u = uint32_t(v.bits) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {uint16_t((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return {uint16_t(u >> 16)};
}
// fp16 -> fp32 from a table of all 65536 values: exact, and without F16C (the emulator builds
// for any x86-64) GCC converts a _Float16 by a libgcc call, which was 20% of the attention
// driver's run time.
inline float __half2float(__half v) {
  static const std::vector<float> table = [] {
    std::vector<float> t(65536);
    for (uint32_t bits = 0; bits < 65536; ++bits) {
      const uint16_t b = uint16_t(bits);
      _Float16 h;
      memcpy(&h, &b, 2);
      t[bits] = float(h);
    }
    return t;
  }();
  return table[v.bits];
}
inline __half __float2half_rn(float f) {
  const _Float16 h = static_cast<_Float16>(f);  // IEEE round to nearest even
  __half r;
  memcpy(&r.bits, &h, 2);
  return r;
}
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
inline __half2 __floats2half2_rn(float lo, float hi) { return {__float2half_rn(lo), __float2half_rn(hi)}; }

#include "mma.h"
#include "cp_async.h"
#include "wgmma.h"

namespace emu {
template <>
inline float half_to_float<__nv_bfloat16>(uint16_t bits) { return __bfloat162float({bits}); }
template <>
inline float half_to_float<__half>(uint16_t bits) { return __half2float({bits}); }
}  // namespace emu


// ---- the runtime -----------------------------------------------------------------------------

using cudaStream_t = struct emu_stream*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

namespace emu {

constexpr size_t kDefaultSmem = 48 * 1024;  // dynamic shared memory without the opt-in
constexpr size_t kMaxSmemSm80 = 163 * 1024;  // opt-in maximum per block, sm_80
constexpr size_t kMaxSmemSm90 = 227 * 1024;  // and sm_90
constexpr size_t kGuard = 4096;             // poisoned bytes past the dynamic buffer
constexpr uint32_t kDynamicWindowBase = 0x410;  // shared-window address of the dynamic buffer
inline int current_device = 0;              // 0: sm_80, 1: sm_90a (cudaSetDevice)
inline size_t max_smem() { return current_device == 1 ? kMaxSmemSm90 : kMaxSmemSm80; }

inline cudaError_t last_error = cudaSuccess;
inline std::map<const void*, size_t> smem_opt_in;  // kernel -> MaxDynamicSharedMemorySize

// The running block's shared memory: dynamic (kept with its guard zone) and static arrays.
inline std::vector<unsigned char> dyn_smem;
inline size_t dyn_size = 0;
inline uint64_t block_serial = 0;                    // which block poisoned a static array last
inline std::map<const void*, uint64_t> static_seen;  // array -> block_serial
inline std::map<const char*, size_t> static_extent;  // array -> its size in bytes
inline size_t static_bytes = 0;                      // this block's static shared memory

// Whether [p, p + bytes) lies inside the dynamic shared memory or one static __shared__ array
// of the running block (cp_async.h checks its destinations with it).
inline bool in_shared_memory(const void* p, size_t bytes) {
  const char* c = static_cast<const char*>(p);
  const char* dyn = reinterpret_cast<const char*>(dyn_smem.data());
  if (c >= dyn && c + bytes <= dyn + dyn_size) return true;
  auto it = static_extent.upper_bound(c);
  if (it == static_extent.begin()) return false;
  --it;
  return static_seen[it->first] == block_serial && c + bytes <= it->first + it->second;
}

// __cvta_generic_to_shared for the dynamic buffer (the only one wgmma descriptors point into),
// and its inverse, bounds-checked.
inline uint32_t shared_address(const void* p) {
  if (!in_shared_memory(p, 1) || static_cast<const unsigned char*>(p) >= dyn_smem.data() + dyn_size)
    throw std::logic_error("emu: shared-window address of memory outside the dynamic shared buffer");
  return kDynamicWindowBase + uint32_t(static_cast<const unsigned char*>(p) - dyn_smem.data());
}
inline unsigned char* shared_window_pointer(uint32_t address, size_t bytes) {
  if (address < kDynamicWindowBase || address - kDynamicWindowBase + bytes > dyn_size)
    throw std::logic_error("emu: a wgmma operand outside the dynamic shared buffer");
  return dyn_smem.data() + (address - kDynamicWindowBase);
}

inline cudaError_t fail(cudaError_t err, const std::string& why) {
  fprintf(stderr, "emu: launch failed: %s\n", why.c_str());
  last_error = err;
  return err;
}

template <typename T>
inline T* dynamic_shared() {
  return reinterpret_cast<T*>(dyn_smem.data());
}

// First thread of a block to reach a static __shared__ declaration poisons the array.
template <typename A>
inline void static_shared(A& array) {
  uint64_t& seen = static_seen[&array];
  if (seen == block_serial) return;
  seen = block_serial;
  memset(&array, 0xff, sizeof(A));
  static_bytes += sizeof(A);
  static_extent[reinterpret_cast<const char*>(&array)] = sizeof(A);
}

template <typename... Params>
struct Launch {
  void (*kernel)(Params...);
  dim3 grid, threads;
  size_t smem;

  template <typename... Args>
  void operator()(Args&&... args) const {
    if (threads.x * threads.y * threads.z == 0 || threads.x * threads.y * threads.z > 1024 || grid.x == 0 ||
        grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 || grid.x > 0x7fffffffu) {
      fail(cudaErrorInvalidConfiguration, "grid or block out of range");
      return;
    }
    if (threads.y != 1 || threads.z != 1 || threads.x % kWarpSize != 0)
      throw std::logic_error("emu: only 1-D blocks of whole warps are emulated");
    const auto opt = smem_opt_in.find(reinterpret_cast<const void*>(kernel));
    const size_t allowed = opt == smem_opt_in.end() ? kDefaultSmem : std::max(opt->second, kDefaultSmem);
    if (smem > allowed) {
      fail(cudaErrorInvalidValue, std::to_string(smem) + " bytes of dynamic shared memory, " +
                                      std::to_string(allowed) + " allowed (cudaFuncSetAttribute)");
      return;
    }
    // Kernel parameters are copied at launch, as the device does.
    const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
    const std::function<void()> body = [&] { std::apply(kernel, params); };
    grid_dim = grid;
    block_dim = threads;
    dyn_size = smem;
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          block_idx = {x, y, z};
          ++block_serial;
          static_bytes = 0;
          dyn_smem.assign(smem + kGuard, 0xff);
          cp_async_queues.assign(threads.x, {});
          wgmma_queues.assign(threads.x, {});
          thread_exit_check = [] {
            cp_async_check_exit();
            wgmma_check_exit();
          };
          run_block(int(threads.x), body);
          if (std::any_of(dyn_smem.begin() + smem, dyn_smem.end(), [](unsigned char b) { return b != 0xff; }))
            throw std::logic_error("emu: a write past the dynamic shared memory of the launch");
          if (static_bytes > kDefaultSmem || static_bytes + smem > max_smem())
            throw std::logic_error("emu: shared memory over the per-block limit: " +
                                   std::to_string(static_bytes) + " static + " + std::to_string(smem) + " dynamic");
        }
  }
};

template <typename... Params>
inline Launch<Params...> launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem = 0,
                                cudaStream_t = nullptr) {
  return {kernel, grid, block, smem};
}

}  // namespace emu

template <typename... Params>
inline cudaError_t cudaFuncSetAttribute(void (*kernel)(Params...), cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || size_t(value) > emu::max_smem())
    return emu::fail(cudaErrorInvalidValue, "cudaFuncSetAttribute(" + std::to_string(value) + ")");
  emu::smem_opt_in[reinterpret_cast<const void*>(kernel)] = size_t(value);
  return cudaSuccess;
}
struct cudaFuncAttributes {
  int binaryVersion, ptxVersion;
};
template <typename... Params>
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, void (*)(Params...)) {
  attr->binaryVersion = attr->ptxVersion = emu::current_device == 1 ? 90 : 80;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int device) {
  if (device != 0 && device != 1)
    return emu::fail(cudaErrorInvalidValue, "cudaSetDevice(" + std::to_string(device) + ")");
  emu::current_device = device;
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* device) {
  *device = emu::current_device;
  return cudaSuccess;
}
// The SM count of the emulated parts: an A100's 108 (device 0), an H100 SXM's 132 (device 1).
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (attr != cudaDevAttrMultiProcessorCount || (device != 0 && device != 1))
    return emu::fail(cudaErrorInvalidValue, "cudaDeviceGetAttribute(" + std::to_string(int(attr)) + ")");
  *value = device == 1 ? 132 : 108;
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() { return std::exchange(emu::last_error, cudaSuccess); }
inline const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
  }
  return "unknown error";
}
