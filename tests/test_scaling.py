"""The scaling experiment: the numbers of tasks, the restricted splits, the run on a tiny real zoo, the report."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import config
import dataloader as D
import report
import scaling as SC
from data_prep import ModelZooDataset
from runtime import single_process
from weight_to_graph import WeightToGraph

# two shape groups of 4 tasks: one held out of each per seed, 6 seen tasks
TASKS = ["digits", "digits+rot90", "digits+perm3709158264", "digits+shiftr1+invert", "iris", "iris+perm120",
         "iris+featperm1", "iris+invert"]


def test_task_counts_read_zero_as_all_and_cap():
    assert SC.task_counts([8, 32, 128, 0], 231) == [8, 32, 128, 231]
    assert SC.task_counts([0, 500, 4], 10) == [4, 10]
    with pytest.raises(ValueError, match="non-negative"):
        SC.task_counts([-1], 10)


def test_summary_keeps_the_sizes_every_seed_trained():
    """Seeds hold out different unseen kinds, so "all" is another number of tasks per seed, and a requested size
    at or above one seed's seen tasks is that seed's "all": only the sizes every seed has are averaged."""
    def curve(n):
        return {"P@1": n / 100, "P@10": n / 100, "mAP": n / 100, "train_tasks": n}

    per_seed = {"1": {"curves": {"m": {"8": curve(8), "96": curve(96), "all": curve(120)}}, "flat": {}},
                "2": {"curves": {"m": {"8": curve(8), "all": curve(90)}}, "flat": {}}}
    s = SC.summarize(per_seed)["m"]
    assert s["sizes"] == ["8", "all"] and s["n"] == [8.0, 105.0]
    assert s["P@10"]["mean"] == pytest.approx([0.08, 1.05])


def test_restrict_split_keeps_the_queries():
    meta = pd.DataFrame({"task": ["a", "a", "b", "b", "c", "c", "d", "d"], "run_id": [f"r{i // 2}{i}" for i in range(8)]})
    split = D.Split(np.array([0, 2, 4]), np.array([1, 3]), np.array([5]), np.array([6, 7]), test_unseen_tasks=("d",))
    sub = SC.restrict_split(split, meta, ["a", "c"])
    assert sub.train.tolist() == [0, 4] and sub.val.tolist() == []  # the last epoch is kept
    assert sub.test.tolist() == [5] and sub.test_unseen.tolist() == [6, 7] and sub.heldout_tasks == ("d",)


@pytest.fixture(scope="module")
def scaling_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("scaling")
    zoo = ModelZooDataset.create_synthetic_model_zoo(d / "zoo", runs_per_task=4, epochs=4, checkpoints_per_run=2,
                                                     seed=1, group_size=8, cnn_fraction=0.0, cnn_bn_fraction=0.0,
                                                     resnet_fraction=0.0, tasks=TASKS)
    cfg = config.config_from_dict({
        "encoder": {"hidden_dim": 16, "global_dim": 16, "projection_dim": 8, "message_passing_steps": 1},
        "train": {"epochs": 3, "batch_size": 16, "val_fraction": 0.5, "test_fraction": 0.0},
        "eval": {"eval_seeds": 2, "methods": ["input_profile"], "scaling_tasks": [2, 0], "scaling_recipes": ["supcon"],
                 "val_unseen_task_fraction": 0.0, "unseen_kind": "",
                 "scaling_epochs": 1}})
    graphs = WeightToGraph.from_config(cfg.graph).convert_model_to_graphs(zoo)
    rec = report.RunRecorder(d / "run", {"config": cfg.to_dict()}, write=False)
    out = SC.run_scaling(cfg, zoo, graphs, single_process("cpu"), rec)
    return zoo, out, rec


def test_scaling_run_holds_the_queries_and_grows_nested_training_sets(scaling_run):
    zoo, out, _ = scaling_run
    meta = zoo.metadata
    assert list(out["per_seed"]) == ["42", "43"]
    for seed, s in out["per_seed"].items():
        assert len(s["heldout_tasks"]) == 2 and s["n_seen_tasks"] == 6
        small, full = s["train_tasks"]["2"], s["train_tasks"]["all"]
        assert full[:2] == small and sorted(full) == sorted(set(meta["task"]) - set(s["heldout_tasks"]))
        assert {zoo.metadata["shape_group"][meta["task"] == t].iloc[0] for t in small} == {"in64-out10", "in4-out3"}
        curve = s["curves"]["gnn [supcon]"]
        assert curve["2"]["train_models"] < curve["all"]["train_models"]
        # equal optimizer steps: fewer training models, more epochs (a batch no larger than the training set)
        assert s["epochs"]["all"] == 1 and s["batch_size"]["all"] == 16 and s["steps"]["all"] == curve["all"]["train_models"] // 16
        assert s["batch_size"]["2"] == min(16, curve["2"]["train_models"]) and s["steps"]["2"] >= s["steps"]["all"]
        assert s["steps"]["2"] - s["steps"]["all"] < curve["2"]["train_models"] // s["batch_size"]["2"]  # one epoch
        for v in [*curve.values(), *s["flat"].values()]:
            assert 0 <= v["P@10"] <= 1 and 0 <= v["P@1"] <= 1
        assert set(s["flat"]) == {"gnn [untrained]", "input_profile", "constant", "shape_only", "random (chance)"}
    summary = out["summary"]
    assert summary["gnn [supcon]"]["sizes"] == ["2", "all"] and summary["gnn [supcon]"]["n"] == [2.0, 6.0]
    assert not summary["gnn [supcon]"]["flat"]
    p = [out["per_seed"][s]["curves"]["gnn [supcon]"]["all"]["P@10"] for s in ("42", "43")]
    assert summary["gnn [supcon]"]["P@10"]["mean"][1] == pytest.approx(np.mean(p))
    assert summary["input_profile"]["flat"] and summary["input_profile"]["P@10"]["std"] >= 0


def test_scaling_report_table_and_figure_come_from_the_json(scaling_run, tmp_path):
    _, out, rec = scaling_run
    results = json.loads(json.dumps(rec.results))  # as written to results.json
    figs = report.render_figures(results, tmp_path)
    assert (tmp_path / "scaling.png").is_file() and figs["scaling"] == str(tmp_path / "scaling.png")
    results["figures"] = {"scaling": "figures/scaling.png"}
    md = report.render_markdown(results)
    assert f"## {report.SCALING_HEADING}" in md and "![scaling](figures/scaling.png)" in md
    assert "its result is the scaling table above" in md.split("## Analysis")[1]  # not "no metric was produced"
    row = next(line for line in md.splitlines() if line.startswith("| gnn [supcon]"))
    p = out["summary"]["gnn [supcon]"]["P@10"]
    assert f"{p['mean'][0]:.3f} ± {p['std'][0]:.3f}" in row and f"{p['mean'][1]:.3f} ± {p['std'][1]:.3f}" in row


def test_experiment_flag_names_its_results_folder():
    assert config.parse_args(["--experiment", "scaling"]).experiment_name == "scaling"
    assert config.parse_args(["--experiment", "scaling", "--small"]).experiment_name == "small_scaling"
    assert config.parse_args(["--experiment", "scaling", "--experiment_name", "mine"]).experiment_name == "mine"
    assert config.parse_args([]).experiment == "main"
