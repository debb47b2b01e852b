"""Tasks: the generated registry and its invariants, names that rebuild their task, kinds, near-duplicates,
task data, the source-data cache."""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tasks as T

ROOT = Path(__file__).resolve().parents[1]


def _digest(name: str) -> str:
    return hashlib.sha256(b"".join(a.tobytes() for a in T._task_arrays(T.canonical_name(name)))).hexdigest()


@pytest.fixture(scope="module")
def registry_digests() -> dict[str, str]:
    return {n: _digest(n) for n in T.TASKS}


def test_registry_is_generated_large_and_covers_every_image_shape_group():
    assert len(T.TASKS) >= 300
    assert T.TASKS == T.generate_registry()  # the registry is the generator's output, deterministically
    assert {t.dataset for t in T.TASKS.values()} == set(T.SOURCE_SHAPES)
    groups = T.shape_groups()
    image = {g: ts for g, ts in groups.items() if T.TASKS[ts[0]].is_image}
    assert len(image) == 6 and min(len(ts) for ts in image.values()) >= 20, {g: len(ts) for g, ts in groups.items()}
    for t in T.TASKS.values():
        assert t.shape_group == f"in{t.num_features}-out{t.num_classes}"
        assert re.fullmatch(r"[a-z0-9_+]{4,60}", t.name), t.name  # short and file-name safe
        assert t.description.startswith(T.SOURCE_DESCRIPTIONS[t.dataset])


def test_a_task_rebuilt_from_its_name_gives_identical_data(registry_digests):
    for name, t in T.TASKS.items():
        assert T.task_from_name(name) == t
    T.task_from_name.cache_clear()
    T._task_arrays.cache_clear()
    T._load_source.cache_clear()
    assert {n: _digest(n) for n in T.TASKS} == registry_digests  # rebuilt, bit for bit
    # in a fresh interpreter, from the names alone
    sample = list(T.TASKS)[::7]
    code = ("import json, sys, hashlib, tasks as T; names = json.loads(sys.stdin.read()); print(json.dumps({n: "
            "hashlib.sha256(b''.join(a.tobytes() for a in T._task_arrays(n))).hexdigest() for n in names}))")
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(sample), capture_output=True, text=True,
                         cwd=ROOT, check=True)
    assert json.loads(out.stdout) == {n: registry_digests[n] for n in sample}
    # ... and a name outside the registry rebuilds the same data however often it is built
    other = "mnist+transpose+shiftl2u1+invert+sub9182"
    assert other not in T.TASKS and _digest(other) == (T._task_arrays.cache_clear() or _digest(other))


def test_no_two_tasks_share_data_or_are_functional_twins(registry_digests):
    assert len(set(registry_digests.values())) == len(T.TASKS)
    keys = [T.functional_twin_key(t) for t in T.TASKS]
    assert len(set(keys)) == len(keys)
    noisy = [n for n, t in T.TASKS.items() if "noise" in t.input_kinds]
    assert len(noisy) >= 20
    for n in noisy:  # the same task without its noise is not in the registry (it would be a twin)
        assert "+".join(tok for tok in n.split("+") if not tok.startswith("noise")) not in T.TASKS
    assert T.functional_twin_key("digits") == T.functional_twin_key("digits+noise50")
    assert T.functional_twin_key("breast_cancer+invert") == T.functional_twin_key("breast_cancer+perm10")
    assert T.functional_twin_key("digits+parity") != T.functional_twin_key("digits+invert+parity")


def test_functional_agreement_separates_twins_from_registry_tasks():
    """Measured on real data: in the digits 10-class group every pair of registry tasks agrees less than a task
    and its noise twin (0.87 here, chance 0.1); a label permutation disagrees almost always."""
    names = T.shape_groups()["in64-out10"][:16] + ["digits+noise50"]
    assert "digits" in names
    agree = T.functional_agreement(names)
    twin = agree[names.index("digits"), -1]
    pairs = agree[:-1, :-1][np.triu_indices(len(names) - 1, 1)]
    assert twin > 0.7 and pairs.max() < twin - 0.2, (twin, pairs.max())
    assert agree[names.index("digits"), names.index("digits+perm3709158264")] < 0.2


def test_kinds_are_first_class_and_consistent():
    by_kind = T.tasks_by_kind()
    assert set(by_kind) == {"original", *T.LABEL_KINDS[1:], *T.INPUT_KINDS}
    for name, t in T.TASKS.items():
        assert set(t.kinds) <= set(by_kind) and all(name in by_kind[k] for k in t.kinds)
        label_tokens = [tok for tok in name.split("+")[1:] if tok not in t.transforms]
        assert (t.label_kind == "original") == (not label_tokens)
        assert len(t.input_kinds) == len(set(t.input_kinds)) <= len(t.transforms)
        assert (t.kinds == ("original",)) == (name == t.dataset)
    composed = T.get_task("digits+rot90+shiftr1+perm3709158264")
    assert composed.kinds == ("rotation", "shift", "label_permutation") and composed.task_family == "digits/label_permutation"
    # every image shape group holds >= 2 tasks of each input kind and of each label kind it can have
    for g, names in T.shape_groups().items():
        if not T.TASKS[names[0]].is_image:
            continue
        counts = {k: sum(k in T.TASKS[n].kinds for n in names) for k in by_kind}
        k = T.TASKS[names[0]].num_classes
        label_kinds = {10: ["label_permutation"], 5: ["regrouping", "class_subset"], 2: ["binary", "class_subset"]}[k]
        assert all(counts[kind] >= 2 for kind in [*T.INPUT_KINDS, *label_kinds]), (g, counts)
    assert T.tasks_by_kind(["digits+rot90", "unknown"]) == {**{k: [] for k in by_kind}, "rotation": ["digits+rot90"]}


def test_names_parse_canonically_and_bad_names_say_why():
    assert T.canonical_name("digits+grp0123401234") == "digits+mod5"  # a named map is spelled by its name
    assert T.canonical_name("digits+bin0101010101") == "digits+parity"
    t = T.get_task("wine+featperm2+sub20")
    assert (t.num_classes, t.classes, t.label_map[2], t.label_map[0], t.label_kind) == (2, (2, 0), 0, 1, "class_subset")
    for bad, why in [("foo+rot90", "unknown source 'foo'"), ("digits+rot45", "unknown input transform 'rot45'"),
                     ("digits+parity+rot90", "at most one label operation"), ("wine+rot90", "needs an image source"),
                     ("digits+perm0123456789", "other than the identity"), ("digits+perm012", "has 10 digits"),
                     ("mnist1d+shiftu1", "sequences (l/r)"), ("digits+noise050", "unknown input transform"),
                     ("iris+sub012", "sub needs 2..2 distinct classes"), ("digits+grp0000011111", "use bin for 2")]:
        with pytest.raises(T.TaskNameError, match=re.escape(why)) as e:
            T.get_task(bad)
        assert repr(bad) in str(e.value)
    with pytest.raises(T.TaskNameError):
        T.load_task_data("digits+mirror")


def test_legacy_names_keep_their_meaning():
    assert set(T.LEGACY_NAMES.values()) - set(T.TASKS) == {"digits+noise50", "mnist1d+noise50",
                                                         "breast_cancer+noise50"}  # noise twins are left out
    Xa, ya, _, _ = T.load_task_data("digits")
    Xp, yp, _, _ = T.load_task_data("digits_perm_a")
    Xr, yr, _, _ = T.load_task_data("digits_rot90")
    assert T.get_task("digits_perm_a").label_map == (3, 7, 0, 9, 1, 5, 8, 2, 6, 4)
    assert torch.equal(Xa, Xp) and torch.equal(yp, torch.tensor([3, 7, 0, 9, 1, 5, 8, 2, 6, 4])[ya])
    assert torch.equal(ya, yr) and torch.allclose(Xr.view(-1, 8, 8), torch.rot90(Xa.view(-1, 8, 8), 1, dims=(1, 2)))
    five = T.get_task("digits_5to9")
    assert five.name == "digits+sub56789" and five.classes == (5, 6, 7, 8, 9)
    _, y5, _, _ = T.load_task_data("digits_5to9")
    assert sorted(set(y5.tolist())) == [0, 1, 2, 3, 4]


def test_transforms_do_what_their_names_say():
    Xa = T.load_task_data("digits")[0].view(-1, 8, 8)
    raw = T._load_source("digits")[0].reshape(-1, 8, 8)
    shifted = T._task_arrays("digits+shiftr1d1")[0].reshape(-1, 8, 8)
    assert np.all(shifted[:, 0, :] == 0) and np.all(shifted[:, :, 0] == 0)  # zero fill, a dead row and column
    ref = np.zeros_like(raw)
    ref[:, 1:, 1:] = raw[:, :-1, :-1]
    s = ref.reshape(len(ref), -1).astype(np.float64)
    std = np.where(s.std(0) < 1e-6, 1, s.std(0))
    np.testing.assert_allclose(shifted.reshape(len(ref), -1), (s - s.mean(0)) / std, atol=1e-5)
    np.testing.assert_allclose(T.load_task_data("digits+invert")[0], -T.load_task_data("digits")[0], atol=1e-6)
    perm = T.fixed_permutation(64, 3)
    assert perm.tolist() != list(range(64))
    assert torch.allclose(T.load_task_data("digits+pixperm3")[0].view(-1, 64), Xa.reshape(-1, 64)[:, perm], atol=1e-6)
    assert torch.allclose(T.load_task_data("digits+transpose")[0].view(-1, 8, 8), Xa.transpose(1, 2))
    assert T.fixed_permutation(10, 0).tolist() == [4, 6, 5, 0, 8, 1, 9, 2, 7, 3]  # SHA-1 defined: never changes
    noisy = T.load_task_data("digits+noise100")[0]
    assert 0.3 < float((noisy - Xa.unsqueeze(1)).std()) < 1.0 and torch.equal(noisy, T.load_task_data("digits+noise100")[0])
    seq = T.load_task_data("mnist1d+reverse")[0]
    assert torch.allclose(seq, T.load_task_data("mnist1d")[0].flip(1), atol=1e-6)


def test_task_subset_spreads_over_every_shape_group():
    sub = T.task_subset(42)
    groups = T.shape_groups({n: T.TASKS[n] for n in sub})
    assert len(sub) == len(set(sub)) == 42 and len(groups) == len(T.shape_groups())
    assert all(len(ts) == 3 for ts in groups.values()) and "digits" in sub and "mnist" in sub
    assert T.task_subset(42) == sub and T.task_subset(10) == sub[:10]
    sizes = {g: len(ts) for g, ts in T.shape_groups().items()}
    more = T.shape_groups({n: T.TASKS[n] for n in T.task_subset(48)})  # the 6 largest groups get a 4th task
    assert sorted(g for g, ts in more.items() if len(ts) == 4) == sorted(sorted(sizes, key=sizes.get)[-6:])


@pytest.mark.parametrize("name", ["mnist", "mnist1d", "wine", "breast_cancer", "digits+sub01234", "digits+sub56789",
                                  "iris+featperm1+invert", "mnist+rot90+shiftl1+parity"])
def test_load_task_data_shapes(name):
    t = T.get_task(name)
    Xtr, ytr, Xte, yte = T.load_task_data(name)
    assert Xtr.shape[1:] == t.input_shape and Xte.shape[1:] == t.input_shape
    assert set(ytr.unique().tolist()) == set(range(t.num_classes)) and T.train_size(name) == len(ytr)
    assert torch.isfinite(Xtr).all() and len(Xtr) == len(ytr) > len(Xte) == len(yte) > 0
    assert Xtr.mean(0).abs().max() < 1e-4 and Xtr.dtype == torch.float32 and ytr.dtype == torch.int64


def test_source_cache_is_rebuilt_when_damaged(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WEIGHTZOO_DATA_CACHE", str(tmp_path))
    T._load_source.cache_clear()
    try:
        fresh = T._load_source("iris")
        cache = T._source_cache_path("iris")
        assert cache.parent == tmp_path and cache.exists()
        T._load_source.cache_clear()
        assert all(np.array_equal(a, b) for a, b in zip(fresh, T._load_source("iris")))  # read back from the cache
        cache.write_bytes(cache.read_bytes()[:100])  # truncated
        T._load_source.cache_clear()
        with caplog.at_level("WARNING"):
            rebuilt = T._load_source("iris")
        assert "unreadable" in caplog.text and str(cache) in caplog.text
        assert all(np.array_equal(a, b) for a, b in zip(fresh, rebuilt))
        assert np.load(cache)["x"].shape == fresh[0].shape  # rewritten whole
    finally:
        T._load_source.cache_clear()


def test_missing_source_package_is_named(monkeypatch):
    monkeypatch.setitem(T._SOURCE_PACKAGES, "iris", "no-such-package-xyz")
    with pytest.raises(RuntimeError, match="'iris'.*'no-such-package-xyz'.*not installed"):
        T._source_cache_path("iris")


def test_data_prep_reexports_the_task_names_for_notebooks():
    import data_prep

    assert data_prep.TASKS is T.TASKS and data_prep.TaskSpec is T.TaskSpec
    assert data_prep.load_task_data is T.load_task_data


def test_cli_lists_the_registry_and_its_kinds():
    out = subprocess.run([sys.executable, "tasks.py", "kinds"], capture_output=True, text=True, cwd=ROOT, check=True)
    assert all(re.search(rf"^{k}\s+\d+", out.stdout, re.M) for k in T.tasks_by_kind())
