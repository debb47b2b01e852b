"""The scaling experiment: unseen-task retrieval against the number of tasks the encoder trains on.

    python run_experiment.py --experiment scaling                  # results/scaling
    python run_experiment.py --experiment scaling --small          # results/small_scaling, a quick version

Per eval seed the split is the main run's (``stages.draw_seed_split``): its test-unseen tasks are the
queries and stay fixed for every size; no held-out task (test-unseen, val-unseen, unseen kind) is trained on. The encoder the config names trains with each recipe of ``--scaling_recipes`` on the training
runs of the first n seen tasks (``tasks.task_subset`` over the seen tasks, seeded: nested subsets spread
over the shape groups) for every n of ``--scaling_tasks`` (0 = every seen task). With
``--scaling_equal_steps`` (the default) every n gets the optimizer steps of the full training set (more
epochs over fewer tasks), so a small n is not also a short training; every training keeps its last epoch
(no validation-based selection). Every encoder is scored with the
main run's protocol (``evaluation.retrieval_protocols``, ``unseen_tasks``: queries are the held-out tasks'
models, the database is the whole zoo, within shape group, the query's own run excluded). The
training-free methods (the untrained encoder, the configured baselines, fit on the split's fit rows
without task labels) do not depend on n: measured once per seed, reported as flat lines.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Sequence

import numpy as np

import dataloader as D
import evaluation as E
import stages as S
from config import ExperimentConfig
from contrastive_learning import embed, fit_contrastive
from data_prep import ModelZooDataset
from report import RunRecorder, StageFailed
from runtime import DistInfo, seed_everything
from symmetry import SymmetryAugmenter
from tasks import task_subset
from weight_to_graph import WeightToGraph

log = logging.getLogger("weightzoo")

METRICS = ("P@1", "P@10", "mAP")


def task_counts(sizes: Sequence[int], n_seen: int) -> list[int]:
    """The numbers of training tasks to run: ``sizes`` with 0 read as every seen task, capped at ``n_seen``,
    each once, ascending."""
    if any(s < 0 for s in sizes) or not sizes:
        raise ValueError(f"scaling_tasks must be non-negative task counts (0 = all seen tasks), got {list(sizes)}")
    return sorted({n_seen if s == 0 else min(s, n_seen) for s in sizes})


def restrict_split(split: D.Split, meta: Any, tasks: Sequence[str]) -> D.Split:
    """``split`` with its training runs restricted to ``tasks`` and no validation rows (test and held-out rows
    kept): the scaling trainings keep their last epoch. A validation pass per epoch would cost the small sets,
    which train many short epochs, more than their training, and sets 30x apart would be selected on
    validation data 30x apart."""
    keep = np.isin(np.asarray(meta["task"]), list(tasks))
    return dataclasses.replace(split, train=split.train[keep[split.train]], val=split.val[:0],
                               val_unseen=split.val_unseen[:0])


def unseen_retrieval(embeddings: np.ndarray, meta: Any, split: D.Split, k_values: Sequence[int]) -> dict[str, float]:
    """The main run's unseen-task protocol (test-unseen queries, the whole zoo as database) for one
    embedding matrix: P@k and mAP."""
    out = E.retrieval_protocols(embeddings, meta, {"unseen_tasks": split.test_unseen}, None, k_values,
                                protocols=["unseen_tasks"])["unseen_tasks"]
    return {m: float(out[m]) for m in METRICS if m in out}


def run_scaling(cfg: ExperimentConfig, zoo: ModelZooDataset, graphs: list, dist: DistInfo, rec: RunRecorder) -> dict:
    """Unseen-task retrieval of the configured encoder against the number of training tasks, every eval seed;
    training-free methods beside it. Writes ``rec.results["scaling"]``."""
    ev, t = cfg.eval, cfg.train
    if cfg.skip_training:
        raise StageFailed("--skip_training: the scaling experiment measures trained encoders")
    meta = zoo.metadata
    conv = WeightToGraph.from_config(cfg.graph)
    aug = SymmetryAugmenter.from_config(cfg.augment)
    name = cfg.encoder.model
    per_seed: dict[str, dict] = {}
    for seed in S.eval_seeds(cfg):
        split = S.draw_seed_split(cfg, meta, seed)
        held = list(split.heldout_tasks)
        seen = sorted(set(meta["task"]) - set(held))
        counts = task_counts(ev.scaling_tasks, len(seen))
        order = task_subset(len(seen), seed, seen)  # nested: the first n are the n-task subset
        seed_everything(seed)
        untrained = S._make_encoder(cfg, zoo, split, conv)
        flat = {f"{name} [untrained]": embed(untrained.model.to(dist.device), D.embed_loader(
            graphs, None, 256, dist.rank, dist.world_size, untrained.transform), dist.device)}
        if dist.is_master:
            flat.update(S.baseline_embeddings(cfg, zoo, split, seed, rec).embeddings)
        out: dict[str, Any] = {"heldout_tasks": held, "test_unseen_tasks": list(split.test_unseen_tasks),
                               "n_seen_tasks": len(seen), "train_tasks": {}, "epochs": {}, "steps": {}, "batch_size": {},
                               "flat": {m: unseen_retrieval(e, meta, split, ev.k_values) for m, e in flat.items()}
                               if dist.is_master else {}, "curves": {}}
        full_steps = ev.scaling_epochs * (len(split.train) // t.batch_size)  # the full training's optimizer steps
        for n in counts:
            key = size_label(n, len(seen))
            sub = restrict_split(split, meta, order[:n])
            # a training set smaller than a batch trains in one batch (a multiple of the world size)
            tn = dataclasses.replace(t, batch_size=min(t.batch_size, len(sub.train) // dist.world_size * dist.world_size))
            steps_per_epoch = len(sub.train) // max(1, tn.batch_size)
            epochs = max(ev.scaling_epochs, math.ceil(full_steps / max(1, steps_per_epoch))) \
                if ev.scaling_equal_steps else ev.scaling_epochs
            out["train_tasks"][key], out["epochs"][key] = order[:n], epochs
            out["steps"][key], out["batch_size"][key] = epochs * steps_per_epoch, tn.batch_size
            for recipe in ev.scaling_recipes:
                seed_everything(seed)
                enc = S._make_encoder(cfg, zoo, sub, conv)
                log.info("scaling: %s [%s], seed %d, %d training tasks (%d models), %d epochs", name, recipe, seed, n,
                         len(sub.train), epochs)
                fit = fit_contrastive(enc.model, graphs, meta, sub, recipe, tn, dist, seed=seed, epochs=epochs,
                                      view_fn=D.make_view_fn(recipe, aug, cfg.graph.canonicalize),
                                      transform=enc.transform)
                emb = embed(fit.encoder.to(dist.device), D.embed_loader(graphs, None, 256, dist.rank, dist.world_size,
                                                                       enc.transform), dist.device)
                if dist.is_master:
                    out["curves"].setdefault(f"{name} [{recipe}]", {})[key] = {
                        **unseen_retrieval(emb, meta, split, ev.k_values), "train_models": int(len(sub.train)),
                        "train_tasks": n}
        per_seed[str(seed)] = out
    result = {"sizes_requested": list(ev.scaling_tasks), "recipes": list(ev.scaling_recipes),
              "equal_steps": ev.scaling_equal_steps, "encoder": name, "per_seed": per_seed,
              "summary": summarize(per_seed),
              "note": "unseen_tasks protocol of the main run (queries: models of the test-unseen tasks, fixed per seed; "
                      "database: the whole zoo; within shape group; the query's own run excluded). Encoders trained "
                      "on the training runs of n seen tasks (nested subsets spread over the shape groups); "
                      "training-free methods do not depend on n."}
    rec.results["scaling"] = result
    return result


def size_label(n: int, n_seen: int) -> str:
    """A training-set size's key in the results: its task count, or "all" for every seen task (the number of
    seen tasks differs between seeds: each holds out its own unseen kind)."""
    return "all" if n == n_seen else str(n)


def summarize(per_seed: dict[str, dict]) -> dict[str, dict]:
    """method -> {"sizes": [...], "n": [...], metric: {"mean": [...], "std": [...]}, "flat": bool} over the seeds.
    ``sizes`` are the size labels every seed trained (a requested size at or above one seed's number of seen
    tasks is that seed's "all" and is left out); ``n`` is each size's mean number of training tasks."""
    seeds = list(per_seed.values())
    out: dict[str, dict] = {}
    for method in seeds[0]["curves"]:
        common = set.intersection(*(set(s["curves"][method]) for s in seeds))
        sizes = sorted(common, key=lambda k: (k == "all", int(k) if k != "all" else 0))
        out[method] = {"sizes": sizes, "n": [float(np.mean([s["curves"][method][k]["train_tasks"] for s in seeds]))
                                             for k in sizes], "flat": False}
        for m in METRICS:
            vals = np.array([[s["curves"][method][k][m] for k in sizes] for s in seeds])  # (seeds, sizes)
            out[method][m] = {"mean": vals.mean(0).tolist(), "std": vals.std(0).tolist()}
    for method in seeds[0]["flat"]:
        out[method] = {"sizes": [], "n": [], "flat": True}
        for m in METRICS:
            vals = np.array([s["flat"][method][m] for s in seeds])
            out[method][m] = {"mean": float(vals.mean()), "std": float(vals.std())}
    return out
