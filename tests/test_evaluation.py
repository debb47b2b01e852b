"""Metrics against hand-computed values and scikit-learn; protocols on small real cases."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, average_precision_score, normalized_mutual_info_score

import evaluation as E


def _unit(deg):
    a = np.deg2rad(np.asarray(deg, dtype=np.float64))
    return np.stack([np.cos(a), np.sin(a)], 1).astype(np.float32)


# 6 items, 2 classes, 2-D unit vectors at known angles (no ties): every ranking is known by hand.
ANGLES = [0, 10, 50, 32, 80, 95]
LABELS = np.array([0, 0, 0, 1, 1, 1])


def test_ranking_metrics_hand_computed():
    rel = np.array([[1, 0, 1, 0, 0], [0, 0, 1, 1, 0]], dtype=bool)
    m = E.ranking_metrics(rel, np.array([2, 2]), k_values=(1, 3, 5))
    np.testing.assert_allclose(m["P@1"], [1, 0])
    np.testing.assert_allclose(m["P@3"], [2 / 3, 1 / 3])
    np.testing.assert_allclose(m["R@1"], [0.5, 0])
    np.testing.assert_allclose(m["R@5"], [1, 1])
    np.testing.assert_allclose(m["F1@3"], [2 * (2 / 3) * 1 / (2 / 3 + 1), 2 * (1 / 3) * 0.5 / (1 / 3 + 0.5)])
    np.testing.assert_allclose(m["AP"], [(1 + 2 / 3) / 2, (1 / 3 + 2 / 4) / 2])
    np.testing.assert_allclose(m["RR"], [1, 1 / 3])
    with pytest.raises(ValueError, match="n_relevant"):
        E.ranking_metrics(rel, np.array([2, 3]), (1,))


def test_retrieval_six_items_hand_computed():
    # Rankings (by angular distance), relevance of each rank:
    # q0: 1,3,2,4,5 -> 1 0 1 0 0   q1: 0,3,2,4,5 -> 1 0 1 0 0   q2: 3,4,1,5,0 -> 0 0 1 0 1
    # q3: 2,1,0,4,5 -> 0 0 0 1 1   q4: 5,2,3,1,0 -> 1 0 1 0 0   q5: 4,2,3,1,0 -> 1 0 1 0 0
    m = E.RetrievalEvaluator(k_values=(1, 5)).evaluate_knn_retrieval(_unit(ANGLES), LABELS)
    ap = [5 / 6, 5 / 6, (1 / 3 + 2 / 5) / 2, (1 / 4 + 2 / 5) / 2, 5 / 6, 5 / 6]
    rr = [1, 1, 1 / 3, 1 / 4, 1, 1]
    assert m["P@1"] == pytest.approx(4 / 6)
    assert m["P@5"] == pytest.approx(2 / 5)
    assert m["R@5"] == pytest.approx(1.0)
    assert m["R@1"] == pytest.approx(4 / 6 / 2)
    assert m["mAP"] == pytest.approx(np.mean(ap))
    assert m["MRR"] == pytest.approx(np.mean(rr))
    assert m["n_queries"] == 6 and m["n_skipped"] == 0
    assert m["chance_P"] == pytest.approx(2 / 5)


def test_map_matches_sklearn_average_precision():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(60, 8)).astype(np.float32)
    labels = rng.integers(0, 4, size=60)
    m = E.RetrievalEvaluator(k_values=(1,)).evaluate_knn_retrieval(emb, labels)
    en = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    aps = []
    for i in range(60):
        others = np.delete(np.arange(60), i)
        aps.append(average_precision_score(labels[others] == labels[i], en[others] @ en[i]))
    assert m["mAP"] == pytest.approx(np.mean(aps), abs=1e-6)


def test_exclusions_groups_and_query_subsets():
    emb = _unit(ANGLES)
    ev = E.RetrievalEvaluator(k_values=(1,))
    # items 0 and 1 are one training run: q0 may no longer retrieve item 1 -> q0 ranks 3,2,... -> RR 1/2
    runs = np.array(["a", "a", "b", "c", "d", "e"])
    m = ev.evaluate_knn_retrieval(emb, LABELS, query_idx=[0], exclude_same=runs)
    assert m["MRR"] == pytest.approx(0.5) and m["mean_db_size"] == 4
    # a list of exclusion arrays: the second removes items 3,4,5 (same value 0 as q0) -> q0 sees only item 2
    m = ev.evaluate_knn_retrieval(emb, LABELS, query_idx=[0], exclude_same=[runs, np.array([0, 9, 1, 0, 0, 0])])
    assert m["P@1"] == 1.0 and m["mean_db_size"] == 1
    # groups: {0,3} and the rest; q0's database is {3}, which is irrelevant -> skipped
    groups = np.array([0, 1, 1, 0, 1, 1])
    m = ev.evaluate_knn_retrieval(emb, LABELS, query_idx=[0, 1], group_labels=groups)
    assert m["n_skipped"] == 1 and m["n_queries"] == 1
    # q1 (10 deg) among {2, 4, 5}: distances 40, 70, 85; item 2 is its class -> P@1 1, AP 1
    assert m["P@1"] == 1.0 and m["mAP"] == 1.0 and m["mean_db_size"] == 3
    # per-query values name the queries they belong to: the skipped q0 is not among them
    # (q2 at 50 deg ranks 4, 1, 5 -> RR 1/2; q4 at 80 deg ranks 5, 2, 1 -> P@1 1)
    pq = ev.evaluate_knn_retrieval(emb, LABELS, query_idx=[0, 1, 2, 4], group_labels=groups, per_query=True)["per_query"]
    assert pq["query_idx"].tolist() == [1, 2, 4] and pq["P@1"].tolist() == [1.0, 0.0, 1.0]
    assert pq["RR"].tolist() == [1.0, 0.5, 1.0]


def test_perfect_and_random_embeddings():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(8), 50)  # 400 models, 8 tasks
    perfect = np.eye(8, dtype=np.float32)[labels] + 0.01 * rng.normal(size=(400, 8)).astype(np.float32)
    ev = E.RetrievalEvaluator()
    m = ev.evaluate_knn_retrieval(perfect, labels)
    assert m["P@1"] == m["P@5"] == m["P@10"] == 1.0 and m["mAP"] == pytest.approx(1.0)
    rand = ev.evaluate_knn_retrieval(rng.normal(size=(400, 32)).astype(np.float32), labels)
    assert rand["chance_P"] == pytest.approx(49 / 399)
    assert abs(rand["P@10"] - rand["chance_P"]) < 0.04, rand
    assert rand["mAP"] < 0.2


def test_ties_are_not_broken_by_database_order():
    # identical embeddings carry no information: a zoo stored sorted by task must not score above chance
    labels = np.repeat(np.arange(4), 50)
    m = E.RetrievalEvaluator().evaluate_knn_retrieval(np.ones((200, 3), np.float32), labels)
    assert abs(m["P@10"] - m["chance_P"]) < 0.05 and m["P@1"] < 0.4, m


def test_chunking_does_not_change_results():
    rng = np.random.default_rng(2)
    emb = rng.normal(size=(50, 6)).astype(np.float32)
    labels = rng.integers(0, 3, 50)
    a = E.RetrievalEvaluator().evaluate_knn_retrieval(emb, labels)
    b = E.RetrievalEvaluator(chunk_elements=49).evaluate_knn_retrieval(emb, labels)  # 1 query per chunk
    assert a == pytest.approx(b)


def _toy_metadata(n_per=12):
    """Two shape groups; tasks t0,t1 in group in4-out2 (dataset d0), t2,t3 in in8-out2 (dataset d1);
    families mlp-1h / mlp-2h alternate; 2 checkpoints per run."""
    rows = []
    for t in range(4):
        for j in range(n_per):
            rows.append(dict(task=f"t{t}", dataset=f"d{t // 2}", shape_group=f"in{4 * (1 + t // 2)}-out2",
                             arch_family=f"mlp-{1 + j % 2}h", arch_id=f"a{j % 2}", run_id=f"r{t}_{j // 2}"))
    return {k: np.array([r[k] for r in rows]) for k in rows[0]}


def _query_sets(meta, rows):
    """Seen queries: t0, t2 rows; unseen tasks: t1; unseen kind: t3 (toy split)."""
    task = meta["task"][rows]
    return {"seen_tasks": rows[np.isin(task, ["t0", "t2"])], "unseen_tasks": rows[task == "t1"],
            "unseen_kinds": rows[task == "t3"]}


def _task_embedding(meta, seed):
    """One-hot of the task plus a little noise: (n, 4)."""
    rng = np.random.default_rng(seed)
    task_code = np.array([int(t[1]) for t in meta["task"]])
    return np.eye(4, dtype=np.float32)[task_code] + 0.05 * rng.normal(size=(len(task_code), 4)).astype(np.float32)


def test_retrieval_protocols_task_embeddings():
    meta = _toy_metadata()
    n = len(meta["task"])
    emb = _task_embedding(meta, 3)
    q = np.arange(0, n, 3)
    sets = _query_sets(meta, q)
    res = E.retrieval_protocols(emb, meta, sets, k_values=(1, 5))
    assert set(res) == set(E.PROTOCOL_NOTES)
    for name in E.PROTOCOL_NOTES:
        if name != "same_architecture":
            assert res[name]["P@5"] == 1.0, (name, res[name])
    # task embeddings carry no architecture information: same_architecture ~ chance (not 1)
    assert res["same_architecture"]["P@5"] < 0.8
    # chance levels reflect the restrictions: within a group half the valid db is the same task
    assert res["within_shape_group"]["chance_P"] > res["full_zoo"]["chance_P"]
    # each headline protocol queries its own set; the others query their union
    for name, rows in sets.items():
        assert res[name]["n_queries"] == len(rows)
    assert res["within_shape_group"]["n_queries"] == len(q)
    # the database is the whole zoo: each query's database is its shape group minus its own run
    assert res["within_shape_group"]["mean_db_size"] == n / 2 - 2
    assert "skipped" not in res
    # one architecture family only: cross_architecture has nothing relevant -> reported as skipped; an
    # empty query set is skipped with its reason
    one_family = dict(meta, arch_family=np.array(["mlp-1h"] * n))
    res = E.retrieval_protocols(emb, one_family, {**sets, "unseen_kinds": []}, k_values=(1,))
    assert set(res["skipped"]) == {"unseen_kinds", "cross_architecture", "cross_architecture_within_shape_group"}
    assert "relevant item" in res["skipped"]["cross_architecture"] and "query" in res["skipped"]["unseen_kinds"]
    with pytest.raises(E.NoRelevantItems):
        E.RetrievalEvaluator().evaluate_knn_retrieval(emb, meta["task"], exclude_same=meta["task"])
    with pytest.raises(ValueError, match="unknown retrieval protocols"):
        E.retrieval_protocols(emb, meta, sets, protocols=["nope"])
    with pytest.raises(ValueError, match="unknown query sets"):
        E.retrieval_protocols(emb, meta, {"heldout": q})
    with pytest.raises(AssertionError, match="overlap"):
        E.retrieval_protocols(emb, meta, {"seen_tasks": q, "unseen_tasks": q[:2]})


def test_shape_only_embedding_is_at_chance_within_shape_group_but_not_on_the_full_zoo():
    meta = _toy_metadata()
    n = len(meta["task"])
    shape = np.eye(2, dtype=np.float32)[np.unique(meta["shape_group"], return_inverse=True)[1]]
    sets = _query_sets(meta, np.arange(n))
    res = E.retrieval_protocols(shape, meta, sets, k_values=(1, 5))
    for name in ("seen_tasks", "unseen_tasks", "unseen_kinds", "within_shape_group"):
        # every database item of a group ties: a random order, so P@5 is near the chance level
        assert abs(res[name]["P@5"] - res[name]["chance_P"]) < 0.15, (name, res[name])
    assert res["full_zoo"]["P@5"] > res["full_zoo"]["chance_P"] + 0.2  # shape separates groups on the full zoo


def test_validation_retrieval_is_the_test_protocol_on_validation_rows():
    meta = _toy_metadata()
    n = len(meta["task"])
    emb = _task_embedding(meta, 4)
    seen, unseen = np.flatnonzero(np.isin(meta["task"], ["t0", "t2"]))[::4], np.flatnonzero(meta["task"] == "t1")
    v = E.validation_retrieval(emb, meta["task"], meta["shape_group"], meta["run_id"], seen, unseen, k=5)
    assert v["val_seen_P@5"] == v["val_unseen_P@5"] == v["val_P@5"] == 1.0
    # within shape group: half of a group's other runs share the query's task
    assert v["val_unseen_chance_P"] == pytest.approx((n / 4 - 2) / (n / 2 - 2))
    # a shape-only embedding is at chance on validation too (the old validation searched across groups)
    shape = np.eye(2, dtype=np.float32)[np.unique(meta["shape_group"], return_inverse=True)[1]]
    vs = E.validation_retrieval(shape, meta["task"], meta["shape_group"], meta["run_id"], seen, unseen, k=5)
    assert abs(vs["val_P@5"] - 0.5 * (vs["val_seen_chance_P"] + vs["val_unseen_chance_P"])) < 0.15
    # no val-unseen task: the selection metric is the seen part alone
    only = E.validation_retrieval(emb, meta["task"], meta["shape_group"], meta["run_id"], seen, [], k=5)
    assert np.isnan(only["val_unseen_P@5"]) and only["val_P@5"] == only["val_seen_P@5"]
    with pytest.raises(ValueError, match="no validation query"):
        E.validation_retrieval(emb, meta["task"], meta["shape_group"], meta["run_id"], [], [], k=5)


def test_purity_hand_computed_and_clustering_vs_sklearn():
    assert E.purity_score([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1]) == pytest.approx(5 / 6)
    assert E.purity_score(["a", "b", "c"], [7, 7, 7]) == pytest.approx(1 / 3)
    rng = np.random.default_rng(4)
    labels = np.repeat(np.arange(3), 20)
    centres = np.eye(3, dtype=np.float32) * 5
    emb = centres[labels] + rng.normal(size=(60, 3)).astype(np.float32) * 0.3
    m = E.clustering_metrics(emb, labels)
    assert m["purity"] == 1.0 and m["ARI"] == pytest.approx(1.0) and m["NMI"] == pytest.approx(1.0)
    noisy = rng.normal(size=(60, 3)).astype(np.float32)
    m = E.clustering_metrics(noisy, labels, seed=0)
    from sklearn.cluster import KMeans
    pred = KMeans(3, n_init=10, random_state=0).fit_predict(E.l2_normalize(noisy))
    assert m["ARI"] == pytest.approx(adjusted_rand_score(labels, pred))
    assert m["NMI"] == pytest.approx(normalized_mutual_info_score(labels, pred))
    assert m["ARI"] < 0.3


def test_regression_metrics_hand_computed_and_within_group():
    m = E.regression_metrics(np.array([1.0, 2, 3, 4]), np.array([1.0, 3, 2, 4]))
    assert m["kendall"] == pytest.approx(4 / 6)  # 5 concordant, 1 discordant pair
    assert m["spearman"] == pytest.approx(1 - 6 * 2 / (4 * 15))
    assert m["MSE"] == pytest.approx(0.5)
    assert m["R2"] == pytest.approx(1 - 2 / 5)
    # two tasks at different levels: predictions get the level right but the within-task order wrong
    yt = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.9, 1.0, 1.1, 1.2, 1.3])
    yp = np.array([0.5, 0.4, 0.3, 0.2, 0.1, 1.3, 1.2, 1.1, 1.0, 0.9])
    g = np.array([0] * 5 + [1] * 5)
    m = E.regression_metrics(yt, yp, g)
    # overall: 25 cross-task pairs concordant, 20 within-task pairs discordant -> tau = 5/45
    assert m["kendall"] == pytest.approx(5 / 45) and m["within_kendall"] == pytest.approx(-1.0) and m["n_groups"] == 2
    m = E.regression_metrics(yt, yp, g, min_group_size=6)
    assert m["n_groups"] == 0 and np.isnan(m["within_kendall"])
    assert np.isnan(E.regression_metrics(yt, np.ones(10))["spearman"])  # constant prediction: undefined


def test_property_prediction_probes():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(300, 10))
    y = X @ rng.normal(size=10) + 0.05 * rng.normal(size=300)
    groups = np.repeat(np.arange(6), 50)
    ridge = E.property_prediction(X[:200], y[:200], X[200:], y[200:], groups[200:], "ridge")
    assert ridge["R2"] > 0.99 and ridge["within_kendall"] > 0.9 and ridge["n_groups"] == 2
    mlp = E.property_prediction(X[:200], y[:200], X[200:], y[200:], probe="mlp", return_predictions=True)
    assert mlp["R2"] > 0.8 and len(mlp["y_pred"]) == 100
    noise = E.property_prediction(X[:200], rng.normal(size=200), X[200:], rng.normal(size=100))
    assert noise["R2"] < 0.1
    meta = {"test_acc": y, "lr": 10 ** rng.uniform(-4, -1, 300), "task": groups}
    suite = E.property_prediction_suite(X, meta, np.arange(200), np.arange(200, 300), targets=("test_acc", "log_lr"),
                                        probes=("ridge",))
    assert suite["test_acc"]["ridge"]["R2"] > 0.99 and suite["log_lr"]["ridge"]["R2"] < 0.2
    with pytest.raises(ValueError, match="unknown probe"):
        E.make_probe("svm")


def test_distance_performance_spearman():
    theta = np.sort(np.random.default_rng(7).uniform(0, 80, 30))  # no tied differences
    m = E.distance_performance_spearman(_unit(theta), theta)
    assert m["spearman"] == pytest.approx(1.0) and m["n_pairs"] == 30 * 29 / 2
    g = np.repeat([0, 1, 2], 10)
    m = E.distance_performance_spearman(_unit(theta), theta, groups=g, max_pairs=50)
    assert m["n_pairs"] == 50 and m["spearman"] == pytest.approx(1.0)
    m = E.distance_performance_spearman(_unit(theta), -np.abs(theta - 40) + np.random.default_rng(0).normal(size=30))
    assert m["spearman"] < 0.5


def test_aggregate_seeds():
    res = [{"P@1": 0.5, "proto": {"mAP": 0.2}}, {"P@1": 0.7, "proto": {"mAP": float("nan")}},
           {"P@1": 0.9, "proto": {"mAP": 0.4}}]
    agg = E.aggregate_seeds(res)
    assert agg["P@1"]["mean"] == pytest.approx(0.7) and agg["P@1"]["std"] == pytest.approx(0.2)
    assert agg["P@1"]["values"] == [0.5, 0.7, 0.9] and agg["P@1"]["n"] == 3
    assert agg["proto"]["mAP"]["mean"] == pytest.approx(0.3)
    assert E.aggregate_seeds([{"a": 1.0}])["a"]["std"] == 0.0
    assert E.aggregate_seeds([{"why": "x", "a": 1.0}, {"why": "x", "a": 2.0}])["why"] == "x"
    # each seed has its own split: a note (why a protocol was skipped) may differ; every seed's is kept
    assert E.aggregate_seeds([{"why": "x"}, {"why": "y"}])["why"] == "seed 1: x | seed 2: y"
    with pytest.raises(ValueError, match="keys differ"):
        E.aggregate_seeds([{"a": 1.0}, {"b": 1.0}])


class _SmallZoo:
    """Small MLPs really trained on digits (2 seeds x 3 architectures, ReLU/tanh/GELU) behind the
    zoo interface symmetry_robustness reads. Trained here, not via the session fixture, to keep this
    file fast when run alone."""

    def __init__(self, digits_data):
        import architecture as A
        from conftest import train_small

        X, y = digits_data
        specs = [A.mlp_spec(64, [16], 10, "relu"), A.mlp_spec(64, [16, 12], 10, "tanh"),
                 A.mlp_spec(64, [16], 10, "gelu")]
        self.items = [(s, train_small(s, X, y, seed=seed, epochs=25)) for s in specs for seed in (0, 1)]
        self.labels = np.repeat(np.arange(3), 2)

    def spec(self, i):
        return self.items[i][0]

    def state_dict(self, i):
        return self.items[i][1]


def test_symmetry_robustness_invariant_vs_flat(digits_data):
    import torch
    import symmetry

    zoo = _SmallZoo(digits_data)
    labels = zoo.labels
    length = max(s.num_params() for s, _ in zoo.items)

    def flat(models):  # raw weights: changed by every symmetry
        out = np.zeros((len(models), length), np.float32)
        for r, (_, sd) in enumerate(models):
            v = torch.cat([t.flatten() for t in sd.values()]).numpy()
            out[r, :len(v)] = v
        return out

    def canonical_quantiles(models):  # canonical form removes scale/sign; per-layer quantiles remove order
        qs = np.linspace(0, 1, 9)
        rows = []
        for spec, sd in models:
            c = symmetry.canonicalize(spec, sd)
            f = [np.quantile(c[f"layers.{l}.{p}"].numpy(), qs) for l in range(4) if f"layers.{l}.weight" in c
                 for p in ("weight", "bias")]
            rows.append(np.concatenate(f + [np.zeros(9 * (8 - len(f)))]))
        return np.asarray(rows, np.float32)

    ev = E.RetrievalEvaluator(k_values=(1,))

    def metric_fn(db, queries):
        return ev.evaluate_knn_retrieval(db, labels, query_embeddings=queries)

    inv = E.symmetry_robustness(canonical_quantiles, zoo, range(len(zoo.items)), metric_fn, seed=0)
    assert inv["embedding_cosine"] == pytest.approx(1.0, abs=1e-5) and inv["max_abs_embedding_change"] < 1e-4
    assert all(d == pytest.approx(0.0, abs=1e-9) for d in inv["drop"].values())
    fl = E.symmetry_robustness(flat, zoo, range(len(zoo.items)), metric_fn, seed=0, transform_positions=[0, 1, 2])
    assert fl["embedding_cosine"] < 0.95 and fl["max_abs_embedding_change"] > 0.1
    assert set(fl["clean"]) == set(fl["transformed"]) == set(fl["drop"])


def _toy_eval_metadata(n_per=12, seed=8):
    meta = _toy_metadata(n_per=n_per)
    n = len(meta["task"])
    rng = np.random.default_rng(seed)
    task_code = np.array([int(t[1]) for t in meta["task"]])
    meta["test_acc"] = 0.5 + 0.1 * task_code + 0.02 * rng.normal(size=n)
    meta["gen_gap"] = rng.normal(size=n)
    meta["lr"] = 10 ** rng.uniform(-4, -2, n)
    meta["epoch"] = np.tile([5, 10], n // 2)
    meta["is_final"] = meta["epoch"] == 10
    return meta, task_code, rng


def test_evaluate_embeddings_end_to_end_and_seed_aggregation():
    meta, task_code, rng = _toy_eval_metadata()
    n = len(meta["task"])
    emb = np.concatenate([np.eye(4)[task_code], meta["test_acc"][:, None]], 1) + 0.01 * rng.normal(size=(n, 5))
    test = np.arange(0, n, 2)
    train = np.arange(1, n, 2)
    sets = _query_sets(meta, test)
    validation = {"database": train, "seen": train[::6], "unseen": []}
    runs = [E.evaluate_embeddings(emb, meta, train, sets, validation, k_values=(1, 5),
                                  targets=("test_acc", "gen_gap", "log_lr"), probes=("ridge",), seed=s)
            for s in (0, 1)]
    r = runs[0]
    assert r["retrieval"]["within_shape_group"]["P@5"] == 1.0
    # validation database = the train rows: 5 other runs of the query's task, all ranked first -> P@10 = 0.5
    assert r["validation"]["val_seen_P@10"] == 0.5 and np.isnan(r["validation"]["val_unseen_P@10"])
    # clustering within each shape group: both groups hold 2 tasks among the queries
    assert r["clustering"]["ARI"] == pytest.approx(1.0) and r["clustering"]["n_groups"] == 2
    # unseen queries (t1 and the unseen kind t3) sit in two groups of one task each: nothing to cluster
    assert r["clustering_unseen_tasks"]["n_groups"] == 0 and np.isnan(r["clustering_unseen_tasks"]["ARI"])
    p = r["properties"]["test_acc"]["ridge"]
    assert p["R2"] > 0.9 and r["properties"]["gen_gap"]["ridge"]["R2"] < 0.3
    assert {"within_kendall", "within_kendall_final", "within_kendall_task_epoch"} <= set(p)
    assert r["distance_performance"]["test_acc"]["spearman"] > 0.3
    assert r["dims"] == {"embedding": 5.0, "probes": 5.0}
    # queries binned by how much of their task they learned: each bin's P@5 is the protocol on those queries alone
    fit = E.query_fit_labels(meta)
    bins = [name for name, _ in E.QUERY_FIT_BINS]  # every bin, in order (a bin without queries is NaN)
    assert list(r["retrieval_by_query_fit"]["unseen_tasks"]) == list(r["query_fit_share"]["unseen_tasks"]) == bins
    for b, share in r["query_fit_share"]["unseen_tasks"].items():
        q = sets["unseen_tasks"][fit[sets["unseen_tasks"]] == b]
        assert share == pytest.approx(len(q) / len(sets["unseen_tasks"]))
        assert r["retrieval_by_query_fit"]["unseen_tasks"][b] == (pytest.approx(
            E.retrieval_protocols(emb, meta, {"unseen_tasks": q}, k_values=(10,), protocols=["unseen_tasks"])
            ["unseen_tasks"]["P@10"], rel=1e-12) if len(q) else pytest.approx(float("nan"), nan_ok=True))
    assert "P@10" not in r["retrieval"]["seen_tasks"]  # k_values (1, 5): the breakdowns' P@10 is not stored
    agg = E.aggregate_seeds(runs)
    assert agg["retrieval"]["full_zoo"]["P@1"]["n"] == 2
    with pytest.raises(AssertionError, match="overlap"):
        E.evaluate_embeddings(emb, meta, test, sets)
    # a wide embedding: retrieval sees every dim, probes/k-means its top principal components
    wide = np.concatenate([emb, 1e-3 * rng.normal(size=(n, 40))], 1)
    rw = E.evaluate_embeddings(wide, meta, train, sets, k_values=(1, 5), targets=("test_acc",), probes=("ridge",),
                               max_probe_dims=8)
    assert rw["dims"] == {"embedding": 45.0, "probes": 8.0} and "validation" not in rw
    assert rw["clustering"]["ARI"] == pytest.approx(1.0) and rw["properties"]["test_acc"]["ridge"]["R2"] > 0.9


def test_clustering_is_scored_within_each_shape_group():
    # four tasks in two shape groups; an embedding of the shape group alone clusters the whole set well
    # (ARI > 0.3 across groups) but is at chance inside each group
    meta = _toy_metadata(n_per=12)
    labels, groups = meta["task"], meta["shape_group"]
    rng = np.random.default_rng(0)
    shape = np.eye(2)[np.unique(groups, return_inverse=True)[1]] + 1e-3 * rng.normal(size=(len(labels), 2))
    assert E.clustering_metrics(shape, labels)["ARI"] > 0.3
    within = E.clustering_within_groups(shape, labels, groups)
    assert within["n_groups"] == 2 and within["ARI"] < 0.2
    task = np.eye(4)[[int(t[1]) for t in labels]]
    assert E.clustering_within_groups(task, labels, groups)["ARI"] == pytest.approx(1.0)
    # a group with one task has nothing to cluster and is not counted
    one = E.clustering_within_groups(task[:24], labels[:24], np.array(["a"] * 12 + ["b"] * 12))
    assert one["n_groups"] == 0 and np.isnan(one["NMI"])


def test_within_task_tau_on_final_checkpoints_and_within_task_and_epoch():
    # within each task, test accuracy rises with the epoch and, at a fixed epoch, with the run; a predictor
    # that knows only the epoch ranks checkpoints of one task by training progress (tau > 0 over all
    # checkpoints) but knows nothing about final checkpoints or any (task, epoch) group
    rng = np.random.default_rng(1)
    task = np.repeat(["a", "b"], 30)
    epoch = np.tile(np.repeat([1, 5, 10], 10), 2)
    run_quality = rng.normal(size=60)
    acc = 0.1 * epoch + 0.01 * run_quality
    pred = epoch.astype(float) + 1e-6 * rng.normal(size=60)  # ties within an epoch broken at random
    all_ckpts = E.within_group_rank_corr(acc, pred, task)
    final = E.within_group_rank_corr(acc, pred, np.where(epoch == 10, task, None))
    by_epoch = E.within_group_rank_corr(acc, pred, [f"{t}|{e}" for t, e in zip(task, epoch)])
    assert all_ckpts["kendall"] > 0.6 and all_ckpts["n_groups"] == 2
    assert abs(final["kendall"]) < 0.5 and final["n_groups"] == 2
    assert abs(by_epoch["kendall"]) < 0.3 and by_epoch["n_groups"] == 6
    # a predictor of the run's quality: good within every group
    good = E.within_group_rank_corr(acc, run_quality, np.where(epoch == 10, task, None))
    assert good["kendall"] == pytest.approx(1.0)


def test_within_group_rank_corr_scores_every_method_on_the_same_groups():
    # a prediction constant within a group ranks nothing there: 0 for that group, not left out (else an
    # embedding that separates only some groups, e.g. one-hot input shapes, is scored on those alone)
    y = np.array([1.0, 2, 3, 4, 5, 1, 2, 3, 4, 5, 7, 7, 7, 7, 7])
    g = np.repeat(["a", "b", "c"], 5)
    pred = np.array([1.0, 2, 3, 4, 5, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5])
    r = E.within_group_rank_corr(y, pred, g)
    assert r["n_groups"] == 2  # "c": constant truth, undefined for every method, left out
    assert r["kendall"] == pytest.approx(0.5) and r["spearman"] == pytest.approx(0.5)
    assert E.within_group_rank_corr(y, np.zeros(15), g) == {"kendall": 0.0, "spearman": 0.0, "n_groups": 2.0}


def test_constant_and_shape_only_passes_are_found_and_noted():
    meta, task_code, rng = _toy_eval_metadata()
    n = len(meta["task"])
    refs = E.reference_embeddings(n, seed=0)
    assert set(refs) == set(E.REFERENCE_METHODS) and all(v.shape == (n, 16) for v in refs.values())
    shape = np.eye(2, dtype=np.float32)[np.unique(meta["shape_group"], return_inverse=True)[1]]
    test, train = np.arange(0, n, 2), np.arange(1, n, 2)
    per_seed = {m: [E.evaluate_embeddings(e, meta, train, _query_sets(meta, test), k_values=(1,), probes=("ridge",),
                                          targets=("test_acc",), seed=s) for s in (0, 1)]
                for m, e in (("constant", refs["constant"]), ("shape_only", shape))}
    found = E.trivial_passes(per_seed)
    # shape alone: the same "dataset" per group and t2/t3 more accurate than t0/t1: test accuracy overall
    # is predicted from the shape group (R2 and rank correlations) but not within a task
    assert any(h["method"] == "shape_only" and h["metric"] == "spearman" for h in found["properties/test_acc/ridge"])
    assert not any(h["metric"].startswith("within") for h in found.get("properties/test_acc/ridge", []))
    # retrieval within shape group is at chance for both: no precision or mAP is flagged, but half of each
    # query's database is relevant here, so even a random ranking puts a relevant item first or second (MRR
    # 0.875): that is flagged for both, as the report must note it
    for proto in E.HEADLINE_PROTOCOLS:
        hits = found.get(f"retrieval/{proto}", [])
        assert all(h["metric"] in ("MRR", "R@5") for h in hits), hits
    flagged = {h["method"] for k, hits in found.items() if k.startswith("retrieval/") for h in hits}
    assert flagged == {"constant", "shape_only"}
    hit = found["properties/test_acc/ridge"][0]
    assert hit["n"] == 2 and 1 <= hit["seeds"] <= 2 and hit["max"] >= E.TRIVIAL_THRESHOLD
    # the report writes the note under that table, from the JSON
    import report
    notes = report.trivial_notes({"trivial_passes": {"threshold": 0.85, "sections": found}}, "properties/test_acc/ridge")
    assert notes and "shape_only" in notes[0] and "spearman" in notes[0]
    assert report.trivial_notes({"trivial_passes": {"threshold": 0.85, "sections": found}}, "retrieval/seen_tasks") == []


def test_reduce_dims_keeps_narrow_and_projects_wide():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 6)).astype(np.float32)
    assert E.reduce_dims(x, np.arange(30), 8) is x
    wide = np.concatenate([x * 10, 0.01 * rng.normal(size=(50, 30))], 1)
    red = E.reduce_dims(wide, np.arange(30), 6, seed=0)
    assert red.shape == (50, 6)
    # the top components span the high-variance block: projecting it back loses almost nothing
    from sklearn.decomposition import PCA
    ref = PCA(6).fit(wide[:30])
    assert np.allclose(np.abs(red), np.abs(ref.transform(wide)), atol=1e-3)


def test_reduce_dims_keeps_only_components_the_fit_rows_span():
    # fewer fit rows than max_dims: 40 fit rows span at most 39 centred directions. A 40th component has
    # ~0 variance on the fit rows but not on rows outside them; a standardizing probe divided by it and
    # predicted without bound (the small zoo's probe fingerprints: ridge R^2 of -1e7)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 300)).astype(np.float32)
    fit = np.arange(40)
    red = E.reduce_dims(x, fit, 256, seed=0)
    assert red.shape == (100, 39)
    var = red[fit].var(0)
    assert var.min() > 1e-3 * var.max()
    y = x[:, 0] + 0.1 * rng.normal(size=100)
    pred = E.make_probe("ridge").fit(red[fit], y[fit]).predict(red[40:])
    assert np.abs(pred).max() < 10 * np.abs(y).max()
    # duplicated fit rows (rank 5): only the 5 spanned components survive
    low = np.repeat(rng.normal(size=(6, 300)), 10, axis=0).astype(np.float32)
    assert E.reduce_dims(low, np.arange(60), 256, seed=0).shape == (60, 5)


def test_property_probe_does_not_extrapolate_on_outlying_rows():
    # one test row 300 standard deviations out on a feature (a confident model's log-probabilities)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 8))
    y = x[:, 0] + 0.1 * rng.normal(size=200)
    x_out = x[150:].copy()
    x_out[0, 1] = 300.0
    for probe in ("ridge", "mlp"):
        pred = E.make_probe(probe).fit(x[:150], y[:150]).predict(x_out)
        assert np.abs(pred).max() < 10 * np.abs(y).max(), probe
        assert E.r2_score(y[150:], pred) > 0.5, probe


def test_property_oracles_read_their_metadata_columns():
    import pandas as pd
    meta = pd.DataFrame({"train_acc": [0.9, 0.5, 0.7], "test_loss": [0.3, 1.2, 0.8], "lr": [1e-3, 1e-2, 1e-1],
                         "optimizer": ["adam", "sgd", "adam"], "weight_decay": [0.0, 1e-4, 0.0],
                         "train_fraction": [1.0, 0.5, 0.25], "n_train": [100, 50, 25], "batch_size": [16, 32, 32],
                         "num_params": [1000, 2000, 4000], "epoch": [10, 20, 20], "arch_family": ["mlp", "cnn", "mlp"]})
    emb = E.property_oracle_embeddings(meta)
    assert list(emb) == list(E.PROPERTY_ORACLES) and all("[oracle:" in m for m in emb)
    tr, recipe, loss = emb.values()
    assert np.allclose(tr[:, 0], meta["train_acc"]) and np.allclose(loss[:, 0], meta["test_loss"])
    assert recipe.shape == (3, 10) and np.allclose(recipe[:, 0], [-3, -2, -1]) and np.allclose(recipe[:, 1], [1, 0, 1])
    assert np.allclose(recipe[:, -2:], [[0, 1], [1, 0], [0, 1]])  # family one-hot, sorted: cnn, mlp
    with pytest.raises(KeyError):
        E.property_oracle_embeddings(meta.drop(columns=["lr"]))


def test_embed_fn_from_method_passes_spec_and_weights():
    import architecture as A
    import torch

    class Method:  # the fit/embed shape of baselines.py: embed(records with .spec / .state_dict)
        def embed(self, recs):
            return np.array([[r.spec.num_params(), float(r.state_dict["layers.0.bias"].sum())] for r in recs])

    spec = A.mlp_spec(4, [3], 2, "relu")
    sd = {k: torch.ones(s) for k, s in spec.param_shapes().items()}
    out = E.embed_fn_from_method(Method())([(spec, sd), (spec, sd)])
    assert out.dtype == np.float32 and out.tolist() == [[spec.num_params(), 3.0]] * 2


def test_learned_fraction_and_query_fit_bins_hand_computed():
    # task a (2 outputs, chance 0.5): best 0.9; task b (4 outputs, chance 0.25): best 0.65; task c learned nothing
    # task d (2 outputs): best 1.0, a model at 0.75 reached exactly half of it -> "partly" (the bins are [lo, hi))
    acc = [0.9, 0.75, 0.5, 0.45, 0.65, 0.62, 0.3, 0.5, 0.5, 1.0, 0.75]
    task = ["a", "a", "a", "a", "b", "b", "b", "c", "c", "d", "d"]
    frac = E.learned_fraction(acc, task, [2, 2, 2, 2, 4, 4, 4, 2, 2, 2, 2])
    np.testing.assert_allclose(frac, [1.0, 0.625, 0.0, -0.125, 1.0, 0.925, 0.125, 1.0, 1.0, 1.0, 0.5])
    meta = {"test_acc": np.array(acc), "task": np.array(task),
            "shape_group": np.array(["in4-out2"] * 4 + ["in9-out4"] * 3 + ["in4-out2"] * 4)}
    assert E.query_fit_labels(meta).tolist() == [
        "learned (>= 0.9)", "partly (0.5-0.9)", "failed (< 0.5)", "failed (< 0.5)", "learned (>= 0.9)",
        "learned (>= 0.9)", "failed (< 0.5)", "learned (>= 0.9)", "learned (>= 0.9)", "learned (>= 0.9)",
        "partly (0.5-0.9)"]
    with pytest.raises(ValueError, match="not 'in<n>-out<m>'"):
        E.query_fit_labels(dict(meta, shape_group=np.array(["g0"] * 11)))


def test_retrieval_by_query_label_splits_only_the_queries():
    meta = _toy_metadata()
    n = len(meta["task"])
    emb = _task_embedding(meta, 5) + 0.6 * np.random.default_rng(0).normal(size=(n, 4)).astype(np.float32)
    sets = _query_sets(meta, np.arange(0, n, 3))
    by_group = E.retrieval_by_shape_group(emb, meta, sets)
    np.testing.assert_equal(by_group, E.retrieval_by_query_label(emb, meta, sets, meta["shape_group"]))
    label = np.where(np.arange(n) % 2 == 0, "even", "odd")
    by_label = E.retrieval_by_query_label(emb, meta, sets, label, k=5, protocols=("seen_tasks",))
    for lab in ("even", "odd"):
        q = sets["seen_tasks"][label[sets["seen_tasks"]] == lab]
        # the same queries against the whole database: not a database restricted to that label
        whole = E.retrieval_protocols(emb, meta, {"seen_tasks": q}, k_values=(5,), protocols=["seen_tasks"])
        assert by_label["seen_tasks"][lab] == pytest.approx(whole["seen_tasks"]["P@5"], rel=1e-12)
    assert set(by_label) == {"seen_tasks"} and 0 < by_label["seen_tasks"]["even"] < 1
