"""Learning curve of weight reconstruction: test R^2 of the decoder against training steps (beta = 1).

    python benchmarks/bench_reconstruction.py --zoo_dir zoo/small --epochs 18 --threads 1
    python benchmarks/bench_reconstruction.py --zoo_dir zoo/small --no_row_codes --hidden_dim 32

Trains ``--model`` (WeightNet with address-coded row tokens unless ``--no_row_codes``) with the
reconstruction objective only (``ContrastiveLearningFramework`` with ``recon_beta = 1``, seed 004's
views: noise and erasing) on the train split of a real zoo, and after every epoch measures the mean
per-model R^2 of the reconstructed weights of the test-split and held-out-task models (clean inputs), the
same on a fixed subset of training models, and the pooled R^2 per part of both (``reconstruction.part_quality``:
first-layer weights, later weights, biases; log-scale MSE). Prints the curve and seconds per step and writes
them to benchmarks/out/bench_reconstruction.json. Width 128 (not the encoder's CPU default 32): a neuron's
token must hold its row, up to 100 weights here (the best rank-32 linear code keeps R^2 0.53-0.58 of the
first-layer rows of the 64- and 100-input tasks, measured on this zoo's rows).
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import contrastive_learning as C  # noqa: E402
import dataloader as D  # noqa: E402
import reconstruction as R  # noqa: E402
from data_prep import ModelZooDataset  # noqa: E402
from gnn_encoder import build_encoder  # noqa: E402
from symmetry import SymmetryAugmenter  # noqa: E402
from weight_to_graph import WeightToGraph  # noqa: E402


def mean_r2(encoder: torch.nn.Module, objective: R.Reconstruction, graphs: list, conv: WeightToGraph) -> float:
    """Mean over ``graphs`` of the R^2 of each model's reconstructed canonical weights and biases."""
    out = []
    for g, r in zip(graphs, R.reconstruct(encoder, objective, graphs, torch.device("cpu"))):
        spec, sd = conv.to_state_dict(g)
        w = torch.cat([sd[k].reshape(-1) for k in spec.param_shapes()]).double()
        sd_r = conv.to_state_dict(r)[1]
        out.append(R.r2(w, torch.cat([sd_r[k].reshape(-1) for k in spec.param_shapes()]).double()))
    return float(np.mean(out))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo_dir", default="zoo/small")
    p.add_argument("--model", default="weightnet", choices=["weightnet", "gnn", "nonequivariant_gnn"])
    p.add_argument("--no_row_codes", action="store_true", help="WeightNet without address-coded row tokens")
    p.add_argument("--hidden_dim", type=int, default=128)
    p.add_argument("--decoder_dim", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--learning_rate", type=float, default=3e-3)
    p.add_argument("--train_probe", type=int, default=120, help="training models the train R^2 is measured on")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "bench_reconstruction.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    zoo = ModelZooDataset.load(args.zoo_dir)
    conv = WeightToGraph()
    graphs = conv.convert_model_to_graphs(zoo, cache_dir=Path(args.zoo_dir) / "graph_cache")
    meta = zoo.metadata
    split = D.split_by_run(meta, 0.0, 0.15, D.select_heldout_tasks(meta, 0.25, args.seed), args.seed)
    test = [graphs[i] for i in np.concatenate([split.test, split.heldout])]
    train_probe = [graphs[i] for i in split.train[:args.train_probe]]
    torch.manual_seed(args.seed)
    kw = {"row_codes": not args.no_row_codes} if args.model == "weightnet" else {}
    enc = build_encoder(args.model, hidden_dim=args.hidden_dim, edge_dim=conv.edge_dim, **kw)
    objective = R.Reconstruction.for_encoder(enc, args.decoder_dim)
    fw = C.ContrastiveLearningFramework(enc, C.NTXentLoss(), torch.device("cpu"), seed=args.seed, show_progress=False,
                                        reconstruction=objective, recon_beta=1.0)
    opt, _ = C.build_optimizer(fw.parameters(), args.learning_rate, 1e-4, "none", args.epochs)
    views = SymmetryAugmenter(permute=args.model == "nonequivariant_gnn", rescale=False, sign_flip=False,
                              noise_std=0.05, edge_dropout=0.0, erase_fraction=0.1)
    loaders = D.build_loaders(graphs, meta, split, "noise", args.batch_size,
                              R.with_targets(D.make_view_fn("noise", views)), args.seed)
    steps_per_epoch = len(loaders.train)

    def measure(step: int) -> dict:
        obj, cpu = fw.learner.reconstruction, torch.device("cpu")
        return {"step": step, "test_r2": mean_r2(fw.model, obj, test, conv),
                "train_r2": mean_r2(fw.model, obj, train_probe, conv),
                "test_parts": R.part_quality(fw.model, obj, test, cpu),
                "train_parts": R.part_quality(fw.model, obj, train_probe, cpu)}

    curve = [{**measure(0), "seconds": 0.0}]
    t0 = time.perf_counter()

    def after_epoch(epoch: int, history: dict) -> None:
        seconds = time.perf_counter() - t0  # wall time since training began (the measurements included)
        curve.append({**measure(epoch * steps_per_epoch), "train_rec_loss": history["train_rec_loss"][-1],
                      "seconds": round(seconds, 1)})
        c = curve[-1]
        parts = " ".join(f"{k} {c['train_parts'][k]:.2f}/{c['test_parts'][k]:.2f}" for k in c["test_parts"])
        print(f"epoch {epoch}: step {c['step']}, R^2 train {c['train_r2']:.3f} test {c['test_r2']:.3f}, "
              f"rec loss {c['train_rec_loss']:.4f}, {seconds:.0f} s; parts train/test: {parts}", flush=True)

    history, _ = fw.train(loaders.train, None, args.epochs, opt, epoch_callback=after_epoch)
    out = {"benchmark": "bench_reconstruction", "zoo": f"{args.zoo_dir} ({len(zoo)} models, version {zoo.version[:12]})",
           "n_train": len(split.train), "n_test": len(test), "args": vars(args), "curve": curve,
           "seconds_per_step": round(sum(history["epoch_time_s"]) / (args.epochs * steps_per_epoch), 3),
           "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine()}
    print(json.dumps({k: v for k, v in out.items() if k != "curve"}, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
