"""The CUDA tools the report runs, the real build's nvcc flags, and cubin compilation (cached)."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CAPTURE = Path(__file__).with_name("capture_build_flags.py")

# Flags that choose the output kind or the target arch; the report sets its own.
_ARCH_FLAGS = ("-gencode", "--generate-code", "-arch", "--gpu-architecture", "-code", "--gpu-code")
_OUTPUT_FLAGS = ("-c", "--compile", "-o", "--output-file")


class ToolError(RuntimeError):
    pass


def cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    return Path(home)


def nvcc_path():
    nvcc = cuda_home() / "bin" / "nvcc"
    if not nvcc.exists():
        raise ToolError(f"no nvcc at {nvcc}: set CUDA_HOME to a CUDA toolkit")
    return nvcc


def binary_tool(name):
    """cuobjdump / nvdisasm from $CUDA_HOME/bin, else the copy triton ships."""
    candidate = cuda_home() / "bin" / name
    if candidate.exists():
        return candidate
    try:
        import triton  # noqa: F401  (only its location is needed)
        candidate = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if candidate.exists():
            return candidate
    except ImportError:
        pass
    found = shutil.which(name)
    if found:
        return Path(found)
    raise ToolError(f"no {name}: install the CUDA toolkit's binary utilities or triton")


def run(cmd, **kwargs):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    if r.returncode != 0:
        raise ToolError(f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return r


def _digest(*parts):
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


# Files setup.py writes inside a package directory (setup.py: BUILD_INFO).
SETUP_WRITES = {"_build_info.json"}


def _sandbox(root, dest):
    """A copy of the checkout in which setup.py's side effects (its build-info file) land in dest:
    setup.py is copied, every other top-level entry is a symlink, and the Python package
    directories are real directories of symlinks so files setup.py writes into them stay here."""
    dest.mkdir(parents=True, exist_ok=True)
    for entry in root.iterdir():
        target = dest / entry.name
        if entry.name == "setup.py":
            shutil.copy2(entry, target)
        elif entry.is_dir() and (entry / "__init__.py").exists():
            target.mkdir()
            for inner in entry.iterdir():
                if inner.name not in SETUP_WRITES:  # a symlink would carry the write into the real checkout
                    (target / inner.name).symlink_to(inner)
        else:
            target.symlink_to(entry)


def build_flags(root, cache_dir):
    """{'sources': [...], 'cuda_cflags': [...], 'cuda_post_cflags': [...]} as the real build has them."""
    setup_py = root / "setup.py"
    key = _digest(setup_py.read_bytes(), sys.executable, cuda_home(), _torch_version())
    cached = cache_dir / f"flags-{key}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    with tempfile.TemporaryDirectory(prefix="sass-flags-") as tmp:
        sandbox = Path(tmp) / "checkout"
        _sandbox(root, sandbox)
        out = Path(tmp) / "flags.json"
        env = dict(os.environ, DDG_FORCE_CUDA="1", CUDA_HOME=str(cuda_home()), MAX_JOBS="1")
        r = subprocess.run([sys.executable, str(CAPTURE), str(out), str(Path(tmp) / "build")], cwd=sandbox,
                           env=env, capture_output=True, text=True)
        if r.returncode != 0 or not out.exists():
            raise ToolError(f"could not learn the nvcc flags from {setup_py}:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
        flags = json.loads(out.read_text())
    cache_dir.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(flags, indent=1))
    return flags


def _torch_version():
    from importlib import metadata
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return "none"


def _strip(flags, names):
    out, skip = [], False
    for f in flags:
        if skip:
            skip = False
            continue
        if f in names:
            skip = True  # the flag's value follows as its own argument
            continue
        if any(f.startswith(n + "=") for n in names):
            continue
        out.append(f)
    return out


def nvcc_command(flags, source, arch, out):
    """The build's nvcc command for `source`, retargeted to a cubin for one arch (e.g. 'sm_90')."""
    pre = _strip(flags["cuda_cflags"], _ARCH_FLAGS + _OUTPUT_FLAGS)
    post = _strip(flags["cuda_post_cflags"], _ARCH_FLAGS + _OUTPUT_FLAGS)
    return [str(nvcc_path()), *pre, "-cubin", f"-arch={arch}", str(source), "-o", str(out), *post,
            "--resource-usage"]


def source_digest(root, source):
    """Hash of a .cu file and every header under csrc/ (any of them may be included)."""
    parts = [source.read_bytes()]
    for header in sorted((root / "csrc").rglob("*")):
        if header.suffix in (".h", ".cuh", ".hpp", ".inl") and header.is_file():
            parts += [str(header.relative_to(root)), header.read_bytes()]
    return _digest(*parts)


def compile_cubin(root, flags, source, arch, cache_dir):
    """Returns (cubin path, ptxas log), compiling only when the sources or flags changed."""
    cmd_key = _digest(*nvcc_command(flags, "SRC", arch, "OUT"))
    key = _digest(source_digest(root, source), cmd_key)
    cubin = cache_dir / f"{source.stem}-{arch}-{key}.cubin"
    log = cubin.with_suffix(".ptxas.txt")
    if cubin.exists() and log.exists():
        return cubin, log.read_text()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cubin.with_suffix(f".tmp{os.getpid()}")
    r = run(nvcc_command(flags, source, arch, tmp), cwd=root)
    log.write_text(r.stdout + r.stderr)
    os.replace(tmp, cubin)
    return cubin, log.read_text()
