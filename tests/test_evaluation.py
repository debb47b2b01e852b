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
    """Two shape groups; tasks t0,t1 in group g0 (dataset d0), t2,t3 in g1 (dataset d1);
    families mlp-1h / mlp-2h alternate; 2 checkpoints per run."""
    rows = []
    for t in range(4):
        for j in range(n_per):
            rows.append(dict(task=f"t{t}", dataset=f"d{t // 2}", shape_group=f"g{t // 2}",
                             arch_family=f"mlp-{1 + j % 2}h", arch_id=f"a{j % 2}", run_id=f"r{t}_{j // 2}"))
    return {k: np.array([r[k] for r in rows]) for k in rows[0]}


def test_retrieval_protocols_task_embeddings():
    meta = _toy_metadata()
    n = len(meta["task"])
    rng = np.random.default_rng(3)
    task_code = np.array([int(t[1]) for t in meta["task"]])
    emb = np.eye(4, dtype=np.float32)[task_code] + 0.05 * rng.normal(size=(n, 4)).astype(np.float32)
    res = E.retrieval_protocols(emb, meta, query_idx=np.arange(0, n, 3), db_idx=np.arange(n),
                                heldout_tasks=["t1", "t3"], k_values=(1, 5))
    assert set(res) == set(E.PROTOCOL_NOTES)
    for name in ("full_zoo", "within_shape_group", "unseen_tasks", "cross_architecture"):
        assert res[name]["P@5"] == 1.0, (name, res[name])
    # same_dataset within shape group: every item of a group shares its dataset -> trivially 1
    assert res["same_dataset"]["P@5"] == 1.0
    # task embeddings carry no architecture information: same_architecture ~ chance (not 1)
    assert res["same_architecture"]["P@5"] < 0.8
    # chance levels reflect the restrictions: within a group half the valid db is the same task
    assert res["within_shape_group"]["chance_P"] > res["full_zoo"]["chance_P"]
    # unseen_tasks: only t1/t3 queries
    assert res["unseen_tasks"]["n_queries"] == len([i for i in range(0, n, 3) if meta["task"][i] in ("t1", "t3")])
    # seen_tasks: the complement, same database
    assert res["seen_tasks"]["n_queries"] == len([i for i in range(0, n, 3) if meta["task"][i] not in ("t1", "t3")])
    assert res["seen_tasks"]["P@5"] == 1.0
    assert "skipped" not in res
    # one architecture family only: cross_architecture has nothing relevant -> reported as skipped
    one_family = dict(meta, arch_family=np.array(["mlp-1h"] * n))
    res = E.retrieval_protocols(emb, one_family, np.arange(0, n, 3), np.arange(n), k_values=(1,))
    assert set(res["skipped"]) == {"unseen_tasks", "seen_tasks", "cross_architecture",
                                   "cross_architecture_within_shape_group"}
    assert "relevant item" in res["skipped"]["cross_architecture"] and "full_zoo" in res
    with pytest.raises(E.NoRelevantItems):
        E.RetrievalEvaluator().evaluate_knn_retrieval(emb, meta["task"], exclude_same=meta["task"])
    with pytest.raises(ValueError, match="unknown retrieval protocols"):
        E.retrieval_protocols(emb, meta, [0], np.arange(n), protocols=["nope"])


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
    with pytest.raises(ValueError, match="differs"):
        E.aggregate_seeds([{"why": "x"}, {"why": "y"}])
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


def test_evaluate_embeddings_end_to_end_and_seed_aggregation():
    meta = _toy_metadata(n_per=12)
    n = len(meta["task"])
    rng = np.random.default_rng(8)
    task_code = np.array([int(t[1]) for t in meta["task"]])
    meta["test_acc"] = 0.5 + 0.1 * task_code + 0.02 * rng.normal(size=n)
    meta["gen_gap"] = rng.normal(size=n)
    meta["lr"] = 10 ** rng.uniform(-4, -2, n)
    emb = np.concatenate([np.eye(4)[task_code], meta["test_acc"][:, None]], 1) + 0.01 * rng.normal(size=(n, 5))
    test = np.arange(0, n, 2)
    train = np.arange(1, n, 2)
    runs = [E.evaluate_embeddings(emb, meta, train, test, heldout_tasks=["t1", "t3"], k_values=(1, 5),
                                  targets=("test_acc", "gen_gap", "log_lr"), probes=("ridge",), seed=s)
            for s in (0, 1)]
    r = runs[0]
    assert r["retrieval"]["within_shape_group"]["P@5"] == 1.0
    assert r["clustering"]["ARI"] == pytest.approx(1.0) and r["clustering_unseen_tasks"]["purity"] == 1.0
    assert r["properties"]["test_acc"]["ridge"]["R2"] > 0.9 and r["properties"]["gen_gap"]["ridge"]["R2"] < 0.3
    assert r["distance_performance"]["test_acc"]["spearman"] > 0.3
    assert r["dims"] == {"embedding": 5.0, "probes": 5.0}
    agg = E.aggregate_seeds(runs)
    assert agg["retrieval"]["full_zoo"]["P@1"]["n"] == 2
    with pytest.raises(AssertionError, match="overlap"):
        E.evaluate_embeddings(emb, meta, test, test)
    # a wide embedding: retrieval sees every dim, probes/k-means its top principal components
    wide = np.concatenate([emb, 1e-3 * rng.normal(size=(n, 40))], 1)
    rw = E.evaluate_embeddings(wide, meta, train, test, heldout_tasks=["t1", "t3"], k_values=(1, 5),
                               targets=("test_acc",), probes=("ridge",), max_probe_dims=8)
    assert rw["dims"] == {"embedding": 45.0, "probes": 8.0}
    assert rw["clustering"]["ARI"] == pytest.approx(1.0) and rw["properties"]["test_acc"]["ridge"]["R2"] > 0.9


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
