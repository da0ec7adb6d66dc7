// Host-side half of the split-token ops (docs/methods/gendd.md §3), shared by the CPU and CUDA
// registrations: argument checks, the operand layouts the kernels read, output allocation
// and op semantics. Row operands ([rows, width]) are contiguous except shift/scale/gate,
// which are read in place with any row stride (column slices of one adaLN projection) and
// may be shared by several rows through cond_index.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace ddg {

// [U, W] rows with unit column stride, read as data + row * row_stride.
struct CondRows {
  at::Tensor t;
  int64_t row_stride = 0;
};

struct PrepareCall {
  at::Tensor features;     // [B, D] contiguous
  at::Tensor prototypes;   // [B, D] contiguous, or undefined (no contraction)
  at::Tensor permutation;  // int64 [B] contiguous, or undefined (no mixup)
  at::Tensor timesteps;    // int64 [M] contiguous
  at::Tensor noise;        // [M, C] contiguous
  at::Tensor sqrt_ab;      // [T] accumulation dtype, contiguous
  at::Tensor sqrt_one_minus_ab;
  double keep = 1.0, contract = 0.0, mix = 1.0, mix_rest = 0.0;
  int64_t batch = 0, dim = 0, token_size = 0, rows = 0, steps = 0;
  int64_t num_tokens() const { return dim / token_size; }
};

struct ModulateCall {
  at::Tensor x;       // [M, W] contiguous
  at::Tensor weight;  // [W] or undefined
  at::Tensor bias;    // [W] or undefined
  CondRows shift, scale;
  at::Tensor cond_index;  // int64 [M] or undefined (row r uses condition row r)
  int64_t rows = 0, width = 0, cond_rows = 0;
  double eps = 1e-6;
};

struct GatedCall {
  at::Tensor x, h;  // [M, W] contiguous (x may be undefined in backward)
  CondRows gate;
  at::Tensor cond_index;
  int64_t rows = 0, width = 0, cond_rows = 0;
};

struct LossCall {
  at::Tensor model_output;  // [M, C] or [M, 2C] contiguous
  at::Tensor noise;         // [M, C] contiguous
  at::Tensor timesteps;     // int64 [M] contiguous
  at::Tensor x0;            // [M0, C] contiguous, or undefined without learned variance
  at::Tensor coefs;         // [T, 3] accumulation dtype, contiguous
  bool learned = false;
  int64_t rows = 0, channels = 0, x0_rows = 0, steps = 0;
};

// Rows of [M, W] summed per condition: segment u is rows order[k], k in [offsets[u], offsets[u + 1]),
// order = the rows sorted by cond_index (stable, so ascending within a segment).
struct CondSumCall {
  at::Tensor rows;     // [M, W] contiguous
  at::Tensor order;    // int64 [M]
  at::Tensor offsets;  // int64 [U + 1]
  int64_t cond_rows = 0;
};

struct SplitTokenKernels {
  void (*prepare)(const PrepareCall& c, at::Tensor& x_t, at::Tensor& x0);
  void (*modulate)(const ModulateCall& c, at::Tensor& out, at::Tensor& mean, at::Tensor& rstd);
  // grad_weight / grad_bias are written only when defined (affine LN).
  void (*modulate_backward)(const ModulateCall& c, const at::Tensor& grad_out, const at::Tensor& mean,
                            const at::Tensor& rstd, at::Tensor& grad_x, at::Tensor& grad_weight, at::Tensor& grad_bias,
                            at::Tensor& grad_scale_rows);
  void (*gated)(const GatedCall& c, at::Tensor& out);
  void (*gated_backward)(const GatedCall& c, const at::Tensor& grad_out, at::Tensor& grad_h,
                         at::Tensor& grad_gate_rows);
  void (*loss)(const LossCall& c, at::Tensor& loss, at::Tensor& mse);
  void (*loss_backward)(const LossCall& c, const at::Tensor& grad_loss, at::Tensor& grad_output);
  void (*cond_rows_sum)(const CondSumCall& c, at::Tensor& out);  // writes every element of out
};

std::tuple<at::Tensor, at::Tensor> split_token_prepare_op(
    const SplitTokenKernels& k, const at::Tensor& features, const std::optional<at::Tensor>& prototypes,
    double contraction, const std::optional<at::Tensor>& permutation, double mix, const at::Tensor& timesteps,
    const at::Tensor& noise, const at::Tensor& sqrt_alpha_bar, const at::Tensor& sqrt_one_minus_alpha_bar,
    int64_t token_size);

std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_modulate_op(
    const SplitTokenKernels& k, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& shift, const at::Tensor& scale,
    const std::optional<at::Tensor>& cond_index, double eps);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> adaln_modulate_backward_op(
    const SplitTokenKernels& k, const at::Tensor& grad_out, const at::Tensor& x,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, const at::Tensor& scale,
    const std::optional<at::Tensor>& cond_index, const at::Tensor& mean, const at::Tensor& rstd);

at::Tensor gated_residual_op(const SplitTokenKernels& k, const at::Tensor& x, const at::Tensor& gate,
                             const at::Tensor& h, const std::optional<at::Tensor>& cond_index);

std::tuple<at::Tensor, at::Tensor> gated_residual_backward_op(const SplitTokenKernels& k, const at::Tensor& grad_out,
                                                              const at::Tensor& gate, const at::Tensor& h,
                                                              const std::optional<at::Tensor>& cond_index);

std::tuple<at::Tensor, at::Tensor> diffusion_loss_op(const SplitTokenKernels& k, const at::Tensor& model_output,
                                                     const at::Tensor& noise, const at::Tensor& timesteps,
                                                     const std::optional<at::Tensor>& x0,
                                                     const at::Tensor& loss_coefs, bool learned_variance);

at::Tensor diffusion_loss_backward_op(const SplitTokenKernels& k, const at::Tensor& grad_loss,
                                      const at::Tensor& model_output, const at::Tensor& noise,
                                      const at::Tensor& timesteps, const std::optional<at::Tensor>& x0,
                                      const at::Tensor& loss_coefs, bool learned_variance);

at::Tensor cond_rows_sum_op(const SplitTokenKernels& k, const at::Tensor& rows, const at::Tensor& cond_index,
                            int64_t cond_rows);

}  // namespace ddg
