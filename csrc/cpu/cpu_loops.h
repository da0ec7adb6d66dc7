// CPU building blocks: SIMD load/store in the accumulation type (at::vec), per-sample
// segment iteration for elementwise passes, and deterministic per-sample reductions.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace ddg::cpu {

// Loads/stores kStep elements of scalar_t as two vectors of the accumulation type, so
// fp16/bf16 math runs in fp32 lanes and float/double need no conversion.
template <typename scalar_t>
struct VecIO {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  static constexpr int64_t kStep = 2 * Vec::size();
  struct Pair {
    Vec lo, hi;
  };

  static Pair load(const scalar_t* p) {
    Pair r;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      r.lo = Vec::loadu(p);
      r.hi = Vec::loadu(p + Vec::size());
    } else {
      at::vec::load_to_float<scalar_t>(p, r.lo, r.hi);
    }
    return r;
  }

  static void store(scalar_t* p, const Pair& v) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      v.lo.store(p);
      v.hi.store(p + Vec::size());
    } else {
      at::vec::convert_from_float<scalar_t>(v.lo, v.hi).store(p);
    }
  }
};

// Stores an accumulation-type pair (for fp32/fp64 outputs whatever the input dtype).
template <typename acc_t>
void store_acc(acc_t* p, const at::vec::Vectorized<acc_t>& lo, const at::vec::Vectorized<acc_t>& hi) {
  lo.store(p);
  hi.store(p + at::vec::Vectorized<acc_t>::size());
}

template <typename acc_t>
acc_t lane_sum(const at::vec::Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>(
      [](const at::vec::Vectorized<acc_t>& a, const at::vec::Vectorized<acc_t>& b) { return a + b; },
      v);
}

// Sum of f(x) over n contiguous elements: two SIMD vectors per step, then the scalar tail. f
// takes both a Vectorized<acc_t> and an acc_t (a generic lambda), so every span reduction of the
// CPU kernels shares one loop and one summation order.
template <typename scalar_t, typename F, typename acc_t = at::opmath_type<scalar_t>>
acc_t span_reduce(const scalar_t* p, int64_t n, const F& f) {
  using IO = VecIO<scalar_t>;
  typename IO::Vec acc(acc_t(0));
  acc_t tail = 0;
  int64_t i = 0;
  for (; i + IO::kStep <= n; i += IO::kStep) {
    const auto v = IO::load(p + i);
    acc += f(v.lo) + f(v.hi);
  }
  for (; i < n; ++i) tail += f(acc_t(p[i]));
  return lane_sum(acc) + tail;
}

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
acc_t span_sum(const scalar_t* p, int64_t n) {
  return span_reduce(p, n, [](auto x) { return x; });
}

// Sum of squared deviations from `mean`.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
acc_t span_sq_dev(const scalar_t* p, int64_t n, acc_t mean) {
  return span_reduce(p, n, [mean](auto x) {
    const auto d = x - decltype(x)(mean);
    return d * d;
  });
}

constexpr int64_t kElementwiseGrain = 32768;
// Reductions split each sample into chunks of this size; the chunk boundaries (not the
// thread count) fix the summation order, so results are bitwise reproducible.
constexpr int64_t kReduceChunk = 16384;

// Elementwise pass over `numel` = batch * per_sample elements in parallel; fn(b, lo, hi)
// handles the part of sample b in the flat range [lo, hi).
template <typename Fn>
void for_each_sample_segment(int64_t numel, int64_t per_sample, const Fn& fn) {
  at::parallel_for(0, numel, kElementwiseGrain, [&](int64_t begin, int64_t end) {
    int64_t b = begin / per_sample;
    for (int64_t lo = begin; lo < end; ++b) {
      const int64_t hi = std::min(end, (b + 1) * per_sample);
      fn(b, lo, hi);
      lo = hi;
    }
  });
}

// Per-sample reduction: chunk_fn(b, lo, hi) -> State for every chunk of every sample,
// in parallel; the chunk states of a sample are merged in chunk order.
template <typename State, typename ChunkFn, typename MergeFn>
std::vector<State> reduce_per_sample(int64_t batch, int64_t per_sample, State empty,
                                     const ChunkFn& chunk_fn, const MergeFn& merge) {
  const int64_t chunks = (per_sample + kReduceChunk - 1) / kReduceChunk;
  std::vector<State> partial(batch * chunks, empty);
  at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks;
      const int64_t lo = b * per_sample + (task % chunks) * kReduceChunk;
      const int64_t hi = std::min(lo + kReduceChunk, (b + 1) * per_sample);
      partial[task] = chunk_fn(b, lo, hi);
    }
  });
  std::vector<State> out(batch, empty);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t ch = 0; ch < chunks; ++ch) out[b] = merge(out[b], partial[b * chunks + ch]);
  return out;
}

}  // namespace ddg::cpu
