// cp.async (sm_80 asynchronous global -> shared copies) on the CPU, for tests/cuda_emu
// (csrc/cuda/tensor_core.cuh's cp_async16 / cp_async_commit / cp_async_wait<N> call these when
// FUSEDFORMER_CUDA_EMULATION is set).
//
// PTX semantics kept (PTX ISA, "cp.async", "cp.async.commit_group", "cp.async.wait_group"):
//   - cp.async.cg.shared.global [dst], [src], 16, src_size: the 16 bytes land at dst only
//     when the issuing thread waits for them; until then shared memory keeps what it held
//     (the NaN poison, or the previous stage's tile), so a read before the wait, or by
//     another thread before a barrier that follows the wait, sees stale data. src_size < 16
//     reads that many bytes and zero-fills the rest (0: nothing is read);
//   - copies are per thread: commit_group closes this thread's open copies into a group;
//     wait_group N lands every committed group but the N most recent. Copies not yet
//     committed are not covered by any wait and stay pending (the adversarial choice: on the
//     hardware they may land at any time);
//   - dst must be 16-byte aligned and inside the block's shared memory (dynamic buffer or a
//     static __shared__ array), src 16-byte aligned when it is read;
//   - a thread that exits with copies still pending is an error (their landing time is
//     undefined), reported as a deadlock-style abort with a message.
// The source bytes are read at issue time: global memory does not change during a kernel here.
// Not emulated: the cp-size 4 / 8 forms, .ca, cache hints, mbarrier-based completion.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "fibers.h"

namespace emu {

bool in_shared_memory(const void* p, size_t bytes);  // cuda_shim.h
void note_generic_shared_write();                     // wgmma.h: the async proxy must be fenced

struct CpAsyncCopy {
  unsigned char* dst;
  unsigned char data[16];
};
struct CpAsyncQueue {
  std::vector<CpAsyncCopy> open;                   // issued, not yet committed
  std::vector<std::vector<CpAsyncCopy>> groups;    // committed, oldest first
  bool empty() const { return open.empty() && groups.empty(); }
};
inline std::vector<CpAsyncQueue> cp_async_queues;  // per thread of the running block

inline CpAsyncQueue& cp_async_queue() {
  if (cp_async_queues.size() < size_t(block.nthreads)) cp_async_queues.resize(size_t(block.nthreads));
  return cp_async_queues[self().tid];
}

// Bank conflicts of the copies' shared-memory writes. The k-th cp.async of each lane of a warp
// is taken as one warp instruction (the kernels issue them in warp-uniform loops); like a
// 16-byte st.shared it is served a quarter warp (8 lanes, 128 bytes) at a time, one wavefront
// per quarter when its 8 chunks fall in distinct banks, else as many as the most distinct
// words any bank holds. Counted when the 32nd lane arrives; instructions that some lanes never
// reach (a divergent tail) are not counted. The drivers fail a run with any extra wavefront.
struct CpAsyncBankStats {
  uint64_t instructions = 0, extra_wavefronts = 0;
};
inline CpAsyncBankStats cp_async_bank_stats;

struct CpAsyncWarpWrites {
  std::vector<std::array<uintptr_t, kWarpSize>> dst;  // per instruction index: the lanes' dst
  std::vector<int> arrived;                           // per instruction index: lanes so far
  uint64_t lane_count[kWarpSize] = {};                // cp.async issued per lane in this block
};
inline std::vector<CpAsyncWarpWrites> cp_async_warp_writes;
inline uint64_t cp_async_block = ~0ull;  // blocks_run the state above belongs to

// Wavefronts beyond one for the 8 16-byte writes of a quarter warp.
inline int quarter_extra_wavefronts(const uintptr_t* dst) {
  uintptr_t words[32][8];
  int n[32] = {}, most = 1;
  for (int l = 0; l < 8; ++l)
    for (uintptr_t word = dst[l] / 4; word < dst[l] / 4 + 4; ++word) {
      const int bank = int(word % 32);
      if (std::find(words[bank], words[bank] + n[bank], word) == words[bank] + n[bank]) words[bank][n[bank]++] = word;
      most = std::max(most, n[bank]);
    }
  return most - 1;
}

inline void count_cp_async_write(const void* smem) {
  if (cp_async_block != blocks_run) {
    cp_async_warp_writes.assign(size_t(block.nthreads / kWarpSize), {});
    cp_async_block = blocks_run;
  }
  CpAsyncWarpWrites& w = cp_async_warp_writes[self().tid / kWarpSize];
  const uint64_t k = w.lane_count[lane_id()]++;
  if (w.dst.size() <= k) {
    w.dst.resize(k + 1);
    w.arrived.resize(k + 1, 0);
  }
  w.dst[k][lane_id()] = reinterpret_cast<uintptr_t>(smem);
  if (++w.arrived[k] < kWarpSize) return;
  ++cp_async_bank_stats.instructions;
  for (int quarter = 0; quarter < 4; ++quarter)
    cp_async_bank_stats.extra_wavefronts += uint64_t(quarter_extra_wavefronts(&w.dst[k][8 * quarter]));
}

inline void cp_async16(void* smem, const void* gmem, int src_size) {
  if (src_size < 0 || src_size > 16) throw std::logic_error("emu: cp.async src-size out of [0, 16]");
  if (reinterpret_cast<uintptr_t>(smem) % 16 != 0) throw std::logic_error("emu: cp.async dst not 16-byte aligned");
  if (!in_shared_memory(smem, 16)) throw std::logic_error("emu: cp.async dst outside shared memory");
  if (src_size > 0 && reinterpret_cast<uintptr_t>(gmem) % 16 != 0)
    throw std::logic_error("emu: cp.async src not 16-byte aligned");
  count_cp_async_write(smem);
  CpAsyncCopy c{static_cast<unsigned char*>(smem), {}};
  if (src_size > 0) memcpy(c.data, gmem, size_t(src_size));  // the rest stays zero
  cp_async_queue().open.push_back(c);
}

inline void cp_async_commit_group() {
  CpAsyncQueue& q = cp_async_queue();
  q.groups.push_back(std::move(q.open));  // an empty group is legal
  q.open.clear();
}

inline void cp_async_wait_group(int n) {
  CpAsyncQueue& q = cp_async_queue();
  while (q.groups.size() > size_t(n)) {
    for (const CpAsyncCopy& c : q.groups.front()) memcpy(c.dst, c.data, 16);
    if (!q.groups.front().empty()) note_generic_shared_write();
    q.groups.erase(q.groups.begin());
  }
}

// Called by fibers.h when a thread returns.
inline void cp_async_check_exit() {
  if (cp_async_queues.size() > self().tid && !cp_async_queues[self().tid].empty()) {
    fprintf(stderr, "emu: thread %u exited with cp.async copies pending (no wait_group for them)\n", self().tid);
    abort();
  }
}

}  // namespace emu
