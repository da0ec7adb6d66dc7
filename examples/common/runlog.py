"""The run log every example writes from its main process only: ``log.csv``, ``log.json``, ``log.md`` (a
markdown table), rewritten after every row, and ``curves.png`` (matplotlib; redrawn at most every
``plot_every_s`` seconds, a drawing costs about a second, and on ``close``), and ``results.json`` with the
final metrics."""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import time
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

from .tables import markdown_table, write_json

INT_COLUMNS = ("epoch", "step", "seed")


class RunLog:
    """Rows (dicts) of a run. ``columns`` come first in the files (others follow, sorted); ``panels`` maps a
    plot panel's y label to the columns drawn in it, against ``x``, one line per stage."""

    def __init__(self, out: Path, is_main: bool, columns: Sequence[str] = (), x: str = "step",
                 panels: Optional[Mapping[str, Sequence[str]]] = None, title: str = "", log_y: Sequence[str] = (),
                 plot_every_s: float = 60.0):
        self.out, self.is_main, self.columns, self.x = Path(out), bool(is_main), list(columns), x
        self.panels, self.title, self.log_y = dict(panels or {}), title, set(log_y)
        self.rows: List[Dict] = []
        self.plot_every_s, self._plotted = plot_every_s, None

    def restore(self, rows: Iterable[Dict]) -> None:
        """The rows of a resumed run (from its checkpoint); files are rewritten with the next row."""
        self.rows = [dict(r) for r in rows]

    def add(self, row: Dict) -> None:
        self.rows.append(dict(row))
        self.write()

    def close(self) -> None:
        """The final files, curves included."""
        self.write(plot=True)

    def write(self, plot: bool = False) -> None:
        if not self.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        header = self._header()
        # each file is replaced whole, so that a reader (or a kill) never sees half of it
        with _replaced(self.out / "log.csv") as tmp:
            write_csv(tmp, self.rows, self.columns)
        with _replaced(self.out / "log.json") as tmp:
            write_json(tmp, self.rows)
        with _replaced(self.out / "log.md") as tmp:
            tmp.write_text(markdown_table(header, [[_md(r.get(k)) for k in header] for r in self.rows]))
        due = self._plotted is None or time.monotonic() - self._plotted >= self.plot_every_s
        if self.panels and self.rows and (plot or due):
            self._plotted = time.monotonic()
            plot_curves(self.out / "curves.png", self.rows, self.x, self.panels, self.title, self.log_y)

    def _header(self) -> List[str]:
        present = {k for r in self.rows for k in r}
        return [c for c in self.columns if c in present] + sorted(present - set(self.columns))


@contextlib.contextmanager
def _replaced(path: Path):
    tmp = path.with_name(path.name + ".tmp")
    yield tmp
    os.replace(tmp, path)


def write_results(out: Path, results: Mapping, is_main: bool) -> None:
    """``<out>/results.json`` (main process only)."""
    if is_main:
        Path(out).mkdir(parents=True, exist_ok=True)
        write_json(Path(out) / "results.json", results)


def write_csv(path: Path, rows: Sequence[Dict], columns: Sequence[str] = ()) -> None:
    """Rows in one file (missing values empty); keys outside ``columns`` follow them, sorted."""
    present = {k for r in rows for k in r}
    fields = [c for c in columns if c in present] + sorted(present - set(columns))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in r.items()})


def read_csv(path: Path) -> List[Dict]:
    with open(path, newline="") as f:
        return [{k: _parse(v, k in INT_COLUMNS) for k, v in r.items()} for r in csv.DictReader(f)]


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def _parse(v: str, integer: bool):
    if v == "":
        return None
    try:
        return int(v) if integer else float(v)
    except ValueError:
        return v


def _md(v):
    return "" if v is None else (f"{v:.4g}" if isinstance(v, float) else v)  # losses need more than 2 decimals


def plot_curves(path: Path, rows: Sequence[Dict], x: str, panels: Mapping[str, Sequence[str]], title: str = "",
                log_y: Iterable[str] = ()) -> None:
    """One panel per ``panels`` entry; in each, every listed column of every stage against ``x``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log_y = set(log_y)
    stages = list(dict.fromkeys(r.get("stage", "") for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (label, keys) in zip(axes[0], panels.items()):
        for stage in stages:
            rs = [r for r in rows if r.get("stage", "") == stage]
            for key in keys:
                points = [(r[x], _num(r.get(key))) for r in rs if x in r and _num(r.get(key)) == _num(r.get(key))]
                if points:
                    ax.plot(*zip(*points), "o-" if len(points) < 3 else "-", label=f"{stage} {key}", markersize=3)
        ax.set(xlabel=x, ylabel=label)
        if label in log_y and ax.lines:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _num(v) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan
