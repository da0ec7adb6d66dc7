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
// Sums of d = x - shift and d^2 over a set of values that share one shift (a value of the same
// data, e.g. the sample's first element or the chunk's first element of a channel). Accumulating
// them costs no division per value (welford_update costs one), and because |d| is of the order of
// the spread rather than of |x| they stay accurate when the data sit far from zero with a tiny
// spread; x - shift is exact whenever x and the shift are within a factor of two (Sterbenz). A
// Welford state whose mean is stored as an absolute value would round that mean to the offset's
// ulp, and every later delta in welford_merge would inherit the error. The cancellation in
// sum_sq - sum * mean costs a relative error of about eps * (1 + 2 (mean - shift)^2 / var) on a
// set's M2, so sets are kept short and the shift is a value of the data (docs/guidance_kernels.md,
// "Rescale statistics"; docs/bn_stats_cuda.md). T is a scalar or an at::vec::Vectorized.
template <typename T>
struct ShiftedSums {
  T sum;     // sum of (x - shift)
  T sum_sq;  // sum of (x - shift)^2
};

template <typename T>
DDG_HD ShiftedSums<T> shifted_sums_empty() {
  return ShiftedSums<T>{T(0), T(0)};
}

template <typename T>
DDG_HD ShiftedSums<T> shifted_sums_update(ShiftedSums<T> s, T x, T shift) {
  const T d = x - shift;
  s.sum = s.sum + d;
  s.sum_sq = s.sum_sq + d * d;
  return s;
}

template <typename T>
DDG_HD ShiftedSums<T> shifted_sums_add(ShiftedSums<T> a, ShiftedSums<T> b) {
  return ShiftedSums<T>{a.sum + b.sum, a.sum_sq + b.sum_sq};
}

// The state of `count` values with shifted sums s, in the shift's frame (its mean is relative to
// the shift): states of one shift merge with welford_merge and the shift is added back once.
// m2 = sum_sq - sum^2 / count, clamped at 0 against rounding.
template <typename acc_t>
DDG_HD WelfordState<acc_t> welford_from_shifted_sums(acc_t count, ShiftedSums<acc_t> s) {
  if (count == acc_t(0)) return welford_empty<acc_t>();
  const acc_t mean = s.sum / count;
  const acc_t m2 = s.sum_sq - s.sum * mean;
  return WelfordState<acc_t>{count, mean, m2 > acc_t(0) ? m2 : acc_t(0)};
}

// The same state with its mean back in absolute terms (shift + sum / count), for merging states
// whose shifts differ.
template <typename acc_t>
DDG_HD WelfordState<acc_t> welford_from_shifted_sums(acc_t count, acc_t shift, ShiftedSums<acc_t> s) {
  WelfordState<acc_t> st = welford_from_shifted_sums(count, s);
  if (count != acc_t(0)) st.mean = shift + st.mean;
  return st;
}

}  // namespace ddg
