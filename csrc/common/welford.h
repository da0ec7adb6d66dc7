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

}  // namespace ddg
