"""Fault injection for the interruption tests: `MERGELIB_FAILPOINT=<point>[:<n>]` kills the process with SIGKILL
when the merge reaches that point (e.g. `after-shard:2`, `mid-shard:5` tensors written, `before-commit`)."""

from __future__ import annotations

import os
import signal


def failpoint(point: str, count: int | None = None) -> None:
    """SIGKILL this process if MERGELIB_FAILPOINT names `point` (and `count`, when it gives one)."""
    spec = os.environ.get("MERGELIB_FAILPOINT")
    if not spec:
        return
    name, _, n = spec.partition(":")
    if name == point and (not n or (count is not None and int(n) == count)):
        os.kill(os.getpid(), signal.SIGKILL)
