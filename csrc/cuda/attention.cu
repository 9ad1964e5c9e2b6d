// Scaled dot-product attention on the GPU: the FlashAttention-2 forward and backward, torch-free
// (params struct + stream). The CPU twin, csrc/cpu/attention.cpp, has the same loops and
// names; read it first.
//
// Kernels (grid, block):
//   attention_fwd_kernel        (query blocks, HQ, B)   online softmax over key blocks, o + lse
//   attention_bwd_delta_kernel  (rows / warps)          Delta = rowsum(dO ∘ O), one warp per row
//   attention_bwd_dkdv_kernel   (key blocks, HKV, B)    dK, dV: loops over the group's query
//                                                       heads and the query blocks
//   attention_bwd_dq_kernel     (query blocks, HQ, B)   dQ: loops over the key blocks
//   attention_*_wgmma_kernel    the same grids, 128-row blocks: sm_90a, 16-bit, D = 64, 128
//                               (and 256 in the forward)
// Every output element is summed by one thread in a fixed order: deterministic, no atomics.
//
// Warp tiling: each warp owns kMT m-tiles of 16 rows of its block (queries, or keys in dK/dV;
// kMT = 2 in the 16-bit forward at D <= 128 and backward at D <= 64, else 1) and holds their
// 16 x N slabs of scores and 16 x D accumulators in registers, in the C-fragment layout of
// `mma.sync.aligned.m16n8k16` (lane = 4 · group + t: rows group and group + 8, columns
// 2t, 2t + 1 of each 8-column tile). Two warp-level products cover all four GEMMs of FA2:
//   gemm_nt:    acc(16 x N) += A(16 x K) · Btᵀ   A, Bt row-major in shared memory (K contiguous)
//                                                 S = Q Kᵀ, dP = dO Vᵀ, Sᵀ = K Qᵀ, dPᵀ = V dOᵀ
//   gemm_rs_nn: acc(16 x N) += P(16 x K) · B     P in registers (an accumulator slab), B
//                                                 row-major in shared memory: O += P V,
//                                                 dQ += dS K, dV += Pᵀ dO, dK += dSᵀ Q
// bf16 / fp16 storage: both on tensor cores (HMMA, inline PTX), P and dS rounded to the storage
// dtype as the A operand, fp32 accumulation (as FlashAttention-2). fp32 storage: the same
// kernels with SIMT fp32 products (the A operand of gemm_rs_nn goes through a per-warp shared
// scratch), so fp32 keeps fp32 accuracy; it is a correctness path, not a fast one.
//
// Head dims: templates for D in {32, 64, 96, 128, 256} (the issue's 80 and 96 run in 96, not
// padded to 128: a quarter to three eighths fewer FLOPs); any d <= 256 runs in the smallest
// that fits, with zero-filled columns (d = 40 -> 64, d = 80 -> 96). 16-bit tiles need
// kD % 32 == 0 (rows of 4k 16-byte chunks, for the swizzle of tile_offset), which all five meet.
//
// Data movement (16-bit): fragments come from shared memory through ldmatrix (.trans for the
// k-major B operand of gemm_rs_nn), four 8x8 matrices per instruction, from XOR-swizzled rows
// that keep both the ldmatrix reads and the cp.async writes conflict-free. Tiles move from global
// memory as 16-byte cp.async chunks, zero-filled past L and d by the copy itself, whenever a
// head's rows are 16-byte aligned (any contiguous head with d % 8 == 0); the tiles a block
// re-reads in its loop are double-buffered, so tile n + 1 is in flight while tile n is
// multiplied, with one barrier per step. Other layouts take an element-wise, bounds-checked
// path (any row stride, any alignment).
//
// sm_90a: the 16-bit kernels at D = 64 and 128 (the forward also at 256) have warpgroup-MMA
// twins (attention_*_wgmma_kernel, see "Forward on sm_90a" below), launched wherever the binary
// that runs is sm_90a code; the mma.sync kernels serve sm_80, fp32, the other head dims, and
// FUSEDFORMER_CUDA_WGMMA=0.
//
// STATUS: compiled for sm_80 and sm_90a (tests/test_nvcc.py, which also checks that the wgmma
// kernels are HGMMA in the sm_90a SASS) and executed on the CPU by the emulator in
// tests/cuda_emu (real barriers, ldmatrix, mma.sync, cp.async and wgmma semantics); never
// run on a GPU yet. The gpu tier of tests/test_attention_cpp.py checks it against the oracle.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "../attention.h"
#include "../philox.h"
#include "common.cuh"
#include "tensor_core.cuh"

namespace fusedformer {
namespace {

using namespace cuda_common;

constexpr float kInf = __builtin_huge_valf();

// ---------------------------------------------------------------------------------------
// Storage types (to_f / from_f come from common.cuh)

// Two fp32 values as one 32-bit register of two 16-bit values, `lo` in the low half (the
// lower k index of an mma operand pair).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// ---------------------------------------------------------------------------------------
// Tiling of one (dtype, padded head dim) instantiation

template <typename T, int kD>
struct Traits {
  static constexpr bool kTensorCores = !std::is_same_v<T, float>;
  // Tiles that a block re-reads from global memory in its loop (K, V in the forward and dQ;
  // Q, dO in dK/dV) have kStages buffers: with two, tile n + 1's cp.async copies are in flight
  // while tile n is multiplied. fp32 keeps one (two do not fit sm_80's 163 KiB at D = 128).
  static constexpr int kStages = kTensorCores ? 2 : 1;
  static constexpr int kWarps = kD <= 128 ? 4 : 2;  // D = 256: fewer rows, to fit registers
  static constexpr int kThreads = 32 * kWarps;
  // Forward, 16-bit, D <= 128: each warp owns two 16-row m-tiles (as FlashAttention-2's
  // 128 x 64 tiles with 4 warps), so every K and V fragment read from shared memory feeds two
  // mma instead of one. Shared-memory bandwidth, not the tensor cores, bounds a one-m-tile
  // warp on sm_90 (320 bytes read per 4096-FLOP mma at 128 B/clk); two m-tiles cut it to 192.
  static constexpr int kFwdMTiles = kTensorCores && kD <= 128 ? 2 : 1;
  static constexpr int kFwdBlockM = 16 * kFwdMTiles * kWarps;  // query rows of a forward block
  // dQ, 16-bit, D <= 64: two m-tiles a warp as well (at D = 128 the score, dP and dQ slabs of
  // two m-tiles would not fit).
  static constexpr int kDqMTiles = kTensorCores && kD <= 64 ? 2 : 1;
  static constexpr int kBlockM = 16 * kDqMTiles * kWarps;  // query rows of a dQ block
  static constexpr int kBlockN = kD <= 128 ? 64 : 32;  // keys per inner tile of dQ
  // Keys per inner tile of the forward: at D = 128 two m-tiles hold 128 accumulators a thread,
  // and 64-key score slabs pushed the kernel past 255 registers (432 bytes of spills, sm_90a).
  static constexpr int kFwdBlockN = kFwdMTiles == 2 && kD == 128 ? 32 : kBlockN;
  // dK/dV, 16-bit, D <= 64: two m-tiles of keys a warp, for the same reason as the forward's;
  // at D = 128 the four 16 x 128 accumulator slabs would not fit in registers.
  static constexpr int kBwdMTiles = kTensorCores && kD <= 64 ? 2 : 1;
  static constexpr int kBwdBlockN = 16 * kBwdMTiles * kWarps;  // key rows of a dK/dV block
  static constexpr int kBwdBlockM = 32;                // queries per inner tile of dK/dV
  // dK/dV at D = 256: two warps share each 16-key m-tile, one per 128-column half of dK and dV
  // (two 16 x 256 fp32 accumulators are 256 registers a thread: the unsplit kernel spilled
  // 1.3 KiB, sm_90a). Each computes its half's partial Sᵀ and dPᵀ, and the two add each
  // other's through shared memory (kDkdvExchangeBytes), so the FLOPs stay those of one warp.
  static constexpr int kDkdvSplit = kD == 256 ? 2 : 1;
  static constexpr int kDkdvWarps = kWarps * kDkdvSplit;
  static constexpr int kDkdvThreads = 32 * kDkdvWarps;
  static constexpr int kDkdvExchangeBytes =
      kDkdvSplit == 1 ? 0 : kDkdvWarps * 2 * (kBwdMTiles * kBwdBlockM / 8 * 4) * 32 * 4;
  // Elements per shared tile row (tile_offset): 16-bit rows are unpadded and swizzled, fp32
  // rows padded by 4 floats.
  static constexpr int kStride = kTensorCores ? kD : kD + 4;
  // fp32 only: per-warp scratch for the register operand of gemm_rs_nn (16 x K floats, rows
  // padded by 4: see gemm_rs_nn).
  static constexpr int kScratchCols = kBlockN > kBwdBlockM ? kBlockN : kBwdBlockM;
  static constexpr int kScratchWarpFloats = 16 * (kScratchCols + 4);
  static constexpr int kScratchBytes = kTensorCores ? 0 : kWarps * kScratchWarpFloats * 4;
  static constexpr int kRowBytes = kStride * int(sizeof(T));  // one shared tile row
  static constexpr int kFwdSmem = (kFwdBlockM + 2 * kStages * kFwdBlockN) * kRowBytes + kScratchBytes;
  static constexpr int kDqSmem =
      (2 * kBlockM + 2 * kStages * kBlockN) * kRowBytes + 2 * kBlockM * 4 + kScratchBytes;
  static constexpr int kDkdvSmem = (2 * kBwdBlockN + 2 * kStages * kBwdBlockM) * kRowBytes +
                                   2 * kStages * kBwdBlockM * 4 + kScratchBytes * kDkdvSplit +
                                   kDkdvExchangeBytes;
  static_assert(kD % 16 == 0 && kBlockN % 16 == 0 && kFwdBlockN % 16 == 0 && kBwdBlockM % 16 == 0,
                "mma k-steps of 16");
  static_assert(kFwdBlockN <= kScratchCols, "the fp32 scratch holds a forward P slab");
  static_assert(kRowBytes % 16 == 0, "16-byte cp.async chunks and ldmatrix rows");
  // Every tile must fit the smallest target's opt-in shared memory per block (sm_80: 163 KiB;
  // sm_90: 227 KiB), or its launch would fail at run time. The largest: fp32 D = 256
  // dK/dV, 155.3 KiB (its exchange 16 KiB); fp32 D = 128 dQ, 149.5 KiB; 16-bit (two stages)
  // D = 256 dK/dV, 112.5 KiB.
  static_assert(kFwdSmem <= 163 * 1024 && kDqSmem <= 163 * 1024 && kDkdvSmem <= 163 * 1024,
                "a tile over sm_80's shared memory per block");
};

// Offset of element (row, col) in a shared tile whose rows are kWidth elements (kD) long.
// fp32: rows padded by 4 floats, so the 8 rows that one fragment load touches start in distinct
// banks. 16-bit: unpadded rows whose 16-byte chunks are XOR-swizzled by the row (chunk ^ row % 8
// when a row holds a multiple of 8 chunks, chunk ^ (row / 2) % 4 for the 4- and 12-chunk rows of
// D = 32 and 96; either way a chunk stays in its aligned group of 8 or 4), which makes both
// shared-memory accesses conflict-free: an ldmatrix matrix (8 rows, one chunk) and a quarter
// warp of cp.async writes (8 consecutive chunks of the row-major tile) each land on 8
// distinct 16-byte bank groups. Padded 16-bit rows were conflict-free for ldmatrix only: at
// D = 32 and 96 a quarter warp's writes straddle two rows that overlap in 4 banks.
template <typename T, int kWidth>
__device__ __forceinline__ int tile_offset(int row, int col) {
  if constexpr (std::is_same_v<T, float>) {
    return row * (kWidth + 4) + col;
  } else {
    static_assert(kWidth % 32 == 0, "16-bit rows of 4, 8, 12, ... 16-byte chunks");
    constexpr bool kGroupsOf8 = (kWidth / 8) % 8 == 0;
    const int swizzle = kGroupsOf8 ? (row & 7) : ((row >> 1) & 3);
    return row * kWidth + ((((col >> 3) ^ swizzle)) << 3) + (col & 7);
  }
}

// Shared tile layouts, as types for load_tile: RowLayout (the mma.sync kernels: tile_offset's
// rows of kWidth) and PanelLayout (the wgmma kernels: kD / 64 panels of kRows x 64, each row 128
// bytes swizzled as tile_offset<T, 64>, chunk ^ row % 8). With every panel on a 1024-byte
// boundary of the shared window that is the hardware's 128-byte swizzle (sw128_desc), and
// ldmatrix reads and cp.async writes stay conflict-free on it for tile_offset's reason.
template <typename T, int kWidth>
struct RowLayout {
  __device__ __forceinline__ static int offset(int row, int col) { return tile_offset<T, kWidth>(row, col); }
};
template <typename T, int kRows>
struct PanelLayout {
  __device__ __forceinline__ static int offset(int row, int col) {
    return (col >> 6) * kRows * 64 + tile_offset<T, 64>(row, col & 63);
  }
};

// acc[mt](16 x kN) += A[mt](16 x kK) · Btᵀ for the warp's kMT m-tiles (A rows 16 · mt ..), A and
// Bt (kN x kK) row-major in shared memory, in tiles whose rows are kStride elements (16-bit:
// tile_offset's swizzled rows of kStride; fp32: padded rows). kK may be a part of a row that
// starts at a multiple of 64 columns (the swizzle stays within aligned groups of 8 chunks, so
// A and Bt may point into the row). Each B fragment pair is loaded once for all kMT m-tiles:
// with two, the shared-memory bytes per mma drop from 320 to 192 (B 256 -> 128).
template <typename T, int kK, int kN, int kStride, int kMT>
__device__ __forceinline__ void gemm_nt(float (&acc)[kMT][kN / 8][4], const T* A, const T* Bt, int lane) {
  if constexpr (!std::is_same_v<T, float>) {
    static_assert(kN % 16 == 0, "one ldmatrix moves the B fragments of two n-tiles");
    // This lane's ldmatrix rows (tensor_core.cuh). A: row lane % 16 at k + 8 · (lane / 16)
    // gives a0..a3. Bt: row lane % 8 + 8 · (lane / 16) at k + 8 · (lane / 8 % 2) gives b0, b1
    // of n-tiles 2np and 2np + 1. Rows are kStride wide (tile_offset).
    const int a_r = lane & 15, a_c = 8 * (lane >> 4);
    const int b_r = (lane & 7) + 8 * (lane >> 4), b_c = 8 * ((lane >> 3) & 1);
#pragma unroll
    for (int kk = 0; kk < kK; kk += 16) {
      uint32_t a[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) ldmatrix_x4(a[mt], A + tile_offset<T, kStride>(mt * 16 + a_r, kk + a_c));
#pragma unroll
      for (int np = 0; np < kN / 16; ++np) {
        uint32_t b[4];
        ldmatrix_x4(b, Bt + tile_offset<T, kStride>(np * 16 + b_r, kk + b_c));
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          mma_16816<T>(acc[mt][2 * np], a[mt], b[0], b[1]);
          mma_16816<T>(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
        }
      }
    }
  } else {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int nt = 0; nt < kN / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float* a = A + (16 * mt + g + 8 * (e >> 1)) * kStride;
          const float* b = Bt + (nt * 8 + 2 * t + (e & 1)) * kStride;
          float s = 0.f;
#pragma unroll 4
          for (int k = 0; k < kK; ++k) s += a[k] * b[k];
          acc[mt][nt][e] += s;
        }
      }
  }
}

// acc[mt](16 x kN) += P[mt](16 x kK) · B for the warp's kMT m-tiles, P register slabs in the
// accumulator layout, B (kK x kN) row-major in shared memory with rows of kStride (kN may be a
// part of a row, as gemm_nt's kK), each B fragment pair loaded once for all m-tiles. fp32: P
// goes through the warp's scratch (16 x kK floats, row stride kK + 4: the 8 rows a step reads
// start in distinct banks; unpadded, kK = 32 or 64 put them all in one, an 8-way conflict), one
// m-tile at a time.
template <typename T, int kK, int kN, int kStride, int kMT>
__device__ __forceinline__ void gemm_rs_nn(float (&acc)[kMT][kN / 8][4], const float (&P)[kMT][kK / 8][4],
                                           const T* B, float* scratch, int lane) {
  if constexpr (!std::is_same_v<T, float>) {
    static_assert(kN % 16 == 0, "one ldmatrix moves the B fragments of two n-tiles");
    // B is k-major, so its fragments come through ldmatrix.trans: this lane's row is
    // k = lane % 16 at columns n + 8 · (lane / 16), which gives b0, b1 of n-tiles 2np, 2np + 1.
    // Rows are kStride wide (tile_offset).
    const int b_r = lane & 15, b_c = 8 * (lane >> 4);
#pragma unroll
    for (int kc = 0; kc < kK / 16; ++kc) {
      uint32_t a[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        const float(&p0)[4] = P[mt][2 * kc];
        const float(&p1)[4] = P[mt][2 * kc + 1];
        a[mt][0] = pack2<T>(p0[0], p0[1]);
        a[mt][1] = pack2<T>(p0[2], p0[3]);
        a[mt][2] = pack2<T>(p1[0], p1[1]);
        a[mt][3] = pack2<T>(p1[2], p1[3]);
      }
#pragma unroll
      for (int np = 0; np < kN / 16; ++np) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, B + tile_offset<T, kStride>(kc * 16 + b_r, np * 16 + b_c));
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          mma_16816<T>(acc[mt][2 * np], a[mt], b[0], b[1]);
          mma_16816<T>(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
        }
      }
    }
  } else {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
      __syncwarp();
#pragma unroll
      for (int nt = 0; nt < kK / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          scratch[(g + 8 * (e >> 1)) * (kK + 4) + nt * 8 + 2 * t + (e & 1)] = P[mt][nt][e];
      __syncwarp();
#pragma unroll
      for (int nt = 0; nt < kN / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float* p = scratch + (g + 8 * (e >> 1)) * (kK + 4);
          const float* b = B + nt * 8 + 2 * t + (e & 1);
          float s = 0.f;
#pragma unroll 4
          for (int k = 0; k < kK; ++k) s += p[k] * b[k * kStride];
          acc[mt][nt][e] += s;
        }
      }
    }
  }
}

// Whether a head's rows can move as 16-byte cp.async chunks: a 16-byte aligned start and a
// row stride that keeps every row so (contiguous heads with d % 8 == 0 in 16-bit storage,
// d % 4 == 0 in fp32; views with other strides take the element-wise path).
template <typename T>
__device__ __forceinline__ bool rows_16b_aligned(const T* head, int64_t ld) {
  return (reinterpret_cast<uintptr_t>(head) & 15u) == 0 && ld % (16 / int(sizeof(T))) == 0;
}

// Rows [r0, r0 + kRows) of one head (row stride `ld`, unit column stride) into a shared tile
// (kRows x kD, laid out by Layout); rows >= L and columns >= d are zero. vec (rows_16b_aligned):
// 16-byte cp.async chunks, zero-filled past L and d in the copy itself, landed by the caller's
// cp_async_wait and barrier; otherwise element by element, stored before this returns.
template <typename T, int kRows, int kD, int kThreads, typename Layout = RowLayout<T, kD>>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t ld, int64_t r0, int64_t L,
                                          int64_t d, bool vec) {
  if (vec) {
    constexpr int kPer = 16 / int(sizeof(T)), kChunks = kRows * kD / kPer;
    // Not unrolled: unrolled, a whole tile's chunk addresses stayed live across the loop and
    // cost the bf16 D = 128 forward 66 registers (248 against 182, sm_90a ptxas).
#pragma unroll 1
    for (int it = 0; it < (kChunks + kThreads - 1) / kThreads; ++it) {
      const int idx = threadIdx.x + it * kThreads;
      if (kChunks % kThreads != 0 && idx >= kChunks) break;
      const int r = idx / (kD / kPer), c = idx % (kD / kPer) * kPer;
      const int64_t cols = r0 + r < L ? min(d - c, int64_t(kPer)) : 0;  // the chunk's columns below d
      const int bytes = cols > 0 ? int(cols) * int(sizeof(T)) : 0;
      cp_async16(dst + Layout::offset(r, c), bytes > 0 ? src + (r0 + r) * ld + c : src, bytes);
    }
  } else {
    for (int idx = threadIdx.x; idx < kRows * kD; idx += kThreads) {
      const int r = idx / kD, c = idx % kD;
      dst[Layout::offset(r, c)] = (r0 + r < L && c < d) ? src[(r0 + r) * ld + c] : from_f<T>(0.f);
    }
  }
}

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The K, V tile loads of the forward and dQ loops: load(kb, stage) fills buffer `stage` of sK
// and sV (kBN rows each) with key block kb, through cp.async where the rows allow it.
template <typename T, int kD, int kBN, int kThreads, typename P>
__device__ __forceinline__ auto kv_tile_loader(const P& p, const T* k_head, const T* v_head, T* sK, T* sV) {
  constexpr int kS = Traits<T, kD>::kStride;
  const bool k_vec = rows_16b_aligned(k_head, p.k_row_stride), v_vec = rows_16b_aligned(v_head, p.v_row_stride);
  return [=, &p](int64_t kb, int stage) {
    load_tile<T, kBN, kD, kThreads>(sK + stage * kBN * kS, k_head, p.k_row_stride, kb * kBN, p.lk, p.d, k_vec);
    load_tile<T, kBN, kD, kThreads>(sV + stage * kBN * kS, v_head, p.v_row_stride, kb * kBN, p.lk, p.d, v_vec);
  };
}

// Key blocks (of kBN) that query rows [i0, i0 + rows) visit: all, or with causal masking those
// up to the block holding the last row's diagonal.
template <typename P>
__device__ __forceinline__ int64_t key_blocks_end(const P& p, int64_t i0, int rows, int kBN) {
  const int64_t nkb = ceil_div(p.lk, kBN);
  return p.is_causal ? min(nkb, ceil_div(min(i0 + rows, p.lq), kBN)) : nkb;
}

// Key blocks [begin, end) of split `split` (split-KV, AttentionFwdParams::num_splits): the
// blocks key_blocks_end gives the query block, cut into num_splits consecutive ranges of equal
// length but the last (the CPU twin's split_range). A range may be empty.
struct KeyRange {
  int64_t begin, end;
};
__device__ __forceinline__ KeyRange split_key_blocks(const AttentionFwdParams& p, int64_t i0, int rows, int kBN,
                                                     int64_t split) {
  const int64_t n = key_blocks_end(p, i0, rows, kBN), per = ceil_div(n, p.num_splits);
  return {min(n, split * per), min(n, (split + 1) * per)};
}

// One step of a loop over tiles n = 0 .. count - 1 that load(n, stage) fills (cp.async
// copies or plain stores), with tile 0 issued and committed before the loop. On return, tile n
// is in buffer n % kStages for every thread, and with two stages tile n + 1's copies are in
// flight into the other buffer (the one tile n - 1 used) while the caller computes on tile n.
// Returns n's buffer. One barrier a step with two stages, two with one. kAsyncProxy: the tiles
// feed wgmma, so each thread fences its landed writes to the async proxy before the barrier.
template <int kStages, bool kAsyncProxy = false, typename Load>
__device__ __forceinline__ int pipeline_step(int64_t n, int64_t count, Load&& load) {
  const int stage = int(n % kStages);
  if (kStages == 1 && n > 0) {
    __syncthreads();  // every warp is done with tile n - 1
    load(n, 0);
    cp_async_commit();
  }
  // This thread's copies of tile n have landed, and every thread's (two stages: every warp is
  // done with tile n - 1).
  if constexpr (kAsyncProxy) {
    tiles_landed_for_wgmma();
  } else {
    cp_async_wait<0>();
    __syncthreads();
  }
  if (kStages == 2 && n + 1 < count) {  // its buffer takes tile n + 1, under this one's math
    load(n + 1, stage ^ 1);
    cp_async_commit();
  }
  return stage;
}

// The one definition of a score (the CPU twin's score_tile): s = q·k · scale, then the mask
// and the top-left causal diagonal; -inf outside [0, lq) x [0, lk).
template <typename T>
__device__ __forceinline__ float masked_score(float qk, const AttentionMask& mask, float scale,
                                              bool is_causal, int64_t lq, int64_t lk, int64_t bi,
                                              int64_t h, int64_t i, int64_t j) {
  if (i >= lq || j >= lk) return -kInf;
  float s = qk * scale;
  if (mask.kind != MaskKind::kNone) {
    const int64_t mo = bi * mask.batch_stride + h * mask.head_stride + i * mask.row_stride +
                       j * mask.col_stride;
    if (mask.kind == MaskKind::kBool) {
      if (!static_cast<const bool*>(mask.ptr)[mo]) s = -kInf;
    } else {
      s += to_f(static_cast<const T*>(mask.ptr)[mo]);
    }
  }
  if (is_causal && j > i) s = -kInf;
  return s;
}

// Whether every score of a tile (query rows from i0, keys [j0, j0 + cols)) that can matter is
// just q·k · scale: no mask, every key in range, the tile wholly on or below the
// causal diagonal. Query rows past LQ need no check: their q rows are zero-filled, their
// outputs never stored, and the backward's P is 0 there (lse = +inf, load_row_stats). Interior
// tiles, all but the last key block and the causal diagonal's, skip masked_score's
// per-element 64-bit index math; the flag is block-uniform, so the branch never diverges.
template <typename P>
__device__ __forceinline__ bool tile_interior(const P& p, int64_t i0, int64_t j0, int cols) {
  return p.mask.kind == MaskKind::kNone && j0 + cols <= p.lk && (!p.is_causal || j0 + cols - 1 <= i0);
}

// Which (query head, query row) each row of a forward block is. Unpacked: the block's one head
// h, row r = query r (rows past LQ are padding: zero Q, never stored). Packed (kPack, GQA
// decoding, FlashAttention-3's PackGQA): the rows of a block are the (head of the group, query)
// pairs of one kv head, r = (head - h) · LQ + query with h the group's first head, so that the
// group's heads read each K and V tile once and a one-row query fills a tile with group rows;
// rows past group · LQ are padding (query LQ: out of range, never stored).
template <bool kPack>
struct QueryRows {
  static constexpr bool kPacked = kPack;
  int64_t h, lq, rows;  // the head (packed: the group's first), LQ, and the rows (packed: group · LQ)
  // Packed rows divide in 32 bits (a 64-bit division is a long subroutine): LQ <= 16 and
  // rows <= HQ · LQ (pack_gqa).
  __device__ __forceinline__ int64_t head(int64_t r) const {
    if constexpr (kPack) return h + int(min(r, rows - 1)) / int(lq);
    else return h;
  }
  __device__ __forceinline__ int64_t query(int64_t r) const {
    if constexpr (kPack) return r < rows ? int(r) % int(lq) : lq;
    else return r;
  }
};

// Rows [r0, r0 + kRows) of a packed block's queries into the shared Q tile (RowLayout), element
// by element (a decoding block's few rows come from group heads; zero past the rows and d).
template <typename T, int kRows, int kD, int kThreads>
__device__ __forceinline__ void load_packed_queries(T* dst, const AttentionFwdParams& p, int64_t bi,
                                                    const QueryRows<true>& qr, int64_t r0) {
  const T* q_batch = static_cast<const T*>(p.q) + bi * p.q_batch_stride;
  for (int idx = threadIdx.x; idx < kRows * kD; idx += kThreads) {
    const int r = idx / kD, c = idx % kD;
    const int64_t row = r0 + r;
    dst[RowLayout<T, kD>::offset(r, c)] =
        row < qr.rows && c < p.d ? q_batch[qr.head(row) * p.q_head_stride + qr.query(row) * p.q_row_stride + c]
                                 : from_f<T>(0.f);
  }
}

// Philox keep bit of score (bi, h, i, j) (csrc/philox.h), out of line: inlined into every
// element of the unrolled tiles it multiplied code size and compile time, and it only runs
// when dropout_p > 0.
__device__ __noinline__ bool keep_bit(const uint64_t seed, int64_t bi, int64_t h, int64_t i,
                                      int64_t j, int64_t hq, int64_t lq, int64_t lk, float p) {
  return dropout_keep(seed, bi, h, i, j, hq, lq, lk, p);
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// The units of the softmax exponent. Tensor-core path (16-bit storage): log2 units, as
// FlashAttention: a score enters as q·k · (scale · log2 e), one multiply, and a probability is
// exp2 of a difference (ex2.approx.ftz, about 2 ulp; results below 2^-126 flush to 0), where
// __expf(x) spends another multiply on x · log2 e before the same ex2. In the backward, with
// lse known ahead, the whole exponent is one FMA. fp32 storage keeps natural units and __expf
// (the extra rounding of the folded constant is within 16-bit tolerances, not fp32's).
template <typename T>
struct ExpUnits {
  static constexpr bool kLog2 = !std::is_same_v<T, float>;
  static constexpr float kPerNat = kLog2 ? 1.4426950408889634f : 1.f;  // units per nat
  static constexpr float kNatPer = kLog2 ? 0.6931471805599453f : 1.f;  // nats per unit
  __device__ __forceinline__ static float exp(float x) {
    if constexpr (kLog2) {
#if defined(FUSEDFORMER_CUDA_EMULATION)
      return exp2f(x);
#else
      float y;
      asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
      return y;
#endif
    } else {
      return __expf(x);
    }
  }
};

// Writes a warp's 16 x kD accumulator slab · mul[row] to rows [r0, r0 + 16) of a head.
template <typename T, int kD>
__device__ __forceinline__ void store_slab(const float (&acc)[kD / 8][4], const float (&mul)[2],
                                           T* dst, int64_t ld, int64_t r0, int64_t L, int64_t d,
                                           int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int nt = 0; nt < kD / 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t r = r0 + g + 8 * (e >> 1);
      const int c = nt * 8 + 2 * t + (e & 1);
      if (r < L && c < d) dst[r * ld + c] = from_f<T>(acc[nt][e] * mul[e >> 1]);
    }
}

// One key block of the forward's online softmax, for a warp's kMT m-tiles (query rows row0 +
// 16 · mt + g and + 8; keys from j0): the raw q·k scores s become scaled, masked scores in the
// exponent's units (interior tiles skip masked_score), the running max m and this lane's partial
// row sums l advance, alpha is the factor by which the output accumulators must be rescaled
// (rescale_rows) before this block's P V is added, and s leaves as the probabilities (after
// dropout) that multiply V. The 4 lanes of a quad share rows g and g + 8 of each m-tile.
// kSN: 8-column tiles of the score slab (kBN / 8). qr: the rows' heads and queries.
template <typename T, int kMT, int kSN, typename QR>
__device__ __forceinline__ void online_softmax_step(float (&s)[kMT][kSN][4], float (&alpha)[kMT][2],
                                                    float (&m)[kMT][2], float (&l)[kMT][2],
                                                    const AttentionFwdParams& p, bool interior, int64_t bi,
                                                    const QR& qr, int64_t row0, int64_t j0, int lane) {
  using U = ExpUnits<T>;
  constexpr int kBN = 8 * kSN;
  const int g = lane >> 2, t = lane & 3;
  const float scale_u = p.scale * U::kPerNat;
  const bool dropout = p.dropout_p > 0.f;
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int nt = 0; nt < kBN / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        s[mt][nt][e] = interior ? s[mt][nt][e] * scale_u
                                : U::kPerNat * masked_score<T>(s[mt][nt][e], p.mask, p.scale, p.is_causal, p.lq, p.lk,
                                                               bi, qr.head(row0 + 16 * mt + g + 8 * (e >> 1)),
                                                               qr.query(row0 + 16 * mt + g + 8 * (e >> 1)),
                                                               j0 + nt * 8 + 2 * t + (e & 1));
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -kInf;
#pragma unroll
      for (int nt = 0; nt < kBN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * r], s[mt][nt][2 * r + 1]));
      const float m_new = fmaxf(m[mt][r], quad_max(mx));
      const float m_use = m_new == -kInf ? 0.f : m_new;  // every key so far masked: p = 0
      alpha[mt][r] = U::exp(m[mt][r] - m_use);  // 0 when m = -inf
      m[mt][r] = m_new;
      l[mt][r] *= alpha[mt][r];  // this lane's partial row sum, reduced over the quad at the end
      const int64_t h = qr.head(row0 + 16 * mt + g + 8 * r), i = qr.query(row0 + 16 * mt + g + 8 * r);
#pragma unroll
      for (int nt = 0; nt < kBN / 8; ++nt)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const float pe = U::exp(s[mt][nt][2 * r + c] - m_use);
          l[mt][r] += pe;  // softmax's denominator: before dropout
          const int64_t j = j0 + nt * 8 + 2 * t + c;
          const bool keep = !dropout || (i < p.lq && j < p.lk &&
                                         keep_bit(p.seed, bi, h, i, j, p.hq, p.lq, p.lk, p.dropout_p));
          s[mt][nt][2 * r + c] = keep ? pe : 0.f;
        }
    }
}

// acc rows g and g + 8 of each m-tile times alpha (online_softmax_step).
template <int kMT, int kAN>
__device__ __forceinline__ void rescale_rows(float (&acc)[kMT][kAN][4], const float (&alpha)[kMT][2]) {
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int nt = 0; nt < kAN; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] *= alpha[mt][e >> 1];
}

// The forward's epilogue for a warp's kMT m-tiles: o = acc / l (· 1 / (1 - p) with dropout) and
// lse = m + log l in nats; a row whose every key was masked gets o = 0 and lse = -inf. With
// split-KV, split's o (fp32) and lse go to o_accum and lse_accum for attention_fwd_combine_kernel.
// qr: the rows' heads and queries (packed rows: store_packed_fwd_rows).
// store_fwd_rows for packed rows: each row's own head and query, element by element.
template <typename T, int kMT, int kAN>
__device__ __forceinline__ void store_packed_fwd_rows(const AttentionFwdParams& p, const float (&acc)[kMT][kAN][4],
                                                      const float (&m)[kMT][2], const float (&l)[kMT][2], int64_t bi,
                                                      const QueryRows<true>& qr, int64_t row0, int64_t split,
                                                      int lane) {
  const int g = lane >> 2, t = lane & 3;
  const float rp = p.dropout_p > 0.f ? 1.f / (1.f - p.dropout_p) : 1.f;
  const bool partial = p.num_splits > 1;
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float sum = quad_sum(l[mt][r]);  // every lane takes part in the shuffles
      const int64_t row = row0 + 16 * mt + g + 8 * r;
      if (row >= qr.rows) continue;
      const bool empty = m[mt][r] == -kInf;
      const float mul = empty ? 0.f : rp / sum;
      const int64_t h = qr.head(row), i = qr.query(row);
      const int64_t stat = ((split * p.b + bi) * p.hq + h) * p.lq + i;  // (split, bi, h, i) of the workspace
      if (t == 0)
        (partial ? p.lse_accum[stat] : p.lse[(bi * p.hq + h) * p.lq + i]) =
            empty ? -kInf : m[mt][r] * ExpUnits<T>::kNatPer + __logf(sum);
      T* o_row = static_cast<T*>(p.o) + bi * p.o_batch_stride + h * p.o_head_stride + i * p.o_row_stride;
#pragma unroll
      for (int nt = 0; nt < kAN; ++nt)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int col = nt * 8 + 2 * t + c;
          if (col >= p.d) continue;
          const float v = acc[mt][nt][2 * r + c] * mul;
          if (partial) p.o_accum[stat * p.d + col] = v;
          else o_row[col] = from_f<T>(v);
        }
    }
}

template <typename T, int kMT, int kAN, typename QR>
__device__ __forceinline__ void store_fwd_rows(const AttentionFwdParams& p, const float (&acc)[kMT][kAN][4],
                                               const float (&m)[kMT][2], const float (&l)[kMT][2], int64_t bi,
                                               const QR& qr, int64_t row0, int64_t split, int lane) {
  if constexpr (QR::kPacked) {
    store_packed_fwd_rows<T>(p, acc, m, l, bi, qr, row0, split, lane);
    return;
  }
  const int64_t h = qr.h;
  const int g = lane >> 2, t = lane & 3;
  const float rp = p.dropout_p > 0.f ? 1.f / (1.f - p.dropout_p) : 1.f;
  const bool partial = p.num_splits > 1;
  const int64_t head_row = ((split * p.b + bi) * p.hq + h) * p.lq;  // o_accum / lse_accum row 0 of (split, bi, h)
  T* o_head = static_cast<T*>(p.o) + bi * p.o_batch_stride + h * p.o_head_stride;
  float* lse_head = partial ? p.lse_accum + head_row : p.lse + (bi * p.hq + h) * p.lq;
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
    float mul[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float sum = quad_sum(l[mt][r]);
      const bool empty = m[mt][r] == -kInf;
      mul[r] = empty ? 0.f : rp / sum;
      const int64_t i = row0 + 16 * mt + g + 8 * r;
      if (t == 0 && i < p.lq) lse_head[i] = empty ? -kInf : m[mt][r] * ExpUnits<T>::kNatPer + __logf(sum);
    }
    if (partial)
      store_slab<float, 8 * kAN>(acc[mt], mul, p.o_accum + head_row * p.d, p.d, row0 + 16 * mt, p.lq, p.d, lane);
    else
      store_slab<T, 8 * kAN>(acc[mt], mul, o_head, p.o_row_stride, row0 + 16 * mt, p.lq, p.d, lane);
  }
}

// Split-KV's merge: one warp a query row (b, h, i) reads the row's num_splits partial lse and
// o (store_fwd_rows) and writes lse = log Σ_s exp(lse_s) and o = Σ_s exp(lse_s - lse) o_s, in
// one pass over the splits: weights w_s = exp(lse_s - max), one __expf a split, and the row's
// columns (lane + 32 x) summed in registers, divided by Σ_s w_s at the end (as the CPU's
// combine_splits). Splits with no key (lse_s = -inf) weigh 0; a row with none at all keeps
// o = 0, lse = -inf.
template <typename T>
__global__ void attention_fwd_combine_kernel(const AttentionFwdParams p) {
  constexpr int kWarps = 8, kCols = kAttentionMaxHeadDim / 32;  // columns a lane
  const int64_t rows = p.b * p.hq * p.lq, row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  float mx = -kInf;
  for (int64_t s = 0; s < p.num_splits; ++s) mx = fmaxf(mx, p.lse_accum[s * rows + row]);
  const bool empty = mx == -kInf;
  float sum = 0.f, o[kCols] = {};
  for (int64_t s = 0; s < p.num_splits && !empty; ++s) {
    const float w = __expf(p.lse_accum[s * rows + row] - mx);
    const float* o_s = p.o_accum + (s * rows + row) * p.d;
    sum += w;
#pragma unroll
    for (int x = 0; x < kCols; ++x)
      if (lane + 32 * x < p.d) o[x] += w * o_s[lane + 32 * x];
  }
  const float inv = empty ? 0.f : 1.f / sum;
  if (lane == 0) p.lse[row] = empty ? -kInf : mx + __logf(sum);
  const int64_t i = row % p.lq, h = row / p.lq % p.hq, bi = row / (p.lq * p.hq);
  T* o_row = static_cast<T*>(p.o) + bi * p.o_batch_stride + h * p.o_head_stride + i * p.o_row_stride;
#pragma unroll
  for (int x = 0; x < kCols; ++x)
    if (lane + 32 * x < p.d) o_row[lane + 32 * x] = from_f<T>(o[x] * inv);
}

// ---------------------------------------------------------------------------------------
// Forward

// kPack: the block's rows are a kv head's group of query heads (QueryRows; blockIdx.y is the
// kv head), for GQA decoding.
template <typename T, int kD, bool kPack = false>
__global__ void __launch_bounds__(Traits<T, kD>::kThreads)
    attention_fwd_kernel(const AttentionFwdParams p) {
  using Tr = Traits<T, kD>;
  constexpr int kBM = Tr::kFwdBlockM, kBN = Tr::kFwdBlockN, kS = Tr::kStride, kStages = Tr::kStages;
  constexpr int kMT = Tr::kFwdMTiles;  // 16-row m-tiles per warp
  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + kBM * kS;              // kStages tiles of kBN rows
  T* sV = sK + kStages * kBN * kS;    // the same
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* scratch = reinterpret_cast<float*>(sV + kStages * kBN * kS) + warp * Tr::kScratchWarpFloats;

  const int64_t qb = blockIdx.x / p.num_splits, split = blockIdx.x % p.num_splits;
  const int64_t bi = blockIdx.z, group = p.hq / p.hkv, hk = kPack ? blockIdx.y : blockIdx.y / group;
  const QueryRows<kPack> qr{kPack ? hk * group : int64_t(blockIdx.y), p.lq, kPack ? group * p.lq : p.lq};
  const int64_t i0 = qb * kBM;  // the block's first row (packed: of the group's rows)
  const T* k_head = static_cast<const T*>(p.k) + bi * p.k_batch_stride + hk * p.k_head_stride;
  const T* v_head = static_cast<const T*>(p.v) + bi * p.v_batch_stride + hk * p.v_head_stride;
  const auto load_block = kv_tile_loader<T, kD, kBN, Tr::kThreads>(p, k_head, v_head, sK, sV);
  // The key blocks and interior tiles of the block's queries: packed, every query 0 .. LQ - 1.
  const int64_t q0 = kPack ? 0 : i0;
  const KeyRange keys = split_key_blocks(p, q0, kPack ? int(p.lq) : kBM, kBN, split);
  const int64_t steps = keys.end - keys.begin;
  auto load_kv = [&](int64_t n, int stage) { load_block(keys.begin + n, stage); };  // step n's key block

  // This warp's query rows: row0 + 16 · mt + g (+ 8), mt < kMT.
  const int64_t row0 = i0 + warp * 16 * kMT;
  float acc[kMT][kD / 8][4] = {};
  float m[kMT][2], l[kMT][2];  // rows g and g + 8 of each m-tile
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) m[mt][0] = m[mt][1] = -kInf, l[mt][0] = l[mt][1] = 0.f;
  if constexpr (kPack) {
    load_packed_queries<T, kBM, kD, Tr::kThreads>(sQ, p, bi, qr, i0);
  } else {
    const T* q_head = static_cast<const T*>(p.q) + bi * p.q_batch_stride + qr.h * p.q_head_stride;
    load_tile<T, kBM, kD, Tr::kThreads>(sQ, q_head, p.q_row_stride, i0, p.lq, p.d,
                                        rows_16b_aligned(q_head, p.q_row_stride));
  }
  if (steps > 0) load_kv(0, 0);
  cp_async_commit();
  for (int64_t n = 0; n < steps; ++n) {
    const int64_t j0 = (keys.begin + n) * kBN;
    const int stage = pipeline_step<kStages>(n, steps, load_kv);
    const T* tK = sK + stage * kBN * kS;
    const T* tV = sV + stage * kBN * kS;

    float s[kMT][kBN / 8][4] = {};
    gemm_nt<T, kD, kBN, kS, kMT>(s, sQ + (row0 - i0) * kS, tK, lane);
    float alpha[kMT][2];
    online_softmax_step<T>(s, alpha, m, l, p, tile_interior(p, q0, j0, kBN), bi, qr, row0, j0, lane);
    rescale_rows(acc, alpha);
    gemm_rs_nn<T, kBN, kD, kS, kMT>(acc, s, tV, scratch, lane);
  }
  cp_async_wait<0>();  // none pending at exit (no step leaves Q's copies unwaited)

  store_fwd_rows<T>(p, acc, m, l, bi, qr, row0, split, lane);
}

// ---------------------------------------------------------------------------------------
// Forward on sm_90a: warpgroup MMA (16-bit, D = 64, 128 and 256)
//
// The same algorithm and per-warp row ownership as attention_fwd_kernel (each warp one 16-row
// m-tile, its scores and accumulators in the mma C layout, the same online_softmax_step and
// store_fwd_rows), with the two products issued per warpgroup as wgmma.mma_async m64n64k16:
//   S = Q Kᵀ   A: the warp's Q rows, loaded once into registers (ldmatrix; at D = 256 read by
//              the wgmma from the Q tile instead); B: the K tile, K-major (key rows, D
//              contiguous), one wgmma per 16 of D
//   O += P V   A: P from the score registers (as gemm_rs_nn packs it); B: the V tile, MN-major
//              (key rows, D contiguous), one wgmma per 16 keys and 64-column panel of D
// Neither operand is re-read by each warp from shared memory through ldmatrix, which is what
// bounds the mma.sync kernel on sm_90 (gemm_nt's comment); the warpgroup's tensor cores read
// the B tile once for 64 rows. Tiles are PanelLayout (the 128-byte swizzle of sw128_desc), on
// 1024-byte boundaries of the shared window, double-buffered through cp.async, K one block
// ahead of V. The softmax of block kb runs while the tensor cores add block kb - 1's P V
// (FlashAttention-3's intra-warpgroup overlap; see the loop). Not yet: TMA loads and warp
// specialization (a producer warp with mbarriers instead of the one block-wide barrier a step,
// which keeps the two warpgroups in step; their ping-pong scheduling). Compiled for sm_90a only
// (a trap elsewhere); launched where binary_is_sm90.
template <typename T, int kD>
struct WgmmaFwd {
  static constexpr bool kSupported = !std::is_same_v<T, float> && (kD == 64 || kD == 128 || kD == 256);
  // Q as register A fragments (D / 4 registers a thread) up to D = 128; at D = 256 the O
  // accumulators alone are 128 registers, so Q stays in shared memory (S = Q Kᵀ as _ss).
  static constexpr bool kQInRegisters = kD <= 128;
  static constexpr int kWarpgroups = 2;
  static constexpr int kThreads = 128 * kWarpgroups;
  static constexpr int kBM = 64 * kWarpgroups;  // query rows of a block
  static constexpr int kBN = 64;                // keys per tile: one wgmma N
  static constexpr int kStages = 2;             // K and V tiles in flight
  // Q, then kStages K and V tiles, plus up to 1008 bytes to reach a 1024-byte boundary; at
  // D = 256, 193 KiB: sm_90's 227 KiB a block allows it (the kernel runs only there).
  static constexpr int kSmem = (kBM + 2 * kStages * kBN) * kD * int(sizeof(T)) + 1024;
  static_assert(kBN * kD * int(sizeof(T)) % 1024 == 0, "every tile and panel on a 1024-byte boundary");
  static_assert(!kSupported || kSmem <= 227 * 1024, "over sm_90's shared memory per block");
};

// Descriptor of k-step kk (16 columns of D) of the 64 rows from `row` of a PanelLayout tile of
// kRows rows, as a K-major wgmma operand: panel kk / 4, 32 bytes a k-step into its rows.
template <int kRows, typename T>
__device__ __forceinline__ uint64_t panel_k_desc(const T* tile, int row, int kk) {
  return sw128_desc(tile + (kk / 4) * kRows * 64 + row * 64 + (kk % 4) * 16, 16);
}

// The 16-bit A fragments of a product whose A is a warp's 16 x (8 · kSN) accumulator slab
// (gemm_rs_nn's packing: fragment kc holds columns 16kc .. 16kc + 15).
template <typename T, int kSN>
__device__ __forceinline__ void pack_a_fragments(const float (&s)[kSN][4], uint32_t (&a)[kSN / 2][4]) {
#pragma unroll
  for (int kc = 0; kc < kSN / 2; ++kc) {
    a[kc][0] = pack2<T>(s[2 * kc][0], s[2 * kc][1]);
    a[kc][1] = pack2<T>(s[2 * kc][2], s[2 * kc][3]);
    a[kc][2] = pack2<T>(s[2 * kc + 1][0], s[2 * kc + 1][1]);
    a[kc][3] = pack2<T>(s[2 * kc + 1][2], s[2 * kc + 1][3]);
  }
}

// acc(64 x kD) += A(64 x kK) · B for a warpgroup, A in registers (pack_a_fragments), B a
// PanelLayout tile of kK rows (k) and kD columns, as the MN-major wgmma operand: keys 16kc ..
// of panel pn start 16kc rows (2 KiB) into it, panels kK rows apart (the LBO). One wgmma per
// 16 rows of B and 64 columns; the caller fences, commits and waits.
template <typename T, int kK, int kD>
__device__ __forceinline__ void wgmma_acc_rs_mn(float (&acc)[kD / 8][4], const uint32_t (&a)[kK / 16][4], const T* B) {
#pragma unroll
  for (int kc = 0; kc < kK / 16; ++kc)
#pragma unroll
    for (int pn = 0; pn < kD / 64; ++pn)
      wgmma_m64n64k16_rs<T, true>(*reinterpret_cast<float(*)[8][4]>(&acc[8 * pn]), a[kc],
                                  sw128_desc(B + pn * kK * 64 + kc * 16 * 64, kK * 128), true);
}

template <typename T, int kD>
__global__ void __launch_bounds__(WgmmaFwd<T, kD>::kThreads, 1)
    attention_fwd_wgmma_kernel(const AttentionFwdParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || defined(FUSEDFORMER_CUDA_EMULATION)
  using C = WgmmaFwd<T, kD>;
  static_assert(C::kSupported, "16-bit, D = 64, 128 or 256");
  constexpr int kBM = C::kBM, kBN = C::kBN, kStages = C::kStages;
  using QLayout = PanelLayout<T, kBM>;
  using KVLayout = PanelLayout<T, kBN>;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = sw128_base<T>(smem);
  T* sK = sQ + kBM * kD;             // kStages tiles of kBN rows
  T* sV = sK + kStages * kBN * kD;   // the same
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  const int64_t qb = blockIdx.x / p.num_splits, split = blockIdx.x % p.num_splits;
  const int64_t h = blockIdx.y, bi = blockIdx.z, hk = h / (p.hq / p.hkv);
  const QueryRows<false> qr{h, p.lq, p.lq};
  const int64_t i0 = qb * kBM;
  const T* q_head = static_cast<const T*>(p.q) + bi * p.q_batch_stride + h * p.q_head_stride;
  const T* k_head = static_cast<const T*>(p.k) + bi * p.k_batch_stride + hk * p.k_head_stride;
  const T* v_head = static_cast<const T*>(p.v) + bi * p.v_batch_stride + hk * p.v_head_stride;
  const bool k_vec = rows_16b_aligned(k_head, p.k_row_stride), v_vec = rows_16b_aligned(v_head, p.v_row_stride);
  auto k_tile = [&](int64_t kb) { return sK + int(kb % kStages) * kBN * kD; };
  auto v_tile = [&](int64_t kb) { return sV + int(kb % kStages) * kBN * kD; };
  auto load_k = [&](int64_t kb) {
    load_tile<T, kBN, kD, C::kThreads, KVLayout>(k_tile(kb), k_head, p.k_row_stride, kb * kBN, p.lk, p.d, k_vec);
  };
  auto load_v = [&](int64_t kb) {
    load_tile<T, kBN, kD, C::kThreads, KVLayout>(v_tile(kb), v_head, p.v_row_stride, kb * kBN, p.lk, p.d, v_vec);
  };

  // This warp's query rows: row0 + g (+ 8); warpgroup w's wgmma rows 16v .. are warp 4w + v's.
  // Key blocks kb0 .. kb1 - 1 (all of the query block's, or split's range); the K and V buffers
  // of block kb are kb % kStages.
  const int64_t row0 = i0 + 16 * warp;
  const KeyRange keys = split_key_blocks(p, i0, kBM, kBN, split);
  const int64_t kb0 = keys.begin, kb1 = keys.end;
  load_tile<T, kBM, kD, C::kThreads, QLayout>(sQ, q_head, p.q_row_stride, i0, p.lq, p.d,
                                              rows_16b_aligned(q_head, p.q_row_stride));
  if (kb1 > kb0) load_k(kb0);
  cp_async_commit();
  tiles_landed_for_wgmma();
  if (kb1 > kb0 + 1) load_k(kb0 + 1);
  if (kb1 > kb0) load_v(kb0);
  cp_async_commit();
  // The warp's Q rows as A fragments, one per 16 of D (gemm_nt's rows), when they fit.
  uint32_t q[C::kQInRegisters ? kD / 16 : 1][4];
  if constexpr (C::kQInRegisters) {
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk)
      ldmatrix_x4(q[kk], sQ + QLayout::offset(16 * warp + (lane & 15), 16 * kk + 8 * (lane >> 4)));
  }
  // S = Q Kᵀ for key block kb, issued (not committed): k-step kk reads D columns 16kk .. of
  // every key row (panel_k_desc).
  auto issue_scores = [&](float (&s)[kBN / 8][4], int64_t kb) {
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      if constexpr (C::kQInRegisters)
        wgmma_m64n64k16_rs<T, false>(s, q[kk], panel_k_desc<kBN>(k_tile(kb), 0, kk), kk > 0);
      else
        wgmma_m64n64k16_ss<T>(s, panel_k_desc<kBM>(sQ, 64 * (warp / 4), kk), panel_k_desc<kBN>(k_tile(kb), 0, kk),
                              kk > 0);
    }
  };

  // The loop is software-pipelined as FlashAttention-3's intra-warpgroup overlap: step kb issues
  // S_kb = Q K_kbᵀ and O += P_{kb-1} V_{kb-1} together, waits for S_kb only, and runs the softmax
  // of block kb while the tensor cores add the previous block's P V; O is rescaled once that
  // product has landed. K runs one block ahead of V: step kb refills the K buffer of block kb - 1
  // and the V buffer of block kb - 2, both released by step kb - 1's waits before the barrier.
  float acc[1][kD / 8][4] = {};
  float m[1][2] = {{-kInf, -kInf}}, l[1][2] = {{0.f, 0.f}}, alpha[1][2];
  uint32_t pa[kBN / 16][4];  // P of the previous block as A fragments (packed before its batch)
  if (kb1 > kb0) {
    float s[1][kBN / 8][4];
    wgmma_sync_batch([&] { issue_scores(s[0], kb0); }, s[0]);
    online_softmax_step<T>(s, alpha, m, l, p, tile_interior(p, i0, kb0 * kBN, kBN), bi, qr, row0, kb0 * kBN, lane);
    pack_a_fragments<T>(s[0], pa);
  }
  for (int64_t kb = kb0 + 1; kb < kb1; ++kb) {
    const int64_t j0 = kb * kBN;
    tiles_landed_for_wgmma();  // K_kb and V_{kb-1}
    if (kb + 1 < kb1) load_k(kb + 1);
    load_v(kb);
    cp_async_commit();

    float s[1][kBN / 8][4];
    wgmma_fence_operands(s[0]);
    wgmma_fence_operands(acc[0]);
    wgmma_fence();
    issue_scores(s[0], kb);
    wgmma_commit();
    wgmma_acc_rs_mn<T, kBN, kD>(acc[0], pa, v_tile(kb - 1));
    wgmma_commit();
    wgmma_wait<1>();  // S_kb; the P V of block kb - 1 may still run
    wgmma_fence_operands(s[0]);
    online_softmax_step<T>(s, alpha, m, l, p, tile_interior(p, i0, j0, kBN), bi, qr, row0, j0, lane);
    wgmma_wait<0>();
    wgmma_fence_operands(acc[0]);
    rescale_rows(acc, alpha);
    pack_a_fragments<T>(s[0], pa);
  }
  if (kb1 > kb0) {  // the last block's P V
    tiles_landed_for_wgmma();  // V_{kb1-1}
    wgmma_sync_batch([&] { wgmma_acc_rs_mn<T, kBN, kD>(acc[0], pa, v_tile(kb1 - 1)); }, acc[0]);
  }
  cp_async_wait<0>();  // none pending at exit

  store_fwd_rows<T>(p, acc, m, l, bi, qr, row0, split, lane);
#else
  __trap();  // launched only where the binary is sm_90a code
#endif
}

// ---------------------------------------------------------------------------------------
// Backward

// Delta_i = Σ_d dO_id O_id: one warp per row of (B, HQ, LQ).
template <typename T>
__global__ void attention_bwd_delta_kernel(const AttentionBwdParams p) {
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= p.b * p.hq * p.lq) return;
  const int64_t bi = row / (p.hq * p.lq), h = row / p.lq % p.hq, i = row % p.lq;
  const T* o = static_cast<const T*>(p.o) + bi * p.o_batch_stride + h * p.o_head_stride + i * p.o_row_stride;
  const T* g = static_cast<const T*>(p.do_) + bi * p.do_batch_stride + h * p.do_head_stride + i * p.do_row_stride;
  float s = 0.f;
  for (int64_t e = lane; e < p.d; e += 32) s += to_f(o[e]) * to_f(g[e]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  if (lane == 0) p.delta[row] = s;
}

// lse and Delta of rows [r0, r0 + n) into shared memory. P = exp(s - lse) must be 0 on a fully
// masked row (lse = -inf) and on rows past LQ: both get lse = +inf (and Delta = 0).
template <typename T, int kRows, int kThreads>
__device__ __forceinline__ void load_row_stats(float* s_lse, float* s_delta, const AttentionBwdParams& p,
                                               int64_t bi, int64_t h, int64_t r0) {
  for (int r = threadIdx.x; r < kRows; r += kThreads) {
    const int64_t i = r0 + r, row = (bi * p.hq + h) * p.lq + i;
    const float lse = i < p.lq ? p.lse[row] : -kInf;
    s_lse[r] = lse == -kInf ? kInf : lse * ExpUnits<T>::kPerNat;  // in the exponent's units
    s_delta[r] = i < p.lq ? p.delta[row] : 0.f;
  }
}

// dK/dV's element-wise step on a warp's kMT slabs of Sᵀ and dPᵀ (raw k·q and v·dO; rows are
// keys row0 + 16 · mt + g (+ 8), columns the queries i0 + c of the tile, whose lse and Delta are
// t_lse[c], t_delta[c]): st becomes Pdᵀ (P after dropout and its 1 / (1 - p)), dpt becomes dSᵀ =
// P ∘ (dPd - Delta). P = exp(s - lse) is one FMA and an ex2 (ExpUnits).
template <typename T, int kMT, int kSN>
__device__ __forceinline__ void dkdv_tile_step(float (&st)[kMT][kSN][4], float (&dpt)[kMT][kSN][4],
                                               const AttentionBwdParams& p, bool interior, const float* t_lse,
                                               const float* t_delta, int64_t bi, int64_t h, int64_t i0,
                                               int64_t row0, int lane) {
  using U = ExpUnits<T>;
  const int g = lane >> 2, t = lane & 3;
  const float scale_u = p.scale * U::kPerNat;
  const bool dropout = p.dropout_p > 0.f;
  const float rp = dropout ? 1.f / (1.f - p.dropout_p) : 1.f;
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int nt = 0; nt < kSN; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = nt * 8 + 2 * t + (e & 1);  // query row within the tile
        const int64_t i = i0 + c, j = row0 + 16 * mt + g + 8 * (e >> 1);
        const float pe = U::exp(
            interior ? fmaf(st[mt][nt][e], scale_u, -t_lse[c])
                     : fmaf(masked_score<T>(st[mt][nt][e], p.mask, p.scale, p.is_causal, p.lq, p.lk, bi, h, i, j),
                            U::kPerNat, -t_lse[c]));
        const bool keep = !dropout || (i < p.lq && j < p.lk &&
                                       keep_bit(p.seed, bi, h, i, j, p.hq, p.lq, p.lk, p.dropout_p));
        st[mt][nt][e] = keep ? pe * rp : 0.f;                                       // Pdᵀ
        dpt[mt][nt][e] = pe * ((keep ? dpt[mt][nt][e] * rp : 0.f) - t_delta[c]);  // dSᵀ
      }
}

// dQ's element-wise step on a warp's kMT slabs of S and dP (raw q·k and dO·v; rows are queries
// row0 + 16 · mt + g (+ 8) of the block that starts at i0, whose lse and Delta are s_lse[r],
// s_delta[r] at r = row - i0; columns the keys j0 + c): s becomes dS = P ∘ (dPd - Delta).
template <typename T, int kMT, int kSN>
__device__ __forceinline__ void dq_tile_step(float (&s)[kMT][kSN][4], const float (&dp)[kMT][kSN][4],
                                             const AttentionBwdParams& p, bool interior, const float* s_lse,
                                             const float* s_delta, int64_t bi, int64_t h, int64_t i0, int64_t row0,
                                             int64_t j0, int lane) {
  using U = ExpUnits<T>;
  const int g = lane >> 2, t = lane & 3;
  const float scale_u = p.scale * U::kPerNat;
  const bool dropout = p.dropout_p > 0.f;
  const float rp = dropout ? 1.f / (1.f - p.dropout_p) : 1.f;
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int nt = 0; nt < kSN; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = int(row0 - i0) + 16 * mt + g + 8 * (e >> 1);  // query row within the block
        const int64_t i = i0 + r, j = j0 + nt * 8 + 2 * t + (e & 1);
        const float pe =
            U::exp(interior ? fmaf(s[mt][nt][e], scale_u, -s_lse[r])
                            : fmaf(masked_score<T>(s[mt][nt][e], p.mask, p.scale, p.is_causal, p.lq, p.lk, bi, h, i, j),
                                   U::kPerNat, -s_lse[r]));
        const bool keep = !dropout || (i < p.lq && j < p.lk &&
                                       keep_bit(p.seed, bi, h, i, j, p.hq, p.lq, p.lk, p.dropout_p));
        s[mt][nt][e] = pe * ((keep ? dp[mt][nt][e] * rp : 0.f) - s_delta[r]);  // dS
      }
}

// The dK/dV loop of one key block (keys from j0): one pass over (query head of the group,
// query block of kBM rows), step n being head head(n) and rows from row(n), so the next step's
// tiles can be prefetched across heads too. Causal: query rows below j0 see no key here.
struct DkdvSchedule {
  int64_t hk, group, qb_begin, nq, steps, bm;
  __device__ DkdvSchedule(const AttentionBwdParams& p, int64_t hk_, int64_t j0, int kBM)
      : hk(hk_), group(p.hq / p.hkv), qb_begin(p.is_causal ? j0 / kBM : 0), bm(kBM) {
    const int64_t nqb = ceil_div(p.lq, kBM);
    nq = nqb > qb_begin ? nqb - qb_begin : 0;
    steps = group * nq;
  }
  __device__ int64_t head(int64_t n) const { return hk * group + n / nq; }
  __device__ int64_t row(int64_t n) const { return (qb_begin + n % nq) * bm; }
};

// The dK/dV loop's loads: load(n, stage) fills buffer `stage` of sQ and sdO (kBM rows each, laid
// out by Layout) and of the lse / Delta rows with step n's query tile.
template <typename T, int kD, int kBM, int kThreads, typename Layout = RowLayout<T, kD>>
__device__ __forceinline__ auto query_tile_loader(const AttentionBwdParams& p, const DkdvSchedule& sched, int64_t bi,
                                                  T* sQ, T* sdO, float* s_lse, float* s_delta) {
  constexpr int kS = Traits<T, kD>::kStride;
  return [=, &p](int64_t n, int stage) {
    const int64_t h = sched.head(n), i0 = sched.row(n);
    const T* q_head = static_cast<const T*>(p.q) + bi * p.q_batch_stride + h * p.q_head_stride;
    const T* do_head = static_cast<const T*>(p.do_) + bi * p.do_batch_stride + h * p.do_head_stride;
    load_tile<T, kBM, kD, kThreads, Layout>(sQ + stage * kBM * kS, q_head, p.q_row_stride, i0, p.lq, p.d,
                                            rows_16b_aligned(q_head, p.q_row_stride));
    load_tile<T, kBM, kD, kThreads, Layout>(sdO + stage * kBM * kS, do_head, p.do_row_stride, i0, p.lq, p.d,
                                            rows_16b_aligned(do_head, p.do_row_stride));
    load_row_stats<T, kBM, kThreads>(s_lse + stage * kBM, s_delta + stage * kBM, p, bi, h, i0);
  };
}

// dK (· scale) and dV of a warp's kMT m-tiles of keys (rows row0 + 16 · mt + g, + 8), columns
// col0 .. col0 + 8 · kAN (the D-split kernel's warps each hold one part of the row).
template <typename T, int kMT, int kAN>
__device__ __forceinline__ void store_dkdv_rows(const AttentionBwdParams& p, const float (&dk)[kMT][kAN][4],
                                                const float (&dv)[kMT][kAN][4], int64_t bi, int64_t hk, int64_t row0,
                                                int lane, int col0 = 0) {
  const float mul_dk[2] = {p.scale, p.scale}, mul_dv[2] = {1.f, 1.f};
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
    store_slab<T, 8 * kAN>(dk[mt], mul_dk,
                           static_cast<T*>(p.dk) + bi * p.dk_batch_stride + hk * p.dk_head_stride + col0,
                           p.dk_row_stride, row0 + 16 * mt, p.lk, p.d - col0, lane);
    store_slab<T, 8 * kAN>(dv[mt], mul_dv,
                           static_cast<T*>(p.dv) + bi * p.dv_batch_stride + hk * p.dv_head_stride + col0,
                           p.dv_row_stride, row0 + 16 * mt, p.lk, p.d - col0, lane);
  }
}

// The D-split dK/dV kernel's exchange: each warp of a pair holds a partial slab of Sᵀ (or dPᵀ),
// summed over its columns of the head dim, and both leave with the whole sum. A warp's slot
// holds one float per (element, lane), so its stores and its partner's loads are conflict-free.
// Both add the same two partials (a + b == b + a in IEEE arithmetic), so the pair agrees on
// every bit of P and dS. A barrier must separate the publishing from the adding.
template <int kMT, int kSN>
__device__ __forceinline__ void publish_partial(const float (&slab)[kMT][kSN][4], float* mine, int lane) {
#pragma unroll
  for (int i = 0; i < kMT * kSN * 4; ++i) mine[i * 32 + lane] = slab[i / (kSN * 4)][i / 4 % kSN][i % 4];
}
template <int kMT, int kSN>
__device__ __forceinline__ void add_partner_partial(float (&slab)[kMT][kSN][4], const float* theirs, int lane) {
#pragma unroll
  for (int i = 0; i < kMT * kSN * 4; ++i) slab[i / (kSN * 4)][i / 4 % kSN][i % 4] += theirs[i * 32 + lane];
}

// dQ (· scale) of a warp's kMT m-tiles of queries (rows row0 + 16 · mt + g, + 8).
template <typename T, int kMT, int kAN>
__device__ __forceinline__ void store_dq_rows(const AttentionBwdParams& p, const float (&dq)[kMT][kAN][4], int64_t bi,
                                              int64_t h, int64_t row0, int lane) {
  const float mul[2] = {p.scale, p.scale};
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
    store_slab<T, 8 * kAN>(dq[mt], mul, static_cast<T*>(p.dq) + bi * p.dq_batch_stride + h * p.dq_head_stride,
                           p.dq_row_stride, row0 + 16 * mt, p.lq, p.d, lane);
}

// dK, dV of one key block: rows of the warp slabs are keys, columns queries (Sᵀ, dPᵀ). With
// kDkdvSplit = 2 (D = 256), warps 2w and 2w + 1 share key m-tile w, each with half of the
// head dim's columns of dK and dV (Traits).
template <typename T, int kD>
__global__ void __launch_bounds__(Traits<T, kD>::kDkdvThreads)
    attention_bwd_dkdv_kernel(const AttentionBwdParams p) {
  using Tr = Traits<T, kD>;
  constexpr int kBN = Tr::kBwdBlockN, kBM = Tr::kBwdBlockM, kS = Tr::kStride, kStages = Tr::kStages;
  constexpr int kMT = Tr::kBwdMTiles;  // 16-row m-tiles (of keys) per warp
  constexpr int kSplit = Tr::kDkdvSplit, kDW = kD / kSplit;  // a warp's columns of dK and dV
  constexpr int kThreads = Tr::kDkdvThreads;
  constexpr int kSlab = kMT * (kBM / 8) * 4;  // floats of a warp's Sᵀ (and dPᵀ) slabs, per lane
  extern __shared__ __align__(16) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + kBN * kS;
  T* sQ = sV + kBN * kS;                                     // kStages tiles of kBM rows
  T* sdO = sQ + kStages * kBM * kS;                          // the same
  float* s_lse = reinterpret_cast<float*>(sdO + kStages * kBM * kS);  // kStages x kBM
  float* s_delta = s_lse + kStages * kBM;                              // kStages x kBM
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* scratch = s_delta + kStages * kBM + warp * Tr::kScratchWarpFloats;
  // kSplit = 2: two slots (Sᵀ, dPᵀ) of kSlab x 32 floats per warp, after the scratch.
  float* exchange = s_delta + kStages * kBM + (Tr::kScratchBytes * kSplit) / 4;
  const int part = warp % kSplit;  // which kDW columns of the head dim this warp holds

  const int64_t kb = blockIdx.x, hk = blockIdx.y, bi = blockIdx.z;
  const int64_t j0 = kb * kBN;
  const T* k_head = static_cast<const T*>(p.k) + bi * p.k_batch_stride + hk * p.k_head_stride;
  const T* v_head = static_cast<const T*>(p.v) + bi * p.v_batch_stride + hk * p.v_head_stride;
  load_tile<T, kBN, kD, kThreads>(sK, k_head, p.k_row_stride, j0, p.lk, p.d,
                                  rows_16b_aligned(k_head, p.k_row_stride));
  load_tile<T, kBN, kD, kThreads>(sV, v_head, p.v_row_stride, j0, p.lk, p.d,
                                  rows_16b_aligned(v_head, p.v_row_stride));

  const DkdvSchedule sched(p, hk, j0, kBM);
  const auto load_q = query_tile_loader<T, kD, kBM, kThreads>(p, sched, bi, sQ, sdO, s_lse, s_delta);

  // This warp's key rows: row0 + 16 · mt + g (+ 8), mt < kMT.
  const int64_t row0 = j0 + (warp / kSplit) * 16 * kMT;
  float dk[kMT][kDW / 8][4] = {}, dv[kMT][kDW / 8][4] = {};
  if (sched.steps > 0) load_q(0, 0);
  cp_async_commit();
  for (int64_t n = 0; n < sched.steps; ++n) {
    const int64_t h = sched.head(n), i0 = sched.row(n);
    const int stage = pipeline_step<kStages>(n, sched.steps, load_q);
    const T* tQ = sQ + stage * kBM * kS + part * kDW;
    const T* tdO = sdO + stage * kBM * kS + part * kDW;
    const float* t_lse = s_lse + stage * kBM;
    const float* t_delta = s_delta + stage * kBM;

    float st[kMT][kBM / 8][4] = {}, dpt[kMT][kBM / 8][4] = {};
    gemm_nt<T, kDW, kBM, kS, kMT>(st, sK + (row0 - j0) * kS + part * kDW, tQ, lane);    // Sᵀ = K Qᵀ
    gemm_nt<T, kDW, kBM, kS, kMT>(dpt, sV + (row0 - j0) * kS + part * kDW, tdO, lane);  // dPᵀ = V dOᵀ
    if constexpr (kSplit == 2) {  // each of the pair has its half's partial sums: add the other's
      float* mine = exchange + warp * 2 * kSlab * 32;
      const float* theirs = exchange + (warp ^ 1) * 2 * kSlab * 32;
      publish_partial(st, mine, lane);
      publish_partial(dpt, mine + kSlab * 32, lane);
      __syncthreads();  // the next step's publishing waits for its pipeline_step's barrier
      add_partner_partial(st, theirs, lane);
      add_partner_partial(dpt, theirs + kSlab * 32, lane);
    }
    dkdv_tile_step<T>(st, dpt, p, tile_interior(p, i0, j0, kBN), t_lse, t_delta, bi, h, i0, row0, lane);
    gemm_rs_nn<T, kBM, kDW, kS, kMT>(dv, st, tdO, scratch, lane);  // dV += Pdᵀ dO
    gemm_rs_nn<T, kBM, kDW, kS, kMT>(dk, dpt, tQ, scratch, lane);  // dK += dSᵀ Q
  }
  cp_async_wait<0>();  // none pending at exit (steps = 0 leaves K's and V's copies unwaited)
  store_dkdv_rows<T>(p, dk, dv, bi, hk, row0, lane, part * kDW);
}

// dQ of one query block: loops over the key blocks it reads (as the forward).
template <typename T, int kD>
__global__ void __launch_bounds__(Traits<T, kD>::kThreads)
    attention_bwd_dq_kernel(const AttentionBwdParams p) {
  using Tr = Traits<T, kD>;
  constexpr int kBM = Tr::kBlockM, kBN = Tr::kBlockN, kS = Tr::kStride, kStages = Tr::kStages;
  constexpr int kMT = Tr::kDqMTiles;  // 16-row m-tiles per warp
  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sdO = sQ + kBM * kS;
  T* sK = sdO + kBM * kS;            // kStages tiles of kBN rows
  T* sV = sK + kStages * kBN * kS;   // the same
  float* s_lse = reinterpret_cast<float*>(sV + kStages * kBN * kS);
  float* s_delta = s_lse + kBM;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* scratch = s_delta + kBM + warp * Tr::kScratchWarpFloats;

  const int64_t qb = blockIdx.x, h = blockIdx.y, bi = blockIdx.z, hk = h / (p.hq / p.hkv);
  const int64_t i0 = qb * kBM;
  const T* q_head = static_cast<const T*>(p.q) + bi * p.q_batch_stride + h * p.q_head_stride;
  const T* do_head = static_cast<const T*>(p.do_) + bi * p.do_batch_stride + h * p.do_head_stride;
  const T* k_head = static_cast<const T*>(p.k) + bi * p.k_batch_stride + hk * p.k_head_stride;
  const T* v_head = static_cast<const T*>(p.v) + bi * p.v_batch_stride + hk * p.v_head_stride;
  const auto load_kv = kv_tile_loader<T, kD, kBN, Tr::kThreads>(p, k_head, v_head, sK, sV);

  // This warp's query rows: row0 + 16 · mt + g (+ 8), mt < kMT.
  const int64_t row0 = i0 + warp * 16 * kMT;
  float dq[kMT][kD / 8][4] = {};
  const int64_t kb_end = key_blocks_end(p, i0, kBM, kBN);
  load_tile<T, kBM, kD, Tr::kThreads>(sQ, q_head, p.q_row_stride, i0, p.lq, p.d,
                                          rows_16b_aligned(q_head, p.q_row_stride));
  load_tile<T, kBM, kD, Tr::kThreads>(sdO, do_head, p.do_row_stride, i0, p.lq, p.d,
                                          rows_16b_aligned(do_head, p.do_row_stride));
  load_row_stats<T, kBM, Tr::kThreads>(s_lse, s_delta, p, bi, h, i0);
  if (kb_end > 0) load_kv(0, 0);
  cp_async_commit();
  for (int64_t kb = 0; kb < kb_end; ++kb) {
    const int64_t j0 = kb * kBN;
    const int stage = pipeline_step<kStages>(kb, kb_end, load_kv);
    const T* tK = sK + stage * kBN * kS;
    const T* tV = sV + stage * kBN * kS;

    float s[kMT][kBN / 8][4] = {}, dp[kMT][kBN / 8][4] = {};
    gemm_nt<T, kD, kBN, kS, kMT>(s, sQ + (row0 - i0) * kS, tK, lane);    // S = Q Kᵀ
    gemm_nt<T, kD, kBN, kS, kMT>(dp, sdO + (row0 - i0) * kS, tV, lane);  // dP = dO Vᵀ
    dq_tile_step<T>(s, dp, p, tile_interior(p, i0, j0, kBN), s_lse, s_delta, bi, h, i0, row0, j0, lane);
    gemm_rs_nn<T, kBN, kD, kS, kMT>(dq, s, tK, scratch, lane);  // dQ += dS K
  }
  cp_async_wait<0>();  // none pending at exit (kb_end = 0 leaves Q's and dO's copies unwaited)
  store_dq_rows<T>(p, dq, bi, h, row0, lane);
}

// ---------------------------------------------------------------------------------------
// Backward on sm_90a: warpgroup MMA (16-bit, D = 64 and 128)
//
// The dK/dV and dQ kernels above with their products as wgmma, in the forward's style: each
// warp owns one 16-row m-tile of the block (keys in dK/dV, queries in dQ), a warpgroup 64.
//   dK/dV, 128 keys a block, query tiles of 64:  Sᵀ = K Qᵀ, dPᵀ = V dOᵀ  (A = the warpgroup's K
//          or V rows and B = the Q or dO tile, both K-major in shared memory: _ss), then
//          dV += Pdᵀ dO, dK += dSᵀ Q  (A from the registers, B = the dO or Q tile, MN-major)
//   dQ, 128 queries a block, key tiles of 64:    S = Q Kᵀ, dP = dO Vᵀ (_ss), dQ += dS K (_rs,
//          B = the K tile, MN-major)
// The element-wise steps are the mma.sync kernels' (dkdv_tile_step, dq_tile_step), so masks,
// causal, dropout and fully masked rows behave identically. Compiled for sm_90a only.
template <typename T, int kD>
struct WgmmaBwd {
  // D = 256 stays on the mma.sync kernels: dK and dV alone would be 256 registers a thread.
  static constexpr bool kSupported = !std::is_same_v<T, float> && (kD == 64 || kD == 128);
  static constexpr int kThreads = 256;  // two warpgroups
  static constexpr int kRows = 128;     // keys of a dK/dV block, queries of a dQ block
  static constexpr int kTile = 64;      // queries (dK/dV) or keys (dQ) a loop step
  static constexpr int kStages = 2;
  static constexpr int kTileBytes = kD * int(sizeof(T));  // one tile row
  // dK/dV keeps three Q / dO tile pairs (the previous step's in its dV and dK products, the
  // current one's in Sᵀ and dPᵀ, the next one loading: attention_bwd_dkdv_wgmma_kernel).
  static constexpr int kDkdvStages = 3;
  // Two kRows tiles, kDkdvStages pairs of kTile tiles, their row stats, the alignment slack.
  static constexpr int kDkdvSmem =
      (2 * kRows + 2 * kDkdvStages * kTile) * kTileBytes + 2 * kDkdvStages * kTile * 4 + 1024;
  // dQ keeps three K tiles (the previous block's in its dS K, the current one's in S, the next
  // one loading) and two V tiles (attention_bwd_dq_wgmma_kernel's pipeline).
  static constexpr int kDqKStages = 3;
  static constexpr int kDqSmem =
      (2 * kRows + (kDqKStages + kStages) * kTile) * kTileBytes + 2 * kRows * 4 + 1024;
  static_assert(kTile * kTileBytes % 1024 == 0, "every tile and panel on a 1024-byte boundary");
};

// x = A1 B1ᵀ and y = A2 B2ᵀ (64 x 64 each) for a warpgroup, issued (the caller fences and
// commits): A1, A2 PanelLayout tiles of kRowsA rows (the warpgroup's 64 from a_row), B1, B2 of
// 64 rows, kD columns, all K-major (_ss). The backward's two score products.
template <typename T, int kD, int kRowsA, int kRowsB>
__device__ __forceinline__ void issue_nt_pair(float (&x)[8][4], const T* A1, const T* B1, float (&y)[8][4],
                                              const T* A2, const T* B2, int a_row) {
  static_assert(kRowsB == 64, "one wgmma N");
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk)
    wgmma_m64n64k16_ss<T>(x, panel_k_desc<kRowsA>(A1, a_row, kk), panel_k_desc<kRowsB>(B1, 0, kk), kk > 0);
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk)
    wgmma_m64n64k16_ss<T>(y, panel_k_desc<kRowsA>(A2, a_row, kk), panel_k_desc<kRowsB>(B2, 0, kk), kk > 0);
}

// issue_nt_pair as one batch that this returns complete.
template <typename T, int kD, int kRowsA, int kRowsB>
__device__ __forceinline__ void wgmma_nt_pair(float (&x)[8][4], const T* A1, const T* B1, float (&y)[8][4],
                                              const T* A2, const T* B2, int a_row) {
  wgmma_sync_batch([&] { issue_nt_pair<T, kD, kRowsA, kRowsB>(x, A1, B1, y, A2, B2, a_row); }, x, y);
}

// dV += Pdᵀ dO and dK += dSᵀ Q for a warpgroup, Pdᵀ and dSᵀ as A fragments, dO and Q the
// step's MN-major tiles (issued: the caller fences, commits and waits).
template <typename T, int kBM, int kD>
__device__ __forceinline__ void issue_dkdv_products(float (&dv)[kD / 8][4], float (&dk)[kD / 8][4],
                                                    const uint32_t (&pa)[kBM / 16][4],
                                                    const uint32_t (&sa)[kBM / 16][4], const T* tdO, const T* tQ) {
  wgmma_acc_rs_mn<T, kBM, kD>(dv, pa, tdO);
  wgmma_acc_rs_mn<T, kBM, kD>(dk, sa, tQ);
}

template <typename T, int kD>
__global__ void __launch_bounds__(WgmmaBwd<T, kD>::kThreads, 1)
    attention_bwd_dkdv_wgmma_kernel(const AttentionBwdParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || defined(FUSEDFORMER_CUDA_EMULATION)
  using C = WgmmaBwd<T, kD>;
  static_assert(C::kSupported, "16-bit, D = 64 or 128");
  constexpr int kBN = C::kRows, kBM = C::kTile, kStages = C::kDkdvStages;
  using KLayout = PanelLayout<T, kBN>;
  using QLayout = PanelLayout<T, kBM>;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sK = sw128_base<T>(smem);
  T* sV = sK + kBN * kD;
  T* sQ = sV + kBN * kD;              // kStages tiles of kBM rows
  T* sdO = sQ + kStages * kBM * kD;   // the same
  float* s_lse = reinterpret_cast<float*>(sdO + kStages * kBM * kD);  // kStages x kBM
  float* s_delta = s_lse + kStages * kBM;                              // kStages x kBM
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, wg_row = 64 * (warp / 4);

  const int64_t kb = blockIdx.x, hk = blockIdx.y, bi = blockIdx.z;
  const int64_t j0 = kb * kBN;
  const T* k_head = static_cast<const T*>(p.k) + bi * p.k_batch_stride + hk * p.k_head_stride;
  const T* v_head = static_cast<const T*>(p.v) + bi * p.v_batch_stride + hk * p.v_head_stride;
  load_tile<T, kBN, kD, C::kThreads, KLayout>(sK, k_head, p.k_row_stride, j0, p.lk, p.d,
                                              rows_16b_aligned(k_head, p.k_row_stride));
  load_tile<T, kBN, kD, C::kThreads, KLayout>(sV, v_head, p.v_row_stride, j0, p.lk, p.d,
                                              rows_16b_aligned(v_head, p.v_row_stride));
  const DkdvSchedule sched(p, hk, j0, kBM);
  const auto load_q = query_tile_loader<T, kD, kBM, C::kThreads, QLayout>(p, sched, bi, sQ, sdO, s_lse, s_delta);
  auto q_tile = [&](int64_t n) { return sQ + int(n % kStages) * kBM * kD; };
  auto do_tile = [&](int64_t n) { return sdO + int(n % kStages) * kBM * kD; };
  const int64_t row0 = j0 + 16 * warp;  // this warp's key rows: row0 + g (+ 8)
  // Step n's Sᵀ and dPᵀ become its Pdᵀ and dSᵀ.
  auto elementwise = [&](int64_t n, float (&st)[1][kBM / 8][4], float (&dpt)[1][kBM / 8][4]) {
    const int64_t i0 = sched.row(n);
    const int stage = int(n % kStages);
    dkdv_tile_step<T>(st, dpt, p, tile_interior(p, i0, j0, kBN), s_lse + stage * kBM, s_delta + stage * kBM, bi,
                      sched.head(n), i0, row0, lane);
  };
  float dk[1][kD / 8][4] = {}, dv[1][kD / 8][4] = {};
  if (sched.steps > 0) load_q(0, 0);
  cp_async_commit();  // with K's and V's copies: all land (and are fenced) at step 0

  // Pipelined as the dQ kernel: step n issues Sᵀ_n, dPᵀ_n (one group) and step n - 1's dV and
  // dK products (another), waits for the first, and computes Pdᵀ_n and dSᵀ_n while the tensor
  // cores add the previous products. So step n reads three tile pairs' worth of time: n - 1's
  // (its products), n's and n + 1's (loading), one per stage; n + 1 refills the stage of
  // n - 2, whose products retired at step n - 1. Step 0 has no predecessor and runs before the
  // loop, so that every batch in it is the same (as in the dQ kernel). The previous step's A
  // fragments stay live across this step's products: at D = 128, 255 registers and 44 bytes
  // of spill stores (ptxas, sm_90a; the serial loop had 254 and none). Which is faster is a
  // GPU question (bench/NOTES.md).
  uint32_t pa[kBM / 16][4], sa[kBM / 16][4];  // the previous step's Pdᵀ and dSᵀ as A fragments
  if (sched.steps > 0) {
    tiles_landed_for_wgmma();  // K, V and step 0's tiles
    if (sched.steps > 1) load_q(1, 1);
    cp_async_commit();
    float st[1][kBM / 8][4], dpt[1][kBM / 8][4];
    wgmma_nt_pair<T, kD, kBN, kBM>(st[0], sK, q_tile(0), dpt[0], sV, do_tile(0), wg_row);  // Sᵀ = K Qᵀ, dPᵀ = V dOᵀ
    elementwise(0, st, dpt);
    pack_a_fragments<T>(st[0], pa);
    pack_a_fragments<T>(dpt[0], sa);
  }
  for (int64_t n = 1; n < sched.steps; ++n) {
    tiles_landed_for_wgmma();  // step n's tiles; every thread past step n - 1's waits
    if (n + 1 < sched.steps) load_q(n + 1, int((n + 1) % kStages));
    cp_async_commit();

    float st[1][kBM / 8][4], dpt[1][kBM / 8][4];
    wgmma_fence_operands(st[0]);
    wgmma_fence_operands(dpt[0]);
    wgmma_fence_operands(dv[0]);
    wgmma_fence_operands(dk[0]);
    wgmma_fence();
    issue_nt_pair<T, kD, kBN, kBM>(st[0], sK, q_tile(n), dpt[0], sV, do_tile(n), wg_row);
    wgmma_commit();
    issue_dkdv_products<T, kBM, kD>(dv[0], dk[0], pa, sa, do_tile(n - 1), q_tile(n - 1));
    wgmma_commit();
    wgmma_wait<1>();  // Sᵀ_n, dPᵀ_n; step n - 1's products may still run
    wgmma_fence_operands(st[0]);
    wgmma_fence_operands(dpt[0]);

    elementwise(n, st, dpt);

    wgmma_wait<0>();  // step n - 1's products: their A fragments may be overwritten now
    wgmma_fence_operands(dv[0]);
    wgmma_fence_operands(dk[0]);
    pack_a_fragments<T>(st[0], pa);
    pack_a_fragments<T>(dpt[0], sa);
  }
  if (sched.steps > 0) {  // the last step's products
    const int64_t last = sched.steps - 1;
    wgmma_sync_batch([&] { issue_dkdv_products<T, kBM, kD>(dv[0], dk[0], pa, sa, do_tile(last), q_tile(last)); },
                     dv[0], dk[0]);
  }
  cp_async_wait<0>();  // none pending at exit (steps = 0 leaves K's and V's copies unwaited)
  store_dkdv_rows<T>(p, dk, dv, bi, hk, row0, lane);
#else
  __trap();  // launched only where the binary is sm_90a code
#endif
}

template <typename T, int kD>
__global__ void __launch_bounds__(WgmmaBwd<T, kD>::kThreads, 1)
    attention_bwd_dq_wgmma_kernel(const AttentionBwdParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || defined(FUSEDFORMER_CUDA_EMULATION)
  using C = WgmmaBwd<T, kD>;
  static_assert(C::kSupported, "16-bit, D = 64 or 128");
  constexpr int kBM = C::kRows, kBN = C::kTile, kStages = C::kStages;
  using QLayout = PanelLayout<T, kBM>;
  using KVLayout = PanelLayout<T, kBN>;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = sw128_base<T>(smem);
  T* sdO = sQ + kBM * kD;
  T* sK = sdO + kBM * kD;                    // kDqKStages tiles of kBN rows
  T* sV = sK + C::kDqKStages * kBN * kD;     // kStages tiles of kBN rows
  float* s_lse = reinterpret_cast<float*>(sV + kStages * kBN * kD);
  float* s_delta = s_lse + kBM;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, wg_row = 64 * (warp / 4);

  const int64_t qb = blockIdx.x, h = blockIdx.y, bi = blockIdx.z, hk = h / (p.hq / p.hkv);
  const int64_t i0 = qb * kBM;
  const T* q_head = static_cast<const T*>(p.q) + bi * p.q_batch_stride + h * p.q_head_stride;
  const T* do_head = static_cast<const T*>(p.do_) + bi * p.do_batch_stride + h * p.do_head_stride;
  const T* k_head = static_cast<const T*>(p.k) + bi * p.k_batch_stride + hk * p.k_head_stride;
  const T* v_head = static_cast<const T*>(p.v) + bi * p.v_batch_stride + hk * p.v_head_stride;
  const bool k_vec = rows_16b_aligned(k_head, p.k_row_stride), v_vec = rows_16b_aligned(v_head, p.v_row_stride);
  auto k_tile = [&](int64_t kb) { return sK + int(kb % C::kDqKStages) * kBN * kD; };
  auto v_tile = [&](int64_t kb) { return sV + int(kb % kStages) * kBN * kD; };
  auto load_kv = [&](int64_t kb) {
    load_tile<T, kBN, kD, C::kThreads, KVLayout>(k_tile(kb), k_head, p.k_row_stride, kb * kBN, p.lk, p.d, k_vec);
    load_tile<T, kBN, kD, C::kThreads, KVLayout>(v_tile(kb), v_head, p.v_row_stride, kb * kBN, p.lk, p.d, v_vec);
  };

  const int64_t row0 = i0 + 16 * warp;  // this warp's query rows: row0 + g (+ 8)
  float dq[1][kD / 8][4] = {};
  const int64_t n = key_blocks_end(p, i0, kBM, kBN);
  load_tile<T, kBM, kD, C::kThreads, QLayout>(sQ, q_head, p.q_row_stride, i0, p.lq, p.d,
                                              rows_16b_aligned(q_head, p.q_row_stride));
  load_tile<T, kBM, kD, C::kThreads, QLayout>(sdO, do_head, p.do_row_stride, i0, p.lq, p.d,
                                              rows_16b_aligned(do_head, p.do_row_stride));
  load_row_stats<T, kBM, C::kThreads>(s_lse, s_delta, p, bi, h, i0);
  if (n > 0) load_kv(0);
  cp_async_commit();

  // Pipelined as the forward: step kb issues S_kb, dP_kb (one group) and the previous block's
  // dQ += dS K (another), waits for the first, and computes dS_kb while the tensor cores add the
  // previous product. Step kb refills the K buffer of block kb - 2 (its dS K retired at step
  // kb - 1) and the V buffer of block kb - 1 (its dP retired there too). Block 0 has no
  // predecessor and runs before the loop, so that every batch in it is the same (a branch
  // inside a batch made ptxas insert a warpgroup.arrive, C7519).
  uint32_t sa[kBN / 16][4];  // dS of the previous block as A fragments
  if (n > 0) {
    tiles_landed_for_wgmma();  // Q, dO, row stats, K_0, V_0
    if (n > 1) load_kv(1);
    cp_async_commit();
    float s[1][kBN / 8][4], dp[1][kBN / 8][4];
    wgmma_nt_pair<T, kD, kBM, kBN>(s[0], sQ, k_tile(0), dp[0], sdO, v_tile(0), wg_row);
    dq_tile_step<T>(s, dp, p, tile_interior(p, i0, 0, kBN), s_lse, s_delta, bi, h, i0, row0, 0, lane);
    pack_a_fragments<T>(s[0], sa);
  }
  for (int64_t kb = 1; kb < n; ++kb) {
    const int64_t j0 = kb * kBN;
    tiles_landed_for_wgmma();  // K_kb and V_kb; every thread past step kb - 1's waits
    if (kb + 1 < n) load_kv(kb + 1);
    cp_async_commit();

    float s[1][kBN / 8][4], dp[1][kBN / 8][4];
    wgmma_fence_operands(s[0]);
    wgmma_fence_operands(dp[0]);
    wgmma_fence_operands(dq[0]);
    wgmma_fence();
    issue_nt_pair<T, kD, kBM, kBN>(s[0], sQ, k_tile(kb), dp[0], sdO, v_tile(kb), wg_row);  // S = Q Kᵀ, dP = dO Vᵀ
    wgmma_commit();
    wgmma_acc_rs_mn<T, kBN, kD>(dq[0], sa, k_tile(kb - 1));  // dQ += dS K of block kb - 1
    wgmma_commit();
    wgmma_wait<1>();  // S_kb, dP_kb; the previous dS K may still run
    wgmma_fence_operands(s[0]);
    wgmma_fence_operands(dp[0]);

    dq_tile_step<T>(s, dp, p, tile_interior(p, i0, j0, kBN), s_lse, s_delta, bi, h, i0, row0, j0, lane);

    wgmma_wait<0>();  // the previous dS K: its A fragments may be overwritten now
    wgmma_fence_operands(dq[0]);
    pack_a_fragments<T>(s[0], sa);
  }
  if (n > 0)  // the last block's dS K
    wgmma_sync_batch([&] { wgmma_acc_rs_mn<T, kBN, kD>(dq[0], sa, k_tile(n - 1)); }, dq[0]);
  cp_async_wait<0>();  // none pending at exit
  store_dq_rows<T>(p, dq, bi, h, row0, lane);
#else
  __trap();  // launched only where the binary is sm_90a code
#endif
}

// ---------------------------------------------------------------------------------------
// Launch

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

template <typename Kernel, typename Params>
void launch(Kernel kernel, dim3 grid, int threads, int smem, cudaStream_t stream,
            const char* what, const Params& params) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  launch_with_smem(kernel, grid, threads, size_t(smem), stream, params);
  check_cuda(cudaGetLastError(), what);
}

template <typename P>
void check_grid(const P& p, const char* op) {
  if (p.hq > 65535 || p.b > 65535)
    throw std::runtime_error(std::string(op) + ": the CUDA kernel supports at most 65535 heads and "
                             "65535 batches, got B = " + std::to_string(p.b) + ", HQ = " +
                             std::to_string(p.hq));
}

// Calls f(T{}, std::integral_constant<int, kD>{}) with the storage type and the padded head dim.
template <typename P, typename F>
void dispatch(const P& p, F&& f) {
  auto by_dim = [&](auto tag) {
    using T = decltype(tag);
    if (p.d <= 32) return f(T{}, std::integral_constant<int, 32>{});
    if (p.d <= 64) return f(T{}, std::integral_constant<int, 64>{});
    if (p.d <= 96) return f(T{}, std::integral_constant<int, 96>{});
    if (p.d <= 128) return f(T{}, std::integral_constant<int, 128>{});
    if (p.d <= 256) return f(T{}, std::integral_constant<int, 256>{});
    throw std::runtime_error("attention (cuda): head dim must be <= 256, got " + std::to_string(p.d));
  };
  dispatch_cuda_dtype(p.dtype, by_dim);
}

// Whether the forward packs the query heads of a kv head into one block's rows (QueryRows):
// GQA/MQA with at most kAttentionPackGqaMaxLq query rows (decoding, speculative steps), where an
// unpacked block would hold a few rows of one head and each of the group's heads would read the
// same K and V. FUSEDFORMER_CUDA_PACK_GQA=0 turns it off.
constexpr int64_t kAttentionPackGqaMaxLq = 16;
bool pack_gqa(const AttentionFwdParams& p) {
  const char* env = std::getenv("FUSEDFORMER_CUDA_PACK_GQA");
  return p.hkv < p.hq && p.lq <= kAttentionPackGqaMaxLq && !(env && std::string(env) == "0");
}

// Calls f(T{}, kernel, tiles) with the forward kernel p runs on the current device (the wgmma one
// where the binary is sm_90a code; packed GQA decoding on the mma.sync one), its launch shape,
// its tile, and whether its rows are packed (then blockIdx.y is a kv head and a block's rows are
// of the group · LQ).
struct FwdLaunch {
  int threads, smem, block_m, block_n;
  const char* name;
  bool packed = false;
  // The grid's rows and heads (blockIdx.x's query blocks cover rows; blockIdx.y takes heads).
  int64_t rows(const AttentionFwdParams& p) const { return packed ? p.hq / p.hkv * p.lq : p.lq; }
  int64_t heads(const AttentionFwdParams& p) const { return packed ? p.hkv : p.hq; }
};
template <typename F>
void dispatch_fwd(const AttentionFwdParams& p, F&& f) {
  dispatch(p, [&](auto tag, auto dim) {
    using T = decltype(tag);
    constexpr int kD = decltype(dim)::value;
    using Tr = Traits<T, kD>;
    if (pack_gqa(p))  // a few rows a head: memory-bound on K and V, which the mma.sync tiles read once
      return f(T{}, attention_fwd_kernel<T, kD, true>,
               FwdLaunch{Tr::kThreads, int(Tr::kFwdSmem), Tr::kFwdBlockM, Tr::kFwdBlockN,
                         "attention_fwd_kernel (packed GQA)", true});
    if constexpr (WgmmaFwd<T, kD>::kSupported) {
      using C = WgmmaFwd<T, kD>;
      if (wgmma_allowed() && binary_is_sm90(attention_fwd_wgmma_kernel<T, kD>))
        return f(T{}, attention_fwd_wgmma_kernel<T, kD>,
                 FwdLaunch{C::kThreads, int(C::kSmem), C::kBM, C::kBN, "attention_fwd_wgmma_kernel"});
    }
    f(T{}, attention_fwd_kernel<T, kD>,
      FwdLaunch{Tr::kThreads, int(Tr::kFwdSmem), Tr::kFwdBlockM, Tr::kFwdBlockN, "attention_fwd_kernel"});
  });
}

}  // namespace

void attention_fwd_cuda(const AttentionFwdParams& p, cudaStream_t stream) {
  check_grid(p, "attention_fwd");
  check_num_splits(p, "attention_fwd (cuda)");
  dispatch_fwd(p, [&](auto tag, auto kernel, const FwdLaunch& k) {
    using T = decltype(tag);
    const dim3 grid(unsigned(ceil_div(k.rows(p), k.block_m) * p.num_splits), unsigned(k.heads(p)), unsigned(p.b));
    launch(kernel, grid, k.threads, k.smem, stream, k.name, p);
    if (p.num_splits > 1) {
      constexpr int kCombineWarps = 8;
      launch(attention_fwd_combine_kernel<T>, dim3(unsigned(ceil_div(p.b * p.hq * p.lq, kCombineWarps))),
             32 * kCombineWarps, 0, stream, "attention_fwd_combine_kernel", p);
    }
  });
}

int64_t attention_fwd_num_splits_cuda(const AttentionFwdParams& p) {
  int device = 0, sms = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  int64_t splits = 1;
  dispatch_fwd(p, [&](auto, auto, const FwdLaunch& k) {
    splits = attention_num_splits(p.b * k.heads(p) * ceil_div(k.rows(p), k.block_m), ceil_div(p.lk, k.block_n), sms);
  });
  return splits;
}

bool wgmma_kernels_active_cuda() {
  return wgmma_allowed() && binary_is_sm90(attention_fwd_wgmma_kernel<__nv_bfloat16, 128>);
}

void attention_bwd_cuda(const AttentionBwdParams& p, cudaStream_t stream) {
  check_grid(p, "attention_bwd");
  dispatch(p, [&](auto tag, auto dim) {
    using T = decltype(tag);
    constexpr int kD = decltype(dim)::value;
    using Tr = Traits<T, kD>;
    constexpr int kDeltaWarps = 8;
    const dim3 delta_grid(unsigned(ceil_div(p.b * p.hq * p.lq, kDeltaWarps)));
    launch(attention_bwd_delta_kernel<T>, delta_grid, 32 * kDeltaWarps, 0, stream,
           "attention_bwd_delta_kernel", p);
    if constexpr (WgmmaBwd<T, kD>::kSupported) {
      using C = WgmmaBwd<T, kD>;
      if (wgmma_allowed() && binary_is_sm90(attention_bwd_dkdv_wgmma_kernel<T, kD>)) {
        const dim3 dkdv_grid(unsigned(ceil_div(p.lk, C::kRows)), unsigned(p.hkv), unsigned(p.b));
        launch(attention_bwd_dkdv_wgmma_kernel<T, kD>, dkdv_grid, C::kThreads, C::kDkdvSmem, stream,
               "attention_bwd_dkdv_wgmma_kernel", p);
        const dim3 dq_grid(unsigned(ceil_div(p.lq, C::kRows)), unsigned(p.hq), unsigned(p.b));
        launch(attention_bwd_dq_wgmma_kernel<T, kD>, dq_grid, C::kThreads, C::kDqSmem, stream,
               "attention_bwd_dq_wgmma_kernel", p);
        return;
      }
    }
    const dim3 dkdv_grid(unsigned(ceil_div(p.lk, Tr::kBwdBlockN)), unsigned(p.hkv), unsigned(p.b));
    launch(attention_bwd_dkdv_kernel<T, kD>, dkdv_grid, Tr::kDkdvThreads, Tr::kDkdvSmem, stream,
           "attention_bwd_dkdv_kernel", p);
    const dim3 dq_grid(unsigned(ceil_div(p.lq, Tr::kBlockM)), unsigned(p.hq), unsigned(p.b));
    launch(attention_bwd_dq_kernel<T, kD>, dq_grid, Tr::kThreads, Tr::kDqSmem, stream,
           "attention_bwd_dq_kernel", p);
  });
}

}  // namespace fusedformer
