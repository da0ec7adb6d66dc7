"""Checks kernel reports against tools/sass_budgets.json (rationale in docs/cuda_sass.md)."""
import re


def instr_per_byte(model):
    """Thread-instructions the SMs can issue per byte of DRAM traffic at full bandwidth, times the headroom."""
    issue = model["sms"] * model["schedulers_per_sm"] * model["clock_hz"] * 32  # thread-instructions / s
    return issue / model["hbm_bytes_per_s"] * model["headroom"]


def _applies(rule, rep):
    if not re.search(rule.get("pattern", "."), rep.name):
        return False
    cls = (rep.annotation or {}).get("class")
    if "classes" in rule and cls not in rule["classes"]:
        return False
    if "min_vec" in rule and not (rep.has_vec and rep.vec >= rule["min_vec"]):
        return False
    return not (rule.get("skip_fallbacks") and rep.has_vec and rep.vec == 1)


def instruction_budget(rep, budgets):
    """The instructions-per-element budget of a kernel, or None when no rule sets one."""
    for rule in budgets["rules"]:
        if rule.get("max_instr_per_element") and _applies(rule, rep) and rep.traffic_bytes:
            return instr_per_byte(budgets["issue_model"]) * rep.traffic_bytes
    return None


def violations(rep, budgets, opcodes):
    """List of 'rule: what' strings; opcodes = the set of opcode bases in the kernel."""
    out = []
    for rule in budgets["rules"]:
        if not _applies(rule, rep):
            continue
        name = rule["name"]
        if rule.get("require_annotation") and rep.annotation is None:
            out.append(f"{name}: no entry of the kernels file fits this kernel ({'; '.join(rep.notes) or 'no pattern matches'})")
        if "max_spill_bytes" in rule:
            spilled = (rep.spill_store_bytes or 0) + (rep.spill_load_bytes or 0)
            if spilled > rule["max_spill_bytes"]:
                out.append(f"{name}: ptxas spills {rep.spill_store_bytes} B stored, {rep.spill_load_bytes} B loaded")
        if "max_local_accesses" in rule and rep.stl + rep.ldl > rule["max_local_accesses"]:
            out.append(f"{name}: {rep.stl} STL + {rep.ldl} LDL local-memory instructions")
        if rule.get("max_instr_per_element"):
            budget = instruction_budget(rep, budgets)
            ipe = rep.hot.per_element if rep.hot else None
            if rep.annotation is None:
                pass  # reported by the `annotated` rule
            elif ipe is None:
                out.append(f"{name}: instructions per element unknown ({'; '.join(rep.notes)})")
            elif budget is not None and ipe > budget:
                out.append(f"{name}: {ipe:.1f} instructions per element > budget {budget:.1f}")
        if "min_wide_fraction" in rule:
            frac = rep.wide_fraction()
            if frac is None or frac < rule["min_wide_fraction"]:
                shown = "no global bytes" if frac is None else f"{frac:.0%}"
                out.append(f"{name}: 128-bit accesses move {shown} of the hot path's global bytes "
                           f"(< {rule['min_wide_fraction']:.0%})")
        if "require_opcode" in rule and rule["require_opcode"] not in opcodes:
            out.append(f"{name}: no {rule['require_opcode']} instruction (partials merged by one thread)")
    return out


def known_violation(rep, problem, budgets):
    """The `known_violations` entry of the budget file that accepts this problem (a measured
    shortfall with its reason, kept visible in every report), or None."""
    for known in budgets.get("known_violations", []):
        if re.search(known["pattern"], rep.name) and problem.startswith(known["rule"] + ":"):
            return known
    return None
