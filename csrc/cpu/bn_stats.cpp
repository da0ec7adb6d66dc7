// CPU loops of the BN-statistics ops. Statistics: every chunk of a channel is summarised in
// cache-resident passes (NC(S): sum, then squared deviations; channels fastest: shifted sums), chunks merge with
// Chan's formula in a fixed order (deterministic for any thread count). Backward: one
// elementwise pass. Math from csrc/common/welford.h and csrc/common/bn_stats_math.h.
#include <vector>

#include "../common/bn_stats_math.h"
#include "../common/welford.h"
#include "../host/register_bn_stats.h"
#include "cpu_loops.h"
#include "kernels.h"

namespace ddg::cpu {
namespace {

// NC(S) layout: channel c is N planes of S elements. A chunk is a group of whole planes
// (small S) or a piece of one plane (large S), at most ~kReduceChunk elements.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void plane_stats(const BnCall& call, acc_t* mean, acc_t* var) {
  const scalar_t* x = call.x.const_data_ptr<scalar_t>();
  const int64_t N = call.batch, C = call.channels, S = call.inner;
  const int64_t pieces = (S + kReduceChunk - 1) / kReduceChunk;
  const int64_t planes_per_chunk = pieces == 1 ? std::max<int64_t>(1, kReduceChunk / S) : 1;
  const int64_t chunks = (N + planes_per_chunk - 1) / planes_per_chunk * pieces;
  std::vector<WelfordState<acc_t>> partial(C * chunks);
  at::parallel_for(0, C * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task / chunks, k = task % chunks;
      const int64_t n0 = k / pieces * planes_per_chunk, n1 = std::min(N, n0 + planes_per_chunk);
      const int64_t s0 = k % pieces * kReduceChunk, len = std::min(S, s0 + kReduceChunk) - s0;
      auto plane = [&](int64_t n) { return x + (n * C + c) * S + s0; };
      acc_t sum = 0;
      for (int64_t n = n0; n < n1; ++n) sum += span_sum(plane(n), len);
      const acc_t count = acc_t((n1 - n0) * len), m = sum / count;
      acc_t m2 = 0;
      for (int64_t n = n0; n < n1; ++n) m2 += span_sq_dev(plane(n), len, m);
      partial[task] = {count, m, m2};
    }
  });
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      WelfordState<acc_t> st = welford_empty<acc_t>();
      for (int64_t k = 0; k < chunks; ++k) st = welford_merge(st, partial[c * chunks + k]);
      mean[c] = st.mean;
      var[c] = welford_variance(st);
    }
  });
}

// Channels-fastest layout: R = N*S rows of C. A chunk is a run of rows; one pass accumulates every
// channel's shifted sums (shift: the channel's value in the chunk's first row) across the channel
// vector with SIMD, so channels far from zero with a tiny spread keep their variance.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void row_stats(const BnCall& call, acc_t* mean, acc_t* var) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  using VecSums = ShiftedSums<Vec>;
  const scalar_t* x = call.x.const_data_ptr<scalar_t>();
  const int64_t C = call.channels, R = call.batch * call.inner;
  const int64_t rows_per_chunk = std::max<int64_t>(1, kReduceChunk / C);
  const int64_t chunks = (R + rows_per_chunk - 1) / rows_per_chunk;
  std::vector<acc_t> sums(chunks * C), sqs(chunks * C);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> shift(C);
    for (int64_t k = begin; k < end; ++k) {
      const int64_t r0 = k * rows_per_chunk, r1 = std::min(R, r0 + rows_per_chunk);
      acc_t* s = sums.data() + k * C;
      acc_t* q = sqs.data() + k * C;
      std::fill(s, s + C, acc_t(0));
      std::fill(q, q + C, acc_t(0));
      for (int64_t c = 0; c < C; ++c) shift[c] = acc_t(x[r0 * C + c]);
      const acc_t* sh = shift.data();
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* row = x + r * C;
        int64_t c = 0;
        for (; c + IO::kStep <= C; c += IO::kStep) {
          const auto v = IO::load(row + c);
          const int64_t h = c + Vec::size();
          const VecSums lo = shifted_sums_update(VecSums{Vec::loadu(s + c), Vec::loadu(q + c)}, v.lo, Vec::loadu(sh + c));
          const VecSums hi = shifted_sums_update(VecSums{Vec::loadu(s + h), Vec::loadu(q + h)}, v.hi, Vec::loadu(sh + h));
          lo.sum.store(s + c);
          lo.sum_sq.store(q + c);
          hi.sum.store(s + h);
          hi.sum_sq.store(q + h);
        }
        for (; c < C; ++c) {
          const ShiftedSums<acc_t> one = shifted_sums_update(ShiftedSums<acc_t>{s[c], q[c]}, acc_t(row[c]), sh[c]);
          s[c] = one.sum;
          q[c] = one.sum_sq;
        }
      }
    }
  });
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      WelfordState<acc_t> st = welford_empty<acc_t>();
      for (int64_t k = 0; k < chunks; ++k) {
        const int64_t r0 = k * rows_per_chunk, rows = std::min(R, r0 + rows_per_chunk) - r0;
        const ShiftedSums<acc_t> chunk{sums[k * C + c], sqs[k * C + c]};
        st = welford_merge(st, welford_from_shifted_sums(acc_t(rows), acc_t(x[r0 * C + c]), chunk));
      }
      mean[c] = st.mean;
      var[c] = welford_variance(st);
    }
  });
}

template <typename scalar_t>
void bn_stats_typed(const BnCall& call, at::Tensor& mean, at::Tensor& var) {
  using acc_t = at::opmath_type<scalar_t>;
  if (call.layout == ChannelLayout::kPlanes)
    plane_stats<scalar_t>(call, mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>());
  else
    row_stats<scalar_t>(call, mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>());
}

template <typename scalar_t>
void bn_backward_typed(const BnCall& call, const at::Tensor& grad_mean, const at::Tensor& grad_var,
                       const at::Tensor& mean, at::Tensor& dx) {
  using acc_t = at::opmath_type<scalar_t>;
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  const int64_t C = call.channels;
  const scalar_t* x = call.x.const_data_ptr<scalar_t>();
  scalar_t* out = dx.mutable_data_ptr<scalar_t>();
  const acc_t* gm = grad_mean.const_data_ptr<acc_t>();
  const acc_t* gv = grad_var.const_data_ptr<acc_t>();
  const acc_t* mu = mean.const_data_ptr<acc_t>();
  const acc_t count = acc_t(call.count());
  std::vector<acc_t> a(C), b(C);
  for (int64_t c = 0; c < C; ++c) {
    const BnGradCoefs<acc_t> k = bn_grad_coefs(gm[c], gv[c], count);
    a[c] = k.a;
    b[c] = k.b;
  }
  if (call.layout == ChannelLayout::kPlanes) {
    // Every plane has one channel: coefficients are constant along it.
    for_each_sample_segment(dx.numel(), call.inner, [&](int64_t plane, int64_t lo, int64_t hi) {
      const int64_t c = plane % C;
      const Vec va(a[c]), vb(b[c]), vm(mu[c]);
      int64_t i = lo;
      for (; i + IO::kStep <= hi; i += IO::kStep) {
        const auto v = IO::load(x + i);
        IO::store(out + i, {bn_grad_value(v.lo, vm, va, vb), bn_grad_value(v.hi, vm, va, vb)});
      }
      for (; i < hi; ++i) out[i] = static_cast<scalar_t>(bn_grad_value<acc_t>(x[i], mu[c], a[c], b[c]));
    });
    return;
  }
  const int64_t rows = call.batch * call.inner;
  at::parallel_for(0, rows, std::max<int64_t>(1, kElementwiseGrain / C), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* row = x + r * C;
      scalar_t* orow = out + r * C;
      int64_t c = 0;
      for (; c + IO::kStep <= C; c += IO::kStep) {
        const auto v = IO::load(row + c);
        const int64_t h = c + Vec::size();
        IO::store(orow + c, {bn_grad_value(v.lo, Vec::loadu(mu + c), Vec::loadu(a.data() + c), Vec::loadu(b.data() + c)),
                             bn_grad_value(v.hi, Vec::loadu(mu + h), Vec::loadu(a.data() + h), Vec::loadu(b.data() + h))});
      }
      for (; c < C; ++c) orow[c] = static_cast<scalar_t>(bn_grad_value<acc_t>(row[c], mu[c], a[c], b[c]));
    }
  });
}

}  // namespace

DDG_BN_STATS_LOOPS(CpuBnLoops);

const BnStatsKernels& bn_stats_kernels() { return ddg::bn_stats_kernels<CpuBnLoops>(); }

}  // namespace ddg::cpu

