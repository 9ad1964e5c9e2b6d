// fusedformer._C: the pybind11 module, and the only C++ file that sees torch.
//
// Each op binding: check arguments with messages that name the argument, what was expected
// and what came; make inputs contiguous (gradients often arrive as stride-0 expanded
// tensors); allocate outputs; fill the op's params struct; dispatch by device to the
// torch-free kernel (csrc/cpu/*.cpp or csrc/cuda/*.cu) on the current stream.
#include <torch/extension.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common.h"
#include "attention.h"  // Attention
#include "layer_norm.h"
#include "softmax.h"  // Softmax
#include "ffn.h"  // FFN
#include "philox.h"  // Attention

#ifdef FUSEDFORMER_WITH_CUDA
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that needs the cuBLAS/cuSPARSE headers
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#endif

namespace ff = fusedformer;
using at::Tensor;
using OptTensor = std::optional<Tensor>;

namespace {

#define CHECK_SHAPE(t, ...)                                                             \
  TORCH_CHECK((t).sizes() == at::IntArrayRef({__VA_ARGS__}), #t " must have shape (", \
              #__VA_ARGS__, ") = ", at::IntArrayRef({__VA_ARGS__}), ", got ", (t).sizes())

ff::DType to_dtype(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return ff::DType::kFloat32;
    case at::kBFloat16: return ff::DType::kBFloat16;
    case at::kHalf: return ff::DType::kFloat16;
    default:
      TORCH_CHECK(false, name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

// Every tensor of a call: same device and dtype as `ref`.
void check_like(const Tensor& t, const Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the same device as ", ref_name,
              " (", ref.device(), "), got ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have the same dtype as ",
              ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
}

// Debug switch for the tests: fill every output with NaN before the kernel runs, so an
// element a kernel forgets to write fails the comparison instead of passing by luck.
bool g_nan_fill = false;

Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  Tensor t = torch::empty(sizes, opts);
  if (g_nan_fill && at::isFloatingType(opts.dtype().toScalarType())) t.fill_(NAN);
  return t;
}
Tensor new_output_like(const Tensor& t) { return new_output(t.sizes(), t.options()); }

const void* ptr_or_null(const OptTensor& t) { return t.has_value() ? t->data_ptr() : nullptr; }

OptTensor contiguous(const OptTensor& t) {
  return t.has_value() ? OptTensor(t->contiguous()) : std::nullopt;
}

[[noreturn]] void no_cuda(const char* op) {
#ifdef FUSEDFORMER_WITH_CUDA
  TORCH_CHECK(false, op, ": no CUDA kernel for this op in this build");
#else
  TORCH_CHECK(false, op, ": got CUDA tensors but fusedformer._C was built without CUDA (",
              FUSEDFORMER_CUDA_SKIP_REASON, ")");
#endif
}

// ---------------------------------------------------------------------------------------
// LayerNorm (+ residual)

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm_fwd(const Tensor& x_, const OptTensor& residual_,
                                                          const OptTensor& weight_,
                                                          const OptTensor& bias_, double eps) {
  TORCH_CHECK(x_.dim() == 2, "layer_norm_fwd: x must be 2-D (rows, cols), got ", x_.dim(), "-D");
  TORCH_CHECK(eps > 0, "layer_norm_fwd: eps must be > 0, got ", eps);
  const int64_t rows = x_.size(0), cols = x_.size(1);
  TORCH_CHECK(cols > 0, "layer_norm_fwd: x must have at least one column, got shape ", x_.sizes());
  const ff::DType dtype = to_dtype(x_, "x");
  Tensor x = x_.contiguous();
  OptTensor residual = contiguous(residual_), weight = contiguous(weight_), bias = contiguous(bias_);
  if (residual) { check_like(*residual, x, "residual", "x"); CHECK_SHAPE(*residual, rows, cols); }
  if (weight) { check_like(*weight, x, "weight", "x"); CHECK_SHAPE(*weight, cols); }
  if (bias) { check_like(*bias, x, "bias", "x"); CHECK_SHAPE(*bias, cols); }

  Tensor y = new_output_like(x);
  Tensor h = residual ? new_output_like(x) : torch::empty({0}, x.options());
  auto stats_opts = x.options().dtype(at::kFloat);
  Tensor mean = new_output({rows}, stats_opts), rstd = new_output({rows}, stats_opts);
  if (rows == 0) return {y, h, mean, rstd};

  ff::LayerNormFwdParams p{};
  p.dtype = dtype;
  p.rows = rows;
  p.cols = cols;
  p.eps = static_cast<float>(eps);
  p.x = x.data_ptr();
  p.residual = ptr_or_null(residual);
  p.weight = ptr_or_null(weight);
  p.bias = ptr_or_null(bias);
  p.y = y.data_ptr();
  p.h = residual ? h.data_ptr() : nullptr;
  p.mean = mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  if (x.is_cpu()) {
    ff::layer_norm_fwd_cpu(p);
  } else {
#ifdef FUSEDFORMER_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    ff::layer_norm_fwd_cuda(p, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
#else
    no_cuda("layer_norm_fwd");
#endif
  }
  return {y, h, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd(const Tensor& dy_, const OptTensor& dh_,
                                                  const Tensor& h_, const OptTensor& weight_,
                                                  const Tensor& mean_, const Tensor& rstd_,
                                                  bool need_dweight, bool need_dbias) {
  TORCH_CHECK(h_.dim() == 2, "layer_norm_bwd: h must be 2-D (rows, cols), got ", h_.dim(), "-D");
  const int64_t rows = h_.size(0), cols = h_.size(1);
  const ff::DType dtype = to_dtype(h_, "h");
  Tensor h = h_.contiguous(), dy = dy_.contiguous();
  OptTensor dh = contiguous(dh_), weight = contiguous(weight_);
  check_like(dy, h, "dy", "h");
  CHECK_SHAPE(dy, rows, cols);
  if (dh) { check_like(*dh, h, "dh", "h"); CHECK_SHAPE(*dh, rows, cols); }
  if (weight) { check_like(*weight, h, "weight", "h"); CHECK_SHAPE(*weight, cols); }
  TORCH_CHECK(mean_.scalar_type() == at::kFloat && rstd_.scalar_type() == at::kFloat,
              "layer_norm_bwd: mean and rstd must be float32, got ", mean_.scalar_type(), " and ",
              rstd_.scalar_type());
  Tensor mean = mean_.contiguous(), rstd = rstd_.contiguous();
  CHECK_SHAPE(mean, rows);
  CHECK_SHAPE(rstd, rows);
  need_dweight = need_dweight && weight.has_value();

  Tensor dx = new_output_like(h);
  Tensor dweight = new_output({need_dweight ? cols : 0}, h.options());
  Tensor dbias = new_output({need_dbias ? cols : 0}, h.options());
  if (rows == 0) {
    dweight.zero_();
    dbias.zero_();
    return {dx, dweight, dbias};
  }
  const int64_t groups = h.is_cpu() ? ff::layer_norm_bwd_groups(rows) : ff::layer_norm_bwd_groups_cuda(rows);
  Tensor partial = (need_dweight || need_dbias)
                       ? new_output({2, groups, cols}, h.options().dtype(at::kFloat))
                       : torch::empty({0}, h.options().dtype(at::kFloat));

  ff::LayerNormBwdParams p{};
  p.dtype = dtype;
  p.rows = rows;
  p.cols = cols;
  p.dy = dy.data_ptr();
  p.dh = ptr_or_null(dh);
  p.h = h.data_ptr();
  p.weight = ptr_or_null(weight);
  p.mean = mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.dx = dx.data_ptr();
  p.dweight = need_dweight ? dweight.data_ptr() : nullptr;
  p.dbias = need_dbias ? dbias.data_ptr() : nullptr;
  p.partial = partial.numel() ? partial.data_ptr<float>() : nullptr;
  p.groups = groups;
  if (h.is_cpu()) {
    ff::layer_norm_bwd_cpu(p);
  } else {
#ifdef FUSEDFORMER_WITH_CUDA
    const c10::cuda::CUDAGuard guard(h.device());
    ff::layer_norm_bwd_cuda(p, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
#else
    no_cuda("layer_norm_bwd");
#endif
  }
  return {dx, dweight, dbias};
}

// ---------------------------------------------------------------------------------------
// Attention

// The kernels need a unit last-dim stride (any batch/head/row strides): gradients arrive as
// stride-0 expanded tensors and transposed views are common, so copy only when needed.
Tensor unit_last_stride(const Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

void check_attention_input(const Tensor& t, const char* op, const char* name, const char* dims) {
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D ", dims, ", got ", t.dim(), "-D");
}

// The mask as the kernels read it: bool (True = attend) or additive in q's dtype, 4-D and
// broadcastable to (B, HQ, LQ, LK); a broadcast dim gets stride 0.
ff::AttentionMask attention_mask(const OptTensor& mask, const Tensor& q, int64_t b, int64_t hq,
                                 int64_t lq, int64_t lk, const char* op) {
  ff::AttentionMask m;
  if (!mask.has_value()) return m;
  const Tensor& t = *mask;
  TORCH_CHECK(t.dim() == 4, op, ": mask must be 4-D (B|1, HQ|1, LQ|1, LK|1), got ", t.dim(), "-D");
  TORCH_CHECK(t.device() == q.device(), op, ": mask must be on the same device as q (",
              q.device(), "), got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kBool || t.scalar_type() == q.scalar_type(), op,
              ": mask must be bool (True = attend) or ", q.scalar_type(),
              " (the dtype of q, added to the scores), got ", t.scalar_type());
  const int64_t full[4] = {b, hq, lq, lk};
  int64_t strides[4];
  for (int i = 0; i < 4; ++i) {
    TORCH_CHECK(t.size(i) == full[i] || t.size(i) == 1, op, ": mask of shape ", t.sizes(),
                " does not broadcast to the scores (B, HQ, LQ, LK) = ", at::IntArrayRef(full, 4));
    strides[i] = t.size(i) == 1 ? 0 : t.stride(i);
  }
  m.kind = t.scalar_type() == at::kBool ? ff::MaskKind::kBool : ff::MaskKind::kAdditive;
  m.ptr = t.data_ptr();
  m.batch_stride = strides[0];
  m.head_stride = strides[1];
  m.row_stride = strides[2];
  m.col_stride = strides[3];
  return m;
}

// Checks shared by forward and backward; returns (b, hq, hkv, lq, lk, d).
std::array<int64_t, 6> check_attention_qkv(const Tensor& q, const Tensor& k, const Tensor& v,
                                           double dropout_p, const char* op) {
  check_attention_input(q, op, "q", "(B, HQ, LQ, D)");
  check_attention_input(k, op, "k", "(B, HKV, LK, D)");
  check_attention_input(v, op, "v", "(B, HKV, LK, D)");
  to_dtype(q, "q");
  check_like(k, q, "k", "q");
  check_like(v, q, "v", "q");
  const int64_t b = q.size(0), hq = q.size(1), lq = q.size(2), d = q.size(3);
  const int64_t hkv = k.size(1), lk = k.size(2);
  CHECK_SHAPE(k, b, hkv, lk, d);
  CHECK_SHAPE(v, b, hkv, lk, d);
  TORCH_CHECK(hkv > 0, op, ": k and v must have at least one head, got shape ", k.sizes());
  TORCH_CHECK(hq % hkv == 0, op, ": query heads (", hq, ") must be a multiple of key/value heads (",
              hkv, ")");
  TORCH_CHECK(d >= 1 && d <= ff::kAttentionMaxHeadDim, op, ": head dim must be in [1, ",
              ff::kAttentionMaxHeadDim, "], got ", d);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ",
              dropout_p);
  return {b, hq, hkv, lq, lk, d};
}

// num_splits: 0 lets the backend choose (split-KV where the grid alone would leave most SMs or
// threads idle, as when decoding); n >= 1 forces n key ranges.
std::tuple<Tensor, Tensor> attention_fwd(const Tensor& q_, const Tensor& k_, const Tensor& v_,
                                         const OptTensor& mask, double scale, bool is_causal,
                                         double dropout_p, int64_t seed, int64_t num_splits) {
  const auto [b, hq, hkv, lq, lk, d] = check_attention_qkv(q_, k_, v_, dropout_p, "attention_fwd");
  TORCH_CHECK(num_splits >= 0 && num_splits <= ff::kAttentionMaxSplits, "attention_fwd: num_splits must be in [0, ",
              ff::kAttentionMaxSplits, "] (0: the backend chooses), got ", num_splits);
  const c10::OptionalDeviceGuard guard(q_.device());
  Tensor q = unit_last_stride(q_), k = unit_last_stride(k_), v = unit_last_stride(v_);
  Tensor o = new_output({b, hq, lq, d}, q.options());
  Tensor lse = new_output({b, hq, lq}, q.options().dtype(at::kFloat));
  if (o.numel() == 0) return {o, lse};

  ff::AttentionFwdParams p{};
  p.dtype = to_dtype(q, "q");
  p.b = b; p.hq = hq; p.hkv = hkv; p.lq = lq; p.lk = lk; p.d = d;
  p.q = q.data_ptr(); p.k = k.data_ptr(); p.v = v.data_ptr(); p.o = o.data_ptr();
  p.q_batch_stride = q.stride(0); p.q_head_stride = q.stride(1); p.q_row_stride = q.stride(2);
  p.k_batch_stride = k.stride(0); p.k_head_stride = k.stride(1); p.k_row_stride = k.stride(2);
  p.v_batch_stride = v.stride(0); p.v_head_stride = v.stride(1); p.v_row_stride = v.stride(2);
  p.o_batch_stride = o.stride(0); p.o_head_stride = o.stride(1); p.o_row_stride = o.stride(2);
  p.mask = attention_mask(mask, q, b, hq, lq, lk, "attention_fwd");
  p.scale = static_cast<float>(scale);
  p.is_causal = is_causal;
  p.dropout_p = static_cast<float>(dropout_p);
  p.seed = static_cast<uint64_t>(seed);
  p.lse = lse.data_ptr<float>();
  Tensor o_accum, lse_accum;  // split-KV's partial results, fp32
  const auto split = [&](int64_t splits) {
    p.num_splits = splits;
    if (splits == 1) return;
    const auto f32 = q.options().dtype(at::kFloat);
    o_accum = at::empty({splits, b, hq, lq, d}, f32);
    lse_accum = at::empty({splits, b, hq, lq}, f32);
    p.o_accum = o_accum.data_ptr<float>();
    p.lse_accum = lse_accum.data_ptr<float>();
  };
  if (q.is_cpu()) {
    split(num_splits > 0 ? num_splits : ff::attention_fwd_num_splits_cpu(p));
    ff::attention_fwd_cpu(p);
  } else {
#ifdef FUSEDFORMER_WITH_CUDA
    split(num_splits > 0 ? num_splits : ff::attention_fwd_num_splits_cuda(p));
    ff::attention_fwd_cuda(p, c10::cuda::getCurrentCUDAStream());
#else
    no_cuda("attention_fwd");
#endif
  }
  return {o, lse};
}

std::tuple<Tensor, Tensor, Tensor> attention_bwd(const Tensor& do_, const Tensor& q_,
                                                 const Tensor& k_, const Tensor& v_,
                                                 const Tensor& o_, const Tensor& lse_,
                                                 const OptTensor& mask, double scale,
                                                 bool is_causal, double dropout_p, int64_t seed) {
  const auto [b, hq, hkv, lq, lk, d] = check_attention_qkv(q_, k_, v_, dropout_p, "attention_bwd");
  check_like(do_, q_, "do", "q");
  check_like(o_, q_, "o", "q");
  const at::IntArrayRef q_shape = q_.sizes();  // do and o: (B, HQ, LQ, D) like q
  TORCH_CHECK(do_.sizes() == q_shape, "attention_bwd: do must have the shape of q (b, hq, lq, d) = ",
              q_shape, ", got ", do_.sizes());
  TORCH_CHECK(o_.sizes() == q_shape, "attention_bwd: o must have the shape of q (b, hq, lq, d) = ",
              q_shape, ", got ", o_.sizes());
  TORCH_CHECK(lse_.scalar_type() == at::kFloat && lse_.device() == q_.device(),
              "attention_bwd: lse must be float32 on the device of q, got ", lse_.scalar_type(),
              " on ", lse_.device());
  TORCH_CHECK(lse_.sizes() == at::IntArrayRef({b, hq, lq}),
              "attention_bwd: lse must have shape (b, hq, lq) = ", at::IntArrayRef({b, hq, lq}),
              ", got ", lse_.sizes());
  const c10::OptionalDeviceGuard guard(q_.device());
  Tensor q = unit_last_stride(q_), k = unit_last_stride(k_), v = unit_last_stride(v_);
  Tensor o = unit_last_stride(o_), g = unit_last_stride(do_), lse = lse_.contiguous();
  Tensor dq = new_output({b, hq, lq, d}, q.options());
  Tensor dk = new_output({b, hkv, lk, d}, q.options());
  Tensor dv = new_output({b, hkv, lk, d}, q.options());
  Tensor delta = new_output({b, hq, lq}, q.options().dtype(at::kFloat));
  if (dq.numel() == 0 && dk.numel() == 0) return {dq, dk, dv};

  ff::AttentionBwdParams p{};
  p.dtype = to_dtype(q, "q");
  p.b = b; p.hq = hq; p.hkv = hkv; p.lq = lq; p.lk = lk; p.d = d;
  p.q = q.data_ptr(); p.k = k.data_ptr(); p.v = v.data_ptr(); p.o = o.data_ptr();
  p.do_ = g.data_ptr(); p.dq = dq.data_ptr(); p.dk = dk.data_ptr(); p.dv = dv.data_ptr();
  p.q_batch_stride = q.stride(0); p.q_head_stride = q.stride(1); p.q_row_stride = q.stride(2);
  p.k_batch_stride = k.stride(0); p.k_head_stride = k.stride(1); p.k_row_stride = k.stride(2);
  p.v_batch_stride = v.stride(0); p.v_head_stride = v.stride(1); p.v_row_stride = v.stride(2);
  p.o_batch_stride = o.stride(0); p.o_head_stride = o.stride(1); p.o_row_stride = o.stride(2);
  p.do_batch_stride = g.stride(0); p.do_head_stride = g.stride(1); p.do_row_stride = g.stride(2);
  p.dq_batch_stride = dq.stride(0); p.dq_head_stride = dq.stride(1); p.dq_row_stride = dq.stride(2);
  p.dk_batch_stride = dk.stride(0); p.dk_head_stride = dk.stride(1); p.dk_row_stride = dk.stride(2);
  p.dv_batch_stride = dv.stride(0); p.dv_head_stride = dv.stride(1); p.dv_row_stride = dv.stride(2);
  p.mask = attention_mask(mask, q, b, hq, lq, lk, "attention_bwd");
  p.scale = static_cast<float>(scale);
  p.is_causal = is_causal;
  p.dropout_p = static_cast<float>(dropout_p);
  p.seed = static_cast<uint64_t>(seed);
  p.lse = lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  if (q.is_cpu()) {
    ff::attention_bwd_cpu(p);
  } else {
#ifdef FUSEDFORMER_WITH_CUDA
    ff::attention_bwd_cuda(p, c10::cuda::getCurrentCUDAStream());
#else
    no_cuda("attention_bwd");
#endif
  }
  return {dq, dk, dv};
}

// The dropout keep-mask (B, HQ, LQ, LK) that attention_fwd/bwd draw for `seed` (csrc/philox.h),
// on the CPU: for the tests, which hand it to the oracle.
Tensor attention_dropout_mask(int64_t seed, int64_t b, int64_t hq, int64_t lq, int64_t lk,
                              double dropout_p) {
  TORCH_CHECK(b >= 0 && hq >= 0 && lq >= 0 && lk >= 0,
              "attention_dropout_mask: sizes must be >= 0, got (", b, ", ", hq, ", ", lq, ", ", lk, ")");
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0,
              "attention_dropout_mask: dropout_p must be in [0, 1), got ", dropout_p);
  Tensor keep = torch::empty({b, hq, lq, lk}, at::TensorOptions().dtype(at::kBool));
  bool* out = keep.data_ptr<bool>();
  const float pf = static_cast<float>(dropout_p);
  const int64_t rows = b * hq * lq;
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t bi = row / (hq * lq), h = row / lq % hq, i = row % lq;
    for (int64_t j = 0; j < lk; ++j)
      out[row * lk + j] = ff::dropout_keep(static_cast<uint64_t>(seed), bi, h, i, j, hq, lq, lk, pf);
  }
  return keep;
}

// ---------------------------------------------------------------------------------------
// Softmax (scaled + masked)

Tensor softmax_fwd(const Tensor& x_, const OptTensor& mask_, double scale, bool is_causal) {
  TORCH_CHECK(x_.dim() == 4, "softmax_fwd: x must be 4-D (B, H, LQ, LK), got ", x_.dim(), "-D");
  const ff::DType dtype = to_dtype(x_, "x");
  Tensor x = x_.contiguous();
  Tensor y = new_output_like(x);

  ff::SoftmaxFwdParams p{};
  p.dtype = dtype;
  p.b = x.size(0);
  p.h = x.size(1);
  p.lq = x.size(2);
  p.lk = x.size(3);
  p.scale = static_cast<float>(scale);
  p.is_causal = is_causal;
  p.x = x.data_ptr();
  p.y = y.data_ptr();
  p.mask_kind = ff::SoftmaxMaskKind::kNone;
  Tensor mask;  // an expanded view of mask_ (stride 0 on broadcast dims): nothing is copied
  if (mask_) {
    TORCH_CHECK(mask_->device() == x.device(), "softmax_fwd: mask must be on the same device as x (",
                x.device(), "), got ", mask_->device());
    TORCH_CHECK(mask_->scalar_type() == at::kBool || mask_->scalar_type() == x.scalar_type(),
                "softmax_fwd: mask must be bool (True = keep) or ", x.scalar_type(),
                " (added to the scores), got ", mask_->scalar_type());
    TORCH_CHECK(mask_->dim() == 4, "softmax_fwd: mask must be 4-D (B|1, H|1, LQ|1, LK|1), got ",
                mask_->dim(), "-D");
    for (int d = 0; d < 4; ++d)
      TORCH_CHECK(mask_->size(d) == x.size(d) || mask_->size(d) == 1, "softmax_fwd: mask of shape ",
                  mask_->sizes(), " does not broadcast to x's shape ", x.sizes(), " (dim ", d, ")");
    mask = mask_->expand(x.sizes());
    p.mask_kind = mask.scalar_type() == at::kBool ? ff::SoftmaxMaskKind::kBool : ff::SoftmaxMaskKind::kAdditive;
    p.mask = mask.data_ptr();
    p.mask_batch_stride = mask.stride(0);
    p.mask_head_stride = mask.stride(1);
    p.mask_row_stride = mask.stride(2);
    p.mask_col_stride = mask.stride(3);
  }
  if (x.numel() == 0) return y;
  if (x.is_cpu()) {
    ff::softmax_fwd_cpu(p);
  } else {
#ifdef FUSEDFORMER_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    ff::softmax_fwd_cuda(p, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
#else
    no_cuda("softmax_fwd");
#endif
  }
  return y;
}

Tensor softmax_bwd(const Tensor& dy_, const Tensor& y_, double scale) {
  TORCH_CHECK(y_.dim() >= 1, "softmax_bwd: y must have at least 1 dim (..., LK), got a scalar");
  const ff::DType dtype = to_dtype(y_, "y");
  check_like(dy_, y_, "dy", "y");
  TORCH_CHECK(dy_.sizes() == y_.sizes(), "softmax_bwd: dy must have the shape of y ", y_.sizes(),
              ", got ", dy_.sizes());
  Tensor y = y_.contiguous(), dy = dy_.contiguous();
  Tensor dx = new_output_like(y);
  if (y.numel() == 0) return dx;
  ff::SoftmaxBwdParams p{};
  p.dtype = dtype;
  p.cols = y.size(-1);
  p.rows = y.numel() / p.cols;
  p.scale = static_cast<float>(scale);
  p.dy = dy.data_ptr();
  p.y = y.data_ptr();
  p.dx = dx.data_ptr();
  if (y.is_cpu()) {
    ff::softmax_bwd_cpu(p);
  } else {
#ifdef FUSEDFORMER_WITH_CUDA
    const c10::cuda::CUDAGuard guard(y.device());
    ff::softmax_bwd_cuda(p, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
#else
    no_cuda("softmax_bwd");
#endif
  }
  return dx;
}

// ---------------------------------------------------------------------------------------
// FFN: act(x w1ᵀ + b1) w2ᵀ + b2

ff::FfnActivation to_activation(const std::string& name, const char* op) {
  if (name == "relu") return ff::FfnActivation::kRelu;
  if (name == "gelu") return ff::FfnActivation::kGelu;
  if (name == "gelu_tanh") return ff::FfnActivation::kGeluTanh;
  if (name == "swiglu") return ff::FfnActivation::kSwiglu;
  TORCH_CHECK(false, op, ": activation must be one of relu, gelu, gelu_tanh, swiglu, got '", name, "'");
}

struct FfnDims {
  int64_t m, c, f, f1;
};

// The checks shared by forward and backward; returns the sizes.
FfnDims check_ffn(const char* op, const Tensor& x, const Tensor& w1, const OptTensor& b1,
                  const Tensor& w2, const OptTensor& b2, ff::FfnActivation act, double dropout_p) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (M, C), got ", x.dim(), "-D");
  TORCH_CHECK(w1.dim() == 2, op, ": w1 must be 2-D (F1, C), got ", w1.dim(), "-D");
  TORCH_CHECK(w2.dim() == 2, op, ": w2 must be 2-D (C, F), got ", w2.dim(), "-D");
  to_dtype(x, "x");
  check_like(w1, x, "w1", "x");
  check_like(w2, x, "w2", "x");
  if (b1) check_like(*b1, x, "b1", "x");
  if (b2) check_like(*b2, x, "b2", "x");
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  FfnDims d{x.size(0), x.size(1), 0, w1.size(0)};
  TORCH_CHECK(d.c > 0, op, ": x must have C > 0 columns, got shape ", x.sizes());
  TORCH_CHECK(d.f1 > 0, op, ": w1 must have at least one row, got shape ", w1.sizes());
  const bool swiglu = act == ff::FfnActivation::kSwiglu;
  TORCH_CHECK(!swiglu || d.f1 % 2 == 0, op, ": w1 must have an even number of rows (gate and up ",
              "halves) for swiglu, got shape ", w1.sizes());
  d.f = swiglu ? d.f1 / 2 : d.f1;
  const int64_t m = d.m, c = d.c, f = d.f, f1 = d.f1;
  CHECK_SHAPE(w1, f1, c);
  CHECK_SHAPE(w2, c, f);
  if (b1) CHECK_SHAPE(*b1, f1);
  if (b2) CHECK_SHAPE(*b2, c);
  (void)m;
  return d;
}

// fp32 view of a tensor for the CPU twin's ATen GEMMs (fp32 accumulation and output, as the
// GPU's tensor-core GEMMs).
Tensor f32(const Tensor& t) { return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat); }

// out = a b (+ bias on every row), written straight into out when it has a's dtype (fp32, or
// bf16 for native_gemm: no temporary and copy); else in fp32 and rounded into 16-bit out.
void mm_into(Tensor& out, const Tensor& a, const Tensor& b, const OptTensor& bias = std::nullopt) {
  if (out.scalar_type() == a.scalar_type()) {
    if (bias) at::addmm_out(out, *bias, a, b);
    else at::mm_out(out, a, b);
  } else {
    out.copy_(bias ? at::addmm(f32(*bias), a, b) : at::mm(a, b));
  }
}

// out (=, or += where !first) the column sums of a, in out's dtype. ATen sums 16-bit inputs in
// fp32 either way; a dtype other than a's first copies all of a to it, so where out is fp32
// and a 16-bit, a is one chunk of rows.
void sum_rows_into(Tensor& out, const Tensor& a, bool first) {
  if (first) at::sum_out(out, a, 0, false, out.scalar_type());
  else out.add_(at::sum(a, 0, false, out.scalar_type()));
}

// out (=, or += where !first) a b.
void mm_accumulate(Tensor& out, const Tensor& a, const Tensor& b, bool first) {
  if (first) at::mm_out(out, a, b);
  else out.addmm_(a, b);
}

// Whether the CPU FFN runs ATen's GEMMs in t's dtype rather than through fp32: bf16, whose
// GEMM oneDNN runs natively (fp32 sums, one rounding; on the AMX tile unit where the CPU has
// it: 1.2 ms against 7.8 through fp32 at 1024 x 512 x 2048 on the dev machine, as torch's own
// bf16 Linear). fp16 has no such kernel on CPUs without AMX-FP16 (7.4 ms either way).
bool native_gemm(const Tensor& t) { return t.scalar_type() == at::kBFloat16; }

// The CPU FFN runs in chunks of rows, so that its workspaces (hidden, d_pre, and the fp32
// GEMM operands and outputs of fp16) are a chunk's, not (M, F)'s: rows for about 32 MiB of
// fp32 (rows, F1), at least 256 (GEMMs that long still run at full rate here). Only pre
// (saved for backward) and the outputs are whole. FUSEDFORMER_CPU_FFN_CHUNK_ROWS (read at each
// call) sets the rows, for tests.
int64_t ffn_cpu_chunk_rows(int64_t m, int64_t f1) {
  int64_t rows = std::max<int64_t>(256, (int64_t(32) << 20) / (4 * f1));
  if (const char* env = std::getenv("FUSEDFORMER_CPU_FFN_CHUNK_ROWS")) {
    char* end = nullptr;
    rows = std::strtoll(env, &end, 10);
    TORCH_CHECK(*env != '\0' && *end == '\0' && rows > 0,
                "FUSEDFORMER_CPU_FFN_CHUNK_ROWS must be a positive integer, got '", env, "'");
  }
  return std::max<int64_t>(1, std::min(rows, m));
}

// The CPU forward: per chunk of rows, ATen's GEMM x w1ᵀ, the fused epilogue (b1, act,
// dropout -> pre, hidden) and ATen's GEMM hidden w2ᵀ + b2. p holds the whole problem. Where
// pre is not saved (p.pre nullptr), a chunk's pre lives in a workspace.
void ffn_fwd_cpu(const ff::FfnFwdParams& p, const Tensor& x, const Tensor& w1, const OptTensor& b1,
                 const Tensor& w2, const OptTensor& b2, Tensor& y, Tensor& pre) {
  // In bf16 (native_gemm) the first GEMM writes pre itself with b1 added before its one
  // rounding (a bf16 x w1ᵀ rounded first and b1 added after would round twice, and where b1
  // cancels the product, flip the sign of pre: relu's gradient then picks the wrong elements,
  // dw1 off by 1.1 against PyTorch's 0.07 at 67 x 40 x 136). Else in fp32: for fp32 straight
  // into pre, the epilogue adding b1 in place (each element read before it is written).
  const bool native = native_gemm(x), fp32 = x.scalar_type() == at::kFloat;
  const Tensor w1_op = native ? w1 : f32(w1), w2_op = native ? w2 : f32(w2);
  const int64_t rows = ffn_cpu_chunk_rows(p.m, w1.size(0));
  Tensor hidden = torch::empty({rows, p.f}, x.options());
  const bool save_pre = p.pre != nullptr;
  const Tensor pre_ws = save_pre ? Tensor() : torch::empty({rows, w1.size(0)}, x.options());
  for (int64_t r0 = 0; r0 < p.m; r0 += rows) {
    const int64_t n = std::min(rows, p.m - r0);
    const Tensor xs = x.narrow(0, r0, n), h = hidden.narrow(0, 0, n);
    Tensor pre_s = save_pre ? pre.narrow(0, r0, n) : pre_ws.narrow(0, 0, n), ys = y.narrow(0, r0, n), acc1;
    if (native) mm_into(pre_s, xs, w1.t(), b1);
    else acc1 = fp32 ? at::mm_out(pre_s, xs, w1.t()) : at::mm(f32(xs), w1_op.t());
    ff::FfnFwdParams c = p;
    c.m = n;
    c.row0 = r0;
    c.pre = pre_s.data_ptr();
    c.hidden = h.data_ptr();
    c.acc1 = native ? nullptr : acc1.data_ptr<float>();
    c.pre_from_gemm = native;
    ff::ffn_fwd_epilogue_cpu(c);
    mm_into(ys, native ? h : f32(h), w2_op.t(), b2);
  }
}

// The CPU backward: per chunk of rows, ATen's GEMM dy w2, the fused epilogue (dropout, act' ->
// d_pre; hidden recomputed), and ATen's GEMMs for dx and the weight gradients, which sum over
// the chunks in fp32 (in dw1 and dw2 themselves for fp32) and are rounded once at the end.
// bf16 runs as one chunk: oneDNN's bf16 GEMM has no fp32 output to carry those sums in, and
// a bf16 partial per chunk would add a rounding per chunk. Its workspaces are then (M, F1)
// d_pre and (M, F) hidden, in bf16, as PyTorch's own backward holds.
void ffn_bwd_cpu(const ff::FfnBwdParams& p, const Tensor& dy, const Tensor& x, const Tensor& w1,
                 const Tensor& w2, const Tensor& pre, Tensor& dx, Tensor& dw1, Tensor* db1, Tensor& dw2,
                 Tensor* db2) {
  const bool native = native_gemm(x);
  // in_dtype: the GEMMs' operands and outputs have x's dtype (fp32, or native bf16), else fp32.
  const bool in_dtype = native || x.scalar_type() == at::kFloat;
  const auto op = [native](const Tensor& t) { return native ? t : f32(t); };
  const Tensor w1_op = op(w1), w2_op = op(w2);
  const int64_t f1 = w1.size(0), rows = native ? p.m : ffn_cpu_chunk_rows(p.m, f1);
  Tensor d_pre = torch::empty({rows, f1}, x.options()), hidden = torch::empty({rows, p.f}, x.options());
  // The sums over rows: in place where in_dtype (bf16 is one chunk), else into fp32.
  const auto sums = [&](Tensor& t) { return in_dtype ? t : torch::empty(t.sizes(), t.options().dtype(at::kFloat)); };
  Tensor dw1_sum = sums(dw1), dw2_sum = sums(dw2);
  Tensor db1_sum = db1 ? sums(*db1) : Tensor(), db2_sum = db2 ? sums(*db2) : Tensor();
  for (int64_t r0 = 0; r0 < p.m; r0 += rows) {
    const int64_t n = std::min(rows, p.m - r0);
    const bool first = r0 == 0;
    const Tensor dys = dy.narrow(0, r0, n), dy_op = op(dys);
    Tensor dp = d_pre.narrow(0, 0, n), h = hidden.narrow(0, 0, n), dxs = dx.narrow(0, r0, n);
    // (n, F) dy w2: in_dtype, it goes into hidden, which the epilogue overwrites vector by
    // vector after reading it.
    const Tensor acc_dh = in_dtype ? at::mm_out(h, dys, w2) : at::mm(dy_op, w2_op);
    ff::FfnBwdParams c = p;
    c.m = n;
    c.row0 = r0;
    c.pre = pre.narrow(0, r0, n).data_ptr();
    c.d_pre = dp.data_ptr();
    c.hidden = h.data_ptr();
    c.acc_dh = acc_dh.data_ptr();
    c.acc_in_dtype = in_dtype;
    ff::ffn_bwd_epilogue_cpu(c);
    const Tensor dp_op = op(dp);
    mm_into(dxs, dp_op, w1_op);
    mm_accumulate(dw1_sum, dp_op.t(), op(x.narrow(0, r0, n)), first);
    mm_accumulate(dw2_sum, dy_op.t(), op(h), first);
    if (db1) sum_rows_into(db1_sum, dp, first);
    if (db2) sum_rows_into(db2_sum, dys, first);
  }
  if (!in_dtype) {  // rounded once, from the fp32 sums
    dw1.copy_(dw1_sum);
    dw2.copy_(dw2_sum);
    if (db1) db1->copy_(db1_sum);
    if (db2) db2->copy_(db2_sum);
  }
}

// save_pre false (no backward will run): pre comes back (0, F1) and no kernel stores it.
std::tuple<Tensor, Tensor> ffn_fwd(const Tensor& x_, const Tensor& w1_, const OptTensor& b1_,
                                   const Tensor& w2_, const OptTensor& b2_, const std::string& activation,
                                   double dropout_p, int64_t seed, bool save_pre) {
  const ff::FfnActivation act = to_activation(activation, "ffn_fwd");
  const FfnDims d = check_ffn("ffn_fwd", x_, w1_, b1_, w2_, b2_, act, dropout_p);
  Tensor x = x_.contiguous(), w1 = w1_.contiguous(), w2 = w2_.contiguous();
  OptTensor b1 = contiguous(b1_), b2 = contiguous(b2_);
  Tensor y = new_output({d.m, d.c}, x.options());
  Tensor pre = new_output({save_pre ? d.m : 0, d.f1}, x.options());
  if (d.m == 0) return {y, pre};

  ff::FfnFwdParams p{};
  p.dtype = to_dtype(x, "x");
  p.act = act;
  p.m = d.m;
  p.c = d.c;
  p.f = d.f;
  p.dropout_p = static_cast<float>(dropout_p);
  p.seed = static_cast<uint64_t>(seed);
  p.x = x.data_ptr();
  p.w1 = w1.data_ptr();
  p.b1 = ptr_or_null(b1);
  p.w2 = w2.data_ptr();
  p.b2 = ptr_or_null(b2);
  p.y = y.data_ptr();
  p.pre = save_pre ? pre.data_ptr() : nullptr;
  if (x.is_cpu()) {
    ffn_fwd_cpu(p, x, w1, b1, w2, b2, y, pre);
  } else {
#ifdef FUSEDFORMER_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    Tensor hidden = torch::empty({d.m, d.f}, x.options());  // workspace: act(pre), the second GEMM's input
    p.hidden = hidden.data_ptr();
    ff::ffn_fwd_cuda(p, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
#else
    no_cuda("ffn_fwd");
#endif
  }
  return {y, pre};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> ffn_bwd(
    const Tensor& dy_, const Tensor& x_, const Tensor& w1_, const OptTensor& b1_, const Tensor& w2_,
    const OptTensor& b2_, const Tensor& pre_, const std::string& activation, double dropout_p,
    int64_t seed) {
  const ff::FfnActivation act = to_activation(activation, "ffn_bwd");
  const FfnDims d = check_ffn("ffn_bwd", x_, w1_, b1_, w2_, b2_, act, dropout_p);
  const int64_t m = d.m, c = d.c, f1 = d.f1;
  Tensor dy = dy_.contiguous(), x = x_.contiguous(), w1 = w1_.contiguous(), w2 = w2_.contiguous();
  Tensor pre = pre_.contiguous();
  check_like(dy, x, "dy", "x");
  check_like(pre, x, "pre", "x");
  CHECK_SHAPE(dy, m, c);
  CHECK_SHAPE(pre, m, f1);
  Tensor dx = new_output_like(x), dw1 = new_output_like(w1), dw2 = new_output_like(w2);
  Tensor db1 = new_output({b1_ ? f1 : 0}, x.options()), db2 = new_output({b2_ ? c : 0}, x.options());
  if (m == 0) {
    dw1.zero_();
    dw2.zero_();
    db1.zero_();
    db2.zero_();
    return {dx, dw1, db1, dw2, db2};
  }

  ff::FfnBwdParams p{};
  p.dtype = to_dtype(x, "x");
  p.act = act;
  p.m = m;
  p.c = c;
  p.f = d.f;
  p.dropout_p = static_cast<float>(dropout_p);
  p.seed = static_cast<uint64_t>(seed);
  p.dy = dy.data_ptr();
  p.x = x.data_ptr();
  p.w1 = w1.data_ptr();
  p.w2 = w2.data_ptr();
  p.pre = pre.data_ptr();
  p.dx = dx.data_ptr();
  p.dw1 = dw1.data_ptr();
  p.db1 = b1_ ? db1.data_ptr() : nullptr;
  p.dw2 = dw2.data_ptr();
  p.db2 = b2_ ? db2.data_ptr() : nullptr;
  if (x.is_cpu()) {
    ffn_bwd_cpu(p, dy, x, w1, w2, pre, dx, dw1, b1_ ? &db1 : nullptr, dw2, b2_ ? &db2 : nullptr);
  } else {
#ifdef FUSEDFORMER_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    Tensor d_pre = torch::empty({m, f1}, x.options()), hidden = torch::empty({m, d.f}, x.options());
    p.d_pre = d_pre.data_ptr();  // workspaces
    p.hidden = hidden.data_ptr();
    ff::ffn_bwd_cuda(p, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
#else
    no_cuda("ffn_bwd");
#endif
  }
  return {dx, dw1, db1, dw2, db2};
}

// The dropout keep-mask ffn_fwd draws for `seed` over a hidden of `shape` (..., F): for tests,
// to hand the oracle the same mask. Always computed on the CPU (bool, `shape`).
Tensor ffn_dropout_mask(int64_t seed, const std::vector<int64_t>& shape, double dropout_p) {
  TORCH_CHECK(!shape.empty(), "ffn_dropout_mask: shape must have at least 1 dim (..., F)");
  for (int64_t s : shape) TORCH_CHECK(s >= 0, "ffn_dropout_mask: shape must be non-negative, got ", shape);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "ffn_dropout_mask: dropout_p must be in [0, 1), got ",
              dropout_p);
  Tensor keep = torch::empty(shape, at::TensorOptions().dtype(at::kBool));
  if (keep.numel() > 0)
    ff::ffn_dropout_mask_cpu(static_cast<uint64_t>(seed), keep.numel(), shape.back(),
                             static_cast<float>(dropout_p), keep.data_ptr<bool>());
  return keep;
}

// ---------------------------------------------------------------------------------------

// The vector ISA the CPU kernels were compiled for (setup.py: the building machine's).
const char* built_isa() {
#if defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
  return "avx2+fma+avx512f+avx512bf16+amx";  // AMX used only where Linux grants it (csrc/cpu/attention.cpp)
#elif defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
  return "avx2+fma+avx512f+avx512bf16";
#elif defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
  return "avx2+fma+avx512f";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2+fma";
#else
  return "baseline";
#endif
}

// A binary built with AVX2 would die of SIGILL on a CPU without it: refuse to load instead.
void check_cpu_isa() {
#if defined(__AVX2__) && defined(__FMA__) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma"))
    throw std::runtime_error(
        "fusedformer._C was built for AVX2+FMA (the building machine's CPU) but this CPU lacks "
        "them: rebuild here, or with FUSEDFORMER_CPU_FLAGS=\"\" for a baseline x86-64 build");
#endif
#if defined(__AVX512F__) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx512f"))
    throw std::runtime_error(
        "fusedformer._C was built for AVX-512F (the building machine's CPU) but this CPU lacks "
        "it: rebuild here, or with FUSEDFORMER_CPU_FLAGS=\"-mavx2 -mfma -mf16c\"");
#endif
#if defined(__AVX512BF16__) && (defined(__x86_64__) || defined(__i386__))
  if (!__builtin_cpu_supports("avx512bf16") || !__builtin_cpu_supports("avx512bw"))
    throw std::runtime_error(
        "fusedformer._C was built for AVX512_BF16 (the building machine's CPU) but this CPU lacks "
        "it: rebuild here, or with FUSEDFORMER_CPU_FLAGS=\"-mavx2 -mfma -mf16c -mavx512f\"");
#endif
}

// "wgmma (sm_90a)" where the CUDA attention and FFN launch their warpgroup-MMA kernels on the
// current device, "mma.sync" where their sm_80 ones, "" without CUDA (build or device).
std::string cuda_matmul_path() {
#ifdef FUSEDFORMER_WITH_CUDA
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    cudaGetLastError();  // clear the error state the query may leave
    return "";
  }
  return fusedformer::wgmma_kernels_active_cuda() ? "wgmma (sm_90a)" : "mma.sync";
#else
  return "";
#endif
}

pybind11::dict build_info() {
  pybind11::dict d;
#ifdef FUSEDFORMER_WITH_CUDA
  d["cuda"] = true;
  d["cuda_reason"] = "";
#else
  d["cuda"] = false;
  d["cuda_reason"] = FUSEDFORMER_CUDA_SKIP_REASON;
#endif
  d["cpu_isa"] = built_isa();
  d["cpu_bf16_units"] = fusedformer::attention_cpu_bf16_units();
#ifdef _OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  // The ops each device's kernels implement (the cpu and cuda backends of fusedformer.kernels).
  d["cpu_ops"] = pybind11::make_tuple("layer_norm", "attention", "softmax", "ffn");
  std::vector<std::string> cuda_ops;  // one push_back per op with a CUDA kernel
#ifdef FUSEDFORMER_WITH_CUDA
  cuda_ops.push_back("attention");
  cuda_ops.push_back("layer_norm");
  cuda_ops.push_back("softmax");
  cuda_ops.push_back("ffn");
#endif
  d["cuda_ops"] = pybind11::tuple(pybind11::cast(cuda_ops));
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  check_cpu_isa();
  m.doc() = "fusedformer C++/CUDA kernels (see csrc/). Use through fusedformer, not directly.";
  m.def("build_info", &build_info, "What this build contains: CUDA or not (and why), ops.");
  m.def("cuda_matmul_path", &cuda_matmul_path,
        "The tensor-core instructions the CUDA attention and FFN use on the current device.");
  m.def("set_nan_fill", [](bool on) { g_nan_fill = on; },
        "Debug: fill outputs with NaN before kernels write them (used by the tests).");
  m.def("layer_norm_fwd", &layer_norm_fwd, "LayerNorm (+ residual) forward -> (y, h, mean, rstd)",
        pybind11::arg("x"), pybind11::arg("residual"), pybind11::arg("weight"), pybind11::arg("bias"),
        pybind11::arg("eps"));
  m.def("layer_norm_bwd", &layer_norm_bwd, "LayerNorm (+ residual) backward -> (dx, dweight, dbias)",
        pybind11::arg("dy"), pybind11::arg("dh"), pybind11::arg("h"), pybind11::arg("weight"),
        pybind11::arg("mean"), pybind11::arg("rstd"), pybind11::arg("need_dweight"),
        pybind11::arg("need_dbias"));
  // Attention
  m.def("attention_fwd", &attention_fwd, "Attention forward -> (o, lse); num_splits: split-KV key ranges, 0 = the backend chooses", pybind11::arg("q"),
        pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("mask"), pybind11::arg("scale"),
        pybind11::arg("is_causal"), pybind11::arg("dropout_p"), pybind11::arg("seed"),
        pybind11::arg("num_splits") = 0);
  m.def("attention_num_splits", &ff::attention_num_splits,
        "Split-KV's choice: key ranges for `blocks` query blocks of `key_blocks` key blocks on `workers`",
        pybind11::arg("blocks"), pybind11::arg("key_blocks"), pybind11::arg("workers"));
  m.def("attention_bwd", &attention_bwd, "Attention backward -> (dq, dk, dv)", pybind11::arg("do"),
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("o"),
        pybind11::arg("lse"), pybind11::arg("mask"), pybind11::arg("scale"),
        pybind11::arg("is_causal"), pybind11::arg("dropout_p"), pybind11::arg("seed"));
  m.def("attention_dropout_mask", &attention_dropout_mask,
        "The bool keep-mask (B, HQ, LQ, LK) attention draws for a seed (CPU, for tests)",
        pybind11::arg("seed"), pybind11::arg("b"), pybind11::arg("hq"), pybind11::arg("lq"),
        pybind11::arg("lk"), pybind11::arg("dropout_p"));
  // Softmax
  m.def("softmax_fwd", &softmax_fwd, "Scaled + masked softmax forward -> y", pybind11::arg("x"),
        pybind11::arg("mask"), pybind11::arg("scale"), pybind11::arg("is_causal"));
  m.def("softmax_bwd", &softmax_bwd, "Scaled + masked softmax backward -> dx", pybind11::arg("dy"),
        pybind11::arg("y"), pybind11::arg("scale"));
  // FFN
  m.def("ffn_fwd", &ffn_fwd, "FFN forward -> (y, pre); pre is (0, F1) where save_pre is false",
        pybind11::arg("x"), pybind11::arg("w1"), pybind11::arg("b1"), pybind11::arg("w2"), pybind11::arg("b2"),
        pybind11::arg("activation"), pybind11::arg("dropout_p"), pybind11::arg("seed"),
        pybind11::arg("save_pre") = true);
  m.def("ffn_bwd", &ffn_bwd, "FFN backward -> (dx, dw1, db1, dw2, db2)", pybind11::arg("dy"),
        pybind11::arg("x"), pybind11::arg("w1"), pybind11::arg("b1"), pybind11::arg("w2"),
        pybind11::arg("b2"), pybind11::arg("pre"), pybind11::arg("activation"),
        pybind11::arg("dropout_p"), pybind11::arg("seed"));
  m.def("ffn_dropout_mask", &ffn_dropout_mask, "The bool keep-mask of shape (..., F) ffn draws for a seed (CPU, for tests)",
        pybind11::arg("seed"), pybind11::arg("shape"), pybind11::arg("dropout_p"));
}
