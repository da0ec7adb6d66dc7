"""GenDD's split-token diffusion head as a module benchmark (docs/methods/gendd.md §3): one training step
and one sampling call.

Kernels (cases) are GenDD's configurations: ``train_<pair>`` is one GenDD step of the head, the
targets (contraction 0.9, mixup, split, replication x R, noising), the head forward on M = B N R
rows, the IDDPM hybrid loss and ('full') its backward into the head and the student's condition;
``sample_<pair>`` is one evaluation call (n_s = 5 samples averaged, CFG 2, respaced DDPM). Shapes
are (B, D_T, D_S, R, W) for training and (B, D_T, D_S, n_s, steps, W) for sampling; on CUDA B is GenDD's
64 with GenDD's step counts; on CPU the training batch is 8 (the per-row cost is the same) and
sampling runs a few steps at a batch that keeps GenDD's 640 rows per step (the work per step does
not depend on the step count; with few rows per step the GEMMs are weight-bandwidth bound, which
hides the FLOPs removed).

Providers:
  ddg      SplitTokenDiffusionHead + ddg_ops.split_token_prepare / diffusion_loss: deduplicated
           conditioning (time MLP on the distinct timesteps, cond_embed per sample, one adaLN GEMM),
           fused LN + adaLN and gated-residual kernels; sampling also dedups across the n_s replicas
           and the unconditional branch
  eager    the straightforward head (SimpleMLPAdaLN, the original layout, same weights) as GenDD runs
           it: z repeated to every row, time MLP and cond_embed per row, 4 adaLN GEMMs, eager loss
  compile  torch.compile(dynamic=False) of the eager step (training) / of the head's forward (sampling)

Each row's note gives the GEMM GFLOP of one call (torch.utils.flop_counter) and the share of the
CPU time spent in GEMMs (profiler), so the gain can be split between GEMM work removed and the rest.
It times modules of ddg_models, not single ops, so it lives above ddg_ops (docs/ARCHITECTURE.md,
"Layers"); ``python -m benchmarks split_token_head`` runs it with ddg_ops.bench's harness.
"""
from __future__ import annotations

import math
from typing import Callable, List, Sequence, Tuple

import torch
from torch.utils.flop_counter import FlopCounterMode

import ddg_ops
from ddg_models import SplitTokenDiffusionHead
from ddg_models.split_token_head import simple_mlp_adaln_from_head
from ddg_ops import reference
from ddg_ops.diffusion_schedule import GaussianDiffusionSchedule

PROVIDERS = ("ddg", "eager", "compile")
MODES = ("forward", "full")
ORACLE = "eager"
# A whole head's output and dL/dz sum thousands of rows of products with cancellation: providers
# (torch.compile's fused reductions included) differ by ~1e-3 of the largest value in fp32.
TOLERANCE = {torch.float32: 3e-3, torch.bfloat16: 5e-2, torch.float16: 5e-2}
DEFAULT_DTYPES = ("float32",)  # bf16 GEMMs without AMX are slower than fp32 on CPU; pass --dtype to add it
TOKEN = 64
CONTRACTION, CFG_SCALE, NUM_SAMPLES = 0.9, 2.0, 5

# (D_T, D_S, R) of GenDD's per-step shape table.
TRAIN = {"train_cifar_res56_res20": (64, 64, 30), "train_cifar_wrn40_2_wrn16_2": (128, 128, 30),
         "train_cifar_res32x4_res8x4": (256, 256, 30), "train_cifar_vgg13_vgg8": (512, 512, 30),
         "train_imagenet_r34_r18": (512, 512, 10), "train_imagenet_r50_mv1": (2048, 1024, 10)}
# (D_T, D_S, {device: (B, steps)}): CIFAR evaluates with 100 of 1000 steps, ImageNet with 64.
SAMPLE = {"sample_cifar_res56_res20": (64, 64, {"cpu": (64, 10), "cuda": (64, 100)}),
          "sample_imagenet_r34_r18": (512, 512, {"cpu": (8, 8), "cuda": (64, 64)})}
TRAIN_BATCH = {"cpu": 8, "cuda": 64}
WIDTH = 1024
QUICK = [("train_cifar_wrn40_2_wrn16_2", (4, 128, 128, 30, 256)),
         ("sample_cifar_res56_res20", (2, 64, 64, NUM_SAMPLES, 10, 256))]


def kernel_modes(kernel: str) -> Tuple[str, ...]:
    return MODES if kernel.startswith("train") else ("forward",)


def cases(quick: bool, device=None) -> List[Tuple[str, Tuple[int, ...]]]:
    """--quick: one small-width training and sampling case (seconds). The full CPU run (fp32) takes
    about 10-15 min on a 2-core EPYC, most of it torch.compile warm-ups."""
    kind = torch.device(device or "cpu").type
    if quick:
        return list(QUICK)
    train = [(k, (TRAIN_BATCH[kind], dt, ds, r, WIDTH)) for k, (dt, ds, r) in TRAIN.items()]
    sample = [(k, (run[kind][0], dt, ds, NUM_SAMPLES, run[kind][1], WIDTH)) for k, (dt, ds, run) in SAMPLE.items()]
    return train + sample


def min_bytes(kernel: str, shape: Sequence[int], dtype: torch.dtype, mode: str) -> None:
    return None  # GEMM-bound: the rows report GFLOP in the note instead of GB/s


def _randomize(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Non-zero weights everywhere (GenDD's init zeroes the adaLN and output layers, which would
    make the backward trivial): N(0, 1/fan_in) matrices, N(0, 0.1^2) vectors."""
    with torch.no_grad():
        for p in module.parameters():
            std = 1 / math.sqrt(p.shape[1]) if p.ndim == 2 else 0.1
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def _gemm_share(fn: Callable[[], object]) -> float:
    """Share of the self CPU time of one call spent in GEMM ops."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    gemm = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm",
                                                                   "aten::linear", "aten::matmul"))
    return gemm / total if total else float("nan")


class Case:
    """One configuration with fixed random weights and draws shared by all providers."""

    def __init__(self, kernel: str, shape: Sequence[int], dtype: torch.dtype, mode: str, device):
        self.kernel, self.mode, self.device = kernel, mode, torch.device(device)
        self.training = kernel.startswith("train")
        gen = torch.Generator().manual_seed(0)
        B, D_T, D_S = shape[:3]
        W = shape[-1]
        self.B, self.N = B, D_T // TOKEN
        head = SplitTokenDiffusionHead(num_tokens=self.N, cond_dim=D_S, token_size=TOKEN, width=W, depth=3)
        _randomize(head, gen)
        self.head = head.to(device=device, dtype=dtype)
        self.simple = simple_mlp_adaln_from_head(self.head)
        self.cond = torch.randn(B, D_S, generator=gen).to(device, dtype)
        if self.training:
            self._init_training(shape[3], D_T, gen, dtype)
        else:
            self.num_samples, self.steps = shape[3], shape[4]

    # ------------------------------------------------------------------ training step

    def _init_training(self, R: int, D_T: int, gen: torch.Generator, dtype: torch.dtype) -> None:
        B, N, dev = self.B, self.N, self.device
        M = B * N * R
        schedule = GaussianDiffusionSchedule.named("cosine", 1000)
        self.tables = [t.to(dev) for t in schedule.noising_tables()]
        self.loss_coefs = schedule.loss_coefs(dev)
        self.features = torch.randn(B, D_T, generator=gen).to(dev, dtype)
        self.prototypes = torch.randn(B, D_T, generator=gen).to(dev, dtype)
        self.perm = torch.randperm(B, generator=gen).to(dev)
        self.mix = 0.7
        self.t = torch.randint(0, 1000, (M,), generator=gen).to(dev)
        self.noise = torch.randn(M, TOKEN, generator=gen).to(dev, dtype)
        self.keep = (torch.rand(M, generator=gen) >= 0.2).to(dev, dtype)
        self.sample_index, self.token_index = ddg_ops.split_token_rows(B, N, R, dev)
        self.z = self.cond.clone().requires_grad_(self.mode == "full")

    def _mixed_z(self) -> torch.Tensor:
        return self.mix * self.z + (1 - self.mix) * self.z[self.perm]

    def _ddg_loss(self) -> torch.Tensor:
        x_t, x0 = ddg_ops.split_token_prepare(self.features, self.t, self.noise, *self.tables, TOKEN,
                                                 prototypes=self.prototypes, contraction=CONTRACTION,
                                                 permutation=self.perm, mix=self.mix)
        out = self.head(x_t, self.t, self._mixed_z(), self.sample_index, self.token_index, self.keep)
        return ddg_ops.diffusion_loss(out, self.noise, self.t, self.loss_coefs, x0).loss

    def _eager_loss(self) -> torch.Tensor:
        """GenDD's DiffModel.forward_train_stage2 + DiffLoss, step by step."""
        B, N = self.B, self.N
        x0 = (1 - CONTRACTION) * self.features + CONTRACTION * self.prototypes
        x0 = self.mix * x0 + (1 - self.mix) * x0[self.perm]
        R = self.t.shape[0] // (B * N)
        target = x0.reshape(B * N, TOKEN).repeat(R, 1)
        z = self._mixed_z().unsqueeze(1).repeat(1, N, 1).reshape(B * N, -1).repeat(R, 1) * self.keep[:, None]
        chunk_idx = torch.arange(N, device=self.device).repeat(B).repeat(R)
        x_t = self.tables[0][self.t, None] * target + self.tables[1][self.t, None] * self.noise
        out = self.simple(x_t, self.t, z, chunk_idx)
        return reference.diffusion_loss(out, self.noise, self.t, target, self.loss_coefs, True)[0].mean()

    # ------------------------------------------------------------------ sampling call

    def _sample_ddg(self) -> torch.Tensor:
        gen = torch.Generator(self.device).manual_seed(1)
        return self.head.sample(self.cond, self.num_samples, CFG_SCALE, num_steps=self.steps, generator=gen)

    def _sample_eager(self, model) -> torch.Tensor:
        """GenDD's DiffModel.forward_test_stage2: z repeated per sample and token, concatenated with its
        unconditional copy, MAR's sampler, the conditional half averaged over the samples."""
        B, N, S = self.B, self.N, self.num_samples
        z = self.head_cond_rows()
        chunk_idx = torch.arange(N, device=self.device).repeat(S * B)
        z = torch.cat([z, torch.zeros_like(z)])
        chunk_idx = torch.cat([chunk_idx, chunk_idx])
        gen = torch.Generator(self.device).manual_seed(1)
        rows = model.sample(z, chunk_idx, CFG_SCALE, schedule=self.head.sampling_schedule(self.steps), generator=gen)
        return rows[:S * B * N].reshape(S, B, N * TOKEN).mean(0)

    def head_cond_rows(self) -> torch.Tensor:
        S, N = self.num_samples, self.N
        return self.cond.unsqueeze(1).repeat(S, N, 1).reshape(-1, self.cond.shape[1])

    # ------------------------------------------------------------------ framework hooks

    def _call(self, provider: str) -> Callable[[], torch.Tensor]:
        if self.training:
            if provider == "ddg":
                return self._ddg_loss
            if provider == "eager":
                return self._eager_loss
            torch._dynamo.reset()  # dynamic=False: every case compiles afresh
            return torch.compile(self._eager_loss, dynamic=False)
        if provider == "ddg":
            return self._sample_ddg
        if provider == "eager":
            return lambda: self._sample_eager(self.simple)
        torch._dynamo.reset()
        compiled = torch.compile(self.simple, dynamic=False)
        compiled.sample = self.simple.sample.__func__.__get__(compiled)  # MAR's loop around the compiled forward
        return lambda: self._sample_eager(compiled)

    def step(self, provider: str) -> Callable[[], object]:
        fn = self._call(provider)
        if self.mode == "forward":
            return lambda: _no_grad(fn)
        def forward_backward():
            self.release()
            loss = fn()
            loss.backward()
            return loss

        return forward_backward

    def release(self) -> None:
        """Drop the gradients of the previous step (zero_grad(set_to_none=True) of a training loop)."""
        for p in [*self.head.parameters(), *self.simple.parameters(), *([self.z] if self.training else [])]:
            p.grad = None

    def results(self, out) -> List[torch.Tensor]:
        """The loss (and dL/dz in 'full' mode), or the sampled features."""
        return [out.detach()] + ([self.z.grad] if self.training and self.mode == "full" else [])

    def note(self, provider: str) -> str:
        if provider == "compile":
            return ""  # flop counting and profiling would trace/compile again; see the eager row
        step = self.step(provider)
        with FlopCounterMode(display=False) as counter:
            step()
        gemm = sum(v for op, v in counter.get_flop_counts()["Global"].items()
                   if getattr(op, "__name__", str(op)).split(".")[0] in ("mm", "addmm", "bmm"))
        if self.device.type != "cpu":
            return f"gemm {gemm / 1e9:.1f} GFLOP"
        return f"gemm {gemm / 1e9:.1f} GFLOP, {100 * _gemm_share(step):.0f}% of CPU time in GEMMs"


def _no_grad(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return fn()

