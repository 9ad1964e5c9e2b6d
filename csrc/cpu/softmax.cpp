// Scaled + masked softmax on the CPU: the readable twin of csrc/cuda/softmax.cu.
//
// One row per OpenMP iteration; the scaled, masked scores go to an fp32 scratch row, so the
// math is fp32 whatever the storage dtype. Napkin math (bf16 forward): read x, write y =
// 4 bytes/element (+ the mask, usually broadcast and cache-resident). Backward: read dy, y,
// write dx = 6 bytes/element.
#include "../softmax.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "numeric.h"

namespace fusedformer {
namespace {

template <typename T>
void fwd(const SoftmaxFwdParams& p) {
  const int64_t n = p.lk, rows = p.b * p.h * p.lq;
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  const uint8_t* mbool = p.mask_kind == SoftmaxMaskKind::kBool ? static_cast<const uint8_t*>(p.mask) : nullptr;
  const T* madd = p.mask_kind == SoftmaxMaskKind::kAdditive ? static_cast<const T*>(p.mask) : nullptr;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
#pragma omp parallel
  {
    std::vector<float> s(n);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = r % p.lq, bh = r / p.lq, hh = bh % p.h, bb = bh / p.h;
      const int64_t moff = bb * p.mask_batch_stride + hh * p.mask_head_stride + i * p.mask_row_stride;
      const int64_t off = r * n;
      const int64_t limit = p.is_causal ? std::min(n, i + 1) : n;  // columns past it are masked
      float mx = kNegInf;
      for (int64_t j = 0; j < limit; ++j) {
        float v = to_float(x[off + j]) * p.scale;
        if (madd) v += to_float(madd[moff + j * p.mask_col_stride]);
        if (mbool && !mbool[moff + j * p.mask_col_stride]) v = kNegInf;
        s[j] = v;
        mx = std::max(mx, v);
      }
      if (mx == kNegInf) {  // every column masked: zeros, not NaN
        for (int64_t j = 0; j < n; ++j) y[off + j] = from_float<T>(0.f);
        continue;
      }
      float sum = 0.f;
      for (int64_t j = 0; j < limit; ++j) {
        s[j] = std::exp(s[j] - mx);
        sum += s[j];
      }
      const float inv = 1.f / sum;
      for (int64_t j = 0; j < limit; ++j) y[off + j] = from_float<T>(s[j] * inv);
      for (int64_t j = limit; j < n; ++j) y[off + j] = from_float<T>(0.f);
    }
  }
}

template <typename T>
void bwd(const SoftmaxBwdParams& p) {
  const int64_t n = p.cols;
  const T* dy = static_cast<const T*>(p.dy);
  const T* y = static_cast<const T*>(p.y);
  T* dx = static_cast<T*>(p.dx);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < p.rows; ++r) {
    const int64_t off = r * n;
    float dot = 0.f;
    for (int64_t j = 0; j < n; ++j) dot += to_float(dy[off + j]) * to_float(y[off + j]);
    for (int64_t j = 0; j < n; ++j)
      dx[off + j] = from_float<T>(p.scale * to_float(y[off + j]) * (to_float(dy[off + j]) - dot));
  }
}

}  // namespace

void softmax_fwd_cpu(const SoftmaxFwdParams& p) {
  dispatch_dtype(p.dtype, [&](auto tag) { fwd<decltype(tag)>(p); });
}
void softmax_bwd_cpu(const SoftmaxBwdParams& p) {
  dispatch_dtype(p.dtype, [&](auto tag) { bwd<decltype(tag)>(p); });
}

}  // namespace fusedformer
