// The one dtype dispatch of every ddg op, CPU and CUDA: the floating types the schemas accept
// (float32, float64, float16, bfloat16; docs/ARCHITECTURE.md, "Op anatomy"). A family's kernel
// table turns a runtime dtype into its typed loop through DDG_DISPATCH_FLOATING, and declares
// the Loops struct that names those loops with DDG_TYPED_LOOP.
#pragma once

#include <ATen/Dispatch.h>

#include <utility>

#define DDG_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// One member of a backend's Loops struct: Loops::NAME<scalar_t>(args...) calls the backend's
// typed function FN<scalar_t>(args...), so the family's kernel table is written once for both
// backends while each backend keeps its own loop functions.
#define DDG_TYPED_LOOP(NAME, FN)                      \
  template <typename scalar_t, typename... Args>      \
  static void NAME(Args&&... a) {                     \
    FN<scalar_t>(std::forward<Args>(a)...);           \
  }
