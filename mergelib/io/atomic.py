"""Atomic output directories: build in a temporary sibling, then swap it in with `os.replace`.

A merge killed at any point leaves the previous output untouched; only a directory that mergelib wrote itself
(it holds `mergelib_run.json`) is ever replaced.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from mergelib.errors import OutputError
from mergelib.io.process import user_umask

MARKER = "mergelib_run.json"


def check_output_dir(out_dir: Path) -> None:
    """Fail before any work if `out_dir` cannot be (re)placed."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a directory; choose another output path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MARKER).is_file():
        raise OutputError(
            f"{out_dir}: exists, is not empty and was not written by mergelib; choose another output path or remove it"
        )
    parent = out_dir.resolve().parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True)
        except OSError as exc:
            raise OutputError(f"{parent}: cannot create the output's parent directory ({exc.strerror})") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{parent}: not writable; choose an output path in a writable directory")


def staging_dir(out_dir: Path, key: str) -> Path:
    """The temporary sibling of `out_dir` for the merge identified by `key` (same filesystem, so the final move
    is a rename). It survives an interrupted run, so the next run with the same key resumes in it."""
    out_dir = Path(out_dir).resolve()
    path = out_dir.parent / f".{out_dir.name}.partial-{key[:16]}"
    try:
        path.mkdir(exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{path.parent}: cannot create a staging directory ({exc.strerror})") from None
    return path


def stale_staging_dirs(out_dir: Path, keep: Path) -> list[Path]:
    """Staging directories of earlier, different merges into `out_dir` (left by interrupted runs)."""
    out_dir = Path(out_dir).resolve()
    return [p for p in out_dir.parent.glob(f".{out_dir.name}.partial-*") if p.resolve() != Path(keep).resolve()]


def share_like_the_user(root: Path) -> None:
    """Give `root` and everything under it the modes the user's umask gives new files and directories: temporary
    directories (mkdtemp) and some writers (safetensors) create them owner-only."""
    mask = user_umask()
    for path in (Path(root), *Path(root).rglob("*")):
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def commit_dir(staged: Path, out_dir: Path) -> None:
    """Move a finished staging directory into place (its modes as the user's umask says), replacing a previous
    mergelib output."""
    out_dir = Path(out_dir).resolve()
    share_like_the_user(staged)
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out_dir, old)
    os.replace(staged, out_dir)
    _fsync_dir(out_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
