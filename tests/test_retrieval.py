"""The model index (retrieval.py): self-retrieval (also of permuted copies), incremental adds,
filters against brute force, approximate kinds (HNSW/IVF/auto) and their recall, save/load,
a save killed mid-write (SIGKILL in a subprocess), bad checkpoint files, sharding, the CLI."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import architecture as A
import retrieval as R
from symmetry import permute_hidden

ROOT = Path(__file__).resolve().parents[1]


def stat_embed(models) -> np.ndarray:
    """A permutation-invariant embedding: per-layer weight/bias statistics (4 layer slots)."""
    qs = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)
    rows = []
    for spec, sd in models:
        f: list[float] = []
        for i in range(4):
            if i < len(spec.layers):
                w = sd[f"layers.{i}.weight"].flatten().double()
                b = sd[f"layers.{i}.bias"].double()
                f += [w.mean(), w.std(), *torch.quantile(w, qs), b.mean(), b.std(), w.abs().mean()]
            else:
                f += [0.0] * 10
        rows.append([float(x) for x in f])
    return np.asarray(rows, dtype=np.float32)


SPECS = [A.mlp_spec(8, [6], 3, "relu"), A.mlp_spec(8, [7, 5], 3, "tanh"), A.mlp_spec(10, [6], 4, "relu"),
         A.cnn_spec((1, 6, 6), [4, 4], 3, 3, "relu")]


def make_records(n: int, seed: int = 0, prefix: str = "m") -> list[R.ModelRecord]:
    """n models over SPECS with distinct weights and varied metadata."""
    g = torch.Generator().manual_seed(seed)
    recs = []
    for j in range(n):
        spec = SPECS[j % len(SPECS)]
        scale = 0.5 + torch.rand(1, generator=g).item()
        sd = {k: scale * torch.randn(s, generator=g) for k, s in spec.param_shapes().items()}
        meta = {"dataset": f"ds{j % 3}", "task": f"task{j % 5}", "test_acc": (j % 10) / 10, "seed": j}
        recs.append(R.ModelRecord(f"{prefix}{j}", spec, sd, meta, path=f"/zoo/{prefix}{j}.safetensors"))
    return recs


@pytest.fixture(scope="module")
def records() -> list[R.ModelRecord]:
    return make_records(40)


@pytest.fixture(scope="module")
def index(records) -> R.ModelIndex:
    return R.ModelIndex.build(records, stat_embed, index_type="flat", chunk_size=16)


def clustered(n: int, d: int, seed: int = 0, clusters: int = 40) -> np.ndarray:
    """n points around the same ``clusters`` centres (fixed), noise drawn with ``seed``."""
    centres = np.random.default_rng(1234).normal(size=(clusters, d))
    rng = np.random.default_rng(seed)
    return (centres[rng.integers(0, clusters, n)] + 0.6 * rng.normal(size=(n, d))).astype(np.float32)


def plain_rows(n: int, start: int = 0) -> list[dict]:
    base = R.metadata_row("x", SPECS[0], {})
    return [{**base, "model_id": f"v{start + i}", "dataset": f"ds{(start + i) % 4}",
             "test_acc": ((start + i) % 7) / 7} for i in range(n)]


# ---------------------------------------------------------------------------- self-retrieval
def test_query_returns_the_model_itself_first(index, records):
    for r in records:
        by_id = index.query(r.model_id, k=3)
        by_weights = index.query((r.spec, r.state_dict), k=3)
        perm = permute_hidden(r.spec, r.state_dict, generator=torch.Generator().manual_seed(1))
        by_perm = index.query((r.spec, perm), k=3)
        for res in (by_id, by_weights, by_perm):
            assert res[0]["model_id"] == r.model_id and res[0]["rank"] == 1
            assert res[0]["similarity"] == pytest.approx(1.0, abs=1e-5)
            assert res[0]["similarity"] > res[1]["similarity"]
    assert [x["rank"] for x in by_id] == [1, 2, 3]
    got = index.query(records[6].model_id, k=1)[0]
    assert got["dataset"] == "ds0" and got["task"] == "task1" and got["seed"] == 6  # metadata and extras
    assert got["arch_id"] == records[6].spec.arch_id and got["input_shape"] == (10,) and got["num_outputs"] == 4
    assert index.query(records[5].model_id, k=2, exclude_self=True)[0]["model_id"] != records[5].model_id


def test_similarities_match_brute_force(index, records):
    emb = stat_embed([(r.spec, r.state_dict) for r in records]).astype(np.float64)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    sims = emb @ emb[7]
    want = [records[i].model_id for i in np.argsort(-sims)[:10]]
    got = index.query(records[7].model_id, k=10)
    assert [g["model_id"] for g in got] == want
    np.testing.assert_allclose([g["similarity"] for g in got], np.sort(sims)[::-1][:10], atol=1e-5)


def test_gnn_embedder_finds_the_permuted_trained_model(trained_models):
    """The real path: canonical neuron graphs through an equivariant GNN (random init)."""
    import gnn_encoder as G

    torch.manual_seed(0)
    enc = G.build_encoder("gnn", hidden_dim=16, global_dim=32, projection_dim=8, message_passing_steps=2)
    emb = R.Embedder(enc, batch_size=4)
    g = torch.Generator().manual_seed(0)
    recs = []
    for name, (spec, sd) in trained_models.items():
        recs.append(R.ModelRecord(name, spec, sd, {}))
        # a differently-initialised model of the same architecture: the permuted copy must not match it
        recs.append(R.ModelRecord(name + "_other", spec, {k: torch.randn(s, generator=g) * 0.3
                                                          for k, s in spec.param_shapes().items()}, {}))
    index = R.ModelIndex.build(recs, emb)
    assert index.embedder_info["kind"] == "encoder" and len(index) == len(recs)
    for name, (spec, sd) in trained_models.items():
        perm = permute_hidden(spec, sd, generator=g)
        res = index.query((spec, perm), k=2)
        assert res[0]["model_id"] == name, (name, res)
        np.testing.assert_allclose(emb([(spec, perm)])[0], emb([(spec, sd)])[0], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- adding
def test_add_then_query_without_rebuild(records):
    first, second = records[:20], records[20:]
    index = R.ModelIndex.build(first, stat_embed, index_type="flat")
    faiss_obj = index.vectors.faiss_index
    added = index.add(second)
    assert added == [r.model_id for r in second] and len(index) == len(records)
    assert index.vectors.faiss_index is faiss_obj  # appended, not rebuilt
    for r in second:
        assert index.query((r.spec, r.state_dict), k=1)[0]["model_id"] == r.model_id
    assert index.model_ids() == [r.model_id for r in records]
    with pytest.raises(ValueError, match="duplicate model ids"):
        index.add(second[:2])
    assert len(index) == len(records)  # the failed add left nothing behind (SQLite rolled back)
    assert index.add(second[:2], skip_existing=True) == []


def test_add_embeddings_validates():
    index = R.ModelIndex(8)
    with pytest.raises(ValueError, match=r"must be \(n, 8\)"):
        index.add_embeddings(np.ones((2, 5), np.float32), plain_rows(2))
    with pytest.raises(ValueError, match="non-finite"):
        index.add_embeddings(np.full((1, 8), np.nan, np.float32), plain_rows(1))
    with pytest.raises(ValueError, match="zero embedding"):
        index.add_embeddings(np.zeros((1, 8), np.float32), plain_rows(1))
    assert len(index) == 0


def test_vector_index_and_catalogue_stand_alone(tmp_path):
    """The two halves ModelIndex composes work on their own: vectors by id, rows by fid and filters."""
    import catalogue as C
    import vector_index as V

    x = clustered(50, 8)
    vec = V.VectorIndex(8, index_type="flat")
    vec.add(V.unit_rows(x, 8), np.arange(100, 150))
    sims, ids = vec.search(x[7], 3)
    assert ids[0, 0] == 107 and sims[0, 0] == pytest.approx(1.0, abs=1e-6)
    vec.write(str(tmp_path / "v.faiss"))
    back = V.VectorIndex.read(str(tmp_path / "v.faiss"), vec.state())
    np.testing.assert_array_equal(back.ids(), np.arange(100, 150))
    np.testing.assert_allclose(back.reconstruct(120), x[20] / np.linalg.norm(x[20]), atol=1e-6)
    with pytest.raises(ValueError, match="non-finite embeddings"):
        V.unit_rows(np.full((1, 8), np.inf), 8)

    cat = C.Catalogue()
    with cat.con:
        cat.insert([100, 101, 102], plain_rows(3))
    where, params = cat.where({"dataset": ["ds0", "ds2"]}, None)
    assert sorted(cat.fids_where(where, params).tolist()) == [100, 102] and cat.matching([101, 102], where, params) == {102}
    cat.write(tmp_path / "c.sqlite")
    again = C.Catalogue.read(tmp_path / "c.sqlite")
    assert again.model_ids() == ["v0", "v1", "v2"] and again.rows_by_fid([101])[101]["dataset"] == "ds1"
    assert again.next_fid() == 103 and again.spec(SPECS[0].arch_id) == SPECS[0]


# ---------------------------------------------------------------------------- filters
def test_filters_match_brute_force(index, records):
    emb = stat_embed([(r.spec, r.state_dict) for r in records]).astype(np.float64)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    q = records[4]  # spec SPECS[0]
    sims = emb @ emb[4]

    def brute(pred, k=5):
        order = [i for i in np.argsort(-sims) if pred(records[i])]
        return [records[i].model_id for i in order[:k]]

    cases = [
        ({"same_arch": True}, lambda r: r.spec.arch_id == q.spec.arch_id),
        ({"compatible": True}, lambda r: r.spec.input_shape == (8,) and r.spec.num_outputs == 3),
        ({"dataset": "ds1"}, lambda r: r.meta["dataset"] == "ds1"),
        ({"dataset": ["ds0", "ds2"], "min_test_acc": 0.5}, lambda r: r.meta["dataset"] != "ds1" and r.meta["test_acc"] >= 0.5),
        ({"arch_id": SPECS[3].arch_id, "max_test_acc": 0.3}, lambda r: r.spec == SPECS[3] and r.meta["test_acc"] <= 0.3),
        ({"input_shape": (1, 6, 6)}, lambda r: r.spec.is_cnn),
    ]
    for filters, pred in cases:
        got = [x["model_id"] for x in index.query(q.model_id, k=5, filters=filters)]
        assert got == brute(pred), filters
    # compatible (same input/output sizes) is wider than same architecture: the tanh 8->3 MLPs join
    compat = index.query(q.model_id, k=40, filters={"compatible": True})
    assert {x["arch_id"] for x in compat} == {SPECS[0].arch_id, SPECS[1].arch_id}
    assert index.query(q.model_id, k=5, filters={"dataset": "nope"}) == []
    with pytest.raises(ValueError, match="unknown filter"):
        index.query(q.model_id, filters={"datset": "ds1"})
    with pytest.raises(ValueError, match="needs a query with a known architecture"):
        index.query(index.embedding(q.model_id), filters={"same_arch": True})


# ---------------------------------------------------------------------------- approximate kinds
@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_index_recall_and_filtered_overfetch(kind, tmp_path):
    n, d = 12_000, 16
    x = clustered(n, d)
    index = R.ModelIndex(d, index_type=kind, nlist=64)
    for s in range(0, n, 2000):  # streamed adds; IVF trains once it has 39 * nlist vectors
        index.add_embeddings(x[s:s + 2000], plain_rows(2000, s))
        assert index.kind == ("flat" if kind == "ivf" and s + 2000 < 39 * 64 else kind)
    assert len(index) == n
    # retuned whenever the index grew by 1.25x since the last tuning
    assert index.tuning["recall_at_k"] >= 0.95 and 1.25 * index.tuning["n"] > n
    # recall@10 on fresh queries vs exact search
    q = clustered(200, d, seed=1)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    exact = np.argsort(-(qn @ xn.T), axis=1)[:, :10]
    _, got = index.search(q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, exact)])
    assert recall >= 0.9, (recall, index.tuning)
    assert index.query("v123", k=1)[0]["model_id"] == "v123"
    # a filter matching many rows takes the over-fetch path; the result equals exact filtered search
    where, params = index.catalogue.where({"dataset": "ds1"}, None)
    hits = index._filtered_search(x[5], 10, where, params, exact_limit=100)
    allowed = np.array([i % 4 == 1 for i in range(n)])
    sims = np.where(allowed, xn @ xn[5], -np.inf)
    want = set(np.argsort(-sims)[:10])
    assert len(hits) == 10 and all(allowed[f] for _, f in hits)
    assert len({f for _, f in hits} & want) >= 8
    index.save(tmp_path / "db")
    back = R.ModelIndex.load(tmp_path / "db")
    assert back.kind == kind and back.params == index.params
    np.testing.assert_array_equal(back.search(q[:20], 10)[1], index.search(q[:20], 10)[1])


def test_auto_starts_exact_and_moves_to_hnsw_once():
    d = 16
    x = clustered(6000, d)
    index = R.ModelIndex(d, index_type="auto", auto_threshold=4000)
    index.add_embeddings(x[:3000], plain_rows(3000))
    assert index.kind == "flat"
    before = index.query("v10", k=5)
    index.add_embeddings(x[3000:], plain_rows(3000, 3000))
    assert index.kind == "hnsw" and len(index) == 6000
    assert index.query("v10", k=1)[0]["model_id"] == "v10"
    assert index.query("v4500", k=1)[0]["model_id"] == "v4500"
    assert np.allclose(index.embedding("v10"), x[10] / np.linalg.norm(x[10]), atol=1e-6)
    assert before[0]["model_id"] == "v10"


# ---------------------------------------------------------------------------- persistence
def test_save_load_round_trip(index, records, tmp_path):
    db = tmp_path / "db"
    index.save(db)
    index.save(db)  # a second save replaces the version; only one version folder remains
    versions = [p for p in db.iterdir() if p.is_dir()]
    assert len(versions) == 1 and (db / "CURRENT").read_text().strip() == versions[0].name
    back = R.ModelIndex.load(db, embedder=stat_embed)
    assert len(back) == len(index) and back.model_ids() == index.model_ids()
    for r in records[:10]:
        assert back.query(r.model_id, k=5) == index.query(r.model_id, k=5)
        assert back.query((r.spec, r.state_dict), k=1)[0]["model_id"] == r.model_id
    assert back.info()["num_models"] == len(records) and back.info()["embedder"]["kind"] == "callable"
    with pytest.raises(ValueError, match="no embedder attached"):
        R.ModelIndex.load(db).query((records[0].spec, records[0].state_dict))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a model index"):
        index.save(tmp_path / "other")
    with pytest.raises(FileNotFoundError, match="no CURRENT"):
        R.ModelIndex.load(tmp_path / "other")


def test_load_detects_faiss_sqlite_mismatch(index, tmp_path):
    import sqlite3

    vdir = index.save(tmp_path / "db")
    con = sqlite3.connect(vdir / "meta.sqlite")
    con.execute("DELETE FROM models WHERE fid = 3")
    con.commit()
    con.close()
    with pytest.raises(ValueError, match="corrupt"):
        R.ModelIndex.load(tmp_path / "db")


KILL_SCRIPT = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {root!r})
    import numpy as np
    import retrieval as R
    import vector_index as V

    stage = sys.argv[2]
    index = R.ModelIndex.load(sys.argv[1])
    spec = index.spec(index.get(index.model_ids()[0])["arch_id"])
    rows = [R.metadata_row(f"new{{i}}", spec, {{}}) for i in range(5)]
    index.add_embeddings(np.random.default_rng(0).normal(size=(5, index.dim)).astype("float32"), rows)

    def pause():
        print("PAUSED", flush=True)
        time.sleep(60)

    if stage == "data":  # killed while the FAISS file is half written
        real = V.faiss.write_index
        def write_index(idx, path):
            real(idx, path)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
            pause()
        V.faiss.write_index = write_index
    else:  # killed after the new version folder is complete, before the CURRENT swap
        real_replace = os.replace
        def replace(src, dst):
            if str(dst).endswith("CURRENT"):
                pause()
            real_replace(src, dst)
        R.os.replace = replace
    index.save(sys.argv[1])
""")


@pytest.mark.parametrize("stage", ["data", "pointer"])
def test_kill_during_save_leaves_the_previous_index(index, records, tmp_path, stage):
    db = tmp_path / "db"
    index.save(db)
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT.format(root=str(ROOT)))
    proc = subprocess.Popen([sys.executable, str(script), str(db), stage], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "PAUSED", f"child did not reach the save ({line!r}, rc {proc.poll()})"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert any(p.name.endswith(".tmp") or p.is_dir() for p in db.iterdir() if p.name != "CURRENT")
    back = R.ModelIndex.load(db, embedder=stat_embed)
    assert len(back) == len(records) and "new0" not in back
    assert back.query(records[3].model_id, k=1)[0]["model_id"] == records[3].model_id
    back.add(make_records(2, seed=9, prefix="after"))  # the next save cleans up the leftovers
    back.save(db)
    assert len([p for p in db.iterdir() if p.name not in ("CURRENT", "WEIGHTZOO_INDEX")]) == 1
    assert len(R.ModelIndex.load(db)) == len(records) + 2


# ---------------------------------------------------------------------------- sharding
@pytest.mark.parametrize("world", [1, 3])
def test_rank_shards_cover_every_model_once_in_step(records, world):
    chunks = [list(R.iter_record_chunks(records, chunk_size=4, rank=r, world_size=world)) for r in range(world)]
    assert len({len(c) for c in chunks}) == 1  # same number of chunks on every rank (collectives stay in step)
    ids = [rec.model_id for c in chunks for recs, _, _ in c for rec in recs]
    assert sorted(ids) == sorted(r.model_id for r in records)
    assert all(len(recs) <= 4 for c in chunks for recs, _, _ in c)


# ---------------------------------------------------------------------------- checkpoint folders
def write_folder(folder: Path, records: list[R.ModelRecord]) -> dict[str, str]:
    """Good checkpoints (safetensors + spec sidecar with task metadata, a nested .pt) and bad files.

    Returns {bad file name: expected words of its cause}.
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    for i, r in enumerate(records):
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        side = {"spec": r.spec.to_dict(), "task": r.meta["task"], "dataset": r.meta["dataset"],
                "test_acc": r.meta["test_acc"]}
        if i == 3:  # a training-script checkpoint: {"state_dict": ...} in a .pt, Sequential keys
            torch.save({"state_dict": {k.replace("layers.", "net."): v for k, v in r.state_dict.items()}},
                       sub / f"{r.model_id}.pt")
            (sub / f"{r.model_id}.pt.spec.json").write_text(json.dumps(side))
            continue
        save_file({k: v.contiguous() for k, v in r.state_dict.items()}, str(sub / f"{r.model_id}.safetensors"))
        (sub / f"{r.model_id}.safetensors.spec.json").write_text(json.dumps(side))
    good = folder / "b" / f"{records[0].model_id}.safetensors"
    bad = folder / "bad"
    bad.mkdir()
    (bad / "truncated.safetensors").write_bytes(good.read_bytes()[:100])
    (bad / "empty.pt").write_bytes(b"")
    (bad / "garbage.pt").write_bytes(b"this is not a checkpoint" * 10)
    nan_sd = {k: v.clone() for k, v in records[0].state_dict.items()}
    nan_sd["layers.0.weight"][0, 0] = float("nan")
    save_file(nan_sd, str(bad / "nan.safetensors"))
    save_file({"0.weight": torch.randn(4, 3, 5)}, str(bad / "conv1d.safetensors"))
    return {"truncated.safetensors": "truncated", "empty.pt": "empty", "garbage.pt": "not a zip archive",
            "nan.safetensors": "NaN", "conv1d.safetensors": "unsupported"}


def file_id(root: Path, rel: str) -> str:
    """The model id of the checkpoint ``root/rel``: its relative path @ 12 hex digits of its content hash."""
    f = root / rel
    return f"{rel}@{R.content_sha256(f, R.sidecar_path(f))[:12]}"


def test_folder_build_reports_bad_files_and_indexes_the_rest(tmp_path, caplog):
    recs = make_records(12, seed=3)
    expected_bad = write_folder(tmp_path / "ckpts", recs)
    with caplog.at_level("WARNING", logger="retrieval"):
        index = R.ModelIndex.build(tmp_path / "ckpts", stat_embed, chunk_size=5)
    assert len(index) == len(recs)
    errors = {Path(e.source).name: e.cause for e in index.errors}
    assert set(errors) == set(expected_bad)
    for name, words in expected_bad.items():
        assert words.lower() in errors[name].lower(), (name, errors[name])
        assert name in caplog.text
    for i, r in enumerate(recs):
        rel = f"{'a' if i % 2 else 'b'}/{r.model_id}.{'pt' if i == 3 else 'safetensors'}"
        mid = file_id(tmp_path / "ckpts", rel)
        row = index.get(mid)
        assert row["task"] == r.meta["task"] and row["test_acc"] == pytest.approx(r.meta["test_acc"])
        assert row["path"] == str(tmp_path / "ckpts" / rel) and row["arch_id"] == r.spec.arch_id
        assert index.query(row["path"], k=1)[0]["model_id"] == mid  # query by file
    # adding the folder again indexes only what is new
    extra = make_records(2, seed=4, prefix="late")
    write_folder(tmp_path / "ckpts" / "late", extra)
    added = index.add(tmp_path / "ckpts", skip_existing=True)
    assert sorted(added) == sorted(file_id(tmp_path / "ckpts", f"late/{'a' if i % 2 else 'b'}/{r.model_id}.safetensors")
                                   for i, r in enumerate(extra))


def test_cli_index_query_info(tmp_path, capsys):
    """The real script in a subprocess (index); query table, JSON, filters and info in-process via main()."""
    from safetensors.torch import save_file

    import gnn_encoder as G

    recs = make_records(8, seed=5)
    write_folder(tmp_path / "ckpts", recs)
    torch.manual_seed(0)
    enc_path = tmp_path / "encoder.pt"
    G.save_encoder(str(enc_path), G.build_encoder("gnn", hidden_dim=16, global_dim=32, projection_dim=8,
                                                  message_passing_steps=2))
    db = tmp_path / "db"

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "retrieval.py"), *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300, check=True)

    out = cli("index", str(tmp_path / "ckpts"), "--encoder", str(enc_path), "--db", str(db), "--chunk-size", "3")
    assert "added 8, updated 0, unchanged 0, skipped 5;" in out.stdout and "holds 8 models" in out.stdout
    assert "truncated.safetensors" in out.stderr and "conv1d.safetensors" in out.stderr
    query_file = tmp_path / "ckpts" / "a" / f"{recs[1].model_id}.safetensors"
    assert R.main(["query", str(query_file), "-k", "3", "--db", str(db)]) == 0  # a fresh load, as the CLI
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["rank", "model", "similarity", "task", "architecture", "test_acc"]
    assert len(lines) == 2 + 3
    first = lines[2].split()
    query_id = file_id(tmp_path / "ckpts", f"a/{recs[1].model_id}.safetensors")
    assert first[0] == "1" and first[1] == query_id and float(first[2]) > 0.9999
    assert first[3] == recs[1].meta["task"] and first[4] == recs[1].spec.name

    assert R.main(["query", str(query_file), "-k", "10", "--db", str(db), "--same-arch", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res[0]["model_id"] == query_id
    assert len(res) == 2 and all(r["arch_id"] == recs[1].spec.arch_id for r in res)  # 8 models over 4 archs
    assert R.main(["info", "--db", str(db)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_models"] == 8 and info["embedder"]["encoder_sha256"] == R.file_sha256(enc_path)
    # the index embeds queries with the encoder it was built with; a changed encoder is refused
    enc_path.write_bytes(enc_path.read_bytes() + b"x")
    assert R.main(["query", str(query_file), "--db", str(db)]) == 0  # indexed content: its stored vector
    capsys.readouterr()
    new_file = tmp_path / "new.safetensors"  # content not in the index: must be embedded
    save_file(permute_hidden(recs[1].spec, recs[1].state_dict, torch.Generator().manual_seed(2)), str(new_file))
    (tmp_path / "new.safetensors.spec.json").write_text(json.dumps({"spec": recs[1].spec.to_dict()}))
    assert R.main(["query", str(new_file), "--db", str(db)]) == 1
    err = capsys.readouterr().err
    assert "changed since the index was built" in err and err.count("\n") == 1


def test_build_from_a_zoo_and_neighbours_match_exact(records):
    import pandas as pd

    import data_prep

    rows = [{"model_id": r.model_id, "arch_id": r.spec.arch_id, "task": r.meta["task"], "dataset": r.meta["dataset"],
             "test_acc": r.meta["test_acc"], "epoch": 7, "source": ""} for r in records]
    zoo = data_prep.ModelZooDataset(pd.DataFrame(rows), {r.spec.arch_id: r.spec for r in records},
                                    {r.model_id: dict(r.state_dict) for r in records})
    index = R.ModelIndex.build(zoo, stat_embed, chunk_size=7)
    assert index.model_ids() == [r.model_id for r in records]
    row = index.get(records[2].model_id)
    assert row["task"] == records[2].meta["task"] and row["epoch"] == 7 and row["path"] == ""
    ids, nbrs = index.neighbours(k=5)
    emb = stat_embed([(r.spec, r.state_dict) for r in records]).astype(np.float64)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    sims = emb @ emb.T
    np.fill_diagonal(sims, -np.inf)
    np.testing.assert_array_equal(nbrs, np.argsort(-sims, axis=1)[:, :5])
    streamed = R.ModelIndex.build((r for r in records), stat_embed, chunk_size=7)  # a generator, chunk by chunk
    assert streamed.model_ids() == ids and np.array_equal(streamed.neighbours(k=5)[1], nbrs)
