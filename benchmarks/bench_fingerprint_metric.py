"""Does metric learning on the probe fingerprint transfer to unseen tasks? A learning curve.

    python benchmarks/bench_fingerprint_metric.py --zoo_dir zoo/default --seeds 42 43 44
    python benchmarks/bench_fingerprint_metric.py --learning_rate 1e-4 --noise 0.2 --epochs 10

The question behind the GNN's learned part: in the default run, validation gives the learned part weight 0
beside the training-free fingerprint, in every seed. This script asks the same of the simplest learner
that could add to the fingerprint, without the GNN: for each seed's split (the main run's), the two
training-free fingerprints (``probe_fingerprint`` and ``probe_fingerprint_data``, unit norm each,
concatenated, as in the encoder) go through the closed-form within-task metric head
(``contrastive_learning.choose_metric_head``: size and ridge chosen on val-unseen, then the head refit on the
train and val runs unless --head_train_only; no head is a candidate), and an
MLP adds a residual to that embedding (last layer zero-initialised: epoch 0 is exactly the head). The
MLP is trained with supervised NT-Xent (``contrastive_learning.NTXentLoss``, task labels, two noisy views,
batches within one shape group) on the train rows only. After every epoch it prints P@10 within shape
group of the val-unseen queries (what a choice may read), of the test-unseen queries and of the seen
tasks' test runs (read by no choice), and writes the curves to benchmarks/out/bench_fingerprint_metric.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import baselines as B  # noqa: E402
from config import ExperimentConfig  # noqa: E402
from contrastive_learning import NTXentLoss, choose_metric_head  # noqa: E402
from data_prep import ModelZooDataset  # noqa: E402
from evaluation import RetrievalEvaluator, l2_normalize, validation_retrieval  # noqa: E402
from stages import draw_seed_split  # noqa: E402

FINGERPRINTS = ("probe_fingerprint", "probe_fingerprint_data")


def fingerprints(zoo: ModelZooDataset, fit_rows: np.ndarray) -> np.ndarray:
    """(N, D) the unit-norm training-free fingerprints of every model, concatenated."""
    parts = [l2_normalize(B.make_baseline(n).fit(zoo.subset(fit_rows)).embed(zoo)) for n in FINGERPRINTS]
    return np.concatenate(parts, 1).astype(np.float32)


def one_seed(zoo: ModelZooDataset, seed: int, args: argparse.Namespace) -> dict:
    meta = zoo.metadata
    split = draw_seed_split(ExperimentConfig(), meta, seed)
    task, group, run = (np.asarray(meta[c]) for c in ("task", "shape_group", "run_id"))
    fp = fingerprints(zoo, np.sort(np.concatenate([split.train, split.val])))
    db = split.selection_rows
    pos = {int(r): i for i, r in enumerate(db)}
    val_seen, val_unseen = ([pos[int(r)] for r in rows] for rows in (split.val, split.val_unseen))
    ev = RetrievalEvaluator(k_values=(10,))

    def scores(z: np.ndarray) -> dict[str, float]:
        test = {q: ev.evaluate_knn_retrieval(z, task, query_idx=rows, group_labels=group, exclude_same=run)["P@10"]
                for q, rows in (("test_unseen", split.test_unseen), ("seen_test", split.test))}
        return {"val_unseen": validation_retrieval(z[db], task[db], group[db], run[db], val_seen, val_unseen,
                                                   10)["val_unseen_P@10"], **test}

    train = np.asarray(split.train)
    choice = choose_metric_head(fp, meta, split, task, args.metric_dims, args.metric_regs,  # on val-unseen
                                refit=not args.head_train_only)
    x = torch.from_numpy(fp)
    base = nn.functional.normalize(torch.from_numpy(choice["embeddings"]), dim=1)
    torch.manual_seed(seed)
    mlp = nn.Sequential(nn.Linear(x.shape[1], args.width), nn.GELU(), nn.Linear(args.width, args.width), nn.GELU(),
                        nn.Linear(args.width, base.shape[1]))
    nn.init.zeros_(mlp[-1].weight)
    nn.init.zeros_(mlp[-1].bias)
    opt = torch.optim.AdamW(mlp.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    loss_fn = NTXentLoss(args.temperature)
    labels = torch.from_numpy(np.unique(task, return_inverse=True)[1])
    by_group = {g: train[group[train] == g] for g in np.unique(group[train])}
    keys = sorted(by_group)
    rng = np.random.default_rng(seed)

    def embed() -> np.ndarray:
        with torch.no_grad():
            return (base + mlp(x)).numpy()

    def view(b: torch.Tensor) -> torch.Tensor:
        xb = x[b] * (1 + args.noise * torch.randn_like(x[b]))
        return base[b] + mlp(xb)

    curve = [{"epoch": 0, **scores(embed())}]
    print(f"seed {seed} head dim {choice['dim']} reg {choice['reg']}  epoch 0: " +
          "  ".join(f"{k} {v:.3f}" for k, v in curve[0].items() if k != "epoch"), flush=True)
    t0 = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        losses = []
        for _ in range(max(1, len(train) // args.batch_size)):
            rows = by_group[keys[rng.integers(len(keys))]]
            b = torch.from_numpy(rng.choice(rows, size=min(args.batch_size, len(rows)), replace=False))
            loss = loss_fn(view(b), view(b), labels[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curve.append({"epoch": epoch, "loss": float(np.mean(losses)), **scores(embed())})
        print(f"seed {seed} epoch {epoch}: loss {curve[-1]['loss']:.3f}  " +
              "  ".join(f"{k} {curve[-1][k]:.3f}" for k in ("val_unseen", "test_unseen", "seen_test")), flush=True)
    best = max(curve, key=lambda c: c["val_unseen"])  # the epoch a choice on val-unseen would keep
    return {"curve": curve, "chosen_epoch": best["epoch"], "chosen": best, "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo_dir", default="zoo/default")
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--weight_decay", type=float, default=1e-4)
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--noise", type=float, default=0.0, help="multiplicative Gaussian noise of the two views")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--metric_dims", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--metric_regs", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    p.add_argument("--head_train_only", action="store_true",
                   help="keep the head fit on the train runs (as before the refit on train + val runs)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "bench_fingerprint_metric.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    zoo = ModelZooDataset.load(args.zoo_dir)
    per_seed = {str(s): one_seed(zoo, s, args) for s in args.seeds}
    keys = ("val_unseen", "test_unseen", "seen_test")
    summary = {f"{when} {k}": float(np.mean([r["curve"][i][k] for r in per_seed.values()]))
               for when, i in (("epoch 0 (head only)", 0), ("last epoch", -1)) for k in keys}
    summary.update({f"chosen on val-unseen {k}": float(np.mean([r["chosen"][k] for r in per_seed.values()]))
                    for k in keys})
    for k, v in summary.items():
        print(f"mean over {len(per_seed)} seeds, {k}: {v:.3f}")
    out = {"args": vars(args), "machine": platform.processor() or platform.machine(),
           "torch_threads": torch.get_num_threads(), "summary": summary, "per_seed": per_seed}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
