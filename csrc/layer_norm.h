// LayerNorm with optional fused residual add: the params structs and kernel entry points.
//
//   forward:  h = x + residual (if given);  y = (h - mean) * rstd * weight + bias
//             mean, rstd saved in fp32 per row, rstd = 1 / sqrt(var + eps), biased variance
//   backward: xhat = (h - mean) * rstd;  g = dy * weight
//             dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) + dh   (dh: grad flowing into h)
//             dweight = sum_rows(dy * xhat),  dbias = sum_rows(dy)
//             dresidual == dx (h = x + residual)
// All row-major (rows, cols) with a unit column stride and a row stride of cols.
#pragma once

#include "common.h"

#if defined(__CUDACC__) || defined(FUSEDFORMER_WITH_CUDA)
#include <cuda_runtime.h>
#endif

namespace fusedformer {

struct LayerNormFwdParams {
  DType dtype;
  int64_t rows, cols;
  float eps;
  const void* x;         // (rows, cols)
  const void* residual;  // (rows, cols) or nullptr
  const void* weight;    // (cols) or nullptr (= ones)
  const void* bias;      // (cols) or nullptr (= zeros)
  void* y;               // (rows, cols)
  void* h;               // (rows, cols), written when residual != nullptr
  float* mean;           // (rows)
  float* rstd;           // (rows)
};

struct LayerNormBwdParams {
  DType dtype;
  int64_t rows, cols;
  const void* dy;      // (rows, cols)
  const void* dh;      // (rows, cols) or nullptr: extra gradient on h (the returned sum)
  const void* h;       // (rows, cols): the normalized input (x, or x + residual)
  const void* weight;  // (cols) or nullptr
  const float* mean;   // (rows)
  const float* rstd;   // (rows)
  void* dx;            // (rows, cols)
  void* dweight;       // (cols) or nullptr (skip)
  void* dbias;         // (cols) or nullptr (skip)
  // Stage-1 partial sums of dweight / dbias, one fp32 row per row-group; stage 2 reduces them
  // in a fixed order, so results are deterministic whatever the thread count.
  float* partial;      // (2, groups, cols), needed when dweight or dbias is requested
  int64_t groups;
};

// Number of row groups for the dweight/dbias partial sums (fixed for determinism).
inline int64_t layer_norm_bwd_groups(int64_t rows) { return rows < 64 ? (rows > 0 ? rows : 1) : 64; }

// The GPU's group count: one 256-thread block per group, up to 512 groups (~4 blocks per SM
// on a 132-SM H100; a default, not yet measured on a GPU). partial is 8 · groups · cols bytes.
inline int64_t layer_norm_bwd_groups_cuda(int64_t rows) { return rows < 512 ? (rows > 0 ? rows : 1) : 512; }

void layer_norm_fwd_cpu(const LayerNormFwdParams& p);
void layer_norm_bwd_cpu(const LayerNormBwdParams& p);

#if defined(__CUDACC__) || defined(FUSEDFORMER_WITH_CUDA)
void layer_norm_fwd_cuda(const LayerNormFwdParams& p, cudaStream_t stream);
void layer_norm_bwd_cuda(const LayerNormBwdParams& p, cudaStream_t stream);
#endif

}  // namespace fusedformer
