"""Stage outputs that a rebuild reproduces byte for byte: JSON and text written atomically, directories built in a
hidden sibling and swapped in (mergelib.io.atomic). Nothing written here holds a timestamp."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mergelib.io.atomic import commit_dir


def write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically (a temporary sibling, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (sorted keys, trailing newline) so the same data gives the same bytes."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def build_dir(out_dir: Path, build) -> Any:
    """Run `build(staged)` in a fresh hidden sibling of `out_dir`, then swap it in; on any error remove it."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.building-"))
    try:
        result = build(staged)
        commit_dir(staged, out_dir)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return result
