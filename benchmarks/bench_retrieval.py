"""Retrieval benchmark: ModelIndex at scale, and the whole ``query FILE`` path.

Part 1 (scale): ``--n`` clustered synthetic unit vectors (default 1,000,000 x 64) are added to a
``ModelIndex`` (HNSW M=32, efSearch tuned to recall@10 >= 0.95, SQLite metadata for every row)
in chunks, as ``index_folder`` does. Reports build time, memory (RSS), single-query latency
p50/p99 for k=10 (raw FAISS search, and ``ModelIndex.query`` with the metadata lookup), exact
single-query latency, recall@10 of HNSW vs exact search on fresh queries (and an efSearch
sweep), and save/load times.

Part 2 (``query FILE``): a small index of real checkpoint files embedded by the GNN encoder
(default CPU size, random init: speed does not depend on training); times
``ModelIndex.query(path)`` = hash + read checkpoint + canonical graph + encoder + search + metadata,
querying hidden-permuted copies of the indexed files (content not in the index, so each is embedded;
an indexed file's own content would be answered from its stored vector).

Prints the figures and writes them as JSON to benchmarks/out/bench_retrieval.json.

    python benchmarks/bench_retrieval.py                 # 1M vectors (~2-4 min on 2 cores)
    python benchmarks/bench_retrieval.py --n 100000      # quicker
    python benchmarks/bench_retrieval.py --data iso      # isotropic clusters: the hard case
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import architecture as A  # noqa: E402
import retrieval as R  # noqa: E402
from symmetry import permute_hidden  # noqa: E402


def rss_mb() -> float:
    """Current resident set size (MiB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (not Linux?)")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def clustered(n: int, d: int, clusters: int, seed: int, kind: str = "lowrank", centre_seed: int = 1234,
              spread: float = 0.35, rank: int = 8) -> np.ndarray:
    """Unit vectors around ``clusters`` fixed random unit centres (same centres for data and queries).

    ``lowrank``: each cluster spreads along its own random ``rank``-dim subspace (plus 3% isotropic
    noise), as learned embeddings lie near low-dimensional manifolds. ``iso``: isotropic Gaussian
    clusters in all d dimensions, the hardest case for graph indexes (neighbours nearly equidistant).
    """
    cg = np.random.default_rng(centre_seed)
    centres = cg.normal(size=(clusters, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    basis = (cg.normal(size=(clusters, d, rank)) / np.sqrt(d)).astype(np.float32) if kind == "lowrank" else None
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), np.float32)
    for s in range(0, n, 100_000):  # chunked: bounded temporaries
        m = min(100_000, n - s)
        lab = rng.integers(0, clusters, m)
        if kind == "iso":
            x = centres[lab] + spread / np.sqrt(d) * rng.standard_normal((m, d), dtype=np.float32)
        elif kind == "lowrank":
            z = spread * rng.standard_normal((m, rank), dtype=np.float32)
            x = (centres[lab] + np.einsum("ndr,nr->nd", basis[lab], z)
                 + 0.03 / np.sqrt(d) * rng.standard_normal((m, d), dtype=np.float32))
        else:
            raise ValueError(f"unknown data kind {kind!r} (lowrank|iso)")
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def pct(times_s: list[float]) -> dict:
    a = np.asarray(times_s) * 1000
    return {"p50_ms": round(float(np.percentile(a, 50)), 4), "p99_ms": round(float(np.percentile(a, 99)), 4),
            "mean_ms": round(float(a.mean()), 4)}


def recall_at(got: np.ndarray, truth: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(g[:k]) & set(t[:k])) / k for g, t in zip(got, truth)]))


def scale_benchmark(args: argparse.Namespace) -> dict:
    n, d, k = args.n, args.d, 10
    print(f"[scale] generating {n:,} clustered {d}-d vectors ({args.clusters} {args.data} clusters)", flush=True)
    x = clustered(n, d, args.clusters, seed=0, kind=args.data)
    q = clustered(args.queries, d, args.clusters, seed=1, kind=args.data)  # fresh points, not in the index
    spec = A.mlp_spec(64, [32], 10, "relu")
    base = R.metadata_row("x", spec, {})
    rss0 = rss_mb()
    index = R.ModelIndex(d, index_type=args.index_type, hnsw_m=32, ef_construction=args.ef_construction)
    t0 = time.perf_counter()
    t_meta = 0.0
    for s in range(0, n, args.chunk):
        m = min(args.chunk, n - s)
        tm = time.perf_counter()
        rows = [{**base, "model_id": f"m{s + i}", "dataset": f"ds{(s + i) % 20}", "test_acc": ((s + i) % 100) / 100}
                for i in range(m)]
        t_meta += time.perf_counter() - tm
        index.add_embeddings(x[s:s + m], rows)
        print(f"  added {s + m:>9,}  {time.perf_counter() - t0:6.1f}s  kind={index.kind}", flush=True)
    index.tune()  # at the final size, as ModelIndex.build / index_folder do
    build_s = time.perf_counter() - t0
    rss1 = rss_mb()
    print(f"[scale] build {build_s:.1f}s (of which making metadata dicts {t_meta:.1f}s); "
          f"RSS +{rss1 - rss0:.0f} MiB; tuning {index.tuning}", flush=True)

    # single queries run on --query-threads threads (OpenMP threads only add contention for one query)
    build_threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(args.query_threads)
    # exact ground truth for the fresh queries (vectors are unit rows already)
    exact = faiss.IndexFlatIP(d)
    exact.add(x)
    t = time.perf_counter()
    _, truth = exact.search(q, k)
    exact_batch_s = time.perf_counter() - t
    exact_single = []
    for i in range(min(50, len(q))):
        t = time.perf_counter()
        exact.search(q[i:i + 1], k)
        exact_single.append(time.perf_counter() - t)

    inner = faiss.downcast_index(index.vectors.faiss_index.index)
    sweep = {}
    tuned = index.params.get("ef_search")
    for ef in sorted({16, 24, 32, 48, 64, 96, 128, tuned}):
        if index.kind != "hnsw":
            break
        inner.hnsw.efSearch = ef
        lat = []
        got = np.empty((len(q), k), np.int64)
        for i in range(len(q)):
            t = time.perf_counter()
            _, got[i:i + 1] = index.search(q[i], k)
            lat.append(time.perf_counter() - t)
        sweep[ef] = {"recall_at_10": round(recall_at(got, truth, k), 4), **pct(lat)}
        print(f"  efSearch {ef:4d}: recall@10 {sweep[ef]['recall_at_10']:.4f}  p50 {sweep[ef]['p50_ms']:.3f} ms  "
              f"p99 {sweep[ef]['p99_ms']:.3f} ms", flush=True)
    if index.kind == "hnsw":
        inner.hnsw.efSearch = tuned
    # the tuned setting, single queries: raw search and the full ModelIndex.query (metadata rows)
    lat_search, lat_query = [], []
    got = np.empty((len(q), k), np.int64)
    for i in range(len(q)):
        t = time.perf_counter()
        _, got[i:i + 1] = index.search(q[i], k)
        lat_search.append(time.perf_counter() - t)
    for i in range(len(q)):
        t = time.perf_counter()
        index.query(q[i], k=k)
        lat_query.append(time.perf_counter() - t)
    lat_filtered = []
    for i in range(min(200, len(q))):
        t = time.perf_counter()
        index.query(q[i], k=k, filters={"dataset": "ds3", "min_test_acc": 0.5})  # ~2.5% of rows match
        lat_filtered.append(time.perf_counter() - t)
    res = {
        "n": n, "dim": d, "clusters": args.clusters, "data": args.data, "queries": len(q), "index_kind": index.kind,
        "build_threads": build_threads, "query_threads": args.query_threads,
        "hnsw_m": index.params["hnsw_m"], "ef_construction": index.params["ef_construction"],
        "tuned_param": index.tuning, "build_s": round(build_s, 2), "metadata_dicts_s": round(t_meta, 2),
        "rss_before_mb": round(rss0), "rss_after_build_mb": round(rss1), "index_rss_mb": round(rss1 - rss0),
        "recall_at_10": round(recall_at(got, truth, k), 4),
        "search_latency": pct(lat_search), "query_latency_with_metadata": pct(lat_query),
        "filtered_query_latency": pct(lat_filtered),
        "exact_single_query": pct(exact_single), "exact_batch_1000_s": round(exact_batch_s, 3), "ef_sweep": sweep,
    }
    del exact
    faiss.omp_set_num_threads(build_threads)
    if args.save:
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            t = time.perf_counter()
            vdir = index.save(Path(tmp) / "db")
            res["save_s"] = round(time.perf_counter() - t, 2)
            res["disk_mb"] = round(sum(f.stat().st_size for f in vdir.iterdir()) / 2**20)
            del index
            t = time.perf_counter()
            back = R.ModelIndex.load(Path(tmp) / "db")
            res["load_s"] = round(time.perf_counter() - t, 2)
            assert len(back) == n
    res["peak_rss_mb"] = round(peak_rss_mb())
    return res


def query_file_benchmark(args: argparse.Namespace) -> dict:
    """ModelIndex.query(checkpoint path) end to end with the GNN encoder (random init, CPU default size)."""
    from safetensors.torch import save_file

    import gnn_encoder as G

    torch.manual_seed(0)
    torch.set_num_threads(args.query_threads)
    faiss.omp_set_num_threads(args.query_threads)
    specs = [A.mlp_spec(64, [32], 10, "relu"), A.mlp_spec(64, [32, 16], 10, "tanh"),
             A.cnn_spec((1, 8, 8), [8, 12], 3, 10, "relu")]
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        folder = Path(tmp) / "ckpts"
        folder.mkdir()
        queries = Path(tmp) / "queries"  # hidden-permuted copies, not indexed: each query is read and embedded
        queries.mkdir()
        g = torch.Generator().manual_seed(1)
        for i in range(args.file_models):
            spec = specs[i % len(specs)]
            sd = {k: 0.3 * torch.randn(s) for k, s in spec.param_shapes().items()}
            for where, weights in ((folder, sd), (queries, permute_hidden(spec, sd, g))):
                save_file(weights, str(where / f"model{i:04d}.safetensors"))
                (where / f"model{i:04d}.safetensors.spec.json").write_text(json.dumps({"spec": spec.to_dict()}))
        enc = G.build_encoder("gnn", hidden_dim=64, global_dim=128, projection_dim=64, message_passing_steps=3)
        enc_path = Path(tmp) / "encoder.pt"
        G.save_encoder(str(enc_path), enc)
        emb = R.Embedder.from_file(enc_path)
        t = time.perf_counter()
        R.index_folder(folder, emb, Path(tmp) / "db")
        index_s = time.perf_counter() - t
        index = R.ModelIndex.load(Path(tmp) / "db")  # loads the recorded encoder on the first file query
        files = sorted(queries.glob("*.safetensors"))
        index.query(files[0], k=10)  # warm-up (loads the encoder)
        lat, top1 = [], 0
        stages = {"read": [], "embed": [], "search": []}
        for f in files[:args.file_queries]:
            t = time.perf_counter()
            res = index.query(f, k=10)
            lat.append(time.perf_counter() - t)
            top1 += res[0]["model_id"].rpartition("@")[0] == f.name  # the original (ids: file@content-hash)
            t = time.perf_counter()
            rec = R.load_checkpoint(f)
            stages["read"].append(time.perf_counter() - t)
            t = time.perf_counter()
            v = index.embedder([(rec.spec, rec.state_dict)])
            stages["embed"].append(time.perf_counter() - t)
            t = time.perf_counter()
            index.query(v[0], k=10)
            stages["search"].append(time.perf_counter() - t)
    return {"models": args.file_models, "queries": len(lat), "index_folder_s": round(index_s, 2),
            "threads": args.query_threads,
            "encoder": "gnn hidden 64, global 128, 3 steps (random init)",
            "query_file_latency": pct(lat), "self_top1": top1 / len(lat),
            "stages_p50_ms": {k: pct(v)["p50_ms"] for k, v in stages.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="vectors in the scale test")
    p.add_argument("--d", type=int, default=64, help="embedding size in the scale test")
    p.add_argument("--clusters", type=int, default=1000, help="cluster centres of the synthetic vectors")
    p.add_argument("--data", default="lowrank", choices=["lowrank", "iso"],
                   help="cluster shape: lowrank (8-dim subspaces, realistic) or iso (isotropic, hardest)")
    p.add_argument("--queries", type=int, default=1000, help="fresh query vectors")
    p.add_argument("--chunk", type=int, default=100_000, help="vectors per add (as the streaming indexer)")
    p.add_argument("--index-type", default="hnsw", choices=R.INDEX_TYPES)
    p.add_argument("--ef-construction", type=int, default=80, help="HNSW build beam width (ModelIndex default 80)")
    p.add_argument("--no-save", dest="save", action="store_false", help="skip the save/load timing")
    p.add_argument("--file-models", type=int, default=300, help="checkpoint files in the query-FILE test")
    p.add_argument("--file-queries", type=int, default=50, help="file queries timed")
    p.add_argument("--query-threads", type=int, default=1, help="torch/FAISS threads while timing single queries")
    p.add_argument("--tmp", default=None, help="scratch folder (default: system temp)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "bench_retrieval.json"))
    args = p.parse_args()
    out = {"machine": {"cpus": os.cpu_count(), "faiss_threads": faiss.omp_get_max_threads(),
                       "load_avg_start": os.getloadavg(), "python": platform.python_version(),
                       "faiss": faiss.__version__, "torch": torch.__version__},
           "reference_plain_faiss_hnsw_1M": {"build_s": 59, "p50_ms": 0.10, "recall_at_10": 0.95,
                                             "exact_single_ms": 21},
           "goals": {"p50_ms_max": 0.2, "recall_at_10_min": 0.95, "build_s_max": 120, "query_file_ms_max": 100}}
    out["scale"] = scale_benchmark(args)
    out["query_file"] = query_file_benchmark(args)
    out["machine"]["load_avg_end"] = os.getloadavg()
    s, f = out["scale"], out["query_file"]
    print(json.dumps(out, indent=2))
    print(f"\nSUMMARY n={s['n']:,} d={s['dim']}: build {s['build_s']} s, index RSS {s['index_rss_mb']} MiB, "
          f"recall@10 {s['recall_at_10']} ({s['tuned_param'].get('param')}={s['tuned_param'].get('value')}), "
          f"search p50 {s['search_latency']['p50_ms']} ms p99 {s['search_latency']['p99_ms']} ms, "
          f"query+metadata p50 {s['query_latency_with_metadata']['p50_ms']} ms, "
          f"exact p50 {s['exact_single_query']['p50_ms']} ms; "
          f"query FILE p50 {f['query_file_latency']['p50_ms']} ms p99 {f['query_file_latency']['p99_ms']} ms")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
