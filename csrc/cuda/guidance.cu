// CUDA loops of the guidance ops. Elementwise passes: grid-stride loops over 16-byte
// packs with a scalar path at sample boundaries and the tail. Reductions: one block per
// (sample, chunk) with a CUB block reduction, then a finalize kernel that merges the
// chunk partials of each sample in order (deterministic). All arithmetic comes from
// csrc/common/guidance_math.h and csrc/common/welford.h, which the CPU tests cover.
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../common/guidance_math.h"
#include "../common/welford.h"
#include "../host/register_guidance.h"
#include "common.cuh"

namespace ddg::cuda {
namespace {

// ---------------------------------------------------------------- per-sample coefficients

template <typename acc_t>
struct ForwardCoefs {
  acc_t scale, a, b;
};

template <typename acc_t>
__device__ __forceinline__ ForwardCoefs<acc_t> forward_coefs(const CfgParams<acc_t>& p,
                                                             const acc_t* multiplier, int64_t b) {
  const StepCoefs<acc_t> st = sample_step(p, b);
  return {sample_scale(p, b), st.a, st.b * (multiplier ? multiplier[b] : acc_t(1))};
}

// Backward coefficients per sample: [multiplier, coef_guided, mean_guided, coef_cond, mean_cond].
constexpr int kGradCoefs = 5;

// ---------------------------------------------------------------- forward

template <typename scalar_t, typename acc_t, int VEC, bool HAS_SAMPLE>
__global__ void cfg_forward_kernel(CfgParams<acc_t> p, const scalar_t* __restrict__ u,
                                   const scalar_t* __restrict__ c, const scalar_t* __restrict__ x,
                                   const acc_t* __restrict__ multiplier, scalar_t* __restrict__ out,
                                   int64_t numel) {
  using P = Pack<scalar_t, VEC>;
  auto element = [&](const ForwardCoefs<acc_t>& k, acc_t uv, acc_t cv, acc_t xv) {
    const acc_t guided = cfg_value(uv, cv, k.scale);
    return HAS_SAMPLE ? step_value(xv, guided, k.a, k.b) : k.b * guided;
  };
  for_each_pack<VEC>(
      numel, p.per_sample,
      [&](int64_t b, int64_t i0) {
        const ForwardCoefs<acc_t> k = forward_coefs(p, multiplier, b);
        const P up = *reinterpret_cast<const P*>(u + i0);
        const P cp = *reinterpret_cast<const P*>(c + i0);
        P xp, op;
        if (HAS_SAMPLE) xp = *reinterpret_cast<const P*>(x + i0);
#pragma unroll
        for (int j = 0; j < VEC; ++j)
          op.v[j] = static_cast<scalar_t>(element(k, static_cast<acc_t>(up.v[j]), static_cast<acc_t>(cp.v[j]),
                                                  HAS_SAMPLE ? static_cast<acc_t>(xp.v[j]) : acc_t(0)));
        *reinterpret_cast<P*>(out + i0) = op;
      },
      [&](int64_t b, int64_t i) {
        out[i] = static_cast<scalar_t>(element(forward_coefs(p, multiplier, b), static_cast<acc_t>(u[i]),
                                               static_cast<acc_t>(c[i]),
                                               HAS_SAMPLE ? static_cast<acc_t>(x[i]) : acc_t(0)));
      });
}

template <typename acc_t>
struct GuidedCondState {
  WelfordState<acc_t> guided, cond;
};

struct GuidedCondMerge {
  template <typename S>
  __device__ __forceinline__ S operator()(const S& a, const S& b) const {
    return S{welford_merge(a.guided, b.guided), welford_merge(a.cond, b.cond)};
  }
};

template <typename scalar_t, typename acc_t>
__global__ void guided_cond_partials_kernel(CfgParams<acc_t> p, int64_t chunks,
                                            const scalar_t* __restrict__ u,
                                            const scalar_t* __restrict__ c,
                                            GuidedCondState<acc_t>* __restrict__ partials) {
  const ChunkRange r = block_chunk(p.per_sample, chunks);
  const acc_t s = sample_scale(p, r.sample);
  GuidedCondState<acc_t> st{welford_empty<acc_t>(), welford_empty<acc_t>()};
  for (int64_t i = r.lo + threadIdx.x; i < r.hi; i += blockDim.x) {
    const acc_t cv = static_cast<acc_t>(c[i]);
    st.guided = welford_update(st.guided, cfg_value(static_cast<acc_t>(u[i]), cv, s));
    st.cond = welford_update(st.cond, cv);
  }
  st = block_reduce(st, GuidedCondMerge());
  if (threadIdx.x == 0) partials[blockIdx.x] = st;
}

template <typename acc_t>
__global__ void rescale_finalize_kernel(CfgParams<acc_t> p, int64_t chunks,
                                        const GuidedCondState<acc_t>* __restrict__ partials,
                                        acc_t* __restrict__ stats, acc_t* __restrict__ multiplier) {
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < p.batch;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    GuidedCondState<acc_t> st{welford_empty<acc_t>(), welford_empty<acc_t>()};
    for (int64_t k = 0; k < chunks; ++k) st = GuidedCondMerge()(st, partials[b * chunks + k]);
    const acc_t var_g = welford_variance(st.guided), var_c = welford_variance(st.cond);
    acc_t* out = stats + kStatsPerSample * b;
    out[0] = st.guided.mean;
    out[1] = var_g;
    out[2] = st.cond.mean;
    out[3] = var_c;
    multiplier[b] = rescale_multiplier(p.rescale, var_c, var_g);
  }
}

// ---------------------------------------------------------------- backward

template <typename scalar_t, typename acc_t>
__global__ void guided_dot_partials_kernel(CfgParams<acc_t> p, int64_t chunks,
                                           const scalar_t* __restrict__ go,
                                           const scalar_t* __restrict__ u,
                                           const scalar_t* __restrict__ c,
                                           acc_t* __restrict__ partials) {
  const ChunkRange r = block_chunk(p.per_sample, chunks);
  const acc_t s = sample_scale(p, r.sample);
  acc_t acc = 0;
  for (int64_t i = r.lo + threadIdx.x; i < r.hi; i += blockDim.x)
    acc += static_cast<acc_t>(go[i]) * cfg_value(static_cast<acc_t>(u[i]), static_cast<acc_t>(c[i]), s);
  acc = block_reduce(acc, SumOp());
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

template <typename acc_t>
__global__ void rescale_grad_coefs_kernel(CfgParams<acc_t> p, int64_t chunks,
                                          const acc_t* __restrict__ partials,
                                          const acc_t* __restrict__ stats, acc_t* __restrict__ coefs) {
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < p.batch;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t dot = 0;
    for (int64_t k = 0; k < chunks; ++k) dot += partials[b * chunks + k];
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
}

template <typename scalar_t, typename acc_t, int VEC, bool RESCALED, bool SAMPLE_GRAD>
__global__ void cfg_backward_kernel(CfgParams<acc_t> p, const scalar_t* __restrict__ go,
                                    const scalar_t* __restrict__ u, const scalar_t* __restrict__ c,
                                    const acc_t* __restrict__ coefs, scalar_t* __restrict__ gx,
                                    scalar_t* __restrict__ gu, scalar_t* __restrict__ gc,
                                    int64_t numel) {
  using P = Pack<scalar_t, VEC>;
  struct Coefs {
    acc_t s, a, b, m, cg, mg, cc, mc;
  };
  auto coefs_of = [&](int64_t b) {
    const StepCoefs<acc_t> st = sample_step(p, b);
    Coefs k{sample_scale(p, b), st.a, st.b, acc_t(1), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
    if (RESCALED) {
      const acc_t* q = coefs + kGradCoefs * b;
      k.m = q[0], k.cg = q[1], k.mg = q[2], k.cc = q[3], k.mc = q[4];
    }
    return k;
  };
  // Without rescale the gradient does not depend on uncond/cond, so they are not read.
  auto element = [&](const Coefs& k, acc_t g, acc_t uv, acc_t cv, acc_t& du, acc_t& dc) {
    const acc_t guided = RESCALED ? cfg_value(uv, cv, k.s) : acc_t(0);
    cfg_backward_value<acc_t>(k.b * g, guided, RESCALED ? cv : acc_t(0), k.s, acc_t(1), k.m, k.cg,
                              k.mg, k.cc, k.mc, du, dc);
  };
  for_each_pack<VEC>(
      numel, p.per_sample,
      [&](int64_t b, int64_t i0) {
        const Coefs k = coefs_of(b);
        const P gp = *reinterpret_cast<const P*>(go + i0);
        P up, cp, dup, dcp, dxp;
        if (RESCALED) {
          up = *reinterpret_cast<const P*>(u + i0);
          cp = *reinterpret_cast<const P*>(c + i0);
        }
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          acc_t du, dc;
          const acc_t g = static_cast<acc_t>(gp.v[j]);
          element(k, g, RESCALED ? static_cast<acc_t>(up.v[j]) : acc_t(0),
                  RESCALED ? static_cast<acc_t>(cp.v[j]) : acc_t(0), du, dc);
          dup.v[j] = static_cast<scalar_t>(du);
          dcp.v[j] = static_cast<scalar_t>(dc);
          if (SAMPLE_GRAD) dxp.v[j] = static_cast<scalar_t>(k.a * g);
        }
        *reinterpret_cast<P*>(gu + i0) = dup;
        *reinterpret_cast<P*>(gc + i0) = dcp;
        if (SAMPLE_GRAD) *reinterpret_cast<P*>(gx + i0) = dxp;
      },
      [&](int64_t b, int64_t i) {
        const Coefs k = coefs_of(b);
        acc_t du, dc;
        const acc_t g = static_cast<acc_t>(go[i]);
        element(k, g, RESCALED ? static_cast<acc_t>(u[i]) : acc_t(0), RESCALED ? static_cast<acc_t>(c[i]) : acc_t(0),
                du, dc);
        gu[i] = static_cast<scalar_t>(du);
        gc[i] = static_cast<scalar_t>(dc);
        if (SAMPLE_GRAD) gx[i] = static_cast<scalar_t>(k.a * g);
      });
}

// ---------------------------------------------------------------- DMD gradient

template <typename acc_t>
struct DmdParams {
  int64_t batch, per_sample, chunks;
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

template <typename scalar_t, typename acc_t, bool EPS>
__global__ void dmd_abs_partials_kernel(DmdParams<acc_t> p, const scalar_t* __restrict__ x,
                                        const scalar_t* __restrict__ xt, const scalar_t* __restrict__ u,
                                        const scalar_t* __restrict__ c, acc_t* __restrict__ partials) {
  const ChunkRange r = block_chunk(p.per_sample, p.chunks);
  const acc_t s = dmd_scale(p, r.sample);
  const DmdEpsCoefs<acc_t> k = dmd_coefs<acc_t, EPS>(p, r.sample);
  acc_t acc = 0;
  for (int64_t i = r.lo + threadIdx.x; i < r.hi; i += blockDim.x) {
    const acc_t real = cfg_value(static_cast<acc_t>(u[i]), static_cast<acc_t>(c[i]), s);
    acc += ddg_abs(EPS ? dmd_eps_p_real(static_cast<acc_t>(x[i]), static_cast<acc_t>(xt[i]), real,
                                        k.inv_sqrt_ab, k.noise_to_x0)
                       : real);
  }
  acc = block_reduce(acc, SumOp());
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

template <typename acc_t>
__global__ void dmd_denominator_kernel(DmdParams<acc_t> p, const acc_t* __restrict__ partials,
                                       acc_t* __restrict__ denom) {
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < p.batch;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t sum = 0;
    for (int64_t k = 0; k < p.chunks; ++k) sum += partials[b * p.chunks + k];
    denom[b] = dmd_denominator(sum, p.per_sample);
  }
}

template <typename scalar_t, typename acc_t, bool EPS>
__global__ void dmd_grad_kernel(DmdParams<acc_t> p, const scalar_t* __restrict__ u,
                                const scalar_t* __restrict__ c, const scalar_t* __restrict__ f,
                                const acc_t* __restrict__ denom, acc_t* __restrict__ g,
                                acc_t* __restrict__ sq_partials) {
  const ChunkRange r = block_chunk(p.per_sample, p.chunks);
  const acc_t s = dmd_scale(p, r.sample), d = denom[r.sample];
  const acc_t factor = EPS ? dmd_coefs<acc_t, EPS>(p, r.sample).noise_to_x0 : acc_t(1);
  acc_t acc = 0;
  for (int64_t i = r.lo + threadIdx.x; i < r.hi; i += blockDim.x) {
    const acc_t real = cfg_value(static_cast<acc_t>(u[i]), static_cast<acc_t>(c[i]), s);
    const acc_t gi = nan_to_num(dmd_numerator(real, static_cast<acc_t>(f[i]), factor) / d);
    g[i] = gi;
    acc += gi * gi;
  }
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
  // One "sample" spanning everything: only the end of the array takes the scalar path.
  for_each_pack<VEC>(
      numel, numel,
      [&](int64_t, int64_t i0) {
        const Pack<acc_t, VEC> gp = *reinterpret_cast<const Pack<acc_t, VEC>*>(g + i0);
        Pack<scalar_t, VEC> op;
#pragma unroll
        for (int j = 0; j < VEC; ++j) op.v[j] = static_cast<scalar_t>(k * gp.v[j]);
        *reinterpret_cast<Pack<scalar_t, VEC>*>(out + i0) = op;
      },
      [&](int64_t, int64_t i) { out[i] = static_cast<scalar_t>(k * g[i]); });
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

template <typename scalar_t>
void cfg_forward_typed(const CfgCall& call, at::Tensor& out, at::Tensor& stats) {
  using acc_t = at::opmath_type<scalar_t>;
  const c10::cuda::CUDAGuard guard(out.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const CfgParams<acc_t> p = cfg_params<acc_t>(call);
  const int64_t numel = out.numel();
  const scalar_t* u = call.uncond.const_data_ptr<scalar_t>();
  const scalar_t* c = call.cond.const_data_ptr<scalar_t>();
  const scalar_t* x = call.sample.defined() ? call.sample.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* o = out.mutable_data_ptr<scalar_t>();

  at::Tensor multiplier;
  if (call.rescale != 0.0) {
    const int64_t chunks = chunks_per_sample(p.per_sample);
    at::Tensor partials = at::empty({p.batch * chunks * int64_t(sizeof(GuidedCondState<acc_t>))},
                                    out.options().dtype(at::kByte));
    auto* part = reinterpret_cast<GuidedCondState<acc_t>*>(partials.mutable_data_ptr());
    guided_cond_partials_kernel<scalar_t, acc_t><<<reduction_grid(p.batch * chunks), kThreads, 0, stream>>>(p, chunks, u, c, part);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    multiplier = at::empty({p.batch}, stats.options());
    rescale_finalize_kernel<acc_t><<<elementwise_blocks(p.batch), kThreads, 0, stream>>>(
        p, chunks, part, stats.mutable_data_ptr<acc_t>(), multiplier.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const acc_t* mult = multiplier.defined() ? multiplier.const_data_ptr<acc_t>() : nullptr;
  with_vector_width<scalar_t>({u, c, x, o}, [&](auto vec) {
    constexpr int VEC = decltype(vec)::value;
    with_bool(x != nullptr, [&](auto has_sample) {
      constexpr bool HS = decltype(has_sample)::value;
      cfg_forward_kernel<scalar_t, acc_t, VEC, HS>
          <<<elementwise_blocks((numel + VEC - 1) / VEC), kThreads, 0, stream>>>(p, u, c, x, mult, o, numel);
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
  const int64_t numel = grad_uncond.numel();
  const bool rescaled = call.rescale != 0.0;
  const scalar_t* go = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* u = call.uncond.const_data_ptr<scalar_t>();
  const scalar_t* c = call.cond.const_data_ptr<scalar_t>();
  scalar_t* gx = grad_sample.defined() ? grad_sample.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* gu = grad_uncond.mutable_data_ptr<scalar_t>();
  scalar_t* gc = grad_cond.mutable_data_ptr<scalar_t>();

  at::Tensor coefs;
  if (rescaled) {
    const int64_t chunks = chunks_per_sample(p.per_sample);
    at::Tensor partials = at::empty({p.batch * chunks}, stats.options());
    guided_dot_partials_kernel<scalar_t, acc_t><<<reduction_grid(p.batch * chunks), kThreads, 0, stream>>>(
        p, chunks, go, u, c, partials.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    coefs = at::empty({p.batch, kGradCoefs}, stats.options());
    rescale_grad_coefs_kernel<acc_t><<<elementwise_blocks(p.batch), kThreads, 0, stream>>>(
        p, chunks, partials.const_data_ptr<acc_t>(), stats.const_data_ptr<acc_t>(),
        coefs.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const acc_t* cf = coefs.defined() ? coefs.const_data_ptr<acc_t>() : nullptr;
  // uncond/cond are only read with rescale, so only then does their alignment matter.
  with_vector_width<scalar_t>({go, rescaled ? u : nullptr, rescaled ? c : nullptr, gx, gu, gc}, [&](auto vec) {
    constexpr int VEC = decltype(vec)::value;
    with_bool(rescaled, [&](auto r) {
      with_bool(gx != nullptr, [&](auto sg) {
        cfg_backward_kernel<scalar_t, acc_t, VEC, decltype(r)::value, decltype(sg)::value>
            <<<elementwise_blocks((numel + VEC - 1) / VEC), kThreads, 0, stream>>>(p, go, u, c, cf, gx, gu, gc, numel);
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
  p.chunks = chunks_per_sample(call.per_sample);
  p.scale = static_cast<acc_t>(call.scale);
  p.scale_ps = call.scale_ps.defined() ? call.scale_ps.const_data_ptr<acc_t>() : nullptr;
  p.alpha_bar = eps ? call.alpha_bar.const_data_ptr<acc_t>() : nullptr;
  const scalar_t* x = call.x.const_data_ptr<scalar_t>();
  const scalar_t* xt = eps ? call.x_t.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* u = call.uncond.const_data_ptr<scalar_t>();
  const scalar_t* c = call.cond.const_data_ptr<scalar_t>();
  const scalar_t* f = call.fake.const_data_ptr<scalar_t>();
  const int64_t blocks = p.batch * p.chunks;
  at::Tensor partials = at::empty({2, blocks}, denom.options());
  acc_t* abs_part = partials.mutable_data_ptr<acc_t>();
  acc_t* sq_part = abs_part + blocks;
  with_bool(eps, [&](auto e) {
    constexpr bool EPS = decltype(e)::value;
    dmd_abs_partials_kernel<scalar_t, acc_t, EPS><<<reduction_grid(blocks), kThreads, 0, stream>>>(p, x, xt, u, c, abs_part);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    dmd_denominator_kernel<acc_t><<<elementwise_blocks(p.batch), kThreads, 0, stream>>>(
        p, abs_part, denom.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    dmd_grad_kernel<scalar_t, acc_t, EPS><<<reduction_grid(blocks), kThreads, 0, stream>>>(
        p, u, c, f, denom.const_data_ptr<acc_t>(), grad.mutable_data_ptr<acc_t>(), sq_part);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  // Packs must be 16 bytes for both the acc_t input and the scalar_t output.
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
