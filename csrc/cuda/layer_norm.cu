// LayerNorm (+ fused residual) on the GPU (the CPU twin is csrc/cpu/layer_norm.cpp).
//
// Forward, fp32 math, 16-byte vector loads/stores when the row length and pointers allow:
//   cols <= 1024 (<= 256 unvectorized): one warp per row, the row in registers: one read of
//       x (+ residual), one write of y (+ h); exact two-pass variance from the registers.
//   wider rows: one 256-thread block per row, looped; the fp32 row is cached in shared
//       memory when it fits (cols <= 12288), else recomputed from global memory per pass.
// Backward, two kernels (the CPU twin's two stages):
//   1. one block per row group: dx per row, and the group's partial dweight / dbias
//      (accumulated in shared memory when 2 · cols floats fit, else in its own row of the
//      partial buffer, each column owned by one thread: no atomics);
//   2. a column-wise reduction of the groups in a fixed order (deterministic; one thread per
//      column, grid.x = ceil(cols / 256): no 64K-column cap).
// Napkin math (H100 at 3.0 TB/s): bf16 forward with residual moves 8 bytes/element, so
// (16384, 4096) takes >= 0.18 ms.
// torch-free: raw pointers, sizes, a stream.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../layer_norm.h"
#include "common.cuh"

namespace fusedformer {
namespace {

using namespace cuda_common;

// Loads VEC elements at src + col (a vector access when VEC > 1: the caller guarantees
// alignment and that the whole chunk is inside the row); out-of-row scalar lanes give 0.
template <typename T, int VEC>
__device__ __forceinline__ void load(const T* src, int64_t col, int64_t n, float (&dst)[VEC]) {
  if (VEC > 1) {
    load_vec(src + col, dst);
  } else {
    dst[0] = col < n ? to_f(src[col]) : 0.f;
  }
}
template <typename T, int VEC>
__device__ __forceinline__ void store(T* dst, int64_t col, const float (&src)[VEC]) {
  store_vec(dst + col, src);
}

// h = x (+ residual) at (row, col), rounded to storage precision when a residual is added
// (backward re-reads the stored h: both passes normalize the same numbers), and stored.
template <typename T, int VEC>
__device__ __forceinline__ void load_h(const LayerNormFwdParams& p, int64_t off, int64_t col,
                                       bool write_h, float (&hv)[VEC]) {
  load<T, VEC>(static_cast<const T*>(p.x) + off, col, p.cols, hv);
  if (!p.residual) return;
  float rv[VEC];
  load<T, VEC>(static_cast<const T*>(p.residual) + off, col, p.cols, rv);
#pragma unroll
  for (int e = 0; e < VEC; ++e) hv[e] = to_f(from_f<T>(hv[e] + rv[e]));
  if (write_h) store<T, VEC>(static_cast<T*>(p.h) + off, col, hv);
}

// y = (h - mean) · rstd · w + b for one chunk, stored.
template <typename T, int VEC>
__device__ __forceinline__ void write_y(const LayerNormFwdParams& p, int64_t off, int64_t col,
                                        float mean, float rstd, const float (&hv)[VEC]) {
  float w[VEC], b[VEC], out[VEC];
  if (p.weight) load<T, VEC>(static_cast<const T*>(p.weight), col, p.cols, w);
  if (p.bias) load<T, VEC>(static_cast<const T*>(p.bias), col, p.cols, b);
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    out[e] = (hv[e] - mean) * rstd;
    if (p.weight) out[e] *= w[e];
    if (p.bias) out[e] += b[e];
  }
  store<T, VEC>(static_cast<T*>(p.y), off + col, out);
}

// ---- forward, one warp per row, row in registers -----------------------------------------
template <typename T, int VEC, int CHUNKS>
__global__ void __launch_bounds__(128) ln_fwd_warp(const LayerNormFwdParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t n = p.cols, warps = int64_t(gridDim.x) * (blockDim.x >> 5);
  for (int64_t r = int64_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); r < p.rows; r += warps) {
    const int64_t off = r * n;
    float v[CHUNKS][VEC];
    float sum = 0.f;
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      const int64_t col = int64_t(c * 32 + lane) * VEC;
      if (col < n) {
        load_h<T, VEC>(p, off, col, true, v[c]);
#pragma unroll
        for (int e = 0; e < VEC; ++e) sum += v[c][e];
      }
    }
    const float mean = warp_sum(sum) / float(n);
    float var = 0.f;
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      const int64_t col = int64_t(c * 32 + lane) * VEC;
      if (col < n) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) var += (v[c][e] - mean) * (v[c][e] - mean);
      }
    }
    const float rstd = rsqrtf(warp_sum(var) / float(n) + p.eps);
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      const int64_t col = int64_t(c * 32 + lane) * VEC;
      if (col < n) write_y<T, VEC>(p, off, col, mean, rstd, v[c]);
    }
    if (lane == 0) {
      p.mean[r] = mean;
      p.rstd[r] = rstd;
    }
  }
}

// ---- forward, one block per row, looped ----------------------------------------------------
template <typename T, int VEC, bool CACHE>
__global__ void __launch_bounds__(256) ln_fwd_block(const LayerNormFwdParams p) {
  extern __shared__ float cache[];  // (cols) fp32 when CACHE: each thread reads back only
  __shared__ float red[32];         // the columns it wrote, so no barrier is needed for it
  const int64_t n = p.cols, stride = int64_t(blockDim.x) * VEC;
  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    const int64_t off = r * n;
    float sum = 0.f;
    for (int64_t col = int64_t(threadIdx.x) * VEC; col < n; col += stride) {
      float hv[VEC];
      load_h<T, VEC>(p, off, col, true, hv);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        sum += hv[e];
        if (CACHE) cache[col + e] = hv[e];
      }
    }
    const float mean = block_sum(sum, red) / float(n);
    float var = 0.f;
    for (int64_t col = int64_t(threadIdx.x) * VEC; col < n; col += stride) {
      float hv[VEC];
      if (CACHE) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) hv[e] = cache[col + e];
      } else {
        load_h<T, VEC>(p, off, col, false, hv);
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) var += (hv[e] - mean) * (hv[e] - mean);
    }
    const float rstd = rsqrtf(block_sum(var, red) / float(n) + p.eps);
    for (int64_t col = int64_t(threadIdx.x) * VEC; col < n; col += stride) {
      float hv[VEC];
      if (CACHE) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) hv[e] = cache[col + e];
      } else {
        load_h<T, VEC>(p, off, col, false, hv);
      }
      write_y<T, VEC>(p, off, col, mean, rstd, hv);
    }
    if (threadIdx.x == 0) {
      p.mean[r] = mean;
      p.rstd[r] = rstd;
    }
  }
}

// ---- backward stage 1: dx per row, partial dweight / dbias per row group -------------------
template <typename T, int VEC, bool SMEM_ACC>
__global__ void __launch_bounds__(256) ln_bwd_dx(const LayerNormBwdParams p) {
  extern __shared__ float acc[];  // (2, cols) when SMEM_ACC: this group's dweight, dbias
  __shared__ float red[32];
  const int64_t n = p.cols, stride = int64_t(blockDim.x) * VEC;
  const bool want = p.partial != nullptr;
  const int64_t grp = blockIdx.x, rows_per_group = (p.rows + p.groups - 1) / p.groups;
  float* gdw = SMEM_ACC ? acc : (want ? p.partial + grp * n : nullptr);
  float* gdb = SMEM_ACC ? acc + n : (want ? p.partial + (p.groups + grp) * n : nullptr);
  if (want)
    for (int64_t col = threadIdx.x; col < n; col += blockDim.x) gdw[col] = gdb[col] = 0.f;
  __syncthreads();  // zeroed column by column; accumulated chunk by chunk (VEC columns)
  const T* dy = static_cast<const T*>(p.dy);
  const T* h = static_cast<const T*>(p.h);
  const T* dh = static_cast<const T*>(p.dh);
  const T* w = static_cast<const T*>(p.weight);
  T* dx = static_cast<T*>(p.dx);
  const int64_t r_end = (grp + 1) * rows_per_group < p.rows ? (grp + 1) * rows_per_group : p.rows;
  for (int64_t r = grp * rows_per_group; r < r_end; ++r) {
    const int64_t off = r * n;
    const float mean = p.mean[r], rstd = p.rstd[r];
    float sum_g = 0.f, sum_gx = 0.f;
    for (int64_t col = int64_t(threadIdx.x) * VEC; col < n; col += stride) {
      float d[VEC], hv[VEC], wv[VEC];
      load<T, VEC>(dy + off, col, n, d);
      load<T, VEC>(h + off, col, n, hv);
      if (w) load<T, VEC>(w, col, n, wv);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float xhat = (hv[e] - mean) * rstd, g = w ? d[e] * wv[e] : d[e];
        sum_g += g;
        sum_gx += g * xhat;
        if (want && (VEC > 1 || col < n)) {
          gdw[col + e] += d[e] * xhat;
          gdb[col + e] += d[e];
        }
      }
    }
    const float c_g = block_sum(sum_g, red) / float(n), c_gx = block_sum(sum_gx, red) / float(n);
    for (int64_t col = int64_t(threadIdx.x) * VEC; col < n; col += stride) {
      float d[VEC], hv[VEC], wv[VEC], out[VEC];
      load<T, VEC>(dy + off, col, n, d);
      load<T, VEC>(h + off, col, n, hv);
      if (w) load<T, VEC>(w, col, n, wv);
      float dhv[VEC];
      if (dh) load<T, VEC>(dh + off, col, n, dhv);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float xhat = (hv[e] - mean) * rstd, g = w ? d[e] * wv[e] : d[e];
        out[e] = rstd * (g - c_g - xhat * c_gx) + (dh ? dhv[e] : 0.f);
      }
      if (VEC > 1 || col < n) store<T, VEC>(dx, off + col, out);
    }
  }
  if (SMEM_ACC && want) {
    __syncthreads();
    for (int64_t col = threadIdx.x; col < n; col += blockDim.x) {
      p.partial[grp * n + col] = acc[col];
      p.partial[(p.groups + grp) * n + col] = acc[n + col];
    }
  }
}

// ---- backward stage 2: reduce the groups column by column, in group order ------------------
template <typename T>
__global__ void __launch_bounds__(256) ln_bwd_reduce(const LayerNormBwdParams p) {
  const int64_t col = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= p.cols) return;
  const float* pdw = p.partial;
  const float* pdb = p.partial + p.groups * p.cols;
  float sw = 0.f, sb = 0.f;
  for (int64_t g = 0; g < p.groups; ++g) {  // consecutive threads: consecutive columns
    sw += pdw[g * p.cols + col];
    sb += pdb[g * p.cols + col];
  }
  if (p.dweight) static_cast<T*>(p.dweight)[col] = from_f<T>(sw);
  if (p.dbias) static_cast<T*>(p.dbias)[col] = from_f<T>(sb);
}

// ---- launch ------------------------------------------------------------------------------

constexpr int kWarpBlock = 128;                 // 4 rows per block
constexpr int kRowBlock = 256;
constexpr int64_t kSmemFloats = 48 * 1024 / 4;  // cached row floats: occupancy, not a hard limit

template <typename T>
void fwd(const LayerNormFwdParams& p, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const bool vec = p.cols % V == 0 && aligned16(p.x) && aligned16(p.y) &&
                   (!p.residual || (aligned16(p.residual) && aligned16(p.h))) &&
                   (!p.weight || aligned16(p.weight)) && (!p.bias || aligned16(p.bias));
  const int v = vec ? V : 1;
  const int64_t per_lane = (p.cols + 32 * v - 1) / (32 * v);
  if (p.cols <= 1024 && per_lane <= 8) {
    int64_t grid = (p.rows + kWarpBlock / 32 - 1) / (kWarpBlock / 32);
    grid = grid < kMaxGrid ? grid : kMaxGrid;
    if (vec) {
      chunks_switch<32 / V>(per_lane, [&](auto c) {
        ln_fwd_warp<T, V, decltype(c)::value><<<grid, kWarpBlock, 0, stream>>>(p);
      });
    } else {
      chunks_switch<8>(per_lane, [&](auto c) {
        ln_fwd_warp<T, 1, decltype(c)::value><<<grid, kWarpBlock, 0, stream>>>(p);
      });
    }
    return;
  }
  const int64_t grid = p.rows < kMaxGrid ? p.rows : kMaxGrid;
  const bool cache = p.cols <= kSmemFloats;
  const size_t smem = cache ? size_t(p.cols) * sizeof(float) : 0;
  if (vec) {
    if (cache) launch_with_smem(ln_fwd_block<T, V, true>, unsigned(grid), kRowBlock, smem, stream, p);
    else ln_fwd_block<T, V, false><<<grid, kRowBlock, 0, stream>>>(p);
  } else {
    if (cache) launch_with_smem(ln_fwd_block<T, 1, true>, unsigned(grid), kRowBlock, smem, stream, p);
    else ln_fwd_block<T, 1, false><<<grid, kRowBlock, 0, stream>>>(p);
  }
}

template <typename T>
void bwd(const LayerNormBwdParams& p, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const bool vec = p.cols % V == 0 && aligned16(p.dy) && aligned16(p.h) && aligned16(p.dx) &&
                   (!p.dh || aligned16(p.dh)) && (!p.weight || aligned16(p.weight));
  const bool want = p.partial != nullptr;
  const bool smem_acc = want && 2 * p.cols <= kSmemFloats;
  const size_t smem = smem_acc ? size_t(2 * p.cols) * sizeof(float) : 0;
  const unsigned grid = unsigned(p.groups);  // <= layer_norm_bwd_groups_cuda's 512
  if (vec) {
    if (smem_acc) launch_with_smem(ln_bwd_dx<T, V, true>, grid, kRowBlock, smem, stream, p);
    else ln_bwd_dx<T, V, false><<<grid, kRowBlock, 0, stream>>>(p);
  } else {
    if (smem_acc) launch_with_smem(ln_bwd_dx<T, 1, true>, grid, kRowBlock, smem, stream, p);
    else ln_bwd_dx<T, 1, false><<<grid, kRowBlock, 0, stream>>>(p);
  }
  if (want) {
    const int64_t blocks = (p.cols + kRowBlock - 1) / kRowBlock;
    ln_bwd_reduce<T><<<unsigned(blocks), kRowBlock, 0, stream>>>(p);
  }
}

}  // namespace

void layer_norm_fwd_cuda(const LayerNormFwdParams& p, cudaStream_t stream) {
  dispatch_cuda_dtype(p.dtype, [&](auto tag) { fwd<decltype(tag)>(p, stream); });
}

void layer_norm_bwd_cuda(const LayerNormBwdParams& p, cudaStream_t stream) {
  dispatch_cuda_dtype(p.dtype, [&](auto tag) { bwd<decltype(tag)>(p, stream); });
}

}  // namespace fusedformer
