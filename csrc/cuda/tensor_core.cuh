// The sm_80+ warp-level primitives of the tensor-core kernels (attention.cu, ffn.cu), torch-free:
//   mma_16816<T>      D(16x8, fp32) += A(16x16) · B(16x8), bf16 or fp16 operands (HMMA)
//   ldmatrix_x4       four 8x8 16-bit matrices from shared memory into mma fragments
//   ldmatrix_x4_trans the same, each matrix transposed on the way (the B operand of a product
//                     whose B is stored k-major, such as P·V with V row-major)
//   cp_async16        a 16-byte asynchronous global -> shared copy, zero-filled past src_bytes
//   cp_async_commit / cp_async_wait<N>
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16"), lane = 4 · g + t:
//   A register i: row g + 8 · (i & 1), columns 8 · (i >> 1) + 2t and + 2t + 1 (low half first)
//   B register i: rows (k) 8 · i + 2t and + 2t + 1, column (n) g
//   C element i:  row g + 8 · (i >> 1), column 2t + (i & 1)
// ldmatrix: lanes 8m .. 8m + 7 give the row addresses of matrix m (16 bytes each, 16-byte
// aligned); register m of lane 4g + t then holds row g, columns 2t, 2t + 1 of matrix m
// (.trans: rows 2t, 2t + 1 of column g), which is an A or B fragment register as above.
//
// Under FUSEDFORMER_CUDA_EMULATION (tests/cuda_emu) each helper calls the CPU emulator of the
// same instruction instead of its inline PTX; the nvcc build is unaffected.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace fusedformer {
namespace cuda_common {

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>, "bf16 or fp16 operands");
#if defined(FUSEDFORMER_CUDA_EMULATION)
  emu::mma_m16n8k16<T>(c, a, b0, b1);
#else
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#endif
}

// `row` is this lane's row address: row lane % 8 of matrix lane / 8.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#if defined(FUSEDFORMER_CUDA_EMULATION)
  emu::ldmatrix_x4(r, row, false);
#else
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
#endif
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
#if defined(FUSEDFORMER_CUDA_EMULATION)
  emu::ldmatrix_x4(r, row, true);
#else
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
#endif
}

// 16 bytes from gmem to smem (both 16-byte aligned), asynchronously: only src_bytes (0 .. 16)
// are read and the rest is zero-filled; with src_bytes = 0 nothing is read (gmem need only be
// a valid address, not a readable one).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
#if defined(FUSEDFORMER_CUDA_EMULATION)
  emu::cp_async16(smem, gmem, src_bytes);
#else
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
#endif
}

// Closes this thread's copies issued since the last commit into one group (may be empty).
__device__ __forceinline__ void cp_async_commit() {
#if defined(FUSEDFORMER_CUDA_EMULATION)
  emu::cp_async_commit_group();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most N of this thread's committed groups are pending (the newest ones). Other
// threads' copies need a barrier after it.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(FUSEDFORMER_CUDA_EMULATION)
  emu::cp_async_wait_group(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

}  // namespace cuda_common
}  // namespace fusedformer
