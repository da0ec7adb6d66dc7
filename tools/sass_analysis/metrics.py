"""Per-kernel figures: registers, spills, access widths and the hot loop's instructions per element.

Elements per hot-loop iteration come from tools/sass_kernels.json (method in docs/cuda_sass.md):
each kernel pattern names the roles of its template arguments (element type `s`, accumulator
`a`, elements per vector pack `vec`) and which accesses count elements: `width` mode counts the
hot path's loads or stores of exactly size(expr) * vec bytes, `per_element` of them per pack of
vec elements; `bytes` mode divides the bytes the hot path loads or stores by size(expr).
"""
import re
from dataclasses import dataclass, field

from . import control_flow as cf
from .listing import template_args

TYPE_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "f64": 8, "i32": 4, "i64": 8}


@dataclass
class HotLoop:
    head: int
    latch: int
    instrs: int
    loads: dict  # access bytes -> count
    stores: dict
    load_bytes: int
    store_bytes: int
    calls: int
    rcp: int  # MUFU.RCP / RCP64H: each division (integer or floating) issues one
    elements: float = None  # per iteration
    in_loop: bool = True  # False: the kernel has no loop moving global memory; the straight path

    @property
    def per_element(self):
        return self.instrs / self.elements if self.elements else None


@dataclass
class KernelReport:
    name: str
    arch: str
    source: str
    regs: int
    stack: int
    local: int
    shared: int
    spill_store_bytes: int
    spill_load_bytes: int
    stl: int
    ldl: int
    loads: dict
    stores: dict
    annotation: dict = None
    traffic_bytes: float = None  # global bytes per element the kernel must move (annotation)
    vec: int = 1
    has_vec: bool = False  # the kernel has a vector-width template argument (vec = 1: misaligned fallback)
    hot: HotLoop = None
    notes: list = field(default_factory=list)

    def wide_fraction(self):
        """Share of the hot path's global bytes moved by 128-bit accesses."""
        h = self.hot
        total = h.load_bytes + h.store_bytes if h else 0
        if not total:
            return None
        return 16 * (h.loads.get(16, 0) + h.stores.get(16, 0)) / total


def _widths(instrs, kind):
    out = {}
    for ins in instrs:
        if cf.global_access(ins) == kind:
            w = cf.access_bytes(ins)
            out[w] = out.get(w, 0) + 1
    return out


def size_expr(expr, sizes):
    """'3a' / 's' / '2s+a' / '12' -> bytes, with sizes = {'s': 2, 'a': 4}."""
    total = 0
    for term in str(expr).replace(" ", "").split("+"):
        m = re.fullmatch(r"(\d*)([a-z]*)", term)
        if not m:
            raise ValueError(f"bad size expression {expr!r}")
        k = int(m.group(1)) if m.group(1) else 1
        total += k * (sizes[m.group(2)] if m.group(2) else 1)
    return total


def find_annotation(name, annotations):
    for entry in annotations:
        if re.search(entry["pattern"], name):
            return entry
    return None


def _roles(name, entry):
    """({'s': bytes, 'a': bytes}, vec) from the template arguments the annotation's `types` name."""
    sizes, vec = {}, 1
    args = template_args(name)
    roles = entry.get("types", [])
    if len(roles) != len(args):
        raise ValueError(f"annotation {entry['pattern']!r} names {len(roles)} template arguments, {name} has {len(args)}")
    for role, arg in zip(roles, args):
        try:
            if role == "vec":
                vec = int(arg)
            elif role in ("s", "a"):
                sizes[role] = TYPE_BYTES[arg]
        except (KeyError, ValueError):
            raise ValueError(f"annotation {entry['pattern']!r}: template argument {arg!r} of {name} "
                             f"is not a {'number' if role == 'vec' else 'known type'}") from None
    return sizes, vec


def _hot_loop(blocks, elements_of):
    loops = cf.find_loops(blocks)
    candidates = []
    for lp in loops:
        path = cf.hot_path(blocks, lp.head, lp.latch, lp.children,
                           lambda b, h=lp.head: cf.branch_target(b.instrs[-1]) == h and b.end > h, elements_of)
        if path is not None:
            candidates.append((lp, path))
    return loops, candidates


def _summary(lp, path, in_loop=True):
    instrs = path.instrs
    return HotLoop(elements=path.elements or None, head=lp.head if lp else instrs[0].addr,
                   latch=lp.latch if lp else instrs[-1].addr, instrs=path.count, loads=_widths(instrs, "load"),
                   stores=_widths(instrs, "store"), load_bytes=path.load_bytes, store_bytes=path.store_bytes,
                   calls=path.calls, rcp=sum(1 for i in instrs if i.opcode.startswith("MUFU.RCP")), in_loop=in_loop)


def element_counter(entry, sizes, vec):
    """instr -> elements it accounts for, per the kernel's annotation (module docstring)."""
    if entry is None:
        return lambda ins: 0
    kind = entry["count"]
    if "bytes" in entry:
        per = size_expr(entry["bytes"], sizes)
        return lambda ins: cf.access_bytes(ins) / per if cf.global_access(ins) == kind else 0
    width = size_expr(entry["width"], sizes) * vec
    share = vec / entry.get("per_element", 1)
    return lambda ins: share if cf.global_access(ins) == kind and cf.access_bytes(ins) == width else 0


def analyse(fn, annotations):
    blocks = cf.basic_blocks(fn.instrs)
    res = fn.resources
    rep = KernelReport(name=fn.name, arch=fn.arch, source=fn.source, regs=res.get("REG"), stack=res.get("STACK"),
                       local=res.get("LOCAL"), shared=res.get("SHARED"), spill_store_bytes=fn.spill_store_bytes,
                       spill_load_bytes=fn.spill_load_bytes,
                       stl=sum(1 for i in fn.instrs if i.base == "STL"),
                       ldl=sum(1 for i in fn.instrs if i.base == "LDL"),
                       loads=_widths(fn.instrs, "load"), stores=_widths(fn.instrs, "store"))
    entry = find_annotation(fn.name, annotations)
    sizes, vec = {}, 1
    if entry:
        try:
            sizes, vec = _roles(fn.name, entry)
        except ValueError as e:
            rep.notes.append(str(e))
            entry = None
    rep.annotation = entry
    rep.vec = vec
    rep.has_vec = bool(entry) and "vec" in entry.get("types", [])
    if entry and "traffic" in entry:
        rep.traffic_bytes = size_expr(entry["traffic"], sizes)

    elements_of = element_counter(entry, sizes, vec)
    loops, candidates = _hot_loop(blocks, elements_of)

    def inside(inner, outer):
        return inner is not outer and outer.head <= inner.head and inner.latch <= outer.latch

    def innermost(items):
        """Loops of `items` with no other loop of `items` inside them."""
        return [(lp, p) for lp, p in items if not any(inside(o, lp) for o, _ in items)]

    # The hot loop: among the innermost loops whose hot path counts elements, the one with the
    # most elements per iteration, then the most global bytes (docs/cuda_sass.md, "Hot loop").
    # Without counted elements (no annotation): the innermost loops that move global memory.
    counting = [c for c in candidates if c[1].elements > 0]
    moving = [c for c in candidates if c[1].load_bytes + c[1].store_bytes > 0]
    pool = innermost(counting) or innermost(moving)
    if pool:
        lp, path = max(pool, key=lambda c: (c[1].elements, c[1].load_bytes + c[1].store_bytes, c[0].size))
        rep.hot = _summary(lp, path)
    elif blocks:
        top = [lp for lp in loops if not any(o is not lp and o.head <= lp.head and lp.latch <= o.latch for o in loops)]
        path = cf.hot_path(blocks, blocks[0].start, blocks[-1].end, top, lambda b: b.instrs[-1].base == "EXIT",
                           elements_of)
        if path is not None:
            rep.hot = _summary(None, path, in_loop=False)
            rep.notes.append("no loop moves global memory: straight path to EXIT")
    if rep.hot is None:
        rep.notes.append("no path found")
    elif entry is None and not rep.notes:
        rep.notes.append("no pattern of the kernels file matches: elements per iteration unknown")
    elif rep.hot.elements is None:
        rep.notes.append("the hot path has none of the accesses the annotation counts")
    return rep
