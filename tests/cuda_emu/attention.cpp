// csrc/cuda/attention.cu (forward and backward, through its public entry points, so the host
// dispatch, grids and shared-memory sizes are the real ones) against an fp64 reference.
// Run by tests/test_cuda_emulated.py; see driver.h for the command line.
#include "attention.cu"  // the real source, launch syntax rewritten at build time
#include "driver.h"

namespace {

using namespace fusedformer;
using driver::load;

enum class Mask {
  kNone,
  kKeyPadding,    // bool (B, 1, 1, LK)
  kAdditive,      // additive (1, HQ, LQ, LK), -inf entries, row LQ / 2 fully masked
  kBoolRows,      // bool (B, 1, LQ, LK), rows 0 and LQ - 1 fully masked
};

struct Case {
  int64_t b, hq, hkv, lq, lk, d;
  bool causal;
  Mask mask;
  float dropout;
  int64_t kv_pad = 0;  // K and V rows padded to d + kv_pad elements (a strided view)
  int device = 0;      // the emulator's device: 0 runs sm_80 code, 1 sm_90a (the wgmma forward)
  int64_t splits = 1;  // the forward's split-KV ranges; 0: attention_fwd_num_splits_cuda's choice
  bool far = false;    // every (B, ...) tensor and a batched mask on far copies (driver::FarRegion):
                       // with B = 3, offsets past 2^31 elements
};

// Worst errors measured over these cases on both emulated devices (2026-12-03, with the wgmma
// kernels): fp32 o / lse 6.1e-7, dq / dk / dv 7.8e-6 (dk where the true gradient is near 0);
// bf16 3.3e-3 forward, 4.4e-3 gradients; fp16 4.7e-4 and 5.5e-4: about one rounding unit of the
// storage type (2^-8, 2^-11).
constexpr driver::Tolerance kFwd{2e-6, 8e-3, 1e-3}, kBwd{2e-5, 1e-2, 1.5e-3};

template <typename T>
void run(const Case& c) {
  const int64_t b = c.b, hq = c.hq, hkv = c.hkv, lq = c.lq, lk = c.lk, d = c.d, group = hq / hkv;
  const int64_t ldk = d + c.kv_pad;
  cudaSetDevice(c.device);
  // q is a strided view, stored (B, LQ, HQ, D); k and v are (B, HKV, LK, D) with rows ldk
  // apart (kv_pad > 0: a row length off the 16-byte chunks, with aligned rows); the other
  // tensors are contiguous (B, H, L, D).
  std::vector<T> q = driver::random_tensor<T>(b * lq * hq * d), k = driver::random_tensor<T>(b * hkv * lk * ldk),
                 v = driver::random_tensor<T>(b * hkv * lk * ldk), dO = driver::random_tensor<T>(b * hq * lq * d);
  std::vector<T> o = driver::poisoned<T>(b * hq * lq * d), dq = driver::poisoned<T>(b * hq * lq * d),
                 dk = driver::poisoned<T>(b * hkv * lk * d), dv = driver::poisoned<T>(b * hkv * lk * d);
  std::vector<float> lse(b * hq * lq, NAN), delta(b * hq * lq, NAN);

  std::vector<unsigned char> bool_mask;
  std::vector<T> add_mask;
  AttentionMask mk;
  if (c.mask == Mask::kKeyPadding) {
    bool_mask.resize(b * lk);
    for (auto& x : bool_mask) x = driver::uniform() > 0.25;
    mk = {MaskKind::kBool, bool_mask.data(), lk, 0, 0, 1};
  } else if (c.mask == Mask::kAdditive) {
    add_mask.resize(hq * lq * lk);
    for (auto& x : add_mask) x = driver::store<T>(driver::uniform() < 0.2 ? -INFINITY : float(driver::randn()));
    for (int64_t h = 0; h < hq; ++h)
      for (int64_t j = 0; j < lk; ++j) add_mask[(h * lq + lq / 2) * lk + j] = driver::store<T>(-INFINITY);
    mk = {MaskKind::kAdditive, add_mask.data(), 0, lq * lk, lk, 1};
  } else if (c.mask == Mask::kBoolRows) {
    bool_mask.resize(b * lq * lk);
    for (auto& x : bool_mask) x = driver::uniform() > 0.3;
    for (int64_t bi = 0; bi < b; ++bi)
      for (int64_t j = 0; j < lk; ++j) bool_mask[(bi * lq) * lk + j] = bool_mask[(bi * lq + lq - 1) * lk + j] = 0;
    mk = {MaskKind::kBool, bool_mask.data(), lq * lk, 0, lk, 1};
  }
  const float scale = 1.f / std::sqrt(float(d));
  const uint64_t seed = 987654321ull;

  AttentionFwdParams p{};
  p.dtype = driver::dtype_of<T>();
  p.b = b, p.hq = hq, p.hkv = hkv, p.lq = lq, p.lk = lk, p.d = d;
  p.q = q.data(), p.k = k.data(), p.v = v.data(), p.o = o.data();
  p.q_batch_stride = lq * hq * d, p.q_head_stride = d, p.q_row_stride = hq * d;
  p.k_batch_stride = hkv * lk * ldk, p.k_head_stride = lk * ldk, p.k_row_stride = ldk;
  p.v_batch_stride = hkv * lk * ldk, p.v_head_stride = lk * ldk, p.v_row_stride = ldk;
  p.o_batch_stride = hq * lq * d, p.o_head_stride = lq * d, p.o_row_stride = d;
  p.mask = mk, p.scale = scale, p.is_causal = c.causal, p.dropout_p = c.dropout, p.seed = seed;
  p.lse = lse.data();
  p.num_splits = c.splits > 0 ? c.splits : attention_fwd_num_splits_cuda(p);
  std::vector<float> o_accum(p.num_splits > 1 ? p.num_splits * b * hq * lq * d : 0, NAN),
      lse_accum(p.num_splits > 1 ? p.num_splits * b * hq * lq : 0, NAN);
  p.o_accum = p.num_splits > 1 ? o_accum.data() : nullptr;
  p.lse_accum = p.num_splits > 1 ? lse_accum.data() : nullptr;
  if (c.splits == 0 && p.num_splits < 2) throw std::logic_error("a case for the split heuristic ran unsplit");
  // A far case runs the kernels on far copies and copies their outputs back, so the
  // reference and the checks below see the usual layout.
  driver::FarRegion<T> far(c.far ? b : 0);
  driver::FarRegion<unsigned char> far_mask(c.far && mk.batch_stride != 0 ? b : 0);
  if (c.far) {
    p.q = far.place(q, p.q_batch_stride);
    p.k = far.place(k, p.k_batch_stride);
    p.v = far.place(v, p.v_batch_stride);
    p.o = far.place(o, p.o_batch_stride);
    if (mk.batch_stride != 0) p.mask.ptr = far_mask.place(bool_mask, p.mask.batch_stride);
  }
  attention_fwd_cuda(p, nullptr);
  if (c.far) far.copy_back(p.o, o);

  AttentionBwdParams bp{};
  bp.dtype = p.dtype;
  bp.b = b, bp.hq = hq, bp.hkv = hkv, bp.lq = lq, bp.lk = lk, bp.d = d;
  bp.q = p.q, bp.k = p.k, bp.v = p.v, bp.o = p.o, bp.do_ = dO.data();
  bp.dq = dq.data(), bp.dk = dk.data(), bp.dv = dv.data();
  bp.q_batch_stride = p.q_batch_stride, bp.q_head_stride = p.q_head_stride, bp.q_row_stride = p.q_row_stride;
  bp.k_batch_stride = p.k_batch_stride, bp.k_head_stride = p.k_head_stride, bp.k_row_stride = p.k_row_stride;
  bp.v_batch_stride = p.v_batch_stride, bp.v_head_stride = p.v_head_stride, bp.v_row_stride = p.v_row_stride;
  bp.o_batch_stride = p.o_batch_stride, bp.o_head_stride = p.o_head_stride, bp.o_row_stride = p.o_row_stride;
  bp.do_batch_stride = hq * lq * d, bp.do_head_stride = lq * d, bp.do_row_stride = d;
  bp.dq_batch_stride = hq * lq * d, bp.dq_head_stride = lq * d, bp.dq_row_stride = d;
  bp.dk_batch_stride = hkv * lk * d, bp.dk_head_stride = lk * d, bp.dk_row_stride = d;
  bp.dv_batch_stride = hkv * lk * d, bp.dv_head_stride = lk * d, bp.dv_row_stride = d;
  bp.mask = p.mask, bp.scale = scale, bp.is_causal = c.causal, bp.dropout_p = c.dropout, bp.seed = seed;
  bp.lse = lse.data(), bp.delta = delta.data();
  if (c.far) {  // q, k, v, o, the mask and their strides: the forward's far copies
    bp.do_ = far.place(dO, bp.do_batch_stride);
    bp.dq = far.place(dq, bp.dq_batch_stride);
    bp.dk = far.place(dk, bp.dk_batch_stride);
    bp.dv = far.place(dv, bp.dv_batch_stride);
  }
  attention_bwd_cuda(bp, nullptr);
  if (c.far) {
    far.copy_back(bp.dq, dq);
    far.copy_back(bp.dk, dk);
    far.copy_back(bp.dv, dv);
  }

  // fp64 reference on the same (rounded) inputs. Delta = rowsum(dO ∘ O) is taken from the
  // kernel's stored o (checked above against the exact one), as the backward defines it: with
  // the exact Σ_j P dP instead, dK of a bf16 row with LK = 1 (dS = P (dP - Delta) = 0 exactly)
  // would measure only o's storage rounding, summed over every query row of the group.
  auto Q = [&](int64_t bi, int64_t h, int64_t i, int64_t e) { return load(q[((bi * lq + i) * hq + h) * d + e]); };
  auto K = [&](int64_t bi, int64_t h, int64_t j, int64_t e) { return load(k[((bi * hkv + h) * lk + j) * ldk + e]); };
  auto V = [&](int64_t bi, int64_t h, int64_t j, int64_t e) { return load(v[((bi * hkv + h) * lk + j) * ldk + e]); };
  auto G = [&](int64_t bi, int64_t h, int64_t i, int64_t e) { return load(dO[((bi * hq + h) * lq + i) * d + e]); };
  const double rp = c.dropout > 0 ? 1.0 / (1.0 - c.dropout) : 1.0;
  std::vector<double> ro(b * hq * lq * d, 0.0), rlse(b * hq * lq), rdq(b * hq * lq * d, 0.0),
      rdk(b * hkv * lk * d, 0.0), rdv(b * hkv * lk * d, 0.0), s(lk), P(lk), dP(lk);
  for (int64_t bi = 0; bi < b; ++bi)
    for (int64_t h = 0; h < hq; ++h)
      for (int64_t i = 0; i < lq; ++i) {
        const int64_t hk = h / group, row = (bi * hq + h) * lq + i;
        double mx = -INFINITY;
        for (int64_t j = 0; j < lk; ++j) {
          double acc = 0.0;
          for (int64_t e = 0; e < d; ++e) acc += Q(bi, h, i, e) * K(bi, hk, j, e);
          double sc = acc * scale;
          const int64_t mo = bi * mk.batch_stride + h * mk.head_stride + i * mk.row_stride + j;
          if (mk.kind == MaskKind::kBool && !bool_mask[mo]) sc = -INFINITY;
          if (mk.kind == MaskKind::kAdditive) sc += load(add_mask[mo]);
          if (c.causal && j > i) sc = -INFINITY;
          s[j] = sc;
          mx = std::max(mx, sc);
        }
        if (mx == -INFINITY) {  // every key masked: o = 0, lse = -inf, no gradient
          rlse[row] = -INFINITY;
          continue;
        }
        double l = 0.0;
        for (int64_t j = 0; j < lk; ++j) l += std::exp(s[j] - mx);
        rlse[row] = mx + std::log(l);
        double delta_i = 0.0;
        for (int64_t e = 0; e < d; ++e) delta_i += G(bi, h, i, e) * load(o[row * d + e]);
        for (int64_t j = 0; j < lk; ++j) {
          P[j] = std::exp(s[j] - rlse[row]);
          const bool keep = c.dropout == 0 || dropout_keep(seed, bi, h, i, j, hq, lq, lk, c.dropout);
          double dpj = 0.0;
          for (int64_t e = 0; e < d; ++e) dpj += G(bi, h, i, e) * V(bi, hk, j, e);
          dP[j] = keep ? dpj * rp : 0.0;
          const double pd = keep ? P[j] * rp : 0.0;
          for (int64_t e = 0; e < d; ++e) {
            ro[row * d + e] += pd * V(bi, hk, j, e);
            rdv[((bi * hkv + hk) * lk + j) * d + e] += pd * G(bi, h, i, e);
          }
        }
        for (int64_t j = 0; j < lk; ++j) {
          const double ds = P[j] * (dP[j] - delta_i);
          for (int64_t e = 0; e < d; ++e) {
            rdq[row * d + e] += scale * ds * K(bi, hk, j, e);
            rdk[((bi * hkv + hk) * lk + j) * d + e] += scale * ds * Q(bi, h, i, e);
          }
        }
      }

  char config[192];
  snprintf(config, sizeof config, "%-4s sm%d b=%ld hq=%ld hkv=%ld lq=%ld lk=%ld d=%ld ldk=%ld causal=%d mask=%d p=%.1f splits=%ld%s",
           driver::dtype_name<T>(), c.device == 1 ? 90 : 80, long(b), long(hq), long(hkv), long(lq), long(lk), long(d), long(ldk),
           int(c.causal), int(c.mask), c.dropout, long(p.num_splits), c.far ? " far" : "");
  const double tol = driver::pick<T>(kFwd), tol_bwd = driver::pick<T>(kBwd);
  driver::report("o", config, driver::rel_error(o, ro), tol);
  double lse_err = 0.0;
  for (size_t x = 0; x < rlse.size(); ++x) {
    const double e = std::isinf(rlse[x]) ? (lse[x] == rlse[x] ? 0.0 : INFINITY) : std::abs(lse[x] - rlse[x]);
    lse_err = std::max(lse_err, e == e ? e : INFINITY);
  }
  driver::report("lse", config, lse_err, tol);
  driver::report("dq", config, driver::rel_error(dq, rdq), tol_bwd);
  driver::report("dk", config, driver::rel_error(dk, rdk), tol_bwd);
  driver::report("dv", config, driver::rel_error(dv, rdv), tol_bwd);
}

// Every padded head dim (32, 64, 96, 128, 256) in every dtype family, d with zero-filled
// columns (1, 20, 33, 40, 80, 100, 200), L = 1, LK = 0 (fp32 and bf16), Lq != Lk, lengths off the block
// multiples, GQA and MQA, every mask kind with fully masked rows, causal, dropout. Loads: the
// 16-byte cp.async path (d = 40, 64, 80, 128, 200, 256), its partial chunks (kv_pad: d = 20,
// 30, 36 in aligned rows) and the element-wise path (rows off 16 bytes: d = 1, 20, 33, 100);
// interior tiles (no mask, below the diagonal) with two m-tiles a warp in 16-bit. Every 16-bit
// case runs on both emulated devices: on the sm_90a one, D = 64 and 128 (d = 33 .. 64 and
// 97 .. 128) take the wgmma forward, and the others show that the dispatch falls back. GQA with
// at most 16 query rows takes the packed forward (QueryRows) on both devices, and so do the
// earlier cases of that shape (1 x 2 x 1 x 1 x 700, 1 x 2 x 1 x 3 x 530).
using M = Mask;
const bool registered = [] {
  auto add = [](auto tag, Case c) {
    using T = decltype(tag);
    driver::add_on_both_devices<T>(c, [](const Case& cs) { run<T>(cs); });
  };
  const __nv_bfloat16 bf{};
  const __half f16{};
  add(0.f, {1, 1, 1, 1, 1, 32, false, M::kNone, 0.f});
  add(0.f, {1, 2, 1, 97, 70, 20, true, M::kKeyPadding, 0.f});
  add(0.f, {2, 4, 2, 70, 130, 40, false, M::kAdditive, 0.f});
  add(0.f, {1, 2, 2, 77, 70, 64, true, M::kBoolRows, 0.3f});
  add(0.f, {1, 2, 1, 33, 97, 80, true, M::kAdditive, 0.f});
  add(0.f, {1, 2, 1, 130, 45, 128, true, M::kKeyPadding, 0.2f});
  add(0.f, {1, 2, 2, 40, 75, 200, false, M::kBoolRows, 0.f});
  add(0.f, {1, 1, 1, 1, 200, 64, true, M::kNone, 0.f});
  add(0.f, {1, 4, 1, 200, 1, 33, true, M::kAdditive, 0.1f});
  add(0.f, {1, 2, 2, 128, 128, 64, true, M::kNone, 0.f});
  add(0.f, {1, 2, 1, 65, 0, 32, false, M::kNone, 0.f});
  add(bf, {1, 1, 1, 1, 1, 32, false, M::kNone, 0.f});
  add(bf, {2, 2, 1, 97, 70, 20, true, M::kKeyPadding, 0.f});
  add(bf, {1, 4, 2, 70, 130, 40, false, M::kAdditive, 0.f});
  add(bf, {1, 2, 2, 77, 70, 64, true, M::kBoolRows, 0.3f});
  add(f16, {1, 2, 1, 33, 97, 80, true, M::kAdditive, 0.f});
  add(f16, {1, 2, 1, 130, 45, 128, true, M::kKeyPadding, 0.2f});
  add(bf, {1, 2, 2, 40, 75, 200, false, M::kBoolRows, 0.f});
  add(bf, {1, 1, 1, 1, 200, 64, true, M::kNone, 0.f});
  add(bf, {1, 4, 1, 200, 1, 33, true, M::kAdditive, 0.1f});
  add(bf, {2, 4, 1, 100, 190, 100, true, M::kBoolRows, 0.2f});
  add(f16, {1, 2, 2, 128, 128, 1, true, M::kKeyPadding, 0.f});
  add(f16, {1, 2, 1, 50, 60, 256, false, M::kNone, 0.f});
  add(bf, {1, 2, 1, 200, 150, 128, false, M::kNone, 0.f});  // interior tiles, two m-tiles a warp
  add(f16, {1, 2, 2, 190, 190, 64, true, M::kNone, 0.f});   // the same, causal
  add(0.f, {1, 2, 1, 70, 90, 30, true, M::kKeyPadding, 0.f, 2});
  add(bf, {1, 2, 2, 45, 140, 20, false, M::kAdditive, 0.f, 4});
  add(f16, {2, 2, 1, 90, 66, 36, true, M::kNone, 0.f, 4});
  add(bf, {1, 2, 1, 65, 0, 64, false, M::kNone, 0.f});  // LK = 0: no key block in any loop
  add(bf, {1, 2, 1, 150, 140, 256, true, M::kKeyPadding, 0.1f});  // D = 256: two query blocks
  // Split-KV: decoding against a long cache as the heuristic splits it (0), explicit splits
  // with a causal diagonal that leaves some ranges empty, masks with fully masked rows (every
  // split of such a row is empty: -inf lse), dropout (the keep bits of a key do not depend on
  // its range), and more splits than key blocks.
  add(0.f, {1, 2, 1, 1, 700, 64, false, M::kKeyPadding, 0.f, 0, 0, 0});
  add(bf, {2, 2, 2, 1, 700, 128, false, M::kKeyPadding, 0.f, 0, 0, 0});
  add(f16, {1, 2, 1, 3, 530, 64, false, M::kNone, 0.f, 0, 0, 0});
  add(bf, {1, 2, 1, 150, 300, 64, true, M::kNone, 0.f, 0, 0, 3});
  add(0.f, {1, 2, 2, 40, 260, 40, false, M::kBoolRows, 0.2f, 0, 0, 4});
  add(f16, {1, 2, 1, 33, 200, 128, false, M::kAdditive, 0.f, 0, 0, 2});
  add(bf, {1, 1, 1, 5, 70, 256, false, M::kNone, 0.f, 0, 0, 5});
  // Packed GQA (LQ <= 16 with GQA/MQA: a block's rows are a kv head's group of query heads):
  // MQA with one query row and with 16 (8 heads: a 128-row group, two blocks where a block
  // holds 64), GQA with a per-head additive mask (each packed row reads its own head's row) and
  // rows whose keys are all masked, causal with LQ < LK (top-left: only the first keys count),
  // dropout (each row's keep bits by its own head), and split-KV over packed blocks (the
  // heuristic's count at 900 keys; 3 ranges forced).
  add(0.f, {2, 8, 1, 1, 300, 64, false, M::kKeyPadding, 0.f});
  add(bf, {1, 8, 1, 16, 90, 128, false, M::kNone, 0.f});
  add(f16, {1, 6, 2, 5, 77, 40, false, M::kAdditive, 0.f});
  add(bf, {2, 4, 2, 3, 70, 64, true, M::kBoolRows, 0.f});
  add(0.f, {1, 4, 1, 7, 130, 32, true, M::kNone, 0.2f});
  add(bf, {1, 8, 2, 2, 900, 80, false, M::kKeyPadding, 0.1f, 0, 0, 0});
  add(f16, {2, 4, 1, 4, 260, 256, false, M::kAdditive, 0.f, 0, 0, 3});
  // Offsets past 2^31 elements (far: batch 2 of every tensor and of the mask): the tiled
  // forward and backward with GQA, a key-padding mask, causal and dropout; D = 128 (the wgmma
  // kernels on sm_90a) with padded K/V rows; packed GQA decoding over split-KV ranges.
  add(0.f, {3, 4, 2, 37, 45, 40, true, M::kKeyPadding, 0.2f, 0, 0, 1, true});
  add(bf, {3, 2, 1, 70, 66, 128, true, M::kBoolRows, 0.f, 8, 0, 1, true});
  add(f16, {3, 4, 1, 1, 300, 64, false, M::kKeyPadding, 0.f, 0, 0, 0, true});
  return true;
}();

}  // namespace

int main(int argc, char** argv) { return driver::main(argc, argv); }
