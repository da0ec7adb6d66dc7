#include "bn_stats.h"

#include <ATen/OpMathType.h>

#include "tensor_layout.h"

namespace ddg {
namespace {

// x in a layout the kernels handle: NC(S)-contiguous (planes) or channels-fastest (rows);
// anything else (slices, permutations) is copied to contiguous.
BnCall make_call(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 2, "ddg.", op, ": 'x' must be [N, C, ...] (at least 2-D), got shape ", x.sizes());
  TORCH_CHECK(supported_dtype(x.scalar_type()), "ddg.", op,
              ": 'x' must be float32, float64, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.numel() > 0, "ddg.", op, ": 'x' must have elements to take statistics of, got shape ", x.sizes());
  BnCall c;
  c.batch = x.size(0);
  c.channels = x.size(1);
  c.inner = x.numel() / (c.batch * c.channels);
  const bool channels_last = (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
                             (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d));
  if (x.is_contiguous() && !(channels_last && c.inner > 1)) {
    c.x = x;
    c.layout = c.inner == 1 ? ChannelLayout::kRows : ChannelLayout::kPlanes;
  } else if (channels_last) {
    c.x = x;
    c.layout = ChannelLayout::kRows;
  } else {
    c.x = x.contiguous();
    c.layout = c.inner == 1 ? ChannelLayout::kRows : ChannelLayout::kPlanes;
  }
  return c;
}

void check_channel_vector(const char* name, const at::Tensor& t, const at::Tensor& x) {
  const at::ScalarType acc = at::toOpMathType(x.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1), "ddg.bn_stats_backward: '", name, "' must have shape [",
              x.size(1), "] (one value per channel), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == acc, "ddg.bn_stats_backward: '", name, "' must be ", acc, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "ddg.bn_stats_backward: '", name, "' must be on ", x.device(), ", got ",
              t.device());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> bn_stats_op(const BnStatsKernels& k, const at::Tensor& x) {
  const BnCall call = make_call("bn_stats", x);
  const auto options = x.options().dtype(at::toOpMathType(x.scalar_type()));
  at::Tensor mean = at::empty({call.channels}, options);
  at::Tensor var = at::empty({call.channels}, options);
  k.stats(call, mean, var);
  return {mean, var};
}

at::Tensor bn_stats_backward_op(const BnStatsKernels& k, const at::Tensor& grad_mean, const at::Tensor& grad_var,
                                const at::Tensor& x, const at::Tensor& mean) {
  const BnCall call = make_call("bn_stats_backward", x);
  check_channel_vector("grad_mean", grad_mean, x);
  check_channel_vector("grad_var", grad_var, x);
  check_channel_vector("mean", mean, x);
  at::Tensor dx = at::empty_like(call.x);
  k.backward(call, grad_mean.contiguous(), grad_var.contiguous(), mean.contiguous(), dx);
  return to_output_layout(dx, x);
}

}  // namespace ddg
