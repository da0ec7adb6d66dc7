// Per-element and per-sample math of the guidance op family (CFG combine, guidance
// rescale, CFG fused with a DDIM / flow-matching Euler step, the DMD gradient).
// Shared verbatim by csrc/cpu/guidance.cpp (scalars and at::vec::Vectorized) and
// csrc/cuda/guidance.cu, so the CPU tests check the arithmetic the GPU runs.
// Element functions are templates over T so they accept a scalar or a SIMD vector;
// per-sample functions run once per sample and use plain acc_t scalars.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#include "macros.h"
#include "welford.h"

namespace ddg {

// ---------------------------------------------------------------- scalar helpers

DDG_HD float ddg_sqrt(float v) { return sqrtf(v); }
DDG_HD double ddg_sqrt(double v) { return sqrt(v); }
DDG_HD float ddg_abs(float v) { return fabsf(v); }
DDG_HD double ddg_abs(double v) { return fabs(v); }

template <typename acc_t> DDG_HD acc_t finite_max();
template <> DDG_HD float finite_max<float>() { return FLT_MAX; }
template <> DDG_HD double finite_max<double>() { return DBL_MAX; }

// torch.nan_to_num with its defaults: NaN -> 0, +-inf -> +-max finite value.
template <typename acc_t>
DDG_HD acc_t nan_to_num(acc_t v) {
  if (v != v) return acc_t(0);
  if (v > finite_max<acc_t>()) return finite_max<acc_t>();
  if (v < -finite_max<acc_t>()) return -finite_max<acc_t>();
  return v;
}

// ---------------------------------------------------------------- sampler updates

// Which sampler update follows the CFG combine. Values are part of the kernel ABI.
enum class StepUpdate : int {
  kNone = 0,             // plain CFG combine: out = guided
  kDdimEpsilon = 1,      // DDIMScheduler.step, eta = 0, prediction_type "epsilon"
  kDdimVPrediction = 2,  // DDIMScheduler.step, eta = 0, prediction_type "v_prediction"
  kEuler = 3,            // FlowMatchEulerDiscreteScheduler.step: x + (sigma_next - sigma) * v
};

// Every supported update is affine in (sample, guided prediction): out = a*x + b*pred.
template <typename acc_t>
struct StepCoefs {
  acc_t a;
  acc_t b;
};

// coef_t / coef_next are alpha_bar(t) / alpha_bar(t_prev) for DDIM and
// sigma / sigma_next for Euler.
template <typename acc_t>
DDG_HD StepCoefs<acc_t> step_coefs(StepUpdate update, acc_t coef_t, acc_t coef_next) {
  StepCoefs<acc_t> c{acc_t(0), acc_t(1)};
  if (update == StepUpdate::kEuler) {
    c.a = acc_t(1);
    c.b = coef_next - coef_t;
  } else if (update == StepUpdate::kDdimEpsilon || update == StepUpdate::kDdimVPrediction) {
    const acc_t sa_t = ddg_sqrt(coef_t), sb_t = ddg_sqrt(acc_t(1) - coef_t);
    const acc_t sa_p = ddg_sqrt(coef_next), sb_p = ddg_sqrt(acc_t(1) - coef_next);
    if (update == StepUpdate::kDdimEpsilon) {
      // x0 = (x - sb_t*eps)/sa_t ; out = sa_p*x0 + sb_p*eps
      c.a = sa_p / sa_t;
      c.b = sb_p - sa_p * sb_t / sa_t;
    } else {
      // x0 = sa_t*x - sb_t*v ; eps = sa_t*v + sb_t*x ; out = sa_p*x0 + sb_p*eps
      c.a = sa_p * sa_t + sb_p * sb_t;
      c.b = sb_p * sa_t - sa_p * sb_t;
    }
  }
  return c;
}

// Kernel parameters of cfg_combine / cfg_step and their backward (plain data, so it
// can be passed by value to a CUDA kernel). Per-sample arrays override the scalars.
template <typename acc_t>
struct CfgParams {
  int64_t batch;
  int64_t per_sample;      // elements per sample
  acc_t scale;
  const acc_t* scale_ps;   // [batch] or nullptr
  StepUpdate update;
  acc_t coef_t;
  acc_t coef_next;
  const acc_t* coef_ps;    // [batch, 2] (coef_t, coef_next) or nullptr
  acc_t rescale;           // guidance rescale phi in [0, 1]; 0 disables it
};

template <typename acc_t>
DDG_HD acc_t sample_scale(const CfgParams<acc_t>& p, int64_t b) {
  return p.scale_ps ? p.scale_ps[b] : p.scale;
}

template <typename acc_t>
DDG_HD StepCoefs<acc_t> sample_step(const CfgParams<acc_t>& p, int64_t b) {
  if (p.coef_ps) return step_coefs<acc_t>(p.update, p.coef_ps[2 * b], p.coef_ps[2 * b + 1]);
  return step_coefs<acc_t>(p.update, p.coef_t, p.coef_next);
}

// ---------------------------------------------------------------- element formulas

// Classifier-free guidance, written as diffusers does: uncond + s * (cond - uncond).
template <typename T>
DDG_HD T cfg_value(T uncond, T cond, T scale) {
  return uncond + scale * (cond - uncond);
}

// The sampler update applied to the (possibly rescaled) guided prediction.
template <typename T>
DDG_HD T step_value(T sample, T pred, T a, T b) {
  return a * sample + b * pred;
}

// ---------------------------------------------------------------- guidance rescale
// Lin et al. 2023 (diffusers rescale_noise_cfg): guided * (1 - phi + phi * std(cond)/std(guided)),
// std over all non-batch elements of one sample. The ratio of standard deviations is the
// same whether both use the biased or the unbiased estimator, so biased variances are kept.
// Per-sample stats layout: [mean_guided, var_guided, mean_cond, var_cond].
constexpr int kStatsPerSample = 4;

// A constant guided prediction has no spread to rescale: the ratio is taken as 1
// (diffusers would divide by zero and return NaN/inf).
template <typename acc_t>
DDG_HD acc_t rescale_std_ratio(acc_t var_cond, acc_t var_guided) {
  return var_guided > acc_t(0) ? ddg_sqrt(var_cond / var_guided) : acc_t(1);
}

template <typename acc_t>
DDG_HD acc_t rescale_multiplier(acc_t rescale, acc_t var_cond, acc_t var_guided) {
  return acc_t(1) - rescale + rescale * rescale_std_ratio(var_cond, var_guided);
}

// The statistics are accumulated as shifted sums (welford.h) with one shift per sample: the
// guided prediction and cond at the sample's first element. Both backends read that element,
// so the shift, and hence the summation, does not depend on how the sample is chunked.
template <typename acc_t>
struct RescaleShift {
  acc_t guided;
  acc_t cond;
};

template <typename acc_t>
DDG_HD RescaleShift<acc_t> rescale_shift(acc_t uncond0, acc_t cond0, acc_t scale) {
  return RescaleShift<acc_t>{cfg_value(uncond0, cond0, scale), cond0};
}

// Shifted sums of the guided prediction and of cond over a run of elements.
template <typename T>
struct RescaleSums {
  ShiftedSums<T> guided, cond;
};

template <typename T>
DDG_HD RescaleSums<T> rescale_sums_empty() {
  return RescaleSums<T>{shifted_sums_empty<T>(), shifted_sums_empty<T>()};
}

template <typename T>
DDG_HD void rescale_sums_add(RescaleSums<T>& s, T uncond, T cond, T scale, T shift_guided, T shift_cond) {
  s.guided = shifted_sums_update(s.guided, cfg_value(uncond, cond, scale), shift_guided);
  s.cond = shifted_sums_update(s.cond, cond, shift_cond);
}

// Welford states (in the shifted frame) of the guided prediction and of cond.
template <typename acc_t>
struct RescaleState {
  WelfordState<acc_t> guided;
  WelfordState<acc_t> cond;
};

template <typename acc_t>
DDG_HD RescaleState<acc_t> rescale_state_empty() {
  return RescaleState<acc_t>{welford_empty<acc_t>(), welford_empty<acc_t>()};
}

template <typename acc_t>
DDG_HD RescaleState<acc_t> rescale_state_of(acc_t count, const RescaleSums<acc_t>& s) {
  return RescaleState<acc_t>{welford_from_shifted_sums(count, s.guided), welford_from_shifted_sums(count, s.cond)};
}

struct RescaleStateMerge {
  template <typename S>
  DDG_HD S operator()(const S& a, const S& b) const {
    return S{welford_merge(a.guided, b.guided), welford_merge(a.cond, b.cond)};
  }
};

// One sample's stats row [mean_guided, var_guided, mean_cond, var_cond] from its merged state;
// returns the rescale multiplier.
template <typename acc_t>
DDG_HD acc_t rescale_finalize(const RescaleState<acc_t>& st, RescaleShift<acc_t> shift, acc_t rescale,
                              acc_t* stats_row) {
  const acc_t var_g = welford_variance(st.guided), var_c = welford_variance(st.cond);
  stats_row[0] = shift.guided + st.guided.mean;
  stats_row[1] = var_g;
  stats_row[2] = shift.cond + st.cond.mean;
  stats_row[3] = var_c;
  return rescale_multiplier(rescale, var_c, var_g);
}

// Backward of out = b * f(g, c) * g + a * x with f the rescale multiplier, per sample:
//   dL/dg_i = f * gp_i - grad_coef_guided * (g_i - mean_g)
//   dL/dc_i += grad_coef_cond * (c_i - mean_c)          (through std(cond))
// where gp = b * grad_out and dot = sum_i gp_i * g_i. With k = std_c/std_g and n elements:
//   grad_coef_guided = phi * dot * k / (n var_g),  grad_coef_cond = phi * dot * k / (n var_c).
// Where a variance is zero the ratio is a constant (see above) and its term is dropped.
template <typename acc_t>
struct RescaleGrad {
  acc_t multiplier;
  acc_t coef_guided;
  acc_t coef_cond;
};

template <typename acc_t>
DDG_HD RescaleGrad<acc_t> rescale_grad(acc_t rescale, acc_t var_cond, acc_t var_guided,
                                       acc_t dot, acc_t n) {
  RescaleGrad<acc_t> r{rescale_multiplier(rescale, var_cond, var_guided), acc_t(0), acc_t(0)};
  if (var_guided > acc_t(0)) {
    const acc_t common = rescale * dot * rescale_std_ratio(var_cond, var_guided) / n;
    r.coef_guided = common / var_guided;
    if (var_cond > acc_t(0)) r.coef_cond = common / var_cond;
  }
  return r;
}

// Element backward of the CFG combine (with rescale coefficients; the plain combine is
// multiplier = 1, coef_guided = coef_cond = 0). gp is the gradient w.r.t. the guided
// prediction after the sampler update's b factor.
template <typename T>
DDG_HD void cfg_backward_value(T gp, T guided, T cond, T scale, T one, T multiplier,
                               T coef_guided, T mean_guided, T coef_cond, T mean_cond,
                               T& grad_uncond, T& grad_cond) {
  const T dg = multiplier * gp - coef_guided * (guided - mean_guided);
  grad_uncond = (one - scale) * dg;
  grad_cond = scale * dg + coef_cond * (cond - mean_cond);
}

// ---------------------------------------------------------------- DMD gradient
// docs/methods/dpdmd.md; docs/guidance_kernels.md §4, K2. The real score is CFG of (uncond, cond) with scale s.
// velocity (flow matching, DP-DMD):  p_real = sigma * v_real, numerator = sigma * (v_real - v_fake),
//   sigma cancels: g = (v_real - v_fake) / mean|v_real|.
// epsilon (DDPM, DMD2): x0 = (x_t - sqrt(1-ab) eps) / sqrt(ab); p = x - x0;
//   g = (x0_fake - x0_real) / mean|x - x0_real|, numerator = sqrt((1-ab)/ab) * (eps_real - eps_fake).
enum class DmdPrediction : int { kVelocity = 0, kEpsilon = 1 };

template <typename acc_t>
struct DmdEpsCoefs {
  acc_t inv_sqrt_ab;     // 1 / sqrt(alpha_bar)
  acc_t noise_to_x0;     // sqrt(1 - alpha_bar) / sqrt(alpha_bar)
};

template <typename acc_t>
DDG_HD DmdEpsCoefs<acc_t> dmd_eps_coefs(acc_t alpha_bar) {
  const acc_t inv = acc_t(1) / ddg_sqrt(alpha_bar);
  return DmdEpsCoefs<acc_t>{inv, ddg_sqrt(acc_t(1) - alpha_bar) * inv};
}

// p_real for the epsilon parameterization (its |.| mean is the normaliser).
template <typename T>
DDG_HD T dmd_eps_p_real(T x, T x_t, T eps_real, T inv_sqrt_ab, T noise_to_x0) {
  return x - (x_t * inv_sqrt_ab - noise_to_x0 * eps_real);
}

// Numerator of g before normalisation; `factor` is 1 (velocity) or noise_to_x0 (epsilon).
template <typename T>
DDG_HD T dmd_numerator(T pred_real, T pred_fake, T factor) {
  return factor * (pred_real - pred_fake);
}

// Per-sample normaliser mean|p_real| from its sum.
template <typename acc_t>
DDG_HD acc_t dmd_denominator(acc_t abs_sum, int64_t n) {
  return abs_sum / acc_t(n);
}

}  // namespace ddg
