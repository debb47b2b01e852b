"""A folder of user checkpoints as the model database reads it: which files, under which identity.

* **Scanning** (:func:`scan_checkpoints`): the checkpoint files under a folder, in one order
  (names sorted by their bytes) on every rank. Symbolic links are not followed by default; with
  ``follow_symlinks`` a link is followed only when its target lies inside the folder. Links that
  point outside, dangling links and checkpoint names that are not regular files (a FIFO would block
  the reader) are reported, never read.
* **Names**: any byte string the file system allows. Python keeps undecodable bytes as surrogates;
  :func:`display_path` writes them as ``\\xNN`` (SQLite and terminals take only valid UTF-8) and
  ``os.fsencode`` gives back the exact bytes, stored beside it.
* **Identity**: a model is its content, the SHA-256 of the checkpoint file and of its sidecar JSON
  (which can change the architecture read): :func:`content_sha256`. Its model id is the relative
  path plus 12 hex digits of that hash, so two files of one name in different folders are two
  models, and a file rewritten in place is a new version of its path.
* **Reading** (:func:`load_file`): one file -> a :class:`ModelRecord`, ``None`` if its content is
  already indexed, or a :class:`SkippedModel` (file and cause); it never raises for a bad file.
"""
from __future__ import annotations

import hashlib
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from architecture import ArchitectureSpec
from checkpoint_import import (CHECKPOINT_SUFFIXES, DEFAULT_LIMITS, CheckpointError, ReadLimits,  # noqa: F401
                               display_path, read_checkpoint, sidecar_path)


@dataclass
class ModelRecord:
    """One model to index: its id, architecture, weights and (optional) metadata.

    Files also carry ``sha256`` (their content identity) and ``path_bytes`` (the exact file name).
    """

    model_id: str
    spec: ArchitectureSpec
    state_dict: Mapping[str, torch.Tensor]
    meta: Mapping[str, Any]
    path: str = ""
    sha256: str | None = None
    path_bytes: bytes | None = None


@dataclass(frozen=True)
class SkippedModel:
    """A model that was not indexed: the file (or model id) and the cause."""

    source: str
    cause: str

    def __str__(self) -> str:
        return f"{self.source}: {self.cause}"


def _skip(path: Path, cause: str) -> SkippedModel:
    return SkippedModel(display_path(path), cause)


# ----------------------------------------------------------------------------- scanning
def _link_target(link: Path, real_root: Path, follow: bool) -> tuple[Path | None, str | None]:
    """(resolved target, None) for a link to follow, else (None, the cause it is not followed)."""
    try:
        target = link.resolve(strict=True)
    except (OSError, RuntimeError):  # missing target, or a loop of links
        return None, f"dangling symbolic link (to {display_path(os.readlink(link))})"
    if not follow:
        return None, "symbolic link, not followed (--follow-symlinks follows links that stay inside the folder)"
    if not target.is_relative_to(real_root):
        return None, f"symbolic link to {display_path(target)}, outside the indexed folder; not followed"
    return target, None


def scan_checkpoints(folder: str | os.PathLike, follow_symlinks: bool = False
                     ) -> tuple[list[Path], list[SkippedModel]]:
    """(checkpoint files under ``folder`` in a fixed order, reports of links and entries not read).

    A link or non-regular entry is reported when its name is a checkpoint's or it leads to a folder;
    other files (notes, sidecars) are passed over in silence.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{display_path(root)}: not a folder of checkpoints")
    real_root = root.resolve()
    files: list[Path] = []
    problems: list[SkippedModel] = []
    seen = {real_root}  # real folders walked: a followed link never walks one twice (or loops)
    stack = [root]
    while stack:  # depth first, entries sorted by name bytes; a stack, not recursion (deep trees)
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: os.fsencode(e.name))
        except OSError as e:
            problems.append(_skip(d, f"folder not readable ({e.strerror})"))
            continue
        subdirs = []
        for e in entries:
            p = Path(e.path)
            wanted = p.suffix in CHECKPOINT_SUFFIXES
            if e.is_symlink():
                target, why = _link_target(p, real_root, follow_symlinks)
                if target is None:
                    if wanted or why.startswith("dangling") or p.is_dir():
                        problems.append(_skip(p, why))
                    continue
                is_dir, is_reg = target.is_dir(), stat.S_ISREG(target.stat().st_mode)
            else:
                target = None
                is_dir, is_reg = e.is_dir(follow_symlinks=False), e.is_file(follow_symlinks=False)
            if is_dir:
                real = target or p.resolve()
                if real not in seen:
                    seen.add(real)
                    subdirs.append(p)
            elif wanted:
                if is_reg:
                    files.append(p)
                else:
                    problems.append(_skip(p, "not a regular file (a FIFO, socket or device); not read"))
        stack.extend(reversed(subdirs))
    return files, problems


# ----------------------------------------------------------------------------- identity
def _feed(h: Any, path: Path) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    _feed(h, Path(path))
    return h.hexdigest()


def content_sha256(path: Path, sidecar: Path | None) -> str:
    """Hex SHA-256 of a checkpoint and its sidecar: the identity of the model they describe."""
    h = hashlib.sha256()
    _feed(h, path)
    if sidecar is not None:
        h.update(b"\0sidecar\0")
        _feed(h, sidecar)
    return h.hexdigest()


# ----------------------------------------------------------------------------- reading
def load_checkpoint(path: str | os.PathLike, root: str | os.PathLike | None = None,
                    sha256: str | None = None, limits: ReadLimits = DEFAULT_LIMITS) -> ModelRecord:
    """Read one checkpoint file (``checkpoint_import.read_checkpoint``: safetensors or ``.pt`` with
    ``weights_only=True``, sizes checked against ``limits`` first, optional spec sidecar, architecture inference).

    The model id is the path relative to ``root`` (the indexed folder; else the file name) and, when
    ``sha256`` is given, ``@`` and its first 12 hex digits. Raises ``CheckpointError`` (file and cause).
    """
    p = Path(path)
    spec, sd, warns, side_meta = read_checkpoint(p, limits)
    meta = dict(side_meta)
    if warns:
        meta["load_warning"] = "; ".join(warns)
    rel = display_path(p.relative_to(root) if root is not None else p.name)
    mid = f"{rel}@{sha256[:12]}" if sha256 else rel
    absolute = Path(os.path.abspath(p))  # the link's own path, not its target's
    return ModelRecord(mid, spec, sd, meta, display_path(absolute), sha256, os.fsencode(absolute))


def load_file(path: Path, root: Path, known: set[str] | frozenset[str] = frozenset(),
              follow_symlinks: bool = False, limits: ReadLimits = DEFAULT_LIMITS) -> ModelRecord | SkippedModel | None:
    """One file of a folder scan -> its record, None if its content is in ``known`` (hex SHA-256), or a
    SkippedModel naming the file and the cause (one line). Never raises for a bad file."""
    side = sidecar_path(path)
    if side is not None and side.is_symlink():
        target, why = _link_target(side, root.resolve(), follow_symlinks)
        if target is None:
            return _skip(path, f"sidecar {display_path(side.name)}: {why}")
    try:
        size = path.stat().st_size
        if size > limits.max_file_bytes:  # before hashing it: a huge file is not even read
            return _skip(path, f"file of {size / 2**20:.1f} MiB is over the cap of {limits.max_file_bytes / 2**20:.1f} "
                               f"MiB (ReadLimits.max_model_elements; not read)")
        sha = content_sha256(path, side)
    except OSError as e:
        return _skip(path, f"not readable ({e.strerror or e})")
    if sha in known:
        return None
    try:
        return load_checkpoint(path, root, sha, limits)
    except CheckpointError as e:
        return _skip(path, e.cause)
    except Exception as e:  # noqa: BLE001 -- one bad file must not end the run: any reader failure skips it, reported
        text = " ".join(str(e).split())
        return _skip(path, f"the checkpoint reader failed: {type(e).__name__}: {text[:300]}")


def iter_folder_chunks(folder: str | os.PathLike, chunk_size: int, rank: int = 0, world_size: int = 1,
                       known: set[str] | frozenset[str] = frozenset(), follow_symlinks: bool = False,
                       limits: ReadLimits = DEFAULT_LIMITS) -> Iterator[tuple[list[ModelRecord], list[SkippedModel], int]]:
    """Yield ``(records, skipped, unchanged)`` chunk by chunk: rank ``r`` reads files ``r::world_size``.

    Files whose content is in ``known`` are counted as unchanged, not read. Every rank yields the same
    number of chunks (collectives stay in step); the scan's reports come with rank 0's first chunk.
    """
    root = Path(folder)
    files, problems = scan_checkpoints(root, follow_symlinks)
    mine = files[rank::world_size]
    n_chunks = max(1, math.ceil(math.ceil(len(files) / world_size) / chunk_size))
    for c in range(n_chunks):
        recs, skipped = [], list(problems) if (rank == 0 and c == 0) else []
        unchanged = 0
        for p in mine[c * chunk_size:(c + 1) * chunk_size]:
            out = load_file(p, root, known, follow_symlinks, limits)
            if out is None:
                unchanged += 1
            elif isinstance(out, SkippedModel):
                skipped.append(out)
            else:
                recs.append(out)
        yield recs, skipped, unchanged
