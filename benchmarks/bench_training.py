"""Epoch time of contrastive encoder training on a default-size zoo with the default encoder.

    python benchmarks/bench_training.py                       # real zoo at zoo/default if present
    python benchmarks/bench_training.py --zoo_dir zoo/small --threads 2

Uses the real zoo (``data_prep.ModelZooDataset.load``) when ``--zoo_dir`` holds one; otherwise
(and then says so in its output) ``--num_models`` randomly initialised digits-shaped MLPs
(64 inputs, 1-2 hidden layers of 16-64, 10 outputs, 4 activations, 10 pseudo-tasks), which have
the zoo's graph sizes but no trained structure: good for timing, not for accuracy.
Prints the figures and writes them to benchmarks/out/bench_training.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import architecture as A  # noqa: E402
from config import EncoderConfig, TrainConfig  # noqa: E402


def random_digits_zoo(n: int, seed: int) -> tuple[list, pd.DataFrame, str]:
    """Random-init MLP graphs of the zoo's digits shapes + metadata (timing stand-in)."""
    from weight_to_graph import WeightToGraph

    rng = np.random.default_rng(seed)
    conv = WeightToGraph()
    graphs, rows = [], []
    acts = ["relu", "leaky_relu", "tanh", "gelu"]
    for i in range(n):
        hidden = [int(rng.choice([16, 32, 64])) for _ in range(int(rng.integers(1, 3)))]
        spec = A.mlp_spec(64, hidden, 10, acts[int(rng.integers(4))])
        torch.manual_seed(i)
        sd = A.build_model(spec).state_dict()
        graphs.append(conv.to_graph(spec, sd, model_idx=i))
        rows.append({"run_id": f"r{i // 3}", "task": f"task{(i // 3) % 10}", "task_family": "digits",
                     "test_acc": float(rng.uniform(0.1, 1.0)), "arch_id": spec.arch_id, "epoch": i % 3})
    return graphs, pd.DataFrame(rows), f"{n} random-init digits-shaped MLPs (no zoo found)"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo_dir", default="zoo/default")
    p.add_argument("--num_models", type=int, default=3000, help="size of the random stand-in zoo")
    p.add_argument("--recipe", default="noise")
    p.add_argument("--batch_size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "bench_training.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from contrastive_learning import ContrastiveLearningFramework, NTXentLoss, embed
    from dataloader import build_loaders, embed_loader, make_view_fn, split_by_run
    from gnn_encoder import build_encoder, encoder_kwargs
    from symmetry import SymmetryAugmenter
    from weight_to_graph import WeightToGraph

    t0 = time.perf_counter()
    zoo_dir = Path(args.zoo_dir)
    if (zoo_dir / "zoo.json").exists():  # a complete zoo (zoo.json is written last); load errors are raised
        from data_prep import ModelZooDataset

        zoo = ModelZooDataset.load(zoo_dir)
        graphs = WeightToGraph().convert_model_to_graphs(zoo, cache_dir=zoo_dir / "graph_cache")
        meta, source = zoo.metadata, f"zoo {zoo_dir} ({len(zoo)} models, version {zoo.version})"
    else:
        graphs, meta, source = random_digits_zoo(args.num_models, 0)
    t_graphs = time.perf_counter() - t0

    split = split_by_run(meta, 0.1, 0.0, (), seed=0)
    loaders = build_loaders(graphs, meta, split, args.recipe, args.batch_size,
                            make_view_fn(args.recipe, SymmetryAugmenter()), seed=0)
    ec = EncoderConfig()
    torch.manual_seed(0)
    enc = build_encoder("gnn", edge_dim=graphs[0].edge_attr.shape[1],
                        **encoder_kwargs(ec.hidden_dim, ec.global_dim, ec.projection_dim, ec.message_passing_steps,
                                         ec.dropout))
    fw = ContrastiveLearningFramework(enc, NTXentLoss(TrainConfig.temperature), torch.device("cpu"),
                                      supervised_positives=args.recipe == "supcon", show_progress=False)
    opt = torch.optim.AdamW(fw.parameters(), lr=1e-3)
    epoch_times = []
    for e in range(1, args.epochs + 1):
        t = time.perf_counter()
        fw.train_one_epoch(loaders.train, opt, e)
        epoch_times.append(time.perf_counter() - t)
    steps = len(loaders.train)
    t = time.perf_counter()
    embed(fw.model, embed_loader(graphs, None, 256), torch.device("cpu"))
    t_embed = time.perf_counter() - t
    res = {
        "source": source, "n_models": len(graphs), "n_train": int(len(split.train)), "recipe": args.recipe,
        "batch_size": args.batch_size, "steps_per_epoch": steps, "encoder": {"name": "gnn", **enc.hparams},
        "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "graph_build_s": round(t_graphs, 2), "epoch_s": [round(x, 2) for x in epoch_times],
        "step_ms": round(1000 * float(np.mean(epoch_times)) / steps, 1),
        "embed_all_s": round(t_embed, 2), "mean_edges_per_graph": float(np.mean([g.num_edges for g in graphs])),
    }
    print(json.dumps(res, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
