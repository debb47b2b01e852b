"""What else could the training-free part of the encoder read, and does the GNN's learned part help once the
metric head is fit on rows the GNN never trained on?

    python benchmarks/bench_fingerprint_variants.py --seeds 42 43 44
    python benchmarks/bench_fingerprint_variants.py --results_dir results/default   # + the trained GNNs of that run

Every number is val-unseen P@10 within shape group (``evaluation.validation_retrieval``: what a choice may read)
on each seed's split of the main run (``stages.draw_seed_split``); no test-unseen row is read. The closed-form
within-task metric head (``encoder_blocks.MetricHead``, as the encoder's after supcon) is fit with task labels on
the train runs (part 2: also on other rows), best of ``--metric_dims``.

1. Probe variants (training-free), each as raw cosine and through the head:
   - ``fp``: the two training-free fingerprints (Gaussian and unlabeled source-data probes), unit norm each, as the
     encoder keeps them beside its learned part;
   - ``fp + saliency``: plus each model's mean |input gradient| map of the norm of its centred log-softmax on the
     same probes (one number per input feature: which inputs the network reads);
   - ``task-input probes``: probes drawn from the *training* tasks' own inputs (one block per distinct input
     transform chain among the train runs' tasks, so never a held-out task's transform), alone and beside ``fp``.
2. With ``--results_dir``: each trained GNN of that run (``checkpoints/gnn_<recipe>_seed<s>.pt``), its embedding before
   the head (fingerprint part + learned part), through the head fit on the train runs (which the GNN trained on),
   on the val runs (which it never saw) or on both, for learned-part weights 0 .. 1 (0: the fingerprint alone).

Prints one line per measurement and writes benchmarks/out/bench_fingerprint_variants.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import baselines as B  # noqa: E402
from bench_fingerprint_metric import fingerprints  # noqa: E402
from config import ExperimentConfig  # noqa: E402
from data_prep import ModelZooDataset  # noqa: E402
from encoder_blocks import MetricHead  # noqa: E402
from evaluation import l2_normalize, validation_retrieval  # noqa: E402
from probes import _saliency  # noqa: E402
from stages import draw_seed_split  # noqa: E402
from tasks import get_task, load_task_data  # noqa: E402


class SaliencyMap(B.ProbeFingerprint):
    """Mean |d ||centred log-softmax|| / dx| over the probes, per input feature (a model's RMS-normalised map)."""

    name = "saliency_map"

    @torch.no_grad()
    def _embed(self, recs: list) -> np.ndarray:
        width = max(int(np.prod(r.spec.input_shape)) for r in recs)
        out = np.zeros((len(recs), width), np.float32)
        for idx in B.arch_groups(recs).values():
            spec = recs[idx[0]].spec
            layers = [B._layers(recs[i], i) for i in idx]
            params = {f"layers.{l}.{k}": torch.stack([m[l][j] for m in layers])
                      for l in range(len(spec.layers)) for j, k in enumerate(("weight", "bias"))}
            X = self.probe_set_.inputs(int(np.prod(spec.input_shape)))
            g = _saliency(spec, params, X.reshape(len(X), *spec.input_shape)).reshape(len(idx), len(X), -1)
            g = g / g.square().mean(dim=(1, 2), keepdim=True).sqrt().clamp_min(1e-12)
            out[idx, :g.shape[2]] = g.abs().mean(1).numpy()
        return out


def training_task_probes(train_tasks: set[str], num_probes: int, seed: int) -> dict[int, torch.Tensor]:
    """{input size: (num_probes, size)} unlabeled inputs of the training tasks, spread evenly over their distinct
    (source, input transform chain) pairs."""
    rng = np.random.default_rng(seed)
    chains: dict[tuple, str] = {}
    for t in sorted(train_tasks):
        s = get_task(t)
        chains.setdefault((s.dataset, s.transforms), t)
    by_size: dict[int, list[torch.Tensor]] = {}
    for t in chains.values():
        X = load_task_data(t)[0]
        by_size.setdefault(int(np.prod(X.shape[1:])), []).append(X.reshape(len(X), -1))
    out = {}
    for n, Xs in by_size.items():
        k = -(-num_probes // len(Xs))  # per chain, then num_probes of them at random
        rows = torch.cat([X[torch.from_numpy(np.sort(rng.choice(len(X), size=k, replace=False)))] for X in Xs])
        out[n] = rows[torch.from_numpy(np.sort(rng.permutation(len(rows))[:num_probes]))].float()
    return out


def one_seed(zoo: ModelZooDataset, seed: int, args: argparse.Namespace, graphs: list | None) -> dict:
    meta = zoo.metadata
    split = draw_seed_split(ExperimentConfig(), meta, seed)
    task, group, run = (np.asarray(meta[c]) for c in ("task", "shape_group", "run_id"))
    fit = np.sort(np.concatenate([split.train, split.val]))
    db = split.selection_rows
    pos = {int(r): i for i, r in enumerate(db)}
    vs, vu = ([pos[int(r)] for r in rows] for rows in (split.val, split.val_unseen))
    train, val = np.asarray(split.train), np.asarray(split.val)

    def score(z: np.ndarray) -> float:
        z = l2_normalize(z)
        return validation_retrieval(z[db], task[db], group[db], run[db], vs, vu, 10)["val_unseen_P@10"]

    def head_score(x: np.ndarray, rows: np.ndarray) -> float:
        x = np.asarray(x, np.float32)
        return max(score(MetricHead(x.shape[1], d).fit(torch.from_numpy(x[rows]), task[rows], args.metric_reg)(
            torch.from_numpy(x)).numpy()) for d in args.metric_dims if d <= len(rows))

    fp = l2_normalize(fingerprints(zoo, fit))
    sal = SaliencyMap(num_probes=args.num_probes, kinds=("gauss", "data")).fit(zoo.subset(fit)).embed(zoo)
    sal = l2_normalize(sal - sal[fit].mean(0))
    tp = B.make_baseline("probe_fingerprint_data", num_probes=args.num_probes).fit(zoo.subset(fit))
    for n, X in training_task_probes(set(task[train]), args.num_probes, seed).items():
        tp.probe_set_.set_data(n, X)
    ftask = l2_normalize(tp.embed(zoo))
    variants = {"fp": fp, "task-input probes": ftask, "fp + task-input probes": np.concatenate([fp, ftask], 1),
                **{f"fp + {a} x saliency": np.concatenate([fp, a * sal], 1) for a in (0.5, 1.0)}}
    out: dict = {"variants": {}}
    for name, x in variants.items():
        out["variants"][name] = {"raw": score(x), "head": head_score(x, train)}
        print(f"seed {seed} {name:28s} raw {out['variants'][name]['raw']:.3f}  head {out['variants'][name]['head']:.3f}",
              flush=True)
    if graphs is None:
        return out
    import dataloader as D
    from contrastive_learning import embed
    from gnn_encoder import load_encoder

    out["learned_part"] = {}
    for recipe in args.recipes:
        enc = load_encoder(Path(args.results_dir) / "checkpoints" / f"gnn_{recipe}_seed{seed}.pt")
        enc.set_metric(None, 1.0)  # the embedding before the head: fingerprint part, then the learned part
        raw = embed(enc, D.embed_loader(graphs, None, 256, 0, 1, None), torch.device("cpu"))
        first = raw.shape[1] - args.global_dim  # the learned part's first column
        for rows_name, rows in (("train runs", train), ("val runs", val), ("train + val runs", fit)):
            res = {}
            for a in args.learned_weights:
                x = raw.copy()
                x[:, first:] *= a
                res[str(a)] = head_score(x, rows)
            out["learned_part"][f"{recipe}, head on {rows_name}"] = res
            print(f"seed {seed} gnn [{recipe}], head on {rows_name:16s} " +
                  "  ".join(f"learned x{a}: {v:.3f}" for a, v in res.items()), flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo_dir", default="zoo/default")
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    p.add_argument("--num_probes", type=int, default=128)
    p.add_argument("--metric_dims", type=int, nargs="+", default=[256, 512])
    p.add_argument("--metric_reg", type=float, default=0.1)
    p.add_argument("--results_dir", default=None, help="a run whose trained GNNs to read (checkpoints/*.pt)")
    p.add_argument("--recipes", nargs="+", default=["supcon", "checkpoint"])
    p.add_argument("--learned_weights", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0])
    p.add_argument("--global_dim", type=int, default=ExperimentConfig().encoder.global_dim,
                   help="width of the learned part (the encoder's global_dim)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "bench_fingerprint_variants.json"))
    args = p.parse_args(argv)
    zoo = ModelZooDataset.load(args.zoo_dir)
    graphs = None
    if args.results_dir:
        import stages

        cfg = ExperimentConfig()
        cfg.zoo.zoo_dir = args.zoo_dir
        graphs = stages.make_graphs(cfg, zoo, stages.setup(cfg))
    per_seed = {str(s): one_seed(zoo, s, args, graphs) for s in args.seeds}
    summary = {f"{name} {kind}": float(np.mean([r["variants"][name][kind] for r in per_seed.values()]))
               for name in next(iter(per_seed.values()))["variants"] for kind in ("raw", "head")}
    for k, v in summary.items():
        print(f"mean over {len(per_seed)} seeds, {k}: {v:.3f}")
    out = {"args": vars(args), "summary": summary, "per_seed": per_seed}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
