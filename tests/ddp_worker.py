"""A small, real training script for the DDP and resume tests (and their shared helpers).

Run single-process (``python tests/ddp_worker.py --out DIR``) or under torchrun
(``python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_worker.py --out DIR``).
It builds a toy zoo of neuron graphs (real ``WeightToGraph`` graphs of tiny MLPs whose weights
depend on their task, run and checkpoint), trains a small stand-in GNN with
``ContrastiveLearningFramework`` and writes, from rank 0: ``final.pt`` (encoder state),
``history.json``, ``embeddings.npy``; and from every rank ``rank{r}.pt`` (its parameters, to
check that the ranks stayed in sync).

``--kill_after K`` SIGKILLs the process right after epoch K's checkpoint is written (the resume test).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch_geometric.data import Batch, Data
from torch_geometric.utils import scatter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import architecture as A  # noqa: E402


def make_toy_zoo(n_tasks: int = 4, runs_per_task: int = 6, ckpts: int = 2, seed: int = 0,
                 spec: A.ArchitectureSpec | None = None) -> tuple[list[Data], pd.DataFrame]:
    """Graphs + metadata of a zoo whose weights are task base + run offset + checkpoint drift.

    Models of one task are similar (a shared base), so task retrieval is learnable; two seeds
    share each (task, lr) configuration so the "seed" recipe has partners.
    """
    from weight_to_graph import WeightToGraph

    spec = spec or A.mlp_spec(8, [6], 3, "relu")
    g = torch.Generator().manual_seed(seed)
    shapes = spec.param_shapes()
    conv = WeightToGraph(max_kernel=1, canonicalize=True)
    graphs, rows = [], []
    for t in range(n_tasks):
        base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
        for r in range(runs_per_task):
            run = {k: v + 0.4 * torch.randn(v.shape, generator=g) for k, v in base.items()}
            for c in range(ckpts):
                sd = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in run.items()}
                i = len(rows)
                graphs.append(conv.to_graph(spec, sd, model_idx=i))
                rows.append({"model_id": f"m{i}", "run_id": f"t{t}r{r}", "task": f"task{t}", "shape_group": "g",
                             "task_family": f"fam{t % 2}", "arch_id": spec.arch_id, "lr": 1e-3 * (1 + r // 2),
                             "weight_decay": 0.0, "init_scale": 1.0, "optimizer": "adam", "batch_size": 32,
                             "train_fraction": 1.0, "seed": r % 2, "epoch": c, "is_final": c == ckpts - 1,
                             "test_acc": float(0.5 + 0.1 * t + 0.01 * r)})
    return graphs, pd.DataFrame(rows)


class StandInGNN(nn.Module):
    """Tiny message-passing encoder over contract-3 neuron graphs (test stand-in, not a baseline).

    Shapes: Batch of B graphs -> (B, global_dim); project: (B, global_dim) -> (B, projection_dim).
    """

    def __init__(self, edge_dim: int = 1, hidden_dim: int = 16, global_dim: int = 16, projection_dim: int = 8):
        super().__init__()
        self.global_dim = global_dim
        self.node_in = nn.Linear(1, hidden_dim)
        self.node_type = nn.Embedding(3, hidden_dim)
        self.io = nn.Embedding(33, hidden_dim)  # io_position + 1 (0: hidden neurons)
        self.edge_in = nn.Linear(edge_dim, hidden_dim)
        self.msg = nn.Linear(2 * hidden_dim, hidden_dim)
        self.out = nn.Sequential(nn.Linear(2 * hidden_dim, global_dim), nn.ReLU(), nn.Linear(global_dim, global_dim))
        self.head = nn.Sequential(nn.Linear(global_dim, global_dim), nn.ReLU(), nn.Linear(global_dim, projection_dim))

    def forward(self, batch: Batch) -> torch.Tensor:
        h = self.node_in(batch.x) + self.node_type(batch.node_type) + self.io(batch.io_position + 1)  # (N, h)
        src, dst = batch.edge_index
        e = self.edge_in(batch.edge_attr)  # (E, h)
        m = torch.relu(self.msg(torch.cat([h[src], e], 1)))  # (E, h)
        h = h + scatter(m, dst, 0, dim_size=h.size(0), reduce="sum")
        b = batch.batch if getattr(batch, "batch", None) is not None else torch.zeros(h.size(0), dtype=torch.long)
        n = int(b.max()) + 1 if b.numel() else 0
        pooled = torch.cat([scatter(h, b, 0, dim_size=n, reduce="mean"), scatter(h, b, 0, dim_size=n, reduce="max")], 1)
        return self.out(pooled)

    def project(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(z)


class FlatMLP(nn.Module):
    """Flat-weight stand-in encoder: (B, n_weights) -> (B, global_dim)."""

    def __init__(self, n_in: int, global_dim: int = 16, projection_dim: int = 8):
        super().__init__()
        self.global_dim = global_dim
        self.net = nn.Sequential(nn.Linear(n_in, 32), nn.ReLU(), nn.Linear(32, global_dim))
        self.head = nn.Linear(global_dim, projection_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def project(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(z)


def make_encoder(name: str, edge_dim: int, dropout: float = 0.0) -> nn.Module:
    """The worker's encoder: "standin" (StandInGNN) or "gnn" (a small real ModelEmbedder)."""
    if name == "gnn":
        from gnn_encoder import build_encoder

        return build_encoder("gnn", hidden_dim=16, global_dim=16, projection_dim=8, message_passing_steps=1,
                             dropout=dropout, edge_dim=edge_dim)
    enc = StandInGNN(edge_dim)
    if dropout:
        enc.out.insert(1, nn.Dropout(dropout))
    return enc


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--recipe", default="checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kill_after", type=int, default=0)
    p.add_argument("--resume", default="")
    p.add_argument("--weak", type=float, default=0.0)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--encoder", default="standin", choices=["standin", "gnn"],
                   help="the stand-in GNN, or the real gnn_encoder ModelEmbedder (small)")
    args = p.parse_args(argv)

    torch.set_num_threads(1)  # identical float summation order in every run of the test
    from runtime import cleanup_distributed, setup_distributed

    dist = setup_distributed("cpu")
    try:
        train(args, dist)
    finally:  # after train() returned: the DDP wrapper is gone before the process group
        cleanup_distributed()


def train(args: argparse.Namespace, dist) -> None:
    from contrastive_learning import ContrastiveLearningFramework, NTXentLoss, embed, make_retrieval_val_fn
    from dataloader import build_loaders, embed_loader, make_view_fn, split_by_run
    from runtime import seed_everything
    from symmetry import SymmetryAugmenter

    out = Path(args.out)
    graphs, meta = make_toy_zoo()
    split = split_by_run(meta, val_fraction=0.34, test_fraction=0.0, heldout_tasks=["task3"], seed=args.seed)
    aug = SymmetryAugmenter(noise_std=0.05, edge_dropout=0.1)
    loaders = build_loaders(graphs, meta, split, args.recipe, args.batch_size, make_view_fn(args.recipe, aug),
                            args.seed, rank=dist.rank, world_size=dist.world_size)
    seed_everything(args.seed)
    enc = make_encoder(args.encoder, graphs[0].edge_attr.shape[1], args.dropout)
    cfg = {"recipe": args.recipe, "batch_size": args.batch_size, "weak": args.weak, "epochs": args.epochs}
    fw = ContrastiveLearningFramework(enc, NTXentLoss(0.2), dist.device, dist,
                                      supervised_positives=args.recipe == "supcon", weak_supervision=args.weak,
                                      num_tasks=len(loaders.task_vocab), seed=args.seed, config=cfg,
                                      show_progress=False)
    opt = torch.optim.AdamW(fw.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    val_fn = make_retrieval_val_fn(loaders.validation, dist.device, k=3)

    def kill(epoch: int, history: dict) -> None:
        if args.kill_after and epoch == args.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    history, best = fw.train(loaders.train, loaders.val, args.epochs, opt, sched, checkpoint_dir=out / "ckpt",
                             resume_from=args.resume or None, val_fn=val_fn, epoch_callback=kill)
    all_loader = embed_loader(graphs, None, 7, dist.rank, dist.world_size)
    emb = embed(fw.model, all_loader, dist.device)
    torch.save({k: v.detach().clone() for k, v in fw.learner.state_dict().items()}, out / f"rank{dist.rank}.pt")
    if dist.is_master:
        torch.save(fw.model.state_dict(), out / "final.pt")
        torch.save(best.state_dict(), out / "best.pt")
        np.save(out / "embeddings.npy", emb)
        (out / "history.json").write_text(json.dumps(history))


if __name__ == "__main__":
    main()
