"""The model retrieval database: a FAISS index of model embeddings plus SQLite metadata.

``ModelIndex`` answers "which indexed models are most like this one?" by cosine similarity
(inner product of L2-normalised embeddings):

* FAISS holds the vectors behind an ``IndexIDMap2``; the id of a vector is the ``fid`` primary
  key of its row in the SQLite ``models`` table (model id, path, task, dataset, architecture,
  metrics), so the two always agree (checked on load).
* Index kinds: ``flat`` (exact ``IndexFlatIP``), ``hnsw`` (``IndexHNSWFlat``, M=32, efSearch
  tuned to a target recall@10), ``ivf`` (``IndexIVFFlat``, nprobe tuned the same way) and
  ``auto`` (exact below ``auto_threshold`` vectors, then moved once to HNSW). An approximate
  kind starts exact and is built when enough vectors are there (HNSW at once, IVF once it has
  enough training vectors), so ``add`` never needs a rebuild by the caller.
* ``save`` is atomic: a new version folder is written beside the old one, then a one-line
  ``CURRENT`` pointer file is swapped with ``os.replace``. A process killed at any point
  leaves the previous version loadable.
* Embeddings come from any callable ``list[(spec, state_dict)] -> (n, d) array``; the real
  one is :class:`Embedder` (neuron graphs of ``weight_to_graph`` -> a trained encoder of
  ``gnn_encoder``). Folders are read in chunks (memory bounded) and sharded across torchrun
  ranks (:func:`index_folder`).

CLI::

    python retrieval.py index FOLDER --encoder ENCODER.pt --db DB
    python retrieval.py query CHECKPOINT -k 10 --db DB
    python retrieval.py info --db DB
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import sqlite3
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import faiss
import numpy as np
import torch

from architecture import ArchitectureSpec

log = logging.getLogger("retrieval")

INDEX_TYPES = ("auto", "flat", "hnsw", "ivf")
FORMAT_VERSION = 1
# Metadata columns (besides fid/model_id/path); anything else in a model's metadata goes to ``extra``.
TEXT_COLUMNS = ("task", "dataset", "task_family", "arch_id", "arch_name", "arch_family", "activation", "input_shape")
NUMERIC_COLUMNS = ("num_inputs", "num_outputs", "num_params", "epoch", "train_acc", "test_acc",
                   "train_loss", "test_loss", "gen_gap")
COLUMNS = ("model_id", "path", *TEXT_COLUMNS, *NUMERIC_COLUMNS)
# Filter keys matched by equality (a value or a list of values).
_EQ_FILTERS = ("arch_id", "arch_name", "arch_family", "dataset", "task", "task_family", "activation",
               "num_inputs", "num_outputs", "model_id")

EmbedFn = Callable[[Sequence[tuple[ArchitectureSpec, Mapping[str, torch.Tensor]]]], np.ndarray]


# =========================================================================== records
@dataclass
class ModelRecord:
    """One model to index: its id, architecture, weights and (optional) metadata."""

    model_id: str
    spec: ArchitectureSpec
    state_dict: Mapping[str, torch.Tensor]
    meta: Mapping[str, Any]
    path: str = ""


@dataclass(frozen=True)
class SkippedModel:
    """A model that was not indexed: the file (or model id) and the cause."""

    source: str
    cause: str

    def __str__(self) -> str:
        return f"{self.source}: {self.cause}"


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.generic,)):
        return v.item()
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return str(v)


def metadata_row(model_id: str, spec: ArchitectureSpec, meta: Mapping[str, Any], path: str = "") -> dict:
    """The SQLite row of a model: architecture facts from ``spec``, the rest from ``meta``.

    Known columns (``COLUMNS``) are typed; other metadata keys are kept as JSON in ``extra``.
    NaN metrics are stored as NULL.
    """
    row: dict[str, Any] = {c: None for c in COLUMNS}
    extra = {}
    for k, v in meta.items():
        v = _jsonable(v)
        if isinstance(v, float) and math.isnan(v):
            v = None
        if k in COLUMNS:
            row[k] = v
        elif k != "spec_json":
            extra[k] = v
    row.update(
        model_id=str(model_id), path=str(path or row["path"] or ""),
        arch_id=spec.arch_id, arch_name=row["arch_name"] or spec.name, arch_family=row["arch_family"] or spec.family,
        input_shape=json.dumps(list(spec.input_shape)), num_inputs=spec.num_inputs, num_outputs=spec.num_outputs,
        num_params=spec.num_params(),
    )
    if row["activation"] is None:
        acts = {layer.activation for layer in spec.layers[:-1]}
        row["activation"] = acts.pop() if len(acts) == 1 else ("mixed" if acts else "identity")
    for c in NUMERIC_COLUMNS:
        if row[c] is not None and not isinstance(row[c], (int, float)):
            raise ValueError(f"model {model_id}: metadata {c}={row[c]!r} is not a number")
    row["extra"] = json.dumps(extra, sort_keys=True)
    row["spec_json"] = spec.to_json()
    return row


def _as_record(item: Any, i: int) -> ModelRecord:
    """A ZooModel-like object, a dict or a tuple -> ModelRecord."""
    if isinstance(item, ModelRecord):
        return item
    if isinstance(item, Mapping):
        return ModelRecord(str(item["model_id"]), item["spec"], item["state_dict"], item.get("meta", {}),
                           str(item.get("path", "")))
    if isinstance(item, tuple):
        if len(item) not in (3, 4):
            raise ValueError(f"model {i}: tuples must be (model_id, spec, state_dict[, meta]), got {len(item)} items")
        return ModelRecord(str(item[0]), item[1], item[2], item[3] if len(item) == 4 else {})
    if hasattr(item, "model_id") and hasattr(item, "spec") and hasattr(item, "state_dict"):
        meta = getattr(item, "meta", {}) or {}
        path = meta.get("path") or meta.get("source") or ""  # zoo rows of user checkpoints keep the file in "source"
        return ModelRecord(str(item.model_id), item.spec, item.state_dict, meta, str(path))
    raise TypeError(f"model {i}: cannot index a {type(item).__name__} (need a ZooModel, dict or tuple)")


# =========================================================================== checkpoints
def list_checkpoint_files(folder: str | os.PathLike) -> list[Path]:
    """Checkpoint files under ``folder`` (recursive, sorted so every rank sees the same order)."""
    from checkpoint_import import CHECKPOINT_SUFFIXES

    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder of checkpoints")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES)


def load_checkpoint(path: str | os.PathLike, root: str | os.PathLike | None = None) -> ModelRecord:
    """Read one checkpoint file with the zoo's loader (``checkpoint_import.read_checkpoint``: safetensors or
    ``.pt`` with ``weights_only=True``, optional spec sidecar, architecture inference).

    The model id is the path relative to ``root`` (the indexed folder), else the file name.
    Raises ``checkpoint_import.CheckpointError`` (file and cause) for a bad file.
    """
    from checkpoint_import import read_checkpoint

    p = Path(path)
    spec, sd, warns, side_meta = read_checkpoint(p)
    meta = dict(side_meta)
    if warns:
        meta["load_warning"] = "; ".join(warns)
    mid = str(p.relative_to(root)) if root is not None else p.name
    return ModelRecord(mid, spec, sd, meta, str(p.resolve()))


def _load_files(paths: Sequence[Path], root: Path | None) -> tuple[list[ModelRecord], list[SkippedModel]]:
    """Load a chunk of files; bad ones become SkippedModel (file and cause) instead of records."""
    from checkpoint_import import CheckpointError

    recs, bad = [], []
    for p in paths:
        try:
            recs.append(load_checkpoint(p, root))
        except CheckpointError as e:
            bad.append(SkippedModel(e.file, e.cause))
        except Exception as e:  # noqa: BLE001 - an unreadable user file must not abort the folder; it is reported
            bad.append(SkippedModel(str(p), f"the checkpoint loader failed: {type(e).__name__}: {e}"))
    return recs, bad


# =========================================================================== embedder
def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file (identifies the encoder an index was built with)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Embedder:
    """Weights -> embedding: canonical neuron graphs (``WeightToGraph``) through a trained encoder.

    Args:
        encoder: an encoder of ``gnn_encoder`` (``forward(Batch) -> (B, d)``).
        converter: a ``weight_to_graph.WeightToGraph``; default ``WeightToGraph(K, canonicalize=True)``
            with K from the encoder's ``edge_dim`` (K*K).
        device: where the encoder runs.
        batch_size: graphs per forward pass.
        source: the encoder file (recorded in the index so queries embed with the same encoder).
    """

    def __init__(self, encoder: torch.nn.Module, converter: Any = None, device: str | torch.device = "cpu",
                 batch_size: int = 64, source: str | None = None):
        from weight_to_graph import WeightToGraph

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if converter is None:
            k = int(round(math.sqrt(encoder.edge_dim)))
            if k * k != encoder.edge_dim:
                raise ValueError(f"encoder edge_dim {encoder.edge_dim} is not K*K for an integer K")
            converter = WeightToGraph(max_kernel=k, canonicalize=True)
        self.device = torch.device(device)
        self.encoder = encoder.to(self.device).eval()
        self.converter = converter
        self.batch_size = int(batch_size)
        self.source = None if source is None else str(Path(source).resolve())
        self._sha = file_sha256(source) if source is not None else None

    @classmethod
    def from_file(cls, path: str | os.PathLike, device: str | torch.device = "cpu", batch_size: int = 64) -> "Embedder":
        """Load an encoder saved by ``gnn_encoder.save_encoder``."""
        from gnn_encoder import load_encoder

        return cls(load_encoder(str(path), map_location="cpu"), device=device, batch_size=batch_size, source=str(path))

    @property
    def info(self) -> dict:
        """What identifies this embedder in a saved index (file and hash of the encoder)."""
        return {"kind": "encoder", "encoder_path": self.source, "encoder_sha256": self._sha,
                "encoder_name": getattr(self.encoder, "name", type(self.encoder).__name__),
                "max_kernel": self.converter.max_kernel, "canonicalize": self.converter.canonicalize}

    def check(self, spec: ArchitectureSpec, sd: Mapping[str, torch.Tensor]) -> None:
        """Raise ValueError if this model cannot be embedded (unsupported layers, bad weights)."""
        self.converter.structure(spec)
        spec.validate_state_dict(sd)

    @torch.no_grad()
    def embed(self, models: Sequence[tuple[ArchitectureSpec, Mapping[str, torch.Tensor]]]) -> np.ndarray:
        """``[(spec, state_dict), ...]`` -> float32 embeddings (n, d), batch by batch."""
        from torch_geometric.data import Batch

        out = []
        for s in range(0, len(models), self.batch_size):
            graphs = [self.converter.to_graph(spec, sd, model_idx=s + j)
                      for j, (spec, sd) in enumerate(models[s:s + self.batch_size])]
            z = self.encoder(Batch.from_data_list(graphs).to(self.device))  # (B, d)
            out.append(z.float().cpu().numpy())
        if not out:
            raise ValueError("Embedder.embed: no models given")
        return np.concatenate(out).astype(np.float32, copy=False)

    __call__ = embed


def _embedder_info(embedder: Any) -> dict:
    info = getattr(embedder, "info", None)
    if isinstance(info, dict):
        return info
    return {"kind": "callable", "name": getattr(embedder, "__qualname__", type(embedder).__name__)}


# =========================================================================== streaming sources
def iter_record_chunks(source: Any, chunk_size: int = 256, rank: int = 0, world_size: int = 1,
                       skip_ids: Iterable[str] = ()) -> Iterator[tuple[list[ModelRecord], list[SkippedModel]]]:
    """Yield ``(records, errors)`` chunk by chunk from a zoo, a folder or a list of models.

    Rank ``r`` of ``world_size`` gets items ``r::world_size``. Every rank yields the same number
    of chunks (possibly empty ones), so collective calls per chunk stay in step. Models whose id
    is in ``skip_ids`` are left out (already indexed).
    """
    skip = set(skip_ids)
    if isinstance(source, (str, os.PathLike)):
        root = Path(source)
        files = list_checkpoint_files(root)
        mine = files[rank::world_size]
        n_chunks = math.ceil(math.ceil(len(files) / world_size) / chunk_size) if files else 0
        for c in range(n_chunks):
            paths = [p for p in mine[c * chunk_size:(c + 1) * chunk_size] if str(p.relative_to(root)) not in skip]
            recs, errs = _load_files(paths, root) if paths else ([], [])
            yield recs, errs
        return
    if not hasattr(source, "__len__"):  # a generator of models: streamed as it comes
        if world_size != 1:
            raise ValueError("sharding across ranks needs a sized source (a zoo, a folder or a list)")
        it, start = iter(source), 0
        while chunk := list(itertools.islice(it, chunk_size)):
            recs = [_as_record(item, start + j) for j, item in enumerate(chunk)]
            start += len(chunk)
            yield [r for r in recs if r.model_id not in skip], []
        return
    n = len(source)
    get = source.__getitem__  # a ModelZooDataset (zoo[i] -> ZooModel) or a list of models
    idx = list(range(n))[rank::world_size]
    n_chunks = math.ceil(math.ceil(n / world_size) / chunk_size) if n else 0
    for c in range(n_chunks):
        recs = [_as_record(get(i), i) for i in idx[c * chunk_size:(c + 1) * chunk_size]]
        yield [r for r in recs if r.model_id not in skip], []


def embed_records(records: Sequence[ModelRecord], embedder: EmbedFn
                  ) -> tuple[np.ndarray, list[ModelRecord], list[SkippedModel]]:
    """Embed a chunk; models the embedder cannot take (``embedder.check`` raises) are reported, not embedded."""
    ok, bad = [], []
    check = getattr(embedder, "check", None)
    for r in records:
        if check is not None:
            try:
                check(r.spec, r.state_dict)
            except ValueError as e:
                bad.append(SkippedModel(r.path or r.model_id, f"cannot embed: {e}"))
                continue
        ok.append(r)
    if not ok:
        return np.zeros((0, 0), np.float32), [], bad
    emb = np.asarray(embedder([(r.spec, r.state_dict) for r in ok]), dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] != len(ok):
        raise ValueError(f"embedder returned shape {emb.shape} for {len(ok)} models (expected (n, d))")
    return emb, ok, bad


# =========================================================================== the index
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS models (
    fid INTEGER PRIMARY KEY, model_id TEXT NOT NULL UNIQUE, path TEXT,
    {", ".join(f"{c} TEXT" for c in TEXT_COLUMNS)},
    {", ".join(f"{c} REAL" for c in NUMERIC_COLUMNS)},
    extra TEXT);
CREATE TABLE IF NOT EXISTS archs (arch_id TEXT PRIMARY KEY, spec_json TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS models_arch ON models(arch_id);
CREATE INDEX IF NOT EXISTS models_shape ON models(input_shape, num_outputs);
CREATE INDEX IF NOT EXISTS models_dataset ON models(dataset);
CREATE INDEX IF NOT EXISTS models_task ON models(task);
"""


class ModelIndex:
    """FAISS vectors + SQLite metadata of indexed models (see the module docstring).

    Args:
        dim: embedding size.
        index_type: ``auto | flat | hnsw | ivf``.
        hnsw_m: HNSW graph degree M.
        ef_construction: HNSW build-time beam width. 80, not FAISS's 40: on clustered data (200k
            64-d vectors in 200 low-rank clusters) 40 needed efSearch 64 for recall@10 0.955, 80 gives
            0.986 at efSearch 32 for 1.4x the build time.
        ef_search: HNSW query beam width (retuned by :meth:`tune` when the HNSW index is built).
        nlist: IVF cells (default ``4*sqrt(n)`` at training time); nprobe starts at 16.
        auto_threshold: with ``auto``, the vector count at which the exact index moves to HNSW.
        target_recall: recall@10 that :meth:`tune` aims for.
        embedder: embeds models for ``build/add/query`` of files and state dicts.
    """

    def __init__(self, dim: int, index_type: str = "auto", hnsw_m: int = 32, ef_construction: int = 80,
                 ef_search: int = 64, nlist: int | None = None, auto_threshold: int = 100_000,
                 target_recall: float = 0.95, embedder: EmbedFn | None = None):
        if index_type not in INDEX_TYPES:
            raise ValueError(f"index_type must be one of {INDEX_TYPES}, got {index_type!r}")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = int(dim)
        self.index_type = index_type
        self.params = dict(hnsw_m=int(hnsw_m), ef_construction=int(ef_construction), ef_search=int(ef_search),
                           nlist=nlist, nprobe=16, auto_threshold=int(auto_threshold),
                           target_recall=float(target_recall), tune_margin=0.02, retune_growth=1.25)
        self.kind = "flat"  # the concrete index now held (an approximate kind starts exact)
        self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        self._db = sqlite3.connect(":memory:")
        self._db.executescript(_SCHEMA)
        self.embedder = embedder
        self.embedder_info: dict | None = _embedder_info(embedder) if embedder is not None else None
        self.errors: list[SkippedModel] = []  # models reported and skipped by build/add
        self.tuning: dict = {}
        self.created = time.strftime("%Y-%m-%dT%H:%M:%S")

    # ------------------------------------------------------------------ size / lookups
    def __len__(self) -> int:
        return int(self._index.ntotal)

    def __contains__(self, model_id: str) -> bool:
        return self._db.execute("SELECT 1 FROM models WHERE model_id=?", (model_id,)).fetchone() is not None

    def model_ids(self) -> list[str]:
        """Indexed model ids in insertion order."""
        return [r[0] for r in self._db.execute("SELECT model_id FROM models ORDER BY fid")]

    def get(self, model_id: str) -> dict:
        """The metadata row of an indexed model (KeyError if absent)."""
        rows = self._rows_where("model_id=?", (model_id,))
        if not rows:
            raise KeyError(f"model {model_id!r} is not in the index")
        return rows[0]

    def spec(self, arch_id: str) -> ArchitectureSpec:
        """The architecture spec stored for ``arch_id``."""
        r = self._db.execute("SELECT spec_json FROM archs WHERE arch_id=?", (arch_id,)).fetchone()
        if r is None:
            raise KeyError(f"architecture {arch_id!r} is not in the index")
        return ArchitectureSpec.from_json(r[0])

    def embedding(self, model_id: str) -> np.ndarray:
        """The stored (L2-normalised) embedding of an indexed model, (d,)."""
        return self._index.reconstruct(int(self._fid(model_id)))

    def _fid(self, model_id: str) -> int:
        r = self._db.execute("SELECT fid FROM models WHERE model_id=?", (model_id,)).fetchone()
        if r is None:
            raise KeyError(f"model {model_id!r} is not in the index")
        return int(r[0])

    def _rows_where(self, where: str, params: Sequence[Any]) -> list[dict]:
        cur = self._db.execute(f"SELECT fid, {', '.join(COLUMNS)}, extra FROM models WHERE {where}", params)
        names = [d[0] for d in cur.description]
        out = []
        for values in cur.fetchall():
            row = dict(zip(names, values))
            extra = json.loads(row.pop("extra") or "{}")
            row["input_shape"] = tuple(json.loads(row["input_shape"])) if row["input_shape"] else None
            for c in ("num_inputs", "num_outputs", "num_params", "epoch"):
                if row[c] is not None:
                    row[c] = int(row[c])
            out.append({**extra, **row})
        return out

    # ------------------------------------------------------------------ adding
    @classmethod
    def build(cls, source: Any, embedder: EmbedFn, index_type: str = "auto", chunk_size: int = 256,
              **index_kwargs: Any) -> "ModelIndex":
        """Index a ``ModelZooDataset``, a folder of checkpoints or a list of models.

        Embeds chunk by chunk (memory bounded) and adds each chunk; the dimension comes from the
        first embedded chunk. Bad checkpoints are logged and kept in ``.errors`` (file, cause).
        """
        index: ModelIndex | None = None
        pending_errors: list[SkippedModel] = []
        for recs, errs in iter_record_chunks(source, chunk_size):
            pending_errors += errs
            emb, ok, bad = embed_records(recs, embedder)
            pending_errors += bad
            if not ok:
                continue
            if index is None:
                index = cls(emb.shape[1], index_type=index_type, embedder=embedder, **index_kwargs)
            index.add_embeddings(emb, [metadata_row(r.model_id, r.spec, r.meta, r.path) for r in ok])
        if index is None:
            raise ValueError(f"build: nothing to index in {source!r}"
                             + (f" ({len(pending_errors)} bad: {pending_errors[0]} ...)" if pending_errors else ""))
        index._report(pending_errors)
        index._retune_if_grown()
        return index

    def add(self, source: Any, embedder: EmbedFn | None = None, chunk_size: int = 256,
            skip_existing: bool = False) -> list[str]:
        """Embed and add models incrementally (no rebuild); returns the added model ids.

        ``source`` as in :meth:`build`. With ``skip_existing`` models already indexed (same id)
        are left out; otherwise a duplicate id is an error.
        """
        embedder = self._embedder_for_add(embedder)
        skip = set(self.model_ids()) if skip_existing else set()
        added: list[str] = []
        errors: list[SkippedModel] = []
        for recs, errs in iter_record_chunks(source, chunk_size, skip_ids=skip):
            errors += errs
            emb, ok, bad = embed_records(recs, embedder)
            errors += bad
            if ok:
                self.add_embeddings(emb, [metadata_row(r.model_id, r.spec, r.meta, r.path) for r in ok])
                added += [r.model_id for r in ok]
        self._report(errors)
        self._retune_if_grown()
        return added

    def _embedder_for_add(self, embedder: EmbedFn | None) -> EmbedFn:
        if embedder is None:
            return self._get_embedder()
        info = _embedder_info(embedder)
        if self.embedder_info is not None and self.embedder_info.get("kind") == "encoder" and \
                info.get("encoder_sha256") != self.embedder_info.get("encoder_sha256"):
            raise ValueError(f"this index was built with encoder {self.embedder_info.get('encoder_path')} "
                             f"(sha256 {self.embedder_info.get('encoder_sha256')}); refusing to add embeddings of "
                             f"a different encoder ({info.get('encoder_path')})")
        if self.embedder is None:
            self.embedder = embedder
            self.embedder_info = self.embedder_info or info
        return embedder

    def _retune_if_grown(self) -> None:
        if self.kind != "flat" and self.params.get("tuned_at") != len(self):
            self.tune()

    def _report(self, errors: list[SkippedModel]) -> None:
        for e in errors:
            log.warning("skipped %s", e)
        self.errors += errors

    def add_embeddings(self, embeddings: np.ndarray, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Add precomputed embeddings (n, d) with their metadata rows (see :func:`metadata_row`).

        Returns the new FAISS ids. SQLite rows and vectors are added together: if FAISS fails
        the rows are rolled back.
        """
        x = np.ascontiguousarray(embeddings, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"embeddings must be (n, {self.dim}), got {x.shape}")
        if x.shape[0] != len(rows):
            raise ValueError(f"{x.shape[0]} embeddings but {len(rows)} metadata rows")
        if not np.isfinite(x).all():
            bad = [rows[i]["model_id"] for i in np.where(~np.isfinite(x).all(1))[0][:5]]
            raise ValueError(f"non-finite embeddings for models {bad}")
        norms = np.linalg.norm(x, axis=1)
        if (norms == 0).any():
            raise ValueError(f"zero embedding for models {[rows[i]['model_id'] for i in np.where(norms == 0)[0][:5]]}")
        x = x / norms[:, None]  # cosine similarity = inner product of unit vectors
        start = int(self._db.execute("SELECT COALESCE(MAX(fid), -1) + 1 FROM models").fetchone()[0])
        ids = np.arange(start, start + len(rows), dtype=np.int64)
        cols = ("fid", *COLUMNS, "extra")
        try:
            with self._db:  # one transaction: rolled back if anything below raises
                self._db.executemany(
                    f"INSERT INTO models ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                    [(int(i), *(r.get(c) for c in COLUMNS), r.get("extra", "{}")) for i, r in zip(ids, rows)])
                self._db.executemany("INSERT OR IGNORE INTO archs VALUES (?, ?)",
                                     {(r["arch_id"], r["spec_json"]) for r in rows if r.get("spec_json")})
                self._add_vectors(x, ids)
        except sqlite3.IntegrityError as e:
            dup = [r["model_id"] for r in rows if r["model_id"] in self]
            raise ValueError(f"cannot add: duplicate model ids ({e}); already indexed: {dup[:5]}") from e
        if self.kind != "flat" and len(self) >= self.params["retune_growth"] * self.params.get("tuned_at", 0):
            self.tune()  # the index grew since the last tuning: recall at the same setting drops
        return ids

    # ------------------------------------------------------------------ index kinds
    def _target_kind(self, n: int) -> str:
        """The index kind for ``n`` vectors (approximate kinds start exact; see the class docstring)."""
        if self.index_type == "hnsw" or (self.index_type == "auto" and n >= self.params["auto_threshold"]):
            return "hnsw"
        if self.index_type == "ivf" and n >= self._ivf_min_train():
            return "ivf"
        return "flat"

    def _nlist(self, n: int) -> int:
        return int(self.params["nlist"] or max(1, int(4 * math.sqrt(n))))

    def _ivf_min_train(self) -> int:
        # FAISS wants ~39 training points per centroid; with the default nlist=4*sqrt(n) this holds
        # from n ~ 25k, so smaller IVF indexes stay exact (and exact is fast there).
        nlist = self.params["nlist"]
        return 39 * nlist if nlist else 25_000

    def _add_vectors(self, x: np.ndarray, ids: np.ndarray) -> None:
        """Add unit rows; when the size calls for another kind, move to it once (ids kept)."""
        target = self._target_kind(len(self) + len(x))
        if target != self.kind:
            if len(self):
                old_ids = faiss.vector_to_array(self._index.id_map).astype(np.int64)
                old_x = self._index.index.reconstruct_n(0, len(self))  # (n_old, d)
                x, ids = np.concatenate([old_x, x]), np.concatenate([old_ids, ids])
            self._index = self._new_index(target, x)  # IVF trains on every vector seen so far
            self.kind = target
        self._index.add_with_ids(x, ids)

    def _new_index(self, kind: str, train: np.ndarray) -> faiss.IndexIDMap2:
        if kind == "flat":
            inner = faiss.IndexFlatIP(self.dim)
        elif kind == "hnsw":
            inner = faiss.IndexHNSWFlat(self.dim, self.params["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = self.params["ef_construction"]
            inner.hnsw.efSearch = self.params["ef_search"]
        else:
            nlist = self._nlist(len(train))
            self.params["nlist_used"] = nlist
            inner = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
            inner.train(train)
            inner.set_direct_map_type(faiss.DirectMap.Array)  # reconstruct for query-by-model-id (IDMap2 maps ids to positions)
            inner.nprobe = self.params["nprobe"]
        return faiss.IndexIDMap2(inner)

    def _inner(self) -> Any:
        return faiss.downcast_index(self._index.index)

    def tune(self, k: int = 10, n_queries: int = 200, seed: int = 0) -> dict:
        """Raise HNSW efSearch / IVF nprobe until recall@k vs exact search reaches the target.

        Leave-one-out: the queries are indexed vectors and each query's own id is dropped from
        both result lists, so recall is measured on its k true neighbours (a new point relates
        to the data as an indexed point relates to the others). Measured here this overstates
        the recall of fresh queries by up to ~0.03 at small efSearch, so the target is
        ``target_recall + tune_margin``. Returns (and stores in ``.tuning``) every setting tried.
        """
        self.params["tuned_at"] = len(self)
        if self.kind == "flat" or len(self) <= k + 1:
            self.tuning = {"kind": self.kind, "exact": self.kind == "flat", "n": len(self)}
            return self.tuning
        rng = np.random.default_rng(seed)
        ids = faiss.vector_to_array(self._index.id_map).astype(np.int64)
        qi = rng.choice(len(ids), size=min(n_queries, len(ids)), replace=False)
        q = self._index.reconstruct_batch(ids[qi])  # (q, d) unit rows
        if self.kind == "hnsw":  # HNSW keeps its vectors in an IndexFlat: search it exactly, no copy
            exact = faiss.downcast_index(self._inner().storage)
        else:
            exact = faiss.IndexFlatIP(self.dim)
            exact.add(self._index.index.reconstruct_n(0, len(self)))
        _, gt = exact.search(q, k + 1)
        own = ids[qi]
        truth = [set([j for j in row if j != o][:k]) for row, o in zip(ids[gt], own)]
        goal = min(1.0, self.params["target_recall"] + self.params.get("tune_margin", 0.02))
        steps = [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024]
        if self.kind == "ivf":
            steps = [s for s in [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048] if s <= self.params["nlist_used"]]
        trials = {}
        chosen = steps[-1]
        for s in steps:
            self._set_search_param(s)
            _, got = self._index.search(q, k + 1)
            rec = float(np.mean([len(set([j for j in row if j != o and j >= 0][:k]) & t) / k
                                 for row, o, t in zip(got, own, truth)]))
            trials[s] = rec
            if rec >= goal:
                chosen = s
                break
        self._set_search_param(chosen)
        name = "ef_search" if self.kind == "hnsw" else "nprobe"
        self.params[name] = chosen
        self.tuning = {"kind": self.kind, "param": name, "value": chosen, "recall_at_k": trials[chosen],
                       "k": k, "trials": {str(a): b for a, b in trials.items()}, "n_queries": len(qi), "n": len(self)}
        if trials[chosen] < goal:
            log.warning("tune: leave-one-out recall@%d %.3f below %.2f at the largest %s=%d", k, trials[chosen],
                        goal, name, chosen)
        return self.tuning

    def _set_search_param(self, value: int) -> None:
        inner = self._inner()
        if self.kind == "hnsw":
            inner.hnsw.efSearch = int(value)
        elif self.kind == "ivf":
            inner.nprobe = int(value)

    # ------------------------------------------------------------------ querying
    def search(self, embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw FAISS search of (n, d) embeddings (normalised here) -> (similarities, fids), each (n, k)."""
        q = np.ascontiguousarray(np.atleast_2d(embeddings), dtype=np.float32)
        if q.shape[1] != self.dim:
            raise ValueError(f"query embeddings have dim {q.shape[1]}, the index has {self.dim}")
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        return self._index.search(q, k)

    def neighbours(self, k: int, exclude_self: bool = True, batch: int = 4096) -> tuple[list[str], np.ndarray]:
        """k nearest indexed models of every indexed model, by the index (batched searches).

        Returns (model ids in insertion order, (n, k) int array of row positions in that list;
        -1 where fewer than k exist). Compare with exact search via e.g. precision@k of labels.
        """
        ids = self.model_ids()
        fids = np.array([r[0] for r in self._db.execute("SELECT fid FROM models ORDER BY fid")], dtype=np.int64)
        pos = {int(f): i for i, f in enumerate(fids)}
        out = np.full((len(ids), k), -1, dtype=np.int64)
        extra = 1 if exclude_self else 0
        for s in range(0, len(fids), batch):
            q = self._index.reconstruct_batch(fids[s:s + batch])
            _, got = self._index.search(q, min(k + extra, len(fids)))
            for j, row in enumerate(got):
                own = fids[s + j]
                nb = [pos[int(f)] for f in row if f >= 0 and not (exclude_self and f == own)][:k]
                out[s + j, :len(nb)] = nb
        return ids, out

    def query(self, q: Any, k: int = 10, filters: Mapping[str, Any] | None = None,
              exclude_self: bool = False) -> list[dict]:
        """The k most similar indexed models, best first.

        Args:
            q: a checkpoint file (str/Path of an existing file), an indexed model id (str), an
                embedding (d,) or a ``(spec, state_dict)`` pair.
            k: number of results.
            filters: any of ``arch_id, arch_name, arch_family, dataset, task, task_family,
                activation, num_inputs, num_outputs, model_id`` (a value or a list of values),
                ``input_shape`` (tuple), ``same_arch`` (True = the query's architecture, or a
                spec), ``compatible`` (True = same input shape and number of outputs as the
                query, or a spec), ``min_<m>`` / ``max_<m>`` for m in ``NUMERIC_COLUMNS``
                (e.g. ``min_test_acc``).
            exclude_self: drop the query model itself (model-id queries).

        Returns:
            dicts with ``rank`` (1-based), ``similarity`` (cosine) and the model's metadata.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        vec, spec, self_fid = self._resolve(q)
        where, params = self._where(filters or {}, spec)
        extra = 1 if (exclude_self and self_fid is not None) else 0
        if where is None:
            sims, fids = self.search(vec, min(k + extra, len(self)))
            hits = [(float(s), int(f)) for s, f in zip(sims[0], fids[0]) if f >= 0]
        else:
            hits = self._filtered_search(vec, k + extra, where, params)
        if extra:
            hits = [h for h in hits if h[1] != self_fid]
        hits = hits[:k]
        if not hits:
            return []
        rows = {r["fid"]: r for r in self._rows_where("fid IN (SELECT value FROM json_each(?))",
                                                       (json.dumps([f for _, f in hits]),))}
        return [{"rank": i + 1, "similarity": s, **rows[f]} for i, (s, f) in enumerate(hits)]

    def _resolve(self, q: Any) -> tuple[np.ndarray, ArchitectureSpec | None, int | None]:
        """query argument -> (embedding (d,), its spec if known, its fid if indexed)."""
        if isinstance(q, np.ndarray) or isinstance(q, torch.Tensor):
            v = np.asarray(q, dtype=np.float32).reshape(-1)
            return v, None, None
        if isinstance(q, tuple) and len(q) == 2 and isinstance(q[0], ArchitectureSpec):
            return self._embed_one(q[0], q[1]), q[0], None
        if isinstance(q, (str, os.PathLike)):
            if isinstance(q, str) and q in self:
                row = self.get(q)
                return self.embedding(q), self.spec(row["arch_id"]), int(row["fid"])
            p = Path(q)
            if p.is_file():
                rec = load_checkpoint(p)
                return self._embed_one(rec.spec, rec.state_dict), rec.spec, None
            raise KeyError(f"{q!r} is neither an indexed model id nor a checkpoint file")
        raise TypeError(f"cannot query with a {type(q).__name__}")

    def _embed_one(self, spec: ArchitectureSpec, sd: Mapping[str, torch.Tensor]) -> np.ndarray:
        emb = self._get_embedder()
        check = getattr(emb, "check", None)
        if check is not None:
            check(spec, sd)
        return np.asarray(emb([(spec, sd)]), dtype=np.float32)[0]

    def _get_embedder(self) -> EmbedFn:
        if self.embedder is not None:
            return self.embedder
        info = self.embedder_info or {}
        if info.get("kind") != "encoder":
            raise ValueError(f"this index has no embedder attached (built with {info or 'precomputed embeddings'}); "
                             "pass embedder= to load() or add()")
        path = info["encoder_path"]
        if not Path(path).is_file():
            raise FileNotFoundError(f"the encoder this index was built with is gone: {path}")
        sha = file_sha256(path)
        if sha != info["encoder_sha256"]:
            raise ValueError(f"encoder {path} changed since the index was built (sha256 {sha[:12]} != "
                             f"{info['encoder_sha256'][:12]}); re-index or restore the encoder")
        self.embedder = Embedder.from_file(path)
        return self.embedder

    def _where(self, filters: Mapping[str, Any], spec: ArchitectureSpec | None) -> tuple[str | None, list]:
        clauses, params = [], []
        for key, val in filters.items():
            if val is None or val is False:
                continue
            if key in _EQ_FILTERS:
                vals = list(val) if isinstance(val, (list, tuple, set)) else [val]
                clauses.append(f"{key} IN ({', '.join('?' * len(vals))})")
                params += vals
            elif key == "input_shape":
                clauses.append("input_shape = ?")
                params.append(json.dumps([int(s) for s in val]))
            elif key in ("same_arch", "compatible"):
                ref = val if isinstance(val, ArchitectureSpec) else spec
                if ref is None:
                    raise ValueError(f"filter {key}=True needs a query with a known architecture "
                                     "(a checkpoint, model id or (spec, state_dict)), or pass a spec")
                if key == "same_arch":
                    clauses.append("arch_id = ?")
                    params.append(ref.arch_id)
                else:
                    clauses.append("input_shape = ? AND num_outputs = ?")
                    params += [json.dumps(list(ref.input_shape)), ref.num_outputs]
            elif key.startswith(("min_", "max_")) and key[4:] in NUMERIC_COLUMNS:
                clauses.append(f"{key[4:]} {'>=' if key.startswith('min_') else '<='} ?")
                params.append(float(val))
            else:
                raise ValueError(f"unknown filter {key!r}; known: {sorted(_EQ_FILTERS)} + input_shape, same_arch, "
                                 f"compatible, min_/max_ of {list(NUMERIC_COLUMNS)}")
        return (" AND ".join(clauses) if clauses else None), params

    def _filtered_search(self, vec: np.ndarray, k: int, where: str, params: list,
                         exact_limit: int = 5000) -> list[tuple[float, int]]:
        """Top-k among rows matching ``where``: exact over the matches when they are few; else
        over-fetch from the index (sized by the filter's selectivity) and keep the matches,
        growing the fetch until k pass or every vector was seen."""
        n_match = self._db.execute(f"SELECT COUNT(*) FROM models WHERE {where}", params).fetchone()[0]
        if n_match == 0:
            return []
        q = vec / max(float(np.linalg.norm(vec)), 1e-12)
        if n_match <= exact_limit:
            fids = np.array([r[0] for r in self._db.execute(f"SELECT fid FROM models WHERE {where}", params)],
                            dtype=np.int64)
            sims = self._index.reconstruct_batch(fids) @ q  # (n_match,)
            top = np.argsort(-sims, kind="stable")[:k]
            return [(float(sims[i]), int(fids[i])) for i in top]
        kk = min(len(self), int(2 * k * len(self) / n_match) + k)
        while True:
            sims, fids = self.search(q, kk)
            cand = [(float(s), int(f)) for s, f in zip(sims[0], fids[0]) if f >= 0]
            ok = {r[0] for r in self._db.execute(
                f"SELECT fid FROM models WHERE fid IN (SELECT value FROM json_each(?)) AND {where}",
                [json.dumps([f for _, f in cand]), *params])}
            hits = [h for h in cand if h[1] in ok]
            if len(hits) >= k or kk >= len(self):
                return hits[:k]
            kk = min(4 * kk, len(self))

    # ------------------------------------------------------------------ persistence
    def info(self) -> dict:
        """Size, index kind and parameters, embedder, and counts per architecture / dataset."""
        def counts(col: str) -> dict:
            return {str(a): n for a, n in self._db.execute(
                f"SELECT {col}, COUNT(*) FROM models GROUP BY {col} ORDER BY COUNT(*) DESC")}

        return {"num_models": len(self), "dim": self.dim, "index_type": self.index_type, "kind": self.kind,
                "params": dict(self.params), "tuning": self.tuning, "embedder": self.embedder_info,
                "created": self.created, "architectures": counts("arch_name"), "datasets": counts("dataset"),
                "tasks": counts("task")}

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically: a new version folder, then swap the ``CURRENT`` pointer (os.replace).

        Readers and a crash at any moment see either the old or the new complete version.
        Older versions are deleted only after the swap. Returns the version folder.
        """
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        if any(root.iterdir()) and not (root / "CURRENT").exists() and not _is_index_dir(root):
            raise FileExistsError(f"{root}: exists and is not a model index (no CURRENT file); refusing to write")
        name = f"v{time.time_ns()}-{uuid.uuid4().hex[:8]}"
        tmp = root / f"{name}.tmp"
        tmp.mkdir()
        faiss.write_index(self._index, str(tmp / "index.faiss"))
        dst = sqlite3.connect(tmp / "meta.sqlite")
        with dst:
            self._db.backup(dst)
        dst.close()
        manifest = {"format": FORMAT_VERSION, "dim": self.dim, "index_type": self.index_type, "kind": self.kind,
                    "params": self.params, "num_models": len(self), "embedder": self.embedder_info,
                    "tuning": self.tuning, "created": self.created, "saved": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        for f in tmp.iterdir():
            _fsync(f)
        os.replace(tmp, root / name)
        _fsync(root)
        pointer = root / f"CURRENT.{uuid.uuid4().hex[:8]}.tmp"
        pointer.write_text(name + "\n")
        _fsync(pointer)
        os.replace(pointer, root / "CURRENT")  # the commit point
        _fsync(root)
        for old in root.iterdir():  # previous versions and leftovers of killed saves
            if old.name != name and old.name != "CURRENT" and old.name.startswith(("v", "CURRENT.")):
                shutil.rmtree(old) if old.is_dir() else old.unlink()
        return root / name

    @classmethod
    def load(cls, path: str | os.PathLike, embedder: EmbedFn | None = None) -> "ModelIndex":
        """Load the version ``CURRENT`` points to; checks FAISS ids == SQLite rows.

        Without ``embedder``, file queries load the encoder recorded at build time (hash checked).
        """
        root = Path(path)
        pointer = root / "CURRENT"
        if not pointer.is_file():
            raise FileNotFoundError(f"{root}: not a model index (no CURRENT file)")
        vdir = root / pointer.read_text().strip()
        try:
            manifest = json.loads((vdir / "manifest.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{vdir}/manifest.json: unreadable ({e})") from e
        if manifest.get("format") != FORMAT_VERSION:
            raise ValueError(f"{vdir}: index format {manifest.get('format')}, this code reads {FORMAT_VERSION}")
        self = cls(manifest["dim"], index_type=manifest["index_type"])
        self.params.update(manifest["params"])
        self.kind, self.tuning, self.created = manifest["kind"], manifest["tuning"], manifest["created"]
        self.embedder_info = manifest["embedder"]
        self._index = faiss.read_index(str(vdir / "index.faiss"))
        if not isinstance(self._index, faiss.IndexIDMap2):
            raise ValueError(f"{vdir}/index.faiss: expected an IndexIDMap2, got {type(self._index).__name__}")
        src = sqlite3.connect(f"file:{vdir / 'meta.sqlite'}?mode=ro", uri=True)
        self._db = sqlite3.connect(":memory:")
        src.backup(self._db)
        src.close()
        ids = np.sort(faiss.vector_to_array(self._index.id_map))
        fids = np.fromiter((r[0] for r in self._db.execute("SELECT fid FROM models ORDER BY fid")), dtype=np.int64)
        if not np.array_equal(ids, fids):
            raise ValueError(f"{vdir}: FAISS holds {len(ids)} ids and SQLite {len(fids)} rows and they differ; "
                             "the index is corrupt")
        self._set_search_param(self.params["ef_search"] if self.kind == "hnsw" else self.params["nprobe"])
        self.embedder = embedder
        return self


def _is_index_dir(root: Path) -> bool:
    return all(p.name.startswith(("v", "CURRENT")) for p in root.iterdir())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# =========================================================================== distributed folder indexing
def index_folder(folder: str | os.PathLike, embedder: EmbedFn, db: str | os.PathLike, index_type: str = "auto",
                 chunk_size: int = 256, **index_kwargs: Any) -> ModelIndex | None:
    """Index (or extend) the database ``db`` with the checkpoints of ``folder``; saves it.

    Under torchrun, rank r embeds files ``r::world_size`` chunk by chunk; after each chunk the
    ranks ``all_gather_object`` their (embeddings, metadata, errors) and rank 0 adds them and
    finally saves. Memory per rank is bounded by ``chunk_size`` x world size. Files already
    indexed (same path relative to ``folder``) are skipped. Returns the index on rank 0, None
    on the others.
    """
    import torch.distributed as dist

    from runtime import cleanup_distributed, setup_distributed

    env = setup_distributed("cpu")  # joins torchrun's process group (gloo) when RANK/WORLD_SIZE are set
    rank, world = env.rank, env.world_size
    try:
        index = None
        skip: list = [[]]
        if rank == 0:
            if (Path(db) / "CURRENT").is_file():
                index = ModelIndex.load(db)
                index._embedder_for_add(embedder)
                skip = [index.model_ids()]
        if world > 1:
            dist.broadcast_object_list(skip, src=0)
        errors: list[SkippedModel] = []
        for recs, errs in iter_record_chunks(folder, chunk_size, rank, world, skip_ids=skip[0]):
            emb, ok, bad = embed_records(recs, embedder)
            part = (emb, [metadata_row(r.model_id, r.spec, r.meta, r.path) for r in ok], errs + bad)
            parts = [None] * world
            if world > 1:
                dist.all_gather_object(parts, part)
            else:
                parts = [part]
            if rank != 0:
                continue
            for p_emb, p_rows, p_err in parts:
                errors += p_err
                if not p_rows:
                    continue
                if index is None:
                    index = ModelIndex(p_emb.shape[1], index_type=index_type, embedder=embedder, **index_kwargs)
                index.add_embeddings(p_emb, p_rows)
        if rank != 0:
            return None
        if index is None:
            raise ValueError(f"{folder}: no checkpoint could be indexed ({len(errors)} bad files"
                             + (f", first: {errors[0]})" if errors else ")"))
        index._report(errors)
        index._retune_if_grown()
        index.save(db)
        return index
    finally:
        if env.owns_group:
            cleanup_distributed()


# =========================================================================== CLI
def format_table(results: Sequence[Mapping[str, Any]]) -> str:
    """A readable table: rank, model, similarity, task, architecture, accuracy."""
    header = ("rank", "model", "similarity", "task", "architecture", "test_acc")
    rows = [(str(r["rank"]), str(r["model_id"]), f"{r['similarity']:.4f}", str(r.get("task") or "?"),
             str(r.get("arch_name") or r.get("arch_id")),
             "?" if r.get("test_acc") is None else f"{r['test_acc']:.3f}") for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="retrieval.py", description="Index checkpoints by their weights; find similar models.")
    sub = p.add_subparsers(dest="command", required=True)
    pi = sub.add_parser("index", help="index (or extend an index with) a folder of checkpoints")
    pi.add_argument("folder")
    pi.add_argument("--encoder", required=True, help="trained encoder file (gnn_encoder.save_encoder)")
    pi.add_argument("--db", required=True, help="index folder (created or extended)")
    pi.add_argument("--index-type", default="auto", choices=INDEX_TYPES)
    pi.add_argument("--chunk-size", type=int, default=256, help="files read and embedded at once (per rank)")
    pi.add_argument("--batch-size", type=int, default=64, help="graphs per encoder forward pass")
    pi.add_argument("--device", default="cpu", help="device of the encoder (cpu, cuda, cuda:1, ...)")
    pq = sub.add_parser("query", help="models most similar to a checkpoint (or an indexed model id)")
    pq.add_argument("file", help="checkpoint file, or the id of an indexed model")
    pq.add_argument("-k", type=int, default=10)
    pq.add_argument("--db", required=True)
    pq.add_argument("--same-arch", action="store_true", help="only models of the query's architecture")
    pq.add_argument("--compatible", action="store_true", help="only models with the query's input shape and outputs")
    pq.add_argument("--dataset", default=None)
    pq.add_argument("--task", default=None)
    pq.add_argument("--min-test-acc", type=float, default=None)
    pq.add_argument("--exclude-self", action="store_true", help="drop the query model itself (model-id queries)")
    pq.add_argument("--json", action="store_true", help="print JSON instead of a table")
    pn = sub.add_parser("info", help="what an index holds")
    pn.add_argument("--db", required=True)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (see the module docstring)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.command == "index":
        embedder = Embedder.from_file(args.encoder, device=args.device, batch_size=args.batch_size)
        t0 = time.perf_counter()
        index = index_folder(args.folder, embedder, args.db, index_type=args.index_type, chunk_size=args.chunk_size)
        if index is not None:
            # each skipped file was already logged (stderr) with its cause
            print(f"indexed {len(index)} models ({len(index.errors)} skipped) into {args.db} "
                  f"[{index.kind}] in {time.perf_counter() - t0:.1f}s")
        return 0
    index = ModelIndex.load(args.db)
    if args.command == "info":
        print(json.dumps(index.info(), indent=2))
        return 0
    filters = {"same_arch": args.same_arch, "compatible": args.compatible, "dataset": args.dataset,
               "task": args.task, "min_test_acc": args.min_test_acc}
    results = index.query(args.file, k=args.k, filters=filters, exclude_self=args.exclude_self)
    print(json.dumps(results, indent=2, default=str) if args.json else format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
