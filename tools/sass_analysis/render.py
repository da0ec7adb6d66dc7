"""Text, markdown and JSON forms of the kernel reports."""
import json
from dataclasses import asdict

COLUMNS = ["kernel", "arch", "regs", "spill B", "lmem ops", "hot LDG.128/LDG", "hot STG.128/STG", "el/iter",
           "ins/iter", "ins/el", "budget", "rcp/el", "check"]


def _ratio(widths):
    return f"{widths.get(16, 0)}/{sum(widths.values())}"


def _num(v, fmt="{:.1f}"):
    return "-" if v is None else fmt.format(v)


def row(rep, budget, problems):
    h = rep.hot
    spill = "-" if rep.spill_store_bytes is None else f"{rep.spill_store_bytes}/{rep.spill_load_bytes}"
    ipe = h.per_element if h else None
    rcp = h.rcp / h.elements if h and h.elements else None
    return [rep.name, rep.arch.replace("sm_", ""), _num(rep.regs, "{}"), spill, str(rep.stl + rep.ldl),
            _ratio(h.loads) if h else "-", _ratio(h.stores) if h else "-",
            _num(h.elements if h else None, "{:g}"), _num(h.instrs if h else None, "{}"), _num(ipe), _num(budget),
            _num(rcp, "{:.2f}"), "-" if problems is None else "FAIL" if problems else "ok"]


def text_table(rows):
    widths = [max(len(str(r[i])) for r in [COLUMNS, *rows]) for i in range(len(COLUMNS))]
    lines = ["  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [COLUMNS, *rows]]
    return "\n".join(lines)


def markdown_table(rows):
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(["---"] + ["--:"] * (len(COLUMNS) - 1)) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def as_json(entries):
    out = []
    for rep, budget, problems in entries:
        d = asdict(rep)
        d["annotation"] = rep.annotation
        d["instr_budget_per_element"] = budget
        d["wide_fraction"] = rep.wide_fraction()
        if rep.hot:
            d["hot"]["per_element"] = rep.hot.per_element
            d["hot"]["head"] = hex(rep.hot.head)
            d["hot"]["latch"] = hex(rep.hot.latch)
        d["violations"] = problems
        out.append(d)
    return json.dumps(out, indent=1, default=str)
