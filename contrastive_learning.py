"""Contrastive training of weight-space encoders: NT-Xent, the training loop, DDP, resume.

One loop serves every trainable encoder. The loader yields ``(view1, view2, meta)``; a view
batch is whatever the encoder consumes (a PyG ``Batch`` of neuron graphs, or a tensor of flat
weights): the loop only moves it to the device and calls ``encoder(view)`` and
``encoder.project(z)``.

Objective (``ContrastiveLearner.forward`` returns it, byol-style)::

    L = L_con + lambda * L_task                                   (no reconstruction: every recipe's default)
    L = (1 - beta) * L_con + beta * L_rec + lambda * L_task       (with weight reconstruction, beta > 0)
    L_con  = NT-Xent over the 2B projected views (in-batch negatives; under DDP the
             negatives are the *global* batch, gathered from all ranks), optionally with
             supervised-contrastive positives (same training-task label) and hardness-weighted
             negatives (Robinson et al. 2021, optionally only across task families);
    L_task = weak supervision from a small head on the embedding: MSE on test accuracy
             and/or cross-entropy on the training-task label;
    L_rec  = reconstruction.py: a decoder from the encoder's per-neuron states back to every clean
             weight and bias of each view (hyper-representations, seed 004); ``TrainConfig.recon_beta``.

Distribution (runtime.py): under torchrun the learner is wrapped in DDP, rank 0 alone logs and
writes checkpoints/history, and :func:`embed` gathers every rank's rows in dataset order. bf16
autocast on GPU only (``nullcontext`` on CPU).

:func:`fit_contrastive` is the one training setup every caller uses (the experiment's encoders,
the view-recipe comparison, the per-sub-zoo NFN): loaders, objective, optimizer, schedule,
validation metric and checkpoints from the same few settings.

Exact resume: data order and views depend only on (seed, epoch) (see dataloader.py), the
global RNGs are reseeded from (seed, epoch, rank) at each epoch start, and every epoch ends
with one atomic checkpoint, nanoGPT-style (``model``, ``optimizer``, ``scheduler``,
``model_args`` (the encoder's name and kwargs: enough to rebuild it alone), ``epoch``,
``best_metric``, ``best_model``, ``history``, ``config``, ``rng``), read back with
``weights_only=True``.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from config import TrainConfig
from dataloader import SELF_SUPERVISED_RECIPES, Split, ValidationSet, ViewFn, build_loaders, check_recipe
from reconstruction import Reconstruction, with_targets
from runtime import (DistInfo, all_gather, atomic_torch_save, atomic_write_json, autocast_context, progress,
                     seed_everything, set_rng_state, rng_state, single_process, world)

log = logging.getLogger("weightzoo")

WEAK_TARGETS = ("acc", "task", "acc+task")
CHECKPOINT_NAME = "last.pt"
HISTORY_NAME = "history.json"
VAL_K = 10  # the validation metric: P@VAL_K of the validation protocol (evaluation.validation_retrieval)


# =========================================================================== loss
class NTXentLoss(nn.Module):
    """NT-Xent (SimCLR) over two views per model, with optional SupCon positives and hard negatives.

    For the 2B L2-normalised projections ``z`` and similarities ``s_ak = z_a . z_k / tau``, anchor a
    with positive set P(a) (its other view; with ``labels``, also every other sample of the same
    label) and negatives N(a) (all other samples) has loss (SupCon "L_out" form)::

        l_a = -1/|P(a)| sum_{p in P(a)} log( exp(s_ap) / (sum_{p' in P(a)} exp(s_ap') + sum_{n in N(a)} w_an exp(s_an)) )

    With ``hard_negative_beta = 0`` all ``w_an = 1`` (plain NT-Xent / SupCon). Otherwise
    ``w_an = exp(beta * s_an) / mean_{n' in N(a)} exp(beta * s_an')`` (detached; Robinson et al.
    2021): negatives close to the anchor weigh more. With ``families`` given, only negatives of
    *another* task family are reweighted (same-family negatives keep weight 1: they may be
    functionally close, i.e. false negatives). The loss is the mean over the 2B anchors.

    Args:
        temperature: tau > 0.
        hard_negative_beta: concentration beta >= 0 of the negative reweighting.
    Shapes:
        z1, z2: (B, P); labels, families: (B,) long or None -> scalar.
    """

    def __init__(self, temperature: float = 0.1, hard_negative_beta: float = 0.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"NT-Xent temperature must be > 0, got {temperature}")
        if hard_negative_beta < 0:
            raise ValueError(f"hard_negative_beta must be >= 0, got {hard_negative_beta}")
        self.temperature, self.hard_negative_beta = float(temperature), float(hard_negative_beta)

    def forward(self, z1: Tensor, z2: Tensor, labels: Tensor | None = None, families: Tensor | None = None) -> Tensor:
        assert z1.shape == z2.shape and z1.dim() == 2, f"views must be (B, P) and equal, got {z1.shape} {z2.shape}"
        b = z1.size(0)
        assert b >= 2, "NT-Xent needs at least 2 models per batch (in-batch negatives)"
        z = F.normalize(torch.cat([z1, z2], 0).float(), dim=1)  # (2B, P)
        s = z @ z.T / self.temperature  # (2B, 2B)
        n = 2 * b
        eye = torch.eye(n, dtype=torch.bool, device=z.device)
        idx = torch.arange(n, device=z.device)
        pos = torch.zeros(n, n, dtype=torch.bool, device=z.device)
        pos[idx, (idx + b) % n] = True  # the other view
        if labels is not None:
            lab = torch.cat([labels, labels]).to(z.device)
            assert lab.shape == (n,), f"labels must be (B,), got {tuple(labels.shape)}"
            pos |= (lab[:, None] == lab[None, :]) & ~eye
        neg = ~pos & ~eye
        w = neg.float()
        if self.hard_negative_beta > 0:
            with torch.no_grad():
                hard = neg.clone()
                if families is not None:
                    fam = torch.cat([families, families]).to(z.device)
                    hard &= fam[:, None] != fam[None, :]
                e = torch.where(neg, torch.exp(self.hard_negative_beta * (s - s.max())), torch.zeros_like(s))
                # mean over each anchor's reweighted negatives of exp(beta s); weight 1 elsewhere in N(a)
                e_h = torch.where(hard, e, torch.zeros_like(e))
                mean_h = e_h.sum(1, keepdim=True) / hard.sum(1, keepdim=True).clamp_min(1)
                w = torch.where(hard, e_h / mean_h.clamp_min(torch.finfo(e.dtype).tiny), w)
        s_masked = s.masked_fill(eye, float("-inf"))
        # log of the denominator: logsumexp over positives and (weighted) negatives
        log_w = torch.where(pos, torch.zeros_like(s), torch.log(w.clamp_min(1e-30)))
        log_w = torch.where(pos | neg, log_w, torch.full_like(s, float("-inf")))
        log_denom = torch.logsumexp(s_masked + log_w, dim=1, keepdim=True)  # (2B, 1)
        log_prob = s - log_denom
        n_pos = pos.sum(1)
        loss_a = -(log_prob * pos).sum(1) / n_pos
        return loss_a.mean()


class TaskHead(nn.Module):
    """Weak-supervision head on the embedding: test accuracy (regression) and/or task (classification).

    Shapes: z (B, D) -> {"acc": (B,), "task": (B, num_tasks)}.
    """

    def __init__(self, in_dim: int, targets: str, num_tasks: int = 0, hidden_dim: int = 64):
        super().__init__()
        if targets not in WEAK_TARGETS:
            raise ValueError(f"weak-supervision targets must be one of {WEAK_TARGETS}, got {targets!r}")
        if "task" in targets and num_tasks < 2:
            raise ValueError(f"task classification needs >= 2 training tasks, got {num_tasks}")
        self.targets = targets
        self.body = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU())
        self.acc = nn.Linear(hidden_dim, 1) if "acc" in targets else None
        self.task = nn.Linear(hidden_dim, num_tasks) if "task" in targets else None

    def forward(self, z: Tensor) -> dict[str, Tensor]:
        h = self.body(z)
        out = {}
        if self.acc is not None:
            out["acc"] = self.acc(h).squeeze(1)
        if self.task is not None:
            out["task"] = self.task(h)
        return out

    def loss(self, z: Tensor, meta: Mapping[str, Tensor]) -> Tensor:
        """Sum of the MSE on test accuracy and the cross-entropy on the task label."""
        out = self(z)
        total = z.new_zeros((), dtype=torch.float32)
        if "acc" in out:
            y = meta["test_acc"].to(z.device).float()
            if torch.isnan(y).any():
                raise ValueError("weak supervision on accuracy needs test_acc for every training model")
            total = total + F.mse_loss(out["acc"].float(), y)
        if "task" in out:
            total = total + F.cross_entropy(out["task"].float(), meta["task"].to(z.device))
        return total


class ContrastiveLearner(nn.Module):
    """Encoder + objective: ``forward(view1, view2, meta) -> {"loss", "con", "task", "rec"}``.

    Args:
        encoder: module with ``forward(batch) -> (B, D)`` and ``project(z) -> (B, P)``.
        loss: the contrastive loss (NTXentLoss).
        supervised_positives: treat same-task models as positives (the "supcon" recipe).
        weak_supervision: lambda of the task-head loss (0: no head at all).
        weak_targets: "acc" | "task" | "acc+task".
        num_tasks: training tasks (labels 0..num_tasks-1).
        embedding_dim: D; default ``encoder.global_dim``.
        gather_negatives: under DDP, contrast against the global batch (needed to match a
            single-process run with the same global batch).
        reconstruction: the weight-reconstruction objective (reconstruction.Reconstruction), or None.
        recon_beta: its weight beta in (0, 1] (given iff ``reconstruction`` is; 1 = reconstruction only).
    """

    def __init__(self, encoder: nn.Module, loss: NTXentLoss, supervised_positives: bool = False,
                 weak_supervision: float = 0.0, weak_targets: str = "acc+task", num_tasks: int = 0,
                 embedding_dim: int | None = None, gather_negatives: bool = True,
                 reconstruction: nn.Module | None = None, recon_beta: float = 0.0):
        super().__init__()
        if (reconstruction is None) != (recon_beta == 0) or not 0 <= recon_beta <= 1:
            raise ValueError(f"recon_beta must be in (0, 1] with a reconstruction objective and 0 without one, "
                             f"got {recon_beta} {'with' if reconstruction is not None else 'without'} one")
        self.reconstruction, self.recon_beta = reconstruction, float(recon_beta)
        for name in ("forward", "project"):
            if not callable(getattr(encoder, name, None)):
                raise TypeError(f"{type(encoder).__name__} has no {name}(); encoders need forward(batch) and project(z)")
        if weak_supervision < 0:
            raise ValueError(f"weak_supervision (lambda) must be >= 0, got {weak_supervision}")
        self.encoder, self.loss_fn = encoder, loss
        self.supervised_positives, self.weak_supervision = supervised_positives, float(weak_supervision)
        self.num_tasks, self.gather_negatives = int(num_tasks), gather_negatives
        self.head = None
        if weak_supervision > 0:
            dim = embedding_dim if embedding_dim is not None else getattr(encoder, "embedding_dim",
                                                                          getattr(encoder, "global_dim", None))
            if dim is None:
                dim = (getattr(encoder, "hparams", None) or {}).get("global_dim")
            if dim is None:
                raise ValueError("weak supervision needs embedding_dim (the encoder has no global_dim attribute "
                                 "or hparams['global_dim'])")
            self.head = TaskHead(int(dim), weak_targets, num_tasks)

    def _check_labels(self, task: Tensor) -> None:
        # labels come from the training-task vocabulary only; held-out tasks have none
        assert task.numel() == 0 or (int(task.min()) >= 0 and int(task.max()) < max(self.num_tasks, 1)), \
            f"task labels outside the training-task vocabulary [0, {self.num_tasks}): a held-out task leaked into training"

    def forward(self, view1: Any, view2: Any, meta: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if self.reconstruction is None:
            h1, h2 = self.encoder(view1), self.encoder(view2)  # (b, D) each
        else:  # one encoder pass per view gives the embedding and the reconstruction loss
            (h1, rec1), (h2, rec2) = self.reconstruction(self.encoder, view1), self.reconstruction(self.encoder, view2)
        z1, z2 = self.encoder.project(h1), self.encoder.project(h2)  # (b, P)
        labels = families = None
        if self.supervised_positives or self.loss_fn.hard_negative_beta > 0:
            self._check_labels(meta["task"])
        if self.supervised_positives:
            labels = all_gather(meta["task"].to(z1.device), with_grad=False)
        if self.loss_fn.hard_negative_beta > 0 and "family" in meta:
            families = all_gather(meta["family"].to(z1.device), with_grad=False)
        g = self.gather_negatives
        with torch.autocast(device_type=z1.device.type, enabled=False):  # the loss in fp32, also under bf16
            con = self.loss_fn(all_gather(z1.float(), g), all_gather(z2.float(), g), labels, families)
        out = {"con": con, "rec": torch.zeros((), device=con.device)}
        objective = con
        if self.reconstruction is not None:
            out["rec"] = 0.5 * (rec1 + rec2)
            objective = (1 - self.recon_beta) * con + self.recon_beta * out["rec"]
        if self.head is not None:
            if "task" in self.head.targets:
                self._check_labels(meta["task"])
            task = 0.5 * (self.head.loss(h1, meta) + self.head.loss(h2, meta))
            out["task"] = task
            out["loss"] = objective + self.weak_supervision * task
        else:
            out["task"] = torch.zeros((), device=con.device)
            out["loss"] = objective
        return out


# =========================================================================== embedding
def _to_device(x: Any, device: torch.device) -> Any:
    return x.to(device, non_blocking=True) if hasattr(x, "to") else x


@torch.no_grad()
def embed(model: nn.Module, loader: Iterable, device: torch.device) -> np.ndarray:
    """Embeddings (N, D) float32 in dataset order, gathered from all ranks under DDP.

    ``loader`` yields ``(batch, positions)`` (see ``dataloader.embed_loader``), each rank a
    shard; rows are placed by position so the result is identical on every rank and equals a
    single-process pass. ``model`` is the raw encoder (not the DDP wrapper).
    """
    was_training = model.training
    model.eval()
    rows, positions = [], []
    with autocast_context(device):
        for item in loader:
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise TypeError("embed() needs a loader of (batch, positions); build it with dataloader.embed_loader")
            x, pos = item
            rows.append(model(_to_device(x, device)).float())
            positions.append(pos.to(device))
    model.train(was_training)
    n = len(loader.dataset)  # type: ignore[attr-defined]
    dim = rows[0].size(1) if rows else 0
    emb = torch.cat(rows) if rows else torch.zeros(0, dim, device=device)
    pos = torch.cat(positions) if positions else torch.zeros(0, dtype=torch.long, device=device)
    _, n_ranks = world()
    if n_ranks > 1:
        # shards may differ in size by one: pad to the largest, gather, trim
        sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(n_ranks)]
        tdist.all_gather(sizes, torch.tensor([emb.size(0)], device=device))
        dims = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(n_ranks)]
        tdist.all_gather(dims, torch.tensor([dim], device=device))
        dim = int(max(d.item() for d in dims))
        m = int(max(s.item() for s in sizes))
        emb_p = torch.zeros(m, dim, device=device)
        emb_p[: emb.size(0)] = emb
        pos_p = torch.full((m,), -1, dtype=torch.long, device=device)
        pos_p[: pos.numel()] = pos
        embs = [torch.empty_like(emb_p) for _ in range(n_ranks)]
        poss = [torch.empty_like(pos_p) for _ in range(n_ranks)]
        tdist.all_gather(embs, emb_p)
        tdist.all_gather(poss, pos_p)
        emb = torch.cat([e[: int(s.item())] for e, s in zip(embs, sizes)])
        pos = torch.cat([p[: int(s.item())] for p, s in zip(poss, sizes)])
    out = np.zeros((n, dim), dtype=np.float32)
    pos_np = pos.cpu().numpy()
    counts = np.bincount(pos_np, minlength=n) if len(pos_np) else np.zeros(n, dtype=np.int64)
    assert len(counts) == n and (counts == 1).all(), \
        f"embed: every one of the {n} items must be embedded exactly once (missing {int((counts == 0).sum())}, repeated {int((counts > 1).sum())})"
    out[pos_np] = emb.cpu().numpy()
    return out


def make_retrieval_val_fn(validation: ValidationSet, device: torch.device, k: int = VAL_K
                          ) -> Callable[[nn.Module], float]:
    """val_fn for :meth:`ContrastiveLearningFramework.train`: the validation protocol's selection metric
    (``evaluation.validation_retrieval``: within shape group, the mean of the val-seen and val-unseen P@k).

    Embeds ``validation.rows`` (train, val and val-unseen models; nothing else). Collective under DDP:
    call it on every rank.
    """
    from evaluation import validation_retrieval

    def val_fn(model: nn.Module) -> float:
        emb = embed(model, validation.loader, device)
        assert len(emb) == len(validation.rows), f"{len(emb)} embeddings for {len(validation.rows)} validation rows"
        return validation_retrieval(emb, validation.task, validation.shape_group, validation.run_id,
                                    validation.seen_queries, validation.unseen_queries, k)[f"val_P@{k}"]

    val_fn.metric_name = f"val_P@{k}"  # type: ignore[attr-defined]
    return val_fn


# =========================================================================== checkpoints
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "model_args", "epoch", "best_metric", "best_model", "history",
                   "config", "seed", "rng")


def encoder_state(learner_state: Mapping[str, Tensor], part: str = "encoder") -> dict[str, Tensor]:
    """The state_dict of the learner's ``part`` (the encoder; "reconstruction": the decoder) inside a learner
    state_dict (checkpoint ``model`` / ``best_model``)."""
    return {k[len(part) + 1:]: v for k, v in learner_state.items() if k.startswith(f"{part}.")}


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a training checkpoint (``weights_only=True``); errors name the file."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"resume checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    missing = set(CHECKPOINT_KEYS) - set(ckpt) if isinstance(ckpt, dict) else set(CHECKPOINT_KEYS)
    if missing:
        raise ValueError(f"{path}: not a training checkpoint (missing {sorted(missing)})")
    return ckpt


# =========================================================================== framework
def _new_history(metric_name: str) -> dict[str, Any]:
    return {"epoch": [], "train_loss": [], "train_con_loss": [], "train_task_loss": [], "train_rec_loss": [],
            "val_loss": [],
            "val_metric": [], "lr": [], "epoch_time_s": [], "metric_name": metric_name,
            "initial_val_metric": None, "best_epoch": None, "best_metric": None}


class ContrastiveLearningFramework:
    """One training loop for every trainable encoder (GNN or flat-weight), DDP-aware, resumable.

    Args:
        model: the encoder (``forward(batch) -> (B, D)``, ``project(z) -> (B, P)``).
        loss: NTXentLoss (default: temperature 0.1).
        device: where to train (default: ``dist.device`` or CPU).
        dist: a :class:`DistInfo` from :func:`setup_distributed` (default: single process).
        supervised_positives, weak_supervision, weak_targets, num_tasks, embedding_dim, reconstruction,
            recon_beta: see :class:`ContrastiveLearner`.
        grad_clip: max gradient norm (0 disables).
        seed: reseeds the global RNGs at every epoch start from (seed, epoch, rank).
        model_args: ``{"name", "kwargs"}`` that rebuild the encoder (stored in checkpoints).
        config: JSON-able dict stored in checkpoints; a resume with a different config is refused.
        show_progress: a tqdm bar per epoch (rank 0, on a terminal only).
        find_unused_parameters: passed to DDP (keep False; True costs a graph traversal per step).

    Build the optimizer over :meth:`parameters` (encoder + weak-supervision head + decoder).
    """

    def __init__(self, model: nn.Module, loss: NTXentLoss | None = None, device: torch.device | None = None,
                 dist: DistInfo | None = None, supervised_positives: bool = False, weak_supervision: float = 0.0,
                 weak_targets: str = "acc+task", num_tasks: int = 0, embedding_dim: int | None = None,
                 grad_clip: float = 1.0, seed: int = 0, model_args: Mapping[str, Any] | None = None,
                 config: Mapping[str, Any] | None = None, show_progress: bool = True,
                 find_unused_parameters: bool = False, reconstruction: nn.Module | None = None,
                 recon_beta: float = 0.0):
        self.dist = dist or single_process(device or "cpu")
        self.device = device or self.dist.device
        self.learner = ContrastiveLearner(model, loss or NTXentLoss(), supervised_positives, weak_supervision,
                                          weak_targets, num_tasks, embedding_dim, reconstruction=reconstruction,
                                          recon_beta=recon_beta).to(self.device)
        self.ddp = None
        if self.dist.is_distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DDP(self.learner, device_ids=ids, find_unused_parameters=find_unused_parameters)
        self.grad_clip, self.seed = float(grad_clip), int(seed)
        self.model_args = json.loads(json.dumps(dict(model_args or {})))  # JSON-able copies
        self.config = json.loads(json.dumps(dict(config or {})))
        self.show_progress = show_progress and self.dist.is_master

    @property
    def model(self) -> nn.Module:
        """The raw encoder (not wrapped)."""
        return self.learner.encoder

    def parameters(self) -> list[nn.Parameter]:
        """Every trainable parameter (encoder + head + decoder): build the optimizer over these."""
        return [p for p in self.learner.parameters() if p.requires_grad]

    # --------------------------------------------------------------- epochs
    def _seed_epoch(self, epoch: int) -> None:
        s = np.random.SeedSequence([self.seed, epoch, self.dist.rank]).generate_state(1)[0]
        seed_everything(int(s))

    def _set_epoch(self, loader: Any, epoch: int) -> None:
        for obj in (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
            if obj is not None and hasattr(obj, "set_epoch"):
                obj.set_epoch(epoch)

    def train_one_epoch(self, loader: Iterable, optimizer: torch.optim.Optimizer, epoch: int) -> dict[str, float]:
        """One pass over ``loader``; returns mean losses {"loss", "con", "task", "rec"} (averaged over ranks)."""
        self._set_epoch(loader, epoch)
        net = self.ddp or self.learner
        net.train()
        sums = torch.zeros(4, dtype=torch.float64)
        steps = 0
        bar = progress(loader, self.show_progress, desc=f"epoch {epoch}", leave=False)
        for v1, v2, meta in bar:
            v1, v2 = _to_device(v1, self.device), _to_device(v2, self.device)
            with autocast_context(self.device):
                out = net(v1, v2, meta)
            loss = out["loss"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"epoch {epoch} step {steps}: non-finite training loss {loss.item()}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.learner.parameters(), self.grad_clip)
            optimizer.step()
            sums += torch.tensor([loss.item(), out["con"].item(), out["task"].item(), out["rec"].item()],
                                 dtype=torch.float64)
            steps += 1
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if steps == 0:
            raise ValueError("the training loader yielded no batch (fewer models than one global batch?)")
        means = self._mean_over_ranks(sums / steps)
        return {"loss": means[0], "con": means[1], "task": means[2], "rec": means[3]}

    @torch.no_grad()
    def validation_loss(self, loader: Iterable, epoch: int = 0) -> float:
        """Mean objective over ``loader`` (no gradient; views drawn as in training)."""
        self._set_epoch(loader, epoch)
        self.learner.eval()
        total, steps = 0.0, 0
        for v1, v2, meta in loader:
            with autocast_context(self.device):
                out = self.learner(_to_device(v1, self.device), _to_device(v2, self.device), meta)
            total += out["loss"].item()
            steps += 1
        self.learner.train()
        if steps == 0:
            raise ValueError("the validation loader yielded no batch")
        return float(self._mean_over_ranks(torch.tensor([total / steps], dtype=torch.float64))[0])

    def _mean_over_ranks(self, t: Tensor) -> list[float]:
        if self.dist.is_distributed:
            t = t.to(self.device)
            tdist.all_reduce(t)
            t = t / self.dist.world_size
        return [float(v) for v in t.cpu()]

    # --------------------------------------------------------------- checkpoint
    def _checkpoint(self, optimizer: torch.optim.Optimizer, scheduler: Any, epoch: int, best_state: dict,
                    history: dict) -> dict[str, Any]:
        return {
            "model": self.learner.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None, "model_args": self.model_args,
            "epoch": epoch, "best_metric": history["best_metric"], "best_model": best_state, "history": history,
            "config": self.config, "seed": self.seed, "rng": rng_state(),
        }

    def _check_resume_config(self, ckpt: Mapping[str, Any], path: Any) -> None:
        """Refuse a checkpoint of another seed, encoder or config (the number of epochs included: the
        learning-rate schedule spans it)."""
        if ckpt["seed"] != self.seed:
            raise ValueError(f"cannot resume from {path}: seed {ckpt['seed']} != {self.seed}")
        if ckpt["model_args"] != self.model_args:
            raise ValueError(f"cannot resume from {path}: its encoder {ckpt['model_args']} differs from {self.model_args}")

        def flat(d: Mapping, pre: str = "") -> dict:
            out = {}
            for k, v in d.items():
                if isinstance(v, Mapping):
                    out.update(flat(v, f"{pre}{k}."))
                else:
                    out[f"{pre}{k}"] = v
            return out

        a, b = flat(ckpt["config"]), flat(self.config)
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if diff:
            raise ValueError(f"cannot resume from {path}: its config differs in {diff[:10]} "
                             f"(checkpoint {[a.get(k) for k in diff[:10]]}, now {[b.get(k) for k in diff[:10]]})")

    # --------------------------------------------------------------- train
    def train(self, train_loader: Iterable, val_loader: Iterable | None, num_epochs: int,
              optimizer: torch.optim.Optimizer, scheduler: Any = None, checkpoint_dir: str | Path | None = None,
              resume_from: str | Path | None = None, val_fn: Callable[[nn.Module], float] | None = None,
              epoch_callback: Callable[[int, dict], None] | None = None) -> tuple[dict[str, Any], nn.Module]:
        """Train for ``num_epochs`` (total, counting resumed ones); return ``(history, best_model)``.

        Model selection: the highest ``val_fn(encoder)`` (e.g. validation P@10 among seen-task
        models; called on every rank under DDP, as it is collective), else the lowest validation
        loss (``val_loader``), else the last epoch. ``scheduler.step()`` runs once per epoch.
        ``checkpoint_dir`` receives ``last.pt`` after every epoch and ``history.json`` (rank 0).
        ``epoch_callback(epoch, history)`` runs after the epoch's checkpoint is written.
        History: per-epoch lists ``epoch, train_loss, train_con_loss, train_task_loss, train_rec_loss,
        val_loss, val_metric, lr, epoch_time_s`` plus ``metric_name, initial_val_metric, best_epoch,
        best_metric``. ``best_model`` is a copy of the encoder with the best weights, on the
        training device; ``self.best_state`` holds the whole learner's best state_dict afterwards.
        """
        if num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1, got {num_epochs}")
        owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [n for n, p in self.learner.named_parameters() if p.requires_grad and id(p) not in owned]
        if missing:
            raise ValueError(f"the optimizer does not hold {len(missing)} trainable parameter(s), e.g. {missing[:3]}; "
                             f"build it over framework.parameters()")
        metric_name = getattr(val_fn, "metric_name", "val_metric") if val_fn else "-val_loss" if val_loader else "none"
        history = _new_history(metric_name)
        best_metric, best_state, start = -float("inf"), copy.deepcopy(self.learner.state_dict()), 1

        if resume_from:
            ckpt = load_checkpoint(resume_from, map_location=self.device)
            self._check_resume_config(ckpt, resume_from)
            self.learner.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            if scheduler is not None:
                if ckpt["scheduler"] is None:
                    raise ValueError(f"{resume_from}: saved without a scheduler, but one was given")
                scheduler.load_state_dict(ckpt["scheduler"])
            history, best_state, start = ckpt["history"], ckpt["best_model"], int(ckpt["epoch"]) + 1
            history.setdefault("train_rec_loss", [0.0] * len(history["epoch"]))  # saved before L_rec existed: none
            best_metric = history["best_metric"] if history["best_metric"] is not None else -float("inf")
            set_rng_state(ckpt["rng"])
            if self.dist.is_master:
                log.info("%s from %s at epoch %d of %d (best %s=%s)", "resumed" if start <= num_epochs else
                         "finished training loaded", resume_from, start - 1, num_epochs, metric_name, best_metric)
        elif val_fn is not None:
            history["initial_val_metric"] = float(val_fn(self.model))

        ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else None
        for epoch in range(start, num_epochs + 1):
            t0 = time.perf_counter()
            self._seed_epoch(epoch)
            losses = self.train_one_epoch(train_loader, optimizer, epoch)
            lr = float(optimizer.param_groups[0]["lr"])
            if scheduler is not None:
                scheduler.step()
            val_loss = self.validation_loss(val_loader, epoch) if val_loader is not None else None
            if val_fn is not None:
                metric = float(val_fn(self.model))
            elif val_loss is not None:
                metric = -val_loss
            else:
                metric = float(epoch)  # no validation: the last epoch is the best
            if self.dist.is_distributed:  # every rank takes the same model-selection decision
                t = torch.tensor([metric], dtype=torch.float64, device=self.device)
                tdist.broadcast(t, 0)
                metric = float(t.item())
            if metric > best_metric:
                best_metric = metric
                best_state = copy.deepcopy(self.learner.state_dict())
                history["best_epoch"], history["best_metric"] = epoch, best_metric
            for k, v in (("epoch", epoch), ("train_loss", losses["loss"]), ("train_con_loss", losses["con"]),
                         ("train_task_loss", losses["task"]), ("train_rec_loss", losses["rec"]),
                         ("val_loss", val_loss), ("val_metric", metric),
                         ("lr", lr), ("epoch_time_s", time.perf_counter() - t0)):
                history[k].append(v)
            if self.dist.is_master:
                log.info("epoch %d/%d  train %.4f (con %.4f task %.4f rec %.4f)  val_loss %s  %s %.4f  %.1fs", epoch,
                         num_epochs, losses["loss"], losses["con"], losses["task"], losses["rec"],
                         "-" if val_loss is None else f"{val_loss:.4f}", metric_name, metric, history["epoch_time_s"][-1])
                if ckpt_dir is not None:
                    atomic_torch_save(ckpt_dir / CHECKPOINT_NAME,
                                      self._checkpoint(optimizer, scheduler, epoch, best_state, history))
                    atomic_write_json(ckpt_dir / HISTORY_NAME, history)
            if self.dist.is_distributed:
                tdist.barrier()
            if epoch_callback is not None:
                epoch_callback(epoch, history)

        best_model = copy.deepcopy(self.model)
        best_model.load_state_dict(encoder_state(best_state))
        self.best_state = best_state
        return history, best_model


def build_optimizer(parameters: Iterable[nn.Parameter], learning_rate: float, weight_decay: float,
                    lr_schedule: str, epochs: int) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over ``parameters`` (use ``framework.parameters()``) and its per-epoch schedule.

    lr_schedule: "cosine" (CosineAnnealingLR over ``epochs``) or "none" (returns scheduler None).
    """
    if lr_schedule not in ("cosine", "none"):
        raise ValueError(f"lr_schedule must be cosine|none, got {lr_schedule!r}")
    if learning_rate <= 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
    params = list(parameters)
    # the fused kernel (CPU and CUDA) updates all tensors in one pass: ~6x faster than the foreach
    # update for the encoders' many small tensors; it needs floating-point params on one device type
    fused = len({p.device.type for p in params}) == 1 and all(p.is_floating_point() for p in params)
    opt = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay, fused=fused or None)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs)) if lr_schedule == "cosine" else None
    return opt, sched


# =========================================================================== the one training setup
@dataclass(frozen=True)
class Checkpointing:
    """Where :func:`fit_contrastive` keeps ``last.pt``/``history.json``, and what they record.

    Args:
        directory: this training's own folder (one per method, recipe and seed).
        model_args: ``{"name", "kwargs"}`` that rebuild the encoder alone (``stages.encoder_from_args``).
        config: the settings that made the data and the encoder (JSON-able); fit_contrastive adds
            the training settings, recipe, seed and split, and a resume under other ones is refused.
        resume: continue from ``directory/last.pt`` when it exists (a finished training is loaded,
            not redone); False starts afresh and overwrites it.
    """

    directory: Path
    model_args: Mapping[str, Any]
    config: Mapping[str, Any]
    resume: bool = False


@dataclass(frozen=True)
class Fit:
    """What :func:`fit_contrastive` returns: the selected encoder, the training history, the data's sizes."""

    encoder: nn.Module  # a copy with the best epoch's weights, on the training device
    history: dict[str, Any]
    data: dict[str, Any]  # dataloader.Loaders.info: split sizes, anchors without a partner, batch
    reconstruction: Reconstruction | None = None  # the best epoch's decoder (recon_beta > 0), else None


def split_digest(split: Split) -> str:
    """A short hash of a split's train, val and val-unseen rows (a checkpoint records which data it trained
    and selected on)."""
    h = hashlib.sha1()
    for rows in (split.train, split.val, split.val_unseen):
        h.update(np.asarray(rows, dtype=np.int64).tobytes() + b"|")
    return h.hexdigest()[:16]


# the TrainConfig fields that change what fit_contrastive trains (DataLoader workers change nothing); the
# reconstruction ones only count when it is on (checkpoints of trainings without it stay resumable)
FIT_FIELDS = ("batch_size", "learning_rate", "weight_decay", "temperature", "weak_supervision", "weak_targets",
              "hard_negative_beta", "grad_clip", "lr_schedule", "batch_within")
RECON_FIELDS = ("recon_beta", "decoder_dim")


def fit_contrastive(encoder: nn.Module, graphs: Sequence[Any], meta_df: Any, split: Split, recipe: str,
                    train: TrainConfig, dist: DistInfo, *, seed: int, epochs: int | None = None,
                    view_fn: ViewFn | None = None, transform: Callable[[Any], Any] | None = None,
                    checkpoint: Checkpointing | None = None, show_progress: bool = False) -> Fit:
    """Train ``encoder`` contrastively on ``split.train`` with one view recipe; every training calls this.

    From ``train``: batch size, AdamW (learning rate, weight decay) and its ``lr_schedule``,
    NT-Xent temperature and hard-negative beta, weak supervision, gradient clipping and
    DataLoader workers, batches within one ``batch_within`` group (:class:`dataloader.GroupedBatchSampler`);
    ``epochs`` overrides ``train.epochs``. Model selection: the validation
    protocol's P@10 (:func:`make_retrieval_val_fn`: val runs of seen tasks and val-unseen models searched
    within their shape group among the train, val and val-unseen models) when the split has validation
    rows, else the last epoch. Pass ``dataloader.selection_subset`` data: nothing else is read then. ``view_fn`` (``dataloader.make_view_fn``) draws each view; ``transform`` turns a
    graph into the encoder's input (flat-weight encoders). Collective under DDP (every rank
    calls it with the same arguments).

    The extension point: ``train.recon_beta > 0`` adds the weight-reconstruction objective
    (reconstruction.py, a decoder of width ``train.decoder_dim``) with weight beta, views then carry
    their clean weights as targets, and ``Fit.reconstruction`` is the selected epoch's decoder.
    """
    check_recipe(recipe)
    epochs = train.epochs if epochs is None else epochs
    recon = None
    if train.recon_beta > 0:
        if transform is not None:
            raise ValueError("weight reconstruction decodes neuron graphs: it needs a graph encoder (gnn, "
                             "nonequivariant_gnn, weightnet), not a flat-weight one")
        recon = Reconstruction.for_encoder(encoder, train.decoder_dim)
        view_fn = with_targets(view_fn)
    loaders = build_loaders(graphs, meta_df, split, recipe, train.batch_size, view_fn, seed, train.num_workers,
                            dist.rank, dist.world_size, transform, train.batch_within)
    model_args = config = last = resume_from = None
    if checkpoint is not None:
        model_args, last = checkpoint.model_args, Path(checkpoint.directory) / CHECKPOINT_NAME
        fields = FIT_FIELDS + (RECON_FIELDS if recon is not None else ())
        config = {**checkpoint.config, "recipe": recipe, "split": split_digest(split),
                  "train": {**{k: v for k, v in asdict(train).items() if k in fields}, "epochs": epochs}}
        if last.exists() and checkpoint.resume:
            resume_from = last
        elif last.exists() and dist.is_master:
            log.info("%s exists but --resume was not given: training afresh", last)
    fw = ContrastiveLearningFramework(
        encoder, NTXentLoss(train.temperature, train.hard_negative_beta), dist.device, dist,
        supervised_positives=recipe == "supcon", weak_supervision=train.weak_supervision,
        weak_targets=train.weak_targets, num_tasks=len(loaders.task_vocab), grad_clip=train.grad_clip, seed=seed,
        model_args=model_args, config=config, show_progress=show_progress, reconstruction=recon,
        recon_beta=train.recon_beta)
    opt, sched = build_optimizer(fw.parameters(), train.learning_rate, train.weight_decay, train.lr_schedule, epochs)
    val_fn = make_retrieval_val_fn(loaders.validation, dist.device, VAL_K) if loaders.validation else None
    history, best = fw.train(loaders.train, loaders.val, epochs, opt, sched, resume_from=resume_from, val_fn=val_fn,
                             checkpoint_dir=None if last is None else last.parent)
    if recon is not None:
        recon = copy.deepcopy(fw.learner.reconstruction)
        recon.load_state_dict(encoder_state(fw.best_state, "reconstruction"))
    return Fit(best, history, loaders.info, recon)


# =========================================================================== recipe comparison
def compare_view_recipes(make_encoder: Callable[[], nn.Module], graphs: Sequence[Any], meta_df: Any, split: Split,
                         recipes: Sequence[str], train: TrainConfig, epochs: int,
                         make_view_fn: Callable[[str], ViewFn | None], dist: DistInfo | None = None, seed: int = 0,
                         transform: Callable[[Any], Any] | None = None) -> dict[str, Any]:
    """Train briefly with each view recipe (:func:`fit_contrastive`, ``epochs`` each); compare validation P@10.

    Each recipe starts from the same initialisation (``make_encoder()`` after seeding with
    ``seed``); its score is the best validation P@10 (the validation protocol of :func:`fit_contrastive`:
    val runs of seen tasks and val-unseen models; test runs, test-unseen and unseen-kind models never enter). ``make_view_fn(recipe)``
    gives the recipe's views. Returns ``{"metric", "epochs", "recipes": {name: {"val_metric",
    "initial_val_metric", "kind", "anchors_without_partner", "history"}}, "chosen",
    "chosen_self_supervised"}``: "chosen" is the best overall, "chosen_self_supervised" the best
    among label-free recipes (report both side by side). Collective under DDP.
    """
    dist = dist or single_process()
    if not recipes:
        raise ValueError("compare_view_recipes needs at least one recipe")
    for r in recipes:
        check_recipe(r)
    if len(split.val) == 0 and len(split.val_unseen) == 0:
        raise ValueError("compare_view_recipes needs validation rows (val_fraction > 0 or val-unseen tasks)")
    results: dict[str, Any] = {}
    for recipe in recipes:
        seed_everything(seed)
        fit = fit_contrastive(make_encoder(), graphs, meta_df, split, recipe, train, dist, seed=seed, epochs=epochs,
                              view_fn=make_view_fn(recipe), transform=transform)
        h = fit.history
        results[recipe] = {"val_metric": h["best_metric"], "initial_val_metric": h["initial_val_metric"],
                           "kind": "self-supervised" if recipe in SELF_SUPERVISED_RECIPES else "weakly supervised",
                           "anchors_without_partner": fit.data["train_anchors_without_partner"], "history": h}
        if dist.is_master:
            log.info("view recipe %-10s val P@%d %.4f (init %.4f)", recipe, VAL_K, h["best_metric"],
                     h["initial_val_metric"])
    chosen = max(results, key=lambda r: results[r]["val_metric"])
    ss = [r for r in results if results[r]["kind"] == "self-supervised"]
    return {"metric": f"val_P@{VAL_K}", "epochs": epochs, "recipes": results, "chosen": chosen,
            "chosen_self_supervised": max(ss, key=lambda r: results[r]["val_metric"]) if ss else None}


# =========================================================================== metric head (closed-form training)
def choose_metric_head(raw: np.ndarray, meta_df: Any, split: Split, groups: Sequence, dims: Sequence[int],
                       regs: Sequence[float], k: int = VAL_K, learned_from: int | None = None,
                       learned_weights: Sequence[float] = (1.0,), refit: bool = True) -> dict[str, Any]:
    """Fit a :class:`encoder_blocks.MetricHead` on ``raw[split.train]`` (embeddings (N, D) of the whole zoo, one
    ``groups`` label per row: training tasks, or runs for a label-free head) for every (dim, reg) of the grid and
    choose on the validation protocol (``evaluation.validation_retrieval`` over ``split.selection_rows``): its
    val-unseen P@k when the split has val-unseen tasks (a head fit on the training tasks' labels would flatter
    their val runs), else val_P@k; no head (the raw embedding) is a candidate too. With ``learned_from`` (the first
    column of the learned part, after the fingerprint), every ``learned_weights`` value scales those columns first
    (0: the fingerprint alone). With ``refit``, the chosen head is fit again on the train and val runs (more
    runs per group for the within-group covariance: +0.008-0.009 test-unseen P@10 on the default zoo, every
    seed); ``refit_score`` is its val-unseen P@k (val-unseen tasks are in neither fit). Returns ``{"head" (None:
    no head), "dim", "reg", "learned_weight", "embeddings" (N, dim or D), "scores" {candidate: P@k, train-only
    fits}, "metric", "refit"}``. Only train, val and val-unseen rows are read."""
    from encoder_blocks import MetricHead
    from evaluation import validation_retrieval

    raw = np.asarray(raw, dtype=np.float32)
    db = split.selection_rows
    pos = {int(r): i for i, r in enumerate(db)}
    seen, unseen = ([pos[int(r)] for r in rows] for rows in (split.val, split.val_unseen))
    if not seen and not unseen:
        raise ValueError("choose_metric_head needs val or val-unseen models to choose on")
    metric = f"val_unseen_P@{k}" if unseen else f"val_P@{k}"
    cols = {c: np.asarray(meta_df[c])[db] for c in ("task", "shape_group", "run_id")}

    def score(z: np.ndarray) -> float:
        return validation_retrieval(z[db], cols["task"], cols["shape_group"], cols["run_id"], seen, unseen, k)[metric]

    groups = np.asarray(groups)
    train = np.asarray(split.train, dtype=np.int64)
    best: dict[str, Any] = {}
    scores: dict[str, float] = {}
    def weighted(alpha: float) -> np.ndarray:  # the learned part's columns scaled by alpha
        x = raw.copy()
        x[:, learned_from or raw.shape[1]:] *= alpha
        return x

    for alpha in (learned_weights if learned_from is not None else (1.0,)):
        x = weighted(alpha)
        fit_z = torch.from_numpy(x[train])
        basis = MetricHead.basis(fit_z) if dims else None  # one SVD for the whole (dim, reg) grid
        for dim, reg in [(0, 0.0)] + [(d, r) for d in dims if d <= min(len(train), raw.shape[1]) for r in regs]:
            head = MetricHead(raw.shape[1], int(dim)).fit(fit_z, groups[train], float(reg), basis) if dim else None
            z = head(torch.from_numpy(x)).numpy() if head is not None else x
            name = (f"learned{alpha}_" if learned_from is not None else "") + (f"dim{dim}_reg{reg}" if dim else "none")
            scores[name] = score(z)
            if not best or scores[name] > best["score"]:
                best = {"head": head, "dim": int(dim), "reg": float(reg), "learned_weight": float(alpha),
                        "embeddings": z, "score": scores[name]}
    if best["head"] is not None and len(split.val) and refit:  # the chosen head again, on train + val runs
        x = weighted(best["learned_weight"])
        rows = np.sort(np.concatenate([train, np.asarray(split.val, dtype=np.int64)]))
        best["head"] = MetricHead(raw.shape[1], best["dim"]).fit(torch.from_numpy(x[rows]), groups[rows], best["reg"])
        best["embeddings"] = best["head"](torch.from_numpy(x)).numpy()
        if unseen:  # val-unseen tasks are in neither fit: still a validation figure
            best["refit_score"] = score(best["embeddings"])
    return {**best, "scores": scores, "metric": metric, "refit": bool(refit and len(split.val))}
