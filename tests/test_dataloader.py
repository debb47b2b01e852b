"""Splits by run, positive pairs per recipe, deterministic views, DDP-safe sampling."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch_geometric.data import Batch

import dataloader as D
from ddp_worker import make_toy_zoo
from symmetry import SymmetryAugmenter


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def zoo():
    return make_toy_zoo(n_tasks=4, runs_per_task=6, ckpts=3)


def test_split_by_run_keeps_runs_whole_and_holds_out_tasks(zoo):
    graphs, meta = zoo
    split = D.split_by_run(meta, 0.2, 0.2, heldout_tasks=["task1"], seed=3)
    parts = {k: getattr(split, k) for k in ("train", "val", "test", "heldout")}
    all_idx = np.concatenate(list(parts.values()))
    assert sorted(all_idx.tolist()) == list(range(len(meta)))  # a partition of the zoo
    runs = {k: set(meta["run_id"].to_numpy()[v]) for k, v in parts.items()}
    for a in parts:
        for b in parts:
            if a < b:
                assert not runs[a] & runs[b], f"a run is in {a} and {b}"
    assert set(meta["task"].to_numpy()[split.heldout]) == {"task1"}
    for k in ("train", "val", "test"):
        assert "task1" not in set(meta["task"].to_numpy()[parts[k]])
    # every seen task keeps training runs and has one val and one test run (6 runs * 0.2 -> 1)
    for t in ("task0", "task2", "task3"):
        for k in ("train", "val", "test"):
            assert t in set(meta["task"].to_numpy()[parts[k]]), (t, k)
    again = D.split_by_run(meta, 0.2, 0.2, heldout_tasks=["task1"], seed=3)
    assert np.array_equal(again.val, split.val)
    other = D.split_by_run(meta, 0.2, 0.2, heldout_tasks=["task1"], seed=4)
    assert not np.array_equal(other.val, split.val)


def test_split_errors(zoo):
    _, meta = zoo
    with pytest.raises(ValueError, match="not in the zoo"):
        D.split_by_run(meta, 0.2, 0.2, heldout_tasks=["nope"])
    with pytest.raises(ValueError, match="sum below 1"):
        D.split_by_run(meta, 0.6, 0.5)
    with pytest.raises(ValueError, match="lacks column"):
        D.split_by_run(meta.drop(columns=["run_id"]), 0.2, 0.2)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        D.select_heldout_tasks(meta, 1.0, 0)
    with pytest.raises(ValueError, match="lacks column"):
        D.select_heldout_tasks(meta.drop(columns=["shape_group"]), 0.25, 0)


def test_heldout_tasks_are_drawn_per_shape_group(zoo):
    _, meta = zoo
    # two shape groups of 4 tasks and one of 2 (too few to hold any out)
    groups = {"task0": "a", "task1": "a", "task2": "a", "task3": "a"}
    meta = pd.concat([meta.assign(shape_group=meta["task"].map(groups)),
                      meta.assign(task="b" + meta["task"], shape_group="b"),
                      meta[meta["task"].isin(["task0", "task1"])].assign(task="c" + meta["task"], shape_group="c")])
    held = D.select_heldout_tasks(meta, 0.25, 0)
    by_group = meta.drop_duplicates("task").set_index("task")["shape_group"]
    assert sorted(by_group[held]) == ["a", "b"]  # round(0.25 * 4) = 1 per group of 4; none of 2
    assert held == D.select_heldout_tasks(meta, 0.25, 0)  # a value of (meta, fraction, seed) only
    assert held != D.select_heldout_tasks(meta, 0.25, 1) or held != D.select_heldout_tasks(meta, 0.25, 2)
    # never more than n - 2 per group: the encoders still train on every group
    assert sorted(by_group[D.select_heldout_tasks(meta, 0.9, 0)]) == ["a", "a", "b", "b"]
    assert D.select_heldout_tasks(meta, 0.0, 0) == []


@pytest.mark.parametrize("recipe", D.VIEW_RECIPES)
def test_positive_pairs_follow_the_recipe(zoo, recipe):
    _, meta = zoo
    idx = np.arange(len(meta))
    pairs = D.PositivePairs(meta, idx, recipe)
    rng = np.random.default_rng(0)
    for pos in range(0, len(meta), 5):
        q = pairs.sample(pos, rng)
        a, b = meta.iloc[pos], meta.iloc[q]
        if recipe in ("symmetry", "noise"):
            assert q == pos
        elif recipe == "checkpoint":
            assert q != pos and a.run_id == b.run_id
        elif recipe == "seed":  # same configuration and epoch, another run (another seed)
            assert a.run_id != b.run_id and a.seed != b.seed and a.lr == b.lr and a.task == b.task
            assert a.epoch == b.epoch
        else:
            assert a.run_id != b.run_id and a.task == b.task
    assert pairs.n_self == (len(meta) if recipe in ("symmetry", "noise") else 0)


def test_seed_recipe_falls_back_to_task_and_architecture():
    meta = pd.DataFrame({"run_id": ["a", "b", "c"], "task": ["t", "t", "u"], "arch_id": ["x", "x", "x"],
                         "lr": [1.0, 2.0, 1.0], "weight_decay": 0.0, "init_scale": 1.0, "optimizer": "adam",
                         "batch_size": 8, "train_fraction": 1.0, "epoch": 1, "seed": [0, 1, 0]})
    pairs = D.PositivePairs(meta, [0, 1, 2], "seed")
    rng = np.random.default_rng(0)
    assert pairs.sample(0, rng) == 1 and pairs.sample(1, rng) == 0  # other lr, same task + arch
    assert pairs.sample(2, rng) == 2 and pairs.n_self == 1  # no partner at all: itself


def test_dataset_views_depend_only_on_seed_epoch_index(zoo):
    graphs, meta = zoo
    vocab = D.TaskVocab(sorted(meta["task"].unique()))
    view = D.make_view_fn("noise", SymmetryAugmenter(noise_std=0.1, edge_dropout=0.2))
    ds = D.ContrastivePairDataset(graphs, meta, np.arange(len(meta)), "checkpoint", view, seed=5, task_vocab=vocab)
    a1, a2, ma = ds[(2, 7)]
    b1, b2, mb = ds[(2, 7)]
    assert torch.equal(a1.edge_attr, b1.edge_attr) and torch.equal(a2.edge_attr, b2.edge_attr) and ma == mb
    c1, _, _ = ds[(3, 7)]
    assert not torch.equal(a1.edge_attr, c1.edge_attr)
    assert not torch.equal(a1.edge_attr, graphs[7].edge_attr)  # the view changed weights
    assert ma["index"] == 7 and ma["task"] == vocab.index[meta.task[7]]
    ds2 = D.ContrastivePairDataset(graphs, meta, np.arange(len(meta)), "checkpoint", view, seed=6, task_vocab=vocab)
    assert not torch.equal(ds2[(2, 7)][0].edge_attr, a1.edge_attr)


def test_symmetry_recipe_changes_no_weight_values(zoo):
    graphs, _ = zoo
    view = D.make_view_fn("symmetry", SymmetryAugmenter(noise_std=0.5, edge_dropout=0.5, prune_fraction=0.5))
    g = torch.Generator().manual_seed(0)
    v = view(graphs[0], g)
    # only a relabelling of hidden neurons: the multiset of weights and biases is unchanged
    assert torch.equal(v.edge_attr.flatten().sort().values, graphs[0].edge_attr.flatten().sort().values)
    assert torch.equal(v.x.flatten().sort().values, graphs[0].x.flatten().sort().values)
    with pytest.raises(ValueError, match="needs a SymmetryAugmenter"):
        D.make_view_fn("noise", None)
    assert D.make_view_fn("supcon", None) is None
    with pytest.raises(ValueError, match="unknown view recipe"):
        D.make_view_fn("mixup", None)


def test_task_vocab_refuses_heldout_labels(zoo):
    graphs, meta = zoo
    with pytest.raises(AssertionError, match="held-out"):
        D.TaskVocab(["task0", "task1"], heldout_tasks=["task1"])
    vocab = D.TaskVocab(["task0", "task2"], heldout_tasks=["task1"])
    with pytest.raises(ValueError, match="never enter training"):
        vocab.encode(["task0", "task1"])
    idx = np.flatnonzero(meta["task"].isin(["task0", "task1"]))
    with pytest.raises(ValueError, match="never enter training"):
        D.ContrastivePairDataset(graphs, meta, idx, "supcon", None, 0, vocab)


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_sampler_global_batches_match_single_process(world):
    n, b = 23, 2
    single = [i for _, i in D.ShardedSampler(n, True, seed=1, tail="drop")]
    shards = []
    for r in range(world):
        s = D.ShardedSampler(n, True, seed=1, rank=r, world_size=world, tail="drop")
        s.set_epoch(0)
        shards.append([i for _, i in s])
        assert len(shards[-1]) == len(s) == n // world
    nb = (n // world) // b
    for k in range(nb):  # the k-th global batch holds the same models as a single-process batch of b*world
        ddp_batch = sorted(i for sh in shards for i in sh[k * b:(k + 1) * b])
        assert ddp_batch == sorted(single[k * b * world:(k + 1) * b * world])
    s = D.ShardedSampler(n, True, seed=1)
    s.set_epoch(1)
    e1 = [i for _, i in s]
    assert sorted(e1) == list(range(n)) and e1 != single
    assert {e for e, _ in s} == {1}
    # "none": every item exactly once over the ranks; "pad": equal shards
    none = [i for r in range(world) for _, i in D.ShardedSampler(n, False, rank=r, world_size=world, tail="none")]
    assert sorted(none) == list(range(n))
    pads = [len(list(D.ShardedSampler(n, False, rank=r, world_size=world, tail="pad"))) for r in range(world)]
    assert len(set(pads)) == 1 and pads[0] * world >= n


def test_build_loaders_batches_and_errors(zoo):
    graphs, meta = zoo
    split = D.split_by_run(meta, 0.2, 0.0, heldout_tasks=["task3"], seed=0)
    loaders = D.build_loaders(graphs, meta, split, "checkpoint", 8, None, seed=0, rank=1, world_size=2)
    v1, v2, m = next(iter(loaders.train))
    assert isinstance(v1, Batch) and v1.num_graphs == 4 and v2.num_graphs == 4
    assert set(m) == {"index", "task", "family", "test_acc"} and m["task"].dtype == torch.long
    assert loaders.task_vocab.tasks == ["task0", "task1", "task2"]
    assert loaders.info["n_train"] == len(split.train) and loaders.info["train_anchors_without_partner"] == 0
    # flat-weight encoders: tensors are stacked
    flat = D.build_loaders(graphs, meta, split, "supcon", 6, None, 0, transform=lambda d: d.edge_attr.flatten())
    x1, x2, _ = next(iter(flat.train))
    assert x1.shape == (6, graphs[0].edge_attr.numel())
    with pytest.raises(ValueError, match="not divisible"):
        D.build_loaders(graphs, meta, split, "checkpoint", 9, None, 0, world_size=2)
    with pytest.raises(ValueError, match="fewer than one batch"):
        D.build_loaders(graphs, meta, split, "checkpoint", 10_000, None, 0)
    with pytest.raises(ValueError, match="unknown view recipe"):
        D.build_loaders(graphs, meta, split, "mixup", 8, None, 0)
    with pytest.raises(TypeError, match="cannot batch"):
        D.collate_views(["a", "b"])


def test_train_config_choices_match_the_library():
    import dataclasses

    import contrastive_learning as C
    from config import TrainConfig

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert tuple(fields["view_recipe"].metadata["choices"]) == D.VIEW_RECIPES
    assert tuple(fields["weak_targets"].metadata["choices"]) == C.WEAK_TARGETS
    assert set(TrainConfig().compare_recipes) <= set(D.VIEW_RECIPES)
    assert TrainConfig().view_recipe in D.VIEW_RECIPES


@pytest.mark.parametrize("world", [1, 2])
def test_grouped_batches_stay_within_one_group_and_shard(world):
    groups = np.array(["a"] * 10 + ["b"] * 7 + ["c"] * 3)
    samplers = [D.GroupedBatchSampler(groups, 4, seed=5, rank=r, world_size=world) for r in range(world)]
    for s in samplers:
        s.set_epoch(2)
    per_rank = [list(s) for s in samplers]
    assert len({len(p) for p in per_rank}) == 1 and len(per_rank[0]) == len(samplers[0])
    batches = [sorted(i for p in per_rank for _, i in p[k]) for k in range(len(per_rank[0]))]
    for b in batches:
        assert len(set(groups[b])) == 1  # one group per global batch
    sizes = sorted(len(b) for b in batches)
    # a: 2 full batches (tail of 2 dropped), b: 1 (tail of 3 dropped), c: no full batch -> one batch of its 3
    # models alone, or none with 2 ranks (1 model per rank is below the 2 a contrastive batch needs)
    assert sizes == ([3, 4, 4, 4] if world == 1 else [4, 4, 4])
    assert all(e == 2 for p in per_rank for batch in p for e, _ in batch)
    again = D.GroupedBatchSampler(groups, 4, seed=5, rank=0, world_size=world)
    again.set_epoch(2)
    assert list(again) == per_rank[0]
    again.set_epoch(3)
    assert list(again) != per_rank[0]


def test_training_batches_can_be_drawn_within_one_shape_group(zoo):
    graphs, meta = zoo
    split = D.split_by_run(meta, 0.2, 0.2, heldout_tasks=["task1"], seed=3)
    groups = np.where(meta["task"].to_numpy() == "task0", "g0", "g1")  # task0 alone in its group
    loaders = D.build_loaders(graphs, meta.assign(shape_group=groups), split, "supcon", 4, None, 0,
                              batch_within="shape_group")
    assert loaders.info["batch_within"] == "shape_group"
    for v1, _, m in loaders.train:
        assert v1.num_graphs == 4 and len(set(groups[m["index"].numpy()])) == 1
