// Registers the guidance ops of one backend (CPU or CUDA) with that backend's loops.
// Included by csrc/cpu/guidance.cpp and csrc/cuda/guidance.cu inside TORCH_LIBRARY_IMPL.
#pragma once

#include <torch/library.h>

#include "guidance.h"

namespace ddg {

template <const GuidanceKernels& K>
void register_guidance_ops(torch::Library& m) {
  using at::Tensor;
  using OptTensor = std::optional<Tensor>;
  m.impl("cfg_combine", [](const Tensor& uncond, const Tensor& cond, double scale,
                           const OptTensor& scale_ps, double rescale) {
    return cfg_combine_op(K, uncond, cond, scale, scale_ps, rescale);
  });
  m.impl("cfg_combine_backward",
         [](const Tensor& grad_out, const Tensor& uncond, const Tensor& cond, double scale,
            const OptTensor& scale_ps, double rescale, const Tensor& stats) {
           return cfg_combine_backward_op(K, grad_out, uncond, cond, scale, scale_ps, rescale,
                                          stats);
         });
  m.impl("cfg_step", [](const Tensor& sample, const Tensor& uncond, const Tensor& cond,
                        double scale, const OptTensor& scale_ps, double rescale,
                        c10::string_view update, double coef_t, double coef_next,
                        const OptTensor& coef_ps) {
    return cfg_step_op(K, sample, uncond, cond, scale, scale_ps, rescale, update, coef_t,
                       coef_next, coef_ps);
  });
  m.impl("cfg_step_backward",
         [](const Tensor& grad_out, const Tensor& uncond, const Tensor& cond, double scale,
            const OptTensor& scale_ps, double rescale, c10::string_view update, double coef_t,
            double coef_next, const OptTensor& coef_ps, const Tensor& stats) {
           return cfg_step_backward_op(K, grad_out, uncond, cond, scale, scale_ps, rescale,
                                       update, coef_t, coef_next, coef_ps, stats);
         });
  m.impl("dmd_grad", [](const Tensor& x, const Tensor& uncond, const Tensor& cond,
                        const Tensor& fake, double scale, const OptTensor& scale_ps,
                        c10::string_view prediction, const OptTensor& x_t,
                        const OptTensor& alpha_bar) {
    return dmd_grad_op(K, x, uncond, cond, fake, scale, scale_ps, prediction, x_t, alpha_bar);
  });
  m.impl("dmd_grad_backward",
         [](const Tensor& grad_loss, const Tensor& grad, at::ScalarType dtype) {
           return dmd_grad_backward_op(K, grad_loss, grad, dtype);
         });
}

}  // namespace ddg
