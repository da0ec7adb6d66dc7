"""Self-tests of the CUDA emulator: correct kernels give CUB's and the hardware's bits, and each
planted fault (TempStorage reuse without a barrier, divergent __syncthreads, missing barrier,
stale shared memory, misaligned 16-byte load, partial warp under a full mask) is caught.
The kernels are tests/cuda_emu/selftest_kernels.cu, built into the emulator library."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.cuda_emu.transform import TransformError, transform_source

ROOT = Path(__file__).resolve().parents[2]
BLOCK = 256

emulated = pytest.mark.cuda_emulator


def run(kernel, x, arg=0, block=BLOCK):
    return torch.ops.cuda_emu_selftest.run(kernel, x, arg, block)


# ---------------------------------------------------------------- references of CUB's order

def cub_block_reduce(values, op, block=BLOCK):
    """Thread 0's result of cub::BlockReduce (BLOCK_REDUCE_WARP_REDUCTIONS) over one block."""
    warps = []
    for w in range(0, block, 32):
        v = list(values[w:w + 32])
        offset = 1
        while offset < 32:
            v = [op(v[lane], v[lane + offset]) if lane + offset <= 31 else v[lane] for lane in range(32)]
            offset *= 2
        warps.append(v[0])
    acc = warps[0]
    for w in warps[1:]:
        acc = op(acc, w)
    return acc


def f32_add(a, b):
    return np.float32(np.float32(a) + np.float32(b))


def tree_op(a, b):
    return (a * 1000003 + b * 7 + 1) % 2**64


def _signed(v):
    return v - 2**64 if v >= 2**63 else v


# ---------------------------------------------------------------- positive checks

@emulated
def test_block_sum_has_cubs_bits():
    x = (torch.randn(4 * BLOCK) * torch.logspace(0, 6, 4 * BLOCK)).float()
    got = run("block_sum", x)[:4]
    for b in range(4):
        vals = x[b * BLOCK:(b + 1) * BLOCK].numpy()
        expected = cub_block_reduce(vals, f32_add)
        sequential = np.float32(0)
        for v in vals:
            sequential = f32_add(sequential, v)
        assert got[b].item() == float(expected), b
        # The data is chosen so that the order matters: the check can tell CUB's order from another.
        if b == 0:
            assert float(sequential) != float(expected)


@emulated
def test_block_reduce_follows_cubs_tree():
    x = torch.randint(0, 1000, (2 * BLOCK,), dtype=torch.int64)
    got = run("tree_order", x, block=BLOCK)
    for b in range(2):
        vals = [int(v) for v in x[b * BLOCK:(b + 1) * BLOCK]]
        assert got[b].item() == _signed(cub_block_reduce(vals, tree_op))


@emulated
def test_block_reduce_result_is_poison_outside_thread_0():
    x = torch.randn(2 * BLOCK)
    out = run("block_sum", x, 1).view(2, BLOCK)
    assert torch.isfinite(out[:, 0]).all()
    assert torch.isnan(out[:, 1:]).all()


@emulated
def test_tempstorage_reuse_with_barrier_is_fine():
    x = torch.randn(3 * BLOCK)
    got = run("reduce_twice", x, 1)[:3]
    for b in range(3):
        vals = x[b * BLOCK:(b + 1) * BLOCK].numpy()
        a = cub_block_reduce(vals, f32_add)
        c = cub_block_reduce((2 * vals).astype(np.float32), f32_add)
        assert got[b].item() == float(f32_add(a, c))


@emulated
def test_correct_barriers_and_shared_memory():
    x = torch.randn(2 * BLOCK)
    torch.testing.assert_close(run("divergent_sync", x, 0), x, rtol=0, atol=0)
    expected = x.view(2, BLOCK).roll(-1, 1).reshape(-1)
    torch.testing.assert_close(run("neighbour", x, 1), expected, rtol=0, atol=0)


@emulated
def test_warp_shuffles_match_hardware_semantics():
    x = torch.randn(2 * BLOCK)
    out = run("shuffles", x).view(-1, 5)
    xs = x.view(-1, 32)
    lane = torch.arange(32)
    down = torch.where(lane + 3 < 32, (lane + 3) % 32, lane)
    up = torch.where(lane >= 2, lane - 2, lane)
    for w in range(xs.shape[0]):
        o = out[w * 32:(w + 1) * 32]
        assert torch.equal(o[:, 0], xs[w, down])
        assert torch.equal(o[:, 1], xs[w, 5].expand(32))
        assert torch.equal(o[:, 2], xs[w, up])
        assert torch.equal(o[:, 3], xs[w, lane ^ 1])
        assert torch.equal(o[:, 4], torch.full((32,), float((xs[w] > 0).sum())))


@emulated
def test_warp_allmerge_gives_every_lane_the_butterfly_bits():
    x = (torch.randn(BLOCK) * torch.logspace(0, 5, BLOCK)).float()
    out = run("warp_allsum", x).view(-1, 32)
    for w in range(out.shape[0]):
        v = [np.float32(t) for t in x[w * 32:(w + 1) * 32].numpy()]
        offset = 16
        while offset:
            v = [f32_add(v[lane ^ offset], v[lane]) if lane & offset else f32_add(v[lane], v[lane ^ offset])
                 for lane in range(32)]
            offset //= 2
        assert torch.equal(out[w], torch.tensor([float(t) for t in v]))
        assert (out[w] == out[w, 0]).all()


# ---------------------------------------------------------------- planted faults

@emulated
def test_tempstorage_reuse_without_barrier_is_caught():
    with pytest.raises(RuntimeError, match=r"race on cub::BlockReduce TempStorage.*\n.*reduce_twice_kernel"):
        run("reduce_twice", torch.randn(2 * BLOCK), 0)


@emulated
@pytest.mark.parametrize("mode,match", [
    (1, r"threads 0-127: wait at __syncthreads .*\n  threads 128-255: returned"),
    (2, r"threads 0, 2, 4, .*wait at __syncthreads \(.*selftest_kernels.cu:\d+\)"),
    (3, r"threads 128-255: returned"),
])
def test_divergent_syncthreads_is_a_deadlock(mode, match):
    with pytest.raises(RuntimeError, match=r"deadlock in kernel divergent_sync_kernel, block \(0,0,0\)") as err:
        run("divergent_sync", torch.randn(BLOCK), mode)
    assert __import__("re").search(match, str(err.value)), str(err.value)


@emulated
def test_missing_barrier_gives_a_wrong_result():
    x = torch.randn(3 * BLOCK)
    got = run("neighbour", x, 0)
    expected = x.view(3, BLOCK).roll(-1, 1).reshape(-1)
    wrong = ~(got == expected)
    assert wrong.sum() > BLOCK // 4 and torch.isnan(got[wrong]).all()


@emulated
def test_shared_memory_is_poisoned_at_every_block_start():
    x = torch.randn(3 * BLOCK)
    out = run("stale_shared", x).view(3, BLOCK)
    assert torch.equal(out[0], x[:BLOCK])
    assert torch.isnan(out[1:]).all()


@emulated
def test_full_mask_shuffle_in_a_partial_warp_is_an_error():
    with pytest.raises(RuntimeError, match=r"__shfl_xor_sync with a full mask in warp 1, which has only 16 threads"):
        run("warp_allsum", torch.randn(48), block=48)


def _subprocess(code):
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@emulated
def test_aligned_pack_load_passes_ubsan():
    x = torch.randn(4 * BLOCK + 4)
    torch.testing.assert_close(run("pack_load", x, 0), x[:4 * BLOCK], rtol=0, atol=0)


@emulated
def test_misaligned_pack_load_is_caught_by_ubsan():
    proc = _subprocess(f"""
        import torch, ddg_ops
        assert ddg_ops.EXTENSION.loaded, ddg_ops.EXTENSION.reason
        torch.ops.cuda_emu_selftest.run("pack_load", torch.randn(4 * {BLOCK} + 4), 1, {BLOCK})
        print("NOT CAUGHT")
    """)
    assert proc.returncode != 0 and "NOT CAUGHT" not in proc.stdout
    assert "misaligned address" in proc.stderr and "16 byte alignment" in proc.stderr, proc.stderr[-2000:]
    assert "selftest_kernels.cu" in proc.stderr


@emulated
def test_device_assert_aborts_with_cudas_message():
    proc = _subprocess(f"""
        import torch, ddg_ops
        x = torch.ones({BLOCK} * 2)
        x[{BLOCK} + 7] = -1
        torch.ops.cuda_emu_selftest.run("assert", x, 0, {BLOCK})
        print("NOT CAUGHT")
    """)
    assert proc.returncode == -6 and "NOT CAUGHT" not in proc.stdout  # SIGABRT
    assert "block: [1,0,0], thread: [7,0,0] Assertion `x[i] >= 0.0f` failed. (kernel assert_kernel)" in proc.stderr


# ---------------------------------------------------------------- the source transform

def test_transform_rewrites_launches():
    src = textwrap.dedent("""\
        k<<<g, b>>>(x);
        ns::kern<T, Pack<T, (N > 2)>>
            <<<grid(n), 256, 0, stream>>>(a,
                                            b);  // k<<<not, a>>>(launch)
        other<<<1, dim3(32, 8), 0>>>();
        const char* s = "x<<<1,1>>>(y)";
    """)
    out = transform_source(src)
    assert out.count("\n") == src.count("\n")
    assert '::cuda_emu::launch(::cuda_emu::LaunchConfig(g, b), "k", k, x);' in out
    assert ('::cuda_emu::launch(::cuda_emu::LaunchConfig(grid(n), 256, 0, stream), "ns::kern<T, Pack<T, (N > 2)>>", '
            'ns::kern<T, Pack<T, (N > 2)>>, a,\n') in out
    assert '::cuda_emu::launch(::cuda_emu::LaunchConfig(1, dim3(32, 8), 0), "other", other)' in out
    assert "k<<<not, a>>>(launch)" in out and '"x<<<1,1>>>(y)"' in out


def test_transform_registers_shared_variables_and_backend():
    src = "__shared__ typename R::TempStorage st;\n__shared__ float buf[4][32];\nTORCH_LIBRARY_IMPL(ddg, CUDA, m) {}\n"
    out = transform_source(src)
    assert "static typename R::TempStorage st; CUDA_EMU_SHARED_REGISTER(st);" in out
    assert "static float buf[4][32]; CUDA_EMU_SHARED_REGISTER(buf);" in out
    assert "TORCH_LIBRARY_IMPL(ddg, CPU, m)" in out
    for bad in ["extern __shared__ float dyn[];", "__shared__ float a, b;", "__shared__ int n = 0;"]:
        with pytest.raises(TransformError):
            transform_source(bad)
