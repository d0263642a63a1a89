"""Resume state of an interrupted merge: which output shards are complete, with a digest of their bytes.

The staging directory of a merge is named after a key of everything that decides the output bytes, so a re-run
of the same recipe on the same inputs finds it; each shard is recorded only after it is fully written and synced,
and is re-hashed before it is reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

from mergelib.io.hashing import shard_digest

JOURNAL = ".mergelib-progress.json"


def plan_key(parts: list[str]) -> str:
    """A stable digest of the strings that decide a merge's output."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\x00")
    return digest.hexdigest()


class Journal:
    """Completed shards of one staging directory."""

    def __init__(self, staged: Path, key: str):
        self.path = Path(staged) / JOURNAL
        self.key = key
        self.shards: dict[str, str] = {}
        self._lock = threading.Lock()
        try:
            data = json.loads(self.path.read_text())
            if data.get("key") == key:
                self.shards = dict(data.get("shards", {}))
        except (OSError, ValueError, AttributeError):
            pass

    def verified(self) -> set[str]:
        """Shards recorded as complete whose bytes still hash to the recorded digest (others are redone)."""
        good = set()
        for fname, digest in self.shards.items():
            path = self.path.parent / fname
            if path.is_file() and shard_digest(path) == digest:
                good.add(fname)
        with self._lock:
            self.shards = {f: d for f, d in self.shards.items() if f in good}
        return good

    def record(self, fname: str, digest: str) -> int:
        """Mark a shard complete; returns how many are complete."""
        with self._lock:
            self.shards[fname] = digest
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"key": self.key, "shards": self.shards}, sort_keys=True))
            os.replace(tmp, self.path)
            return len(self.shards)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
