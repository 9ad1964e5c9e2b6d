// Scaled + masked softmax on the CPU: the readable twin of csrc/cuda/softmax.cu.
//
// One row per OpenMP iteration, 8 columns at a time (f32x8 and the polynomial exp8,
// numeric.h); the scaled, masked scores go to an fp32 scratch row (L1-resident), so the math
// is fp32 whatever the storage dtype and DRAM sees each element once.
// Napkin math, S = bytes per element of the storage dtype: forward reads x, writes y = 2 S
// per element (+ the mask, usually broadcast and cache-resident); backward reads dy, y and
// writes dx = 3 S. torch eager's scale, masked_fill, softmax chain moves 6 S forward.
#include "../softmax.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "numeric.h"

namespace fusedformer {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Columns [j, j + k) of one row of a bool mask as lane flags (nonzero = keep); a unit column
// stride loads 8 bytes at once, any other stride (0 when broadcast) gathers.
inline i32x8 bool_mask8(const uint8_t* row, int64_t col_stride, int64_t j, int k) {
  typedef uint8_t u8x8 __attribute__((vector_size(8)));
  u8x8 m = {};
  if (col_stride == 1 && k == 8)
    std::memcpy(&m, row + j, 8);  // a constant size: one 8-byte load, not a memcpy call
  else if (col_stride == 1)
    std::memcpy(&m, row + j, size_t(k));
  else
    for (int l = 0; l < k; ++l) m[l] = row[(j + l) * col_stride];
  return __builtin_convertvector(m, i32x8);
}

// Columns [j, j + k) of one row of an additive mask, in fp32.
template <typename T>
inline f32x8 additive_mask8(const T* row, int64_t col_stride, int64_t j, int k) {
  if (col_stride == 1) return load8(row + j, k);
  f32x8 m = {};
  for (int l = 0; l < k; ++l) m[l] = to_float(row[(j + l) * col_stride]);
  return m;
}

template <typename T>
void fwd(const SoftmaxFwdParams& p) {
  const int64_t n = p.lk, rows = p.b * p.h * p.lq;
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  const uint8_t* mbool = p.mask_kind == SoftmaxMaskKind::kBool ? static_cast<const uint8_t*>(p.mask) : nullptr;
  const T* madd = p.mask_kind == SoftmaxMaskKind::kAdditive ? static_cast<const T*>(p.mask) : nullptr;
  const int64_t mcs = p.mask_col_stride;
#pragma omp parallel
  {
    std::vector<float> s_buf(n);
    float* s = s_buf.data();
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = r % p.lq, bh = r / p.lq, hh = bh % p.h, bb = bh / p.h;
      const int64_t moff = bb * p.mask_batch_stride + hh * p.mask_head_stride + i * p.mask_row_stride;
      const int64_t off = r * n;
      const int64_t limit = p.is_causal ? std::min(n, i + 1) : n;  // columns past it are masked
      f32x8 mx = splat8(kNegInf);
      for_blocks8(limit, [&](int64_t j, int k) {
        f32x8 v = load8(x + off + j, k) * p.scale;
        if (madd) v += additive_mask8(madd + moff, mcs, j, k);
        if (mbool) v = bool_mask8(mbool + moff, mcs, j, k) != 0 ? v : splat8(kNegInf);
        v = first8(v, k, kNegInf);
        store8(s + j, v, k);
        mx = max8(mx, v);
      });
      const float row_max = hmax8(mx);
      if (row_max == kNegInf) {  // every column masked: zeros, not NaN
        for_blocks8(n, [&](int64_t j, int k) { store8(y + off + j, splat8(0.f), k); });
        continue;
      }
      f32x8 sum = {};
      for_blocks8(limit, [&](int64_t j, int k) {
        const f32x8 e = first8(exp8(load8(s + j, k) - row_max), k);
        store8(s + j, e, k);
        sum += e;
      });
      const float inv = 1.f / hsum8(sum);
      for_blocks8(limit, [&](int64_t j, int k) { store8(y + off + j, load8(s + j, k) * inv, k); });
      for_blocks8(n - limit, [&](int64_t j, int k) { store8(y + off + limit + j, splat8(0.f), k); });
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
    f32x8 dot8 = {};  // lanes >= k load as 0 and add nothing
    for_blocks8(n, [&](int64_t j, int k) { dot8 += load8(dy + off + j, k) * load8(y + off + j, k); });
    const float dot = hsum8(dot8);
    for_blocks8(n, [&](int64_t j, int k) {
      const f32x8 yv = load8(y + off + j, k);
      store8(dx + off + j, p.scale * yv * (load8(dy + off + j, k) - dot), k);
    });
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
