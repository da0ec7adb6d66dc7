"""Functional API of the split-token ops: GenDD's diffusion-head path (docs/methods/gendd.md §3).

- ``split_token_prepare``: contraction + mixup + split into tokens + replication + noising of
  the teacher features, one pass (no gradient: the targets are constants).
- ``adaln_modulate``: LayerNorm (affine or not) + adaLN modulation of [M, W] rows.
- ``gated_residual``: ``x + gate * h``.
- ``diffusion_loss``: per-row epsilon MSE, or IDDPM's hybrid loss with learned variance.

shift/scale/gate may be column slices of one concatenated adaLN projection (any row stride)
and may be shared by several rows through ``cond_index`` (deduplicated conditioning).
Every function validates its arguments, then runs the compiled kernel when the extension is
loaded for the tensors' device and the pure-PyTorch reference otherwise.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from . import reference
from ._ext import use_kernel
from ._validate import check_number, check_tensor

__all__ = ["split_token_prepare", "split_token_rows", "adaln_modulate", "gated_residual", "diffusion_loss",
           "DiffusionLossOutput"]

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class DiffusionLossOutput(NamedTuple):
    loss: torch.Tensor  # per-row or mean loss (mse + vb with learned variance), fp32 (fp64 for fp64)
    mse: torch.Tensor   # the epsilon-MSE part, for logging (not differentiable)


def _floating(op: str, name: str, t, ndim: int, dtype: Optional[torch.dtype] = None, device=None) -> None:
    check_tensor(op, name, t)
    if t.dtype not in _FLOATS:
        raise TypeError(f"ddg.{op}: '{name}' must be float32, float64, float16 or bfloat16, got {t.dtype}")
    if t.ndim != ndim:
        raise ValueError(f"ddg.{op}: '{name}' must be {ndim}-D, got shape {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"ddg.{op}: '{name}' must have dtype {dtype} like the other operands, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"ddg.{op}: '{name}' must be on {device} like the other operands, got {t.device}")


def _index(op: str, name: str, t, length: int, device) -> None:
    check_tensor(op, name, t)
    if t.dtype != torch.int64 or t.shape != (length,):
        raise ValueError(f"ddg.{op}: '{name}' must be an int64 tensor of shape [{length}], "
                         f"got {t.dtype} {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"ddg.{op}: '{name}' must be on {device} like the other operands, got {t.device}")


def _shape(op: str, name: str, t: torch.Tensor, shape: Tuple[int, ...], what: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"ddg.{op}: '{name}' must have shape {tuple(shape)} ({what}), got {tuple(t.shape)}")


def _no_grad_input(op: str, name: str, t: Optional[torch.Tensor]) -> None:
    if t is not None and t.requires_grad:
        raise ValueError(f"ddg.{op}: '{name}' is treated as a constant (no gradient flows to it) but requires "
                         "grad; pass it detached")


def _check_range(op: str, name: str, index: torch.Tensor, high: int) -> None:
    """Reference path only (the kernels check while they read): Python indexing would wrap negative
    values silently. An async assert, so it neither syncs a GPU nor breaks a compiled graph."""
    torch._assert_async(((index >= 0) & (index < high)).all(),
                        f"ddg.{op}: '{name}' has values outside [0, {high})")


def split_token_rows(batch: int, num_tokens: int, batch_mul: int, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The row -> (sample, token) map of split tokens tiled replica-outer: row r of the
    M = batch * num_tokens * batch_mul rows holds token r % N of sample (r % (B N)) // N."""
    rows = torch.arange(batch * num_tokens * batch_mul, device=device) % (batch * num_tokens)
    return rows // num_tokens, rows % num_tokens


def split_token_prepare(features: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor,
                        sqrt_alpha_bar: torch.Tensor, sqrt_one_minus_alpha_bar: torch.Tensor, token_size: int, *,
                        prototypes: Optional[torch.Tensor] = None, contraction: float = 0.0,
                        permutation: Optional[torch.Tensor] = None, mix: float = 1.0
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Noised split-token targets of GenDD in one pass; returns (x_t [M, C], x0 tokens [B*N, C]).

    features: teacher features f [B, D] with D = N * token_size. prototypes: per-sample class
    prototypes mu [B, D] (a gather W_cls[y] or a soft mixture y~ W_cls) for the contraction
    x0 = (1 - contraction) f + contraction mu. permutation: int64 [B] for feature mixup
    x0 <- mix x0 + (1 - mix) x0[permutation]. timesteps: int64 [M] with M = B * N * R (R replicas,
    tiled replica-outer, see ``split_token_rows``); noise: eps [M, C]; sqrt_alpha_bar,
    sqrt_one_minus_alpha_bar: [T] tables (``GaussianDiffusionSchedule.noising_tables``).
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, in the dtype of ``features`` (fp32 math).
    """
    op = "split_token_prepare"
    _floating(op, "features", features, 2)
    dtype, device = features.dtype, features.device
    if isinstance(token_size, bool) or not isinstance(token_size, int) or token_size < 1:
        raise ValueError(f"ddg.{op}: 'token_size' must be a positive int, got {token_size!r}")
    B, D = features.shape
    if D % token_size:
        raise ValueError(f"ddg.{op}: the feature dim {D} of 'features' must be a multiple of token_size={token_size}")
    check_tensor(op, "timesteps", timesteps)
    if timesteps.dtype != torch.int64 or timesteps.ndim != 1 or timesteps.device != device:
        raise ValueError(f"ddg.{op}: 'timesteps' must be a 1-D int64 tensor on {device}, "
                         f"got {timesteps.dtype} {tuple(timesteps.shape)} on {timesteps.device}")
    M, tokens = timesteps.shape[0], B * (D // token_size)
    if tokens == 0 or M % tokens:
        raise ValueError(f"ddg.{op}: len(timesteps)={M} must be a positive multiple of B*N = {B}*{D // token_size} "
                         "(one timestep per row of every replica)")
    _floating(op, "noise", noise, 2, dtype, device)
    _shape(op, "noise", noise, (M, token_size), "[M, token_size]")
    T = None
    for name, table in (("sqrt_alpha_bar", sqrt_alpha_bar), ("sqrt_one_minus_alpha_bar", sqrt_one_minus_alpha_bar)):
        _floating(op, name, table, 1, device=device)
        T = table.shape[0] if T is None else T
        _shape(op, name, table, (T,), "one value per timestep, like 'sqrt_alpha_bar'")
    check_number(op, "contraction", contraction)
    check_number(op, "mix", mix)
    if prototypes is not None:
        _floating(op, "prototypes", prototypes, 2, dtype, device)
        _shape(op, "prototypes", prototypes, (B, D), "one prototype per sample, like 'features'")
    if permutation is not None:
        _index(op, "permutation", permutation, B, device)
    for name, t in (("features", features), ("prototypes", prototypes), ("noise", noise)):
        _no_grad_input(op, name, t)
    if not use_kernel(features):
        _check_range(op, "timesteps", timesteps, T)
        if permutation is not None:
            _check_range(op, "permutation", permutation, B)
        return reference.split_token_prepare(features, prototypes, float(contraction), float(mix), permutation,
                                             timesteps, noise, sqrt_alpha_bar, sqrt_one_minus_alpha_bar, token_size)
    return tuple(torch.ops.ddg.split_token_prepare(features, prototypes, float(contraction), permutation, float(mix),
                                                   timesteps, noise, sqrt_alpha_bar, sqrt_one_minus_alpha_bar,
                                                   token_size))


def _check_cond_rows(op: str, x: torch.Tensor, cond_index: Optional[torch.Tensor], **rows: torch.Tensor) -> None:
    """Per-condition [U, W] operands of [M, W] rows x: U = M without cond_index."""
    M, W = x.shape
    if cond_index is not None:
        _index(op, "cond_index", cond_index, M, x.device)
    for name, t in rows.items():
        _floating(op, name, t, 2, x.dtype, x.device)
        if t.shape[1] != W or (cond_index is None and t.shape[0] != M):
            want = f"[U, {W}] rows picked by 'cond_index'" if cond_index is not None else f"[{M}, {W}] like 'x'"
            raise ValueError(f"ddg.{op}: '{name}' must be {want}, got {tuple(t.shape)}")


def adaln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, weight: Optional[torch.Tensor] = None,
                   bias: Optional[torch.Tensor] = None, eps: float = 1e-6,
                   cond_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``LN(x) * (1 + scale) + shift`` over the last dim of [M, W] rows (W up to any size; fp32
    statistics). weight/bias: the LayerNorm's affine parameters [W] (None: not affine).
    shift/scale: [M, W], or [U, W] with ``cond_index`` [M] (row r uses row cond_index[r]); column
    slices of a wider projection are read in place. Differentiable in x, weight, bias, shift, scale.
    """
    op = "adaln_modulate"
    _floating(op, "x", x, 2)
    _check_cond_rows(op, x, cond_index, shift=shift, scale=scale)
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            _floating(op, name, p, 1, x.dtype, x.device)
            _shape(op, name, p, (x.shape[1],), "the LayerNorm's affine parameter")
    check_number(op, "eps", eps)
    if eps <= 0:
        raise ValueError(f"ddg.{op}: 'eps' must be positive, got {eps}")
    if not use_kernel(x):
        if cond_index is not None:
            _check_range(op, "cond_index", cond_index, shift.shape[0])
        return reference.adaln_modulate(x, weight, bias, shift, scale, cond_index, float(eps))
    return torch.ops.ddg.adaln_modulate(x, weight, bias, shift, scale, cond_index, float(eps))[0]


def gated_residual(x: torch.Tensor, gate: torch.Tensor, h: torch.Tensor,
                   cond_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x + gate * h`` on [M, W] rows; gate is [M, W], or [U, W] picked by ``cond_index`` [M]."""
    op = "gated_residual"
    _floating(op, "x", x, 2)
    _floating(op, "h", h, 2, x.dtype, x.device)
    _shape(op, "h", h, tuple(x.shape), "like 'x'")
    _check_cond_rows(op, x, cond_index, gate=gate)
    if not use_kernel(x):
        if cond_index is not None:
            _check_range(op, "cond_index", cond_index, gate.shape[0])
        return reference.gated_residual(x, gate, h, cond_index)
    return torch.ops.ddg.gated_residual(x, gate, h, cond_index)


def diffusion_loss(model_output: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                   loss_coefs: torch.Tensor, x0: Optional[torch.Tensor] = None, *, learned_variance: bool = None,
                   reduction: str = "mean") -> DiffusionLossOutput:
    """Diffusion loss of epsilon-prediction rows (docs/methods/gendd.md §2.8; docs/split_token_kernels.md §5, K5).

    model_output: [M, C] (epsilon; loss = mse) or [M, 2C] (learned variance: [eps_hat, v], IDDPM's
    hybrid loss mse + vb with the stop-gradient on the mean and the discretized-Gaussian NLL at
    t = 0, which needs the clean targets x0 [M0, C], row r reading x0[r % M0]). noise: eps [M, C];
    timesteps: int64 [M]; loss_coefs: ``GaussianDiffusionSchedule.loss_coefs()`` [T, 3].
    ``learned_variance`` defaults to ``model_output.shape[1] == 2 * C``. reduction: 'mean' or 'none'
    (per row). Differentiable in model_output only; results in fp32 (fp64 for fp64).
    """
    op = "diffusion_loss"
    _floating(op, "noise", noise, 2)
    M, C = noise.shape
    _floating(op, "model_output", model_output, 2, noise.dtype, noise.device)
    if learned_variance is None:
        learned_variance = model_output.shape[1] == 2 * C
    width = 2 * C if learned_variance else C
    _shape(op, "model_output", model_output, (M, width),
           "[eps_hat, v] per row" if learned_variance else "eps_hat per row")
    _index(op, "timesteps", timesteps, M, noise.device)
    _floating(op, "loss_coefs", loss_coefs, 2, device=noise.device)
    if loss_coefs.shape[1] != 3 or loss_coefs.shape[0] < 1:
        raise ValueError(f"ddg.{op}: 'loss_coefs' must be [T, 3] (GaussianDiffusionSchedule.loss_coefs()), "
                         f"got {tuple(loss_coefs.shape)}")
    if learned_variance:
        if x0 is None:
            raise ValueError(f"ddg.{op}: learned_variance needs 'x0' (the clean targets, for the t = 0 decoder NLL)")
        _floating(op, "x0", x0, 2, noise.dtype, noise.device)
        if x0.shape[1] != C or x0.shape[0] == 0 or M % x0.shape[0]:
            raise ValueError(f"ddg.{op}: 'x0' must be [M0, {C}] with M = {M} a multiple of M0, got {tuple(x0.shape)}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"ddg.{op}: 'reduction' must be 'mean' or 'none', got {reduction!r}")
    for name, t in (("noise", noise), ("x0", x0)):
        _no_grad_input(op, name, t)
    xs = x0 if learned_variance else None
    if not use_kernel(noise):
        _check_range(op, "timesteps", timesteps, loss_coefs.shape[0])
        loss, mse = reference.diffusion_loss(model_output, noise, timesteps, xs, loss_coefs, learned_variance)
    else:
        loss, mse = torch.ops.ddg.diffusion_loss(model_output, noise, timesteps, xs, loss_coefs, learned_variance)
    if reduction == "mean":
        return DiffusionLossOutput(loss.mean(), mse.mean())
    return DiffusionLossOutput(loss, mse)
