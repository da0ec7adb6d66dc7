// The ddg operator library: every schema, defined once. Backends register their
// implementations in csrc/cpu and csrc/cuda; fake kernels and autograd are registered
// from Python (ddg_ops/_fake.py, ddg_ops/_autograd.py).
#include <Python.h>
#include <torch/library.h>

#include "host/cpu_features.h"

extern "C" {
// Importing ddg_ops._C loads this library and runs the static registrations below; the
// module holds no functions (no pybind11, so nothing here is opaque to torch.compile), only
// what ddg_ops/_ext.py checks at import: the CPU features the CPU kernels were compiled for
// and whether this CPU has them.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  if (PyModule_AddStringConstant(module, "CPU_KERNEL_FEATURES", ddg::cpu_kernel_features()) < 0 ||
      PyModule_AddIntConstant(module, "CPU_RUNS_KERNELS", ddg::cpu_runs_kernels() ? 1 : 0) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}

TORCH_LIBRARY(ddg, m) {
  // ---- guidance family (docs/benchmarks.md §1, docs/methods/dpdmd.md §3.4)
  // out = uncond + s*(cond - uncond), optionally guidance-rescaled; stats are the
  // per-sample [mean_guided, var_guided, mean_cond, var_cond] backward needs ([0, 4] without rescale).
  m.def(
      "cfg_combine(Tensor uncond, Tensor cond, float scale, Tensor? scale_per_sample, "
      "float rescale) -> (Tensor out, Tensor stats)");
  m.def(
      "cfg_combine_backward(Tensor grad_out, Tensor uncond, Tensor cond, float scale, "
      "Tensor? scale_per_sample, float rescale, Tensor stats) -> (Tensor grad_uncond, Tensor grad_cond)");
  // CFG fused with one sampler update: update is 'ddim_epsilon' | 'ddim_v_prediction'
  // (coef_t, coef_next = alpha_bar(t), alpha_bar(t_prev)) or 'euler' (sigma, sigma_next).
  // coef_per_sample [B, 2] overrides (coef_t, coef_next) per sample.
  m.def(
      "cfg_step(Tensor sample, Tensor uncond, Tensor cond, float scale, Tensor? scale_per_sample, "
      "float rescale, str update, float coef_t, float coef_next, Tensor? coef_per_sample) "
      "-> (Tensor out, Tensor stats)");
  m.def(
      "cfg_step_backward(Tensor grad_out, Tensor uncond, Tensor cond, float scale, "
      "Tensor? scale_per_sample, float rescale, str update, float coef_t, float coef_next, "
      "Tensor? coef_per_sample, Tensor stats) -> (Tensor grad_sample, Tensor grad_uncond, Tensor grad_cond)");
  // Distribution-matching gradient (prediction 'velocity' or 'epsilon'); grad and loss in
  // fp32 (fp64 for fp64 inputs); denom is the per-sample normaliser mean|p_real|.
  m.def(
      "dmd_grad(Tensor x, Tensor uncond, Tensor cond, Tensor fake, float scale, "
      "Tensor? scale_per_sample, str prediction, Tensor? x_t, Tensor? alpha_bar) "
      "-> (Tensor grad, Tensor denom, Tensor loss)");
  // d(loss)/dx = grad_loss * grad / numel, in `dtype` (the dtype of x).
  m.def("dmd_grad_backward(Tensor grad_loss, Tensor grad, ScalarType dtype) -> Tensor");

  // ---- bn_stats family (docs/methods/ddis.md §4): per-channel batch mean and biased variance of an
  // [N, C, *] feature map (fp32, fp64 for fp64) in one Welford/Chan pass; the backward is one
  // elementwise pass dx = grad_mean/M + 2 grad_var (x - mean)/M.
  m.def("bn_stats(Tensor x) -> (Tensor mean, Tensor var)");
  m.def("bn_stats_backward(Tensor grad_mean, Tensor grad_var, Tensor x, Tensor mean) -> Tensor");

  // ---- split_token family (docs/methods/gendd.md §3): GenDD's diffusion-head path.
  // Targets: contraction + mixup + split into token_size chunks ([B*N, C] x0) + replica-outer
  // tiling to the M = len(timesteps) rows + q(x_t | x_0) noising. No gradient.
  m.def(
      "split_token_prepare(Tensor features, Tensor? prototypes, float contraction, Tensor? permutation, "
      "float mix, Tensor timesteps, Tensor noise, Tensor sqrt_alpha_bar, Tensor sqrt_one_minus_alpha_bar, "
      "int token_size) -> (Tensor x_t, Tensor x0)");
  // LN(x) * (1 + scale) + shift over [M, W] rows; shift/scale are [U, W] rows (any row stride)
  // picked by cond_index (U = M without it); mean/rstd are the rows' statistics (fp32/fp64).
  m.def(
      "adaln_modulate(Tensor x, Tensor? weight, Tensor? bias, Tensor shift, Tensor scale, Tensor? cond_index, "
      "float eps) -> (Tensor out, Tensor mean, Tensor rstd)");
  // grad_weight/grad_bias are [0] for a LN without them; grad_scale_rows is per row of x (the
  // caller sums rows sharing a condition); grad_shift is grad_out itself.
  m.def(
      "adaln_modulate_backward(Tensor grad_out, Tensor x, Tensor? weight, Tensor? bias, Tensor scale, "
      "Tensor? cond_index, Tensor mean, Tensor rstd) "
      "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias, Tensor grad_scale_rows)");
  // x + gate * h; gate rows picked by cond_index like shift/scale.
  m.def("gated_residual(Tensor x, Tensor gate, Tensor h, Tensor? cond_index) -> Tensor");
  // out[u] = the sum of rows[r] over r with cond_index[r] == u ([cond_rows, W], fp32 accumulation):
  // the gradient of condition rows shared through cond_index, summed in a fixed order.
  m.def("cond_rows_sum(Tensor rows, Tensor cond_index, int cond_rows) -> Tensor");
  m.def(
      "gated_residual_backward(Tensor grad_out, Tensor gate, Tensor h, Tensor? cond_index) "
      "-> (Tensor grad_h, Tensor grad_gate_rows)");
  // Per-row epsilon MSE, or IDDPM's hybrid loss (mse + vb) with learned variance; loss and mse
  // in fp32 (fp64 for fp64). x0 [M0, C] (row r reads r % M0) is needed for the t = 0 NLL.
  m.def(
      "diffusion_loss(Tensor model_output, Tensor noise, Tensor timesteps, Tensor? x0, Tensor loss_coefs, "
      "bool learned_variance) -> (Tensor loss, Tensor mse)");
  m.def(
      "diffusion_loss_backward(Tensor grad_loss, Tensor model_output, Tensor noise, Tensor timesteps, "
      "Tensor? x0, Tensor loss_coefs, bool learned_variance) -> Tensor");
}
