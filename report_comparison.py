"""The issue-16 section of results.md: the trained, self-supervised and untrained GNNs against the training-free
fingerprints, overall, per shape group and by how well each query model learned its task; what each trained
embedding is (metric head, learned part's weight); and every target with its measured value, met or MISSED."""
from __future__ import annotations

from typing import Mapping

from report_format import get_path, is_oracle, md_table, mean_value, strongest_fingerprint

FOUR_PROTOCOLS = ("seen_tasks", "unseen_tasks", "unseen_kinds", "cross_architecture_within_shape_group")


def headline_methods(results: Mapping) -> dict[str, str]:
    """The four methods of the issue-16 comparison present in ``results``: {role: method}. "trained" is the
    weakly supervised GNN (supcon) if trained, else the first trained one; "self-supervised" the label-free one."""
    methods = list(results.get("methods", {}))
    trained = [m for m in methods if m.endswith("]") and "[" in m and "untrained" not in m and not is_oracle(m)
               and not m.startswith("probe fingerprint part")]
    out = {}
    sup = [m for m in trained if m.endswith("[supcon]")]
    if sup or trained:
        out["trained"] = (sup or trained)[0]
    ss = [m for m in trained if not m.endswith("[supcon]")]
    if ss:
        out["self-supervised"] = ss[0]
    for role, cand in (("untrained", [m for m in methods if m.endswith("[untrained]")]),
                       ("probe_fingerprint", ["probe_fingerprint"]), ("input_profile", ["input_profile"])):
        if cand and cand[0] in methods:
            out[role] = cand[0]
    return out


def by_shape_group(results: Mapping, protocol: str, methods: list[str]) -> dict[str, dict]:
    """{shape group: {method: aggregated P@10}} of one protocol (evaluation.retrieval_by_shape_group)."""
    out: dict[str, dict] = {}
    for m in methods:
        for g, v in (get_path(results, "methods", m, "retrieval_by_shape_group", protocol) or {}).items():
            out.setdefault(g, {})[m] = v
    return out


def comparison_lines(r: Mapping) -> list[str]:
    """The issue-16 section: the trained, untrained and self-supervised GNNs against the probe fingerprint and the
    input profile on seen tasks, unseen (test-unseen) tasks and across architectures within shape group, overall
    and per shape group, the ablations, then every target with its measured value, met or missed."""
    roles = headline_methods(r)
    if not roles:
        return []
    rows = {f"{m} ({role})": {p: get_path(r, "methods", m, "retrieval", p, "P@10") for p in FOUR_PROTOCOLS}
            for role, m in roles.items()}
    for m in r.get("methods", {}):
        if "without metric head" in m or m.startswith("probe fingerprint part") or m == "probe_fingerprint_data":
            rows[f"{m} (ablation / reference)"] = {p: get_path(r, "methods", m, "retrieval", p, "P@10") for p in FOUR_PROTOCOLS}
    L = ["## Trained vs untrained vs probe fingerprint vs input profile (P@10 within shape group)", "",
         "unseen_tasks are the test-unseen tasks only: val-unseen tasks chose every setting (epoch, metric head) and "
         "are in no table. Ablations: the trained GNN's embedding before its metric head, and the probe-fingerprint "
         "part of it through the same metric head without the GNN's learned part.", "",
         md_table({k: {p: v for p, v in row.items() if v is not None} for k, row in rows.items()}, list(FOUR_PROTOCOLS)),
         ""] + metric_head_lines(r)
    four = list(dict.fromkeys(roles.values()))
    for proto in FOUR_PROTOCOLS:
        table = by_shape_group(r, proto, four)
        if table:
            L += [f"### Per shape group: {proto}", "", md_table(table, four, first="shape group"), ""]
            fig = r.get("figures", {}).get(f"p10_by_shape_group_{proto}")
            if fig:
                L += [f"![{proto} per shape group]({fig})", ""]
    return L + query_fit_lines(r, four + [m for m in ("probe_fingerprint_data",) if m in r.get("methods", {})]) \
        + target_lines(r, roles)


def query_fit_lines(r: Mapping, methods: list[str], protocol: str = "unseen_tasks") -> list[str]:
    """P@10 of ``protocol``'s queries binned by how much of its task each query model learned
    (evaluation.query_fit_labels), with each bin's share of the queries: what a function can tell about a model
    that computes little of its task."""
    table: dict[str, dict] = {}
    for m in methods:
        for b, v in (get_path(r, "methods", m, "retrieval_by_query_fit", protocol) or {}).items():
            table.setdefault(b, {})[m] = v
    if not table:
        return []
    share = get_path(r, "methods", methods[0], "query_fit_share", protocol) or {}
    for b in table:
        if b in share:
            table[b] = {"share of queries": share[b], **table[b]}
    return [f"### P@10 by how well the query model learned its task: {protocol}", "",
            "Each query's test accuracy as a fraction of what its task allows: (accuracy - chance) / (best accuracy "
            "of any model of the task - chance). A model that failed to learn its task computes little of it, so no "
            "reading of its function (or weights) can find the task's other models; its own task's failed models are "
            "also among every query's relevant items.", "",
            md_table(table, ["share of queries"] + methods, first="query learned its task"), ""]


def metric_head_lines(r: Mapping) -> list[str]:
    """What each trained GNN's embedding is, per seed: the metric head and the learned part's weight chosen on
    validation (learned weight 0: the GNN's learned part was dropped and the embedding is its probe fingerprint)."""
    mh = r.get("metric_head") or {}
    rows = {f"{m}, seed {s}": {"metric head dims": c["dim"] or "none", "ridge": c["reg"] if c["dim"] else "-",
                                "learned part weight": c["learned_weight"], c["metric"]: c["score"],
                                **({f"{c['metric']}, head refit on train + val runs": c["refit_score"]}
                                   if "refit_score" in c else {})}
            for m, seeds in mh.items() for s, c in seeds.items()}
    if not rows:
        return []
    cols = list(dict.fromkeys(k for row in rows.values() for k in row))
    return ["Each trained GNN's embedding as chosen on validation (learned part weight 0 = the GNN's learned part "
            "dropped: the embedding is then its raw probe fingerprint, through the metric head if any):", "",
            md_table(rows, cols, first="encoder"), ""]


def _learned(method: str) -> bool:
    """A trained encoder or one of its ablations (everything whose embedding training or a fitted head chose)."""
    return (method.endswith("]") and not method.endswith("[untrained]") and not is_oracle(method)) \
        or "without metric head" in method or method.startswith("probe fingerprint part")


def _p10(r: Mapping, method: str | None, proto: str) -> float | None:
    return mean_value(get_path(r, "methods", method, "retrieval", proto, "P@10")) if method else None


def target_lines(r: Mapping, roles: Mapping[str, str]) -> list[str]:
    """Issue 16's "must show" list: measured value and met / MISSED for each target this run can measure."""
    tr, ss, fp = roles.get("trained"), roles.get("self-supervised"), roles.get("probe_fingerprint")
    rows: dict[str, dict] = {}

    def add(target: str, measured: str, ok: bool | None) -> None:
        rows[target] = {"measured": measured, "status": "not measured" if ok is None else "met" if ok else "MISSED"}

    def beside(proto: str) -> str:  # the untrained encoder and the strongest training-free fingerprint, same split
        best, un = strongest_fingerprint(r, proto), roles.get("untrained")
        return "".join(f"; {name} {v:.3f}" for name, v in ((un, _p10(r, un, proto)),
                                                           (f"strongest training-free {best}", _p10(r, best, proto)))
                       if v is not None)

    u_tr, u_fp, u_ss = (_p10(r, m, "unseen_tasks") for m in (tr, fp, ss))
    if u_tr is not None and u_fp is not None:
        learned = get_path(r, "methods", tr, "retrieval_by_query_fit", "unseen_tasks", "learned (>= 0.9)")
        add("unseen-task P@10: trained >= 0.95 and >= probe_fingerprint + 0.03",
            f"{tr} {u_tr:.3f}, probe_fingerprint {u_fp:.3f}{beside('unseen_tasks')}" + (
                f"; {tr} on queries that learned their task (>= 0.9) {mean_value(learned):.3f}" if learned else ""),
            u_tr >= 0.95 and u_tr >= u_fp + 0.03)
    if u_ss is not None and u_fp is not None:
        add("self-supervised (no task label) >= probe_fingerprint, unseen tasks",
            f"{ss} {u_ss:.3f} vs {u_fp:.3f}{beside('unseen_tasks')}", u_ss >= u_fp)
    c_tr, c_fp = (_p10(r, m, "cross_architecture_within_shape_group") for m in (tr, fp))
    if c_tr is not None and c_fp is not None:
        add("cross-architecture within shape group: trained >= probe_fingerprint",
            f"{c_tr:.3f} vs {c_fp:.3f}{beside('cross_architecture_within_shape_group')}", c_tr >= c_fp)
    for key, what in (("within_kendall_final", "final checkpoints"), ("within_kendall", "all checkpoints")):
        t_tr, t_fp = (mean_value(get_path(r, "methods", m, "properties", "test_acc", "ridge", key)) if m else None
                      for m in (tr, fp))
        if t_tr is not None and t_fp is not None:
            tau = {m: v for m in r.get("methods", {})
                   if (v := mean_value(get_path(r, "methods", m, "properties", "test_acc", "ridge", key))) is not None}
            oracles = [f"{m.split(' [')[0]} {tau[m]:.3f}" for m in get_path(r, "reference_methods", "property_oracles")
                       or {} if m in tau]
            free = {m: v for m, v in tau.items() if not _learned(m) and not is_oracle(m) and not m.startswith("metadata_")
                    and m not in (get_path(r, "reference_methods", "notes") or [])}
            best = max(free, key=free.get) if free else None
            head_off = tr.replace(" [", " (").replace("]", ")") + " without metric head"
            un = roles.get("untrained")
            extra = [f"{name} {tau[m]:.3f}" for name, m in (("before its metric head", head_off), (un, un),
                                                             (f"strongest training-free {best}", best if best != un else None))
                     if m in tau]
            extra += [f"{m} {v:.3f} (reads the model card)" for m, v in tau.items() if m.startswith("metadata_")]
            add(f"within-task Kendall tau of test accuracy ({what}): trained >= 0.6 and > probe_fingerprint",
                f"{t_tr:.3f} vs {t_fp:.3f}" + "".join(f"; {e}" for e in extra)
                + (f" (oracles: {', '.join(oracles)})" if oracles else ""), t_tr >= 0.6 and t_tr > t_fp)
    sym = get_path(r, "symmetry_robustness", "methods") or {}
    for m in (tr, ss):
        v = sym.get(m) if m else None
        if v is not None:
            tie = v.get("max_abs_embedding_change", 1.0) < 1e-4
            add(f"symmetry drop 0 (tie flips aside): {m}", f"P@10 drop {v['drop']['P@10']:+.4f}, largest embedding "
                f"change {v.get('max_abs_embedding_change', float('nan')):.1e}", v["drop"]["P@10"] == 0 or tie)
    total = get_path(r, "timings", "total")
    if total is not None:
        add("default run <= 15 min on 2 cores (zoo included when trained in the run)",
            f"{total / 60:.1f} min on {r.get('device')} (load: see log)", total <= 900)
    summary = get_path(r, "transfer", "summary") or {}
    refs = ", ".join(f"{m} {v['mean_ratio']:.2f}" for m, v in summary.items() if m not in (tr, ss))
    for m, v in summary.items():
        if m in (tr, ss) and v["n_defined"]:  # met only if both the per-task mean and the pooled ratio are <= 0.5
            add(f"transfer: models retrieved by {m} need <= 0.5x the fine-tuning steps of random same-shape ones",
                f"step ratio mean {v['mean_ratio']:.2f}, median {v['median_ratio']:.2f}, pooled {v['pooled_ratio']:.2f} "
                f"over {v['n_tasks']} tasks" + (f" (mean: {refs})" if refs else ""), v["mean_ratio"] <= 0.5 and v["pooled_ratio"] <= 0.5)
    add("bench_encoder.py training step with probe features >= 200 graphs/s", "bench_encoder.py --probes (not run here)", None)
    return ["### Issue #16 targets", "", md_table(rows, ["measured", "status"], first="target"), ""]
