// CUDA loops of the BN-statistics ops. Statistics: per-thread Welford, a CUB block merge
// per (channel, chunk) for NC(S) tensors or per (row chunk, channel) for channels-fastest
// tensors, then a finalize kernel merging each channel's partials in chunk order
// (deterministic). Backward: one elementwise grid-stride pass (16-byte packs along NC(S) planes). Math from
// csrc/common/welford.h and csrc/common/bn_stats_math.h.
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../common/bn_stats_math.h"
#include "../common/welford.h"
#include "../host/register_bn_stats.h"
#include "common.cuh"

namespace ddg::cuda {
namespace {

struct WelfordMerge {
  template <typename S>
  __device__ __forceinline__ S operator()(const S& a, const S& b) const {
    return welford_merge(a, b);
  }
};

// NC(S): block k reduces chunk k % chunks of channel k / chunks, a range of that channel's
// M = N*S elements in (plane, offset) order; threads stride along planes (coalesced).
template <typename scalar_t, typename acc_t>
__global__ void plane_partials_kernel(const scalar_t* __restrict__ x, int64_t C, int64_t S, int64_t count,
                                      int64_t chunks, WelfordState<acc_t>* __restrict__ partials) {
  const int64_t c = blockIdx.x / chunks;
  const int64_t v0 = (blockIdx.x % chunks) * kReduceChunk, v1 = min(v0 + kReduceChunk, count);
  WelfordState<acc_t> st = welford_empty<acc_t>();
  for (int64_t v = v0 + threadIdx.x; v < v1; v += blockDim.x) {
    const int64_t n = v / S;
    st = welford_update(st, static_cast<acc_t>(x[(n * C + c) * S + (v - n * S)]));
  }
  st = block_reduce(st, WelfordMerge());
  if (threadIdx.x == 0) partials[blockIdx.x] = st;
}

// Channels fastest: block k reduces rows [k*rows_per_chunk, ...) for every channel; thread
// t takes channels t, t + blockDim, ... so a warp reads consecutive channels of a row.
template <typename scalar_t, typename acc_t>
__global__ void row_partials_kernel(const scalar_t* __restrict__ x, int64_t C, int64_t R, int64_t rows_per_chunk,
                                    WelfordState<acc_t>* __restrict__ partials) {
  const int64_t r0 = blockIdx.x * rows_per_chunk, r1 = min(r0 + rows_per_chunk, R);
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    WelfordState<acc_t> st = welford_empty<acc_t>();
    for (int64_t r = r0; r < r1; ++r) st = welford_update(st, static_cast<acc_t>(x[r * C + c]));
    partials[blockIdx.x * C + c] = st;
  }
}

// Merges channel c's partials, found at partials[c * c_stride + k * k_stride], in order k.
template <typename acc_t>
__global__ void channel_finalize_kernel(const WelfordState<acc_t>* __restrict__ partials, int64_t C, int64_t chunks,
                                        int64_t c_stride, int64_t k_stride, acc_t* __restrict__ mean,
                                        acc_t* __restrict__ var) {
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < C;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    WelfordState<acc_t> st = welford_empty<acc_t>();
    for (int64_t k = 0; k < chunks; ++k) st = welford_merge(st, partials[c * c_stride + k * k_stride]);
    mean[c] = st.mean;
    var[c] = welford_variance(st);
  }
}

// NC(S): every plane has one channel, so packs inside a plane share the coefficients.
template <typename scalar_t, typename acc_t, int VEC>
__global__ void plane_backward_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ gm,
                                      const acc_t* __restrict__ gv, const acc_t* __restrict__ mu, int64_t C,
                                      int64_t S, acc_t count, scalar_t* __restrict__ dx, int64_t numel) {
  using P = Pack<scalar_t, VEC>;
  auto coefs = [&](int64_t plane) { return bn_grad_coefs(gm[plane % C], gv[plane % C], count); };
  for_each_pack<VEC>(
      numel, S,
      [&](int64_t plane, int64_t i0) {
        const BnGradCoefs<acc_t> k = coefs(plane);
        const acc_t m = mu[plane % C];
        const P xp = *reinterpret_cast<const P*>(x + i0);
        P op;
#pragma unroll
        for (int j = 0; j < VEC; ++j) op.v[j] = static_cast<scalar_t>(bn_grad_value(static_cast<acc_t>(xp.v[j]), m, k.a, k.b));
        *reinterpret_cast<P*>(dx + i0) = op;
      },
      [&](int64_t plane, int64_t i) {
        const BnGradCoefs<acc_t> k = coefs(plane);
        dx[i] = static_cast<scalar_t>(bn_grad_value(static_cast<acc_t>(x[i]), mu[plane % C], k.a, k.b));
      });
}

// Channels fastest: consecutive threads take consecutive channels of a row (coalesced).
template <typename scalar_t, typename acc_t>
__global__ void row_backward_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ gm,
                                    const acc_t* __restrict__ gv, const acc_t* __restrict__ mu, int64_t C,
                                    acc_t count, scalar_t* __restrict__ dx, int64_t numel) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = i % C;
    const BnGradCoefs<acc_t> k = bn_grad_coefs(gm[c], gv[c], count);
    dx[i] = static_cast<scalar_t>(bn_grad_value(static_cast<acc_t>(x[i]), mu[c], k.a, k.b));
  }
}

template <typename scalar_t>
void bn_stats_typed(const BnCall& call, at::Tensor& mean, at::Tensor& var) {
  using acc_t = at::opmath_type<scalar_t>;
  using State = WelfordState<acc_t>;
  const c10::cuda::CUDAGuard guard(call.x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t C = call.channels;
  const scalar_t* x = call.x.const_data_ptr<scalar_t>();
  int64_t chunks, c_stride, k_stride;
  at::Tensor partials;
  if (call.layout == ChannelLayout::kPlanes) {
    chunks = chunks_per_sample(call.count());
    c_stride = chunks, k_stride = 1;
    partials = at::empty({C * chunks * int64_t(sizeof(State))}, call.x.options().dtype(at::kByte));
    plane_partials_kernel<scalar_t, acc_t><<<reduction_grid(C * chunks), kThreads, 0, stream>>>(
        x, C, call.inner, call.count(), chunks, reinterpret_cast<State*>(partials.mutable_data_ptr()));
  } else {
    const int64_t R = call.count();
    const int64_t rows_per_chunk = std::max<int64_t>(1, kReduceChunk / C);
    chunks = (R + rows_per_chunk - 1) / rows_per_chunk;
    c_stride = 1, k_stride = C;
    partials = at::empty({C * chunks * int64_t(sizeof(State))}, call.x.options().dtype(at::kByte));
    row_partials_kernel<scalar_t, acc_t><<<reduction_grid(chunks), kThreads, 0, stream>>>(
        x, C, R, rows_per_chunk, reinterpret_cast<State*>(partials.mutable_data_ptr()));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  channel_finalize_kernel<acc_t><<<elementwise_blocks(C), kThreads, 0, stream>>>(
      reinterpret_cast<const State*>(partials.const_data_ptr()), C, chunks, c_stride, k_stride,
      mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void bn_backward_typed(const BnCall& call, const at::Tensor& grad_mean, const at::Tensor& grad_var,
                       const at::Tensor& mean, at::Tensor& dx) {
  using acc_t = at::opmath_type<scalar_t>;
  const c10::cuda::CUDAGuard guard(call.x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t numel = dx.numel();
  const scalar_t* x = call.x.const_data_ptr<scalar_t>();
  scalar_t* out = dx.mutable_data_ptr<scalar_t>();
  const acc_t* gm = grad_mean.const_data_ptr<acc_t>();
  const acc_t* gv = grad_var.const_data_ptr<acc_t>();
  const acc_t* mu = mean.const_data_ptr<acc_t>();
  const acc_t count = acc_t(call.count());
  if (call.layout == ChannelLayout::kPlanes) {
    constexpr int kWidth = 16 / sizeof(scalar_t);
    if (vector_width<scalar_t>({x, out}) == kWidth)
      plane_backward_kernel<scalar_t, acc_t, kWidth><<<elementwise_blocks(numel / kWidth + 1), kThreads, 0, stream>>>(
          x, gm, gv, mu, call.channels, call.inner, count, out, numel);
    else
      plane_backward_kernel<scalar_t, acc_t, 1><<<elementwise_blocks(numel), kThreads, 0, stream>>>(
          x, gm, gv, mu, call.channels, call.inner, count, out, numel);
  } else {
    row_backward_kernel<scalar_t, acc_t><<<elementwise_blocks(numel), kThreads, 0, stream>>>(
        x, gm, gv, mu, call.channels, count, out, numel);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

DDG_BN_STATS_LOOPS(CudaBnLoops);

}  // namespace ddg::cuda

TORCH_LIBRARY_IMPL(ddg, CUDA, m) { ddg::register_bn_stats_ops<ddg::cuda::CudaBnLoops>(m); }
