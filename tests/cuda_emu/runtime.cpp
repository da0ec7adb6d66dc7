// The emulator's scheduler: the threads of one block are fibers that run, in a seeded random
// order, until each reaches a barrier (__syncthreads, a warp intrinsic) or returns; a barrier
// opens once every thread it needs has arrived at that same barrier. A state where no fiber
// can run and no barrier can open is a deadlock. See docs/cuda_emulator.md.
#include "cuda_emu.h"

#include <c10/util/Exception.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace cuda_emu {

uint3 g_thread_idx{0, 0, 0};
uint3 g_block_idx{0, 0, 0};
dim3 g_block_dim;
dim3 g_grid_dim;

namespace {

// ---------------------------------------------------------------- context switch
#if defined(__x86_64__)
// Saves the callee-saved registers and the SSE/x87 control words on the current stack, stores
// the stack pointer in *from and resumes the context whose stack pointer is `to`. No signal
// mask syscall (swapcontext makes one per switch, too slow for millions of barrier waits).
extern "C" void cuda_emu_switch(void** from, void* to);
asm(R"(
  .text
  .p2align 4
  .globl cuda_emu_switch
  .hidden cuda_emu_switch
  .type cuda_emu_switch,@function
cuda_emu_switch:
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
  .size cuda_emu_switch,.-cuda_emu_switch
)");
#endif

enum class State { kReady, kWaitBlock, kWaitWarp, kDone, kFailed };

struct Fiber {
  char* stack = nullptr;  // usable range [stack, stack + stack_size), guard page below
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
  uint3 tid{0, 0, 0};
  int linear = 0;
  State state = State::kReady;
  // Barrier this fiber waits at.
  const char* file = nullptr;
  int line = 0;
  const char* what = nullptr;
  // Warp exchange.
  const void* send = nullptr;
  void* recv = nullptr;
  size_t size = 0;
  int src = 0;
  bool ballot = false;
  bool pred = false;
};

struct Emulator {
  std::mutex mutex;
  std::vector<Fiber> fibers;
  size_t stack_size = 0;
  Fiber* current = nullptr;
#if defined(__x86_64__)
  void* scheduler_sp = nullptr;
#else
  ucontext_t scheduler_ctx;
#endif
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  const char* kernel = "";
  uint64_t epoch = 0;
  int threads = 0;
  std::string error;
  std::mt19937_64 rng;
  bool seeded = false;
  std::vector<std::pair<char*, size_t>> shared;  // every registered __shared__ variable
};

Emulator& emu() {
  static Emulator e;
  return e;
}

std::string block_name() {
  std::ostringstream s;
  s << "block (" << g_block_idx.x << "," << g_block_idx.y << "," << g_block_idx.z << ")";
  return s.str();
}

std::string thread_name(const Fiber& f) {
  std::ostringstream s;
  s << "thread (" << f.tid.x << "," << f.tid.y << "," << f.tid.z << ")";
  return s.str();
}

void switch_to_scheduler() {
  Emulator& e = emu();
#if defined(__x86_64__)
  cuda_emu_switch(&e.current->sp, e.scheduler_sp);
#else
  swapcontext(&e.current->ctx, &e.scheduler_ctx);
#endif
}

void fiber_main() {
  Emulator& e = emu();
  try {
    e.body(e.ctx);
    e.current->state = State::kDone;
  } catch (const std::exception& ex) {
    e.error = std::string("exception in device code: ") + ex.what();
    e.current->state = State::kFailed;
  } catch (...) {
    e.error = "unknown exception in device code";
    e.current->state = State::kFailed;
  }
  switch_to_scheduler();
  std::abort();  // a finished fiber is never resumed
}

#if !defined(__x86_64__)
void fiber_trampoline() { fiber_main(); }
#endif

size_t page_size() { return 4096; }

void ensure_fibers(Emulator& e, int n) {
  if (e.stack_size == 0) {
    const char* kb = std::getenv("DDG_EMU_STACK_KB");
    e.stack_size = size_t(kb ? std::max(16, std::atoi(kb)) : 256) * 1024;
  }
  while (static_cast<int>(e.fibers.size()) < n) {
    // Stacks are reserved once and reused by every block; a guard page turns an overflow into a crash.
    const size_t total = e.stack_size + page_size();
    void* mem = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    TORCH_CHECK(mem != MAP_FAILED, "cuda_emu: cannot reserve a fiber stack");
    mprotect(mem, page_size(), PROT_NONE);
    Fiber f;
    f.stack = static_cast<char*>(mem) + page_size();
    e.fibers.push_back(f);
  }
}

void start_fiber(Emulator& e, Fiber& f) {
#if defined(__x86_64__)
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  auto* sp = reinterpret_cast<uint64_t*>((reinterpret_cast<uintptr_t>(f.stack + e.stack_size)) & ~uintptr_t(15));
  *--sp = 0;  // return address of fiber_main (never used); keeps the ABI's 16-byte alignment
  *--sp = reinterpret_cast<uint64_t>(&fiber_main);
  for (int i = 0; i < 6; ++i) *--sp = 0;  // rbp rbx r12 r13 r14 r15
  *--sp = uint64_t(mxcsr) | (uint64_t(fpucw) << 32);
  f.sp = sp;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack;
  f.ctx.uc_stack.ss_size = e.stack_size;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, fiber_trampoline, 0);
#endif
  f.state = State::kReady;
}

void resume(Emulator& e, Fiber& f) {
  e.current = &f;
  g_thread_idx = f.tid;
#if defined(__x86_64__)
  cuda_emu_switch(&e.scheduler_sp, f.sp);
#else
  swapcontext(&e.scheduler_ctx, &f.ctx);
#endif
  e.current = nullptr;
}

// "0-31, 64" from sorted thread indices.
std::string ranges(const std::vector<int>& ids) {
  std::ostringstream s;
  for (size_t i = 0; i < ids.size();) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    if (i) s << ", ";
    s << ids[i];
    if (j > i) s << "-" << ids[j];
    i = j + 1;
  }
  return s.str();
}

std::string deadlock_report(Emulator& e) {
  // Groups of threads in the same place, in the order of their first thread.
  std::vector<std::pair<std::string, std::vector<int>>> groups;
  for (int i = 0; i < e.threads; ++i) {
    const Fiber& f = e.fibers[i];
    std::ostringstream where;
    if (f.state == State::kDone) {
      where << "returned";
    } else {
      where << "wait at " << (f.state == State::kWaitBlock ? "__syncthreads" : f.what) << " (" << f.file << ":"
            << f.line << ")";
      if (f.state == State::kWaitWarp) where << " [warp " << i / 32 << "]";
    }
    auto g = std::find_if(groups.begin(), groups.end(), [&](const auto& p) { return p.first == where.str(); });
    if (g == groups.end()) g = groups.insert(groups.end(), {where.str(), {}});
    g->second.push_back(i);
  }
  std::ostringstream s;
  s << "cuda_emu: deadlock in kernel " << e.kernel << ", " << block_name()
    << ": a barrier is not reached by every thread it needs (linear thread indices):";
  for (auto& [where, ids] : groups) s << "\n  threads " << ranges(ids) << ": " << where;
  return s.str();
}

bool same_site(const Fiber& a, const Fiber& b) {
  return a.line == b.line && a.what == b.what && (a.file == b.file || std::strcmp(a.file, b.file) == 0);
}

// Opens the warp barriers whose lanes have all arrived at the same site. Returns whether any opened.
bool release_warps(Emulator& e) {
  bool released = false;
  for (int w0 = 0; w0 < e.threads; w0 += 32) {
    const int w1 = std::min(w0 + 32, e.threads);
    Fiber& first = e.fibers[w0];
    if (first.state != State::kWaitWarp) continue;
    bool all = true;
    for (int i = w0 + 1; i < w1 && all; ++i)
      all = e.fibers[i].state == State::kWaitWarp && same_site(e.fibers[i], first);
    if (!all) continue;
    if (first.ballot) {
      unsigned bits = 0;
      for (int i = w0; i < w1; ++i) bits |= unsigned(e.fibers[i].pred) << (i - w0);
      for (int i = w0; i < w1; ++i) std::memcpy(e.fibers[i].recv, &bits, sizeof(bits));
    } else {
      for (int i = w0; i < w1; ++i) {
        Fiber& f = e.fibers[i];
        std::memcpy(f.recv, e.fibers[w0 + f.src].send, f.size);
      }
    }
    for (int i = w0; i < w1; ++i) e.fibers[i].state = State::kReady;
    released = true;
  }
  return released;
}

bool release_block(Emulator& e) {
  const Fiber& first = e.fibers[0];
  if (first.state != State::kWaitBlock) return false;
  for (int i = 1; i < e.threads; ++i)
    if (e.fibers[i].state != State::kWaitBlock || !same_site(e.fibers[i], first)) return false;
  ++e.epoch;
  for (int i = 0; i < e.threads; ++i) e.fibers[i].state = State::kReady;
  return true;
}

void poison_shared(Emulator& e) {
  for (auto& [p, n] : e.shared) std::memset(p, 0xFF, n);
}

// Runs one block to completion; returns an error message, empty on success.
std::string run_block(Emulator& e, const dim3& block) {
  e.epoch = 0;
  poison_shared(e);
  for (int i = 0; i < e.threads; ++i) {
    Fiber& f = e.fibers[i];
    f.linear = i;
    f.tid = uint3{unsigned(i % block.x), unsigned((i / block.x) % block.y), unsigned(i / (block.x * block.y))};
    start_fiber(e, f);
  }
  std::vector<int> ready;
  ready.reserve(e.threads);
  for (;;) {
    ready.clear();
    for (int i = 0; i < e.threads; ++i)
      if (e.fibers[i].state == State::kReady) ready.push_back(i);
    if (!ready.empty()) {
      std::shuffle(ready.begin(), ready.end(), e.rng);
      for (int i : ready) {
        resume(e, e.fibers[i]);
        if (e.fibers[i].state == State::kFailed) return e.error;
      }
      continue;
    }
    if (release_warps(e) || release_block(e)) continue;
    bool done = true;
    for (int i = 0; i < e.threads && done; ++i) done = e.fibers[i].state == State::kDone;
    if (done) return "";
    return deadlock_report(e);
  }
}

Fiber& self(const char* what) {
  Fiber* f = emu().current;
  if (!f) {
    std::fprintf(stderr, "cuda_emu: %s called outside a kernel\n", what);
    std::abort();
  }
  return *f;
}

}  // namespace

void run(const char* kernel, dim3 grid, dim3 block, size_t smem, void (*body)(void*), void* ctx) {
  Emulator& e = emu();
  TORCH_CHECK(e.current == nullptr, "cuda_emu: kernel ", kernel, " launched from device code (dynamic parallelism is not emulated)");
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  TORCH_CHECK(threads >= 1 && threads <= 1024 && block.x <= 1024 && block.y <= 1024 && block.z <= 64,
              "cuda_emu: invalid configuration argument launching ", kernel, ": block (", block.x, ",", block.y, ",",
              block.z, ")");
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.x <= 2147483647u && grid.y <= 65535 && grid.z <= 65535,
              "cuda_emu: invalid configuration argument launching ", kernel, ": grid (", grid.x, ",", grid.y, ",",
              grid.z, ")");
  TORCH_CHECK(smem == 0, "cuda_emu: ", kernel, " asks for ", smem,
              " bytes of dynamic shared memory; the emulator supports static __shared__ only");
  std::lock_guard<std::mutex> lock(e.mutex);
  if (!e.seeded) {
    const char* seed = std::getenv("DDG_EMU_SEED");
    e.rng.seed(seed ? std::strtoull(seed, nullptr, 0) : 0x5eedULL);
    e.seeded = true;
  }
  e.threads = static_cast<int>(threads);
  ensure_fibers(e, e.threads);
  e.body = body;
  e.ctx = ctx;
  e.kernel = kernel;
  g_block_dim = block;
  g_grid_dim = grid;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        g_block_idx = uint3{x, y, z};
        std::string err = run_block(e, block);
        if (!err.empty()) {
          e.error.clear();
          TORCH_CHECK(false, err);
        }
      }
}

void block_barrier(const char* file, int line) {
  Fiber& f = self("__syncthreads");
  f.state = State::kWaitBlock;
  f.file = file;
  f.line = line;
  f.what = "__syncthreads";
  switch_to_scheduler();
}

void check_full_mask(const char* file, int line, const char* what, unsigned mask) {
  if (mask != 0xffffffffu) {
    std::ostringstream s;
    s << what << " with mask 0x" << std::hex << mask << ": the emulator supports full-warp masks only";
    fail(file, line, s.str().c_str());
  }
}

void warp_exchange(const char* file, int line, const char* what, const void* send, void* recv, size_t size,
                   int src_lane, bool full_warp) {
  Emulator& e = emu();
  Fiber& f = self(what);
  const int w0 = f.linear / 32 * 32;
  const int lanes = std::min(32, e.threads - w0);
  if (full_warp && lanes < 32) {
    std::ostringstream s;
    s << what << " with a full mask in warp " << f.linear / 32 << ", which has only " << lanes
      << " threads (block size " << e.threads << " is not a multiple of 32)";
    fail(file, line, s.str().c_str());
  }
  if (src_lane < 0 || src_lane >= lanes) {
    std::ostringstream s;
    s << what << ": source lane " << src_lane << " does not exist";
    fail(file, line, s.str().c_str());
  }
  f.state = State::kWaitWarp;
  f.file = file;
  f.line = line;
  f.what = what;
  f.send = send;
  f.recv = recv;
  f.size = size;
  f.src = src_lane;
  f.ballot = false;
  switch_to_scheduler();
}

unsigned warp_ballot(const char* file, int line, const char* what, bool pred) {
  Emulator& e = emu();
  Fiber& f = self(what);
  if (std::min(32, e.threads - f.linear / 32 * 32) < 32) fail(file, line, "warp vote in a partial warp");
  unsigned out = 0;
  f.state = State::kWaitWarp;
  f.file = file;
  f.line = line;
  f.what = what;
  f.recv = &out;
  f.size = sizeof(out);
  f.ballot = true;
  f.pred = pred;
  switch_to_scheduler();
  return out;
}

void fail(const char* file, int line, const char* message) {
  Emulator& e = emu();
  Fiber& f = self("cuda_emu::fail");
  std::ostringstream s;
  s << "cuda_emu: " << message << "\n  in kernel " << e.kernel << ", " << block_name() << ", " << thread_name(f)
    << ", at " << file << ":" << line;
  e.error = s.str();
  f.state = State::kFailed;
  switch_to_scheduler();
  std::abort();  // a failed fiber is never resumed
}

void device_assert_fail(const char* expr, const char* file, int line, const char* func) {
  Emulator& e = emu();
  Fiber* f = e.current;
  // The message CUDA prints for a failed device assert, then the process dies.
  std::fprintf(stderr, "%s:%d: %s: block: [%u,%u,%u], thread: [%u,%u,%u] Assertion `%s` failed. (kernel %s)\n",
               file, line, func, g_block_idx.x, g_block_idx.y, g_block_idx.z, f ? f->tid.x : 0, f ? f->tid.y : 0,
               f ? f->tid.z : 0, expr, e.kernel);
  std::fflush(stderr);
  std::abort();
}

uint64_t block_epoch() { return emu().epoch; }

int linear_thread() { return self("threadIdx").linear; }

bool in_shared_memory(const void* p, size_t size) {
  const char* c = static_cast<const char*>(p);
  for (auto& [q, n] : emu().shared)
    if (c >= q && c + size <= q + n) return true;
  return false;
}

bool register_shared(void* p, size_t size) {
  // Runs on the first execution of the declaration, before any thread can touch the variable.
  emu().shared.emplace_back(static_cast<char*>(p), size);
  std::memset(p, 0xFF, size);
  return true;
}

}  // namespace cuda_emu
