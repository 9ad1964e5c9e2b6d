// csrc/cuda/softmax.cu (forward and backward, through its public entry points) against an
// fp64 reference. Row lengths reach every path: the warp kernel vectorized and scalar with
// 1 to 8 chunks per lane, the looped block kernel vectorized and scalar, rows cut by the causal
// limit, bool and additive masks broadcast by strides, fully masked rows.
// Run by tests/test_cuda_emulated.py; see driver.h for the command line.
#include "softmax.cu"  // the real source, launch syntax rewritten at build time
#include "driver.h"

namespace {

using namespace fusedformer;
using driver::load;

struct Case {
  int64_t b, h, lq, lk;
  bool causal;
  SoftmaxMaskKind mask;  // bool (B, 1, LQ, LK), row 0 fully masked; additive (1, H, 1, LK)
  bool far = false;      // the bool mask's batches 2^30 + 4096 apart (driver::FarRegion)
};

// Worst errors measured over these cases, y and dx: fp32 4.5e-8, bf16 1.1e-3, fp16 1.4e-5.
constexpr driver::Tolerance kTol{1.5e-7, 3e-3, 5e-5};

template <typename T>
void run(const Case& c) {
  const int64_t rows = c.b * c.h * c.lq, n = rows * c.lk;
  const std::vector<T> x = driver::random_tensor<T>(n), dy = driver::random_tensor<T>(n);
  std::vector<T> y = driver::poisoned<T>(n), dx = driver::poisoned<T>(n);
  std::vector<unsigned char> bool_mask;
  std::vector<T> add_mask;
  driver::FarRegion<unsigned char> far_mask(c.far ? c.b : 0);
  SoftmaxFwdParams p{};
  p.dtype = driver::dtype_of<T>();
  p.b = c.b, p.h = c.h, p.lq = c.lq, p.lk = c.lk, p.scale = 0.7f, p.is_causal = c.causal;
  p.x = x.data(), p.y = y.data(), p.mask_kind = c.mask;
  if (c.mask == SoftmaxMaskKind::kBool) {
    bool_mask.resize(c.b * c.lq * c.lk);
    for (auto& m : bool_mask) m = driver::uniform() > 0.3;
    for (int64_t bi = 0; bi < c.b; ++bi) std::fill_n(bool_mask.begin() + bi * c.lq * c.lk, c.lk, 0);
    p.mask = bool_mask.data();
    p.mask_batch_stride = c.lq * c.lk, p.mask_head_stride = 0, p.mask_row_stride = c.lk, p.mask_col_stride = 1;
    if (c.far) p.mask = far_mask.place(bool_mask, p.mask_batch_stride);
  } else if (c.mask == SoftmaxMaskKind::kAdditive) {
    add_mask.resize(c.h * c.lk);
    for (auto& m : add_mask) m = driver::store<T>(driver::uniform() < 0.2 ? -INFINITY : float(driver::randn()));
    p.mask = add_mask.data();
    p.mask_batch_stride = 0, p.mask_head_stride = c.lk, p.mask_row_stride = 0, p.mask_col_stride = 1;
  }
  softmax_fwd_cuda(p, nullptr);
  SoftmaxBwdParams bp{};
  bp.dtype = p.dtype, bp.rows = rows, bp.cols = c.lk, bp.scale = p.scale;
  bp.dy = dy.data(), bp.y = y.data(), bp.dx = dx.data();
  softmax_bwd_cuda(bp, nullptr);

  std::vector<double> ry(n), rdx(n), s(c.lk);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = r % c.lq, hh = r / c.lq % c.h, bi = r / (c.lq * c.h);
    double mx = -INFINITY;
    for (int64_t j = 0; j < c.lk; ++j) {
      s[j] = load(x[r * c.lk + j]) * p.scale;
      if (c.mask == SoftmaxMaskKind::kBool && !bool_mask[(bi * c.lq + i) * c.lk + j]) s[j] = -INFINITY;
      if (c.mask == SoftmaxMaskKind::kAdditive) s[j] += load(add_mask[hh * c.lk + j]);
      if (c.causal && j > i) s[j] = -INFINITY;
      mx = std::max(mx, s[j]);
    }
    double sum = 0.0;
    for (int64_t j = 0; j < c.lk; ++j) sum += mx == -INFINITY ? 0.0 : std::exp(s[j] - mx);
    for (int64_t j = 0; j < c.lk; ++j) ry[r * c.lk + j] = mx == -INFINITY ? 0.0 : std::exp(s[j] - mx) / sum;
    // The backward of the kernel's own (stored) y, as the autograd graph feeds it.
    double dot = 0.0;
    for (int64_t j = 0; j < c.lk; ++j) dot += load(dy[r * c.lk + j]) * load(y[r * c.lk + j]);
    for (int64_t j = 0; j < c.lk; ++j)
      rdx[r * c.lk + j] = p.scale * load(y[r * c.lk + j]) * (load(dy[r * c.lk + j]) - dot);
  }
  char config[120];
  snprintf(config, sizeof config, "%-4s b=%ld h=%ld lq=%ld lk=%ld causal=%d mask=%d%s", driver::dtype_name<T>(),
           long(c.b), long(c.h), long(c.lq), long(c.lk), int(c.causal), int(c.mask), c.far ? " far" : "");
  const double tol = driver::pick<T>(kTol);
  driver::report("y", config, driver::rel_error(y, ry), tol);
  driver::report("dx", config, driver::rel_error(dx, rdx), tol);
}

using K = SoftmaxMaskKind;
const bool registered = [] {
  auto add = [](auto tag, Case c) { driver::cases().push_back([=] { run<decltype(tag)>(c); }); };
  const __nv_bfloat16 bf{};
  const __half f16{};
  add(0.f, {1, 1, 3, 1, false, K::kNone});       // warp, scalar, 1 chunk
  add(0.f, {2, 1, 5, 7, true, K::kBool});        // warp, scalar, fully masked rows
  add(0.f, {1, 2, 3, 200, false, K::kAdditive}); // warp, vectorized (VEC 4), 2 chunks
  add(bf, {1, 1, 2, 250, true, K::kAdditive});    // warp, scalar, 8 chunks
  add(0.f, {1, 1, 6, 1024, true, K::kNone});     // warp, vectorized, 8 chunks
  add(bf, {1, 2, 2, 1024, false, K::kBool});      // warp, vectorized (VEC 8), 4 chunks
  add(f16, {1, 1, 2, 1025, false, K::kAdditive}); // block, scalar
  add(0.f, {1, 1, 2, 4099, false, K::kBool});    // block, scalar, looped
  add(bf, {1, 1, 40, 300, true, K::kNone});      // block, scalar, rows cut by the causal limit
  add(bf, {1, 1, 2, 6144, false, K::kNone});      // block, vectorized, looped
  add(f16, {1, 1, 1, 12288, false, K::kAdditive});
  add(0.f, {1, 1, 1, 12289, false, K::kNone});
  // The bool mask's batch 2 past 2^31 elements: the warp and the looped block paths.
  add(bf, {3, 2, 3, 200, true, K::kBool, true});
  add(f16, {3, 1, 2, 4099, false, K::kBool, true});
  return true;
}();

}  // namespace

int main(int argc, char** argv) { return driver::main(argc, argv); }
