"""The hyperreps beta ablation on a real zoo without the rest of the experiment: property prediction and reconstruction.

    python benchmarks/bench_hyperreps.py --zoo_dir zoo/small --epochs 6 --threads 1

Runs ``hyperreps.train_hyperreps`` (the stage ``run_experiment.py --hyperreps`` runs, same split drawing,
views, objective and evaluation code) for one seed, with StatNN, shape-only and the training-free fingerprints
(input_profile, probe_fingerprint, probe_fingerprint_data) beside it, and prints per method the
property-prediction figures of the report (ridge R^2 and within-task Kendall tau of test_acc, epoch, log_lr on
the seed's test queries) and each decoder's reconstruction quality. Writes them to
benchmarks/out/bench_hyperreps.json. The full run (3 seeds, every baseline, retrieval tables) is
``run_experiment.py --hyperreps``; this is the part that fits a CPU time box.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hyperreps as H  # noqa: E402
import stages as S  # noqa: E402
from config import config_from_dict  # noqa: E402
from data_prep import ModelZooDataset  # noqa: E402
from report import RunRecorder  # noqa: E402
from runtime import single_process  # noqa: E402
from weight_to_graph import WeightToGraph  # noqa: E402

TARGETS = ("test_acc", "epoch", "log_lr")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo_dir", default="zoo/small")
    p.add_argument("--epochs", type=int, default=6, help="hyperreps_epochs")
    p.add_argument("--betas", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    p.add_argument("--hidden_dim", type=int, default=128, help="hyperreps_hidden_dim")
    p.add_argument("--learning_rate", type=float, default=3e-3, help="hyperreps_learning_rate")
    p.add_argument("--batch_size", type=int, default=16, help="hyperreps_batch_size")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "bench_hyperreps.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config_from_dict({
        "seed": args.seed, "zoo": {"zoo_dir": args.zoo_dir},
        "eval": {"eval_seeds": 1, "probes": ["ridge"], "property_targets": list(TARGETS),
                 "methods": ["statnn", "shape_only", "input_profile", "probe_fingerprint", "probe_fingerprint_data"]},
        "recon": {"hyperreps": True, "hyperreps_betas": args.betas, "hyperreps_epochs": args.epochs,
                  "hyperreps_hidden_dim": args.hidden_dim, "hyperreps_learning_rate": args.learning_rate,
                  "hyperreps_batch_size": args.batch_size}})
    zoo = ModelZooDataset.load(args.zoo_dir)
    graphs = WeightToGraph.from_config(cfg.graph).convert_model_to_graphs(zoo, cache_dir=Path(args.zoo_dir) / "graph_cache")
    out_dir = Path(args.out).parent
    rec = RunRecorder(out_dir / "bench_hyperreps_run", {}, write=False)
    seed = S.eval_seeds(cfg)[0]
    split = S.make_splits(cfg, zoo, rec)[seed]
    t0 = time.perf_counter()
    methods = H.train_hyperreps(cfg, zoo, graphs, split, seed, single_process("cpu"), out_dir / "bench_hyperreps_ckpt", rec)
    seconds = time.perf_counter() - t0
    base = S.baseline_embeddings(cfg, zoo, split, seed, rec)
    table = {}
    for method, emb in {**methods.embeddings, **base.embeddings, **base.oracles}.items():
        props = S.evaluate_method(cfg, zoo, split, emb, seed)["properties"]
        table[method] = {t: {k: props[t]["ridge"].get(k) for k in ("R2", "within_kendall")} for t in TARGETS}
    print(f"{'method':40s} " + " ".join(f"{t + ' R2':>12s} {t + ' tau':>12s}" for t in TARGETS))
    for method, row in table.items():
        cells = " ".join(f"{_fmt(row[t]['R2']):>12s} {_fmt(row[t]['within_kendall']):>12s}" for t in TARGETS)
        print(f"{method:40s} {cells}")
    recon = rec.results.get("hyperreps", {}).get("reconstruction_per_seed", {})
    for method, per_seed in recon.items():
        q = per_seed[str(seed)]
        print(f"{method}: reconstruction R^2 {q['mean_r2']:.3f} (standardized {q['mean_r2_standardized']:.3f}), "
              f"test accuracy {q['mean_acc_original']:.3f} -> {q['mean_acc_reconstructed']:.3f}, "
              f"{q['frac_within_5_points']:.0%} within 5 points")
    out = {"benchmark": "bench_hyperreps", "zoo": f"{args.zoo_dir} ({len(zoo)} models, version {zoo.version[:12]})",
           "args": vars(args), "seed": seed, "properties": table, "reconstruction": recon,
           "training": rec.results.get("training", {}), "train_seconds": round(seconds, 1),
           "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine()}
    out_dir.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1, default=float))
    return out


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


if __name__ == "__main__":
    main()
