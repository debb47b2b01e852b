"""Same-architecture sub-zoos: where fixed-architecture methods (NFN) apply, every method side by side.

The K largest architectures spanning several tasks are each a sub-zoo of their own
(:func:`select_same_architecture_subzoos`); :func:`same_architecture_retrieval` scores same-task retrieval
inside each (see ``SAME_ARCHITECTURE_NOTE``) with :class:`evaluation.RetrievalEvaluator`.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from evaluation import RetrievalEvaluator

SAME_ARCHITECTURE_NOTE = (
    "relevant = same task; each of the K largest architectures spanning several tasks is a sub-zoo of its "
    "own: queries = its test queries (seen-task test runs, test-unseen and unseen-kind models), database = "
    "its train, val and query models, other checkpoints of the query's run removed. Shapes are equal, so "
    "shape_only is the chance anchor; per-architecture methods (NFN) are fit on the sub-zoo's train models only.")

SUBZOO_METRICS = ("P@1", "P@5", "P@10", "mAP", "MRR", "chance_P")


def select_same_architecture_subzoos(metadata: Any, fit_idx: Sequence[int], query_idx: Sequence[int], k: int,
                                     min_tasks: int = 4, min_models: int = 20) -> list[dict[str, Any]]:
    """The ``k`` largest same-architecture sub-zoos that span at least ``min_tasks`` tasks.

    An architecture qualifies with >= ``min_models`` models, >= ``min_tasks`` distinct tasks, at least
    one fit row, and at least one query row whose task has another training run in the architecture
    (a query that can find a relevant model). Order: most models first, then most tasks, then most
    such queries, then arch_id (deterministic).

    Args:
        metadata: table with columns arch_id, arch_name, task, run_id (N rows).
        fit_idx / query_idx: the rows methods fit on and the query rows of the main protocols.
    Returns:
        [{"arch_id", "arch_name", "n_models", "n_tasks", "tasks", "n_fit", "n_queries"}], at most k;
        n_queries counts the query rows that have a relevant model (the ones retrieval scores).
    """
    arch, task = np.asarray(metadata["arch_id"]), np.asarray(metadata["task"])
    names, run = np.asarray(metadata["arch_name"]), np.asarray(metadata["run_id"])
    fit = np.zeros(len(arch), bool)
    fit[np.asarray(fit_idx, np.int64)] = True
    qry = np.zeros(len(arch), bool)
    qry[np.asarray(query_idx, np.int64)] = True
    cands = []
    for a in np.unique(arch):
        m = arch == a
        tasks = sorted(set(task[m].tolist()))
        runs_of_task: dict[Any, set] = {}
        for t, r in zip(task[m], run[m]):
            runs_of_task.setdefault(t, set()).add(r)
        n_fit = int((m & fit).sum())
        n_q = sum(len(runs_of_task[t]) > 1 for t in task[m & qry])  # queries with another run of their task
        if m.sum() >= min_models and len(tasks) >= min_tasks and n_fit > 0 and n_q > 0:
            cands.append({"arch_id": str(a), "arch_name": str(names[m][0]), "n_models": int(m.sum()),
                          "n_tasks": len(tasks), "tasks": tasks, "n_fit": n_fit, "n_queries": int(n_q)})
    cands.sort(key=lambda c: (-c["n_models"], -c["n_tasks"], -c["n_queries"], c["arch_id"]))
    return cands[:max(0, int(k))]


def subzoo_rows(metadata: Any, arch_id: str) -> np.ndarray:
    """Zoo rows of one architecture in zoo order (the row order of per-architecture embeddings)."""
    return np.flatnonzero(np.asarray(metadata["arch_id"]) == arch_id)


def same_architecture_retrieval(
    embeddings: np.ndarray | Mapping[str, np.ndarray], metadata: Any, arch_ids: Sequence[str],
    fit_idx: Sequence[int], query_idx: Sequence[int], k_values: Sequence[int] = (1, 5, 10),
    exclude_same_run: bool = True,
) -> dict[str, Any]:
    """Same-task retrieval inside each same-architecture sub-zoo (see ``SAME_ARCHITECTURE_NOTE``).

    Args:
        embeddings: (N, d) for the whole zoo, or {arch_id: (n_a, d)} whose rows are
            ``subzoo_rows(metadata, arch_id)`` (methods defined per architecture, e.g. NFN).
        metadata: table with columns arch_id, task, run_id (N rows).
        arch_ids: the sub-zoos (from :func:`select_same_architecture_subzoos`).
        fit_idx / query_idx: the main split; queries are ``query_idx`` rows of the architecture,
            the database is its ``fit_idx`` and ``query_idx`` rows.
    Returns:
        {arch_id: {metric: value} for ``SUBZOO_METRICS`` + "n_queries"}, and "mean": the
        unweighted mean over sub-zoos of ``SUBZOO_METRICS``.
    """
    assert len(arch_ids) > 0, "same_architecture_retrieval needs at least one sub-zoo"
    task, run = np.asarray(metadata["task"]), np.asarray(metadata["run_id"])
    n = len(task)
    fit, qry = np.asarray(fit_idx, np.int64), np.asarray(query_idx, np.int64)
    ev = RetrievalEvaluator(k_values)
    out: dict[str, Any] = {}
    for a in arch_ids:
        rows = subzoo_rows(metadata, a)  # (n_a,) zoo rows; position p <-> zoo row rows[p]
        if len(rows) == 0:
            raise ValueError(f"same_architecture_retrieval: architecture {a} has no model in the metadata")
        if isinstance(embeddings, Mapping):
            if a not in embeddings:
                raise KeyError(f"same_architecture_retrieval: no embeddings for architecture {a}")
            emb = np.asarray(embeddings[a], np.float32)
            assert emb.ndim == 2 and emb.shape[0] == len(rows), \
                f"embeddings of architecture {a} must be ({len(rows)}, d), got {emb.shape}"
        else:
            full = np.asarray(embeddings)
            assert full.ndim == 2 and full.shape[0] == n, f"embeddings must be ({n}, d), got {full.shape}"
            emb = full[rows]
        q_pos = np.flatnonzero(np.isin(rows, qry))
        db_pos = np.flatnonzero(np.isin(rows, np.concatenate([fit, qry])))
        if len(q_pos) == 0:
            raise ValueError(f"same_architecture_retrieval: architecture {a} has no query model")
        m = ev.evaluate_knn_retrieval(emb, task[rows], query_idx=q_pos, db_idx=db_pos,
                                      exclude_same=run[rows] if exclude_same_run else None)
        out[str(a)] = {**{key: m[key] for key in SUBZOO_METRICS if key in m}, "n_queries": m["n_queries"]}
    keys = [key for key in SUBZOO_METRICS if all(key in out[str(a)] for a in arch_ids)]
    out["mean"] = {key: float(np.mean([out[str(a)][key] for a in arch_ids])) for key in keys}
    return out
