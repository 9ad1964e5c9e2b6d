// Warp-level mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 and
// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16 on the CPU, for tests/cuda_emu (the helpers
// of csrc/cuda/tensor_core.cuh call these when FUSEDFORMER_CUDA_EMULATION is set).
//
// Each lane holds a fragment: A (16 x 16, row-major) in 4 registers of two 16-bit values, B
// (16 x 8, column-major) in 2, C/D (16 x 8, fp32) in 4 floats. With lane = 4 · group + t
// (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"):
//   A register i, half h (h = 0 the low 16 bits): row group + 8 · (i & 1),
//                                                 column 2t + h + 8 · (i >> 1)
//   B register i, half h:                         row (k) 2t + h + 8 · i, column (n) group
//   C element i:                                  row group + 8 · (i >> 1), column 2t + (i & 1)
// The lanes publish their registers through the warp's exchange slots, so a fragment value in
// the wrong register or lane puts a wrong number in the product, as on the hardware.
//
// Faithful: the fragment layouts, the operand rounding (the inputs are already 16-bit), the
// requirement that all 32 lanes take part (a warp barrier; a diverged lane deadlocks).
// Not emulated: the tensor core's accumulation order and rounding. The 16 products of a dot
// are summed in double and added to C once, which is at least as accurate as the hardware;
// tests compare against an fp64 reference with a tolerance for the 16-bit operands.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>

#include "fibers.h"

namespace emu {

bool in_shared_memory(const void* p, size_t bytes);  // cuda_shim.h

template <typename T>
float half_to_float(uint16_t bits);  // defined by cuda_shim.h for __nv_bfloat16 and __half

template <typename T>
inline float unpack(uint32_t reg, int half) {
  return half_to_float<T>(uint16_t(half ? reg >> 16 : reg & 0xffffu));
}

template <typename T>
inline void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  warp_barrier();  // every lane has consumed the previous exchange
  uint64_t* mine = exchange_slots(lane_id());
  for (int i = 0; i < 4; ++i) mine[i] = a[i];
  mine[4] = b0;
  mine[5] = b1;
  warp_barrier();  // every lane's fragments are published

  float A[16][16], B[16][8];
  for (int lane = 0; lane < kWarpSize; ++lane) {
    const uint64_t* r = exchange_slots(lane);
    const int group = lane >> 2, t = lane & 3;
    for (int i = 0; i < 4; ++i)
      for (int h = 0; h < 2; ++h) A[group + 8 * (i & 1)][2 * t + h + 8 * (i >> 1)] = unpack<T>(uint32_t(r[i]), h);
    for (int i = 0; i < 2; ++i)
      for (int h = 0; h < 2; ++h) B[2 * t + h + 8 * i][group] = unpack<T>(uint32_t(r[4 + i]), h);
  }
  const int group = lane_id() >> 2, t = lane_id() & 3;
  for (int i = 0; i < 4; ++i) {
    const int row = group + 8 * (i >> 1), col = 2 * t + (i & 1);
    double dot = 0.0;
    for (int k = 0; k < 16; ++k) dot += double(A[row][k]) * double(B[k][col]);
    c[i] = float(double(c[i]) + dot);
  }
}

// Shared-memory bank conflicts of ldmatrix, the shared-memory read of the tensor-core paths:
// each 8 x 16-byte matrix is one 128-byte request, served in as many wavefronts as the largest
// number of distinct 4-byte words that any one of the 32 banks holds among its 8 rows (one when
// the rows cover all banks once). Counted per warp instruction by lane 0; bank = (address / 4)
// mod 32 on the host address is the device's up to a constant rotation, since shared buffers
// and row addresses are 16-byte aligned. The drivers fail a run with any extra wavefront: the
// kernels lay out their tiles (padding, XOR swizzles) so that there are none.
struct LdmatrixStats {
  uint64_t matrices = 0, extra_wavefronts = 0;
};
inline LdmatrixStats ldmatrix_stats;

inline void count_ldmatrix_wavefronts() {
  for (int m = 0; m < 4; ++m) {
    uintptr_t words[32][8];
    int n[32] = {};
    int most = 0;
    for (int i = 0; i < 8; ++i) {
      const uintptr_t row = uintptr_t(exchange_slots(8 * m + i)[0]);
      for (int w = 0; w < 4; ++w) {
        const uintptr_t word = row / 4 + w;
        const int bank = int(word % 32);
        bool seen = false;
        for (int x = 0; x < n[bank]; ++x) seen |= words[bank][x] == word;
        if (!seen) words[bank][n[bank]++] = word;
        most = std::max(most, n[bank]);
      }
    }
    ++ldmatrix_stats.matrices;
    ldmatrix_stats.extra_wavefronts += uint64_t(most - 1);
  }
}

// ldmatrix.x4: lanes 8m .. 8m + 7 publish the addresses of rows 0 .. 7 of matrix m (16 bytes
// each, 16-byte aligned, in the block's shared memory); register m of lane 4g + t receives the
// 32 bits at byte 4t of row g of matrix m, or with .trans the 16-bit elements at byte 2g of
// rows 2t (low half) and 2t + 1 (PTX ISA, "ldmatrix"). Every lane reads the rows the others
// published, so a wrong row address in any lane corrupts other lanes' fragments, as on the
// hardware. Memory is read between the two warp barriers, like any other shared-memory load.
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row, bool trans) {
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0) throw std::logic_error("emu: ldmatrix row address not 16-byte aligned");
  if (!in_shared_memory(row, 16)) throw std::logic_error("emu: ldmatrix row outside shared memory");
  warp_barrier();  // every lane has consumed the previous exchange
  exchange_slots(lane_id())[0] = reinterpret_cast<uintptr_t>(row);
  warp_barrier();  // every lane's row address is published
  if (lane_id() == 0) count_ldmatrix_wavefronts();
  const int g = lane_id() >> 2, t = lane_id() & 3;
  auto row_of = [](int m, int i) { return reinterpret_cast<const unsigned char*>(exchange_slots(8 * m + i)[0]); };
  for (int m = 0; m < 4; ++m) {
    if (!trans) {
      memcpy(&r[m], row_of(m, g) + 4 * t, 4);
    } else {
      uint16_t lo, hi;
      memcpy(&lo, row_of(m, 2 * t) + 2 * g, 2);
      memcpy(&hi, row_of(m, 2 * t + 1) + 2 * g, 2);
      r[m] = uint32_t(lo) | (uint32_t(hi) << 16);
    }
  }
}

}  // namespace emu
