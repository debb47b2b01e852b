"""Zoo-scale check of the model index: P@10 through ModelIndex equals the evaluation's exact figure.

    python benchmarks/bench_zoo_index.py --zoo zoo/default --encoder results/default/checkpoints/gnn_checkpoint_seed42.pt

Indexes every model of the zoo with the trained encoder (retrieval.Embedder), asks the index
for each model's 11 nearest neighbours (itself excluded, then other checkpoints of its own run
removed as the evaluation does), and compares full-zoo task P@10 with
evaluation.RetrievalEvaluator on the same embeddings. Prints and writes JSON to benchmarks/out/.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep import ModelZooDataset  # noqa: E402
from evaluation import RetrievalEvaluator  # noqa: E402
from retrieval import Embedder, ModelIndex  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--zoo", required=True)
    p.add_argument("--encoder", required=True)
    p.add_argument("--out", default=str(Path(__file__).parent / "out" / "bench_zoo_index.json"))
    a = p.parse_args()
    zoo = ModelZooDataset.load(a.zoo)
    meta = zoo.metadata
    emb = Embedder.from_file(a.encoder, batch_size=128)
    t0 = time.perf_counter()
    index = ModelIndex.build(zoo, emb, index_type="flat")
    build_s = time.perf_counter() - t0
    ids = meta["model_id"].to_numpy()
    tasks, runs = meta["task"].to_numpy(), meta["run_id"].to_numpy()
    pos = {m: i for i, m in enumerate(ids)}
    vecs = np.stack([index.embedding(m) for m in ids])
    # through the index: nearest neighbours, own run removed (as the evaluation does), top 10
    k_fetch = 10 + int(meta.groupby("run_id").size().max())
    hits = []
    for i in range(len(ids)):
        res = index.query(vecs[i], k=k_fetch + 1)
        nbrs = [pos[r["model_id"]] for r in res if runs[pos[r["model_id"]]] != runs[i]][:10]
        hits.append(np.mean(tasks[nbrs] == tasks[i]))
    p_index = float(np.mean(hits))
    exact = RetrievalEvaluator((10,)).evaluate_knn_retrieval(vecs, tasks, exclude_same=runs)["P@10"]
    out = {"zoo": a.zoo, "encoder": a.encoder, "n_models": len(ids), "index_build_s": round(build_s, 2),
           "P@10_through_index": p_index, "P@10_exact_evaluation": float(exact),
           "abs_difference": abs(p_index - float(exact))}
    print(json.dumps(out, indent=2))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
