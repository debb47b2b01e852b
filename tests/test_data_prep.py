"""Zoo: task registry, zoo generation, storage, sharding, user checkpoints (stacked training: test_zoo_training.py)."""
from __future__ import annotations

import json
import os
import logging
import pickle
from collections import Counter
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

import architecture as A
import baselines as B
import data_prep as D
import tasks as T
import zoo_plan as ZP
import zoo_training as ZT
from conftest import assert_accuracy_of

ROOT = Path(__file__).resolve().parents[1]
TINY_TASKS = ["digits", "digits_perm_a", "digits_rot90", "digits_parity", "digits_lt5", "iris", "iris_perm"]
CONTRACT_COLUMNS = ["model_id", "run_id", "task", "dataset", "task_family", "shape_group", "arch_id", "arch_name",
                    "arch_family", "activation", "num_params", "seed", "lr", "weight_decay", "init_scale",
                    "optimizer", "batch_size", "train_fraction", "epoch", "is_final", "train_acc", "test_acc",
                    "train_loss", "test_loss", "gen_gap", "model_card"]


# ---------------------------------------------------------------- a tiny real zoo

@pytest.fixture(scope="module")
def tiny_zoo_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("zoo") / "tiny"
    D.ModelZooDataset.create_synthetic_model_zoo(d, num_models=48, epochs=6, checkpoints_per_run=2,
                                                 card_task_fraction=0.5, seed=3, group_size=8, cnn_fraction=0.25,
                                                 tasks=TINY_TASKS)
    return d


def test_tiny_zoo_trains_and_has_contract_columns(tiny_zoo_dir):
    zoo = D.ModelZooDataset.load(tiny_zoo_dir)
    m = zoo.metadata
    assert len(zoo) == 48 and m["model_id"].is_unique
    assert [c for c in CONTRACT_COLUMNS if c not in m.columns] == []
    assert m["is_final"].dtype == bool and set(m["epoch"]) == {1, 6}
    final = m[m["is_final"]]
    chance = 1.0 / final["shape_group"].str.extract(r"out(\d+)")[0].astype(int)
    mlp = final["arch_family"].str.startswith("mlp")
    assert (final["test_acc"] > 1.5 * chance)[mlp].mean() > 0.8, final[["arch_name", "task", "test_acc"]]
    assert (final["test_acc"] - chance)[~mlp].mean() > 0.1, final[["arch_name", "task", "test_acc"]]  # 6 epochs
    early = m[~m["is_final"]].set_index("run_id")["train_loss"]
    assert (final.set_index("run_id")["train_loss"] < early).mean() > 0.8  # loss falls from early to final
    np.testing.assert_allclose(m["gen_gap"], m["train_acc"] - m["test_acc"], atol=1e-9)
    assert set(m["optimizer"]) == {"adam", "sgd"} and m["lr"].nunique() == m["run_id"].nunique()
    assert m["arch_family"].str.startswith("cnn").any() and m["arch_family"].str.startswith("mlp").any()
    named = final.apply(lambda r: f"Task: {r['task']} " in r["model_card"], axis=1)
    assert 0 < named.sum() < len(final)
    # the stored weights are the evaluated model: recompute one test accuracy
    i = int(np.flatnonzero(m["is_final"])[0])
    model = zoo[i]
    _, _, Xte, yte = T.load_task_data(model.meta["task"])
    assert_accuracy_of(A.forward(model.spec, model.state_dict, T.inputs_for_spec(model.spec, Xte)), yte,
                       model.meta["test_acc"])


def test_storage_roundtrip_subset_and_reuse(tiny_zoo_dir, tmp_path, monkeypatch):
    zoo = D.ModelZooDataset.load(tiny_zoo_dir)
    zoo.save(tmp_path / "copy")
    again = D.ModelZooDataset.load(tmp_path / "copy")
    assert again.version == zoo.version and len(again) == len(zoo)
    pd.testing.assert_frame_equal(again.metadata, zoo.metadata)
    for i in (0, len(zoo) - 1):
        assert again.spec(i) == zoo.spec(i)
        for k, v in zoo.state_dict(i).items():
            assert torch.equal(again.state_dict(i)[k], v)
    sub = zoo.subset([5, 1, 3])
    assert len(sub) == 3 and sub[0].model_id == zoo[5].model_id and sub.version != zoo.version
    assert torch.equal(sub.state_dict(1)["layers.0.weight"], zoo.state_dict(1)["layers.0.weight"])
    # same generation args -> loaded from disk, not retrained
    monkeypatch.setattr(ZP, "train_group", lambda *a, **k: pytest.fail("retrained a zoo that was on disk"))
    reused = D.ModelZooDataset.create_synthetic_model_zoo(tiny_zoo_dir, num_models=48, epochs=6,
                                                          checkpoints_per_run=2, card_task_fraction=0.5, seed=3,
                                                          group_size=8, cnn_fraction=0.25, tasks=TINY_TASKS)
    assert reused.version == zoo.version


def test_load_rejects_broken_zoo(tiny_zoo_dir, tmp_path):
    import shutil

    d = tmp_path / "broken"
    shutil.copytree(tiny_zoo_dir, d)
    shard = sorted(d.glob("weights-*.safetensors"))[0]
    with open(shard, "r+b") as f:  # truncate
        f.truncate(shard.stat().st_size // 2)
    with pytest.raises(D.ZooError, match=f"{shard.name}.*truncated"):
        D.ModelZooDataset.load(d)
    shard.unlink()
    with pytest.raises(D.ZooError, match=f"{shard.name}: weight shard missing"):
        D.ModelZooDataset.load(d)
    shutil.rmtree(d)
    shutil.copytree(tiny_zoo_dir, d)
    specs = json.loads((d / "specs.json").read_text())
    arch = next(iter(specs))
    specs[arch]["layers"][-1]["out_dim"] += 1  # the spec no longer fits the stored weights
    specs[arch]["layers"][-1]["in_dim"] = specs[arch]["layers"][-2]["out_dim"]
    (d / "specs.json").write_text(json.dumps(specs))
    with pytest.raises(D.ZooError, match=r"weights-\d+\.safetensors: .*layers\.\d\.(weight|bias) has shape"):
        D.ModelZooDataset.load(d)
    (d / "zoo.json").unlink()
    with pytest.raises(D.ZooError, match="zoo.json: missing"):
        D.ModelZooDataset.load(d)


def test_sharded_generation_merges_to_the_same_zoo(tmp_path):
    kw = dict(num_models=24, epochs=2, checkpoints_per_run=2, seed=5, group_size=4, cnn_fraction=0.0,
              tasks=["iris", "iris_perm", "wine"])
    full = D.ModelZooDataset.create_synthetic_model_zoo(tmp_path / "full", **kw)
    for i in range(2):
        D.ModelZooDataset.create_synthetic_model_zoo(tmp_path / f"part{i}", shard=(i, 2), **kw)
    with pytest.raises(D.ZooError, match="do not cover"):
        D.merge_zoos([tmp_path / "part0", tmp_path / "part0"], tmp_path / "bad")
    merged = D.merge_zoos([tmp_path / "part1", tmp_path / "part0"], tmp_path / "merged")
    assert len(D.ModelZooDataset.load(tmp_path / "part0")) < len(full)
    assert merged.metadata["model_id"].tolist() == full.metadata["model_id"].tolist()
    assert D.ModelZooDataset.load(tmp_path / "merged").version == full.version


def test_worker_processes_make_the_same_zoo(tmp_path):
    # groups trained in forkserver worker processes give exactly the zoo trained in-process
    kw = dict(num_models=16, epochs=2, checkpoints_per_run=2, seed=3, group_size=4, cnn_fraction=0.0,
              tasks=["iris", "iris_perm", "wine"], min_groups=2, reuse=False)
    inproc = D.ModelZooDataset.create_synthetic_model_zoo(tmp_path / "w1", workers=1, **kw)
    pooled = D.ModelZooDataset.create_synthetic_model_zoo(tmp_path / "w2", workers=2, **kw)
    assert inproc.metadata["group_index"].nunique() >= 2
    pd.testing.assert_frame_equal(inproc.metadata, pooled.metadata)
    for i in range(len(inproc)):
        for k, v in inproc.state_dict(i).items():
            assert torch.equal(v, pooled.state_dict(i)[k]), (i, k)


def test_default_plan_gives_every_task_enough_runs_for_the_metrics():
    """P@10 (relevant = same task, the query's own run excluded) can reach 1 only with (runs - 1) x checkpoints
    >= 10 same-task models; the within-task Kendall tau needs >= 5 final checkpoints of a task."""
    import config

    for cfg in (config.ExperimentConfig(), config.parse_args(["--small"])):
        z = cfg.zoo
        tasks = T.task_subset(z.zoo_tasks) if z.zoo_tasks else list(T.TASKS)
        runs = z.runs_per_task * z.zoo_scale
        assert (runs - 1) * z.checkpoints_per_run >= 10 and runs >= cfg.eval.within_task_min_models
        assert len(ZP.checkpoint_schedule(z.zoo_epochs, z.checkpoints_per_run)) == z.checkpoints_per_run
        plans = ZP.plan_zoo(runs * len(tasks), z.zoo_seed, z.zoo_group_size, z.cnn_fraction, z.card_task_fraction,
                            tasks, D.DEFAULT_MIN_GROUPS, z.cnn_bn_fraction, z.resnet_fraction)
        per_task = Counter(r.task for p in plans for r in p.runs)
        assert per_task == {t: runs for t in tasks}
        fams = Counter(p.family for p in plans for _ in p.runs)
        assert abs(fams["cnn"] / sum(fams.values()) - z.cnn_fraction) < 0.01 and fams["cnn-bn"] and fams["resnet"]
        for p in plans:  # a group is one shape group and one architecture that fits it
            assert {T.get_task(r.task).shape_group for r in p.runs} == {p.shape_group}
            assert p.spec.num_outputs == T.get_task(p.runs[0].task).num_classes
    assert (D.DEFAULT_ZOO_EPOCHS, D.DEFAULT_CHECKPOINTS_PER_RUN, ZP.DEFAULT_RUNS_PER_TASK) == (
        config.ZooConfig().zoo_epochs, config.ZooConfig().checkpoints_per_run, config.ZooConfig().runs_per_task)
    # --zoo_scale 9: 30k+ checkpoints, every task equally, in groups the shards split evenly
    big = ZP.plan_zoo(9 * ZP.DEFAULT_RUNS_PER_TASK * len(T.TASKS))
    assert 2 * sum(len(p.runs) for p in big) >= 30_000
    assert set(Counter(r.task for p in big for r in p.runs).values()) == {9 * ZP.DEFAULT_RUNS_PER_TASK}
    shard_runs = [sum(len(p.runs) for p in big if p.group_index % 8 == i) for i in range(8)]
    assert max(shard_runs) < 1.5 * min(shard_runs)


def test_plan_spreads_runs_evenly_and_refuses_impossible_mixes():
    plans = ZP.plan_zoo(23, seed=1, group_size=4, cnn_fraction=0.25, tasks=TINY_TASKS)
    per_task = Counter(r.task for p in plans for r in p.runs)
    assert sorted(per_task) == sorted(T.canonical_name(t) for t in TINY_TASKS) and set(per_task.values()) == {3, 4}
    assert sum(len(p.runs) for p in plans if p.family == "cnn") == 6  # 25 % of 23, on the 8x8 image tasks
    with pytest.raises(ValueError, match="more CNN runs than the image tasks"):
        ZP.plan_zoo(20, tasks=["digits", "iris"], cnn_fraction=0.6)
    with pytest.raises(T.TaskNameError, match="digits\+rot45"):
        ZP.plan_zoo(8, tasks=["digits+rot45"])
    with pytest.raises(ValueError, match="num_models or runs_per_task, not both"):
        D.ModelZooDataset.create_synthetic_model_zoo(None, num_models=8, runs_per_task=2, tasks=["iris"])


def test_cli_generate_and_info(tmp_path, capsys):
    out = tmp_path / "cli_zoo"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "data_prep.py"), "generate", "--out", str(out), "--num_models", "8",
           "--epochs", "2", "--checkpoints_per_run", "1", "--group_size", "4", "--tasks", "iris,wine"]
    r = subprocess.run(cmd, check=True, env=env, capture_output=True, text=True, timeout=120)
    assert "ModelZooDataset(8 models" in r.stdout
    D.main(["info", str(out)])
    assert "iris/original" in capsys.readouterr().out



def test_cli_zoo_with_default_flags_is_the_one_the_experiment_reuses(tmp_path, caplog):
    """A zoo trained with ``data_prep.py generate`` (e.g. in shards on a cluster) must not be regenerated by
    run_experiment: the CLI's defaults are the experiment config's (it made model cards naming the task for
    half the runs, and the run then retrained the whole zoo)."""
    import stages
    from config import config_from_dict
    from report import RunRecorder
    from runtime import single_process

    out = tmp_path / "zoo"
    D.main(["generate", "--out", str(out), "--num_tasks", "2", "--runs_per_task", "1", "--epochs", "1",
            "--checkpoints_per_run", "1"])
    made = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}
    cfg = config_from_dict({"zoo": {"zoo_dir": str(out), "zoo_tasks": 2, "runs_per_task": 1, "zoo_epochs": 1,
                                    "checkpoints_per_run": 1, "zoo_workers": 1}})
    with caplog.at_level(logging.INFO, logger="weightzoo"):
        zoo = stages.make_zoo(cfg, single_process(), RunRecorder(str(tmp_path / "run"), {}, write=False))
    assert "reusing zoo" in caplog.text and "regenerating" not in caplog.text
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == made
    assert B.card_task_fraction(zoo.metadata) == 0.0  # no card names its task, as configured

# ---------------------------------------------------------------- user checkpoints

@pytest.fixture(scope="module")
def two_trained(digits_data):
    """Two of conftest's trained families (an MLP and a CNN), trained on one thread (fast on a busy machine)."""
    from conftest import FAMILY_SPECS, train_small

    X, y = digits_data
    out = {}
    with ZT.single_thread():
        for i, name in enumerate(["mlp2_leaky", "cnn2_relu_k3"]):
            spec = FAMILY_SPECS[name]
            Xi = X.view(-1, 1, 8, 8) if spec.is_cnn else X
            sd = train_small(spec, Xi, y, seed=i, epochs=60)
            assert (A.forward(spec, sd, Xi).argmax(1) == y).float().mean() > 0.5, f"{name} did not train"
            out[name] = (spec, sd)
    return out


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _sequential_mlp() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10))


def _write_checkpoints(folder: Path, trained_models) -> dict[str, str]:
    """Good and bad files; returns bad file name -> expected cause (regex)."""
    folder.mkdir()
    spec, sd = trained_models["mlp2_leaky"]
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "good_zoo_keys.safetensors"))
    (folder / "good_zoo_keys.safetensors.spec.json").write_text(json.dumps(spec.to_dict()))
    torch.save(_sequential_mlp().state_dict(), folder / "good_seq.pt")
    (folder / "good_seq.pt.spec.json").write_text(json.dumps({"activation": "tanh", "task": "digits"}))
    cspec, csd = trained_models["cnn2_relu_k3"]
    torch.save({"state_dict": {f"net.{2 * int(k.split('.')[1])}.{k.split('.')[2]}": v for k, v in csd.items()},
                "epoch": 7}, folder / "good_nested_cnn.pth")  # no sidecar: relu + 8x8 assumed, with warnings

    bad = {}
    raw = (folder / "good_zoo_keys.safetensors").read_bytes()
    (folder / "bad_truncated.safetensors").write_bytes(raw[: len(raw) // 2])
    bad["bad_truncated.safetensors"] = "truncated or corrupt"
    torch.save(_sequential_mlp().state_dict(), folder / "tmp.pt")
    raw = (folder / "tmp.pt").read_bytes()
    (folder / "tmp.pt").unlink()
    (folder / "bad_truncated.pt").write_bytes(raw[: len(raw) // 2])
    bad["bad_truncated.pt"] = "truncated or corrupt"
    (folder / "bad_text.pt").write_text("this is not a checkpoint\n" * 20)
    bad["bad_text.pt"] = "(truncated or corrupt|refused)"
    marker = folder.parent / "PWNED"
    (folder / "bad_pickle_code.pt").write_bytes(pickle.dumps({"layer.weight": _Evil(marker)}))
    bad["bad_pickle_code.pt"] = "refused"
    torch.save({"w": _Evil(marker)}, folder / "bad_torch_code.pth")  # zip format with a code global
    bad["bad_torch_code.pth"] = "refused"
    nan_sd = _sequential_mlp().state_dict()
    nan_sd["2.weight"][0, 0] = float("nan")
    torch.save(nan_sd, folder / "bad_nan.pt")
    bad["bad_nan.pt"] = r"layers\.1\.weight contains NaN or Inf"
    inf_sd = {k: v.clone() for k, v in sd.items()}
    inf_sd["layers.0.bias"][1] = float("inf")
    save_file(inf_sd, str(folder / "bad_inf.safetensors"))
    bad["bad_inf.safetensors"] = r"layers\.0\.bias contains NaN or Inf"
    ln = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    torch.save(ln.state_dict(), folder / "bad_layernorm.pt")  # BatchNorm is folded (tests/test_wild_checkpoints.py)
    bad["bad_layernorm.pt"] = "normalization without running statistics"
    torch.save({"0.weight": torch.zeros(3, 4, 5), "0.bias": torch.zeros(3)}, folder / "bad_conv1d.pt")
    bad["bad_conv1d.pt"] = "0.weight has 3 dims; unsupported layer"
    torch.save({"0.weight": torch.zeros(8, 4), "0.bias": torch.zeros(8), "2.weight": torch.zeros(2, 9),
                "2.bias": torch.zeros(2)}, folder / "bad_shapes.pt")
    bad["bad_shapes.pt"] = "2.weight takes 9 inputs but 0 gives 8"
    (folder / "bad_empty.pt").write_bytes(b"")
    bad["bad_empty.pt"] = "empty file"
    torch.save({}, folder / "bad_empty_dict.pt")
    bad["bad_empty_dict.pt"] = "empty state_dict"
    save_file({"x": torch.zeros(1)}, str(folder / "bad_notweights.safetensors"))
    bad["bad_notweights.safetensors"] = "unsupported entry 'x'"
    return bad


def test_from_checkpoints_loads_good_and_reports_each_bad_file(tmp_path, two_trained, model_inputs):
    trained_models = two_trained
    folder = tmp_path / "ckpts"
    bad = _write_checkpoints(folder, trained_models)
    zoo, errors = D.ModelZooDataset.from_checkpoints(folder)
    assert not (tmp_path / "PWNED").exists(), "code in a checkpoint was executed"
    by_file = {Path(e.file).name: e for e in errors}
    assert len(errors) == len(by_file) == len(bad), [str(e) for e in errors]
    for name, cause in bad.items():
        e = by_file[name]
        assert str(folder / name) in str(e)
        assert __import__("re").search(cause, e.cause), f"{name}: {e.cause}"
    assert sorted(zoo.metadata["model_id"]) == ["good_nested_cnn.pth", "good_seq.pt", "good_zoo_keys.safetensors"]
    # each loaded model computes what the original network computes
    spec, sd = trained_models["mlp2_leaky"]
    i = zoo.metadata.index[zoo.metadata["model_id"] == "good_zoo_keys.safetensors"][0]
    x = model_inputs(spec)
    assert zoo.spec(i) == spec and torch.allclose(A.forward(zoo.spec(i), zoo.state_dict(i), x), A.forward(spec, sd, x))
    i = zoo.metadata.index[zoo.metadata["model_id"] == "good_seq.pt"][0]
    net = _sequential_mlp()
    x = torch.randn(5, 64)
    assert zoo.spec(i).layers[0].activation == "tanh" and zoo.metadata.loc[i, "task"] == "digits"
    assert torch.allclose(A.forward(zoo.spec(i), zoo.state_dict(i), x), net(x), atol=1e-6)
    i = zoo.metadata.index[zoo.metadata["model_id"] == "good_nested_cnn.pth"][0]
    cspec, csd = trained_models["cnn2_relu_k3"]
    assert zoo.spec(i) == cspec and "relu assumed" in zoo.metadata.loc[i, "load_warning"]
    x = model_inputs(cspec)
    assert torch.allclose(A.forward(zoo.spec(i), zoo.state_dict(i), x), A.forward(cspec, csd, x))
    assert len(zoo.version) == 64


def test_from_checkpoints_reports_links_and_follows_only_links_inside(tmp_path, two_trained):
    """A link is not loaded by default (it is reported); with follow_symlinks a link inside the folder is,
    and one leading outside it is still reported, never read."""
    spec, sd = two_trained["mlp2_leaky"]
    outside, folder = tmp_path / "outside", tmp_path / "ckpts"
    for d in (outside, folder / "sub"):
        d.mkdir(parents=True)
    for d in (outside, folder):
        save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "m.safetensors"))
        (d / "m.safetensors.spec.json").write_text(json.dumps(spec.to_dict()))
    (folder / "sub" / "out.safetensors").symlink_to(outside / "m.safetensors")
    (folder / "sub" / "in.safetensors").symlink_to(folder / "m.safetensors")
    zoo, errors = D.ModelZooDataset.from_checkpoints(folder)
    assert list(zoo.metadata["model_id"]) == ["m.safetensors"]
    assert sorted(Path(e.file).name for e in errors) == ["in.safetensors", "out.safetensors"]
    zoo, errors = D.ModelZooDataset.from_checkpoints(folder, follow_symlinks=True)
    assert sorted(zoo.metadata["model_id"]) == ["m.safetensors", "sub/in.safetensors"]
    assert [Path(e.file).name for e in errors] == ["out.safetensors"] and "outside" in errors[0].cause
    zoo, errors = D.ModelZooDataset.from_checkpoints(folder, recursive=False)
    assert list(zoo.metadata["model_id"]) == ["m.safetensors"] and errors == []
