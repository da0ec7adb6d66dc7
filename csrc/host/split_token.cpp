#include "split_token.h"

#include <ATen/OpMathType.h>

#include "tensor_layout.h"

namespace ddg {
namespace {

void check_float(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK(supported_dtype(t.scalar_type()), "ddg.", op, ": '", name,
              "' must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, "ddg.", op, ": '", name, "' must be ", dim, "-D, got shape ", t.sizes());
}

void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "ddg.", op, ": '", name, "' must have the dtype of '", ref_name,
              "' (", ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "ddg.", op, ": '", name, "' must be on the device of '", ref_name, "' (",
              ref.device(), "), got ", t.device());
}

void check_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape, const char* what) {
  TORCH_CHECK(t.sizes() == shape, "ddg.", op, ": '", name, "' must have shape ", shape, " (", what, "), got ",
              t.sizes());
}

// An int64 [length] index tensor on `device`, contiguous.
at::Tensor index_arg(const char* op, const char* name, const at::Tensor& t, int64_t length, const at::Device& device) {
  TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 1 && t.size(0) == length, "ddg.", op, ": '", name,
              "' must be an int64 tensor of shape [", length, "], got ", t.scalar_type(), " ", t.sizes());
  TORCH_CHECK(t.device() == device, "ddg.", op, ": '", name, "' must be on ", device, ", got ", t.device());
  return t.contiguous();
}

// A schedule table in the accumulation dtype (tiny: one row per timestep).
at::Tensor table_arg(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "ddg.", op, ": '", name, "' must be floating, got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "ddg.", op, ": '", name, "' must be on ", ref.device(), ", got ",
              t.device());
  return t.to(at::toOpMathType(ref.scalar_type())).contiguous();
}

// [M, W] rows, contiguous.
at::Tensor row_arg(const char* op, const char* name, const at::Tensor& t, int64_t rows, int64_t width,
                   const at::Tensor& ref, const char* ref_name) {
  check_float(op, name, t, 2);
  check_like(op, name, t, ref, ref_name);
  check_shape(op, name, t, {rows, width}, "one row per row of 'x'");
  return t.contiguous();
}

// [U, W] condition rows with U = rows without cond_index; read in place when columns are unit-strided.
CondRows cond_arg(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x,
                  const at::Tensor& cond_index, int64_t* cond_rows) {
  check_float(op, name, t, 2);
  check_like(op, name, t, x, "x");
  TORCH_CHECK(t.size(1) == x.size(1), "ddg.", op, ": '", name, "' must have ", x.size(1), " columns like 'x', got ",
              t.sizes());
  if (!cond_index.defined())
    TORCH_CHECK(t.size(0) == x.size(0), "ddg.", op, ": '", name, "' must have one row per row of 'x' (",
                x.size(0), ") without 'cond_index', got ", t.sizes());
  TORCH_CHECK(*cond_rows < 0 || *cond_rows == t.size(0), "ddg.", op, ": '", name, "' must have ", *cond_rows,
              " rows like the other condition operands, got ", t.size(0));
  *cond_rows = t.size(0);
  CondRows r;
  r.t = (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
  r.row_stride = r.t.size(0) > 1 ? r.t.stride(0) : r.t.size(1);
  return r;
}

at::Tensor optional_cond_index(const char* op, const std::optional<at::Tensor>& cond_index, const at::Tensor& x) {
  return cond_index.has_value() ? index_arg(op, "cond_index", *cond_index, x.size(0), x.device()) : at::Tensor();
}

void check_rows_input(const char* op, const at::Tensor& x) {
  check_float(op, "x", x, 2);
  TORCH_CHECK(x.size(1) >= 1, "ddg.", op, ": 'x' must have at least one column, got shape ", x.sizes());
}

ModulateCall make_modulate_call(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& bias, const at::Tensor* shift,
                                const at::Tensor& scale, const std::optional<at::Tensor>& cond_index) {
  check_rows_input(op, x);
  ModulateCall c;
  c.rows = x.size(0);
  c.width = x.size(1);
  c.x = x.contiguous();
  c.cond_index = optional_cond_index(op, cond_index, x);
  int64_t cond_rows = -1;
  if (shift) c.shift = cond_arg(op, "shift", *shift, x, c.cond_index, &cond_rows);
  c.scale = cond_arg(op, "scale", scale, x, c.cond_index, &cond_rows);
  c.cond_rows = cond_rows;
  auto affine = [&](const char* name, const std::optional<at::Tensor>& p) {
    if (!p.has_value()) return at::Tensor();
    check_float(op, name, *p, 1);
    check_like(op, name, *p, x, "x");
    check_shape(op, name, *p, {c.width}, "the LayerNorm's affine parameter");
    return p->contiguous();
  };
  c.weight = affine("weight", weight);
  c.bias = affine("bias", bias);
  return c;
}

GatedCall make_gated_call(const char* op, const at::Tensor& like, const at::Tensor& gate, const at::Tensor& h,
                          const std::optional<at::Tensor>& cond_index) {
  GatedCall c;
  c.rows = like.size(0);
  c.width = like.size(1);
  c.cond_index = optional_cond_index(op, cond_index, like);
  c.h = row_arg(op, "h", h, c.rows, c.width, like, "x");
  int64_t cond_rows = -1;
  c.gate = cond_arg(op, "gate", gate, like, c.cond_index, &cond_rows);
  c.cond_rows = cond_rows;
  return c;
}

LossCall make_loss_call(const char* op, const at::Tensor& model_output, const at::Tensor& noise,
                        const at::Tensor& timesteps, const std::optional<at::Tensor>& x0,
                        const at::Tensor& loss_coefs, bool learned) {
  check_float(op, "noise", noise, 2);
  check_float(op, "model_output", model_output, 2);
  check_like(op, "model_output", model_output, noise, "noise");
  LossCall c;
  c.rows = noise.size(0);
  c.channels = noise.size(1);
  c.learned = learned;
  check_shape(op, "model_output", model_output, {c.rows, learned ? 2 * c.channels : c.channels},
              learned ? "[eps_hat, v] per row" : "eps_hat per row");
  c.model_output = model_output.contiguous();
  c.noise = noise.contiguous();
  c.timesteps = index_arg(op, "timesteps", timesteps, c.rows, noise.device());
  TORCH_CHECK(loss_coefs.dim() == 2 && loss_coefs.size(1) == 3 && loss_coefs.size(0) >= 1, "ddg.", op,
              ": 'loss_coefs' must be [T, 3] (GaussianDiffusionSchedule.loss_coefs()), got ", loss_coefs.sizes());
  c.coefs = table_arg(op, "loss_coefs", loss_coefs, noise);
  c.steps = c.coefs.size(0);
  if (learned) {
    TORCH_CHECK(x0.has_value(), "ddg.", op, ": learned_variance needs 'x0' (the clean targets, for the t = 0 NLL)");
    check_float(op, "x0", *x0, 2);
    check_like(op, "x0", *x0, noise, "noise");
    TORCH_CHECK(x0->size(1) == c.channels && x0->size(0) > 0 && c.rows % x0->size(0) == 0, "ddg.", op,
                ": 'x0' must be [M0, ", c.channels, "] with M = ", c.rows, " a multiple of M0, got ", x0->sizes());
    c.x0 = x0->contiguous();
    c.x0_rows = c.x0.size(0);
  }
  return c;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> split_token_prepare_op(
    const SplitTokenKernels& k, const at::Tensor& features, const std::optional<at::Tensor>& prototypes,
    double contraction, const std::optional<at::Tensor>& permutation, double mix, const at::Tensor& timesteps,
    const at::Tensor& noise, const at::Tensor& sqrt_alpha_bar, const at::Tensor& sqrt_one_minus_alpha_bar,
    int64_t token_size) {
  const char* op = "split_token_prepare";
  check_float(op, "features", features, 2);
  TORCH_CHECK(token_size >= 1, "ddg.", op, ": 'token_size' must be positive, got ", token_size);
  PrepareCall c;
  c.batch = features.size(0);
  c.dim = features.size(1);
  c.token_size = token_size;
  TORCH_CHECK(c.dim % token_size == 0, "ddg.", op, ": the feature dim ", c.dim,
              " of 'features' must be a multiple of token_size=", token_size);
  c.features = features.contiguous();
  c.timesteps = index_arg(op, "timesteps", timesteps, timesteps.numel(), features.device());
  c.rows = c.timesteps.size(0);
  const int64_t tokens = c.batch * c.num_tokens();
  TORCH_CHECK(tokens > 0 && c.rows % tokens == 0, "ddg.", op, ": len(timesteps)=", c.rows,
              " must be a positive multiple of B*N = ", tokens, " (one timestep per row of every replica)");
  check_float(op, "noise", noise, 2);
  check_like(op, "noise", noise, features, "features");
  check_shape(op, "noise", noise, {c.rows, token_size}, "[M, token_size]");
  c.noise = noise.contiguous();
  c.sqrt_ab = table_arg(op, "sqrt_alpha_bar", sqrt_alpha_bar, features);
  c.sqrt_one_minus_ab = table_arg(op, "sqrt_one_minus_alpha_bar", sqrt_one_minus_alpha_bar, features);
  TORCH_CHECK(c.sqrt_ab.dim() == 1 && c.sqrt_one_minus_ab.sizes() == c.sqrt_ab.sizes(), "ddg.", op,
              ": 'sqrt_alpha_bar' and 'sqrt_one_minus_alpha_bar' must be [T] tables of one length, got ",
              sqrt_alpha_bar.sizes(), " and ", sqrt_one_minus_alpha_bar.sizes());
  c.steps = c.sqrt_ab.size(0);
  if (prototypes.has_value()) {
    check_float(op, "prototypes", *prototypes, 2);
    check_like(op, "prototypes", *prototypes, features, "features");
    check_shape(op, "prototypes", *prototypes, features.sizes(), "one prototype per sample");
    c.prototypes = prototypes->contiguous();
    c.keep = 1.0 - contraction;
    c.contract = contraction;
  }
  if (permutation.has_value()) {
    c.permutation = index_arg(op, "permutation", *permutation, c.batch, features.device());
    c.mix = mix;
    c.mix_rest = 1.0 - mix;
  }
  at::Tensor x_t = at::empty({c.rows, token_size}, features.options());
  at::Tensor x0 = at::empty({tokens, token_size}, features.options());
  k.prepare(c, x_t, x0);
  return {x_t, x0};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_modulate_op(
    const SplitTokenKernels& k, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& shift, const at::Tensor& scale,
    const std::optional<at::Tensor>& cond_index, double eps) {
  TORCH_CHECK(eps > 0, "ddg.adaln_modulate: 'eps' must be positive, got ", eps);
  ModulateCall c = make_modulate_call("adaln_modulate", x, weight, bias, &shift, scale, cond_index);
  c.eps = eps;
  const auto acc = x.options().dtype(at::toOpMathType(x.scalar_type()));
  at::Tensor out = at::empty({c.rows, c.width}, x.options());
  at::Tensor mean = at::empty({c.rows}, acc), rstd = at::empty({c.rows}, acc);
  if (c.rows > 0) k.modulate(c, out, mean, rstd);
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> adaln_modulate_backward_op(
    const SplitTokenKernels& k, const at::Tensor& grad_out, const at::Tensor& x,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, const at::Tensor& scale,
    const std::optional<at::Tensor>& cond_index, const at::Tensor& mean, const at::Tensor& rstd) {
  const char* op = "adaln_modulate_backward";
  ModulateCall c = make_modulate_call(op, x, weight, bias, nullptr, scale, cond_index);
  const at::Tensor g = row_arg(op, "grad_out", grad_out, c.rows, c.width, x, "x");
  const at::ScalarType acc = at::toOpMathType(x.scalar_type());
  for (const auto* stat : {&mean, &rstd}) {
    TORCH_CHECK(stat->scalar_type() == acc && stat->dim() == 1 && stat->size(0) == c.rows, "ddg.", op,
                ": 'mean' and 'rstd' must be ", acc, " [", c.rows, "] (the forward's row statistics), got ",
                stat->scalar_type(), " ", stat->sizes());
  }
  at::Tensor grad_x = at::empty({c.rows, c.width}, x.options());
  at::Tensor grad_scale_rows = at::empty({c.rows, c.width}, x.options());
  at::Tensor grad_weight = c.weight.defined() ? at::empty({c.width}, x.options()) : at::empty({0}, x.options());
  at::Tensor grad_bias = c.bias.defined() ? at::empty({c.width}, x.options()) : at::empty({0}, x.options());
  if (c.rows == 0) {
    grad_weight.zero_();
    grad_bias.zero_();
    return {grad_x, grad_weight, grad_bias, grad_scale_rows};
  }
  at::Tensor gw = c.weight.defined() ? grad_weight : at::Tensor();
  at::Tensor gb = c.bias.defined() ? grad_bias : at::Tensor();
  k.modulate_backward(c, g, mean.contiguous(), rstd.contiguous(), grad_x, gw, gb, grad_scale_rows);
  return {grad_x, grad_weight, grad_bias, grad_scale_rows};
}

at::Tensor gated_residual_op(const SplitTokenKernels& k, const at::Tensor& x, const at::Tensor& gate,
                             const at::Tensor& h, const std::optional<at::Tensor>& cond_index) {
  check_rows_input("gated_residual", x);
  GatedCall c = make_gated_call("gated_residual", x, gate, h, cond_index);
  c.x = x.contiguous();
  at::Tensor out = at::empty({c.rows, c.width}, x.options());
  if (c.rows > 0) k.gated(c, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor> gated_residual_backward_op(const SplitTokenKernels& k, const at::Tensor& grad_out,
                                                              const at::Tensor& gate, const at::Tensor& h,
                                                              const std::optional<at::Tensor>& cond_index) {
  const char* op = "gated_residual_backward";
  check_float(op, "grad_out", grad_out, 2);
  const GatedCall c = make_gated_call(op, grad_out, gate, h, cond_index);
  const at::Tensor g = grad_out.contiguous();
  at::Tensor grad_h = at::empty({c.rows, c.width}, h.options());
  at::Tensor grad_gate_rows = at::empty({c.rows, c.width}, h.options());
  if (c.rows > 0) k.gated_backward(c, g, grad_h, grad_gate_rows);
  return {grad_h, grad_gate_rows};
}

std::tuple<at::Tensor, at::Tensor> diffusion_loss_op(const SplitTokenKernels& k, const at::Tensor& model_output,
                                                     const at::Tensor& noise, const at::Tensor& timesteps,
                                                     const std::optional<at::Tensor>& x0,
                                                     const at::Tensor& loss_coefs, bool learned_variance) {
  const LossCall c =
      make_loss_call("diffusion_loss", model_output, noise, timesteps, x0, loss_coefs, learned_variance);
  const auto acc = noise.options().dtype(at::toOpMathType(noise.scalar_type()));
  at::Tensor loss = at::empty({c.rows}, acc), mse = at::empty({c.rows}, acc);
  if (c.rows > 0) k.loss(c, loss, mse);
  return {loss, mse};
}

at::Tensor diffusion_loss_backward_op(const SplitTokenKernels& k, const at::Tensor& grad_loss,
                                      const at::Tensor& model_output, const at::Tensor& noise,
                                      const at::Tensor& timesteps, const std::optional<at::Tensor>& x0,
                                      const at::Tensor& loss_coefs, bool learned_variance) {
  const char* op = "diffusion_loss_backward";
  const LossCall c = make_loss_call(op, model_output, noise, timesteps, x0, loss_coefs, learned_variance);
  const at::ScalarType acc = at::toOpMathType(noise.scalar_type());
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == c.rows && at::isFloatingType(grad_loss.scalar_type()) &&
                  grad_loss.device() == noise.device(),
              "ddg.", op, ": 'grad_loss' must be a floating [", c.rows, "] tensor on ", noise.device(), ", got ",
              grad_loss.scalar_type(), " ", grad_loss.sizes(), " on ", grad_loss.device());
  at::Tensor grad_output = at::empty(c.model_output.sizes(), model_output.options());
  if (c.rows > 0) k.loss_backward(c, grad_loss.to(acc).contiguous(), grad_output);
  return grad_output;
}

// The segments come from a stable sort of cond_index (deterministic on every backend), so each
// condition's rows are summed in a fixed order: no atomics, the same bits on every run.
at::Tensor cond_rows_sum_op(const SplitTokenKernels& k, const at::Tensor& rows, const at::Tensor& cond_index,
                            int64_t cond_rows) {
  const char* op = "cond_rows_sum";
  check_float(op, "rows", rows, 2);
  TORCH_CHECK(cond_rows >= 0, "ddg.", op, ": 'cond_rows' must be >= 0, got ", cond_rows);
  CondSumCall c;
  c.rows = rows.contiguous();
  const at::Tensor index = index_arg(op, "cond_index", cond_index, rows.size(0), rows.device());
  TORCH_CHECK(cond_rows > 0 || rows.size(0) == 0, "ddg.", op, ": 'cond_rows' is 0 but 'rows' has ", rows.size(0),
              " rows to sum");
  c.cond_rows = cond_rows;
  const auto [sorted, order] = index.sort(std::optional<bool>(true), /*dim=*/0);
  c.order = order;
  c.offsets = at::searchsorted(sorted, at::arange(cond_rows + 1, index.options()));
  at::Tensor out = at::empty({cond_rows, rows.size(1)}, rows.options());
  if (out.numel() > 0) k.cond_rows_sum(c, out);
  return out;
}

}  // namespace ddg
