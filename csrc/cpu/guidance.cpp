// CPU loops of the guidance ops: at::parallel_for over samples/chunks, at::vec SIMD in
// the accumulation type with a scalar tail. All arithmetic comes from
// csrc/common/guidance_math.h and csrc/common/welford.h.
#include "../common/guidance_math.h"
#include "../common/welford.h"
#include "../host/register_guidance.h"
#include "cpu_loops.h"
#include "kernels.h"

namespace ddg::cpu {
namespace {

// Guidance rescale's statistics are accumulated as shifted sums (guidance_math.h) in runs of
// this many elements; each run becomes a Welford state that merges with Chan's formula. Short
// runs keep the sums' rounding small; the per-run conversion and merge cost about 0.1
// instructions per element.
constexpr int64_t kRescaleRun = 512;

// Per-sample Welford states of the guided prediction and of cond, in one pass over each chunk.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
std::vector<RescaleState<acc_t>> rescale_states(const CfgParams<acc_t>& p, const scalar_t* u, const scalar_t* c) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  auto chunk = [&](int64_t b, int64_t lo, int64_t hi) {
    const acc_t s = sample_scale(p, b);
    const int64_t first = b * p.per_sample;
    const RescaleShift<acc_t> k = rescale_shift<acc_t>(u[first], c[first], s);
    const Vec vs(s), vkg(k.guided), vkc(k.cond);
    RescaleState<acc_t> st = rescale_state_empty<acc_t>();
    for (int64_t run = lo; run < hi; run += kRescaleRun) {
      const int64_t end = std::min(run + kRescaleRun, hi);
      RescaleSums<Vec> v0 = rescale_sums_empty<Vec>(), v1 = rescale_sums_empty<Vec>();  // two chains for ILP
      RescaleSums<acc_t> t = rescale_sums_empty<acc_t>();
      int64_t i = run;
      for (; i + IO::kStep <= end; i += IO::kStep) {
        const auto uu = IO::load(u + i), cc = IO::load(c + i);
        rescale_sums_add(v0, uu.lo, cc.lo, vs, vkg, vkc);
        rescale_sums_add(v1, uu.hi, cc.hi, vs, vkg, vkc);
      }
      for (; i < end; ++i) rescale_sums_add<acc_t>(t, u[i], c[i], s, k.guided, k.cond);
      const RescaleSums<acc_t> sums{
          {lane_sum(v0.guided.sum + v1.guided.sum) + t.guided.sum, lane_sum(v0.guided.sum_sq + v1.guided.sum_sq) + t.guided.sum_sq},
          {lane_sum(v0.cond.sum + v1.cond.sum) + t.cond.sum, lane_sum(v0.cond.sum_sq + v1.cond.sum_sq) + t.cond.sum_sq}};
      st = RescaleStateMerge()(st, rescale_state_of(acc_t(end - run), sums));
    }
    return st;
  };
  return reduce_per_sample(p.batch, p.per_sample, rescale_state_empty<acc_t>(), chunk, RescaleStateMerge());
}

template <typename scalar_t>
void cfg_forward_typed(const CfgCall& call, at::Tensor& out, at::Tensor& stats) {
  using acc_t = at::opmath_type<scalar_t>;
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  const CfgParams<acc_t> p = cfg_params<acc_t>(call);
  const scalar_t* u = call.uncond.const_data_ptr<scalar_t>();
  const scalar_t* c = call.cond.const_data_ptr<scalar_t>();
  const scalar_t* x = call.sample.defined() ? call.sample.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* o = out.mutable_data_ptr<scalar_t>();

  std::vector<acc_t> multiplier(p.batch, acc_t(1));
  if (call.rescale != 0.0) {
    const auto st = rescale_states<scalar_t>(p, u, c);
    acc_t* sp = stats.mutable_data_ptr<acc_t>();
    for (int64_t b = 0; b < p.batch; ++b) {
      const int64_t first = b * p.per_sample;
      const RescaleShift<acc_t> k = rescale_shift<acc_t>(u[first], c[first], sample_scale(p, b));
      multiplier[b] = rescale_finalize(st[b], k, p.rescale, sp + kStatsPerSample * b);
    }
  }

  for_each_sample_segment(out.numel(), p.per_sample, [&](int64_t b, int64_t lo, int64_t hi) {
    const acc_t s = sample_scale(p, b);
    const StepCoefs<acc_t> step = sample_step(p, b);
    const acc_t a = step.a, bm = step.b * multiplier[b];
    const Vec vs(s), va(a), vb(bm);
    int64_t i = lo;
    if (x) {
      for (; i + IO::kStep <= hi; i += IO::kStep) {
        const auto uu = IO::load(u + i), cc = IO::load(c + i), xx = IO::load(x + i);
        IO::store(o + i, {step_value(xx.lo, cfg_value(uu.lo, cc.lo, vs), va, vb),
                          step_value(xx.hi, cfg_value(uu.hi, cc.hi, vs), va, vb)});
      }
      for (; i < hi; ++i)
        o[i] = static_cast<scalar_t>(step_value<acc_t>(x[i], cfg_value<acc_t>(u[i], c[i], s), a, bm));
    } else {
      for (; i + IO::kStep <= hi; i += IO::kStep) {
        const auto uu = IO::load(u + i), cc = IO::load(c + i);
        IO::store(o + i, {vb * cfg_value(uu.lo, cc.lo, vs), vb * cfg_value(uu.hi, cc.hi, vs)});
      }
      for (; i < hi; ++i) o[i] = static_cast<scalar_t>(bm * cfg_value<acc_t>(u[i], c[i], s));
    }
  });
}

template <typename acc_t>
struct SampleGradCoefs {
  acc_t multiplier = 1, coef_guided = 0, mean_guided = 0, coef_cond = 0, mean_cond = 0;
};

template <typename scalar_t>
void cfg_backward_typed(const CfgCall& call, const at::Tensor& grad_out, const at::Tensor& stats,
                        at::Tensor& grad_sample, at::Tensor& grad_uncond, at::Tensor& grad_cond) {
  using acc_t = at::opmath_type<scalar_t>;
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  const CfgParams<acc_t> p = cfg_params<acc_t>(call);
  const bool rescaled = call.rescale != 0.0;
  const scalar_t* go = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* u = call.uncond.const_data_ptr<scalar_t>();
  const scalar_t* c = call.cond.const_data_ptr<scalar_t>();
  scalar_t* gx = grad_sample.defined() ? grad_sample.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* gu = grad_uncond.mutable_data_ptr<scalar_t>();
  scalar_t* gc = grad_cond.mutable_data_ptr<scalar_t>();

  std::vector<SampleGradCoefs<acc_t>> coefs(p.batch);
  if (rescaled) {
    // dot_b = sum_i grad_out_i * guided_i, the one reduction rescale's backward needs.
    auto chunk = [&](int64_t b, int64_t lo, int64_t hi) {
      const acc_t s = sample_scale(p, b);
      const Vec vs(s);
      Vec acc(acc_t(0));
      acc_t tail = 0;
      int64_t i = lo;
      for (; i + IO::kStep <= hi; i += IO::kStep) {
        const auto gg = IO::load(go + i), uu = IO::load(u + i), cc = IO::load(c + i);
        acc += gg.lo * cfg_value(uu.lo, cc.lo, vs) + gg.hi * cfg_value(uu.hi, cc.hi, vs);
      }
      for (; i < hi; ++i) tail += acc_t(go[i]) * cfg_value<acc_t>(u[i], c[i], s);
      return lane_sum(acc) + tail;
    };
    const auto dots = reduce_per_sample(p.batch, p.per_sample, acc_t(0), chunk,
                                        [](acc_t a, acc_t b) { return a + b; });
    const acc_t* sp = stats.const_data_ptr<acc_t>();
    for (int64_t b = 0; b < p.batch; ++b) {
      const acc_t* st = sp + kStatsPerSample * b;
      const RescaleGrad<acc_t> r =
          rescale_grad(p.rescale, st[3], st[1], sample_step(p, b).b * dots[b], acc_t(p.per_sample));
      coefs[b] = {r.multiplier, r.coef_guided, st[0], r.coef_cond, st[2]};
    }
  }

  for_each_sample_segment(grad_uncond.numel(), p.per_sample, [&](int64_t b, int64_t lo, int64_t hi) {
    const acc_t s = sample_scale(p, b);
    const StepCoefs<acc_t> step = sample_step(p, b);
    const SampleGradCoefs<acc_t>& k = coefs[b];
    const Vec vs(s), va(step.a), vb(step.b), one(acc_t(1)), zero(acc_t(0)), vm(k.multiplier),
        vcg(k.coef_guided), vmg(k.mean_guided), vcc(k.coef_cond), vmc(k.mean_cond);
    int64_t i = lo;
    for (; i + IO::kStep <= hi; i += IO::kStep) {
      const auto gg = IO::load(go + i);
      typename IO::Pair du, dc;
      if (rescaled) {  // without rescale the gradient does not depend on uncond/cond: skip the loads
        const auto uu = IO::load(u + i), cc = IO::load(c + i);
        cfg_backward_value(vb * gg.lo, cfg_value(uu.lo, cc.lo, vs), cc.lo, vs, one, vm, vcg, vmg, vcc,
                           vmc, du.lo, dc.lo);
        cfg_backward_value(vb * gg.hi, cfg_value(uu.hi, cc.hi, vs), cc.hi, vs, one, vm, vcg, vmg, vcc,
                           vmc, du.hi, dc.hi);
      } else {
        cfg_backward_value(vb * gg.lo, zero, zero, vs, one, vm, zero, zero, zero, zero, du.lo, dc.lo);
        cfg_backward_value(vb * gg.hi, zero, zero, vs, one, vm, zero, zero, zero, zero, du.hi, dc.hi);
      }
      IO::store(gu + i, du);
      IO::store(gc + i, dc);
      if (gx) IO::store(gx + i, {va * gg.lo, va * gg.hi});
    }
    for (; i < hi; ++i) {
      const acc_t g = go[i];
      const acc_t guided = rescaled ? cfg_value<acc_t>(u[i], c[i], s) : acc_t(0);
      const acc_t cv = rescaled ? acc_t(c[i]) : acc_t(0);
      acc_t du, dc;
      cfg_backward_value<acc_t>(step.b * g, guided, cv, s, acc_t(1), k.multiplier, k.coef_guided,
                                k.mean_guided, k.coef_cond, k.mean_cond, du, dc);
      gu[i] = static_cast<scalar_t>(du);
      gc[i] = static_cast<scalar_t>(dc);
      if (gx) gx[i] = static_cast<scalar_t>(step.a * g);
    }
  });
}

// torch.nan_to_num on SIMD lanes (the scalar tail uses ddg::nan_to_num).
template <typename Vec, typename acc_t>
Vec nan_to_num_vec(Vec v) {
  v = Vec::blendv(v, Vec(acc_t(0)), v.isnan());
  return at::vec::clamp(v, Vec(-finite_max<acc_t>()), Vec(finite_max<acc_t>()));
}

template <typename scalar_t>
void dmd_forward_typed(const DmdCall& call, at::Tensor& grad, at::Tensor& denom, at::Tensor& loss) {
  using acc_t = at::opmath_type<scalar_t>;
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  const bool eps = call.prediction == DmdPrediction::kEpsilon;
  const int64_t n = call.per_sample;
  const scalar_t* x = call.x.const_data_ptr<scalar_t>();
  const scalar_t* u = call.uncond.const_data_ptr<scalar_t>();
  const scalar_t* c = call.cond.const_data_ptr<scalar_t>();
  const scalar_t* f = call.fake.const_data_ptr<scalar_t>();
  const scalar_t* xt = eps ? call.x_t.const_data_ptr<scalar_t>() : nullptr;
  const acc_t* ab = eps ? call.alpha_bar.const_data_ptr<acc_t>() : nullptr;
  const acc_t* sps = call.scale_ps.defined() ? call.scale_ps.const_data_ptr<acc_t>() : nullptr;
  acc_t* g = grad.mutable_data_ptr<acc_t>();
  auto scale_of = [&](int64_t b) { return sps ? sps[b] : static_cast<acc_t>(call.scale); };
  auto eps_coefs = [&](int64_t b) {
    return eps ? dmd_eps_coefs<acc_t>(ab[b]) : DmdEpsCoefs<acc_t>{acc_t(1), acc_t(1)};
  };
  auto plus = [](acc_t a, acc_t b) { return a + b; };

  // Pass 1: the per-sample normaliser sum|p_real|.
  const auto abs_sums = reduce_per_sample(call.batch, n, acc_t(0), [&](int64_t b, int64_t lo, int64_t hi) {
    const acc_t s = scale_of(b);
    const DmdEpsCoefs<acc_t> k = eps_coefs(b);
    const Vec vs(s), vinv(k.inv_sqrt_ab), vr(k.noise_to_x0);
    Vec acc(acc_t(0));
    acc_t tail = 0;
    int64_t i = lo;
    if (eps) {
      for (; i + IO::kStep <= hi; i += IO::kStep) {
        const auto uu = IO::load(u + i), cc = IO::load(c + i), xx = IO::load(x + i), tt = IO::load(xt + i);
        acc += dmd_eps_p_real(xx.lo, tt.lo, cfg_value(uu.lo, cc.lo, vs), vinv, vr).abs() +
               dmd_eps_p_real(xx.hi, tt.hi, cfg_value(uu.hi, cc.hi, vs), vinv, vr).abs();
      }
      for (; i < hi; ++i)
        tail += ddg_abs(dmd_eps_p_real<acc_t>(x[i], xt[i], cfg_value<acc_t>(u[i], c[i], s),
                                              k.inv_sqrt_ab, k.noise_to_x0));
    } else {
      for (; i + IO::kStep <= hi; i += IO::kStep) {
        const auto uu = IO::load(u + i), cc = IO::load(c + i);
        acc += cfg_value(uu.lo, cc.lo, vs).abs() + cfg_value(uu.hi, cc.hi, vs).abs();
      }
      for (; i < hi; ++i) tail += ddg_abs(cfg_value<acc_t>(u[i], c[i], s));
    }
    return lane_sum(acc) + tail;
  }, plus);
  acc_t* dp = denom.mutable_data_ptr<acc_t>();
  for (int64_t b = 0; b < call.batch; ++b) dp[b] = dmd_denominator(abs_sums[b], n);

  // Pass 2: g = nan_to_num(numerator / denom), written once, and its per-sample sum of squares.
  const auto sq_sums = reduce_per_sample(call.batch, n, acc_t(0), [&](int64_t b, int64_t lo, int64_t hi) {
    const acc_t s = scale_of(b), d = dp[b];
    const acc_t factor = eps ? eps_coefs(b).noise_to_x0 : acc_t(1);
    const Vec vs(s), vd(d), vf(factor);
    Vec acc(acc_t(0));
    acc_t tail = 0;
    int64_t i = lo;
    for (; i + IO::kStep <= hi; i += IO::kStep) {
      const auto uu = IO::load(u + i), cc = IO::load(c + i), ff = IO::load(f + i);
      const Vec g0 = nan_to_num_vec<Vec, acc_t>(dmd_numerator(cfg_value(uu.lo, cc.lo, vs), ff.lo, vf) / vd);
      const Vec g1 = nan_to_num_vec<Vec, acc_t>(dmd_numerator(cfg_value(uu.hi, cc.hi, vs), ff.hi, vf) / vd);
      store_acc(g + i, g0, g1);
      acc += g0 * g0 + g1 * g1;
    }
    for (; i < hi; ++i) {
      const acc_t gi = nan_to_num(dmd_numerator<acc_t>(cfg_value<acc_t>(u[i], c[i], s), f[i], factor) / d);
      g[i] = gi;
      tail += gi * gi;
    }
    return lane_sum(acc) + tail;
  }, plus);
  acc_t total = 0;
  for (const acc_t v : sq_sums) total += v;
  loss.fill_(acc_t(0.5) * total / acc_t(grad.numel()));
}

template <typename scalar_t>
void dmd_backward_typed(const at::Tensor& grad_loss, const at::Tensor& grad, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  const acc_t k = grad_loss.item<acc_t>() / acc_t(grad.numel());
  const acc_t* g = grad.const_data_ptr<acc_t>();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  const Vec vk(k);
  at::parallel_for(0, out.numel(), kElementwiseGrain, [&](int64_t lo, int64_t hi) {
    int64_t i = lo;
    for (; i + IO::kStep <= hi; i += IO::kStep)
      IO::store(o + i, {vk * Vec::loadu(g + i), vk * Vec::loadu(g + i + Vec::size())});
    for (; i < hi; ++i) o[i] = static_cast<scalar_t>(k * g[i]);
  });
}

}  // namespace

DDG_GUIDANCE_LOOPS(CpuLoops);

const GuidanceKernels& guidance_kernels() { return ddg::guidance_kernels<CpuLoops>(); }

}  // namespace ddg::cpu

