// Welford running statistics and Chan's parallel merge, shared by the CPU and CUDA
// reductions. Both backends combine partial states only through welford_merge, so the
// CPU tests exercise the exact merge arithmetic the GPU runs.
#pragma once

#include "macros.h"

namespace ddg {

template <typename acc_t>
struct WelfordState {
  acc_t count;
  acc_t mean;
  acc_t m2;  // sum of squared deviations from the mean
};

template <typename acc_t>
DDG_HD WelfordState<acc_t> welford_empty() {
  return WelfordState<acc_t>{acc_t(0), acc_t(0), acc_t(0)};
}

// One-element update (used per thread on the GPU).
template <typename acc_t>
DDG_HD WelfordState<acc_t> welford_update(WelfordState<acc_t> s, acc_t x) {
  s.count += acc_t(1);
  const acc_t delta = x - s.mean;
  s.mean += delta / s.count;
  s.m2 += delta * (x - s.mean);
  return s;
}

// Chan et al.: merge two partial states. Exact for any split of the data; the
// delta^2 * na * nb / n form avoids the catastrophic cancellation of E[x^2] - E[x]^2.
template <typename acc_t>
DDG_HD WelfordState<acc_t> welford_merge(WelfordState<acc_t> a, WelfordState<acc_t> b) {
  if (b.count == acc_t(0)) return a;
  if (a.count == acc_t(0)) return b;
  const acc_t n = a.count + b.count;
  const acc_t delta = b.mean - a.mean;
  const acc_t wb = b.count / n;
  WelfordState<acc_t> out;
  out.count = n;
  out.mean = a.mean + delta * wb;
  out.m2 = a.m2 + b.m2 + delta * delta * a.count * wb;
  return out;
}

// Biased (population) variance, as used for guidance rescale's std ratio.
template <typename acc_t>
DDG_HD acc_t welford_variance(WelfordState<acc_t> s) {
  return s.count > acc_t(0) ? s.m2 / s.count : acc_t(0);
}

// ---------------------------------------------------------------- shifted sums
// Sum and sum of squares of d = x - shift, with one shift for all values of a reduction (e.g.
// one element of the sample). Accumulating them costs no division per value; a run of values
// becomes a Welford state by welford_from_shifted_sums and runs merge by welford_merge. The
// state's mean stays relative to the shift: when the values sit far from zero with a small
// spread, a mean stored as an absolute value would round to the offset's ulp, and every later
// delta in welford_merge would inherit that error. The cancellation in sum_sq - sum * mean
// costs a relative error of about eps * (1 + 2 (mean - shift)^2 / var) on a run's M2, so runs
// are kept short and the shift is a value of the data (docs/guidance_kernels.md, "Rescale
// statistics").
template <typename T>
DDG_HD void shifted_sums_add(T d, T& sum, T& sum_sq) {
  sum += d;
  sum_sq += d * d;
}

template <typename acc_t>
DDG_HD WelfordState<acc_t> welford_from_shifted_sums(acc_t count, acc_t sum, acc_t sum_sq) {
  if (count == acc_t(0)) return welford_empty<acc_t>();
  const acc_t mean = sum / count;
  const acc_t m2 = sum_sq - sum * mean;
  return WelfordState<acc_t>{count, mean, m2 > acc_t(0) ? m2 : acc_t(0)};
}

}  // namespace ddg
