"""What one registry row says about an op: how to build its inputs at any point of the test grid
(dtype, layout, shape, variant), the functional call that runs the kernel and the reference call
it must match, raw-op samples for torch.library.opcheck, fp64 gradcheck samples, bad inputs with
the error each must raise, and the benchmark case that times it (docs/ARCHITECTURE.md, "The op
registry"). The torch.ops.ddg operators a row names in ``schemas`` are its forward op, the backward
op autograd calls, and any helper op only it uses."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

import torch

# Layouts of the grid as ddg_ops.testing.make names them; "transposed" is make's batch_not_outer
# (dims 0 and 1 swapped: dense but not row-major, column-major for [M, W] rows).
LAYOUTS = {"contiguous": "contiguous", "channels_last": "channels_last", "sliced": "sliced",
           "transposed": "batch_not_outer"}
ALL_LAYOUTS = tuple(LAYOUTS)
ROW_LAYOUTS = ("contiguous", "sliced", "transposed")
# Shape classes: odd (tails, widths one past a vector, tiny batches), large (millions of elements;
# the quick grid: about 10^5) and empty.
SIZES = ("odd", "large", "empty")


@dataclass
class Call:
    """One grid point, ready to run: ``run(**inputs)`` is the functional API (the kernel),
    ``reference(**fp64 copies of inputs)`` the oracle; both return a tuple of tensors. Gradients
    are checked for the inputs named in ``differentiable`` through every output the reference
    makes differentiable. ``scales`` widens atol per result ('out0', 'grad_x', ...) where the
    error grows with something other than the result's magnitude."""
    inputs: Dict[str, object]
    differentiable: Tuple[str, ...]
    run: Callable[..., tuple]
    reference: Callable[..., tuple]
    scales: Callable[[Dict[str, object], Sequence[torch.Tensor]], Dict[str, float]] = lambda inputs, grads: {}


@dataclass(frozen=True)
class Sample:
    """One direct call of a torch.ops.ddg operator (for opcheck): ``args`` positional, as the schema."""
    id: str
    op: str
    args: tuple

    @property
    def overload(self):
        return getattr(torch.ops.ddg, self.op).default


@dataclass(frozen=True)
class GradSample:
    """``fn(*inputs())`` differentiable in every fp64 leaf ``inputs()`` returns (fresh leaves per call)."""
    id: str
    fn: Callable[..., object]
    inputs: Callable[[], tuple]


@dataclass(frozen=True)
class BadInput:
    """A call that must raise ``error`` with a message matching ``match`` (a regex) that names the op
    and ``argument``. ``raw`` calls torch.ops.ddg directly (the C++ host checks; needs the
    extension). ``device_assert`` marks an index-range check the CPU kernel raises while it reads,
    where the CUDA kernel's device assert aborts the process instead: (CUDA kernel, assert
    condition), the text the assert prints (tests/cuda_emu/test_device_asserts.py checks it)."""
    argument: str
    call: Callable[[], object]
    error: type
    match: str
    raw: bool = False
    device_assert: Optional[Tuple[str, str]] = None

    @property
    def kernel_only(self) -> bool:
        """Only the CPU kernel raises: on CUDA this call aborts the process."""
        return self.device_assert is not None


def bad(call: Callable[[], object], error: type, match: str, *, raw: bool = False,
        device_assert: Optional[Tuple[str, str]] = None, argument: str = "") -> BadInput:
    """A BadInput for ``argument``, by default the first quoted name in ``match``."""
    quoted = re.search(r"'(\w+)'", match)
    return BadInput(argument or (quoted.group(1) if quoted else ""), call, error, match, raw, device_assert)


def raw_bad(call: Callable[[], object], match: str, *, device_assert: Optional[Tuple[str, str]] = None) -> BadInput:
    """A raw-op BadInput: the C++ checks raise RuntimeError."""
    return bad(call, RuntimeError, match, raw=True, device_assert=device_assert)


@dataclass(frozen=True)
class BenchRef:
    """The op's timing: ``python -m ddg_ops.bench <family>`` (ddg_ops/bench/<family>.py) and the
    kernels of that family's cases that run it."""
    family: str
    kernels: Tuple[str, ...]


@dataclass(frozen=True)
class OpInfo:
    name: str                          # the public function, ddg_ops.<name>
    family: str                        # csrc/*/<family>.*, ddg_ops/<family>.py
    schemas: Tuple[str, ...]           # torch.ops.ddg operators this row runs (forward, backward, helpers)
    function: Callable[..., object]    # the public function
    reference: Callable[..., object]   # its pure-PyTorch reference (ddg_ops.reference)
    shapes: Dict[str, Tuple[tuple, ...]]  # size class -> shapes; "large" is (quick, full)
    layouts: Tuple[str, ...]
    variants: Tuple[str, ...]
    build: Callable[[tuple, torch.dtype, str, str, torch.device], Call]
    opcheck: Callable[[], Iterable[Sample]]
    gradcheck: Callable[[], Iterable[GradSample]]
    bad_inputs: Callable[[], Iterable[BadInput]]
    bench: Optional[BenchRef]
    # Variants run at the large shapes (all would multiply the slowest part of the grid).
    large_variants: Tuple[str, ...] = ()
    # Why gradcheck has no samples (an empty gradcheck needs a reason).
    no_gradcheck: str = ""

    def grid_shapes(self, size: str, quick: bool) -> Tuple[tuple, ...]:
        if size == "large":
            quick_shape, full_shape = self.shapes["large"]
            return (quick_shape if quick else full_shape,)
        return self.shapes.get(size, ())

    def layouts_for(self, shape: tuple, size: str = "odd") -> Tuple[str, ...]:
        """channels_last needs a 4-D tensor, a transposed layout at least 2 dims; an empty tensor has
        no elements to lay out (its strides are checked by the odd shapes), so it runs contiguous."""
        if size == "empty":
            return self.layouts[:1]
        ndim = len(shape)
        return tuple(l for l in self.layouts
                     if not (l == "channels_last" and ndim != 4) and not (l == "transposed" and ndim < 2))

    def variants_for(self, size: str) -> Tuple[str, ...]:
        return (self.large_variants or self.variants[-1:]) if size == "large" else self.variants


def as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def per_sample(batch: int, low: float, high: float, device) -> torch.Tensor:
    return torch.linspace(low, high, batch, device=device)


def randn(shape=(2, 3, 5, 7), dtype=torch.float32, requires_grad=False, channels_last=False) -> torch.Tensor:
    """An opcheck operand: N(0, 1) in ``dtype``, channels-last on request."""
    t = torch.randn(shape, dtype=dtype)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.requires_grad_(requires_grad)


def fp64_leaves(n: int, shape=(2, 3, 4, 5)) -> list:
    return [torch.randn(shape, dtype=torch.float64, requires_grad=True) for _ in range(n)]
