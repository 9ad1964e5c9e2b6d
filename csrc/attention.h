// Scaled dot-product attention (FlashAttention-2): the params structs and kernel entry points.
//
//   forward:  s = (q kᵀ) · scale  (+ additive mask | -inf where a bool mask is False
//             | -inf above the top-left causal diagonal: query i sees keys j <= i)
//             p = softmax_j(s);  o = (p ∘ keep / (1 - dropout_p)) v
//             lse_i = log Σ_j exp(s_ij)  (fp32; -inf for a row with every key masked,
//             whose o row is 0)
//   backward: Delta_i = Σ_d dO_id O_id;  P_ij = exp(s_ij - lse_i) (0 on a fully masked row)
//             dV = Pdᵀ dO with Pd = P ∘ keep / (1 - p);  dP = (dO vᵀ) ∘ keep / (1 - p)
//             dS = P ∘ (dP - Delta);  dQ = dS k · scale;  dK = dSᵀ q · scale
// Layout (B, H, L, D) with int64 strides for batch, head and row and a unit last-dim stride.
// Grouped-query attention: query head h reads kv head h / (HQ / HKV). The mask is read
// through its own four strides (0 on a broadcast dim), so no (LQ, LK) tensor is ever built.
// Dropout keep-masks come from csrc/philox.h, the same bits on the CPU and the GPU.
#pragma once

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "common.h"

#if defined(__CUDACC__) || defined(FUSEDFORMER_WITH_CUDA)
#include <cuda_runtime.h>
#endif

namespace fusedformer {

// What the mask pointer holds: nothing, bool (1 byte, true = attend) or an additive mask in
// the storage dtype (added to the scaled scores; -inf masks a key out).
enum class MaskKind : int { kNone = 0, kBool = 1, kAdditive = 2 };

// The mask of one call, broadcast to (B, HQ, LQ, LK) by its strides.
struct AttentionMask {
  MaskKind kind = MaskKind::kNone;
  const void* ptr = nullptr;
  int64_t batch_stride = 0, head_stride = 0, row_stride = 0, col_stride = 0;
};

struct AttentionFwdParams {
  DType dtype;
  int64_t b, hq, hkv, lq, lk, d;  // q: (b, hq, lq, d); k, v: (b, hkv, lk, d); o like q
  const void* q;
  const void* k;
  const void* v;
  void* o;
  int64_t q_batch_stride, q_head_stride, q_row_stride;
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  int64_t v_batch_stride, v_head_stride, v_row_stride;
  int64_t o_batch_stride, o_head_stride, o_row_stride;
  AttentionMask mask;
  float scale;
  bool is_causal;
  float dropout_p;  // in [0, 1)
  uint64_t seed;    // Philox key (csrc/philox.h)
  float* lse;       // (b, hq, lq) contiguous
  // Split-KV (FlashDecoding): num_splits > 1 cuts the key blocks each query block visits into
  // that many consecutive ranges, each run by its own thread block (CPU task), which writes
  // its range's normalized output and lse to o_accum / lse_accum; a second pass merges them,
  // lse = log Σ_s exp(lse_s) and o = Σ_s exp(lse_s - lse) o_s. For grids too small to fill the
  // machine, above all decoding (LQ = 1 against a long KV cache). 1: one pass, no workspace.
  int64_t num_splits = 1;
  float* o_accum = nullptr;    // (num_splits, b, hq, lq, d) contiguous
  float* lse_accum = nullptr;  // (num_splits, b, hq, lq) contiguous
};

struct AttentionBwdParams {
  DType dtype;
  int64_t b, hq, hkv, lq, lk, d;
  const void* q;
  const void* k;
  const void* v;
  const void* o;
  const void* do_;  // (b, hq, lq, d): the gradient of o
  void* dq;
  void* dk;
  void* dv;
  int64_t q_batch_stride, q_head_stride, q_row_stride;
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  int64_t v_batch_stride, v_head_stride, v_row_stride;
  int64_t o_batch_stride, o_head_stride, o_row_stride;
  int64_t do_batch_stride, do_head_stride, do_row_stride;
  int64_t dq_batch_stride, dq_head_stride, dq_row_stride;
  int64_t dk_batch_stride, dk_head_stride, dk_row_stride;
  int64_t dv_batch_stride, dv_head_stride, dv_row_stride;
  AttentionMask mask;
  float scale;
  bool is_causal;
  float dropout_p;
  uint64_t seed;
  const float* lse;  // (b, hq, lq) contiguous, from the forward
  float* delta;      // (b, hq, lq) contiguous scratch: Delta = rowsum(dO ∘ O)
};

// Largest head dim any backend of this op accepts.
constexpr int64_t kAttentionMaxHeadDim = 256;
// Most key ranges one query block may be split into.
constexpr int64_t kAttentionMaxSplits = 128;

// The kernels' own check of a split request (the binding validates the user's first): a count
// in [1, kAttentionMaxSplits], with its workspace when above 1.
inline void check_num_splits(const AttentionFwdParams& p, const char* op) {
  if (p.num_splits < 1 || p.num_splits > kAttentionMaxSplits || (p.num_splits > 1 && (!p.o_accum || !p.lse_accum)))
    throw std::invalid_argument(std::string(op) + ": num_splits must be in [1, " + std::to_string(kAttentionMaxSplits) +
                                "] with o_accum and lse_accum given when > 1, got " + std::to_string(p.num_splits));
}

// How many key ranges make `blocks` query blocks, each visiting `key_blocks` key blocks, fill
// `workers` (SMs or threads). 1 when the blocks alone give most workers a block. Otherwise
// the count whose last wave is fullest, as FlashAttention-2 chooses: splits of s ranges run
// blocks · s units in waves of `workers`, a wave efficiency (blocks · s / workers) / ceil(...),
// and the smallest s within 85% of the best wins (fewer partial outputs to merge). A count that
// leaves a range's length as it was for s - 1 buys nothing and is skipped; each range keeps at
// least two key blocks, so that the merge never costs more than a range. (kernels/attention.py's
// num_splits_heuristic is this rule in Python, for the Triton backend; a test keeps them equal.)
inline int64_t attention_num_splits(int64_t blocks, int64_t key_blocks, int64_t workers) {
  if (blocks <= 0 || key_blocks < 4 || workers <= 0 || 5 * blocks >= 4 * workers) return 1;
  const int64_t most = std::min({kAttentionMaxSplits, workers, key_blocks / 2});
  auto ceil_div = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
  auto efficiency = [&](int64_t s) {
    const double waves = double(blocks * s) / double(workers);
    return waves / std::ceil(waves);
  };
  auto useful = [&](int64_t s) { return s == 1 || ceil_div(key_blocks, s) != ceil_div(key_blocks, s - 1); };
  double best = 0.0;
  for (int64_t s = 1; s <= most; ++s)
    if (useful(s)) best = std::max(best, efficiency(s));
  for (int64_t s = 1; s <= most; ++s)
    if (useful(s) && efficiency(s) >= 0.85 * best) return s;
  return 1;
}

void attention_fwd_cpu(const AttentionFwdParams& p);
// The num_splits that attention_fwd_cpu would run p's sizes with on this many OpenMP threads.
int64_t attention_fwd_num_splits_cpu(const AttentionFwdParams& p);
void attention_bwd_cpu(const AttentionBwdParams& p);
// The units bf16 attention can run its products on here, as FUSEDFORMER_CPU_BF16 names them
// ("fma", then "dpbf16" and "amx" where the build and CPU have them), comma-separated.
std::string attention_cpu_bf16_units();

#if defined(__CUDACC__) || defined(FUSEDFORMER_WITH_CUDA)
void attention_fwd_cuda(const AttentionFwdParams& p, cudaStream_t stream);
// The num_splits for p's sizes on the current device (its SM count and the kernel's tiles).
int64_t attention_fwd_num_splits_cuda(const AttentionFwdParams& p);
void attention_bwd_cuda(const AttentionBwdParams& p, cudaStream_t stream);
// Whether the CUDA attention and FFN launch their sm_90a warpgroup-MMA (wgmma) kernels on the
// current device: the binary that runs there is sm_90a code and FUSEDFORMER_CUDA_WGMMA is not 0.
bool wgmma_kernels_active_cuda();
#endif

}  // namespace fusedformer
