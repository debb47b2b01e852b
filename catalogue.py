"""The metadata half of the model database: one SQLite row per indexed model, and filters over them.

A row's ``fid`` (INTEGER PRIMARY KEY) is the id of its vector in ``vector_index.VectorIndex``;
``retrieval.ModelIndex`` keeps the two in step. Columns: the model id, its file (``path`` as text,
``path_bytes`` the exact name), ``sha256`` (a file's content identity, unique), the typed metadata
columns below (architecture facts from the spec, the rest from the model's metadata) and ``extra``
(every other metadata key, as JSON). Architecture specs are stored once per ``arch_id`` in ``archs``.

Metadata comes from users' sidecar files, so :func:`metadata_row` checks every value against its
column's type before a row exists: text columns take strings, numeric columns finite numbers,
integer columns integers within +-2**53 (exact in SQLite's REAL); ``extra`` values must be finite
too. NaN means "not measured" and is stored as NULL. A bad value is a ValueError naming the key.

The catalogue lives in memory (``sqlite3`` ``:memory:``) and is copied to / from a file with the
SQLite backup API (:meth:`Catalogue.write`, :meth:`Catalogue.read`).
"""
from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from architecture import ArchitectureSpec

# Metadata columns (besides fid/model_id/path); anything else in a model's metadata goes to ``extra``.
TEXT_COLUMNS = ("task", "dataset", "task_family", "arch_id", "arch_name", "arch_family", "activation", "input_shape")
NUMERIC_COLUMNS = ("num_inputs", "num_outputs", "num_params", "epoch", "train_acc", "test_acc",
                   "train_loss", "test_loss", "gen_gap")
INTEGER_COLUMNS = ("num_inputs", "num_outputs", "num_params", "epoch")  # read back as int
COLUMNS = ("model_id", "path", *TEXT_COLUMNS, *NUMERIC_COLUMNS)
INTEGER_LIMIT = 2**53  # integers above this lose digits in a REAL column (and overflow SQLite's int64 far later)
# Filter keys matched by equality (a value or a list of values).
EQ_FILTERS = ("arch_id", "arch_name", "arch_family", "dataset", "task", "task_family", "activation",
              "num_inputs", "num_outputs", "model_id")

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS models (
    fid INTEGER PRIMARY KEY, model_id TEXT NOT NULL UNIQUE, path TEXT,
    {", ".join(f"{c} TEXT" for c in TEXT_COLUMNS)},
    {", ".join(f"{c} REAL" for c in NUMERIC_COLUMNS)},
    extra TEXT, sha256 TEXT UNIQUE, path_bytes BLOB);
CREATE TABLE IF NOT EXISTS archs (arch_id TEXT PRIMARY KEY, spec_json TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS models_arch ON models(arch_id);
CREATE INDEX IF NOT EXISTS models_shape ON models(input_shape, num_outputs);
CREATE INDEX IF NOT EXISTS models_dataset ON models(dataset);
CREATE INDEX IF NOT EXISTS models_task ON models(task);
CREATE INDEX IF NOT EXISTS models_path ON models(path_bytes);
"""


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


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _text(key: str, v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"metadata {key}={_short(v)} is a {type(v).__name__}, not a string")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate, e.g. from a JSON "\\ud800" escape
        raise ValueError(f"metadata {key}={_short(v)} is not valid Unicode text ({e.reason})") from e
    return v


def _number(key: str, v: Any) -> int | float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"metadata {key}={_short(v)} is a {type(v).__name__}, not a number")
    if isinstance(v, float) and math.isnan(v):
        return None  # not measured
    if key in INTEGER_COLUMNS:
        if isinstance(v, float) and not (math.isfinite(v) and v.is_integer()):
            raise ValueError(f"metadata {key}={_short(v)} is not an integer")
        if abs(v) > INTEGER_LIMIT:
            raise ValueError(f"metadata {key}={_short(v)} is out of range (|{key}| <= 2**53)")
        return int(v)
    try:
        f = float(v)
    except OverflowError as e:
        raise ValueError(f"metadata {key}={_short(v)} is out of range of a float") from e
    if not math.isfinite(f):
        raise ValueError(f"metadata {key}={_short(v)} is not finite")
    return f


def metadata_row(model_id: str, spec: ArchitectureSpec, meta: Mapping[str, Any], path: str = "",
                 sha256: str | None = None, path_bytes: bytes | None = None) -> dict:
    """The SQLite row of a model: architecture facts from ``spec``, the rest from ``meta``.

    Known columns (``COLUMNS``) are typed and checked (see the module docstring); other metadata keys
    are kept as JSON in ``extra``. ``sha256``/``path_bytes``: a file's content identity and exact name.
    Raises ValueError naming the first bad value.
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
            try:
                json.dumps(v, allow_nan=False)
            except ValueError as e:
                raise ValueError(f"metadata {k}={_short(v)} holds a number that is not finite") from e
            extra[k] = v
    row.update(
        model_id=_text("model_id", str(model_id)), path=_text("path", str(path or row["path"] or "")),
        arch_id=spec.arch_id, arch_name=row["arch_name"] or spec.name, arch_family=row["arch_family"] or spec.family,
        input_shape=json.dumps(list(spec.input_shape)), num_inputs=spec.num_inputs, num_outputs=spec.num_outputs,
        num_params=spec.num_params(),
    )
    if row["activation"] is None:
        acts = {layer.activation for layer in spec.layers[:-1]}
        row["activation"] = acts.pop() if len(acts) == 1 else ("mixed" if acts else "identity")
    for c in TEXT_COLUMNS:
        if row[c] is not None:
            row[c] = _text(c, row[c])
    for c in NUMERIC_COLUMNS:
        if row[c] is not None:
            row[c] = _number(c, row[c])
    row["extra"] = json.dumps(extra, sort_keys=True)
    row["spec_json"] = spec.to_json()
    row["sha256"], row["path_bytes"] = sha256, path_bytes
    return row


class Catalogue:
    """SQLite rows of the indexed models, keyed by ``fid`` (the vector id)."""

    def __init__(self, con: sqlite3.Connection | None = None):
        self.con = con if con is not None else sqlite3.connect(":memory:")
        self.con.executescript(SCHEMA)

    # ------------------------------------------------------------------ lookups
    def __len__(self) -> int:
        return int(self.con.execute("SELECT COUNT(*) FROM models").fetchone()[0])

    def __contains__(self, model_id: str) -> bool:
        return self.con.execute("SELECT 1 FROM models WHERE model_id=?", (model_id,)).fetchone() is not None

    def model_ids(self) -> list[str]:
        """Model ids in insertion (fid) order."""
        return [r[0] for r in self.con.execute("SELECT model_id FROM models ORDER BY fid")]

    def fids(self) -> np.ndarray:
        """Every fid in ascending order, (n,) int64."""
        return np.fromiter((r[0] for r in self.con.execute("SELECT fid FROM models ORDER BY fid")), dtype=np.int64)

    def shas(self) -> set[str]:
        """Content hashes (hex SHA-256) of the indexed files."""
        return {r[0] for r in self.con.execute("SELECT sha256 FROM models WHERE sha256 IS NOT NULL")}

    def fid_of_sha(self, sha256: str) -> int | None:
        """The fid of the indexed file of this content, or None."""
        r = self.con.execute("SELECT fid FROM models WHERE sha256=?", (sha256,)).fetchone()
        return None if r is None else int(r[0])

    def fids_of_file(self, path_bytes: bytes) -> list[int]:
        """fids of the rows indexed from this exact file name."""
        return [r[0] for r in self.con.execute("SELECT fid FROM models WHERE path_bytes=?", (path_bytes,))]

    def fid(self, model_id: str) -> int:
        """The fid of an indexed model (KeyError if absent)."""
        r = self.con.execute("SELECT fid FROM models WHERE model_id=?", (model_id,)).fetchone()
        if r is None:
            raise KeyError(f"model {model_id!r} is not in the index")
        return int(r[0])

    def next_fid(self) -> int:
        """The first unused fid (one above the largest ever kept)."""
        return int(self.con.execute("SELECT COALESCE(MAX(fid), -1) + 1 FROM models").fetchone()[0])

    def rows_where(self, where: str, params: Sequence[Any]) -> list[dict]:
        """Rows matching an SQL condition, as dicts (extra keys merged in, input_shape a tuple)."""
        cur = self.con.execute(f"SELECT fid, {', '.join(COLUMNS)}, sha256, extra FROM models WHERE {where}", params)
        names = [d[0] for d in cur.description]
        out = []
        for values in cur.fetchall():
            row = dict(zip(names, values))
            extra = json.loads(row.pop("extra") or "{}")
            row["input_shape"] = tuple(json.loads(row["input_shape"])) if row["input_shape"] else None
            for c in INTEGER_COLUMNS:
                if row[c] is not None:
                    row[c] = int(row[c])
            out.append({**extra, **row})
        return out

    def rows_by_fid(self, fids: Iterable[int]) -> dict[int, dict]:
        """{fid: row} of the given fids."""
        rows = self.rows_where("fid IN (SELECT value FROM json_each(?))", (json.dumps([int(f) for f in fids]),))
        return {r["fid"]: r for r in rows}

    def spec(self, arch_id: str) -> ArchitectureSpec:
        """The architecture spec stored for ``arch_id``."""
        r = self.con.execute("SELECT spec_json FROM archs WHERE arch_id=?", (arch_id,)).fetchone()
        if r is None:
            raise KeyError(f"architecture {arch_id!r} is not in the index")
        return ArchitectureSpec.from_json(r[0])

    def counts(self, col: str) -> dict[str, int]:
        """{value: number of models} of one column, most frequent first."""
        if col not in COLUMNS:
            raise ValueError(f"unknown column {col!r}")
        return {str(a): n for a, n in self.con.execute(
            f"SELECT {col}, COUNT(*) FROM models GROUP BY {col} ORDER BY COUNT(*) DESC")}

    # ------------------------------------------------------------------ writing
    def insert(self, fids: Sequence[int], rows: Sequence[Mapping[str, Any]]) -> None:
        """Insert rows under ``fids`` (run inside ``with catalogue.con:`` to make it one transaction)."""
        cols = ("fid", *COLUMNS, "extra", "sha256", "path_bytes")
        self.con.executemany(
            f"INSERT INTO models ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
            [(int(i), *(r.get(c) for c in COLUMNS), r.get("extra", "{}"), r.get("sha256"), r.get("path_bytes"))
             for i, r in zip(fids, rows)])
        self.con.executemany("INSERT OR IGNORE INTO archs VALUES (?, ?)",
                             {(r["arch_id"], r["spec_json"]) for r in rows if r.get("spec_json")})

    def delete(self, fids: Sequence[int]) -> None:
        """Delete the rows of ``fids`` (run inside ``with catalogue.con:``)."""
        self.con.executemany("DELETE FROM models WHERE fid=?", [(int(f),) for f in fids])

    # ------------------------------------------------------------------ filters
    def where(self, filters: Mapping[str, Any], spec: ArchitectureSpec | None) -> tuple[str | None, list]:
        """SQL condition and parameters of query filters (see ``retrieval.ModelIndex.query``); None = no filter.

        ``spec`` is the query's architecture, for ``same_arch``/``compatible`` = True.
        """
        clauses, params = [], []
        for key, val in filters.items():
            if val is None or val is False:
                continue
            if key in EQ_FILTERS:
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
                raise ValueError(f"unknown filter {key!r}; known: {sorted(EQ_FILTERS)} + input_shape, same_arch, "
                                 f"compatible, min_/max_ of {list(NUMERIC_COLUMNS)}")
        return (" AND ".join(clauses) if clauses else None), params

    def count_where(self, where: str, params: Sequence[Any]) -> int:
        """Number of rows matching ``where``."""
        return int(self.con.execute(f"SELECT COUNT(*) FROM models WHERE {where}", params).fetchone()[0])

    def fids_where(self, where: str, params: Sequence[Any]) -> np.ndarray:
        """fids of the rows matching ``where``, (n,) int64."""
        return np.fromiter((r[0] for r in self.con.execute(f"SELECT fid FROM models WHERE {where}", params)),
                           dtype=np.int64)

    def matching(self, fids: Iterable[int], where: str, params: Sequence[Any]) -> set[int]:
        """The subset of ``fids`` whose rows match ``where``."""
        return {r[0] for r in self.con.execute(
            f"SELECT fid FROM models WHERE fid IN (SELECT value FROM json_each(?)) AND {where}",
            [json.dumps([int(f) for f in fids]), *params])}

    # ------------------------------------------------------------------ persistence
    def write(self, path: str | Path) -> None:
        """Copy the catalogue to an SQLite file (backup API)."""
        dst = sqlite3.connect(path)
        try:
            with dst:
                self.con.backup(dst)
        finally:
            dst.close()

    @classmethod
    def read(cls, path: str | Path) -> "Catalogue":
        """An in-memory copy of an SQLite file written by :meth:`write` (opened read-only)."""
        src = sqlite3.connect(Path(path).resolve().as_uri() + "?mode=ro", uri=True)
        con = sqlite3.connect(":memory:")
        try:
            src.backup(con)
        finally:
            src.close()
        return cls(con)
