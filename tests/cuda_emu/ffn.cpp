// csrc/cuda/ffn.cu (forward and backward, through ffn_fwd_cuda / ffn_bwd_cuda, so the host
// dispatch, operand layouts, grids and the swiglu tile pairing are the real ones) against an
// fp64 reference that follows the CPU path (csrc/bindings.cpp ffn_fwd / ffn_bwd, csrc/cpu/ffn.cpp):
//   pre = x w1ᵀ + b1, stored in T; hidden = act(pre as stored) · keep / (1 - p), stored in T;
//   y = hidden w2ᵀ + b2;
//   backward from the kernel's own stored pre: d_pre = (dy w2) · keep / (1 - p) · act'(pre),
//   stored in T; dx = d_pre w1, dw1 = d_preᵀ x, db1 = Σ_rows d_pre, dw2 = dyᵀ hidden,
//   db2 = Σ_rows dy.
// The activations and their derivatives are evaluated in double here (not ffn.h's float
// helpers); only the dropout keep-mask is drawn through ffn.h's ffn_dropout_scale, as both
// kernels do. Shapes reach every load path of the GEMMs: 16-byte cp.async (K-contiguous,
// aligned, K % 8 == 0), 16-byte transposed loads (G3-G6 with rows % 8 == 0), and element by
// element (odd sizes), with M, N, K off the tile multiples and more than one block per dim.
// Run by tests/test_cuda_emulated.py; see driver.h for the command line.
#include "ffn.cu"  // the real source, launch syntax rewritten at build time
#include "driver.h"

#include <cstring>

namespace {

using namespace fusedformer;
using driver::load;

struct Case {
  FfnActivation act;
  int64_t m, c, f;
  bool bias;
  float dropout;
  int device = 0;  // the emulator's device: 0 runs sm_80 code, 1 sm_90a (the wgmma GEMM)
  bool without_pre = false;  // also run the forward with pre = nullptr: y must keep its bits
};

double act_ref(FfnActivation act, double a) {
  switch (act) {
    case FfnActivation::kRelu: return a > 0 ? a : 0.0;
    case FfnActivation::kGelu: return 0.5 * a * (1.0 + std::erf(a / std::sqrt(2.0)));
    default: {
      const double k = std::sqrt(2.0 / M_PI);
      return 0.5 * a * (1.0 + std::tanh(k * (a + 0.044715 * a * a * a)));
    }
  }
}
double act_grad_ref(FfnActivation act, double a) {
  switch (act) {
    case FfnActivation::kRelu: return a > 0 ? 1.0 : 0.0;
    case FfnActivation::kGelu:
      return 0.5 * (1.0 + std::erf(a / std::sqrt(2.0))) + a * std::exp(-0.5 * a * a) / std::sqrt(2.0 * M_PI);
    default: {
      const double k = std::sqrt(2.0 / M_PI), t = std::tanh(k * (a + 0.044715 * a * a * a));
      return 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * a * a);
    }
  }
}
double sigmoid_ref(double g) { return 1.0 / (1.0 + std::exp(-g)); }

// A double rounded to storage precision, as the CPU path stores pre, hidden and d_pre.
template <typename T>
double round_t(double v) { return load(driver::store<T>(float(v))); }

template <typename T>
std::vector<T> scaled_random(size_t n, double scale) {  // nn.Linear-like weights: N(0, 1 / fan_in)
  std::vector<T> v(n);
  for (T& x : v) x = driver::store<T>(float(driver::randn() * scale));
  return v;
}

// Tolerances on max |err| / max(1, max |ref|). fp32: the SIMT GEMM accumulates K <= 140
// products in fp32 FMA, and the float activations of ffn.h are within a few ulp of the double
// ones here; measured at most 5.7e-7. bf16 / fp16: every output, and pre, hidden and d_pre in
// between, is stored in 16 bits (relative rounding 2^-9 for bf16, 2^-11 for fp16), and an
// element of pre whose fp32 and fp64 sums straddle a rounding boundary differs by one ulp;
// measured at most 3.7e-3 (bf16) and 4.2e-4 (fp16), mma.sync and wgmma GEMMs alike.
constexpr driver::Tolerance kTol{2e-6, 1e-2, 1.5e-3};

template <typename T>
void run(const Case& cs) {
  const double tol = driver::pick<T>(kTol);
  const int64_t m = cs.m, c = cs.c, f = cs.f, f1 = ffn_f1(cs.act, f);
  cudaSetDevice(cs.device);
  const bool swiglu = cs.act == FfnActivation::kSwiglu;
  const uint64_t seed = 0x5eed1234ull;
  const std::vector<T> x = driver::random_tensor<T>(m * c), w1 = scaled_random<T>(f1 * c, 1.0 / std::sqrt(double(c))),
                       b1 = driver::random_tensor<T>(f1), w2 = scaled_random<T>(c * f, 1.0 / std::sqrt(double(f))),
                       b2 = driver::random_tensor<T>(c), dy = driver::random_tensor<T>(m * c);
  std::vector<T> y = driver::poisoned<T>(m * c), pre = driver::poisoned<T>(m * f1),
                 hidden = driver::poisoned<T>(m * f);

  FfnFwdParams p{};
  p.dtype = driver::dtype_of<T>();
  p.act = cs.act;
  p.m = m, p.c = c, p.f = f;
  p.dropout_p = cs.dropout;
  p.seed = seed;
  p.x = x.data(), p.w1 = w1.data(), p.b1 = cs.bias ? b1.data() : nullptr;
  p.w2 = w2.data(), p.b2 = cs.bias ? b2.data() : nullptr;
  p.y = y.data(), p.pre = pre.data(), p.hidden = hidden.data();
  ffn_fwd_cuda(p, nullptr);
  cudaError_t fwd_err = cudaGetLastError();
  bool same_without_pre = true;
  if (cs.without_pre) {  // inference: nothing stored for a backward, the same y
    std::vector<T> y2 = driver::poisoned<T>(m * c), hidden2 = driver::poisoned<T>(m * f);
    FfnFwdParams q = p;
    q.y = y2.data(), q.pre = nullptr, q.hidden = hidden2.data();
    ffn_fwd_cuda(q, nullptr);
    if (fwd_err == cudaSuccess) fwd_err = cudaGetLastError();
    same_without_pre = std::memcmp(y2.data(), y.data(), y.size() * sizeof(T)) == 0;
  }

  std::vector<T> dx = driver::poisoned<T>(m * c), dw1 = driver::poisoned<T>(f1 * c), db1 = driver::poisoned<T>(f1),
                 dw2 = driver::poisoned<T>(c * f), db2 = driver::poisoned<T>(c), d_pre = driver::poisoned<T>(m * f1),
                 hidden_b = driver::poisoned<T>(m * f);
  FfnBwdParams bp{};
  bp.dtype = p.dtype;
  bp.act = cs.act;
  bp.m = m, bp.c = c, bp.f = f;
  bp.dropout_p = cs.dropout;
  bp.seed = seed;
  bp.dy = dy.data(), bp.x = x.data(), bp.w1 = w1.data(), bp.w2 = w2.data(), bp.pre = pre.data();
  bp.dx = dx.data(), bp.dw1 = dw1.data(), bp.db1 = cs.bias ? db1.data() : nullptr;
  bp.dw2 = dw2.data(), bp.db2 = cs.bias ? db2.data() : nullptr;
  bp.d_pre = d_pre.data(), bp.hidden = hidden_b.data();
  ffn_bwd_cuda(bp, nullptr);
  const cudaError_t bwd_err = cudaGetLastError();

  // keep / (1 - p) per hidden element, the keep bit from ffn.h's helper.
  const double rp = cs.dropout > 0 ? 1.0 / (1.0 - double(cs.dropout)) : 1.0;
  auto drop = [&](int64_t i, int64_t j) {
    return ffn_dropout_scale(seed, i, j, f, cs.dropout) != 0.f ? rp : 0.0;
  };

  // ---- forward reference (independent of the kernel's outputs)
  std::vector<double> rpre(m * f1), rhid(m * f), ry(m * c);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t n = 0; n < f1; ++n) {
      double acc = cs.bias ? load(b1[n]) : 0.0;
      for (int64_t k = 0; k < c; ++k) acc += load(x[i * c + k]) * load(w1[n * c + k]);
      rpre[i * f1 + n] = acc;
    }
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < f; ++j) {
      const double a = round_t<T>(rpre[i * f1 + j]);
      const double h = swiglu ? a * sigmoid_ref(a) * round_t<T>(rpre[i * f1 + f + j]) : act_ref(cs.act, a);
      rhid[i * f + j] = round_t<T>(h * drop(i, j));
    }
  for (int64_t i = 0; i < m; ++i)
    for (int64_t n = 0; n < c; ++n) {
      double acc = cs.bias ? load(b2[n]) : 0.0;
      for (int64_t j = 0; j < f; ++j) acc += rhid[i * f + j] * load(w2[n * f + j]);
      ry[i * c + n] = acc;
    }

  // ---- backward reference, from the kernel's stored pre (as the kernel computes it)
  std::vector<double> rdpre(m * f1), rhb(m * f), rdx(m * c, 0.0), rdw1(f1 * c, 0.0), rdb1(f1, 0.0),
      rdw2(c * f, 0.0), rdb2(c, 0.0);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < f; ++j) {
      double dh = 0.0;
      for (int64_t k = 0; k < c; ++k) dh += load(dy[i * c + k]) * load(w2[k * f + j]);
      const double d = drop(i, j), g = dh * d, a = load(pre[i * f1 + j]);
      if (swiglu) {
        const double up = load(pre[i * f1 + f + j]), s = sigmoid_ref(a);
        rdpre[i * f1 + j] = round_t<T>(g * up * s * (1.0 + a * (1.0 - s)));
        rdpre[i * f1 + f + j] = round_t<T>(g * a * s);
        rhb[i * f + j] = round_t<T>(a * s * up * d);
      } else {
        rdpre[i * f1 + j] = round_t<T>(g * act_grad_ref(cs.act, a));
        rhb[i * f + j] = round_t<T>(act_ref(cs.act, a) * d);
      }
    }
  for (int64_t i = 0; i < m; ++i)
    for (int64_t n = 0; n < f1; ++n) {
      const double dp = rdpre[i * f1 + n];
      rdb1[n] += dp;
      for (int64_t k = 0; k < c; ++k) {
        rdx[i * c + k] += dp * load(w1[n * c + k]);
        rdw1[n * c + k] += dp * load(x[i * c + k]);
      }
    }
  for (int64_t i = 0; i < m; ++i)
    for (int64_t k = 0; k < c; ++k) {
      const double g = load(dy[i * c + k]);
      rdb2[k] += g;
      for (int64_t j = 0; j < f; ++j) rdw2[k * f + j] += g * rhb[i * f + j];
    }

  static const char* const kActs[] = {"relu", "gelu", "gelu_tanh", "swiglu"};
  char config[176];
  snprintf(config, sizeof config, "%-4s sm%d %-9s m=%ld c=%ld f=%ld bias=%d p=%.1f", driver::dtype_name<T>(),
           cs.device == 1 ? 90 : 80, kActs[int(cs.act)], long(m), long(c), long(f), int(cs.bias), cs.dropout);
  driver::report("launch", config, fwd_err == cudaSuccess && bwd_err == cudaSuccess ? 0.0 : INFINITY, tol);
  driver::report("pre", config, driver::rel_error(pre, rpre), tol);
  driver::report("y", config, driver::rel_error(y, ry), tol);
  if (cs.without_pre) driver::report("y-without-pre", config, same_without_pre ? 0.0 : INFINITY, tol);
  driver::report("d_pre", config, driver::rel_error(d_pre, rdpre), tol);
  driver::report("dx", config, driver::rel_error(dx, rdx), tol);
  driver::report("dw1", config, driver::rel_error(dw1, rdw1), tol);
  driver::report("dw2", config, driver::rel_error(dw2, rdw2), tol);
  if (cs.bias) {
    driver::report("db1", config, driver::rel_error(db1, rdb1), tol);
    driver::report("db2", config, driver::rel_error(db2, rdb2), tol);
  } else {  // no bias: the kernel must not write db1 / db2 (they stay NaN-poisoned)
    const bool untouched = std::all_of(db1.begin(), db1.end(), [](T v) { return std::isnan(load(v)); }) &&
                           std::all_of(db2.begin(), db2.end(), [](T v) { return std::isnan(load(v)); });
    driver::report("no-db", config, untouched ? 0.0 : INFINITY, tol);
  }
}

using A = FfnActivation;
const bool registered = [] {
  // Every 16-bit case also runs on the emulated sm_90a device, where the GEMMs are gemm_wgmma.
  auto add = [](auto tag, Case c) {
    using T = decltype(tag);
    driver::add_on_both_devices<T>(c, [](const Case& cs) { run<T>(cs); });
  };
  const __nv_bfloat16 bf{};
  const __half h{};
  add(0.f, {A::kRelu, 1, 40, 97, true, 0.f});
  add(0.f, {A::kGelu, 67, 64, 136, false, 0.2f, 0, true});
  add(0.f, {A::kGeluTanh, 130, 33, 70, true, 0.2f});
  add(0.f, {A::kSwiglu, 130, 33, 70, true, 0.f});
  add(0.f, {A::kSwiglu, 67, 64, 136, false, 0.2f});
  add(bf, {A::kRelu, 67, 64, 136, true, 0.2f});
  add(bf, {A::kGelu, 1, 40, 97, true, 0.f});
  add(bf, {A::kGeluTanh, 67, 64, 136, false, 0.f});
  add(bf, {A::kSwiglu, 130, 33, 70, true, 0.2f, 0, true});
  add(bf, {A::kSwiglu, 67, 64, 136, true, 0.f});
  add(h, {A::kRelu, 130, 33, 70, false, 0.f});
  add(h, {A::kGelu, 67, 64, 136, true, 0.2f});
  add(h, {A::kGeluTanh, 1, 40, 97, true, 0.2f});
  add(h, {A::kSwiglu, 1, 40, 97, false, 0.f});
  add(bf, {A::kGelu, 200, 72, 264, true, 0.f});  // 4-5 k tiles: every stage of the wgmma ring reused
  return true;
}();

}  // namespace

int main(int argc, char** argv) { return driver::main(argc, argv); }
