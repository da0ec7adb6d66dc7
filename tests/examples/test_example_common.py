"""examples/common on one process: the run options of the CLI, per-rank seeds, the checkpoint format (atomic
step folders, latest pointer, keep-N, settings fingerprint, stage keying, owned generators), the run log and
on_main."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.common import checkpoint  # noqa: E402
from examples.common.cli import add_run_options, run_seeds  # noqa: E402
from examples.common.main_process import on_main  # noqa: E402
from examples.common.runlog import RunLog, read_csv, write_results  # noqa: E402
from examples.common.seeding import (RANK_STRIDE, rank_generator, rank_seed, seed_rank_stream,  # noqa: E402
                                     shared_generator)
from examples.common.staged_run import StagedRun, StopRun  # noqa: E402


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator
    return Accelerator(cpu=True)


def parse(*argv):
    parser = argparse.ArgumentParser()
    add_run_options(parser)
    return parser.parse_args(list(argv))


def test_run_options(capsys):
    args = parse()
    assert (args.seed, args.seeds, args.mixed_precision, args.max_steps, args.resume) == (None, None, "no", None,
                                                                                            False)
    assert run_seeds(args) == (0,)
    assert run_seeds(parse("--seed", "3")) == (3,)
    assert run_seeds(parse("--seeds", "0, 1,2")) == (0, 1, 2)
    args = parse("--mixed-precision", "bf16", "--max-steps", "7", "--resume")
    assert (args.mixed_precision, args.max_steps, args.resume) == ("bf16", 7, True)
    for bad, message in ((("--seed", "1", "--seeds", "2,3"), "not allowed with argument"),
                         (("--max-steps", "0"), "expected a positive integer, got 0"),
                         (("--mixed-precision", "fp8"), "invalid choice: 'fp8'")):
        with pytest.raises(SystemExit):
            parse(*bad)
        assert message in capsys.readouterr().err


def test_gendd_cli_has_the_run_options():
    from examples.gendd import train
    args = train.parse_args(["--seeds", "0,1", "--mixed-precision", "bf16", "--max-steps", "5", "--resume"])
    rc = train.build_config(args)
    assert rc.seeds == (0, 1) and rc.mixed_precision == "bf16" and rc.max_steps == 5 and rc.resume
    settings = rc.settings()
    assert "max_steps" not in settings and "resume" not in settings and "out" not in settings
    assert settings["mixed_precision"] == "bf16" and settings["seeds"] == [0, 1]


def test_rank_seeds():
    assert rank_seed(7, 0) == 7 and rank_seed(7, 2) == 7 + 2 * RANK_STRIDE  # rank 0 keeps the base seed
    pairs = {(s, r): rank_seed(s, r) for s in range(50) for r in range(8)}
    assert len(set(pairs.values())) == len(pairs)  # no two (seed, rank) pairs share a stream
    for bad in ((-1, 0), (0, -1), (1.5, 0)):
        with pytest.raises(ValueError, match="rank_seed"):
            rank_seed(*bad)
    a, b = torch.rand(5, generator=rank_generator(3, 0)), torch.rand(5, generator=rank_generator(3, 1))
    assert not torch.equal(a, b)
    assert torch.equal(torch.rand(5, generator=shared_generator(3)), torch.rand(5, generator=shared_generator(3)))
    seed_rank_stream(3, 1)
    first = torch.rand(3)
    seed_rank_stream(3, 1)
    assert torch.equal(first, torch.rand(3))


def _save(root, acc, step, stage="s", settings=None, keep=2, g=None):
    return checkpoint.save(root, acc, stage=stage, step=step, settings=settings or {"lr": 1.0}, keep=keep,
                           state={"step": step}, generators={"g": g} if g is not None else None,
                           rank_state={"at": step})


def test_checkpoint_folders_pointer_and_keep(tmp_path, accelerator):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    try:
        for step in (1, 2, 3):
            _save(tmp_path, accelerator, step)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["history.jsonl", "latest", "step-00000002",
                                                              "step-00000003"]
        assert checkpoint.history(tmp_path) == [{"step": s, "stage": "s"} for s in (1, 2, 3)]  # deleted ones too
        assert (tmp_path / "latest").read_text() == "step-00000003"
        files = {p.name for p in (tmp_path / "step-00000003").iterdir()}
        assert files == {"s", "rng-rank0.pt", "state.pt", "meta.json"}
        meta = json.loads((tmp_path / "step-00000003" / "meta.json").read_text())
        assert meta["stage"] == "s" and meta["step"] == 3 and meta["settings"] == {"lr": 1.0}
        ckpt = checkpoint.latest(tmp_path, {"lr": 1.0})
        assert (ckpt.stage, ckpt.step, ckpt.state) == ("s", 3, {"step": 3})
        assert checkpoint.latest(tmp_path / "none", {"lr": 1.0}) is None
        with pytest.raises(SystemExit, match=r"other settings \(lr: checkpoint 1.0, now 2.0\)"):
            checkpoint.latest(tmp_path, {"lr": 2.0})
        with pytest.raises(SystemExit, match="written by 1 processes, this run has 2"):
            checkpoint.latest(tmp_path, {"lr": 1.0}, num_processes=2)
        with pytest.raises(ValueError, match="keep must be >= 1"):
            _save(tmp_path, accelerator, 4, keep=0)
        _save(tmp_path, accelerator, 1)  # a run started afresh in this folder: its timeline replaces the old one
        assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000001"]
        assert checkpoint.history(tmp_path) == [{"step": 1, "stage": "s"}]
        assert checkpoint.latest(tmp_path, {"lr": 1.0}).step == 1
    finally:
        accelerator.free_memory()


def test_checkpoint_stage_keys_and_generators(tmp_path, accelerator):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    try:
        model(torch.ones(1, 2)).sum().backward()
        optimizer.step()
        g = torch.Generator().manual_seed(5)
        _save(tmp_path, accelerator, 1, stage="stage1", g=g)
        expected = (torch.rand(3), torch.rand(3, generator=g), model.weight.detach().clone())
        with torch.no_grad():
            model.weight.zero_()
        g.manual_seed(0)
        ckpt = checkpoint.latest(tmp_path, {"lr": 1.0})
        with pytest.raises(ValueError, match="holds the state of stage 'stage1'; refusing to load it into stage "
                                             "'stage2'"):
            checkpoint.load(ckpt, accelerator, "stage2", {"g": g})
        with pytest.raises(KeyError, match="no state for generator 'h'"):
            checkpoint.load(ckpt, accelerator, "stage1", {"h": g})
        assert checkpoint.load(ckpt, accelerator, "stage1", {"g": g}) == {"at": 1}
        assert torch.equal(torch.rand(3), expected[0]) and torch.equal(torch.rand(3, generator=g), expected[1])
        assert torch.equal(model.weight, expected[2])
    finally:
        accelerator.free_memory()


def test_staged_run_hands_the_checkpoint_to_its_stage(tmp_path, accelerator):
    from types import SimpleNamespace
    rc = SimpleNamespace(out=tmp_path, resume=True, max_steps=None, settings=lambda: {"lr": 1.0})

    def start():
        return StagedRun.start(rc, accelerator, RunLog(tmp_path, accelerator.is_main_process, ["stage", "step"]))

    fresh = start()  # --resume without a checkpoint: from the beginning
    assert (fresh.step, fresh.resume_from, fresh.products) == (0, None, {})
    fresh.finished()
    rows = [{"stage": "stage1", "step": 4}, {"stage": "stage2", "step": 5}]
    checkpoint.save(fresh.ckpt_root, accelerator, stage="stage2", step=5, settings=rc.settings(),
                    state={"rows": rows, "products": {"stage1": {"w": 1}}})
    run = start()
    assert (run.step, run.products, run.log.rows, run.resume_from.stage) == (5, {"stage1": {"w": 1}}, rows, "stage2")
    with pytest.raises(RuntimeError, match="is of stage 'stage2', but stage 'stage3' before it has no product"):
        run.resume_point("stage3")
    run.skip("stage1")  # another stage's skip leaves the checkpoint waiting
    assert run.resume_point("stage2") is run.resume_from is not None
    with pytest.raises(RuntimeError, match="no stage of this run is named 'stage2'"):
        run.finished()  # a checkpoint no stage took: the resume would silently restart
    run.skip("stage2")
    assert run.resume_from is None and run.resume_point("stage3") is None
    run.finished()
    rc.max_steps = 5
    with pytest.raises(StopRun):
        start().stop_if_at_max()
    rc.max_steps = 6
    start().stop_if_at_max()


def test_settings_fingerprint():
    fp = checkpoint.settings_fingerprint
    assert fp({"a": 1, "b": (1, 2)}) == fp({"b": [1, 2], "a": 1}) != fp({"a": 1, "b": [1, 3]})


def test_run_log_and_results(tmp_path, accelerator):
    quiet = RunLog(tmp_path / "other", is_main=False, columns=["stage", "step"], panels={"loss": ["loss"]})
    quiet.add({"stage": "a", "step": 1, "loss": 1.0})
    write_results(tmp_path / "other", {"x": 1}, is_main=False)
    assert not (tmp_path / "other").exists() and len(quiet.rows) == 1
    log = RunLog(tmp_path, is_main=True, columns=["stage", "step"], panels={"loss": ["loss"], "acc": ["acc"]},
                 log_y=("loss",))
    log.add({"stage": "a", "step": 1, "loss": 1.0})
    log.add({"stage": "b", "step": 2, "loss": 0.000123456, "acc": 90.0, "extra": "x"})
    assert read_csv(tmp_path / "log.csv") == [{"stage": "a", "step": 1, "loss": 1.0, "acc": None, "extra": None},
                                             {"stage": "b", "step": 2, "loss": 0.000123456, "acc": 90.0, "extra": "x"}]
    assert json.loads((tmp_path / "log.json").read_text())[1]["acc"] == 90.0
    md = (tmp_path / "log.md").read_text().splitlines()
    assert md[0] == "| stage | step | acc | extra | loss |" and md[3] == "| b | 2 | 90 | x | 0.0001235 |"
    assert (tmp_path / "curves.png").stat().st_size > 0
    write_results(tmp_path, {"acc": 90.0}, is_main=True)
    assert json.loads((tmp_path / "results.json").read_text()) == {"acc": 90.0}
    assert on_main(accelerator, lambda: 41 + 1) == 42
