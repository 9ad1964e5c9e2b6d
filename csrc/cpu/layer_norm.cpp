// LayerNorm (+ fused residual) on the CPU: the readable twin of csrc/cuda/layer_norm.cu.
//
// One row per OpenMP iteration; the row is loaded once into an fp32 scratch row, so the math
// is fp32 whatever the storage dtype. Napkin math (fp32, forward with residual): read x and
// residual, write h and y = 16 bytes/element, the floor on a memory-bound machine.
// Backward mirrors the GPU's two kernels: stage 1 writes per-row-group partial dweight/dbias,
// stage 2 reduces the groups in a fixed order (deterministic for any thread count).
#include "../layer_norm.h"

#include <omp.h>

#include <cmath>
#include <vector>

#include "numeric.h"

namespace fusedformer {
namespace {

template <typename T>
void fwd(const LayerNormFwdParams& p) {
  const int64_t n = p.cols;
  const T* x = static_cast<const T*>(p.x);
  const T* res = static_cast<const T*>(p.residual);
  const T* w = static_cast<const T*>(p.weight);
  const T* b = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
  T* h = static_cast<T*>(p.h);
#pragma omp parallel
  {
    std::vector<float> row(n);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < p.rows; ++r) {
      const int64_t off = r * n;
      float sum = 0.f;
      for (int64_t j = 0; j < n; ++j) {
        float v = to_float(x[off + j]);
        if (res) {
          // Round h to storage precision first: backward sees the stored h, so both passes
          // normalize exactly the same numbers.
          const T hv = from_float<T>(v + to_float(res[off + j]));
          h[off + j] = hv;
          v = to_float(hv);
        }
        row[j] = v;
        sum += v;
      }
      const float mean = sum / float(n);
      float var = 0.f;
      for (int64_t j = 0; j < n; ++j) {
        const float d = row[j] - mean;
        var += d * d;
      }
      const float rstd = 1.f / std::sqrt(var / float(n) + p.eps);
      for (int64_t j = 0; j < n; ++j) {
        float v = (row[j] - mean) * rstd;
        if (w) v *= to_float(w[j]);
        if (b) v += to_float(b[j]);
        y[off + j] = from_float<T>(v);
      }
      p.mean[r] = mean;
      p.rstd[r] = rstd;
    }
  }
}

template <typename T>
void bwd(const LayerNormBwdParams& p) {
  const int64_t n = p.cols;
  const T* dy = static_cast<const T*>(p.dy);
  const T* dh = static_cast<const T*>(p.dh);
  const T* h = static_cast<const T*>(p.h);
  const T* w = static_cast<const T*>(p.weight);
  T* dx = static_cast<T*>(p.dx);
  const bool want_params = p.dweight != nullptr || p.dbias != nullptr;
  const int64_t groups = p.groups;
  const int64_t rows_per_group = (p.rows + groups - 1) / groups;
  float* pdw = p.partial;                 // (groups, n)
  float* pdb = p.partial + groups * n;    // (groups, n)

  // Stage 1: dx per row; partial dweight/dbias per row group.
#pragma omp parallel
  {
    std::vector<float> xhat(n), g(n);
#pragma omp for schedule(static)
    for (int64_t grp = 0; grp < groups; ++grp) {
      float* gdw = want_params ? pdw + grp * n : nullptr;
      float* gdb = want_params ? pdb + grp * n : nullptr;
      if (want_params)
        for (int64_t j = 0; j < n; ++j) gdw[j] = gdb[j] = 0.f;
      const int64_t r_end = std::min(p.rows, (grp + 1) * rows_per_group);
      for (int64_t r = grp * rows_per_group; r < r_end; ++r) {
        const int64_t off = r * n;
        const float mean = p.mean[r], rstd = p.rstd[r];
        float sum_g = 0.f, sum_gx = 0.f;
        for (int64_t j = 0; j < n; ++j) {
          const float d = to_float(dy[off + j]);
          xhat[j] = (to_float(h[off + j]) - mean) * rstd;
          g[j] = w ? d * to_float(w[j]) : d;
          sum_g += g[j];
          sum_gx += g[j] * xhat[j];
          if (want_params) {
            gdw[j] += d * xhat[j];
            gdb[j] += d;
          }
        }
        const float c_g = sum_g / float(n), c_gx = sum_gx / float(n);
        for (int64_t j = 0; j < n; ++j) {
          float v = rstd * (g[j] - c_g - xhat[j] * c_gx);
          if (dh) v += to_float(dh[off + j]);
          dx[off + j] = from_float<T>(v);
        }
      }
    }
  }
  if (!want_params) return;

  // Stage 2: reduce the groups column by column, always in group order.
  T* dw = static_cast<T*>(p.dweight);
  T* db = static_cast<T*>(p.dbias);
#pragma omp parallel for schedule(static)
  for (int64_t j = 0; j < n; ++j) {
    float sw = 0.f, sb = 0.f;
    for (int64_t grp = 0; grp < groups; ++grp) {
      sw += pdw[grp * n + j];
      sb += pdb[grp * n + j];
    }
    if (dw) dw[j] = from_float<T>(sw);
    if (db) db[j] = from_float<T>(sb);
  }
}

}  // namespace

void layer_norm_fwd_cpu(const LayerNormFwdParams& p) {
  dispatch_dtype(p.dtype, [&](auto tag) { fwd<decltype(tag)>(p); });
}
void layer_norm_bwd_cpu(const LayerNormBwdParams& p) {
  dispatch_dtype(p.dtype, [&](auto tag) { bwd<decltype(tag)>(p); });
}

}  // namespace fusedformer
