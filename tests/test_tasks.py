"""Tasks: the registry's invariants, task data, the source-data cache."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tasks as T


def test_task_registry_invariants():
    assert len(T.TASKS) >= 20
    assert len({t.dataset for t in T.TASKS.values()}) >= 4
    big = {g: ts for g, ts in T.shape_groups().items() if len(ts) >= 4}
    assert len(big) >= 3, f"shape groups with >= 4 tasks: {big}"
    for t in T.TASKS.values():
        assert t.shape_group == f"in{t.num_features}-out{t.num_classes}"
    # in one shape group: identical inputs with different labels, and identical labels with transformed inputs
    Xa, ya, Xta, yta = T.load_task_data("digits")
    Xp, yp, _, _ = T.load_task_data("digits_perm_a")
    Xr, yr, _, _ = T.load_task_data("digits_rot90")
    assert T.TASKS["digits"].shape_group == T.TASKS["digits_perm_a"].shape_group == T.TASKS["digits_rot90"].shape_group
    assert torch.equal(Xa, Xp) and not torch.equal(ya, yp)
    assert torch.equal(ya, yr) and not torch.equal(Xa, Xr)
    assert torch.allclose(Xr.view(-1, 8, 8), torch.rot90(Xa.view(-1, 8, 8), 1, dims=(1, 2)))
    # binary splits of the very same inputs (the dead-pixel fingerprint cannot tell them apart)
    same_inputs = [t for t in T.shape_groups()["in64-out2"] if T.TASKS[t].transform == "none"]
    assert len(same_inputs) >= 4
    # standardised with train statistics
    assert Xa.mean(0).abs().max() < 1e-4 and Xa.dtype == torch.float32 and ya.dtype == torch.int64
    assert Xa.shape[1:] == (1, 8, 8) and len(Xta) == len(yta)


@pytest.mark.parametrize("name", ["mnist", "mnist1d", "wine", "breast_cancer", "digits_0to4", "digits_5to9"])
def test_load_task_data_shapes(name):
    t = T.TASKS[name]
    Xtr, ytr, Xte, yte = T.load_task_data(name)
    assert Xtr.shape[1:] == t.input_shape and Xte.shape[1:] == t.input_shape
    assert set(ytr.unique().tolist()) == set(range(t.num_classes))
    assert torch.isfinite(Xtr).all() and len(Xtr) == len(ytr) > len(Xte) == len(yte) > 0


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
