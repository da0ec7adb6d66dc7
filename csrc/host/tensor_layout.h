// Host helpers shared by every op family: supported dtypes and the memory layouts the
// kernels iterate over, with outputs returned in the strides the fake kernels promise
// (those of torch.empty_like of the matching input).
#pragma once

#include <ATen/ATen.h>

namespace ddg {

// float32, float64, float16, bfloat16.
bool supported_dtype(at::ScalarType t);

// Dense with each sample (index of dim 0) one contiguous block.
bool sample_major_dense(const at::Tensor& t);

// An empty tensor in the layout the kernels iterate over: `ref`'s strides when they are
// dense and sample-major (contiguous, channels-last, ...), contiguous otherwise.
at::Tensor empty_work(const at::Tensor& ref, at::ScalarType dtype);

// `t` with the strides of `work`; a copy only when they differ (mixed layouts, slices).
at::Tensor in_layout_of(const at::Tensor& t, const at::Tensor& work);

// `work` returned with the strides torch.empty_like(like) has; a copy only when they differ.
at::Tensor to_output_layout(const at::Tensor& work, const at::Tensor& like);

}  // namespace ddg
