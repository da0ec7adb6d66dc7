// CPU loops of the split-token ops. Row ops ([M, W]) run one row per task: statistics and
// the LayerNorm backward's row sums in SIMD (at::vec, fp32 lanes), elementwise passes in
// SIMD with a scalar tail. The LN weight/bias gradients are summed per fixed block of rows
// and the blocks merged in order, so results do not depend on the thread count. The target
// and loss passes are per element on [M, C] (C = 64: small), scalar. Math from
// csrc/common/split_token_math.h.
#include <algorithm>
#include <cmath>
#include <vector>

#include "../common/split_token_math.h"
#include "../host/register_split_token.h"
#include "cpu_loops.h"
#include "kernels.h"

namespace ddg::cpu {
namespace {

constexpr int64_t kRowsPerBlock = 64;  // rows whose LN weight/bias gradients are summed together

int64_t row_grain(int64_t width) { return std::max<int64_t>(1, kElementwiseGrain / std::max<int64_t>(width, 1)); }

template <typename scalar_t>
const scalar_t* cond_row(const CondRows& c, const int64_t* index, int64_t r) {
  return c.t.const_data_ptr<scalar_t>() + (index ? index[r] : r) * c.row_stride;
}

void check_cond_index(const char* op, const int64_t* index, int64_t r, int64_t cond_rows) {
  if (index)
    TORCH_CHECK(index[r] >= 0 && index[r] < cond_rows, "ddg.", op, ": 'cond_index' value ", index[r], " at row ", r,
                " is out of range for ", cond_rows, " condition rows");
}

// ---------------------------------------------------------------- targets

template <typename scalar_t>
void prepare_typed(const PrepareCall& c, at::Tensor& x_t_out, at::Tensor& x0_out) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* f = c.features.const_data_ptr<scalar_t>();
  const scalar_t* mu = c.prototypes.defined() ? c.prototypes.const_data_ptr<scalar_t>() : nullptr;
  const int64_t* perm = c.permutation.defined() ? c.permutation.const_data_ptr<int64_t>() : nullptr;
  const int64_t* t = c.timesteps.const_data_ptr<int64_t>();
  const scalar_t* eps = c.noise.const_data_ptr<scalar_t>();
  const acc_t* sab = c.sqrt_ab.const_data_ptr<acc_t>();
  const acc_t* s1ab = c.sqrt_one_minus_ab.const_data_ptr<acc_t>();
  const TargetCoefs<acc_t> k{acc_t(c.keep), acc_t(c.contract), acc_t(c.mix), acc_t(c.mix_rest)};
  const int64_t C = c.token_size, N = c.num_tokens(), D = c.dim, tokens = c.batch * N;
  scalar_t* x_t = x_t_out.mutable_data_ptr<scalar_t>();
  scalar_t* x0 = x0_out.mutable_data_ptr<scalar_t>();

  auto contracted = [&](int64_t i) {  // flat index into [B, D]
    const acc_t v = acc_t(f[i]);
    return mu ? contract_value(v, acc_t(mu[i]), k.keep, k.contract) : v;
  };
  // Writes token `token`'s target row (C values) through emit(j, value).
  auto target_row = [&](int64_t token, auto&& emit) {
    const int64_t b = token / N, offset = token % N * C;
    int64_t partner = b;
    if (perm) {
      partner = perm[b];
      TORCH_CHECK(partner >= 0 && partner < c.batch, "ddg.split_token_prepare: 'permutation' value ", partner,
                  " is out of range for batch ", c.batch);
    }
    for (int64_t j = 0; j < C; ++j) {
      acc_t v = contracted(b * D + offset + j);
      if (perm) v = mix_value(v, contracted(partner * D + offset + j), k.mix, k.mix_rest);
      emit(j, v);
    }
  };
  at::parallel_for(0, tokens, row_grain(C), [&](int64_t begin, int64_t end) {
    for (int64_t token = begin; token < end; ++token)
      target_row(token, [&](int64_t j, acc_t v) { x0[token * C + j] = scalar_t(v); });
  });
  at::parallel_for(0, c.rows, row_grain(C), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t step = t[r];
      TORCH_CHECK(step >= 0 && step < c.steps, "ddg.split_token_prepare: 'timesteps' value ", step, " at row ", r,
                  " is out of range for a schedule of ", c.steps, " steps");
      target_row(r % tokens, [&](int64_t j, acc_t v) {
        x_t[r * C + j] = scalar_t(noised_value(v, acc_t(eps[r * C + j]), sab[step], s1ab[step]));
      });
    }
  });
}

// ---------------------------------------------------------------- LayerNorm + adaLN

// y = xhat * w + b on one SIMD pair at column i (w, bias optional: a LN without them).
template <typename scalar_t>
void apply_affine(typename VecIO<scalar_t>::Pair& y, const scalar_t* w, const scalar_t* bias, int64_t i) {
  using IO = VecIO<scalar_t>;
  if (w) {
    const auto wv = IO::load(w + i);
    y.lo = y.lo * wv.lo;
    y.hi = y.hi * wv.hi;
  }
  if (bias) {
    const auto bv = IO::load(bias + i);
    y.lo = y.lo + bv.lo;
    y.hi = y.hi + bv.hi;
  }
}

// Sum of shifted_value(x, s) over a row.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
acc_t row_shifted_sum(const scalar_t* p, int64_t n, acc_t s) {
  return span_reduce(p, n, [s](auto x) { return shifted_value(x, decltype(x)(s)); });
}

template <typename scalar_t>
void modulate_typed(const ModulateCall& c, at::Tensor& out_t, at::Tensor& mean_t, at::Tensor& rstd_t) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  const int64_t W = c.width;
  const scalar_t* x = c.x.const_data_ptr<scalar_t>();
  const scalar_t* w = c.weight.defined() ? c.weight.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* bias = c.bias.defined() ? c.bias.const_data_ptr<scalar_t>() : nullptr;
  const int64_t* index = c.cond_index.defined() ? c.cond_index.const_data_ptr<int64_t>() : nullptr;
  scalar_t* out = out_t.mutable_data_ptr<scalar_t>();
  acc_t* mean_out = mean_t.mutable_data_ptr<acc_t>();
  acc_t* rstd_out = rstd_t.mutable_data_ptr<acc_t>();
  at::parallel_for(0, c.rows, row_grain(W), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      check_cond_index("adaln_modulate", index, r, c.cond_rows);
      const scalar_t* xr = x + r * W;
      const scalar_t* shift = cond_row<scalar_t>(c.shift, index, r);
      const scalar_t* scale = cond_row<scalar_t>(c.scale, index, r);
      scalar_t* o = out + r * W;
      const acc_t s = acc_t(xr[0]);
      const acc_t mean = mean_from_shifted_sum(s, row_shifted_sum(xr, W, s), acc_t(W));
      const acc_t rstd = acc_t(1) / std::sqrt(span_sq_dev(xr, W, mean) / acc_t(W) + acc_t(c.eps));
      mean_out[r] = mean;
      rstd_out[r] = rstd;
      const Vec vmean(mean), vrstd(rstd);
      int64_t i = 0;
      for (; i + IO::kStep <= W; i += IO::kStep) {
        auto v = IO::load(xr + i);
        const auto sc = IO::load(scale + i), sh = IO::load(shift + i);
        v.lo = (v.lo - vmean) * vrstd;
        v.hi = (v.hi - vmean) * vrstd;
        apply_affine(v, w, bias, i);
        IO::store(o + i, {modulate_value(v.lo, sc.lo, sh.lo), modulate_value(v.hi, sc.hi, sh.hi)});
      }
      for (; i < W; ++i) {
        acc_t y = (acc_t(xr[i]) - mean) * rstd;
        if (w) y = y * acc_t(w[i]);
        if (bias) y = y + acc_t(bias[i]);
        o[i] = scalar_t(modulate_value(y, acc_t(scale[i]), acc_t(shift[i])));
      }
    }
  });
}

// One row of the LayerNorm + modulation backward. gy = g (1 + scale) is the gradient of the
// LN output; grad_scale = g * y; g_xhat = gy * w. Two passes: row sums, then dx.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
struct ModulateRowGrad {
  const scalar_t *x, *g, *scale, *w, *bias;
  acc_t mean, rstd;
  int64_t W;

  acc_t xhat(int64_t i) const { return (acc_t(x[i]) - mean) * rstd; }
  acc_t gy(int64_t i) const { return acc_t(g[i]) * (acc_t(1) + acc_t(scale[i])); }
  acc_t wv(int64_t i) const { return w ? acc_t(w[i]) : acc_t(1); }

  // Sums of g_xhat and g_xhat * xhat over the row, plus (when partial_w/partial_b) the LN
  // affine gradients accumulated into this block's partial rows.
  void sums(acc_t* sum_g, acc_t* sum_gx, acc_t* partial_w, acc_t* partial_b) const {
    using IO = VecIO<scalar_t>;
    using Vec = typename IO::Vec;
    const Vec vmean(mean), vrstd(rstd), one(acc_t(1));
    Vec a1(acc_t(0)), a2(acc_t(0));
    int64_t i = 0;
    for (; i + IO::kStep <= W; i += IO::kStep) {
      const auto xv = IO::load(x + i), gv = IO::load(g + i), sv = IO::load(scale + i);
      const Vec xh[2] = {(xv.lo - vmean) * vrstd, (xv.hi - vmean) * vrstd};
      const Vec gyv[2] = {gv.lo * (one + sv.lo), gv.hi * (one + sv.hi)};
      Vec gxh[2] = {gyv[0], gyv[1]};
      if (w) {
        const auto ww = IO::load(w + i);
        gxh[0] = gxh[0] * ww.lo;
        gxh[1] = gxh[1] * ww.hi;
      }
      a1 += gxh[0] + gxh[1];
      a2 += gxh[0] * xh[0] + gxh[1] * xh[1];
      for (int half = 0; half < 2; ++half) {
        const int64_t at = i + half * Vec::size();
        if (partial_w) (Vec::loadu(partial_w + at) + gyv[half] * xh[half]).store(partial_w + at);
        if (partial_b) (Vec::loadu(partial_b + at) + gyv[half]).store(partial_b + at);
      }
    }
    acc_t s1 = lane_sum(a1), s2 = lane_sum(a2);
    for (; i < W; ++i) {
      const acc_t xh = xhat(i), gyi = gy(i), gxh = gyi * wv(i);
      s1 += gxh;
      s2 += gxh * xh;
      if (partial_w) partial_w[i] += gyi * xh;
      if (partial_b) partial_b[i] += gyi;
    }
    *sum_g = s1;
    *sum_gx = s2;
  }

  void grads(acc_t mean_g, acc_t mean_gx, scalar_t* dx, scalar_t* dscale) const {
    using IO = VecIO<scalar_t>;
    using Vec = typename IO::Vec;
    const Vec vmean(mean), vrstd(rstd), one(acc_t(1)), vmg(mean_g), vmgx(mean_gx);
    int64_t i = 0;
    for (; i + IO::kStep <= W; i += IO::kStep) {
      const auto xv = IO::load(x + i), gv = IO::load(g + i), sv = IO::load(scale + i);
      typename IO::Pair xh{(xv.lo - vmean) * vrstd, (xv.hi - vmean) * vrstd};
      typename IO::Pair gxh{gv.lo * (one + sv.lo), gv.hi * (one + sv.hi)};
      typename IO::Pair y = xh;
      apply_affine(y, w, bias, i);
      apply_affine(gxh, w, static_cast<const scalar_t*>(nullptr), i);  // g_xhat = gy * w
      IO::store(dx + i, {layer_norm_input_grad(gxh.lo, xh.lo, vrstd, vmg, vmgx),
                         layer_norm_input_grad(gxh.hi, xh.hi, vrstd, vmg, vmgx)});
      IO::store(dscale + i, {gv.lo * y.lo, gv.hi * y.hi});
    }
    for (; i < W; ++i) {
      const acc_t xh = xhat(i);
      const acc_t y = xh * wv(i) + (bias ? acc_t(bias[i]) : acc_t(0));
      dx[i] = scalar_t(layer_norm_input_grad(gy(i) * wv(i), xh, rstd, mean_g, mean_gx));
      dscale[i] = scalar_t(acc_t(g[i]) * y);
    }
  }
};

template <typename scalar_t>
void modulate_backward_typed(const ModulateCall& c, const at::Tensor& grad_out, const at::Tensor& mean_t,
                             const at::Tensor& rstd_t, at::Tensor& grad_x, at::Tensor& grad_weight,
                             at::Tensor& grad_bias, at::Tensor& grad_scale_rows) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t W = c.width, M = c.rows;
  const scalar_t* x = c.x.const_data_ptr<scalar_t>();
  const scalar_t* g = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* w = c.weight.defined() ? c.weight.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* bias = c.bias.defined() ? c.bias.const_data_ptr<scalar_t>() : nullptr;
  const int64_t* index = c.cond_index.defined() ? c.cond_index.const_data_ptr<int64_t>() : nullptr;
  const acc_t* mean = mean_t.const_data_ptr<acc_t>();
  const acc_t* rstd = rstd_t.const_data_ptr<acc_t>();
  scalar_t* dx = grad_x.mutable_data_ptr<scalar_t>();
  scalar_t* dscale = grad_scale_rows.mutable_data_ptr<scalar_t>();
  const bool want_w = grad_weight.defined(), want_b = grad_bias.defined();
  const int64_t blocks = (M + kRowsPerBlock - 1) / kRowsPerBlock;
  std::vector<acc_t> partial_w(want_w ? blocks * W : 0, acc_t(0)), partial_b(want_b ? blocks * W : 0, acc_t(0));
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      for (int64_t r = blk * kRowsPerBlock; r < std::min(M, (blk + 1) * kRowsPerBlock); ++r) {
        check_cond_index("adaln_modulate_backward", index, r, c.cond_rows);
        const ModulateRowGrad<scalar_t> row{x + r * W, g + r * W, cond_row<scalar_t>(c.scale, index, r), w, bias,
                                            mean[r], rstd[r], W};
        acc_t sum_g, sum_gx;
        row.sums(&sum_g, &sum_gx, want_w ? partial_w.data() + blk * W : nullptr,
                 want_b ? partial_b.data() + blk * W : nullptr);
        row.grads(sum_g / acc_t(W), sum_gx / acc_t(W), dx + r * W, dscale + r * W);
      }
    }
  });
  // Merge the blocks' affine gradients column by column, in block order.
  auto merge = [&](const std::vector<acc_t>& partial, at::Tensor& out_t) {
    scalar_t* out = out_t.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, W, 256, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        acc_t s = 0;
        for (int64_t blk = 0; blk < blocks; ++blk) s += partial[blk * W + i];
        out[i] = scalar_t(s);
      }
    });
  };
  if (want_w) merge(partial_w, grad_weight);
  if (want_b) merge(partial_b, grad_bias);
}

// ---------------------------------------------------------------- gated residual

template <typename scalar_t>
void gated_typed(const GatedCall& c, at::Tensor& out_t) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  const int64_t W = c.width;
  const scalar_t* x = c.x.const_data_ptr<scalar_t>();
  const scalar_t* h = c.h.const_data_ptr<scalar_t>();
  const int64_t* index = c.cond_index.defined() ? c.cond_index.const_data_ptr<int64_t>() : nullptr;
  scalar_t* out = out_t.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, c.rows, row_grain(W), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      check_cond_index("gated_residual", index, r, c.cond_rows);
      const scalar_t *xr = x + r * W, *hr = h + r * W, *gate = cond_row<scalar_t>(c.gate, index, r);
      scalar_t* o = out + r * W;
      int64_t i = 0;
      for (; i + IO::kStep <= W; i += IO::kStep) {
        const auto xv = IO::load(xr + i), gv = IO::load(gate + i), hv = IO::load(hr + i);
        IO::store(o + i, {gated_value(xv.lo, gv.lo, hv.lo), gated_value(xv.hi, gv.hi, hv.hi)});
      }
      for (; i < W; ++i) o[i] = scalar_t(gated_value(acc_t(xr[i]), acc_t(gate[i]), acc_t(hr[i])));
    }
  });
}

template <typename scalar_t>
void gated_backward_typed(const GatedCall& c, const at::Tensor& grad_out, at::Tensor& grad_h_t,
                          at::Tensor& grad_gate_t) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  const int64_t W = c.width;
  const scalar_t* g = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* h = c.h.const_data_ptr<scalar_t>();
  const int64_t* index = c.cond_index.defined() ? c.cond_index.const_data_ptr<int64_t>() : nullptr;
  scalar_t* grad_h = grad_h_t.mutable_data_ptr<scalar_t>();
  scalar_t* grad_gate = grad_gate_t.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, c.rows, row_grain(W), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      check_cond_index("gated_residual_backward", index, r, c.cond_rows);
      const scalar_t *gr = g + r * W, *hr = h + r * W, *gate = cond_row<scalar_t>(c.gate, index, r);
      int64_t i = 0;
      for (; i + IO::kStep <= W; i += IO::kStep) {
        const auto gv = IO::load(gr + i), gatev = IO::load(gate + i), hv = IO::load(hr + i);
        IO::store(grad_h + r * W + i, {gv.lo * gatev.lo, gv.hi * gatev.hi});
        IO::store(grad_gate + r * W + i, {gv.lo * hv.lo, gv.hi * hv.hi});
      }
      for (; i < W; ++i) {
        grad_h[r * W + i] = scalar_t(acc_t(gr[i]) * acc_t(gate[i]));
        grad_gate[r * W + i] = scalar_t(acc_t(gr[i]) * acc_t(hr[i]));
      }
    }
  });
}

// ---------------------------------------------------------------- diffusion loss

template <typename acc_t>
LossCoefs<acc_t> loss_coefs_of(const LossCall& c, const acc_t* table, int64_t r, int64_t step) {
  TORCH_CHECK(step >= 0 && step < c.steps, "ddg.diffusion_loss: 'timesteps' value ", step, " at row ", r,
              " is out of range for 'loss_coefs' of ", c.steps, " steps");
  return {table[step * 3], table[step * 3 + 1], table[step * 3 + 2]};
}

template <typename scalar_t>
void loss_typed(const LossCall& c, at::Tensor& loss_t, at::Tensor& mse_t) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = c.channels, width = c.learned ? 2 * C : C;
  const scalar_t* out = c.model_output.const_data_ptr<scalar_t>();
  const scalar_t* eps = c.noise.const_data_ptr<scalar_t>();
  const scalar_t* x0 = c.learned ? c.x0.const_data_ptr<scalar_t>() : nullptr;
  const int64_t* t = c.timesteps.const_data_ptr<int64_t>();
  const acc_t* table = c.coefs.const_data_ptr<acc_t>();
  acc_t* loss = loss_t.mutable_data_ptr<acc_t>();
  acc_t* mse = mse_t.mutable_data_ptr<acc_t>();
  const acc_t log2 = acc_t(std::log(2.0));
  at::parallel_for(0, c.rows, row_grain(4 * width), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t *o = out + r * width, *e = eps + r * C;
      acc_t sq = 0;
      for (int64_t j = 0; j < C; ++j) {
        const acc_t d = acc_t(o[j]) - acc_t(e[j]);
        sq += d * d;
      }
      mse[r] = sq / acc_t(C);
      if (!c.learned) {
        loss[r] = mse[r];
        continue;
      }
      const LossCoefs<acc_t> k = loss_coefs_of(c, table, r, t[r]);
      const scalar_t* x0r = x0 + (r % c.x0_rows) * C;
      acc_t vb = 0;
      for (int64_t j = 0; j < C; ++j)
        vb += vb_term(t[r] == 0, acc_t(o[j]) - acc_t(e[j]), acc_t(o[C + j]), acc_t(x0r[j]), k).value;
      loss[r] = mse[r] + vb / acc_t(C) / log2;
    }
  });
}

template <typename scalar_t>
void loss_backward_typed(const LossCall& c, const at::Tensor& grad_loss, at::Tensor& grad_t) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = c.channels, width = c.learned ? 2 * C : C;
  const scalar_t* out = c.model_output.const_data_ptr<scalar_t>();
  const scalar_t* eps = c.noise.const_data_ptr<scalar_t>();
  const scalar_t* x0 = c.learned ? c.x0.const_data_ptr<scalar_t>() : nullptr;
  const int64_t* t = c.timesteps.const_data_ptr<int64_t>();
  const acc_t* table = c.coefs.const_data_ptr<acc_t>();
  const acc_t* gl = grad_loss.const_data_ptr<acc_t>();
  scalar_t* grad = grad_t.mutable_data_ptr<scalar_t>();
  const acc_t log2 = acc_t(std::log(2.0));
  at::parallel_for(0, c.rows, row_grain(4 * width), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t *o = out + r * width, *e = eps + r * C;
      scalar_t* gr = grad + r * width;
      const acc_t g_mse = acc_t(2) * gl[r] / acc_t(C);
      for (int64_t j = 0; j < C; ++j) gr[j] = scalar_t(g_mse * (acc_t(o[j]) - acc_t(e[j])));
      if (!c.learned) continue;
      const LossCoefs<acc_t> k = loss_coefs_of(c, table, r, t[r]);
      const scalar_t* x0r = x0 + (r % c.x0_rows) * C;
      const acc_t g_vb = gl[r] / acc_t(C) / log2;
      for (int64_t j = 0; j < C; ++j)
        gr[C + j] = scalar_t(g_vb * vb_term(t[r] == 0, acc_t(o[j]) - acc_t(e[j]), acc_t(o[C + j]),
                                            acc_t(x0r[j]), k).grad_v);
    }
  });
}

// ---------------------------------------------------------------- condition-row sums

// Each condition's rows in ascending row order, one condition per task: deterministic.
template <typename scalar_t>
void cond_rows_sum_typed(const CondSumCall& c, at::Tensor& out_t) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = c.rows.size(0), W = c.rows.size(1), U = c.cond_rows;
  const scalar_t* rows = c.rows.const_data_ptr<scalar_t>();
  const int64_t* order = c.order.const_data_ptr<int64_t>();
  const int64_t* offsets = c.offsets.const_data_ptr<int64_t>();
  TORCH_CHECK(offsets[0] == 0 && offsets[U] == M, "ddg.cond_rows_sum: 'cond_index' has values outside [0, ", U,
              ")");
  scalar_t* out = out_t.mutable_data_ptr<scalar_t>();
  const int64_t rows_per_cond = std::max<int64_t>(1, M / std::max<int64_t>(U, 1));
  at::parallel_for(0, U, row_grain(W * rows_per_cond), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(W);
    for (int64_t u = begin; u < end; ++u) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t k = offsets[u]; k < offsets[u + 1]; ++k) {
        const scalar_t* row = rows + order[k] * W;
        for (int64_t i = 0; i < W; ++i) acc[i] += acc_t(row[i]);
      }
      for (int64_t i = 0; i < W; ++i) out[u * W + i] = scalar_t(acc[i]);
    }
  });
}

DDG_SPLIT_TOKEN_LOOPS(CpuSplitTokenLoops);

}  // namespace

const SplitTokenKernels& split_token_kernels() { return ddg::split_token_kernels<CpuSplitTokenLoops>(); }

}  // namespace ddg::cpu

