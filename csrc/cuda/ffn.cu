// FFN on the GPU (the CPU twin is csrc/cpu/ffn.cpp, which runs its GEMMs in ATen): our own
// GEMMs, C[i, n] = Σ_k A(i, k) · B(n, k), with the elementwise work fused in their epilogues.
//
//   forward   G1: pre = x w1ᵀ; epilogue: + b1, store pre (unless p.pre is nullptr: no backward),
//                 hidden = act(pre) · keep / (1 - p)
//             G2: y = hidden w2ᵀ; epilogue: + b2
//   backward  G3: d_hidden = dy w2; epilogue: d_pre = d_hidden · keep / (1 - p) · act'(pre),
//                 and hidden recomputed from pre (for G6)
//             G4: dx = d_pre w1      G5: dw1 = d_preᵀ x      G6: dw2 = dyᵀ hidden
//             db1 / db2: column sums of d_pre / dy (Kahan-compensated row slices, fixed order)
// swiglu in G1: a block's N tile holds gate and up columns of the same hidden units (tile
// column remap below), so one thread owns both accumulators and writes silu(gate) · up.
//
// bf16 / fp16: tensor cores through inline PTX mma.sync.aligned.m16n8k16 (fp32 accumulate):
//   block tile 128 x 128 x 32, 8 warps (2 x 4), warp tile 64 x 32 (4 x 4 mma tiles, 64 fp32
//   accumulators per thread); A and B tiles double-buffered in shared memory, filled with
//   16-byte cp.async chunks whenever the operand is aligned (any layout: a k-contiguous operand
//   lands as a row tile, a row-contiguous one, G3-G6's transposed operands, as a k tile), else
//   element by element (odd sizes, any alignment); fragments read with ldmatrix (.trans from k
//   tiles), conflict-free.
// fp32: a SIMT tiled GEMM (64 x 64 x 16 tiles, 4 x 4 outputs per thread, fp32 FMA): exact
//   fp32 like the CPU reference (TF32 tensor cores would not meet fp32 tolerances).
// sm_90a: the same GEMMs as warpgroup MMA (gemm_wgmma, below), launched wherever the binary that
// runs is sm_90a code (FUSEDFORMER_CUDA_WGMMA=0: gemm_mma there too).
// Napkin math: FLOPs = 2·M·C·F1 + 2·M·F·C forward, twice that backward; at (8192, 4096,
// 16384) bf16 that is 1.6 TFLOP forward, ~2 ms at H100's ~800 TFLOP/s dense peak. The
// mma.sync kernel (no warp specialization) will sit well below that peak on an H100; how close
// gemm_wgmma gets is for a GPU run to say.
// torch-free: raw pointers, sizes, a stream. Workspaces (hidden, d_pre) come from the caller.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "../ffn.h"
#include "common.cuh"
#include "tensor_core.cuh"

namespace fusedformer {
namespace {

using namespace cuda_common;

// v rounded to storage precision (pre is stored, and backward recomputes from the stored pre).
template <typename T>
__device__ __forceinline__ float round_t(float v) { return to_f(from_f<T>(v)); }

// ---- operands and tile rows ---------------------------------------------------------------

// One GEMM operand: element (r, k) at ptr[r·ld + k] (k_contig) or ptr[k·ld + r].
struct Operand {
  const void* ptr;
  int64_t rows, ld;
  bool k_contig;
  bool vec;  // 16-byte accesses allowed along the contiguous dim (aligned, ld and size % 8)
};

// Tile row -> operand row. Plain: r0 + t. Paired (swiglu's w1, `half` = F): tile rows come in
// groups of 2G, the first G the gate rows of G hidden units, the next G their up rows
// (F + the same units). Returns -1 past the operand.
struct RowMap {
  int64_t r0, rows, half;
  int g;  // 0: plain
  __device__ __forceinline__ int64_t operator()(int t) const {
    if (g == 0) return r0 + t < rows ? r0 + t : -1;
    const int q = t / (2 * g), w = t % (2 * g);
    const int64_t j = r0 + int64_t(q) * g + (w < g ? w : w - g);
    if (j >= half) return -1;
    return w < g ? j : half + j;
  }
};

// ---- epilogues: called with fp32 accumulators, write storage-dtype outputs ----------------

// c[i, n] = acc (+ bias[n]).
template <typename T>
struct StoreEpi {
  T* c;
  int64_t ldc;
  const T* bias;
  __device__ __forceinline__ void operator()(int64_t i, int64_t n, float v) const {
    if (bias) v += to_f(bias[n]);
    c[i * ldc + n] = from_f<T>(v);
  }
  __device__ __forceinline__ void pair(int64_t, int64_t, float, float) const {}
};

// G1: pre = acc + b1 (stored, unless pre is nullptr: no backward to save it for), hidden =
// act(pre) · keep / (1 - p), from pre rounded to T either way.
template <typename T>
struct FwdHiddenEpi {
  const T* b1;
  T* pre;
  T* hidden;
  int64_t f;
  FfnActivation act;
  float p;
  uint64_t seed;
  __device__ __forceinline__ void operator()(int64_t i, int64_t j, float v) const {  // relu, gelu*
    const float a = round_t<T>(v + (b1 ? to_f(b1[j]) : 0.f));
    if (pre) pre[i * f + j] = from_f<T>(a);
    hidden[i * f + j] = from_f<T>(ffn_act(act, a) * ffn_dropout_scale(seed, i, j, f, p));
  }
  __device__ __forceinline__ void pair(int64_t i, int64_t j, float g, float u) const {  // swiglu
    const float a = round_t<T>(g + (b1 ? to_f(b1[j]) : 0.f));
    const float up = round_t<T>(u + (b1 ? to_f(b1[f + j]) : 0.f));
    if (pre) {
      pre[i * 2 * f + j] = from_f<T>(a);
      pre[i * 2 * f + f + j] = from_f<T>(up);
    }
    hidden[i * f + j] = from_f<T>(a * ffn_sigmoid(a) * up * ffn_dropout_scale(seed, i, j, f, p));
  }
};

// G3: d_pre from d_hidden = acc and the saved pre; hidden recomputed for G6.
template <typename T>
struct BwdDpreEpi {
  const T* pre;
  T* d_pre;
  T* hidden;
  int64_t f;
  FfnActivation act;
  float p;
  uint64_t seed;
  __device__ __forceinline__ void operator()(int64_t i, int64_t j, float v) const {
    const float drop = ffn_dropout_scale(seed, i, j, f, p);
    const float g = v * drop;
    if (act == FfnActivation::kSwiglu) {
      const float a = to_f(pre[i * 2 * f + j]), up = to_f(pre[i * 2 * f + f + j]);
      const float s = ffn_sigmoid(a), silu = a * s;
      d_pre[i * 2 * f + j] = from_f<T>(g * up * s * (1.f + a * (1.f - s)));
      d_pre[i * 2 * f + f + j] = from_f<T>(g * silu);
      hidden[i * f + j] = from_f<T>(silu * up * drop);
    } else {
      const float a = to_f(pre[i * f + j]);
      d_pre[i * f + j] = from_f<T>(g * ffn_act_grad(act, a));
      hidden[i * f + j] = from_f<T>(ffn_act(act, a) * drop);
    }
  }
  __device__ __forceinline__ void pair(int64_t, int64_t, float, float) const {}
};

// ---- tensor-core GEMM (bf16 / fp16) -------------------------------------------------------

constexpr int kBM = 128, kBN = 128, kBK = 32;
constexpr int kThreads = 256;  // 8 warps: 2 (M) x 4 (N)
constexpr int kPairG = 16;     // swiglu: a warp's 32 columns = 16 gate units + the same 16 up
// Shared tiles come in two layouts, chosen by the operand's contiguous dim so that global
// chunks land in shared memory as they are (no transposing stores), and the fragments come out
// through ldmatrix, plain or .trans:
//   row tile  (k-contiguous operand):   [kBM rows][kBK], 64-byte rows whose four 16-byte chunks
//             are XOR-swizzled by (row / 2) % 4 (row_tile_offset)
//   k tile    (row-contiguous operand): [kBK k][kBM + 8], 272-byte rows
// Both are conflict-free for the cp.async writes (8 lanes: 128 contiguous bytes of a k tile, or
// two rows of a row tile) and the ldmatrix reads (8 rows of one chunk: k tile rows start 4
// banks apart, row tile rows land on 8 distinct chunk slots). Padding the row tile to 80-byte
// rows instead made its writes 2-way conflicted (two rows overlap in 4 banks).
constexpr int kLdK = kBM + 8;
constexpr int kTileElems = kBM * kBK > kBK * kLdK ? kBM * kBK : kBK * kLdK;

// Element offset of (row, k) in a row tile, k a multiple of 8 (the start of a 16-byte chunk).
__device__ __forceinline__ int row_tile_offset(int row, int k) {
  return row * kBK + ((((k >> 3) ^ (row >> 1)) & 3) << 3);
}
static_assert(kBM == kBN, "one tile size serves A and B");

// The mma.sync GEMM's stage tiles (see above), for load_tile: kK of k, and the element offsets
// of (row t, k) in a row tile and of (k, row t) in a k tile, at the start of a 16-byte chunk
// (k, resp. t, a multiple of 8).
struct MmaTiles {
  static constexpr int kK = kBK;
  __device__ __forceinline__ static int row(int t, int k) { return row_tile_offset(t, k); }
  __device__ __forceinline__ static int ktile(int k, int t) { return k * kLdK + t; }
};

// Fills one stage's tile of an operand with op(map(t), k0 + kk) for t < 128, kk < Tiles::kK
// (zeros outside the operand), in the layout of K_TILE (row tile when false) and Tiles.
template <typename T, bool K_TILE, typename Tiles = MmaTiles>
__device__ __forceinline__ void load_tile(T* tile, const Operand& op, const RowMap& map, int64_t k0,
                                          int64_t K) {
  constexpr int kK = Tiles::kK, kChunksPerThread = kBM * kK / 8 / kThreads;
  const T* src = static_cast<const T*>(op.ptr);
  const int tid = threadIdx.x;
  if constexpr (!K_TILE) {
    if (op.vec) {  // 16-byte chunks along k, asynchronous
#pragma unroll
      for (int it = 0; it < kChunksPerThread; ++it) {
        const int c = tid + it * kThreads, t = c / (kK / 8), kk = c % (kK / 8) * 8;
        const int64_t r = map(t);
        const bool valid = r >= 0 && k0 + kk < K;  // K % 8 == 0: a chunk is all in or all out
        cp_async16(tile + Tiles::row(t, kk), valid ? src + r * op.ld + k0 + kk : src, valid ? 16 : 0);
      }
    } else {  // element by element, coalesced along k
#pragma unroll 4
      for (int it = 0; it < kBM * kK / kThreads; ++it) {
        const int e = tid + it * kThreads, t = e / kK, kk = e % kK;
        const int64_t r = map(t);
        tile[Tiles::row(t, kk & ~7) + (kk & 7)] = (r >= 0 && k0 + kk < K) ? src[r * op.ld + k0 + kk] : from_f<T>(0.f);
      }
    }
  } else {
    if (op.vec && map.g == 0) {  // 16-byte chunks along the rows, asynchronous
#pragma unroll
      for (int it = 0; it < kChunksPerThread; ++it) {
        const int c = tid + it * kThreads, kk = c / (kBM / 8), t0 = c % (kBM / 8) * 8;
        const int64_t r = map.r0 + t0;
        const bool valid = r < op.rows && k0 + kk < K;  // rows % 8 == 0: all 8 rows in or out
        cp_async16(tile + Tiles::ktile(kk, t0), valid ? src + (k0 + kk) * op.ld + r : src, valid ? 16 : 0);
      }
    } else {  // element by element, coalesced along the rows
#pragma unroll 4
      for (int it = 0; it < kBM * kK / kThreads; ++it) {
        const int e = tid + it * kThreads, t = e % kBM, kk = e / kBM;
        const int64_t r = map(t);
        tile[Tiles::ktile(kk, t & ~7) + (t & 7)] =
            (r >= 0 && k0 + kk < K) ? src[(k0 + kk) * op.ld + r] : from_f<T>(0.f);
      }
    }
  }
}

// The A fragments of m-tile rows [m, m + 16) and k-step [kk, kk + 16) (tensor_core.cuh layouts).
template <bool K_TILE, typename T>
__device__ __forceinline__ void load_a_frag(uint32_t (&a)[4], const T* tile, int m, int kk, int lane) {
  if constexpr (!K_TILE) {  // row lane % 16 at k + 8 · (lane / 16)
    ldmatrix_x4(a, tile + row_tile_offset(m + (lane & 15), kk + 8 * (lane >> 4)));
  } else {  // matrix q = lane / 8 is (k + 8 · (q / 2), m + 8 · (q % 2)), transposed
    const int q = lane >> 3, i = lane & 7;
    ldmatrix_x4_trans(a, tile + (kk + i + 8 * (q >> 1)) * kLdK + m + 8 * (q & 1));
  }
}

// The B fragments of n-tiles 2np and 2np + 1 (tile rows n + 16np .. n + 16np + 15) at k-step kk.
template <bool K_TILE, typename T>
__device__ __forceinline__ void load_b_frags(uint32_t (&b)[4][2], int np, const T* tile, int n, int kk,
                                             int lane) {
  n += 16 * np;
  uint32_t r[4];
  const int q = lane >> 3, i = lane & 7;
  if constexpr (!K_TILE) {  // matrix q is (n + 8 · (q / 2), k + 8 · (q % 2))
    ldmatrix_x4(r, tile + row_tile_offset(n + i + 8 * (q >> 1), kk + 8 * (q & 1)));
  } else {  // matrix q is (k + 8 · (q % 2), n + 8 · (q / 2)), transposed
    ldmatrix_x4_trans(r, tile + (kk + i + 8 * (q & 1)) * kLdK + n + 8 * (q >> 1));
  }
  b[2 * np][0] = r[0], b[2 * np][1] = r[1], b[2 * np + 1][0] = r[2], b[2 * np + 1][1] = r[3];
}

// C (M x N) = A (M x K) · B (N x K)ᵀ, epilogue per element (or per gate/up pair: PAIRED).
// A_T / B_T: the operand is row-contiguous (element (r, k) at ptr[k · ld + r]): k tiles.
template <typename T, typename Epi, bool PAIRED, bool A_T, bool B_T>
__global__ void __launch_bounds__(kThreads) gemm_mma(Operand a, Operand b, int64_t M, int64_t N,
                                                     int64_t K, Epi epi) {
  __shared__ __align__(16) T As[2][kTileElems];
  __shared__ __align__(16) T Bs[2][kTileElems];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int wm = warp >> 2, wn = warp & 3;  // warp tile origin: (wm · 64, wn · 32)
  const int g = lane >> 2, t4 = lane & 3;   // mma fragment coordinates
  const int64_t m0 = int64_t(blockIdx.x) * kBM;
  // PAIRED: N counts hidden units (F); the tile covers 64 units, gate and up.
  const int64_t n0 = int64_t(blockIdx.y) * (PAIRED ? kBN / 2 : kBN);
  const RowMap amap{m0, M, 0, 0};
  const RowMap bmap{n0, PAIRED ? N : b.rows, N, PAIRED ? kPairG : 0};

  float acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  const int64_t ktiles = (K + kBK - 1) / kBK;
  load_tile<T, A_T>(As[0], a, amap, 0, K);
  load_tile<T, B_T>(Bs[0], b, bmap, 0, K);
  cp_async_commit();
  for (int64_t kt = 0; kt < ktiles; ++kt) {
    const int s = int(kt & 1);
    cp_async_wait<0>();  // stage s has landed (this thread's copies) ...
    __syncthreads();     // ... and everyone's; stage s ^ 1 is no longer being read
    if (kt + 1 < ktiles) {  // prefetch the next stage while this one is multiplied
      load_tile<T, A_T>(As[s ^ 1], a, amap, (kt + 1) * kBK, K);
      load_tile<T, B_T>(Bs[s ^ 1], b, bmap, (kt + 1) * kBK, K);
      cp_async_commit();
    }
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      uint32_t af[4][4], bf[4][2];
#pragma unroll
      for (int mt = 0; mt < 4; ++mt) load_a_frag<A_T>(af[mt], As[s], wm * 64 + mt * 16, kk, lane);
#pragma unroll
      for (int np = 0; np < 2; ++np) load_b_frags<B_T>(bf, np, Bs[s], wn * 32, kk, lane);
#pragma unroll
      for (int mt = 0; mt < 4; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) mma_16816<T>(acc[mt][nt], af[mt], bf[nt][0], bf[nt][1]);
    }
  }

  // Epilogue straight from the accumulator fragments: element e of tile (mt, nt) is row
  // g (+8 for e >= 2), column 2·t4 + (e & 1).
#pragma unroll
  for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t i = m0 + wm * 64 + mt * 16 + g + (e >= 2 ? 8 : 0);
      if (i >= M) continue;
      if (PAIRED) {  // tiles nt and nt + 2 hold the gate and up of the same units
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          const int64_t j = n0 + wn * kPairG + nt * 8 + t4 * 2 + (e & 1);
          if (j < N) epi.pair(i, j, acc[mt][nt][e], acc[mt][nt + 2][e]);
        }
      } else {
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          const int64_t n = n0 + wn * 32 + nt * 8 + t4 * 2 + (e & 1);
          if (n < N) epi(i, n, acc[mt][nt][e]);
        }
      }
    }
  }
}

// ---- sm_90a: warpgroup-MMA GEMM (bf16 / fp16) ----------------------------------------------
// The same C = A · Bᵀ with the same operand layouts, row maps and epilogues as gemm_mma, as
// wgmma.mma_async m64n128k16 with both operands from shared memory: a 128 x 128 block tile, two
// warpgroups of 64 rows, each issuing one instruction per 16 of k for all 128 columns (64 fp32
// accumulators a thread, the C layout of mma_16816 over 16 column tiles). Each instruction
// reads its 64 x 16 A slice and the 128 x 16 B slice from shared memory: 6 KiB per 262 kFLOP,
// 24 KiB per MFLOP, half of what gemm_mma's warps read (48 KiB per MFLOP through ldmatrix).
// Tiles are 64 k wide (one 128-byte swizzle row, sw128_desc), in three stages through cp.async:
//   row tile (k-contiguous operand): [128 rows][64 k], chunk c of row r at c ^ r % 8: K-major
//   k tile (row-contiguous operand): [64 k][128 rows] as two [64 k][64 rows] panels, chunk c of
//            row k at c ^ k % 8: MN-major (the transpose flag), panels 8 KiB apart (the LBO)
// A step's MMAs stay in flight across the next step's barrier and loads (wgmma_wait<1>).
// __launch_bounds__(256, 2) holds it to 128 registers (ptxas -O3: no spills but 4 bytes in
// G3's epilogue), so two blocks (194 KiB of shared memory) share an SM and one's MMAs also
// run under the other's epilogue.
// Not yet: TMA, a producer warp, a persistent tile scheduler.
constexpr int kWBK = 64;      // k of a stage
constexpr int kWStages = 3;   // tile kt + 1 loading, kt multiplied, kt - 1's MMAs still in flight
constexpr int kWTile = kBM * kWBK;                             // elements of one operand tile
constexpr int kWSmem = kWStages * 2 * kWTile * 2 + 1024;       // A and B, 16-bit, + alignment
static_assert(kBM == 128 && kBN == 128, "two 64-row warpgroups, one N = 128 instruction");

// gemm_wgmma's stage tiles (above), for load_tile.
struct WgmmaTiles {
  static constexpr int kK = kWBK;
  __device__ __forceinline__ static int row(int t, int k) { return t * kWBK + ((((k >> 3) ^ t) & 7) << 3); }
  __device__ __forceinline__ static int ktile(int k, int t) {
    return (t >> 6) * (kWBK * 64) + k * 64 + (((((t & 63) >> 3) ^ k) & 7) << 3);
  }
};

// Descriptor of k-step ks (16 of the stage's 64 k) of `rows` rows from `row` of a stage tile.
template <bool K_TILE, typename T>
__device__ __forceinline__ uint64_t wtile_desc(const T* tile, int row, int ks) {
  if constexpr (!K_TILE) return sw128_desc(tile + row * kWBK + ks * 16, 16);        // K-major
  else return sw128_desc(tile + (row >> 6) * (kWBK * 64) + ks * 16 * 64, kWBK * 64 * 2);  // MN-major
}

template <typename T, typename Epi, bool PAIRED, bool A_T, bool B_T>
__global__ void __launch_bounds__(kThreads, 2) gemm_wgmma(Operand a, Operand b, int64_t M, int64_t N, int64_t K,
                                                          Epi epi) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || defined(FUSEDFORMER_CUDA_EMULATION)
  extern __shared__ __align__(16) unsigned char smem[];
  T* As = sw128_base<T>(smem);     // [kWStages][kWTile]
  T* Bs = As + kWStages * kWTile;  // [kWStages][kWTile]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, wg = warp >> 2;
  const int g = lane >> 2, t4 = lane & 3;
  const int64_t m0 = int64_t(blockIdx.x) * kBM;
  const int64_t n0 = int64_t(blockIdx.y) * (PAIRED ? kBN / 2 : kBN);
  const RowMap amap{m0, M, 0, 0};
  const RowMap bmap{n0, PAIRED ? N : b.rows, N, PAIRED ? kPairG : 0};

  float acc[16][4];
#pragma unroll
  for (int j = 0; j < 16; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;

  const int64_t ktiles = (K + kWBK - 1) / kWBK;
  load_tile<T, A_T, WgmmaTiles>(As, a, amap, 0, K);
  load_tile<T, B_T, WgmmaTiles>(Bs, b, bmap, 0, K);
  cp_async_commit();
  // Tile kt sits in stage kt % 3. Step kt keeps the MMAs of step kt - 1 in flight (wait_group
  // 1) while it lands tile kt, refills the stage of tile kt - 2 (whose MMAs every thread's
  // previous wait_group retired before this barrier) with tile kt + 1, and issues its own.
  for (int64_t kt = 0; kt < ktiles; ++kt) {
    const int s = int(kt % kWStages);
    tiles_landed_for_wgmma();  // tile kt
    if (kt + 1 < ktiles) {
      const int next = int((kt + 1) % kWStages);
      load_tile<T, A_T, WgmmaTiles>(As + next * kWTile, a, amap, (kt + 1) * kWBK, K);
      load_tile<T, B_T, WgmmaTiles>(Bs + next * kWTile, b, bmap, (kt + 1) * kWBK, K);
      cp_async_commit();
    }
    const T* at = As + s * kWTile;
    const T* bt = Bs + s * kWTile;
    wgmma_fence_operands(acc);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < kWBK / 16; ++ks)
      wgmma_m64n128k16_ss<T, A_T, B_T>(acc, wtile_desc<A_T>(at, 64 * wg, ks), wtile_desc<B_T>(bt, 0, ks), true);
    wgmma_commit();
    wgmma_wait<1>();  // step kt - 1's MMAs have retired: its stage is free for step kt + 1
    wgmma_fence_operands(acc);
  }
  wgmma_wait<0>();
  wgmma_fence_operands(acc);

  // Epilogue from the accumulators: element e of column tile j is row g (+8 for e >= 2) of the
  // warp's 16, column 8j + 2·t4 + (e & 1) of the tile's 128.
  const int64_t row0 = m0 + 64 * wg + 16 * (warp & 3) + g;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int64_t i = row0 + (e >= 2 ? 8 : 0);
    if (i >= M) continue;
    if (PAIRED) {  // column groups of 32: 16 gate units then their 16 up rows (kPairG)
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        if ((j & 3) >= 2) continue;
        const int64_t u = n0 + 16 * (j >> 2) + 8 * (j & 3) + 2 * t4 + (e & 1);
        if (u < N) epi.pair(i, u, acc[j][e], acc[j + 2][e]);
      }
    } else {
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        const int64_t n = n0 + 8 * j + 2 * t4 + (e & 1);
        if (n < N) epi(i, n, acc[j][e]);
      }
    }
  }
#else
  __trap();  // launched only where the binary is sm_90a code
#endif
}

// ---- SIMT GEMM (fp32) ------------------------------------------------------------------------

constexpr int kSBM = 64, kSBN = 64, kSBK = 16;  // 256 threads as 16 x 16, 4 x 4 outputs each
constexpr int kSimtPairG = 2;                   // swiglu: a thread's 4 columns = 2 gate + 2 up

__device__ __forceinline__ float simt_load(const Operand& op, int64_t r, int64_t k, int64_t K) {
  if (r < 0 || k >= K) return 0.f;
  const float* src = static_cast<const float*>(op.ptr);
  return op.k_contig ? src[r * op.ld + k] : src[k * op.ld + r];
}

template <typename Epi, bool PAIRED>
__global__ void __launch_bounds__(256) gemm_simt(Operand a, Operand b, int64_t M, int64_t N,
                                                 int64_t K, Epi epi) {
  __shared__ float As[kSBK][kSBM + 4];  // k-major: a thread reads 4 consecutive rows
  __shared__ float Bs[kSBK][kSBN + 4];
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int64_t m0 = int64_t(blockIdx.x) * kSBM;
  const int64_t n0 = int64_t(blockIdx.y) * (PAIRED ? kSBN / 2 : kSBN);
  const RowMap amap{m0, M, 0, 0};
  const RowMap bmap{n0, PAIRED ? N : b.rows, N, PAIRED ? kSimtPairG : 0};
  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < K; k0 += kSBK) {
#pragma unroll
    for (int it = 0; it < kSBM * kSBK / 256; ++it) {
      const int e = tid + it * 256;
      // Coalesced along the operand's contiguous dim.
      const int ta = a.k_contig ? e / kSBK : e % kSBM, ka = a.k_contig ? e % kSBK : e / kSBM;
      As[ka][ta] = simt_load(a, amap(ta), k0 + ka, K);
      const int tb = b.k_contig ? e / kSBK : e % kSBN, kb = b.k_contig ? e % kSBK : e / kSBN;
      Bs[kb][tb] = simt_load(b, bmap(tb), k0 + kb, K);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kSBK; ++kk) {
      float av[4], bv[4];
#pragma unroll
      for (int x = 0; x < 4; ++x) {
        av[x] = As[kk][ty * 4 + x];
        bv[x] = Bs[kk][tx * 4 + x];
      }
#pragma unroll
      for (int x = 0; x < 4; ++x)
#pragma unroll
        for (int y = 0; y < 4; ++y) acc[x][y] = fmaf(av[x], bv[y], acc[x][y]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int x = 0; x < 4; ++x) {
    const int64_t i = m0 + ty * 4 + x;
    if (i >= M) continue;
    if (PAIRED) {  // columns tx·4 + {0, 1} are gate units, tx·4 + {2, 3} their up rows
#pragma unroll
      for (int y = 0; y < 2; ++y) {
        const int64_t j = n0 + tx * kSimtPairG + y;
        if (j < N) epi.pair(i, j, acc[x][y], acc[x][y + 2]);
      }
    } else {
#pragma unroll
      for (int y = 0; y < 4; ++y) {
        const int64_t n = n0 + tx * 4 + y;
        if (n < N) epi(i, n, acc[x][y]);
      }
    }
  }
}

// ---- column sums (db1, db2) -----------------------------------------------------------------

// out[n] = Σ_i src[i, n] in fp32, deterministic. A 32 x 8 block takes 32 columns: thread
// (ty, tx) sums rows ty, ty + 8, ... of column n0 + tx with Kahan compensation (error bound
// ~2^-23 · Σ|x| whatever M is, where a plain running sum's bound is M · 2^-24 · Σ|x|: 5e-4 of
// it at M = 8192), then one thread adds the 8 slices in a fixed order. A warp reads 32
// consecutive columns of a row: coalesced.
template <typename T>
__global__ void __launch_bounds__(256) colsum(const T* src, int64_t rows, int64_t cols, T* out) {
  __shared__ float part[8][33];
  const int tx = threadIdx.x % 32, ty = threadIdx.x / 32;
  const int64_t n = int64_t(blockIdx.x) * 32 + tx;
  float sum = 0.f, comp = 0.f;
  if (n < cols)
    for (int64_t i = ty; i < rows; i += 8) {
      const float y = to_f(src[i * cols + n]) - comp;
      const float t = sum + y;
      comp = (t - sum) - y;
      sum = t;
    }
  part[ty][tx] = sum;
  __syncthreads();
  if (ty == 0 && n < cols) {
    float total = 0.f;
    for (int k = 0; k < 8; ++k) total += part[k][tx];
    out[n] = from_f<T>(total);
  }
}

// ---- launch ----------------------------------------------------------------------------------


// An operand of `rows` x K: k-contiguous with row stride ld, or the transpose.
template <typename T>
Operand operand(const void* ptr, int64_t rows, int64_t ld, bool k_contig) {
  const bool vec = sizeof(T) == 2 && aligned16(ptr) && ld % 8 == 0;
  return Operand{ptr, rows, ld, k_contig, vec};
}

// grid.y counts column tiles and may not pass 65535: a clear error instead of the launch's
// "invalid configuration" (bf16 N > 8.4M columns; fp32 swiglu > 2.1M hidden units).
void check_column_tiles(int64_t tiles, int64_t N) {
  if (tiles > 65535)
    throw std::runtime_error("ffn (cuda): a GEMM with N = " + std::to_string(N) + " needs " +
                             std::to_string(tiles) + " column tiles; the kernel supports 65535");
}

// A_T / B_T must match a.k_contig / b.k_contig (false / true): the call sites know their
// layouts, so only the combinations in use are instantiated.
template <typename T, bool A_T, bool B_T, bool PAIRED = false, typename Epi>
void gemm(const Operand& a, const Operand& b, int64_t M, int64_t N, int64_t K, const Epi& epi,
          cudaStream_t stream) {
  if (a.k_contig == A_T || b.k_contig == B_T) throw std::logic_error("ffn (cuda): operand layout mismatch");
  // N: output columns, or hidden units when PAIRED (each unit is two tile columns).
  if constexpr (std::is_same<T, float>::value) {
    const int64_t per = PAIRED ? kSBN / 2 : kSBN;
    check_column_tiles((N + per - 1) / per, N);
    const dim3 grid(unsigned((M + kSBM - 1) / kSBM), unsigned((N + per - 1) / per));
    gemm_simt<Epi, PAIRED><<<grid, 256, 0, stream>>>(a, b, M, N, K, epi);
  } else {
    Operand a2 = a, b2 = b;
    // 16-byte paths need K (k-contiguous) or the row count (transposed) to be a multiple of 8.
    a2.vec = a.vec && (a.k_contig ? K % 8 == 0 : a.rows % 8 == 0);
    b2.vec = b.vec && (b.k_contig ? K % 8 == 0 : b.rows % 8 == 0);
    const int64_t per = PAIRED ? kBN / 2 : kBN;
    check_column_tiles((N + per - 1) / per, N);
    const dim3 grid(unsigned((M + kBM - 1) / kBM), unsigned((N + per - 1) / per));
    if (wgmma_allowed() && binary_is_sm90(gemm_wgmma<T, Epi, PAIRED, A_T, B_T>)) {
      launch_with_smem(gemm_wgmma<T, Epi, PAIRED, A_T, B_T>, grid, dim3(kThreads), size_t(kWSmem), stream, a2, b2, M,
                       N, K, epi);
    } else {
      gemm_mma<T, Epi, PAIRED, A_T, B_T><<<grid, kThreads, 0, stream>>>(a2, b2, M, N, K, epi);
    }
  }
}

template <typename T>
void fwd(const FfnFwdParams& p, cudaStream_t stream) {
  const int64_t m = p.m, c = p.c, f = p.f, f1 = ffn_f1(p.act, f);
  const FwdHiddenEpi<T> e1{static_cast<const T*>(p.b1), static_cast<T*>(p.pre), static_cast<T*>(p.hidden),
                           f, p.act, p.dropout_p, p.seed};
  const Operand x = operand<T>(p.x, m, c, true), w1 = operand<T>(p.w1, f1, c, true);
  if (p.act == FfnActivation::kSwiglu) {
    gemm<T, false, false, true>(x, w1, m, f, c, e1, stream);  // G1, N = hidden units
  } else {
    gemm<T, false, false>(x, w1, m, f, c, e1, stream);
  }
  // G2: y = hidden w2ᵀ + b2
  const StoreEpi<T> e2{static_cast<T*>(p.y), c, static_cast<const T*>(p.b2)};
  gemm<T, false, false>(operand<T>(p.hidden, m, f, true), operand<T>(p.w2, c, f, true), m, c, f, e2, stream);
}

template <typename T>
void bwd(const FfnBwdParams& p, cudaStream_t stream) {
  const int64_t m = p.m, c = p.c, f = p.f, f1 = ffn_f1(p.act, f);
  // G3: d_hidden (m, f) = dy (m, c) · w2 (c, f): B(n = f, k = c) = w2[c · f + n], transposed.
  const BwdDpreEpi<T> e3{static_cast<const T*>(p.pre), static_cast<T*>(p.d_pre),
                         static_cast<T*>(p.hidden), f, p.act, p.dropout_p, p.seed};
  gemm<T, false, true>(operand<T>(p.dy, m, c, true), operand<T>(p.w2, f, f, false), m, f, c, e3, stream);
  // G4: dx (m, c) = d_pre (m, f1) · w1 (f1, c)
  gemm<T, false, true>(operand<T>(p.d_pre, m, f1, true), operand<T>(p.w1, c, c, false), m, c, f1,
          StoreEpi<T>{static_cast<T*>(p.dx), c, nullptr}, stream);
  // G5: dw1 (f1, c) = d_preᵀ · x: A(i = f1, k = m) and B(n = c, k = m), both transposed
  gemm<T, true, true>(operand<T>(p.d_pre, f1, f1, false), operand<T>(p.x, c, c, false), f1, c, m,
          StoreEpi<T>{static_cast<T*>(p.dw1), c, nullptr}, stream);
  // G6: dw2 (c, f) = dyᵀ · hidden
  gemm<T, true, true>(operand<T>(p.dy, c, c, false), operand<T>(p.hidden, f, f, false), c, f, m,
          StoreEpi<T>{static_cast<T*>(p.dw2), f, nullptr}, stream);
  if (p.db1)
    colsum<T><<<unsigned((f1 + 31) / 32), 256, 0, stream>>>(static_cast<const T*>(p.d_pre), m, f1,
                                                           static_cast<T*>(p.db1));
  if (p.db2)
    colsum<T><<<unsigned((c + 31) / 32), 256, 0, stream>>>(static_cast<const T*>(p.dy), m, c,
                                                          static_cast<T*>(p.db2));
}

}  // namespace

void ffn_fwd_cuda(const FfnFwdParams& p, cudaStream_t stream) {
  dispatch_cuda_dtype(p.dtype, [&](auto tag) { fwd<decltype(tag)>(p, stream); });
}

void ffn_bwd_cuda(const FfnBwdParams& p, cudaStream_t stream) {
  dispatch_cuda_dtype(p.dtype, [&](auto tag) { bwd<decltype(tag)>(p, stream); });
}

}  // namespace fusedformer
