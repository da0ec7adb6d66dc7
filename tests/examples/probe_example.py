"""A two-stage regression run on examples/common (seconds, not minutes): the harness of the conformance matrix
is tested on it, with bugs the matrix must catch switched on by ``CONFORMANCE_PROBE_BUG``:

* ``shared_seed``: every rank seeds the same stream (the per-rank seeding bug);
* ``fresh_rng``: a resume does not restore the random state;
* ``keep_optimizer``: the stage-2 optimizer is built before resuming into it and gets stage 1's state
  (restored by hand, bypassing the stage rule).

    python tests/examples/probe_example.py --out DIR [--mixed-precision bf16] [--max-steps N] [--resume]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.common import checkpoint  # noqa: E402
from examples.common.cli import add_run_options, run_seeds  # noqa: E402
from examples.common.main_process import on_main  # noqa: E402
from examples.common.runlog import write_results  # noqa: E402
from examples.common.seeding import seed_rank_stream, seed_shared  # noqa: E402

STAGES = (("stage1", 3), ("stage2", 3))  # (name, optimizer steps); a checkpoint after every step
BUG = os.environ.get("CONFORMANCE_PROBE_BUG", "")


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", default="smoke")
    parser.add_argument("--quiet", action="store_true")
    add_run_options(parser)
    args = parser.parse_args(argv)
    from accelerate import Accelerator
    from safetensors.torch import save_file

    acc = Accelerator(cpu=True, mixed_precision=args.mixed_precision)
    seed = run_seeds(args)[0]
    settings = {"seed": seed, "mixed_precision": args.mixed_precision, "bug": BUG}
    root = args.out / "checkpoints"
    ckpt = checkpoint.latest(root, settings, acc.num_processes) if args.resume else None
    products, step = (dict(ckpt.state["products"]), ckpt.step) if ckpt else ({}, 0)
    target = torch.linspace(-1, 1, 8)
    for name, n_steps in STAGES:
        if name in products:
            continue
        seed_shared(seed)
        model = torch.nn.Linear(8, 1)
        if products:
            model.load_state_dict(products[list(products)[-1]])
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        model, opt = acc.prepare(model, opt)
        seed_rank_stream(seed, 0 if BUG == "shared_seed" else acc.process_index)
        done = 0
        if ckpt is not None and ckpt.stage == name:
            checkpoint.load(ckpt, acc, name)
            if BUG == "fresh_rng":
                torch.manual_seed(1234)
            done = ckpt.state["done"]
        elif ckpt is not None and BUG == "keep_optimizer" and ckpt.stage != name:
            acc.load_state(str(ckpt.path / ckpt.stage))
        ckpt = None
        for i in range(done, n_steps):
            x = torch.randn(4, 8)
            with acc.autocast():
                loss = ((model(x).squeeze(-1) - x @ target) ** 2).float().mean()
            acc.backward(loss)
            opt.step()
            opt.zero_grad()
            step += 1
            finished = i + 1 == n_steps
            if finished:
                products[name] = {k: v.detach().clone() for k, v in acc.unwrap_model(model).state_dict().items()}
            checkpoint.save(root, acc, stage=name, step=step, settings=settings,
                            state={"done": i + 1, "products": products})
            if args.max_steps is not None and step >= args.max_steps:
                return None
        acc.free_memory()
    final = products[STAGES[-1][0]]

    def evaluate():
        x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
        pred = x @ final["weight"].t() + final["bias"]
        return {"mse": float(((pred.squeeze(-1) - x @ target) ** 2).mean())}

    metrics = on_main(acc, evaluate)
    write_results(args.out, {"metrics": metrics}, acc.is_main_process)
    if acc.is_main_process:
        (args.out / "export").mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in final.items()}, str(args.out / "export" / "model.safetensors"))
    return metrics


if __name__ == "__main__":
    main()
