// The sm_80+ warp-level primitives of the tensor-core kernels (attention.cu, ffn.cu), torch-free:
//   mma_16816<T>      D(16x8, fp32) += A(16x16) · B(16x8), bf16 or fp16 operands (HMMA)
//   ldmatrix_x4       four 8x8 16-bit matrices from shared memory into mma fragments
//   ldmatrix_x4_trans the same, each matrix transposed on the way (the B operand of a product
//                     whose B is stored k-major, such as P·V with V row-major)
//   cp_async16        a 16-byte asynchronous global -> shared copy, zero-filled past src_bytes
//   cp_async_commit / cp_async_wait<N>
// and the sm_90a warpgroup MMA (wgmma) below.
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

// ---- sm_90a: warpgroup MMA ----------------------------------------------------------------
// A warpgroup (warps 4w .. 4w + 3 of a block, 128 threads) computes D(64 x N, fp32) (+)= A(64 x
// 16) · B(16 x N) asynchronously (wgmma.mma_async; PTX ISA, "Asynchronous Warpgroup Level
// Matrix Multiply-Accumulate"). A is in registers (_rs: warp 4w + v holds rows 16v .. 16v + 15
// in mma_16816's A layout) or in shared memory (_ss: behind a descriptor). B is in shared
// memory, named by a matrix descriptor (sw128_desc). D is mma_16816's C layout over N / 8
// column tiles: d[j][i] is row g + 8 · (i >> 1), column 8j + 2t + (i & 1) of the warp's 16
// rows (CUTLASS's ALayout_64x16 and CLayout_64xN say the same). The protocol, in each thread:
//   fence_proxy_async    after this thread's shared-memory writes (cp.async landed) that a wgmma
//                        will read, before the barrier that publishes them: wgmma reads
//                        through the async proxy;
//   wgmma_fence          before a batch: orders this thread's earlier register accesses (of A
//                        and D) before the asynchronous ones;
//   wgmma_m64n*k16_*     the multiplies, then wgmma_commit (one group);
//   wgmma_wait<N>        before D is read or the B tiles are overwritten, then
//                        wgmma_fence_operands(D) so the compiler keeps D's reads below the wait.
// The instructions exist only for sm_90a (__CUDA_ARCH_FEAT_SM90_ALL); other targets compile
// these helpers to a trap, and the host launches a wgmma kernel only where the binary that runs
// is sm_90 code (common.cuh: binary_is_sm90).

// The address of p in the block's shared window (p in dynamic shared memory).
__device__ __forceinline__ uint32_t shared_address(const void* p) {
#if defined(FUSEDFORMER_CUDA_EMULATION)
  return emu::shared_address(p);
#else
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
#endif
}

// The first 1024-byte boundary of the shared window at or after `smem`, where 128-byte-swizzled
// tiles start (the swizzle pattern repeats every 1024 bytes of address, sw128_desc); the
// caller's buffer has 1008 bytes of slack for it.
template <typename T>
__device__ __forceinline__ T* sw128_base(unsigned char* smem) {
  return reinterpret_cast<T*>(smem + (1024 - shared_address(smem) % 1024) % 1024);
}

// Descriptor of a 128-byte-swizzled 16-bit operand in shared memory: rows of 64 elements (128
// bytes) whose 16-byte chunk c is stored at chunk c ^ row % 8, in atoms of 8 rows (1024 bytes,
// the stride byte offset) that start on 1024-byte boundaries of the shared window. `start` is
// the operand's first element: an atom's row 0, plus 32 bytes per 16-element k-step along the
// row for a K-major operand. lbo_bytes: for an MN-major operand the stride between its 64-column
// panels; K-major operands ignore it (16, encoded 1, by convention).
__device__ __forceinline__ uint64_t sw128_desc(const void* start, uint32_t lbo_bytes) {
  const uint64_t address = (shared_address(start) & 0x3ffffu) >> 4;
  return address | (uint64_t((lbo_bytes >> 4) & 0x3fffu) << 16) | (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}

__device__ __forceinline__ void fence_proxy_async() {
#if defined(FUSEDFORMER_CUDA_EMULATION)
  emu::fence_proxy_async();
#elif defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#else
  __trap();
#endif
}

// Every thread's cp.async copies issued so far have landed, are visible to the tensor cores
// (async proxy) reads, and every thread of the block has reached this point: the step between
// filling shared tiles and issuing the wgmma that read them (and, for the buffers an earlier
// wgmma read, proof that every thread has waited for it).
__device__ __forceinline__ void tiles_landed_for_wgmma() {
  cp_async_wait<0>();
  fence_proxy_async();
  __syncthreads();
}

__device__ __forceinline__ void wgmma_fence() {
#if defined(FUSEDFORMER_CUDA_EMULATION)
  emu::wgmma_fence();
#elif defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#else
  __trap();
#endif
}

__device__ __forceinline__ void wgmma_commit() {
#if defined(FUSEDFORMER_CUDA_EMULATION)
  emu::wgmma_commit_group();
#elif defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#else
  __trap();
#endif
}

// Waits until at most N of this thread's committed wgmma groups are pending.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#if defined(FUSEDFORMER_CUDA_EMULATION)
  emu::wgmma_wait_group(N);
#elif defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#else
  __trap();
#endif
}

// A compiler barrier on each accumulator: its reads and writes stay on their side of the
// neighbouring wgmma asm statements (which the compiler does not know touch it).
template <int kTiles>
__device__ __forceinline__ void wgmma_fence_operands(float (&d)[kTiles][4]) {
#if !defined(FUSEDFORMER_CUDA_EMULATION)
#pragma unroll
  for (int j = 0; j < kTiles; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) asm volatile("" : "+f"(d[j][i])::"memory");
#endif
}

// One wgmma batch issued and waited for: issue() issues its wgmma; each accumulator in acc is
// fenced on both sides (wgmma_fence_operands), so no read or write of it enters the window in
// which the batch runs asynchronously.
template <typename Issue, typename... Acc>
__device__ __forceinline__ void wgmma_sync_batch(Issue&& issue, Acc&... acc) {
  (wgmma_fence_operands(acc), ...);
  wgmma_fence();
  issue();
  wgmma_commit();
  wgmma_wait<0>();
  (wgmma_fence_operands(acc), ...);
}

#define FUSEDFORMER_WGMMA_D8(j) "+f"(d[j][0]), "+f"(d[j][1]), "+f"(d[j][2]), "+f"(d[j][3])
#define FUSEDFORMER_WGMMA_M64N64K16_RS(TYPE)                                                          \
  asm volatile(                                                                                     \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %38, 0;\n"                                                  \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " "                               \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
      "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, " \
      "1, 1, %37;\n}\n"                                                                             \
      : FUSEDFORMER_WGMMA_D8(0), FUSEDFORMER_WGMMA_D8(1), FUSEDFORMER_WGMMA_D8(2),                  \
        FUSEDFORMER_WGMMA_D8(3), FUSEDFORMER_WGMMA_D8(4), FUSEDFORMER_WGMMA_D8(5),                  \
        FUSEDFORMER_WGMMA_D8(6), FUSEDFORMER_WGMMA_D8(7)                                            \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "n"(kTransB ? 1 : 0),              \
        "r"(accumulate ? 1 : 0))

// D(64 x 64) = A · B (+ D when accumulate), A in registers, B behind desc_b: K-major (rows of B's
// columns, K contiguous) or, with kTransB, MN-major (rows of K, N contiguous).
template <typename T, bool kTransB>
__device__ __forceinline__ void wgmma_m64n64k16_rs(float (&d)[8][4], const uint32_t (&a)[4], uint64_t desc_b,
                                                   bool accumulate) {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>, "bf16 or fp16 operands");
#if defined(FUSEDFORMER_CUDA_EMULATION)
  emu::wgmma_rs<T>(&d[0][0], 64, a, desc_b, kTransB, accumulate);
#elif defined(__CUDA_ARCH_FEAT_SM90_ALL)
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    FUSEDFORMER_WGMMA_M64N64K16_RS("bf16");
  } else {
    FUSEDFORMER_WGMMA_M64N64K16_RS("f16");
  }
#else
  __trap();
#endif
}

#define FUSEDFORMER_WGMMA_M64N64K16_SS(TYPE)                                                          \
  asm volatile(                                                                                     \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                                  \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " "                               \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
      "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"   \
      : FUSEDFORMER_WGMMA_D8(0), FUSEDFORMER_WGMMA_D8(1), FUSEDFORMER_WGMMA_D8(2),                  \
        FUSEDFORMER_WGMMA_D8(3), FUSEDFORMER_WGMMA_D8(4), FUSEDFORMER_WGMMA_D8(5),                  \
        FUSEDFORMER_WGMMA_D8(6), FUSEDFORMER_WGMMA_D8(7)                                            \
      : "l"(desc_a), "l"(desc_b), "r"(accumulate ? 1 : 0))

// D(64 x 64) = A · B (+ D when accumulate), A (64 x 16) and B both K-major in shared memory:
// rows of A and of B's columns, K contiguous (the warpgroup's 64 rows of A start at desc_a).
template <typename T>
__device__ __forceinline__ void wgmma_m64n64k16_ss(float (&d)[8][4], uint64_t desc_a, uint64_t desc_b,
                                                   bool accumulate) {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>, "bf16 or fp16 operands");
#if defined(FUSEDFORMER_CUDA_EMULATION)
  emu::wgmma_ss<T>(&d[0][0], 64, desc_a, desc_b, accumulate, false, false);
#elif defined(__CUDA_ARCH_FEAT_SM90_ALL)
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    FUSEDFORMER_WGMMA_M64N64K16_SS("bf16");
  } else {
    FUSEDFORMER_WGMMA_M64N64K16_SS("f16");
  }
#else
  __trap();
#endif
}
#undef FUSEDFORMER_WGMMA_M64N64K16_SS
#define FUSEDFORMER_WGMMA_M64N128K16_SS(TYPE)                                                         \
  asm volatile(                                                                                     \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                                  \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " {"                              \
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63" \
      "}, %64, %65, p, 1, 1, %67, %68;\n}\n"                                                          \
      : FUSEDFORMER_WGMMA_D8(0), FUSEDFORMER_WGMMA_D8(1), FUSEDFORMER_WGMMA_D8(2),                  \
        FUSEDFORMER_WGMMA_D8(3), FUSEDFORMER_WGMMA_D8(4), FUSEDFORMER_WGMMA_D8(5),                  \
        FUSEDFORMER_WGMMA_D8(6), FUSEDFORMER_WGMMA_D8(7), FUSEDFORMER_WGMMA_D8(8),                  \
        FUSEDFORMER_WGMMA_D8(9), FUSEDFORMER_WGMMA_D8(10), FUSEDFORMER_WGMMA_D8(11),                \
        FUSEDFORMER_WGMMA_D8(12), FUSEDFORMER_WGMMA_D8(13), FUSEDFORMER_WGMMA_D8(14),               \
        FUSEDFORMER_WGMMA_D8(15)                                                                    \
      : "l"(desc_a), "l"(desc_b), "r"(accumulate ? 1 : 0), "n"(kTransA ? 1 : 0), "n"(kTransB ? 1 : 0))

// D(64 x 128) = A · B (+ D when accumulate), both in shared memory: A K-major (rows, K
// contiguous) or with kTransA MN-major (K rows, M contiguous); B likewise with kTransB.
// One instruction for 128 columns reads the A tile once where two N = 64 ones read it twice.
template <typename T, bool kTransA, bool kTransB>
__device__ __forceinline__ void wgmma_m64n128k16_ss(float (&d)[16][4], uint64_t desc_a, uint64_t desc_b,
                                                    bool accumulate) {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>, "bf16 or fp16 operands");
#if defined(FUSEDFORMER_CUDA_EMULATION)
  emu::wgmma_ss<T>(&d[0][0], 128, desc_a, desc_b, accumulate, kTransA, kTransB);
#elif defined(__CUDA_ARCH_FEAT_SM90_ALL)
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    FUSEDFORMER_WGMMA_M64N128K16_SS("bf16");
  } else {
    FUSEDFORMER_WGMMA_M64N128K16_SS("f16");
  }
#else
  __trap();
#endif
}
#undef FUSEDFORMER_WGMMA_M64N128K16_SS
#undef FUSEDFORMER_WGMMA_M64N64K16_RS
#undef FUSEDFORMER_WGMMA_D8

}  // namespace cuda_common
}  // namespace fusedformer
