"""Smoke test of the real experiment CLI and of the report's fidelity to results.json."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import report

ROOT = Path(__file__).resolve().parents[1]
# smaller than --small: 4 runs of each of its tasks trained 5 epochs, 2 seeds of 3 encoder epochs, one baseline
# (val_fraction 0.5 leaves 2 validation runs per task, so the validation P@10 has relevant items)
TINY = ["--small", "--runs_per_task", "4", "--zoo_epochs", "5", "--eval_seeds", "2", "--epochs", "3", "--val_fraction", "0.5",
        "--batch_size", "32",
        "--methods", "pca", "--symmetry_queries", "20", "--merge_pairs", "1", "--merge_alphas", "3", "--transfer_steps", "10",
        "--transfer_k", "2", "--same_arch_subzoos", "0"]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exp")
    cmd = [sys.executable, str(ROOT / "run_experiment.py"), "--small", "--epochs", "1",
           "--zoo_dir", str(out / "zoo"), "--results_dir", str(out / "results"), "--experiment_name", "smoke"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
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
    trained = [m for m in res["methods"] if "[" in m and "untrained" not in m and not report.is_oracle(m)]
    assert trained, f"no trained encoder in {list(res['methods'])}"
    figs = res["figures"]
    assert figs and all((small_run / p).is_file() for p in figs.values())
    md = (small_run / "results.md").read_text()
    assert "transfer" in figs and not [p for p in figs.values() if f"]({p})" not in md]  # every figure is shown
    log = (small_run / "log.txt").read_text()
    assert "stage zoo: done" in log
    # output redirected to a file: no progress bar, one log line per training epoch
    assert "it/s" not in log and "\r" not in log
    assert len(re.findall(r"INFO epoch \d+/1 ", log)) == len(trained)


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
    # unseen-task P@10 by how well the query model learned its task: every bin of the JSON, its share of the queries
    rows = tables["P@10 by how well the query model learned its task: unseen_tasks"]
    header, body = rows[0], {row[0]: row for row in rows[1:]}
    first = res["methods"][header[2]]
    assert set(body) == set(first["retrieval_by_query_fit"]["unseen_tasks"])
    assert abs(sum(v["mean"] for v in first["query_fit_share"]["unseen_tasks"].values()) - 1) < 1e-9
    for b, row in body.items():
        assert row[1] == report.fmt(first["query_fit_share"]["unseen_tasks"][b])
        for method, cell in zip(header[2:], row[2:]):
            assert cell == report.fmt(res["methods"][method]["retrieval_by_query_fit"]["unseen_tasks"][b]), (b, method)


def test_report_states_the_zoo_the_splits_the_choices_and_the_references(small_run):
    res = json.loads((small_run / "results.json").read_text())
    md = (small_run / "results.md").read_text()
    z = res["zoo"]
    assert f"**{z['num_tasks']} tasks from {z['num_datasets']} sources** ({', '.join(z['sources'])})" in md
    assert sum(len(v) for v in z["tasks_by_shape_group"].values()) == z["num_tasks"] == len(z["tasks"])
    assert z["card_task_fraction"] == 0.0
    assert "## How these numbers were chosen" in md and "io_slots" in md
    assert set(res["split"]["seeds"]) == {str(s) for s in res["seeds"]}
    tables = _md_tables(md)
    for proto in res["headline_protocols"]:
        names = [row[0] for row in tables[proto][1:]]
        assert {"shape_only", "random (chance)", "constant"} <= set(names), (proto, names)
        assert any(n.endswith("[untrained]") for n in names) and not any("oracle" in n for n in names)
    assert "validation" in tables and "val_P@10" in tables["validation"][0]
    # the property oracles (metadata the weights do not give) are rows of the property tables, out of the headline
    oracles = res["reference_methods"]["property_oracles"]
    assert len(oracles) == 3 and all("[oracle:" in m for m in oracles)
    names = [row[0] for row in tables["test_acc"][1:]]
    assert names[-3:] == list(oracles) and "shape_only" in names
    for m in oracles:
        cell = tables["test_acc"][1 + names.index(m)][tables["test_acc"][0].index("within_kendall_final")]
        assert cell == report.fmt(res["methods"][m]["properties"]["test_acc"]["ridge"]["within_kendall_final"])
    # every constant/shape-only pass recorded in the JSON is noted in the report
    sa = res["same_architecture"]
    for passes in (res["trivial_passes"], sa["trivial_passes"]):
        assert passes["threshold"] == 0.85
        for section, hits in passes["sections"].items():
            for h in hits:
                assert f"`{h['method']}` (reads no function) reaches {h['metric']} {h['max']:.3f}" in md, section


def test_same_architecture_table_equals_json(small_run):
    res = json.loads((small_run / "results.json").read_text())
    sa = res["same_architecture"]
    assert sa["ran"] and sa["subzoos"], "the same-architecture stage selected no sub-zoo on the small zoo"
    assert "nfn (random init)" in sa["methods"] and "random (chance)" in sa["methods"]
    assert not any(report.is_oracle(m) for m in sa["methods"])  # the property oracles read metadata, not weights
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


def _tiny_cli(out: Path, name: str, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "run_experiment.py"), *TINY, "--zoo_dir", str(out / "zoo"),
            "--results_dir", str(out / "results"), "--experiment_name", name, *extra]


def _without_timings(path: Path) -> str:
    """results.json as canonical text, less what a wall clock or the invocation decides."""
    res = json.loads(path.read_text())
    for key in ("timings", "started", "experiment"):
        res.pop(key)
    for key in ("resume", "experiment_name"):
        res["config"].pop(key)
    for runs in res["training"].values():
        for history in runs.values():
            history.pop("epoch_time_s")
    return json.dumps(res, sort_keys=True)


def test_resume_after_sigkill_in_the_second_seed_equals_an_uninterrupted_run(tmp_path):
    import contrastive_learning as C
    import stages as S
    from gnn_encoder import load_encoder

    # killed first: it trains the zoo, so both compared runs read the same zoo and graph cache from disk
    ckpts = tmp_path / "results" / "killed" / "checkpoints"
    second, first = ckpts / "gnn_checkpoint_seed43" / "last.pt", ckpts / "gnn_checkpoint_seed42" / "last.pt"
    proc = subprocess.Popen(_tiny_cli(tmp_path, "killed"), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:  # kill as soon as the second seed's training has written its first checkpoint
        while not second.exists() and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        stderr = proc.communicate()[1].decode()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the second seed's checkpoint:\n{stderr[-3000:]}"
    killed_at = C.load_checkpoint(second)["epoch"]
    assert 1 <= killed_at < 3, "the kill came after the second seed's training had finished"
    first_written = first.stat().st_mtime_ns

    for cmd in (_tiny_cli(tmp_path, "straight"), _tiny_cli(tmp_path, "killed", "--resume")):
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
        assert r.returncode == 0, f"{cmd[-2:]} failed:\n{r.stderr[-5000:]}"
    assert first.stat().st_mtime_ns == first_written, "the finished first seed was trained again"
    log = (tmp_path / "results" / "killed" / "log.txt").read_text()
    assert f"finished training loaded from {first} at epoch 3 of 3" in log
    assert f"resumed from {second} at epoch {killed_at} of 3" in log
    runs = tmp_path / "results"
    resumed, straight = _without_timings(runs / "killed" / "results.json"), _without_timings(runs / "straight" / "results.json")
    assert json.loads(resumed)["stages"] == json.loads(straight)["stages"]
    assert resumed == straight  # every number, bit for bit

    # each seed drew its own split, the same for every method: the std of a deterministic baseline is the
    # split's variance (it was 0 with one split for all seeds)
    res = json.loads(straight)
    held = {s: tuple(v["test_unseen_tasks"]) + tuple(v["unseen_kind_tasks"]) for s, v in res["split"]["seeds"].items()}
    assert len(held) == 2 and len(set(held.values())) == 2, held
    shape = res["methods"]["shape_only"]["retrieval"]["within_shape_group"]["P@10"]
    assert shape["n"] == 2 and shape["std"] > 0, shape

    # last.pt alone rebuilds the encoder: model_args + the best weights = the saved encoder file
    ckpt = C.load_checkpoint(first)
    encoder = S.encoder_from_args(ckpt["model_args"])
    encoder.load_state_dict(C.encoder_state(ckpt["best_model"]))
    saved = load_encoder(str(ckpts / "gnn_checkpoint_seed42.pt")).state_dict()
    assert saved.keys() == encoder.state_dict().keys()
    assert all(torch.equal(v, saved[k]) for k, v in encoder.state_dict().items())
