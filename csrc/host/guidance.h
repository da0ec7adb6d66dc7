// Host-side half of the guidance ops, shared by the CPU and CUDA registrations:
// argument checks, the memory layout the kernels iterate over, output allocation and
// the op semantics. A backend only supplies the raw loops (GuidanceKernels).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "../common/guidance_math.h"

namespace ddg {

// One cfg_combine / cfg_step call after validation. Every tensor operand has the same
// dense, sample-major strides, so sample b owns elements [b*per_sample, (b+1)*per_sample)
// of each data pointer.
struct CfgCall {
  at::Tensor sample;    // undefined for cfg_combine
  at::Tensor uncond;
  at::Tensor cond;
  at::Tensor scale_ps;  // [batch] in the accumulation dtype, or undefined
  at::Tensor coef_ps;   // [batch, 2] in the accumulation dtype, or undefined
  double scale = 0.0;
  double rescale = 0.0;
  StepUpdate update = StepUpdate::kNone;
  double coef_t = 0.0;
  double coef_next = 0.0;
  int64_t batch = 0;
  int64_t per_sample = 0;
};

template <typename acc_t>
CfgParams<acc_t> cfg_params(const CfgCall& c) {
  CfgParams<acc_t> p;
  p.batch = c.batch;
  p.per_sample = c.per_sample;
  p.scale = static_cast<acc_t>(c.scale);
  p.scale_ps = c.scale_ps.defined() ? c.scale_ps.const_data_ptr<acc_t>() : nullptr;
  p.update = c.update;
  p.coef_t = static_cast<acc_t>(c.coef_t);
  p.coef_next = static_cast<acc_t>(c.coef_next);
  p.coef_ps = c.coef_ps.defined() ? c.coef_ps.const_data_ptr<acc_t>() : nullptr;
  p.rescale = static_cast<acc_t>(c.rescale);
  return p;
}

// One dmd_grad call after validation (same layout contract as CfgCall).
struct DmdCall {
  at::Tensor x, uncond, cond, fake;
  at::Tensor x_t;        // epsilon only
  at::Tensor alpha_bar;  // epsilon only: [batch] in the accumulation dtype
  at::Tensor scale_ps;   // [batch] or undefined
  double scale = 0.0;
  DmdPrediction prediction = DmdPrediction::kVelocity;
  int64_t batch = 0;
  int64_t per_sample = 0;
};

// The raw loops of one backend. Outputs are preallocated in the operands' layout.
struct GuidanceKernels {
  // out = b*rescale(cfg(uncond, cond)) + a*sample; fills stats [batch, 4] when rescale != 0.
  void (*cfg_forward)(const CfgCall& call, at::Tensor& out, at::Tensor& stats);
  // grad_sample may be undefined (cfg_combine).
  void (*cfg_backward)(const CfgCall& call, const at::Tensor& grad_out, const at::Tensor& stats,
                       at::Tensor& grad_sample, at::Tensor& grad_uncond, at::Tensor& grad_cond);
  // grad (accumulation dtype), denom [batch], loss [].
  void (*dmd_forward)(const DmdCall& call, at::Tensor& grad, at::Tensor& denom, at::Tensor& loss);
  // out = grad_loss / numel * grad, in out's dtype.
  void (*dmd_backward)(const at::Tensor& grad_loss, const at::Tensor& grad, at::Tensor& out);
};

// ---- the ops (schemas in csrc/ddg_ops.cpp)
std::tuple<at::Tensor, at::Tensor> cfg_combine_op(
    const GuidanceKernels& k, const at::Tensor& uncond, const at::Tensor& cond, double scale,
    const std::optional<at::Tensor>& scale_per_sample, double rescale);

std::tuple<at::Tensor, at::Tensor> cfg_combine_backward_op(
    const GuidanceKernels& k, const at::Tensor& grad_out, const at::Tensor& uncond,
    const at::Tensor& cond, double scale, const std::optional<at::Tensor>& scale_per_sample,
    double rescale, const at::Tensor& stats);

std::tuple<at::Tensor, at::Tensor> cfg_step_op(
    const GuidanceKernels& k, const at::Tensor& sample, const at::Tensor& uncond,
    const at::Tensor& cond, double scale, const std::optional<at::Tensor>& scale_per_sample,
    double rescale, c10::string_view update, double coef_t, double coef_next,
    const std::optional<at::Tensor>& coef_per_sample);

std::tuple<at::Tensor, at::Tensor, at::Tensor> cfg_step_backward_op(
    const GuidanceKernels& k, const at::Tensor& grad_out, const at::Tensor& uncond,
    const at::Tensor& cond, double scale, const std::optional<at::Tensor>& scale_per_sample,
    double rescale, c10::string_view update, double coef_t, double coef_next,
    const std::optional<at::Tensor>& coef_per_sample, const at::Tensor& stats);

std::tuple<at::Tensor, at::Tensor, at::Tensor> dmd_grad_op(
    const GuidanceKernels& k, const at::Tensor& x, const at::Tensor& uncond,
    const at::Tensor& cond, const at::Tensor& fake, double scale,
    const std::optional<at::Tensor>& scale_per_sample, c10::string_view prediction,
    const std::optional<at::Tensor>& x_t, const std::optional<at::Tensor>& alpha_bar);

at::Tensor dmd_grad_backward_op(const GuidanceKernels& k, const at::Tensor& grad_loss,
                                const at::Tensor& grad, at::ScalarType dtype);

}  // namespace ddg
