"""Formatting and reading of results.json for the report: numbers to Markdown cells and tables, paths into the
nested results, the methods in report order, and the retrieval table of a protocol. Pure functions; nothing here
computes a metric."""
from __future__ import annotations

from typing import Any, Mapping

RETRIEVAL_COLUMNS = ["P@1", "P@5", "P@10", "R@10", "F1@10", "mAP", "MRR", "chance_P"]
# the headline protocols (results.json "headline_protocols" when present: evaluation.HEADLINE_PROTOCOLS)
HEADLINE = ("seen_tasks", "unseen_tasks", "unseen_kinds", "cross_architecture_within_shape_group")
REFERENCE_ORDER = ("shape_only", "constant", "random (chance)")  # the last rows of every table


def fmt(v: Any, digits: int = 3) -> str:
    """Format a number or an aggregated {"mean", "std"} as 'm ± s'."""
    if isinstance(v, Mapping) and "mean" in v:
        if v.get("std") is None or len(v.get("values", [0, 0])) < 2:
            return f"{v['mean']:.{digits}f}"
        return f"{v['mean']:.{digits}f} ± {v['std']:.{digits}f}"
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, (int,)):
        return str(v)
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def md_table(rows: Mapping[str, Mapping[str, Any]], columns: list[str] | None = None, first: str = "method") -> str:
    """{row name: {column: value}} -> a Markdown table (missing cells '—')."""
    if not rows:
        return "_no rows_\n"
    if columns is None:
        columns = []
        for r in rows.values():
            columns += [c for c in r if c not in columns]
    lines = ["| " + " | ".join([first] + columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for name, r in rows.items():
        lines.append("| " + " | ".join([str(name)] + [fmt(r[c]) if c in r else "—" for c in columns]) + " |")
    return "\n".join(lines) + "\n"


def get_path(d: Mapping, *path: str) -> Any:
    for p in path:
        if not isinstance(d, Mapping) or p not in d:
            return None
        d = d[p]
    return d


def mean_value(v: Any) -> float | None:
    if isinstance(v, Mapping) and "mean" in v:
        return float(v["mean"])
    return float(v) if isinstance(v, (int, float)) else None


def is_oracle(method: str) -> bool:
    """A metadata baseline whose model cards name the task (baselines.oracle_label)."""
    return "[oracle:" in method


def ordered_methods(results: Mapping, oracles: bool = False) -> list[str]:
    """Trained encoders, untrained encoders, the other methods, then shape_only, constant and chance."""
    ms = [m for m in results.get("methods", {}) if oracles or not is_oracle(m)]
    trained = [m for m in ms if m.endswith("]") and "[untrained]" not in m and not is_oracle(m)]
    untrained = [m for m in ms if m.endswith("[untrained]")]
    refs = [m for m in REFERENCE_ORDER if m in ms]
    rest = [m for m in ms if m not in trained + untrained + refs]
    return trained + untrained + rest + refs


def retrieval_table(results: Mapping, protocol: str, oracles: bool = False) -> dict[str, dict]:
    methods = results.get("methods", {})
    return {m: {c: r[c] for c in RETRIEVAL_COLUMNS if c in r}
            for m in ordered_methods(results, oracles)
            if (r := get_path(methods[m], "retrieval", protocol)) is not None}


def strongest_fingerprint(results: Mapping, protocol: str) -> str | None:
    """The training-free fingerprint with the best P@10 on ``protocol`` (None if none ran)."""
    table = retrieval_table(results, protocol)
    fps = {m: mean_value(table[m].get("P@10")) for m in get_path(results, "reference_methods", "training_free_fingerprints") or []
           if m in table}
    fps = {m: v for m, v in fps.items() if v is not None}
    return max(fps, key=fps.get) if fps else None
