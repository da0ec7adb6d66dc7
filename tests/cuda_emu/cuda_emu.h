// CUDA-on-CPU emulator: the language surface the kernels in csrc/cuda use, for g++.
// Every CUDA thread of a block runs as a user-space fiber; __syncthreads() and the warp
// intrinsics are fiber barriers; blocks run one after another. docs/cuda_emulator.md says
// what this checks and what it cannot. The transform (transform.py) includes this header
// first in every kernel file and rewrites launches into cuda_emu::launch.
#pragma once

// c10 defines CUDA_KERNEL_ASSERT for host code as a plain assert; the emulator replaces it
// below, so c10's macros must be seen first.
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#define CUDA_EMU_API __attribute__((visibility("hidden")))

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// __shared__ variables are static storage that the emulator fills with poison bytes (0xFF: NaN
// for floats, -1 for integers) at the start of every block, so storage that is read before it
// is written in the same block shows up. The transform rewrites each `__shared__ T name;` into
// a static plus its registration (CUDA_EMU_SHARED_REGISTER); this fallback only keeps code
// that did not go through the transform compiling.
#define __shared__ static
#define CUDA_EMU_SHARED_REGISTER(name) \
  [[maybe_unused]] static const bool cuda_emu_shared_registered_##name = \
      ::cuda_emu::register_shared(__builtin_addressof(name), sizeof(name))

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};

typedef struct CUstream_st* cudaStream_t;

namespace cuda_emu {

extern CUDA_EMU_API uint3 g_thread_idx;
extern CUDA_EMU_API uint3 g_block_idx;
extern CUDA_EMU_API dim3 g_block_dim;
extern CUDA_EMU_API dim3 g_grid_dim;

// ---- runtime (runtime.cpp)
CUDA_EMU_API void run(const char* kernel, dim3 grid, dim3 block, size_t smem, void (*body)(void*), void* ctx);
CUDA_EMU_API void block_barrier(const char* file, int line);
// Warp barrier of the calling thread's warp that also moves data: when every participating
// lane has arrived (all 32 with full_warp, else the lanes the block has), lane l receives
// `size` bytes from lane src_lane[l]'s `send` into its `recv`.
CUDA_EMU_API void warp_exchange(const char* file, int line, const char* what, const void* send, void* recv,
                                size_t size, int src_lane, bool full_warp);
CUDA_EMU_API unsigned warp_ballot(const char* file, int line, const char* what, bool pred);
CUDA_EMU_API void check_full_mask(const char* file, int line, const char* what, unsigned mask);
// Stops the block with an error that the launch raises as a RuntimeError.
[[noreturn]] CUDA_EMU_API void fail(const char* file, int line, const char* message);
[[noreturn]] CUDA_EMU_API void device_assert_fail(const char* expr, const char* file, int line, const char* func);
// Number of __syncthreads() the current block has completed: accesses of two threads to the
// same shared word in the same epoch, one of them a write, are a race.
CUDA_EMU_API uint64_t block_epoch();
CUDA_EMU_API int linear_thread();
CUDA_EMU_API bool in_shared_memory(const void* p, size_t size);
// Records a __shared__ variable (poisoned now and at the start of every later block).
CUDA_EMU_API bool register_shared(void* p, size_t size);

template <typename T>
inline T poison() {
  T v;
  std::memset(static_cast<void*>(&v), 0xFF, sizeof(T));
  return v;
}

struct LaunchConfig {
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  LaunchConfig(dim3 g, dim3 b, size_t s = 0, cudaStream_t st = nullptr) : grid(g), block(b), smem(s), stream(st) {}
};

// k<<<g, b, smem, stream>>>(args...): the arguments are converted to the kernel's parameter
// types once, as a launch does; every thread then runs the kernel on its own copy.
template <typename... P, typename... A>
void launch(const LaunchConfig& cfg, const char* name, void (*kernel)(P...), A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
  using Params = std::tuple<std::decay_t<P>...>;
  Params params(std::forward<A>(args)...);
  struct Ctx {
    void (*kernel)(P...);
    const Params* params;
  } ctx{kernel, &params};
  run(name, cfg.grid, cfg.block, cfg.smem,
      [](void* c) {
        const Ctx* x = static_cast<const Ctx*>(c);
        Params mine = *x->params;
        std::apply(x->kernel, mine);
      },
      &ctx);
}

template <typename T>
inline void require_shuffle_type() {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8 && (sizeof(T) == 2 || sizeof(T) >= 4),
                "CUDA shuffles move 2-, 4- or 8-byte scalars (int, unsigned, long long, float, double, half)");
}

inline int lane_id() { return linear_thread() % 32; }

template <typename T>
inline T shfl(const char* file, int line, unsigned mask, T v, int src, int width) {
  require_shuffle_type<T>();
  check_full_mask(file, line, "__shfl_sync", mask);
  const int lane = lane_id(), base = lane & ~(width - 1);
  T out;
  warp_exchange(file, line, "__shfl_sync", &v, &out, sizeof(T), base + (src & (width - 1)), true);
  return out;
}

template <typename T>
inline T shfl_xor(const char* file, int line, unsigned mask, T v, int lane_mask, int width) {
  require_shuffle_type<T>();
  check_full_mask(file, line, "__shfl_xor_sync", mask);
  const int lane = lane_id();
  int src = lane ^ lane_mask;
  if ((src & ~(width - 1)) != (lane & ~(width - 1))) src = lane;  // outside the segment: own value
  T out;
  warp_exchange(file, line, "__shfl_xor_sync", &v, &out, sizeof(T), src, true);
  return out;
}

template <typename T>
inline T shfl_down(const char* file, int line, unsigned mask, T v, unsigned delta, int width) {
  require_shuffle_type<T>();
  check_full_mask(file, line, "__shfl_down_sync", mask);
  const int lane = lane_id(), seg = lane & ~(width - 1);
  const int src = (lane - seg) + static_cast<int>(delta) < width ? lane + static_cast<int>(delta) : lane;
  T out;
  warp_exchange(file, line, "__shfl_down_sync", &v, &out, sizeof(T), src, true);
  return out;
}

template <typename T>
inline T shfl_up(const char* file, int line, unsigned mask, T v, unsigned delta, int width) {
  require_shuffle_type<T>();
  check_full_mask(file, line, "__shfl_up_sync", mask);
  const int lane = lane_id(), seg = lane & ~(width - 1);
  const int src = lane - seg >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : lane;
  T out;
  warp_exchange(file, line, "__shfl_up_sync", &v, &out, sizeof(T), src, true);
  return out;
}

inline void syncwarp(const char* file, int line, unsigned mask) {
  check_full_mask(file, line, "__syncwarp", mask);
  char none = 0, got;
  warp_exchange(file, line, "__syncwarp", &none, &got, 1, lane_id(), true);
}

// Rounded operations nvcc never contracts into an FMA: the empty asm hides the product from
// the optimiser, so -ffp-contract=fast cannot fuse it with a later add either.
template <typename T>
inline T opaque(T v) {
  asm volatile("" : "+m"(v));
  return v;
}

}  // namespace cuda_emu

inline const uint3& threadIdx = cuda_emu::g_thread_idx;
inline const uint3& blockIdx = cuda_emu::g_block_idx;
inline const dim3& blockDim = cuda_emu::g_block_dim;
inline const dim3& gridDim = cuda_emu::g_grid_dim;
constexpr int warpSize = 32;

#define __syncthreads() ::cuda_emu::block_barrier(__FILE__, __LINE__)
#define __syncwarp(...) ::cuda_emu::syncwarp(__FILE__, __LINE__, ::cuda_emu_detail_mask(__VA_ARGS__))
inline unsigned cuda_emu_detail_mask(unsigned m = 0xffffffffu) { return m; }
#define __shfl_sync(mask, v, ...) ::cuda_emu::shfl(__FILE__, __LINE__, mask, v, ::cuda_emu_detail_lane_width(__VA_ARGS__))
#define __shfl_xor_sync(mask, v, ...) \
  ::cuda_emu::shfl_xor(__FILE__, __LINE__, mask, v, ::cuda_emu_detail_lane_width(__VA_ARGS__))
#define __shfl_down_sync(mask, v, ...) \
  ::cuda_emu::shfl_down(__FILE__, __LINE__, mask, v, ::cuda_emu_detail_lane_width(__VA_ARGS__))
#define __shfl_up_sync(mask, v, ...) \
  ::cuda_emu::shfl_up(__FILE__, __LINE__, mask, v, ::cuda_emu_detail_lane_width(__VA_ARGS__))
// (lane, width = 32) as two arguments: a helper struct would change the overload set, so the
// macros pass both through this pair-returning shim and the functions take them apart.
struct CudaEmuLaneWidth {
  int lane, width;
};
inline CudaEmuLaneWidth cuda_emu_detail_lane_width(int lane, int width = 32) { return {lane, width}; }
namespace cuda_emu {
template <typename T>
inline T shfl(const char* f, int l, unsigned m, T v, CudaEmuLaneWidth lw) { return shfl(f, l, m, v, lw.lane, lw.width); }
template <typename T>
inline T shfl_xor(const char* f, int l, unsigned m, T v, CudaEmuLaneWidth lw) {
  return shfl_xor(f, l, m, v, lw.lane, lw.width);
}
template <typename T>
inline T shfl_down(const char* f, int l, unsigned m, T v, CudaEmuLaneWidth lw) {
  return shfl_down(f, l, m, v, static_cast<unsigned>(lw.lane), lw.width);
}
template <typename T>
inline T shfl_up(const char* f, int l, unsigned m, T v, CudaEmuLaneWidth lw) {
  return shfl_up(f, l, m, v, static_cast<unsigned>(lw.lane), lw.width);
}
}  // namespace cuda_emu

#define __ballot_sync(mask, pred) \
  (::cuda_emu::check_full_mask(__FILE__, __LINE__, "__ballot_sync", mask), \
   ::cuda_emu::warp_ballot(__FILE__, __LINE__, "__ballot_sync", (pred) != 0))
#define __all_sync(mask, pred) \
  (::cuda_emu::check_full_mask(__FILE__, __LINE__, "__all_sync", mask), \
   ::cuda_emu::warp_ballot(__FILE__, __LINE__, "__all_sync", (pred) != 0) == 0xffffffffu)
#define __any_sync(mask, pred) \
  (::cuda_emu::check_full_mask(__FILE__, __LINE__, "__any_sync", mask), \
   ::cuda_emu::warp_ballot(__FILE__, __LINE__, "__any_sync", (pred) != 0) != 0u)
inline unsigned __activemask() { return 0xffffffffu; }
// Fibers of a block never run at the same time and blocks run in order: fences have nothing to order.
inline void __threadfence() {}
inline void __threadfence_block() {}

// A failing device assert kills the process, as it poisons the CUDA context on a GPU.
#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond) \
  do { \
    if (C10_UNLIKELY(!(cond))) ::cuda_emu::device_assert_fail(#cond, __FILE__, __LINE__, __func__); \
  } while (0)
#undef CUDA_KERNEL_ASSERT_MSG
#define CUDA_KERNEL_ASSERT_MSG(cond, msg) CUDA_KERNEL_ASSERT(cond)

// ---- device math that host C++ lacks (global namespace, like CUDA's)
inline int min(int a, int b) { return a < b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double max(double a, double b) { return fmax(a, b); }

// Approximate intrinsics are computed exactly here: the emulator checks logic and order, not
// the last ulp of the hardware approximations.
inline float rsqrtf(float v) { return 1.0f / sqrtf(v); }
inline double rsqrt(double v) { return 1.0 / sqrt(v); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float v) { return expf(v); }
inline float __logf(float v) { return logf(v); }
inline float __log2f(float v) { return log2f(v); }
inline float __powf(float a, float b) { return powf(a, b); }
inline float __sinf(float v) { return sinf(v); }
inline float __cosf(float v) { return cosf(v); }
inline float __tanhf(float v) { return tanhf(v); }
inline float __saturatef(float v) { return v < 0.0f ? 0.0f : (v > 1.0f ? 1.0f : v); }
inline float __fmul_rn(float a, float b) { return cuda_emu::opaque(a * b); }
inline double __dmul_rn(double a, double b) { return cuda_emu::opaque(a * b); }
inline float __fadd_rn(float a, float b) { return cuda_emu::opaque(a + b); }
inline double __dadd_rn(double a, double b) { return cuda_emu::opaque(a + b); }
inline float __fsub_rn(float a, float b) { return cuda_emu::opaque(a - b); }
inline double __dsub_rn(double a, double b) { return cuda_emu::opaque(a - b); }
inline float __fdiv_rn(float a, float b) { return cuda_emu::opaque(a / b); }
inline double __ddiv_rn(double a, double b) { return cuda_emu::opaque(a / b); }
inline float __frcp_rn(float a) { return cuda_emu::opaque(1.0f / a); }
inline double __drcp_rn(double a) { return cuda_emu::opaque(1.0 / a); }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline double __dsqrt_rn(double a) { return sqrt(a); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
inline int __float2int_rn(float v) { return static_cast<int>(nearbyintf(v)); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned>(v)); }
inline int __ffs(int v) { return __builtin_ffs(v); }

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

// One fiber runs at a time, so a read-modify-write is atomic by construction.
template <typename T, typename F>
inline T atomic_update(T* p, const F& f) {
  const T old = *p;
  *p = f(old);
  return old;
}
template <typename T>
inline T atomicAdd(T* p, T v) { return atomic_update(p, [v](T o) { return o + v; }); }
template <typename T>
inline T atomicMax(T* p, T v) { return atomic_update(p, [v](T o) { return o > v ? o : v; }); }
template <typename T>
inline T atomicMin(T* p, T v) { return atomic_update(p, [v](T o) { return o < v ? o : v; }); }
template <typename T>
inline T atomicExch(T* p, T v) { return atomic_update(p, [v](T) { return v; }); }
template <typename T>
inline T atomicCAS(T* p, T compare, T v) { return atomic_update(p, [compare, v](T o) { return o == compare ? v : o; }); }
