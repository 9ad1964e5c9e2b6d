// fusedformer._C: the pybind11 module, and the only C++ file that sees torch.
//
// Each op binding: check arguments with messages that name the argument, what was expected
// and what came; make inputs contiguous (gradients often arrive as stride-0 expanded
// tensors); allocate outputs; fill the op's params struct; dispatch by device to the
// torch-free kernel (csrc/cpu/*.cpp or csrc/cuda/*.cu) on the current stream.
#include <torch/extension.h>

#include <optional>
#include <string>
#include <tuple>

#include "common.h"
#include "layer_norm.h"

#ifdef FUSEDFORMER_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
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
    no_cuda("layer_norm_fwd");
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
  const int64_t groups = ff::layer_norm_bwd_groups(rows);
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
    no_cuda("layer_norm_bwd");
  }
  return {dx, dweight, dbias};
}

// ---------------------------------------------------------------------------------------

pybind11::dict build_info() {
  pybind11::dict d;
#ifdef FUSEDFORMER_WITH_CUDA
  d["cuda"] = true;
  d["cuda_reason"] = "";
#else
  d["cuda"] = false;
  d["cuda_reason"] = FUSEDFORMER_CUDA_SKIP_REASON;
#endif
#ifdef _OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  // The ops each device's kernels implement (the cpu and cuda backends of fusedformer.kernels).
  d["cpu_ops"] = pybind11::make_tuple("layer_norm");
  d["cuda_ops"] = pybind11::make_tuple();
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fusedformer C++/CUDA kernels (see csrc/). Use through fusedformer, not directly.";
  m.def("build_info", &build_info, "What this build contains: CUDA or not (and why), ops.");
  m.def("set_nan_fill", [](bool on) { g_nan_fill = on; },
        "Debug: fill outputs with NaN before kernels write them (used by the tests).");
  m.def("layer_norm_fwd", &layer_norm_fwd, "LayerNorm (+ residual) forward -> (y, h, mean, rstd)",
        pybind11::arg("x"), pybind11::arg("residual"), pybind11::arg("weight"), pybind11::arg("bias"),
        pybind11::arg("eps"));
  m.def("layer_norm_bwd", &layer_norm_bwd, "LayerNorm (+ residual) backward -> (dx, dweight, dbias)",
        pybind11::arg("dy"), pybind11::arg("dh"), pybind11::arg("h"), pybind11::arg("weight"),
        pybind11::arg("mean"), pybind11::arg("rstd"), pybind11::arg("need_dweight"),
        pybind11::arg("need_dbias"));
}
