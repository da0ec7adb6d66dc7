"""GenDD's split-token diffusion head with deduplicated conditioning (docs/methods/gendd.md §3).

The same function as ``SimpleMLPAdaLN`` (MAR / GenDD's head), laid out for speed:

* the conditioning ``y = time(t) + cond_embed(z) + pos(k)`` is assembled from deduplicated
  parts: the time MLP runs once per distinct timestep, ``cond_embed`` once per sample, the
  position table is gathered;
* the four adaLN projections of a depth-3 head (one per block and the final layer) are one
  concatenated Linear ``adaln`` read by a single GEMM and split once;
* LayerNorm + modulation and the gated residual run as the fused ``ddg_ops`` ops, which read
  the adaLN chunks in place and can share one adaLN row among many rows (``cond_index``);
* sampling evaluates the adaLN GEMM only on the distinct conditions of a step.

Checkpoints of the original layout (``SimpleMLPAdaLN``, or a GenDD ``DiffModel`` under the
prefix ``'diffloss.net.'``) load through ``SplitTokenDiffusionHead.from_simple_mlp_adaln``.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ddg_ops import GaussianDiffusionSchedule, adaln_modulate, cfg_combine, gated_residual
from ddg_ops.diffusion_schedule import NOISE_SCHEDULES

from .simple_mlp_adaln import FIXED_VARIANCES, SimpleMLPAdaLN, timestep_embedding

_NAME = "SplitTokenDiffusionHead"
LN_EPS = 1e-6  # every LayerNorm of the head
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

Spacing = Union[int, str, Sequence[int]]


@dataclass(frozen=True)
class SplitTokenHeadConfig:
    """Hyperparameters of a ``SplitTokenDiffusionHead`` (saved as config.json).

    num_tokens: N, tokens per feature (the feature dim is N * token_size).
    cond_dim: D_S, size of the condition vector z.
    token_size: C. width: W. depth: number of adaLN blocks.
    learn_sigma: output [eps, v] (2C channels, learned-range variance, hybrid loss) or eps only.
    num_timesteps, noise_schedule: the training diffusion (``GaussianDiffusionSchedule.named``).
    frequency_embedding_size: size of the timestep sinusoid.
    fixed_variance: sampling variance without learn_sigma, 'large' (beta_t) or 'small' (posterior).
    """
    num_tokens: int
    cond_dim: int
    token_size: int = 64
    width: int = 1024
    depth: int = 3
    learn_sigma: bool = True
    num_timesteps: int = 1000
    noise_schedule: str = "cosine"
    frequency_embedding_size: int = 256
    fixed_variance: str = "large"

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", int) and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{_NAME}: '{f.name}' must be a positive int, got {value!r}")
        if not isinstance(self.learn_sigma, bool):
            raise TypeError(f"{_NAME}: 'learn_sigma' must be a bool, got {self.learn_sigma!r}")
        if self.num_timesteps < 2:
            raise ValueError(f"{_NAME}: 'num_timesteps' must be at least 2, got {self.num_timesteps}")
        if self.noise_schedule not in NOISE_SCHEDULES:
            raise ValueError(f"{_NAME}: 'noise_schedule' must be one of {NOISE_SCHEDULES}, got {self.noise_schedule!r}")
        if self.fixed_variance not in FIXED_VARIANCES:
            raise ValueError(f"{_NAME}: 'fixed_variance' must be one of {FIXED_VARIANCES}, got {self.fixed_variance!r}")

    @property
    def out_channels(self) -> int:
        return 2 * self.token_size if self.learn_sigma else self.token_size

    @property
    def feature_dim(self) -> int:
        return self.num_tokens * self.token_size

    @property
    def adaln_chunks(self) -> int:
        """shift, scale, gate per block, then the final layer's shift, scale."""
        return 3 * self.depth + 2

    def to_dict(self) -> dict:
        return asdict(self)


class SplitTokenBlock(nn.Module):
    """LN (affine) + adaLN modulation, Linear -> SiLU -> Linear, gated residual; the modulation
    comes from outside (a slice of the head's concatenated adaLN projection)."""

    def __init__(self, width: int):
        super().__init__()
        # Holds the LayerNorm's affine parameters; the normalisation itself runs in adaln_modulate.
        self.norm = nn.LayerNorm(width, eps=LN_EPS)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, hidden: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, gate: torch.Tensor,
                cond_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = adaln_modulate(hidden, shift, scale, self.norm.weight, self.norm.bias, LN_EPS, cond_index)
        return gated_residual(hidden, gate, self.fc2(F.silu(self.fc1(h))), cond_index)


def _check_index_range(name: str, t: torch.Tensor, end: int) -> None:
    """Every entry of ``t`` in [0, end). On CPU an eager check with the offending values; on an accelerator or
    under torch.compile an asynchronous device assert (no host sync in the training step)."""
    if t.numel() == 0:
        return
    if t.device.type == "cpu" and not torch.compiler.is_compiling():
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= end:
            raise ValueError(f"{_NAME}.forward: '{name}' must lie in [0, {end}), got values in [{lo}, {hi}]")
        return
    torch._assert_async(((t >= 0) & (t < end)).all(), f"{_NAME}.forward: '{name}' out of [0, {end})")


class SplitTokenDiffusionHead(nn.Module):
    """Split-token diffusion head of GenDD: predicts eps (and the variance interpolation v) of
    noised C-dim tokens x_t, conditioned on (timestep, per-sample condition z, token position k).

    Parameters (the fused layout): ``input_proj`` Linear(C, W); ``time_mlp`` Linear(F, W), SiLU,
    Linear(W, W); ``cond_embed`` Linear(D_S, W); ``pos_embed`` Embedding(N, W); ``blocks[i]`` with
    ``norm`` (LN affine, eps 1e-6), ``fc1``, ``fc2``; ``adaln`` Linear(W, (3 depth + 2) W) whose output
    chunks of width W are [block0 shift, scale, gate, block1 shift, scale, gate, ..., final shift,
    scale]; ``final_linear`` Linear(W, 2C or C) after a LayerNorm without affine.
    The constructor takes the fields of ``SplitTokenHeadConfig``; ``self.config`` holds them.
    """

    def __init__(self, num_tokens: int, cond_dim: int, token_size: int = 64, width: int = 1024, depth: int = 3,
                 learn_sigma: bool = True, num_timesteps: int = 1000, noise_schedule: str = "cosine",
                 frequency_embedding_size: int = 256, fixed_variance: str = "large"):
        super().__init__()
        cfg = SplitTokenHeadConfig(num_tokens, cond_dim, token_size, width, depth, learn_sigma, num_timesteps,
                                   noise_schedule, frequency_embedding_size, fixed_variance)
        self.config = cfg
        self.schedule = GaussianDiffusionSchedule.named(noise_schedule, num_timesteps)
        self.input_proj = nn.Linear(token_size, width)
        self.time_mlp = nn.Sequential(nn.Linear(frequency_embedding_size, width), nn.SiLU(), nn.Linear(width, width))
        self.cond_embed = nn.Linear(cond_dim, width)
        self.pos_embed = nn.Embedding(num_tokens, width)
        self.blocks = nn.ModuleList(SplitTokenBlock(width) for _ in range(depth))
        self.adaln = nn.Linear(width, cfg.adaln_chunks * width)
        self.final_linear = nn.Linear(width, cfg.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """As the original head: xavier-uniform linears, zero biases, N(0, 0.02) time MLP, zero adaLN
        projection and output layer (output 0 and identity blocks at init)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.time_mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_mlp[2].weight, std=0.02)
        for layer in (self.adaln, self.final_linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def dtype(self) -> torch.dtype:
        return self.input_proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.input_proj.weight.device

    # ------------------------------------------------------------------------------ building blocks

    def time_embedding(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Time MLP of the sinusoid of each timestep: [len(timesteps), W]."""
        return self.time_mlp(timestep_embedding(timesteps, self.config.frequency_embedding_size).to(self.dtype))

    def time_rows(self, timesteps: torch.Tensor) -> torch.Tensor:
        """time_embedding(timesteps) [M, W]; when M exceeds the number of distinct timesteps, the MLP
        runs once on all of them and the rows are gathered (the gather's backward sums per timestep)."""
        T = self.config.num_timesteps
        if timesteps.shape[0] > T:
            return self.time_embedding(torch.arange(T, device=timesteps.device))[timesteps]
        return self.time_embedding(timesteps)

    def adaln_rows(self, y: torch.Tensor) -> torch.Tensor:
        """The concatenated adaLN projection adaln(SiLU(y)) of U conditioning vectors: [U, (3 depth + 2) W]."""
        return self.adaln(F.silu(y))

    def trunk(self, hidden: torch.Tensor, adaln_rows: torch.Tensor,
              cond_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Blocks and final layer on projected inputs ``hidden = input_proj(x_t)`` [M, W].

        adaln_rows: ``adaln_rows(y)`` [U, (3 depth + 2) W] of U distinct conditions; row r uses
        condition ``cond_index[r]`` (int64 [M]; None: U = M, one condition per row).
        Returns [M, 2C] (eps, v) or [M, C].
        """
        W, chunks = self.config.width, self.config.adaln_chunks
        if adaln_rows.ndim != 2 or adaln_rows.shape[1] != chunks * W:
            raise ValueError(f"{_NAME}.trunk: 'adaln_rows' must be [U, {chunks * W}] (adaln_rows(y)), "
                             f"got {tuple(adaln_rows.shape)}")
        # One split: autograd concatenates the chunk gradients once for the single adaLN GEMM.
        mods = torch.split(adaln_rows, W, dim=1)
        for i, block in enumerate(self.blocks):
            hidden = block(hidden, *mods[3 * i:3 * i + 3], cond_index=cond_index)
        hidden = adaln_modulate(hidden, mods[-2], mods[-1], None, None, LN_EPS, cond_index)
        return self.final_linear(hidden)

    # ------------------------------------------------------------------------------ training

    def conditioning(self, timesteps: torch.Tensor, cond: torch.Tensor, sample_index: torch.Tensor,
                     token_index: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """y [M, W] = time(t_r) + (keep_r * z[b_r] W_c^T + b_c) + pos[k_r], with cond_embed's GEMM run on
        the B samples only. A dropped row (keep 0) keeps the bias b_c: it is cond_embed(0)."""
        z = F.linear(cond.to(self.dtype), self.cond_embed.weight)[sample_index]
        if keep is not None:
            z = z * keep.to(z.dtype)[:, None]
        return self.time_rows(timesteps) + (z + self.cond_embed.bias) + self.pos_embed(token_index)

    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor, sample_index: torch.Tensor,
                token_index: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Training forward on M rows: x_t [M, C] noised tokens, timesteps int64 [M] in [0, T),
        cond [B, D_S] per-sample conditions, sample_index / token_index int64 [M] (row -> b, k; see
        ``ddg_ops.split_token_rows``), keep [M] 0/1 (float or bool; 0 drops the condition of the row,
        CFG dropout; None keeps all). Returns [M, 2C] ([eps, v]) or [M, C].
        Equal to ``SimpleMLPAdaLN(x_t, t, keep * cond[sample_index], token_index)`` with converted weights.
        """
        self._check_forward(x_t, timesteps, cond, sample_index, token_index, keep)
        y = self.conditioning(timesteps, cond, sample_index, token_index, keep)
        return self.trunk(self.input_proj(x_t.to(self.dtype)), self.adaln_rows(y))

    def _check_forward(self, x_t, timesteps, cond, sample_index, token_index, keep) -> int:
        cfg = self.config
        for name, t in (("x_t", x_t), ("timesteps", timesteps), ("cond", cond), ("sample_index", sample_index),
                        ("token_index", token_index), ("keep", keep)):
            if t is not None and not isinstance(t, torch.Tensor):
                raise TypeError(f"{_NAME}.forward: '{name}' must be a torch.Tensor, got {type(t).__name__}")
        if x_t.ndim != 2 or x_t.shape[1] != cfg.token_size or not x_t.is_floating_point():
            raise ValueError(f"{_NAME}.forward: 'x_t' must be a float [M, {cfg.token_size}] tensor, "
                             f"got {x_t.dtype} {tuple(x_t.shape)}")
        M = x_t.shape[0]
        if cond.ndim != 2 or cond.shape[1] != cfg.cond_dim or not cond.is_floating_point():
            raise ValueError(f"{_NAME}.forward: 'cond' must be a float [B, {cfg.cond_dim}] tensor (one row per "
                             f"sample), got {cond.dtype} {tuple(cond.shape)}")
        for name, t in (("timesteps", timesteps), ("sample_index", sample_index), ("token_index", token_index)):
            if t.dtype != torch.int64 or tuple(t.shape) != (M,):
                raise ValueError(f"{_NAME}.forward: '{name}' must be an int64 tensor of shape [{M}] (one per row "
                                 f"of 'x_t'), got {t.dtype} {tuple(t.shape)}")
        if keep is not None and (tuple(keep.shape) != (M,) or not (keep.is_floating_point()
                                                                   or keep.dtype == torch.bool)):
            raise ValueError(f"{_NAME}.forward: 'keep' must be a float or bool tensor of shape [{M}], "
                             f"got {keep.dtype} {tuple(keep.shape)}")
        for name, t in (("x_t", x_t), ("timesteps", timesteps), ("cond", cond), ("sample_index", sample_index),
                        ("token_index", token_index), ("keep", keep)):
            if t is not None and t.device != self.device:
                raise ValueError(f"{_NAME}.forward: '{name}' must be on the head's device {self.device}, "
                                 f"got {t.device}")
        # Out of range, a timestep still embeds (the sinusoid takes any t) and a negative index wraps: both
        # would be silent wrong answers.
        for name, t, end in (("timesteps", timesteps, cfg.num_timesteps), ("sample_index", sample_index,
                                                                              cond.shape[0]),
                             ("token_index", token_index, cfg.num_tokens)):
            _check_index_range(name, t, end)
        return M

    # ------------------------------------------------------------------------------ sampling

    def sampling_schedule(self, num_steps: Spacing = 100, skip_clipped_step: bool = False) -> GaussianDiffusionSchedule:
        """The respaced sampling schedule (IDDPM spacing: a step count or a string like '100' / '10,20');
        ``skip_clipped_step`` leaves out t = T-1 (``GaussianDiffusionSchedule.respace``)."""
        return self.schedule.respace(num_steps, skip_last_timestep=skip_clipped_step)

    def _step_tables(self, schedule: GaussianDiffusionSchedule) -> torch.Tensor:
        """[K, 7] per-step coefficients in the head's dtype: 1/sqrt(abar), sqrt(1/abar - 1), the two
        posterior-mean coefficients, log beta, the clipped log posterior variance, the fixed log variance."""
        fixed = schedule.fixed_log_variance(large=self.config.fixed_variance == "large")
        cols = [schedule.sqrt_recip_alphas_cumprod, schedule.sqrt_recipm1_alphas_cumprod,
                schedule.posterior_mean_coef1, schedule.posterior_mean_coef2, schedule.betas.log(),
                schedule.posterior_log_variance_clipped, fixed]
        return torch.stack(cols, 1).to(device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, num_samples: int = 1, cfg_scale: float = 1.0, temperature: float = 1.0,
               num_steps: Spacing = 100, generator: Optional[torch.Generator] = None,
               reduce: str = "mean", skip_clipped_step: bool = False) -> torch.Tensor:
        """Generate features [B, N C] for conditions cond [B, D_S] (GenDD's evaluation sampler).

        Ancestral IDDPM sampling on the respaced schedule (``num_steps``: a count or an IDDPM spacing
        string); the network sees the original timestep indices. Variance: learned range of the
        respaced schedule, or the fixed ``config.fixed_variance``. ``temperature`` scales the noise;
        no clipping. ``skip_clipped_step=True`` starts the chain below the clipped t = T-1 of the cosine
        schedule, whose abar of 2.4e-9 amplifies the head's epsilon error ~1000x (False: GenDD's sampler as
        coded; on the digits preset True gains 2 points of top-1). ``cfg_scale != 1``: eps = eps_u + s (eps_c - eps_u) with unconditional rows
        (z = 0) evaluated on the conditional rows' x; the variance channel is the conditional one.

        Rows are sample-major, (s, b, k) with s the replica. The noise is x_T =
        ``randn(S B N, C, generator)`` (fp32, cast to the head's dtype) and one such draw per step but
        the last: the same draws as ``SimpleMLPAdaLN.sample`` on the matching rows. reduce='mean'
        averages the ``num_samples`` draws -> [B, N C]; 'none' -> [S, B, N C].

        Deduplication: cond_embed once per sample, the time MLP once (one row per step), the adaLN GEMM
        on the B N conditional + N unconditional distinct conditions of a step, input_proj once for
        both copies.
        """
        cfg = self.config
        B = self._check_sample(cond, num_samples, cfg_scale, temperature, reduce)
        N, C, S = cfg.num_tokens, cfg.token_size, num_samples
        M, device = S * B * N, self.device
        schedule = self.sampling_schedule(num_steps, skip_clipped_step)
        coefs = self._step_tables(schedule)
        time_emb = self.time_embedding(schedule.timestep_map.to(device))  # [K, W]: one row per step
        cond_vec = self.cond_embed(cond.to(self.dtype))  # [B, W]
        pos = self.pos_embed.weight  # [N, W]
        guided = cfg_scale != 1.0
        # Row (s, b, k) uses condition b N + k; its unconditional copy uses condition B N + k.
        rows = torch.arange(M, device=device) % (B * N)
        cond_index = torch.cat([rows, B * N + rows % N]) if guided else (rows if S > 1 else None)

        def noise() -> torch.Tensor:  # fp32 draws whatever the dtype: the same noise in fp32 and fp64
            where = generator.device if generator is not None else device
            return torch.randn(M, C, generator=generator, device=where).to(device, self.dtype)

        x = noise()
        for i in reversed(range(schedule.num_timesteps)):
            t_emb = time_emb[i:i + 1]
            # Same summation order as the per-row head: (time + cond) + pos.
            y = ((t_emb + cond_vec)[:, None, :] + pos).reshape(B * N, -1)
            if guided:
                y = torch.cat([y, (t_emb + self.cond_embed.bias) + pos])  # cond_embed(0) is the bias
            hidden = self.input_proj(x)
            out = self.trunk(torch.cat([hidden, hidden]) if guided else hidden, self.adaln_rows(y), cond_index)
            eps = cfg_combine(out[M:, :C], out[:M, :C], cfg_scale) if guided else out[:M, :C]
            recip, recipm1, coef1, coef2, log_beta, log_post, log_fixed = coefs[i].unbind()
            if cfg.learn_sigma:
                frac = (out[:M, C:] + 1) / 2
                log_var = frac * log_beta + (1 - frac) * log_post
            else:
                log_var = log_fixed
            mean = coef1 * (recip * x - recipm1 * eps) + coef2 * x
            x = mean if i == 0 else mean + torch.exp(0.5 * log_var) * noise() * temperature
        features = x.reshape(S, B, N * C)
        return features.mean(0) if reduce == "mean" else features

    def _check_sample(self, cond, num_samples, cfg_scale, temperature, reduce) -> int:
        cfg = self.config
        if not isinstance(cond, torch.Tensor) or cond.ndim != 2 or cond.shape[1] != cfg.cond_dim \
                or not cond.is_floating_point():
            got = f"{cond.dtype} {tuple(cond.shape)}" if isinstance(cond, torch.Tensor) else type(cond).__name__
            raise ValueError(f"{_NAME}.sample: 'cond' must be a float [B, {cfg.cond_dim}] tensor, got {got}")
        if cond.device != self.device:
            raise ValueError(f"{_NAME}.sample: 'cond' must be on the head's device {self.device}, got {cond.device}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"{_NAME}.sample: 'num_samples' must be a positive int, got {num_samples!r}")
        for name, value in (("cfg_scale", cfg_scale), ("temperature", temperature)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{_NAME}.sample: '{name}' must be a number, got {type(value).__name__}")
        if reduce not in ("mean", "none"):
            raise ValueError(f"{_NAME}.sample: 'reduce' must be 'mean' or 'none', got {reduce!r}")
        return cond.shape[0]

    # ------------------------------------------------------------------------------ checkpoints

    def save_pretrained(self, directory: Union[str, Path]) -> None:
        """Write config.json and model.safetensors to ``directory`` (created if needed)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps({"_class_name": _NAME, **self.config.to_dict()}, indent=2))
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                  str(directory / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, directory: Union[str, Path], device: Union[str, torch.device, None] = None,
                        dtype: Optional[torch.dtype] = None) -> "SplitTokenDiffusionHead":
        """Load a head written by ``save_pretrained`` from a local directory (never downloads).
        dtype: default the stored weights' dtype."""
        from safetensors.torch import load_file

        directory = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{_NAME}.from_pretrained: no {name} in {directory} "
                                        "(a directory written by save_pretrained is expected)")
        config = json.loads((directory / CONFIG_NAME).read_text())
        config.pop("_class_name", None)
        state = load_file(str(directory / WEIGHTS_NAME))
        head = cls(**config).to(dtype=dtype or state["input_proj.weight"].dtype)
        head.load_state_dict(state)
        return head.to(device) if device is not None else head

    @classmethod
    def from_simple_mlp_adaln(cls, source: Union[nn.Module, Mapping[str, torch.Tensor]], prefix: str = "",
                              **config) -> "SplitTokenDiffusionHead":
        """A head with the weights of a ``SimpleMLPAdaLN`` (module or state dict in the original layout,
        e.g. a GenDD checkpoint with ``prefix='diffloss.net.'``). The shape-given fields (num_tokens,
        cond_dim, token_size, width, depth, learn_sigma, frequency_embedding_size) are inferred and
        must agree with any given in ``config``; the others (num_timesteps, noise_schedule,
        fixed_variance) default to GenDD's 1000-step cosine schedule. The head takes the weights' dtype."""
        state = source.state_dict() if isinstance(source, nn.Module) else source
        fused = convert_simple_mlp_adaln_state_dict(state, prefix)
        inferred = infer_config(fused)
        clashes = {k: (v, inferred[k]) for k, v in config.items() if k in inferred and inferred[k] != v}
        if clashes:
            raise ValueError(f"{_NAME}.from_simple_mlp_adaln: the given config disagrees with the weights' shapes "
                             f"(given, from shapes): {clashes}")
        head = cls(**{**inferred, **config}).to(dtype=fused["input_proj.weight"].dtype)
        head.load_state_dict(fused)
        return head.to(fused["input_proj.weight"].device)


# ---------------------------------------------------------------------------------- converter

_ADALN = "adaLN_modulation.1"


def _renamed(depth: int) -> List[Tuple[str, str]]:
    """(original name, fused name) of every parameter outside the adaLN projections."""
    pairs = [("input_proj", "input_proj"), ("time_embed.mlp.0", "time_mlp.0"), ("time_embed.mlp.2", "time_mlp.2"),
             ("cond_embed", "cond_embed"), ("final_layer.linear", "final_linear")]
    for i in range(depth):
        pairs += [(f"res_blocks.{i}.in_ln", f"blocks.{i}.norm"), (f"res_blocks.{i}.mlp.0", f"blocks.{i}.fc1"),
                  (f"res_blocks.{i}.mlp.2", f"blocks.{i}.fc2")]
    names = [(f"{a}.{p}", f"{b}.{p}") for a, b in pairs for p in ("weight", "bias")]
    return names + [("pos_embed.weight", "pos_embed.weight")]


def _adaln_sources(depth: int) -> List[str]:
    """The original adaLN linears in the order of the fused ``adaln`` output chunks."""
    return [f"res_blocks.{i}.{_ADALN}" for i in range(depth)] + [f"final_layer.{_ADALN}"]


def _depth(keys, pattern: str) -> int:
    found = {int(m.group(1)) for k in keys for m in [re.match(pattern, k)] if m}
    return max(found) + 1 if found else 0


def _take(state: Mapping[str, torch.Tensor], wanted: List[str], what: str) -> Dict[str, torch.Tensor]:
    missing = [k for k in wanted if k not in state]
    unknown = sorted(set(state) - set(wanted))
    if missing or unknown:
        raise ValueError(f"convert: the {what} state dict does not match the layout: missing {missing}, "
                         f"unexpected {unknown}")
    return {k: state[k] for k in wanted}


def convert_simple_mlp_adaln_state_dict(state_dict: Mapping[str, torch.Tensor],
                                        prefix: str = "") -> Dict[str, torch.Tensor]:
    """Original (``SimpleMLPAdaLN``) state dict -> ``SplitTokenDiffusionHead`` state dict.

    Only keys starting with ``prefix`` are read (e.g. ``'diffloss.net.'`` of a GenDD ``DiffModel``
    checkpoint, whose other entries are ignored); under it every key must belong to the layout.
    Renames: time_embed.mlp.{0,2} -> time_mlp.{0,2}; res_blocks.i.in_ln / mlp.0 / mlp.2 ->
    blocks.i.norm / fc1 / fc2; final_layer.linear -> final_linear. The adaLN linears of the blocks
    (3W outputs each: shift, scale, gate) and of the final layer (2W: shift, scale) are concatenated
    along the output dim, in block order then the final layer, into ``adaln``.
    """
    state = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not state:
        raise ValueError(f"convert_simple_mlp_adaln_state_dict: no key starts with prefix {prefix!r}; "
                         f"first keys: {list(state_dict)[:5]}")
    depth = _depth(state, r"res_blocks\.(\d+)\.")
    sources = _adaln_sources(depth)
    wanted = [a for a, _ in _renamed(depth)] + [f"{s}.{p}" for s in sources for p in ("weight", "bias")]
    state = _take(state, wanted, "SimpleMLPAdaLN")
    fused = {b: state[a] for a, b in _renamed(depth)}
    for p in ("weight", "bias"):
        fused[f"adaln.{p}"] = torch.cat([state[f"{s}.{p}"] for s in sources])
    return fused


def convert_split_token_head_state_dict(state_dict: Mapping[str, torch.Tensor],
                                        prefix: str = "") -> Dict[str, torch.Tensor]:
    """Inverse of ``convert_simple_mlp_adaln_state_dict``: a ``SplitTokenDiffusionHead`` state dict to
    the original layout, every key prefixed with ``prefix``."""
    depth = _depth(state_dict, r"blocks\.(\d+)\.")
    wanted = [b for _, b in _renamed(depth)] + ["adaln.weight", "adaln.bias"]
    state = _take(state_dict, wanted, _NAME)
    width = state["input_proj.weight"].shape[0]
    sizes = [3 * width] * depth + [2 * width]
    original = {a: state[b] for a, b in _renamed(depth)}
    for p in ("weight", "bias"):
        for source, part in zip(_adaln_sources(depth), torch.split(state[f"adaln.{p}"], sizes)):
            original[f"{source}.{p}"] = part
    return {prefix + k: v for k, v in original.items()}


def infer_config(fused_state_dict: Mapping[str, torch.Tensor]) -> dict:
    """The shape-given config fields of a fused state dict."""
    token_size = fused_state_dict["input_proj.weight"].shape[1]
    out = fused_state_dict["final_linear.weight"].shape[0]
    if out not in (token_size, 2 * token_size):
        raise ValueError(f"{_NAME}: the output layer has {out} channels; expected token_size ({token_size}) or "
                         f"2 * token_size ({2 * token_size})")
    return dict(num_tokens=fused_state_dict["pos_embed.weight"].shape[0],
                cond_dim=fused_state_dict["cond_embed.weight"].shape[1], token_size=token_size,
                width=fused_state_dict["input_proj.weight"].shape[0],
                depth=_depth(fused_state_dict, r"blocks\.(\d+)\."), learn_sigma=out == 2 * token_size,
                frequency_embedding_size=fused_state_dict["time_mlp.0.weight"].shape[1])


def simple_mlp_adaln_from_head(head: SplitTokenDiffusionHead) -> SimpleMLPAdaLN:
    """The per-row ``SimpleMLPAdaLN`` computing the same function as ``head`` (for tests and baselines)."""
    cfg = head.config
    simple = SimpleMLPAdaLN(cfg.token_size, cfg.width, cfg.out_channels, cfg.cond_dim, cfg.depth, cfg.num_tokens,
                            cfg.frequency_embedding_size).to(device=head.device, dtype=head.dtype)
    simple.load_state_dict(convert_split_token_head_state_dict(head.state_dict()))
    return simple
