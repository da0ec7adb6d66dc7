"""DomainBed's own outputs: per-run ``results.jsonl`` records its ``collect_results`` script reads, and its results
table (rows = algorithms, columns = test environments + Avg, mean ± SE over trial seeds).

A record is one evaluation of one run (DomainBed writes one per checkpoint): ``args`` (dataset, algorithm,
test_envs, trial_seed, hparams_seed), ``hparams``, ``step`` and accuracies as fractions. DomainBed's
training-domain-validation selection reads ``env{i}_out_acc`` for every environment i (counting up from 0 until a
key is missing, so the test environment's is written too) and ``env{test}_in_acc``; its oracle reads
``env{test}_out_acc``. The training environments' ``in`` accuracies are not written (no selection method reads
them; evaluating them would cost more than all other evaluations together).
"""
from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path
from typing import Dict, List, Sequence

from ..common.tables import markdown_table

ALGORITHMS = {"erm": "ERM", "align": "VL2V", "ddg": "DDG"}


def run_records(rows: Sequence[Dict], *, dataset: str, method: str, test_env: int, env_names: Sequence[str],
                sources: Sequence[int], trial_seed: int, hparams: Dict) -> List[Dict]:
    """One record per evaluation row of a run's log (accuracies in % there, fractions here)."""
    records = []
    for row in rows:
        record = {"args": {"dataset": dataset, "algorithm": ALGORITHMS[method], "test_envs": [test_env],
                           "trial_seed": trial_seed, "hparams_seed": 0},
                  "hparams": dict(hparams), "step": row["run_step"], "loss": row.get("loss")}
        for i in sources:
            record[f"env{i}_out_acc"] = row[f"{env_names[i]}_out_acc"] / 100
        record[f"env{test_env}_out_acc"] = row["test_out_acc"] / 100
        record[f"env{test_env}_in_acc"] = row["test_in_acc"] / 100
        records.append(record)
    return records


def write_run(folder: Path, records: Sequence[Dict]) -> None:
    """``folder/results.jsonl`` (rewritten whole: a resumed run never appends a record twice) and ``done``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "results.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    os.replace(tmp, folder / "results.jsonl")
    (folder / "done").write_text("done\n")


def _mean_se(values: Sequence[float]) -> str:
    """DomainBed's format: mean ± (population std / sqrt(n)), in %."""
    mean = statistics.fmean(values)
    se = statistics.pstdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {se:.1f}"


def domainbed_table(results: Sequence[Dict], test_envs: Sequence[str], rows: Sequence[tuple]) -> Dict:
    """{'header', 'rows', 'markdown'}: for each (label, method, column) of ``rows``, the test accuracy of every test
    environment as mean ± SE over trial seeds and Avg = the mean of those means (DomainBed's collect_results)."""
    header, out = ["algorithm", *test_envs, "Avg"], []
    for label, method, column in rows:
        cells, means = [label], []
        for env in test_envs:
            vals = [r[column] for r in results if r["method"] == method and r["test_env"] == env
                    and r.get(column) is not None]
            if not vals:
                cells.append("-")
                continue
            cells.append(_mean_se(vals))
            means.append(statistics.fmean(vals))
        cells.append(f"{statistics.fmean(means):.1f}" if len(means) == len(test_envs) and means else "-")
        out.append(cells)
    return {"header": header, "rows": out, "markdown": markdown_table(header, out)}
