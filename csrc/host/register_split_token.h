// Registers the split-token ops of one backend with its typed loops (templates on scalar_t):
// prepare, modulate, modulate_backward, gated, gated_backward, loss, loss_backward, cond_rows_sum.
#pragma once

#include <torch/library.h>

#include "dispatch.h"
#include "split_token.h"

namespace ddg {

template <class Loops>
const SplitTokenKernels& split_token_kernels() {
  static const SplitTokenKernels kernels{
      [](const PrepareCall& c, at::Tensor& x_t, at::Tensor& x0) {
        DDG_DISPATCH_FLOATING(c.features.scalar_type(), "ddg.split_token_prepare",
                                 [&] { Loops::template prepare<scalar_t>(c, x_t, x0); });
      },
      [](const ModulateCall& c, at::Tensor& out, at::Tensor& mean, at::Tensor& rstd) {
        DDG_DISPATCH_FLOATING(c.x.scalar_type(), "ddg.adaln_modulate",
                                 [&] { Loops::template modulate<scalar_t>(c, out, mean, rstd); });
      },
      [](const ModulateCall& c, const at::Tensor& g, const at::Tensor& mean, const at::Tensor& rstd, at::Tensor& gx,
         at::Tensor& gw, at::Tensor& gb, at::Tensor& gs) {
        DDG_DISPATCH_FLOATING(c.x.scalar_type(), "ddg.adaln_modulate_backward",
                                 [&] { Loops::template modulate_backward<scalar_t>(c, g, mean, rstd, gx, gw, gb, gs); });
      },
      [](const GatedCall& c, at::Tensor& out) {
        DDG_DISPATCH_FLOATING(c.x.scalar_type(), "ddg.gated_residual",
                                 [&] { Loops::template gated<scalar_t>(c, out); });
      },
      [](const GatedCall& c, const at::Tensor& g, at::Tensor& gh, at::Tensor& gg) {
        DDG_DISPATCH_FLOATING(c.h.scalar_type(), "ddg.gated_residual_backward",
                                 [&] { Loops::template gated_backward<scalar_t>(c, g, gh, gg); });
      },
      [](const LossCall& c, at::Tensor& loss, at::Tensor& mse) {
        DDG_DISPATCH_FLOATING(c.noise.scalar_type(), "ddg.diffusion_loss",
                                 [&] { Loops::template loss<scalar_t>(c, loss, mse); });
      },
      [](const LossCall& c, const at::Tensor& g, at::Tensor& grad) {
        DDG_DISPATCH_FLOATING(c.noise.scalar_type(), "ddg.diffusion_loss_backward",
                                 [&] { Loops::template loss_backward<scalar_t>(c, g, grad); });
      },
      [](const CondSumCall& c, at::Tensor& out) {
        DDG_DISPATCH_FLOATING(c.rows.scalar_type(), "ddg.cond_rows_sum",
                                 [&] { Loops::template cond_rows_sum<scalar_t>(c, out); });
      }};
  return kernels;
}

// Declares the Loops struct of a backend from its typed functions
// (<name>_typed<scalar_t>(...) for each entry of SplitTokenKernels).
#define DDG_SPLIT_TOKEN_LOOP(NAME) DDG_TYPED_LOOP(NAME, NAME##_typed)
#define DDG_SPLIT_TOKEN_LOOPS(NAME)                                                        \
  struct NAME {                                                                             \
    DDG_SPLIT_TOKEN_LOOP(prepare)                                                           \
    DDG_SPLIT_TOKEN_LOOP(modulate)                                                          \
    DDG_SPLIT_TOKEN_LOOP(modulate_backward)                                                 \
    DDG_SPLIT_TOKEN_LOOP(gated)                                                             \
    DDG_SPLIT_TOKEN_LOOP(gated_backward)                                                    \
    DDG_SPLIT_TOKEN_LOOP(loss)                                                              \
    DDG_SPLIT_TOKEN_LOOP(loss_backward)                                                     \
    DDG_SPLIT_TOKEN_LOOP(cond_rows_sum)                                                     \
  }

// Registers the ops of one backend whose kernel table Kernels() returns (it may check first
// that the backend can run here, as the CPU registration does).
template <const SplitTokenKernels& (*Kernels)()>
void register_split_token_kernels(torch::Library& m) {
  m.impl("split_token_prepare", [](const at::Tensor& features, const std::optional<at::Tensor>& prototypes,
                                     double contraction, const std::optional<at::Tensor>& permutation, double mix,
                                     const at::Tensor& timesteps, const at::Tensor& noise, const at::Tensor& sab,
                                     const at::Tensor& s1ab, int64_t token_size) {
    return split_token_prepare_op(Kernels(), features, prototypes, contraction, permutation, mix, timesteps, noise, sab, s1ab,
                                  token_size);
  });
  m.impl("adaln_modulate", [](const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& bias, const at::Tensor& shift,
                                const at::Tensor& scale, const std::optional<at::Tensor>& cond_index, double eps) {
    return adaln_modulate_op(Kernels(), x, weight, bias, shift, scale, cond_index, eps);
  });
  m.impl("adaln_modulate_backward",
         [](const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& weight,
              const std::optional<at::Tensor>& bias, const at::Tensor& scale,
              const std::optional<at::Tensor>& cond_index, const at::Tensor& mean, const at::Tensor& rstd) {
           return adaln_modulate_backward_op(Kernels(), grad_out, x, weight, bias, scale, cond_index, mean, rstd);
         });
  m.impl("gated_residual", [](const at::Tensor& x, const at::Tensor& gate, const at::Tensor& h,
                                const std::optional<at::Tensor>& cond_index) {
    return gated_residual_op(Kernels(), x, gate, h, cond_index);
  });
  m.impl("gated_residual_backward", [](const at::Tensor& grad_out, const at::Tensor& gate, const at::Tensor& h,
                                         const std::optional<at::Tensor>& cond_index) {
    return gated_residual_backward_op(Kernels(), grad_out, gate, h, cond_index);
  });
  m.impl("diffusion_loss", [](const at::Tensor& model_output, const at::Tensor& noise, const at::Tensor& timesteps,
                                const std::optional<at::Tensor>& x0, const at::Tensor& loss_coefs,
                                bool learned_variance) {
    return diffusion_loss_op(Kernels(), model_output, noise, timesteps, x0, loss_coefs, learned_variance);
  });
  m.impl("diffusion_loss_backward",
         [](const at::Tensor& grad_loss, const at::Tensor& model_output, const at::Tensor& noise,
              const at::Tensor& timesteps, const std::optional<at::Tensor>& x0, const at::Tensor& loss_coefs,
              bool learned_variance) {
           return diffusion_loss_backward_op(Kernels(), grad_loss, model_output, noise, timesteps, x0, loss_coefs,
                                             learned_variance);
         });
  m.impl("cond_rows_sum", [](const at::Tensor& rows, const at::Tensor& cond_index, int64_t cond_rows) {
    return cond_rows_sum_op(Kernels(), rows, cond_index, cond_rows);
  });
}

template <class Loops>
void register_split_token_ops(torch::Library& m) {
  register_split_token_kernels<&split_token_kernels<Loops>>(m);
}

}  // namespace ddg
