// CUDA loops of the BN-statistics ops (design: docs/bn_stats_cuda.md).
// Statistics: every block summarises one chunk of one channel (NC(S)) or one run of rows for all
// channels (channels fastest) as shifted sums over 16-byte packs, turned into one Welford state per
// (channel, chunk); a finalize kernel merges each channel's states with one warp in a fixed order
// (deterministic). Backward: per-channel coefficients computed once by a tiny kernel, then one
// elementwise pass with 16-byte packs and no per-element index arithmetic.
// Math from csrc/common/welford.h and csrc/common/bn_stats_math.h.
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../common/bn_stats_math.h"
#include "../common/welford.h"
#include "../host/register_bn_stats.h"
#include "bn_stats_tiling.cuh"
#include "common.cuh"

namespace ddg::cuda {
namespace {

// Packs each thread loads before consuming any of them (memory-level parallelism).
constexpr int kUnroll = 4;

struct WelfordMerge {
  template <typename S>
  __device__ __forceinline__ S operator()(const S& a, const S& b) const {
    return welford_merge(a, b);
  }
};

struct ShiftedSumsAdd {
  template <typename S>
  __device__ __forceinline__ S operator()(const S& a, const S& b) const {
    return shifted_sums_add(a, b);
  }
};

// NC(S): block k summarises chunk k % chunks of channel k / chunks (see PlaneChunks); the chunk's
// planes go to teams of `team` threads, each team walking one plane span with 16-byte packs.
// Every element of the block is shifted by the chunk's first element, so the teams' sums add.
template <typename scalar_t, typename acc_t, int VEC>
__global__ void plane_partials_kernel(const scalar_t* __restrict__ x, int64_t C, int64_t S, int64_t N,
                                      PlaneChunks chunks, SpanTeams teams, WelfordState<acc_t>* __restrict__ partials) {
  const int64_t c = blockIdx.x / chunks.per_channel, k = blockIdx.x - c * chunks.per_channel;
  const int64_t n0 = k / chunks.pieces * chunks.planes_per_chunk, n1 = min(N, n0 + chunks.planes_per_chunk);
  const int64_t s0 = (k % chunks.pieces) * kReduceChunk;
  const int len = static_cast<int>(min(S, s0 + kReduceChunk) - s0);
  const acc_t shift = static_cast<acc_t>(x[(n0 * C + c) * S + s0]);
  const int rank = threadIdx.x & (teams.size - 1), team = threadIdx.x >> teams.log2_size;
  ShiftedSums<acc_t> sums = shifted_sums_empty<acc_t>();
  const int64_t plane_step = teams.per_block() * C * S;
  const scalar_t* span = x + ((n0 + team) * C + c) * S + s0;
  for (int64_t n = n0 + team; n < n1; n += teams.per_block(), span += plane_step)
    visit_span<VEC, kUnroll>(span, static_cast<scalar_t*>(nullptr), len, rank, teams.size, [&](const auto& v) {
#pragma unroll
      for (int j = 0; j < kPackSize<std::decay_t<decltype(v)>>; ++j) sums = shifted_sums_update(sums, static_cast<acc_t>(v.v[j]), shift);
    });
  sums = block_reduce(sums, ShiftedSumsAdd());
  if (threadIdx.x == 0)
    partials[blockIdx.x] = welford_from_shifted_sums(acc_t((n1 - n0) * len), shift, sums);
}

// Channels fastest: block k summarises rows [k * rows_per_chunk, ...) of every channel. Threads
// tile (row group, channel pack) (see RowTiling): a warp reads consecutive 16-byte packs of a row,
// each thread keeps VEC channels' sums over its rows, and the row groups of a channel pack add in a
// fixed tree in shared memory. Every channel is shifted by its value in the chunk's first row.
template <typename scalar_t, typename acc_t, int VEC>
__global__ void row_partials_kernel(const scalar_t* __restrict__ x, int64_t C, int64_t R, int64_t rows_per_chunk,
                                    RowTiling tiling, WelfordState<acc_t>* __restrict__ partials) {
  using P = Pack<scalar_t, VEC>;
  using Sums = ShiftedSums<acc_t>;
  __shared__ Sums scratch[kThreads * VEC];
  const int64_t r0 = blockIdx.x * rows_per_chunk, r1 = min(r0 + rows_per_chunk, R);
  const int64_t packs = C / VEC;
  const int rg = threadIdx.x / tiling.packs_per_pass, lane = threadIdx.x - rg * tiling.packs_per_pass;
  for (int64_t pass = 0; pass < packs; pass += tiling.packs_per_pass) {
    const int64_t cp = pass + lane;
    const bool active = rg < tiling.row_groups && cp < packs;
    acc_t shift[VEC];
    Sums sums[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) sums[j] = shifted_sums_empty<acc_t>();
    if (active) {
      const P first = *reinterpret_cast<const P*>(x + r0 * C + cp * VEC);
#pragma unroll
      for (int j = 0; j < VEC; ++j) shift[j] = static_cast<acc_t>(first.v[j]);
      const int64_t step = tiling.row_groups * C;
      const scalar_t* p = x + (r0 + rg) * C + cp * VEC;
      int64_t r = r0 + rg;
      for (; r + (kUnroll - 1) * tiling.row_groups < r1; r += kUnroll * tiling.row_groups) {
        P v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) v[u] = *reinterpret_cast<const P*>(p + u * step);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
#pragma unroll
          for (int j = 0; j < VEC; ++j) sums[j] = shifted_sums_update(sums[j], static_cast<acc_t>(v[u].v[j]), shift[j]);
        p += kUnroll * step;
      }
      for (; r < r1; r += tiling.row_groups, p += step) {
        const P v = *reinterpret_cast<const P*>(p);
#pragma unroll
        for (int j = 0; j < VEC; ++j) sums[j] = shifted_sums_update(sums[j], static_cast<acc_t>(v.v[j]), shift[j]);
      }
    }
    if (tiling.row_groups > 1) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) scratch[threadIdx.x * VEC + j] = sums[j];
      __syncthreads();
      for (int half = tiling.tree_top; half > 0; half /= 2) {
        if (active && rg < half && rg + half < tiling.row_groups) {
          const int other = (threadIdx.x + half * tiling.packs_per_pass) * VEC;
#pragma unroll
          for (int j = 0; j < VEC; ++j)
            scratch[threadIdx.x * VEC + j] = shifted_sums_add(scratch[threadIdx.x * VEC + j], scratch[other + j]);
        }
        __syncthreads();
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) sums[j] = scratch[threadIdx.x * VEC + j];
      __syncthreads();  // the next pass rewrites scratch
    }
    if (active && rg == 0) {
#pragma unroll
      for (int j = 0; j < VEC; ++j)
        partials[blockIdx.x * C + cp * VEC + j] = welford_from_shifted_sums(acc_t(r1 - r0), shift[j], sums[j]);
    }
  }
}

// One warp per channel merges its partials partials[c * c_stride + k * k_stride], k in chunk
// order, by warp_merge_strided: the same bits on every run.
template <typename acc_t>
__global__ void channel_finalize_kernel(const WelfordState<acc_t>* __restrict__ partials, int64_t C, int64_t chunks,
                                        int64_t c_stride, int64_t k_stride, acc_t* __restrict__ mean,
                                        acc_t* __restrict__ var) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(kThreads / kWarp) + threadIdx.x / kWarp;
  if (c >= C) return;  // uniform across the warp: the shuffles below see all 32 lanes
  const WelfordState<acc_t> st =
      warp_merge_strided(partials, c * c_stride, k_stride, chunks, welford_empty<acc_t>(), WelfordMerge());
  if (threadIdx.x % kWarp == 0) {
    mean[c] = st.mean;
    var[c] = welford_variance(st);
  }
}

// (a_c, b_c) of bn_grad_coefs for every channel, once per backward call.
template <typename acc_t>
__global__ void grad_coefs_kernel(const acc_t* __restrict__ gm, const acc_t* __restrict__ gv, acc_t count, int64_t C,
                                  acc_t* __restrict__ a, acc_t* __restrict__ b) {
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < C;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const BnGradCoefs<acc_t> k = bn_grad_coefs(gm[c], gv[c], count);
    a[c] = k.a;
    b[c] = k.b;
  }
}

// NC(S): the team of threads on a plane span (see SpanWalk) reads its channel's coefficients once
// per span and applies them to 16-byte packs (head and tail elements one by one).
template <typename scalar_t, typename acc_t, int VEC>
__global__ void plane_backward_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ a,
                                      const acc_t* __restrict__ b, const acc_t* __restrict__ mu, int64_t C, int64_t S,
                                      int64_t planes, SpanTeams teams, scalar_t* __restrict__ dx) {
  const int rank = threadIdx.x & (teams.size - 1);
  SpanWalk w(C, S, kBackwardPiece,
             blockIdx.x * static_cast<int64_t>(teams.per_block()) + (threadIdx.x >> teams.log2_size),
             static_cast<int64_t>(gridDim.x) * teams.per_block());
  for (; w.plane < planes; w.advance()) {
    const int64_t s0 = w.piece * kBackwardPiece;
    const int len = static_cast<int>(min(S, s0 + kBackwardPiece) - s0);
    const acc_t ka = a[w.channel], kb = b[w.channel], m = mu[w.channel];
    const int64_t base = w.plane * S + s0;
    visit_span<VEC, kUnroll>(x + base, dx + base, len, rank, teams.size, [&](const auto& v) {
      using Q = std::decay_t<decltype(v)>;
      Q out;
#pragma unroll
      for (int j = 0; j < kPackSize<Q>; ++j)
        out.v[j] = static_cast<scalar_t>(bn_grad_value(static_cast<acc_t>(v.v[j]), m, ka, kb));
      return out;
    });
  }
}

// Channels fastest: the (row group, channel pack) tiling of row_partials_kernel over a grid-stride
// run of rows; each thread loads its VEC channels' coefficients once per pass.
template <typename scalar_t, typename acc_t, int VEC>
__global__ void row_backward_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ a,
                                    const acc_t* __restrict__ b, const acc_t* __restrict__ mu, int64_t C, int64_t R,
                                    RowTiling tiling, scalar_t* __restrict__ dx) {
  using P = Pack<scalar_t, VEC>;
  const int64_t packs = C / VEC;
  const int rg = threadIdx.x / tiling.packs_per_pass, lane = threadIdx.x - rg * tiling.packs_per_pass;
  if (rg >= tiling.row_groups) return;  // no barrier below
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * tiling.row_groups;
  for (int64_t cp = lane; cp < packs; cp += tiling.packs_per_pass) {
    acc_t ka[VEC], kb[VEC], m[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) ka[j] = a[cp * VEC + j], kb[j] = b[cp * VEC + j], m[j] = mu[cp * VEC + j];
    auto apply = [&](const P& v) {
      P out;
#pragma unroll
      for (int j = 0; j < VEC; ++j)
        out.v[j] = static_cast<scalar_t>(bn_grad_value(static_cast<acc_t>(v.v[j]), m[j], ka[j], kb[j]));
      return out;
    };
    const int64_t step = row_step * C;
    int64_t r = blockIdx.x * static_cast<int64_t>(tiling.row_groups) + rg;
    int64_t off = r * C + cp * VEC;
    for (; r + (kUnroll - 1) * row_step < R; r += kUnroll * row_step, off += kUnroll * step) {
      P v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) v[u] = *reinterpret_cast<const P*>(x + off + u * step);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) *reinterpret_cast<P*>(dx + off + u * step) = apply(v[u]);
    }
    for (; r < R; r += row_step, off += step) *reinterpret_cast<P*>(dx + off) = apply(*reinterpret_cast<const P*>(x + off));
  }
}

// 16 / sizeof(scalar_t) when every channel pack of every row is 16-byte aligned, else 1.
template <typename scalar_t>
int row_vector_width(int64_t C, std::initializer_list<const void*> ptrs) {
  const int width = vector_width<scalar_t>(ptrs);
  return C % width == 0 ? width : 1;
}

template <typename scalar_t>
void bn_stats_typed(const BnCall& call, at::Tensor& mean, at::Tensor& var) {
  using acc_t = at::opmath_type<scalar_t>;
  using State = WelfordState<acc_t>;
  constexpr int kWidth = 16 / sizeof(scalar_t);
  const c10::cuda::CUDAGuard guard(call.x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t C = call.channels;
  const scalar_t* x = call.x.const_data_ptr<scalar_t>();
  int64_t chunks, c_stride, k_stride;
  at::Tensor partials;
  if (call.layout == ChannelLayout::kPlanes) {
    const PlaneChunks pc = plane_chunks(call.batch, call.inner);
    const int width = vector_width<scalar_t>({x});
    const SpanTeams teams = span_teams(std::min<int64_t>(call.inner, kReduceChunk), width);
    chunks = pc.per_channel;
    c_stride = chunks, k_stride = 1;
    partials = at::empty({C * chunks * int64_t(sizeof(State))}, call.x.options().dtype(at::kByte));
    auto* out = reinterpret_cast<State*>(partials.mutable_data_ptr());
    const unsigned grid = reduction_grid(C * chunks);
    if (width == kWidth)
      plane_partials_kernel<scalar_t, acc_t, kWidth><<<grid, kThreads, 0, stream>>>(x, C, call.inner, call.batch, pc,
                                                                                  teams, out);
    else
      plane_partials_kernel<scalar_t, acc_t, 1><<<grid, kThreads, 0, stream>>>(x, C, call.inner, call.batch, pc,
                                                                             teams, out);
  } else {
    const int64_t R = call.count();
    const int64_t rows_per_chunk = std::max<int64_t>(1, kReduceChunk / C);
    chunks = (R + rows_per_chunk - 1) / rows_per_chunk;
    c_stride = 1, k_stride = C;
    partials = at::empty({C * chunks * int64_t(sizeof(State))}, call.x.options().dtype(at::kByte));
    auto* out = reinterpret_cast<State*>(partials.mutable_data_ptr());
    const unsigned grid = reduction_grid(chunks);
    if (row_vector_width<scalar_t>(C, {x}) == kWidth)
      row_partials_kernel<scalar_t, acc_t, kWidth><<<grid, kThreads, 0, stream>>>(
          x, C, R, rows_per_chunk, row_tiling(C / kWidth), out);
    else
      row_partials_kernel<scalar_t, acc_t, 1><<<grid, kThreads, 0, stream>>>(x, C, R, rows_per_chunk, row_tiling(C),
                                                                            out);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  channel_finalize_kernel<acc_t><<<warp_per_item_blocks(C), kThreads, 0, stream>>>(
      reinterpret_cast<const State*>(partials.const_data_ptr()), C, chunks, c_stride, k_stride,
      mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void bn_backward_typed(const BnCall& call, const at::Tensor& grad_mean, const at::Tensor& grad_var,
                       const at::Tensor& mean, at::Tensor& dx) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kWidth = 16 / sizeof(scalar_t);
  const c10::cuda::CUDAGuard guard(call.x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t C = call.channels, numel = dx.numel();
  const scalar_t* x = call.x.const_data_ptr<scalar_t>();
  scalar_t* out = dx.mutable_data_ptr<scalar_t>();
  const acc_t* mu = mean.const_data_ptr<acc_t>();
  at::Tensor coefs = at::empty({2 * C}, mean.options());
  acc_t* a = coefs.mutable_data_ptr<acc_t>();
  acc_t* b = a + C;
  grad_coefs_kernel<acc_t><<<elementwise_blocks(C), kThreads, 0, stream>>>(
      grad_mean.const_data_ptr<acc_t>(), grad_var.const_data_ptr<acc_t>(), acc_t(call.count()), C, a, b);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (call.layout == ChannelLayout::kPlanes) {
    const int64_t S = call.inner, planes = call.batch * C;
    const int width = vector_width<scalar_t>({x, out});
    const SpanTeams teams = span_teams(std::min<int64_t>(S, kBackwardPiece), width);
    const int64_t spans = planes * ((S + kBackwardPiece - 1) / kBackwardPiece);
    const int64_t grid =
        std::min(elementwise_blocks(numel / width + 1), (spans + teams.per_block() - 1) / teams.per_block());
    if (width == kWidth)
      plane_backward_kernel<scalar_t, acc_t, kWidth><<<grid, kThreads, 0, stream>>>(x, a, b, mu, C, S, planes, teams,
                                                                                  out);
    else
      plane_backward_kernel<scalar_t, acc_t, 1><<<grid, kThreads, 0, stream>>>(x, a, b, mu, C, S, planes, teams, out);
  } else {
    const int64_t R = call.count();
    if (row_vector_width<scalar_t>(C, {x, out}) == kWidth) {
      const RowTiling tiling = row_tiling(C / kWidth);
      row_backward_kernel<scalar_t, acc_t, kWidth>
          <<<row_backward_blocks(R, tiling, numel / kWidth), kThreads, 0, stream>>>(x, a, b, mu, C, R, tiling, out);
    } else {
      const RowTiling tiling = row_tiling(C);
      row_backward_kernel<scalar_t, acc_t, 1>
          <<<row_backward_blocks(R, tiling, numel), kThreads, 0, stream>>>(x, a, b, mu, C, R, tiling, out);
    }
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

DDG_BN_STATS_LOOPS(CudaBnLoops);

}  // namespace ddg::cuda

TORCH_LIBRARY_IMPL(ddg, CUDA, m) { ddg::register_bn_stats_ops<ddg::cuda::CudaBnLoops>(m); }
