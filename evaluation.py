"""Evaluation: metrics as pure functions over numpy arrays, and the protocols built on them.

Every method (baselines and GNN encoders) is evaluated by the same code: it only needs an
embedding matrix ``(n_models, d)`` whose row i is zoo model i (float32), plus the zoo's
metadata columns and the split's row sets passed in explicitly.

Contents
  * retrieval: :class:`RetrievalEvaluator` (cosine kNN; P/R/F1@k, mAP, MRR),
    :func:`retrieval_protocols` (headline: seen_tasks, unseen_tasks, unseen_kinds,
    cross-architecture within shape group; secondary: within shape group over all queries, full zoo,
    cross-architecture, same architecture) and :func:`validation_retrieval` (the test protocol on
    validation data: what model selection reads);
  * clustering: :func:`purity_score`, :func:`clustering_metrics` (k-means vs task labels),
    :func:`clustering_within_groups` (per shape group);
  * property prediction: :func:`regression_metrics`, :func:`within_group_rank_corr`,
    :func:`property_prediction` (ridge / MLP probes), :func:`property_prediction_suite`,
    :func:`distance_performance_spearman`;
  * symmetry robustness: :func:`symmetry_robustness` (queries permuted/rescaled/sign-flipped);
  * reference embeddings (chance, constant), the property oracles and :func:`trivial_passes` (where a constant
    or shape-only embedding scores >= 0.85): in the sibling ``references.py``, re-exported here;
  * :func:`aggregate_seeds` (mean/std over seeds; each seed has its own split).

Model merging and transfer (fine-tuning) protocols live in the sibling ``merging.py``, the
same-architecture sub-zoos in ``subzoos.py``.
"""
from __future__ import annotations

import re
import warnings
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from scipy import stats
from sklearn.cluster import KMeans
from sklearn.compose import TransformedTargetRegressor
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import RidgeCV
from sklearn.metrics import adjusted_rand_score, mean_squared_error, normalized_mutual_info_score, r2_score
from sklearn.neural_network import MLPRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from references import (PROPERTY_ORACLES, REFERENCE_METHODS, TRIVIAL_METHODS, TRIVIAL_THRESHOLD,  # noqa: F401
                        property_oracle_embeddings, reference_embeddings, trivial_passes)  # (re-exported)

# (n_queries_in_chunk * n_database) similarities held at once; bounds memory to ~32 MB of float32.
_CHUNK_ELEMENTS = 8_000_000

class NoRelevantItems(ValueError):
    """No query has a relevant item in its database: the protocol does not apply to this zoo/split."""


RelevanceFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
EmbedFn = Callable[[list], np.ndarray]

# What each protocol of retrieval_protocols measures (for the report; not numbers). Every protocol removes the
# other checkpoints of the query's own training run from its database; the database is the whole zoo.
PROTOCOL_NOTES: dict[str, str] = {
    "seen_tasks": "relevant = same task, within shape group; queries: test runs of the tasks the encoders "
                  "trained on (other runs of their task were in training)",
    "unseen_tasks": "relevant = same task, within shape group; queries: every model of the test-unseen tasks "
                    "(held out of training and never read by any choice; seen-task models are distractors)",
    "unseen_kinds": "relevant = same task, within shape group; queries: every model of the tasks of one whole "
                    "task kind (e.g. every label permutation) held out of training and of every choice; the kind "
                    "is redrawn per seed",
    "cross_architecture_within_shape_group": "relevant = same task and another architecture family, within shape "
                                             "group; queries: all test queries (seen-task test runs, test-unseen "
                                             "and unseen-kind models)",
    "within_shape_group": "relevant = same task, within shape group; queries: all test queries (seen-task test "
                          "runs, test-unseen and unseen-kind models mixed)",
    "full_zoo": "relevant = same task, database = whole zoo; INFLATED by shape: input/output sizes "
                "alone separate many tasks",
    "cross_architecture": "relevant = same task and another architecture family, database = whole zoo; helped "
                          "by shape (see the within-shape-group version)",
    "same_architecture": "relevant = same arch_id, within shape group; all test queries",
}
HEADLINE_PROTOCOLS: tuple[str, ...] = ("seen_tasks", "unseen_tasks", "unseen_kinds",
                                       "cross_architecture_within_shape_group")
QUERY_SETS: tuple[str, ...] = ("seen_tasks", "unseen_tasks", "unseen_kinds")  # protocols with their own queries
VALIDATION_NOTE = ("the test protocol on validation data: relevant = same task, within shape group; database = "
                   "train, val and val-unseen models; queries: val runs of seen tasks (val_seen) and every "
                   "val-unseen model (val_unseen); the selection metric val_P@10 is the mean of the two P@10s "
                   "(the seen one alone when a split has no val-unseen task)")


# --------------------------------------------------------------------------------------------
# small pure helpers
# --------------------------------------------------------------------------------------------
def reduce_dims(x: np.ndarray, fit_rows: np.ndarray, max_dims: int, seed: int = 0) -> np.ndarray:
    """``x`` (n, d) unchanged if d <= max_dims, else projected on the top ``max_dims`` principal
    components fit on ``x[fit_rows]`` (keeps probes and k-means on wide embeddings such as TF-IDF
    affordable; the components that carry most of the variance are kept). Only components the fit rows span:
    at most ``len(fit_rows) - 1``, none with variance below 1e-6 of the largest there (a standardizing probe
    divided by that ~0: ridge R^2 of -1e7 on the small zoo's fingerprints, 230 fit rows, 256 components)."""
    if max_dims <= 0 or x.shape[1] <= max_dims:
        return x
    n_comp = max(1, min(max_dims, len(fit_rows) - 1))
    pca = PCA(n_components=n_comp, svd_solver="randomized", random_state=seed).fit(x[fit_rows])
    var = pca.explained_variance_
    keep = int(max(1, (var > 1e-6 * var[0]).sum())) if len(var) and var[0] > 0 else 1
    return pca.transform(x)[:, :keep].astype(np.float32)


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm (a zero row stays zero). ``x``: (n, d)."""
    x = np.asarray(x, dtype=np.float32)
    assert x.ndim == 2, f"l2_normalize expects (n, d), got shape {x.shape}"
    if not np.isfinite(x).all():
        raise ValueError("embeddings contain NaN or Inf")
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def same_label(labels: Sequence) -> RelevanceFn:
    """Relevance function: database item relevant iff it has the query's label."""
    lab = np.asarray(labels)

    def fn(q: np.ndarray, db: np.ndarray) -> np.ndarray:
        return lab[q][:, None] == lab[db][None, :]

    return fn


def same_and_different(same: Sequence, different: Sequence) -> RelevanceFn:
    """Relevance: same value of ``same`` (e.g. task) AND another value of ``different`` (e.g. arch family)."""
    s, d = np.asarray(same), np.asarray(different)

    def fn(q: np.ndarray, db: np.ndarray) -> np.ndarray:
        return (s[q][:, None] == s[db][None, :]) & (d[q][:, None] != d[db][None, :])

    return fn


def ranking_metrics(ranked_relevance: np.ndarray, n_relevant: np.ndarray,
                    k_values: Sequence[int]) -> dict[str, np.ndarray]:
    """Per-query retrieval metrics from relevance flags in rank order.

    Args:
        ranked_relevance: bool (Q, D), entry [q, r] says whether the item ranked r+1 for query q
            is relevant. Every relevant database item must appear in the row (excluded items may
            trail as False).
        n_relevant: int (Q,), relevant items in each query's database (> 0).
        k_values: cut-offs.
    Returns:
        {"P@k", "R@k", "F1@k" for each k, "AP", "RR"} -> float arrays (Q,).
        P@k = hits in top k / k; R@k = hits / n_relevant; F1@k their harmonic mean (0 if both 0);
        AP = mean over relevant items of the precision at their rank; RR = 1 / rank of the first
        relevant item.
    """
    rel = np.asarray(ranked_relevance, dtype=bool)
    n_rel = np.asarray(n_relevant, dtype=np.float64)
    assert rel.ndim == 2 and n_rel.shape == (rel.shape[0],), \
        f"ranked_relevance (Q, D) and n_relevant (Q,) expected, got {rel.shape} and {n_rel.shape}"
    if (n_rel <= 0).any():
        raise ValueError("ranking_metrics: every query needs at least one relevant item")
    if not np.array_equal(rel.sum(1), n_rel):
        raise ValueError("ranking_metrics: n_relevant differs from the relevant items in the ranking")
    hits = np.cumsum(rel, axis=1)  # (Q, D) relevant items within the top r
    out: dict[str, np.ndarray] = {}
    for k in k_values:
        assert k >= 1, f"k must be >= 1, got {k}"
        h = hits[:, min(k, rel.shape[1]) - 1].astype(np.float64)
        p, r = h / k, h / n_rel
        out[f"P@{k}"] = p
        out[f"R@{k}"] = r
        out[f"F1@{k}"] = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0.0)
    ranks = np.arange(1, rel.shape[1] + 1, dtype=np.float64)
    out["AP"] = (rel * (hits / ranks)).sum(1) / n_rel
    first = rel.argmax(1)  # every row has a relevant item, so argmax is the first one
    out["RR"] = 1.0 / (first + 1.0)
    return out


# --------------------------------------------------------------------------------------------
# retrieval
# --------------------------------------------------------------------------------------------
class RetrievalEvaluator:
    """Cosine-similarity kNN retrieval metrics (exact, numpy matmul in query chunks).

    Exact search over the whole database is needed for mAP (every relevant item's rank), and a
    (chunk, n_db) matmul + argsort is fast up to ~20k models; FAISS is used by retrieval.py for the
    query-time index, not here.
    """

    def __init__(self, k_values: Sequence[int] = (1, 5, 10), chunk_elements: int = _CHUNK_ELEMENTS,
                 tie_break_seed: int = 0):
        self.k_values = tuple(int(k) for k in k_values)
        assert self.k_values and min(self.k_values) >= 1, f"k_values must be positive, got {k_values}"
        self.chunk_elements = int(chunk_elements)
        # Ties (identical embeddings, e.g. the shape-only baseline) are broken in a random but fixed
        # database order: breaking them by index would reward a zoo stored sorted by task.
        self.tie_break_seed = tie_break_seed

    def evaluate_knn_retrieval(
        self,
        embeddings: np.ndarray,
        task_labels: Sequence | None = None,
        query_idx: Sequence[int] | None = None,
        db_idx: Sequence[int] | None = None,
        group_labels: Sequence | None = None,
        relevance_mask_fn: RelevanceFn | None = None,
        exclude_same: Sequence | Sequence[Sequence] | None = None,
        query_embeddings: np.ndarray | None = None,
        per_query: bool = False,
    ) -> dict[str, Any]:
        """Retrieval metrics averaged over queries.

        Args:
            embeddings: (N, d) one row per model (cosine similarity is used).
            task_labels: (N,) labels; relevant = same label. Ignored when ``relevance_mask_fn`` given.
            query_idx: rows used as queries (default all).
            db_idx: rows forming the database (default all). A query never retrieves itself.
            group_labels: (N,) if given, each query is searched only among database items of its
                own group (e.g. ``shape_group``).
            relevance_mask_fn: ``fn(q_idx (c,), db_idx (D,)) -> bool (c, D)``; overrides task_labels.
            exclude_same: an (N,) label array, or a list of them: database items sharing any of
                these labels with the query are removed from its database. Pass the ``run_id``
                column: a zoo stores several checkpoints of one training run, and retrieving the
                same run's earlier checkpoint is trivially easy (nearly the same weights) and would
                inflate every number without saying anything about task similarity.
            query_embeddings: (len(query_idx), d) optional replacement embeddings for the queries
                (used by :func:`symmetry_robustness`: transformed queries vs a clean database).
            per_query: also return "per_query": {"query_idx": the counted queries' rows, and each metric's
                per-query values in that order} (for breakdowns over subsets of the queries).
        Returns:
            {"P@k", "R@k", "F1@k" per k, "mAP", "MRR"} means over queries with at least one relevant
            item, plus "n_queries" (counted), "n_skipped" (queries without any relevant item in
            their database), "chance_P" (mean fraction of relevant items in a query's database:
            the expected P@k of a random ranking) and "mean_db_size".
        """
        emb = l2_normalize(embeddings)
        n = emb.shape[0]
        q = np.arange(n) if query_idx is None else np.asarray(query_idx, dtype=np.int64)
        db = np.arange(n) if db_idx is None else np.asarray(db_idx, dtype=np.int64)
        assert q.ndim == 1 and db.ndim == 1 and len(q) > 0 and len(db) > 0, "empty query or database set"
        assert q.max() < n and db.max() < n and q.min() >= 0 and db.min() >= 0, "index out of range"
        if relevance_mask_fn is None:
            if task_labels is None:
                raise ValueError("evaluate_knn_retrieval needs task_labels or relevance_mask_fn")
            assert len(task_labels) == n, f"task_labels has {len(task_labels)} entries for {n} embeddings"
            relevance_mask_fn = same_label(task_labels)
        groups = None
        if group_labels is not None:
            assert len(group_labels) == n, f"group_labels has {len(group_labels)} entries for {n} embeddings"
            groups = np.asarray(group_labels)
        excl: list[np.ndarray] = []
        if exclude_same is not None:
            is_list = isinstance(exclude_same, (list, tuple)) and len(exclude_same) > 0 \
                and np.ndim(exclude_same[0]) > 0
            arrs = list(exclude_same) if is_list else [exclude_same]
            for a in arrs:
                a = np.asarray(a)
                assert a.shape == (n,), f"exclude_same arrays must have shape ({n},), got {a.shape}"
                excl.append(a)
        if query_embeddings is not None:
            qemb = l2_normalize(query_embeddings)
            assert qemb.shape == (len(q), emb.shape[1]), \
                f"query_embeddings must be ({len(q)}, {emb.shape[1]}), got {qemb.shape}"
        else:
            qemb = emb[q]
        db = db[np.random.default_rng(self.tie_break_seed).permutation(len(db))]  # tie order, see __init__
        dbemb = emb[db]  # (D, d)

        values: dict[str, list[np.ndarray]] = {}
        chance, db_sizes, counted, skipped = [], [], [], 0
        chunk = max(1, self.chunk_elements // len(db))
        for s in range(0, len(q), chunk):
            qc = q[s:s + chunk]
            sim = qemb[s:s + chunk] @ dbemb.T  # (c, D)
            valid = qc[:, None] != db[None, :]  # never retrieve the query itself
            if groups is not None:
                valid &= groups[qc][:, None] == groups[db][None, :]
            for a in excl:
                valid &= a[qc][:, None] != a[db][None, :]
            rel = np.asarray(relevance_mask_fn(qc, db), dtype=bool)
            assert rel.shape == valid.shape, f"relevance_mask_fn returned {rel.shape}, expected {valid.shape}"
            rel &= valid
            n_rel, n_valid = rel.sum(1), valid.sum(1)
            keep = n_rel > 0
            skipped += int((~keep).sum())
            if not keep.any():
                continue
            sim, rel, valid = sim[keep], rel[keep], valid[keep]
            sim = np.where(valid, sim, -np.inf)
            order = np.argsort(-sim, axis=1, kind="stable")  # ties keep the shuffled database order
            m = ranking_metrics(np.take_along_axis(rel, order, axis=1), n_rel[keep], self.k_values)
            for key, v in m.items():
                values.setdefault(key, []).append(v)
            counted.append(qc[keep])
            chance.append(n_rel[keep] / n_valid[keep])
            db_sizes.append(n_valid[keep])
        n_counted = len(q) - skipped
        if n_counted == 0:
            raise NoRelevantItems(f"no query has a relevant item in its database ({len(q)} queries)")
        arrays = {k: np.concatenate(v) for k, v in values.items()}
        res: dict[str, Any] = {k: float(v.mean()) for k, v in arrays.items()}
        res["mAP"], res["MRR"] = res.pop("AP"), res.pop("RR")
        res.update(n_queries=float(n_counted), n_skipped=float(skipped),
                   chance_P=float(np.concatenate(chance).mean()),
                   mean_db_size=float(np.concatenate(db_sizes).mean()))
        if per_query:
            res["per_query"] = {"query_idx": np.concatenate(counted), **arrays}
        return res


def retrieval_protocols(
    embeddings: np.ndarray,
    metadata: Any,
    query_sets: Mapping[str, Sequence[int]],
    db_idx: Sequence[int] | None = None,
    k_values: Sequence[int] = (1, 5, 10),
    exclude_same_run: bool = True,
    protocols: Sequence[str] | None = None,
    per_query: bool = False,
) -> dict[str, dict[str, Any]]:
    """All retrieval protocols of the report (see ``PROTOCOL_NOTES``) for one embedding matrix.

    Args:
        embeddings: (N, d), row i <-> metadata row i.
        metadata: table (pandas DataFrame or dict of arrays) with columns task, shape_group, arch_id,
            arch_family and run_id, N rows.
        query_sets: {"seen_tasks", "unseen_tasks", "unseen_kinds"} -> query rows (a missing or empty set
            skips its protocol, with the reason); the other protocols query their union.
        db_idx: database rows (default every row).
        exclude_same_run: remove other checkpoints of the query's own training run from its database.
        protocols: subset of PROTOCOL_NOTES keys (default all).
        per_query: each protocol's metrics also hold its per-query values (``RetrievalEvaluator``).
    Returns:
        {protocol: metrics dict of RetrievalEvaluator.evaluate_knn_retrieval}, plus
        "skipped": {protocol: reason} for protocols that do not apply (no query of that kind, or no
        query has a relevant item, e.g. cross_architecture on a zoo of one architecture family).
    """
    n = len(embeddings)
    col = {c: np.asarray(metadata[c]) for c in ("task", "shape_group", "arch_id", "arch_family", "run_id")}
    for c, v in col.items():
        assert v.shape == (n,), f"metadata column {c!r} has {v.shape[0]} rows for {n} embeddings"
    unknown_sets = set(query_sets) - set(QUERY_SETS)
    if unknown_sets:
        raise ValueError(f"unknown query sets {sorted(unknown_sets)}; known: {list(QUERY_SETS)}")
    sets = {k: np.asarray(query_sets.get(k, ()), dtype=np.int64) for k in QUERY_SETS}
    every = np.concatenate(list(sets.values()))
    assert len(np.unique(every)) == len(every), "query sets overlap"
    db = np.arange(n) if db_idx is None else np.asarray(db_idx, dtype=np.int64)
    ev = RetrievalEvaluator(k_values)
    run = [col["run_id"]] if exclude_same_run else []
    wanted = list(PROTOCOL_NOTES) if protocols is None else list(protocols)
    unknown = set(wanted) - set(PROTOCOL_NOTES)
    if unknown:
        raise ValueError(f"unknown retrieval protocols {sorted(unknown)}; known: {list(PROTOCOL_NOTES)}")
    out: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for name in wanted:
        q = sets[name] if name in sets else every
        if len(q) == 0:
            skipped[name] = f"no {name.replace('_', ' ')} query in this split"
            continue
        kw: dict[str, Any] = dict(query_idx=q, db_idx=db, exclude_same=run or None, task_labels=col["task"],
                                  group_labels=None if name in ("full_zoo", "cross_architecture") else col["shape_group"])
        if name.startswith("cross_architecture"):
            kw.update(exclude_same=run + [col["arch_family"]])
        elif name == "same_architecture":
            kw.update(task_labels=col["arch_id"])
        try:
            out[name] = ev.evaluate_knn_retrieval(embeddings, **kw, per_query=per_query)
        except NoRelevantItems as e:  # reported, not hidden: the protocol does not apply here
            skipped[name] = str(e)
    if skipped:
        out["skipped"] = skipped
    return out


def validation_retrieval(embeddings: np.ndarray, task: Sequence, shape_group: Sequence, run_id: Sequence,
                         seen_queries: Sequence[int], unseen_queries: Sequence[int], k: int = 10) -> dict[str, float]:
    """The validation protocol (``VALIDATION_NOTE``): P@k of the seen-task and the unseen-task validation
    queries, each searched within its shape group among all ``embeddings`` rows (the validation database),
    and their mean, the selection metric.

    Args:
        embeddings: (D, d) the validation database (train, val and val-unseen models).
        task, shape_group, run_id: (D,) labels of those rows.
        seen_queries / unseen_queries: row positions of the val runs of seen tasks / the val-unseen models.
    Returns:
        {"val_seen_P@k", "val_unseen_P@k" (NaN without such queries), "val_P@k" (their mean, or the one
        that exists), "val_seen_chance_P", "val_unseen_chance_P"}.
    """
    ev = RetrievalEvaluator(k_values=(k,))
    out: dict[str, float] = {}
    for part, q in (("seen", seen_queries), ("unseen", unseen_queries)):
        q = np.asarray(q, dtype=np.int64)
        nan = {f"P@{k}": float("nan"), "chance_P": float("nan")}
        m = nan
        if len(q):
            try:
                m = ev.evaluate_knn_retrieval(embeddings, task, query_idx=q, group_labels=shape_group,
                                              exclude_same=run_id)
            except NoRelevantItems:  # no query has another run of its task in the database: this part is NaN
                m = nan
        out[f"val_{part}_P@{k}"], out[f"val_{part}_chance_P"] = m[f"P@{k}"], m["chance_P"]
    parts = [out[f"val_{p}_P@{k}"] for p in ("seen", "unseen") if not np.isnan(out[f"val_{p}_P@{k}"])]
    if not parts:
        raise ValueError("validation_retrieval: no validation query (neither val runs nor val-unseen models)")
    out[f"val_P@{k}"] = float(np.mean(parts))
    return out


def per_query_breakdown(results: Mapping[str, Mapping[str, Any]], labels: Sequence, k: int = 10,
                        protocols: Sequence[str] = HEADLINE_PROTOCOLS,
                        order: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """{protocol: {label: P@k}}: the mean P@k of each protocol's queries of one ``labels`` value (one per zoo row,
    e.g. the shape group), from :func:`retrieval_protocols` results computed with ``per_query``. Every label is
    present (in ``order`` when given, else sorted), NaN where it has no query of the protocol with a relevant item
    (and for a skipped protocol). Only the queries are split: each query searched the whole database."""
    lab = np.asarray(labels, dtype=object)
    out: dict[str, dict[str, float]] = {p: {} for p in protocols}
    for p in protocols:
        pq = results[p]["per_query"] if p in results else {"query_idx": np.zeros(0, np.int64), f"P@{k}": np.zeros(0)}
        q_lab, p_at_k = lab[np.asarray(pq["query_idx"], np.int64)], np.asarray(pq[f"P@{k}"])
        for g in (order if order is not None else sorted(set(lab.tolist()), key=str)):
            m = q_lab == g
            out[p][str(g)] = float(p_at_k[m].mean()) if m.any() else float("nan")
    return out


def retrieval_by_query_label(embeddings: np.ndarray, metadata: Any, query_sets: Mapping[str, Sequence[int]],
                             labels: Sequence, k: int = 10,
                             protocols: Sequence[str] = HEADLINE_PROTOCOLS) -> dict[str, dict[str, float]]:
    """P@k of ``protocols`` (of :func:`retrieval_protocols`, database the whole zoo) over the queries of one
    ``labels`` value at a time (:func:`per_query_breakdown`)."""
    assert len(labels) == len(embeddings), f"one label per zoo row expected, got {len(labels)} for {len(embeddings)}"
    res = retrieval_protocols(embeddings, metadata, query_sets, None, (k,), protocols=protocols, per_query=True)
    return per_query_breakdown(res, labels, k, protocols)


def retrieval_by_shape_group(embeddings: np.ndarray, metadata: Any, query_sets: Mapping[str, Sequence[int]],
                             k: int = 10, protocols: Sequence[str] = HEADLINE_PROTOCOLS) -> dict[str, dict[str, float]]:
    """:func:`retrieval_by_query_label` by the queries' shape group: {protocol: {shape_group: P@k}}."""
    return retrieval_by_query_label(embeddings, metadata, query_sets, np.asarray(metadata["shape_group"]), k, protocols)


# How much of its task a model learned (:func:`learned_fraction`), in bins: a query that failed to learn its task
# computes little of it, so no reading of its function can find the task's other models.
QUERY_FIT_BINS: tuple[tuple[str, float], ...] = (("failed (< 0.5)", 0.5), ("partly (0.5-0.9)", 0.9),
                                                 ("learned (>= 0.9)", float("inf")))


def learned_fraction(test_acc: Sequence[float], task: Sequence, num_outputs: Sequence[int]) -> np.ndarray:
    """Per model, the fraction of its task's learnable accuracy it reached: (acc - chance) / (best - chance), with
    chance = 1 / num_outputs and best = the highest test accuracy of any model of the same task (1 for that model,
    <= 0 at or below chance; 1 for every model of a task none learned above chance)."""
    acc, tk = np.asarray(test_acc, np.float64), np.asarray(task, dtype=object)
    chance = 1.0 / np.asarray(num_outputs, np.float64)
    assert acc.shape == tk.shape == chance.shape, f"one value per model expected: {acc.shape}, {tk.shape}, {chance.shape}"
    inv = np.unique(tk.astype(str), return_inverse=True)[1]
    task_best = np.full(inv.max() + 1 if len(inv) else 0, -np.inf)
    np.maximum.at(task_best, inv, acc)  # the best accuracy of each task
    gain = task_best[inv] - chance
    return np.where(gain > 1e-9, (acc - chance) / np.where(gain > 1e-9, gain, 1.0), 1.0)


def query_fit_labels(metadata: Any) -> np.ndarray:
    """The :data:`QUERY_FIT_BINS` name of every zoo row, from its test accuracy, task and output count (the
    ``out`` of its shape group ``in<n>-out<m>``)."""
    groups = [str(g) for g in np.asarray(metadata["shape_group"])]
    outs = [re.fullmatch(r"in\d+-out(\d+)", g) for g in groups]
    bad = sorted({g for g, m in zip(groups, outs) if m is None})
    if bad:
        raise ValueError(f"shape groups {bad[:3]} are not 'in<n>-out<m>': cannot read the output count")
    frac = learned_fraction(metadata["test_acc"], metadata["task"], [int(m.group(1)) for m in outs])
    edges = np.array([hi for _, hi in QUERY_FIT_BINS])
    names = np.array([name for name, _ in QUERY_FIT_BINS], dtype=object)
    return names[np.searchsorted(edges, frac, side="right")]


# --------------------------------------------------------------------------------------------
# clustering
# --------------------------------------------------------------------------------------------
def purity_score(labels_true: Sequence, labels_pred: Sequence) -> float:
    """Fraction of items whose cluster's majority true label is their own label."""
    t, p = np.asarray(labels_true), np.asarray(labels_pred)
    assert t.shape == p.shape and t.ndim == 1 and len(t) > 0, f"two (n,) label arrays expected, got {t.shape}, {p.shape}"
    _, ti = np.unique(t, return_inverse=True)
    _, pi = np.unique(p, return_inverse=True)
    counts = np.zeros((pi.max() + 1, ti.max() + 1), dtype=np.int64)  # (clusters, classes)
    np.add.at(counts, (pi, ti), 1)
    return float(counts.max(1).sum() / len(t))


def clustering_metrics(embeddings: np.ndarray, labels: Sequence, n_clusters: int | None = None,
                       seed: int = 0, n_init: int = 10) -> dict[str, float]:
    """k-means on L2-normalised embeddings (k = number of distinct labels) vs the labels.

    Returns {"purity", "ARI", "NMI", "n_clusters"}.
    """
    emb = l2_normalize(embeddings)
    lab = np.asarray(labels)
    assert lab.shape == (emb.shape[0],), f"labels must be ({emb.shape[0]},), got {lab.shape}"
    k = len(np.unique(lab)) if n_clusters is None else int(n_clusters)
    with warnings.catch_warnings():  # fewer distinct points than k (a constant embedding): fewer clusters, scored
        warnings.simplefilter("ignore", ConvergenceWarning)
        pred = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(emb)
    return {"purity": purity_score(lab, pred), "ARI": float(adjusted_rand_score(lab, pred)),
            "NMI": float(normalized_mutual_info_score(lab, pred)), "n_clusters": float(k)}


def clustering_within_groups(embeddings: np.ndarray, labels: Sequence, groups: Sequence, seed: int = 0,
                             min_labels: int = 2) -> dict[str, float]:
    """:func:`clustering_metrics` inside each group (e.g. shape group, so shapes cannot do the work),
    averaged over the groups with at least ``min_labels`` distinct labels (unweighted).

    Returns {"purity", "ARI", "NMI", "n_groups", "n_items"}; NaN scores and n_groups 0 when no group qualifies.
    """
    lab, grp = np.asarray(labels), np.asarray(groups)
    assert lab.shape == grp.shape == (len(embeddings),), \
        f"labels and groups must be ({len(embeddings)},), got {lab.shape}, {grp.shape}"
    per = []
    for g in np.unique(grp):
        m = grp == g
        if len(np.unique(lab[m])) >= min_labels:
            per.append((clustering_metrics(embeddings[m], lab[m], seed=seed), int(m.sum())))
    out = {k: float(np.mean([p[k] for p, _ in per])) if per else float("nan") for k in ("purity", "ARI", "NMI")}
    out.update(n_groups=float(len(per)), n_items=float(sum(n for _, n in per)))
    return out


# --------------------------------------------------------------------------------------------
# property prediction
# --------------------------------------------------------------------------------------------
def _corr(fn: Callable, a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation; NaN when either side is constant (undefined, reported as such)."""
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(fn(a, b).statistic)


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray, groups: Sequence | None = None,
                       min_group_size: int = 5) -> dict[str, float]:
    """R2, MSE, Spearman and Kendall tau, overall and within groups.

    Within-group numbers are the mean over groups (e.g. tasks) with at least ``min_group_size``
    items of the per-group correlation (:func:`within_group_rank_corr`: groups whose truth is constant are
    left out, a prediction constant within a group scores 0 there). Overall rank correlations are inflated when groups differ in level (tasks of
    different difficulty); the within-group ones are not.
    Returns {"R2", "MSE", "spearman", "kendall", and if groups: "within_kendall",
    "within_spearman", "n_groups"}; NaN where undefined.
    """
    yt, yp = np.asarray(y_true, np.float64), np.asarray(y_pred, np.float64)
    assert yt.ndim == 1 and yt.shape == yp.shape and len(yt) >= 2, f"(n,) arrays expected, got {yt.shape}, {yp.shape}"
    out = {"R2": float(r2_score(yt, yp)), "MSE": float(mean_squared_error(yt, yp)),
           "spearman": _corr(stats.spearmanr, yt, yp), "kendall": _corr(stats.kendalltau, yt, yp)}
    if groups is not None:
        within = within_group_rank_corr(yt, yp, groups, min_group_size)
        out.update(within_kendall=within["kendall"], within_spearman=within["spearman"], n_groups=within["n_groups"])
    return out


def within_group_rank_corr(y_true: np.ndarray, y_pred: np.ndarray, groups: Sequence,
                           min_group_size: int = 5) -> dict[str, float]:
    """Mean over groups of the per-group Kendall tau and Spearman rho.

    Every method is scored on the same groups: those with at least ``min_group_size`` items whose truth
    varies. A prediction that is constant within such a group ranks nothing there and scores 0 for it; it
    is not left out (leaving it out scored an embedding only on the groups it happens to separate: one-hot
    input shapes, constant within a task except where MLPs and CNNs meet, reached 0.52 over those groups
    and 0.25 over all). A group label None leaves that item out. Returns {"kendall", "spearman",
    "n_groups"} (NaN if no group qualifies)."""
    yt, yp, g = np.asarray(y_true, np.float64), np.asarray(y_pred, np.float64), np.asarray(groups, dtype=object)
    assert g.shape == yt.shape == yp.shape, f"groups must be {yt.shape}, got {g.shape}"
    taus, rhos = [], []
    for val in sorted({v for v in g.tolist() if v is not None}, key=str):  # a fixed order: a fixed float sum
        m = g == val
        if m.sum() < min_group_size or np.ptp(yt[m]) == 0:
            continue
        if np.ptp(yp[m]) == 0:
            taus.append(0.0)
            rhos.append(0.0)
            continue
        taus.append(_corr(stats.kendalltau, yt[m], yp[m]))
        rhos.append(_corr(stats.spearmanr, yt[m], yp[m]))
    return {"kendall": float(np.mean(taus)) if taus else float("nan"),
            "spearman": float(np.mean(rhos)) if rhos else float("nan"), "n_groups": float(len(taus))}


PROBE_CLIP = 5.0  # property probes see standardized inputs clipped to +-5 standard deviations of the fit rows


def _clip_standardized(z: np.ndarray) -> np.ndarray:
    return np.clip(z, -PROBE_CLIP, PROBE_CLIP)


def make_probe(probe: str, seed: int = 0):
    """A fresh sklearn regressor: "ridge" (RidgeCV over a log grid) or "mlp" (one hidden layer).

    Inputs are standardised on the fit rows and clipped to +-``PROBE_CLIP`` standard deviations (for the MLP
    the targets are standardised too). The clip stops extrapolation on rows far outside the fit rows: a very
    confident model's probe fingerprint lies up to 300 sd out (log-probabilities of -400), and an unclipped
    ridge on the small zoo predicted test accuracies with R^2 of -86."""
    scale = [StandardScaler(), FunctionTransformer(_clip_standardized)]
    if probe == "ridge":
        return make_pipeline(*scale, RidgeCV(alphas=np.logspace(-3, 4, 15)))
    if probe == "mlp":
        mlp = MLPRegressor(hidden_layer_sizes=(64,), alpha=1e-3, max_iter=500, early_stopping=True,
                           random_state=seed)
        return TransformedTargetRegressor(make_pipeline(*scale, mlp), transformer=StandardScaler())
    raise ValueError(f"unknown probe {probe!r}; supported: 'ridge', 'mlp'")


def property_prediction(train_emb: np.ndarray, train_y: np.ndarray, test_emb: np.ndarray, test_y: np.ndarray,
                        test_groups: Sequence | None = None, probe: str = "ridge", seed: int = 0,
                        min_group_size: int = 5, return_predictions: bool = False) -> dict[str, Any]:
    """Fit a probe on train embeddings -> target, score it on test (:func:`regression_metrics`)."""
    Xtr, Xte = np.asarray(train_emb, np.float64), np.asarray(test_emb, np.float64)
    ytr, yte = np.asarray(train_y, np.float64), np.asarray(test_y, np.float64)
    assert Xtr.ndim == 2 and Xte.ndim == 2 and Xtr.shape[1] == Xte.shape[1], \
        f"train/test embeddings must be (n, d) with equal d, got {Xtr.shape}, {Xte.shape}"
    assert ytr.shape == (len(Xtr),) and yte.shape == (len(Xte),), "one target per embedding row expected"
    for name, a in (("train targets", ytr), ("test targets", yte)):
        if not np.isfinite(a).all():
            raise ValueError(f"property_prediction: {name} contain NaN or Inf")
    model = make_probe(probe, seed).fit(Xtr, ytr)
    pred = model.predict(Xte)
    out: dict[str, Any] = regression_metrics(yte, pred, test_groups, min_group_size)
    if return_predictions:
        out["y_pred"] = pred.tolist()
    return out


def property_targets(metadata: Any, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Target columns from the metadata; ``log_<col>`` is log10 of column ``col`` (must be > 0)."""
    out = {}
    for name in names:
        if name.startswith("log_"):
            v = np.asarray(metadata[name[4:]], np.float64)
            if (v <= 0).any():
                raise ValueError(f"target {name}: column {name[4:]!r} has non-positive values")
            out[name] = np.log10(v)
        else:
            out[name] = np.asarray(metadata[name], np.float64)
    return out


def property_prediction_suite(
    embeddings: np.ndarray, metadata: Any, train_idx: Sequence[int], test_idx: Sequence[int],
    targets: Sequence[str] = ("test_acc", "gen_gap", "epoch", "log_lr"),
    probes: Sequence[str] = ("ridge", "mlp"), group_column: str = "task", seed: int = 0,
) -> dict[str, dict[str, dict[str, float]]]:
    """{target: {probe: regression metrics (within = within ``group_column``)}} on one split."""
    emb = np.asarray(embeddings)
    tr, te = np.asarray(train_idx), np.asarray(test_idx)
    groups = np.asarray(metadata[group_column])[te]
    ys = property_targets(metadata, targets)
    return {t: {p: property_prediction(emb[tr], y[tr], emb[te], y[te], groups, p, seed) for p in probes}
            for t, y in ys.items()}


def distance_performance_spearman(embeddings: np.ndarray, values: Sequence[float], groups: Sequence | None = None,
                                  max_pairs: int = 200_000, seed: int = 0) -> dict[str, float]:
    """Spearman between pairwise cosine distance of embeddings and |difference of values|.

    Pairs are all (i < j) pairs, within the same group when ``groups`` is given (e.g. task, so the
    number is not driven by between-task accuracy levels), subsampled to ``max_pairs``.
    Positive = models far apart in the embedding differ more in performance.
    Returns {"spearman", "n_pairs"}.
    """
    emb = l2_normalize(embeddings)
    v = np.asarray(values, np.float64)
    assert v.shape == (emb.shape[0],), f"values must be ({emb.shape[0]},), got {v.shape}"
    i, j = np.triu_indices(len(v), k=1)
    if groups is not None:
        g = np.asarray(groups)
        assert g.shape == v.shape, f"groups must be {v.shape}, got {g.shape}"
        keep = g[i] == g[j]
        i, j = i[keep], j[keep]
    if len(i) > max_pairs:
        sel = np.random.default_rng(seed).choice(len(i), max_pairs, replace=False)
        i, j = i[sel], j[sel]
    dist = 1.0 - np.einsum("nd,nd->n", emb[i], emb[j])
    return {"spearman": _corr(stats.spearmanr, dist, np.abs(v[i] - v[j])), "n_pairs": float(len(i))}


# --------------------------------------------------------------------------------------------
# symmetry robustness
# --------------------------------------------------------------------------------------------
def random_symmetry_transform(spec: Any, sd: Mapping[str, Any], generator: Any,
                              permute: bool = True, rescale: bool = True, sign_flip: bool = True) -> dict:
    """One random function-preserving transform of a network (symmetry.py's ops, in order
    permute -> rescale -> sign flip; each op acts only where it is an exact symmetry)."""
    import symmetry  # graph engineer's module; imported here so evaluation imports without it

    out = dict(sd)
    if permute:
        out = symmetry.permute_hidden(spec, out, generator)
    if rescale:
        out = symmetry.rescale_hidden(spec, out, generator)
    if sign_flip:
        out = symmetry.flip_signs(spec, out, generator)
    return out


def symmetry_robustness(
    embed_fn: EmbedFn,
    zoo: Any,
    indices: Sequence[int],
    metric_fn: Callable[[np.ndarray, np.ndarray], Mapping[str, float]],
    seed: int = 0,
    transform_positions: Sequence[int] | None = None,
    clean_embeddings: np.ndarray | None = None,
    permute: bool = True, rescale: bool = True, sign_flip: bool = True,
) -> dict[str, Any]:
    """Metrics recomputed with queries replaced by randomly permuted/rescaled/sign-flipped copies.

    Args:
        embed_fn: ``list[(spec, state_dict)] -> np.ndarray (n, d)``; any method plugs in.
        zoo: anything with ``.spec(i)`` and ``.state_dict(i)`` (a ModelZooDataset).
        indices: zoo models embedded, in order; row r of the matrices below is zoo model indices[r].
        metric_fn: ``(db_embeddings (n, d), query_embeddings (n, d)) -> {metric: float}``; row r of
            ``query_embeddings`` is the embedding used when row r acts as a query. Typically it
            calls ``RetrievalEvaluator.evaluate_knn_retrieval(db, labels, query_idx=q,
            query_embeddings=query_embeddings[q])``.
        transform_positions: rows (positions in ``indices``) that get transformed (default all;
            only query rows matter to a retrieval metric_fn).
        clean_embeddings: precomputed ``embed_fn`` output for ``indices`` (saves one pass).
    Returns:
        {"clean": metrics, "transformed": metrics, "drop": clean - transformed per metric,
         "embedding_cosine": mean cosine(clean, transformed) over transformed rows,
         "max_abs_embedding_change": max |clean - transformed| over transformed rows}.
        An exactly invariant method has drop 0 and cosine 1.
    """
    import torch

    idx = [int(i) for i in indices]
    pos = np.arange(len(idx)) if transform_positions is None else np.asarray(transform_positions, dtype=np.int64)
    clean = embed_fn([(zoo.spec(i), zoo.state_dict(i)) for i in idx]) if clean_embeddings is None \
        else np.asarray(clean_embeddings)
    clean = np.asarray(clean, dtype=np.float32)
    assert clean.shape[0] == len(idx) and clean.ndim == 2, f"embeddings must be ({len(idx)}, d), got {clean.shape}"
    gen = torch.Generator().manual_seed(seed)
    models = []
    for p in pos:
        spec = zoo.spec(idx[p])
        models.append((spec, random_symmetry_transform(spec, zoo.state_dict(idx[p]), gen, permute, rescale, sign_flip)))
    trans_rows = np.asarray(embed_fn(models), dtype=np.float32)
    assert trans_rows.shape == (len(pos), clean.shape[1]), \
        f"embed_fn returned {trans_rows.shape}, expected {(len(pos), clean.shape[1])}"
    transformed = clean.copy()
    transformed[pos] = trans_rows
    m_clean = dict(metric_fn(clean, clean))
    m_trans = dict(metric_fn(clean, transformed))
    cos = (l2_normalize(clean[pos]) * l2_normalize(trans_rows)).sum(1)
    return {"clean": m_clean, "transformed": m_trans,
            "drop": {k: float(m_clean[k] - m_trans[k]) for k in m_clean},
            "embedding_cosine": float(cos.mean()),
            "max_abs_embedding_change": float(np.abs(clean[pos] - trans_rows).max())}


# --------------------------------------------------------------------------------------------
# one call per (method, seed)
# --------------------------------------------------------------------------------------------
def evaluate_embeddings(
    embeddings: np.ndarray, metadata: Any, fit_idx: Sequence[int], query_sets: Mapping[str, Sequence[int]],
    validation: Mapping[str, Sequence[int]] | None = None, k_values: Sequence[int] = (1, 5, 10),
    targets: Sequence[str] = ("test_acc", "gen_gap", "epoch", "log_lr"),
    probes: Sequence[str] = ("ridge", "mlp"), min_group_size: int = 5, seed: int = 0,
    max_probe_dims: int = 256, validation_k: int = 10,
) -> dict[str, Any]:
    """Every protocol for one embedding matrix on one split.

    Args:
        embeddings: (N, d), row i <-> metadata row i.
        metadata: table with columns task, shape_group, arch_id, arch_family, run_id, epoch, is_final and
            the probe targets.
        fit_idx: rows the probes (and the PCA that narrows wide embeddings for them) fit on: seen tasks' train
            and val runs.
        query_sets: {"seen_tasks", "unseen_tasks", "unseen_kinds"} -> test query rows; their union is
            "the test queries" (scored by the probes, clustering and the secondary retrieval protocols).
        validation: {"database", "seen", "unseen"} -> zoo rows of the validation protocol
            (:func:`validation_retrieval`), so its chance and shape-only levels are reported too.
    Retrieval (database: the whole zoo) uses the full embedding; clustering, probes and the
    distance-performance correlation see at most ``max_probe_dims`` dimensions (:func:`reduce_dims`).

    Returns {"retrieval": {protocol: metrics}, "retrieval_by_shape_group": {protocol: {shape group: P@10}}
    (:func:`retrieval_by_shape_group`), "retrieval_by_query_fit": {query set: {bin: P@10}} and "query_fit_share":
    {query set: {bin: fraction of its queries}} (queries binned by how much of their task they learned,
    :func:`query_fit_labels`), ["validation": ...], "clustering" and
    "clustering_unseen_tasks" (k-means within each shape group, :func:`clustering_within_groups`; unseen =
    test-unseen and unseen-kind queries), "properties": {target: {probe: metrics + "within_kendall_final"
    (tau within task over final checkpoints) and "within_kendall_task_epoch" (within task and epoch)}},
    "distance_performance", "dims"}. Call once per seed and combine with :func:`aggregate_seeds`.
    """
    emb = np.asarray(embeddings, np.float32)
    tr = np.asarray(fit_idx, np.int64)
    sets = {k: np.asarray(v, np.int64) for k, v in query_sets.items()}
    te = np.sort(np.concatenate(list(sets.values())))
    assert len(te) > 0, "evaluate_embeddings needs test queries"
    assert len(np.intersect1d(tr, te)) == 0, "fit and query rows overlap"
    col = {c: np.asarray(metadata[c]) for c in ("task", "shape_group", "run_id", "epoch", "is_final")}
    tasks, groups = col["task"], col["shape_group"]
    # one search per protocol; the breakdowns (P@10 by shape group, by how well the query learned its task) average
    # its per-query values over subsets of the queries
    full = retrieval_protocols(emb, metadata, sets, None, tuple(sorted({*k_values, 10})), per_query=True)
    fit_label, bins = query_fit_labels(metadata), [name for name, _ in QUERY_FIT_BINS]
    unasked = {"per_query"} | (set() if 10 in k_values else {"P@10", "R@10", "F1@10"})
    out: dict[str, Any] = {
        "retrieval": {p: {m: v for m, v in r.items() if m not in unasked} for p, r in full.items()},
        "retrieval_by_shape_group": per_query_breakdown(full, groups),
        "retrieval_by_query_fit": per_query_breakdown(full, fit_label, protocols=tuple(sets), order=bins),
        "query_fit_share": {s: {b: float(np.mean(fit_label[q] == b)) if len(q) else float("nan") for b in bins}
                            for s, q in sets.items()}}
    if validation is not None:
        db = np.asarray(validation["database"], np.int64)
        pos = {int(r): i for i, r in enumerate(db)}
        seen, unseen = ([pos[int(r)] for r in validation[p]] for p in ("seen", "unseen"))
        out["validation"] = validation_retrieval(emb[db], tasks[db], groups[db], col["run_id"][db], seen, unseen,
                                                 validation_k)
    d_full = emb.shape[1]
    emb = reduce_dims(emb, tr, max_probe_dims, seed)  # probes and k-means only; retrieval above saw every dim
    out["dims"] = {"embedding": float(d_full), "probes": float(emb.shape[1])}
    out["clustering"] = clustering_within_groups(emb[te], tasks[te], groups[te], seed=seed)
    unseen_q = np.concatenate([sets.get("unseen_tasks", np.zeros(0, np.int64)),
                               sets.get("unseen_kinds", np.zeros(0, np.int64))])
    out["clustering_unseen_tasks"] = clustering_within_groups(emb[unseen_q], tasks[unseen_q], groups[unseen_q],
                                                              seed=seed)
    final = col["is_final"][te].astype(bool)
    by_final = np.where(final, tasks[te], None)  # None: left out
    by_epoch = np.array([f"{t}|{e}" for t, e in zip(tasks[te], col["epoch"][te])], dtype=object)
    ys = property_targets(metadata, targets)
    out["properties"] = {}
    for t, y in ys.items():
        out["properties"][t] = {}
        for p in probes:
            m = property_prediction(emb[tr], y[tr], emb[te], y[te], tasks[te], p, seed, min_group_size,
                                    return_predictions=True)
            pred = np.asarray(m.pop("y_pred"))
            m["within_kendall_final"] = within_group_rank_corr(y[te], pred, by_final, min_group_size)["kendall"]
            m["within_kendall_task_epoch"] = within_group_rank_corr(y[te], pred, by_epoch, min_group_size)["kendall"]
            out["properties"][t][p] = m
    acc = np.asarray(metadata["test_acc"], np.float64)
    out["distance_performance"] = {"test_acc": distance_performance_spearman(emb[te], acc[te], tasks[te], seed=seed)}
    return out


def embed_fn_from_method(method: Any) -> EmbedFn:
    """Adapt a fitted baselines.py method (``.embed(records)``) to ``list[(spec, sd)] -> (n, d)``.

    The records carry ``spec`` and ``state_dict`` only (no model card), so metadata methods, which
    do not read weights and are trivially symmetry-invariant, cannot be wrapped.
    """
    from types import SimpleNamespace

    def fn(models: list) -> np.ndarray:
        recs = [SimpleNamespace(spec=spec, state_dict=sd, model_id=f"model #{i}", meta={})
                for i, (spec, sd) in enumerate(models)]
        return np.asarray(method.embed(recs), dtype=np.float32)

    return fn


# --------------------------------------------------------------------------------------------
# seeds
# --------------------------------------------------------------------------------------------
def aggregate_seeds(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Combine per-seed metric dicts (possibly nested) into {metric: {"mean", "std", "values", "n"}}.

    ``std`` is the sample standard deviation (ddof=1), 0.0 for a single seed (``n`` says how many).
    String leaves (notes) are kept, once when identical across seeds, else each seed's in order.
    NaN values (undefined metrics) are kept in ``values`` and ignored by mean/std; if all are NaN
    the mean is NaN. Every dict must have the same keys (a missing metric is an error, not a gap).
    """
    assert len(results) > 0, "aggregate_seeds needs at least one result"
    keys = list(results[0])
    for r in results[1:]:
        if list(r) != keys and set(r) != set(keys):
            raise ValueError(f"aggregate_seeds: metric keys differ between seeds: {sorted(keys)} vs {sorted(r)}")
    out: dict[str, Any] = {}
    for k in keys:
        vals = [r[k] for r in results]
        if all(isinstance(v, Mapping) for v in vals):
            out[k] = aggregate_seeds(vals)
            continue
        if all(isinstance(v, str) for v in vals):  # notes (e.g. why a protocol was skipped); each seed has its split
            out[k] = vals[0] if len(set(vals)) == 1 else " | ".join(f"seed {i + 1}: {v}" for i, v in enumerate(vals))
            continue
        arr = np.asarray(vals, dtype=np.float64)
        assert arr.ndim == 1, f"aggregate_seeds: metric {k!r} is not a scalar"
        ok = arr[~np.isnan(arr)]
        mean = float(ok.mean()) if len(ok) else float("nan")
        std = float(ok.std(ddof=1)) if len(ok) > 1 else 0.0
        out[k] = {"mean": mean, "std": std, "values": [float(v) for v in arr], "n": len(arr)}
    return out
