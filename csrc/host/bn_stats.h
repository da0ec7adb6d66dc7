// Host-side half of the BN-statistics ops, shared by the CPU and CUDA registrations:
// argument checks, the channel layout the kernels iterate over and output allocation.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace ddg {

// How channel c's elements lie in memory for an [N, C, *] tensor with S = prod(*):
//   kPlanes: contiguous NC(S): element (n, c, s) at (n*C + c)*S + s  (NCHW, NCL)
//   kRows:   channels fastest: element (r, c) at r*C + c with r over N*S rows (NHWC, NC)
enum class ChannelLayout : int { kPlanes = 0, kRows = 1 };

struct BnCall {
  at::Tensor x;  // in `layout`
  ChannelLayout layout = ChannelLayout::kPlanes;
  int64_t batch = 0;     // N
  int64_t channels = 0;  // C
  int64_t inner = 0;     // S
  int64_t count() const { return batch * inner; }  // elements per channel, M
};

struct BnStatsKernels {
  // mean, var: [C] in the accumulation dtype (biased variance).
  void (*stats)(const BnCall& call, at::Tensor& mean, at::Tensor& var);
  // dx = a_c + b_c (x - mean_c) with (a, b) = bn_grad_coefs(grad_mean_c, grad_var_c, M); dx in x's layout.
  void (*backward)(const BnCall& call, const at::Tensor& grad_mean, const at::Tensor& grad_var,
                   const at::Tensor& mean, at::Tensor& dx);
};

std::tuple<at::Tensor, at::Tensor> bn_stats_op(const BnStatsKernels& k, const at::Tensor& x);

at::Tensor bn_stats_backward_op(const BnStatsKernels& k, const at::Tensor& grad_mean, const at::Tensor& grad_var,
                                const at::Tensor& x, const at::Tensor& mean);

}  // namespace ddg
