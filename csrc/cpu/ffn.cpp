// FFN on the CPU: the readable twin of csrc/cuda/ffn.cu.
//
// The GEMMs run in ATen (bindings.cpp) with fp32 outputs; these kernels are the fused
// epilogues, one pass each over a GEMM output, as the GPU fuses them into its GEMMs:
//   forward:  acc1 = x w1ᵀ  ->  pre = acc1 + b1 (stored), hidden = act(pre) · keep / (1 - p)
//   backward: acc_dh = dy w2 ->  d_pre = acc_dh · keep / (1 - p) · act'(pre), and hidden
//             recomputed from pre for dw2 = dyᵀ hidden
// Napkin math (bf16 forward epilogue): read acc1 (4 B) + write pre, hidden (2 + 2 B) per
// hidden element; the GEMMs (2·M·C·F1 + 2·M·F·C FLOPs) dominate.
#include "../ffn.h"

#include <omp.h>

#include "numeric.h"

namespace fusedformer {
namespace {

template <typename T>
void fwd_epilogue(const FfnFwdParams& p) {
  const int64_t f = p.f, f1 = ffn_f1(p.act, f);
  const T* b1 = static_cast<const T*>(p.b1);
  T* pre = static_cast<T*>(p.pre);
  T* hidden = static_cast<T*>(p.hidden);
  const bool swiglu = p.act == FfnActivation::kSwiglu;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < p.m; ++i) {
    const float* acc = p.acc1 + i * f1;
    T* pre_row = pre + i * f1;
    for (int64_t j = 0; j < f; ++j) {
      // Round pre to storage precision first: backward recomputes act from the stored pre,
      // so both passes see exactly the same numbers (as the GPU's epilogue does).
      const float a = to_float(from_float<T>(acc[j] + (b1 ? to_float(b1[j]) : 0.f)));
      pre_row[j] = from_float<T>(a);
      float hv;
      if (swiglu) {
        const float u = to_float(from_float<T>(acc[f + j] + (b1 ? to_float(b1[f + j]) : 0.f)));
        pre_row[f + j] = from_float<T>(u);
        hv = a * ffn_sigmoid(a) * u;
      } else {
        hv = ffn_act(p.act, a);
      }
      hidden[i * f + j] = from_float<T>(hv * ffn_dropout_scale(p.seed, i, j, f, p.dropout_p));
    }
  }
}

template <typename T>
void bwd_epilogue(const FfnBwdParams& p) {
  const int64_t f = p.f, f1 = ffn_f1(p.act, f);
  const T* pre = static_cast<const T*>(p.pre);
  T* d_pre = static_cast<T*>(p.d_pre);
  T* hidden = static_cast<T*>(p.hidden);
  const bool swiglu = p.act == FfnActivation::kSwiglu;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < p.m; ++i) {
    const float* dh = p.acc_dh + i * f;
    const T* pre_row = pre + i * f1;
    T* dpre_row = d_pre + i * f1;
    for (int64_t j = 0; j < f; ++j) {
      const float drop = ffn_dropout_scale(p.seed, i, j, f, p.dropout_p);
      const float g = dh[j] * drop;  // gradient of act(pre) (before dropout)
      const float a = to_float(pre_row[j]);
      float hv;
      if (swiglu) {
        const float u = to_float(pre_row[f + j]), s = ffn_sigmoid(a), silu = a * s;
        dpre_row[j] = from_float<T>(g * u * s * (1.f + a * (1.f - s)));
        dpre_row[f + j] = from_float<T>(g * silu);
        hv = silu * u;
      } else {
        dpre_row[j] = from_float<T>(g * ffn_act_grad(p.act, a));
        hv = ffn_act(p.act, a);
      }
      hidden[i * f + j] = from_float<T>(hv * drop);
    }
  }
}

}  // namespace

void ffn_dropout_mask_cpu(uint64_t seed, int64_t n, int64_t f, float p, bool* keep) {
#pragma omp parallel for schedule(static)
  for (int64_t k = 0; k < n; ++k) keep[k] = ffn_dropout_scale(seed, k / f, k % f, f, p) != 0.f;
}

void ffn_fwd_epilogue_cpu(const FfnFwdParams& p) {
  dispatch_dtype(p.dtype, [&](auto tag) { fwd_epilogue<decltype(tag)>(p); });
}
void ffn_bwd_epilogue_cpu(const FfnBwdParams& p) {
  dispatch_dtype(p.dtype, [&](auto tag) { bwd_epilogue<decltype(tag)>(p); });
}

}  // namespace fusedformer
