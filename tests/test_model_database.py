"""The model database on real folders (issue #17): a folder of hostile files beside good ones, a zip bomb
under an RSS bound, identity by content, symbolic links and odd names, metadata checked against column
types, the --db guard, per-chunk commits that survive SIGKILL, the CLI's one-line errors, flatten heads
over any map. Every folder is built here, from code (no committed binaries)."""
from __future__ import annotations

import collections
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import architecture as A
import catalogue as C
import checkpoint_folder as F
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


# ---------------------------------------------------------------------------- hostile folders
def write_inflating_pt(path: Path, numel: int) -> Path:
    """A torch.save-format zip holding {"weight": float32 zeros (numel,)} with the storage deflated: a small
    file that inflates to 4 * numel bytes (torch.load reads deflated records)."""
    class FakeStorage:
        pass

    class FakeTensor:
        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, (FakeStorage(), 0, (numel,), (1,), False, collections.OrderedDict())

    class Pickler(pickle.Pickler):  # torch.save's persistent ids for storages
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", numel) if isinstance(obj, FakeStorage) else None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump({"weight": FakeTensor()})
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        z.writestr("bomb/data.pkl", buf.getvalue())
        z.writestr("bomb/byteorder", "little")
        z.writestr("bomb/version", "3\n")
        zeros = bytes(1 << 20)
        with z.open("bomb/data/0", "w", force_zip64=True) as f:
            for start in range(0, 4 * numel, len(zeros)):
                f.write(zeros[:min(len(zeros), 4 * numel - start)])
    return path


class Payload:
    """Unpickling this runs ``touch <marker>``: the proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def torch_zip(path: Path, pickle_bytes: bytes) -> Path:
    """A torch.save-format zip with the given pickle and no tensors."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x/data.pkl", pickle_bytes)
        z.writestr("x/byteorder", "little")
        z.writestr("x/version", "3\n")
    return path


def hostile_folder(folder: Path, marker: Path) -> tuple[list[Path], dict[str, str]]:
    """Good checkpoints beside >= 15 kinds of bad input -> (good files, {bad name: words of its cause})."""
    folder.mkdir(parents=True)
    side = {"task": "digits", "dataset": "sklearn", "test_acc": 0.9, "epoch": 10, "spec": SPEC.to_dict()}
    good = [save_model(folder / "good.safetensors", 1, side)]
    torch.save({k.replace("layers.", "net."): v for k, v in weights(2).items()}, folder / "seq.pt")
    Path(f"{folder / 'seq.pt'}.spec.json").write_text(json.dumps({"activation": "relu", "task": "iris"}))
    torch.save({"state_dict": weights(3), "epoch": 3, "optimizer": {"lr": 0.1}}, folder / "train_dict.pt")
    odd = Path(os.fsdecode(os.fsencode(folder) + b"/\xff\xfe-latin1-\xe9.safetensors"))
    good += [folder / "seq.pt", folder / "train_dict.pt", save_model(odd, 4)]

    bad: dict[str, str] = {}

    def put(name: str, words: str, data: bytes | None = None, sd: dict | None = None, sidecar: str | None = None):
        f = folder / name
        if data is not None:
            f.write_bytes(data)
        elif sd is not None:
            (save_file(sd, str(f)) if f.suffix == ".safetensors" else torch.save(sd, f))
        else:
            save_model(f, 9)
        if sidecar is not None:
            Path(f"{f}.spec.json").write_bytes(sidecar.encode("utf-8", "surrogatepass") if isinstance(sidecar, str)
                                               else sidecar)
        bad[name] = words

    buf = io.BytesIO()
    torch.save({"weight": torch.zeros(2), "evil": Payload(marker)}, buf)
    put("payload.pt", "refused by torch.load(weights_only=True), nothing was executed", buf.getvalue())
    put("payload_plain_pickle.pt", "not a zip archive", pickle.dumps({"evil": Payload(marker)}))
    put("payload_in_zip.pt", "refused by torch.load", torch_zip(folder / "payload_in_zip.pt",
                                                                 pickle.dumps(Payload(marker), protocol=2)).read_bytes())
    whole = (folder / "seq.pt").read_bytes()
    put("truncated.pt", "not a zip archive as torch.save writes (truncated or corrupt", whole[:len(whole) // 2])
    put("truncated.safetensors", "truncated", (folder / "good.safetensors").read_bytes()[:100])
    put("empty.pt", "empty file", b"")
    put("text.pt", "not a zip archive", b"e" * 300)  # was "KeyError: 101"
    nan, inf = weights(5), weights(6)
    nan["layers.0.weight"][0, 0], inf["layers.1.bias"][0] = float("nan"), float("inf")
    put("nan.safetensors", "contains NaN or Inf", sd=nan)
    put("inf.pt", "contains NaN or Inf", sd=inf)
    put("wrong_shapes.safetensors", "takes 7 inputs", sd={"0.weight": torch.randn(5, 4), "0.bias": torch.randn(5),
                                                          "1.weight": torch.randn(3, 7), "1.bias": torch.randn(3)})
    put("conv1d.safetensors", "weight has 3 dims; unsupported layer", sd={"0.weight": torch.randn(4, 3, 5)})
    put("lstm.pt", "unsupported entry", sd={"rnn.weight_ih_l0": torch.randn(8, 4), "rnn.weight_hh_l0": torch.randn(8, 2)})
    put("not_tensors.pt", "is a int, not a tensor", sd={"layers.0.weight": torch.randn(2, 2), "step": 3})
    put("huge_header.safetensors", "header length", (1 << 40).to_bytes(8, "little") + b"{}" * 8)
    depth = 200_000
    put("deep_nesting.pt", "holds a list, not a state_dict",
        torch_zip(folder / "deep_nesting.pt", b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b".").read_bytes())
    put("zip_bomb.pt", "inflates to 1024.0 MiB", write_inflating_pt(folder / "zip_bomb.pt", 1 << 28).read_bytes())
    put("expanded_view.pt", "over the cap", sd={"w": torch.zeros(1).expand(1 << 30)})  # 1 stored float, 2**30 claimed
    put("acc_as_string.safetensors", "test_acc='0.99' is a str, not a number", sidecar='{"test_acc": "0.99"}')
    put("task_as_list.safetensors", "is a list, not a string", sidecar='{"task": ["a", "b"]}')
    put("epoch_huge.safetensors", "is out of range", sidecar='{"epoch": 1000000000000000000000000000000}')
    put("epoch_infinite.safetensors", "epoch=inf is not an integer", sidecar='{"epoch": 1e400}')  # once poisoned queries
    put("sidecar_bytes.safetensors", "is not UTF-8 text", sidecar=bytes(range(128, 256)) * 4)
    put("sidecar_deep.safetensors", "nested too deeply", sidecar="[" * 100_000 + "]" * 100_000)
    put("sidecar_unknown.safetensors", "unknown keys ['rm -rf']", sidecar='{"rm -rf": 1}')
    put("sidecar_lone_surrogate.safetensors", "not valid Unicode", sidecar='{"task": "\\ud800"}')
    outside = save_model(folder.parent / "outside" / "secret.safetensors", 7)
    (folder / "passwd.pt").symlink_to("/etc/passwd")
    (folder / "environ.pt").symlink_to("/proc/self/environ")
    (folder / "outside.safetensors").symlink_to(outside)
    (folder / "dangling.pt").symlink_to(folder / "no_such_file.pt")
    bad.update({"passwd.pt": "not followed", "environ.pt": "not followed", "outside.safetensors": "not followed",
                "dangling.pt": "dangling symbolic link"})
    os.mkfifo(folder / "fifo.pt")
    bad["fifo.pt"] = "not a regular file"
    return good, bad


def test_hostile_folder_indexes_every_good_file_and_skips_each_bad_one(tmp_path, encoder_file):
    marker = tmp_path / "CODE_RAN"
    good, bad = hostile_folder(tmp_path / "ckpts", marker)
    assert len(bad) >= 15 and not marker.exists()
    out = cli("index", "ckpts", "--encoder", str(encoder_file), "--db", "db", "--chunk-size", "7", cwd=tmp_path)
    assert not marker.exists()  # 0 code executed
    assert f"added {len(good)}, updated 0, unchanged 0, skipped {len(bad)};" in out.stdout
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("WARNING retrieval: skipped ")]
    assert len(lines) == len(bad) and len(out.stderr.splitlines()) == len(lines)  # one line per bad file, no more
    for name, words in bad.items():
        hit = [ln for ln in lines if f"/ckpts/{name}: " in ln or ln.startswith(f"WARNING retrieval: skipped ckpts/{name}: ")]
        assert len(hit) == 1 and words in hit[0], (name, words, hit)
    index = R.ModelIndex.load(tmp_path / "db")
    assert len(index) == len(good)
    for f in good:  # every good file is indexed and every query works (nothing poisoned the index)
        hit = index.query(str(f), k=len(good))
        assert hit[0]["path"] == F.display_path(f) and hit[0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    for mid in index.model_ids():
        assert {r["model_id"] for r in index.query(mid, k=10)} == set(index.model_ids())
        json.dumps(index.query(mid, k=10))
    row = index.get(next(m for m in index.model_ids() if m.startswith("good.safetensors@")))
    assert (row["task"], row["epoch"], row["test_acc"]) == ("digits", 10, 0.9)
    assert index.get(next(m for m in index.model_ids() if m.startswith("train_dict.pt@")))["load_warning"]
    q = cli("query", "ckpts/good.safetensors", "--db", "db", "-k", "2", "--json", cwd=tmp_path)
    assert len(json.loads(q.stdout)) == 2
    # the zoo loader of user checkpoints takes the same folder without crashing or running code
    import data_prep
    zoo, errors = data_prep.ModelZooDataset.from_checkpoints(tmp_path / "ckpts")
    assert len(zoo) >= 3 and not marker.exists()


def test_zip_bomb_is_skipped_with_peak_rss_under_1_gb(tmp_path, encoder_file):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    bomb = write_inflating_pt(folder / "bomb.pt", 1 << 28)  # 1 GiB of float32 zeros
    assert bomb.stat().st_size < 8 << 20
    small = write_inflating_pt(tmp_path / "small.pt", 1000)  # the same writer: torch.load does inflate it
    assert torch.load(small, weights_only=True)["weight"].shape == (1000,)
    save_model(folder / "good.safetensors", 1)
    with open(tmp_path / "out", "wb") as out, open(tmp_path / "err", "wb") as err:
        proc = subprocess.Popen([sys.executable, str(ROOT / "retrieval.py"), "index", "ckpts", "--encoder",
                                 str(encoder_file), "--db", "db"], cwd=tmp_path, stdout=out, stderr=err,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        watchdog = threading.Timer(300, proc.kill)
        watchdog.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own resource usage
        finally:
            watchdog.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    out, err = (tmp_path / "out").read_text(), (tmp_path / "err").read_text()
    assert proc.returncode == 0, err
    assert "added 1, updated 0, unchanged 0, skipped 1;" in out and "bomb.pt: storage 'bomb/data/0' inflates to" in err
    peak = usage.ru_maxrss
    assert peak is not None and peak * 1024 < 1 << 30, peak  # ru_maxrss is in KiB on Linux


def test_read_limits_are_configurable_and_checked_before_reading(tmp_path, monkeypatch):
    import checkpoint_import as CI

    f = save_model(tmp_path / "m.safetensors", 1)
    torch.save(weights(1), tmp_path / "m.pt")
    for path in (f, tmp_path / "m.pt"):
        assert CI.read_checkpoint(path)[0] == SPEC  # 23 elements: far under the defaults
        with pytest.raises(CI.CheckpointError, match=r"tensor 'layers.0.weight' of shape \(3, 4\) has 12 elements, over "
                                                     r"the cap of 10 per tensor"):
            CI.read_checkpoint(path, CI.ReadLimits(max_tensor_elements=10))
        with pytest.raises(CI.CheckpointError, match="23 tensor elements in all, over the cap of 20 per model"):
            CI.read_checkpoint(path, CI.ReadLimits(max_model_elements=20))
    # the safetensors header is checked before the tensors are read
    monkeypatch.setattr("safetensors.torch.load", lambda data: pytest.fail("tensors read before the check"))
    with pytest.raises(CI.CheckpointError, match="over the cap"):
        CI.read_checkpoint(f, CI.ReadLimits(max_tensor_elements=10))
    with pytest.raises(ValueError, match=r"no checkpoint could be indexed \(2 skipped, first: .*over the cap of 20"):
        R.index_folder(tmp_path, stat_embed, tmp_path / "db", limits=CI.ReadLimits(max_model_elements=20))


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


# ---------------------------------------------------------------------------- names and links
def test_links_and_names_that_are_not_utf8(tmp_path):
    folder = tmp_path / "f"
    good = save_model(folder / "A" / "model.safetensors", 1)
    odd = Path(os.fsdecode(os.fsencode(folder) + b"/caf\xe9-\xff.safetensors"))  # latin-1 bytes: not UTF-8
    save_model(odd, 2, {"task": "odd"})
    outside = save_model(tmp_path / "outside" / "secret.safetensors", 3)
    (folder / "out.pt").symlink_to(outside)
    (folder / "passwd.pt").symlink_to("/etc/passwd")
    (folder / "gone.pt").symlink_to(tmp_path / "nothing_here")
    (folder / "inside.safetensors").symlink_to(good)
    (folder / "outdir").symlink_to(outside.parent)
    os.mkfifo(folder / "fifo.pt")  # reading it would block forever
    files, problems = F.scan_checkpoints(folder)
    assert files == [odd, good]  # a folder's files, then its sub-folders, names sorted by their bytes
    causes = {Path(p.source).name: p.cause for p in problems}
    assert set(causes) == {"out.pt", "passwd.pt", "gone.pt", "inside.safetensors", "outdir", "fifo.pt"}
    assert "dangling" in causes["gone.pt"] and "not a regular file" in causes["fifo.pt"]
    assert all("not followed" in causes[n] for n in ("out.pt", "passwd.pt", "inside.safetensors", "outdir"))

    db = tmp_path / "db"
    run = R.index_folder(folder, stat_embed, db)
    assert run.added == 2 and len(run.skipped) == 6
    index = R.ModelIndex.load(db, embedder=stat_embed)
    row = index.get(next(m for m in index.model_ids() if m.startswith("caf")))
    assert row["model_id"].startswith("caf\\xe9-\\xff.safetensors@") and row["task"] == "odd"
    assert row["path"].endswith("caf\\xe9-\\xff.safetensors")
    assert index.catalogue.fids_of_file(os.fsencode(odd)) == [row["fid"]]  # the exact bytes are kept
    assert index.query(odd, k=1)[0]["model_id"] == row["model_id"]

    run = R.index_folder(folder, stat_embed, db, follow_symlinks=True)  # inside: followed; outside: never
    causes = {Path(p.source).name: p.cause for p in run.skipped}
    assert set(causes) == {"out.pt", "passwd.pt", "gone.pt", "outdir", "fifo.pt"}
    assert "outside the indexed folder" in causes["passwd.pt"] and "outside" in causes["outdir"]
    assert (run.added, run.unchanged) == (0, 3)  # the inside link's content is indexed already


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


def test_two_ranks_index_what_one_process_indexes(tmp_path, encoder_file):
    """torchrun, 2 gloo ranks: the same models and vectors as one process; a rerun finds everything unchanged."""
    folder = tmp_path / "ckpts"
    for i in range(30):
        save_model(folder / f"m{i:02d}.safetensors", i, {"task": f"t{i % 3}"})
    (folder / "bad.pt").write_text("not a checkpoint")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    args = ["index", "ckpts", "--encoder", str(encoder_file), "--db", "ddp", "--chunk-size", "4"]
    for expect in ("added 30, updated 0, unchanged 0, skipped 1;", "added 0, updated 0, unchanged 30, skipped 1;"):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               str(ROOT / "retrieval.py"), *args], cwd=tmp_path, capture_output=True, text=True,
                              timeout=300, env={**env, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0 and expect in proc.stdout, proc.stderr[-3000:]
        assert proc.stderr.count("skipped ckpts/bad.pt: ") == 1  # reported once, by rank 0
    cli("index", "ckpts", "--encoder", str(encoder_file), "--db", "one", cwd=tmp_path)
    a, b = R.ModelIndex.load(tmp_path / "ddp"), R.ModelIndex.load(tmp_path / "one")
    assert sorted(a.model_ids()) == sorted(b.model_ids()) and len(a) == 30
    for m in a.model_ids():
        np.testing.assert_allclose(a.embedding(m), b.embedding(m), rtol=0, atol=1e-5)
        assert a.get(m)["task"] == b.get(m)["task"]


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
