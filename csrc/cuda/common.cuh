// CUDA building blocks: 16-byte vector packs, launch sizing, a grid-stride loop over
// vector packs with a scalar tail, and CUB block reductions.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cub/block/block_reduce.cuh>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

namespace ddg::cuda {

constexpr int kThreads = 256;
// Reduction kernels give each block one chunk of one sample: a 1-D grid of batch * chunks blocks.
constexpr int64_t kReduceChunk = 8192;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Elements per 16-byte vector for scalar_t, or 1 when any pointer is misaligned.
template <typename scalar_t>
int vector_width(std::initializer_list<const void*> ptrs) {
  constexpr int kWidth = 16 / sizeof(scalar_t);
  for (const void* p : ptrs)
    if (p && reinterpret_cast<uintptr_t>(p) % 16 != 0) return 1;
  return kWidth;
}

inline int64_t elementwise_blocks(int64_t work_items) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::max<int64_t>(1, std::min<int64_t>((work_items + kThreads - 1) / kThreads, sms * 16));
}

// Grid size of a reduction launch; dim3 would silently truncate an int64 block count.
inline unsigned reduction_grid(int64_t blocks) {
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "ddg: ", blocks,
              " (sample, chunk) blocks exceed the CUDA grid limit; split the batch");
  return static_cast<unsigned>(blocks);
}

inline int64_t chunks_per_sample(int64_t per_sample) {
  return (per_sample + kReduceChunk - 1) / kReduceChunk;
}

// Reduction kernels use a 1-D grid of batch * chunks blocks; block k handles chunk
// k % chunks of sample k / chunks, i.e. the flat range [lo, hi).
struct ChunkRange {
  int64_t sample, lo, hi;
};

__device__ __forceinline__ ChunkRange block_chunk(int64_t per_sample, int64_t chunks) {
  ChunkRange r;
  r.sample = blockIdx.x / chunks;
  r.lo = r.sample * per_sample + (blockIdx.x % chunks) * kReduceChunk;
  r.hi = min(r.lo + kReduceChunk, (r.sample + 1) * per_sample);
  return r;
}

// Grid-stride loop over VEC-element packs of a flat, sample-major array. A pack inside one
// sample goes to pack_fn(sample, first_index) (vectorized); a pack that straddles a sample
// boundary or the end goes element by element to element_fn(sample, index).
template <int VEC, typename PackFn, typename ElementFn>
__device__ __forceinline__ void for_each_pack(int64_t numel, int64_t per_sample, const PackFn& pack_fn,
                                              const ElementFn& element_fn) {
  const int64_t packs = (numel + VEC - 1) / VEC;
  for (int64_t pk = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; pk < packs;
       pk += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i0 = pk * VEC;
    const int64_t b0 = i0 / per_sample;
    if (i0 + VEC <= numel && (i0 + VEC - 1) / per_sample == b0) {
      pack_fn(b0, i0);
    } else {
      for (int64_t i = i0; i < min(i0 + VEC, numel); ++i) element_fn(i / per_sample, i);
    }
  }
}

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(const T& a, const T& b) const {
    return a + b;
  }
};

// The scratch storage is one static __shared__ array per (T, Op) instantiation: a kernel may
// call each instantiation once (every kernel here does), or needs a __syncthreads() between calls.
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T value, Op op) {
  using BlockReduce = cub::BlockReduce<T, kThreads>;
  __shared__ typename BlockReduce::TempStorage storage;
  return BlockReduce(storage).Reduce(value, op);  // valid in thread 0
}

// ---------------------------------------------------------------- warp-level merges
constexpr int kWarp = 32;

// __shfl_xor_sync of any trivially copyable value made of 4-byte words (a Welford state, a pair
// of sums): each word is shuffled on its own.
template <typename T>
__device__ __forceinline__ T shfl_xor_value(const T& v, int lane_mask) {
  static_assert(sizeof(T) % sizeof(int) == 0, "shfl_xor_value needs a size that is a multiple of 4 bytes");
  constexpr int kWords = sizeof(T) / sizeof(int);
  int in[kWords], out[kWords];
  memcpy(in, &v, sizeof(T));
#pragma unroll
  for (int w = 0; w < kWords; ++w) out[w] = __shfl_xor_sync(0xffffffffu, in[w], lane_mask);
  T r;
  memcpy(&r, out, sizeof(T));
  return r;
}

// Butterfly merge over the 32 lanes of a warp in a fixed order (offsets 16, 8, 4, 2, 1): the
// same bits on every run. Every lane ends with a merged value; lane 0's is op applied with the
// lower lane's value on the left at every level, the order the finalize kernels document.
template <typename T, typename Op>
__device__ __forceinline__ T warp_allmerge(T v, Op op) {
  const int lane = threadIdx.x % kWarp;
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const T other = shfl_xor_value(v, offset);
    v = (lane & offset) ? op(other, v) : op(v, other);
  }
  return v;
}

// One warp merges partials[first + k * stride] for k in [0, count): lane l takes k = l, l + 32, ...
// in order, then the lanes merge by warp_allmerge. Deterministic for a given count; every lane of
// the warp must call it (the shuffles need all 32).
template <typename T, typename Op>
__device__ __forceinline__ T warp_merge_strided(const T* __restrict__ partials, int64_t first, int64_t stride,
                                                int64_t count, T empty, Op op) {
  T v = empty;
  for (int64_t k = threadIdx.x % kWarp; k < count; k += kWarp) v = op(v, partials[first + k * stride]);
  return warp_allmerge(v, op);
}

// Launch shape of a finalize kernel with one warp per item (channel or sample).
inline int64_t warp_per_item_blocks(int64_t items) {
  constexpr int64_t kWarpsPerBlock = kThreads / kWarp;
  return std::max<int64_t>(1, (items + kWarpsPerBlock - 1) / kWarpsPerBlock);
}

}  // namespace ddg::cuda
