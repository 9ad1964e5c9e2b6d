// The threads of one CUDA block as cooperative fibers, for tests/cuda_emu.
//
// Every thread of a block runs the real kernel body on its own stack. A thread runs until it
// reaches a barrier (__syncthreads, __syncwarp, or a warp-collective such as a shuffle or an
// mma) and then yields to the scheduler, which resumes the others in a chosen order: forward,
// reverse or pseudo-random (the order changes which thread writes shared memory first, so
// code that only works in one interleaving fails in another). A barrier releases only when
// every thread of its scope has arrived; a pass in which no thread makes progress is a
// deadlock (a barrier some thread never reaches: divergent __syncthreads, a thread that
// returned early) and aborts the run.
//
// Faithful: the set of interleavings allowed between barriers at barrier granularity (each
// thread's code between two barriers runs atomically, in the scheduler's order), barrier
// scope (block or warp) and arrival counts, warp-collective exchanges.
// Not emulated: anything finer than that. Threads between two barriers never overlap here, so
// a data race between two barriers shows up only when the scheduling orders give different
// results; the memory model (visibility without a barrier, volatile, fences) is not modelled.
//
// The switch between fibers: on x86-64 a few instructions of our own (emu_fiber_switch below),
// since glibc's swapcontext makes a sigprocmask system call on every switch, which was 40% of
// the attention driver's run time; elsewhere ucontext.
#pragma once

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <numeric>
#include <vector>

namespace emu {

constexpr int kWarpSize = 32;

// The order in which the scheduler resumes the threads of a block on each pass.
enum class Order { kForward = 0, kReverse = 1, kRandom = 2 };
inline Order order = Order::kForward;

#if defined(__x86_64__)
// emu_fiber_switch(save, load): pushes the callee-saved registers and the SSE and x87 control
// words on the current stack, stores the stack pointer in *save, and resumes the fiber whose
// stack pointer is `load` by the reverse steps (the System V ABI leaves every other register to
// the caller). A new fiber's stack is laid out as such a save would leave it (start_stack).
extern "C" void emu_fiber_switch(void** save, void* load);
asm(R"(
  .text
  .p2align 4
  .type emu_fiber_switch, @function
emu_fiber_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_fiber_switch, .-emu_fiber_switch
)");

struct Context {
  void* sp = nullptr;
};
inline void switch_to(Context& save, const Context& load) { emu_fiber_switch(&save.sp, load.sp); }

// The stack pointer of a fiber that starts in entry(): entry's address where emu_fiber_switch's
// `ret` finds it (16-byte aligned, so entry starts as if called), below it six zeroed callee-saved
// registers and the control words in force now.
inline void* start_stack(std::vector<char>& stack, void (*entry)()) {
  auto top = reinterpret_cast<uintptr_t>(stack.data() + stack.size()) & ~uintptr_t(15);
  auto* slot = reinterpret_cast<uint64_t*>(top) - 2;  // slot[1]: a null return address for entry
  slot[1] = 0;
  slot[0] = reinterpret_cast<uint64_t>(entry);
  uint64_t* sp = slot - 7;
  for (int i = 1; i < 7; ++i) sp[i] = 0;
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(mxcsr), "=m"(fpucw));
  std::memcpy(sp, &mxcsr, 4);
  std::memcpy(reinterpret_cast<char*>(sp) + 4, &fpucw, 2);
  return sp;
}
#else
struct Context {
  ucontext_t ctx;
};
inline void switch_to(Context& save, const Context& load) { swapcontext(&save.ctx, &load.ctx); }
#endif

struct Thread {
  Context ctx;
  unsigned tid = 0;
  bool done = false;
  std::vector<char> stack;
};

// The state of the one block that runs at a time.
struct BlockState {
  std::vector<Thread> threads;
  Thread* current = nullptr;
  Context scheduler;
  int nthreads = 0;
  uint64_t progress = 0;  // arrivals and exits: a pass without any is a deadlock
  unsigned bar_arrived = 0;
  uint64_t bar_generation = 0;
  std::vector<unsigned> warp_arrived;
  std::vector<uint64_t> warp_generation;
  // Per-warp exchange slots of the warp collectives (shuffles, mma fragments): a lane writes
  // its slots between two warp barriers and reads the others' after the second.
  std::vector<uint64_t> exchange;  // [warp][lane][kExchangeSlots]
  const std::function<void()>* body = nullptr;
};
inline BlockState block;
inline uint64_t blocks_run = 0;  // run_block calls so far: per-block state elsewhere resets on change
constexpr int kExchangeSlots = 8;

inline Thread& self() { return *block.current; }
inline void yield() { switch_to(block.current->ctx, block.scheduler); }

// __syncthreads: every thread of the block.
inline void block_barrier() {
  const uint64_t gen = block.bar_generation;
  ++block.progress;
  if (++block.bar_arrived == unsigned(block.nthreads)) {
    block.bar_arrived = 0;
    ++block.bar_generation;
    return;
  }
  while (block.bar_generation == gen) yield();
}

// __syncwarp (full mask): the 32 lanes of the calling thread's warp.
inline void warp_barrier() {
  const int w = int(self().tid) / kWarpSize;
  const uint64_t gen = block.warp_generation[w];
  ++block.progress;
  if (++block.warp_arrived[w] == unsigned(kWarpSize)) {
    block.warp_arrived[w] = 0;
    ++block.warp_generation[w];
    return;
  }
  while (block.warp_generation[w] == gen) yield();
}

// This lane's exchange slots, and those of lane `lane` of the same warp.
inline uint64_t* exchange_slots(int lane) {
  const int w = int(self().tid) / kWarpSize;
  return &block.exchange[(size_t(w) * kWarpSize + lane) * kExchangeSlots];
}
inline int lane_id() { return int(self().tid) % kWarpSize; }

// Checks run when a thread returns (cp_async.h: no copies left pending); null when unused.
inline void (*thread_exit_check)() = nullptr;

// A fiber's first and only frame: it runs the body, then hands control back for good.
inline void thread_entry() {
  (*block.body)();
  if (thread_exit_check) thread_exit_check();
  block.current->done = true;
  ++block.progress;
#if defined(__x86_64__)
  Context finished;
  switch_to(finished, block.scheduler);
  abort();  // a finished fiber is never resumed
#endif
}

// Runs body() once per thread of a block of `nthreads` threads (a multiple of 32) until all
// return. Stacks are reused across blocks, so `threads` is sized once per launch.
inline void run_block(int nthreads, const std::function<void()>& body) {
  constexpr size_t kStack = 256 * 1024;
  if (int(block.threads.size()) != nthreads) {
    block.threads = std::vector<Thread>(nthreads);
    for (Thread& t : block.threads) t.stack.resize(kStack);
  }
  ++blocks_run;
  block.nthreads = nthreads;
  block.body = &body;
  block.bar_arrived = 0;
  block.warp_arrived.assign(nthreads / kWarpSize, 0);
  block.warp_generation.assign(nthreads / kWarpSize, 0);
  block.exchange.assign(size_t(nthreads) * kExchangeSlots, 0);
  for (int i = 0; i < nthreads; ++i) {
    Thread& t = block.threads[i];
    t.tid = unsigned(i);
    t.done = false;
#if defined(__x86_64__)
    t.ctx.sp = start_stack(t.stack, thread_entry);
#else
    getcontext(&t.ctx.ctx);
    t.ctx.ctx.uc_stack.ss_sp = t.stack.data();
    t.ctx.ctx.uc_stack.ss_size = t.stack.size();
    t.ctx.ctx.uc_link = &block.scheduler.ctx;  // where thread_entry's return goes
    makecontext(&t.ctx.ctx, thread_entry, 0);
#endif
  }
  std::vector<int> pass(nthreads);
  std::iota(pass.begin(), pass.end(), 0);
  if (order == Order::kReverse) std::reverse(pass.begin(), pass.end());
  static uint32_t seed = 12345;  // kRandom: a fixed LCG sequence, so runs are reproducible
  for (int live = nthreads; live > 0;) {
    if (order == Order::kRandom)
      for (int i = nthreads - 1; i > 0; --i) {
        seed = seed * 1103515245u + 12345u;
        std::swap(pass[i], pass[(seed >> 8) % uint32_t(i + 1)]);
      }
    const uint64_t before = block.progress;
    for (int i : pass) {
      Thread& t = block.threads[i];
      if (t.done) continue;
      block.current = &t;
      switch_to(block.scheduler, t.ctx);
      if (t.done) --live;
    }
    if (live > 0 && block.progress == before) {
      fprintf(stderr, "emu: deadlock: %d of %d threads wait at a barrier the others never reach "
              "(divergent barrier, or threads that returned before it)\n", live, nthreads);
      abort();
    }
  }
  block.current = nullptr;
}

}  // namespace emu
