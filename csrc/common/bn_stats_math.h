// Per-element math of the BN-statistics op family (docs/methods/ddis.md §4), shared by the CPU
// and CUDA kernels. The statistics themselves use welford.h.
#pragma once

#include "macros.h"

namespace ddg {

// The backward of (mean_c, var_c) = BN batch statistics over M elements of channel c:
//   dL/dx = grad_mean_c / M + grad_var_c * 2 (x - mean_c) / M  =  a_c + b_c (x - mean_c).
// Kept as b * (x - mean) (not alpha + beta x), which would cancel when |mean| >> std.
template <typename acc_t>
struct BnGradCoefs {
  acc_t a;
  acc_t b;
};

template <typename acc_t>
DDG_HD BnGradCoefs<acc_t> bn_grad_coefs(acc_t grad_mean, acc_t grad_var, acc_t count) {
  return BnGradCoefs<acc_t>{grad_mean / count, acc_t(2) * grad_var / count};
}

template <typename T>
DDG_HD T bn_grad_value(T x, T mean, T a, T b) {
  return a + b * (x - mean);
}

}  // namespace ddg
