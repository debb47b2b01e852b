"""The stages of run_experiment.py, one function each, with explicit arguments.

Each stage returns a typed value (the small dataclasses below, a zoo, graphs, a split) that
``main()`` passes on to the stages that need it, and writes what it measured into
``rec.results``. Stages are called through ``RunRecorder.run`` so a failure is recorded as
failed, never filled in, and the stages that depend on it as skipped.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

import baselines as B
import dataloader as D
import evaluation as E
import merging as M
import subzoos as SZ
from config import ExperimentConfig
from contrastive_learning import Checkpointing, choose_metric_head, compare_view_recipes, embed, fit_contrastive
from data_prep import ModelZooDataset
from encoder_blocks import MetricHead
from gnn_encoder import build_encoder, encoder_kwargs, save_encoder, tune_cpu_allocator
from report import RunRecorder, StageFailed, render_figures, render_markdown
from retrieval import Embedder
from runtime import DistInfo, barrier, cleanup_distributed, seed_everything, set_threads, setup_distributed, single_process
from probes import source_inputs
from symmetry import SymmetryAugmenter
from tasks import TASKS, inputs_for_spec, load_task_data, task_subset
from weight_to_graph import WeightToGraph

log = logging.getLogger("weightzoo")

GNN_MODELS = ("gnn", "nonequivariant_gnn", "weightnet")
FLAT_MODELS = ("mlp", "pca_mlp")


# ----------------------------------------------------------------------------- the values stages pass on
@dataclass(frozen=True)
class Encoder:
    """A trainable encoder (trained or not) with what it takes to embed and to rebuild it."""

    model: torch.nn.Module
    transform: Callable | None  # graph -> encoder input (flat-weight encoders); None: the graph itself
    args: dict  # {"name", "kwargs"}: encoder_from_args(args) rebuilds the module (weights aside)


@dataclass(frozen=True)
class Recipes:
    """The view recipes one seed's encoders train with (its comparison's choice, else the configured one)."""

    to_train: tuple[str, ...]  # the best self-supervised recipe first (the main method), then supcon; () if none
    self_supervised: str  # the self-supervised recipe (also the per-sub-zoo NFN's)
    labels: Mapping[str, str] = field(default_factory=dict)  # recipe -> the name its method is reported under

    def method(self, model: str, recipe: str) -> str:
        """The method name of ``model`` trained with ``recipe``, e.g. "gnn [noise]"."""
        return f"{model} [{self.labels.get(recipe, recipe)}]"


@dataclass(frozen=True)
class Methods:
    """Every method of one seed: encoders, fitted baselines, and their embeddings of the whole zoo."""

    encoders: dict[str, Encoder] = field(default_factory=dict)  # "<model> [untrained]" first, then each recipe
    baselines: dict[str, B.Baseline] = field(default_factory=dict)
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)  # method -> (N, D)
    oracles: dict[str, np.ndarray] = field(default_factory=dict)  # property oracles: metadata, scored, not weights

    @staticmethod
    def join(*parts: "Methods | None") -> "Methods":
        """One Methods from several stages' (a stage that did not finish, None, adds nothing)."""
        out = Methods()
        for p in parts:
            if p is not None:
                out.encoders.update(p.encoders)
                out.baselines.update(p.baselines)
                out.embeddings.update(p.embeddings)
                out.oracles.update(p.oracles)
        return out

    @property
    def main(self) -> str | None:
        """The trained encoder reported first (best self-supervised recipe), else the untrained one."""
        trained = [m for m in self.encoders if not m.endswith("[untrained]")]
        return (trained or list(self.encoders) or [None])[0]


# ----------------------------------------------------------------------------- setup
def setup(cfg: ExperimentConfig) -> DistInfo:
    seed_everything(cfg.seed)
    dist = setup_distributed(cfg.device)
    set_threads(dist.world_size)
    if dist.device.type == "cpu" and not tune_cpu_allocator():
        log.info("glibc mallopt unavailable: CPU allocator left untuned (training runs slower, results are the same)")
    return dist


def teardown(dist: DistInfo) -> None:
    if dist.is_distributed:
        cleanup_distributed()


def eval_seeds(cfg: ExperimentConfig) -> list[int]:
    """The seeds every number is repeated over (encoder init, views, probes)."""
    return [cfg.seed + i for i in range(cfg.eval.eval_seeds)]


# ----------------------------------------------------------------------------- data
def make_zoo(cfg: ExperimentConfig, dist: DistInfo, rec: RunRecorder) -> ModelZooDataset:
    """Train the zoo (or reuse the one on disk made with the same arguments); rank 0 trains."""
    z = cfg.zoo
    kwargs = dict(num_models=z.num_models or None, runs_per_task=None if z.num_models else z.runs_per_task * z.zoo_scale,
                  tasks=task_subset(z.zoo_tasks) if z.zoo_tasks else None, epochs=z.zoo_epochs,
                  checkpoints_per_run=z.checkpoints_per_run, card_task_fraction=z.card_task_fraction, seed=z.zoo_seed,
                  cnn_fraction=z.cnn_fraction, cnn_bn_fraction=z.cnn_bn_fraction, resnet_fraction=z.resnet_fraction,
                  group_size=z.zoo_group_size, reuse=True)
    if dist.is_master:
        zoo = ModelZooDataset.create_synthetic_model_zoo(z.zoo_dir, workers=z.zoo_workers, progress=True, **kwargs)
    barrier(dist)
    if not dist.is_master:
        zoo = ModelZooDataset.load(z.zoo_dir)
    meta = zoo.metadata
    final = meta[meta["is_final"].astype(bool)]
    groups = meta.groupby("shape_group")["task"].nunique()
    rec.results["zoo"] = {
        "dir": z.zoo_dir, "version": zoo.version, "num_models": len(zoo), "num_runs": int(meta["run_id"].nunique()),
        "num_tasks": int(meta["task"].nunique()), "num_datasets": int(meta["dataset"].nunique()),
        "sources": sorted(meta["dataset"].unique().tolist()), "tasks": sorted(meta["task"].unique().tolist()),
        "num_architectures": len(zoo.specs), "arch_families": sorted(meta["arch_family"].unique().tolist()),
        "tasks_per_shape_group": {str(k): int(v) for k, v in groups.items()},
        "tasks_by_shape_group": {str(k): sorted(v) for k, v in meta.groupby("shape_group")["task"].unique().items()},
        "models_per_shape_group": {str(k): int(v) for k, v in meta["shape_group"].value_counts().sort_index().items()},
        "card_task_fraction": B.card_task_fraction(meta),
        "checkpoints_per_run": z.checkpoints_per_run, "zoo_epochs": z.zoo_epochs,
        **{f"{what}_per_task": {"min": int(c.min()), "median": float(c.median()), "max": int(c.max())}
           for what, c in (("runs", meta.groupby("task")["run_id"].nunique()), ("models", meta["task"].value_counts()),
                           ("final_models", final["task"].value_counts().reindex(meta["task"].unique(), fill_value=0)))},
        "final_test_acc_by_task_family": {str(k): float(v) for k, v in final.groupby("task_family")["test_acc"].mean().items()},
        "final_test_acc_by_task": {str(k): float(v) for k, v in final.groupby("task")["test_acc"].mean().items()},
        "final_test_acc_by_arch_family": {str(k): float(v) for k, v in final.groupby("arch_family")["test_acc"].mean().items()},
    }
    return zoo


def make_graphs(cfg: ExperimentConfig, zoo: ModelZooDataset, dist: DistInfo) -> list:
    """Neuron graphs of every model (cached on disk by zoo version and converter settings)."""
    conv = WeightToGraph.from_config(cfg.graph)
    cache = cfg.graph.graph_cache_dir or str(Path(cfg.zoo.zoo_dir) / "graph_cache")
    if dist.is_master:
        graphs = conv.convert_model_to_graphs(zoo, cache_dir=cache)
    barrier(dist)
    if not dist.is_master:
        graphs = conv.convert_model_to_graphs(zoo, cache_dir=cache)
    return graphs


def draw_seed_split(cfg: ExperimentConfig, meta, seed: int) -> D.Split:
    """Evaluation seed ``seed``'s split of the zoo (``dataloader.draw_split`` with the configured fractions)."""
    ev, t = cfg.eval, cfg.train
    return D.draw_split(meta, seed, val_fraction=t.val_fraction, test_fraction=t.test_fraction,
                        test_unseen_fraction=ev.heldout_task_fraction, val_unseen_fraction=ev.val_unseen_task_fraction,
                        unseen_kind=ev.unseen_kind, kind_max_fraction=ev.unseen_kind_max_fraction)


def make_splits(cfg: ExperimentConfig, zoo: ModelZooDataset, rec: RunRecorder) -> dict[int, D.Split]:
    """One split per evaluation seed, the same for every method (``dataloader.draw_split``): a whole task
    kind held out, per shape group test-unseen and val-unseen tasks, and the seen tasks' runs split into
    train / val / test. Encoder training, model selection and evaluation of seed s all use split s."""
    splits = {s: draw_seed_split(cfg, zoo.metadata, s) for s in eval_seeds(cfg)}
    rec.results["split"] = {
        "note": "redrawn per seed (the same for every method); runs of seen tasks split into train/val/test by run; "
                "test-unseen and unseen-kind tasks are read by no choice (training, view recipe, best epoch)",
        "seeds": {str(s): sp.summary() for s, sp in splits.items()}}
    return splits


def _eval_indices(split: D.Split) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, query rows): methods fit on the seen tasks' train and val runs; the test queries are the
    seen tasks' test runs, the test-unseen models and the unseen-kind models."""
    return np.concatenate([split.train, split.val]), np.sort(np.concatenate(list(split.query_sets.values())))


# ----------------------------------------------------------------------------- encoders
def _make_encoder(cfg: ExperimentConfig, zoo: ModelZooDataset, split: D.Split, conv: WeightToGraph) -> Encoder:
    """The configured trainable encoder, the transform from a graph to its input, and its build arguments."""
    e = cfg.encoder
    if e.model in GNN_MODELS:
        probes = e.num_probes if e.model != "weightnet" else 0  # probe features: the neuron-graph GNNs
        sizes = sorted({int(np.prod(s.input_shape)) for s in zoo.specs.values()}) if probes else []
        kw = encoder_kwargs(e.hidden_dim, e.global_dim, e.projection_dim, e.message_passing_steps, e.dropout,
                            e.model, e.attention_heads, e.canonical_order, e.io_slots, probes, e.probe_kinds,
                            e.probe_saliency, e.fingerprint_weight, sizes)
        model = build_encoder(e.model, edge_dim=conv.edge_dim, **kw)
        for n in sizes if probes and "data" in e.probe_kinds else ():
            X = source_inputs(n, probes)  # unlabeled inputs of a source dataset of that size (None: Gaussian stands in)
            if X is not None:
                model.probe_set.set_data(n, X)
        return Encoder(model, None, {"name": e.model, "kwargs": dict(model.hparams)})
    length = B.max_flat_length(zoo)
    flat_weights = _flat_weights_fn(conv)

    def to_flat(data):  # graph (possibly augmented) -> flat weight vector zero-padded to (1, length)
        flat = flat_weights(data)
        v = torch.zeros(1, length)
        v[0, : len(flat)] = flat
        return v

    kw = dict(input_dim=length, global_dim=e.global_dim, projection_dim=e.projection_dim, hidden_dim=max(e.hidden_dim, 128))
    if e.model == "mlp":
        return Encoder(B.build_trainable_baseline("mlp", **kw), to_flat, {"name": "mlp", "kwargs": kw})
    model = B.PCAMLPEncoder.from_weight_pca(B.make_baseline("pca").fit(zoo.subset(split.train)), **kw)
    return Encoder(model, to_flat, {"name": "pca_mlp", "kwargs": {**kw, "n_components": model.n_components}})


def encoder_from_args(args: dict) -> torch.nn.Module:
    """Rebuild an encoder from its ``{"name", "kwargs"}`` (a checkpoint's ``model_args``); weights are not set."""
    if args["name"] in GNN_MODELS:
        return build_encoder(args["name"], **args["kwargs"])
    if args["name"] in FLAT_MODELS:
        return B.build_trainable_baseline(args["name"], **args["kwargs"])
    raise ValueError(f"unknown encoder {args['name']!r}; known: {GNN_MODELS + FLAT_MODELS}")


def compare_recipes(cfg: ExperimentConfig, zoo, graphs, splits: dict[int, D.Split], dist: DistInfo,
                    rec: RunRecorder) -> dict[int, Recipes]:
    """Per seed, compare view recipes on that seed's validation data (``dataloader.selection_subset``: the
    validation protocol, nothing of the test queries) with a short training each; returns each seed's
    recipes to train: the best self-supervised one and the weakly supervised supcon side by side when the
    comparison ran, else the configured recipe (none under --skip_training). A method is named after its
    recipe when every seed chose the same one, else "self-supervised, chosen per seed"."""
    t = cfg.train
    if cfg.skip_training or t.compare_epochs == 0 or len(t.compare_recipes) == 0:
        rec.results["recipe_comparison"] = {"ran": False, "chosen": t.view_recipe}
        supcon = ("supcon",) if t.train_supcon and t.view_recipe != "supcon" else ()
        return {s: Recipes(() if cfg.skip_training else (t.view_recipe,) + supcon, t.view_recipe) for s in splits}
    conv = WeightToGraph.from_config(cfg.graph)
    per_seed: dict[int, dict] = {}
    for seed, split in splits.items():
        sel_graphs, sel_meta, sel_split = D.selection_subset(graphs, zoo.metadata, split)
        transform = _make_encoder(cfg, zoo, split, conv).transform
        per_seed[seed] = compare_view_recipes(
            lambda: _make_encoder(cfg, zoo, split, conv).model, sel_graphs, sel_meta, sel_split, t.compare_recipes, t,
            t.compare_epochs, lambda r: _view_fn(cfg, r), dist, seed, transform)
    first = next(iter(per_seed.values()))
    rec.results["recipe_comparison"] = {
        "ran": True, "metric": first["metric"], "epochs": first["epochs"],
        "seeds": {str(s): {"chosen": o["chosen"], "chosen_self_supervised": o["chosen_self_supervised"],
                           "recipes": {r: {k: v for k, v in d.items() if k != "history"} for r, d in o["recipes"].items()}}
                  for s, o in per_seed.items()}}
    chosen = {o["chosen_self_supervised"] for o in per_seed.values()}
    label = {} if len(chosen) == 1 else {r: "self-supervised, chosen per seed" for r in chosen if r is not None}
    out = {}
    for seed, o in per_seed.items():
        ss = o["chosen_self_supervised"]
        if ss is None:
            out[seed] = Recipes((t.view_recipe,), t.view_recipe)
        else:
            out[seed] = Recipes((ss,) + (("supcon",) if "supcon" in o["recipes"] else ()), ss, label)
    return out


def _training_settings(cfg: ExperimentConfig, zoo: ModelZooDataset) -> dict:
    """What made an encoder's training data besides the split and the training settings (its checkpoint
    records them; a --resume under other ones is refused)."""
    return {"zoo_version": zoo.version, "canonicalize": cfg.graph.canonicalize, "max_kernel": cfg.graph.max_kernel,
            "augment": dataclasses.asdict(cfg.augment)}


def train_and_embed(cfg: ExperimentConfig, zoo, graphs, split: D.Split, recipes: Recipes, seed: int, dist: DistInfo,
                    ckpt_dir: Path, rec: RunRecorder) -> Methods:
    """Train the encoder with every recipe of ``recipes`` for this seed on this seed's split (each in its own
    checkpoint folder ``ckpt_dir/<model>_<recipe>_seed<seed>/``, resumed from it with --resume; training and
    its best-epoch choice see only ``dataloader.selection_subset``) and embed the whole zoo with each and
    with the untrained encoder."""
    conv = WeightToGraph.from_config(cfg.graph)
    name = cfg.encoder.model
    seed_everything(seed)
    encoders = {f"{name} [untrained]": _make_encoder(cfg, zoo, split, conv)}
    sel_graphs, sel_meta, sel_split = D.selection_subset(graphs, zoo.metadata, split)  # all training may read
    out = Methods(encoders=encoders)
    for recipe in recipes.to_train:
        method, tag = recipes.method(name, recipe), f"{name}_{recipe}_seed{seed}"
        seed_everything(seed)  # every recipe starts from the untrained encoder's initialisation
        enc = _make_encoder(cfg, zoo, split, conv)
        ckpt = Checkpointing(ckpt_dir / tag, enc.args, _training_settings(cfg, zoo), cfg.resume)
        if dist.is_master:
            log.info("training %s, seed %d (checkpoints in %s)", method, seed, ckpt.directory)
        fit = fit_contrastive(enc.model, sel_graphs, sel_meta, sel_split, recipe, cfg.train, dist, seed=seed,
                              view_fn=_view_fn(cfg, recipe), transform=enc.transform, checkpoint=ckpt,
                              show_progress=True)
        encoders[method] = Encoder(fit.encoder, enc.transform, enc.args)
        if getattr(fit.encoder, "probe_set", None) is not None and cfg.encoder.metric_dims:  # a GNN with probes
            raw = embed(fit.encoder, D.embed_loader(graphs, None, 256, dist.rank, dist.world_size), dist.device)
            out.embeddings.update(_metric_head_stage(cfg, graphs, zoo, split, fit.encoder, raw, recipe, method, seed,
                                                     rec))
        if dist.is_master:
            rec.results.setdefault("training", {}).setdefault(method, {})[str(seed)] = fit.history
            if name in GNN_MODELS:  # the encoder file retrieval.py indexes with (metric head included)
                save_encoder(str(ckpt_dir / f"{tag}.pt"), fit.encoder)
    return embed_encoders(encoders, graphs, dist, out)


def embed_encoders(encoders: dict[str, Encoder], graphs: list, dist: DistInfo, out: Methods | None = None) -> Methods:
    """The encoders with their embeddings of the whole zoo (collective under DDP); embeddings already in ``out``
    (e.g. a metric head's) are kept."""
    out = out if out is not None else Methods(encoders=encoders)
    for method, enc in encoders.items():
        if method not in out.embeddings:
            loader = D.embed_loader(graphs, None, 256, dist.rank, dist.world_size, enc.transform)
            out.embeddings[method] = embed(enc.model.to(dist.device), loader, dist.device)
    return out


def _view_fn(cfg: ExperimentConfig, recipe: str) -> D.ViewFn | None:
    return D.make_view_fn(recipe, SymmetryAugmenter.from_config(cfg.augment), cfg.graph.canonicalize,
                          cfg.augment.pair_views)


def _metric_head_stage(cfg: ExperimentConfig, graphs, zoo, split: D.Split, encoder: torch.nn.Module, raw: np.ndarray,
                       recipe: str, method: str, seed: int, rec: RunRecorder) -> dict[str, np.ndarray]:
    """Fit the metric head of a trained GNN with probe features on the train (then train + val) rows of ``raw``
    (N, D: the whole zoo): within-task whitening after supcon, within-run whitening (no label) after a
    self-supervised recipe; size, ridge and the learned part's weight chosen on the validation protocol
    (``contrastive_learning.choose_metric_head`` over ``dataloader.selection_subset`` rows only; no head when
    none beats the raw embedding). Attaches it to ``encoder`` and returns the whole zoo's embeddings of the
    method and of two ablations: without the head, and the fingerprint part alone through the same head fit
    (no GNN)."""
    column = "task" if recipe not in D.SELF_SUPERVISED_RECIPES else "run_id"
    _, sel_meta, sel_split = D.selection_subset(graphs, zoo.metadata, split)
    sel_raw, groups = raw[split.selection_rows], sel_meta[column].to_numpy()
    c = cfg.encoder
    fp_dim = raw.shape[1] - c.global_dim if encoder.fingerprint_weight > 0 else None  # learned part's first column
    choice = choose_metric_head(sel_raw, sel_meta, sel_split, groups, c.metric_dims, c.metric_regs,
                                learned_from=fp_dim, learned_weights=c.learned_weights)
    encoder.set_metric(choice["head"], choice["learned_weight"] if fp_dim else None)
    x = raw.copy()
    if fp_dim:
        x[:, fp_dim:] *= choice["learned_weight"]
    head = choice["head"]
    plain = method.replace("[", "(").replace("]", ")")  # ablation names: not trained-encoder names "model [recipe]"
    out = {method: head(torch.from_numpy(x)).numpy() if head is not None else x,
           f"{plain} without metric head": raw}
    if fp_dim and head is not None:  # the same head fit on the fingerprint alone: what the GNN adds
        rows = np.sort(np.concatenate([sel_split.train, sel_split.val])) if choice["refit"] else sel_split.train
        fp_head = MetricHead(fp_dim, choice["dim"]).fit(torch.from_numpy(sel_raw[rows, :fp_dim]), groups[rows],
                                                        choice["reg"])
        out[f"probe fingerprint part + metric head on {column} (no GNN)"] = \
            fp_head(torch.from_numpy(raw[:, :fp_dim])).numpy()
    rec.results.setdefault("metric_head", {}).setdefault(method, {})[str(seed)] = {
        k: v for k, v in choice.items() if k not in ("head", "embeddings")}
    return out


def baseline_embeddings(cfg: ExperimentConfig, zoo, split: D.Split, seed: int, rec: RunRecorder) -> Methods:
    """Fit every configured baseline (and shape_only, always) on the fit rows and embed the whole zoo; add the
    reference embeddings (``evaluation.REFERENCE_METHODS``) and, in ``oracles``, the property oracles
    (``evaluation.PROPERTY_ORACLES``: metadata, evaluated and reported as oracles, never used as embeddings of
    weights). A metadata baseline reading model cards that name their task is reported under its oracle label
    (``baselines.oracle_label``)."""
    fit_idx, _ = _eval_indices(split)
    train_zoo = zoo.subset(fit_idx)
    out = Methods()
    skipped = rec.results.setdefault("skipped_methods", {})
    naming = B.card_task_fraction(zoo.metadata)
    for name in dict.fromkeys([*cfg.eval.methods, "shape_only"]):
        if name == "nfn":  # one NFN per architecture cannot embed a mixed zoo into one space
            skipped[name] = "not in the whole-zoo tables: NFN needs one architecture; see the same-architecture table"
            continue
        try:
            kwargs = {"seed": seed} if name == "pca" else {}
            method = B.make_baseline(name, **kwargs).fit(train_zoo)
        except B.BaselineUnavailable as e:
            skipped[name] = f"skipped: {e.reason}"
            log.warning("baseline %s skipped: %s", name, e.reason)
            continue
        label = B.oracle_label(name, naming) if name in B.METADATA_BASELINES and naming > 0 else name
        out.baselines[label] = method
        out.embeddings[label] = method.embed(zoo)
    out.embeddings.update(E.reference_embeddings(len(zoo), seed))
    if cfg.eval.property_oracles:
        try:
            oracles = E.property_oracle_embeddings(zoo.metadata)
        except (KeyError, ValueError) as e:  # a zoo without training metadata (user checkpoints)
            skipped["property oracles"] = f"skipped: the metadata lacks what they read ({e})"
            log.warning("property oracles skipped: %s", e)
        else:
            bad = [k for k, v in oracles.items() if not np.isfinite(v).all()]
            for k in bad:
                skipped[k] = "skipped: missing (NaN) metadata values"
            out.oracles.update({k: v for k, v in oracles.items() if k not in bad})
    return out


def evaluate_method(cfg: ExperimentConfig, zoo, split: D.Split, embeddings: np.ndarray, seed: int,
                    method: str | None = None) -> dict:
    """Every protocol (``evaluation.evaluate_embeddings``) for one method's embeddings on this seed's split
    (a property oracle, ``evaluation.PROPERTY_ORACLES``, with the ridge probe only: the report reads no other)."""
    fit_idx, _ = _eval_indices(split)
    ev = cfg.eval
    probes = ["ridge"] if method in E.PROPERTY_ORACLES and "ridge" in ev.probes else ev.probes
    validation = None
    if len(split.val) or len(split.val_unseen):
        validation = {"database": split.selection_rows, "seen": split.val, "unseen": split.val_unseen}
    return E.evaluate_embeddings(embeddings, zoo.metadata, fit_idx, split.query_sets, validation, ev.k_values,
                                 ev.property_targets, probes, ev.within_task_min_models, seed)


def aggregate(per_seed: dict[str, list], rec: RunRecorder) -> dict:
    """Mean ± std over seeds (each seed its own split) per method, and where a constant or shape-only
    embedding reaches ``evaluation.TRIVIAL_THRESHOLD`` (the report notes it beside that table)."""
    out = {}
    for method, runs in per_seed.items():
        ok = [r for r in runs if r is not None]
        if len(ok) < len(runs):
            rec.results.setdefault("failed_methods", {})[method] = f"{len(runs) - len(ok)} of {len(runs)} seeds failed"
        try:  # a protocol measured under one seed's split and not another's cannot be averaged: said, per method
            if ok:
                out[method] = E.aggregate_seeds(ok)
        except ValueError as e:
            rec.results.setdefault("failed_methods", {})[method] = f"not aggregated over seeds: {e}"
    rec.results["methods"] = out
    rec.results["protocol_notes"] = {**E.PROTOCOL_NOTES, "validation": E.VALIDATION_NOTE}
    rec.results["headline_protocols"] = list(E.HEADLINE_PROTOCOLS)
    rec.results["reference_methods"] = {
        "notes": E.REFERENCE_METHODS, "trivial_methods": list(E.TRIVIAL_METHODS),
        "training_free_fingerprints": [m for m in B.TRAINING_FREE_FINGERPRINTS if m in out],
        "oracles": [m for m in out if B.is_oracle(m)],
        "property_oracles": {m: note for m, note in E.PROPERTY_ORACLES.items() if m in out}}
    rec.results["trivial_passes"] = {"threshold": E.TRIVIAL_THRESHOLD, "sections": E.trivial_passes(per_seed)}
    return out


# ----------------------------------------------------------------------------- extra protocols
def _encoder_embed_fn(encoder: torch.nn.Module, transform: Any, conv: WeightToGraph, device) -> Callable:
    """list[(spec, sd)] -> (n, d) embeddings: graph encoders through retrieval.Embedder; flat-weight
    encoders through their graph -> tensor transform."""
    if transform is None:
        return Embedder(encoder, conv, device, batch_size=256).embed

    @torch.no_grad()
    def fn(models: list) -> np.ndarray:
        encoder.eval()
        x = torch.cat([transform(conv.to_graph(spec, sd)) for spec, sd in models])
        return encoder(x.to(device)).float().cpu().numpy()

    return fn


def _embed_fns(cfg: ExperimentConfig, methods: Methods, device) -> dict[str, Callable]:
    conv = WeightToGraph.from_config(cfg.graph)
    fns = {m: _encoder_embed_fn(enc.model, enc.transform, conv, device) for m, enc in methods.encoders.items()}
    for name, method in methods.baselines.items():
        if not name.startswith("metadata"):  # metadata methods never read weights
            fns[name] = E.embed_fn_from_method(method)
    return fns


def symmetry_robustness(cfg: ExperimentConfig, zoo, split: D.Split, methods: Methods, rec: RunRecorder) -> dict:
    """Within-shape-group retrieval with each query replaced by a permuted+rescaled+sign-flipped copy."""
    fit_idx, query_idx = _eval_indices(split)
    rng = np.random.default_rng(cfg.seed)
    n_q = cfg.eval.symmetry_queries or len(query_idx)
    queries = np.sort(rng.choice(query_idx, size=min(n_q, len(query_idx)), replace=False))
    indices = np.concatenate([fit_idx, queries])
    meta = zoo.metadata.iloc[indices]
    tasks, groups, runs = (meta[c].to_numpy() for c in ("task", "shape_group", "run_id"))
    q_pos = np.arange(len(fit_idx), len(indices))
    ev = E.RetrievalEvaluator(cfg.eval.k_values)

    def metric_fn(db: np.ndarray, q: np.ndarray) -> dict:
        m = ev.evaluate_knn_retrieval(db, tasks, query_idx=q_pos, group_labels=groups, exclude_same=runs,
                                      query_embeddings=q[q_pos])
        return {k: m[k] for k in ("P@1", "P@10", "mAP")}

    out = {}
    stored = methods.embeddings
    for method, fn in _embed_fns(cfg, methods, torch.device("cpu")).items():
        clean = stored[method][indices] if method in stored else None
        r = E.symmetry_robustness(fn, zoo, indices, metric_fn, seed=cfg.seed, transform_positions=q_pos,
                                  clean_embeddings=clean)
        out[method] = r
        log.info("symmetry robustness %-28s P@10 %.3f -> %.3f (cos %.5f)", method, r["clean"]["P@10"],
                 r["transformed"]["P@10"], r["embedding_cosine"])
    rec.results["symmetry_robustness"] = {"n_queries": int(len(queries)), "protocol": "within_shape_group",
                                          "methods": out}
    return out


def _plain_rows(zoo) -> np.ndarray:
    """(N,) bool: the model's spec has no pooling, flatten head or residual shortcut."""
    plain = {a: not s.is_extended for a, s in zoo.specs.items()}
    return np.array([plain[a] for a in zoo.metadata["arch_id"]], dtype=bool)


def merging(cfg: ExperimentConfig, zoo, methods: Methods, rec: RunRecorder) -> dict:
    """Naive vs weight-matched averaging of same-task, same-architecture pairs (final checkpoints)."""
    plain = _plain_rows(zoo)  # weight matching here does not handle residual/flatten/pooling families
    pairs = M.select_merge_pairs(zoo.metadata, cfg.eval.merge_pairs, seed=cfg.seed, eligible=plain)
    if not pairs:
        raise StageFailed("no pair of final checkpoints with the same task and (plain) architecture in the zoo")
    main = methods.main
    fn = _embed_fns(cfg, methods, torch.device("cpu")).get(main) if main else None
    alphas = np.linspace(0, 1, cfg.eval.merge_alphas)
    out = []
    for i, j in pairs:
        task = zoo.metadata["task"].iloc[i]
        _, _, X_te, y_te = load_task_data(task)
        X_te = inputs_for_spec(zoo.spec(i), X_te)
        r = M.merge_pair(zoo.spec(i), zoo.state_dict(i), zoo.state_dict(j), X_te, y_te, alphas, fn, seed=cfg.seed)
        r.update(task=task, arch=zoo.metadata["arch_name"].iloc[i], models=[zoo.metadata["model_id"].iloc[i],
                                                                            zoo.metadata["model_id"].iloc[j]])
        out.append(r)
    rec.results["merging"] = {"embedding_method": main, "alphas": alphas.tolist(), "pairs": out,
                              "note": "pairs from plain MLP/GAP-CNN architectures only: weight matching here does not "
                                      "couple residual channels or flatten-head column blocks"}
    return out


TRANSFER_REFERENCES = ("probe_fingerprint_data", "probe_fingerprint", "input_profile")
# ranks the candidates by their accuracy on the unseen task's labelled train data: a reference, not a method
TRANSFER_ORACLE = "start accuracy [oracle: reads the task's labels]"


def transfer(cfg: ExperimentConfig, zoo, splits: Mapping[int, D.Split], runs: Mapping[int, Methods],
             rec: RunRecorder) -> dict:
    """Per seed, with its split and its methods: for ``cfg.eval.transfer_tasks`` of its test-unseen tasks (drawn by
    :func:`transfer_tasks`), query with one final model of the task and fine-tune the top-k retrieved vs k random
    compatible models (final checkpoints of seen-task training runs), retrieving with the main encoder, the
    untrained one and the training-free fingerprints (``TRANSFER_REFERENCES``), and, as a strong reference, the
    label-reading oracle ``TRANSFER_ORACLE``. Tasks are keyed "<task> [seed <s>]"; ``summary`` aggregates every seed's
    tasks per method."""
    meta = zoo.metadata
    final = meta["is_final"].to_numpy().astype(bool)
    ev = cfg.eval
    out: dict[str, Any] = {"tasks": {}, "steps": ev.transfer_steps, "k": ev.transfer_k}
    skipped: dict[str, str] = {}
    draws = []
    for seed, methods in runs.items():
        split, main, stored = splits.get(seed), methods.main, methods.embeddings
        if split is None or main is None or main not in stored:
            skipped[f"seed {seed}"] = "no split or no encoder embeddings to retrieve with"
            continue
        fit_idx, _ = _eval_indices(split)
        cand_rows = fit_idx[final[fit_idx]]  # final checkpoints of seen-task training runs
        cand = [(zoo.spec(i), zoo.state_dict(i)) for i in cand_rows]
        untrained = [m for m in methods.encoders if m.endswith("[untrained]")]
        retrievers = [main] + [m for m in (*untrained, *TRANSFER_REFERENCES) if m in stored and m != main]
        rng = np.random.default_rng(seed)
        chosen = transfer_tasks(split.test_unseen_tasks, ev.transfer_tasks, seed)
        draws.append(f"seed {seed}: {len(chosen)} of {len(split.test_unseen_tasks)}")
        for task in chosen:
            key = f"{task} [seed {seed}]"
            rows = np.flatnonzero((meta["task"].to_numpy() == task) & final)
            if not len(rows):
                skipped[key] = "no final checkpoint to query with"
                continue
            q = int(rng.choice(rows))
            X_tr, y_tr, X_te, y_te = load_task_data(task)
            q_spec = zoo.spec(q)  # candidates must take the query's input format (flat for MLPs, images for CNNs)
            data = (inputs_for_spec(q_spec, X_tr), y_tr, inputs_for_spec(q_spec, X_te), y_te)
            target = ev.transfer_target_fraction * float(meta["test_acc"].iloc[q])
            kw = dict(k=ev.transfer_k, steps=ev.transfer_steps, target_acc=target, lr=ev.transfer_lr,
                      batch_size=ev.transfer_batch_size, eval_every=ev.transfer_eval_every, seed=seed,
                      cache={})  # the random arm is the same for every retrieval method: trained once
            try:
                per = {m: M.transfer_protocol(stored[m][q], stored[m][cand_rows], cand, data, **kw) for m in retrievers}
                per[TRANSFER_ORACLE] = M.transfer_protocol(None, None, cand, data, **kw,
                                                           scores=M.start_accuracy_scores(cand, data[0], data[1]))
            except ValueError as e:  # too few compatible candidates: this task is reported skipped, the others go on
                skipped[key] = str(e)
                log.warning("transfer: task %s skipped: %s", key, e)
                continue
            out["tasks"][key] = {"seed": seed, "task": task, "query_model": meta["model_id"].iloc[q],
                                 "target_acc": target, "methods": per}
    if not out["tasks"]:
        raise StageFailed("no transfer task could be run: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    out["task_draw"] = ("per seed, a seeded draw spread over the shape groups (tasks.task_subset over its "
                        "test-unseen tasks): " + "; ".join(draws))
    if skipped:
        out["skipped"] = skipped
    methods_used = dict.fromkeys(m for t in out["tasks"].values() for m in t["methods"])
    out["summary"] = {m: M.step_ratio_summary([t["methods"][m] for t in out["tasks"].values() if m in t["methods"]])
                      for m in methods_used}
    rec.results["transfer"] = out
    return out


def transfer_tasks(test_unseen: Sequence[str], n: int, seed: int) -> list[str]:
    """The transfer protocol's ``n`` test-unseen tasks: a seeded draw spread over the shape groups, larger groups
    first (``tasks.task_subset``), so a few tasks are not all of one source or one alphabetical prefix."""
    names = [t for t in test_unseen if t in TASKS]
    return task_subset(min(n, len(names)), seed, names) if names and n > 0 else []


def embedding_map(cfg: ExperimentConfig, zoo, split: D.Split, methods: Methods, rec: RunRecorder) -> dict:
    """2-D UMAP coordinates of the query models for the main method and the input-profile reference."""
    import umap

    _, query_idx = _eval_indices(split)
    rng = np.random.default_rng(cfg.seed)
    rows = np.sort(rng.choice(query_idx, size=min(1500, len(query_idx)), replace=False))
    meta = zoo.metadata.iloc[rows]
    stored = methods.embeddings
    out = {}
    for method in [m for m in (methods.main, "input_profile") if m in stored]:
        emb = stored[method][rows]
        xy = umap.UMAP(n_neighbors=15, min_dist=0.1, metric="cosine", random_state=cfg.seed).fit_transform(emb)
        out[method] = {"xy": np.round(xy, 4).tolist(), "task": meta["task"].tolist(),
                       "arch_family": meta["arch_family"].tolist(), "test_acc": meta["test_acc"].round(4).tolist(),
                       "shape_group": meta["shape_group"].tolist()}
    rec.results["embedding_map"] = out
    return out


# ----------------------------------------------------------------------------- same-architecture sub-zoos
def _flat_weights_fn(conv: WeightToGraph) -> Callable:
    """graph (possibly an augmented view) -> its flat weights (num_params,) in flatten_state_dict order."""
    def fn(data) -> torch.Tensor:
        spec, sd = conv.to_state_dict(data)
        return torch.from_numpy(B.flatten_state_dict(spec, sd))

    return fn


def train_nfn_subzoo(cfg: ExperimentConfig, zoo, graphs, rows: np.ndarray, fit_rows: np.ndarray, recipe: str,
                     seed: int, device: torch.device, heldout_tasks: tuple[str, ...] = ()) -> tuple[np.ndarray, dict]:
    """Train one NFNEncoder on a same-architecture sub-zoo with :func:`fit_contrastive` (the GNN's views,
    loss, optimizer and schedule; canonical-form weights), on ``fit_rows`` only, for ``cfg.eval.nfn_epochs``;
    the last epoch is kept (a sub-zoo has too few validation runs to select on). Returns (embeddings of
    ``rows`` (n, global_dim), history)."""
    e = cfg.eval
    to_flat = _flat_weights_fn(WeightToGraph.from_config(cfg.graph))
    spec = zoo.spec(int(rows[0]))
    seed_everything(seed)
    enc = B.NFNEncoder(spec, e.nfn_hidden_channels, e.nfn_layers, cfg.encoder.global_dim, cfg.encoder.projection_dim)
    enc.set_input_scales(B.nfn_batch_from_flat(spec, torch.stack([to_flat(graphs[i]) for i in fit_rows])))
    empty = np.zeros(0, np.int64)
    sub = D.Split(np.asarray(fit_rows), empty, empty, empty, test_unseen_tasks=tuple(heldout_tasks))
    # one architecture: one shape group, so batches need no grouping
    train = dataclasses.replace(cfg.train, batch_size=min(cfg.train.batch_size, len(fit_rows)), batch_within="")
    view_fn = _view_fn(cfg, recipe)
    fit = fit_contrastive(enc, graphs, zoo.metadata, sub, recipe, train, single_process(device), seed=seed,
                          epochs=e.nfn_epochs, view_fn=view_fn, transform=to_flat)
    return embed(fit.encoder, D.embed_loader(graphs, rows, 256, transform=to_flat), device), fit.history


NFN_NOT_TRAINED = ("not run (nfn_epochs = 0, the default): one NFN per sub-zoo trained with the shared contrastive "
                   "loop does not fit the CPU time budget (an HNP layer costs O(n_in^2 * channels^2) per model: "
                   "5 epochs on the 3 small-zoo sub-zoos took 74 s against 2 s training-free, on 2 busy cores); "
                   "--nfn_epochs N runs it. Training-free NFN only")


def _subzoos_of_every_split(cfg: ExperimentConfig, zoo, splits: dict[int, D.Split]) -> list[dict]:
    """The K largest same-architecture sub-zoos that qualify under every seed's split (plain architectures:
    NFN's HNP layers take plain MLP/GAP-CNN weight spaces only); their figures are the first seed's."""
    e, meta, plain = cfg.eval, zoo.metadata, _plain_rows(zoo)
    per_seed = []
    for split in splits.values():
        fit_idx, query_idx = _eval_indices(split)
        per_seed.append(SZ.select_same_architecture_subzoos(meta, fit_idx[plain[fit_idx]], query_idx[plain[query_idx]],
                                                            len(zoo.specs), e.same_arch_min_tasks,
                                                            e.same_arch_min_models))
    everywhere = set.intersection(*({z["arch_id"] for z in zs} for zs in per_seed))
    return [z for z in per_seed[0] if z["arch_id"] in everywhere][: e.same_arch_subzoos]


def same_architecture(cfg: ExperimentConfig, zoo, graphs, splits: dict[int, D.Split], recipes: dict[int, Recipes],
                      runs: dict[int, Methods], dist: DistInfo, rec: RunRecorder) -> dict:
    """NFN (a fixed-architecture published peer) side by side with every method of the run, on the K largest
    same-architecture sub-zoos spanning several tasks (subzoos.same_architecture_retrieval), per eval seed on
    that seed's split. Runs on the master process only; the trained NFN needs a single-process run (its loop
    would wait for the other ranks), so under torchrun only the training-free NFN is reported, and the note
    says so. ``runs``: the methods of each eval seed that got that far (a missing seed is reported as missing;
    they include the chance and constant references)."""
    e = cfg.eval
    if e.same_arch_subzoos == 0:
        rec.results["same_architecture"] = {"ran": False, "reason": "same_arch_subzoos = 0"}
        return {}
    meta = zoo.metadata
    subzoos = _subzoos_of_every_split(cfg, zoo, splits)
    if not subzoos:
        raise StageFailed(f"no architecture has >= {e.same_arch_min_models} models spanning >= "
                          f"{e.same_arch_min_tasks} tasks with train and query models under every seed's split")
    archs = [s["arch_id"] for s in subzoos]
    rows = {a: SZ.subzoo_rows(meta, a) for a in archs}
    train_nfn = e.nfn_epochs > 0 and not dist.is_distributed
    per_seed: dict[str, list] = {}
    seconds: dict[str, list] = {"run_methods": [], "nfn_random_init": [], "nfn_trained": []}
    missing: list[str] = []
    for seed in eval_seeds(cfg):
        split, recipe = splits[seed], recipes[seed].self_supervised
        fit_idx, query_idx = _eval_indices(split)
        t0 = time.perf_counter()
        if seed not in runs:
            missing.append(f"seed {seed}: no embeddings of the run's methods (their stages did not finish)")
        for method, emb in (runs[seed].embeddings if seed in runs else {}).items():
            per_seed.setdefault(method, []).append(
                SZ.same_architecture_retrieval(emb, meta, archs, fit_idx, query_idx, e.k_values))
        t1 = time.perf_counter()
        # training-free NFN: one random-init encoder per architecture, input scales and standardization fit on
        # the sub-zoo's train models only
        nfn = {a: B.NFNBaseline(e.nfn_hidden_channels, e.nfn_layers, min_models=1, seed=seed).fit_embed(
            zoo.subset(rows[a]), np.isin(rows[a], fit_idx)) for a in archs}
        per_seed.setdefault("nfn (random init)", []).append(
            SZ.same_architecture_retrieval(nfn, meta, archs, fit_idx, query_idx, e.k_values))
        t2 = time.perf_counter()
        if train_nfn:
            embs = {a: train_nfn_subzoo(cfg, zoo, graphs, rows[a], r[np.isin(r, fit_idx)], recipe, seed, dist.device,
                                        split.heldout_tasks)[0] for a, r in rows.items()}
            per_seed.setdefault(recipes[seed].method("nfn", recipe), []).append(
                SZ.same_architecture_retrieval(embs, meta, archs, fit_idx, query_idx, e.k_values))
        t3 = time.perf_counter()
        for k, v in zip(seconds, (t1 - t0, t2 - t1, t3 - t2)):
            seconds[k].append(round(v, 3))
        log.info("same-architecture sub-zoos seed %d: run methods %.1f s, NFN random init %.1f s, NFN trained %.1f s",
                 seed, t1 - t0, t2 - t1, t3 - t2)
    n_seeds = len(eval_seeds(cfg))
    for method, done in per_seed.items():
        if len(done) < n_seeds:
            missing.append(f"{method}: {len(done)} of {n_seeds} seeds")
    first = recipes[eval_seeds(cfg)[0]]
    trained_name = first.method("nfn", first.self_supervised)
    out = {
        "ran": True, "note": SZ.SAME_ARCHITECTURE_NOTE, "subzoos": subzoos,
        "criteria": {"k": e.same_arch_subzoos, "min_tasks": e.same_arch_min_tasks,
                     "min_models": e.same_arch_min_models},
        "nfn": {"hidden_channels": e.nfn_hidden_channels, "layers": e.nfn_layers,
                "random_init": "training-free: random-init HNP layers, pooled features standardized on train models "
                               "(raw weights)",
                "trained": (f"{trained_name}: NFNEncoder trained per sub-zoo with the shared contrastive loop "
                            f"({e.nfn_epochs} epochs, each seed's self-supervised recipe, canonical-form weights, "
                            f"train models only)"
                            if train_nfn else NFN_NOT_TRAINED if e.nfn_epochs == 0
                            else "not run under torchrun (single-process loop): training-free NFN only")},
        "methods": {m: E.aggregate_seeds(done) for m, done in per_seed.items()},
        "trivial_passes": {"threshold": E.TRIVIAL_THRESHOLD, "sections": E.trivial_passes(per_seed)},  # by sub-zoo
        "seconds_per_seed": seconds,
    }
    if missing:
        out["missing"] = missing
    rec.results["same_architecture"] = out
    return out


# ----------------------------------------------------------------------------- report
def write_report(run_dir: Path, rec: RunRecorder) -> None:
    figures = render_figures(rec.results, run_dir / "figures")
    rec.results["figures"] = {k: str(Path(v).relative_to(run_dir)) for k, v in figures.items()}
    rec.save()
    (run_dir / "results.md").write_text(render_markdown(rec.results))
