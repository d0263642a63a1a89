"""sha256 of input shards, cached by (path, size, mtime, inode) so a model is hashed once, not every merge; and a
fast content check of output shards (xxh3-128) for resuming interrupted merges."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import xxhash

from mergelib.io.cache import cache_dir

_lock = threading.Lock()
CHUNK = 8 << 20


def _cache_path() -> Path:
    return cache_dir("sha256.json")


def _key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"


def _digest_file(path: Path, digest):
    buffer = bytearray(CHUNK)  # one buffer read into again and again: no fresh pages per chunk
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while got := handle.readinto(buffer):
            digest.update(view[:got])
    return digest


def sha256_file(path: Path) -> str:
    """The sha256 hex digest of a file's bytes."""
    return _digest_file(path, hashlib.sha256()).hexdigest()


def shard_hasher():
    """A running hash of a shard's bytes (xxh3-128), for `shard_digest_of`."""
    return xxhash.xxh3_128()


def shard_digest_of(hasher) -> str:
    """The digest recorded for a shard, from a `shard_hasher` fed all of its bytes in order."""
    return "xxh3-128:" + hasher.hexdigest()


def shard_digest(path: Path) -> str:
    """xxh3-128 of a file's bytes: tells whether a shard written earlier is still whole and unchanged (a damage
    check for resuming, at memory speed; published provenance uses sha256)."""
    return shard_digest_of(_digest_file(path, shard_hasher()))


def sha256_files(paths: list[Path]) -> dict[str, str]:
    """sha256 of each file, reusing cached digests of unchanged files."""
    cache_file = _cache_path()
    with _lock:
        try:
            cache = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cache = {}
    out, changed = {}, False
    for path in paths:
        key = _key(path)
        if key not in cache:
            cache[key] = sha256_file(path)
            changed = True
        out[str(path)] = cache[key]
    if changed:
        with _lock:
            try:
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
                tmp.write_text(json.dumps(cache))
                os.replace(tmp, cache_file)
            except OSError:
                pass  # the cache is an optimisation; hashes are still returned
    return out


def hash_model_dir(path: Path) -> dict[str, str]:
    """sha256 of every regular file in a model directory (hidden entries such as `.cache/` skipped), keyed by
    the path relative to it."""
    path = Path(path)
    files = sorted(
        p for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    digests = sha256_files(files)
    return {p.relative_to(path).as_posix(): digests[str(p)] for p in files}
