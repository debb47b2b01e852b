"""Run bookkeeping and the Markdown report.

``RunRecorder`` times stages, records their status (ok / failed / not built / skipped) and
writes results.json atomically after every stage, so a crash never loses what was already
measured. ``render_markdown(results)`` turns results.json into results.md; every number in
the Markdown is formatted from the JSON, nothing is computed here. Its siblings: ``report_format.py`` (cells,
tables, reading results.json; re-exported here) and ``report_comparison.py`` (the issue-16 section).
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

from report_comparison import FOUR_PROTOCOLS, by_shape_group, comparison_lines, headline_methods
from report_format import (HEADLINE, REFERENCE_ORDER, RETRIEVAL_COLUMNS, fmt, get_path, is_oracle,  # noqa: F401 (re-exported)
                           md_table, mean_value, ordered_methods, retrieval_table, strongest_fingerprint)

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
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    if verbose:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(formatter)
        root.addHandler(h)
    if log_path is not None:
        fh = logging.FileHandler(log_path, mode="a")
        fh.setFormatter(formatter)
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


# --- the report ----------------------------------------------------------------
VALIDATION_COLUMNS = ["val_seen_P@10", "val_unseen_P@10", "val_P@10", "val_seen_chance_P", "val_unseen_chance_P"]
PROPERTY_COLUMNS = ("R2", "spearman", "kendall", "within_kendall", "within_kendall_final", "within_kendall_task_epoch")

# How each design default was chosen: which data the choice read (rendered into every results.md).
DESIGN_CHOICES: tuple[tuple[str, tuple[tuple[str, str], ...], str], ...] = (
    ("view recipe", (("train", "view_recipe"),),
     "the configured recipe: no recipe comparison ran (compare_epochs 0); no split was read"),
    ("best epoch of each training", (),
     "the validation protocol's val_P@10 on the same validation data, per training"),
    ("GNN readout io_slots", (("encoder", "io_slots"),),
     "the default 4 was chosen before issue #14 on within-shape-group P@10 of the seed-42 split, whose queries "
     "were mostly held-out-task models: that choice saw TEST queries. Not re-checked on validation data"),
    ("epochs, batch size, encoder width and depth", (("train", "epochs"), ("train", "batch_size"),
                                                     ("encoder", "hidden_dim"), ("encoder", "message_passing_steps")),
     "sized to the 15-minute CPU budget (run time, not a metric); no split was read"),
    ("temperature, learning rate, weight decay", (("train", "temperature"), ("train", "learning_rate"),
                                                  ("train", "weight_decay")),
     "common contrastive-learning defaults; no record of tuning them on any split"),
    ("held-out fractions and the unseen-kind rule", (("eval", "heldout_task_fraction"),
                                                     ("eval", "val_unseen_task_fraction"), ("eval", "unseen_kind")),
     "protocol design (issue #14): fixed before any metric of this protocol was read"),
    ("probes and clustering", (("eval", "probes"),),
     "fixed a priori: RidgeCV picks its alpha by cross-validation on the fit rows only; k-means k = number of tasks"),
)


def trivial_notes(results: Mapping, section: str, where: str = "here") -> list[str]:
    """Notes for a table whose protocol a constant or shape-only embedding passes (evaluation.trivial_passes)."""
    tp = results.get("trivial_passes") or {}
    hits = (tp.get("sections") or {}).get(section, [])
    return [f"> **Note:** `{h['method']}` (reads no function) reaches {h['metric']} {h['max']:.3f} {where} (>= "
            f"{tp['threshold']} in {h['seeds']} of {h['n']} seeds): this number is passed without reading what the "
            f"networks compute." for h in hits]


def render_figures(results: Mapping, fig_dir: Path) -> dict[str, str]:
    """Draw every figure whose data is in ``results``; returns {name: path}."""
    from visualization import ResultsVisualizer

    viz = ResultsVisualizer(results)
    figs: dict[str, str] = {}
    four = list(dict.fromkeys(headline_methods(results).values()))
    for proto in FOUR_PROTOCOLS:  # grouped bars: one group per shape group, one bar per method
        table = by_shape_group(results, proto, four)
        if table:
            figs[f"p10_by_shape_group_{proto}"] = viz.plot_retrieval_metrics(
                table, fig_dir / f"p10_by_shape_group_{proto}.png", metric_names=four,
                title=f"P@10 per shape group: {proto}")
    for proto in tuple(results.get("headline_protocols", HEADLINE)) + ("within_shape_group",):
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
    sym = get_path(results, "symmetry_robustness", "methods")
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
    pairs = get_path(results, "merging", "pairs")
    if pairs:
        alphas = results["merging"]["alphas"]
        curves = {}
        for kind in ("naive", "aligned"):
            accs = np.array([p[kind]["acc"] for p in pairs])
            curves[f"{kind} averaging"] = {"x": alphas, "y": accs.mean(0).tolist(), "std": accs.std(0).tolist()}
        figs["merging"] = viz.plot_curves(curves, fig_dir / "merging.png", "alpha (interpolation)",
                                          "test accuracy", f"Interpolation between two models (mean of {len(pairs)} pairs)")
    sc = get_path(results, "scaling", "summary")
    if sc:
        ns = sorted({n for v in sc.values() for n in v["n"]})
        curves = {m: ({"x": ns[:1] + ns[-1:], "y": [v["P@10"]["mean"]] * 2, "dashed": True} if v["flat"] else
                      {"x": v["n"], "y": v["P@10"]["mean"], "std": v["P@10"]["std"]}) for m, v in sc.items()}
        figs["scaling"] = viz.plot_curves(curves, fig_dir / "scaling.png", "training tasks", "unseen-task P@10",
                                          f"Unseen-task P@10 vs training tasks ({len(results['scaling']['per_seed'])} "
                                          "seeds; dashed: training-free)", logx=True)
    tasks = get_path(results, "transfer", "tasks")
    if tasks:
        figs["transfer"] = viz.plot_transfer(tasks, fig_dir / "transfer.png")
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
          f"- seeds {r.get('seeds')}: every number is mean ± std over them, and each seed draws its own split "
          f"(held-out tasks and kind; the same for every method), so the std includes the split's variance",
          f"- encoder `{get_path(cfg, 'encoder', 'model')}` hidden {get_path(cfg, 'encoder', 'hidden_dim')}, "
          f"{get_path(cfg, 'encoder', 'message_passing_steps')} message-passing steps, embedding {get_path(cfg, 'encoder', 'global_dim')}; "
          f"{get_path(cfg, 'train', 'epochs')} epochs, batch {get_path(cfg, 'train', 'batch_size')}, "
          f"temperature {get_path(cfg, 'train', 'temperature')}, canonical form {get_path(cfg, 'graph', 'canonicalize')}",
          f"- versions: {', '.join(f'{k} {v}' for k, v in r.get('versions', {}).items())}", ""]
    L += zoo_lines(r) + split_lines(r) + ["### Stages", ""] + _stage_lines(r) + [""]
    skipped = {**r.get("skipped_methods", {}), **r.get("failed_methods", {})}
    if skipped:
        L += ["Methods not reported: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()), ""]
    L += choices_lines(r) + recipe_lines(r) + comparison_lines(r)
    if r.get("methods"):
        L += retrieval_lines(r) + clustering_and_property_lines(r)
    L += same_architecture_lines(r) + hyperreps_lines(r) + extra_protocol_lines(r) + scaling_lines(r)
    figs = r.get("figures", {})
    other = [k for k in figs if k.startswith(("umap_", "training_", "precision_at_k_"))]
    if other:
        L += ["## More figures", ""] + [f"![{k}]({figs[k]})" for k in other] + [""]
    L += ["## Analysis", ""] + analysis_lines(r) + [""]
    return "\n".join(L)


def zoo_lines(r: Mapping) -> list[str]:
    z = r.get("zoo")
    if not z:
        return []
    sources = z.get("sources", [])
    L = ["### Zoo", "",
         f"{z['num_models']} checkpoints of {z['num_runs']} training runs on **{z['num_tasks']} tasks from "
         f"{z['num_datasets']} sources** ({', '.join(sources)}), {z['num_architectures']} architectures "
         f"({', '.join(z['arch_families'])}). Tasks per shape group: {z['tasks_per_shape_group']} (task lists in "
         f"results.json, `zoo.tasks_by_shape_group`).", ""]
    if "runs_per_task" in z:
        L += [f"Per task: {_span(z['runs_per_task'])} training runs, {_span(z['models_per_task'])} checkpoints, "
              f"{_span(z['final_models_per_task'])} final checkpoints ({z['checkpoints_per_run']} checkpoints per run, "
              f"{z['zoo_epochs']} epochs; a run that diverged keeps its checkpoints before it). A query reaches "
              f"P@10 = 1 only if its task has >= 10 models of other runs.", ""]
    if "final_test_acc_by_task_family" in z:
        L += [md_table({k: {"mean final test acc": v} for k, v in z["final_test_acc_by_task_family"].items()},
                       first="task family"), ""]
    return L


def split_lines(r: Mapping) -> list[str]:
    s = r.get("split")
    if not s or "seeds" not in s:
        return []
    rows = {seed: {"unseen kind": f"{v['unseen_kind'] or '—'} ({', '.join(v['unseen_kind_tasks'])})",
                   "test-unseen tasks": ", ".join(v["test_unseen_tasks"]) or "—",
                   "val-unseen tasks": ", ".join(v["val_unseen_tasks"]) or "—",
                   "train / val / test runs' models": f"{v['n_train']} / {v['n_val']} / {v['n_test']}"}
            for seed, v in s["seeds"].items()}
    return ["### Splits (one per seed)", "", s["note"] + ".", "", md_table(rows, first="seed"), ""]


def choices_lines(r: Mapping) -> list[str]:
    """The "how these numbers were chosen" section: each design default and the data its choice read."""
    cfg = r.get("config", {})
    rows = {name: {"value in this run": ", ".join(f"{k} {get_path(cfg, sec, k)}" for sec, k in fields) or "per training",
                   "how it was chosen": how} for name, fields, how in DESIGN_CHOICES}
    rc = r.get("recipe_comparison") or {}
    if rc.get("ran"):
        rows["view recipe"] = {
            "value in this run": "; ".join(f"seed {s}: {v['chosen_self_supervised']}" for s, v in rc["seeds"].items()),
            "how it was chosen": "per seed by this run's recipe comparison on that seed's validation protocol (val runs "
                                 "of seen tasks and val-unseen tasks); test runs, test-unseen and unseen-kind models "
                                 "are not in the data it reads"}
    return ["## How these numbers were chosen", "",
            "Which data chose each design default. Test runs, test-unseen and unseen-kind models are read by no "
            "choice of this run; one past choice (io_slots) did read test queries, as said below.", "",
            md_table(rows, first="design choice"), ""]


def recipe_lines(r: Mapping) -> list[str]:
    rc = r.get("recipe_comparison")
    if not rc or not rc.get("ran"):
        return []
    seeds = rc["seeds"]
    recipes = list(next(iter(seeds.values()))["recipes"])
    rows = {rec: {"kind": next(iter(seeds.values()))["recipes"][rec]["kind"],
                  **{f"seed {s}": v["recipes"][rec]["val_metric"] for s, v in seeds.items()}} for rec in recipes}
    chosen = "; ".join(f"seed {s}: {v['chosen_self_supervised']} (overall {v['chosen']})" for s, v in seeds.items())
    return ["## View recipes (validation protocol, per seed)", "",
            f"{rc['metric']} after {rc['epochs']} epoch(s), on each seed's validation data (see the validation "
            "protocol below).", "", md_table(rows, first="recipe"),
            f"Best self-supervised recipe per seed: {chosen}. It and the weakly supervised supcon are trained below; "
            "anything trained with task labels (supcon) is an upper anchor on seen tasks, and claims about it rest "
            "on the unseen-task protocols.", ""]


def retrieval_lines(r: Mapping) -> list[str]:
    notes = r.get("protocol_notes", {})
    headline = tuple(r.get("headline_protocols", HEADLINE))
    L = ["## Retrieval: headline protocols", "",
         "Database: the whole zoo, each query searched within its shape group (same input/output sizes); other "
         "checkpoints of the query's own training run are removed from its database. `chance_P` is the precision "
         "of a random ranking; `random (chance)` and `constant` measure it with the same code, `shape_only` shows "
         "what shapes alone give. Metadata oracles (model cards naming the task) are never in these tables.", ""]
    for proto in headline:
        L += protocol_table_lines(r, proto, notes.get(proto, ""))
    val = {m: {c: a["validation"][c] for c in VALIDATION_COLUMNS if c in a["validation"]}
           for m in ordered_methods(r) if "validation" in (a := r["methods"][m])}
    if val:
        L += ["### validation", "", notes.get("validation", ""), "", md_table(val), ""] + trivial_notes(r, "validation")
        L += [""]
    L += ["## Retrieval: secondary protocols", ""]
    for proto in [p for p in notes if p not in headline and p != "validation"]:
        L += protocol_table_lines(r, proto, notes[proto])
    oracles = [m for m in r["methods"] if is_oracle(m)]
    if oracles:
        L += ["### Oracles (not baselines)", "", "These read what the weights do not give: model cards that name the "
              "task (a partial label oracle), or the training metadata of the property oracles (see the property "
              "tables).", "", md_table({m: {p: get_path(r["methods"][m], "retrieval", p, "P@10") for p in headline}
                                        for m in oracles}), ""]
    reduced = {m: a["dims"] for m, a in r["methods"].items()
               if "dims" in a and a["dims"]["probes"]["mean"] < a["dims"]["embedding"]["mean"]}
    if reduced:
        L += ["Clustering and the probes below see the top principal components (fit on the train rows) of "
              "embeddings wider than the probe limit: " + ", ".join(
                  f"{m} {a['embedding']['mean']:.0f} -> {a['probes']['mean']:.0f} dims" for m, a in reduced.items())
              + "; retrieval uses every dimension.", ""]
    return L


def protocol_table_lines(r: Mapping, proto: str, note: str) -> list[str]:
    table = retrieval_table(r, proto)
    if not table:
        skipped = {m: get_path(a, "retrieval", "skipped", proto) for m, a in r["methods"].items()}
        reason = next((v for v in skipped.values() if isinstance(v, str)), None)
        return [f"### {proto}", "", f"Not measured: {reason}.", ""] if reason else []
    L = [f"### {proto}", "", note, "", md_table(table)]
    fp = strongest_fingerprint(r, proto)
    if fp:
        L += [f"Strongest training-free fingerprint here: `{fp}`."]
    L += trivial_notes(r, f"retrieval/{proto}") + [""]
    if f"retrieval_{proto}" in r.get("figures", {}):
        L += [f"![{proto}]({r['figures'][f'retrieval_{proto}']})", ""]
    return L


def clustering_and_property_lines(r: Mapping) -> list[str]:
    ms = {m: r["methods"][m] for m in ordered_methods(r)}
    L = ["## Clustering (k-means within each shape group, k = its number of tasks)", "",
         "Scores are means over the shape groups holding >= 2 tasks among the clustered models (`n_groups`); "
         "`clustering`: all test queries; `clustering_unseen_tasks`: test-unseen and unseen-kind models.", ""]
    for key in ("clustering", "clustering_unseen_tasks"):
        rows = {m: {c: a[key][c] for c in ("purity", "ARI", "NMI", "n_groups") if c in a[key]}
                for m, a in ms.items() if key in a}
        if rows:
            L += [f"### {key}", "", md_table(rows)] + trivial_notes(r, key) + [""]
    L += ["## Property prediction (ridge probe on embeddings; fit on seen tasks' train and val runs, scored on the "
          "test queries)", "",
          "`within_kendall`: Kendall tau within each task over all its checkpoints (mixes training epochs); "
          "`within_kendall_final`: within task, final checkpoints only; `within_kendall_task_epoch`: within each "
          "(task, epoch).", ""]
    notes = get_path(r, "reference_methods", "property_oracles") or {}
    oracles = {m: r["methods"][m] for m in notes if m in r["methods"]}
    if oracles:
        L += ["The last rows are oracles, not baselines: each reads metadata the weights do not give (" + "; ".join(
            f"`{m.split(' [')[0]}`: {notes[m]}" for m in oracles) + "). They bound how predictable a target is here.", ""]
    targets = sorted({t for a in ms.values() for t in a.get("properties", {})})
    for t in targets:
        rows = {m: {c: a["properties"][t]["ridge"][c] for c in PROPERTY_COLUMNS if c in a["properties"][t].get("ridge", {})}
                for m, a in {**ms, **oracles}.items() if t in a.get("properties", {})}
        L += [f"### {t}", "", md_table(rows)] + trivial_notes(r, f"properties/{t}/ridge") + [""]
    return L


def extra_protocol_lines(r: Mapping) -> list[str]:
    L: list[str] = []
    sym = get_path(r, "symmetry_robustness", "methods")
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
                    "start acc, retrieved": v["retrieved"]["mean_start_acc"],
                    "start acc, random": v["random"]["mean_start_acc"],
                    "acc after budget, retrieved": v["retrieved"]["mean_final_acc"],
                    "acc after budget, random": v["random"]["mean_final_acc"], "step ratio": v["step_ratio"]}
        L += [f"## Transfer (fine-tune top-{tr['k']} retrieved vs {tr['k']} random compatible models, "
              f"{tr['steps']} steps)", "", f"Tasks: {tr.get('task_draw', 'the first test-unseen tasks')}; target: "
              "0.9 x the query model's test accuracy; steps to target of a model that never reaches it count as the "
              "budget." + "".join(f" Skipped {k}: {v}." for k, v in (tr.get("skipped") or {}).items()), "",
              md_table(rows, first="test-unseen task (retrieval method)"), ""]
        if tr.get("summary"):
            L += ["Step ratio (retrieved / random) over the tasks: mean and median of the per-task ratios, and pooled "
                  "(all tasks' steps, retrieved over random).", "", md_table(tr["summary"], first="retrieval method"), ""]
        if "transfer" in r.get("figures", {}):
            L += [f"![transfer]({r['figures']['transfer']})", ""]
    return L


SCALING_HEADING = "Scaling: unseen-task P@10 against the number of training tasks"


def scaling_table(sc: Mapping) -> dict[str, dict]:
    """{method: {"n = <tasks>": "mean ± std" of P@10}}; training-free methods have one value for every size."""
    trained = [v for v in sc["summary"].values() if not v["flat"]]
    cols = {k: (f"n = {k}" if k != "all" else f"all (n = {n:.0f})") for k, n in zip(trained[0]["sizes"], trained[0]["n"])} \
        if trained else {}
    rows = {}
    for m, v in sc["summary"].items():
        p = v["P@10"]
        rows[m] = {c: (f"{p['mean']:.3f} ± {p['std']:.3f}" if v["flat"] else
                       f"{p['mean'][v['sizes'].index(k)]:.3f} ± {p['std'][v['sizes'].index(k)]:.3f}")
                   for k, c in cols.items()}
    return rows


def scaling_lines(r: Mapping) -> list[str]:
    sc = r.get("scaling")
    if not sc:
        return []
    seeds = list(sc["per_seed"].values())
    epochs = seeds[0]["epochs"]
    L = [f"## {SCALING_HEADING}", "", sc["note"], "",
         f"Encoder `{sc['encoder']}`, recipes {', '.join(sc['recipes'])}; {len(seeds)} seeds (mean ± std); "
         f"seen tasks per seed: {', '.join(str(s['n_seen_tasks']) for s in seeds)} (each seed holds out its own unseen "
         "kind; \"all\" is every seen task); training epochs per size (first seed): "
         + ", ".join(f"{n}: {e}" for n, e in epochs.items())
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
    names = {z["arch_id"]: f"on sub-zoo {z['arch_name']}" for z in sa["subzoos"]}
    notes = [line for zoo in sa.get("trivial_passes", {}).get("sections", {})
             for line in trivial_notes(sa, zoo, names.get(zoo, "on the sub-zoo mean"))]
    return L + [md_table(same_architecture_table(sa))] + notes + [""]


HYPERREPS_TARGETS = ("test_acc", "epoch", "log_lr")
HYPERREPS_REFERENCES = ("statnn", "input_profile", "probe_fingerprint", "shape_only")
# tau: within-task Kendall tau over all checkpoints; tau final: final checkpoints only (test_acc)
HYPERREPS_COLUMNS = (("R2", "R2"), ("tau", "within_kendall"), ("tau final", "within_kendall_final"))
RECON_COLUMNS = {"mean_r2": "R2 weights", "mean_r2_standardized": "R2 per-layer standardized", "pooled_r2": "R2 pooled",
                 "mean_acc_original": "acc original", "mean_acc_reconstructed": "acc reconstructed",
                 "mean_acc_drop": "acc drop", "frac_within_5_points": "within 5 points"}


def hyperreps_rows(r: Mapping) -> dict[str, dict]:
    """The beta ablation beside its references: {method: {"<target> R2" / "<target> tau": aggregated value}}
    (ridge probe; tau = within-task Kendall tau, tau final: over final checkpoints). Rows: each beta, the untrained encoders, the trained
    encoders of the run, StatNN and the training-free fingerprints, those that were evaluated."""
    methods = r.get("methods", {})
    hyper = list((get_path(r, "hyperreps", "methods") or {}).values())
    encoders = [m for m in methods if "[" in m and m not in hyper and not is_oracle(m)]
    # the ablation's untrained twin first, the other untrained encoders, the trained ones; the property oracles last
    order = hyper + sorted(encoders, key=lambda m: ("hyperreps" not in m, "untrained" not in m)) + list(
        HYPERREPS_REFERENCES) + list(get_path(r, "reference_methods", "property_oracles") or {})
    rows = {}
    for m in (m for m in order if m in methods):
        props = methods[m].get("properties", {})
        rows[m] = {f"{t} {name}": props[t]["ridge"][key] for t in HYPERREPS_TARGETS if t in props
                   for name, key in HYPERREPS_COLUMNS if key in props[t]["ridge"] and (t == "test_acc" or name != "tau final")}
    return rows


def hyperreps_lines(r: Mapping) -> list[str]:
    """The hyper-representation section of results.md (empty unless the hyperreps stage recorded numbers)."""
    h = r.get("hyperreps")
    if not h:
        return []
    v = h["views"]
    L = ["## Hyper-representations (seed 004): contrast + weight reconstruction", "",
         f"`{h['model']}` trained {h['epochs']} epoch(s) per beta (the last kept) with L = (1 - beta) L_con + beta L_rec (beta 0: "
         f"contrastive only, 1: reconstruction only), same initialisation, data and views for every beta. Views "
         f"(positives: two views of one model): multiplicative Gaussian weight noise std {v['noise_std']}, erasing of "
         f"a contiguous span of {v['erase_fraction']} of the weights, neuron permutation {'on' if v['permute'] else 'off'} "
         f"(a no-op for permutation-equivariant encoders and decoder on canonical graphs). Decoder: {h['design']}.", "",
         "### Property prediction (ridge probe fit on seen tasks' train and val runs, scored on the test queries: "
         "seen tasks' test runs, test-unseen and unseen-kind models; tau = within-task Kendall tau over all "
         "checkpoints, tau final = over final checkpoints)", "",
         md_table(hyperreps_rows(r)), ""]
    rq = h.get("reconstruction", {})
    if rq:
        L += [f"### Reconstruction quality ({h['n_query_models']} test queries: seen tasks' test runs, test-unseen and unseen-kind models)", "",
              "R2 of each model's canonical weights and biases (mean over models; per-layer standardized: every "
              "layer's weight and bias block at unit RMS; pooled: all models' weights at once); accuracy of the "
              "original and the rebuilt networks on their task's test data (`architecture.forward`).", "",
              md_table({m: {c: q[k] for k, c in RECON_COLUMNS.items() if k in q} for m, q in rq.items()}), ""]
    return L + ["### Hyper-representation targets", ""] + hyperreps_analysis(r) + [""]


def hyperreps_analysis(r: Mapping) -> list[str]:
    """Plain statements on the issue's targets, from the numbers in results.json."""
    h = r["hyperreps"]
    out = []
    for m, q in h.get("reconstruction", {}).items():
        r2, drop = mean_value(q["mean_r2"]), mean_value(q["mean_acc_drop"])
        out.append(f"- {m}: reconstruction R2 {r2:.3f} ({'meets' if r2 >= 0.9 else 'misses'} the 0.9 target); "
                   f"rebuilt networks {drop * 100:.1f} points below the originals' test accuracy on average "
                   f"({'within' if abs(drop) <= 0.05 else 'outside'} the 5-point target).")
    if not h.get("reconstruction"):
        out.append("- No decoder was trained (no beta > 0): reconstruction quality not measured.")
    rows = hyperreps_rows(r)
    if "statnn" not in rows:
        return out + ["- StatNN was not evaluated: the comparison with it is not made."]
    for col in ("R2", "tau"):
        ref = {t: mean_value(rows["statnn"].get(f"{t} {col}")) for t in ("epoch", "log_lr")}
        beats = [m for m in h["methods"].values() if m in rows
                 and all(mean_value(rows[m].get(f"{t} {col}")) is not None and ref[t] is not None
                         and mean_value(rows[m][f"{t} {col}"]) > ref[t] for t in ref)]
        out.append(f"- Epoch and log_lr prediction ({col}): " + (f"{', '.join(beats)} beat StatNN on both"
                   if beats else "no beta beats StatNN on both") + ".")
    return out


def analysis_lines(r: Mapping) -> list[str]:
    """Plain statements of what the numbers show (no number that is not in results.json)."""
    out = []
    for proto in tuple(r.get("headline_protocols", HEADLINE)):
        table = retrieval_table(r, proto)
        vals = {m: mean_value(v.get("P@10")) for m, v in table.items() if v.get("P@10") is not None}
        if not vals:
            continue
        best = max(vals, key=vals.get)
        line = f"- {proto}: best P@10 {vals[best]:.3f} ({best})"
        fp = strongest_fingerprint(r, proto)
        for ref, name in ((fp, "strongest training-free fingerprint"), ("shape_only", "shape-only"),
                          ("random (chance)", "chance")):
            if ref in vals:
                line += f"; {name} {vals[ref]:.3f}" + (f" ({ref})" if ref == fp else "")
        trained = {m: v for m, v in vals.items() if m.endswith("]") and "untrained" not in m and not is_oracle(m)}
        if trained:
            tb = max(trained, key=trained.get)
            line += f"; best trained encoder {tb} {trained[tb]:.3f}"
            untrained = [m for m in vals if m.endswith("[untrained]")]
            if untrained:
                line += f" (untrained {vals[untrained[0]]:.3f})"
            if fp:
                d = trained[tb] - vals[fp]
                line += f", {'above' if d > 0 else 'below'} the fingerprint by {abs(d):.3f}"
        out.append(line + ".")
    uns = {m: mean_value(v.get("P@10")) for m, v in retrieval_table(r, "unseen_tasks").items()}
    if uns:
        ok = [m for m, v in uns.items() if v is not None and v >= 0.9]
        out.append(f"- Target P@10 >= 0.9 on test-unseen tasks within shape group: "
                   f"{'met by ' + ', '.join(ok) if ok else 'not met by any method'}.")
    taus = {m: mean_value(get_path(r["methods"][m], "properties", "test_acc", "ridge", "within_kendall_final"))
            for m in ordered_methods(r)}
    taus = {m: v for m, v in taus.items() if v is not None and v == v}
    if taus:
        best = max(taus, key=taus.get)
        out.append(f"- Within-task Kendall tau of predicted test accuracy (final checkpoints): best {taus[best]:.3f} "
                   f"({best}); target 0.6 {'met' if taus[best] >= 0.6 else 'not met'}.")
    n_trivial = sum(len(v) for v in (get_path(r, "trivial_passes", "sections") or {}).values())
    if n_trivial:
        out.append(f"- {n_trivial} score(s) are reached >= {r['trivial_passes']['threshold']} by a constant or "
                   "shape-only embedding; each is noted under its table.")
    sa = {m: mean_value(get_path(a, "mean", "P@10")) for m, a in (get_path(r, "same_architecture", "methods") or {}).items()}
    sa = {m: v for m, v in sa.items() if v is not None}
    if sa:
        best = max(sa, key=sa.get)
        nfn = {m: v for m, v in sa.items() if m.startswith("nfn")}
        out.append(f"- Same-architecture sub-zoos: best P@10 {sa[best]:.3f} ({best})"
                   + "".join(f"; {m} {v:.3f}" for m, v in nfn.items())
                   + (f"; random {sa['random (chance)']:.3f}" if "random (chance)" in sa else "") + ".")
    sym = get_path(r, "symmetry_robustness", "methods") or {}
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
    return out or ["- No retrieval table in this run" + ("; its result is the scaling table above." if r.get("scaling") else ".")]

