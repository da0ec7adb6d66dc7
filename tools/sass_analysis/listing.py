"""Parses cuobjdump's -sass and -res-usage listings and ptxas's --resource-usage log."""
import re
import shutil
import subprocess
from dataclasses import dataclass, field

_INSTR = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*;")
_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)")
_ARCH = re.compile(r"(?:code for|arch\s*=)\s*(sm_\d+\w*)")
_RES_FUNCTION = re.compile(r"^\s*Function\s+(\S+?):\s*$")
_RES_FIELD = re.compile(r"(\w+(?:\[\d+\])?):(\d+)")
_PTXAS_PROPS = re.compile(r"Function properties for (\S+)\s*\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores, "
                          r"(\d+) bytes spill loads")


@dataclass
class Instr:
    addr: int
    guard: str  # "" or the predicate guard, e.g. "@!P0"
    opcode: str  # with modifiers, e.g. "LDG.E.128.CONSTANT"
    operands: str

    @property
    def base(self):
        return self.opcode.split(".")[0]

    @property
    def modifiers(self):
        return self.opcode.split(".")[1:]


@dataclass
class Function:
    mangled: str
    arch: str
    instrs: list = field(default_factory=list)
    resources: dict = field(default_factory=dict)  # REG, STACK, LOCAL, SHARED, ... from -res-usage
    spill_store_bytes: int = None  # from ptxas, when the report compiled the source itself
    spill_load_bytes: int = None
    name: str = ""  # demangled and shortened
    source: str = ""


def parse_instr(text, addr):
    guard = ""
    if text.startswith("@"):
        guard, _, text = text.partition(" ")
    opcode, _, operands = text.strip().partition(" ")
    return Instr(addr, guard, opcode, operands.strip())


def parse_sass(text):
    """Functions of a cuobjdump -sass listing, in listing order."""
    functions, arch, current = [], None, None
    for line in text.splitlines():
        m = _INSTR.match(line)
        if m and current is not None:
            current.instrs.append(parse_instr(m.group(2), int(m.group(1), 16)))
            continue
        m = _ARCH.search(line)
        if m:
            arch = m.group(1)
            continue
        m = _FUNCTION.match(line)
        if m:
            current = Function(m.group(1), arch)
            functions.append(current)
    return functions


def parse_res_usage(text):
    """{(arch, mangled): {'REG': n, 'STACK': n, 'LOCAL': n, 'SHARED': n, ...}}."""
    usage, arch, name = {}, None, None
    for line in text.splitlines():
        m = _ARCH.search(line)
        if m:
            arch = m.group(1)
            continue
        m = _RES_FUNCTION.match(line)
        if m:
            name = m.group(1)
            continue
        if name and "REG:" in line:
            usage[(arch, name)] = {k: int(v) for k, v in _RES_FIELD.findall(line)}
            name = None
    return usage


def parse_ptxas_spills(text):
    """{mangled: (spill store bytes, spill load bytes)} from ptxas -v / nvcc --resource-usage output."""
    return {m.group(1): (int(m.group(3)), int(m.group(4))) for m in _PTXAS_PROPS.finditer(text)}


def demangle(names):
    names = list(names)
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    r = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True, text=True)
    out = r.stdout.splitlines()
    if r.returncode != 0 or len(out) != len(names):
        return {n: n for n in names}
    return dict(zip(names, out))


_TYPE_NAMES = {"BFloat16": "bf16", "Half": "f16", "float": "f32", "double": "f64", "long": "i64", "int": "i32"}


def shorten(demangled):
    """'void ddg::cuda::(anonymous namespace)::k<c10::BFloat16, float, 8>(...)' -> 'k<bf16, f32, 8>'."""
    s = demangled.replace("(anonymous namespace)::", "")
    if s.startswith("void "):
        s = s[len("void "):]
    depth = 0
    for i, ch in enumerate(s):  # drop the parameter list: the first '(' outside template brackets
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            s = s[:i]
            break
    s = re.sub(r"\b[A-Za-z_]\w*::", "", s)
    s = re.sub(r"\b(" + "|".join(_TYPE_NAMES) + r")\b", lambda m: _TYPE_NAMES[m.group(1)], s)
    s = re.sub(r"\(int\)|\(bool\)", "", s)
    return s


def template_args(short_name):
    """Top-level template arguments of a shortened name: 'k<bf16, f32, 8>' -> ['bf16', 'f32', '8']."""
    start = short_name.find("<")
    if start < 0:
        return []
    args, depth, cur = [], 0, ""
    for ch in short_name[start + 1:]:
        if ch == "<":
            depth += 1
        elif ch == ">":
            if depth == 0:
                break
            depth -= 1
        if ch == "," and depth == 0:
            args.append(cur.strip())
            cur = ""
        else:
            cur += ch
    args.append(cur.strip())
    return args
