"""Source transform that turns a CUDA file into C++ for the emulator (cuda_emu.h).

* ``kernel<targs><<<grid, block[, smem[, stream]]>>>(args);`` becomes
  ``::cuda_emu::launch(::cuda_emu::LaunchConfig(grid, block, ...), "kernel<targs>", kernel<targs>, args);``
* ``__shared__ T name[dims];`` becomes ``static T name[dims]; CUDA_EMU_SHARED_REGISTER(name);``, so the
  emulator can poison every shared variable at the start of each block.
* ``TORCH_LIBRARY_IMPL(ns, CUDA, m)`` becomes ``TORCH_LIBRARY_IMPL(ns, CPU, m)``, so the emulated
  kernels serve CPU tensors.
* The emulator header is included first and a ``#line`` directive keeps the original file name and
  line numbers in diagnostics, device asserts and deadlock reports.

The transform works on the text, not on a parse: it knows brackets, strings and comments, which is
all a launch needs. It never edits csrc; the output goes to the build directory.
"""
from __future__ import annotations

import re
from pathlib import Path

_IMPL = re.compile(r"TORCH_LIBRARY_IMPL\(\s*(\w+)\s*,\s*CUDA\s*,")
_OPEN = {"(": ")", "[": "]", "{": "}"}
_CLOSE = {v: k for k, v in _OPEN.items()}


class TransformError(ValueError):
    pass


def _line_of(src: str, pos: int) -> int:
    return src.count("\n", 0, pos) + 1


def _code_mask(src: str) -> list[bool]:
    """True for characters that are code (not inside a comment, string or char literal)."""
    mask = [True] * len(src)
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
        elif src.startswith("/*", i):
            j = src.find("*/", i + 2)
            j = n if j < 0 else j + 2
        elif c in "\"'":
            j = i + 1
            while j < n and src[j] != c:
                j += 2 if src[j] == "\\" else 1
            j += 1
        else:
            i += 1
            continue
        for k in range(i, min(j, n)):
            mask[k] = False
        i = j
    return mask


def _kernel_start(src: str, mask: list[bool], end: int) -> int:
    """Start of the kernel expression (a name, possibly qualified and with template arguments)
    that ends just before `end`."""
    i = end
    while i > 0 and src[i - 1].isspace():
        i -= 1
    while True:
        if i > 0 and src[i - 1] == ">" and mask[i - 1]:
            depth, parens = 0, 0
            while i > 0:
                i -= 1
                c = src[i]
                if not mask[i]:
                    continue
                if c in _CLOSE:
                    parens += 1
                elif c in _OPEN:
                    parens -= 1
                elif parens == 0 and c == ">":
                    depth += 1
                elif parens == 0 and c == "<":
                    depth -= 1
                    if depth == 0:
                        break
            if depth != 0:
                raise TransformError(f"line {_line_of(src, end)}: unbalanced template arguments before <<<")
            while i > 0 and src[i - 1].isspace():
                i -= 1
        j = i
        while j > 0 and (src[j - 1].isalnum() or src[j - 1] == "_"):
            j -= 1
        if j == i:
            raise TransformError(f"line {_line_of(src, end)}: no kernel name before <<<")
        i = j
        k = i
        while k > 0 and src[k - 1].isspace():
            k -= 1
        if k >= 2 and src[k - 2:k] == "::":
            i = k - 2
            while i > 0 and src[i - 1].isspace():
                i -= 1
            if i == 0 or not (src[i - 1].isalnum() or src[i - 1] in "_>"):
                return i  # a leading :: (global namespace)
            continue
        return i


def _balanced_end(src: str, mask: list[bool], start: int, stop_at: str | None = None) -> int:
    """Index just past the bracket opened at `start`, or of `stop_at` at depth 0."""
    stack = []
    i = start
    while i < len(src):
        c = src[i]
        if mask[i]:
            if stop_at and not stack and src.startswith(stop_at, i):
                return i
            if c in _OPEN:
                stack.append(_OPEN[c])
            elif c in _CLOSE:
                if not stack or stack.pop() != c:
                    raise TransformError(f"line {_line_of(src, i)}: unbalanced '{c}'")
                if not stack and stop_at is None:
                    return i + 1
        i += 1
    raise TransformError(f"line {_line_of(src, start)}: unterminated launch")


_SHARED = re.compile(r"\b__shared__\b")
_NAME_BEFORE_DIMS = re.compile(r"([A-Za-z_]\w*)\s*((\[[^\[\]]*\]\s*)*)$")


def _rewrite_shared(src: str) -> str:
    mask = _code_mask(src)
    out, pos = [], 0
    for m in _SHARED.finditer(src):
        if not mask[m.start()]:
            continue
        if re.search(r"\bextern\s*$", src[max(0, m.start() - 20):m.start()]):
            raise TransformError(f"line {_line_of(src, m.start())}: extern __shared__ (dynamic shared memory) is "
                                 "not supported by the emulator")
        end = _balanced_end(src, mask, m.end(), stop_at=";")
        decl = src[m.end():end]
        flat = decl
        while True:  # drop bracketed parts, then a comma means several declarators
            shorter = re.sub(r"<[^<>]*>|\([^()]*\)|\[[^\[\]]*\]", "", flat)
            if shorter == flat:
                break
            flat = shorter
        if "=" in flat or "," in flat:
            raise TransformError(f"line {_line_of(src, m.start())}: one uninitialised variable per __shared__ "
                                 "declaration, please")
        name = _NAME_BEFORE_DIMS.search(decl.strip())
        if not name:
            raise TransformError(f"line {_line_of(src, m.start())}: cannot find the name of a __shared__ variable")
        out.append(src[pos:m.start()])
        out.append(f"static{decl}; CUDA_EMU_SHARED_REGISTER({name.group(1)})")
        pos = end
    out.append(src[pos:])
    return "".join(out)


def transform_source(src: str) -> str:
    """The emulator form of one CUDA source text (shared variables, launches and backend registration)."""
    src = _rewrite_shared(src)
    mask = _code_mask(src)
    out, pos = [], 0
    while True:
        j = src.find("<<<", pos)
        while j >= 0 and not mask[j]:
            j = src.find("<<<", j + 3)
        if j < 0:
            break
        name_start = _kernel_start(src, mask, j)
        name_text = src[name_start:j]
        cfg_end = _balanced_end(src, mask, j + 3, stop_at=">>>")
        config = src[j + 3:cfg_end]
        k = cfg_end + 3
        gap_start = k
        while k < len(src) and src[k].isspace():
            k += 1
        if k >= len(src) or src[k] != "(":
            raise TransformError(f"line {_line_of(src, j)}: expected '(' after >>>")
        args_end = _balanced_end(src, mask, k)
        args = src[k + 1:args_end - 1]
        name = " ".join(name_text.split())
        # Newlines of the removed text go after the call, so later lines keep their numbers.
        dropped = name_text.count("\n") + src[gap_start:k].count("\n")
        call_args = f"{name}, {args}" if args.strip() else name
        out.append(src[pos:name_start])
        out.append(f"::cuda_emu::launch(::cuda_emu::LaunchConfig({config}), \"{name}\", {call_args})" + "\n" * dropped)
        pos = args_end
    out.append(src[pos:])
    return _IMPL.sub(r"TORCH_LIBRARY_IMPL(\1, CPU,", "".join(out))


def transform_file(source: Path, target: Path, header: Path) -> None:
    text = transform_source(source.read_text())
    target.parent.mkdir(parents=True, exist_ok=True)
    new = f'#include "{header}"\n#line 1 "{source}"\n{text}'
    if not target.exists() or target.read_text() != new:  # keep mtimes for ninja when nothing changed
        target.write_text(new)
