"""The model database on real folders (issue #17): identity by content, symbolic links and odd names,
metadata checked against column types, the --db guard, per-chunk commits that survive SIGKILL, the CLI's
one-line errors. The folders are built here, from code."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import architecture as A
import catalogue as C
import gnn_encoder as G
import retrieval as R
import vector_index as V

ROOT = Path(__file__).resolve().parents[1]
SPEC = A.mlp_spec(4, [3], 2, "relu")
pytestmark = pytest.mark.usefixtures("one_thread")


def stat_embed(models) -> np.ndarray:
    """A permutation-invariant stand-in encoder: sorted-free statistics of each layer's weights."""
    return np.asarray([[float(f(sd[f"layers.{i}.{p}"])) for i in range(len(spec.layers)) for p in ("weight", "bias")
                        for f in (torch.mean, torch.std, torch.amax)] for spec, sd in models], dtype=np.float32)


def weights(seed: int, spec: A.ArchitectureSpec = SPEC) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in spec.param_shapes().items()}


def save_model(path: Path, seed: int, side: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights(seed), str(path))
    if side is not None:
        Path(f"{path}.spec.json").write_text(json.dumps(side))
    return path


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("enc") / "encoder.pt"
    G.save_encoder(str(path), G.build_encoder("gnn", hidden_dim=8, global_dim=16, projection_dim=8,
                                              message_passing_steps=1))
    return path


def cli(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """The real script in a subprocess (one thread: these graphs are tiny and the machine may be shared)."""
    return subprocess.run([sys.executable, str(ROOT / "retrieval.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, check=check, env={**os.environ, "OMP_NUM_THREADS": "1"})


# ---------------------------------------------------------------------------- metadata
@pytest.mark.parametrize("meta, words", [
    ({"test_acc": "0.99"}, "test_acc='0.99' is a str, not a number"),
    ({"task": ["a", "b"]}, "task=['a', 'b'] is a list, not a string"),
    ({"epoch": 10**30}, "epoch=1000000000000000000000000000000 is out of range"),
    ({"epoch": float("inf")}, "epoch=inf is not an integer"),  # json.loads("1e400") is inf
    ({"epoch": 2.5}, "epoch=2.5 is not an integer"),
    ({"test_acc": float("inf")}, "test_acc=inf is not finite"),
    ({"train_loss": 10**400}, "out of range of a float"),
    ({"epoch": True}, "is a bool, not a number"),
    ({"task": "\ud800"}, "not valid Unicode"),
    ({"lr": float("inf")}, "lr=inf holds a number that is not finite"),
])
def test_metadata_values_are_checked_against_their_columns(meta, words):
    with pytest.raises(ValueError, match="metadata ") as e:
        C.metadata_row("m", SPEC, meta)
    assert words in str(e.value)


def test_metadata_row_types():
    row = C.metadata_row("m", SPEC, {"epoch": 10.0, "test_acc": 1, "gen_gap": float("nan"), "task": "t", "seed": 3})
    assert row["epoch"] == 10 and isinstance(row["epoch"], int) and row["test_acc"] == 1.0
    assert row["gen_gap"] is None and row["task"] == "t" and json.loads(row["extra"]) == {"seed": 3}
    assert C.metadata_row("m", SPEC, {"epoch": 2**53})["epoch"] == 2**53


# ---------------------------------------------------------------------------- identity
def test_identity_is_content_not_relative_path(tmp_path):
    a = save_model(tmp_path / "A" / "model.safetensors", 1)
    b = save_model(tmp_path / "B" / "model.safetensors", 2)
    db = tmp_path / "db"
    run = R.index_folder(tmp_path / "A", stat_embed, db)
    assert (run.added, run.unchanged) == (1, 0)
    run = R.index_folder(tmp_path / "B", stat_embed, db)  # same relative path, other content: a new model
    assert (run.added, run.unchanged) == (1, 0) and len(run.index) == 2
    index = R.ModelIndex.load(db, embedder=stat_embed)
    assert {index.get(m)["path"] for m in index.model_ids()} == {str(a), str(b)}
    # a parent folder holding both: nothing is added twice
    run = R.index_folder(tmp_path, stat_embed, db)
    assert (run.added, run.updated, run.unchanged) == (0, 0, 2) and len(run.index) == 2
    # a file rewritten in place is re-embedded and replaces its old version
    old_vec = index.embedding(index.query(str(a), k=1)[0]["model_id"])
    save_model(a, 3)
    run = R.index_folder(tmp_path / "A", stat_embed, db)
    assert (run.added, run.updated, run.unchanged) == (0, 1, 0) and len(run.index) == 2
    index = R.ModelIndex.load(db, embedder=stat_embed)
    hit = index.query(str(a), k=1)[0]
    assert hit["similarity"] == pytest.approx(1.0, abs=1e-6) and hit["path"] == str(a)
    assert not np.allclose(index.embedding(hit["model_id"]), old_vec)
    want = stat_embed([(SPEC, weights(3))])[0]
    np.testing.assert_allclose(index.embedding(hit["model_id"]), want / np.linalg.norm(want), atol=1e-6)
    # `query model.pt` from another folder: that file, not the indexed model of the same name
    other = save_model(tmp_path / "elsewhere" / "model.safetensors", 4)
    os.chdir(other.parent)
    try:
        res = index.query("model.safetensors", k=2)
        assert res[0]["similarity"] < 1 - 1e-4  # its own content is not indexed
    finally:
        os.chdir(ROOT)


def test_remove_keeps_vectors_and_rows_in_step():
    x = np.random.default_rng(0).normal(size=(400, 8)).astype(np.float32)
    for kind in ("flat", "hnsw"):
        index = R.ModelIndex(8, index_type=kind)
        index.add_embeddings(x, [{**C.metadata_row(f"v{i}", SPEC, {}), "model_id": f"v{i}"} for i in range(400)])
        index.remove(["v3", "v399"])
        assert len(index) == 398 and "v3" not in index and index.vectors.kind == kind
        assert np.array_equal(np.sort(index.vectors.ids()), index.catalogue.fids())
        assert index.query("v10", k=1)[0]["model_id"] == "v10"
        np.testing.assert_allclose(index.embedding("v200"), x[200] / np.linalg.norm(x[200]), atol=1e-6)
    vec = V.VectorIndex(8, index_type="ivf", nlist=4)
    vec.add(V.unit_rows(x, 8), np.arange(400))
    assert vec.kind == "ivf"
    vec.remove(np.array([0, 5]))
    assert len(vec) == 398 and vec.search(x[7], 1)[1][0, 0] == 7
    with pytest.raises(KeyError, match="not in the index"):
        vec.remove(np.array([5]))


# ---------------------------------------------------------------------------- the --db guard
def test_db_refuses_a_folder_of_user_files(tmp_path, encoder_file):
    save_model(tmp_path / "ckpts" / "m.safetensors", 1)
    user = tmp_path / "user"
    (user / "valuable_data").mkdir(parents=True)
    (user / "valuable_data" / "thesis.tex").write_text("years of work")
    (user / "version_notes.txt").write_text("v2")
    before = {p: p.read_bytes() for p in user.rglob("*") if p.is_file()}
    out = cli("index", "ckpts", "--encoder", str(encoder_file), "--db", "user", cwd=tmp_path, check=False)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.strip().startswith("error: user: not empty and not a model index made by retrieval.py")
    assert "Traceback" not in out.stderr
    assert {p: p.read_bytes() for p in user.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in user.iterdir()) == ["valuable_data", "version_notes.txt"]
    index = R.ModelIndex.build(tmp_path / "ckpts", stat_embed)
    with pytest.raises(FileExistsError, match="not a model index"):
        index.save(user)
    # an index folder keeps files a user put there: saving deletes only its own old versions
    index.save(tmp_path / "db")
    (tmp_path / "db" / "notes.txt").write_text("mine")
    index.save(tmp_path / "db")
    assert sorted(p.name for p in (tmp_path / "db").iterdir() if not p.name.startswith("v")) == [
        "CURRENT", "WEIGHTZOO_INDEX", "notes.txt"]


def test_cli_errors_are_one_line(tmp_path, encoder_file, capsys, monkeypatch):
    save_model(tmp_path / "ckpts" / "m.safetensors", 1)
    (tmp_path / "text.pt").write_text("hello, I am not a checkpoint")
    out = cli("index", "ckpts", "--encoder", str(encoder_file), "--db", "db", cwd=tmp_path)
    assert out.stdout.startswith("ckpts: added 1, updated 0, unchanged 0, skipped 0; db holds 1 models [flat]")
    out = cli("query", "text.pt", "--db", "db", cwd=tmp_path, check=False)  # the real script: no traceback
    assert out.returncode == 1 and out.stderr.startswith("error: text.pt: ") and out.stderr.count("\n") == 1
    monkeypatch.chdir(tmp_path)
    for args in (["query", "text.pt", "--db", "db"], ["query", "missing.pt", "--db", "db"],
                 ["info", "--db", "nowhere"], ["index", "nope", "--encoder", str(encoder_file), "--db", "db2"],
                 ["index", "ckpts", "--encoder", "text.pt", "--db", "db2"]):
        assert R.main(args) == 1, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, (args, err)
    with pytest.raises(Exception):
        R.main(["query", "text.pt", "--db", "db", "--debug"])  # --debug: the exception itself


# ---------------------------------------------------------------------------- commits and SIGKILL
def test_sigkill_mid_run_then_rerun_equals_an_uninterrupted_run(tmp_path, encoder_file):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(2000):  # tiny models, one sub-folder per 100
        sd = {k: torch.randn(s, generator=g) for k, s in SPEC.param_shapes().items()}
        (folder / f"{i // 100:02d}").mkdir(exist_ok=True)
        save_file(sd, str(folder / f"{i // 100:02d}" / f"m{i:04d}.safetensors"))
    args = ["index", "ckpts", "--encoder", str(encoder_file), "--chunk-size", "100"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "retrieval.py"), *args, "--db", "db"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "db" / "CURRENT").exists():  # the first chunk's commit
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first commit"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    done = len(R.ModelIndex.load(tmp_path / "db", embedder=stat_embed))
    assert 100 <= done < 2000 and done % 100 == 0, done  # whole chunks, not all of them
    rerun = cli(*args, "--db", "db", cwd=tmp_path)
    assert f"added {2000 - done}, updated 0, unchanged {done}, skipped 0;" in rerun.stdout
    cli(*args, "--db", "db_whole", cwd=tmp_path)
    a = R.ModelIndex.load(tmp_path / "db", embedder=stat_embed)
    b = R.ModelIndex.load(tmp_path / "db_whole", embedder=stat_embed)
    assert len(a) == 2000 and a.model_ids() == b.model_ids()
    ids = a.model_ids()
    np.testing.assert_array_equal(a.catalogue.fids(), b.catalogue.fids())
    np.testing.assert_allclose(np.stack([a.embedding(m) for m in ids]), np.stack([b.embedding(m) for m in ids]),
                               rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------- flatten heads over any map
def mnist_cnn(seed: int) -> torch.nn.Sequential:
    """The classic MNIST CNN: 28x28, two conv+pool blocks, a flatten head over a 7x7 map (3136 -> 128 -> 10)."""
    torch.manual_seed(seed)
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(3136, 128), nn.ReLU(), nn.Linear(128, 10))


MNIST_SIDECAR = {"input_shape": [1, 28, 28], "pool": "max2", "activation": "relu", "task": "mnist"}


def test_mnist_cnn_with_a_7x7_flatten_head_is_indexed_and_its_permuted_copy_finds_it(tmp_path):
    from checkpoint_import import read_checkpoint
    from symmetry import permute_hidden
    from weight_to_graph import WeightToGraph, area_resample

    folder = tmp_path / "ckpts"
    folder.mkdir()
    net = mnist_cnn(0).eval()
    torch.save(net.state_dict(), folder / "mnist.pt")
    (folder / "mnist.pt.spec.json").write_text(json.dumps(MNIST_SIDECAR))
    spec, sd, _, _ = read_checkpoint(folder / "mnist.pt")  # read exactly through the importer
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(A.forward(spec, sd, x), net(x), rtol=1e-4, atol=1e-5)
    assert spec.edge_window(2) == (7, 7) and spec.layers[2].flatten
    perm = permute_hidden(spec, sd, torch.Generator().manual_seed(1))  # conv channels and hidden neurons
    assert not torch.equal(perm["layers.0.weight"], sd["layers.0.weight"])
    keys = dict(zip(spec.param_shapes(), net.state_dict()))  # layers.i.* -> 0.weight, 3.weight, 7.weight, 9.weight
    torch.save({keys[k]: v for k, v in perm.items()}, folder / "mnist_permuted.pt")
    (folder / "mnist_permuted.pt.spec.json").write_text(json.dumps(MNIST_SIDECAR))
    torch.save(mnist_cnn(1).state_dict(), folder / "mnist_other.pt")
    (folder / "mnist_other.pt.spec.json").write_text(json.dumps(MNIST_SIDECAR))
    save_model(folder / "mlp.safetensors", 5)

    # each channel's 7x7 block of fc1 is summarized to 5x5 by area: a fixed linear map per edge
    g = WeightToGraph(max_kernel=5, canonicalize=False, flatten_summary=True).to_graph(spec, sd)
    e0 = 1 * 32 + 32 * 64
    block = g.edge_attr[e0:e0 + 128 * 64].view(128, 64, 5, 5)
    M = area_resample(7, 5)
    torch.testing.assert_close(block, torch.einsum("ph,ochw,qw->ocpq", M, sd["layers.2.weight"].view(128, 64, 7, 7), M))
    torch.testing.assert_close(block.sum((2, 3)), sd["layers.2.weight"].view(128, 64, 49).sum(2), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="summarized to 5x5; its weights cannot be recovered"):
        WeightToGraph(max_kernel=5, flatten_summary=True).to_state_dict(g)

    torch.manual_seed(0)
    enc = G.build_encoder("gnn", hidden_dim=16, global_dim=32, projection_dim=8, message_passing_steps=2)
    emb = R.Embedder(enc, batch_size=2)
    index = R.ModelIndex.build(folder, emb)
    assert len(index) == 4 and index.errors == []
    z = emb([(spec, sd), (spec, perm)])
    np.testing.assert_allclose(z[0], z[1], rtol=1e-4, atol=1e-5)  # exactly invariant (up to float error)
    res = index.query(folder / "mnist_permuted.pt", k=3, exclude_self=True)
    assert res[0]["model_id"].startswith("mnist.pt@") and res[0]["similarity"] > 1 - 1e-5
    assert res[1]["model_id"].startswith("mnist_other.pt@") and res[1]["similarity"] < res[0]["similarity"] - 1e-4

    # an encoder saved before flatten-head summaries loads, and refuses these models in one clear line
    G.save_encoder(str(tmp_path / "enc.pt"), enc)
    old = torch.load(tmp_path / "enc.pt", weights_only=True)
    del old["graph"]
    torch.save(old, tmp_path / "old_enc.pt")
    old_emb = R.Embedder.from_file(tmp_path / "old_enc.pt")
    with pytest.raises(ValueError, match=r"flatten head over a 7x7 map, larger than the 5x5 edge features, and this "
                                         r"converter does not summarize flatten heads \(an encoder saved before"):
        old_emb.check(spec, sd)
    old_index = R.ModelIndex.build(folder, old_emb)
    assert len(old_index) == 1 and len(old_index.errors) == 3
    assert all("cannot embed" in e.cause and "\n" not in e.cause for e in old_index.errors)
    assert R.Embedder.from_file(tmp_path / "enc.pt").info["flatten_summary"] is True
