// Loops over per-sample ranges of a flat, sample-major array without an integer division per
// element: elementwise kernels take the sample from blockIdx.y, reductions give each block one
// chunk of one sample. Inside a range, 16-byte packs start at the first VEC-aligned index; the
// unaligned head and the tail go element by element.
#pragma once

#include "common.cuh"

namespace ddg::cuda {

// Thread `thread` of `threads` cooperating threads calls pack_fn(i0) for packs [i0, i0 + VEC)
// inside [lo, hi) with i0 % VEC == 0, and elem_fn(i) for the other indices of the range.
// Data pointers must be 16-byte aligned when VEC > 1 (see vector_width). The unaligned head and
// the tail have fewer than VEC elements each, and threads >= VEC, so each is one guarded call.
template <int VEC, typename PackFn, typename ElemFn>
__device__ __forceinline__ void for_each_in_range(int64_t lo, int64_t hi, int64_t thread, int64_t threads,
                                                  const PackFn& pack_fn, const ElemFn& elem_fn) {
  if (VEC == 1) {
    for (int64_t i = lo + thread; i < hi; i += threads) elem_fn(i);
    return;
  }
  const int64_t first = min(hi, (lo + VEC - 1) / VEC * VEC);
  const int64_t last = max(first, hi / VEC * VEC);
  if (thread < first - lo) elem_fn(lo + thread);
  for (int64_t i0 = first + thread * VEC; i0 < last; i0 += threads * VEC) pack_fn(i0);
  if (thread < hi - last) elem_fn(last + thread);
}

// ---------------------------------------------------------------- elementwise: sample = blockIdx.y

// Grid of an elementwise pass: y walks the samples (grid-stride past the 65535 limit), x splits
// one sample into enough blocks to fill the device.
inline dim3 per_sample_grid(int64_t batch, int64_t per_sample, int vec) {
  const int64_t y = std::max<int64_t>(1, std::min<int64_t>(batch, 65535));
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t per_block = int64_t(vec) * kThreads;
  const int64_t want = (per_sample + per_block - 1) / per_block;
  const int64_t cap = std::max<int64_t>(1, sms * 16 / y);
  return dim3(static_cast<unsigned>(std::max<int64_t>(1, std::min(want, cap))), static_cast<unsigned>(y));
}

// fn(b) for each sample b this block's row of the grid owns.
template <typename Fn>
__device__ __forceinline__ void for_each_grid_sample(int64_t batch, const Fn& fn) {
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) fn(b);
}

// The grid-stride range loop of one sample across the blocks of a grid row.
template <int VEC, typename PackFn, typename ElemFn>
__device__ __forceinline__ void for_each_in_sample(int64_t b, int64_t per_sample, const PackFn& pack_fn,
                                                   const ElemFn& elem_fn) {
  for_each_in_range<VEC>(b * per_sample, (b + 1) * per_sample,
                         blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x,
                         static_cast<int64_t>(gridDim.x) * blockDim.x, pack_fn, elem_fn);
}

// ---------------------------------------------------------------- reductions: one block per chunk

// Chunking of a per-sample reduction. The chunk length depends only on the sample length and
// the dtype's pack width, so a sample's summation order does not depend on the batch or the
// device: a few packs per thread (short per-thread runs), and up to kTargetChunks chunks per
// sample so that even a one-sample latent spreads over the whole device.
struct SampleChunks {
  int64_t length;  // elements per chunk
  int64_t count;   // chunks per sample
};

inline SampleChunks sample_chunks(int64_t per_sample, int pack_width) {
  constexpr int64_t kTargetChunks = 256, kMaxPacksPerThread = 16;
  const int64_t per_pass = int64_t(pack_width) * kThreads;
  const int64_t packs = (per_sample + kTargetChunks * per_pass - 1) / (kTargetChunks * per_pass);
  const int64_t length = per_pass * std::max<int64_t>(1, std::min(packs, kMaxPacksPerThread));
  return {length, std::max<int64_t>(1, (per_sample + length - 1) / length)};
}

// Block k of a reduction grid handles chunk k % chunks.count of sample k / chunks.count.
struct ChunkOfBlock {
  int64_t sample, lo, hi;
};

__device__ __forceinline__ ChunkOfBlock chunk_of_block(int64_t per_sample, SampleChunks chunks) {
  ChunkOfBlock r;
  // 32-bit: reduction_grid keeps batch * chunks below 2^31.
  const unsigned count = static_cast<unsigned>(chunks.count);
  r.sample = blockIdx.x / count;
  const int64_t start = r.sample * per_sample;
  r.lo = start + static_cast<int64_t>(blockIdx.x % count) * chunks.length;
  r.hi = min(r.lo + chunks.length, start + per_sample);
  return r;
}

// fn(i0) / fn(i) over this block's chunk, each thread taking every blockDim.x-th pack.
template <int VEC, typename PackFn, typename ElemFn>
__device__ __forceinline__ void for_each_in_chunk(const ChunkOfBlock& r, const PackFn& pack_fn,
                                                  const ElemFn& elem_fn) {
  for_each_in_range<VEC>(r.lo, r.hi, threadIdx.x, blockDim.x, pack_fn, elem_fn);
}

// Warp w of the grid (one warp per sample in the finalize kernels), or -1 past `items`.
__device__ __forceinline__ int64_t warp_item(int64_t items) {
  const int64_t w = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarp;
  return w < items ? w : -1;
}

}  // namespace ddg::cuda
