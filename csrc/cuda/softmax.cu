// Scaled + masked softmax on the GPU (the CPU twin is csrc/cpu/softmax.cpp): Megatron's
// fused kernel without its limits (any row length, LK not a multiple of anything).
//
//   short rows (LK <= 1024, and <= 256 when not vectorizable): one warp per row, the row
//       held in registers (CHUNKS x VEC per lane, CHUNKS <= 8), 16-byte vector loads/stores
//       when LK % VEC == 0 and the pointers are aligned; one read of x, one write of y.
//   long rows: one block per row, looped: pass 1 an online max/sum (one read of x), pass 2
//       recomputes the scores and writes y (a second read, from L2 for rows up to MBs).
// Backward (dx = scale · y · (dy - Σ dy·y)) has the same two shapes.
// Napkin math (H100, 3.0 TB/s copy): bf16 forward moves 4 bytes/element, so a
// (16, 16, 2048, 2048) score tensor (1 G elements, 4 GiB in + out) takes >= 1.4 ms.
// Masks are read through their strides (stride 0 on broadcast dims: cached, never built).
// torch-free: raw pointers, sizes, a stream.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../softmax.h"
#include "common.cuh"

namespace fusedformer {
namespace {

using namespace cuda_common;

constexpr float kNegInf = -__builtin_huge_valf();

// Running (max, sum of exp(s - max)) pair; merge is associative and handles -inf maxima.
struct MaxSum {
  float m, s;
};
__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == kNegInf) return {kNegInf, 0.f};
  return {m, a.s * __expf(a.m - m) + b.s * __expf(b.m - m)};
}

// The scaled, masked score of column j of a row (-inf where masked).
template <typename T>
struct RowScores {
  const T* x;
  const uint8_t* mbool;
  const T* madd;
  int64_t mcol;  // mask column stride
  int64_t limit; // columns >= limit are causally masked
  float scale;

  __device__ __forceinline__ float operator()(int64_t j, float xv) const {
    if (j >= limit) return kNegInf;
    float s = xv * scale;
    if (madd) s += to_f(madd[j * mcol]);
    if (mbool && !mbool[j * mcol]) s = kNegInf;
    return s;
  }
};

template <typename T>
__device__ __forceinline__ RowScores<T> row_scores(const SoftmaxFwdParams& p, int64_t r) {
  const int64_t i = r % p.lq, bh = r / p.lq, hh = bh % p.h, bb = bh / p.h;
  const int64_t moff = bb * p.mask_batch_stride + hh * p.mask_head_stride + i * p.mask_row_stride;
  RowScores<T> rs;
  rs.x = static_cast<const T*>(p.x) + r * p.lk;
  rs.mbool = p.mask_kind == SoftmaxMaskKind::kBool ? static_cast<const uint8_t*>(p.mask) + moff : nullptr;
  rs.madd = p.mask_kind == SoftmaxMaskKind::kAdditive ? static_cast<const T*>(p.mask) + moff : nullptr;
  rs.mcol = p.mask_col_stride;
  rs.limit = p.is_causal ? (i + 1 < p.lk ? i + 1 : p.lk) : p.lk;
  rs.scale = p.scale;
  return rs;
}

// ---- forward, one warp per row: lane holds columns (c·32 + lane)·VEC + e ---------------
template <typename T, int VEC, int CHUNKS>
__global__ void __launch_bounds__(128) softmax_fwd_warp(const SoftmaxFwdParams p, int64_t rows) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x >> 5);
  for (int64_t r = int64_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); r < rows; r += warps) {
    const RowScores<T> rs = row_scores<T>(p, r);
    T* y = static_cast<T*>(p.y) + r * p.lk;
    float v[CHUNKS][VEC];
    float mx = kNegInf;
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      const int64_t col0 = int64_t(c * 32 + lane) * VEC;
      float xv[VEC];
      if (VEC > 1 && col0 < p.lk) {
        load_vec<T, VEC>(rs.x + col0, xv);  // LK % VEC == 0: the chunk is whole
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) xv[e] = col0 + e < p.lk ? to_f(rs.x[col0 + e]) : 0.f;
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        v[c][e] = col0 + e < p.lk ? rs(col0 + e, xv[e]) : kNegInf;
        mx = fmaxf(mx, v[c][e]);
      }
    }
    mx = warp_max(mx);
    float sum = 0.f;
    if (mx != kNegInf) {
#pragma unroll
      for (int c = 0; c < CHUNKS; ++c)
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          v[c][e] = __expf(v[c][e] - mx);  // exp(-inf) = 0 for masked columns
          sum += v[c][e];
        }
      sum = warp_sum(sum);
    }
    const float inv = mx == kNegInf ? 0.f : 1.f / sum;  // a fully masked row: zeros
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      const int64_t col0 = int64_t(c * 32 + lane) * VEC;
      float out[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) out[e] = mx == kNegInf ? 0.f : v[c][e] * inv;
      if (VEC > 1 && col0 < p.lk) {
        store_vec<T, VEC>(y + col0, out);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e)
          if (col0 + e < p.lk) y[col0 + e] = from_f<T>(out[e]);
      }
    }
  }
}

// Block-wide reductions (blockDim.x a multiple of 32, <= 1024); `red` holds 32 slots.
__device__ __forceinline__ MaxSum block_maxsum(MaxSum v, MaxSum* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    MaxSum other{__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)};
    v = merge(v, other);
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
  __syncthreads();  // `red` may still be read from the previous row
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = lane < nwarps ? red[lane] : MaxSum{kNegInf, 0.f};
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    MaxSum other{__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)};
    v = merge(v, other);
  }
  return v;
}

// ---- forward, one block per row, looped over the row in (blockDim · VEC)-wide strips -----
template <typename T, int VEC>
__global__ void __launch_bounds__(512) softmax_fwd_block(const SoftmaxFwdParams p, int64_t rows) {
  __shared__ MaxSum red[32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const RowScores<T> rs = row_scores<T>(p, r);
    T* y = static_cast<T*>(p.y) + r * p.lk;
    const int64_t end = rs.limit;  // nothing past the causal limit contributes
    MaxSum acc{kNegInf, 0.f};
    for (int64_t col0 = int64_t(threadIdx.x) * VEC; col0 < end; col0 += int64_t(blockDim.x) * VEC) {
      float xv[VEC];
      if (VEC > 1) {
        load_vec<T, VEC>(rs.x + col0, xv);
      } else {
        xv[0] = to_f(rs.x[col0]);
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float s = col0 + e < end ? rs(col0 + e, xv[e]) : kNegInf;
        if (s == kNegInf) continue;
        if (s > acc.m) {
          acc.s = acc.s * __expf(acc.m - s) + 1.f;
          acc.m = s;
        } else {
          acc.s += __expf(s - acc.m);
        }
      }
    }
    const MaxSum tot = block_maxsum(acc, red);
    const float inv = tot.m == kNegInf ? 0.f : 1.f / tot.s;
    for (int64_t col0 = int64_t(threadIdx.x) * VEC; col0 < p.lk; col0 += int64_t(blockDim.x) * VEC) {
      float out[VEC];
      if (VEC > 1) {
        float xv[VEC];
        load_vec<T, VEC>(rs.x + col0, xv);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float s = rs(col0 + e, xv[e]);
          out[e] = s == kNegInf ? 0.f : __expf(s - tot.m) * inv;
        }
        store_vec<T, VEC>(y + col0, out);
      } else {
        const float s = rs(col0, to_f(rs.x[col0]));
        y[col0] = from_f<T>(s == kNegInf ? 0.f : __expf(s - tot.m) * inv);
      }
    }
  }
}

// ---- backward ---------------------------------------------------------------------------
template <typename T, int VEC, int CHUNKS>
__global__ void __launch_bounds__(128) softmax_bwd_warp(const SoftmaxBwdParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x >> 5);
  for (int64_t r = int64_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); r < p.rows; r += warps) {
    const T* dy = static_cast<const T*>(p.dy) + r * p.cols;
    const T* y = static_cast<const T*>(p.y) + r * p.cols;
    T* dx = static_cast<T*>(p.dx) + r * p.cols;
    float g[CHUNKS][VEC], yv[CHUNKS][VEC];
    float dot = 0.f;
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      const int64_t col0 = int64_t(c * 32 + lane) * VEC;
      if (VEC > 1 && col0 < p.cols) {
        load_vec<T, VEC>(dy + col0, g[c]);
        load_vec<T, VEC>(y + col0, yv[c]);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const bool in = col0 + e < p.cols;
          g[c][e] = in ? to_f(dy[col0 + e]) : 0.f;
          yv[c][e] = in ? to_f(y[col0 + e]) : 0.f;
        }
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) dot += g[c][e] * yv[c][e];
    }
    dot = warp_sum(dot);
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      const int64_t col0 = int64_t(c * 32 + lane) * VEC;
      float out[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) out[e] = p.scale * yv[c][e] * (g[c][e] - dot);
      if (VEC > 1 && col0 < p.cols) {
        store_vec<T, VEC>(dx + col0, out);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e)
          if (col0 + e < p.cols) dx[col0 + e] = from_f<T>(out[e]);
      }
    }
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(512) softmax_bwd_block(const SoftmaxBwdParams p) {
  __shared__ float red[32];
  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    const T* dy = static_cast<const T*>(p.dy) + r * p.cols;
    const T* y = static_cast<const T*>(p.y) + r * p.cols;
    T* dx = static_cast<T*>(p.dx) + r * p.cols;
    float dot = 0.f;
    for (int64_t col0 = int64_t(threadIdx.x) * VEC; col0 < p.cols; col0 += int64_t(blockDim.x) * VEC) {
      float g[VEC], yv[VEC];
      load_vec<T, VEC>(dy + col0, g);
      load_vec<T, VEC>(y + col0, yv);
#pragma unroll
      for (int e = 0; e < VEC; ++e) dot += g[e] * yv[e];
    }
    dot = block_sum(dot, red);
    for (int64_t col0 = int64_t(threadIdx.x) * VEC; col0 < p.cols; col0 += int64_t(blockDim.x) * VEC) {
      float g[VEC], yv[VEC], out[VEC];
      load_vec<T, VEC>(dy + col0, g);
      load_vec<T, VEC>(y + col0, yv);
#pragma unroll
      for (int e = 0; e < VEC; ++e) out[e] = p.scale * yv[e] * (g[e] - dot);
      store_vec<T, VEC>(dx + col0, out);
    }
  }
}

// ---- launch ------------------------------------------------------------------------------

constexpr int64_t kWarpRowMax = 1024;  // longest row one warp holds in registers (32/lane)
constexpr int kWarpBlock = 128;        // 4 rows per block
constexpr int kRowBlock = 512;

int64_t warp_grid(int64_t rows) {
  const int64_t blocks = (rows + kWarpBlock / 32 - 1) / (kWarpBlock / 32);
  return blocks < kMaxGrid ? blocks : kMaxGrid;
}

// Whether a row of `cols` goes to the warp kernel: at most 1024 columns and 8 chunks per
// lane (so a misaligned row longer than 256 takes the block kernel: fewer instantiations).
bool warp_row(int64_t cols, bool vec, int v) {
  return cols <= kWarpRowMax && (cols + 32 * (vec ? v : 1) - 1) / (32 * (vec ? v : 1)) <= 8;
}

template <typename T>
void fwd(const SoftmaxFwdParams& p, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const int64_t rows = p.b * p.h * p.lq;
  const bool vec = p.lk % V == 0 && aligned16(p.x) && aligned16(p.y);
  if (warp_row(p.lk, vec, V)) {
    const int64_t grid = warp_grid(rows);
    if (vec) {
      chunks_switch<32 / V>((p.lk + 32 * V - 1) / (32 * V), [&](auto c) {
        softmax_fwd_warp<T, V, decltype(c)::value><<<grid, kWarpBlock, 0, stream>>>(p, rows);
      });
    } else {
      chunks_switch<8>((p.lk + 31) / 32, [&](auto c) {
        softmax_fwd_warp<T, 1, decltype(c)::value><<<grid, kWarpBlock, 0, stream>>>(p, rows);
      });
    }
    return;
  }
  const int64_t grid = rows < kMaxGrid ? rows : kMaxGrid;
  if (vec) {
    softmax_fwd_block<T, V><<<grid, kRowBlock, 0, stream>>>(p, rows);
  } else {
    softmax_fwd_block<T, 1><<<grid, kRowBlock, 0, stream>>>(p, rows);
  }
}

template <typename T>
void bwd(const SoftmaxBwdParams& p, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const bool vec = p.cols % V == 0 && aligned16(p.dy) && aligned16(p.y) && aligned16(p.dx);
  if (warp_row(p.cols, vec, V)) {
    const int64_t grid = warp_grid(p.rows);
    if (vec) {
      chunks_switch<32 / V>((p.cols + 32 * V - 1) / (32 * V), [&](auto c) {
        softmax_bwd_warp<T, V, decltype(c)::value><<<grid, kWarpBlock, 0, stream>>>(p);
      });
    } else {
      chunks_switch<8>((p.cols + 31) / 32, [&](auto c) {
        softmax_bwd_warp<T, 1, decltype(c)::value><<<grid, kWarpBlock, 0, stream>>>(p);
      });
    }
    return;
  }
  const int64_t grid = p.rows < kMaxGrid ? p.rows : kMaxGrid;
  if (vec) {
    softmax_bwd_block<T, V><<<grid, kRowBlock, 0, stream>>>(p);
  } else {
    softmax_bwd_block<T, 1><<<grid, kRowBlock, 0, stream>>>(p);
  }
}

}  // namespace

void softmax_fwd_cuda(const SoftmaxFwdParams& p, cudaStream_t stream) {
  dispatch_cuda_dtype(p.dtype, [&](auto tag) { fwd<decltype(tag)>(p, stream); });
}

void softmax_bwd_cuda(const SoftmaxBwdParams& p, cudaStream_t stream) {
  dispatch_cuda_dtype(p.dtype, [&](auto tag) { bwd<decltype(tag)>(p, stream); });
}

}  // namespace fusedformer
