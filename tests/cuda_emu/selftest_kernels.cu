// Kernels for the emulator's self-tests (tests/cuda_emu/test_emulator.py): correct uses that
// must give CUB's / the hardware's bits, and planted faults the emulator must catch. Built into
// the emulator library through the same transform as csrc/cuda, exposed as
// torch.ops.cuda_emu_selftest.run(kernel, x, arg, block).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "common.cuh"

namespace cuda_emu_selftest {
namespace {

constexpr int kBlock = 256;
using FloatReduce = cub::BlockReduce<float, kBlock>;

// Thread 0 of each block writes the block's CUB sum; with every_thread, every thread writes what
// it got (poison everywhere but thread 0).
__global__ void block_sum_kernel(const float* __restrict__ x, float* __restrict__ out, int every_thread) {
  __shared__ typename FloatReduce::TempStorage storage;
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const float s = FloatReduce(storage).Sum(x[i]);
  if (every_thread)
    out[i] = s;
  else if (threadIdx.x == 0)
    out[blockIdx.x] = s;
}

// A non-associative, non-commutative merge: the result encodes the reduction tree.
struct TreeOp {
  __device__ uint64_t operator()(uint64_t a, uint64_t b) const { return a * 1000003u + b * 7u + 1u; }
};

__global__ void tree_order_kernel(const int64_t* __restrict__ x, int64_t* __restrict__ out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const uint64_t r = ddg::cuda::block_reduce(static_cast<uint64_t>(x[i]), TreeOp());
  if (threadIdx.x == 0) out[blockIdx.x] = static_cast<int64_t>(r);
}

// Two reductions through one TempStorage; CUB requires a barrier between them.
__global__ void reduce_twice_kernel(const float* __restrict__ x, float* __restrict__ out, int barrier) {
  __shared__ typename FloatReduce::TempStorage storage;
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const float a = FloatReduce(storage).Sum(x[i]);
  if (barrier) __syncthreads();
  const float b = FloatReduce(storage).Sum(2.0f * x[i]);
  if (threadIdx.x == 0) out[blockIdx.x] = a + b;
}

// mode 0: every thread syncs (correct); 1: only the lower half does; 2: odd and even threads
// wait at two different barriers; 3: the upper half returns before the barrier.
__global__ void divergent_sync_kernel(const float* __restrict__ x, float* __restrict__ out, int mode) {
  const int t = threadIdx.x, i = blockIdx.x * blockDim.x + t;
  if (mode == 1) {
    if (t < kBlock / 2) __syncthreads();
  } else if (mode == 2) {
    if (t % 2)
      __syncthreads();
    else
      __syncthreads();
  } else {
    if (mode == 3 && t >= kBlock / 2) return;
    __syncthreads();
  }
  out[i] = x[i];
}

// Each thread reads its neighbour's shared slot: needs a barrier after the writes.
__global__ void neighbour_kernel(const float* __restrict__ x, float* __restrict__ out, int barrier) {
  __shared__ float buf[kBlock];
  const int t = threadIdx.x, i = blockIdx.x * blockDim.x + t;
  buf[t] = x[i];
  if (barrier) __syncthreads();
  out[i] = buf[(t + 1) % kBlock];
}

// Block 0 fills shared memory, later blocks only read it: they must see poison, not block 0's data.
__global__ void stale_shared_kernel(const float* __restrict__ x, float* __restrict__ out) {
  __shared__ float buf[kBlock];
  const int t = threadIdx.x, i = blockIdx.x * blockDim.x + t;
  if (blockIdx.x == 0) buf[t] = x[i];
  __syncthreads();
  out[i] = buf[t];
}

// One 16-byte pack per thread from x + offset (offset 1: a misaligned vector load).
__global__ void pack_load_kernel(const float* __restrict__ x, float* __restrict__ out, int offset) {
  using P = ddg::cuda::Pack<float, 4>;
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const P p = *reinterpret_cast<const P*>(x + offset + 4 * i);
#pragma unroll
  for (int j = 0; j < 4; ++j) out[4 * i + j] = p.v[j];
}

// Every lane writes warp_allmerge's sum (common.cuh): the same bits in all 32 lanes.
__global__ void warp_allsum_kernel(const float* __restrict__ x, float* __restrict__ out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  out[i] = ddg::cuda::warp_allmerge(x[i], ddg::cuda::SumOp());
}

// __shfl_down_sync / __shfl_sync / __shfl_up_sync / __ballot_sync semantics per lane.
__global__ void shuffles_kernel(const float* __restrict__ x, float* __restrict__ out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const float v = x[i];
  out[5 * i + 0] = __shfl_down_sync(0xffffffffu, v, 3);
  out[5 * i + 1] = __shfl_sync(0xffffffffu, v, 5);
  out[5 * i + 2] = __shfl_up_sync(0xffffffffu, v, 2);
  out[5 * i + 3] = __shfl_xor_sync(0xffffffffu, v, 1, 16);
  out[5 * i + 4] = static_cast<float>(__popc(__ballot_sync(0xffffffffu, v > 0.0f)));
}

// A device assert on x[i] >= 0.
__global__ void assert_kernel(const float* __restrict__ x, float* __restrict__ out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  CUDA_KERNEL_ASSERT(x[i] >= 0.0f);
  out[i] = x[i];
}

at::Tensor run(const std::string& kernel, const at::Tensor& x_in, int64_t arg, int64_t block) {
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.numel();
  const unsigned grid = static_cast<unsigned>(n / block);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int a = static_cast<int>(arg);
  if (kernel == "tree_order") {
    at::Tensor out = at::empty({static_cast<int64_t>(grid)}, x.options());
    tree_order_kernel<<<grid, block, 0, stream>>>(x.const_data_ptr<int64_t>(), out.mutable_data_ptr<int64_t>());
    return out;
  }
  const float* xp = x.const_data_ptr<float>();
  if (kernel == "pack_load") {  // 4 * threads + 4 elements: room for the shifted loads
    TORCH_CHECK((n - 4) % (4 * block) == 0, "cuda_emu_selftest: pack_load needs 4 * threads + 4 elements");
    at::Tensor out = at::empty({n - 4}, x.options());
    pack_load_kernel<<<static_cast<unsigned>(out.numel() / 4 / block), block>>>(xp, out.mutable_data_ptr<float>(), a);
    return out;
  }
  TORCH_CHECK(n % block == 0, "cuda_emu_selftest: numel must be a multiple of the block size");
  if (kernel == "shuffles") {
    at::Tensor out = at::empty({n * 5}, x.options());
    shuffles_kernel<<<grid, block, 0>>>(xp, out.mutable_data_ptr<float>());
    return out;
  }
  at::Tensor out = at::full({n}, -7.0f, x.options());
  float* o = out.mutable_data_ptr<float>();
  if (kernel == "block_sum")
    block_sum_kernel<<<grid, block, 0, stream>>>(xp, o, a);
  else if (kernel == "reduce_twice")
    reduce_twice_kernel<<<grid, block, 0, stream>>>(xp, o, a);
  else if (kernel == "divergent_sync")
    divergent_sync_kernel<<<grid, block, 0, stream>>>(xp, o, a);
  else if (kernel == "neighbour")
    neighbour_kernel<<<grid, block, 0, stream>>>(xp, o, a);
  else if (kernel == "stale_shared")
    stale_shared_kernel<<<grid, block>>>(xp, o);
  else if (kernel == "warp_allsum")
    warp_allsum_kernel<<<grid, block>>>(xp, o);
  else if (kernel == "assert")
    assert_kernel<<<grid, block>>>(xp, o);
  else
    TORCH_CHECK(false, "cuda_emu_selftest: unknown kernel ", kernel);
  return out;
}

}  // namespace
}  // namespace cuda_emu_selftest

TORCH_LIBRARY(cuda_emu_selftest, m) { m.def("run(str kernel, Tensor x, int arg, int block) -> Tensor"); }

TORCH_LIBRARY_IMPL(cuda_emu_selftest, CUDA, m) { m.impl("run", &cuda_emu_selftest::run); }
