"""Fault injection for the interruption tests: `MERGELIB_FAILPOINT=<point>[:<n>]` kills the process with SIGKILL
when the merge reaches that point (e.g. `after-shard:2`, `mid-shard:5` tensors written, `before-commit`)."""

from __future__ import annotations

import os
import signal
from pathlib import Path


def failpoint(point: str, count: int | None = None) -> None:
    """SIGKILL this process if MERGELIB_FAILPOINT names `point` (and `count`, when it gives one)."""
    spec = os.environ.get("MERGELIB_FAILPOINT")
    if not spec:
        return
    name, _, n = spec.partition(":")
    if name == point and (not n or (count is not None and int(n) == count)):
        os.kill(os.getpid(), signal.SIGKILL)


def failpoint_once(point: str, scope: Path) -> None:
    """SIGKILL this process the first time any process reaches `point` for `scope` (a marker file in the temporary
    directory records it), so a retried task (a Ray worker re-running a shard) goes through."""
    if os.environ.get("MERGELIB_FAILPOINT") != point:
        return
    import hashlib
    import tempfile

    key = hashlib.sha256(str(Path(scope).resolve()).encode()).hexdigest()[:16]
    marker = Path(tempfile.gettempdir()) / f"mergelib-failpoint-{point}-{key}"
    try:
        marker.touch(exist_ok=False)
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)
