// Scaled + masked softmax over the last dim (Megatron's fused kernel, without its limits on
// the row length): the params structs and kernel entry points.
//
//   forward:  s_j = x_j · scale  (+ additive mask | -inf where a bool mask is False
//             | -inf above the top-left causal diagonal: row i keeps columns j <= i)
//             y_j = exp(s_j - max s) / Σ_k exp(s_k - max s);  a row with every column
//             masked (max s = -inf) is all zeros, never NaN
//   backward: dx_j = scale · y_j · (dy_j - Σ_k dy_k y_k)      (0 wherever y is 0)
// x, y, dy, dx: contiguous (B, H, LQ, LK), one row per (b, h, i). The mask is read through
// its own four strides (0 on a broadcast dim), so no (B, H, LQ, LK) mask is ever built.
// Math in fp32 whatever the storage dtype.
#pragma once

#include "common.h"

#if defined(__CUDACC__) || defined(FUSEDFORMER_WITH_CUDA)
#include <cuda_runtime.h>
#endif

namespace fusedformer {

// What the mask pointer holds: nothing, bool (1 byte, true = keep) or an additive mask in
// the storage dtype (added to the scaled scores; -inf masks a column out).
enum class SoftmaxMaskKind : int { kNone = 0, kBool = 1, kAdditive = 2 };

struct SoftmaxFwdParams {
  DType dtype;
  int64_t b, h, lq, lk;  // x, y: (b, h, lq, lk) contiguous
  float scale;
  bool is_causal;        // top-left: row i keeps columns j <= i
  const void* x;
  void* y;
  SoftmaxMaskKind mask_kind;
  const void* mask;      // broadcast to (b, h, lq, lk) by the strides below (in elements)
  int64_t mask_batch_stride, mask_head_stride, mask_row_stride, mask_col_stride;
};

struct SoftmaxBwdParams {
  DType dtype;
  int64_t rows, cols;    // dy, y, dx: (rows, cols) contiguous
  float scale;
  const void* dy;
  const void* y;
  void* dx;
};

void softmax_fwd_cpu(const SoftmaxFwdParams& p);
void softmax_bwd_cpu(const SoftmaxBwdParams& p);

#if defined(__CUDACC__) || defined(FUSEDFORMER_WITH_CUDA)
void softmax_fwd_cuda(const SoftmaxFwdParams& p, cudaStream_t stream);
void softmax_bwd_cuda(const SoftmaxBwdParams& p, cudaStream_t stream);
#endif

}  // namespace fusedformer
