#include "guidance.h"

#include "tensor_layout.h"

#include <ATen/OpMathType.h>

#include <array>
#include <cmath>
#include <limits>
#include <utility>

namespace ddg {
namespace {

using Named = std::pair<const char*, const at::Tensor*>;

// Every operand must have the shape, dtype and device of the first one.
void check_operands(const char* op, std::initializer_list<Named> operands) {
  const Named& first = *operands.begin();
  const at::Tensor& ref = *first.second;
  TORCH_CHECK(ref.dim() >= 1, "ddg.", op, ": '", first.first,
              "' must have a leading batch dimension (at least 1-D), got a 0-D tensor");
  TORCH_CHECK(supported_dtype(ref.scalar_type()), "ddg.", op, ": '", first.first,
              "' must be float32, float64, float16 or bfloat16, got ", ref.scalar_type());
  for (const Named& o : operands) {
    const at::Tensor& t = *o.second;
    TORCH_CHECK(t.sizes() == ref.sizes(), "ddg.", op, ": '", o.first, "' must have the shape of '",
                first.first, "' ", ref.sizes(), ", got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "ddg.", op, ": '", o.first,
                "' must have the dtype of '", first.first, "' (", ref.scalar_type(), "), got ",
                t.scalar_type());
    TORCH_CHECK(t.device() == ref.device(), "ddg.", op, ": '", o.first,
                "' must be on the device of '", first.first, "' (", ref.device(), "), got ",
                t.device());
  }
}

void check_finite(const char* op, const char* name, double v) {
  TORCH_CHECK(std::isfinite(v), "ddg.", op, ": '", name, "' must be finite, got ", v);
}

void check_rescale(const char* op, double rescale) {
  TORCH_CHECK(rescale >= 0.0 && rescale <= 1.0, "ddg.", op,
              ": 'rescale' (guidance rescale phi) must be in [0, 1], got ", rescale);
}

// A per-sample coefficient tensor: [batch] (width 1) or [batch, 2], floating, on the
// operands' device; returned contiguous in the accumulation dtype.
at::Tensor per_sample_arg(const char* op, const char* name, const std::optional<at::Tensor>& t,
                          int64_t batch, int64_t width, const at::Tensor& ref,
                          at::ScalarType acc) {
  if (!t.has_value()) return at::Tensor();
  const at::Tensor& v = *t;
  TORCH_CHECK(at::isFloatingType(v.scalar_type()), "ddg.", op, ": '", name,
              "' must be a floating-point tensor, got ", v.scalar_type());
  TORCH_CHECK(v.device() == ref.device(), "ddg.", op, ": '", name, "' must be on ", ref.device(),
              " like the other operands, got ", v.device());
  const bool shape_ok = width == 1 ? (v.dim() == 1 && v.size(0) == batch)
                                   : (v.dim() == 2 && v.size(0) == batch && v.size(1) == width);
  TORCH_CHECK(shape_ok, "ddg.", op, ": '", name, "' must have shape ",
              width == 1 ? at::IntArrayRef{batch} : at::IntArrayRef{batch, width},
              " (one value per sample), got ", v.sizes());
  return v.to(acc).contiguous();
}

StepUpdate parse_update(c10::string_view update) {
  if (update == "ddim_epsilon") return StepUpdate::kDdimEpsilon;
  if (update == "ddim_v_prediction") return StepUpdate::kDdimVPrediction;
  if (update == "euler") return StepUpdate::kEuler;
  TORCH_CHECK(false, "ddg.cfg_step: 'update' must be 'ddim_epsilon', 'ddim_v_prediction' or "
              "'euler', got '", std::string(update), "'");
}

void check_step_coefs(StepUpdate update, double coef_t, double coef_next) {
  check_finite("cfg_step", "coef_t", coef_t);
  check_finite("cfg_step", "coef_next", coef_next);
  if (update == StepUpdate::kEuler) return;
  // v-prediction is defined at alpha_bar = 0 (zero terminal SNR); epsilon divides by sqrt(alpha_bar).
  const bool zero_ok = update == StepUpdate::kDdimVPrediction;
  TORCH_CHECK((zero_ok ? coef_t >= 0.0 : coef_t > 0.0) && coef_t <= 1.0,
              "ddg.cfg_step: 'coef_t' (alpha_bar at t) must be in ", zero_ok ? "[0, 1] for 'ddim_v_prediction'"
              : "(0, 1] for 'ddim_epsilon'", ", got ", coef_t);
  TORCH_CHECK(coef_next >= 0.0 && coef_next <= 1.0,
              "ddg.cfg_step: 'coef_next' (alpha_bar at the previous timestep) must be in [0, 1], got ",
              coef_next);
}

void set_batch(CfgCall& c, const at::Tensor& ref) {
  c.batch = ref.size(0);
  c.per_sample = c.batch > 0 ? ref.numel() / c.batch : 0;
}

// The forward kernel writes every row when rescale is on; it does not run for empty samples,
// whose statistics are zeros.
at::Tensor empty_stats(const at::Tensor& ref, double rescale) {
  const at::ScalarType acc = at::toOpMathType(ref.scalar_type());
  const std::array<int64_t, 2> shape{rescale != 0.0 ? ref.size(0) : 0, kStatsPerSample};
  return ref.numel() > 0 ? at::empty(shape, ref.options().dtype(acc)) : at::zeros(shape, ref.options().dtype(acc));
}

void check_stats(const char* op, const at::Tensor& stats, const at::Tensor& ref, double rescale) {
  const int64_t rows = rescale != 0.0 ? ref.size(0) : 0;
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == rows && stats.size(1) == kStatsPerSample,
              "ddg.", op, ": 'stats' must have shape [", rows, ", ", kStatsPerSample,
              "] (the second output of the forward op), got ", stats.sizes());
  TORCH_CHECK(stats.scalar_type() == at::toOpMathType(ref.scalar_type()), "ddg.", op,
              ": 'stats' must be ", at::toOpMathType(ref.scalar_type()), ", got ",
              stats.scalar_type());
  TORCH_CHECK(stats.device() == ref.device(), "ddg.", op, ": 'stats' must be on ", ref.device(),
              ", got ", stats.device());
}

// Fills the scale/rescale/step fields shared by forward and backward.
CfgCall make_cfg_call(const char* op, const at::Tensor& ref, double scale,
                      const std::optional<at::Tensor>& scale_per_sample, double rescale) {
  check_finite(op, "scale", scale);
  check_rescale(op, rescale);
  CfgCall c;
  set_batch(c, ref);
  const at::ScalarType acc = at::toOpMathType(ref.scalar_type());
  c.scale = scale;
  c.scale_ps = per_sample_arg(op, "scale_per_sample", scale_per_sample, c.batch, 1, ref, acc);
  c.rescale = rescale;
  return c;
}

void set_step(CfgCall& c, const at::Tensor& ref, c10::string_view update, double coef_t,
              double coef_next, const std::optional<at::Tensor>& coef_per_sample) {
  c.update = parse_update(update);
  if (!coef_per_sample.has_value()) check_step_coefs(c.update, coef_t, coef_next);
  c.coef_t = coef_t;
  c.coef_next = coef_next;
  c.coef_ps = per_sample_arg("cfg_step", "coef_per_sample", coef_per_sample, c.batch, 2, ref,
                             at::toOpMathType(ref.scalar_type()));
}

// Backward reads uncond/cond only with rescale (autograd then passes placeholders), so only
// then are they brought into the work layout; otherwise any tensor of that layout stands in.
void set_backward_operands(CfgCall& c, const at::Tensor& uncond, const at::Tensor& cond, const at::Tensor& work) {
  c.uncond = c.rescale != 0.0 ? in_layout_of(uncond, work) : work;
  c.cond = c.rescale != 0.0 ? in_layout_of(cond, work) : work;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cfg_combine_op(
    const GuidanceKernels& k, const at::Tensor& uncond, const at::Tensor& cond, double scale,
    const std::optional<at::Tensor>& scale_per_sample, double rescale) {
  check_operands("cfg_combine", {{"uncond", &uncond}, {"cond", &cond}});
  CfgCall c = make_cfg_call("cfg_combine", uncond, scale, scale_per_sample, rescale);
  at::Tensor out = empty_work(uncond, uncond.scalar_type());
  c.uncond = in_layout_of(uncond, out);
  c.cond = in_layout_of(cond, out);
  at::Tensor stats = empty_stats(uncond, rescale);
  if (out.numel() > 0) k.cfg_forward(c, out, stats);
  return {to_output_layout(out, uncond), stats};
}

std::tuple<at::Tensor, at::Tensor> cfg_combine_backward_op(
    const GuidanceKernels& k, const at::Tensor& grad_out, const at::Tensor& uncond,
    const at::Tensor& cond, double scale, const std::optional<at::Tensor>& scale_per_sample,
    double rescale, const at::Tensor& stats) {
  check_operands("cfg_combine_backward",
                 {{"grad_out", &grad_out}, {"uncond", &uncond}, {"cond", &cond}});
  check_stats("cfg_combine_backward", stats, uncond, rescale);
  CfgCall c = make_cfg_call("cfg_combine_backward", uncond, scale, scale_per_sample, rescale);
  at::Tensor grad_uncond = empty_work(uncond, uncond.scalar_type());
  at::Tensor grad_cond = at::empty_like(grad_uncond);
  set_backward_operands(c, uncond, cond, grad_uncond);
  const at::Tensor go = in_layout_of(grad_out, grad_uncond);
  at::Tensor no_sample_grad;
  if (grad_uncond.numel() > 0)
    k.cfg_backward(c, go, stats.contiguous(), no_sample_grad, grad_uncond, grad_cond);
  return {to_output_layout(grad_uncond, uncond), to_output_layout(grad_cond, cond)};
}

std::tuple<at::Tensor, at::Tensor> cfg_step_op(
    const GuidanceKernels& k, const at::Tensor& sample, const at::Tensor& uncond,
    const at::Tensor& cond, double scale, const std::optional<at::Tensor>& scale_per_sample,
    double rescale, c10::string_view update, double coef_t, double coef_next,
    const std::optional<at::Tensor>& coef_per_sample) {
  check_operands("cfg_step", {{"sample", &sample}, {"uncond", &uncond}, {"cond", &cond}});
  CfgCall c = make_cfg_call("cfg_step", sample, scale, scale_per_sample, rescale);
  set_step(c, sample, update, coef_t, coef_next, coef_per_sample);
  at::Tensor out = empty_work(sample, sample.scalar_type());
  c.sample = in_layout_of(sample, out);
  c.uncond = in_layout_of(uncond, out);
  c.cond = in_layout_of(cond, out);
  at::Tensor stats = empty_stats(sample, rescale);
  if (out.numel() > 0) k.cfg_forward(c, out, stats);
  return {to_output_layout(out, sample), stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cfg_step_backward_op(
    const GuidanceKernels& k, const at::Tensor& grad_out, const at::Tensor& uncond,
    const at::Tensor& cond, double scale, const std::optional<at::Tensor>& scale_per_sample,
    double rescale, c10::string_view update, double coef_t, double coef_next,
    const std::optional<at::Tensor>& coef_per_sample, const at::Tensor& stats) {
  check_operands("cfg_step_backward",
                 {{"grad_out", &grad_out}, {"uncond", &uncond}, {"cond", &cond}});
  check_stats("cfg_step_backward", stats, uncond, rescale);
  CfgCall c = make_cfg_call("cfg_step_backward", uncond, scale, scale_per_sample, rescale);
  set_step(c, uncond, update, coef_t, coef_next, coef_per_sample);
  at::Tensor grad_sample = empty_work(grad_out, grad_out.scalar_type());
  at::Tensor grad_uncond = at::empty_like(grad_sample);
  at::Tensor grad_cond = at::empty_like(grad_sample);
  set_backward_operands(c, uncond, cond, grad_sample);
  if (grad_sample.numel() > 0)
    k.cfg_backward(c, in_layout_of(grad_out, grad_sample), stats.contiguous(), grad_sample,
                   grad_uncond, grad_cond);
  return {to_output_layout(grad_sample, grad_out), to_output_layout(grad_uncond, uncond),
          to_output_layout(grad_cond, cond)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dmd_grad_op(
    const GuidanceKernels& k, const at::Tensor& x, const at::Tensor& uncond,
    const at::Tensor& cond, const at::Tensor& fake, double scale,
    const std::optional<at::Tensor>& scale_per_sample, c10::string_view prediction,
    const std::optional<at::Tensor>& x_t, const std::optional<at::Tensor>& alpha_bar) {
  const char* op = "dmd_grad";
  DmdCall c;
  if (prediction == "velocity") {
    c.prediction = DmdPrediction::kVelocity;
    TORCH_CHECK(!x_t.has_value() && !alpha_bar.has_value(), "ddg.dmd_grad: 'x_t' and 'alpha_bar' "
                "are only used with prediction='epsilon'; the velocity form needs neither");
    check_operands(op, {{"x", &x}, {"uncond", &uncond}, {"cond", &cond}, {"fake", &fake}});
  } else if (prediction == "epsilon") {
    c.prediction = DmdPrediction::kEpsilon;
    TORCH_CHECK(x_t.has_value() && alpha_bar.has_value(), "ddg.dmd_grad: prediction='epsilon' "
                "needs 'x_t' (the noised input) and 'alpha_bar' (one value per sample)");
    check_operands(op, {{"x", &x}, {"uncond", &uncond}, {"cond", &cond}, {"fake", &fake},
                        {"x_t", &*x_t}});
  } else {
    TORCH_CHECK(false, "ddg.dmd_grad: 'prediction' must be 'velocity' or 'epsilon', got '",
                std::string(prediction), "'");
  }
  check_finite(op, "scale", scale);
  const at::ScalarType acc = at::toOpMathType(x.scalar_type());
  c.batch = x.size(0);
  c.per_sample = c.batch > 0 ? x.numel() / c.batch : 0;
  c.scale = scale;
  c.scale_ps = per_sample_arg(op, "scale_per_sample", scale_per_sample, c.batch, 1, x, acc);
  c.alpha_bar = per_sample_arg(op, "alpha_bar", alpha_bar, c.batch, 1, x, acc);

  at::Tensor grad = empty_work(x, acc);
  c.x = in_layout_of(x, grad);
  c.uncond = in_layout_of(uncond, grad);
  c.cond = in_layout_of(cond, grad);
  c.fake = in_layout_of(fake, grad);
  if (x_t.has_value()) c.x_t = in_layout_of(*x_t, grad);
  at::Tensor denom = at::empty({c.batch}, x.options().dtype(acc));
  at::Tensor loss = at::empty({}, x.options().dtype(acc));
  if (grad.numel() > 0) {
    k.dmd_forward(c, grad, denom, loss);
  } else {  // means over no elements, as torch.mean gives them
    denom.fill_(std::numeric_limits<double>::quiet_NaN());
    loss.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  return {to_output_layout(grad, x), denom, loss};
}

at::Tensor dmd_grad_backward_op(const GuidanceKernels& k, const at::Tensor& grad_loss,
                                const at::Tensor& grad, at::ScalarType dtype) {
  TORCH_CHECK(grad_loss.dim() == 0, "ddg.dmd_grad_backward: 'grad_loss' must be a 0-D tensor, "
              "got shape ", grad_loss.sizes());
  TORCH_CHECK(grad.dim() >= 1 && (grad.scalar_type() == at::kFloat || grad.scalar_type() == at::kDouble),
              "ddg.dmd_grad_backward: 'grad' must be the float32/float64 gradient returned by "
              "dmd_grad, got ", grad.scalar_type(), " of shape ", grad.sizes());
  TORCH_CHECK(supported_dtype(dtype), "ddg.dmd_grad_backward: 'dtype' must be float32, float64, "
              "float16 or bfloat16, got ", dtype);
  TORCH_CHECK(at::toOpMathType(dtype) == grad.scalar_type(), "ddg.dmd_grad_backward: 'grad' "
              "must be ", at::toOpMathType(dtype), " for dtype ", dtype, ", got ", grad.scalar_type());
  TORCH_CHECK(grad_loss.device() == grad.device(), "ddg.dmd_grad_backward: 'grad_loss' must be on ",
              grad.device(), ", got ", grad_loss.device());
  at::Tensor out = empty_work(grad, dtype);
  if (out.numel() > 0)
    k.dmd_backward(grad_loss.to(grad.scalar_type()), in_layout_of(grad, out), out);
  return to_output_layout(out, grad);
}

}  // namespace ddg
