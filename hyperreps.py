"""The hyper-representation stage (seed 004, Schürholt et al. 2021): contrast + weight reconstruction, per beta.

A sibling of stages.py, run by run_experiment.py with ``--hyperreps`` (its time does not fit the
default run). For each seed, the ``hyperreps_model`` encoder (WeightNet by default: per-neuron tokens,
as seed 004's transformer) is trained once per beta of ``hyperreps_betas`` with
``L = (1 - beta) L_con + beta L_rec`` (fit_contrastive's reconstruction objective, reconstruction.py):
same initialisation, data, epochs and views for every beta, so beta alone differs. The views are seed
004's augmentations on canonical graphs, two views of one model as positives (the "noise" recipe):

* Gaussian weight noise: the project's multiplicative form ``w (1 + sigma N(0, 1))`` (seed 004 adds
  noise of a fixed std; multiplicative noise respects the very different scales of canonical layers);
* erasing: one random contiguous span of the weights and biases (state-dict order) set to zero;
* neuron permutation: a no-op for the permutation-equivariant encoders (gnn, weightnet) and decoder on
  canonical graphs (the target is permuted with the input, symmetry.py), so it is drawn for
  nonequivariant_gnn only;
* no rescaling or sign flips: canonical graphs have none left.

The decoder reads the encoder's per-neuron states, so one decoder serves the mixed zoo (no
per-architecture sub-zoos); its targets are the clean canonical weights (a denoising autoencoder).
Every beta's embeddings are evaluated by the same code as every method (retrieval, clustering,
property probes); each decoder is scored on the query models (test split + held-out tasks): R^2 of
the weights and the accuracy of the rebuilt networks against the originals'. As in seed 004, every beta
trains a fixed number of epochs and keeps the last (no model selection on validation retrieval, which
would favour the contrastive betas). Training reads the seed's split as every training does
(``dataloader.selection_subset``: its train runs only); the validation runs are fit rows of the probes, as
for every method; test runs, test-unseen and unseen-kind models are the queries.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import torch

import dataloader as D
import evaluation as E
import reconstruction as R
from config import ExperimentConfig
from contrastive_learning import Checkpointing, fit_contrastive
from report import RunRecorder, StageFailed
from runtime import DistInfo, seed_everything
from gnn_encoder import build_encoder, encoder_kwargs
from stages import Encoder, Methods, _eval_indices, _training_settings, embed_encoders
from symmetry import SymmetryAugmenter
from tasks import inputs_for_spec, load_task_data
from weight_to_graph import WeightToGraph

log = logging.getLogger("weightzoo")

HYPERREPS_RECIPE = "noise"  # positives: two views of the same model, as in seed 004
DESIGN_NOTE = (
    "decoder from the encoder's per-neuron states (+ WeightNet's address-coded tokens and the embedding; no bottleneck: "
    "the pooled embedding is not forced to carry the weights, unlike seed 004's compressed latent): "
    "each weight edge from its two neurons' states, "
    "each bias from its neuron's, every layer's scale from its neurons; loss over every real weight and bias of the "
    "neuron graph (padding, shortcut edges and inputs masked), so one decoder serves the mixed zoo without "
    "per-architecture sub-zoos; targets: the clean canonical weights (denoising)")


def hyperreps_method(model: str, beta: float) -> str:
    """The method name of the ablation encoder trained with reconstruction weight ``beta``."""
    return f"{model} [hyperreps beta={beta:g}]"


def hyperreps_views(cfg: ExperimentConfig, model: str) -> SymmetryAugmenter:
    """Seed 004's views (module docstring): noise and erasing; permutation only where it is not a no-op."""
    r = cfg.recon
    return SymmetryAugmenter(permute=model == "nonequivariant_gnn", rescale=False, sign_flip=False,
                             noise_std=r.hyperreps_noise_std, edge_dropout=0.0, prune_fraction=0.0,
                             erase_fraction=r.hyperreps_erase_fraction)


def hyperreps_encoder(cfg: ExperimentConfig, conv: WeightToGraph) -> Encoder:
    """The ablation's untrained encoder: ``hyperreps_model`` with the run's encoder settings but the width
    ``hyperreps_hidden_dim`` (WeightNet: with address-coded row and column tokens when ``hyperreps_row_codes``)."""
    e, name = cfg.encoder, cfg.recon.hyperreps_model
    kw = encoder_kwargs(cfg.recon.hyperreps_hidden_dim, e.global_dim, e.projection_dim, e.message_passing_steps,
                        e.dropout, name, e.attention_heads, e.canonical_order, e.io_slots)
    if name == "weightnet":
        kw["row_codes"] = cfg.recon.hyperreps_row_codes
    model = build_encoder(name, edge_dim=conv.edge_dim, **kw)
    return Encoder(model, None, {"name": name, "kwargs": dict(model.hparams)})


def _task_data_fn(zoo: Any, rows: np.ndarray):
    """position i -> (X_test, y_test) of zoo model rows[i]'s task, shaped for its architecture (tasks cached)."""
    cache: dict[str, tuple] = {}
    tasks = zoo.metadata["task"].to_numpy()

    def fn(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        task = tasks[rows[i]]
        if task not in cache:
            cache[task] = load_task_data(task)[2:]
        X, y = cache[task]
        return inputs_for_spec(zoo.spec(int(rows[i])), X), y

    return fn


def train_hyperreps(cfg: ExperimentConfig, zoo: Any, graphs: list, split: D.Split, seed: int, dist: DistInfo,
                    ckpt_dir: Any, rec: RunRecorder) -> Methods:
    """One seed of the ablation: the untrained encoder and one trained per beta, each embedding the whole zoo;
    each decoder's reconstruction quality on the query models in ``rec.results["hyperreps"]`` (master only).
    Collective under DDP."""
    r = cfg.recon
    if not cfg.graph.canonicalize:
        raise StageFailed("hyper-representations reconstruct canonical weights: run with --canonicalize true")
    if not r.hyperreps_betas:
        raise StageFailed("hyperreps_betas is empty")
    name = r.hyperreps_model
    conv = WeightToGraph.from_config(cfg.graph)
    aug = hyperreps_views(cfg, name)
    view_fn = D.make_view_fn(HYPERREPS_RECIPE, aug, canonical=True)
    seed_everything(seed)
    encoders = {f"{name} [hyperreps untrained]": hyperreps_encoder(cfg, conv)}
    _, query_idx = _eval_indices(split)
    sel_graphs, sel_meta, sel_split = D.selection_subset(graphs, zoo.metadata, split)  # all training may read
    # no validation rows: the last epoch is kept (seed 004; validation retrieval would favour contrast)
    last_epoch = dataclasses.replace(sel_split, val=sel_split.val[:0], val_unseen=sel_split.val_unseen[:0])
    quality = {}
    for beta in r.hyperreps_betas:
        method = hyperreps_method(name, beta)
        seed_everything(seed)  # every beta starts from the untrained encoder's initialisation
        enc = hyperreps_encoder(cfg, conv)
        settings = {**_training_settings(cfg, zoo), "views": dataclasses.asdict(aug)}
        ckpt = Checkpointing(ckpt_dir / f"{name}_hyperreps_beta{beta:g}_seed{seed}", enc.args, settings, cfg.resume)
        if dist.is_master:
            log.info("training %s, seed %d (checkpoints in %s)", method, seed, ckpt.directory)
        fit = fit_contrastive(enc.model, sel_graphs, sel_meta, last_epoch, HYPERREPS_RECIPE,
                              dataclasses.replace(cfg.train, recon_beta=float(beta), decoder_dim=r.hyperreps_hidden_dim,
                                                  learning_rate=r.hyperreps_learning_rate,
                                                  batch_size=r.hyperreps_batch_size),
                              dist, seed=seed, epochs=r.hyperreps_epochs, view_fn=view_fn, checkpoint=ckpt,
                              show_progress=True)
        encoders[method] = Encoder(fit.encoder, None, enc.args)
        if dist.is_master:
            rec.results.setdefault("training", {}).setdefault(method, {})[str(seed)] = fit.history
            if fit.reconstruction is not None:
                originals = [graphs[i] for i in query_idx]
                recons = R.reconstruct(fit.encoder, fit.reconstruction, originals, dist.device)
                q = R.reconstruction_quality(originals, recons, conv, _task_data_fn(zoo, query_idx))
                quality[method] = {k: v for k, v in q.items() if not isinstance(v, list)}
                log.info("%s seed %d: reconstruction R^2 %.3f (standardized %.3f), accuracy %.3f -> %.3f", method,
                         seed, q["mean_r2"], q["mean_r2_standardized"], q["mean_acc_original"],
                         q["mean_acc_reconstructed"])
    if dist.is_master:
        _record(cfg, rec, seed, quality, aug, len(query_idx))
    return embed_encoders(encoders, graphs, dist)


def _record(cfg: ExperimentConfig, rec: RunRecorder, seed: int, quality: dict, aug: SymmetryAugmenter,
            n_query: int) -> None:
    """Store one seed's reconstruction quality and re-aggregate every seed so far (mean ± std)."""
    r = cfg.recon
    out = rec.results.setdefault("hyperreps", {})
    out.update(model=r.hyperreps_model, betas=list(r.hyperreps_betas), epochs=r.hyperreps_epochs,
               recipe=HYPERREPS_RECIPE, views=dataclasses.asdict(aug), design=DESIGN_NOTE, n_query_models=n_query,
               methods={b: hyperreps_method(r.hyperreps_model, b) for b in r.hyperreps_betas})
    per_seed = out.setdefault("reconstruction_per_seed", {})
    for method, q in quality.items():
        per_seed.setdefault(method, {})[str(seed)] = q
    out["reconstruction"] = {m: E.aggregate_seeds(list(s.values())) for m, s in per_seed.items()}
