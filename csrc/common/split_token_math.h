// Per-element math of the split-token op family (GenDD's diffusion head, docs/methods/gendd.md §3):
// target contraction/mixup/noising, LayerNorm + adaLN modulation and its backward, gated
// residual, and IDDPM's hybrid diffusion loss with its derivative. Shared by
// csrc/cpu/split_token.cpp (scalars and at::vec::Vectorized) and csrc/cuda/split_token.cu.
// Element functions are templates over T so they take a scalar or a SIMD vector.
#pragma once

#include <cmath>

#include "macros.h"

namespace ddg {

// ---------------------------------------------------------------- targets (K1)

// The per-call constants of the target path, computed on the host in double and rounded
// once, as the reference's Python-float coefficients are.
template <typename acc_t>
struct TargetCoefs {
  acc_t keep;      // 1 - contraction (1 without prototypes)
  acc_t contract;  // contraction (0 without prototypes)
  acc_t mix;       // mixup weight of the sample itself
  acc_t mix_rest;  // 1 - mix, the weight of its permutation partner
};

// x0 = (1 - l) f + l mu: contraction of a teacher feature toward its class prototype.
template <typename T>
DDG_HD T contract_value(T f, T mu, T keep, T contract) {
  return keep * f + contract * mu;
}

// m x0 + (1 - m) x0[perm]: feature mixup.
template <typename T>
DDG_HD T mix_value(T own, T partner, T mix, T mix_rest) {
  return mix * own + mix_rest * partner;
}

// q(x_t | x_0): sqrt(abar_t) x0 + sqrt(1 - abar_t) eps.
template <typename T>
DDG_HD T noised_value(T x0, T eps, T sqrt_ab, T sqrt_one_minus_ab) {
  return sqrt_ab * x0 + sqrt_one_minus_ab * eps;
}

// ---------------------------------------------------------------- LayerNorm + adaLN

// A row's statistics are taken about a shift s, its first element: a plain sum of x rounds at
// the magnitude of the sum, W |mean|, and loses the digits of the variance when |mean| >> std
// (mean 100, std 0.01 in fp32); x - s is exact for x within a factor 2 of s (Sterbenz) and the
// sum of x - s rounds at the scale of the spread. Both backends sum shifted_value over the row
// and finish with mean_from_shifted_sum; the variance is then a second pass about that mean.
template <typename T>
DDG_HD T shifted_value(T x, T shift) {
  return x - shift;
}

template <typename acc_t>
DDG_HD acc_t mean_from_shifted_sum(acc_t shift, acc_t shifted_sum, acc_t width) {
  return shift + shifted_sum / width;
}

// y * (1 + scale) + shift, y = the (affine) LayerNorm output.
template <typename T>
DDG_HD T modulate_value(T y, T scale, T shift) {
  return y * (T(1) + scale) + shift;
}

// dL/dx of a LayerNorm row from g_xhat = dL/dxhat: rstd (g_xhat - mean(g_xhat) - xhat mean(g_xhat xhat)).
template <typename T>
DDG_HD T layer_norm_input_grad(T g_xhat, T xhat, T rstd, T mean_g, T mean_gx) {
  return rstd * (g_xhat - mean_g - xhat * mean_gx);
}

// ---------------------------------------------------------------- gated residual

template <typename T>
DDG_HD T gated_value(T x, T gate, T h) {
  return x + gate * h;
}

// ---------------------------------------------------------------- diffusion loss (K5)

DDG_HD float ddg_exp(float v) { return expf(v); }
DDG_HD double ddg_exp(double v) { return exp(v); }
DDG_HD float ddg_log(float v) { return logf(v); }
DDG_HD double ddg_log(double v) { return log(v); }
DDG_HD float ddg_tanh(float v) { return tanhf(v); }
DDG_HD double ddg_tanh(double v) { return tanh(v); }

// One row's schedule constants (GaussianDiffusionSchedule.loss_coefs): mean_coef maps
// eps_hat - eps to mu_q - mu_theta (= x0 - mu_theta at t = 0).
template <typename acc_t>
struct LossCoefs {
  acc_t mean_coef;
  acc_t log_beta;
  acc_t log_post;  // clipped log posterior variance
};

// A term of the variational bound of one element and its derivative w.r.t. v.
template <typename acc_t>
struct VbTerm {
  acc_t value;
  acc_t grad_v;
};

// IDDPM's learned-range log variance: frac log beta + (1 - frac) log post, frac = (v + 1) / 2.
template <typename acc_t>
DDG_HD acc_t learned_log_variance(acc_t v, const LossCoefs<acc_t>& c) {
  const acc_t frac = (v + acc_t(1)) / acc_t(2);
  return frac * c.log_beta + (acc_t(1) - frac) * c.log_post;
}

// KL(N(mu_q, post) || N(mu_theta, e^logvar)) of one element, d = mu_q - mu_theta (no gradient).
template <typename acc_t>
DDG_HD VbTerm<acc_t> kl_term(acc_t d, acc_t v, const LossCoefs<acc_t>& c) {
  const acc_t log_var = learned_log_variance(v, c);
  const acc_t ratio = ddg_exp(c.log_post - log_var), d2 = d * d * ddg_exp(-log_var);
  const acc_t value = acc_t(0.5) * (acc_t(-1) + log_var - c.log_post + ratio + d2);
  const acc_t grad_log_var = acc_t(0.5) * (acc_t(1) - ratio - d2);
  return {value, grad_log_var * acc_t(0.5) * (c.log_beta - c.log_post)};
}

// IDDPM's tanh approximation of the standard normal CDF, and its derivative.
template <typename acc_t>
DDG_HD acc_t approx_normal_cdf(acc_t a) {
  const acc_t k = acc_t(0.7978845608028654);  // sqrt(2 / pi)
  return acc_t(0.5) * (acc_t(1) + ddg_tanh(k * (a + acc_t(0.044715) * a * a * a)));
}

template <typename acc_t>
DDG_HD acc_t approx_normal_pdf(acc_t a) {
  const acc_t k = acc_t(0.7978845608028654);
  const acc_t th = ddg_tanh(k * (a + acc_t(0.044715) * a * a * a));
  return acc_t(0.5) * (acc_t(1) - th * th) * k * (acc_t(1) + acc_t(3 * 0.044715) * a * a);
}

// -log P(x0) under the decoder at t = 0: a Gaussian (mean x0 - centered, log std = log_var / 2)
// discretized into bins of 2/255, the end bins open (x0 < -0.999, x0 > 0.999); probabilities are
// clamped at 1e-12 as in IDDPM (no gradient through a clamped value).
template <typename acc_t>
DDG_HD VbTerm<acc_t> decoder_nll_term(acc_t x0, acc_t centered, acc_t v, const LossCoefs<acc_t>& c) {
  const acc_t kMin = acc_t(1e-12), kHalfBin = acc_t(1.0 / 255.0);
  const acc_t log_scale = acc_t(0.5) * learned_log_variance(v, c);
  const acc_t inv_std = ddg_exp(-log_scale);
  const acc_t a_plus = inv_std * (centered + kHalfBin), a_min = inv_std * (centered - kHalfBin);
  // d(a)/d(log_scale) = -a; the sign conventions below follow from it.
  acc_t prob, grad_prob;  // probability of the bin and its derivative w.r.t. log_scale
  if (x0 < acc_t(-0.999)) {
    prob = approx_normal_cdf(a_plus);
    grad_prob = -approx_normal_pdf(a_plus) * a_plus;
  } else if (x0 > acc_t(0.999)) {
    prob = acc_t(1) - approx_normal_cdf(a_min);
    grad_prob = approx_normal_pdf(a_min) * a_min;
  } else {
    prob = approx_normal_cdf(a_plus) - approx_normal_cdf(a_min);
    grad_prob = -approx_normal_pdf(a_plus) * a_plus + approx_normal_pdf(a_min) * a_min;
  }
  const bool clamped = !(prob >= kMin);
  const acc_t value = -ddg_log(clamped ? kMin : prob);
  const acc_t grad_log_scale = clamped ? acc_t(0) : -grad_prob / prob;
  return {value, grad_log_scale * acc_t(0.25) * (c.log_beta - c.log_post)};
}

// The variational-bound term of one element of a row at timestep t: the decoder NLL at t = 0,
// the KL otherwise. diff = eps_hat - eps.
template <typename acc_t>
DDG_HD VbTerm<acc_t> vb_term(bool first_step, acc_t diff, acc_t v, acc_t x0, const LossCoefs<acc_t>& c) {
  const acc_t d = c.mean_coef * diff;
  return first_step ? decoder_nll_term(x0, d, v, c) : kl_term(d, v, c);
}

}  // namespace ddg
