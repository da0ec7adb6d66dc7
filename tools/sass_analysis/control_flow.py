"""Basic blocks, loops and the hot path of a SASS function (definitions in docs/cuda_sass.md).

Loops: every backward branch (target address below the branch, not to itself) closes a loop
whose body is the address range [target, branch]; several branches to one target form one loop.
nvcc lays loop bodies out contiguously, so the range is the body. A loop nested in another is a
loop whose range lies inside the other's.

Hot path of a loop: the path from the loop's first block to its closing branch, through the
blocks of the loop that are not inside a nested loop (a nested loop counts as one step that
costs nothing), chosen to process the most elements (the accesses the kernel's annotation
counts, metrics.py), then to move the most global-memory bytes; among those, the one with the
fewest CALLs (nvcc calls subroutines for the rare slow paths of divisions), then the most
instructions (a data-dependent shortcut, such as a merge returning early for an empty partial,
is the rare case).
"""
from dataclasses import dataclass, field

_BLOCK_END = {"BRA", "BRX", "JMP", "JMX", "EXIT", "RET", "KILL"}
_WIDTHS = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}
# Global accesses (LD/ST are generic accesses, which on these kernels reach global memory).
_LOADS = {"LDG", "LD"}
_STORES = {"STG", "ST", "RED", "ATOMG"}


def access_bytes(instr):
    for m in instr.modifiers:
        if m in _WIDTHS:
            return _WIDTHS[m]
    return 4


def global_access(instr):
    """'load' / 'store' / None."""
    if instr.base in _LOADS:
        return "load"
    if instr.base in _STORES:
        return "store"
    return None


def branch_target(instr):
    if instr.base not in ("BRA", "JMP"):
        return None
    tokens = instr.operands.replace(",", " ").split()
    for tok in reversed(tokens):
        if tok.startswith("0x"):
            return int(tok, 16)
    return None


def is_conditional(instr):
    if instr.guard and instr.guard != "@PT":
        return True
    # BRA.U !UP0, 0x..; BRA.DIV UR4, 0x..: an operand besides the target makes it conditional.
    return len(instr.operands.replace(",", " ").split()) > 1


@dataclass
class Block:
    start: int
    instrs: list
    succs: list = field(default_factory=list)  # start addresses

    @property
    def end(self):
        return self.instrs[-1].addr


def basic_blocks(instrs):
    """Blocks in address order; NOPs are dropped (padding, never issued on a path)."""
    instrs = [i for i in instrs if i.base != "NOP"]
    if not instrs:
        return []
    leaders = {instrs[0].addr}
    for k, ins in enumerate(instrs):
        t = branch_target(ins)
        if t is not None:
            leaders.add(t)
        if ins.base in _BLOCK_END and k + 1 < len(instrs):
            leaders.add(instrs[k + 1].addr)
    blocks, cur = [], []
    for ins in instrs:
        if ins.addr in leaders and cur:
            blocks.append(Block(cur[0].addr, cur))
            cur = []
        cur.append(ins)
    if cur:
        blocks.append(Block(cur[0].addr, cur))
    starts = [b.start for b in blocks]
    for k, b in enumerate(blocks):
        last = b.instrs[-1]
        falls = k + 1 < len(blocks)
        t = branch_target(last)
        if last.base in _BLOCK_END:
            if t is not None:
                b.succs.append(t)
            if is_conditional(last) and falls:
                b.succs.append(starts[k + 1])
        elif falls:
            b.succs.append(starts[k + 1])
    return blocks


@dataclass
class Loop:
    head: int  # address of the first instruction
    latch: int  # address of the (last) backward branch
    children: list = field(default_factory=list)

    def contains(self, addr):
        return self.head <= addr <= self.latch

    @property
    def size(self):
        return self.latch - self.head


def find_loops(blocks):
    latches = {}
    for b in blocks:
        last = b.instrs[-1]
        t = branch_target(last)
        if t is not None and t < last.addr:
            latches[t] = max(latches.get(t, t), last.addr)
    loops = [Loop(h, l) for h, l in sorted(latches.items())]
    for lp in loops:
        inner = [o for o in loops if o is not lp and lp.head <= o.head and o.latch <= lp.latch]
        # Direct children only: inner loops not inside another inner loop.
        lp.children = [o for o in inner if not any(p is not o and p.head <= o.head and o.latch <= p.latch
                                                   for p in inner)]
    return loops


@dataclass
class PathCost:
    load_bytes: int = 0
    store_bytes: int = 0
    calls: int = 0
    elements: float = 0
    count: int = 0  # instructions
    chain: tuple = None  # (previous chain, this block's instructions): shared prefixes, no copying

    def key(self):
        return (self.elements, self.load_bytes + self.store_bytes, -self.calls, self.count)

    @property
    def instrs(self):
        parts, link = [], self.chain
        while link is not None:
            link, block = link
            parts.append(block)
        return [ins for block in reversed(parts) for ins in block]

    def plus(self, block_instrs, elements_of):
        c = PathCost(self.load_bytes, self.store_bytes, self.calls, self.elements, self.count + len(block_instrs),
                     (self.chain, block_instrs))
        for ins in block_instrs:
            c.elements += elements_of(ins)
            kind = global_access(ins)
            if kind == "load":
                c.load_bytes += access_bytes(ins)
            elif kind == "store":
                c.store_bytes += access_bytes(ins)
            elif ins.base == "CALL":
                c.calls += 1
        return c


def hot_path(blocks, region_start, region_end, children, end_at, elements_of=lambda ins: 0):
    """Best path (PathCost) through the blocks starting in [region_start, region_end] from the
    block at region_start to a block satisfying end_at(block); each child loop is one free step.
    elements_of(instr): the elements an instruction accounts for (0 for most)."""
    nodes = {}  # node start -> (instrs, successor starts)
    child_of = {}
    for b in blocks:
        if not region_start <= b.start <= region_end:
            continue
        child = next((c for c in children if c.contains(b.start)), None)
        if child is None:
            nodes[b.start] = ([*b.instrs], list(b.succs), b)
        else:
            child_of[b.start] = child.head
            instrs, succs, _ = nodes.setdefault(child.head, ([], [], None))
            succs.extend(s for s in b.succs if not child.contains(s))
    def node_of(addr):
        return child_of.get(addr, addr)

    best = {region_start: PathCost().plus(nodes[region_start][0], elements_of)} if region_start in nodes else {}
    finish = None
    for start in sorted(nodes):
        if start not in best:
            continue
        instrs, succs, block = nodes[start]
        cur = best[start]
        if block is not None and end_at(block) and (finish is None or cur.key() > finish.key()):
            finish = cur
        for s in succs:
            n = node_of(s)
            if n <= start or n not in nodes:
                continue  # a backward edge or one that leaves the region
            cand = cur.plus(nodes[n][0], elements_of)
            if n not in best or cand.key() > best[n].key():
                best[n] = cand
    return finish
