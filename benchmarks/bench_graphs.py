"""Neuron-graph conversion throughput and graph-cache load time.

    .venv/bin/python benchmarks/bench_graphs.py [--zoo_dir zoo/default] [--num_models 3000]

Uses the zoo in ``--zoo_dir`` when it exists; otherwise a zoo of the default zoo's architecture
mix (``zoo_plan.plan_zoo``) with random-init weights (``zoo_training.init_params``): conversion
cost depends on the shapes, not on the values. Prints the figures and writes them as JSON to
benchmarks/out/bench_graphs.json.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from torch_geometric.data import Batch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import data_prep  # noqa: E402
from symmetry import SymmetryAugmenter  # noqa: E402
from weight_to_graph import WeightToGraph  # noqa: E402
from zoo_plan import plan_zoo  # noqa: E402
from zoo_training import init_params  # noqa: E402


def random_zoo(num_models: int, checkpoints_per_run: int = 3, seed: int = 0) -> data_prep.ModelZooDataset:
    """A zoo with the default zoo's architectures (plan_zoo) and random-init weights."""
    plans = plan_zoo(math.ceil(num_models / checkpoints_per_run), seed=seed)
    rows, weights, specs = [], {}, {}
    for plan in plans:
        specs[plan.spec.arch_id] = plan.spec
        for run in plan.runs:
            for c in range(checkpoints_per_run):
                mid = f"{run.run_id}-c{c}"
                weights[mid] = init_params(plan.spec, run.seed + c, run.init_scale)
                rows.append({"model_id": mid, "arch_id": plan.spec.arch_id})
    return data_prep.ModelZooDataset(pd.DataFrame(rows), specs, weights)


def timed(fn, repeat: int = 3):
    """(best seconds over ``repeat`` runs, last result)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo_dir", default="zoo/default", help="zoo to convert (random-init zoo if absent)")
    ap.add_argument("--num_models", type=int, default=3000, help="size of the random-init zoo")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads (0 = torch default); 1 is much faster on a shared, busy machine")
    ap.add_argument("--out", default=str(Path(__file__).parent / "out" / "bench_graphs.json"))
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    zoo_path = Path(args.zoo_dir)
    t0 = time.perf_counter()
    if (zoo_path / "zoo.json").exists():
        zoo, source = data_prep.ModelZooDataset.load(zoo_path), f"zoo {zoo_path}"
    else:
        zoo, source = random_zoo(args.num_models), f"random-init zoo ({args.num_models} models, default mix)"
    n = len(zoo)
    print(f"{source}: {n} models, {len(zoo.specs)} architectures (made in {time.perf_counter() - t0:.1f} s)")
    res: dict = {"source": source, "num_models": n, "num_architectures": len(zoo.specs),
                 "torch_threads": torch.get_num_threads(), "platform": platform.platform(), "figures": {}}
    fig = res["figures"]
    _ = zoo.version  # hash once, outside the timings

    for canon in (True, False):
        conv = WeightToGraph(max_kernel=5, canonicalize=canon)
        sec, graphs = timed(lambda: conv.convert_model_to_graphs(zoo))
        fig[f"convert_graphs_per_s_canonicalize_{canon}"] = round(n / sec, 1)
        print(f"convert_model_to_graphs canonicalize={canon}: {sec:.3f} s, {n / sec:,.0f} graphs/s")

    conv = WeightToGraph()
    m = min(n, 500)
    sec, _ = timed(lambda: [conv.to_graph(zoo.spec(i), zoo.state_dict(i), i) for i in range(m)], repeat=1)
    fig["to_graph_one_by_one_graphs_per_s"] = round(m / sec, 1)
    print(f"to_graph one model at a time: {m / sec:,.0f} graphs/s (for comparison)")

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        graphs = conv.convert_model_to_graphs(zoo, cache_dir=tmp)
        fig["convert_and_write_cache_s"] = round(time.perf_counter() - t0, 3)
        path = conv.cache_path(tmp, zoo.version)
        fig["cache_mb"] = round(path.stat().st_size / 2**20, 1)
        sec, cached = timed(lambda: conv.convert_model_to_graphs(zoo, cache_dir=tmp))
        assert len(cached) == n and torch.equal(cached[-1].edge_attr, graphs[-1].edge_attr)
        fig["cache_load_s"] = round(sec, 3)
        print(f"cache: write+convert {fig['convert_and_write_cache_s']} s, {fig['cache_mb']} MB, "
              f"load {sec:.3f} s ({n / sec:,.0f} graphs/s)")

    num_nodes = sum(g.num_nodes for g in graphs)
    num_edges = sum(g.edge_attr.shape[0] for g in graphs)
    fig["mean_nodes"], fig["mean_edges"] = round(num_nodes / n, 1), round(num_edges / n, 1)
    bs = 128
    sec, _ = timed(lambda: [Batch.from_data_list(graphs[i:i + bs]) for i in range(0, n, bs)], repeat=1)
    fig["batch_collate_graphs_per_s"] = round(n / sec, 1)
    aug = SymmetryAugmenter()  # the AugmentConfig defaults: permutation, noise 0.05, edge dropout 0.1
    g = torch.Generator().manual_seed(0)
    m = min(n, 1000)
    sec, _ = timed(lambda: [aug.augment_graph(graphs[i], g) for i in range(m)], repeat=1)
    fig["augment_graph_per_s"] = round(m / sec, 1)
    print(f"graphs: {fig['mean_nodes']} nodes, {fig['mean_edges']} edges on average; "
          f"Batch.from_data_list {fig['batch_collate_graphs_per_s']:,.0f} graphs/s; "
          f"augment_graph {fig['augment_graph_per_s']:,.0f} graphs/s")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
