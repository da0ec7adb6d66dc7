"""Outputs a user can read: the results table (Markdown + JSON) per test domain and method
(mean +- std over trial seeds, then the average over test domains), a bar chart and image grids (PNG)."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Dict, List, Sequence

import torch

from ..common.tables import markdown_table

COLUMNS = ("selected_acc", "swad_acc", "last_acc")
LABELS = {"selected_acc": "", "swad_acc": " + SWAD", "last_acc": " (last)"}
METHOD_NAMES = {"erm": "ERM", "align": "VL2V align", "ddg": "DDG", "zeroshot": "CLIP zero-shot"}


def _cell(values: List[float]):
    if not values:
        return "-"
    if len(values) == 1:
        return values[0]
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def results_table(results: Sequence[Dict], test_envs: Sequence[str], methods: Sequence[str]) -> Dict:
    """{'header', 'rows', 'markdown'}: one row per test domain and an 'avg' row (the per-seed average over
    test domains, then mean +- std over seeds); columns: each method with training-domain-validation
    selection, + SWAD, and the last step."""
    header, cols = ["test domain"], []
    for m in methods:
        for c in (("acc",) if m == "zeroshot" else COLUMNS):
            if m != "zeroshot" and c == "swad_acc" and not any("swad_acc" in r for r in results if r["method"] == m):
                continue
            cols.append((m, c))
            header.append(METHOD_NAMES.get(m, m) + ("" if m == "zeroshot" else LABELS[c]))
    rows = []
    for env in test_envs:
        row = [env]
        for m, c in cols:
            row.append(_cell([r[c] for r in results if r["method"] == m and r["test_env"] == env
                              and r.get(c) is not None]))
        rows.append(row)
    avg = ["avg"]
    seeds = sorted({r["trial_seed"] for r in results})
    for m, c in cols:
        per_seed = []
        for s in seeds:
            vals = [r[c] for r in results if r["method"] == m and r["trial_seed"] == s and r.get(c) is not None]
            if len(vals) == len(test_envs):
                per_seed.append(sum(vals) / len(vals))
        avg.append(_cell(per_seed))
    rows.append(avg)
    return {"header": header, "rows": rows, "markdown": markdown_table(header, rows)}


def plot_results(path: Path, table: Dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    header, rows = table["header"], table["rows"]
    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 2, 3.5))
    width = 0.8 / max(len(header) - 1, 1)
    for j, name in enumerate(header[1:]):
        vals = [float(str(r[j + 1]).split(" ")[0]) if r[j + 1] != "-" else 0.0 for r in rows]
        ax.bar([i + j * width for i in range(len(rows))], vals, width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], [r[0] for r in rows])
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_grid(path: Path, images: torch.Tensor, nrow: int) -> None:
    """Images in [0, 1], [N, C, H, W], as one PNG grid."""
    from torchvision.utils import save_image

    save_image(images.clamp(0, 1), path, nrow=nrow, padding=1)
