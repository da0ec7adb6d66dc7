// CUDA loops of the guidance ops. Elementwise passes: a grid whose y index is the sample, so
// per-sample coefficients are computed once per block and no index is divided by the sample
// length; 16-byte packs inside each sample, element by element at its unaligned ends.
// Reductions: one block per (sample, chunk) with per-thread partials merged by a CUB block
// reduction, then a finalize kernel with one warp per sample that merges the chunk partials in
// a fixed order (deterministic). All arithmetic comes from csrc/common/guidance_math.h and
// csrc/common/welford.h, which the CPU kernels share.
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../common/guidance_math.h"
#include "../common/welford.h"
#include "../host/register_guidance.h"
#include "common.cuh"
#include "sample_loops.cuh"

namespace ddg::cuda {
namespace {

// Elementwise kernels run on a grid whose y index is the sample (sample_loops.cuh): the
// per-sample coefficients (square roots and divisions of the sampler update, the rescale
// multiplier) are computed once per block and sample, and no index is divided by the sample
// length.

template <typename scalar_t, int VEC>
__device__ __forceinline__ Pack<scalar_t, VEC> load_pack(const scalar_t* p, int64_t i0) {
  return *reinterpret_cast<const Pack<scalar_t, VEC>*>(p + i0);
}

template <typename scalar_t, int VEC>
__device__ __forceinline__ void store_pack(scalar_t* p, int64_t i0, const Pack<scalar_t, VEC>& v) {
  *reinterpret_cast<Pack<scalar_t, VEC>*>(p + i0) = v;
}

// Stores VEC accumulation-type values as 16-byte packs (VEC is 1 or a multiple of the acc pack).
template <typename acc_t, int VEC>
__device__ __forceinline__ void store_acc_packs(acc_t* p, int64_t i0, const acc_t (&v)[VEC]) {
  constexpr int W = VEC == 1 ? 1 : 16 / sizeof(acc_t);
  static_assert(VEC % W == 0, "VEC must be a multiple of the accumulation pack");
#pragma unroll
  for (int q = 0; q < VEC / W; ++q) {
    Pack<acc_t, W> pk;
#pragma unroll
    for (int j = 0; j < W; ++j) pk.v[j] = v[q * W + j];
    store_pack<acc_t, W>(p, i0 + q * W, pk);
  }
}

// ---------------------------------------------------------------- forward

template <typename scalar_t, typename acc_t, int VEC, bool HAS_SAMPLE>
__global__ void cfg_forward_kernel(CfgParams<acc_t> p, const scalar_t* __restrict__ u,
                                   const scalar_t* __restrict__ c, const scalar_t* __restrict__ x,
                                   const acc_t* __restrict__ multiplier, scalar_t* __restrict__ out) {
  for_each_grid_sample(p.batch, [&](int64_t b) {
    const StepCoefs<acc_t> st = sample_step(p, b);
    const acc_t s = sample_scale(p, b), a = st.a, bm = st.b * (multiplier ? multiplier[b] : acc_t(1));
    auto element = [&](acc_t uv, acc_t cv, acc_t xv) {
      const acc_t guided = cfg_value(uv, cv, s);
      return HAS_SAMPLE ? step_value(xv, guided, a, bm) : bm * guided;
    };
    for_each_in_sample<VEC>(
        b, p.per_sample,
        [&](int64_t i0) {
          const auto up = load_pack<scalar_t, VEC>(u, i0), cp = load_pack<scalar_t, VEC>(c, i0);
          Pack<scalar_t, VEC> xp, op;
          if (HAS_SAMPLE) xp = load_pack<scalar_t, VEC>(x, i0);
#pragma unroll
          for (int j = 0; j < VEC; ++j)
            op.v[j] = static_cast<scalar_t>(element(static_cast<acc_t>(up.v[j]), static_cast<acc_t>(cp.v[j]),
                                                    HAS_SAMPLE ? static_cast<acc_t>(xp.v[j]) : acc_t(0)));
          store_pack<scalar_t, VEC>(out, i0, op);
        },
        [&](int64_t i) {
          out[i] = static_cast<scalar_t>(element(static_cast<acc_t>(u[i]), static_cast<acc_t>(c[i]),
                                                 HAS_SAMPLE ? static_cast<acc_t>(x[i]) : acc_t(0)));
        });
  });
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ RescaleShift<acc_t> sample_rescale_shift(const CfgParams<acc_t>& p, const scalar_t* u,
                                                                    const scalar_t* c, int64_t b) {
  const int64_t first = b * p.per_sample;
  return rescale_shift<acc_t>(static_cast<acc_t>(u[first]), static_cast<acc_t>(c[first]), sample_scale(p, b));
}

// Each thread accumulates shifted sums over its packs of the chunk (no division per element),
// turns them into one Welford state, and the block merges the states with Chan's formula.
template <typename scalar_t, typename acc_t, int VEC>
__global__ void rescale_partials_kernel(CfgParams<acc_t> p, SampleChunks chunks, const scalar_t* __restrict__ u,
                                        const scalar_t* __restrict__ c, RescaleState<acc_t>* __restrict__ partials) {
  const ChunkOfBlock r = chunk_of_block(p.per_sample, chunks);
  const acc_t s = sample_scale(p, r.sample);
  const RescaleShift<acc_t> k = sample_rescale_shift(p, u, c, r.sample);
  RescaleSums<acc_t> sums = rescale_sums_empty<acc_t>();
  int count = 0;  // at most chunks.length / blockDim.x + VEC per thread
  for_each_in_chunk<VEC>(
      r,
      [&](int64_t i0) {
        const auto up = load_pack<scalar_t, VEC>(u, i0), cp = load_pack<scalar_t, VEC>(c, i0);
#pragma unroll
        for (int j = 0; j < VEC; ++j)
          rescale_sums_add(sums, static_cast<acc_t>(up.v[j]), static_cast<acc_t>(cp.v[j]), s, k.guided, k.cond);
        count += VEC;
      },
      [&](int64_t i) {
        rescale_sums_add(sums, static_cast<acc_t>(u[i]), static_cast<acc_t>(c[i]), s, k.guided, k.cond);
        ++count;
      });
  RescaleState<acc_t> st = rescale_state_of(static_cast<acc_t>(count), sums);
  st = block_reduce(st, RescaleStateMerge());
  if (threadIdx.x == 0) partials[blockIdx.x] = st;
}

// One warp per sample merges its chunk states in a fixed order (warp_merge_strided).
template <typename scalar_t, typename acc_t>
__global__ void rescale_finalize_kernel(CfgParams<acc_t> p, SampleChunks chunks, const scalar_t* __restrict__ u,
                                        const scalar_t* __restrict__ c,
                                        const RescaleState<acc_t>* __restrict__ partials,
                                        acc_t* __restrict__ stats, acc_t* __restrict__ multiplier) {
  const int64_t b = warp_item(p.batch);
  if (b < 0) return;
  const RescaleState<acc_t> st = warp_merge_strided(partials, b * chunks.count, 1, chunks.count,
                                                    rescale_state_empty<acc_t>(), RescaleStateMerge());
  if (threadIdx.x % kWarp == 0)
    multiplier[b] = rescale_finalize(st, sample_rescale_shift(p, u, c, b), p.rescale, stats + kStatsPerSample * b);
}

// ---------------------------------------------------------------- backward

template <typename scalar_t, typename acc_t, int VEC>
__global__ void guided_dot_partials_kernel(CfgParams<acc_t> p, SampleChunks chunks,
                                           const scalar_t* __restrict__ go, const scalar_t* __restrict__ u,
                                           const scalar_t* __restrict__ c, acc_t* __restrict__ partials) {
  const ChunkOfBlock r = chunk_of_block(p.per_sample, chunks);
  const acc_t s = sample_scale(p, r.sample);
  acc_t acc = 0;
  for_each_in_chunk<VEC>(
      r,
      [&](int64_t i0) {
        const auto gp = load_pack<scalar_t, VEC>(go, i0), up = load_pack<scalar_t, VEC>(u, i0),
                   cp = load_pack<scalar_t, VEC>(c, i0);
#pragma unroll
        for (int j = 0; j < VEC; ++j)
          acc += static_cast<acc_t>(gp.v[j]) * cfg_value(static_cast<acc_t>(up.v[j]), static_cast<acc_t>(cp.v[j]), s);
      },
      [&](int64_t i) {
        acc += static_cast<acc_t>(go[i]) * cfg_value(static_cast<acc_t>(u[i]), static_cast<acc_t>(c[i]), s);
      });
  acc = block_reduce(acc, SumOp());
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

// Backward coefficients per sample: [multiplier, coef_guided, mean_guided, coef_cond, mean_cond].
constexpr int kGradCoefs = 5;

template <typename acc_t>
__global__ void rescale_grad_coefs_kernel(CfgParams<acc_t> p, SampleChunks chunks,
                                          const acc_t* __restrict__ partials,
                                          const acc_t* __restrict__ stats, acc_t* __restrict__ coefs) {
  const int64_t b = warp_item(p.batch);
  if (b < 0) return;
  const acc_t dot = warp_merge_strided(partials, b * chunks.count, 1, chunks.count, acc_t(0), SumOp());
  if (threadIdx.x % kWarp != 0) return;
  const acc_t* st = stats + kStatsPerSample * b;
  const RescaleGrad<acc_t> r =
      rescale_grad(p.rescale, st[3], st[1], sample_step(p, b).b * dot, acc_t(p.per_sample));
  acc_t* out = coefs + kGradCoefs * b;
  out[0] = r.multiplier;
  out[1] = r.coef_guided;
  out[2] = st[0];
  out[3] = r.coef_cond;
  out[4] = st[2];
}

template <typename scalar_t, typename acc_t, int VEC, bool RESCALED, bool SAMPLE_GRAD>
__global__ void cfg_backward_kernel(CfgParams<acc_t> p, const scalar_t* __restrict__ go,
                                    const scalar_t* __restrict__ u, const scalar_t* __restrict__ c,
                                    const acc_t* __restrict__ coefs, scalar_t* __restrict__ gx,
                                    scalar_t* __restrict__ gu, scalar_t* __restrict__ gc) {
  for_each_grid_sample(p.batch, [&](int64_t b) {
    const StepCoefs<acc_t> step = sample_step(p, b);
    const acc_t s = sample_scale(p, b), a = step.a, bs = step.b;
    acc_t m = 1, cg = 0, mg = 0, cc = 0, mc = 0;
    if (RESCALED) {
      const acc_t* q = coefs + kGradCoefs * b;
      m = q[0], cg = q[1], mg = q[2], cc = q[3], mc = q[4];
    }
    // Without rescale the gradient does not depend on uncond/cond, so they are not read.
    auto element = [&](acc_t g, acc_t uv, acc_t cv, acc_t& du, acc_t& dc) {
      const acc_t guided = RESCALED ? cfg_value(uv, cv, s) : acc_t(0);
      cfg_backward_value<acc_t>(bs * g, guided, RESCALED ? cv : acc_t(0), s, acc_t(1), m, cg, mg, cc, mc, du, dc);
    };
    for_each_in_sample<VEC>(
        b, p.per_sample,
        [&](int64_t i0) {
          const auto gp = load_pack<scalar_t, VEC>(go, i0);
          Pack<scalar_t, VEC> up, cp, dup, dcp, dxp;
          if (RESCALED) {
            up = load_pack<scalar_t, VEC>(u, i0);
            cp = load_pack<scalar_t, VEC>(c, i0);
          }
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            acc_t du, dc;
            const acc_t g = static_cast<acc_t>(gp.v[j]);
            element(g, RESCALED ? static_cast<acc_t>(up.v[j]) : acc_t(0),
                    RESCALED ? static_cast<acc_t>(cp.v[j]) : acc_t(0), du, dc);
            dup.v[j] = static_cast<scalar_t>(du);
            dcp.v[j] = static_cast<scalar_t>(dc);
            if (SAMPLE_GRAD) dxp.v[j] = static_cast<scalar_t>(a * g);
          }
          store_pack<scalar_t, VEC>(gu, i0, dup);
          store_pack<scalar_t, VEC>(gc, i0, dcp);
          if (SAMPLE_GRAD) store_pack<scalar_t, VEC>(gx, i0, dxp);
        },
        [&](int64_t i) {
          acc_t du, dc;
          const acc_t g = static_cast<acc_t>(go[i]);
          element(g, RESCALED ? static_cast<acc_t>(u[i]) : acc_t(0), RESCALED ? static_cast<acc_t>(c[i]) : acc_t(0),
                  du, dc);
          gu[i] = static_cast<scalar_t>(du);
          gc[i] = static_cast<scalar_t>(dc);
          if (SAMPLE_GRAD) gx[i] = static_cast<scalar_t>(a * g);
        });
  });
}

// ---------------------------------------------------------------- DMD gradient

template <typename acc_t>
struct DmdParams {
  int64_t batch, per_sample;
  SampleChunks chunks;
  acc_t scale;
  const acc_t* scale_ps;
  const acc_t* alpha_bar;  // epsilon only
};

template <typename acc_t>
__device__ __forceinline__ acc_t dmd_scale(const DmdParams<acc_t>& p, int64_t b) {
  return p.scale_ps ? p.scale_ps[b] : p.scale;
}

template <typename acc_t, bool EPS>
__device__ __forceinline__ DmdEpsCoefs<acc_t> dmd_coefs(const DmdParams<acc_t>& p, int64_t b) {
  return EPS ? dmd_eps_coefs<acc_t>(p.alpha_bar[b]) : DmdEpsCoefs<acc_t>{acc_t(1), acc_t(1)};
}

template <typename scalar_t, typename acc_t, int VEC, bool EPS>
__global__ void dmd_abs_partials_kernel(DmdParams<acc_t> p, const scalar_t* __restrict__ x,
                                        const scalar_t* __restrict__ xt, const scalar_t* __restrict__ u,
                                        const scalar_t* __restrict__ c, acc_t* __restrict__ partials) {
  const ChunkOfBlock r = chunk_of_block(p.per_sample, p.chunks);
  const acc_t s = dmd_scale(p, r.sample);
  const DmdEpsCoefs<acc_t> k = dmd_coefs<acc_t, EPS>(p, r.sample);
  auto p_real = [&](acc_t uv, acc_t cv, acc_t xv, acc_t tv) {
    const acc_t real = cfg_value(uv, cv, s);
    return ddg_abs(EPS ? dmd_eps_p_real(xv, tv, real, k.inv_sqrt_ab, k.noise_to_x0) : real);
  };
  acc_t acc = 0;
  for_each_in_chunk<VEC>(
      r,
      [&](int64_t i0) {
        const auto up = load_pack<scalar_t, VEC>(u, i0), cp = load_pack<scalar_t, VEC>(c, i0);
        Pack<scalar_t, VEC> xp, tp;
        if (EPS) {
          xp = load_pack<scalar_t, VEC>(x, i0);
          tp = load_pack<scalar_t, VEC>(xt, i0);
        }
#pragma unroll
        for (int j = 0; j < VEC; ++j)
          acc += p_real(static_cast<acc_t>(up.v[j]), static_cast<acc_t>(cp.v[j]),
                        EPS ? static_cast<acc_t>(xp.v[j]) : acc_t(0), EPS ? static_cast<acc_t>(tp.v[j]) : acc_t(0));
      },
      [&](int64_t i) {
        acc += p_real(static_cast<acc_t>(u[i]), static_cast<acc_t>(c[i]), EPS ? static_cast<acc_t>(x[i]) : acc_t(0),
                      EPS ? static_cast<acc_t>(xt[i]) : acc_t(0));
      });
  acc = block_reduce(acc, SumOp());
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

template <typename acc_t>
__global__ void dmd_denominator_kernel(DmdParams<acc_t> p, const acc_t* __restrict__ partials,
                                       acc_t* __restrict__ denom) {
  const int64_t b = warp_item(p.batch);
  if (b < 0) return;
  const acc_t sum = warp_merge_strided(partials, b * p.chunks.count, 1, p.chunks.count, acc_t(0), SumOp());
  if (threadIdx.x % kWarp == 0) denom[b] = dmd_denominator(sum, p.per_sample);
}

template <typename scalar_t, typename acc_t, int VEC, bool EPS>
__global__ void dmd_grad_kernel(DmdParams<acc_t> p, const scalar_t* __restrict__ u,
                                const scalar_t* __restrict__ c, const scalar_t* __restrict__ f,
                                const acc_t* __restrict__ denom, acc_t* __restrict__ g,
                                acc_t* __restrict__ sq_partials) {
  const ChunkOfBlock r = chunk_of_block(p.per_sample, p.chunks);
  const acc_t s = dmd_scale(p, r.sample), d = denom[r.sample];
  const acc_t factor = EPS ? dmd_coefs<acc_t, EPS>(p, r.sample).noise_to_x0 : acc_t(1);
  auto element = [&](acc_t uv, acc_t cv, acc_t fv) {
    return nan_to_num(dmd_numerator(cfg_value(uv, cv, s), fv, factor) / d);
  };
  acc_t acc = 0;
  for_each_in_chunk<VEC>(
      r,
      [&](int64_t i0) {
        const auto up = load_pack<scalar_t, VEC>(u, i0), cp = load_pack<scalar_t, VEC>(c, i0),
                   fp = load_pack<scalar_t, VEC>(f, i0);
        acc_t gv[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          gv[j] = element(static_cast<acc_t>(up.v[j]), static_cast<acc_t>(cp.v[j]), static_cast<acc_t>(fp.v[j]));
          acc += gv[j] * gv[j];
        }
        store_acc_packs<acc_t, VEC>(g, i0, gv);
      },
      [&](int64_t i) {
        const acc_t gi = element(static_cast<acc_t>(u[i]), static_cast<acc_t>(c[i]), static_cast<acc_t>(f[i]));
        g[i] = gi;
        acc += gi * gi;
      });
  acc = block_reduce(acc, SumOp());
  if (threadIdx.x == 0) sq_partials[blockIdx.x] = acc;
}

// One block: each thread sums a fixed strided subset in order, then a block reduction.
template <typename acc_t>
__global__ void dmd_loss_kernel(const acc_t* __restrict__ sq_partials, int64_t count, int64_t numel,
                                acc_t* __restrict__ loss) {
  acc_t acc = 0;
  for (int64_t k = threadIdx.x; k < count; k += blockDim.x) acc += sq_partials[k];
  acc = block_reduce(acc, SumOp());
  if (threadIdx.x == 0) *loss = acc_t(0.5) * acc / acc_t(numel);
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void dmd_backward_kernel(const acc_t* __restrict__ grad_loss, const acc_t* __restrict__ g,
                                    scalar_t* __restrict__ out, int64_t numel) {
  const acc_t k = *grad_loss / acc_t(numel);
  for_each_in_range<VEC>(
      0, numel, blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x,
      static_cast<int64_t>(gridDim.x) * blockDim.x,
      [&](int64_t i0) {
        const auto gp = load_pack<acc_t, VEC>(g, i0);
        Pack<scalar_t, VEC> op;
#pragma unroll
        for (int j = 0; j < VEC; ++j) op.v[j] = static_cast<scalar_t>(k * gp.v[j]);
        store_pack<scalar_t, VEC>(out, i0, op);
      },
      [&](int64_t i) { out[i] = static_cast<scalar_t>(k * g[i]); });
}

// ---------------------------------------------------------------- launchers

// Calls fn(std::integral_constant<int, VEC>) with the widest vector all pointers allow.
template <typename scalar_t, typename Fn>
void with_vector_width(std::initializer_list<const void*> ptrs, const Fn& fn) {
  constexpr int kWidth = 16 / sizeof(scalar_t);
  if (vector_width<scalar_t>(ptrs) == kWidth)
    fn(std::integral_constant<int, kWidth>());
  else
    fn(std::integral_constant<int, 1>());
}

// Calls fn(std::true_type()) or fn(std::false_type()) to turn a flag into a template argument.
template <typename Fn>
void with_bool(bool v, const Fn& fn) {
  if (v) fn(std::true_type()); else fn(std::false_type());
}

// Chunking of the per-sample reductions of scalar_t inputs (sized by the dtype's pack width,
// whatever the alignment of this call's pointers).
template <typename scalar_t>
SampleChunks reduction_chunks(int64_t per_sample) {
  return sample_chunks(per_sample, 16 / sizeof(scalar_t));
}

template <typename scalar_t>
void cfg_forward_typed(const CfgCall& call, at::Tensor& out, at::Tensor& stats) {
  using acc_t = at::opmath_type<scalar_t>;
  const c10::cuda::CUDAGuard guard(out.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const CfgParams<acc_t> p = cfg_params<acc_t>(call);
  const scalar_t* u = call.uncond.const_data_ptr<scalar_t>();
  const scalar_t* c = call.cond.const_data_ptr<scalar_t>();
  const scalar_t* x = call.sample.defined() ? call.sample.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* o = out.mutable_data_ptr<scalar_t>();

  at::Tensor multiplier;
  if (call.rescale != 0.0) {
    const SampleChunks chunks = reduction_chunks<scalar_t>(p.per_sample);
    const int64_t blocks = p.batch * chunks.count;
    at::Tensor partials = at::empty({blocks * int64_t(sizeof(RescaleState<acc_t>))}, out.options().dtype(at::kByte));
    auto* part = reinterpret_cast<RescaleState<acc_t>*>(partials.mutable_data_ptr());
    with_vector_width<scalar_t>({u, c}, [&](auto vec) {
      rescale_partials_kernel<scalar_t, acc_t, decltype(vec)::value>
          <<<reduction_grid(blocks), kThreads, 0, stream>>>(p, chunks, u, c, part);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    multiplier = at::empty({p.batch}, stats.options());
    rescale_finalize_kernel<scalar_t, acc_t><<<warp_per_item_blocks(p.batch), kThreads, 0, stream>>>(
        p, chunks, u, c, part, stats.mutable_data_ptr<acc_t>(), multiplier.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const acc_t* mult = multiplier.defined() ? multiplier.const_data_ptr<acc_t>() : nullptr;
  with_vector_width<scalar_t>({u, c, x, o}, [&](auto vec) {
    constexpr int VEC = decltype(vec)::value;
    with_bool(x != nullptr, [&](auto has_sample) {
      cfg_forward_kernel<scalar_t, acc_t, VEC, decltype(has_sample)::value>
          <<<per_sample_grid(p.batch, p.per_sample, VEC), kThreads, 0, stream>>>(p, u, c, x, mult, o);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

template <typename scalar_t>
void cfg_backward_typed(const CfgCall& call, const at::Tensor& grad_out, const at::Tensor& stats,
                        at::Tensor& grad_sample, at::Tensor& grad_uncond, at::Tensor& grad_cond) {
  using acc_t = at::opmath_type<scalar_t>;
  const c10::cuda::CUDAGuard guard(grad_uncond.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const CfgParams<acc_t> p = cfg_params<acc_t>(call);
  const bool rescaled = call.rescale != 0.0;
  const scalar_t* go = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* u = call.uncond.const_data_ptr<scalar_t>();
  const scalar_t* c = call.cond.const_data_ptr<scalar_t>();
  scalar_t* gx = grad_sample.defined() ? grad_sample.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* gu = grad_uncond.mutable_data_ptr<scalar_t>();
  scalar_t* gc = grad_cond.mutable_data_ptr<scalar_t>();

  at::Tensor coefs;
  if (rescaled) {
    const SampleChunks chunks = reduction_chunks<scalar_t>(p.per_sample);
    const int64_t blocks = p.batch * chunks.count;
    at::Tensor partials = at::empty({blocks}, stats.options());
    with_vector_width<scalar_t>({go, u, c}, [&](auto vec) {
      guided_dot_partials_kernel<scalar_t, acc_t, decltype(vec)::value>
          <<<reduction_grid(blocks), kThreads, 0, stream>>>(p, chunks, go, u, c, partials.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    coefs = at::empty({p.batch, kGradCoefs}, stats.options());
    rescale_grad_coefs_kernel<acc_t><<<warp_per_item_blocks(p.batch), kThreads, 0, stream>>>(
        p, chunks, partials.const_data_ptr<acc_t>(), stats.const_data_ptr<acc_t>(), coefs.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const acc_t* cf = coefs.defined() ? coefs.const_data_ptr<acc_t>() : nullptr;
  // uncond/cond are only read with rescale, so only then does their alignment matter.
  with_vector_width<scalar_t>({go, rescaled ? u : nullptr, rescaled ? c : nullptr, gx, gu, gc}, [&](auto vec) {
    constexpr int VEC = decltype(vec)::value;
    with_bool(rescaled, [&](auto r) {
      with_bool(gx != nullptr, [&](auto sg) {
        cfg_backward_kernel<scalar_t, acc_t, VEC, decltype(r)::value, decltype(sg)::value>
            <<<per_sample_grid(p.batch, p.per_sample, VEC), kThreads, 0, stream>>>(p, go, u, c, cf, gx, gu, gc);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

template <typename scalar_t>
void dmd_forward_typed(const DmdCall& call, at::Tensor& grad, at::Tensor& denom, at::Tensor& loss) {
  using acc_t = at::opmath_type<scalar_t>;
  const c10::cuda::CUDAGuard guard(grad.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool eps = call.prediction == DmdPrediction::kEpsilon;
  DmdParams<acc_t> p;
  p.batch = call.batch;
  p.per_sample = call.per_sample;
  p.chunks = reduction_chunks<scalar_t>(call.per_sample);
  p.scale = static_cast<acc_t>(call.scale);
  p.scale_ps = call.scale_ps.defined() ? call.scale_ps.const_data_ptr<acc_t>() : nullptr;
  p.alpha_bar = eps ? call.alpha_bar.const_data_ptr<acc_t>() : nullptr;
  const scalar_t* x = call.x.const_data_ptr<scalar_t>();
  const scalar_t* xt = eps ? call.x_t.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* u = call.uncond.const_data_ptr<scalar_t>();
  const scalar_t* c = call.cond.const_data_ptr<scalar_t>();
  const scalar_t* f = call.fake.const_data_ptr<scalar_t>();
  acc_t* g = grad.mutable_data_ptr<acc_t>();
  const int64_t blocks = p.batch * p.chunks.count;
  at::Tensor partials = at::empty({2, blocks}, denom.options());
  acc_t* abs_part = partials.mutable_data_ptr<acc_t>();
  acc_t* sq_part = abs_part + blocks;
  with_bool(eps, [&](auto e) {
    constexpr bool EPS = decltype(e)::value;
    with_vector_width<scalar_t>({EPS ? x : nullptr, xt, u, c}, [&](auto vec) {
      dmd_abs_partials_kernel<scalar_t, acc_t, decltype(vec)::value, EPS>
          <<<reduction_grid(blocks), kThreads, 0, stream>>>(p, x, xt, u, c, abs_part);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    dmd_denominator_kernel<acc_t><<<warp_per_item_blocks(p.batch), kThreads, 0, stream>>>(
        p, abs_part, denom.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // g is written in 16-byte packs of acc_t, so its alignment counts too.
    with_vector_width<scalar_t>({u, c, f, g}, [&](auto vec) {
      dmd_grad_kernel<scalar_t, acc_t, decltype(vec)::value, EPS><<<reduction_grid(blocks), kThreads, 0, stream>>>(
          p, u, c, f, denom.const_data_ptr<acc_t>(), g, sq_part);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  dmd_loss_kernel<acc_t><<<1, kThreads, 0, stream>>>(sq_part, blocks, grad.numel(), loss.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void dmd_backward_typed(const at::Tensor& grad_loss, const at::Tensor& grad, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const c10::cuda::CUDAGuard guard(out.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t numel = out.numel();
  const acc_t* g = grad.const_data_ptr<acc_t>();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  // Packs must be 16 bytes for the acc_t input; the scalar_t output pack is then 16 or 8 bytes.
  constexpr int kWidth = 16 / sizeof(acc_t);
  const bool aligned = vector_width<acc_t>({g}) == kWidth && vector_width<scalar_t>({o}) > 1;
  if (aligned) {
    dmd_backward_kernel<scalar_t, acc_t, kWidth><<<elementwise_blocks((numel + kWidth - 1) / kWidth), kThreads, 0, stream>>>(
        grad_loss.const_data_ptr<acc_t>(), g, o, numel);
  } else {
    dmd_backward_kernel<scalar_t, acc_t, 1><<<elementwise_blocks(numel), kThreads, 0, stream>>>(
        grad_loss.const_data_ptr<acc_t>(), g, o, numel);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

DDG_GUIDANCE_LOOPS(CudaLoops);

}  // namespace ddg::cuda

TORCH_LIBRARY_IMPL(ddg, CUDA, m) { ddg::register_guidance_ops<ddg::cuda::CudaLoops>(m); }
