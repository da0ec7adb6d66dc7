// Emulator stand-in for cub::WarpReduce: the shuffle reduction of CUB's WarpReduceShfl (the
// specialisation for power-of-two logical warps), with its order: steps with offsets 1, 2, 4,
// ..., each lane combining op(own value, value of lane + offset) while that lane is valid.
// The result is defined in the first lane of each logical warp only; every other lane gets
// poison (all bits set), so code that reads it elsewhere fails visibly.
#pragma once

#include "../../../cuda_emu.h"

#include <functional>

namespace cub {

struct Sum {
  template <typename T>
  T operator()(const T& a, const T& b) const {
    return a + b;
  }
};
struct Max {
  template <typename T>
  T operator()(const T& a, const T& b) const {
    return a < b ? b : a;
  }
};
struct Min {
  template <typename T>
  T operator()(const T& a, const T& b) const {
    return b < a ? b : a;
  }
};

namespace emu_detail {

// The value lane 0 of a logical warp of `width` lanes (a power of two <= 32) gets from CUB's
// WarpReduceShfl; `valid` lanes contribute (the last_lane of CUB is valid - 1).
template <typename T, typename Op>
T warp_reduce(T value, Op op, int width, int valid, int logical_lane) {
  for (int offset = 1; offset < width; offset *= 2) {
    const bool take = logical_lane + offset <= valid - 1;
    T other;
    const int lane = ::cuda_emu::lane_id();
    ::cuda_emu::warp_exchange(__FILE__, __LINE__, "cub::WarpReduce shuffle", &value, &other, sizeof(T),
                              take ? lane + offset : lane, false);
    if (take) value = op(value, other);
  }
  return value;
}

}  // namespace emu_detail

template <typename T, int LOGICAL_WARP_THREADS = 32, int LEGACY_PTX_ARCH = 0>
class WarpReduce {
  static_assert(LOGICAL_WARP_THREADS >= 1 && LOGICAL_WARP_THREADS <= 32 &&
                    (LOGICAL_WARP_THREADS & (LOGICAL_WARP_THREADS - 1)) == 0,
                "cuda_emu reproduces CUB's shuffle WarpReduce (power-of-two logical warps) only");

 public:
  struct TempStorage {};  // the shuffle specialisation needs none
  explicit WarpReduce(TempStorage&) {}

  template <typename Op>
  T Reduce(T input, Op op) {
    return Reduce(input, op, LOGICAL_WARP_THREADS);
  }
  template <typename Op>
  T Reduce(T input, Op op, int valid_items) {
    const int logical_lane = ::cuda_emu::lane_id() % LOGICAL_WARP_THREADS;
    const T r = emu_detail::warp_reduce(input, op, LOGICAL_WARP_THREADS, valid_items, logical_lane);
    return logical_lane == 0 ? r : ::cuda_emu::poison<T>();
  }
  T Sum(T input) { return Reduce(input, cub::Sum()); }
  T Sum(T input, int valid_items) { return Reduce(input, cub::Sum(), valid_items); }
};

}  // namespace cub
