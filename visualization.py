"""Figures drawn from results.json. Nothing here recomputes a metric.

Every figure function takes the part of the results dict it draws and a ``save_as`` path,
and returns the path it wrote. ``ResultsVisualizer(results).plot_all(fig_dir)`` draws every
figure whose data is present and returns {name: path}; figures whose data is absent are
simply not drawn (the report says which stages did not run).
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless; set before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

_DPI = 120


def _mean_std(v) -> tuple[float, float]:
    """An aggregated metric is {"mean", "std", ...}; a plain number has std 0."""
    if isinstance(v, Mapping):
        return float(v["mean"]), float(v.get("std", 0.0))
    return float(v), 0.0


def _set_title(ax, title: str, width: int = 60) -> None:
    """A title wrapped to the figure's width (a long one is not cut at the edge)."""
    ax.set_title("\n".join(textwrap.wrap(title, width)) or title)


def _save(fig, save_as: str | Path) -> str:
    save_as = Path(save_as)
    save_as.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(save_as, dpi=_DPI)
    plt.close(fig)
    return str(save_as)


class ResultsVisualizer:
    """Draws the report's figures from a results dict (the content of results.json)."""

    def __init__(self, results: Mapping | None = None):
        self.results = results or {}

    # --- retrieval -------------------------------------------------------------
    def plot_retrieval_metrics(self, metrics: Mapping[str, Mapping], save_as: str | Path,
                               metric_names: Sequence[str] = ("P@1", "P@10", "mAP", "MRR"),
                               title: str = "Retrieval") -> str:
        """Grouped bars: one group per method, one bar per metric (mean ± std over seeds)."""
        methods = list(metrics)
        names = [m for m in metric_names if any(m in metrics[meth] for meth in methods)]
        fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(methods) * max(1, len(names)) / 2 + 2), 4))
        width = 0.8 / max(1, len(names))
        x = np.arange(len(methods))
        for j, name in enumerate(names):
            ms = [_mean_std(metrics[m][name]) if name in metrics[m] else (np.nan, 0.0) for m in methods]
            ax.bar(x + j * width - 0.4 + width / 2, [a for a, _ in ms], width, yerr=[b for _, b in ms],
                   label=name, capsize=2)
        ax.set_xticks(x)
        ax.set_xticklabels(methods, rotation=30, ha="right")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("score")
        _set_title(ax, title)
        ax.legend(fontsize=8, ncol=len(names))
        return _save(fig, save_as)

    def plot_precision_at_k(self, metrics: Mapping[str, Mapping], save_as: str | Path,
                            title: str = "Precision@k") -> str:
        """Precision@k against k, one line per method (keys 'P@<k>')."""
        fig, ax = plt.subplots(figsize=(6, 4))
        for method, m in metrics.items():
            ks = sorted(int(k[2:]) for k in m if k.startswith("P@"))
            if not ks:
                continue
            ys = [_mean_std(m[f"P@{k}"]) for k in ks]
            ax.errorbar(ks, [a for a, _ in ys], yerr=[b for _, b in ys], marker="o", label=method, capsize=2)
        ax.set_xlabel("k")
        ax.set_ylabel("precision@k")
        ax.set_ylim(0, 1.05)
        _set_title(ax, title)
        ax.legend(fontsize=8)
        return _save(fig, save_as)

    # --- embeddings ------------------------------------------------------------
    def plot_umap(self, xy: Sequence[Sequence[float]], colour: Sequence, save_as: str | Path,
                  title: str, categorical: bool = True, max_legend: int = 12) -> str:
        """2-D projection (coordinates from results.json) coloured by a label or a value."""
        xy = np.asarray(xy, dtype=float)
        assert xy.ndim == 2 and xy.shape[1] == 2, f"expected (n, 2) coordinates, got {xy.shape}"
        fig, ax = plt.subplots(figsize=(6.5, 5))
        if categorical:
            labels = np.asarray([str(c) for c in colour])
            uniq = sorted(set(labels))
            cmap = plt.get_cmap("tab20", max(len(uniq), 1))
            for i, u in enumerate(uniq):
                sel = labels == u
                ax.scatter(xy[sel, 0], xy[sel, 1], s=5, color=cmap(i), label=u if len(uniq) <= max_legend else None)
            if len(uniq) <= max_legend:
                ax.legend(fontsize=7, markerscale=2, loc="best")
            else:
                ax.text(0.01, 0.01, f"{len(uniq)} classes (legend omitted)", transform=ax.transAxes, fontsize=8)
        else:
            sc = ax.scatter(xy[:, 0], xy[:, 1], s=5, c=np.asarray(colour, dtype=float), cmap="viridis")
            fig.colorbar(sc, ax=ax)
        ax.set_xticks([])
        ax.set_yticks([])
        _set_title(ax, title)
        return _save(fig, save_as)

    # --- properties ------------------------------------------------------------
    def plot_predicted_vs_true(self, true: Sequence[float], pred: Sequence[float], save_as: str | Path,
                               title: str = "Predicted vs true test accuracy") -> str:
        t, p = np.asarray(true, float), np.asarray(pred, float)
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.scatter(t, p, s=5, alpha=0.6)
        lo, hi = float(min(t.min(), p.min())), float(max(t.max(), p.max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set_xlabel("true")
        ax.set_ylabel("predicted")
        _set_title(ax, title)
        return _save(fig, save_as)

    # --- training --------------------------------------------------------------
    def plot_training_curves(self, history: Sequence[Mapping], save_as: str | Path,
                             val_name: str = "validation P@10", title: str = "Encoder training") -> str:
        epochs = [h["epoch"] for h in history]
        fig, ax1 = plt.subplots(figsize=(6, 4))
        ax1.plot(epochs, [h["train_loss"] for h in history], "o-", color="tab:blue", label="train loss")
        ax1.set_xlabel("epoch")
        ax1.set_ylabel("train loss", color="tab:blue")
        vals = [(h["epoch"], h["val_metric"]) for h in history if h.get("val_metric") is not None]
        if vals:
            ax2 = ax1.twinx()
            ax2.plot(*zip(*vals), "s-", color="tab:orange", label=val_name)
            ax2.set_ylabel(val_name, color="tab:orange")
        _set_title(ax1, title)
        return _save(fig, save_as)

    def plot_symmetry_robustness(self, robustness: Mapping[str, Mapping], save_as: str | Path,
                                 metric: str = "P@10") -> str:
        """Bars of the metric on clean vs symmetry-transformed queries, per method."""
        methods = list(robustness)
        clean = [_mean_std(robustness[m]["clean"])[0] for m in methods]
        trans = [_mean_std(robustness[m]["transformed"])[0] for m in methods]
        x = np.arange(len(methods))
        fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(methods) + 2), 4))
        ax.bar(x - 0.2, clean, 0.4, label="original queries")
        ax.bar(x + 0.2, trans, 0.4, label="permuted+rescaled+sign-flipped")
        ax.set_xticks(x)
        ax.set_xticklabels(methods, rotation=30, ha="right")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(metric)
        _set_title(ax, "Symmetry robustness")
        ax.legend(fontsize=8)
        return _save(fig, save_as)

    def plot_transfer(self, tasks: Mapping[str, Mapping], save_as: str | Path) -> str:
        """The transfer protocol's test accuracy / target against fine-tuning steps, mean ± std over the tasks:
        one curve per retrieval method and one for the random compatible models (the same for every method)."""
        arms: dict[str, list] = {}
        for t in tasks.values():
            for j, (method, r) in enumerate(t["methods"].items()):
                for arm, name in (("retrieved", f"retrieved by {method}"), ("random", "random compatible")):
                    if r[arm].get("curves") and (arm == "retrieved" or j == 0):
                        arms.setdefault(name, []).append(
                            np.mean([c["acc"] for c in r[arm]["curves"]], 0) / max(t["target_acc"], 1e-9))
                        steps = r[arm]["curves"][0]["step"]
        curves = {n: {"x": steps, "y": np.mean(v, 0).tolist(), "std": np.std(v, 0).tolist()} for n, v in arms.items()}
        return self.plot_curves(curves, save_as, "fine-tuning steps", "test accuracy / target (mean over tasks)",
                                f"Fine-tuning retrieved vs random models ({len(tasks)} test-unseen tasks)")

    def plot_curves(self, curves: Mapping[str, Mapping[str, Sequence[float]]], save_as: str | Path,
                    xlabel: str, ylabel: str, title: str, logx: bool = False) -> str:
        """Generic line plot: {label: {"x": [...], "y": [...], optional "std": [...], optional "dashed": bool}}."""
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, c in curves.items():
            x, y = np.asarray(c["x"], float), np.asarray(c["y"], float)
            ax.plot(x, y, marker="" if c.get("dashed") else "o", ms=3, ls="--" if c.get("dashed") else "-", label=label)
            if c.get("std") is not None:
                s = np.asarray(c["std"], float)
                ax.fill_between(x, y - s, y + s, alpha=0.2)
        if logx:
            ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        _set_title(ax, title)
        ax.legend(fontsize=8)
        return _save(fig, save_as)
