"""runtime.py: atomic writes, RNG state round trip, the single-process default, quiet progress."""
from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import runtime


def test_atomic_writes_replace_whole_files(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "results.json"
    runtime.atomic_write_json(path, {"a": np.float32(0.5), "b": np.arange(3), "p": Path("x/y")})
    assert json.loads(path.read_text()) == {"a": 0.5, "b": [0, 1, 2], "p": "x/y"}
    with pytest.raises(TypeError, match="not JSON serialisable: object"):
        runtime.atomic_write_json(path, {"bad": object()})
    assert json.loads(path.read_text())["a"] == 0.5  # a failed write leaves the old file whole
    runtime.atomic_torch_save(tmp_path / "t.pt", {"w": torch.ones(2)})
    assert torch.equal(torch.load(tmp_path / "t.pt", weights_only=True)["w"], torch.ones(2))
    assert sorted(os.listdir(tmp_path / "sub")) == ["results.json"]  # no temporary file left behind


def test_rng_state_round_trip() -> None:
    runtime.seed_everything(3)
    state = runtime.rng_state()
    draws = (torch.rand(2), np.random.rand(2), random.random())
    runtime.seed_everything(99)
    runtime.set_rng_state(state)
    again = (torch.rand(2), np.random.rand(2), random.random())
    assert torch.equal(draws[0], again[0]) and np.array_equal(draws[1], again[1]) and draws[2] == again[2]


def test_single_process_without_torchrun(monkeypatch) -> None:
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    dist = runtime.setup_distributed("cpu")
    assert (dist.rank, dist.world_size, dist.is_master, dist.is_distributed, dist.owns_group) == (0, 1, True, False, False)
    x = torch.arange(4.0)
    assert runtime.all_gather(x, with_grad=True) is x and runtime.world() == (0, 1)


def test_progress_bar_only_on_a_terminal(monkeypatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for stream, shown in ((io.StringIO(), False), (Terminal(), True)):
        monkeypatch.setattr("sys.stderr", stream)
        assert list(runtime.progress(range(3), desc="epoch 1")) == [0, 1, 2]
        assert ("epoch 1" in stream.getvalue()) == shown
    assert runtime.progress(range(3), show=False).disable
