"""CI entry point of the CUDA emulator: build it, then run every op test file, the ported CUDA tests
and the emulator's self-tests against the emulated csrc/cuda kernels.

    python -m tests.cuda_emu.run [pytest args...]      (default: tests/ops tests/cuda_emu)

Environment: DDG_EMU_SEED (fiber shuffle seed), MAX_JOBS (compile jobs, default 2). Exit status
is pytest's (or the build's on a build failure). Prints the build and test wall times.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

from .build import DEFAULT_OUT, ROOT


def main(argv: list[str]) -> int:
    start = time.perf_counter()
    build = subprocess.run([sys.executable, "-m", "tests.cuda_emu.build", "--quiet"], cwd=ROOT)
    built = time.perf_counter()
    print(f"cuda_emu: build {built - start:.1f} s", flush=True)
    if build.returncode:
        return build.returncode
    env = dict(os.environ, DDG_CUDA_EMULATOR=str(DEFAULT_OUT), DDG_REQUIRE_EXT="1")
    args = argv or ["tests/ops", "tests/cuda_emu"]
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=ROOT, env=env)
    print(f"cuda_emu: build {built - start:.1f} s, tests {time.perf_counter() - built:.1f} s", flush=True)
    return tests.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
