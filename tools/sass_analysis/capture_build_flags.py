"""Runs a checkout's setup.py far enough to learn the nvcc command line of its CUDA sources.

Usage (cwd = a sandbox copy of the checkout): python capture_build_flags.py OUT.json BUILD_DIR

torch's BuildExtension assembles the nvcc flags (setup.py's own flags, torch's include paths
and macros, COMMON_NVCC_FLAGS, the arch flags) and hands them to
_write_ninja_file_and_compile_objects; replacing that function records them and stops the
build before anything is compiled.
"""
import json
import os
import runpy
import shlex
import sys

import torch.utils.cpp_extension as cpp_extension


def main():
    out, build_dir = sys.argv[1], sys.argv[2]

    def record(**kwargs):
        # A setup.py may compile some C++ sources in a call of their own first (ddg's compiles the
        # SIMD kernel files apart from the rest): only the call that carries the .cu files counts.
        if not any(str(s).endswith(".cu") for s in kwargs["sources"]):
            return
        # The flag lists arrive shell-quoted for the ninja file; unquote them to argv form.
        def argv(flags):
            return shlex.split(" ".join(flags or []))

        with open(out, "w") as f:
            json.dump({"sources": [os.path.relpath(s) for s in kwargs["sources"]],
                       "cuda_cflags": argv(kwargs["cuda_cflags"]),
                       "cuda_post_cflags": argv(kwargs["cuda_post_cflags"])}, f, indent=1)
        raise SystemExit(0)

    cpp_extension._write_ninja_file_and_compile_objects = record
    sys.argv = ["setup.py", "build_ext", "--build-temp", os.path.join(build_dir, "temp"),
                "--build-lib", os.path.join(build_dir, "lib")]
    runpy.run_path("setup.py", run_name="__main__")
    raise SystemExit("setup.py finished without compiling a CUDA source: is the CUDA build enabled?")


if __name__ == "__main__":
    main()
