"""Encoder throughput, peak memory and achieved FLOP/s on batches of 64 digits MLPs (or zoo batches).

Workloads:

* ``--workload digits`` (default, fixed by the issue): 64 MLPs 64-32-10 (ReLU, canonical form)
  -> 2,368 edges and 106 nodes each, 151,552 edges per batch; hidden 64, 3 message-passing steps;
* ``--workload zoo``: what the default experiment trains on: batches of 32 graphs drawn at random
  from ``--zoo_dir`` (default zoo/default: mixed MLPs and CNNs of several depths), ``--zoo_batches``
  different ones (seeds ``--seed`` ...; each timed call trains on all of them, figures are per batch);
  hidden 32, 2 message-passing steps (config.py's CPU defaults). ``--hidden_dim``, ``--steps``
  and ``--batch_size`` override either workload's defaults.

For each encoder it measures

* forward throughput (eval, no grad) and training-step throughput (forward + projection
  head + backward + AdamW step), in graphs/s (median over timed iterations);
* peak memory of the training loop: CPU: the rise of the process's max RSS
  (``resource.getrusage``) over the measured loop, each encoder in its own subprocess so
  the high-water marks do not mix; GPU: ``torch.cuda.max_memory_allocated``;
* the training step's FLOPs (``torch.utils.flop_counter.FlopCounterMode``: matmuls and
  attention, not elementwise/gather/scatter work) and achieved FLOP/s;
* in the same run, the ceiling: FLOP/s of the step's dominant matmul shape alone, the edge
  MLP's [E x h] @ [h x h] (fresh output, as in the model, and into a reused buffer);
* the same for two *reference* models defined here (not library encoders): a textbook PyG
  message-passing GNN with a message MLP on the [h_dst, h_src, e] concatenation, and its
  factorized variant, so the ModelEmbedder can be compared with them in the same (noisy) run
  and against the issue's quiet-machine figures for such GNNs (122/30 and 192/94 graphs/s).

Process CPU time per step is reported beside wall time: on a shared machine it is the less
noisy figure (with --threads 1 it approximates a quiet single core).

Usage::

    python benchmarks/bench_encoder.py                       # CPU, all encoders, hidden 64
    python benchmarks/bench_encoder.py --no-tune-alloc       # without the glibc allocator tuning
    python benchmarks/bench_encoder.py --device cuda --bf16  # GPU, bf16 autocast
    python benchmarks/bench_encoder.py --workload zoo --encoders gnn --threads 1  # mixed zoo batches
    python benchmarks/bench_encoder.py --encoders gnn --probes 32     # with probe features (issue #16: >= 200/s)

``--probes N`` builds the GNNs with probe features (probes.py: N Gaussian and N data probes per input size,
the fingerprint kept in the embedding): every step runs the batch's networks on the probes (forward and
input saliency) before the message passing, as training does.

Writes ``benchmarks/out/bench_encoder_[zoo_]<device>[_bf16][_notune][_threadsT][_probesN].json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from torch_geometric.data import Batch  # noqa: E402
from torch_geometric.nn import MessagePassing  # noqa: E402

import numpy as np  # noqa: E402

import architecture as A  # noqa: E402
import gnn_encoder as G  # noqa: E402
from contrastive_learning import build_optimizer  # noqa: E402
from probes import source_inputs  # noqa: E402
from weight_to_graph import WeightToGraph  # noqa: E402

REFERENCES = ("plain_pyg_gnn", "plain_pyg_gnn_factorized")


class _PlainLayer(MessagePassing):
    """Reference only: a textbook PyG layer, message MLP on [h_dst, h_src, e] (2 linears per edge), no edge updates."""

    def __init__(self, h: int):
        super().__init__(aggr="sum")
        self.lin1 = nn.Linear(3 * h, h)
        self.lin2 = nn.Linear(h, h)
        self.node_mlp = nn.Sequential(nn.Linear(2 * h, h), nn.ReLU(), nn.Linear(h, h))

    def forward(self, x, edge_index, e):
        return x + self.node_mlp(torch.cat([x, self.propagate(edge_index, x=x, e=e)], -1))

    def message(self, x_i, x_j, e):
        return self.lin2(torch.relu(self.lin1(torch.cat([x_i, x_j, e], -1))))


class _PlainFactorizedLayer(_PlainLayer):
    """The same with the first message linear as W_a h_dst + W_b h_src + W_c e (node terms computed on nodes)."""

    def __init__(self, h: int):
        super().__init__(h)
        del self.lin1
        self.lin_dst, self.lin_src, self.lin_e = nn.Linear(h, h), nn.Linear(h, h, bias=False), nn.Linear(h, h, bias=False)

    def forward(self, x, edge_index, e):
        m = self.propagate(edge_index, a=self.lin_dst(x), b=self.lin_src(x), e=e)
        return x + self.node_mlp(torch.cat([x, m], -1))

    def message(self, a_i, b_j, e):
        return self.lin2(torch.relu(a_i + b_j + self.lin_e(e)))


class PlainPyGGNN(nn.Module):
    """Reference for calibrating this noisy machine against the issue's quiet-machine figures (not a library encoder)."""

    def __init__(self, hidden_dim: int, message_passing_steps: int, factorized: bool, global_dim: int = 128,
                 projection_dim: int = 64, **_):
        super().__init__()
        self.node = nn.Linear(3, hidden_dim)
        self.edge = nn.Linear(25, hidden_dim)
        layer = _PlainFactorizedLayer if factorized else _PlainLayer
        self.layers = nn.ModuleList([layer(hidden_dim) for _ in range(message_passing_steps)])
        self.out = nn.Linear(hidden_dim, global_dim)
        self.projector = nn.Linear(global_dim, projection_dim)

    def forward(self, batch):
        x = self.node(torch.cat([batch.x, batch.node_type[:, None].float(), batch.activation[:, None].float()], -1))
        e = self.edge(batch.edge_attr)
        for layer in self.layers:
            x = layer(x, batch.edge_index, e)
        return self.out(torch.zeros(batch.num_graphs, x.size(1)).index_add_(0, batch.batch, x))

    def project(self, z):
        return self.projector(z)


GOALS = {"train_graphs_per_s": 200.0, "peak_mb": 1024.0, "flops_fraction_of_ceiling": 0.5}


def digits_mlp_batch(batch_size: int, seed: int = 0) -> Batch:
    """A batch of ``batch_size`` canonical-form graphs of freshly initialised 64-32-10 ReLU MLPs."""
    spec = A.mlp_spec(64, [32], 10, "relu")
    torch.manual_seed(seed)
    w2g = WeightToGraph(max_kernel=5, canonicalize=True)
    graphs = [w2g.to_graph(spec, A.build_model(spec).state_dict(), model_idx=i) for i in range(batch_size)]
    return Batch.from_data_list(graphs)


WORKLOADS = {  # workload -> (batch_size, hidden_dim, message-passing steps)
    "digits": (64, 64, 3),
    "zoo": (32, 32, 2),
}


def zoo_batch(batch_size: int, zoo_dir: str | Path = ROOT / "zoo" / "default", seed: int = 0) -> Batch:
    """A batch of ``batch_size`` canonical-form graphs of zoo models drawn at random (seeded) from ``zoo_dir``."""
    from data_prep import ModelZooDataset

    zoo = ModelZooDataset.load(zoo_dir)
    if len(zoo) < batch_size:
        raise ValueError(f"{zoo_dir}: {len(zoo)} models, fewer than the batch size {batch_size}")
    idx = torch.randperm(len(zoo), generator=torch.Generator().manual_seed(seed))[:batch_size].tolist()
    w2g = WeightToGraph(max_kernel=5, canonicalize=True)
    return Batch.from_data_list([w2g.to_graph(zoo.spec(i), zoo.state_dict(i), model_idx=i) for i in idx])


def _input_sizes(batch: Batch) -> set[int]:
    """Input feature counts of a batch's architectures (the probe sizes an encoder needs)."""
    return {int(np.prod(A.ArchitectureSpec.from_json(s).input_shape)) for s in set(batch.spec_json)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, iters: int, warmup: int, device: torch.device, cpu_times: list | None = None) -> list[float]:
    """Wall seconds per call; appends process CPU seconds per call to ``cpu_times`` if given."""
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(iters):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
        if cpu_times is not None:
            cpu_times.append(time.process_time() - c0)
    return out


def matmul_ceiling(rows: int, k: int, n: int, device: torch.device, dtype: torch.dtype, iters: int) -> dict:
    """FLOP/s of [rows x k] @ [k x n] alone, with a fresh output (as in the model) and into a reused buffer."""
    a = torch.randn(rows, k, device=device, dtype=dtype)
    w = torch.randn(k, n, device=device, dtype=dtype)
    buf = torch.empty(rows, n, device=device, dtype=dtype)
    flops = 2.0 * rows * k * n
    fresh = statistics.median(_time(lambda: a @ w, iters, 3, device))
    reused = statistics.median(_time(lambda: torch.mm(a, w, out=buf), iters, 3, device))
    return {"shape": f"[{rows} x {k}] @ [{k} x {n}]", "gflops_fresh_output": flops / fresh / 1e9,
            "gflops_reused_output": flops / reused / 1e9, "ms_fresh_output": fresh * 1e3}


def bench_one(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    if args.workload == "zoo":  # several random batches (seeds seed, seed+1, ...): zoo batches differ in size/mix
        batches = [zoo_batch(args.batch_size, args.zoo_dir, args.seed + i).to(device) for i in range(args.zoo_batches)]
    else:
        batches = [digits_mlp_batch(args.batch_size).to(device)]
    kwargs = dict(hidden_dim=args.hidden_dim, message_passing_steps=args.steps, global_dim=128, projection_dim=64)
    torch.manual_seed(0)
    if name in REFERENCES:
        enc = PlainPyGGNN(factorized=name.endswith("factorized"), **kwargs).to(device)
    elif args.probes and name != "weightnet":  # probe features (probes.py): recomputed from the weights every step
        sizes = sorted({n for b in batches for n in _input_sizes(b)})
        enc = G.build_encoder(name, probes=args.probes, probe_kinds=args.probe_kinds, probe_sizes=sizes,
                              fingerprint_weight=1.0, probe_saliency=not args.no_saliency, **kwargs)
        for n in sizes if "data" in args.probe_kinds else ():
            X = source_inputs(n, args.probes)
            if X is not None:
                enc.probe_set.set_data(n, X)
        enc = enc.to(device)
    else:
        enc = G.build_encoder(name, **kwargs).to(device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()
    # the optimizer training uses (fused AdamW where it can be: one pass over all tensors)
    opt, _ = build_optimizer(enc.parameters(), learning_rate=1e-3, weight_decay=0.01, lr_schedule="none", epochs=1)

    # one timed call runs every batch once (one batch for digits); figures are per batch (= per training step)
    def forward() -> None:
        for batch in batches:
            with torch.no_grad(), amp:
                enc(batch)

    def train_step() -> None:
        for batch in batches:
            opt.zero_grad(set_to_none=True)
            with amp:
                loss = enc.project(enc(batch)).float().square().mean()
            loss.backward()
            opt.step()

    # memory baseline before the first forward: with the tuned allocator freed memory stays in the heap,
    # so only the rise from here (graphs and encoder already built) shows the peak working set
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    enc.eval()
    fwd = _time(forward, args.iters, 2, device)
    enc.train()
    step_cpu: list[float] = []
    step = _time(train_step, args.iters, 1, device, step_cpu)
    if device.type == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    with FlopCounterMode(display=False) as fc:
        train_step()
    flops = fc.get_total_flops()
    nb = len(batches)
    t_fwd, t_step, t_cpu = statistics.median(fwd) / nb, statistics.median(step) / nb, statistics.median(step_cpu) / nb
    flops /= nb
    e = round(sum(b.edge_index.size(1) for b in batches) / nb)  # mean edges per batch: the ceiling's row count
    ceiling = matmul_ceiling(e, args.hidden_dim, args.hidden_dim, device,
                             torch.bfloat16 if args.bf16 else torch.float32, max(5, args.iters // 2))
    res = {
        "encoder": name, "workload": args.workload, "params": sum(p.numel() for p in enc.parameters()), **kwargs,
        "probes": args.probes and name not in REFERENCES and name != "weightnet" and {
            "per_kind": args.probes, "kinds": args.probe_kinds, "saliency": not args.no_saliency},
        "batch_graphs": args.batch_size, "batches": nb, "batch_edges": e,
        "batch_edges_all": [b.edge_index.size(1) for b in batches], "batch_nodes": [b.num_nodes for b in batches],
        "forward_graphs_per_s": args.batch_size / t_fwd, "forward_ms": t_fwd * 1e3,
        "train_graphs_per_s": args.batch_size / t_step, "train_step_ms": t_step * 1e3,
        "train_step_ms_all": [round(t / nb * 1e3, 2) for t in step],
        "train_step_cpu_ms": t_cpu * 1e3,
        "train_graphs_per_cpu_s": args.batch_size / t_cpu,
        "peak_mb": peak_mb, "peak_measure": "cuda max_memory_allocated rise" if device.type == "cuda"
        else "max RSS rise over forward + training iterations (getrusage)" + (
            "; understated for --workload zoo: loading the zoo sets the high-water mark first" if nb > 1 else ""),
        "train_step_gflop": flops / 1e9, "train_step_gflops_per_s": flops / t_step / 1e9,
        "dominant_matmul": ceiling,
    }
    res["flops_fraction_of_ceiling"] = res["train_step_gflops_per_s"] / ceiling["gflops_fresh_output"]
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoders", nargs="+", default=list(G.ENCODER_NAMES) + list(REFERENCES),
                   choices=list(G.ENCODER_NAMES) + list(REFERENCES))
    p.add_argument("--workload", default="digits", choices=sorted(WORKLOADS),
                   help="digits: 64 MLPs 64-32-10 at hidden 64, 3 steps; zoo: 32 random zoo graphs at hidden 32, 2 steps")
    p.add_argument("--zoo_dir", default=str(ROOT / "zoo" / "default"), help="zoo of --workload zoo")
    p.add_argument("--seed", type=int, default=0, help="first seed of the random --workload zoo batches")
    p.add_argument("--zoo_batches", type=int, default=4,
                   help="--workload zoo: distinct random batches (seeds seed..seed+n-1), each timed call trains on all")
    p.add_argument("--hidden_dim", type=int, default=None, help="default: the workload's (digits 64, zoo 32)")
    p.add_argument("--steps", type=int, default=None, help="message_passing_steps; default: the workload's (3, 2)")
    p.add_argument("--batch_size", type=int, default=None, help="graphs per batch; default: the workload's (64, 32)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--probes", type=int, default=0, help="GNNs with probe features: probes per kind (0: none)")
    p.add_argument("--probe_kinds", nargs="+", default=["gauss", "data"], choices=["gauss", "data", "learned"])
    p.add_argument("--no_saliency", action="store_true", help="with --probes: no input saliency")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    p.add_argument("--no-tune-alloc", dest="tune_alloc", action="store_false",
                   help="do not call gnn_encoder.tune_cpu_allocator()")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)  # run one encoder, print JSON
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    args = p.parse_args()
    for field, default in zip(("batch_size", "hidden_dim", "steps"), WORKLOADS[args.workload]):
        if getattr(args, field) is None:
            setattr(args, field, default)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        if args.tune_alloc and device.type == "cpu" and not G.tune_cpu_allocator():
            raise SystemExit("tune_cpu_allocator() failed (no glibc mallopt); rerun with --no-tune-alloc")
        print(json.dumps(bench_one(args.child, args, device)))
        return

    results = []
    for name in args.encoders:  # one subprocess each: clean max-RSS high-water marks
        cmd = [sys.executable, __file__, "--child", name] + [a for a in sys.argv[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"benchmark of {name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(r)
        c = r["dominant_matmul"]
        print(f"{name:>20}: forward {r['forward_graphs_per_s']:8.1f} graphs/s | train step {r['train_graphs_per_s']:7.1f} "
              f"graphs/s ({r['train_step_ms']:.0f} ms, CPU {r['train_step_cpu_ms']:.0f} ms; {r['train_graphs_per_cpu_s']:.0f} graphs/CPU-s) | peak {r['peak_mb']:6.0f} MB | "
              f"{r['train_step_gflop']:.1f} GFLOP/step -> {r['train_step_gflops_per_s']:.1f} GFLOP/s "
              f"= {r['flops_fraction_of_ceiling']:.2f} x ceiling {c['shape']} {c['gflops_fresh_output']:.1f} GFLOP/s "
              f"(reused output {c['gflops_reused_output']:.1f})", flush=True)
    gnn = next((r for r in results if r["encoder"] == "gnn"), None)
    goals = None
    if gnn is not None and args.workload == "digits":  # the goals are stated for the digits workload
        goals = {k: {"goal": v, "measured": gnn[k], "met": gnn[k] <= v if k == "peak_mb" else gnn[k] >= v}
                 for k, v in GOALS.items()}
        print("ModelEmbedder goals:", json.dumps({k: (round(g["measured"], 2), "met" if g["met"] else "NOT met")
                                                  for k, g in goals.items()}))
    load = os.getloadavg()
    out = {
        "workload": ("64 x MLP 64-32-10 relu, canonical neuron graphs" if args.workload == "digits" else
                     f"{args.zoo_batches} batches of {args.batch_size} random graphs of {args.zoo_dir} "
                     f"(seeds {args.seed}..{args.seed + args.zoo_batches - 1})"),
        "batch_size": args.batch_size, "hidden_dim": args.hidden_dim, "steps": args.steps, "device": args.device, "bf16": args.bf16,
        "tune_alloc": args.tune_alloc and args.device == "cpu", "threads": torch.get_num_threads(),
        "load_average_at_end": load, "torch": torch.__version__, "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "results": results, "modelembedder_goals": goals,
        "note": "the machine is shared; load_average_at_end shows how busy it was",
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    tag = ("zoo_" if args.workload == "zoo" else "") + args.device + ("_bf16" if args.bf16 else "") + ("" if args.tune_alloc or args.device != "cpu" else "_notune")
    tag += f"_threads{torch.get_num_threads()}" if args.device == "cpu" else ""
    tag += f"_probes{args.probes}" + ("_nosal" if args.no_saliency else "") if args.probes else ""
    path = Path(args.out) / f"bench_encoder_{tag}.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path} (load average {load[0]:.1f})")


if __name__ == "__main__":
    main()
