"""Run bookkeeping and the Markdown report.

``RunRecorder`` times stages, records their status (ok / failed / not built / skipped) and
writes results.json atomically after every stage, so a crash never loses what was already
measured. ``render_markdown(results)`` turns results.json into results.md; every number in
the Markdown is formatted from the JSON, nothing is computed here.
"""
from __future__ import annotations

import logging
import platform
import subprocess
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

log = logging.getLogger("weightzoo")

PACKAGES = ("torch", "torch-geometric", "numpy", "scipy", "scikit-learn", "faiss-cpu", "safetensors",
            "umap-learn", "nfn", "mnist1d", "mlxtend")


class StageFailed(RuntimeError):
    """Raised inside a stage to mark it failed with a cause."""


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def git_commit(cwd: str | Path = ".") -> str:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"unknown ({e})"
    if r.returncode != 0:
        return "unknown (not a git checkout)"
    return r.stdout.strip() + ("+dirty" if dirty else "")


def setup_logging(log_path: Path | None, verbose: bool = True) -> None:
    """Log to stderr and (on the writing process) to log.txt."""
    root = logging.getLogger("weightzoo")
    root.setLevel(logging.INFO)
    root.handlers.clear()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    if verbose:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(fmt)
        root.addHandler(h)
    if log_path is not None:
        fh = logging.FileHandler(log_path, mode="a")
        fh.setFormatter(fmt)
        root.addHandler(fh)


class RunRecorder:
    """Holds results, times stages and persists results.json after each stage."""

    def __init__(self, run_dir: Path, results: dict, write: bool = True):
        self.run_dir = run_dir
        self.results = results
        self.write = write
        self.results.setdefault("stages", {})
        self.results.setdefault("timings", {})

    def save(self) -> None:
        if self.write:
            from runtime import atomic_write_json  # imports torch: kept out of module import, so --help is instant

            atomic_write_json(self.run_dir / "results.json", self.results)

    def run(self, name: str, fn: Callable[..., Any], *args: Any, depends_on: tuple[str, ...] = (),
            **kwargs: Any) -> Any:
        """Run one stage ``fn(*args, **kwargs)`` and return its value (None if it did not finish).

        A stage whose dependency did not finish is recorded as skipped and not run. An error
        marks the stage failed with its cause and traceback, and the run goes on: a failed
        step shows as failed in the report, never filled in.
        """
        missing = [d for d in depends_on if not self.ok(d)]
        if missing:
            self.results["stages"][name] = {"status": "skipped",
                                            "reason": f"depends on {', '.join(missing)}, which did not finish"}
            log.warning("stage %s skipped: depends on %s", name, missing)
            self.save()
            return None
        t0 = time.perf_counter()
        log.info("stage %s: start", name)
        try:
            value = fn(*args, **kwargs)
        except Exception as e:  # recorded as failed (with the cause) and the run continues
            dt = time.perf_counter() - t0
            self.results["stages"][name] = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                                            "traceback": traceback.format_exc(limit=-6)}
            self.results["timings"][name] = round(dt, 3)
            log.error("stage %s FAILED after %.1f s: %s: %s\n%s", name, dt, type(e).__name__, e,
                      traceback.format_exc(limit=-6))
            self.save()
            return None
        dt = time.perf_counter() - t0
        self.results["stages"][name] = {"status": "ok"}
        self.results["timings"][name] = round(dt, 3)
        log.info("stage %s: done in %.1f s", name, dt)
        self.save()
        return value

    def not_built(self, name: str, what: str) -> None:
        self.results["stages"][name] = {"status": "not built", "reason": what}
        log.warning("stage %s: not built yet (%s)", name, what)
        self.save()

    def ok(self, name: str) -> bool:
        return self.results["stages"].get(name, {}).get("status") == "ok"


# --- Markdown ------------------------------------------------------------------
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


# --- the report ----------------------------------------------------------------
RETRIEVAL_COLUMNS = ["P@1", "P@5", "P@10", "R@10", "F1@10", "mAP", "MRR", "chance_P"]
HEADLINE = ("within_shape_group", "unseen_tasks", "cross_architecture")


def _get(d: Mapping, *path: str) -> Any:
    for p in path:
        if not isinstance(d, Mapping) or p not in d:
            return None
        d = d[p]
    return d


def _mean(v: Any) -> float | None:
    if isinstance(v, Mapping) and "mean" in v:
        return float(v["mean"])
    return float(v) if isinstance(v, (int, float)) else None


def retrieval_table(results: Mapping, protocol: str) -> dict[str, dict]:
    return {m: {c: r[c] for c in RETRIEVAL_COLUMNS if c in r}
            for m, agg in results.get("methods", {}).items()
            if (r := _get(agg, "retrieval", protocol)) is not None}


def render_figures(results: Mapping, fig_dir: Path) -> dict[str, str]:
    """Draw every figure whose data is in ``results``; returns {name: path}."""
    from visualization import ResultsVisualizer

    viz = ResultsVisualizer(results)
    figs: dict[str, str] = {}
    for proto in HEADLINE + ("full_zoo",):
        table = retrieval_table(results, proto)
        if table:
            figs[f"retrieval_{proto}"] = viz.plot_retrieval_metrics(
                table, fig_dir / f"retrieval_{proto}.png", title=f"Retrieval: {proto}")
            figs[f"precision_at_k_{proto}"] = viz.plot_precision_at_k(
                table, fig_dir / f"precision_at_k_{proto}.png", title=f"Precision@k: {proto}")
    for method, runs in results.get("training", {}).items():
        seed, hist = next(iter(runs.items()))
        rows = [{"epoch": e, "train_loss": l, "val_metric": v}
                for e, l, v in zip(hist["epoch"], hist["train_loss"], hist["val_metric"])]
        if rows:
            safe = method.replace(" ", "_").replace("[", "").replace("]", "")
            figs[f"training_{safe}"] = viz.plot_training_curves(rows, fig_dir / f"training_{safe}.png",
                                                                 val_name=hist.get("metric_name", "val metric"),
                                                                 title=f"Training {method} (seed {seed})")
    sym = _get(results, "symmetry_robustness", "methods")
    if sym:
        figs["symmetry_robustness"] = viz.plot_symmetry_robustness(
            {m: {"clean": r["clean"]["P@10"], "transformed": r["transformed"]["P@10"]} for m, r in sym.items()},
            fig_dir / "symmetry_robustness.png")
    for method, m in (results.get("embedding_map") or {}).items():
        safe = method.replace(" ", "_").replace("[", "").replace("]", "")
        for colour, cat in (("task", True), ("arch_family", True), ("test_acc", False)):
            figs[f"umap_{safe}_{colour}"] = viz.plot_umap(m["xy"], m[colour], fig_dir / f"umap_{safe}_{colour}.png",
                                                          title=f"UMAP of {method} embeddings, coloured by {colour}",
                                                          categorical=cat)
    pairs = _get(results, "merging", "pairs")
    if pairs:
        alphas = results["merging"]["alphas"]
        curves = {}
        for kind in ("naive", "aligned"):
            accs = np.array([p[kind]["acc"] for p in pairs])
            curves[f"{kind} averaging"] = {"x": alphas, "y": accs.mean(0).tolist(), "std": accs.std(0).tolist()}
        figs["merging"] = viz.plot_curves(curves, fig_dir / "merging.png", "alpha (interpolation)",
                                          "test accuracy", f"Interpolation between two models (mean of {len(pairs)} pairs)")
    sc = _get(results, "scaling", "summary")
    if sc:
        ns = sorted({n for v in sc.values() for n in v["n"]})
        curves = {m: ({"x": ns[:1] + ns[-1:], "y": [v["P@10"]["mean"]] * 2, "dashed": True} if v["flat"] else
                      {"x": v["n"], "y": v["P@10"]["mean"], "std": v["P@10"]["std"]}) for m, v in sc.items()}
        figs["scaling"] = viz.plot_curves(curves, fig_dir / "scaling.png", "training tasks", "unseen-task P@10",
                                          f"Unseen-task P@10 vs training tasks ({len(results['scaling']['per_seed'])} "
                                          "seeds; dashed: training-free)", logx=True)
    tasks = _get(results, "transfer", "tasks")
    if tasks:
        curves = {}
        for task, t in tasks.items():
            for method, r in t["methods"].items():
                for arm in ("retrieved", "random"):
                    cs = r[arm].get("curves")
                    if cs:
                        curves[f"{task}: retrieved by {method}" if arm == "retrieved" else f"{task}: random"] = \
                            {"x": cs[0]["step"], "y": np.mean([c["acc"] for c in cs], axis=0).tolist()}
        if curves:
            figs["transfer"] = viz.plot_curves(curves, fig_dir / "transfer.png", "fine-tuning steps",
                                               "test accuracy (mean over k models)", "Fine-tuning retrieved vs random models")
    return figs


def _span(c: Mapping) -> str:
    """'6' or '5-6 (median 6)' from {"min", "median", "max"}."""
    return str(c["min"]) if c["min"] == c["max"] else f"{c['min']}-{c['max']} (median {c['median']:g})"


def _stage_lines(results: Mapping) -> list[str]:
    lines = ["| stage | status | time (s) | note |", "|---|---|---|---|"]
    for name, st in results.get("stages", {}).items():
        note = st.get("error") or st.get("reason") or ""
        lines.append(f"| {name} | {st['status']} | {results.get('timings', {}).get(name, '—')} | {note[:160]} |")
    return lines


def render_markdown(results: Mapping) -> str:
    """results.json -> results.md. Numbers are formatted from the JSON, never recomputed."""
    r = results
    cfg = r.get("config", {})
    L: list[str] = [f"# weightzoo experiment `{r.get('experiment')}`", ""]
    if r.get("skip_training"):
        L += ["> **--skip-training**: encoders are RANDOMLY INITIALISED, not trained.", ""]
    L += ["## Setup", "",
          f"- started {r.get('started')}, git `{r.get('git_commit')}`, device `{r.get('device')}`, "
          f"world size {r.get('world_size')}, total {r.get('timings', {}).get('total', '—')} s",
          f"- seeds {r.get('seeds')} (every number is mean ± std over them; same splits for all methods)",
          f"- encoder `{_get(cfg, 'encoder', 'model')}` hidden {_get(cfg, 'encoder', 'hidden_dim')}, "
          f"{_get(cfg, 'encoder', 'message_passing_steps')} message-passing steps, embedding {_get(cfg, 'encoder', 'global_dim')}; "
          f"{_get(cfg, 'train', 'epochs')} epochs, batch {_get(cfg, 'train', 'batch_size')}, "
          f"temperature {_get(cfg, 'train', 'temperature')}, canonical form {_get(cfg, 'graph', 'canonicalize')}",
          f"- versions: {', '.join(f'{k} {v}' for k, v in r.get('versions', {}).items())}", ""]
    z = r.get("zoo")
    if z:
        L += ["### Zoo", "",
              f"{z['num_models']} checkpoints of {z['num_runs']} training runs, {z['num_tasks']} tasks from "
              f"{z['num_datasets']} datasets, {z['num_architectures']} architectures ({', '.join(z['arch_families'])}). "
              f"Tasks per shape group: {z['tasks_per_shape_group']}.", "",
              *([f"Per task: {_span(z['runs_per_task'])} training runs, {_span(z['models_per_task'])} checkpoints, "
                 f"{_span(z['final_models_per_task'])} final checkpoints ({z['checkpoints_per_run']} checkpoints per run, "
                 f"{z['zoo_epochs']} epochs; a run that diverged keeps its checkpoints before it). A query reaches "
                 f"P@10 = 1 only if its task has >= 10 models of other runs.", ""] if "runs_per_task" in z else []),
              md_table({k: {"mean final test acc": v} for k, v in z["final_test_acc_by_task_family"].items()},
                       first="task family"), ""]
    s = r.get("split")
    if s:
        L += [f"Split by training run: {s['n_train']} train, {s['n_val']} val, {s['n_test']} test; "
              f"held-out (unseen) tasks {s['heldout_tasks']} with {s['n_heldout']} models.", ""]
    L += ["### Stages", ""] + _stage_lines(r) + [""]
    skipped = {**r.get("skipped_methods", {}), **r.get("failed_methods", {})}
    if skipped:
        L += ["Methods not reported: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()), ""]
    rc = r.get("recipe_comparison")
    if rc and rc.get("ran"):
        L += ["## View recipes (validation, seen tasks only)", "",
              md_table({k: {"kind": v["kind"], rc["metric"]: v["val_metric"], "at init": v["initial_val_metric"]}
                        for k, v in rc["recipes"].items()}, first="recipe"),
              f"Chosen overall: **{rc['chosen']}**; best self-supervised: **{rc['chosen_self_supervised']}**. "
              f"Both are trained below; anything trained with task labels (supcon) is an upper anchor on seen tasks, "
              f"and claims about it rest on the unseen-task protocol.", ""]
    notes = r.get("protocol_notes", {})
    if r.get("methods"):
        L += ["## Retrieval", "", "Queries: test-split models and every held-out-task model; other checkpoints of "
              "the query's own training run are removed from its database. `chance_P` is the precision of a random "
              "ranking. `shape_only` and `input_profile` are reference baselines that show how much is solvable "
              "from shapes and first-layer fingerprints.", ""]
        for proto in HEADLINE + tuple(p for p in notes if p not in HEADLINE):
            table = retrieval_table(r, proto)
            if table:
                L += [f"### {proto}" + (" (headline)" if proto in HEADLINE else ""), "", notes.get(proto, ""), "",
                      md_table(table), ""]
                if f"retrieval_{proto}" in r.get("figures", {}):
                    L += [f"![{proto}]({r['figures'][f'retrieval_{proto}']})", ""]
        reduced = {m: a["dims"] for m, a in r["methods"].items()
                   if "dims" in a and a["dims"]["probes"]["mean"] < a["dims"]["embedding"]["mean"]}
        if reduced:
            L += ["Clustering and the probes below see the top principal components (fit on the train rows) of "
                  "embeddings wider than the probe limit: " + ", ".join(
                      f"{m} {a['embedding']['mean']:.0f} -> {a['probes']['mean']:.0f} dims" for m, a in reduced.items())
                  + "; retrieval uses every dimension.", ""]
        L += ["## Clustering (k-means, k = number of tasks, query models)", "",
              md_table({m: {c: a["clustering"][c] for c in ("purity", "ARI", "NMI")}
                        for m, a in r["methods"].items() if "clustering" in a}), ""]
        L += ["## Property prediction (ridge probe on embeddings; fit on train, scored on query models)", ""]
        targets = sorted({t for a in r["methods"].values() for t in a.get("properties", {})})
        for t in targets:
            rows = {m: {c: a["properties"][t]["ridge"][c] for c in ("R2", "spearman", "kendall", "within_kendall")
                        if c in a["properties"][t].get("ridge", {})}
                    for m, a in r["methods"].items() if t in a.get("properties", {})}
            L += [f"### {t}", "", md_table(rows), ""]
    L += same_architecture_lines(r)
    L += scaling_lines(r)
    sym = _get(r, "symmetry_robustness", "methods")
    if sym:
        L += ["## Symmetry robustness", "",
              f"Within-shape-group retrieval with {r['symmetry_robustness']['n_queries']} queries replaced by randomly "
              "permuted, rescaled (ReLU) and sign-flipped (tanh) copies (same functions).", "",
              md_table({m: {"P@10 original": v["clean"]["P@10"], "P@10 transformed": v["transformed"]["P@10"],
                            "drop": v["drop"]["P@10"], "embedding cosine": v["embedding_cosine"]}
                        for m, v in sym.items()}), ""]
        if "symmetry_robustness" in r.get("figures", {}):
            L += [f"![symmetry]({r['figures']['symmetry_robustness']})", ""]
    mg = r.get("merging")
    if mg:
        L += ["## Model merging (final checkpoints, same task and architecture)", "",
              *([mg["note"], ""] if mg.get("note") else []),
              md_table({f"{p['task']} / {p['arch']}": {"naive loss barrier": p["naive_loss_barrier"],
                                                        "aligned loss barrier": p["aligned_loss_barrier"],
                                                        "naive acc @0.5": p["naive_mid_acc"],
                                                        "aligned acc @0.5": p["aligned_mid_acc"]}
                        for p in mg["pairs"]}, first="pair"), ""]
        if "merging" in r.get("figures", {}):
            L += [f"![merging]({r['figures']['merging']})", ""]
    tr = r.get("transfer")
    if tr:
        rows = {}
        for task, t in tr["tasks"].items():
            for method, v in t["methods"].items():
                rows[f"{task} ({method})"] = {
                    "steps to target, retrieved": v["retrieved"]["mean_steps_to_target"],
                    "steps to target, random": v["random"]["mean_steps_to_target"],
                    "reached, retrieved": v["retrieved"]["frac_reached"], "reached, random": v["random"]["frac_reached"],
                    "acc after budget, retrieved": v["retrieved"]["mean_final_acc"],
                    "acc after budget, random": v["random"]["mean_final_acc"], "step ratio": v["step_ratio"]}
        L += [f"## Transfer (fine-tune top-{tr['k']} retrieved vs {tr['k']} random compatible models, "
              f"{tr['steps']} steps)", "", md_table(rows, first="unseen task (retrieval method)"), ""]
        if "transfer" in r.get("figures", {}):
            L += [f"![transfer]({r['figures']['transfer']})", ""]
    figs = r.get("figures", {})
    other = [k for k in figs if k.startswith(("umap_", "training_", "precision_at_k_"))]
    if other:
        L += ["## More figures", ""] + [f"![{k}]({figs[k]})" for k in other] + [""]
    L += ["## Analysis", ""] + analysis_lines(r) + [""]
    return "\n".join(L)


SCALING_HEADING = "Scaling: unseen-task P@10 against the number of training tasks"


def scaling_table(sc: Mapping) -> dict[str, dict]:
    """{method: {"n = <tasks>": "mean ± std" of P@10}}; training-free methods have one value for every n."""
    ns = sorted({n for v in sc["summary"].values() for n in v["n"]})
    rows = {}
    for m, v in sc["summary"].items():
        p = v["P@10"]
        rows[m] = {f"n = {n}": (f"{p['mean']:.3f} ± {p['std']:.3f}" if v["flat"] else
                                f"{p['mean'][v['n'].index(n)]:.3f} ± {p['std'][v['n'].index(n)]:.3f}") for n in ns}
    return rows


def scaling_lines(r: Mapping) -> list[str]:
    sc = r.get("scaling")
    if not sc:
        return []
    seeds = list(sc["per_seed"].values())
    epochs = seeds[0]["epochs"]
    L = [f"## {SCALING_HEADING}", "", sc["note"], "",
         f"Encoder `{sc['encoder']}`, recipes {', '.join(sc['recipes'])}; {len(seeds)} seeds (mean ± std); "
         f"{seeds[0]['n_seen_tasks']} seen tasks per seed (n = {max(int(n) for n in epochs)} is all of them); "
         "training epochs per n: " + ", ".join(f"{n}: {e}" for n, e in epochs.items())
         + (" (the full training set's optimizer steps for every n)" if sc["equal_steps"] else "") + ".", "",
         md_table(scaling_table(sc)), ""]
    if "scaling" in r.get("figures", {}):
        L += [f"![scaling]({r['figures']['scaling']})", ""]
    return L


SUBZOO_COLUMNS = ["P@1", "P@10", "mAP", "chance_P"]
SAME_ARCH_HEADING = "Same-architecture sub-zoos (NFN side by side)"


def same_architecture_table(sa: Mapping) -> dict[str, dict]:
    """{method: {column: aggregated value}}: the mean over sub-zoos, then P@10 of each sub-zoo."""
    rows = {}
    for m, agg in sa["methods"].items():
        row = {c: agg["mean"][c] for c in SUBZOO_COLUMNS if c in agg["mean"]}
        for z in sa["subzoos"]:
            if "P@10" in agg.get(z["arch_id"], {}):
                row[f"P@10 {z['arch_name']}"] = agg[z["arch_id"]]["P@10"]
        rows[m] = row
    return rows


def same_architecture_lines(r: Mapping) -> list[str]:
    """The same-architecture section of results.md (empty when the stage did not record numbers)."""
    sa = r.get("same_architecture")
    if not sa:
        return []
    if not sa.get("ran"):
        return [f"## {SAME_ARCH_HEADING}", "", f"Not run: {sa.get('reason')}.", ""]
    zs = "; ".join(f"{z['arch_name']} ({z['n_models']} models, {z['n_tasks']} tasks, {z['n_queries']} queries)"
                   for z in sa["subzoos"])
    c = sa["criteria"]
    L = [f"## {SAME_ARCH_HEADING}", "", sa["note"], "",
         f"Sub-zoos: the (at most) {c['k']} largest architectures with >= {c['min_models']} models and "
         f">= {c['min_tasks']} tasks: {zs}. P@1, P@10, mAP and chance_P are means over the sub-zoos (then mean ± std over seeds).", "",
         f"NFN ({sa['nfn']['layers']} HNP layers, {sa['nfn']['hidden_channels']} channels): `nfn (random init)` is "
         f"{sa['nfn']['random_init']}; trained NFN: {sa['nfn']['trained']}. `random (chance)` ranks by random "
         f"embeddings; `shape_only` ties every model of a sub-zoo, so it is a chance anchor too.", ""]
    if sa.get("missing"):
        L += ["Missing: " + "; ".join(sa["missing"]), ""]
    return L + [md_table(same_architecture_table(sa)), ""]


def analysis_lines(r: Mapping) -> list[str]:
    """Plain statements of what the numbers show (no number that is not in results.json)."""
    out = []
    for proto in HEADLINE:
        table = retrieval_table(r, proto)
        vals = {m: _mean(v.get("P@10")) for m, v in table.items() if v.get("P@10") is not None}
        if not vals:
            continue
        best = max(vals, key=vals.get)
        line = f"- {proto}: best P@10 {vals[best]:.3f} ({best})"
        if "input_profile" in vals:
            line += f"; input-profile reference {vals['input_profile']:.3f}"
        if "shape_only" in vals:
            line += f"; shape-only {vals['shape_only']:.3f}"
        trained = {m: v for m, v in vals.items() if "[" in m and "untrained" not in m}
        if trained:
            tb = max(trained, key=trained.get)
            line += f"; best trained encoder {tb} {trained[tb]:.3f}"
            if "input_profile" in vals:
                d = trained[tb] - vals["input_profile"]
                line += f" ({'above' if d > 0 else 'below'} the input profile by {abs(d):.3f})"
        out.append(line + ".")
    uns = {m: _mean(v.get("P@10")) for m, v in retrieval_table(r, "unseen_tasks").items()}
    if uns:
        ok = [m for m, v in uns.items() if v is not None and v >= 0.9]
        out.append(f"- Target P@10 >= 0.9 on unseen tasks within shape group: "
                   f"{'met by ' + ', '.join(ok) if ok else 'not met by any method'}.")
    taus = {m: _mean(_get(a, "properties", "test_acc", "ridge", "within_kendall")) for m, a in r.get("methods", {}).items()}
    taus = {m: v for m, v in taus.items() if v is not None and v == v}
    if taus:
        best = max(taus, key=taus.get)
        out.append(f"- Within-task Kendall tau of predicted test accuracy: best {taus[best]:.3f} ({best}); "
                   f"target 0.5 {'met' if taus[best] >= 0.5 else 'not met'}.")
    sa = {m: _mean(_get(a, "mean", "P@10")) for m, a in (_get(r, "same_architecture", "methods") or {}).items()}
    sa = {m: v for m, v in sa.items() if v is not None}
    if sa:
        best = max(sa, key=sa.get)
        nfn = {m: v for m, v in sa.items() if m.startswith("nfn")}
        out.append(f"- Same-architecture sub-zoos: best P@10 {sa[best]:.3f} ({best})"
                   + "".join(f"; {m} {v:.3f}" for m, v in nfn.items())
                   + (f"; random {sa['random (chance)']:.3f}" if "random (chance)" in sa else "") + ".")
    sym = _get(r, "symmetry_robustness", "methods") or {}
    for m, v in sym.items():
        if abs(v["drop"]["P@10"]) <= 1e-9:
            continue
        if v.get("embedding_cosine", 0.0) >= 1 - 1e-6 and v.get("max_abs_embedding_change", 1.0) < 1e-4:
            # float summation order moves embeddings by ~1e-7, enough to reorder exact ties in a ranking
            out.append(f"- {m} is symmetry invariant up to float rounding (largest embedding change "
                       f"{v['max_abs_embedding_change']:.1e}); P@10 moves by {v['drop']['P@10']:+.4f} from reordered ties.")
        else:
            out.append(f"- {m} is not symmetry invariant: P@10 changes by {v['drop']['P@10']:.3f} on transformed "
                       f"queries (embedding cosine {v.get('embedding_cosine', float('nan')):.3f}).")
    failed = [k for k, s in r.get("stages", {}).items() if s["status"] != "ok"]
    if failed:
        out.append(f"- Stages that did not finish: {', '.join(failed)} (see the Stages table).")
    return out or ["- No metric was produced."]
