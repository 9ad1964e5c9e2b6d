// Position-wise feed-forward block, fused: the params structs, the activation math shared by
// the CPU and CUDA kernels, and the kernel entry points.
//
//   forward:  pre = x w1ᵀ + b1                      (M, F1), F1 = F, or 2F for swiglu
//             hidden = act(pre) · keep / (1 - p)    (M, F)
//             y = hidden w2ᵀ + b2                   (M, C)
//   backward: d_hidden = dy w2                      (M, F)
//             d_pre = d_hidden · keep / (1 - p) · act'(pre)        (M, F1)
//             dx = d_pre w1;  dw1 = d_preᵀ x;  db1 = Σ_rows d_pre
//             dw2 = dyᵀ hidden (hidden recomputed from pre);  db2 = Σ_rows dy
// swiglu: pre = [gate | up] (columns [0, F) and [F, 2F)), hidden = silu(gate) · up,
//         d_gate = d_hidden · up · silu'(gate),  d_up = d_hidden · silu(gate).
// Dropout keep-mask: keep(i, j) = philox_uniform(seed, i · F + j) >= p (csrc/philox.h), the
// same bits on the CPU and the GPU for the same seed.
// All tensors contiguous row-major; weights in nn.Linear layout (out_features, in_features).
#pragma once

#include <cmath>

#include "common.h"
#include "philox.h"

#if defined(__CUDACC__) || defined(FUSEDFORMER_WITH_CUDA)
#include <cuda_runtime.h>
#endif

namespace fusedformer {

enum class FfnActivation : int { kRelu = 0, kGelu = 1, kGeluTanh = 2, kSwiglu = 3 };

struct FfnFwdParams {
  DType dtype;
  FfnActivation act;
  int64_t m, c, f;       // x: (m, c); w1: (f1, c); w2: (c, f); f1 = f, or 2f for swiglu
  float dropout_p;       // in [0, 1)
  uint64_t seed;
  const void* x;
  const void* w1;
  const void* b1;        // (f1) or nullptr
  const void* w2;
  const void* b2;        // (c) or nullptr
  void* y;               // (m, c)
  void* pre;             // (m, f1): saved for backward; nullptr: not stored (no backward will run)
  void* hidden;          // (m, f) workspace: act(pre) with dropout, the second GEMM's input
  const float* acc1;     // CPU only: (m, f1) fp32 x w1ᵀ from ATen (the GPU computes it itself),
  bool pre_from_gemm;    // or none: ATen's GEMM ran in dtype (bf16) and wrote pre, b1 added
  int64_t row0;          // CPU only: the CPU runs the FFN in chunks of rows; the pointers are at
                         // the chunk's first row, which is row row0 of the whole (for dropout)
};

struct FfnBwdParams {
  DType dtype;
  FfnActivation act;
  int64_t m, c, f;
  float dropout_p;
  uint64_t seed;
  const void* dy;        // (m, c)
  const void* x;         // (m, c)
  const void* w1;        // (f1, c)
  const void* w2;        // (c, f)
  const void* pre;       // (m, f1)
  void* dx;              // (m, c)
  void* dw1;             // (f1, c)
  void* db1;             // (f1) or nullptr
  void* dw2;             // (c, f)
  void* db2;             // (c) or nullptr
  void* d_pre;           // (m, f1) workspace
  void* hidden;          // (m, f) workspace: recomputed act(pre) with dropout
  const void* acc_dh;    // CPU only: (m, f) dy w2 from ATen, fp32, or in dtype where that is
  bool acc_in_dtype;     // ATen's GEMM output (fp32, or bf16 run natively); may alias hidden
  int64_t row0;          // CPU only: as FfnFwdParams::row0
};

inline int64_t ffn_f1(FfnActivation act, int64_t f) { return act == FfnActivation::kSwiglu ? 2 * f : f; }

// ---- activation math (fp32), shared by csrc/cpu/ffn.cpp and csrc/cuda/ffn.cu ----------
//
//   relu:      max(a, 0);                         d/da = a > 0
//   gelu:      0.5 a (1 + erf(a/√2));             d/da = Φ(a) + a φ(a)
//   gelu_tanh: 0.5 a (1 + tanh(u)), u = k (a + 0.044715 a³), k = √(2/π)
//              d/da = 0.5 (1 + t) + 0.5 a (1 - t²) k (1 + 3 · 0.044715 a²)
//   silu:      g σ(g);                             d/dg = σ(g) (1 + g (1 - σ(g)))

FF_HOST_DEVICE float ffn_act(FfnActivation act, float a) {
  if (act == FfnActivation::kRelu) return a > 0.f ? a : 0.f;
  if (act == FfnActivation::kGelu) return 0.5f * a * (1.f + erff(a * 0.70710678118654752f));
  const float t = tanhf(0.79788456080286536f * (a + 0.044715f * a * a * a));
  return 0.5f * a * (1.f + t);
}

FF_HOST_DEVICE float ffn_act_grad(FfnActivation act, float a) {
  if (act == FfnActivation::kRelu) return a > 0.f ? 1.f : 0.f;
  if (act == FfnActivation::kGelu)
    return 0.5f * (1.f + erff(a * 0.70710678118654752f)) +
           a * 0.39894228040143268f * expf(-0.5f * a * a);
  const float k = 0.79788456080286536f;
  const float t = tanhf(k * (a + 0.044715f * a * a * a));
  return 0.5f * (1.f + t) + 0.5f * a * (1.f - t * t) * k * (1.f + 3.f * 0.044715f * a * a);
}

FF_HOST_DEVICE float ffn_sigmoid(float g) { return 1.f / (1.f + expf(-g)); }

// The dropout factor of hidden element (i, j) of an (m, f) hidden: keep / (1 - p).
FF_HOST_DEVICE float ffn_dropout_scale(uint64_t seed, int64_t i, int64_t j, int64_t f, float p) {
  if (p == 0.f) return 1.f;
  return philox_uniform(seed, uint64_t(i) * uint64_t(f) + uint64_t(j)) >= p ? 1.f / (1.f - p) : 0.f;
}

// Keep-mask of an (n / f, f) hidden, one byte per element (ffn_dropout_mask in the bindings).
void ffn_dropout_mask_cpu(uint64_t seed, int64_t n, int64_t f, float p, bool* keep);

// CPU twin: the GEMMs run in ATen (bindings.cpp); these are the fused single passes over
// their fp32 outputs.
void ffn_fwd_epilogue_cpu(const FfnFwdParams& p);  // acc1 (+b1) -> pre, hidden
void ffn_bwd_epilogue_cpu(const FfnBwdParams& p);  // acc_dh, pre -> d_pre, hidden

#if defined(__CUDACC__) || defined(FUSEDFORMER_WITH_CUDA)
// Whole forward / backward on the GPU: our own tensor-core GEMMs with fused epilogues.
void ffn_fwd_cuda(const FfnFwdParams& p, cudaStream_t stream);
void ffn_bwd_cuda(const FfnBwdParams& p, cudaStream_t stream);
#endif

}  // namespace fusedformer
