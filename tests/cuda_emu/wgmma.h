// sm_90a warpgroup MMA on the CPU, for tests/cuda_emu: wgmma.mma_async m64nNk16 with the A
// operand in registers or (K-major) in shared memory and B in shared memory behind a matrix
// descriptor, wgmma.fence,
// wgmma.commit_group, wgmma.wait_group, and fence.proxy.async (csrc/cuda/tensor_core.cuh's
// wgmma helpers call these when FUSEDFORMER_CUDA_EMULATION is set).
//
// PTX semantics kept (PTX ISA, "Asynchronous Warpgroup Level Matrix Multiply-Accumulate"):
//   - A (64 x 16) in registers: warp w of the warpgroup holds rows 16w .. 16w + 15 in the
//     mma.m16n8k16 A-fragment layout (mma.h); D (64 x N, fp32): warp w rows 16w .., element
//     4j + i of a lane at row g + 8 · (i >> 1), column 8j + 2t + (i & 1). A lane's A registers
//     reach the other lanes through the warp exchange, so a value in the wrong lane or
//     register corrupts the product, as on the hardware. A in shared memory: rows 0 .. 63 of
//     the descriptor's operand (K-major, or MN-major with the transpose flag), warp w reading
//     rows 16w ..;
//   - B (16 x N) in shared memory, addressed only through the 64-bit descriptor: start address,
//     leading and stride byte offsets, swizzle mode, and the transpose flag that selects the
//     K-major or MN-major canonical layout ("Canonical Layouts": in 16-byte units of T = 8
//     16-bit elements, K-major ((8,m),(T,2)):((cT,SBO),(1,T)) and MN-major
//     ((T,c,m),(8,k)):((1,T,LBO),(cT,SBO)) with c = 8, 4, 2 chunks per 128-, 64-, 32-byte
//     swizzle row; the no-swizzle forms as listed there). The swizzle is applied to the
//     shared-window address, bits [4, 4 + log2 c) ^= bits [7, 7 + log2 c), so a tile whose
//     swizzle atoms do not start at the pattern boundary (1024 bytes for 128B) reads the
//     wrong elements, as on the hardware. A non-zero base offset is refused (not emulated);
//   - asynchrony: the product is computed when the issuing thread's wait_group retires its
//     group, reading shared memory and accumulating into the registers then. A thread that
//     reads D before that wait sees stale values; a tile overwritten before the wait feeds
//     the product the new data. The A registers are captured at issue, and at the wait they
//     must still hold the same values: overwriting them while the wgmma is in flight (which
//     the PTX ISA makes undefined) throws;
//   - a wgmma needs a wgmma.fence by the same thread since its last wait_group (the fence
//     that orders the thread's own register accesses before the asynchronous ones), else
//     the emulator throws;
//   - the async proxy: shared memory written through cp.async must be made visible to the
//     async proxy (fence.proxy.async by the writing thread, after its copies landed) before
//     any wgmma of the block is issued, else the emulator throws. Plain st.shared writes
//     are not tracked;
//   - a thread that exits with wgmma groups pending is an error.
// Not emulated: the warpgroup-wide convergence of .sync.aligned (checked per warp only), the
// tensor core's accumulation order and rounding (the 16 products are summed in double, as in
// mma.h), scale-a / scale-b negation, bank conflicts of the operand reads.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "fibers.h"

namespace emu {

bool in_shared_memory(const void* p, size_t bytes);  // cuda_shim.h
unsigned char* shared_window_pointer(uint32_t address, size_t bytes);  // cuda_shim.h

template <typename T>
float half_to_float(uint16_t bits);  // cuda_shim.h

struct WgmmaOp {
  float* d;             // the issuing thread's N / 2 accumulators
  int n;
  float a[2][16];          // this lane's A rows g and g + 8: captured at issue (A in registers),
                           // or read at the wait (A in shared memory)
  const uint32_t* a_regs;  // A in registers: this lane's registers, which must keep ...
  uint32_t a_issued[4];    // ... their values at issue until the wait
  bool a_in_smem;          // A in shared memory: desc_a's rows 16 · (warp % 4) + g, + 8
  uint64_t desc_a;
  uint64_t desc_b;
  bool trans_a, trans_b, accumulate;
  float (*to_float)(uint16_t);
};
struct WgmmaQueue {
  std::vector<WgmmaOp> open;                  // issued, not yet committed
  std::vector<std::vector<WgmmaOp>> groups;   // committed, oldest first
  bool fenced = false;                        // wgmma.fence since the last wait_group
  bool proxy_dirty = false;                   // cp.async writes landed, no fence.proxy.async since
};
inline std::vector<WgmmaQueue> wgmma_queues;  // per thread of the running block

inline WgmmaQueue& wgmma_queue(unsigned tid) {
  if (wgmma_queues.size() < size_t(block.nthreads)) wgmma_queues.resize(size_t(block.nthreads));
  return wgmma_queues[tid];
}

// The shared-window byte address of element (mn, k) of a 16-bit operand (K-major when
// !mn_major), per the canonical layouts above.
inline uint32_t wgmma_element_address(uint64_t desc, int mn, int k, bool mn_major) {
  const uint32_t start = uint32_t(desc & 0x3fff) << 4;
  const uint32_t lbo = uint32_t((desc >> 16) & 0x3fff) << 4, sbo = uint32_t((desc >> 32) & 0x3fff) << 4;
  if (((desc >> 49) & 7) != 0) throw std::logic_error("emu: wgmma descriptor base offset != 0 (not emulated)");
  const int mode = int(desc >> 62);
  const uint32_t c = mode == 1 ? 8 : mode == 2 ? 4 : mode == 3 ? 2 : 1;  // 16-byte chunks a swizzle row
  const uint32_t m = uint32_t(mn), kk = uint32_t(k);
  uint32_t a;
  if (!mn_major) {
    a = mode == 0 ? start + (m % 8) * 16 + (m / 8) * sbo + (kk % 8) * 2 + (kk / 8) * lbo
                  : start + (m % 8) * 16 * c + (m / 8) * sbo + (kk % 8) * 2 + (kk / 8) * 16;
  } else {
    a = mode == 0 ? start + (m % 8) * 2 + (m / 8) * sbo + (kk % 8) * 16 + (kk / 8) * lbo
                  : start + (m % 8) * 2 + (m / 8 % c) * 16 + (m / (8 * c)) * lbo + (kk % 8) * 16 * c + (kk / 8) * sbo;
  }
  return a ^ (((a >> 7) & (c - 1)) << 4);
}

// The checks every wgmma.mma_async makes at issue (see the header).
inline WgmmaQueue& wgmma_issue_checks(int n) {
  if (n % 8 != 0 || n < 8 || n > 256) throw std::logic_error("emu: wgmma N not in 8, 16, .. 256");
  if (block.nthreads % 128 != 0) throw std::logic_error("emu: wgmma in a block that is not whole warpgroups");
  WgmmaQueue& q = wgmma_queue(self().tid);
  if (!q.fenced) throw std::logic_error("emu: wgmma.mma_async without a wgmma.fence since the last wait_group");
  for (int tid = 0; tid < block.nthreads; ++tid)
    if (wgmma_queue(unsigned(tid)).proxy_dirty)
      throw std::logic_error("emu: wgmma.mma_async while thread " + std::to_string(tid) +
                             "'s cp.async writes are not fenced to the async proxy (fence.proxy.async)");
  return q;
}

template <typename T>
inline void wgmma_rs(float* d, int n, const uint32_t (&a)[4], uint64_t desc_b, bool trans_b, bool accumulate) {
  WgmmaQueue& q = wgmma_issue_checks(n);
  warp_barrier();  // every lane has consumed the previous exchange
  uint64_t* mine = exchange_slots(lane_id());
  for (int i = 0; i < 4; ++i) mine[i] = a[i];
  warp_barrier();  // every lane's A registers are published
  WgmmaOp op{d, n, {}, a, {a[0], a[1], a[2], a[3]}, false, 0, desc_b, false, trans_b, accumulate,
             [](uint16_t b) { return half_to_float<T>(b); }};
  const int g = lane_id() >> 2;
  for (int t = 0; t < 4; ++t) {  // the quad 4g .. 4g + 3 holds rows g and g + 8
    const uint64_t* r = exchange_slots(4 * g + t);
    for (int i = 0; i < 4; ++i)
      for (int h = 0; h < 2; ++h) {
        const uint16_t bits = uint16_t(h ? uint32_t(r[i]) >> 16 : uint32_t(r[i]) & 0xffffu);
        op.a[i & 1][2 * t + h + 8 * (i >> 1)] = half_to_float<T>(bits);
      }
  }
  q.open.push_back(op);
}

template <typename T>
inline void wgmma_ss(float* d, int n, uint64_t desc_a, uint64_t desc_b, bool accumulate, bool trans_a, bool trans_b) {
  WgmmaQueue& q = wgmma_issue_checks(n);
  warp_barrier();  // every lane of the warp issues it (.sync.aligned)
  q.open.push_back({d, n, {}, nullptr, {}, true, desc_a, desc_b, trans_a, trans_b, accumulate,
                    [](uint16_t b) { return half_to_float<T>(b); }});
}

inline void wgmma_fence() { wgmma_queue(self().tid).fenced = true; }

inline void wgmma_commit_group() {
  WgmmaQueue& q = wgmma_queue(self().tid);
  q.groups.push_back(std::move(q.open));
  q.open.clear();
}

inline uint16_t wgmma_operand_bits(uint64_t desc, int mn, int k, bool mn_major) {
  uint16_t bits;
  memcpy(&bits, shared_window_pointer(wgmma_element_address(desc, mn, k, mn_major), 2), 2);
  return bits;
}

inline void wgmma_execute(WgmmaOp op) {
  const int g = lane_id() >> 2, t = lane_id() & 3;
  if (op.a_regs && memcmp(op.a_regs, op.a_issued, sizeof op.a_issued) != 0)
    throw std::logic_error("emu: the A registers of a wgmma were overwritten before its wait_group");
  if (op.a_in_smem) {
    const int row0 = 16 * (int(self().tid) / kWarpSize % 4) + g;
    for (int r = 0; r < 2; ++r)
      for (int k = 0; k < 16; ++k) op.a[r][k] = op.to_float(wgmma_operand_bits(op.desc_a, row0 + 8 * r, k, op.trans_a));
  }
  for (int j = 0; j < op.n / 8; ++j)
    for (int i = 0; i < 4; ++i) {
      const int row = i >> 1, col = 8 * j + 2 * t + (i & 1);
      double dot = 0.0;
      for (int k = 0; k < 16; ++k)
        dot += double(op.a[row][k]) * double(op.to_float(wgmma_operand_bits(op.desc_b, col, k, op.trans_b)));
      float& dst = op.d[4 * j + i];
      dst = float((op.accumulate ? double(dst) : 0.0) + dot);
    }
}

inline void wgmma_wait_group(int n) {
  WgmmaQueue& q = wgmma_queue(self().tid);
  while (q.groups.size() > size_t(n)) {
    for (const WgmmaOp& op : q.groups.front()) wgmma_execute(op);
    q.groups.erase(q.groups.begin());
  }
  q.fenced = false;
}

inline void fence_proxy_async() { wgmma_queue(self().tid).proxy_dirty = false; }

// cp_async.h: this thread's copies landed in shared memory through the generic proxy.
inline void note_generic_shared_write() { wgmma_queue(self().tid).proxy_dirty = true; }

// Called by fibers.h when a thread returns.
inline void wgmma_check_exit() {
  if (wgmma_queues.size() > self().tid) {
    const WgmmaQueue& q = wgmma_queues[self().tid];
    if (!q.open.empty() || !q.groups.empty()) {
      fprintf(stderr, "emu: thread %u exited with wgmma operations pending (no wait_group for them)\n", self().tid);
      abort();
    }
  }
}

}  // namespace emu
