"""Without the extension (DDG_DISABLE_EXT=1) the ops give the kernel path's results; a
stale or missing build is reported, and DDG_REQUIRE_EXT=1 turns that into an error."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import ddg_ops
from ddg_ops import _ext

pytestmark = pytest.mark.requires_ext

_SCRIPT = textwrap.dedent("""
    import sys, torch, ddg_ops
    from tests.ops.test_fallback import run_all
    assert not ddg_ops.HAS_EXT, ddg_ops.EXTENSION
    torch.save(run_all(**torch.load(sys.argv[1])), sys.argv[2])
""")


def run_all(x, u, c, f, xt):
    leaves = [t.clone().requires_grad_() for t in (x, u, c)]
    results = {
        "combine": ddg_ops.cfg_combine(leaves[1], leaves[2], 7.5, 0.6),
        "ddim": ddg_ops.cfg_step(*leaves, 7.5, update="ddim_epsilon", coef_t=0.3, coef_next=0.5, rescale=0.2),
        "euler": ddg_ops.cfg_step(*leaves, torch.tensor([1.0, 4.0]), update="euler", coef_t=0.8, coef_next=0.6),
    }
    dmd = ddg_ops.dmd_grad(leaves[0], u, c, f, 3.5, prediction="epsilon", x_t=xt, alpha_bar=0.4)
    bn = ddg_ops.bn_stats_loss(leaves[1].contiguous(memory_format=torch.channels_last), f[0, :, 0, 0],
                               xt[0, :, 0, 0].abs(), form="unsquared", weight=0.5)
    split = _split_token_ops(*leaves, f, xt)
    total = sum(r.square().sum() for r in results.values()) + dmd.loss + bn.loss
    total = total + 0.01 * (split["adaln"].square().sum() + split["gated"].square().sum()) + split["diff_loss"]
    results.update(bn_loss=bn.loss.detach(), bn_mean=bn.mean.detach(), bn_var=bn.var.detach())
    results.update(dmd_grad=dmd.grad, dmd_denom=dmd.denom, dmd_loss=dmd.loss.detach())
    results.update(split)
    results.update({f"grad_{i}": g for i, g in enumerate(torch.autograd.grad(total, leaves))})
    return {k: v.detach() for k, v in results.items()}


def _split_token_ops(x, u, c, f, xt):
    """The split-token ops on [2, 3, 7, 9] inputs viewed as rows: targets of B = 2 features of
    D = 189 (N = 27 tokens of C = 7), adaLN + gated residual on 21 rows of W = 18 with 7 shared
    condition rows (column slices of one projection), the hybrid loss on the 54 target rows."""
    sched = ddg_ops.GaussianDiffusionSchedule.named("cosine")
    sab, s1m = sched.noising_tables()
    t = torch.arange(54) * 37 % 1000
    t[::5] = 0
    x_t, x0 = ddg_ops.split_token_prepare(f.reshape(2, 189), t, xt.reshape(54, 7), sab, s1m, 7,
                                          prototypes=c.detach().reshape(2, 189), contraction=0.9,
                                          permutation=torch.tensor([1, 0]), mix=0.3)
    proj = u.reshape(7, 54)
    ci = torch.arange(21) % 7
    rows = x.reshape(21, 18)
    adaln = ddg_ops.adaln_modulate(rows, proj[:, :18], proj[:, 18:36], f.reshape(-1)[:18] + 1, xt.reshape(-1)[:18],
                                   cond_index=ci)
    gated = ddg_ops.gated_residual(rows, proj[:, 36:], adaln, cond_index=ci)
    # eps_hat near eps: the t = 0 decoder NLL stays away from tiny bin probabilities, where fp32
    # tanh implementations may differ in relative terms.
    model_output = torch.cat([xt.reshape(54, 7) + 0.3 * c.reshape(54, 7), u.reshape(54, 7) * 0.5], 1)
    loss = ddg_ops.diffusion_loss(model_output, xt.reshape(54, 7), t, sched.loss_coefs(), x0)
    return {"x_t": x_t, "x0_tokens": x0, "adaln": adaln, "gated": gated, "diff_loss": loss.loss,
            "diff_mse": loss.mse}


def _run(env_extra, *args, check=True):
    env = {k: v for k, v in os.environ.items() if k != "DDG_REQUIRE_EXT"}
    env.update(env_extra)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return subprocess.run([sys.executable, *args], env=env, cwd=root, capture_output=True, text=True, check=check)


def test_disabled_extension_matches_kernels(tmp_path):
    inputs = {k: torch.randn(2, 3, 7, 9) for k in ("x", "u", "c", "f", "xt")}
    torch.save(inputs, tmp_path / "in.pt")
    _run({"DDG_DISABLE_EXT": "1"}, "-c", _SCRIPT, str(tmp_path / "in.pt"), str(tmp_path / "out.pt"))
    fallback = torch.load(tmp_path / "out.pt")
    kernel = run_all(**inputs)
    assert fallback.keys() == kernel.keys()
    for key in kernel:
        torch.testing.assert_close(fallback[key], kernel[key], atol=2e-5, rtol=2e-5, msg=key)


def test_require_ext_makes_unavailable_extension_an_error():
    proc = _run({"DDG_DISABLE_EXT": "1", "DDG_REQUIRE_EXT": "1"}, "-c", "import ddg_ops", check=False)
    assert proc.returncode != 0 and "DDG_REQUIRE_EXT=1" in proc.stderr


def test_disabled_extension_warns_nothing_and_reports():
    proc = _run({"DDG_DISABLE_EXT": "1"}, "-W", "error", "-c",
                "import ddg_ops; print(ddg_ops.EXTENSION.reason)")
    assert "disabled by DDG_DISABLE_EXT=1" in proc.stdout


def test_stale_build_is_detected(monkeypatch):
    monkeypatch.delenv("DDG_CUDA_EMULATOR", raising=False)  # the check of ddg_ops._C, also under the emulator
    monkeypatch.setattr(_ext, "_read_build_info", lambda: {"torch": "0.0.1"})
    state = _ext._load()
    assert not state.loaded and "stale" in state.reason and torch.__version__ in state.reason


def test_kernels_are_in_use():
    assert ddg_ops.HAS_EXT and "cpu" in ddg_ops.EXTENSION.device_types
    assert ddg_ops._ext.use_kernel(torch.empty(1))
