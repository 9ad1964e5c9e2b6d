// Shared pieces of the tests/cuda_emu drivers: deterministic inputs, storage conversions, the
// error metric against an fp64 reference, the case table and the command line.
//
// A driver registers cases; `driver ORDER SHARD NSHARDS` runs the cases whose index is SHARD
// modulo NSHARDS with the fiber scheduling ORDER (0 forward, 1 reverse, 2 random; fibers.h),
// prints one line per checked output ("ok" or "FAIL", the case, the error, the tolerance) and
// exits non-zero when any check failed.
#pragma once

#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace driver {

inline std::mt19937 rng(123);
inline double randn() { return std::normal_distribution<double>()(rng); }
inline double uniform() { return std::uniform_real_distribution<double>()(rng); }

template <typename T>
inline T store(float v) { return fusedformer::cuda_common::from_f<T>(v); }
template <typename T>
inline double load(T v) { return double(fusedformer::cuda_common::to_f(v)); }

template <typename T>
inline fusedformer::DType dtype_of() {
  if constexpr (std::is_same_v<T, float>) return fusedformer::DType::kFloat32;
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return fusedformer::DType::kBFloat16;
  else return fusedformer::DType::kFloat16;
}
template <typename T>
inline const char* dtype_name() {
  if constexpr (std::is_same_v<T, float>) return "f32";
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return "bf16";
  else return "f16";
}

// Storage rounded random normals, and outputs poisoned with NaN (an element the kernel never
// writes fails the comparison).
template <typename T>
inline std::vector<T> random_tensor(size_t n) {
  std::vector<T> v(n);
  for (T& x : v) x = store<T>(float(randn()));
  return v;
}
template <typename T>
inline std::vector<T> poisoned(size_t n) {
  return std::vector<T>(n, store<T>(NAN));
}

// Far copies of a case's tensors: each (B, ...) tensor's batches kFarGap elements apart in one
// anonymous mapping, whose pages appear only when touched, so that with B = 3 the last batch
// starts past 2^31 elements (kFarGap itself fits in int32: only a 32-bit batch * stride wraps)
// while a few KB are real. place() copies a tensor in and gives its batch stride kFarGap;
// copy_back() copies a placed output out to its vector.
inline constexpr int64_t kFarGap = (int64_t(1) << 30) + 4096;

template <typename T>
class FarRegion {
 public:
  explicit FarRegion(int64_t batches) : batches_(batches) {
    if (batches == 0) return;
    bytes_ = size_t((batches - 1) * kFarGap + kSlots * kSlot) * sizeof(T);
    void* m = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) throw std::runtime_error("FarRegion: mmap failed");
    base_ = static_cast<T*>(m);
  }
  FarRegion(const FarRegion&) = delete;
  FarRegion& operator=(const FarRegion&) = delete;
  ~FarRegion() {
    if (base_ != nullptr) munmap(base_, bytes_);
  }

  // t holds batches_ batches `batch_stride` elements apart; returns the far copy's base and
  // sets batch_stride to kFarGap.
  T* place(const std::vector<T>& t, int64_t& batch_stride) {
    if (next_ == kSlots || batch_stride > kSlot || int64_t(t.size()) != batches_ * batch_stride)
      throw std::logic_error("FarRegion::place: no slot for this tensor");
    T* view = base_ + next_++ * kSlot;
    for (int64_t bi = 0; bi < batches_; ++bi)
      std::copy_n(t.data() + bi * batch_stride, batch_stride, view + bi * kFarGap);
    batch_stride = kFarGap;
    return view;
  }
  // t: the vector place() copied from, which holds batches_ spans of t.size() / batches_.
  void copy_back(const void* view, std::vector<T>& t) const {
    const T* v = static_cast<const T*>(view);
    const int64_t span = int64_t(t.size()) / batches_;
    for (int64_t bi = 0; bi < batches_; ++bi) std::copy_n(v + bi * kFarGap, span, t.data() + bi * span);
  }

 private:
  static constexpr int64_t kSlots = 8, kSlot = int64_t(1) << 20;
  int64_t batches_;
  size_t bytes_ = 0;
  T* base_ = nullptr;
  int next_ = 0;
};

// max |got - ref| / max(1, max |ref|); infinity when any element is NaN or an infinity differs.
template <typename T>
inline double rel_error(const std::vector<T>& got, const std::vector<double>& ref) {
  double scale = 1.0, err = 0.0;
  for (double r : ref)
    if (std::isfinite(r)) scale = std::max(scale, std::abs(r));
  for (size_t i = 0; i < ref.size(); ++i) {
    const double g = load(got[i]);
    if (std::isinf(ref[i]) || std::isinf(g)) {
      if (g != ref[i]) return INFINITY;
      continue;
    }
    const double e = std::abs(g - ref[i]);
    if (!(e == e)) return INFINITY;
    err = std::max(err, e);
  }
  return err / scale;
}

// A bound on rel_error per storage type. Each driver sets its bounds at 2-3x the worst error
// measured on this emulator over its cases (the numbers are in its comment): a bound that a
// regression cannot slip under, and not the ~30x slack a generic per-dtype bound would leave.
struct Tolerance {
  double f32, bf16, f16;
};
template <typename T>
inline double pick(const Tolerance& t) {
  if constexpr (std::is_same_v<T, float>) return t.f32;
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return t.bf16;
  else return t.f16;
}

inline int failures = 0;

// One line of the case table.
inline void report(const std::string& what, const std::string& config, double err, double tol) {
  const bool ok = err <= tol;
  if (!ok) ++failures;
  printf("%s %-7s %-64s err=%-10.3g tol=%.2g\n", ok ? "ok  " : "FAIL", what.c_str(), config.c_str(), err, tol);
}

// One line for the shared-memory bank conflicts the emulator counted (mma.h, cp_async.h) over
// this run's cases; any extra wavefront is a failure. Nothing when the kernels issued none.
inline void report_conflicts(const char* what, const char* unit, uint64_t count, uint64_t extra) {
  if (count == 0) return;
  if (extra != 0) ++failures;
  printf("%s %s: %llu %s, %llu extra wavefronts (shared-memory bank conflicts)\n", extra == 0 ? "ok  " : "FAIL",
         what, (unsigned long long)count, unit, (unsigned long long)extra);
}

inline std::vector<std::function<void()>>& cases() {
  static std::vector<std::function<void()>> all;
  return all;
}

// Registers run<T>(c) as a case on the emulated sm_80 device (c.device = 0) and, for the 16-bit
// types that have sm_90a (wgmma) kernels, again on the sm_90a one (c.device = 1).
template <typename T, typename Case, typename Run>
inline void add_on_both_devices(Case c, Run run) {
  c.device = 0;
  cases().push_back([=] { run(c); });
  if (!std::is_same_v<T, float>) {
    c.device = 1;
    cases().push_back([=] { run(c); });
  }
}

inline int main(int argc, char** argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: %s ORDER SHARD NSHARDS\n", argv[0]);
    return 2;
  }
  emu::order = emu::Order(atoi(argv[1]));
  const size_t shard = size_t(atoi(argv[2])), nshards = size_t(atoi(argv[3]));
  for (size_t i = shard; i < cases().size(); i += nshards) {
    rng.seed(unsigned(123 + i));  // a case draws the same inputs whatever the sharding
    cases()[i]();
  }
  report_conflicts("ldmatrix", "8x8 matrices", emu::ldmatrix_stats.matrices, emu::ldmatrix_stats.extra_wavefronts);
  report_conflicts("cp.async", "warp instructions", emu::cp_async_bank_stats.instructions,
                   emu::cp_async_bank_stats.extra_wavefronts);
  printf("%d failures\n", failures);
  fflush(stdout);
  return failures != 0;
}

}  // namespace driver
