"""CI entry point of the CUDA emulator: build it, then run every op test file, the ported CUDA tests
and the emulator's self-tests against the emulated csrc/cuda kernels.

    python -m tests.cuda_emu.run [--jobs N] [pytest args...]   (default: tests/ops tests/cuda_emu)

The tests run in N pytest processes (default: 2, or 1 on a one-core machine), each taking every
N-th test (tests/cuda_emu/shard.py) with one intra-op thread; their logs are printed one after the
other. Environment: DDG_EMU_SEED (fiber shuffle seed), MAX_JOBS (compile jobs, default 2). Exit
status: the build's on a build failure, else the first failing shard's. Prints the wall times.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

from .build import DEFAULT_OUT, ROOT


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    args, pytest_args = parser.parse_known_args(argv)
    start = time.perf_counter()
    build = subprocess.run([sys.executable, "-m", "tests.cuda_emu.build", "--quiet"], cwd=ROOT)
    built = time.perf_counter()
    print(f"cuda_emu: build {built - start:.1f} s", flush=True)
    if build.returncode:
        return build.returncode
    env = dict(os.environ, DDG_CUDA_EMULATOR=str(DEFAULT_OUT), DDG_REQUIRE_EXT="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.cuda_emu.shard",
           *(pytest_args or ["tests/ops", "tests/cuda_emu"])]
    with tempfile.TemporaryDirectory() as logs:
        shards = []
        for k in range(args.jobs):
            log = open(os.path.join(logs, f"shard{k}.log"), "w+")
            shard_env = dict(env, DDG_TEST_SHARD=f"{k}/{args.jobs}")
            shards.append((subprocess.Popen(cmd, cwd=ROOT, env=shard_env, stdout=log, stderr=subprocess.STDOUT), log))
        status = 0
        for k, (proc, log) in enumerate(shards):
            code = proc.wait()
            log.seek(0)
            print(f"---------------- cuda_emu: test shard {k}/{args.jobs} (exit {code})", flush=True)
            sys.stdout.write(log.read())
            log.close()
            status = status or code
    print(f"cuda_emu: build {built - start:.1f} s, tests {time.perf_counter() - built:.1f} s "
          f"({args.jobs} processes)", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
