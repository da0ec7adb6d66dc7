// CUDA loops of the split-token ops (docs/methods/gendd.md §3). Mirrors csrc/cpu/split_token.cpp;
// all per-element math comes from csrc/common/split_token_math.h, which the CPU tests cover.
//  * prepare: one warp per output row, the B*N target rows (x0) then the M noised rows; lanes over C.
//  * adaLN modulate: one block per row (grid-stride over rows), the row in registers (RowShape);
//    mean from sums shifted by the row's first element (split_token_math.h), variance about it in a
//    second pass, then the output pass (CUB block reductions).
//  * its backward: a block per fixed group of rows, rows in order; each thread owns up to COLS
//    columns of a row and keeps their x-hat / g / g-hat in registers between the row-sum pass (one
//    CUB reduction of (sum g_xhat, sum g_xhat xhat)) and the dx / grad_scale_rows pass, and the LN
//    weight/bias gradients of its columns in registers across the group; [groups, W] partials are
//    written once per group and a finalize kernel sums every column over the groups in a fixed
//    order: deterministic, no atomics.
//  * condition-row sums (the gradients of shift/scale/gate shared through cond_index): the same
//    column-sum kernel over segments of a stable sort of cond_index: deterministic, no atomics.
//  * gated residual (+ backward): grid-stride elementwise, 16-byte packs when every pointer, the
//    row width and the gate's row stride allow it.
//  * diffusion loss: one warp per row (shuffle reductions over C); backward one warp per row too.
// Index ranges (cond_index, permutation, timesteps) are checked with CUDA_KERNEL_ASSERT.
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "../common/split_token_math.h"
#include "../host/register_split_token.h"
#include "common.cuh"

namespace ddg::cuda {
namespace {

// ---------------------------------------------------------------- shared helpers

__device__ __forceinline__ float row_sqrt(float v) { return sqrtf(v); }
__device__ __forceinline__ double row_sqrt(double v) { return sqrt(v); }

// A rounded product that nvcc never contracts into an FMA with a later add/subtract. The LN
// backward needs g_xhat to be bitwise the same value in the row sum and in dx: otherwise
// g_xhat - mean(g_xhat) (exactly 0 for W = 1) becomes an FMA residual amplified by rstd.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

// The condition row of row r: cond_index[r] (range-checked) or r itself.
__device__ __forceinline__ int64_t cond_row_of(const int64_t* index, int64_t r, int64_t cond_rows) {
  if (index == nullptr) return r;
  const int64_t ci = index[r];
  CUDA_KERNEL_ASSERT(ci >= 0 && ci < cond_rows);
  return ci;
}

// Row kernels loop over rows (or row groups) with a grid stride, so any count is correct.
constexpr int64_t kMaxRowBlocks = int64_t(1) << 20;
inline unsigned row_grid(int64_t blocks) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(blocks, kMaxRowBlocks)));
}

// Block-wide reduction whose result every thread gets. Must be reached by all BLOCK threads; the
// trailing barrier lets the caller call it again (same instantiation) right away.
template <int BLOCK, typename T, typename Op>
__device__ __forceinline__ T block_allreduce(T value, Op op) {
  using BlockReduce = cub::BlockReduce<T, BLOCK>;
  __shared__ typename BlockReduce::TempStorage storage;
  __shared__ T result;
  const T r = BlockReduce(storage).Reduce(value, op);  // valid in thread 0
  if (threadIdx.x == 0) result = r;
  __syncthreads();
  const T out = result;
  __syncthreads();
  return out;
}

template <typename acc_t>
struct SumPair {
  acc_t a, b;
};

struct PairSumOp {
  template <typename P>
  __device__ __forceinline__ P operator()(const P& x, const P& y) const {
    return P{x.a + y.a, x.b + y.b};
  }
};

// Calls fn(std::integral_constant<int, VEC>) with 16-byte packs when `vectorizable`, else 1.
template <typename scalar_t, typename Fn>
void with_pack_width(bool vectorizable, const Fn& fn) {
  if (vectorizable)
    fn(std::integral_constant<int, 16 / sizeof(scalar_t)>());
  else
    fn(std::integral_constant<int, 1>());
}

// ---------------------------------------------------------------- targets

template <typename scalar_t, typename acc_t>
struct PrepareArgs {
  const scalar_t* f;      // [B, D]
  const scalar_t* mu;     // [B, D] or null
  const int64_t* perm;    // [B] or null
  const int64_t* t;       // [M]
  const scalar_t* noise;  // [M, C]
  const acc_t* sab;       // [T]
  const acc_t* s1ab;      // [T]
  TargetCoefs<acc_t> k;
  int64_t batch, N, C, D, tokens, rows, steps;
};

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t contracted(const PrepareArgs<scalar_t, acc_t>& p, const scalar_t* f,
                                            const scalar_t* mu, int64_t j) {
  const acc_t v = static_cast<acc_t>(f[j]);
  return mu ? contract_value(v, static_cast<acc_t>(mu[j]), p.k.keep, p.k.contract) : v;
}

// One warp per row of the tokens + M output rows (row q < tokens: x0 of token q; else x_t of row
// q - tokens), lanes over its C elements: the row's sample, partner and timestep are found once per
// row, not per element (no integer division in the element loop).
constexpr int kRowWarps = kThreads / kWarp;  // rows per block per iteration

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) prepare_kernel(PrepareArgs<scalar_t, acc_t> p, scalar_t* __restrict__ x_t,
                                                           scalar_t* __restrict__ x0) {
  const int lane = threadIdx.x % kWarp;
  const int64_t C = p.C, total = p.tokens + p.rows;
  for (int64_t q = blockIdx.x * static_cast<int64_t>(kRowWarps) + threadIdx.x / kWarp; q < total;
       q += static_cast<int64_t>(gridDim.x) * kRowWarps) {  // warp-uniform
    const bool target = q < p.tokens;
    const int64_t r = q - p.tokens, token = target ? q : r % p.tokens;
    const int64_t b = token / p.N, offset = (token - b * p.N) * C;
    const scalar_t* f = p.f + b * p.D + offset;
    const scalar_t* mu = p.mu ? p.mu + b * p.D + offset : nullptr;
    const scalar_t *f2 = nullptr, *mu2 = nullptr;
    if (p.perm) {
      const int64_t partner = p.perm[b];
      CUDA_KERNEL_ASSERT(partner >= 0 && partner < p.batch);
      f2 = p.f + partner * p.D + offset;
      mu2 = p.mu ? p.mu + partner * p.D + offset : nullptr;
    }
    acc_t sab = 0, s1ab = 0;
    if (!target) {
      const int64_t step = p.t[r];
      CUDA_KERNEL_ASSERT(step >= 0 && step < p.steps);
      sab = p.sab[step];
      s1ab = p.s1ab[step];
    }
    scalar_t* out = target ? x0 + q * C : x_t + r * C;
    const scalar_t* noise = p.noise + (target ? 0 : r * C);
    for (int64_t j = lane; j < C; j += kWarp) {
      acc_t v = contracted(p, f, mu, j);
      if (f2) v = mix_value(v, contracted(p, f2, mu2, j), p.k.mix, p.k.mix_rest);
      out[j] = static_cast<scalar_t>(target ? v : noised_value(v, static_cast<acc_t>(noise[j]), sab, s1ab));
    }
  }
}

template <typename scalar_t>
void prepare_typed(const PrepareCall& c, at::Tensor& x_t_out, at::Tensor& x0_out) {
  using acc_t = at::opmath_type<scalar_t>;
  const c10::cuda::CUDAGuard guard(c.features.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  PrepareArgs<scalar_t, acc_t> p;
  p.f = c.features.const_data_ptr<scalar_t>();
  p.mu = c.prototypes.defined() ? c.prototypes.const_data_ptr<scalar_t>() : nullptr;
  p.perm = c.permutation.defined() ? c.permutation.const_data_ptr<int64_t>() : nullptr;
  p.t = c.timesteps.const_data_ptr<int64_t>();
  p.noise = c.noise.const_data_ptr<scalar_t>();
  p.sab = c.sqrt_ab.const_data_ptr<acc_t>();
  p.s1ab = c.sqrt_one_minus_ab.const_data_ptr<acc_t>();
  p.k = TargetCoefs<acc_t>{acc_t(c.keep), acc_t(c.contract), acc_t(c.mix), acc_t(c.mix_rest)};
  p.batch = c.batch;
  p.N = c.num_tokens();
  p.C = c.token_size;
  p.D = c.dim;
  p.tokens = c.batch * p.N;
  p.rows = c.rows;
  p.steps = c.steps;
  const int64_t total = p.tokens + p.rows;
  if (total == 0 || p.C == 0) return;
  prepare_kernel<scalar_t, acc_t><<<row_grid((total + kRowWarps - 1) / kRowWarps), kThreads, 0, stream>>>(
      p, x_t_out.mutable_data_ptr<scalar_t>(), x0_out.mutable_data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------- LayerNorm + adaLN

template <typename scalar_t, typename acc_t>
struct ModulateArgs {
  const scalar_t* x;     // [M, W]
  const scalar_t* w;     // [W] or null
  const scalar_t* bias;  // [W] or null
  const scalar_t* shift;
  const scalar_t* scale;
  int64_t shift_stride, scale_stride;  // row strides of the condition rows
  const int64_t* index;                // [M] or null
  int64_t rows, width, cond_rows;
  acc_t eps;
};

// Launch shape of the LN row kernels: BLOCK threads, thread t owning columns p0 + t + k * BLOCK
// (k < COLS) of each panel p0 = 0, PANEL, 2 PANEL, ... (PANEL = BLOCK * COLS). A row of up to PANEL
// columns is one panel: its elements stay in the threads' registers from the statistics pass to the
// output pass, so x (and in the backward g, scale) is read from global memory once. Wider rows
// (W > 8192, 4096 in fp64) reload each panel in the later passes.
template <int BLOCK, int COLS>
struct RowShape {
  static constexpr int kBlock = BLOCK, kCols = COLS;
  static constexpr int64_t kPanel = int64_t(BLOCK) * COLS;
};

// The smallest shape whose panel holds the row; fp64 (two registers a value) keeps half the columns
// per thread, or half the threads for the widest rows, so that no shape spills.
template <typename acc_t, typename Fn>
void with_row_shape(int64_t width, const Fn& fn) {
  constexpr int s = sizeof(acc_t) / sizeof(float);
  if (width <= 256 / s)
    fn(RowShape<64, 4 / s>());
  else if (width <= 1024 / s)
    fn(RowShape<128, 8 / s>());
  else if (width <= 2048 / s)
    fn(RowShape<256, 8 / s>());
  else if (width <= 4096 / s)
    fn(RowShape<512, 8 / s>());
  else
    fn(RowShape<512 / s, 16>());
}

template <typename scalar_t, typename acc_t, int BLOCK, int COLS>
__global__ void __launch_bounds__(BLOCK) modulate_kernel(ModulateArgs<scalar_t, acc_t> a, scalar_t* __restrict__ out,
                                                         acc_t* __restrict__ mean_out, acc_t* __restrict__ rstd_out) {
  constexpr int64_t kPanel = int64_t(BLOCK) * COLS;
  const int64_t W = a.width;
  const bool one_panel = W <= kPanel;
  for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {  // block-uniform
    const int64_t ci = cond_row_of(a.index, r, a.cond_rows);
    const scalar_t* xr = a.x + r * W;
    const scalar_t* shift = a.shift + ci * a.shift_stride;
    const scalar_t* scale = a.scale + ci * a.scale_stride;
    scalar_t* o = out + r * W;
    acc_t xv[COLS];  // this thread's columns of the current panel; past W: the shift (adds zero below)
    const acc_t s = static_cast<acc_t>(xr[0]);
    auto load = [&](int64_t p0) {
      const int64_t c0 = p0 + threadIdx.x, left = W - c0;
#pragma unroll
      for (int k = 0; k < COLS; ++k) xv[k] = k * BLOCK < left ? static_cast<acc_t>(xr[c0 + k * BLOCK]) : s;
    };
    acc_t sum = 0;
    for (int64_t p0 = 0; p0 < W; p0 += kPanel) {
      load(p0);
#pragma unroll
      for (int k = 0; k < COLS; ++k) sum += shifted_value(xv[k], s);
    }
    const acc_t mean = mean_from_shifted_sum(s, block_allreduce<BLOCK>(sum, SumOp()), acc_t(W));
    acc_t sq = 0;
    for (int64_t p0 = 0; p0 < W; p0 += kPanel) {
      if (!one_panel) load(p0);
      const int64_t left = W - p0 - threadIdx.x;
#pragma unroll
      for (int k = 0; k < COLS; ++k) {
        const acc_t d = k * BLOCK < left ? xv[k] - mean : acc_t(0);
        sq += d * d;
      }
    }
    const acc_t rstd = acc_t(1) / row_sqrt(block_allreduce<BLOCK>(sq, SumOp()) / acc_t(W) + a.eps);
    if (threadIdx.x == 0) {
      mean_out[r] = mean;
      rstd_out[r] = rstd;
    }
    for (int64_t p0 = 0; p0 < W; p0 += kPanel) {
      if (!one_panel) load(p0);
      const int64_t c0 = p0 + threadIdx.x, left = W - c0;
#pragma unroll
      for (int k = 0; k < COLS; ++k) {
        if (k * BLOCK < left) {
          const int64_t i = c0 + k * BLOCK;
          acc_t y = (xv[k] - mean) * rstd;
          if (a.w) y = y * static_cast<acc_t>(a.w[i]);
          if (a.bias) y = y + static_cast<acc_t>(a.bias[i]);
          o[i] = static_cast<scalar_t>(modulate_value(y, static_cast<acc_t>(scale[i]), static_cast<acc_t>(shift[i])));
        }
      }
    }
  }
}

template <typename scalar_t>
void modulate_typed(const ModulateCall& c, at::Tensor& out, at::Tensor& mean, at::Tensor& rstd) {
  using acc_t = at::opmath_type<scalar_t>;
  const c10::cuda::CUDAGuard guard(c.x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  ModulateArgs<scalar_t, acc_t> a;
  a.x = c.x.const_data_ptr<scalar_t>();
  a.w = c.weight.defined() ? c.weight.const_data_ptr<scalar_t>() : nullptr;
  a.bias = c.bias.defined() ? c.bias.const_data_ptr<scalar_t>() : nullptr;
  a.shift = c.shift.t.const_data_ptr<scalar_t>();
  a.scale = c.scale.t.const_data_ptr<scalar_t>();
  a.shift_stride = c.shift.row_stride;
  a.scale_stride = c.scale.row_stride;
  a.index = c.cond_index.defined() ? c.cond_index.const_data_ptr<int64_t>() : nullptr;
  a.rows = c.rows;
  a.width = c.width;
  a.cond_rows = c.cond_rows;
  a.eps = acc_t(c.eps);
  if (c.rows == 0) return;
  with_row_shape<acc_t>(c.width, [&](auto shape) {
    using Shape = decltype(shape);
    modulate_kernel<scalar_t, acc_t, Shape::kBlock, Shape::kCols><<<row_grid(c.rows), Shape::kBlock, 0, stream>>>(
        a, out.mutable_data_ptr<scalar_t>(), mean.mutable_data_ptr<acc_t>(), rstd.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename scalar_t, typename acc_t>
struct ModulateGradArgs {
  const scalar_t* x;     // [M, W]
  const scalar_t* g;     // [M, W]
  const scalar_t* w;     // [W] or null
  const scalar_t* bias;  // [W] or null
  const scalar_t* scale;
  int64_t scale_stride;
  const int64_t* index;  // [M] or null
  const acc_t* mean;     // [M]
  const acc_t* rstd;     // [M]
  int64_t rows, width, cond_rows;
  int64_t rows_per_group, groups;
};

// Block k handles groups k, k + gridDim.x, ...; a group's rows in order.
template <typename scalar_t, typename acc_t, int BLOCK, int COLS>
__global__ void __launch_bounds__(BLOCK)
    modulate_backward_kernel(ModulateGradArgs<scalar_t, acc_t> a, scalar_t* __restrict__ dx,
                             scalar_t* __restrict__ dscale, acc_t* __restrict__ partial_w,
                             acc_t* __restrict__ partial_b) {
  constexpr int64_t kPanel = int64_t(BLOCK) * COLS;
  const int64_t W = a.width;
  const bool one_panel = W <= kPanel;  // else the host gave every row its own group
  for (int64_t grp = blockIdx.x; grp < a.groups; grp += gridDim.x) {  // block-uniform
    const int64_t r0 = grp * a.rows_per_group, r1 = min(r0 + a.rows_per_group, a.rows);
    acc_t acc_w[COLS], acc_b[COLS];  // this thread's columns of the group's LN affine gradients
#pragma unroll
    for (int k = 0; k < COLS; ++k) acc_w[k] = acc_b[k] = acc_t(0);
    // Column c0 + k * BLOCK of a panel exists when k * BLOCK < W - c0 (c0 = the thread's first column).
    auto flush = [&](int64_t p0) {
      const int64_t c0 = p0 + threadIdx.x, left = W - c0;
#pragma unroll
      for (int k = 0; k < COLS; ++k) {
        if (k * BLOCK < left) {
          if (partial_w) partial_w[grp * W + c0 + k * BLOCK] = acc_w[k];
          if (partial_b) partial_b[grp * W + c0 + k * BLOCK] = acc_b[k];
        }
        acc_w[k] = acc_b[k] = acc_t(0);
      }
    };
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t ci = cond_row_of(a.index, r, a.cond_rows);
      const scalar_t* xr = a.x + r * W;
      const scalar_t* gr = a.g + r * W;
      const scalar_t* scale = a.scale + ci * a.scale_stride;
      const acc_t mean = a.mean[r], rstd = a.rstd[r];
      // gy = g (1 + scale) is dL/dy for the LN output y; g_xhat = gy * w, both rounded by mul_rn so
      // they are the same bits in the row sums and in dx (g_xhat is recomputed there from the w the
      // output pass loads anyway: one register array less). Columns past W hold zeros.
      acc_t xh[COLS], gv[COLS], gy[COLS];
      auto load = [&](int64_t p0) {
        const int64_t c0 = p0 + threadIdx.x, left = W - c0;
#pragma unroll
        for (int k = 0; k < COLS; ++k) {
          xh[k] = gv[k] = gy[k] = acc_t(0);
          if (k * BLOCK < left) {
            const int64_t i = c0 + k * BLOCK;
            xh[k] = (static_cast<acc_t>(xr[i]) - mean) * rstd;
            gv[k] = static_cast<acc_t>(gr[i]);
            gy[k] = mul_rn(gv[k], acc_t(1) + static_cast<acc_t>(scale[i]));
          }
        }
      };
      SumPair<acc_t> s{acc_t(0), acc_t(0)};
      for (int64_t p0 = 0; p0 < W; p0 += kPanel) {
        load(p0);
        const int64_t c0 = p0 + threadIdx.x, left = W - c0;
#pragma unroll
        for (int k = 0; k < COLS; ++k) {
          const acc_t gxh = a.w && k * BLOCK < left ? mul_rn(gy[k], static_cast<acc_t>(a.w[c0 + k * BLOCK])) : gy[k];
          s.a += gxh;
          s.b += gxh * xh[k];
        }
      }
      s = block_allreduce<BLOCK>(s, PairSumOp());
      const acc_t mean_g = s.a / acc_t(W), mean_gx = s.b / acc_t(W);
      for (int64_t p0 = 0; p0 < W; p0 += kPanel) {
        if (!one_panel) load(p0);
        const int64_t c0 = p0 + threadIdx.x, left = W - c0;
#pragma unroll
        for (int k = 0; k < COLS; ++k) {
          if (k * BLOCK < left) {
            const int64_t i = c0 + k * BLOCK;
            const acc_t wv = a.w ? static_cast<acc_t>(a.w[i]) : acc_t(1);
            const acc_t gxh = a.w ? mul_rn(gy[k], wv) : gy[k];
            const acc_t y = xh[k] * wv + (a.bias ? static_cast<acc_t>(a.bias[i]) : acc_t(0));
            dx[r * W + i] = static_cast<scalar_t>(layer_norm_input_grad(gxh, xh[k], rstd, mean_g, mean_gx));
            dscale[r * W + i] = static_cast<scalar_t>(gv[k] * y);
            acc_w[k] += gy[k] * xh[k];
            acc_b[k] += gy[k];
          }
        }
        if (!one_panel) flush(p0);
      }
    }
    if (one_panel) flush(0);
  }
}

// out[u, col] = the sum over k in [offsets[u], offsets[u + 1]) of src[row(k) * W + col], row(k) =
// order[k] (k itself without order; without offsets one segment [0, rows)). A block covers kFinalCols
// columns of segments blockIdx.y, blockIdx.y + gridDim.y, ...: thread (x, y) sums k = lo + y,
// lo + y + kFinalSlices, ... in order (a warp reads 32 adjacent columns of a row), then thread (x, 0)
// adds the slices in order. The order depends only on the segment lengths: deterministic.
constexpr int kFinalCols = 32, kFinalSlices = 8;
constexpr int64_t kMaxGridY = 65535;

template <typename src_t, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kFinalCols* kFinalSlices)
    segment_column_sum_kernel(const src_t* __restrict__ src, const int64_t* __restrict__ order,
                              const int64_t* __restrict__ offsets, int64_t rows, int64_t segments, int64_t W,
                              scalar_t* __restrict__ out) {
  __shared__ acc_t slice_sums[kFinalSlices][kFinalCols];
  const int64_t col = blockIdx.x * static_cast<int64_t>(kFinalCols) + threadIdx.x;
  if (offsets && threadIdx.x == 0 && threadIdx.y == 0)  // every row belongs to a segment: indices in range
    CUDA_KERNEL_ASSERT(offsets[0] == 0 && offsets[segments] == rows);
  for (int64_t u = blockIdx.y; u < segments; u += gridDim.y) {  // block-uniform
    const int64_t lo = offsets ? offsets[u] : 0, hi = offsets ? offsets[u + 1] : rows;
    acc_t s = 0;
    if (col < W)
      for (int64_t k = lo + threadIdx.y; k < hi; k += kFinalSlices)
        s += static_cast<acc_t>(src[(order ? order[k] : k) * W + col]);
    slice_sums[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && col < W) {
      acc_t total = 0;
#pragma unroll
      for (int j = 0; j < kFinalSlices; ++j) total += slice_sums[j][threadIdx.x];
      out[u * W + col] = static_cast<scalar_t>(total);
    }
    __syncthreads();  // slice_sums is reused by the next segment
  }
}

template <typename src_t, typename scalar_t, typename acc_t>
void launch_segment_column_sum(const src_t* src, const int64_t* order, const int64_t* offsets, int64_t rows,
                               int64_t segments, int64_t W, scalar_t* out, cudaStream_t stream) {
  if (segments == 0 || W == 0) return;
  const dim3 block(kFinalCols, kFinalSlices);
  const dim3 grid(reduction_grid((W + kFinalCols - 1) / kFinalCols),
                  static_cast<unsigned>(std::min(segments, kMaxGridY)));
  segment_column_sum_kernel<src_t, scalar_t, acc_t><<<grid, block, 0, stream>>>(src, order, offsets, rows, segments,
                                                                               W, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// At most about this many threads' worth of row groups when the LN affine gradients are wanted.
constexpr int64_t kGroupThreads = int64_t(1) << 18;

template <typename scalar_t>
void modulate_backward_typed(const ModulateCall& c, const at::Tensor& grad_out, const at::Tensor& mean,
                             const at::Tensor& rstd, at::Tensor& grad_x, at::Tensor& grad_weight,
                             at::Tensor& grad_bias, at::Tensor& grad_scale_rows) {
  using acc_t = at::opmath_type<scalar_t>;
  const c10::cuda::CUDAGuard guard(c.x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t M = c.rows, W = c.width;
  if (M == 0) return;
  const bool want_w = grad_weight.defined(), want_b = grad_bias.defined();
  ModulateGradArgs<scalar_t, acc_t> a;
  a.x = c.x.const_data_ptr<scalar_t>();
  a.g = grad_out.const_data_ptr<scalar_t>();
  a.w = c.weight.defined() ? c.weight.const_data_ptr<scalar_t>() : nullptr;
  a.bias = c.bias.defined() ? c.bias.const_data_ptr<scalar_t>() : nullptr;
  a.scale = c.scale.t.const_data_ptr<scalar_t>();
  a.scale_stride = c.scale.row_stride;
  a.index = c.cond_index.defined() ? c.cond_index.const_data_ptr<int64_t>() : nullptr;
  a.mean = mean.const_data_ptr<acc_t>();
  a.rstd = rstd.const_data_ptr<acc_t>();
  a.rows = M;
  a.width = W;
  a.cond_rows = c.cond_rows;
  scalar_t* dx = grad_x.mutable_data_ptr<scalar_t>();
  scalar_t* dscale = grad_scale_rows.mutable_data_ptr<scalar_t>();
  with_row_shape<acc_t>(W, [&](auto shape) {
    using Shape = decltype(shape);
    constexpr int BLOCK = Shape::kBlock;
    at::Tensor partials;
    acc_t* pw = nullptr;
    acc_t* pb = nullptr;
    if ((want_w || want_b) && W <= Shape::kPanel) {
      const int64_t max_groups = kGroupThreads / BLOCK;
      a.rows_per_group = (M + max_groups - 1) / max_groups;
    } else {
      a.rows_per_group = 1;  // no partials, or rows wider than a panel (see RowShape)
    }
    a.groups = (M + a.rows_per_group - 1) / a.rows_per_group;
    if (want_w || want_b) {
      partials = at::empty({(want_w ? 1 : 0) + (want_b ? 1 : 0), a.groups, W},
                           c.x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
      acc_t* base = partials.mutable_data_ptr<acc_t>();
      pw = want_w ? base : nullptr;
      pb = want_b ? base + (want_w ? a.groups * W : 0) : nullptr;
    }
    modulate_backward_kernel<scalar_t, acc_t, BLOCK, Shape::kCols>
        <<<row_grid(a.groups), BLOCK, 0, stream>>>(a, dx, dscale, pw, pb);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (want_w)
      launch_segment_column_sum<acc_t, scalar_t, acc_t>(pw, nullptr, nullptr, a.groups, 1, W,
                                                        grad_weight.mutable_data_ptr<scalar_t>(), stream);
    if (want_b)
      launch_segment_column_sum<acc_t, scalar_t, acc_t>(pb, nullptr, nullptr, a.groups, 1, W,
                                                        grad_bias.mutable_data_ptr<scalar_t>(), stream);
  });
}

// Rows of [M, W] summed per condition in row order within fixed slices (see segment_column_sum_kernel).
template <typename scalar_t>
void cond_rows_sum_typed(const CondSumCall& c, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const c10::cuda::CUDAGuard guard(out.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  launch_segment_column_sum<scalar_t, scalar_t, acc_t>(
      c.rows.const_data_ptr<scalar_t>(), c.order.const_data_ptr<int64_t>(), c.offsets.const_data_ptr<int64_t>(),
      c.rows.size(0), c.cond_rows, c.rows.size(1), out.mutable_data_ptr<scalar_t>(), stream);
}

// ---------------------------------------------------------------- gated residual

template <typename scalar_t>
struct GateArgs {
  const scalar_t* gate;
  int64_t gate_stride;
  const int64_t* index;  // [M] or null
  int64_t rows, width, cond_rows;
};

// VEC > 1 only when width % VEC == 0, gate_stride % VEC == 0 and every pointer is 16-byte
// aligned: then a pack never crosses a row and every pack address is aligned.
template <typename scalar_t>
__device__ __forceinline__ const scalar_t* gate_at(const GateArgs<scalar_t>& a, int64_t i0) {
  const int64_t r = i0 / a.width;
  return a.gate + cond_row_of(a.index, r, a.cond_rows) * a.gate_stride + (i0 - r * a.width);
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void gated_kernel(GateArgs<scalar_t> a, const scalar_t* __restrict__ x, const scalar_t* __restrict__ h,
                             scalar_t* __restrict__ out) {
  using P = Pack<scalar_t, VEC>;
  const int64_t packs = a.rows * a.width / VEC;
  for (int64_t pk = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; pk < packs;
       pk += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i0 = pk * VEC;
    const P xp = *reinterpret_cast<const P*>(x + i0);
    const P hp = *reinterpret_cast<const P*>(h + i0);
    const P gp = *reinterpret_cast<const P*>(gate_at(a, i0));
    P op;
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      op.v[j] = static_cast<scalar_t>(
          gated_value(static_cast<acc_t>(xp.v[j]), static_cast<acc_t>(gp.v[j]), static_cast<acc_t>(hp.v[j])));
    *reinterpret_cast<P*>(out + i0) = op;
  }
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void gated_backward_kernel(GateArgs<scalar_t> a, const scalar_t* __restrict__ g,
                                      const scalar_t* __restrict__ h, scalar_t* __restrict__ grad_h,
                                      scalar_t* __restrict__ grad_gate) {
  using P = Pack<scalar_t, VEC>;
  const int64_t packs = a.rows * a.width / VEC;
  for (int64_t pk = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; pk < packs;
       pk += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i0 = pk * VEC;
    const P gp = *reinterpret_cast<const P*>(g + i0);
    const P hp = *reinterpret_cast<const P*>(h + i0);
    const P gatep = *reinterpret_cast<const P*>(gate_at(a, i0));
    P dh, dgate;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const acc_t gv = static_cast<acc_t>(gp.v[j]);
      dh.v[j] = static_cast<scalar_t>(gv * static_cast<acc_t>(gatep.v[j]));
      dgate.v[j] = static_cast<scalar_t>(gv * static_cast<acc_t>(hp.v[j]));
    }
    *reinterpret_cast<P*>(grad_h + i0) = dh;
    *reinterpret_cast<P*>(grad_gate + i0) = dgate;
  }
}

template <typename scalar_t>
GateArgs<scalar_t> gate_args(const GatedCall& c) {
  GateArgs<scalar_t> a;
  a.gate = c.gate.t.const_data_ptr<scalar_t>();
  a.gate_stride = c.gate.row_stride;
  a.index = c.cond_index.defined() ? c.cond_index.const_data_ptr<int64_t>() : nullptr;
  a.rows = c.rows;
  a.width = c.width;
  a.cond_rows = c.cond_rows;
  return a;
}

template <typename scalar_t>
bool gate_vectorizable(const GateArgs<scalar_t>& a, std::initializer_list<const void*> ptrs) {
  constexpr int kWidth = 16 / sizeof(scalar_t);
  return vector_width<scalar_t>(ptrs) == kWidth && vector_width<scalar_t>({a.gate}) == kWidth &&
         a.width % kWidth == 0 && a.gate_stride % kWidth == 0;
}

template <typename scalar_t>
void gated_typed(const GatedCall& c, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const c10::cuda::CUDAGuard guard(out.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t numel = c.rows * c.width;
  if (numel == 0) return;
  const GateArgs<scalar_t> a = gate_args<scalar_t>(c);
  const scalar_t* x = c.x.const_data_ptr<scalar_t>();
  const scalar_t* h = c.h.const_data_ptr<scalar_t>();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  with_pack_width<scalar_t>(gate_vectorizable(a, {x, h, o}), [&](auto vec) {
    constexpr int VEC = decltype(vec)::value;
    gated_kernel<scalar_t, acc_t, VEC><<<elementwise_blocks(numel / VEC), kThreads, 0, stream>>>(a, x, h, o);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename scalar_t>
void gated_backward_typed(const GatedCall& c, const at::Tensor& grad_out, at::Tensor& grad_h,
                          at::Tensor& grad_gate_rows) {
  using acc_t = at::opmath_type<scalar_t>;
  const c10::cuda::CUDAGuard guard(grad_h.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t numel = c.rows * c.width;
  if (numel == 0) return;
  const GateArgs<scalar_t> a = gate_args<scalar_t>(c);
  const scalar_t* g = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* h = c.h.const_data_ptr<scalar_t>();
  scalar_t* gh = grad_h.mutable_data_ptr<scalar_t>();
  scalar_t* gg = grad_gate_rows.mutable_data_ptr<scalar_t>();
  with_pack_width<scalar_t>(gate_vectorizable(a, {g, h, gh, gg}), [&](auto vec) {
    constexpr int VEC = decltype(vec)::value;
    gated_backward_kernel<scalar_t, acc_t, VEC><<<elementwise_blocks(numel / VEC), kThreads, 0, stream>>>(
        a, g, h, gh, gg);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---------------------------------------------------------------- diffusion loss

template <typename scalar_t, typename acc_t>
struct LossArgs {
  const scalar_t* out;    // [M, width], width = C or 2C
  const scalar_t* noise;  // [M, C]
  const scalar_t* x0;     // [M0, C] or null (learned only)
  const int64_t* t;       // [M]
  const acc_t* table;     // [T, 3]
  int64_t rows, C, width, x0_rows, steps;
  acc_t log2;
  bool learned;
};

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ LossCoefs<acc_t> row_loss_coefs(const LossArgs<scalar_t, acc_t>& a, int64_t step) {
  CUDA_KERNEL_ASSERT(step >= 0 && step < a.steps);
  return LossCoefs<acc_t>{a.table[step * 3], a.table[step * 3 + 1], a.table[step * 3 + 2]};
}


// One warp per row (warp-uniform row loop); lanes stride over the C channels.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) loss_kernel(LossArgs<scalar_t, acc_t> a, acc_t* __restrict__ loss,
                                                        acc_t* __restrict__ mse) {
  const int lane = threadIdx.x % kWarp;
  const int64_t C = a.C;
  for (int64_t r = blockIdx.x * static_cast<int64_t>(kRowWarps) + threadIdx.x / kWarp; r < a.rows;
       r += static_cast<int64_t>(gridDim.x) * kRowWarps) {
    const scalar_t* o = a.out + r * a.width;
    const scalar_t* e = a.noise + r * C;
    acc_t sq = 0;
    for (int64_t j = lane; j < C; j += kWarp) {
      const acc_t d = static_cast<acc_t>(o[j]) - static_cast<acc_t>(e[j]);
      sq += d * d;
    }
    const acc_t m = warp_allmerge(sq, SumOp()) / acc_t(C);
    acc_t l = m;
    if (a.learned) {
      const int64_t step = a.t[r];
      const LossCoefs<acc_t> k = row_loss_coefs(a, step);
      const scalar_t* x0r = a.x0 + (r % a.x0_rows) * C;
      acc_t vb = 0;
      for (int64_t j = lane; j < C; j += kWarp)
        vb += vb_term(step == 0, static_cast<acc_t>(o[j]) - static_cast<acc_t>(e[j]), static_cast<acc_t>(o[C + j]),
                      static_cast<acc_t>(x0r[j]), k)
                  .value;
      l = m + warp_allmerge(vb, SumOp()) / acc_t(C) / a.log2;
    }
    if (lane == 0) {
      mse[r] = m;
      loss[r] = l;
    }
  }
}

// One warp per row, lanes over its C channels (the v half of channel j next to its mean half): the
// row's timestep, coefficients and gradient scales are found once per row.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) loss_backward_kernel(LossArgs<scalar_t, acc_t> a,
                                                                 const acc_t* __restrict__ grad_loss,
                                                                 scalar_t* __restrict__ grad) {
  const int lane = threadIdx.x % kWarp;
  const int64_t C = a.C;
  for (int64_t r = blockIdx.x * static_cast<int64_t>(kRowWarps) + threadIdx.x / kWarp; r < a.rows;
       r += static_cast<int64_t>(gridDim.x) * kRowWarps) {  // warp-uniform
    const scalar_t* o = a.out + r * a.width;
    const scalar_t* e = a.noise + r * C;
    scalar_t* gr = grad + r * a.width;
    const acc_t gl = grad_loss[r];
    const acc_t g_mse = acc_t(2) * gl / acc_t(C);
    if (!a.learned) {
      for (int64_t j = lane; j < C; j += kWarp)
        gr[j] = static_cast<scalar_t>(g_mse * (static_cast<acc_t>(o[j]) - static_cast<acc_t>(e[j])));
      continue;
    }
    const int64_t step = a.t[r];
    const LossCoefs<acc_t> k = row_loss_coefs(a, step);
    const scalar_t* x0r = a.x0 + (r % a.x0_rows) * C;
    const acc_t g_vb = gl / acc_t(C) / a.log2;
    for (int64_t j = lane; j < C; j += kWarp) {
      const acc_t diff = static_cast<acc_t>(o[j]) - static_cast<acc_t>(e[j]);
      gr[j] = static_cast<scalar_t>(g_mse * diff);
      gr[C + j] = static_cast<scalar_t>(
          g_vb * vb_term(step == 0, diff, static_cast<acc_t>(o[C + j]), static_cast<acc_t>(x0r[j]), k).grad_v);
    }
  }
}

template <typename scalar_t>
LossArgs<scalar_t, at::opmath_type<scalar_t>> loss_args(const LossCall& c) {
  using acc_t = at::opmath_type<scalar_t>;
  LossArgs<scalar_t, acc_t> a;
  a.out = c.model_output.const_data_ptr<scalar_t>();
  a.noise = c.noise.const_data_ptr<scalar_t>();
  a.x0 = c.learned ? c.x0.const_data_ptr<scalar_t>() : nullptr;
  a.t = c.timesteps.const_data_ptr<int64_t>();
  a.table = c.coefs.const_data_ptr<acc_t>();
  a.rows = c.rows;
  a.C = c.channels;
  a.width = c.learned ? 2 * c.channels : c.channels;
  a.x0_rows = c.learned ? c.x0_rows : 1;
  a.steps = c.steps;
  a.log2 = acc_t(std::log(2.0));
  a.learned = c.learned;
  return a;
}

template <typename scalar_t>
void loss_typed(const LossCall& c, at::Tensor& loss, at::Tensor& mse) {
  using acc_t = at::opmath_type<scalar_t>;
  const c10::cuda::CUDAGuard guard(c.noise.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (c.rows == 0) return;
  const LossArgs<scalar_t, acc_t> a = loss_args<scalar_t>(c);
  loss_kernel<scalar_t, acc_t><<<row_grid((c.rows + kRowWarps - 1) / kRowWarps), kThreads, 0, stream>>>(
      a, loss.mutable_data_ptr<acc_t>(), mse.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void loss_backward_typed(const LossCall& c, const at::Tensor& grad_loss, at::Tensor& grad_output) {
  using acc_t = at::opmath_type<scalar_t>;
  const c10::cuda::CUDAGuard guard(c.noise.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const LossArgs<scalar_t, acc_t> a = loss_args<scalar_t>(c);
  const int64_t numel = a.rows * a.width;
  if (numel == 0) return;
  loss_backward_kernel<scalar_t, acc_t><<<row_grid((a.rows + kRowWarps - 1) / kRowWarps), kThreads, 0, stream>>>(
      a, grad_loss.const_data_ptr<acc_t>(), grad_output.mutable_data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

DDG_SPLIT_TOKEN_LOOPS(CudaSplitTokenLoops);

}  // namespace ddg::cuda

TORCH_LIBRARY_IMPL(ddg, CUDA, m) { ddg::register_split_token_ops<ddg::cuda::CudaSplitTokenLoops>(m); }
