"""Run outputs: the per-epoch CSV log, the loss / accuracy plot and the results table (JSON + Markdown)."""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Dict, Iterable, List, Sequence

COLUMNS = ["stage", "epoch", "step", "loss", "diff", "mse", "vb", "ce", "kd", "train_acc", "lr", "beta2",
           "acc", "acc_sample", "acc_sample_skip", "acc_probe", "epoch_s"]


def write_csv(path: Path, rows: Iterable[Dict]) -> None:
    """All stages' epoch rows in one file (missing values empty); extra keys become extra columns."""
    rows = list(rows)
    extra = sorted({k for r in rows for k in r} - set(COLUMNS))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS + extra, restval="")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: _fmt(v) for k, v in r.items()})


INT_COLUMNS = ("epoch", "step", "seed")


def read_csv(path: Path) -> List[Dict]:
    with open(path, newline="") as f:
        return [{k: _parse(v, k in INT_COLUMNS) for k, v in r.items()} for r in csv.DictReader(f)]


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else v


def _parse(v: str, integer: bool = False):
    if v == "":
        return None
    try:
        return int(v) if integer else float(v)
    except ValueError:
        return v


def plot(path: Path, rows: Sequence[Dict], title: str = "") -> None:
    """Training loss (left) and test accuracies (right) per stage against the epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(dict.fromkeys(r["stage"] for r in rows))
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    for stage in stages:
        rs = [r for r in rows if r["stage"] == stage]
        epochs = [r["epoch"] for r in rs]
        ax_loss.plot(epochs, [_num(r.get("loss")) for r in rs], label=f"{stage} loss")
        if any(_num(r.get("diff")) == _num(r.get("diff")) for r in rs):
            ax_loss.plot(epochs, [_num(r.get("diff")) for r in rs], "--", label=f"{stage} diffusion")
        for key, style in (("acc", "-"), ("acc_probe", "-"), ("acc_sample", "o-"), ("acc_sample_skip", "s--")):
            values = [_num(r.get(key)) for r in rs]
            points = [(e, v) for e, v in zip(epochs, values) if v == v]
            if points:
                ax_acc.plot(*zip(*points), style, label=f"{stage} {key}", markersize=3)
    ax_loss.set(xlabel="epoch", ylabel="training loss", yscale="log")
    ax_acc.set(xlabel="epoch", ylabel="test top-1 (%)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _num(v) -> float:
    return float(v) if isinstance(v, (int, float)) else math.nan
