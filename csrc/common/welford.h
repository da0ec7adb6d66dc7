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
// Sums of d = x - shift and d^2 over a set of elements that share one shift (a value drawn
// from the same data, e.g. its first element). Cheaper per element than welford_update (no
// division) and, because |d| is of the order of the spread rather than of |x|, as accurate
// when the data sit far from zero with a tiny spread; x - shift is exact whenever x and the
// shift are within a factor of two (Sterbenz). Sets with the same shift add with
// shifted_sums_add; welford_from_shifted_sums turns a set into a state for welford_merge.
template <typename acc_t>
struct ShiftedSums {
  acc_t sum;     // sum of (x - shift)
  acc_t sum_sq;  // sum of (x - shift)^2
};

template <typename acc_t>
DDG_HD ShiftedSums<acc_t> shifted_sums_empty() {
  return ShiftedSums<acc_t>{acc_t(0), acc_t(0)};
}

template <typename acc_t>
DDG_HD ShiftedSums<acc_t> shifted_sums_update(ShiftedSums<acc_t> s, acc_t x, acc_t shift) {
  const acc_t d = x - shift;
  s.sum += d;
  s.sum_sq += d * d;
  return s;
}

template <typename acc_t>
DDG_HD ShiftedSums<acc_t> shifted_sums_add(ShiftedSums<acc_t> a, ShiftedSums<acc_t> b) {
  return ShiftedSums<acc_t>{a.sum + b.sum, a.sum_sq + b.sum_sq};
}

// The state of `count` elements with shifted sums s: mean = shift + sum / count and
// m2 = sum_sq - sum^2 / count (the cancellation is that of the shift's distance from the mean,
// a few standard deviations, not of the mean's distance from zero). Clamped at 0 against rounding.
template <typename acc_t>
DDG_HD WelfordState<acc_t> welford_from_shifted_sums(acc_t count, acc_t shift, ShiftedSums<acc_t> s) {
  if (count == acc_t(0)) return welford_empty<acc_t>();
  const acc_t d_mean = s.sum / count;
  const acc_t m2 = s.sum_sq - s.sum * d_mean;
  return WelfordState<acc_t>{count, shift + d_mean, m2 > acc_t(0) ? m2 : acc_t(0)};
}

}  // namespace ddg
