"""Result tables: Markdown for the console and README, JSON for machines."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """Floats print with two decimals (accuracies in %); everything else with str()."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _cell(c) -> str:
    return f"{c:.2f}" if isinstance(c, float) else str(c)


def write_json(path: Path, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, default=str))
