"""The folder a model index lives in: atomic versions behind a ``CURRENT`` pointer, and a guard.

Layout of an index folder::

    WEIGHTZOO_INDEX          marker, written first: the folder was made by this tool
    CURRENT                  one line, the name of the committed version folder
    v<ns>-<hex8>/            a complete version (files written by the caller)

* :func:`write_version` writes the caller's files into ``v<ns>-<hex8>.tmp/``, fsyncs them, renames
  the folder and then swaps ``CURRENT`` with ``os.replace`` (the commit point). A process killed at
  any moment leaves the previous version loadable; the next write deletes its leftovers.
* :func:`check_index_folder` lets an index be written only into a folder that is absent, empty or
  marked as an index; only entries named like this tool's versions and leftovers are ever deleted,
  so no user file can be lost to a mistyped ``--db``.
"""
from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable

from checkpoint_folder import display_path

INDEX_MARKER = "WEIGHTZOO_INDEX"
_MARKER_TEXT = "A model index of weightzoo's retrieval.py. Its v*/ version folders are replaced on every save.\n"
_OWN_ENTRY = re.compile(r"v\d+-[0-9a-f]{8}(\.tmp)?|CURRENT\.[0-9a-f]{8}\.tmp")  # versions and save leftovers


def check_index_folder(path: str | os.PathLike) -> Path:
    """``path`` if an index may be written there: absent, empty, or an index made by this tool (it holds
    the ``INDEX_MARKER`` file). Any other folder is refused (FileExistsError naming what it holds)."""
    root = Path(path)
    if not root.exists():
        return root
    if not root.is_dir():
        raise FileExistsError(f"{display_path(root)}: exists and is not a folder; refusing to write an index there")
    if (root / INDEX_MARKER).is_file():
        return root
    entries = sorted(os.listdir(root))
    if entries:
        raise FileExistsError(f"{display_path(root)}: not empty and not a model index made by retrieval.py (no "
                              f"{INDEX_MARKER} file; it holds e.g. {display_path(entries[0])!r}); refusing to write "
                              f"there, pass a new or empty folder")
    return root


def write_version(path: str | os.PathLike, write_files: Callable[[Path], None]) -> Path:
    """Commit a new version: ``write_files(folder)`` fills a fresh folder, then ``CURRENT`` is swapped to it.

    Returns the version folder. Older versions and leftovers of killed writes are deleted after the swap.
    """
    root = check_index_folder(path)
    root.mkdir(parents=True, exist_ok=True)
    if not (root / INDEX_MARKER).is_file():
        _write_durably(root / INDEX_MARKER, _MARKER_TEXT)
    name = f"v{time.time_ns()}-{uuid.uuid4().hex[:8]}"
    tmp = root / f"{name}.tmp"
    tmp.mkdir()
    write_files(tmp)
    for f in tmp.iterdir():
        _fsync(f)
    os.replace(tmp, root / name)
    _fsync(root)
    _write_durably(root / "CURRENT", name + "\n")  # the commit point
    for old in root.iterdir():  # previous versions and leftovers of killed writes; nothing else
        if old.name != name and _OWN_ENTRY.fullmatch(old.name):
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    return root / name


def current_version(path: str | os.PathLike) -> Path:
    """The committed version folder (FileNotFoundError if ``path`` holds no committed index)."""
    root = Path(path)
    pointer = root / "CURRENT"
    if not pointer.is_file():
        raise FileNotFoundError(f"{display_path(root)}: not a model index (no CURRENT file)")
    return root / pointer.read_text().strip()


def _write_durably(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file, fsync it and move it over ``path`` (atomic on POSIX)."""
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
