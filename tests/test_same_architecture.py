"""Same-architecture sub-zoo protocol (evaluation.py) and the NFN pieces it runs (baselines.py, stages.py)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

import architecture as A
import baselines as B
import evaluation as E
import subzoos as SZ
from conftest import train_small

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- selection
def _frame() -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """arch -> (models, tasks); runs of 3 checkpoints, run r has task t(r % tasks); runs 2, 5, 8 are query
    runs, except in E (none). G's query runs have tasks no other run of G has (t2 and t5)."""
    plan = {"A": (30, 5), "B": (30, 6), "C": (45, 3), "D": (9, 5), "E": (24, 4), "F": (24, 4), "G": (24, 4)}
    rows = []
    for arch, (n, n_tasks) in plan.items():
        for i in range(n):
            run = i // 3
            task = (f"t{run}" if run in (2, 5) else f"t{10 + run % 2}") if arch == "G" else f"t{run % n_tasks}"
            rows.append({"arch_id": arch, "arch_name": f"net-{arch}", "task": task,
                         "run_id": f"{arch}-r{run}", "query": arch != "E" and run % 3 == 2})
    meta = pd.DataFrame(rows)
    q = meta["query"].to_numpy()
    return meta, np.flatnonzero(~q), np.flatnonzero(q)


def test_select_subzoos_on_hand_made_metadata() -> None:
    meta, fit, qry = _frame()
    # C: 3 tasks < 4; D: 9 models < 20; E: no query model; G: no query with a relevant model;
    # B before A (same size, more tasks)
    sel = SZ.select_same_architecture_subzoos(meta, fit, qry, k=10, min_tasks=4, min_models=20)
    assert [s["arch_id"] for s in sel] == ["B", "A", "F"]
    b = sel[0]
    # B's query runs 2, 5, 8 have tasks t2, t5, t2: run 5 is the only t5 run, so 6 of 9 query rows count
    assert b == {"arch_id": "B", "arch_name": "net-B", "n_models": 30, "n_tasks": 6,
                 "tasks": [f"t{i}" for i in range(6)], "n_fit": 21, "n_queries": 6}
    assert sel[1]["n_queries"] == 9 and sel[2]["n_queries"] == 6  # A: t2, t0, t3 all recur; F: runs 2, 5 (8 runs)
    assert [s["arch_id"] for s in SZ.select_same_architecture_subzoos(meta, fit, qry, 2, 4, 20)] == ["B", "A"]
    # relaxed criteria: C (45 models, 3 tasks) is the largest
    assert SZ.select_same_architecture_subzoos(meta, fit, qry, 1, 3, 20)[0]["arch_id"] == "C"
    assert SZ.select_same_architecture_subzoos(meta, fit, qry, 0, 4, 20) == []
    assert SZ.select_same_architecture_subzoos(meta, fit, qry, 5, 7, 20) == []


# ----------------------------------------------------------------------------- protocol (hand-made)
def test_subzoo_retrieval_equals_direct_evaluation_and_ignores_other_architectures() -> None:
    meta, fit, qry = _frame()
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((len(meta), 8)).astype(np.float32)
    out = SZ.same_architecture_retrieval(emb, meta, ["A", "B"], fit, qry, (1, 5, 10))
    for a in ("A", "B"):
        rows = SZ.subzoo_rows(meta, a)
        direct = E.RetrievalEvaluator((1, 5, 10)).evaluate_knn_retrieval(
            emb[rows], meta["task"].to_numpy()[rows], query_idx=np.flatnonzero(np.isin(rows, qry)),
            exclude_same=meta["run_id"].to_numpy()[rows])
        for key in (*SZ.SUBZOO_METRICS, "n_queries"):
            assert out[a][key] == pytest.approx(direct[key]), (a, key)
    for key in SZ.SUBZOO_METRICS:
        assert out["mean"][key] == pytest.approx((out["A"][key] + out["B"][key]) / 2)
    # per-architecture embeddings (NFN's form) give the same numbers
    per_arch = {a: emb[SZ.subzoo_rows(meta, a)] for a in ("A", "B")}
    assert SZ.same_architecture_retrieval(per_arch, meta, ["A", "B"], fit, qry, (1, 5, 10)) == out
    # models of other architectures never enter a sub-zoo's database
    other = emb.copy()
    other[meta["arch_id"].to_numpy() != "A"] = emb[0]  # would tie with A's first model everywhere
    assert SZ.same_architecture_retrieval(other, meta, ["A"], fit, qry)["A"] == out["A"]


def test_subzoo_retrieval_oracle_and_chance_by_hand() -> None:
    meta, fit, qry = _frame()
    oracle = pd.get_dummies(meta["task"]).to_numpy(np.float32)  # same task <=> same embedding
    out = SZ.same_architecture_retrieval(oracle, meta, ["B"], fit, qry, (1, 10))
    assert out["B"]["P@1"] == 1.0 and out["B"]["mAP"] == 1.0 and out["B"]["MRR"] == 1.0
    # B: 10 runs of 3 checkpoints, run r has task t(r % 6); query runs 2, 5, 8. Runs 2 and 8 (t2) find each
    # other: 3 relevant among the 27 models of the other runs; run 5 (t5) has no other run: not counted
    assert out["B"]["n_queries"] == 6
    assert out["B"]["chance_P"] == pytest.approx(3 / 27)
    assert out["B"]["P@10"] == pytest.approx(3 / 10)  # all 3 relevant in the top 10
    with pytest.raises(KeyError, match="no embeddings for architecture B"):
        SZ.same_architecture_retrieval({"A": oracle[:30]}, meta, ["B"], fit, qry)


# ----------------------------------------------------------------------------- real trained models
@pytest.fixture(scope="module")
def two_task_subzoo(digits_data):
    """One MLP architecture, 2 tasks (digits, digits with permuted labels) x 4 runs x 2 checkpoints,
    really trained; runs 0-1 of each task are the fit rows, runs 2-3 the queries."""
    X, y = digits_data
    perm = torch.tensor([3, 7, 0, 9, 1, 5, 2, 8, 6, 4])
    spec = A.mlp_spec(64, [16, 12], 10, "relu")
    recs, rows = [], []
    for ti, (task, labels) in enumerate((("digits", y), ("digits_perm", perm[y]))):
        for r in range(4):
            for ep in (15, 40):
                sd = train_small(spec, X, labels, seed=100 + 10 * ti + r, epochs=ep)
                recs.append(SimpleNamespace(spec=spec, state_dict=sd, meta={}, model_id=f"{task}-{r}-{ep}"))
                rows.append({"task": task, "run_id": f"{task}-{r}", "arch_id": spec.arch_id, "arch_name": spec.name,
                             "epoch": ep})
    meta = pd.DataFrame(rows)
    fit = np.flatnonzero(meta["run_id"].str.endswith(("-0", "-1")).to_numpy())
    return spec, recs, meta, fit, np.setdiff1d(np.arange(len(meta)), fit)


def test_protocol_with_training_free_nfn_on_real_models(two_task_subzoo) -> None:
    spec, recs, meta, fit, qry = two_task_subzoo
    nfn = B.NFNBaseline(hidden_channels=8, min_models=1, seed=0).fit([recs[i] for i in fit])
    emb = nfn.embed(recs)
    assert emb.shape[0] == 16 and np.isfinite(emb).all()
    out = SZ.same_architecture_retrieval({spec.arch_id: emb}, meta, [spec.arch_id], fit, qry, (1, 5))
    r = out[spec.arch_id]
    # 8 queries; each sees 14 models (its own run's other checkpoint removed... and itself), 6 of its task
    assert r["n_queries"] == 8 and r["chance_P"] == pytest.approx(6 / 14)
    assert 0 <= r["P@1"] <= 1 and 0 < r["mAP"] <= 1 and out["mean"]["mAP"] == r["mAP"]
    # the stage's one-pass fit_embed equals fit on the fit rows + embed; it depends on which rows are fit
    mask = np.isin(np.arange(len(recs)), fit)
    one_pass = B.NFNBaseline(hidden_channels=8, min_models=1, seed=0).fit_embed(recs, mask)
    np.testing.assert_allclose(one_pass, emb, atol=1e-4)
    other = B.NFNBaseline(hidden_channels=8, min_models=1, seed=0).fit_embed(recs, ~mask)
    assert not np.allclose(other, emb, atol=1e-2)


def test_nfn_encoder_takes_flat_weights(two_task_subzoo, digits_data) -> None:
    X, y = digits_data
    cnn = A.cnn_spec((1, 8, 8), [4, 6], 3, 10, "relu")  # a briefly trained CNN (the MLP comes from the sub-zoo)
    models = {"mlp": (two_task_subzoo[0], two_task_subzoo[1][0].state_dict),
              "cnn": (cnn, train_small(cnn, X[:300].view(-1, 1, 8, 8), y[:300], seed=0, epochs=15))}
    for name, (spec, sd) in models.items():
        enc = B.NFNEncoder(spec, hidden_channels=4, global_dim=8).eval()
        noisy = {k: v + 0.01 * torch.randn_like(v) for k, v in sd.items()}
        flat = torch.stack([torch.from_numpy(B.flatten_state_dict(spec, s)) for s in (sd, noisy)])
        with torch.no_grad():
            assert torch.allclose(enc(flat), enc(B.nfn_batch(spec, [sd, noisy])), atol=1e-6), name
        with pytest.raises(ValueError, match="flat NFN input must be"):
            enc(flat[:, :-1])


def test_train_nfn_subzoo_with_the_shared_loop(two_task_subzoo) -> None:
    import stages as S
    from config import ExperimentConfig
    from weight_to_graph import WeightToGraph

    spec, recs, meta, fit, qry = two_task_subzoo
    cfg = ExperimentConfig()
    cfg.eval.nfn_epochs, cfg.eval.nfn_hidden_channels = 4, 4
    cfg.encoder.global_dim, cfg.encoder.projection_dim = 16, 8
    cfg.train.batch_size, cfg.train.learning_rate = 8, 3e-3
    conv = WeightToGraph.from_config(cfg.graph)
    graphs = [conv.to_graph(r.spec, r.state_dict, model_idx=i) for i, r in enumerate(recs)]
    zoo = SimpleNamespace(metadata=meta, spec=lambda i: recs[i].spec)
    rows = np.arange(len(recs))
    emb, hist = S.train_nfn_subzoo(cfg, zoo, graphs, rows, fit, "supcon", 0, torch.device("cpu"))
    assert emb.shape == (16, 16) and np.isfinite(emb).all()
    assert len(hist["train_loss"]) == 4 and hist["train_loss"][-1] < hist["train_loss"][0]
    out = SZ.same_architecture_retrieval(emb, meta, [spec.arch_id], fit, qry, (1, 5))
    assert out[spec.arch_id]["n_queries"] == 8
