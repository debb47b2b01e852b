"""NT-Xent against hand-computed references, the training loop, resume after SIGKILL, recipes."""
from __future__ import annotations

import dataclasses
import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import contrastive_learning as C
import dataloader as D
import runtime
from config import TrainConfig
import ddp_worker
from ddp_worker import FlatMLP, StandInGNN, make_toy_zoo
from symmetry import SymmetryAugmenter

WORKER = Path(__file__).resolve().parent / "ddp_worker.py"
ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- the loss
def reference_loss(z1, z2, tau, labels=None, families=None, beta=0.0):
    """Loop over anchors, straight from the formula in NTXentLoss's docstring."""
    z = [v / np.linalg.norm(v) for v in np.concatenate([z1, z2])]
    n, b = len(z), len(z1)
    lab = None if labels is None else list(labels) * 2
    fam = None if families is None else list(families) * 2
    total = 0.0
    for a in range(n):
        s = {k: float(z[a] @ z[k]) / tau for k in range(n) if k != a}
        pos = [k for k in s if k == (a + b) % n or (lab is not None and lab[k] == lab[a])]
        neg = [k for k in s if k not in pos]
        w = {k: 1.0 for k in neg}
        hard = [k for k in neg if fam is None or fam[k] != fam[a]]
        if beta > 0 and hard:
            m = np.mean([math.exp(beta * s[k]) for k in hard])
            for k in hard:
                w[k] = math.exp(beta * s[k]) / m
        denom = sum(math.exp(s[p]) for p in pos) + sum(w[k] * math.exp(s[k]) for k in neg)
        total += -np.mean([s[p] - math.log(denom) for p in pos])
    return total / n


def test_ntxent_hand_computed_value():
    # two orthogonal models, identical views, tau = 1: each anchor sees its positive at
    # similarity 1 and two negatives at 0, so the loss is -log(e / (e + 2)) = log(1 + 2/e)
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert C.NTXentLoss(1.0)(z, z.clone()).item() == pytest.approx(math.log(1 + 2 / math.e), abs=1e-6)


@pytest.mark.parametrize("case", ["plain", "supcon", "hard", "hard_families", "supcon_hard"])
def test_ntxent_matches_reference(case):
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    labels = torch.tensor([0, 1, 0, 2, 1]) if "supcon" in case else None
    fams = torch.tensor([0, 0, 1, 1, 0]) if case == "hard_families" else None
    beta = 0.7 if "hard" in case else 0.0
    got = C.NTXentLoss(0.5, hard_negative_beta=beta)(z1, z2, labels, fams).item()
    want = reference_loss(z1.numpy(), z2.numpy(), 0.5, None if labels is None else labels.tolist(),
                          None if fams is None else fams.tolist(), beta)
    assert got == pytest.approx(want, rel=1e-5)
    if case == "plain":  # and the usual SimCLR cross-entropy formulation
        z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
        logits = (z @ z.T / 0.5).fill_diagonal_(-float("inf"))
        target = torch.cat([torch.arange(5, 10), torch.arange(5)])
        assert got == pytest.approx(torch.nn.functional.cross_entropy(logits, target).item(), rel=1e-5)


def test_ntxent_rewards_aligned_views_and_rejects_bad_settings():
    z = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    loss = C.NTXentLoss(0.1)
    assert loss(z, z).item() < loss(z, torch.randn(8, 4)).item()
    with pytest.raises(ValueError, match="temperature"):
        C.NTXentLoss(0.0)
    with pytest.raises(ValueError, match="hard_negative_beta"):
        C.NTXentLoss(0.1, hard_negative_beta=-1)
    with pytest.raises(ValueError, match="targets"):
        C.TaskHead(4, "loss", 3)


def test_heldout_labels_cannot_enter_training():
    learner = C.ContrastiveLearner(StandInGNN(), C.NTXentLoss(), supervised_positives=True, num_tasks=2)
    graphs, _ = make_toy_zoo(n_tasks=1, runs_per_task=2, ckpts=2)
    b = D.collate_views(graphs)
    meta = {"task": torch.tensor([0, 1, 2, 0]), "family": torch.zeros(4, dtype=torch.long)}  # 2: not a train task
    with pytest.raises(AssertionError, match="held-out task leaked"):
        learner(b, b, meta)


# ----------------------------------------------------------------------------- the loop
@pytest.fixture(scope="module")
def toy():
    graphs, meta = make_toy_zoo(n_tasks=4, runs_per_task=8, ckpts=2, seed=1)
    split = D.split_by_run(meta, 0.25, 0.0, heldout_tasks=["task3"], seed=0)
    return graphs, meta, split


def _framework(loaders, recipe, weak=0.0, config=None, encoder=None, lr=5e-3, seed=0, model_args=None):
    torch.manual_seed(0)
    fw = C.ContrastiveLearningFramework(encoder or StandInGNN(), C.NTXentLoss(0.2), torch.device("cpu"),
                                        supervised_positives=recipe == "supcon", weak_supervision=weak,
                                        num_tasks=len(loaders.task_vocab), seed=seed, model_args=model_args,
                                        config=config, show_progress=False)
    return fw, torch.optim.AdamW(fw.parameters(), lr=lr)


def test_training_lowers_loss_improves_retrieval_and_keeps_the_best(toy, tmp_path):
    graphs, meta, split = toy
    loaders = D.build_loaders(graphs, meta, split, "supcon", 16, D.make_view_fn("supcon", SymmetryAugmenter()), 0)
    fw, opt = _framework(loaders, "supcon", weak=0.5, lr=1e-2)
    val_fn = C.make_retrieval_val_fn(loaders.validation, torch.device("cpu"), k=3)
    history, best = fw.train(loaders.train, loaders.val, 8, opt, checkpoint_dir=tmp_path, val_fn=val_fn)
    assert history["train_loss"][-1] < history["train_loss"][0]
    assert history["train_task_loss"][0] > 0
    assert history["best_metric"] > history["initial_val_metric"], history
    i = int(np.argmax(history["val_metric"]))
    assert history["best_epoch"] == history["epoch"][i] and history["best_metric"] == history["val_metric"][i]
    # best_model holds the best epoch's weights: its val metric is the recorded best
    assert val_fn(best) == pytest.approx(history["best_metric"])
    saved = json.loads((tmp_path / C.HISTORY_NAME).read_text())
    assert saved["train_loss"] == history["train_loss"] and len(saved["epoch_time_s"]) == 8
    ckpt = C.load_checkpoint(tmp_path)
    assert ckpt["epoch"] == 8 and {"torch", "numpy", "python"} <= set(ckpt["rng"])


def test_same_loop_trains_flat_weight_encoders(toy):
    graphs, meta, split = toy
    flat = lambda d: d.edge_attr.flatten()  # noqa: E731
    loaders = D.build_loaders(graphs, meta, split, "supcon", 16, None, 0, transform=flat)
    enc = FlatMLP(graphs[0].edge_attr.numel())
    fw, opt = _framework(loaders, "supcon", encoder=enc)
    history, best = fw.train(loaders.train, loaders.val, 3, opt)
    assert history["metric_name"] == "-val_loss" and history["train_loss"][-1] < history["train_loss"][0]
    emb = C.embed(best, D.embed_loader(graphs, None, 5, transform=flat), torch.device("cpu"))
    with torch.no_grad():
        direct = best(torch.stack([flat(g) for g in graphs])).numpy()
    np.testing.assert_allclose(emb, direct, rtol=1e-5, atol=1e-6)


def test_embed_returns_dataset_order(toy):
    graphs, _, _ = toy
    enc = StandInGNN().eval()
    idx = np.array([5, 2, 9, 0, 3])
    emb = C.embed(enc, D.embed_loader(graphs, idx, 2), torch.device("cpu"))
    with torch.no_grad():
        direct = torch.cat([enc(D.collate_views([graphs[i]])) for i in idx]).numpy()
    np.testing.assert_allclose(emb, direct, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="embed_loader"):
        C.embed(enc, [D.collate_views(graphs[:2])], torch.device("cpu"))


def test_bad_settings_fail_loudly(toy, tmp_path):
    graphs, meta, split = toy
    loaders = D.build_loaders(graphs, meta, split, "checkpoint", 16, None, 0)
    fw, _ = _framework(loaders, "checkpoint", weak=1.0, config={"train": {"batch_size": 16}})
    enc_only = torch.optim.AdamW(fw.model.parameters())
    with pytest.raises(ValueError, match="framework.parameters"):
        fw.train(loaders.train, None, 1, enc_only)
    opt = torch.optim.AdamW(fw.parameters())
    with pytest.raises(ValueError, match="num_epochs"):
        fw.train(loaders.train, None, 0, opt)
    fw.train(loaders.train, None, 1, opt, checkpoint_dir=tmp_path)
    other, opt2 = _framework(loaders, "checkpoint", weak=1.0, config={"train": {"batch_size": 32}})
    with pytest.raises(ValueError, match="config differs in \\['train.batch_size'\\]"):
        other.train(loaders.train, None, 2, opt2, resume_from=tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        other.train(loaders.train, None, 2, opt2, resume_from=tmp_path / "nope.pt")
    same = {"train": {"batch_size": 16}}
    for kw, cause in (({"seed": 1}, "seed 0 != 1"), ({"model_args": {"name": "gnn", "kwargs": {}}}, "its encoder")):
        fw2, opt4 = _framework(loaders, "checkpoint", weak=1.0, config=same, **kw)
        with pytest.raises(ValueError, match=cause):
            fw2.train(loaders.train, None, 2, opt4, resume_from=tmp_path)
    with pytest.raises(TypeError, match="project"):
        C.ContrastiveLearner(torch.nn.Linear(2, 2), C.NTXentLoss())
    with pytest.raises(ValueError, match="device"):
        runtime.resolve_device("tpu")
    with pytest.raises(ValueError, match="lr_schedule"):
        C.build_optimizer(fw.parameters(), 1e-3, 0.0, "step", 3)
    opt3, sched = C.build_optimizer(fw.parameters(), 1e-3, 0.0, "cosine", 3)
    assert isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingLR)
    assert C.build_optimizer(fw.parameters(), 1e-3, 0.0, "none", 3)[1] is None


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path):
    args = ["--epochs", "3", "--batch_size", "8", "--recipe", "checkpoint", "--dropout", "0.2", "--weak", "0.3"]
    run = tmp_path / "killed"
    proc = subprocess.run([sys.executable, str(WORKER), "--out", str(run), *args, "--kill_after", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, f"worker was not killed:\n{proc.stderr[-2000:]}"
    assert C.load_checkpoint(run / "ckpt")["epoch"] == 1 and not (run / "final.pt").exists()
    proc = subprocess.run([sys.executable, str(WORKER), "--out", str(run), *args, "--resume", str(run / "ckpt")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]

    threads = torch.get_num_threads()
    try:
        ddp_worker.main(["--out", str(tmp_path / "straight"), *args])
    finally:
        torch.set_num_threads(threads)
    a = torch.load(run / "final.pt", weights_only=True)
    b = torch.load(tmp_path / "straight" / "final.pt", weights_only=True)
    for k in a:
        assert torch.equal(a[k], b[k]), f"resumed and uninterrupted runs differ in {k}"
    ha = json.loads((run / "history.json").read_text())
    hb = json.loads((tmp_path / "straight" / "history.json").read_text())
    for key in ("train_loss", "val_loss", "val_metric", "lr", "best_epoch", "best_metric", "initial_val_metric"):
        assert ha[key] == hb[key], key
    assert torch.equal(torch.load(run / "best.pt", weights_only=True)["out.0.weight"],
                       torch.load(tmp_path / "straight" / "best.pt", weights_only=True)["out.0.weight"])


def test_fit_contrastive_checkpoint_resumes_only_the_same_training(toy, tmp_path):
    graphs, meta, split = toy
    train, one = TrainConfig(batch_size=16, epochs=2), runtime.single_process()
    ck = C.Checkpointing(tmp_path, {"name": "standin", "kwargs": {"hidden_dim": 16}}, {"data": "toy"}, resume=True)

    def fit(**kw):
        torch.manual_seed(0)
        return C.fit_contrastive(StandInGNN(), graphs, meta, split, kw.pop("recipe", "checkpoint"), train, one,
                                 seed=0, checkpoint=kw.pop("checkpoint", ck), **kw)

    first = fit()
    last = C.load_checkpoint(tmp_path)
    assert set(C.CHECKPOINT_KEYS) <= set(last) and last["epoch"] == 2
    assert last["model_args"] == ck.model_args and last["best_metric"] == first.history["best_metric"]
    assert last["config"]["recipe"] == "checkpoint" and last["config"]["train"]["epochs"] == 2
    written = (tmp_path / C.CHECKPOINT_NAME).stat().st_mtime_ns
    again = fit()  # finished: loaded from last.pt, not trained again
    assert (tmp_path / C.CHECKPOINT_NAME).stat().st_mtime_ns == written and again.history == first.history
    for k, v in first.encoder.state_dict().items():
        assert torch.equal(again.encoder.state_dict()[k], v)
    with pytest.raises(ValueError, match="train.epochs"):
        fit(epochs=3)  # the cosine schedule spans the epochs: another number is another training
    with pytest.raises(ValueError, match="recipe"):
        fit(recipe="supcon")
    fit(checkpoint=dataclasses.replace(ck, resume=False), epochs=1)  # without resume: trained afresh
    assert C.load_checkpoint(tmp_path)["epoch"] == 1


# ----------------------------------------------------------------------------- recipes + real encoder
def test_comparison_and_training_share_one_setup(toy, monkeypatch):
    # compare_view_recipes trains through fit_contrastive: the run's schedule, clipping and workers apply
    graphs, meta, split = toy
    seen = {"clip": [], "workers": []}
    clip, build = torch.nn.utils.clip_grad_norm_, C.build_loaders

    def spy_clip(params, max_norm, *a, **kw):
        seen["clip"].append(max_norm)
        return clip(params, max_norm, *a, **kw)

    def spy_build(*a, **kw):
        seen["workers"].append(a[7])  # build_loaders(graphs, meta, split, recipe, batch, view_fn, seed, num_workers, ...)
        return build(*a, **kw)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy_clip)
    monkeypatch.setattr(C, "build_loaders", spy_build)
    train = TrainConfig(batch_size=16, learning_rate=4e-3, lr_schedule="cosine", grad_clip=0.5, num_workers=0)
    res = C.compare_view_recipes(StandInGNN, graphs, meta, split, ["checkpoint", "supcon"], train, epochs=2,
                                 make_view_fn=lambda r: None, seed=0)
    for r in ("checkpoint", "supcon"):
        assert res["recipes"][r]["history"]["lr"] == pytest.approx([4e-3, 2e-3])  # cosine over the 2 epochs
    assert seen["clip"] and set(seen["clip"]) == {0.5} and seen["workers"] == [0, 0]
    seen["clip"].clear()
    C.fit_contrastive(StandInGNN(), graphs, meta, split, "checkpoint", dataclasses.replace(train, grad_clip=0.0),
                      runtime.single_process(), seed=0, epochs=1)
    assert seen["clip"] == []  # 0 disables clipping



def test_compare_view_recipes_reports_every_recipe(toy):
    graphs, meta, split = toy
    train = TrainConfig(batch_size=16, learning_rate=5e-3, weight_decay=0.0, temperature=0.2)
    res = C.compare_view_recipes(lambda: StandInGNN(), graphs, meta, split, ["noise", "checkpoint", "supcon"], train,
                                 epochs=2, make_view_fn=lambda r: D.make_view_fn(r, SymmetryAugmenter()), seed=0)
    assert set(res["recipes"]) == {"noise", "checkpoint", "supcon"}
    assert res["chosen"] == max(res["recipes"], key=lambda r: res["recipes"][r]["val_metric"])
    assert res["chosen_self_supervised"] in ("noise", "checkpoint")
    assert res["recipes"]["supcon"]["kind"] == "weakly supervised"
    # every recipe starts from the same initialisation
    assert len({r["initial_val_metric"] for r in res["recipes"].values()}) == 1


def test_real_encoder_symmetry_views_are_identical_and_it_trains(toy):
    from gnn_encoder import build_encoder

    graphs, meta, split = toy
    torch.manual_seed(0)
    enc = build_encoder("gnn", hidden_dim=16, global_dim=16, projection_dim=8, message_passing_steps=1,
                        edge_dim=graphs[0].edge_attr.shape[1]).eval()
    ds = D.ContrastivePairDataset(graphs, meta, split.train, "symmetry",
                                  D.make_view_fn("symmetry", SymmetryAugmenter()), 0,
                                  D.TaskVocab(meta.task.to_numpy()[split.train]))
    v1, v2, _ = D.collate_pairs([ds[(0, i)] for i in range(8)])
    assert not torch.equal(v1.edge_attr, v2.edge_attr)  # the views are relabelled graphs ...
    with torch.no_grad():  # ... that an exactly invariant encoder cannot tell apart
        torch.testing.assert_close(enc(v1), enc(v2), rtol=1e-4, atol=1e-5)
    loaders = D.build_loaders(graphs, meta, split, "noise", 16, D.make_view_fn("noise", SymmetryAugmenter()), 0)
    fw, opt = _framework(loaders, "noise", weak=0.5, encoder=enc)
    history, best = fw.train(loaders.train, loaders.val, 1, opt)
    assert np.isfinite(history["train_loss"][0]) and history["train_task_loss"][0] > 0


def test_selection_reads_val_unseen_only_and_the_metric_head_is_chosen_there():
    """The metric head's choice reads val-unseen models (train and val ones as distractors); the test-unseen
    rows may hold anything without changing it."""
    graphs, meta = make_toy_zoo(n_tasks=5, runs_per_task=4, ckpts=2, seed=2)
    split = D.split_by_run(meta, 0.5, 0.0, heldout_tasks=["task4"], seed=0, val_unseen_tasks=["task3"])
    rng = np.random.default_rng(0)
    task = meta["task"].to_numpy()
    centres = rng.normal(size=(5, 6))
    raw = (centres[[int(t[-1]) for t in task]] + 0.3 * rng.normal(size=(len(meta), 6))).astype(np.float32)
    raw[:, 4:] *= 8.0  # a nuisance that varies within every task: whitening should shrink it
    raw[:, 4:] += 8.0 * rng.normal(size=(len(meta), 2)).astype(np.float32)
    out = C.choose_metric_head(raw, meta, split, task, dims=[4, 6], regs=[0.1])
    assert out["metric"] == "val_unseen_P@10" and set(out["scores"]) == {"none", "dim4_reg0.1", "dim6_reg0.1"}
    assert out["head"] is not None and out["scores"][f"dim{out['dim']}_reg0.1"] == max(out["scores"].values())
    assert out["scores"]["dim6_reg0.1"] > out["scores"]["none"]
    scrambled = raw.copy()
    scrambled[split.test_unseen] = rng.normal(size=(len(split.test_unseen), 6))
    again = C.choose_metric_head(scrambled, meta, split, task, dims=[4, 6], regs=[0.1])
    assert again["scores"] == out["scores"]  # the test-unseen rows are never read
    weighted = C.choose_metric_head(raw, meta, split, task, dims=[6], regs=[0.1], learned_from=4,
                                    learned_weights=[0.0, 1.0])
    assert set(weighted["scores"]) == {f"learned{a}_{c}" for a in (0.0, 1.0) for c in ("none", "dim6_reg0.1")}
    assert again["refit"] and np.array_equal(again["embeddings"][split.val_unseen], out["embeddings"][split.val_unseen])
    # the chosen head is fit again on train + val runs (its choice, and the candidates' scores, are train-only fits)
    from encoder_blocks import MetricHead
    once = C.choose_metric_head(raw, meta, split, task, dims=[4, 6], regs=[0.1], refit=False)
    assert once["scores"] == out["scores"] and once["dim"] == out["dim"] and not once["refit"]
    rows = np.sort(np.concatenate([split.train, split.val]))
    both = MetricHead(6, out["dim"]).fit(torch.from_numpy(raw[rows]), task[rows], 0.1)(torch.from_numpy(raw)).numpy()
    np.testing.assert_allclose(out["embeddings"], both, rtol=1e-5, atol=1e-6)
    assert not np.allclose(once["embeddings"], out["embeddings"])  # the val runs did move the fit
    assert 0 <= out["refit_score"] <= 1 and "refit_score" not in once
