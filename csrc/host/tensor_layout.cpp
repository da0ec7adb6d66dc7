#include "tensor_layout.h"

namespace ddg {

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

bool sample_major_dense(const at::Tensor& t) {
  if (!t.is_non_overlapping_and_dense()) return false;
  return t.size(0) <= 1 || t.stride(0) * t.size(0) == t.numel();
}

at::Tensor empty_work(const at::Tensor& ref, at::ScalarType dtype) {
  if (sample_major_dense(ref)) return at::empty_like(ref, ref.options().dtype(dtype));
  return at::empty(ref.sizes(), ref.options().dtype(dtype));
}

at::Tensor in_layout_of(const at::Tensor& t, const at::Tensor& work) {
  if (t.strides() == work.strides()) return t;
  at::Tensor r = at::empty_like(work, t.options());
  r.copy_(t);
  return r;
}

at::Tensor to_output_layout(const at::Tensor& work, const at::Tensor& like) {
  if (like.is_non_overlapping_and_dense() && like.strides() == work.strides()) return work;
  at::Tensor out = at::empty_like(like, work.options());
  if (out.strides() == work.strides()) return work;
  out.copy_(work);
  return out;
}

}  // namespace ddg
