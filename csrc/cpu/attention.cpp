// Scaled dot-product attention on the CPU: the readable twin of csrc/cuda/attention.cu, the
// FlashAttention-2 algorithm over fp32 tiles, its products run by the register-blocked
// micro-GEMM of attention_tiles.h.
//
// Layout: scores are kept transposed, st (keys, queries) = K Qᵀ, so the only transposed
// operand is Q (and dO), loaded once per query block or head and reused by every key block;
// the key tiles are read row-major, and the softmax runs down the key axis with a vector of
// eight query columns at a time (running max, sums and lse as vectors).
//
// Forward: K and V are first converted once to fp32 rows padded to a multiple of 8 (so no
// task converts a key tile again); then per (batch, query head, block of kBlockM query rows)
// [one OpenMP task each]: stream over blocks of kBlockN keys with the online softmax
// (running max m, running sum l, fp32 accumulator acc), so memory is O(L · D) and no
// (LQ, LK) tensor ever exists. Causal: key blocks entirely above the top-left diagonal are
// skipped. Saves lse = m + log l. Split-KV (AttentionFwdParams::num_splits, chosen by
// attention_fwd_num_splits_cpu when the query blocks alone leave threads idle, as in decoding):
// each task takes one range of its query block's key blocks, writes that range's o and lse in
// fp32, and combine_splits merges them by their lse, as the CUDA kernels do.
// Backward (FA2), per (batch, kv head) [one task each]: K, V and the dK, dV accumulators of
// the head stay in the task; for each query head of the group, Q, dO, Delta = rowsum(dO ∘ O)
// and a dQ accumulator are loaded once, then every (key block, query block) tile recomputes
// P from lse and adds its share to dV, dK and dQ: five tile products, no second pass (the
// price: 4·LK·D + 5·LQ·D floats of scratch per thread, and B·HKV tasks to share out).
// Every output element is summed by one task in a fixed order: deterministic, no atomics,
// any thread count.
// Napkin math: fwd 4·B·HQ·LQ·LK·D flops (half when causal), bwd 2.5x that. One AVX2 core
// peaks at 32 fp32 flops/cycle (two 8-wide FMA pipes); the micro-kernel's 6×16 block needs
// 8 loads per 96 flops, so the tile products run near that peak and the rest (exp, the
// softmax bookkeeping, loads with dtype conversion) is O(L·L) or O(L·D) on top.
#include "../attention.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <stdexcept>
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

// Whether a tile of m query rows takes its scores as dot products (score_tile's q_rows):
// the GEMM computes whole Wide vectors of queries, so for a few rows (decoding) most of its
// work would be on zero columns.
bool few_queries(int64_t m) { return 4 * m <= Wide::kWidth; }

// acc (m, dp) = diag(alpha) acc + P V for few_queries tiles, P = st (n, kBlockM) transposed and
// v rows of d elements in any storage type, ld apart, converted in registers: for a few query
// rows the GEMM would be all loads of V, so V is read once per row here, in 32-column strips
// (four independent FMA chains).
template <typename VT>
void pv_rows(const TilePos& t, const float* st, const float* alpha, const VT* v, int64_t ld, int64_t d,
             float* acc, int64_t dp) {
  constexpr int kStrip = 4;
  for (int64_t r = 0; r < t.m; ++r)
    for (int64_t e0 = 0; e0 < dp; e0 += kStrip * kLanes) {
      const int nv = int(std::min<int64_t>(kStrip, (dp - e0) / kLanes));
      float* a_row = acc + r * dp + e0;
      f32x8 a[kStrip];
      for (int x = 0; x < nv; ++x) a[x] = load8(a_row + x * kLanes) * splat8(alpha[r]);
      const bool whole = e0 + nv * kLanes <= d;  // no column of the strip past d
      for (int64_t c = 0; c < t.n; ++c) {
        const f32x8 pc = splat8(st[c * kBlockM + r]);
        const VT* vr = v + c * ld + e0;
        for (int x = 0; x < nv; ++x)
          a[x] = fma8(pc, whole ? load8(vr + x * kLanes) : load8(vr + x * kLanes, int(std::clamp<int64_t>(d - e0 - x * kLanes, 0, kLanes))), a[x]);
      }
      for (int x = 0; x < nv; ++x) store8(a_row + x * kLanes, a[x]);
    }
}

// st (n, kBlockM) = k qᵀ · scale, then the mask and the causal diagonal: the one definition
// of a score, shared by the forward and the backward so they see the same numbers. k is the
// key tile (n, ld); qt holds the tile's queries as columns, qt[c · ldq + r] = q[r][c], with
// zero columns up to whole Wide vectors (those st columns are 0: the softmax steps read them,
// nothing uses them). With q_rows (the queries as rows of round_up_lanes(d) floats, zero past
// d; few_queries), each score is one dot product instead and qt is not read.
template <typename T, typename KT = float>
void score_tile(const KT* k, int64_t ld, const float* qt, int64_t ldq, int64_t d, float scale,
                const AttentionMask& mask, bool is_causal, const TilePos& t, float* st,
                const float* q_rows = nullptr) {
  if (q_rows) {  // k: rows of d elements in any storage type, converted in registers
    const int64_t dp = round_up_lanes(d), wide_m = round_up_wide(t.m);
    for (int64_t c = 0; c < t.n; ++c) {
      float* srow = st + c * kBlockM;
      for (int64_t r = 0; r < t.m; ++r) {
        f32x8 acc0{}, acc1{};
        int64_t e = 0;
        for (; e + 2 * kLanes <= d; e += 2 * kLanes) {
          acc0 = fma8(load8(k + c * ld + e), load8(q_rows + r * dp + e), acc0);
          acc1 = fma8(load8(k + c * ld + e + kLanes), load8(q_rows + r * dp + e + kLanes), acc1);
        }
        for (; e < d; e += kLanes) acc0 = fma8(load8(k + c * ld + e, int(d - e)), load8(q_rows + r * dp + e), acc0);
        srow[r] = hsum8(acc0 + acc1) * scale;
      }
      std::fill(srow + t.m, srow + wide_m, 0.f);
    }
  } else if constexpr (std::is_same_v<KT, float>) {
    gemm_tile<false>(t.n, round_up_wide(t.m), d, k, ld, 1, qt, ldq, st, kBlockM, scale);
  } else {
    throw std::logic_error("score_tile: the GEMM path reads fp32 key tiles");
  }
  if (mask.kind != MaskKind::kNone) {
    const int64_t off = t.bi * mask.batch_stride + t.h * mask.head_stride +
                        t.i0 * mask.row_stride + t.j0 * mask.col_stride;
    for (int64_t c = 0; c < t.n; ++c) {
      float* srow = st + c * kBlockM;
      const int64_t col = off + c * mask.col_stride;
      if (mask.kind == MaskKind::kBool) {
        const bool* keep = static_cast<const bool*>(mask.ptr) + col;
        for (int64_t r = 0; r < t.m; ++r)
          if (!keep[r * mask.row_stride]) srow[r] = kNegInf;
      } else {
        const T* add = static_cast<const T*>(mask.ptr) + col;
        for (int64_t r = 0; r < t.m; ++r) srow[r] += to_float(add[r * mask.row_stride]);
      }
    }
  }
  if (is_causal)  // key j0 + c is hidden from the query rows i0 + r < j0 + c
    for (int64_t c = 0; c < t.n; ++c)
      std::fill(st + c * kBlockM, st + c * kBlockM + std::clamp<int64_t>(t.j0 + c - t.i0, 0, t.m),
                kNegInf);
}

// Key blocks a query block [i0, i0 + m) reads: all, or (causal) those with a key j <= i.
int64_t key_blocks_end(bool is_causal, int64_t i0, int64_t m, int64_t lk) {
  const int64_t nkb = ceil_div(lk, kBlockN);
  return is_causal ? std::min(nkb, ceil_div(i0 + m, kBlockN)) : nkb;
}

// Split-KV: the key blocks [begin, end) of range `split` of `splits` (the CUDA kernels'
// split_key_blocks): the query block's blocks cut into equal consecutive ranges, the last
// shorter; a range may be empty.
std::pair<int64_t, int64_t> split_range(int64_t kb_end, int64_t split, int64_t splits) {
  const int64_t per = ceil_div(kb_end, splits);
  return {std::min(kb_end, split * per), std::min(kb_end, (split + 1) * per)};
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

// Zeroes the probabilities st[c][r] of the tile that dropout drops (the forward's P ∘ keep).
void drop_probs(const AttentionFwdParams& p, const TilePos& t, float* st) {
  for (int64_t c = 0; c < t.n; ++c)
    for (int64_t r = 0; r < t.m; ++r)
      if (!dropout_keep(p.seed, t.bi, t.h, t.i0 + r, t.j0 + c, p.hq, p.lq, p.lk, p.dropout_p))
        st[c * kBlockM + r] = 0.f;
}

// One key tile of the online softmax over the scores st (n, kBlockM), a vector of query
// columns at a time: m <- max(m, max_c st), l <- l · exp(m_old - m) + Σ_c exp(st - m), st <- its
// probabilities exp(st - m), alpha <- exp(m_old - m), the factor the accumulator rows take.
// A column with every key so far masked keeps m = -inf, l = 0 (exp of -inf is 0 there).
void online_softmax(const TilePos& t, float* st, float* m, float* l, float* alpha) {
  using W = Wide;
  for (int64_t r = 0; r < t.m; r += W::kWidth) {
    const W::V m_old = W::load(m + r);
    W::V m_new = m_old;
    for (int64_t c = 0; c < t.n; ++c) m_new = W::max(m_new, W::load(st + c * kBlockM + r));
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

template <typename T>
void fwd(const AttentionFwdParams& p) {
  const int64_t d = p.d, dp = round_up_lanes(d), group = p.hq / p.hkv, nqb = ceil_div(p.lq, kBlockM);
  const int64_t splits = p.num_splits;
  const bool dropout = p.dropout_p > 0.f;
  const float rp = dropout ? 1.f / (1.f - p.dropout_p) : 1.f;  // kept values scale up
  const T* Q = static_cast<const T*>(p.q);
  const T* K = static_cast<const T*>(p.k);
  const T* V = static_cast<const T*>(p.v);
  T* O = static_cast<T*>(p.o);

  // Where the key tiles come from, as fp32 rows of dp floats (zero past d):
  //  - in place: fp32 rows with d a multiple of 8 need no copy;
  //  - staged: K and V of every (batch, kv head) converted once up front ((lk, dp) each, O(L · D)
  //    scratch), when more than one task reads each key tile (several query blocks or GQA heads);
  //  - else each task converts its own tiles as it goes (decoding: one query block, one head a
  //    kv head), so that no key is converted that a task does not read, nor converted twice.
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
    std::vector<float> qt(d * kBlockM), q_rows(kBlockM * dp), acc(kBlockM * dp);
    std::vector<float> st(kBlockN * kBlockM), m(kBlockM), l(kBlockM), alpha(kBlockM);
    std::vector<float> k_buf(in_place || staged ? 0 : kBlockN * dp), v_buf(k_buf.size());
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < p.b * p.hq * nqb * splits; ++task) {
      const int64_t split = task % splits, block = task / splits;
      const int64_t bi = block / (p.hq * nqb), h = block / nqb % p.hq, qb = block % nqb;
      const int64_t hk = h / group;
      TilePos t{bi, h, qb * kBlockM, std::min(kBlockM, p.lq - qb * kBlockM), 0, 0};
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
      // Few query rows (decoding): scores as dot products (score_tile's q_rows). Unstaged
      // 16-bit tiles (or fp32 rows off whole vectors) are then read where they lie, converted
      // in registers, by the dot products and by P V (pv_rows): `raw`, no tile copied. fp32
      // tiles in place keep the GEMM for P V, measured faster on the dev machine at
      // (4, 16, 1, 128) x 2048 keys: 4.9 against 5.8 ms.
      const bool dots = few_queries(t.m), raw = dots && !staged && !in_place;
      if (dots) {
        load_rows(q_head, p.q_row_stride, t.i0, t.m, d, dp, q_rows.data());
      } else {
        std::fill(qt.begin(), qt.end(), 0.f);
        load_rows_transposed(q_head, p.q_row_stride, t.i0, t.m, d, kBlockM, qt.data());
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), 0.f);

      const auto [kb_begin, kb_end] = split_range(key_blocks_end(p.is_causal, t.i0, t.m, p.lk), split, splits);
      for (int64_t kb = kb_begin; kb < kb_end; ++kb) {
        t.j0 = kb * kBlockN;
        t.n = std::min(kBlockN, p.lk - t.j0);
        const float* k_tile = nullptr;
        const float* v_tile = nullptr;
        if (raw) {
          score_tile<T>(k_src + t.j0 * p.k_row_stride, p.k_row_stride, qt.data(), kBlockM, d, p.scale, p.mask,
                        p.is_causal, t, st.data(), q_rows.data());
        } else {
          std::tie(k_tile, v_tile) = key_tiles(t);
          score_tile<T>(k_tile, k_ld, qt.data(), kBlockM, d, p.scale, p.mask, p.is_causal, t, st.data(),
                        dots ? q_rows.data() : nullptr);
        }
        online_softmax(t, st.data(), m.data(), l.data(), alpha.data());
        if (dropout) drop_probs(p, t, st.data());
        // acc = diag(alpha) acc + P V: the online softmax's rescale rides in the GEMM's store.
        if (raw)
          pv_rows(t, st.data(), alpha.data(), v_src + t.j0 * p.v_row_stride, p.v_row_stride, d, acc.data(), dp);
        else
          gemm_tile<true>(t.m, dp, t.n, st.data(), 1, kBlockM, v_tile, v_ld, acc.data(), dp, 1.f, alpha.data());
      }

      // The range's o and lse: the output's, or with split-KV fp32 partials for combine_splits.
      const int64_t head_row = ((split * p.b + bi) * p.hq + h) * p.lq;  // row 0 of (split, bi, h) in o_accum
      T* o_head = O + bi * p.o_batch_stride + h * p.o_head_stride;
      float* lse = (splits > 1 ? p.lse_accum + head_row : p.lse + (bi * p.hq + h) * p.lq) + t.i0;
      for (int64_t r = 0; r < t.m; ++r) {
        const bool empty = m[r] == kNegInf;  // every key masked: o = 0, lse = -inf
        const float mul = empty ? 0.f : rp / l[r];
        if (splits > 1)
          store_rows(acc.data() + r * dp, dp, mul, 1, d, t.i0 + r, p.o_accum + head_row * d, d);
        else
          store_rows(acc.data() + r * dp, dp, mul, 1, d, t.i0 + r, o_head, p.o_row_stride);
        lse[r] = empty ? kNegInf : m[r] + std::log(l[r]);
      }
    }
  }
  if (splits > 1) combine_splits<T>(p);
}

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

template <typename T>
void bwd(const AttentionBwdParams& p) {
  const int64_t d = p.d, dp = round_up_lanes(d), group = p.hq / p.hkv;
  const int64_t lqp = round_up_wide(p.lq), nqb = ceil_div(p.lq, kBlockM), nkb = ceil_div(p.lk, kBlockN);
  const T* Q = static_cast<const T*>(p.q);
  const T* K = static_cast<const T*>(p.k);
  const T* V = static_cast<const T*>(p.v);
  const T* O = static_cast<const T*>(p.o);
  const T* DO = static_cast<const T*>(p.do_);
#pragma omp parallel
  {
    // One kv head's k, v, dk, dv (lk, dp); one query head's q, dO, dq (lq, dp), their
    // transposes qt, gt (d, lqp), its lse, Delta (lqp) and a row of O.
    std::vector<float> k(p.lk * dp), v(p.lk * dp), dk(p.lk * dp), dv(p.lk * dp);
    std::vector<float> q(p.lq * dp), g(p.lq * dp), dq(p.lq * dp), qt(d * lqp), gt(d * lqp);
    std::vector<float> lse(lqp), delta(lqp), o_row(d), st(kBlockN * kBlockM), dpt(kBlockN * kBlockM);
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < p.b * p.hkv; ++task) {
      const int64_t bi = task / p.hkv, hk = task % p.hkv;
      load_rows(K + bi * p.k_batch_stride + hk * p.k_head_stride, p.k_row_stride, 0, p.lk, d, dp, k.data());
      load_rows(V + bi * p.v_batch_stride + hk * p.v_head_stride, p.v_row_stride, 0, p.lk, d, dp, v.data());
      std::fill(dk.begin(), dk.end(), 0.f);
      std::fill(dv.begin(), dv.end(), 0.f);
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        const T* q_head = Q + bi * p.q_batch_stride + h * p.q_head_stride;
        const T* o_head = O + bi * p.o_batch_stride + h * p.o_head_stride;
        const T* g_head = DO + bi * p.do_batch_stride + h * p.do_head_stride;
        load_rows(q_head, p.q_row_stride, 0, p.lq, d, dp, q.data());
        load_rows(g_head, p.do_row_stride, 0, p.lq, d, dp, g.data());
        std::fill(qt.begin(), qt.end(), 0.f);
        std::fill(gt.begin(), gt.end(), 0.f);
        load_rows_transposed(q_head, p.q_row_stride, 0, p.lq, d, lqp, qt.data());
        load_rows_transposed(g_head, p.do_row_stride, 0, p.lq, d, lqp, gt.data());
        std::fill(dq.begin(), dq.end(), 0.f);
        const int64_t row0 = (bi * p.hq + h) * p.lq;
        std::fill(lse.begin(), lse.end(), 0.f);
        std::fill(delta.begin(), delta.end(), 0.f);
        for (int64_t i = 0; i < p.lq; ++i) {  // Delta_i = Σ_d dO_id O_id
          convert_row(o_head + i * p.o_row_stride, d, o_row.data());
          float s = 0.f;
          for (int64_t e = 0; e < d; ++e) s += o_row[e] * g[i * dp + e];
          delta[i] = p.delta[row0 + i] = s;
          lse[i] = p.lse[row0 + i] == kNegInf ? kPosInf : p.lse[row0 + i];
        }

        for (int64_t kb = 0; kb < nkb; ++kb) {
          TilePos t{bi, h, 0, 0, kb * kBlockN, std::min(kBlockN, p.lk - kb * kBlockN)};
          const float* k_tile = k.data() + t.j0 * dp;
          const float* v_tile = v.data() + t.j0 * dp;
          // Causal: query rows i < j0 see no key of this block; start at the block holding j0.
          for (int64_t qb = p.is_causal ? t.j0 / kBlockM : 0; qb < nqb; ++qb) {
            t.i0 = qb * kBlockM;
            t.m = std::min(kBlockM, p.lq - t.i0);
            score_tile<T>(k_tile, dp, qt.data() + t.i0, lqp, d, p.scale, p.mask, p.is_causal, t, st.data());
            gemm_tile<false>(t.n, round_up_wide(t.m), d, v_tile, dp, 1, gt.data() + t.i0, lqp,
                             dpt.data(), kBlockM);  // dPᵀ = v dOᵀ
            probs_and_dscores(p, t, lse.data() + t.i0, delta.data() + t.i0, st.data(), dpt.data());
            // dV += Pdᵀ dO, dK += dSᵀ q, dQ += dS k: each tile summed apart, then added
            // (blocked summation keeps fp32 rounding at GEMM level: one running sum over
            // all H·LQ rows measured 1.1e-5 max dv error at fp32, 3.8x PyTorch's, LQ = 257,
            // MQA, D = 128; blocked: 2.6e-6).
            gemm_tile<true>(t.n, dp, t.m, st.data(), kBlockM, 1, g.data() + t.i0 * dp, dp,
                            dv.data() + t.j0 * dp, dp);
            gemm_tile<true>(t.n, dp, t.m, dpt.data(), kBlockM, 1, q.data() + t.i0 * dp, dp,
                            dk.data() + t.j0 * dp, dp);
            gemm_tile<true>(t.m, dp, t.n, dpt.data(), 1, kBlockM, k_tile, dp, dq.data() + t.i0 * dp, dp);
          }
        }
        store_rows(dq.data(), dp, p.scale, p.lq, d, 0,
                   static_cast<T*>(p.dq) + bi * p.dq_batch_stride + h * p.dq_head_stride, p.dq_row_stride);
      }
      store_rows(dk.data(), dp, p.scale, p.lk, d, 0,
                 static_cast<T*>(p.dk) + bi * p.dk_batch_stride + hk * p.dk_head_stride, p.dk_row_stride);
      store_rows(dv.data(), dp, 1.f, p.lk, d, 0,
                 static_cast<T*>(p.dv) + bi * p.dv_batch_stride + hk * p.dv_head_stride, p.dv_row_stride);
    }
  }
}

}  // namespace

void attention_fwd_cpu(const AttentionFwdParams& p) {
  check_num_splits(p, "attention_fwd (cpu)");
  dispatch_dtype(p.dtype, [&](auto tag) { fwd<decltype(tag)>(p); });
}

int64_t attention_fwd_num_splits_cpu(const AttentionFwdParams& p) {
  return attention_num_splits(p.b * p.hq * ceil_div(p.lq, kBlockM), ceil_div(p.lk, kBlockN), omp_get_max_threads());
}
void attention_bwd_cpu(const AttentionBwdParams& p) {
  dispatch_dtype(p.dtype, [&](auto tag) { bwd<decltype(tag)>(p); });
}

}  // namespace fusedformer
