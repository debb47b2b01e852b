"""Smoke test of the real experiment CLI and of the report's fidelity to results.json."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import report

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exp")
    cmd = [sys.executable, str(ROOT / "run_experiment.py"), "--small", "--epochs", "1",
           "--zoo_dir", str(out / "zoo"), "--results_dir", str(out / "results"), "--experiment_name", "smoke"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"run_experiment failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return out / "results" / "smoke"


def _md_tables(md: str) -> dict[str, list[list[str]]]:
    """### heading -> rows of the first table under it (cells as strings)."""
    tables, heading, rows = {}, None, None
    for line in md.splitlines():
        if line.startswith("#"):
            heading, rows = line.strip("# ").replace(" (headline)", ""), None
        elif line.startswith("|") and heading is not None:
            cells = [c.strip() for c in line.strip("|").split("|")]
            if rows is None:
                rows = tables.setdefault(heading, [])
            if not set("".join(cells)) <= set("-"):
                rows.append(cells)
    return tables


def test_small_run_writes_every_output(small_run):
    for name in ("results.json", "results.md", "log.txt", "config.json"):
        assert (small_run / name).is_file(), f"{name} missing"
    res = json.loads((small_run / "results.json").read_text())
    for key in ("config", "versions", "git_commit", "timings", "stages", "seeds"):
        assert key in res
    failed = {k: v for k, v in res["stages"].items() if v["status"] != "ok"}
    assert not failed, f"stages did not finish: {failed}"
    assert res["methods"], "no method was evaluated"
    trained = [m for m in res["methods"] if "[" in m and "untrained" not in m]
    assert trained, f"no trained encoder in {list(res['methods'])}"
    figs = res["figures"]
    assert figs and all((small_run / p).is_file() for p in figs.values())
    assert "stage zoo: done" in (small_run / "log.txt").read_text()


def test_markdown_numbers_equal_json(small_run):
    res = json.loads((small_run / "results.json").read_text())
    tables = _md_tables((small_run / "results.md").read_text())
    checked = 0
    for proto in ("within_shape_group", "full_zoo"):
        rows = tables[proto]
        header = rows[0]
        for row in rows[1:]:
            method = row[0]
            for col, cell in zip(header[1:], row[1:]):
                value = res["methods"][method]["retrieval"][proto][col]
                assert cell == report.fmt(value), f"{proto}/{method}/{col}: md {cell} != json {value}"
                checked += 1
    assert checked > 20


def test_same_architecture_table_equals_json(small_run):
    res = json.loads((small_run / "results.json").read_text())
    sa = res["same_architecture"]
    assert sa["ran"] and sa["subzoos"], "the same-architecture stage selected no sub-zoo on the small zoo"
    assert "nfn (random init)" in sa["methods"] and "random (chance)" in sa["methods"]
    rows = _md_tables((small_run / "results.md").read_text())[report.SAME_ARCH_HEADING]
    assert [r[0] for r in rows[1:]] == list(sa["methods"])
    table = report.same_architecture_table(sa)
    for row in rows[1:]:
        for col, cell in zip(rows[0][1:], row[1:]):
            assert cell == report.fmt(table[row[0]][col]), f"{row[0]}/{col}: md {cell}"
    by_name = {z["arch_name"]: z["arch_id"] for z in sa["subzoos"]}
    for m, agg in sa["methods"].items():  # the table's values are the JSON's, not recomputed
        assert table[m]["P@10"] == agg["mean"]["P@10"]
        for name, arch in by_name.items():
            assert table[m][f"P@10 {name}"] == agg[arch]["P@10"]


def test_failed_stage_is_reported_not_filled(tmp_path):
    rec = report.RunRecorder(tmp_path, {})

    def boom():
        raise ValueError("bad input in zoo/x.safetensors")

    assert rec.run("a", boom) is None
    assert rec.run("b", lambda: 1, depends_on=("a",)) is None
    st = json.loads((tmp_path / "results.json").read_text())["stages"]
    assert st["a"]["status"] == "failed" and "x.safetensors" in st["a"]["error"]
    assert st["b"]["status"] == "skipped"
    md = report.render_markdown(json.loads((tmp_path / "results.json").read_text()))
    assert "| a | failed |" in md and "| b | skipped |" in md


def test_fmt_and_table():
    assert report.fmt({"mean": 0.5, "std": 0.1, "values": [0.4, 0.6]}) == "0.500 ± 0.100"
    assert report.fmt({"mean": 0.5, "std": 0.0, "values": [0.5]}) == "0.500"
    t = report.md_table({"m": {"a": 1.0}}, ["a", "b"])
    assert re.search(r"\| m \| 1.000 \| — \|", t)
