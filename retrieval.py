"""The model retrieval database: a FAISS index of model embeddings plus SQLite metadata.

``ModelIndex`` answers "which indexed models are most like this one?" by cosine similarity
(inner product of L2-normalised embeddings). It composes two halves that know nothing of each
other:

* ``vector_index.VectorIndex``: the vectors behind a FAISS ``IndexIDMap2`` (exact, HNSW, IVF or
  auto, moved between kinds as it grows, search parameters tuned to a target recall);
* ``catalogue.Catalogue``: the SQLite ``models`` table (model id, path, task, dataset,
  architecture, metrics) and its query filters.

The id of a vector is the ``fid`` primary key of its row, so the two always agree (checked on load).

* A folder of checkpoints is read by ``checkpoint_folder``: a model is known by its content (the
  SHA-256 of the file and its sidecar), so re-indexing finds what is new, a rewritten file replaces
  its old version, and a bad file is skipped with one line naming it and the cause.
* ``save`` is atomic (``index_store``): a new version folder is written beside the old one, then a
  one-line ``CURRENT`` pointer file is swapped with ``os.replace``. A process killed at any point
  leaves the previous version loadable; :func:`index_folder` commits every chunk of files, so a
  killed run loses at most one chunk and the same command continues where it stopped.
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
import itertools
import json
import logging
import math
import os
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from architecture import ArchitectureSpec
from catalogue import COLUMNS, NUMERIC_COLUMNS, TEXT_COLUMNS, Catalogue, metadata_row  # noqa: F401 (re-exported)
from checkpoint_folder import (DEFAULT_LIMITS, ModelRecord, ReadLimits, SkippedModel, content_sha256,  # noqa: F401
                               display_path, file_sha256, iter_folder_chunks, load_checkpoint, sidecar_path)
from index_store import check_index_folder, current_version, write_version
from vector_index import INDEX_TYPES, VectorIndex, unit_rows

log = logging.getLogger("retrieval")

FORMAT_VERSION = 2  # 2: content identity (sha256, path_bytes), the index folder marker

EmbedFn = Callable[[Sequence[tuple[ArchitectureSpec, Mapping[str, torch.Tensor]]]], np.ndarray]


# =========================================================================== records
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


# =========================================================================== embedder
class Embedder:
    """Weights -> embedding: canonical neuron graphs (``WeightToGraph``) through a trained encoder.

    Args:
        encoder: an encoder of ``gnn_encoder`` (``forward(Batch) -> (B, d)``).
        converter: a ``weight_to_graph.WeightToGraph``; default ``WeightToGraph(K, canonicalize=True,
            flatten_summary=...)`` with K from the encoder's ``edge_dim`` (K*K) and flatten heads over maps
            wider than K summarized unless the encoder was loaded from a file saved before that existed
            (``gnn_encoder.load_encoder`` sets ``encoder.flatten_summary``).
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
            converter = WeightToGraph(max_kernel=k, canonicalize=True,
                                      flatten_summary=getattr(encoder, "flatten_summary", True))
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
                "max_kernel": self.converter.max_kernel, "canonicalize": self.converter.canonicalize,
                "flatten_summary": self.converter.flatten_summary}

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
Chunk = tuple[list[ModelRecord], list[SkippedModel], int]  # (records to index, skipped, unchanged count)


def iter_record_chunks(source: Any, chunk_size: int = 256, rank: int = 0, world_size: int = 1,
                       skip_ids: Iterable[str] = (), follow_symlinks: bool = False,
                       limits: ReadLimits = DEFAULT_LIMITS) -> Iterator[Chunk]:
    """Yield ``(records, skipped, unchanged)`` chunk by chunk from a zoo, a folder or a list of models.

    Rank ``r`` of ``world_size`` gets items ``r::world_size``. Every rank yields the same number
    of chunks (possibly empty ones), so collective calls per chunk stay in step. Models whose id
    (for a folder: whose content hash) is in ``skip_ids`` are counted as unchanged, not yielded.
    A folder is read with ``checkpoint_folder.iter_folder_chunks`` (bad files become ``skipped``; sizes are
    checked against ``limits`` before anything is allocated).
    """
    skip = set(skip_ids)
    if isinstance(source, (str, os.PathLike)):
        yield from iter_folder_chunks(source, chunk_size, rank, world_size, skip, follow_symlinks, limits)
        return

    def split(recs: list[ModelRecord]) -> Chunk:
        keep = [r for r in recs if r.model_id not in skip]
        return keep, [], len(recs) - len(keep)

    if not hasattr(source, "__len__"):  # a generator of models: streamed as it comes
        if world_size != 1:
            raise ValueError("sharding across ranks needs a sized source (a zoo, a folder or a list)")
        it, start = iter(source), 0
        while chunk := list(itertools.islice(it, chunk_size)):
            recs = [_as_record(item, start + j) for j, item in enumerate(chunk)]
            start += len(chunk)
            yield split(recs)
        return
    n = len(source)
    get = source.__getitem__  # a ModelZooDataset (zoo[i] -> ZooModel) or a list of models
    idx = list(range(n))[rank::world_size]
    n_chunks = math.ceil(math.ceil(n / world_size) / chunk_size) if n else 0
    for c in range(n_chunks):
        yield split([_as_record(get(i), i) for i in idx[c * chunk_size:(c + 1) * chunk_size]])


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def embed_records(records: Sequence[ModelRecord], embedder: EmbedFn
                  ) -> tuple[np.ndarray, list[ModelRecord], list[SkippedModel]]:
    """Embed a chunk -> (embeddings (n, d), the records embedded, the ones skipped with their cause).

    A model the embedder cannot take (``embedder.check`` raises), whose embedding fails or is not
    finite/nonzero, is skipped; if the batch fails, each model is embedded alone so that only the
    failing ones are skipped.
    """
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

    def run(recs: Sequence[ModelRecord]) -> np.ndarray:
        emb = np.asarray(embedder([(r.spec, r.state_dict) for r in recs]), dtype=np.float32)
        if emb.ndim != 2 or emb.shape[0] != len(recs):
            raise ValueError(f"embedder returned shape {emb.shape} for {len(recs)} models (expected (n, d))")
        return emb

    if not ok:
        return np.zeros((0, 0), np.float32), [], bad
    try:
        emb = run(ok)
    except (ValueError, RuntimeError, MemoryError) as e:  # find the model(s) that fail, keep the rest
        log.info("embedding a chunk of %d models failed (%s); embedding them one by one", len(ok), _first_line(e))
        rows, kept = [], []
        for r in ok:
            try:
                rows.append(run([r]))
                kept.append(r)
            except (ValueError, RuntimeError, MemoryError) as e1:
                bad.append(SkippedModel(r.path or r.model_id, f"the encoder failed on it: {_first_line(e1)}"))
        if not kept:
            return np.zeros((0, 0), np.float32), [], bad
        emb, ok = np.concatenate(rows), kept
    good = np.isfinite(emb).all(1) & (np.abs(emb).sum(1) > 0)
    for i in np.where(~good)[0]:
        bad.append(SkippedModel(ok[i].path or ok[i].model_id, "the encoder gave a non-finite or zero embedding"))
    return emb[good], [r for r, g in zip(ok, good) if g], bad


def prepare_chunk(records: Sequence[ModelRecord], embedder: EmbedFn
                  ) -> tuple[np.ndarray, list[dict], list[SkippedModel]]:
    """Records -> (embeddings, their metadata rows, skipped): metadata checked first, then embedded."""
    valid, rows_of, bad = [], {}, []
    for r in records:
        try:
            rows_of[id(r)] = metadata_row(r.model_id, r.spec, r.meta, r.path, r.sha256, r.path_bytes)
            valid.append(r)
        except ValueError as e:
            bad.append(SkippedModel(r.path or r.model_id, str(e)))
    emb, ok, bad_emb = embed_records(valid, embedder)
    return emb, [rows_of[id(r)] for r in ok], bad + bad_emb


# =========================================================================== the index
class ModelIndex:
    """A FAISS vector index (``vector_index.VectorIndex``) composed with an SQLite catalogue
    (``catalogue.Catalogue``) of the indexed models: a vector's id is the ``fid`` of its row.

    Args:
        dim: embedding size.
        index_type: ``auto | flat | hnsw | ivf`` (see ``vector_index``).
        embedder: embeds models for ``build/add/query`` of files and state dicts.
        **index_kwargs: ``hnsw_m, ef_construction, ef_search, nlist, auto_threshold, target_recall``
            of :class:`vector_index.VectorIndex`.
    """

    def __init__(self, dim: int, index_type: str = "auto", embedder: EmbedFn | None = None, **index_kwargs: Any):
        self.vectors = VectorIndex(dim, index_type=index_type, **index_kwargs)
        self.catalogue = Catalogue()
        self.embedder = embedder
        self.embedder_info: dict | None = _embedder_info(embedder) if embedder is not None else None
        self.errors: list[SkippedModel] = []  # models reported and skipped by build/add
        self.created = time.strftime("%Y-%m-%dT%H:%M:%S")

    # the vector index's settings, read through
    dim = property(lambda self: self.vectors.dim)
    index_type = property(lambda self: self.vectors.index_type)
    kind = property(lambda self: self.vectors.kind, doc="the concrete FAISS index held (flat | hnsw | ivf)")
    params = property(lambda self: self.vectors.params)
    tuning = property(lambda self: self.vectors.tuning)

    # ------------------------------------------------------------------ size / lookups
    def __len__(self) -> int:
        return len(self.vectors)

    def __contains__(self, model_id: str) -> bool:
        return model_id in self.catalogue

    def model_ids(self) -> list[str]:
        """Indexed model ids in insertion order."""
        return self.catalogue.model_ids()

    def get(self, model_id: str) -> dict:
        """The metadata row of an indexed model (KeyError if absent)."""
        rows = self.catalogue.rows_where("model_id=?", (model_id,))
        if not rows:
            raise KeyError(f"model {model_id!r} is not in the index")
        return rows[0]

    def spec(self, arch_id: str) -> ArchitectureSpec:
        """The architecture spec stored for ``arch_id``."""
        return self.catalogue.spec(arch_id)

    def embedding(self, model_id: str) -> np.ndarray:
        """The stored (L2-normalised) embedding of an indexed model, (d,)."""
        return self.vectors.reconstruct(self.catalogue.fid(model_id))

    # ------------------------------------------------------------------ adding
    @classmethod
    def build(cls, source: Any, embedder: EmbedFn, index_type: str = "auto", chunk_size: int = 256,
              follow_symlinks: bool = False, limits: ReadLimits = DEFAULT_LIMITS, **index_kwargs: Any) -> "ModelIndex":
        """Index a ``ModelZooDataset``, a folder of checkpoints or a list of models.

        Embeds chunk by chunk (memory bounded) and adds each chunk (:meth:`upsert`); the dimension
        comes from the first embedded chunk. Bad checkpoints are logged and kept in ``.errors``
        (file, cause). ``follow_symlinks``: see ``checkpoint_folder.scan_checkpoints``; ``limits``: the size
        caps of ``checkpoint_import.ReadLimits``.
        """
        index: ModelIndex | None = None
        skipped: list[SkippedModel] = []
        for recs, bad, _ in iter_record_chunks(source, chunk_size, follow_symlinks=follow_symlinks, limits=limits):
            emb, rows, bad_rows = prepare_chunk(recs, embedder)
            skipped += bad + bad_rows
            if not rows:
                continue
            if index is None:
                index = cls(emb.shape[1], index_type=index_type, embedder=embedder, **index_kwargs)
            index.upsert(emb, rows)
        if index is None:
            raise ValueError(f"build: nothing to index in {source!r}"
                             + (f" ({len(skipped)} bad: {skipped[0]} ...)" if skipped else ""))
        index._report(skipped)
        index.vectors.retune_if_grown()
        return index

    def add(self, source: Any, embedder: EmbedFn | None = None, chunk_size: int = 256,
            skip_existing: bool = False, follow_symlinks: bool = False, limits: ReadLimits = DEFAULT_LIMITS
            ) -> list[str]:
        """Embed and add models incrementally (no rebuild); returns the added (or updated) model ids.

        ``source`` as in :meth:`build`. Files are known by their content: a file whose content is
        indexed is left out, one rewritten since it was indexed replaces its old version. For zoos
        and lists, ``skip_existing`` leaves out models already indexed (same id); otherwise a
        duplicate id is an error.
        """
        embedder = self._embedder_for_add(embedder)
        folder = isinstance(source, (str, os.PathLike))
        skip = self.catalogue.shas() if folder else (set(self.model_ids()) if skip_existing else set())
        changed: list[str] = []
        skipped: list[SkippedModel] = []
        for recs, bad, _ in iter_record_chunks(source, chunk_size, skip_ids=skip, follow_symlinks=follow_symlinks,
                                               limits=limits):
            emb, rows, bad_rows = prepare_chunk(recs, embedder)
            skipped += bad + bad_rows
            if rows:
                added, updated, _ = self.upsert(emb, rows)
                changed += added + updated
        self._report(skipped)
        self.vectors.retune_if_grown()
        return changed

    def upsert(self, embeddings: np.ndarray, rows: Sequence[Mapping[str, Any]]
               ) -> tuple[list[str], list[str], list[str]]:
        """Add models by content identity -> (added, updated, unchanged) model ids.

        A row whose ``sha256`` is indexed (or repeats an earlier row) is unchanged; a row of a file
        (``path_bytes``) indexed with other content replaces that version (updated); other rows are
        added. Rows without ``sha256`` (zoos, lists) are always added: a duplicate model id is an error.
        """
        keep, added, updated, unchanged, old = [], [], [], [], []
        seen: set[str] = set()
        for i, r in enumerate(rows):
            sha = r.get("sha256")
            if sha is not None and (sha in seen or self.catalogue.fid_of_sha(sha) is not None):
                unchanged.append(r["model_id"])
                continue
            if sha is not None:
                seen.add(sha)
            prev = self.catalogue.fids_of_file(r["path_bytes"]) if r.get("path_bytes") else []
            (updated if prev else added).append(r["model_id"])
            old += prev
            keep.append(i)
        if old:
            self._remove_fids(old)
        if keep:
            self.add_embeddings(np.asarray(embeddings)[keep], [rows[i] for i in keep])
        return added, updated, unchanged

    def remove(self, model_ids: Iterable[str]) -> None:
        """Drop indexed models (KeyError for an unknown id)."""
        self._remove_fids([self.catalogue.fid(m) for m in model_ids])

    def _remove_fids(self, fids: Sequence[int]) -> None:
        with self.catalogue.con:  # rows come back if the vectors cannot be removed
            self.catalogue.delete(fids)
            self.vectors.remove(np.asarray(fids, dtype=np.int64))

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

    def _report(self, errors: list[SkippedModel]) -> None:
        for e in errors:
            log.warning("skipped %s", e)
        self.errors += errors

    def add_embeddings(self, embeddings: np.ndarray, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Add precomputed embeddings (n, d) with their metadata rows (see :func:`metadata_row`).

        Returns the new vector ids (fids). SQLite rows and vectors are added together: if FAISS
        fails the rows are rolled back.
        """
        if len(embeddings) != len(rows):
            raise ValueError(f"{len(embeddings)} embeddings but {len(rows)} metadata rows")
        x = unit_rows(embeddings, self.dim, lambda pos: [rows[i]["model_id"] for i in pos])
        start = self.catalogue.next_fid()
        ids = np.arange(start, start + len(rows), dtype=np.int64)
        try:
            with self.catalogue.con:  # one transaction: rolled back if anything below raises
                self.catalogue.insert(ids, rows)
                self.vectors.add(x, ids)
        except sqlite3.IntegrityError as e:
            dup = [r["model_id"] for r in rows if r["model_id"] in self]
            raise ValueError(f"cannot add: duplicate model ids ({e}); already indexed: {dup[:5]}") from e
        self.vectors.retune_after_growth()
        return ids

    def tune(self, k: int = 10, n_queries: int = 200, seed: int = 0) -> dict:
        """Tune the approximate index's search parameter to the target recall (``VectorIndex.tune``)."""
        return self.vectors.tune(k, n_queries, seed)

    # ------------------------------------------------------------------ querying
    def search(self, embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw FAISS search of (n, d) embeddings (normalised here) -> (similarities, fids), each (n, k)."""
        return self.vectors.search(embeddings, k)

    def neighbours(self, k: int, exclude_self: bool = True, batch: int = 4096) -> tuple[list[str], np.ndarray]:
        """k nearest indexed models of every indexed model, by the index (batched searches).

        Returns (model ids in insertion order, (n, k) int array of row positions in that list;
        -1 where fewer than k exist). Compare with exact search via e.g. precision@k of labels.
        """
        ids = self.model_ids()
        fids = self.catalogue.fids()
        pos = {int(f): i for i, f in enumerate(fids)}
        out = np.full((len(ids), k), -1, dtype=np.int64)
        extra = 1 if exclude_self else 0
        for s in range(0, len(fids), batch):
            q = self.vectors.reconstruct_batch(fids[s:s + batch])
            _, got = self.vectors.search(q, min(k + extra, len(fids)))
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
        where, params = self.catalogue.where(filters or {}, spec)
        extra = 1 if (exclude_self and self_fid is not None) else 0
        if where is None:
            sims, fids = self.vectors.search(vec, min(k + extra, len(self)))
            hits = [(float(s), int(f)) for s, f in zip(sims[0], fids[0]) if f >= 0]
        else:
            hits = self._filtered_search(vec, k + extra, where, params)
        if extra:
            hits = [h for h in hits if h[1] != self_fid]
        hits = hits[:k]
        if not hits:
            return []
        rows = self.catalogue.rows_by_fid(f for _, f in hits)
        return [{"rank": i + 1, "similarity": s, **rows[f]} for i, (s, f) in enumerate(hits)]

    def _resolve(self, q: Any) -> tuple[np.ndarray, ArchitectureSpec | None, int | None]:
        """query argument -> (embedding (d,), its spec if known, its fid if indexed)."""
        if isinstance(q, np.ndarray) or isinstance(q, torch.Tensor):
            v = np.asarray(q, dtype=np.float32).reshape(-1)
            return v, None, None
        if isinstance(q, tuple) and len(q) == 2 and isinstance(q[0], ArchitectureSpec):
            return self._embed_one(q[0], q[1]), q[0], None
        if isinstance(q, (str, os.PathLike)):
            p = Path(q)
            if p.is_file():  # a file wins over a model id of the same name: it may hold another model
                fid = self.catalogue.fid_of_sha(content_sha256(p, sidecar_path(p)))
                if fid is not None:  # this very content is indexed: its stored vector
                    row = self.catalogue.rows_by_fid([fid])[fid]
                    return self.vectors.reconstruct(fid), self.spec(row["arch_id"]), fid
                rec = load_checkpoint(p)
                return self._embed_one(rec.spec, rec.state_dict), rec.spec, None
            if isinstance(q, str) and q in self:
                row = self.get(q)
                return self.embedding(q), self.spec(row["arch_id"]), int(row["fid"])
            raise KeyError(f"{display_path(q)!r} is neither an indexed model id nor a checkpoint file")
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

    def _filtered_search(self, vec: np.ndarray, k: int, where: str, params: list,
                         exact_limit: int = 5000) -> list[tuple[float, int]]:
        """Top-k among rows matching ``where``: exact over the matches when they are few; else
        over-fetch from the index (sized by the filter's selectivity) and keep the matches,
        growing the fetch until k pass or every vector was seen."""
        n_match = self.catalogue.count_where(where, params)
        if n_match == 0:
            return []
        q = vec / max(float(np.linalg.norm(vec)), 1e-12)
        if n_match <= exact_limit:
            fids = self.catalogue.fids_where(where, params)
            sims = self.vectors.reconstruct_batch(fids) @ q  # (n_match,)
            top = np.argsort(-sims, kind="stable")[:k]
            return [(float(sims[i]), int(fids[i])) for i in top]
        kk = min(len(self), int(2 * k * len(self) / n_match) + k)
        while True:
            sims, fids = self.vectors.search(q, kk)
            cand = [(float(s), int(f)) for s, f in zip(sims[0], fids[0]) if f >= 0]
            ok = self.catalogue.matching((f for _, f in cand), where, params)
            hits = [h for h in cand if h[1] in ok]
            if len(hits) >= k or kk >= len(self):
                return hits[:k]
            kk = min(4 * kk, len(self))

    # ------------------------------------------------------------------ persistence
    def info(self) -> dict:
        """Size, index kind and parameters, embedder, and counts per architecture / dataset."""
        c = self.catalogue
        return {"num_models": len(self), "dim": self.dim, "index_type": self.index_type, "kind": self.kind,
                "params": dict(self.params), "tuning": self.tuning, "embedder": self.embedder_info,
                "created": self.created, "architectures": c.counts("arch_name"), "datasets": c.counts("dataset"),
                "tasks": c.counts("task")}

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically as a new version of the index folder ``path`` (``index_store.write_version``).

        Readers and a crash at any moment see either the old or the new complete version. ``path``
        must be absent, empty or an index made here (``index_store.check_index_folder``). Returns the
        version folder.
        """
        def write_files(folder: Path) -> None:
            self.vectors.write(str(folder / "index.faiss"))
            self.catalogue.write(folder / "meta.sqlite")
            manifest = {"format": FORMAT_VERSION, **self.vectors.state(), "num_models": len(self),
                        "embedder": self.embedder_info, "created": self.created,
                        "saved": time.strftime("%Y-%m-%dT%H:%M:%S")}
            (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))

        return write_version(path, write_files)

    @classmethod
    def load(cls, path: str | os.PathLike, embedder: EmbedFn | None = None) -> "ModelIndex":
        """Load the version ``CURRENT`` points to; checks FAISS ids == SQLite rows.

        Without ``embedder``, file queries load the encoder recorded at build time (hash checked).
        """
        vdir = current_version(path)
        try:
            manifest = json.loads((vdir / "manifest.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{display_path(vdir)}/manifest.json: unreadable ({e})") from e
        if manifest.get("format") != FORMAT_VERSION:
            raise ValueError(f"{display_path(vdir)}: index format {manifest.get('format')}, this code reads "
                             f"{FORMAT_VERSION}; index the checkpoints again into a new folder")
        self = cls.__new__(cls)
        self.vectors = VectorIndex.read(str(vdir / "index.faiss"), manifest)
        self.catalogue = Catalogue.read(vdir / "meta.sqlite")
        self.created, self.embedder_info = manifest["created"], manifest["embedder"]
        self.embedder, self.errors = embedder, []
        ids, fids = np.sort(self.vectors.ids()), self.catalogue.fids()
        if not np.array_equal(ids, fids):
            raise ValueError(f"{display_path(vdir)}: FAISS holds {len(ids)} ids and SQLite {len(fids)} rows and "
                             "they differ; the index is corrupt")
        return self


# =========================================================================== distributed folder indexing
@dataclass
class FolderRun:
    """What one :func:`index_folder` run did (rank 0): counts of files, the skipped ones, the index."""

    index: ModelIndex | None
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    skipped: list[SkippedModel] = field(default_factory=list)
    commits: int = 0

    def summary(self) -> str:
        return (f"added {self.added}, updated {self.updated}, unchanged {self.unchanged}, "
                f"skipped {len(self.skipped)}")


def _open_for_update(db: str | os.PathLike, embedder: EmbedFn) -> ModelIndex | None:
    """The index at ``db`` to extend (its encoder must be ``embedder``'s), or None for a new one."""
    root = check_index_folder(db)
    if not (root / "CURRENT").is_file():
        return None
    index = ModelIndex.load(root)
    index._embedder_for_add(embedder)
    return index


def index_folder(folder: str | os.PathLike, embedder: EmbedFn, db: str | os.PathLike, index_type: str = "auto",
                 chunk_size: int = 256, commit_every: int | None = None, follow_symlinks: bool = False,
                 limits: ReadLimits = DEFAULT_LIMITS, **index_kwargs: Any) -> FolderRun | None:
    """Index (or extend) the database ``db`` with the checkpoints of ``folder``, committing as it goes.

    Files are known by content (``checkpoint_folder``): a file whose content is indexed is counted
    unchanged and not read again, a file rewritten since replaces its old version, a bad file is
    skipped with one logged line (file and cause) and the run goes on. Every ``commit_every``
    files (default: ``chunk_size``) the index is saved as a new atomic version, so a killed run
    loses at most that many files' work and the same command continues where it stopped.

    Under torchrun, rank r reads and embeds files ``r::world_size`` chunk by chunk; after each chunk
    the ranks ``all_gather_object`` their (embeddings, rows, skipped, unchanged) and rank 0 adds and
    commits. Memory per rank is bounded by ``chunk_size`` x world size, and per file by ``limits``
    (``checkpoint_import.ReadLimits``, checked before tensors are allocated). Returns the :class:`FolderRun`
    on rank 0, None on the others.
    """
    import torch.distributed as dist

    from runtime import cleanup_distributed, setup_distributed

    commit_every = chunk_size if commit_every is None else int(commit_every)
    if chunk_size < 1 or commit_every < 1:
        raise ValueError(f"chunk_size and commit_every must be >= 1, got {chunk_size}, {commit_every}")
    env = setup_distributed("cpu")  # joins torchrun's process group (gloo) when RANK/WORLD_SIZE are set
    rank, world = env.rank, env.world_size
    try:
        run, shared = None, [frozenset(), None]  # (known content hashes, error on rank 0)
        if rank == 0:
            try:
                run = FolderRun(_open_for_update(db, embedder))
                shared[0] = frozenset(run.index.catalogue.shas()) if run.index is not None else frozenset()
            except (FileExistsError, ValueError) as e:
                shared[1] = e
        if world > 1:
            dist.broadcast_object_list(shared, src=0)
        if shared[1] is not None:
            raise shared[1]
        pending, dirty = 0, False
        for recs, bad, unchanged in iter_folder_chunks(folder, chunk_size, rank, world, shared[0], follow_symlinks,
                                                       limits):
            emb, rows, bad_rows = prepare_chunk(recs, embedder)
            part = (emb, rows, bad + bad_rows, unchanged)
            parts = [part]
            if world > 1:
                parts = [None] * world
                dist.all_gather_object(parts, part)
            if rank != 0:
                continue
            for p_emb, p_rows, p_bad, p_unchanged in parts:
                for b in p_bad:
                    log.warning("skipped %s", b)
                run.skipped += p_bad
                run.unchanged += p_unchanged
                pending += len(p_rows) + len(p_bad) + p_unchanged
                if not p_rows:
                    continue
                if run.index is None:
                    run.index = ModelIndex(p_emb.shape[1], index_type=index_type, embedder=embedder, **index_kwargs)
                added, updated, same = run.index.upsert(p_emb, p_rows)
                run.added, run.updated, run.unchanged = run.added + len(added), run.updated + len(updated), \
                    run.unchanged + len(same)
                dirty = dirty or bool(added or updated)
            if dirty and pending >= commit_every:
                run.index.vectors.retune_if_grown()
                run.index.save(db)
                run.commits, pending, dirty = run.commits + 1, 0, False
        if rank != 0:
            return None
        if run.index is None:
            raise ValueError(f"{display_path(folder)}: no checkpoint could be indexed ({len(run.skipped)} skipped"
                             + (f", first: {run.skipped[0]})" if run.skipped else ")"))
        run.index.errors += run.skipped
        if dirty:
            run.index.vectors.retune_if_grown()
            run.index.save(db)
            run.commits += 1
        return run
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
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="on an error, show the traceback, not one line")
    p = argparse.ArgumentParser(prog="retrieval.py", description="Index checkpoints by their weights; find similar models.")
    sub = p.add_subparsers(dest="command", required=True)
    pi = sub.add_parser("index", parents=[common], help="index (or extend an index with) a folder of checkpoints")
    pi.add_argument("folder")
    pi.add_argument("--encoder", required=True, help="trained encoder file (gnn_encoder.save_encoder)")
    pi.add_argument("--db", required=True, help="index folder (created, or extended if made by this tool)")
    pi.add_argument("--index-type", default="auto", choices=INDEX_TYPES)
    pi.add_argument("--chunk-size", type=int, default=256, help="files read and embedded at once (per rank)")
    pi.add_argument("--commit-every", type=int, default=None,
                    help="save a new index version after this many files (default: --chunk-size); a killed run "
                         "loses at most that many files' work and the same command continues")
    pi.add_argument("--follow-symlinks", action="store_true",
                    help="follow symbolic links whose target lies inside the folder (never outside it)")
    pi.add_argument("--max-tensor-elements", type=int, default=DEFAULT_LIMITS.max_tensor_elements,
                    help="skip files with a larger tensor (checked before reading it)")
    pi.add_argument("--max-model-elements", type=int, default=DEFAULT_LIMITS.max_model_elements,
                    help="skip files whose tensors hold more elements in all (checked before reading them)")
    pi.add_argument("--batch-size", type=int, default=64, help="graphs per encoder forward pass")
    pi.add_argument("--device", default="cpu", help="device of the encoder (cpu, cuda, cuda:1, ...)")
    pq = sub.add_parser("query", parents=[common], help="models most similar to a checkpoint (or an indexed model id)")
    pq.add_argument("file", help="checkpoint file, or the id of an indexed model")
    pq.add_argument("-k", type=int, default=10)
    pq.add_argument("--db", required=True)
    pq.add_argument("--same-arch", action="store_true", help="only models of the query's architecture")
    pq.add_argument("--compatible", action="store_true", help="only models with the query's input shape and outputs")
    pq.add_argument("--dataset", default=None)
    pq.add_argument("--task", default=None)
    pq.add_argument("--min-test-acc", type=float, default=None)
    pq.add_argument("--exclude-self", action="store_true", help="drop the query model itself (if it is indexed)")
    pq.add_argument("--json", action="store_true", help="print JSON instead of a table")
    pn = sub.add_parser("info", parents=[common], help="what an index holds")
    pn.add_argument("--db", required=True)
    return p


def _run(args: argparse.Namespace) -> int:
    if args.command == "index":
        embedder = Embedder.from_file(args.encoder, device=args.device, batch_size=args.batch_size)
        t0 = time.perf_counter()
        run = index_folder(args.folder, embedder, args.db, index_type=args.index_type, chunk_size=args.chunk_size,
                           commit_every=args.commit_every, follow_symlinks=args.follow_symlinks,
                           limits=ReadLimits(args.max_tensor_elements, args.max_model_elements))
        if run is not None:  # rank 0; each skipped file was already logged (stderr) with its cause
            print(f"{display_path(args.folder)}: {run.summary()}; {display_path(args.db)} holds {len(run.index)} "
                  f"models [{run.index.kind}] (commits {run.commits}, {time.perf_counter() - t0:.1f}s)")
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


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (see the module docstring). An error is one line on stderr and exit status 1."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return _run(args)
    except Exception as e:  # noqa: BLE001 -- the CLI boundary: every error is reported, as one line (--debug: traceback)
        if args.debug:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e  # KeyError's str() adds quotes
        print(f"error: {' '.join(str(msg).split())}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
