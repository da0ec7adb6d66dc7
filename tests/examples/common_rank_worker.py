"""Run under ``torch.distributed.run`` (gloo, CPU): what each rank of an example run draws and writes with
examples/common: per-rank and shared streams, the run log and results (main process only), ``on_main``, and a
checkpoint of a DDP model round-tripped. Writes ``<out>/rank<r>.pt`` with the draws and checks."""
import os
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402

from examples.common import checkpoint  # noqa: E402
from examples.common.main_process import on_main  # noqa: E402
from examples.common.runlog import RunLog, write_results  # noqa: E402
from examples.common.seeding import rank_generator, seed_rank_stream, seed_shared, shared_generator  # noqa: E402


def main():
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    rank = acc.process_index
    seed_rank_stream(5, rank)
    drawn = {"torch": torch.rand(8), "numpy": np.random.rand(8), "python": [random.random() for _ in range(8)],
             "rank_generator": torch.randn(8, generator=rank_generator(5, rank)),
             "shared_generator": torch.randn(8, generator=shared_generator(5))}
    mine = out / f"files{rank}"  # each rank logs into its own folder: only rank 0's may hold files
    log = RunLog(mine, acc.is_main_process, ["stage", "step"], panels={"loss": ["loss"]})
    log.add({"stage": "s", "step": 1, "loss": 0.5})
    write_results(mine, {"acc": 1.0}, acc.is_main_process)
    ran_on = on_main(acc, lambda: os.environ["RANK"])

    seed_shared(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = acc.prepare(model, optimizer)
    seed_rank_stream(7, rank)  # the model is built from the shared seed, the training draws per rank
    x = torch.randn(4, 3)
    acc.backward(model(x).square().mean())
    optimizer.step()
    g = rank_generator(9, rank)
    g.manual_seed(100 + rank)
    settings = {"lr": 0.1}
    checkpoint.save(out / "ckpt", acc, stage="only", step=1, settings=settings, state={"rows": log.rows},
                    generators={"g": g}, rank_state={"rank": rank})
    after = {"weight": acc.unwrap_model(model).weight.detach().clone(), "exp_avg": [
        s["exp_avg"].clone() for s in optimizer.state_dict()["state"].values()], "torch": torch.rand(4),
        "g": torch.rand(4, generator=g)}
    with torch.no_grad():
        acc.unwrap_model(model).weight.add_(1.0)
    torch.rand(10), g.manual_seed(12345)
    ckpt = checkpoint.latest(out / "ckpt", settings, acc.num_processes)
    rank_state = checkpoint.load(ckpt, acc, "only", {"g": g})
    restored = {"weight": acc.unwrap_model(model).weight.detach().clone(), "exp_avg": [
        s["exp_avg"].clone() for s in optimizer.state_dict()["state"].values()], "torch": torch.rand(4),
        "g": torch.rand(4, generator=g)}
    torch.save({"drawn": drawn, "ran_on": ran_on, "rank_state": rank_state, "after": after, "restored": restored,
                "ckpt_stage": ckpt.stage, "rows": ckpt.state["rows"]}, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
