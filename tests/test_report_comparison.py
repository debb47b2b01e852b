"""The issue-16 section of results.md: every learned number beside the untrained encoder and the strongest
training-free method on the same metric, and the query-fit breakdown, formatted from results.json."""
from __future__ import annotations

import report
import report_comparison as RC


def _agg(v: float) -> dict:
    return {"mean": v, "std": 0.0, "values": [v, v], "n": 2}


def _results() -> dict:
    p10 = {"gnn [supcon]": 0.70, "gnn [checkpoint]": 0.69, "gnn [untrained]": 0.61, "probe_fingerprint": 0.63,
           "probe_fingerprint_data": 0.66, "input_profile": 0.12, "gnn (supcon) without metric head": 0.65,
           "shape_only": 0.04, "metadata_tfidf": 0.05, "random (chance)": 0.04, "constant": 0.04,
           "test_loss [oracle: test-set loss]": 0.3}
    tau = {"gnn [supcon]": 0.01, "gnn [checkpoint]": 0.03, "gnn [untrained]": 0.15, "probe_fingerprint": 0.006,
           "probe_fingerprint_data": 0.0, "input_profile": 0.15, "gnn (supcon) without metric head": 0.40,
           "shape_only": 0.24, "metadata_tfidf": 0.29, "random (chance)": 0.5, "constant": 0.0,
           "test_loss [oracle: test-set loss]": 0.46}
    bins = ("failed (< 0.5)", "partly (0.5-0.9)", "learned (>= 0.9)")
    methods = {}
    for m, v in p10.items():
        methods[m] = {
            "retrieval": {p: {"P@10": _agg(v)} for p in RC.FOUR_PROTOCOLS},
            "retrieval_by_query_fit": {"unseen_tasks": {b: _agg(v * f) for b, f in zip(bins, (0.3, 0.8, 1.1))}},
            "query_fit_share": {"unseen_tasks": {b: _agg(s) for b, s in zip(bins, (0.15, 0.25, 0.6))}},
            "properties": {"test_acc": {"ridge": {"within_kendall_final": _agg(tau[m]),
                                                  "within_kendall": _agg(tau[m])}}}}
    return {"methods": methods,
            "reference_methods": {"notes": ["random (chance)", "constant"],
                                  "training_free_fingerprints": ["input_profile", "probe_fingerprint",
                                                                 "probe_fingerprint_data"],
                                  "property_oracles": ["test_loss [oracle: test-set loss]"]}}


def _row(md: str, start: str) -> str:
    return next(line for line in md.splitlines() if line.startswith(f"| {start}"))


def test_targets_name_the_untrained_encoder_and_the_strongest_training_free_method():
    r = _results()
    md = "\n".join(RC.target_lines(r, RC.headline_methods(r)))
    unseen = _row(md, "unseen-task P@10")
    assert "gnn [supcon] 0.700, probe_fingerprint 0.630; gnn [untrained] 0.610; strongest training-free " \
           "probe_fingerprint_data 0.660; gnn [supcon] on queries that learned their task (>= 0.9) 0.770" in unseen
    assert unseen.endswith("| MISSED |")
    tau = _row(md, "within-task Kendall tau of test accuracy (final checkpoints)")
    # the strongest training-free method for tau is shape_only: not the ablation before the head (learned), not
    # the chance embedding (a reference), not the oracle, not the model card (listed apart)
    assert "0.010 vs 0.006; before its metric head 0.400; gnn [untrained] 0.150; strongest training-free " \
           "shape_only 0.240; metadata_tfidf 0.290 (reads the model card) (oracles: test_loss 0.460)" in tau
    assert tau.endswith("| MISSED |")


def test_query_fit_table_holds_the_json_numbers():
    r = _results()
    roles = RC.headline_methods(r)
    methods = list(dict.fromkeys(roles.values())) + ["probe_fingerprint_data"]
    md = "\n".join(RC.query_fit_lines(r, methods))
    header = _row(md, "query learned its task").strip("|").split("|")
    assert [c.strip() for c in header] == ["query learned its task", "share of queries"] + methods
    for b, share in r["methods"][methods[0]]["query_fit_share"]["unseen_tasks"].items():
        cells = [c.strip() for c in _row(md, b).strip("|").split("|")]
        assert cells[1] == report.fmt(share)
        assert cells[2:] == [report.fmt(r["methods"][m]["retrieval_by_query_fit"]["unseen_tasks"][b]) for m in methods]
    assert RC.query_fit_lines({"methods": {}}, methods) == []
