// Scaled dot-product attention on the CPU: the readable twin of csrc/cuda/attention.cu, the
// FlashAttention-2 algorithm over fp32 tiles, its products run by the register-blocked
// micro-GEMM of attention_tiles.h.
//
// Layout: scores are kept transposed, st (keys, queries) = K Qᵀ, so the only transposed
// operand is Q (and dO), loaded once per query block or head and reused by every key block;
// the key tiles are read row-major, and the softmax runs down the key axis with a vector of
// eight query columns at a time (running max, sums and lse as vectors).
//
// Forward: K and V as fp32 rows padded to a multiple of 8 (in place, or converted once: see
// fwd); then per (batch, query head, block of kBlockM query rows)
// [one OpenMP task each]: stream over blocks of kBlockN keys with the online softmax
// (running max m, running sum l, fp32 accumulator acc), so memory is O(L · D) and no
// (LQ, LK) tensor ever exists. Causal: key blocks entirely above the top-left diagonal are
// skipped. Saves lse = m + log l. Split-KV (AttentionFwdParams::num_splits, chosen by
// attention_fwd_num_splits_cpu when the query blocks alone leave threads idle, as in decoding):
// each task takes one range of its query block's key blocks, writes that range's o and lse in
// fp32, and combine_splits merges them by their lse, as the CUDA kernels do. Decoding (a few
// query rows a head) has its own forward, fwd_decode: the same online softmax over the same
// key blocks, by dot products, one task for the query heads that share a kv head.
// Backward (FA2), per (batch, kv head) [one task each]: K, V and the dK, dV accumulators of
// the head stay in the task; for each query head of the group, Q, dO, Delta = rowsum(dO ∘ O)
// and a dQ accumulator are loaded once, then every (key block, query block) tile recomputes
// P from lse and adds its share to dV, dK and dQ: five tile products, no second pass (the
// price: 4·LK·D + 5·LQ·D floats of scratch per thread, and B·HKV tasks to share out).
// Every output element is summed by one task in a fixed order: deterministic, no atomics,
// any thread count. Where B·HKV tasks would leave threads idle (MQA at batch 1), one of two
// other schedules (bwd_schedule picks): bwd_heads, one task per (batch, query head) with its
// own dK, dV partials summed over the group after, where B·HQ tasks fill the threads; else
// bwd_split, the GPU kernels' split (a dK/dV pass over key blocks and a dQ pass over query
// blocks, recomputing P and dS: seven products a tile), summing in fused's order: the same
// bits. bf16 on a CPU with AVX512_BF16 runs the same loops with bf16 products on AMX's tile
// layouts (fwd_amx, bwd_amx_fused, bwd_amx_split, below): on the AMX tile unit where the CPU has
// one, else by vdpbf16ps.
// Napkin math: fwd 4·B·HQ·LQ·LK·D flops (half when causal), bwd 2.5x that. One AVX2 core
// peaks at 32 fp32 flops/cycle (two 8-wide FMA pipes); the micro-kernel's 6×16 block needs
// 8 loads per 96 flops, so the tile products run near that peak and the rest (exp, the
// softmax bookkeeping, loads with dtype conversion) is O(L·L) or O(L·D) on top.
#include "../attention.h"

#include <omp.h>
// The bf16 kernels on AMX's tile layouts (fwd_amx, bwd_amx_*) are built where the compiler
// targets AVX512_BF16 (setup.py adds it, and AMX, on a CPU that has them). Their products run on
// the AMX tile unit where the build and the CPU have it, else as vdpbf16ps on the same staged
// tiles (amx_block).
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define FUSEDFORMER_CPU_BF16_TILES 1
#endif
#if defined(FUSEDFORMER_CPU_BF16_TILES) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define FUSEDFORMER_CPU_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <tuple>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../philox.h"
#include "attention_tiles.h"
#include "numeric.h"

namespace fusedformer {
namespace {

constexpr int64_t kBlockM = 64;  // query rows per tile
static_assert(kBlockM % Wide::kWidth == 0, "the softmax steps take a tile's queries in whole vectors");
constexpr int64_t kBlockN = 64;  // key rows per tile
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kPosInf = std::numeric_limits<float>::infinity();

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// dst[0, d) = src[0, d) in fp32, exactly: 8 at a time (numeric.h's vector conversions), then the tail.
template <typename T>
void convert_row(const T* src, int64_t d, float* dst) {
  int64_t c = 0;
  for (; c + kLanes <= d; c += kLanes) store8(dst + c, load8(src + c));
  for (; c < d; ++c) dst[c] = to_float(src[c]);
}

// Loads rows [r0, r0 + n) of one head, base + r · row_stride, into dst (n, ld) fp32; the
// columns [d, ld) are zeroed, so vectors over a padded row read zeros.
template <typename T>
void load_rows(const T* base, int64_t row_stride, int64_t r0, int64_t n, int64_t d, int64_t ld,
               float* dst) {
  for (int64_t r = 0; r < n; ++r) {
    float* row = dst + r * ld;
    convert_row(base + (r0 + r) * row_stride, d, row);
    std::fill(row + d, row + ld, 0.f);
  }
}

// Loads rows [r0, r0 + n) of one head transposed into dst (d, ld) fp32: dst[c · ld + r].
template <typename T>
void load_rows_transposed(const T* base, int64_t row_stride, int64_t r0, int64_t n, int64_t d,
                          int64_t ld, float* dst) {
  float row[kAttentionMaxHeadDim];
  for (int64_t r = 0; r < n; ++r) {
    convert_row(base + (r0 + r) * row_stride, d, row);
    for (int64_t c = 0; c < d; ++c) dst[c * ld + r] = row[c];
  }
}

template <typename T>
void store_rows(const float* src, int64_t ld, float mul, int64_t n, int64_t d, int64_t r0, T* base,
                int64_t row_stride) {
  for (int64_t r = 0; r < n; ++r) {
    T* dst = base + (r0 + r) * row_stride;
    for (int64_t c = 0; c < d; ++c) dst[c] = from_float<T>(src[r * ld + c] * mul);
  }
}

// Where one tile sits: batch bi, query head h, query rows [i0, i0 + m), keys [j0, j0 + n).
struct TilePos {
  int64_t bi, h, i0, m, j0, n;
};

// Where the score of key c and query r sits in a tile's st buffer: c · key + r · query. The
// GEMM writes keys by queries (its softmax takes a vector of query columns at a time); the
// decoding forward's dot products write queries by keys, each query's scores one contiguous
// row, so that their softmax runs along the keys instead of on vectors of mostly absent queries.
struct Layout {
  int64_t key, query;
};
constexpr Layout kKeysByQueries{kBlockM, 1}, kQueriesByKeys{1, kBlockN};

// Adds the mask to the tile's scores and hides the keys past the causal diagonal: with the
// products, the one definition of a score, shared by every forward and the backward so they
// see the same numbers.
template <typename T>
void mask_scores(const AttentionMask& mask, bool is_causal, const TilePos& t, float* st, Layout at) {
  if (mask.kind != MaskKind::kNone) {
    const int64_t off = t.bi * mask.batch_stride + t.h * mask.head_stride +
                        t.i0 * mask.row_stride + t.j0 * mask.col_stride;
    for (int64_t c = 0; c < t.n; ++c) {
      float* sc = st + c * at.key;
      const int64_t col = off + c * mask.col_stride;
      if (mask.kind == MaskKind::kBool) {
        const bool* keep = static_cast<const bool*>(mask.ptr) + col;
        for (int64_t r = 0; r < t.m; ++r)
          if (!keep[r * mask.row_stride]) sc[r * at.query] = kNegInf;
      } else {
        const T* add = static_cast<const T*>(mask.ptr) + col;
        for (int64_t r = 0; r < t.m; ++r) sc[r * at.query] += to_float(add[r * mask.row_stride]);
      }
    }
  }
  if (is_causal)  // key j0 + c is hidden from the query rows i0 + r < j0 + c
    for (int64_t c = 0; c < t.n; ++c)
      for (int64_t r = 0; r < std::clamp<int64_t>(t.j0 + c - t.i0, 0, t.m); ++r) st[c * at.key + r * at.query] = kNegInf;
}

// st (n, kBlockM) = k qᵀ · scale (kKeysByQueries), then the mask and the causal diagonal. k is
// the key tile (n, ld); qt holds the tile's queries as columns, qt[c · ldq + r] = q[r][c], with
// zero columns up to whole Wide vectors (those st columns are 0: the softmax steps read them,
// nothing uses them).
template <typename T>
void score_tile(const float* k, int64_t ld, const float* qt, int64_t ldq, int64_t d, float scale,
                const AttentionMask& mask, bool is_causal, const TilePos& t, float* st) {
  gemm_tile<false>(t.n, round_up_wide(t.m), d, k, ld, 1, qt, ldq, st, kBlockM, scale);
  mask_scores<T>(mask, is_causal, t, st, kKeysByQueries);
}

// Key blocks (of `block` keys) a query block [i0, i0 + m) reads: all, or (causal) those with a
// key j <= i.
int64_t key_blocks_end(bool is_causal, int64_t i0, int64_t m, int64_t lk, int64_t block = kBlockN) {
  const int64_t nkb = ceil_div(lk, block);
  return is_causal ? std::min(nkb, ceil_div(i0 + m, block)) : nkb;
}

// Split-KV: the key blocks [begin, end) of range `split` of `splits` (the CUDA kernels'
// split_key_blocks): the query block's blocks cut into equal consecutive ranges, the last
// shorter; a range may be empty.
std::pair<int64_t, int64_t> split_range(int64_t kb_end, int64_t split, int64_t splits) {
  const int64_t per = ceil_div(kb_end, splits);
  return {std::min(kb_end, split * per), std::min(kb_end, (split + 1) * per)};
}

// The backward's tile orders, shared by all its schedules so that they sum dK, dV and dQ in the
// same order (the split schedules' bitwise agreement with the fused ones rests on it).
// body(t) for key block kb's tiles with query head h: the query blocks from the causal diagonal on.
template <typename F>
void for_key_block_tiles(const AttentionBwdParams& p, int64_t bi, int64_t h, int64_t kb, F&& body) {
  TilePos t{bi, h, 0, 0, kb * kBlockN, std::min(kBlockN, p.lk - kb * kBlockN)};
  // Causal: query rows i < j0 see no key of this block; start at the block holding j0.
  for (int64_t qb = p.is_causal ? t.j0 / kBlockM : 0; qb < ceil_div(p.lq, kBlockM); ++qb) {
    t.i0 = qb * kBlockM;
    t.m = std::min(kBlockM, p.lq - t.i0);
    body(t);
  }
}

// body(t) for key block kb's tiles with each query head of kv head hk's group in turn: the
// split schedules' dK/dV task, which sums the group's heads in the fused schedule's order.
template <typename F>
void for_group_key_block_tiles(const AttentionBwdParams& p, int64_t bi, int64_t hk, int64_t kb, F&& body) {
  const int64_t group = p.hq / p.hkv;
  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) for_key_block_tiles(p, bi, h, kb, body);
}

// body(t) for query block qb of head h's tiles: the key blocks up to the causal diagonal.
template <typename F>
void for_query_block_tiles(const AttentionBwdParams& p, int64_t bi, int64_t h, int64_t qb, F&& body) {
  TilePos t{bi, h, qb * kBlockM, std::min(kBlockM, p.lq - qb * kBlockM), 0, 0};
  for (int64_t kb = 0; kb < key_blocks_end(p.is_causal, t.i0, t.m, p.lk); ++kb) {
    t.j0 = kb * kBlockN;
    t.n = std::min(kBlockN, p.lk - t.j0);
    body(t);
  }
}

// The split schedules' task lists (bwd_split, bwd_amx_split). split_staging: stage_keys(bk) for
// each (batch, kv head) bk = bi · HKV + hk, then stage_queries(bh) for each (batch, query head)
// bh = bi · HQ + h, in one parallel loop. split_passes, inside a parallel region: key_block(bi,
// hk, kb, j0, n) for each (batch, kv head, key block) of keys [j0, j0 + n), then query_block(bi,
// h, qb, i0, m) for each (batch, query head, query block) of queries [i0, i0 + m).
template <typename SK, typename SQ>
void split_staging(const AttentionBwdParams& p, SK&& stage_keys, SQ&& stage_queries) {
#pragma omp parallel for schedule(dynamic)
  for (int64_t task = 0; task < p.b * (p.hkv + p.hq); ++task) {
    if (task < p.b * p.hkv) stage_keys(task);
    else stage_queries(task - p.b * p.hkv);
  }
}
template <typename KB, typename QB>
void split_passes(const AttentionBwdParams& p, KB&& key_block, QB&& query_block) {
  const int64_t nkb = ceil_div(p.lk, kBlockN), nqb = ceil_div(p.lq, kBlockM);
#pragma omp for schedule(dynamic) nowait
  for (int64_t task = 0; task < p.b * p.hkv * nkb; ++task) {
    const int64_t kb = task % nkb, j0 = kb * kBlockN;
    key_block(task / (p.hkv * nkb), task / nkb % p.hkv, kb, j0, std::min(kBlockN, p.lk - j0));
  }
#pragma omp for schedule(dynamic)
  for (int64_t task = 0; task < p.b * p.hq * nqb; ++task) {
    const int64_t qb = task % nqb, i0 = qb * kBlockM;
    query_block(task / (p.hq * nqb), task / nqb % p.hq, qb, i0, std::min(kBlockM, p.lq - i0));
  }
}

// The backward's dK, dV stores: rows [j0, j0 + n) of kv head hk of batch bi, dk (· scale) and dv,
// from fp32 rows of ld.
template <typename T>
void bwd_store_keys(const AttentionBwdParams& p, int64_t ld, int64_t bi, int64_t hk, int64_t j0, int64_t n,
                    const float* dk, const float* dv) {
  store_rows(dk, ld, p.scale, n, p.d, j0, static_cast<T*>(p.dk) + bi * p.dk_batch_stride + hk * p.dk_head_stride,
             p.dk_row_stride);
  store_rows(dv, ld, 1.f, n, p.d, j0, static_cast<T*>(p.dv) + bi * p.dv_batch_stride + hk * p.dv_head_stride,
             p.dv_row_stride);
}

// The per-head schedules' sums: for task (batch, kv head, key block), its group's dK and dV
// partials (each head's head_elems floats, rows of ld) added in head order into the first
// head's, then stored.
template <typename T>
void sum_group_partials(const AttentionBwdParams& p, int64_t ld, int64_t group, size_t head_elems, int64_t task,
                        float* dk, float* dv) {
  const int64_t nkb = ceil_div(p.lk, kBlockN);
  const int64_t bi = task / (p.hkv * nkb), hk = task / nkb % p.hkv, j0 = task % nkb * kBlockN;
  const int64_t n = std::min(kBlockN, p.lk - j0);
  float* dk_sum = dk + (bi * p.hq + hk * group) * head_elems + j0 * ld;
  float* dv_sum = dv + (bi * p.hq + hk * group) * head_elems + j0 * ld;
  for (int64_t x = 1; x < group; ++x)
    for (int64_t e = 0; e < n * ld; ++e) {
      dk_sum[e] += dk_sum[x * head_elems + e];
      dv_sum[e] += dv_sum[x * head_elems + e];
    }
  bwd_store_keys<T>(p, ld, bi, hk, j0, n, dk_sum, dv_sum);
}

// Split-KV's merge (the CUDA attention_fwd_combine_kernel): each query row's lse =
// log Σ_s exp(lse_s) and o = Σ_s exp(lse_s - lse) o_s over its num_splits partial results;
// ranges with no key (lse_s = -inf) weigh 0, a row with none keeps o = 0 and lse = -inf.
template <typename T>
void combine_splits(const AttentionFwdParams& p) {
  const int64_t rows = p.b * p.hq * p.lq, splits = p.num_splits;
#pragma omp parallel
  {
    std::vector<float> w(splits), o(p.d);
#pragma omp for schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
      float mx = kNegInf;
      for (int64_t s = 0; s < splits; ++s) mx = std::max(mx, p.lse_accum[s * rows + row]);
      const bool empty = mx == kNegInf;
      float sum = 0.f;
      for (int64_t s = 0; s < splits; ++s) sum += w[s] = empty ? 0.f : std::exp(p.lse_accum[s * rows + row] - mx);
      const float lse = empty ? kNegInf : mx + std::log(sum);
      std::fill(o.begin(), o.end(), 0.f);
      for (int64_t s = 0; s < splits; ++s) {
        if (w[s] == 0.f) continue;
        const float ws = w[s] / sum;  // exp(lse_s - lse)
        const float* os = p.o_accum + (s * rows + row) * p.d;
        for (int64_t c = 0; c < p.d; ++c) o[c] += ws * os[c];
      }
      p.lse[row] = lse;
      const int64_t i = row % p.lq, h = row / p.lq % p.hq, bi = row / (p.lq * p.hq);
      store_rows(o.data(), p.d, 1.f, 1, p.d, i, static_cast<T*>(p.o) + bi * p.o_batch_stride + h * p.o_head_stride,
                 p.o_row_stride);
    }
  }
}

// Writes rows [i0, i0 + n) of head h, finished over one key range: o = acc / l (with dropout's
// 1 / (1 - p) on the kept values) and lse = m + log l, into the output, or with split-KV as fp32
// partials for combine_splits. A row with every key masked gives o = 0, lse = -inf.
template <typename T>
void store_range(const AttentionFwdParams& p, int64_t split, int64_t bi, int64_t h, int64_t i0, int64_t n,
                 const float* acc, int64_t ld, const float* m, const float* l) {
  const float rp = p.dropout_p > 0.f ? 1.f / (1.f - p.dropout_p) : 1.f;
  const int64_t head_row = ((split * p.b + bi) * p.hq + h) * p.lq;  // row 0 of (split, bi, h) in o_accum
  T* o_head = static_cast<T*>(p.o) + bi * p.o_batch_stride + h * p.o_head_stride;
  float* lse = (p.num_splits > 1 ? p.lse_accum + head_row : p.lse + (bi * p.hq + h) * p.lq) + i0;
  for (int64_t r = 0; r < n; ++r) {
    const bool empty = m[r] == kNegInf;
    const float mul = empty ? 0.f : rp / l[r];
    if (p.num_splits > 1)
      store_rows(acc + r * ld, ld, mul, 1, p.d, i0 + r, p.o_accum + head_row * p.d, p.d);
    else
      store_rows(acc + r * ld, ld, mul, 1, p.d, i0 + r, o_head, p.o_row_stride);
    lse[r] = empty ? kNegInf : m[r] + std::log(l[r]);
  }
}

// Zeroes the probabilities st[c][r] of the tile that dropout drops (the forward's P ∘ keep);
// T: float, or uint16_t for the AMX forward's bf16 P (whose zero is all bits 0).
template <typename T>
void drop_probs(const AttentionFwdParams& p, const TilePos& t, T* st, Layout at) {
  for (int64_t c = 0; c < t.n; ++c)
    for (int64_t r = 0; r < t.m; ++r)
      if (!dropout_keep(p.seed, t.bi, t.h, t.i0 + r, t.j0 + c, p.hq, p.lq, p.lk, p.dropout_p))
        st[c * at.key + r * at.query] = T(0);
}

// One key tile of the online softmax over the scores st (n, kBlockM), a vector of query
// columns at a time: m <- max(m, max_c st), l <- l · exp(m_old - m) + Σ_c exp(st - m), st <- its
// probabilities exp(st - m), alpha <- exp(m_old - m), the factor the accumulator rows take.
// A column with every key so far masked keeps m = -inf, l = 0 (exp of -inf is 0 there).
void online_softmax(const TilePos& t, float* st, float* m, float* l, float* alpha) {
  using W = Wide;
  // Each query vector's max over the tile: one independent chain a vector (a vmaxps waits
  // for the one before it in its chain; the columns past t.m are finite and unused).
  constexpr int kVecs = kBlockM / W::kWidth;
  W::V vmax[kVecs];
  for (int x = 0; x < kVecs; ++x) vmax[x] = W::load(m + x * W::kWidth);
  for (int64_t c = 0; c < t.n; ++c)
    for (int x = 0; x < kVecs; ++x) vmax[x] = W::max(vmax[x], W::load(st + c * kBlockM + x * W::kWidth));
  for (int64_t r = 0; r < t.m; r += W::kWidth) {
    const W::V m_old = W::load(m + r);
    const W::V m_new = vmax[r / W::kWidth];
    const W::V m_use = m_new == kNegInf ? W::V{} : m_new;  // keeps -inf - -inf out
    W::V sum{};
    for (int64_t c = 0; c < t.n; ++c) {
      float* s = st + c * kBlockM + r;
      const W::V pc = W::exp(W::load(s) - m_use);
      W::store(s, pc);
      sum += pc;  // l sums the probabilities before dropout: softmax's denominator
    }
    const W::V a = W::exp(m_old - m_use);
    W::store(alpha + r, a);
    W::store(l + r, W::fma(W::load(l + r), a, sum));
    W::store(m + r, m_new);
  }
}

// Query block `block` of the GEMM forwards (fwd, fwd_amx), in (batch, query head, block of
// kBlockM rows) order: its TilePos with no keys yet.
TilePos query_block(const AttentionFwdParams& p, int64_t block) {
  const int64_t nqb = ceil_div(p.lq, kBlockM), qb = block % nqb;
  return {block / (p.hq * nqb), block / nqb % p.hq, qb * kBlockM, std::min(kBlockM, p.lq - qb * kBlockM), 0, 0};
}

template <typename T>
void fwd(const AttentionFwdParams& p) {
  const int64_t d = p.d, dp = round_up_lanes(d), group = p.hq / p.hkv, nqb = ceil_div(p.lq, kBlockM);
  const int64_t splits = p.num_splits;
  const bool dropout = p.dropout_p > 0.f;
  const T* Q = static_cast<const T*>(p.q);
  const T* K = static_cast<const T*>(p.k);
  const T* V = static_cast<const T*>(p.v);

  // Where the key tiles come from, as fp32 rows of dp floats (zero past d):
  //  - in place: fp32 rows with d a multiple of 8 need no copy;
  //  - staged: K and V of every (batch, kv head) converted once up front ((lk, dp) each, O(L · D)
  //    scratch), when more than one task reads each key tile (several query blocks or GQA heads);
  //  - else each task converts its own tiles as it goes (one query block, one head a kv head),
  //    so that no key is converted that a task does not read, nor converted twice.
  const bool in_place = std::is_same_v<T, float> && dp == d;
  const bool staged = !in_place && nqb * group > 1;
  std::vector<float> kf(staged ? p.b * p.hkv * p.lk * dp : 0), vf(staged ? p.b * p.hkv * p.lk * dp : 0);
  if (staged) {
    constexpr int64_t kChunk = 256;  // rows a conversion task: shares out few heads too
    const int64_t chunks = ceil_div(p.lk, kChunk);
#pragma omp parallel for schedule(static)
    for (int64_t task = 0; task < p.b * p.hkv * chunks; ++task) {
      const int64_t bh = task / chunks, r0 = task % chunks * kChunk, n = std::min(kChunk, p.lk - r0);
      const int64_t bi = bh / p.hkv, hk = bh % p.hkv;
      load_rows(K + bi * p.k_batch_stride + hk * p.k_head_stride, p.k_row_stride, r0, n, d, dp,
                kf.data() + (bh * p.lk + r0) * dp);
      load_rows(V + bi * p.v_batch_stride + hk * p.v_head_stride, p.v_row_stride, r0, n, d, dp,
                vf.data() + (bh * p.lk + r0) * dp);
    }
  }
#pragma omp parallel
  {
    std::vector<float> qt(d * kBlockM), acc(kBlockM * dp);
    std::vector<float> st(kBlockN * kBlockM), m(kBlockM), l(kBlockM), alpha(kBlockM);
    std::vector<float> k_buf(in_place || staged ? 0 : kBlockN * dp), v_buf(k_buf.size());
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < p.b * p.hq * nqb * splits; ++task) {
      const int64_t split = task % splits;
      TilePos t = query_block(p, task / splits);
      const int64_t bi = t.bi, h = t.h, hk = h / group;
      const T* q_head = Q + bi * p.q_batch_stride + h * p.q_head_stride;
      const T* k_src = K + bi * p.k_batch_stride + hk * p.k_head_stride;
      const T* v_src = V + bi * p.v_batch_stride + hk * p.v_head_stride;
      // Key tile rows j0 .. j0 + n - 1 as fp32 (k_ld, v_ld apart).
      const int64_t k_ld = in_place ? p.k_row_stride : dp, v_ld = in_place ? p.v_row_stride : dp;
      auto key_tiles = [&](const TilePos& t) -> std::pair<const float*, const float*> {
        if (in_place)
          return {reinterpret_cast<const float*>(k_src) + t.j0 * k_ld, reinterpret_cast<const float*>(v_src) + t.j0 * v_ld};
        if (staged)
          return {kf.data() + ((bi * p.hkv + hk) * p.lk + t.j0) * dp, vf.data() + ((bi * p.hkv + hk) * p.lk + t.j0) * dp};
        load_rows(k_src, p.k_row_stride, t.j0, t.n, d, dp, k_buf.data());
        load_rows(v_src, p.v_row_stride, t.j0, t.n, d, dp, v_buf.data());
        return {k_buf.data(), v_buf.data()};
      };
      std::fill(qt.begin(), qt.end(), 0.f);
      load_rows_transposed(q_head, p.q_row_stride, t.i0, t.m, d, kBlockM, qt.data());
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), 0.f);

      const auto [kb_begin, kb_end] = split_range(key_blocks_end(p.is_causal, t.i0, t.m, p.lk), split, splits);
      for (int64_t kb = kb_begin; kb < kb_end; ++kb) {
        t.j0 = kb * kBlockN;
        t.n = std::min(kBlockN, p.lk - t.j0);
        const auto [k_tile, v_tile] = key_tiles(t);
        score_tile<T>(k_tile, k_ld, qt.data(), kBlockM, d, p.scale, p.mask, p.is_causal, t, st.data());
        online_softmax(t, st.data(), m.data(), l.data(), alpha.data());
        if (dropout) drop_probs(p, t, st.data(), kKeysByQueries);
        // acc = diag(alpha) acc + P V: the online softmax's rescale rides in the GEMM's store.
        gemm_tile<true>(t.m, dp, t.n, st.data(), 1, kBlockM, v_tile, v_ld, acc.data(), dp, 1.f, alpha.data());
      }
      store_range<T>(p, split, bi, h, t.i0, t.m, acc.data(), dp, m.data(), l.data());
    }
  }
  if (splits > 1) combine_splits<T>(p);
}

// ---- the decoding forward: a few query rows a head -----------------------------------------
//
// One task per (batch, kv head, pack of query heads, split): the pack's heads share their kv
// head's K and V (GQA/MQA: up to kBlockM query rows, every head of the group when it fits), so
// each key tile is read from memory once for all of them and never staged whole. Scores are
// dot products (score_dots), laid out kQueriesByKeys, their softmax runs along the keys
// (online_softmax_rows), and P V goes a row at a time (pv_rows); 16-bit tiles are converted in
// registers, or once into a per-thread fp32 tile for kConvertRows rows or more; with
// AVX512_BF16, bf16 scores come from vdpbf16ps on the keys as stored. Measured on the dev
// machine (2 threads, D = 128, 2048 keys, one query row, bf16, against the GEMM path with staged
// K and V it replaces): 16 heads, B = 4: 4.2 -> 1.4 ms (SDPA 1.45-1.55); 32 query heads on 8 kv
// heads, B = 4: 38.8 -> 1.4 ms (SDPA 1.8; the staging's 64 MiB of fresh pages each call went too).

// Whether LQ query rows take the decoding forward: the GEMM computes whole Wide vectors of
// queries, so for a few rows most of its work would be on zero columns.
bool few_queries(int64_t lq) { return 4 * lq <= Wide::kWidth; }

// Runs body.template operator()<NV>(e, W) over the columns [0, d) in strips of NV Wide vectors,
// NV = 8, 4, 2, 1, so that a strip's vectors sit in registers; then body<1>(e, tail) for the
// last d % W columns if any.
template <typename F>
void for_strips(int64_t d, F&& body) {
  constexpr int64_t W = Wide::kWidth;
  int64_t e = 0;
  const auto strips = [&]<int NV>() {
    for (; e + NV * W <= d; e += NV * W) body.template operator()<NV>(e, int(W));
  };
  strips.template operator()<8>();
  strips.template operator()<4>();
  strips.template operator()<2>();
  strips.template operator()<1>();
  if (e < d) body.template operator()<1>(e, int(d - e));
}

// st[r][c] = scale · k_c · q_r (kQueriesByKeys) for rows query rows of fp32, ldq apart and zero
// from d to a whole Wide vector, against n key rows in any storage type, ld apart, converted in
// registers. Eight keys at a time share each load of q and keep eight FMA chains in flight.
template <typename KT>
void score_dots(int64_t rows, int64_t n, const KT* k, int64_t ld, int64_t d, const float* q_rows, int64_t ldq,
                float scale, float* st) {
  using W = Wide;
  constexpr int kKeys = 8;
  const int64_t full = d / W::kWidth * W::kWidth;
  for (int64_t r = 0; r < rows; ++r) {
    const float* q = q_rows + r * ldq;
    const auto dots = [&]<int NK>(int64_t c) {
      W::V acc[NK] = {};
      for (int64_t e = 0; e < full; e += W::kWidth) {
        const W::V qv = W::load(q + e);
        for (int j = 0; j < NK; ++j) acc[j] = W::fma(W::load(k + (c + j) * ld + e, int(W::kWidth)), qv, acc[j]);
      }
      if (full < d) {
        const W::V qv = W::load(q + full);
        for (int j = 0; j < NK; ++j) acc[j] = W::fma(W::load(k + (c + j) * ld + full, int(d - full)), qv, acc[j]);
      }
      for (int j = 0; j < NK; ++j) st[r * kBlockN + c + j] = W::hsum(acc[j]) * scale;
    };
    int64_t c = 0;
    for (; c + kKeys <= n; c += kKeys) dots.template operator()<kKeys>(c);
    for (; c < n; ++c) dots.template operator()<1>(c);
  }
}

#if defined(__AVX512BF16__)
// The lane sums of eight vectors, in one (lane j: Σ a[j]), in a fixed order: each folded to 8
// lanes, then pairwise horizontal adds.
inline __m256 lane_sums8(const __m512 a[8]) {
  __m256 y[8];
  for (int j = 0; j < 8; ++j)
    y[j] = _mm256_add_ps(_mm512_castps512_ps256(a[j]), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a[j]), 1)));
  const __m256 h0123 = _mm256_hadd_ps(_mm256_hadd_ps(y[0], y[1]), _mm256_hadd_ps(y[2], y[3]));
  const __m256 h4567 = _mm256_hadd_ps(_mm256_hadd_ps(y[4], y[5]), _mm256_hadd_ps(y[6], y[7]));
  // h0123 lanes 0-3 and 4-7: halves of the sums of keys 0-3; h4567 likewise for keys 4-7.
  return _mm256_add_ps(_mm256_permute2f128_ps(h0123, h4567, 0x20), _mm256_permute2f128_ps(h0123, h4567, 0x31));
}

// score_dots for bf16 keys on a CPU with AVX512_BF16: vdpbf16ps takes 32 products of bf16 pairs
// per instruction, straight from the keys as stored, summed in fp32 (what a tensor core does;
// the products are exact, and values below FLT_MIN flush to zero). The query rows hold bf16
// values (the bf16 forward's queries), so rounding them back to bf16 is exact. Eight keys'
// sums leave their registers together through lane_sums8.
void score_dots(int64_t rows, int64_t n, const bf16* k, int64_t ld, int64_t d, const float* q_rows, int64_t ldq,
                float scale, float* st) {
  constexpr int kKeys = 8;
  const int64_t full = d / 32 * 32, d32 = (d + 31) / 32 * 32;
  const __mmask32 tail = __mmask32((uint64_t(1) << (d - full)) - 1);
  alignas(64) uint16_t q[kAttentionMaxHeadDim + 32];
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t e = 0; e < d32; e += 32) {  // zero past d: q_rows is zero from d to whole Wide vectors
      const float* qr = q_rows + r * ldq + e;
      const __m512 lo = e < d ? _mm512_loadu_ps(qr) : _mm512_setzero_ps();
      const __m512 hi = e + 16 < d ? _mm512_loadu_ps(qr + 16) : _mm512_setzero_ps();
      _mm512_store_si512(q + e, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
    const auto dots = [&]<int NK>(int64_t c, __m512* acc) {
      for (int j = 0; j < NK; ++j) acc[j] = _mm512_setzero_ps();
      for (int64_t e = 0; e < full; e += 32) {
        const __m512bh qv = (__m512bh)_mm512_load_si512(q + e);
        for (int j = 0; j < NK; ++j)
          acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)_mm512_loadu_si512(k + (c + j) * ld + e), qv);
      }
      if (full < d) {
        const __m512bh qv = (__m512bh)_mm512_load_si512(q + full);
        for (int j = 0; j < NK; ++j)
          acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)_mm512_maskz_loadu_epi16(tail, k + (c + j) * ld + full), qv);
      }
    };
    float* srow = st + r * kBlockN;
    int64_t c = 0;
    for (; c + kKeys <= n; c += kKeys) {
      __m512 acc[kKeys];
      dots.template operator()<kKeys>(c, acc);
      _mm256_storeu_ps(srow + c, _mm256_mul_ps(lane_sums8(acc), _mm256_set1_ps(scale)));
    }
    for (; c < n; ++c) {
      __m512 acc[1];
      dots.template operator()<1>(c, acc);
      srow[c] = Wide::hsum(acc[0]) * scale;
    }
  }
}
constexpr bool kBf16Dots = true;
#else
constexpr bool kBf16Dots = false;
#endif

// online_softmax for rows query rows of a queries-by-keys tile of n keys, rows ld apart: the
// same steps, along each row's keys a vector at a time (the row padded to whole vectors with
// -inf, whose probabilities come out 0); alpha, l and m a vector of rows at a time at the end.
void online_softmax_rows(int64_t rows, int64_t n, float* st, int64_t ld, float* m, float* l, float* alpha) {
  using W = Wide;
  const int64_t nw = round_up_wide(n);
  float m_tile[kBlockM], sum_tile[kBlockM];  // each row's max and sum over this tile
  for (int64_t r = 0; r < rows; ++r) {
    float* s = st + r * ld;
    std::fill(s + n, s + nw, kNegInf);
    W::V vmax = W::splat(kNegInf);
    for (int64_t c = 0; c < nw; c += W::kWidth) vmax = W::max(vmax, W::load(s + c));
    const float m_new = std::max(m[r], W::hmax(vmax));
    const W::V m_use = W::splat(m_new == kNegInf ? 0.f : m_new);  // keeps -inf - -inf out
    W::V sum{};
    for (int64_t c = 0; c < nw; c += W::kWidth) {
      const W::V pc = W::exp(W::load(s + c) - m_use);
      W::store(s + c, pc);
      sum += pc;
    }
    m_tile[r] = m_new;
    sum_tile[r] = W::hsum(sum);
  }
  for_blocks<W>(rows, [&](int64_t r, int k) {
    const W::V m_new = W::load(m_tile + r, k);
    const W::V a = W::exp(W::load(m + r, k) - (m_new == kNegInf ? W::V{} : m_new));
    W::store(alpha + r, a, k);
    W::store(l + r, W::fma(W::load(l + r, k), a, W::load(sum_tile + r, k)), k);
    W::store(m + r, m_new, k);
  });
}

// acc (rows, ld_acc) = diag(alpha) acc + P V, P = st (rows, n) kQueriesByKeys and v rows of d
// elements in any storage type, ld apart, converted in registers: for a few query rows the
// GEMM would be all loads of V, so each V row is read once per query row here (from L1 after
// the first), a strip of up to 8 Wide vectors (128 columns with AVX-512: a whole head) at a time.
template <typename VT>
void pv_rows(int64_t rows, int64_t n, const float* st, const float* alpha, const VT* v, int64_t ld, int64_t d,
             float* acc, int64_t ld_acc) {
  using W = Wide;
  for (int64_t r = 0; r < rows; ++r)
    for_strips(d, [&]<int NV>(int64_t e0, int k) {
      float* a_row = acc + r * ld_acc + e0;
      W::V a[NV];
      for (int x = 0; x < NV; ++x) a[x] = W::load(a_row + x * W::kWidth, k) * W::splat(alpha[r]);
      for (int64_t c = 0; c < n; ++c) {
        const W::V pc = W::splat(st[r * kBlockN + c]);
        for (int x = 0; x < NV; ++x) a[x] = W::fma(pc, W::load(v + c * ld + e0 + x * W::kWidth, k), a[x]);
      }
      for (int x = 0; x < NV; ++x) W::store(a_row + x * W::kWidth, a[x], k);
    });
}

// How the decoding forward packs query heads: pack heads of the group a task, pack · LQ <= kBlockM
// rows, packs of them per kv head.
struct HeadPacks {
  int64_t pack, packs;
};
HeadPacks head_packs(const AttentionFwdParams& p) {
  const int64_t group = p.hq / p.hkv, pack = std::min(group, kBlockM / p.lq);
  return {pack, ceil_div(group, pack)};
}

// From this many rows a task, 16-bit key tiles are converted to fp32 once (k_buf, v_buf) instead
// of in registers by every row: measured on the dev machine at bf16, D = 128, 2048 keys, 2 threads,
// 16 rows (B = 2, 32 query heads on 8 kv heads, LQ = 4) 3.2 -> 2.8-2.9 ms; 4 rows (LQ = 1) slower
// converted, 2.0 -> 2.3-2.4 ms.
constexpr int64_t kConvertRows = 8;

template <typename T>
void fwd_decode(const AttentionFwdParams& p) {
  const int64_t d = p.d, lq = p.lq, group = p.hq / p.hkv, splits = p.num_splits, ldq = round_up_wide(d);
  const auto [pack, packs] = head_packs(p);
  const bool dropout = p.dropout_p > 0.f;
  const T* Q = static_cast<const T*>(p.q);
  const T* K = static_cast<const T*>(p.k);
  const T* V = static_cast<const T*>(p.v);
#pragma omp parallel
  {
    // Row g · lq + i of the buffers: query row i of head h0 + g.
    std::vector<float> q_rows(kBlockM * ldq), acc(kBlockM * d), st(kBlockM * kBlockN);
    std::vector<float> m(kBlockM), l(kBlockM), alpha(kBlockM), k_buf(kBlockN * d), v_buf(kBlockN * d);
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < p.b * p.hkv * packs * splits; ++task) {
      const int64_t split = task % splits, block = task / splits;
      const int64_t bi = block / (p.hkv * packs), hk = block / packs % p.hkv, h0 = hk * group + block % packs * pack;
      const int64_t heads = std::min(pack, (hk + 1) * group - h0), rows = heads * lq;
      // 16-bit tiles converted once (see kConvertRows), but not bf16 keys that vdpbf16ps reads.
      const bool convert_v = !std::is_same_v<T, float> && rows >= kConvertRows;
      const bool convert_k = convert_v && !(kBf16Dots && std::is_same_v<T, bf16>);
      const T* k_src = K + bi * p.k_batch_stride + hk * p.k_head_stride;
      const T* v_src = V + bi * p.v_batch_stride + hk * p.v_head_stride;
      for (int64_t g = 0; g < heads; ++g)
        load_rows(Q + bi * p.q_batch_stride + (h0 + g) * p.q_head_stride, p.q_row_stride, 0, lq, d, ldq,
                  q_rows.data() + g * lq * ldq);
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), 0.f);

      const auto [kb_begin, kb_end] = split_range(key_blocks_end(p.is_causal, 0, lq, p.lk), split, splits);
      for (int64_t kb = kb_begin; kb < kb_end; ++kb) {
        const int64_t j0 = kb * kBlockN, n = std::min(kBlockN, p.lk - j0);
        if (convert_k) {
          load_rows(k_src, p.k_row_stride, j0, n, d, d, k_buf.data());
          score_dots(rows, n, k_buf.data(), d, d, q_rows.data(), ldq, p.scale, st.data());
        } else {
          score_dots(rows, n, k_src + j0 * p.k_row_stride, p.k_row_stride, d, q_rows.data(), ldq, p.scale, st.data());
        }
        if (convert_v) load_rows(v_src, p.v_row_stride, j0, n, d, d, v_buf.data());
        for (int64_t g = 0; g < heads; ++g)
          mask_scores<T>(p.mask, p.is_causal, {bi, h0 + g, 0, lq, j0, n}, st.data() + g * lq * kBlockN, kQueriesByKeys);
        online_softmax_rows(rows, n, st.data(), kBlockN, m.data(), l.data(), alpha.data());
        if (dropout)
          for (int64_t g = 0; g < heads; ++g)
            drop_probs(p, {bi, h0 + g, 0, lq, j0, n}, st.data() + g * lq * kBlockN, kQueriesByKeys);
        if (convert_v)
          pv_rows(rows, n, st.data(), alpha.data(), v_buf.data(), d, d, acc.data(), d);
        else
          pv_rows(rows, n, st.data(), alpha.data(), v_src + j0 * p.v_row_stride, p.v_row_stride, d, acc.data(), d);
      }
      for (int64_t g = 0; g < heads; ++g)
        store_range<T>(p, split, bi, h0 + g, 0, lq, acc.data() + g * lq * d, d, m.data() + g * lq, l.data() + g * lq);
    }
  }
  if (splits > 1) combine_splits<T>(p);
}

// ---- bf16 on AMX's tiles: the products on the tile unit, or by vdpbf16ps ------------------
//
// On a CPU with AMX (Sapphire Rapids on), TDPBF16PS multiplies a 16 x 32 bf16 tile (A, rows
// in memory) by a 32 x 16 one (B) into 16 x 16 fp32: 8192 products an instruction, the CPU's
// tensor core, and what torch's own bf16 SDPA runs on (oneDNN). fwd and the backward's
// bwd_fused and bwd_split (below) convert bf16 to fp32 for the FMA micro-GEMM (bf16 prefill
// 0.31x SDPA at 1 x 16 heads x 1024 x 128 causal); fwd_amx and bwd_amx_* are the same loops with
// bf16 operands and fp32 sums, as the GPU kernels have them, and their tiles keys by queries as
// the fp32 ones: the softmax runs down the keys on vectors of 16 queries, no horizontal sums.
// A B tile holds pairs of rows interleaved ("VNNI": its row r holds rows 2r, 2r + 1 of its 16
// columns), so every operand is staged once into its layout (stage_a_rows, stage_at_rows,
// stage_b_tiles, stage_bt_tiles), zero past the real rows and columns, D rounded up to 32 (one
// k-step). Every product is four 16 x 16 C
// tiles at a time (amx_block: 2 A and 2 B tiles a k-step, the eight tile registers all used).
// A CPU with AVX512_BF16 and no AMX (AMD Zen 4, say) runs the same kernels with amx_block's
// product by vdpbf16ps (32 products of bf16 pairs an instruction; dpbf16_block), which reads
// the same staged tiles: measured on a 2-core AMD EPYC, 1 x 16 x 1024 x 128 non-causal bf16 fwd
// 29.8 ms and fwd+bwd 107 ms, against 69.1 and 202 on the FMA kernels (SDPA 59.2 and 186).
//
// Keys a tile of the AMX forward: two kBlockN blocks, so that each load and store of the
// accumulator tiles (in memory) carries four k-steps of P V, not two. (Four blocks, 256 keys,
// measured no faster, and causal wastes more on the diagonal: 1024 causal 11.4 ms.)
constexpr int64_t kAmxN = 128;

constexpr bool bf16_tile_kernels_built() {
#if defined(FUSEDFORMER_CPU_BF16_TILES)
  return true;
#else
  return false;
#endif
}
constexpr float kLog2e = 1.44269504088896341f;  // the AMX kernels' exps are powers of 2

// The units bf16 attention can run its products on, as FUSEDFORMER_CPU_BF16 names them: the
// fp32 FMA kernels (the bf16 inputs converted), vdpbf16ps on the tile layouts, the AMX tiles.
enum class Bf16Unit { kFma, kDpbf16, kAmx };

// Whether this process may use the AMX tile registers: Linux grants their state on request
// (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA), and refuses on a CPU without AMX.
bool amx_usable() {
#if defined(FUSEDFORMER_CPU_AMX)
  static const bool granted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return granted;
#else
  return false;
#endif
}

#if defined(FUSEDFORMER_CPU_BF16_TILES)

// Whether the calling thread's amx_block calls run on the AMX tiles (else vdpbf16ps): set for
// a parallel region's span by TileUnit.
thread_local bool t_amx_tiles = false;

#if defined(FUSEDFORMER_CPU_AMX)
// Palette 1 with all eight tiles 16 rows of 64 bytes; loaded by each thread that uses them.
void amx_configure() {
  struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
  } config{};
  config.palette = 1;
  for (int t = 0; t < 8; ++t) config.colsb[t] = 64, config.rows[t] = 16;
  _tile_loadconfig(&config);
}
#endif

// A thread's tile unit for one parallel region: AMX (its tiles configured here, released at
// the end; bf16_unit picks AMX only in a build that has it) or vdpbf16ps.
class TileUnit {
 public:
  explicit TileUnit(Bf16Unit unit) {
    t_amx_tiles = unit == Bf16Unit::kAmx;
#if defined(FUSEDFORMER_CPU_AMX)
    if (t_amx_tiles) amx_configure();
#endif
  }
  ~TileUnit() {
#if defined(FUSEDFORMER_CPU_AMX)
    if (t_amx_tiles) _tile_release();
#endif
    t_amx_tiles = false;
  }
  TileUnit(const TileUnit&) = delete;
  TileUnit& operator=(const TileUnit&) = delete;
};

// amx_block's product by vdpbf16ps from the same staged operands. An A row's k-step is 16 pairs
// of bf16 and a B tile's row kp holds pair kp of each of its 16 columns, so for each kp one
// broadcast A pair times one B row is what the tile instruction sums: C row m += A(m, pair kp) ·
// B(pair kp, 16 columns). Eight rows by the block's 32 columns a pass: 16 accumulators, two B
// rows loaded per pair and reused by the eight rows.
template <bool kAccumulate, typename FA, typename FB>
inline void dpbf16_block(int64_t ksteps, FA&& a, int64_t lda, FB&& b, float* c, int64_t ldc) {
  constexpr int kRows = 8;
  for (int i = 0; i < 2; ++i)
    for (int r0 = 0; r0 < 16; r0 += kRows) {
      float* c_rows = c + (16 * i + r0) * ldc;
      __m512 acc[kRows][2];
      for (int r = 0; r < kRows; ++r)
        for (int j = 0; j < 2; ++j)
          acc[r][j] = kAccumulate ? _mm512_loadu_ps(c_rows + r * ldc + 16 * j) : _mm512_setzero_ps();
      for (int64_t ks = 0; ks < ksteps; ++ks) {
        const char* a_rows = reinterpret_cast<const char*>(a(i, ks)) + r0 * lda;
        const uint32_t *b0 = b(0, ks), *b1 = b(1, ks);
        for (int kp = 0; kp < 16; ++kp) {
          const __m512bh bv0 = (__m512bh)_mm512_loadu_si512(b0 + 16 * kp);
          const __m512bh bv1 = (__m512bh)_mm512_loadu_si512(b1 + 16 * kp);
          for (int r = 0; r < kRows; ++r) {
            int32_t pair;
            std::memcpy(&pair, a_rows + r * lda + 4 * kp, sizeof pair);
            const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], av, bv0);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], av, bv1);
          }
        }
      }
      for (int r = 0; r < kRows; ++r)
        for (int j = 0; j < 2; ++j) _mm512_storeu_ps(c_rows + r * ldc + 16 * j, acc[r][j]);
    }
}

// C (32 x 32 fp32 at c, ldc floats a row) = (kAccumulate: C +) Σ_{ks < ksteps} A_ks B_ks, as
// four 16 x 16 C tiles (registers 0-3): a(i, ks) the 16 A rows 16i.. of k-step ks (lda bytes
// apart), b(j, ks) the 1 KiB B tile of columns 16j.. of k-step ks. On vdpbf16ps where the
// thread's unit is not AMX (dpbf16_block).
template <bool kAccumulate, typename FA, typename FB>
inline void amx_block(int64_t ksteps, FA&& a, int64_t lda, FB&& b, float* c, int64_t ldc) {
#if defined(FUSEDFORMER_CPU_AMX)
  if (!t_amx_tiles) return dpbf16_block<kAccumulate>(ksteps, a, lda, b, c, ldc);
  const int64_t ldc_bytes = ldc * int64_t(sizeof(float));
  if constexpr (kAccumulate) {
    _tile_loadd(0, c, ldc_bytes);
    _tile_loadd(1, c + 16, ldc_bytes);
    _tile_loadd(2, c + 16 * ldc, ldc_bytes);
    _tile_loadd(3, c + 16 * ldc + 16, ldc_bytes);
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t ks = 0; ks < ksteps; ++ks) {
    _tile_loadd(4, a(0, ks), lda);
    _tile_loadd(5, a(1, ks), lda);
    _tile_loadd(6, b(0, ks), 64);
    _tile_loadd(7, b(1, ks), 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, ldc_bytes);
  _tile_stored(1, c + 16, ldc_bytes);
  _tile_stored(2, c + 16 * ldc, ldc_bytes);
  _tile_stored(3, c + 16 * ldc + 16, ldc_bytes);
#else
  dpbf16_block<kAccumulate>(ksteps, a, lda, b, c, ldc);
#endif
}

// A 16 x 16 matrix of 32-bit elements, one row a register, transposed in place: 64 shuffles
// in four rounds (pairs of elements, of pairs, of 128-bit quarters, of halves).
inline void transpose16x16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4)
    for (int j = 0; j < 2; ++j) {
      r[i + 2 * j] = _mm512_unpacklo_epi64(t[i + j], t[i + j + 2]);
      r[i + 2 * j + 1] = _mm512_unpackhi_epi64(t[i + j], t[i + j + 2]);
    }
  for (int i = 0; i < 16; i += 8)
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
  }
}

// The 32 bf16 of row `row` at columns [c0, c0 + 32), zero past d; a zero vector for a row past n.
inline __m512i load_bf16x32(const uint16_t* base, int64_t row_stride, int64_t row, int64_t n, int64_t c0, int64_t d) {
  if (row >= n) return _mm512_setzero_si512();
  const int64_t live = std::clamp<int64_t>(d - c0, 0, 32);
  const __mmask32 mask = live >= 32 ? ~__mmask32(0) : (__mmask32(1) << live) - 1;
  return _mm512_maskz_loadu_epi16(mask, base + row * row_stride + c0);
}

// Rows x and y of 32 bf16 interleaved by elements, {x0 y0 ... x15 y15} and {x16 y16 ... x31 y31}:
// row r of the B tiles of two 16-column blocks when x, y are rows 2r, 2r + 1.
inline void interleave_rows(__m512i x, __m512i y, __m512i& lo, __m512i& hi) {
  alignas(64) static constexpr uint16_t kLo[32] = {0, 32, 1, 33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
                                                   8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i idx = _mm512_load_si512(kLo);
  lo = _mm512_permutex2var_epi16(x, idx, y);
  hi = _mm512_permutex2var_epi16(x, _mm512_add_epi16(idx, _mm512_set1_epi16(16)), y);
}

// Rows [0, kBlockN) of a bf16 matrix (row_stride apart; n real, zero after and past d) as the
// B tiles of a product by its transpose (Qᵀ in Sᵀ = K Qᵀ, dOᵀ in dPᵀ = V dOᵀ) at bt: tile (row
// group g / 16, k-step ks) at (g / 16 · ksteps + ks) · 256, its row r the column pair 2r, 2r + 1
// of its 16 rows; so 16 rows' 32 columns load as 16 x 16 pairs and are transposed.
void stage_bt_tiles(const uint16_t* src, int64_t row_stride, int64_t n, int64_t d, int64_t ksteps, uint32_t* bt) {
  for (int64_t g = 0; g < kBlockN; g += 16)
    for (int64_t ks = 0; ks < ksteps; ++ks) {
      __m512i r[16];
      for (int j = 0; j < 16; ++j) r[j] = load_bf16x32(src, row_stride, g + j, n, 32 * ks, d);
      transpose16x16(r);
      uint32_t* tile = bt + (g / 16 * ksteps + ks) * 256;
      for (int x = 0; x < 16; ++x) _mm512_storeu_si512(tile + 16 * x, r[x]);
    }
}

// Rows [0, kBlockN) of a bf16 matrix (n real, zero after and past d) as the B tiles of a
// product by it (dO in dV += Pdᵀ dO, Q in dK += dSᵀ Q) at b: tile (row pair block j / 32,
// 16-column block e / 16) at (j / 32 · dtiles + e / 16) · 256, its row r rows 2r, 2r + 1 of
// its 16 columns, interleaved.
void stage_b_tiles(const uint16_t* src, int64_t row_stride, int64_t n, int64_t d, int64_t dtiles, uint32_t* b) {
  for (int64_t j = 0; j < kBlockN; j += 2)
    for (int64_t e = 0; e < dtiles * 16; e += 32) {
      __m512i lo, hi;
      interleave_rows(load_bf16x32(src, row_stride, j, n, e, d), load_bf16x32(src, row_stride, j + 1, n, e, d), lo, hi);
      uint32_t* row = b + (j / 32 * dtiles + e / 16) * 256 + j % 32 / 2 * 16;
      _mm512_storeu_si512(row, lo);
      _mm512_storeu_si512(row + 256, hi);
    }
}

// Rows [0, n) of a bf16 matrix (row_stride apart) as `rows` rows of dk bf16 (zero past n and
// past d): the A operand of a product whose k dimension is d (K in Sᵀ = K Qᵀ, V in dPᵀ = V dOᵀ).
void stage_a_rows(const uint16_t* src, int64_t row_stride, int64_t n, int64_t rows, int64_t d, int64_t dk,
                  uint16_t* dst) {
  for (int64_t j = 0; j < rows; ++j)
    for (int64_t c = 0; c < dk; c += 32)
      _mm512_storeu_si512(dst + j * dk + c, load_bf16x32(src, row_stride, j, n, c, d));
}

// The transpose of rows [0, n) (row_stride apart; zero past n up to rows, a multiple of 32, and
// past d up to dk) as dk rows of bf16 ld apart: the A operand of a product whose k dimension is
// the rows. 32 rows by 32 columns at a time: pairs of rows interleaved (two 16 x 16 matrices of
// pairs), then transposed.
void stage_at_rows(const uint16_t* src, int64_t row_stride, int64_t n, int64_t rows, int64_t d, int64_t dk,
                   uint16_t* dst, int64_t ld) {
  for (int64_t j = 0; j < rows; j += 32)
    for (int64_t e = 0; e < dk; e += 32) {
      __m512i a[16], b[16];
      for (int r = 0; r < 16; ++r)
        interleave_rows(load_bf16x32(src, row_stride, j + 2 * r, n, e, d),
                        load_bf16x32(src, row_stride, j + 2 * r + 1, n, e, d), a[r], b[r]);
      transpose16x16(a);
      transpose16x16(b);
      for (int x = 0; x < 16; ++x) {
        _mm512_storeu_si512(dst + (e + x) * ld + j, a[x]);
        _mm512_storeu_si512(dst + (e + 16 + x) * ld + j, b[x]);
      }
    }
}

// dst (cols x rows, ld_dst) = src (rows x cols, ld_src)ᵀ for fp32, rows and cols multiples of 16.
void transpose_tile(const float* src, int64_t ld_src, int64_t rows, int64_t cols, float* dst, int64_t ld_dst) {
  for (int64_t r = 0; r < rows; r += 16)
    for (int64_t c = 0; c < cols; c += 16) {
      __m512i x[16];
      for (int y = 0; y < 16; ++y) x[y] = _mm512_loadu_si512(src + (r + y) * ld_src + c);
      transpose16x16(x);
      for (int y = 0; y < 16; ++y) _mm512_storeu_si512(dst + (c + y) * ld_dst + r, x[y]);
    }
}

// Dropout's keep bits of key t.j0 + key for the 16 queries t.i0 + r.. of a tile (0 past t.m);
// P: the forward's or the backward's params.
template <typename P>
__mmask16 keep_lanes(const P& p, const TilePos& t, int64_t r, int64_t key) {
  __mmask16 keep = 0;
  for (int lane = 0; lane < 16 && r + lane < t.m; ++lane)
    if (dropout_keep(p.seed, t.bi, t.h, t.i0 + r + lane, t.j0 + key, p.hq, p.lq, p.lk, p.dropout_p))
      keep |= __mmask16(1u << lane);
  return keep;
}

// One key tile of fwd_amx's online softmax, the steps of fwd's online_softmax on st = Sᵀ
// (kAmxN keys by kBlockM queries, fp32): per vector of 16 queries, m <- max(m, max_c s · scale),
// P = 2^(s · c - m · log2 e) with c = scale · log2 e (the scale rides in the exp's fma; 1 when
// st is scaled already), l <- l · alpha + Σ P, alpha = exp(m_old - m). P is written in bf16 as
// the B tiles of acc += Vᵀ Pᵀ (pt: key pair block, then 16-query column tile), dropout's zeros
// in it, 0 for keys [n, n32).
void softmax_cols_bf16(const AttentionFwdParams& p, const TilePos& t, int64_t n32, const float* st, float scale,
                       float* m, float* l, float* alpha, uint32_t* pt) {
  using W = Wide;
  alignas(64) static constexpr uint16_t kPairs[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                      8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i pairs = _mm512_load_si512(kPairs);
  const W::V c = W::splat(scale * kLog2e);
  const bool dropout = p.dropout_p > 0.f;
  // Each query vector's max over the tile's keys, as online_softmax's: independent chains.
  constexpr int kVecs = kBlockM / W::kWidth;
  W::V vmax[kVecs];
  for (auto& x : vmax) x = W::splat(kNegInf);
  for (int64_t key = 0; key < t.n; ++key)
    for (int x = 0; x < kVecs; ++x) vmax[x] = W::max(vmax[x], W::load(st + key * kBlockM + x * W::kWidth));
  for (int64_t r = 0; r < kBlockM; r += W::kWidth) {
    const W::V m_old = W::load(m + r), m_new = W::max(m_old, vmax[r / W::kWidth] * W::splat(scale));
    const W::V m_use = m_new == kNegInf ? W::V{} : m_new;  // keeps -inf - -inf out
    const W::V m2 = m_use * W::splat(kLog2e);
    W::V sum{};
    for (int64_t key = 0; key < n32; key += 2) {
      W::V pk[2];
      for (int x = 0; x < 2; ++x) {
        pk[x] = key + x < t.n ? exp2_nonpositive16(W::fma(W::load(st + (key + x) * kBlockM + r), c, -m2)) : W::V{};
        sum += pk[x];  // l sums the probabilities before dropout: softmax's denominator
        if (dropout && key + x < t.n) pk[x] = _mm512_maskz_mov_ps(keep_lanes(p, t, r, key + x), pk[x]);
      }
      const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(pk[1], pk[0]);  // keys key, key + 1
      _mm512_storeu_si512(pt + ((key / 32) * (kBlockM / 16) + r / 16) * 256 + key % 32 / 2 * 16,
                          _mm512_permutexvar_epi16(pairs, both));
    }
    const W::V a = W::exp(m_old - m_use);
    W::store(alpha + r, a);
    W::store(l + r, W::fma(W::load(l + r), a, sum));
    W::store(m + r, m_new);
  }
}

// fwd's loop on the tile unit, per (batch, query head, block of kBlockM queries, split) task:
//   Sᵀ = K Qᵀ        A: K rows (staged per call)     B: Qᵀ tiles (staged per task)
//   mask, causal diagonal, online softmax down the keys, P in bf16 (softmax_cols_bf16)
//   accᵀ = accᵀ diag(alpha) + Vᵀ Pᵀ   A: Vᵀ rows (staged per call)   B: Pᵀ tiles
// with accᵀ (D by queries, fp32) in memory as the C tiles, transposed back as it is stored.
void fwd_amx(const AttentionFwdParams& p, Bf16Unit unit) {
  using W = Wide;
  const int64_t d = p.d, dk = (d + 31) / 32 * 32, ksteps = dk / 32, group = p.hq / p.hkv;
  const int64_t nqb = ceil_div(p.lq, kBlockM), splits = p.num_splits, lkp = ceil_div(p.lk, kAmxN) * kAmxN;
  // The scale multiplies in the softmax's exp, unless an additive mask needs scaled scores or
  // a negative scale would turn the max around.
  const bool fold_scale = p.mask.kind != MaskKind::kAdditive && p.scale > 0.f;
  const uint16_t* Q = static_cast<const uint16_t*>(p.q);
  const uint16_t* K = static_cast<const uint16_t*>(p.k);
  const uint16_t* V = static_cast<const uint16_t*>(p.v);
  // Per (batch, kv head): K rows (lkp x dk) and Vᵀ (dk x lkp), zero past LK and D; a task
  // stages one kBlockN-key block of a head, every element of it written (the storage is not
  // zeroed first).
  const size_t head_elems = size_t(lkp * dk);
  std::unique_ptr<uint16_t[]> k_rows(new uint16_t[p.b * p.hkv * head_elems]);
  std::unique_ptr<uint16_t[]> vt_rows(new uint16_t[p.b * p.hkv * head_elems]);
#pragma omp parallel for schedule(static)
  for (int64_t task = 0; task < p.b * p.hkv * (lkp / kBlockN); ++task) {
    const int64_t bh = task / (lkp / kBlockN), j0 = task % (lkp / kBlockN) * kBlockN;
    const int64_t bi = bh / p.hkv, hk = bh % p.hkv, n = std::clamp<int64_t>(p.lk - j0, 0, kBlockN);
    stage_a_rows(K + bi * p.k_batch_stride + hk * p.k_head_stride + j0 * p.k_row_stride, p.k_row_stride, n,
                 kBlockN, d, dk, k_rows.get() + bh * head_elems + j0 * dk);
    stage_at_rows(V + bi * p.v_batch_stride + hk * p.v_head_stride + j0 * p.v_row_stride, p.v_row_stride, n,
                  kBlockN, d, dk, vt_rows.get() + bh * head_elems + j0, lkp);
  }
#pragma omp parallel
  {
    const TileUnit tile_unit(unit);
    // Per task: Qᵀ tiles, Sᵀ (kAmxN x kBlockM fp32), Pᵀ tiles, accᵀ (dk x kBlockM fp32) and
    // acc's rows, and m, l, alpha of the queries.
    std::vector<uint32_t> qt_tiles(kBlockM * dk / 2), pt_tiles(kAmxN * kBlockM / 2);
    std::vector<float> st(kAmxN * kBlockM), acc_t(dk * kBlockM), acc(kBlockM * dk), m(kBlockM), l(kBlockM),
        alpha(kBlockM);
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < p.b * p.hq * nqb * splits; ++task) {
      const int64_t split = task % splits;
      TilePos t = query_block(p, task / splits);
      const int64_t bh = t.bi * p.hkv + t.h / group;
      const uint16_t* kh = k_rows.get() + bh * head_elems;
      const uint16_t* vh = vt_rows.get() + bh * head_elems;
      stage_bt_tiles(Q + t.bi * p.q_batch_stride + t.h * p.q_head_stride + t.i0 * p.q_row_stride, p.q_row_stride,
                     t.m, d, ksteps, qt_tiles.data());
      std::fill(acc_t.begin(), acc_t.end(), 0.f);
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), 0.f);

      const auto [kb_begin, kb_end] =
          split_range(key_blocks_end(p.is_causal, t.i0, t.m, p.lk, kAmxN), split, splits);
      for (int64_t kb = kb_begin; kb < kb_end; ++kb) {
        t.j0 = kb * kAmxN;
        t.n = std::min(kAmxN, p.lk - t.j0);
        const int64_t n32 = (t.n + 31) / 32 * 32;  // keys in whole k-steps of Vᵀ Pᵀ (P zero past n)
        for (int64_t mi = 0; mi < n32; mi += 32)  // Sᵀ = K Qᵀ
          for (int64_t ni = 0; ni < kBlockM; ni += 32)
            amx_block<false>(
                ksteps, [&](int i, int64_t ks) { return kh + (t.j0 + mi + 16 * i) * dk + 32 * ks; }, dk * 2,
                [&](int j, int64_t ks) { return qt_tiles.data() + ((ni / 16 + j) * ksteps + ks) * 256; },
                st.data() + mi * kBlockM + ni, kBlockM);
        if (!fold_scale)  // an additive mask adds to scaled scores
          for (int64_t x = 0; x < t.n * kBlockM; x += W::kWidth)
            W::store(st.data() + x, W::load(st.data() + x) * W::splat(p.scale));
        mask_scores<bf16>(p.mask, p.is_causal, t, st.data(), kKeysByQueries);
        softmax_cols_bf16(p, t, n32, st.data(), fold_scale ? p.scale : 1.f, m.data(), l.data(), alpha.data(),
                          pt_tiles.data());
        for (int64_t e = 0; e < dk; ++e)  // accᵀ diag(alpha)
          for (int64_t r = 0; r < kBlockM; r += W::kWidth) {
            float* a = acc_t.data() + e * kBlockM + r;
            W::store(a, W::load(a) * W::load(alpha.data() + r));
          }
        for (int64_t mi = 0; mi < dk; mi += 32)  // accᵀ += Vᵀ Pᵀ
          for (int64_t ni = 0; ni < kBlockM; ni += 32)
            amx_block<true>(
                n32 / 32, [&](int i, int64_t ks) { return vh + (mi + 16 * i) * lkp + t.j0 + 32 * ks; }, lkp * 2,
                [&](int j, int64_t ks) { return pt_tiles.data() + (ks * (kBlockM / 16) + ni / 16 + j) * 256; },
                acc_t.data() + mi * kBlockM + ni, kBlockM);
      }
      transpose_tile(acc_t.data(), kBlockM, dk, kBlockM, acc.data(), dk);
      store_range<bf16>(p, split, t.bi, t.h, t.i0, t.m, acc.data(), dk, m.data(), l.data());
    }
  }
  if (splits > 1) combine_splits<bf16>(p);
}

// ---- the bf16 backward on AMX's tiles
//
// bwd's loop (per (batch, kv head) task: each query head of the group, each (key block, query
// block) tile, dK, dV and dQ summed in the task: bwd_amx_fused) with its five products on the
// tile unit, in the GPU kernels' precision: bf16 operands, fp32 sums; for grids with fewer
// (batch, kv head) pairs than threads, bwd's other two schedules: per query head with dK, dV
// partials (bwd_amx_heads), or the GPU kernels' split into a dK/dV and a dQ pass
// (bwd_amx_split), which sums every tile in fused's order (bitwise the same gradients).
// Every tile is keys by queries, so the per-query lse and Delta are vectors, and each
// product's operands are staged once (per task, or per call when split):
//   Sᵀ  = K Qᵀ        A: K rows             B: Qᵀ tiles (Q rows transposed by pairs of d)
//   dPᵀ = V dOᵀ       A: V rows             B: dOᵀ tiles
//   Pᵀ, dSᵀ = P ∘ (dP - Delta) in fp32 (bwd_amx_probs), rounded to bf16
//   dV += Pdᵀ dO      A: Pdᵀ rows            B: dO tiles (pairs of query rows interleaved)
//   dK += dSᵀ Q       A: dSᵀ rows            B: Q tiles
//   dQᵀ += Kᵀ dSᵀ     A: Kᵀ rows (K transposed) B: dSᵀ tiles (pairs of key rows interleaved)
// with dK, dV (keys by d) and dQᵀ (d by queries) as fp32 C tiles in memory; dQᵀ is transposed
// back as it is stored.

// The tile math of the AMX backward from st = Sᵀ and dpt = dPᵀ (kBlockN x kBlockM fp32, keys by queries):
// P = 2^(s · c - lse2) (c = scale · log2 e, or log2 e when st is scaled already; lse2 = lse ·
// log2 e, +inf for a fully masked or absent query, whose P is then 0), then as bwd's
// probs_and_dscores Pd = P ∘ keep / (1 - p_drop) and dS = P ∘ (dP ∘ keep / (1 - p_drop) - Delta),
// written in bf16 as pa (Pdᵀ rows), da (dSᵀ rows) and db (dSᵀ as B tiles: key pair block, then
// 16-query column tile). Keys past t.n get 0.
void bwd_amx_probs(const AttentionBwdParams& p, const TilePos& t, float c, const float* lse2, const float* delta,
                   const float* st, const float* dpt, uint16_t* pa, uint16_t* da, uint32_t* db) {
  alignas(64) static constexpr uint16_t kPairs[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                      8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i pairs = _mm512_load_si512(kPairs);
  const bool dropout = p.dropout_p > 0.f;
  const __m512 vc = _mm512_set1_ps(c), rp = _mm512_set1_ps(dropout ? 1.f / (1.f - p.dropout_p) : 1.f);
  for (int64_t key = 0; key < kBlockN; key += 2)
    for (int64_t r = 0; r < kBlockM; r += 16) {
      __m512 pd[2], ds[2];
      for (int x = 0; x < 2; ++x) {
        const int64_t kk = key + x;
        if (kk >= t.n) {
          pd[x] = ds[x] = _mm512_setzero_ps();
          continue;
        }
        const __m512 pc = exp2_nonpositive16(
            _mm512_fmsub_ps(_mm512_loadu_ps(st + kk * kBlockM + r), vc, _mm512_loadu_ps(lse2 + r)));
        __m512 dp = _mm512_loadu_ps(dpt + kk * kBlockM + r);
        pd[x] = pc;
        if (dropout) {
          const __mmask16 keep = keep_lanes(p, t, r, kk);
          pd[x] = _mm512_maskz_mul_ps(keep, pc, rp);
          dp = _mm512_maskz_mul_ps(keep, dp, rp);
        }
        ds[x] = _mm512_mul_ps(pc, _mm512_sub_ps(dp, _mm512_loadu_ps(delta + r)));
      }
      for (int x = 0; x < 2; ++x) {
        const int64_t at = (key + x) * kBlockM + r;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(pa + at), (__m256i)_mm512_cvtneps_pbh(pd[x]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(da + at), (__m256i)_mm512_cvtneps_pbh(ds[x]));
      }
      const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(ds[1], ds[0]);  // keys key, key + 1 of 16 queries
      _mm512_storeu_si512(db + ((key / 32) * (kBlockM / 16) + r / 16) * 256 + key % 32 / 2 * 16,
                          _mm512_permutexvar_epi16(pairs, both));
    }
}

// The staged operands the AMX backward's tiles read, for one (batch, kv head) and one query head of it:
// K and V rows and Kᵀ (lkp keys, dk), the query head's Qᵀ, dOᵀ, Q and dO tiles (lqp queries)
// and its rows' lse · log2 e (+inf where absent or fully masked) and Delta.
struct AmxBwdHead {
  const uint16_t *k_rows, *v_rows, *kt_rows;
  const uint32_t *qt_tiles, *gt_tiles, *q_tiles, *g_tiles;
  const float *lse2, *delta;
};

// Sizes of the AMX backward's staged operands: dk (D rounded up to a k-step), ksteps of 32 and dtiles
// of 16 columns of it, the lengths rounded up to whole tiles, and the softmax exponent's
// multiplier c (see bwd_amx_probs).
struct AmxBwdDims {
  static_assert(kBlockM == kBlockN && kBlockM % 32 == 0,
                "square tiles of whole 32 x 32 AMX blocks (query blocks stage as key blocks do)");
  int64_t dk, ksteps, dtiles, lqp, lkp;
  bool fold_scale;
  float c;
  explicit AmxBwdDims(const AttentionBwdParams& p)
      : dk((p.d + 31) / 32 * 32), ksteps(dk / 32), dtiles(dk / 16), lqp(ceil_div(p.lq, kBlockM) * kBlockM),
        lkp(ceil_div(p.lk, kBlockN) * kBlockN),
        // The scale rides in the exp, unless an additive mask needs scaled scores (or it is negative).
        fold_scale(p.mask.kind != MaskKind::kAdditive && p.scale > 0.f),
        c((fold_scale ? p.scale : 1.f) * kLog2e) {}
};

// One tile's Sᵀ = K Qᵀ and dPᵀ = V dOᵀ into st and dpt, then its mask and bwd_amx_probs: pa, da
// and db hold the tile's Pdᵀ and dSᵀ in bf16 for the products that follow.
void bwd_amx_tile(const AttentionBwdParams& p, const TilePos& t, const AmxBwdDims& z, const AmxBwdHead& hd,
                  float* st, float* dpt, uint16_t* pa, uint16_t* da, uint32_t* db) {
  for (int64_t mi = 0; mi < kBlockN; mi += 32)
    for (int64_t ni = 0; ni < kBlockM; ni += 32) {
      const auto b_of = [&](const uint32_t* tiles) {
        return [&, tiles](int j, int64_t ks) { return tiles + (((t.i0 + ni) / 16 + j) * z.ksteps + ks) * 256; };
      };
      amx_block<false>(
          z.ksteps, [&](int i, int64_t ks) { return hd.k_rows + (t.j0 + mi + 16 * i) * z.dk + 32 * ks; }, z.dk * 2,
          b_of(hd.qt_tiles), st + mi * kBlockM + ni, kBlockM);
      amx_block<false>(
          z.ksteps, [&](int i, int64_t ks) { return hd.v_rows + (t.j0 + mi + 16 * i) * z.dk + 32 * ks; }, z.dk * 2,
          b_of(hd.gt_tiles), dpt + mi * kBlockM + ni, kBlockM);
    }
  if (!z.fold_scale)
    for (int64_t x = 0; x < kBlockN * kBlockM; x += 16)
      _mm512_storeu_ps(st + x, _mm512_mul_ps(_mm512_loadu_ps(st + x), _mm512_set1_ps(p.scale)));
  mask_scores<bf16>(p.mask, p.is_causal, t, st, kKeysByQueries);
  bwd_amx_probs(p, t, z.c, hd.lse2 + t.i0, hd.delta + t.i0, st, dpt, pa, da, db);
}

// dV (+)= Pdᵀ dO and dK (+)= dSᵀ Q for a tile's kBlockN keys: dv, dk point at the tile's first
// key row (dk floats a row).
void bwd_amx_dkdv(const TilePos& t, const AmxBwdDims& z, const AmxBwdHead& hd, const uint16_t* pa, const uint16_t* da,
                  float* dv, float* dk) {
  for (int64_t mi = 0; mi < kBlockN; mi += 32)
    for (int64_t ei = 0; ei < z.dk; ei += 32) {
      const auto b_of = [&](const uint32_t* tiles) {
        return [&, tiles](int j, int64_t ks) { return tiles + ((t.i0 / 32 + ks) * z.dtiles + ei / 16 + j) * 256; };
      };
      amx_block<true>(
          kBlockM / 32, [&](int i, int64_t ks) { return pa + (mi + 16 * i) * kBlockM + 32 * ks; }, kBlockM * 2,
          b_of(hd.g_tiles), dv + mi * z.dk + ei, z.dk);
      amx_block<true>(
          kBlockM / 32, [&](int i, int64_t ks) { return da + (mi + 16 * i) * kBlockM + 32 * ks; }, kBlockM * 2,
          b_of(hd.q_tiles), dk + mi * z.dk + ei, z.dk);
    }
}

// dQᵀ (+)= Kᵀ dSᵀ for a tile's kBlockM queries: dq_t points at the tile's first query column
// (ld floats a row of D).
void bwd_amx_dq(const TilePos& t, const AmxBwdDims& z, const AmxBwdHead& hd, const uint32_t* db, float* dq_t,
                int64_t ld) {
  for (int64_t mi = 0; mi < z.dk; mi += 32)
    for (int64_t ni = 0; ni < kBlockM; ni += 32)
      amx_block<true>(
          kBlockN / 32, [&](int i, int64_t ks) { return hd.kt_rows + (mi + 16 * i) * z.lkp + t.j0 + 32 * ks; },
          z.lkp * 2, [&](int j, int64_t ks) { return db + (ks * (kBlockM / 16) + ni / 16 + j) * 256; },
          dq_t + mi * ld + ni, ld);
}

// Stages the query-side operands of head h of batch bi (rows of q_head, o_head, g_head) into
// hd's buffers: Qᵀ, dOᵀ, Q, dO tiles, and lse2, Delta (Delta also into p.delta).
void bwd_amx_stage_queries(const AttentionBwdParams& p, const AmxBwdDims& z, int64_t bi, int64_t h, uint32_t* qt,
                           uint32_t* gt, uint32_t* q, uint32_t* g, float* lse2, float* delta) {
  const uint16_t* q_head = static_cast<const uint16_t*>(p.q) + bi * p.q_batch_stride + h * p.q_head_stride;
  const uint16_t* o_head = static_cast<const uint16_t*>(p.o) + bi * p.o_batch_stride + h * p.o_head_stride;
  const uint16_t* g_head = static_cast<const uint16_t*>(p.do_) + bi * p.do_batch_stride + h * p.do_head_stride;
  for (int64_t i0 = 0; i0 < z.lqp; i0 += kBlockM) {
    const int64_t n = std::clamp<int64_t>(p.lq - i0, 0, kBlockM), at = i0 * z.dk / 2;
    stage_bt_tiles(q_head + i0 * p.q_row_stride, p.q_row_stride, n, p.d, z.ksteps, qt + at);
    stage_bt_tiles(g_head + i0 * p.do_row_stride, p.do_row_stride, n, p.d, z.ksteps, gt + at);
    stage_b_tiles(q_head + i0 * p.q_row_stride, p.q_row_stride, n, p.d, z.dtiles, q + at);
    stage_b_tiles(g_head + i0 * p.do_row_stride, p.do_row_stride, n, p.d, z.dtiles, g + at);
  }
  const int64_t row0 = (bi * p.hq + h) * p.lq;
  std::vector<float> o_row(p.d), g_row(p.d);
  for (int64_t i = 0; i < z.lqp; ++i) {  // Delta_i = Σ_d dO_id O_id, in fp32 from the bf16 rows
    float s = 0.f;
    if (i < p.lq) {
      convert_row(reinterpret_cast<const bf16*>(o_head + i * p.o_row_stride), p.d, o_row.data());
      convert_row(reinterpret_cast<const bf16*>(g_head + i * p.do_row_stride), p.d, g_row.data());
      for (int64_t e = 0; e < p.d; ++e) s += o_row[e] * g_row[e];
      p.delta[row0 + i] = s;
    }
    delta[i] = s;
    lse2[i] = i >= p.lq || p.lse[row0 + i] == kNegInf ? kPosInf : p.lse[row0 + i] * kLog2e;
  }
}

// Stages the key-side operands of kv head hk of batch bi: K and V rows and Kᵀ.
void bwd_amx_stage_keys(const AttentionBwdParams& p, const AmxBwdDims& z, int64_t bi, int64_t hk, uint16_t* k_rows,
                        uint16_t* v_rows, uint16_t* kt_rows) {
  const uint16_t* k_head = static_cast<const uint16_t*>(p.k) + bi * p.k_batch_stride + hk * p.k_head_stride;
  const uint16_t* v_head = static_cast<const uint16_t*>(p.v) + bi * p.v_batch_stride + hk * p.v_head_stride;
  stage_a_rows(k_head, p.k_row_stride, p.lk, z.lkp, p.d, z.dk, k_rows);
  stage_a_rows(v_head, p.v_row_stride, p.lk, z.lkp, p.d, z.dk, v_rows);
  stage_at_rows(k_head, p.k_row_stride, p.lk, z.lkp, p.d, z.dk, kt_rows, z.lkp);
}

// Per-thread buffers of the fused and per-head tile schedules: one kv head's K and V rows and
// Kᵀ; one query head's Qᵀ, dOᵀ, Q and dO tiles, lse2, Delta, dQᵀ and dQ rows; one tile's Sᵀ,
// dPᵀ and bf16 Pdᵀ, dSᵀ (rows and tiles).
struct AmxBwdBuffers {
  std::vector<uint16_t> k_rows, v_rows, kt_rows;
  std::vector<uint32_t> qt, gt, q, g;
  std::vector<float> lse2, delta, dq_t, dq_rows, st, dpt;
  std::vector<uint16_t> pa, da;
  std::vector<uint32_t> db;
  explicit AmxBwdBuffers(const AmxBwdDims& z)
      : k_rows(z.lkp * z.dk), v_rows(z.lkp * z.dk), kt_rows(z.dk * z.lkp), qt(z.lqp * z.dk / 2), gt(qt.size()),
        q(qt.size()), g(qt.size()), lse2(z.lqp), delta(z.lqp), dq_t(z.dk * z.lqp), dq_rows(kBlockM * z.dk),
        st(kBlockN * kBlockM), dpt(kBlockN * kBlockM), pa(kBlockN * kBlockM), da(kBlockN * kBlockM),
        db(kBlockN * kBlockM / 2) {}
  AmxBwdHead head() const {
    return AmxBwdHead{k_rows.data(), v_rows.data(), kt_rows.data(), qt.data(),    gt.data(),
                      q.data(),      g.data(),      lse2.data(),    delta.data()};
  }
};

// Query head h of batch bi on the tiles, its kv head staged in buf: every tile adds to dk and dv
// (lkp rows of z.dk fp32) and to dQᵀ, which is stored.
void bwd_amx_query_head(const AttentionBwdParams& p, const AmxBwdDims& z, int64_t bi, int64_t h, AmxBwdBuffers& buf,
                        float* dk, float* dv) {
  bwd_amx_stage_queries(p, z, bi, h, buf.qt.data(), buf.gt.data(), buf.q.data(), buf.g.data(), buf.lse2.data(),
                        buf.delta.data());
  std::fill(buf.dq_t.begin(), buf.dq_t.end(), 0.f);
  const AmxBwdHead hd = buf.head();
  for (int64_t kb = 0; kb < z.lkp / kBlockN; ++kb)
    for_key_block_tiles(p, bi, h, kb, [&](const TilePos& t) {
      bwd_amx_tile(p, t, z, hd, buf.st.data(), buf.dpt.data(), buf.pa.data(), buf.da.data(), buf.db.data());
      bwd_amx_dkdv(t, z, hd, buf.pa.data(), buf.da.data(), dv + t.j0 * z.dk, dk + t.j0 * z.dk);
      bwd_amx_dq(t, z, hd, buf.db.data(), buf.dq_t.data() + t.i0, z.lqp);
    });
  bf16* dq_head = static_cast<bf16*>(p.dq) + bi * p.dq_batch_stride + h * p.dq_head_stride;
  for (int64_t i0 = 0; i0 < p.lq; i0 += kBlockM) {  // dQ = (dQᵀ)ᵀ · scale
    transpose_tile(buf.dq_t.data() + i0, z.lqp, z.dk, kBlockM, buf.dq_rows.data(), z.dk);
    store_rows(buf.dq_rows.data(), z.dk, p.scale, std::min(kBlockM, p.lq - i0), p.d, i0, dq_head, p.dq_row_stride);
  }
}

// One task per (batch, kv head), as bwd: each query head of the group, each (key block, query
// block) tile adding to dK, dV and dQ in the task. Five products a tile; B · HKV tasks.
void bwd_amx_fused(const AttentionBwdParams& p, Bf16Unit unit) {
  const AmxBwdDims z(p);
  const int64_t group = p.hq / p.hkv;
#pragma omp parallel
  {
    const TileUnit tile_unit(unit);
    AmxBwdBuffers buf(z);
    std::vector<float> dk(z.lkp * z.dk), dv(z.lkp * z.dk);
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < p.b * p.hkv; ++task) {
      const int64_t bi = task / p.hkv, hk = task % p.hkv;
      bwd_amx_stage_keys(p, z, bi, hk, buf.k_rows.data(), buf.v_rows.data(), buf.kt_rows.data());
      std::fill(dk.begin(), dk.end(), 0.f);
      std::fill(dv.begin(), dv.end(), 0.f);
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) bwd_amx_query_head(p, z, bi, h, buf, dk.data(), dv.data());
      bwd_store_keys<bf16>(p, z.dk, bi, hk, 0, p.lk, dk.data(), dv.data());
    }
  }
}

// The per-head schedule on the tiles (bwd_heads's, which says when and why): one task per
// (batch, query head) with its own dK, dV partials, then the group's sums.
void bwd_amx_heads(const AttentionBwdParams& p, Bf16Unit unit) {
  const AmxBwdDims z(p);
  const int64_t group = p.hq / p.hkv, nkb = ceil_div(p.lk, kBlockN);
  const size_t head_elems = size_t(z.lkp * z.dk);
  std::vector<float> dk(p.b * p.hq * head_elems), dv(dk.size());
#pragma omp parallel
  {
    const TileUnit tile_unit(unit);
    AmxBwdBuffers buf(z);
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < p.b * p.hq; ++task) {
      const int64_t bi = task / p.hq, h = task % p.hq;
      float *dk_h = dk.data() + task * head_elems, *dv_h = dv.data() + task * head_elems;
      bwd_amx_stage_keys(p, z, bi, h / group, buf.k_rows.data(), buf.v_rows.data(), buf.kt_rows.data());
      std::fill(dk_h, dk_h + head_elems, 0.f);
      std::fill(dv_h, dv_h + head_elems, 0.f);
      bwd_amx_query_head(p, z, bi, h, buf, dk_h, dv_h);
    }
#pragma omp for schedule(static)
    for (int64_t task = 0; task < p.b * p.hkv * nkb; ++task)
      sum_group_partials<bf16>(p, z.dk, group, head_elems, task, dk.data(), dv.data());
  }
}

// For grids too small for the threads (B · HKV below them: MQA at batch 1, say), the GPU
// kernels' split: every operand staged once per call, then a dK, dV pass with one task per
// (batch, kv head, key block) and a dQ pass with one per (batch, query head, query block).
// Both recompute a tile's Sᵀ, dPᵀ and P: seven products a tile instead of five, for
// B · HKV · LK / kBlockN and B · HQ · LQ / kBlockM tasks instead of B · HKV.
void bwd_amx_split(const AttentionBwdParams& p, Bf16Unit unit) {
  const AmxBwdDims z(p);
  const int64_t group = p.hq / p.hkv;
  const size_t kv_elems = size_t(z.lkp * z.dk), q_elems = size_t(z.lqp * z.dk / 2);
  std::vector<uint16_t> k_rows(p.b * p.hkv * kv_elems), v_rows(k_rows.size()), kt_rows(k_rows.size());
  std::vector<uint32_t> qt(p.b * p.hq * q_elems), gt(qt.size()), q(qt.size()), g(qt.size());
  std::vector<float> lse2(p.b * p.hq * z.lqp), delta(lse2.size());
  split_staging(
      p,
      [&](int64_t bk) {
        bwd_amx_stage_keys(p, z, bk / p.hkv, bk % p.hkv, k_rows.data() + bk * kv_elems, v_rows.data() + bk * kv_elems,
                           kt_rows.data() + bk * kv_elems);
      },
      [&](int64_t bh) {
        bwd_amx_stage_queries(p, z, bh / p.hq, bh % p.hq, qt.data() + bh * q_elems, gt.data() + bh * q_elems,
                              q.data() + bh * q_elems, g.data() + bh * q_elems, lse2.data() + bh * z.lqp,
                              delta.data() + bh * z.lqp);
      });
  const auto head = [&](int64_t bi, int64_t h) {
    const int64_t bk = bi * p.hkv + h / group, bh = bi * p.hq + h;
    return AmxBwdHead{k_rows.data() + bk * kv_elems, v_rows.data() + bk * kv_elems, kt_rows.data() + bk * kv_elems,
                      qt.data() + bh * q_elems,      gt.data() + bh * q_elems,      q.data() + bh * q_elems,
                      g.data() + bh * q_elems,       lse2.data() + bh * z.lqp,      delta.data() + bh * z.lqp};
  };
#pragma omp parallel
  {
    const TileUnit tile_unit(unit);
    std::vector<float> st(kBlockN * kBlockM), dpt(kBlockN * kBlockM), dk_acc(kBlockN * z.dk), dv_acc(kBlockN * z.dk);
    std::vector<float> dq_t(z.dk * kBlockM), dq_rows(kBlockM * z.dk);
    std::vector<uint16_t> pa(kBlockN * kBlockM), da(kBlockN * kBlockM);
    std::vector<uint32_t> db(kBlockN * kBlockM / 2);
    split_passes(
        p,
        [&](int64_t bi, int64_t hk, int64_t kb, int64_t j0, int64_t n) {  // dK, dV of one key block
          std::fill(dk_acc.begin(), dk_acc.end(), 0.f);
          std::fill(dv_acc.begin(), dv_acc.end(), 0.f);
          for_group_key_block_tiles(p, bi, hk, kb, [&](const TilePos& t) {
            const AmxBwdHead hd = head(bi, t.h);
            bwd_amx_tile(p, t, z, hd, st.data(), dpt.data(), pa.data(), da.data(), db.data());
            bwd_amx_dkdv(t, z, hd, pa.data(), da.data(), dv_acc.data(), dk_acc.data());
          });
          bwd_store_keys<bf16>(p, z.dk, bi, hk, j0, n, dk_acc.data(), dv_acc.data());
        },
        [&](int64_t bi, int64_t h, int64_t qb, int64_t i0, int64_t m) {  // dQ of one query block
          const AmxBwdHead hd = head(bi, h);
          std::fill(dq_t.begin(), dq_t.end(), 0.f);
          for_query_block_tiles(p, bi, h, qb, [&](const TilePos& t) {
            bwd_amx_tile(p, t, z, hd, st.data(), dpt.data(), pa.data(), da.data(), db.data());
            bwd_amx_dq(t, z, hd, db.data(), dq_t.data(), kBlockM);
          });
          transpose_tile(dq_t.data(), kBlockM, z.dk, kBlockM, dq_rows.data(), z.dk);
          store_rows(dq_rows.data(), z.dk, p.scale, m, p.d, i0,
                     static_cast<bf16*>(p.dq) + bi * p.dq_batch_stride + h * p.dq_head_stride, p.dq_row_stride);
        });
  }
}

#endif

// The unit a dtype's attention runs on: fp32 and fp16 on the FMA kernels; bf16 on the best
// that the build and CPU offer (AMX, else vdpbf16ps, else FMA), or the one FUSEDFORMER_CPU_BF16
// (fma, dpbf16 or amx; read at each call) names: for comparison, and as a way out.
Bf16Unit bf16_unit(DType dtype) {
  if (dtype != DType::kBFloat16) return Bf16Unit::kFma;
  const bool tiles = bf16_tile_kernels_built(), amx = tiles && amx_usable();
  const char* env = std::getenv("FUSEDFORMER_CPU_BF16");
  if (!env) return amx ? Bf16Unit::kAmx : tiles ? Bf16Unit::kDpbf16 : Bf16Unit::kFma;
  const std::string name(env);
  if (name == "fma") return Bf16Unit::kFma;
  if (name == "dpbf16" && tiles) return Bf16Unit::kDpbf16;
  if (name == "amx" && amx) return Bf16Unit::kAmx;
  if (name == "dpbf16" || name == "amx")
    throw std::invalid_argument("FUSEDFORMER_CPU_BF16=" + name + ": this build or CPU lacks it (available: " +
                                attention_cpu_bf16_units() + ")");
  throw std::invalid_argument("FUSEDFORMER_CPU_BF16 must be fma, dpbf16 or amx, got '" + name + "'");
}

// The forward takes the tile kernels for more than a few query rows (fwd_decode's dot products
// read each key once for a handful of rows; tiles of 64 would be mostly padding).
bool amx_forward(const AttentionFwdParams& p) { return !few_queries(p.lq) && bf16_unit(p.dtype) != Bf16Unit::kFma; }

// The backward's per-tile math. From the scores st and dpt = V dOᵀ (both (n, kBlockM), keys
// by queries) and the lse and Delta of the tile's query columns, overwrite
//   st  <- Pd = P ∘ keep / (1 - p_drop)     (what multiplied v in the forward)
//   dpt <- dS = P ∘ (dP ∘ keep / (1 - p_drop) - Delta)
// lse holds +inf for a fully masked row, so that P = exp(s - inf) = 0 there.
void probs_and_dscores(const AttentionBwdParams& p, const TilePos& t, const float* lse,
                       const float* delta, float* st, float* dpt) {
  using W = Wide;
  if (p.dropout_p == 0.f) {
    for (int64_t c = 0; c < t.n; ++c)
      for (int64_t r = 0; r < t.m; r += W::kWidth) {
        float* s = st + c * kBlockM + r;
        float* dp = dpt + c * kBlockM + r;
        const W::V pc = W::exp(W::load(s) - W::load(lse + r));
        W::store(s, pc);
        W::store(dp, pc * (W::load(dp) - W::load(delta + r)));
      }
    return;
  }
  const float rp = 1.f / (1.f - p.dropout_p);
  for (int64_t c = 0; c < t.n; ++c) {
    float* srow = st + c * kBlockM;
    float* dprow = dpt + c * kBlockM;
    for (int64_t r = 0; r < t.m; r += W::kWidth) W::store(srow + r, W::exp(W::load(srow + r) - W::load(lse + r)));
    for (int64_t r = 0; r < t.m; ++r) {
      const float pc = srow[r];
      const bool keep = dropout_keep(p.seed, t.bi, t.h, t.i0 + r, t.j0 + c, p.hq, p.lq, p.lk, p.dropout_p);
      srow[r] = keep ? pc * rp : 0.f;
      dprow[r] = pc * ((keep ? dprow[r] * rp : 0.f) - delta[r]);
    }
  }
}

// One (batch, kv head)'s K and V, and one query head's q, dO (rows, lk or lq x dp), qᵀ, dOᵀ
// (d x lqp), lse (+inf where every key is masked) and Delta, as bwd's tiles read them.
struct BwdHead {
  const float *k, *v, *q, *g, *qt, *gt, *lse, *delta;
};

// Loads K and V of kv head hk of batch bi into k, v (lk x dp fp32).
template <typename T>
void bwd_load_keys(const AttentionBwdParams& p, int64_t dp, int64_t bi, int64_t hk, float* k, float* v) {
  load_rows(static_cast<const T*>(p.k) + bi * p.k_batch_stride + hk * p.k_head_stride, p.k_row_stride, 0, p.lk, p.d,
            dp, k);
  load_rows(static_cast<const T*>(p.v) + bi * p.v_batch_stride + hk * p.v_head_stride, p.v_row_stride, 0, p.lk, p.d,
            dp, v);
}

// Loads query head h of batch bi: q, dO rows (lq x dp), their transposes (d x lqp, zero past lq),
// lse and Delta (lqp; Delta also into p.delta).
template <typename T>
void bwd_load_queries(const AttentionBwdParams& p, int64_t dp, int64_t lqp, int64_t bi, int64_t h, float* q, float* g,
                      float* qt, float* gt, float* lse, float* delta) {
  const T* q_head = static_cast<const T*>(p.q) + bi * p.q_batch_stride + h * p.q_head_stride;
  const T* o_head = static_cast<const T*>(p.o) + bi * p.o_batch_stride + h * p.o_head_stride;
  const T* g_head = static_cast<const T*>(p.do_) + bi * p.do_batch_stride + h * p.do_head_stride;
  load_rows(q_head, p.q_row_stride, 0, p.lq, p.d, dp, q);
  load_rows(g_head, p.do_row_stride, 0, p.lq, p.d, dp, g);
  std::fill(qt, qt + p.d * lqp, 0.f);
  std::fill(gt, gt + p.d * lqp, 0.f);
  load_rows_transposed(q_head, p.q_row_stride, 0, p.lq, p.d, lqp, qt);
  load_rows_transposed(g_head, p.do_row_stride, 0, p.lq, p.d, lqp, gt);
  const int64_t row0 = (bi * p.hq + h) * p.lq;
  std::fill(lse, lse + lqp, 0.f);
  std::fill(delta, delta + lqp, 0.f);
  std::vector<float> o_row(p.d);
  for (int64_t i = 0; i < p.lq; ++i) {  // Delta_i = Σ_d dO_id O_id
    convert_row(o_head + i * p.o_row_stride, p.d, o_row.data());
    float s = 0.f;
    for (int64_t e = 0; e < p.d; ++e) s += o_row[e] * g[i * dp + e];
    delta[i] = p.delta[row0 + i] = s;
    lse[i] = p.lse[row0 + i] == kNegInf ? kPosInf : p.lse[row0 + i];
  }
}

// One tile's scores and dPᵀ = v dOᵀ, then probs_and_dscores: st <- Pd, dpt <- dS.
template <typename T>
void bwd_tile(const AttentionBwdParams& p, const TilePos& t, int64_t dp, int64_t lqp, const BwdHead& hd, float* st,
              float* dpt) {
  score_tile<T>(hd.k + t.j0 * dp, dp, hd.qt + t.i0, lqp, p.d, p.scale, p.mask, p.is_causal, t, st);
  gemm_tile<false>(t.n, round_up_wide(t.m), p.d, hd.v + t.j0 * dp, dp, 1, hd.gt + t.i0, lqp, dpt, kBlockM);
  probs_and_dscores(p, t, hd.lse + t.i0, hd.delta + t.i0, st, dpt);
}

// dV += Pdᵀ dO and dK += dSᵀ q of a tile (dv, dk at its first key row), and dQ += dS k (dq at
// its first query row): each tile summed apart, then added (blocked summation keeps fp32
// rounding at GEMM level: one running sum over all H·LQ rows measured 1.1e-5 max dv error at
// fp32, 3.8x PyTorch's, LQ = 257, MQA, D = 128; blocked: 2.6e-6).
void bwd_dkdv(const TilePos& t, int64_t dp, const BwdHead& hd, const float* st, const float* dpt, float* dv,
              float* dk) {
  gemm_tile<true>(t.n, dp, t.m, st, kBlockM, 1, hd.g + t.i0 * dp, dp, dv, dp);
  gemm_tile<true>(t.n, dp, t.m, dpt, kBlockM, 1, hd.q + t.i0 * dp, dp, dk, dp);
}
void bwd_dq(const TilePos& t, int64_t dp, const BwdHead& hd, const float* dpt, float* dq) {
  gemm_tile<true>(t.m, dp, t.n, dpt, 1, kBlockM, hd.k + t.j0 * dp, dp, dq, dp);
}

// Per-thread buffers of the fused and per-head schedules: one kv head's k, v (lk, dp); one query
// head's q, dO, dq (lq, dp), their transposes qt, gt (d, lqp), its lse, Delta (lqp); one tile's
// st, dpt.
struct BwdBuffers {
  std::vector<float> k, v, q, g, dq, qt, gt, lse, delta, st, dpt;
  BwdBuffers(const AttentionBwdParams& p, int64_t dp, int64_t lqp)
      : k(p.lk * dp), v(p.lk * dp), q(p.lq * dp), g(p.lq * dp), dq(p.lq * dp), qt(p.d * lqp), gt(p.d * lqp),
        lse(lqp), delta(lqp), st(kBlockN * kBlockM), dpt(kBlockN * kBlockM) {}
  BwdHead head() const {
    return BwdHead{k.data(), v.data(), q.data(), g.data(), qt.data(), gt.data(), lse.data(), delta.data()};
  }
};

// Query head h of batch bi, its kv head's k and v in buf: every tile adds to dk and dv (lk, dp)
// and to dQ, which is stored.
template <typename T>
void bwd_query_head(const AttentionBwdParams& p, int64_t bi, int64_t h, BwdBuffers& buf, float* dk, float* dv) {
  const int64_t dp = round_up_lanes(p.d), lqp = round_up_wide(p.lq);
  bwd_load_queries<T>(p, dp, lqp, bi, h, buf.q.data(), buf.g.data(), buf.qt.data(), buf.gt.data(), buf.lse.data(),
                      buf.delta.data());
  std::fill(buf.dq.begin(), buf.dq.end(), 0.f);
  const BwdHead hd = buf.head();
  for (int64_t kb = 0; kb < ceil_div(p.lk, kBlockN); ++kb)
    for_key_block_tiles(p, bi, h, kb, [&](const TilePos& t) {
      bwd_tile<T>(p, t, dp, lqp, hd, buf.st.data(), buf.dpt.data());
      bwd_dkdv(t, dp, hd, buf.st.data(), buf.dpt.data(), dv + t.j0 * dp, dk + t.j0 * dp);
      bwd_dq(t, dp, hd, buf.dpt.data(), buf.dq.data() + t.i0 * dp);
    });
  store_rows(buf.dq.data(), dp, p.scale, p.lq, p.d, 0,
             static_cast<T*>(p.dq) + bi * p.dq_batch_stride + h * p.dq_head_stride, p.dq_row_stride);
}

// The fused schedule: one task per (batch, kv head), as the file's header describes.
template <typename T>
void bwd_fused(const AttentionBwdParams& p) {
  const int64_t dp = round_up_lanes(p.d), group = p.hq / p.hkv;
#pragma omp parallel
  {
    BwdBuffers buf(p, dp, round_up_wide(p.lq));
    std::vector<float> dk(p.lk * dp), dv(p.lk * dp);
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < p.b * p.hkv; ++task) {
      const int64_t bi = task / p.hkv, hk = task % p.hkv;
      bwd_load_keys<T>(p, dp, bi, hk, buf.k.data(), buf.v.data());
      std::fill(dk.begin(), dk.end(), 0.f);
      std::fill(dv.begin(), dv.end(), 0.f);
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) bwd_query_head<T>(p, bi, h, buf, dk.data(), dv.data());
      bwd_store_keys<T>(p, dp, bi, hk, 0, p.lk, dk.data(), dv.data());
    }
  }
}

// The per-head schedule, for grids with fewer (batch, kv head) pairs than threads but enough
// (batch, query head) pairs (MQA at batch 1 on a few cores): one task per (batch, query head),
// bwd_fused's loop for one head, with that head's own dK, dV partials (2 · B · HQ · LK · D
// floats of scratch); then the group's partials are summed in head order, one task per (batch,
// kv head, key block). Five products a tile, as fused (the split schedule's recomputation costs
// seven); deterministic, but not bitwise the fused schedule's sums (a head's tiles are summed
// apart before they meet the others').
template <typename T>
void bwd_heads(const AttentionBwdParams& p) {
  const int64_t dp = round_up_lanes(p.d), group = p.hq / p.hkv, nkb = ceil_div(p.lk, kBlockN);
  const size_t head_elems = size_t(p.lk * dp);
  std::vector<float> dk(p.b * p.hq * head_elems), dv(dk.size());
#pragma omp parallel
  {
    BwdBuffers buf(p, dp, round_up_wide(p.lq));
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < p.b * p.hq; ++task) {
      const int64_t bi = task / p.hq, h = task % p.hq;
      float *dk_h = dk.data() + task * head_elems, *dv_h = dv.data() + task * head_elems;
      bwd_load_keys<T>(p, dp, bi, h / group, buf.k.data(), buf.v.data());
      std::fill(dk_h, dk_h + head_elems, 0.f);
      std::fill(dv_h, dv_h + head_elems, 0.f);
      bwd_query_head<T>(p, bi, h, buf, dk_h, dv_h);
    }
#pragma omp for schedule(static)
    for (int64_t task = 0; task < p.b * p.hkv * nkb; ++task)
      sum_group_partials<T>(p, dp, group, head_elems, task, dk.data(), dv.data());
  }
}

// The split schedule for grids with fewer (batch, kv head) pairs than threads:
// every head loaded once a call, then a dK/dV pass (one task per (batch, kv head, key block))
// and a dQ pass (one per (batch, query head, query block)), each recomputing its tiles' P and
// dS; the same summation order as bwd_fused, so the same bits.
template <typename T>
void bwd_split(const AttentionBwdParams& p) {
  const int64_t d = p.d, dp = round_up_lanes(d), group = p.hq / p.hkv, lqp = round_up_wide(p.lq);
  const size_t kv_elems = size_t(p.lk * dp), q_elems = size_t(p.lq * dp), qt_elems = size_t(d * lqp);
  std::vector<float> k(p.b * p.hkv * kv_elems), v(k.size());
  std::vector<float> q(p.b * p.hq * q_elems), g(q.size()), qt(p.b * p.hq * qt_elems), gt(qt.size());
  std::vector<float> lse(p.b * p.hq * lqp), delta(lse.size());
  split_staging(
      p,
      [&](int64_t bk) {
        bwd_load_keys<T>(p, dp, bk / p.hkv, bk % p.hkv, k.data() + bk * kv_elems, v.data() + bk * kv_elems);
      },
      [&](int64_t bh) {
        bwd_load_queries<T>(p, dp, lqp, bh / p.hq, bh % p.hq, q.data() + bh * q_elems, g.data() + bh * q_elems,
                            qt.data() + bh * qt_elems, gt.data() + bh * qt_elems, lse.data() + bh * lqp,
                            delta.data() + bh * lqp);
      });
  const auto head = [&](int64_t bi, int64_t h) {
    const int64_t bk = bi * p.hkv + h / group, bh = bi * p.hq + h;
    return BwdHead{k.data() + bk * kv_elems,   v.data() + bk * kv_elems,   q.data() + bh * q_elems,
                   g.data() + bh * q_elems,    qt.data() + bh * qt_elems,  gt.data() + bh * qt_elems,
                   lse.data() + bh * lqp,      delta.data() + bh * lqp};
  };
#pragma omp parallel
  {
    std::vector<float> st(kBlockN * kBlockM), dpt(kBlockN * kBlockM), dk(kBlockN * dp), dv(kBlockN * dp);
    std::vector<float> dq(kBlockM * dp);
    split_passes(
        p,
        [&](int64_t bi, int64_t hk, int64_t kb, int64_t j0, int64_t n) {  // dK, dV of one key block
          std::fill(dk.begin(), dk.end(), 0.f);
          std::fill(dv.begin(), dv.end(), 0.f);
          for_group_key_block_tiles(p, bi, hk, kb, [&](const TilePos& t) {
            const BwdHead hd = head(bi, t.h);
            bwd_tile<T>(p, t, dp, lqp, hd, st.data(), dpt.data());
            bwd_dkdv(t, dp, hd, st.data(), dpt.data(), dv.data(), dk.data());
          });
          bwd_store_keys<T>(p, dp, bi, hk, j0, n, dk.data(), dv.data());
        },
        [&](int64_t bi, int64_t h, int64_t qb, int64_t i0, int64_t m) {  // dQ of one query block
          const BwdHead hd = head(bi, h);
          std::fill(dq.begin(), dq.end(), 0.f);
          for_query_block_tiles(p, bi, h, qb, [&](const TilePos& t) {
            bwd_tile<T>(p, t, dp, lqp, hd, st.data(), dpt.data());
            bwd_dq(t, dp, hd, dpt.data(), dq.data());
          });
          store_rows(dq.data(), dp, p.scale, m, d, i0,
                     static_cast<T*>(p.dq) + bi * p.dq_batch_stride + h * p.dq_head_stride, p.dq_row_stride);
        });
  }
}

// The backward's schedules: fused (one task per (batch, kv head)), split (a dK/dV pass over key
// blocks and a dQ pass over query blocks) and heads (one task per (batch, query head), dK and dV
// summed over the group after).
enum class BwdSchedule { kFused, kSplit, kHeads };

// FUSEDFORMER_CPU_BWD_SCHEDULE=fused, split or heads (read at each call) forces a schedule, for
// the FMA and the tile kernels alike. Else: fused while B · HKV tasks keep
// every thread busy; below that, heads where its B · HQ tasks of five products a tile fill the
// threads at least 5/7 as well as split's many tasks of seven do, and its partials take at most
// 512 MiB; split otherwise.
BwdSchedule bwd_schedule(const AttentionBwdParams& p) {
  if (const char* env = std::getenv("FUSEDFORMER_CPU_BWD_SCHEDULE")) {
    const std::string name(env);
    if (name == "fused") return BwdSchedule::kFused;
    if (name == "split") return BwdSchedule::kSplit;
    if (name == "heads") return BwdSchedule::kHeads;
    throw std::invalid_argument("FUSEDFORMER_CPU_BWD_SCHEDULE must be fused, split or heads, got '" + name + "'");
  }
  const int64_t threads = omp_get_max_threads(), tasks = p.b * p.hq;
  if (p.b * p.hkv >= threads) return BwdSchedule::kFused;
  const int64_t rounds = ceil_div(tasks, threads);
  const double partial_bytes = 2.0 * sizeof(float) * double(tasks) * double(p.lk) * double(round_up_lanes(p.d));
  return 7 * tasks >= 5 * threads * rounds && partial_bytes <= 512.0 * (1 << 20) ? BwdSchedule::kHeads
                                                                                  : BwdSchedule::kSplit;
}

}  // namespace

std::string attention_cpu_bf16_units() {
  return std::string("fma") + (bf16_tile_kernels_built() ? ", dpbf16" : "") +
         (bf16_tile_kernels_built() && amx_usable() ? ", amx" : "");
}

void attention_fwd_cpu(const AttentionFwdParams& p) {
  check_num_splits(p, "attention_fwd (cpu)");
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (few_queries(p.lq))
      fwd_decode<T>(p);
#if defined(FUSEDFORMER_CPU_BF16_TILES)
    else if (amx_forward(p))
      fwd_amx(p, bf16_unit(p.dtype));
#endif
    else
      fwd<T>(p);
  });
}

int64_t attention_fwd_num_splits_cpu(const AttentionFwdParams& p) {
  const int64_t blocks = few_queries(p.lq) ? p.b * p.hkv * head_packs(p).packs : p.b * p.hq * ceil_div(p.lq, kBlockM);
  return attention_num_splits(blocks, ceil_div(p.lk, amx_forward(p) ? kAmxN : kBlockN), omp_get_max_threads());
}
void attention_bwd_cpu(const AttentionBwdParams& p) {
  const BwdSchedule schedule = bwd_schedule(p);
#if defined(FUSEDFORMER_CPU_BF16_TILES)
  if (const Bf16Unit unit = bf16_unit(p.dtype); unit != Bf16Unit::kFma) {
    switch (schedule) {
      case BwdSchedule::kFused: return bwd_amx_fused(p, unit);
      case BwdSchedule::kSplit: return bwd_amx_split(p, unit);
      case BwdSchedule::kHeads: return bwd_amx_heads(p, unit);
    }
  }
#endif
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    switch (schedule) {
      case BwdSchedule::kFused: return bwd_fused<T>(p);
      case BwdSchedule::kSplit: return bwd_split<T>(p);
      case BwdSchedule::kHeads: return bwd_heads<T>(p);
    }
  });
}

}  // namespace fusedformer
