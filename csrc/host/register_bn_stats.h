// Registers the BN-statistics ops of one backend with its typed loops
// Loops::stats<scalar_t>(call, mean, var) and Loops::backward<scalar_t>(call, grad_mean, grad_var, mean, dx).
#pragma once

#include <torch/library.h>

#include "bn_stats.h"
#include "dispatch.h"

namespace ddg {

template <class Loops>
const BnStatsKernels& bn_stats_kernels() {
  static const BnStatsKernels kernels{
      [](const BnCall& call, at::Tensor& mean, at::Tensor& var) {
        DDG_DISPATCH_FLOATING(call.x.scalar_type(), "ddg.bn_stats",
                                        [&] { Loops::template stats<scalar_t>(call, mean, var); });
      },
      [](const BnCall& call, const at::Tensor& grad_mean, const at::Tensor& grad_var, const at::Tensor& mean,
         at::Tensor& dx) {
        DDG_DISPATCH_FLOATING(call.x.scalar_type(), "ddg.bn_stats_backward",
                                        [&] { Loops::template backward<scalar_t>(call, grad_mean, grad_var, mean, dx); });
      }};
  return kernels;
}

// Declares the Loops struct of a backend from its typed functions bn_stats_typed and
// bn_backward_typed (templates on scalar_t).
#define DDG_BN_STATS_LOOPS(NAME)                \
  struct NAME {                                 \
    DDG_TYPED_LOOP(stats, bn_stats_typed)       \
    DDG_TYPED_LOOP(backward, bn_backward_typed) \
  }

// Registers the ops of one backend whose kernel table Kernels() returns (it may check first
// that the backend can run here, as the CPU registration does).
template <const BnStatsKernels& (*Kernels)()>
void register_bn_stats_kernels(torch::Library& m) {
  m.impl("bn_stats", [](const at::Tensor& x) { return bn_stats_op(Kernels(), x); });
  m.impl("bn_stats_backward", [](const at::Tensor& grad_mean, const at::Tensor& grad_var, const at::Tensor& x,
                                 const at::Tensor& mean) {
    return bn_stats_backward_op(Kernels(), grad_mean, grad_var, x, mean);
  });
}

template <class Loops>
void register_bn_stats_ops(torch::Library& m) {
  register_bn_stats_kernels<&bn_stats_kernels<Loops>>(m);
}

}  // namespace ddg
