"""Where mergelib keeps what it computes once and reuses: $MERGELIB_CACHE, else $XDG_CACHE_HOME/mergelib, else
~/.cache/mergelib (read at each call, so tests and users can point it elsewhere at any time)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(name: str) -> Path:
    """The cache entry `name` (a subdirectory or file) under mergelib's cache root."""
    root = os.environ.get("MERGELIB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mergelib"
    )
    return Path(root) / name
