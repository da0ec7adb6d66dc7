// The guidance ops' kernel table of one backend (CPU or CUDA) built from its typed loops, and
// their registration: csrc/cuda/guidance.cu registers its table in its TORCH_LIBRARY_IMPL; the
// CPU table is built in csrc/cpu/guidance.cpp and registered by csrc/host/register_cpu.cpp.
#pragma once

#include <torch/library.h>

#include "dispatch.h"
#include "guidance.h"

namespace ddg {

// The dtype-dispatched entry points of a backend whose typed loops are the static member
// templates Loops::cfg_forward<scalar_t>, cfg_backward, dmd_forward and dmd_backward.
template <class Loops>
const GuidanceKernels& guidance_kernels() {
  static const GuidanceKernels kernels{
      [](const CfgCall& call, at::Tensor& out, at::Tensor& stats) {
        DDG_DISPATCH_FLOATING(out.scalar_type(), "ddg.cfg_forward",
                              [&] { Loops::template cfg_forward<scalar_t>(call, out, stats); });
      },
      [](const CfgCall& call, const at::Tensor& grad_out, const at::Tensor& stats, at::Tensor& grad_sample,
         at::Tensor& grad_uncond, at::Tensor& grad_cond) {
        DDG_DISPATCH_FLOATING(grad_uncond.scalar_type(), "ddg.cfg_backward", [&] {
          Loops::template cfg_backward<scalar_t>(call, grad_out, stats, grad_sample, grad_uncond, grad_cond);
        });
      },
      [](const DmdCall& call, at::Tensor& grad, at::Tensor& denom, at::Tensor& loss) {
        DDG_DISPATCH_FLOATING(call.x.scalar_type(), "ddg.dmd_forward",
                              [&] { Loops::template dmd_forward<scalar_t>(call, grad, denom, loss); });
      },
      [](const at::Tensor& grad_loss, const at::Tensor& grad, at::Tensor& out) {
        DDG_DISPATCH_FLOATING(out.scalar_type(), "ddg.dmd_backward",
                              [&] { Loops::template dmd_backward<scalar_t>(grad_loss, grad, out); });
      }};
  return kernels;
}

// Declares the Loops struct of a backend from its typed loop functions cfg_forward_typed,
// cfg_backward_typed, dmd_forward_typed and dmd_backward_typed (templates on scalar_t).
#define DDG_GUIDANCE_LOOPS(NAME)                         \
  struct NAME {                                          \
    DDG_TYPED_LOOP(cfg_forward, cfg_forward_typed)       \
    DDG_TYPED_LOOP(cfg_backward, cfg_backward_typed)     \
    DDG_TYPED_LOOP(dmd_forward, dmd_forward_typed)       \
    DDG_TYPED_LOOP(dmd_backward, dmd_backward_typed)     \
  }

// Registers the ops of one backend whose kernel table Kernels() returns (it may check first
// that the backend can run here, as the CPU registration does).
template <const GuidanceKernels& (*Kernels)()>
void register_guidance_kernels(torch::Library& m) {
  using at::Tensor;
  using OptTensor = std::optional<Tensor>;
  m.impl("cfg_combine", [](const Tensor& uncond, const Tensor& cond, double scale,
                           const OptTensor& scale_ps, double rescale) {
    return cfg_combine_op(Kernels(), uncond, cond, scale, scale_ps, rescale);
  });
  m.impl("cfg_combine_backward",
         [](const Tensor& grad_out, const Tensor& uncond, const Tensor& cond, double scale,
            const OptTensor& scale_ps, double rescale, const Tensor& stats) {
           return cfg_combine_backward_op(Kernels(), grad_out, uncond, cond, scale, scale_ps, rescale,
                                          stats);
         });
  m.impl("cfg_step", [](const Tensor& sample, const Tensor& uncond, const Tensor& cond,
                        double scale, const OptTensor& scale_ps, double rescale,
                        c10::string_view update, double coef_t, double coef_next,
                        const OptTensor& coef_ps) {
    return cfg_step_op(Kernels(), sample, uncond, cond, scale, scale_ps, rescale, update, coef_t,
                       coef_next, coef_ps);
  });
  m.impl("cfg_step_backward",
         [](const Tensor& grad_out, const Tensor& uncond, const Tensor& cond, double scale,
            const OptTensor& scale_ps, double rescale, c10::string_view update, double coef_t,
            double coef_next, const OptTensor& coef_ps, const Tensor& stats) {
           return cfg_step_backward_op(Kernels(), grad_out, uncond, cond, scale, scale_ps, rescale,
                                       update, coef_t, coef_next, coef_ps, stats);
         });
  m.impl("dmd_grad", [](const Tensor& x, const Tensor& uncond, const Tensor& cond,
                        const Tensor& fake, double scale, const OptTensor& scale_ps,
                        c10::string_view prediction, const OptTensor& x_t,
                        const OptTensor& alpha_bar) {
    return dmd_grad_op(Kernels(), x, uncond, cond, fake, scale, scale_ps, prediction, x_t, alpha_bar);
  });
  m.impl("dmd_grad_backward",
         [](const Tensor& grad_loss, const Tensor& grad, at::ScalarType dtype) {
           return dmd_grad_backward_op(Kernels(), grad_loss, grad, dtype);
         });
}

template <class Loops>
void register_guidance_ops(torch::Library& m) {
  register_guidance_kernels<&guidance_kernels<Loops>>(m);
}

}  // namespace ddg
