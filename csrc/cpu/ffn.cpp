// FFN on the CPU: the readable twin of csrc/cuda/ffn.cu.
//
// The GEMMs run in ATen (bindings.cpp's ffn_fwd_cpu and ffn_bwd_cpu, a chunk of rows at a
// time) with fp32 outputs, or bf16 ones where ATen runs bf16 natively; these kernels are the
// fused epilogues, one pass each over a chunk of a GEMM output, as the GPU fuses them into its
// GEMMs:
//   forward:  acc1 = x w1ᵀ  ->  pre = acc1 + b1 (stored), hidden = act(pre) · keep / (1 - p)
//   backward: acc_dh = dy w2 ->  d_pre = acc_dh · keep / (1 - p) · act'(pre), and hidden
//             recomputed from pre for dw2 = dyᵀ hidden
// Napkin math (fp32 forward epilogue): read acc1 (4 B) + write pre, hidden (4 + 4 B) per
// hidden element, and one exp (gelu, gelu_tanh, swiglu) per element: as scalar libm calls
// (erff, tanhf, expf) they cost about as much as the GEMMs at the benchmark shapes, so the
// epilogues run a vector at a time (numeric.h's Wide: 16 lanes with AVX-512, else 8) and the
// GEMMs (2·M·C·F1 + 2·M·F·C FLOPs) dominate.
#include "../ffn.h"

#include <omp.h>

#include "numeric.h"

namespace fusedformer {
namespace {

// ---- the activations of ffn.h, a vector (numeric.h's Wide: 16 lanes with AVX-512) at a time
//   gelu:      0.5 a (1 + erf(a/√2));  d/da = 0.5 (1 + erf(a/√2)) + a φ(a), φ(a) = e^(-a²/2)/√(2π)
//   gelu_tanh: 0.5 a (1 + t), t = tanh(k (a + 0.044715 a³))
//   swiglu:    silu(g) = g σ(g), σ(g) = 1 / (1 + e^-g)

using L = Wide;
using V = L::V;

constexpr float kSqrtHalf = 0.70710678118654752f, kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kTanhK = 0.79788456080286536f, kTanhC = 0.044715f;

inline V sigmoid(V g) { return 1.f / (1.f + L::exp(-g)); }

// act(a), and act(a) with act'(a) (GELU's erf and φ share one exp). The activation is a
// template parameter so that each epilogue loop is compiled for one of them, with no branch
// per vector. swiglu's silu(g) · u takes two inputs and is written out in the epilogues.
template <FfnActivation kAct>
inline V activate(V a) {
  if constexpr (kAct == FfnActivation::kRelu) {
    return a > 0.f ? a : V{};
  } else if constexpr (kAct == FfnActivation::kGelu) {
    const V z = a * kSqrtHalf;
    return 0.5f * a * (1.f + L::erf(z, L::exp(-(z * z))));
  } else {
    return 0.5f * a * (1.f + L::tanh(kTanhK * (a + kTanhC * a * a * a)));
  }
}

template <FfnActivation kAct>
inline void act_and_grad(V a, V& value, V& grad) {
  if constexpr (kAct == FfnActivation::kRelu) {
    value = a > 0.f ? a : V{};
    grad = a > 0.f ? L::splat(1.f) : V{};
  } else if constexpr (kAct == FfnActivation::kGelu) {
    const V z = a * kSqrtHalf, e = L::exp(-(z * z));
    const V cdf = 0.5f * (1.f + L::erf(z, e));
    value = a * cdf;
    grad = cdf + a * kInvSqrt2Pi * e;
  } else {
    const V t = L::tanh(kTanhK * (a + kTanhC * a * a * a));
    value = 0.5f * a * (1.f + t);
    grad = 0.5f * (1.f + t) + 0.5f * a * (1.f - t * t) * kTanhK * (1.f + 3.f * kTanhC * a * a);
  }
}

// Calls body.template operator()<kAct>() with act as a compile-time constant.
template <typename F>
void with_activation(FfnActivation act, F&& body) {
  switch (act) {
    case FfnActivation::kRelu: return body.template operator()<FfnActivation::kRelu>();
    case FfnActivation::kGelu: return body.template operator()<FfnActivation::kGelu>();
    case FfnActivation::kGeluTanh: return body.template operator()<FfnActivation::kGeluTanh>();
    case FfnActivation::kSwiglu: return body.template operator()<FfnActivation::kSwiglu>();
  }
}

// keep / (1 - p) for hidden elements (i, [j, j + k)): 1 without dropout.
inline V dropout(uint64_t seed, float p, int64_t i, int64_t j, int k, int64_t f) {
  if (p == 0.f) return L::splat(1.f);
  V d = {};
  for (int l = 0; l < k; ++l) d[l] = ffn_dropout_scale(seed, i, j + l, f, p);
  return d;
}

// kPreFromGemm: ATen's GEMM wrote pre (x w1ᵀ + b1, rounded once) and the epilogue reads it;
// else it forms pre from the fp32 acc1 and stores it.
template <typename T, bool kPreFromGemm, FfnActivation kAct>
void fwd_epilogue(const FfnFwdParams& p) {
  constexpr bool kSwiglu = kAct == FfnActivation::kSwiglu;
  const int64_t f = p.f, f1 = ffn_f1(p.act, f);
  const T* b1 = static_cast<const T*>(p.b1);
  const float* acc1 = p.acc1;
  T* pre = static_cast<T*>(p.pre);
  T* hidden = static_cast<T*>(p.hidden);
  const uint64_t seed = p.seed;
  const float drop_p = p.dropout_p;
  const int64_t row0 = p.row0;
  // pre rounded to storage precision before act: backward recomputes act from the stored
  // pre, so both passes see exactly the same numbers (as the GPU's epilogue does).
  const auto pre_at = [b1](const float* acc, T* pre_row, int64_t j, int k) {
    if constexpr (kPreFromGemm) {
      return L::load(pre_row + j, k);
    } else {
      V a = L::load(acc + j, k);
      if (b1) a += L::load(b1 + j, k);
      a = L::round<T>(a);
      L::store(pre_row + j, a, k);
      return a;
    }
  };
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < p.m; ++i) {
    const float* acc = kPreFromGemm ? nullptr : acc1 + i * f1;
    T* pre_row = pre + i * f1;
    T* h_row = hidden + i * f;
    for_blocks<L>(f, [&](int64_t j, int k) {
      const V a = pre_at(acc, pre_row, j, k);
      V hv;
      if constexpr (kSwiglu) {
        const V u = pre_at(acc, pre_row, f + j, k);
        hv = a * sigmoid(a) * u;
      } else {
        hv = activate<kAct>(a);
      }
      if (drop_p > 0.f) hv *= dropout(seed, drop_p, row0 + i, j, k, f);
      L::store(h_row + j, hv, k);
    });
  }
}

// A: the type of the GEMM's output, acc_dh (as fwd_epilogue's). acc_dh may alias hidden: each
// vector of it is read before the same vector of hidden is written.
template <typename T, typename A, FfnActivation kAct>
void bwd_epilogue(const FfnBwdParams& p) {
  const int64_t f = p.f, f1 = ffn_f1(p.act, f);
  const T* pre = static_cast<const T*>(p.pre);
  const A* acc_dh = static_cast<const A*>(p.acc_dh);
  T* d_pre = static_cast<T*>(p.d_pre);
  T* hidden = static_cast<T*>(p.hidden);
  const uint64_t seed = p.seed;
  const float drop_p = p.dropout_p;
  const int64_t row0 = p.row0;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < p.m; ++i) {
    const A* dh = acc_dh + i * f;
    const T* pre_row = pre + i * f1;
    T* dpre_row = d_pre + i * f1;
    T* h_row = hidden + i * f;
    for_blocks<L>(f, [&](int64_t j, int k) {
      const V drop = drop_p > 0.f ? dropout(seed, drop_p, row0 + i, j, k, f) : L::splat(1.f);
      const V g = L::load(dh + j, k) * drop;  // gradient of act(pre) (before dropout)
      const V a = L::load(pre_row + j, k);
      V hv;
      if constexpr (kAct == FfnActivation::kSwiglu) {
        const V u = L::load(pre_row + f + j, k), s = sigmoid(a), silu = a * s;
        L::store(dpre_row + j, g * u * s * (1.f + a * (1.f - s)), k);
        L::store(dpre_row + f + j, g * silu, k);
        hv = silu * u;
      } else {
        V grad;
        act_and_grad<kAct>(a, hv, grad);
        L::store(dpre_row + j, g * grad, k);
      }
      L::store(h_row + j, hv * drop, k);
    });
  }
}

}  // namespace

void ffn_dropout_mask_cpu(uint64_t seed, int64_t n, int64_t f, float p, bool* keep) {
#pragma omp parallel for schedule(static)
  for (int64_t k = 0; k < n; ++k) keep[k] = ffn_dropout_scale(seed, k / f, k % f, f, p) != 0.f;
}

void ffn_fwd_epilogue_cpu(const FfnFwdParams& p) {
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    with_activation(p.act, [&]<FfnActivation kAct>() {
      if (p.pre_from_gemm) fwd_epilogue<T, true, kAct>(p);
      else fwd_epilogue<T, false, kAct>(p);
    });
  });
}
void ffn_bwd_epilogue_cpu(const FfnBwdParams& p) {
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    with_activation(p.act, [&]<FfnActivation kAct>() {
      if (p.acc_in_dtype) bwd_epilogue<T, T, kAct>(p);
      else bwd_epilogue<T, float, kAct>(p);
    });
  });
}

}  // namespace fusedformer
