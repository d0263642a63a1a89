"""Atomic export outputs: build a directory or file in a hidden sibling, then `os.replace` it into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mergelib.export.errors import ExportError
from mergelib.io.atomic import commit_dir

GGUF_MAGIC = b"GGUF"  # the only files an export overwrites


def _parent(path: Path) -> Path:
    parent = path.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"{parent}: cannot create the export directory ({exc.strerror})") from None
    return parent


def _head(path: Path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(len(GGUF_MAGIC))


@contextmanager
def staged_dir(out_dir: Path, marker: str) -> Iterator[Path]:
    """Yield an empty sibling of `out_dir`; on success it replaces `out_dir`, on error it is removed.
    A non-empty `out_dir` is replaced only if it holds `marker` (it is an export written before)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir}: exists and is not a directory; choose another export path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / marker).is_file():
        raise ExportError(f"{out_dir}: exists, is not empty and is not an export; choose another path or remove it")
    staged = Path(tempfile.mkdtemp(dir=_parent(out_dir), prefix=f".{out_dir.name}.partial-"))
    try:
        yield staged
        commit_dir(staged, out_dir)  # with the modes the user's umask gives (mkdtemp makes it private)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


@contextmanager
def staged_file(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling path of `path`; on success it replaces `path` (an earlier GGUF, never another
    kind of file), on error it is removed."""
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"{path}: is a directory; choose a file path for the export")
    if path.is_file() and path.stat().st_size and _head(path) != GGUF_MAGIC:
        raise ExportError(f"{path}: exists and is not a GGUF file; choose another path or remove it")
    fd, tmp = tempfile.mkstemp(dir=_parent(path), prefix=f".{path.name}.partial-")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        tmp_path.chmod(0o644)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
