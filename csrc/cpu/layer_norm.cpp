// LayerNorm (+ fused residual) on the CPU: the readable twin of csrc/cuda/layer_norm.cu.
//
// One row per OpenMP iteration, a vector of columns at a time (numeric.h), in passes over the
// row that stay in L1/L2 (32 KB at 8192 fp32 columns), so DRAM sees each element once: 16-bit
// rows are converted once into an fp32 scratch row, fp32 rows are read back where they are
// (h or x, dy). The math is fp32 whatever the storage dtype.
// Napkin math, S = bytes per element of the storage dtype:
//   forward with residual: read x, residual; write h, y        = 4 S per element
//   backward with residual: read dy, dh, h; write dx           = 4 S per element
// (+ N-sized weight/bias/partials, cache-resident). torch eager does the same work as x + r
// (3 S), layer_norm (2 S) and, backward, layer_norm_backward (3 S) + the dh add (3 S).
// Backward mirrors the GPU's two kernels: stage 1 writes per-row-group partial dweight/dbias,
// stage 2 reduces the groups in a fixed order (deterministic for any thread count).
#include "../layer_norm.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "numeric.h"

namespace fusedformer {
namespace {

// One row of the forward: h = round(x + res) (stored) when res is given, mean and rstd over
// the row, y = (h - mean) rstd w + b. w, b: fp32 or nullptr; row: n floats of scratch.
// 16-bit storage runs a Wide vector at a time (16 lanes with AVX-512): its cost is the
// conversions, which halve in instruction count (bf16 [2048, 4096] with residual, 2 threads:
// 2.9 -> 2.2 ms); fp32 stays 8 lanes wide, where 16 lanes were no faster in A/B runs.
// Row pointers arrive as values (not OpenMP-shared variables) so the loops keep them in
// registers.
template <typename T>
void fwd_row(const T* x, const T* res, T* h, T* y, const float* w, const float* b, int64_t n,
             float eps, float* row, float* mean_out, float* rstd_out) {
  constexpr bool kF32 = std::is_same_v<T, float>;
  using L = std::conditional_t<kF32, Lanes8, Wide>;
  using V = typename L::V;
  // The fp32 row that passes 2 and 3 read: 16-bit storage converts it once into the scratch
  // row; fp32 reads back h (or x), exact already and still in L1/L2, which saves pass 1 a store
  // stream.
  const float* src = row;
  if constexpr (kF32) src = res ? h : x;
  const auto [sum] = sum_blocks<L, 1>(n, [&](int64_t j, int k, std::array<V, 1>& acc) {
    V v = L::load(x + j, k);  // lanes >= k are 0: they add nothing to sum
    if (res) {
      // Round h to storage precision first: backward sees the stored h, so both passes
      // normalize exactly the same numbers.
      v = v + L::load(res + j, k);
      L::store(h + j, v, k);
      v = L::template round<T>(v);
    }
    if constexpr (!kF32) L::store(row + j, v, k);
    acc[0] += v;
  });
  const float mean = L::hsum(sum) / float(n);
  const auto [sq] = sum_blocks<L, 1>(n, [&](int64_t j, int k, std::array<V, 1>& acc) {
    const V d = L::first(L::load(src + j, k) - mean, k);
    acc[0] += d * d;
  });
  const float rstd = 1.f / std::sqrt(L::hsum(sq) / float(n) + eps);
  for_blocks<L>(n, [&](int64_t j, int k) {
    V v = (L::load(src + j, k) - mean) * rstd;
    if (w) v *= L::load(w + j, k);
    if (b) v += L::load(b + j, k);
    L::store(y + j, v, k);
  });
  *mean_out = mean;
  *rstd_out = rstd;
}

template <typename T>
void fwd(const LayerNormFwdParams& p) {
  const int64_t n = p.cols;
  const T* x = static_cast<const T*>(p.x);
  const T* res = static_cast<const T*>(p.residual);
  T* y = static_cast<T*>(p.y);
  T* h = static_cast<T*>(p.h);
  std::vector<float> w_buf, b_buf;  // 16-bit weight and bias, converted once per call
  const float* w = as_f32(static_cast<const T*>(p.weight), n, w_buf);
  const float* b = as_f32(static_cast<const T*>(p.bias), n, b_buf);
#pragma omp parallel
  {
    std::vector<float> row(n);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < p.rows; ++r) {
      const int64_t off = r * n;
      fwd_row(x + off, res ? res + off : nullptr, res ? h + off : nullptr, y + off, w, b, n, p.eps,
              row.data(), p.mean + r, p.rstd + r);
    }
  }
}

// One row of stage 1 of the backward: dx, and dy · xhat, dy added into this row group's
// partial dweight/dbias rows gdw, gdb (nullptr: not wanted). w: fp32 or nullptr; xhat, g: n
// floats of scratch each.
template <typename T>
void bwd_row(const T* dy, const T* dh, const T* h, T* dx, const float* w, float mean, float rstd,
             int64_t n, float* xhat, float* g, float* gdw, float* gdb) {
  // 16-bit storage keeps xhat and g in the fp32 scratch rows for pass 2 (one conversion per
  // element); fp32 recomputes them there, which saves pass 1 two store streams.
  constexpr bool kF32 = std::is_same_v<T, float>;
  const auto [sum_g, sum_gx] = sum_blocks8<2>(n, [&](int64_t j, int k, std::array<f32x8, 2>& acc) {
    const f32x8 d = load8(dy + j, k);  // lanes >= k: d = 0, so g = 0 adds nothing
    const f32x8 xh = (load8(h + j, k) - mean) * rstd;
    const f32x8 gv = w ? d * load8(w + j, k) : d;
    acc[0] += gv;
    acc[1] += gv * xh;
    if constexpr (!kF32) {
      store8(xhat + j, xh, k);
      store8(g + j, gv, k);
    }
    if (gdw) {
      store8(gdw + j, load8(gdw + j, k) + d * xh, k);
      store8(gdb + j, load8(gdb + j, k) + d, k);
    }
  });
  const float c_g = hsum8(sum_g) / float(n), c_gx = hsum8(sum_gx) / float(n);
  for_blocks8(n, [&](int64_t j, int k) {
    f32x8 gv, xh;
    if constexpr (kF32) {  // recomputed from the row's dy, h (and w), still in L1/L2
      const f32x8 d = load8(dy + j, k);
      gv = w ? d * load8(w + j, k) : d;
      xh = (load8(h + j, k) - mean) * rstd;
    } else {
      gv = load8(g + j, k);
      xh = load8(xhat + j, k);
    }
    f32x8 v = rstd * (gv - c_g - xh * c_gx);
    if (dh) v += load8(dh + j, k);
    store8(dx + j, v, k);
  });
}

template <typename T>
void bwd(const LayerNormBwdParams& p) {
  const int64_t n = p.cols;
  const T* dy = static_cast<const T*>(p.dy);
  const T* dh = static_cast<const T*>(p.dh);
  const T* h = static_cast<const T*>(p.h);
  T* dx = static_cast<T*>(p.dx);
  std::vector<float> w_buf;
  const float* w = as_f32(static_cast<const T*>(p.weight), n, w_buf);
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
      if (want_params) {
        std::fill(gdw, gdw + n, 0.f);
        std::fill(gdb, gdb + n, 0.f);
      }
      const int64_t r_end = std::min(p.rows, (grp + 1) * rows_per_group);
      for (int64_t r = grp * rows_per_group; r < r_end; ++r) {
        const int64_t off = r * n;
        bwd_row(dy + off, dh ? dh + off : nullptr, h + off, dx + off, w, p.mean[r], p.rstd[r], n,
                xhat.data(), g.data(), gdw, gdb);
      }
    }
  }
  if (!want_params) return;

  // Stage 2: reduce the groups 8 columns at a time, always in group order.
  T* dw = static_cast<T*>(p.dweight);
  T* db = static_cast<T*>(p.dbias);
  const int64_t blocks = (n + 7) / 8;
#pragma omp parallel for schedule(static)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t j = blk * 8;
    const int k = int(std::min<int64_t>(8, n - j));
    f32x8 sw = {}, sb = {};
    for (int64_t grp = 0; grp < groups; ++grp) {
      sw += load8(pdw + grp * n + j, k);
      sb += load8(pdb + grp * n + j, k);
    }
    if (dw) store8(dw + j, sw, k);
    if (db) store8(db + j, sb, k);
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
