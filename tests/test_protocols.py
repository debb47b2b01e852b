"""The evaluation protocol's splits: redrawn per seed, disjoint parts, and selection that cannot read test data."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

import contrastive_learning as C
import dataloader as D
from config import TrainConfig
from ddp_worker import StandInGNN, make_toy_zoo
from runtime import single_process
from tasks import TASKS

pytestmark = pytest.mark.usefixtures("one_thread")

SPLIT_ARGS = dict(val_fraction=0.15, test_fraction=0.15, test_unseen_fraction=0.25, val_unseen_fraction=0.2)


def registry_metadata(runs_per_task: int = 6, ckpts: int = 3) -> pd.DataFrame:
    """Metadata of a zoo holding every registry task (no weights): the real task kinds and shape groups."""
    rows = [{"task": t.name, "shape_group": t.shape_group, "run_id": f"{t.name}/r{r}", "epoch": c}
            for t in TASKS.values() for r in range(runs_per_task) for c in range(ckpts)]
    return pd.DataFrame(rows)


def _tasks_of(meta: pd.DataFrame, rows: np.ndarray) -> set[str]:
    return set(meta["task"].to_numpy()[rows])


@pytest.mark.parametrize("seed", [42, 43, 44])
def test_split_parts_are_disjoint_and_cover_the_zoo(seed):
    meta = registry_metadata()
    split = D.draw_split(meta, seed, **SPLIT_ARGS)
    parts = {k: getattr(split, k) for k in ("train", "val", "test", "val_unseen", "test_unseen", "unseen_kind")}
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(len(meta)))  # a partition of the rows
    trained = _tasks_of(meta, split.train)
    held = {"val_unseen": set(split.val_unseen_tasks), "test_unseen": set(split.test_unseen_tasks),
            "unseen_kind": set(split.unseen_kind_tasks)}
    for name, tasks in held.items():
        assert tasks and _tasks_of(meta, parts[name]) == tasks, name
        assert not tasks & trained, f"{name} tasks were trained on"
        for other, others in held.items():
            assert other == name or not tasks & others, f"{name} and {other} share tasks"
    # seen tasks: their val and test runs are of trained tasks only
    assert _tasks_of(meta, split.val) <= trained and _tasks_of(meta, split.test) <= trained
    assert set(split.heldout_tasks) == set().union(*held.values())
    # the unseen kind: every task of that kind, and nothing else
    assert split.kind in D.eligible_unseen_kinds(sorted(TASKS), D.task_kinds, 0.34)
    assert held["unseen_kind"] == {t for t in TASKS if split.kind in D.task_kinds(t)}
    # test-unseen and val-unseen come from every shape group that can spare them (>= 4 tasks once the kind
    # is out), and each group keeps >= 2 training tasks
    sg = meta.drop_duplicates("task").set_index("task")["shape_group"]
    for group, tasks in sg[~sg.index.isin(list(held["unseen_kind"]))].groupby(sg).groups.items():
        n = len(tasks)
        assert sum(sg[t] == group for t in trained) >= min(n, 2), group
        if n >= 4:
            assert any(sg[t] == group for t in held["test_unseen"]) and any(sg[t] == group for t in held["val_unseen"])


def test_splits_are_redrawn_per_seed_and_are_a_value_of_the_seed():
    meta = registry_metadata()
    splits = {s: D.draw_split(meta, s, **SPLIT_ARGS) for s in (42, 43, 44)}
    # the same seed gives the same split (every method of a seed is evaluated on it)
    again = D.draw_split(meta.sample(frac=1.0, random_state=0).sort_index(), 42, **SPLIT_ARGS)
    for k in ("train", "val", "test", "val_unseen", "test_unseen", "unseen_kind"):
        assert np.array_equal(getattr(again, k), getattr(splits[42], k))
    # other seeds hold out other tasks (and, here, other kinds)
    tests = {s: sp.test_unseen_tasks for s, sp in splits.items()}
    assert len(set(tests.values())) == 3, tests
    assert len({sp.kind for sp in splits.values()}) >= 2
    assert len({tuple(sp.val) for sp in splits.values()}) == 3


def test_unseen_kind_settings():
    meta = registry_metadata()
    none = D.draw_split(meta, 0, **SPLIT_ARGS, unseen_kind="")
    assert none.kind == "" and len(none.unseen_kind) == 0 and none.test_unseen_tasks
    perm = D.draw_split(meta, 0, **SPLIT_ARGS, unseen_kind="label_permutation")
    assert set(perm.unseen_kind_tasks) == {t for t, s in TASKS.items() if "label_permutation" in s.kinds}
    with pytest.raises(ValueError, match="no task of the zoo has that kind"):
        D.draw_split(meta, 0, **SPLIT_ARGS, unseen_kind="rotation_by_7_degrees")
    # a kind holding more than max_fraction of the tasks is not drawn: the largest kind, just below its share
    counts = {k: sum(k in s.kinds for s in TASKS.values()) for k in {k for s in TASKS.values() for k in s.kinds}}
    big = max(counts, key=counts.get)
    assert big in D.eligible_unseen_kinds(sorted(TASKS), D.task_kinds, counts[big] / len(TASKS))
    assert big not in D.eligible_unseen_kinds(sorted(TASKS), D.task_kinds, (counts[big] - 1) / len(TASKS))
    with pytest.raises(KeyError, match="neither in the task registry"):
        D.task_kinds("no_such_task")
    # a composed task of two kinds is held out with either kind
    kinds = {"a": ("rotation",), "b": ("rotation", "label_permutation"), "c": ("label_permutation",), "d": ("x",)}
    toy = pd.DataFrame([{"task": t, "shape_group": "g", "run_id": f"{t}{r}"} for t in kinds for r in range(3)])
    split = D.draw_split(toy, 0, **SPLIT_ARGS, unseen_kind="rotation", kinds_of=kinds.__getitem__)
    assert split.unseen_kind_tasks == ("a", "b")


class RecordingGraphs(list):
    """A list of graphs that records every index read."""

    def __init__(self, graphs):
        super().__init__(graphs)
        self.read: set[int] = set()

    def __getitem__(self, i):
        self.read.add(int(i))
        return super().__getitem__(i)


@pytest.fixture(scope="module")
def toy_split():
    graphs, meta = make_toy_zoo(n_tasks=6, runs_per_task=6, ckpts=2, seed=3)
    split = D.split_by_run(meta, 0.2, 0.2, heldout_tasks=["task4"], seed=0, val_unseen_tasks=["task3"],
                           unseen_kind_tasks=["task5"], kind="toy")
    return graphs, meta, split


def _select(graphs, meta, split):
    """What stages.compare_recipes and stages.train_and_embed do: the comparison, then a training."""
    sel_graphs, sel_meta, sel_split = D.selection_subset(graphs, meta, split)
    train = TrainConfig(batch_size=8, learning_rate=5e-3, temperature=0.2)
    one = single_process(torch.device("cpu"))
    out = C.compare_view_recipes(StandInGNN, sel_graphs, sel_meta, sel_split, ["checkpoint", "supcon"], train, 2,
                                 lambda r: None, one, seed=0)
    torch.manual_seed(0)
    fit = C.fit_contrastive(StandInGNN(), sel_graphs, sel_meta, sel_split, out["chosen"], train, one, seed=0, epochs=2)
    return out, fit


def test_selection_never_reads_test_unseen_unseen_kind_or_test_rows(toy_split):
    graphs, meta, split = toy_split
    recorded = RecordingGraphs(graphs)
    clean, fit = _select(recorded, meta, split)
    assert recorded.read == set(split.selection_rows.tolist())
    assert fit.data["n_val_unseen"] == len(split.val_unseen) > 0 and fit.history["metric_name"] == "val_P@10"
    # poison every test row (test runs, test-unseen and unseen-kind models): NaN weights and wrong labels.
    # A choice that read any of them would fail (NaN embeddings are refused) or change
    test_rows = np.concatenate([split.test, split.test_unseen, split.unseen_kind])
    poisoned_graphs = list(graphs)
    for i in test_rows:
        g = graphs[int(i)].clone()
        g.edge_attr = torch.full_like(g.edge_attr, float("nan"))
        poisoned_graphs[int(i)] = g
    poisoned_meta = meta.copy()
    poisoned_meta.loc[test_rows, "task"] = "task0"
    poisoned_meta.loc[test_rows, "test_acc"] = float("nan")
    poisoned, pfit = _select(poisoned_graphs, poisoned_meta, split)
    assert poisoned["chosen"] == clean["chosen"]
    for r in clean["recipes"]:
        assert poisoned["recipes"][r]["history"]["val_metric"] == clean["recipes"][r]["history"]["val_metric"]
    assert pfit.history["val_metric"] == fit.history["val_metric"]
    assert all(torch.equal(a, b) for a, b in zip(pfit.encoder.state_dict().values(), fit.encoder.state_dict().values()))


def test_selection_subset_holds_no_test_row_and_keeps_the_validation_protocol(toy_split):
    graphs, meta, split = toy_split
    sel_graphs, sel_meta, sel_split = D.selection_subset(graphs, meta, split)
    assert len(sel_graphs) == len(sel_meta) == len(split.selection_rows)
    assert set(sel_meta["task"]) == {"task0", "task1", "task2", "task3"}  # no test-unseen or unseen-kind task
    assert set(sel_meta["run_id"]) & set(meta["run_id"].to_numpy()[split.test]) == set()
    for a, b in (("train", "train"), ("val", "val"), ("val_unseen", "val_unseen")):
        assert sel_meta["model_id"].to_numpy()[getattr(sel_split, a)].tolist() == \
            meta["model_id"].to_numpy()[getattr(split, b)].tolist()
    assert sel_split.test_unseen_tasks == () and sel_split.unseen_kind_tasks == ()
    assert len(sel_split.test) == len(sel_split.test_unseen) == len(sel_split.unseen_kind) == 0
    loaders = D.build_loaders(sel_graphs, sel_meta, sel_split, "checkpoint", 8, None, 0)
    v = loaders.validation
    assert len(v.rows) == len(sel_graphs) and len(v.seen_queries) == len(split.val)
    assert set(v.task[v.unseen_queries]) == {"task3"}


def test_selection_metric_is_within_shape_group_and_averages_seen_and_unseen(toy_split):
    graphs, meta, split = toy_split
    sel_graphs, sel_meta, sel_split = D.selection_subset(graphs, meta, split)
    loaders = D.build_loaders(sel_graphs, sel_meta, sel_split, "checkpoint", 8, None, 0)
    v = loaders.validation
    torch.manual_seed(0)
    model = StandInGNN()
    val_fn = C.make_retrieval_val_fn(v, torch.device("cpu"), k=3)
    emb = C.embed(model, v.loader, torch.device("cpu"))
    import evaluation as E
    parts = E.validation_retrieval(emb, v.task, v.shape_group, v.run_id, v.seen_queries, v.unseen_queries, 3)
    assert val_fn(model) == pytest.approx((parts["val_seen_P@3"] + parts["val_unseen_P@3"]) / 2)
    # a second shape group: each query is searched only inside its own
    meta2 = sel_meta.assign(shape_group=np.where(sel_meta["task"].isin(["task0", "task3"]), "a", "b"))
    v2 = D.build_loaders(sel_graphs, meta2, sel_split, "checkpoint", 8, None, 0).validation
    within = E.validation_retrieval(emb, v2.task, v2.shape_group, v2.run_id, v2.seen_queries, v2.unseen_queries, 3)
    assert within["val_unseen_chance_P"] > parts["val_unseen_chance_P"]  # a smaller database, same relevant items


def test_checkpoint_split_digest_covers_the_selection_data(toy_split):
    _, meta, split = toy_split
    other = dataclasses.replace(split, val_unseen=split.val_unseen[:-1])
    assert C.split_digest(split) != C.split_digest(other)


def test_the_experiment_stages_hand_selection_only_the_selection_subset(toy_split, monkeypatch, tmp_path):
    """stages.compare_recipes and stages.train_and_embed give the recipe comparison and the trainings only
    ``selection_subset`` data (the comparison and training themselves are stubbed to record what they get)."""
    from types import SimpleNamespace

    import stages as S
    from config import ExperimentConfig
    from report import RunRecorder

    graphs, meta, split = toy_split
    got = []

    def fake_compare(make_encoder, g, m, sp, recipes, *a, **k):
        got.append(("compare", g, m, sp))
        return {"metric": "val_P@10", "epochs": 1, "chosen": "noise", "chosen_self_supervised": "noise",
                "recipes": {r: {"val_metric": 0.5, "kind": "self-supervised"} for r in recipes}}

    def fake_fit(encoder, g, m, sp, recipe, *a, **k):
        got.append(("fit", g, m, sp))
        return C.Fit(encoder, {"epoch": []}, {})

    monkeypatch.setattr(S, "compare_view_recipes", fake_compare)
    monkeypatch.setattr(S, "fit_contrastive", fake_fit)
    monkeypatch.setattr(S, "embed", lambda model, loader, device: np.zeros((len(loader.dataset), 2), np.float32))
    cfg = ExperimentConfig()
    cfg.train.compare_recipes, cfg.train.compare_epochs = ["noise", "checkpoint"], 1
    cfg.encoder.num_probes = 0  # the toy zoo has no specs to draw probes for; probes change nothing read here
    zoo = SimpleNamespace(metadata=meta, version="toy")
    rec = RunRecorder(tmp_path, {}, write=False)
    one = single_process(torch.device("cpu"))
    recipes = S.compare_recipes(cfg, zoo, graphs, {0: split}, one, rec)
    S.train_and_embed(cfg, zoo, graphs, split, recipes[0], 0, one, tmp_path, rec)
    assert [k for k, *_ in got] == ["compare", "fit"]
    test_ids = set(meta["model_id"].to_numpy()[np.concatenate([split.test, split.test_unseen, split.unseen_kind])])
    for _, g, m, sp in got:
        assert len(g) == len(m) == len(split.selection_rows)
        assert not set(m["model_id"]) & test_ids
        assert len(sp.test) == len(sp.test_unseen) == len(sp.unseen_kind) == 0


def test_readme_states_the_tasks_and_sources_the_default_zoo_trains():
    """The README's zoo sentence matches the default plan (and the --small one); a new default updates it."""
    import re
    from pathlib import Path

    from config import SMALL_PRESET, ZooConfig
    from data_prep import DEFAULT_MIN_GROUPS
    from tasks import get_task, task_subset
    from zoo_plan import plan_zoo

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    said = re.search(r"the default zoo trains (\d+) tasks from (\d+) sources \(([^;)]*)[;)].*?`--small` (\d+) tasks "
                     r"from (\d+) sources", readme, re.S)
    assert said, "the README no longer says which tasks the default zoo trains"

    def trained(z: ZooConfig) -> tuple[int, int, list[str]]:
        tasks = task_subset(z.zoo_tasks) if z.zoo_tasks else list(TASKS)
        plans = plan_zoo(z.runs_per_task * z.zoo_scale * len(tasks), z.zoo_seed, z.zoo_group_size, z.cnn_fraction,
                         z.card_task_fraction, tasks, DEFAULT_MIN_GROUPS, z.cnn_bn_fraction, z.resnet_fraction)
        trained_tasks = {r.task for p in plans for r in p.runs}
        sources = sorted({get_task(t).dataset for t in trained_tasks})
        return len(trained_tasks), len(sources), sources

    n, n_src, sources = trained(ZooConfig())
    assert (int(said[1]), int(said[2])) == (n, n_src)
    assert sorted(s.strip() for s in said[3].split(",")) == sources
    small = dataclasses.replace(ZooConfig(), **SMALL_PRESET["zoo"])
    assert (int(said[4]), int(said[5])) == trained(small)[:2]
    assert ZooConfig().card_task_fraction == 0.0  # the metadata baselines are no label oracle by default


def test_metadata_baselines_reading_task_names_are_labelled_oracles_and_kept_out_of_the_headline():
    import baselines as B
    import report

    meta = pd.DataFrame({"task": ["digits", "digits_perm_a", "mnist", "mnist"],
                         "model_card": ["An MLP. Task: digits (sklearn digits).", "An MLP, 10 outputs.",
                                        "A CNN trained on mnist images.", "A CNN (mnist_perm style)."]})
    assert B.card_task_fraction(meta) == 0.5  # whole words only: "mnist_perm" does not name "mnist"
    assert B.card_task_fraction(meta.assign(model_card="An MLP, 10 outputs.")) == 0.0
    label = B.oracle_label("metadata_tfidf", 0.5)
    assert label == "metadata_tfidf [oracle: 50% of cards name the task]" and B.is_oracle(label)
    agg = {"mean": 0.7, "std": 0.0, "values": [0.7], "n": 1}
    res = {"methods": {m: {"retrieval": {"unseen_tasks": {"P@10": agg}}} for m in ("gnn [noise]", label, "shape_only")},
           "headline_protocols": ["unseen_tasks"], "protocol_notes": {"unseen_tasks": "x"}}
    assert list(report.retrieval_table(res, "unseen_tasks")) == ["gnn [noise]", "shape_only"]
    md = "\n".join(report.retrieval_lines(res))
    assert "### Oracles (not baselines)" in md and md.index(label) > md.index("Oracles (not baselines)")


def test_a_zoo_made_with_task_naming_cards_is_not_reused_for_card_task_fraction_0(tmp_path, monkeypatch):
    import data_prep

    kw = dict(num_models=8, epochs=1, checkpoints_per_run=1, seed=0, tasks=["iris", "iris_perm"], min_groups=1)
    data_prep.ModelZooDataset.create_synthetic_model_zoo(tmp_path, card_task_fraction=0.5, **kw)

    class Retrained(Exception):
        pass

    def refuse(*a, **k):
        raise Retrained

    monkeypatch.setattr(data_prep, "train_groups", refuse)
    assert len(data_prep.ModelZooDataset.create_synthetic_model_zoo(tmp_path, card_task_fraction=0.5, **kw)) == 8
    with pytest.raises(Retrained):  # other generation args: the zoo on disk is not reused
        data_prep.ModelZooDataset.create_synthetic_model_zoo(tmp_path, card_task_fraction=0.0, **kw)


def test_transfer_tasks_are_a_seeded_draw_spread_over_shape_groups():
    from stages import transfer_tasks
    from tasks import get_task, shape_groups

    held = sorted(TASKS)[::7]  # alphabetical order put 2 of 3 on breast_cancer before: the draw must not follow it
    groups = shape_groups({t: get_task(t) for t in held})
    n = min(6, len(groups))
    chosen = transfer_tasks(held + ["unknown"], n, seed=42)  # names that are not tasks are never drawn
    assert len(chosen) == n == len(set(chosen)) and set(chosen) <= set(held)
    group_of = {t: g for g, members in groups.items() for t in members}
    assert len({group_of[t] for t in chosen}) == n  # one task per shape group before any group gets a second
    assert transfer_tasks(held, n, seed=42) == chosen and transfer_tasks(held, n, seed=43) != chosen
    assert transfer_tasks(held[:2], 5, seed=0) == transfer_tasks(held[:2], 2, seed=0)
    assert transfer_tasks(held, 0, seed=1) == []
