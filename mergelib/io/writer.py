"""Planned sharded safetensors output: headers are known before any math, tensors land at fixed offsets.

Because every output tensor's name, shape and dtype is planned up front, each shard's header (the safetensors
format: u64 little-endian header length, JSON header padded with spaces to 8 bytes, then the raw data) is written
first and each tensor is `pwrite`n at its offset whenever it is ready, in any order, from any thread. The bytes on
disk do not depend on the order of completion, and memory holds only the tensors in flight. `WriteQueue` moves the
writes to a thread of their own, so the merge computes and reads while earlier results go to disk.
"""

from __future__ import annotations

import json
import math
import os
import queue
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mergelib.io.hashing import shard_digest_of, shard_hasher
from mergelib.io.index import DTYPE_CODES


@dataclass(frozen=True)
class TensorSlot:
    """One planned output tensor inside a shard."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def shard_header(slots: list[TensorSlot], metadata: dict[str, str] | None = None) -> tuple[bytes, dict[str, int]]:
    """The encoded header (length prefix included) and each tensor's absolute file offset."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offsets, cursor = {}, 0
    for slot in slots:
        header[slot.name] = {
            "dtype": DTYPE_CODES[slot.dtype],
            "shape": list(slot.shape),
            "data_offsets": [cursor, cursor + slot.nbytes],
        }
        offsets[slot.name] = cursor
        cursor += slot.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    prefix = struct.pack("<Q", len(text)) + text
    return prefix, {name: len(prefix) + off for name, off in offsets.items()}


def shard_size(slots: list[TensorSlot], metadata: dict[str, str] | None = None) -> int:
    """Total bytes of the shard file."""
    prefix, _ = shard_header(slots, metadata)
    return len(prefix) + sum(s.nbytes for s in slots)


class ShardFile:
    """A shard being filled: header written on open, tensors written at their offsets.

    It also hashes its bytes as they arrive (`digest`, the `hashing.shard_digest` of the finished file): a range
    written at the hashed prefix's end is hashed from memory at once, one written further on waits until the
    prefix reaches it and is then read back, so the digest costs no pass over the file at the end.
    """

    def __init__(self, path: Path, slots: list[TensorSlot], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.slots = {s.name: s for s in slots}
        prefix, self.offsets = shard_header(slots, metadata)
        self.size = len(prefix) + sum(s.nbytes for s in slots)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self._fd, self.size)
        os.pwrite(self._fd, prefix, 0)
        self._hash = shard_hasher()
        self._hash.update(prefix)
        self._hashed = len(prefix)  # bytes [0, _hashed) are in the digest
        self._waiting: dict[int, int] = {}  # offset -> length of ranges written beyond the hashed prefix
        self._hash_lock = threading.Lock()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one planned tensor (its dtype and shape must match the plan)."""
        self.write_at(self.check(name, tensor), tensor)

    def write_rows(self, name: str, start: int, rows: torch.Tensor) -> None:
        """Write rows [start, start + len(rows)) of a planned tensor (dim 0 blocks, for streamed tensors)."""
        self.write_at(self.check_rows(name, start, rows), rows)

    def check(self, name: str, tensor: torch.Tensor) -> int:
        """The file offset of planned tensor `name`, once `tensor` matches its planned dtype and shape."""
        slot = self.slots[name]
        if tuple(tensor.shape) != slot.shape or tensor.dtype != slot.dtype:
            raise ValueError(f"{name}: planned {slot.shape} {slot.dtype}, got {tuple(tensor.shape)} {tensor.dtype}")
        return self.offsets[name]

    def check_rows(self, name: str, start: int, rows: torch.Tensor) -> int:
        """The file offset of rows [start, start + len(rows)) of `name`, once they fit its planned layout."""
        slot = self.slots[name]
        if tuple(rows.shape[1:]) != slot.shape[1:] or rows.dtype != slot.dtype or start + rows.shape[0] > slot.shape[0]:
            raise ValueError(f"{name}: rows {start}+{tuple(rows.shape)} {rows.dtype} do not fit {slot.shape} {slot.dtype}")
        return self.offsets[name] + start * (slot.nbytes // slot.shape[0] if slot.shape[0] else 0)

    def write_at(self, offset: int, tensor: torch.Tensor) -> None:
        """Write `tensor`'s bytes at file offset `offset` (checked by `check` or `check_rows`) and hash them."""
        view = memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
        done = 0
        while done < len(view):  # pwrite may write less than asked (signals, large buffers)
            done += os.pwrite(self._fd, view[done:], offset + done)
        self._hash_range(offset, view)

    def _hash_range(self, offset: int, view: memoryview) -> None:
        if not len(view):
            return
        with self._hash_lock:
            if offset != self._hashed:
                self._waiting[offset] = len(view)
                return
            self._hash.update(view)
            self._hashed += len(view)
            while self._hashed in self._waiting:  # ranges written earlier that now continue the prefix
                end = self._hashed + self._waiting.pop(self._hashed)
                while self._hashed < end:  # read back in bounded chunks
                    chunk = os.pread(self._fd, min(end - self._hashed, 8 << 20), self._hashed)
                    self._hash.update(chunk)
                    self._hashed += len(chunk)

    def digest(self) -> str:
        """The shard's digest, once every planned tensor is written (`hashing.shard_digest` of the file)."""
        with self._hash_lock:
            if self._hashed != self.size or self._waiting:
                raise RuntimeError(f"{self.path.name}: digest asked before every tensor was written")
            return shard_digest_of(self._hash)

    def close(self) -> None:
        """Flush to disk and close."""
        if self._fd >= 0:
            os.fsync(self._fd)  # a shard is recorded complete only once its bytes are on disk
            os.close(self._fd)
            self._fd = -1


class WriteQueue:
    """Writes (and other file work, such as closing a finished shard) done in order by one writer thread, so the
    threads that compute never wait on the disk. At most `limit` bytes of tensors wait in the queue (a submit
    blocks until they fit; one larger tensor is let through alone). The engine gives a job's memory budget back from
    this thread (`call(..., always=True)`) once the job's results are written, so results waiting here count
    against the budget too.

    The first failure of the writer is raised by every later `submit` and by `close`; work queued after it is
    dropped. `close` waits for the queue to drain (on success) or only for the running item (`abandon`)."""

    def __init__(self, limit: int = 128 << 20):
        self.limit = max(1, int(limit))
        self._queued = 0
        self._error: BaseException | None = None
        self._abandoned = False
        self._cond = threading.Condition()
        self._items: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="mergelib-writer", daemon=True)
        self._thread.start()

    def write(self, shard: ShardFile, name: str, tensor: torch.Tensor, start: int | None = None) -> None:
        """Queue one planned tensor (`start`: a block of its rows from that row) for `shard`. The tensor must not
        change afterwards (hand over a fresh one)."""
        offset = shard.check(name, tensor) if start is None else shard.check_rows(name, start, tensor)
        self._put(lambda: shard.write_at(offset, tensor), tensor.numel() * tensor.element_size())

    def call(self, work: Callable[[], None], always: bool = False) -> None:
        """Queue `work` to run on the writer thread after everything queued before it; `always`: even once the
        writer has failed or the queue is abandoned (releasing what the work held), and queued even then."""
        self._put(work, 0, always)

    def _put(self, work: Callable[[], None], nbytes: int, always: bool = False) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._error is not None or self._queued == 0
                                or self._queued + nbytes <= self.limit)
            if self._error is not None and not always:
                raise self._error
            self._queued += nbytes
        self._items.put((work, nbytes, always))

    def _loop(self) -> None:
        while True:
            item = self._items.get()
            if item is None:
                return
            work, nbytes, always = item
            try:
                if always or (self._error is None and not self._abandoned):
                    work()
            except BaseException as exc:  # noqa: BLE001 - handed to the threads that submit and close
                with self._cond:
                    self._error = exc
            finally:
                with self._cond:
                    self._queued -= nbytes
                    self._cond.notify_all()

    def close(self, abandon: bool = False) -> None:
        """Stop the writer once the queue is drained (`abandon`: dropping what is still queued); raises the
        writer's first failure, unless abandoning (the merge is failing already)."""
        self._abandoned = self._abandoned or abandon
        if self._thread.is_alive():
            self._items.put(None)
            self._thread.join()
        if self._error is not None and not abandon:
            raise self._error


def shard_names(count: int) -> list[str]:
    """`model.safetensors` for one shard, else `model-0000k-of-0000N.safetensors`."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]


def pack_shards(slots: list[TensorSlot], limit: int) -> dict[str, list[TensorSlot]]:
    """Slots in order, packed greedily into shards of at most `limit` bytes (a bigger tensor gets one alone),
    keyed by their file names."""
    groups: list[list[TensorSlot]] = [[]]
    used = 0
    for slot in slots:
        if groups[-1] and used + slot.nbytes > limit:
            groups.append([])
            used = 0
        groups[-1].append(slot)
        used += slot.nbytes
    return dict(zip(shard_names(len(groups)), groups))


def write_index(out_dir: Path, shards: dict[str, list[TensorSlot]], metadata: dict[str, str]) -> None:
    """`model.safetensors.index.json` (only written for more than one shard)."""
    if len(shards) < 2:
        return
    total = sum(s.nbytes for slots in shards.values() for s in slots)
    weight_map = {s.name: fname for fname, slots in shards.items() for s in slots}
    body = {"metadata": {"total_size": total, **metadata}, "weight_map": dict(sorted(weight_map.items()))}
    (Path(out_dir) / "model.safetensors.index.json").write_text(json.dumps(body, indent=2) + "\n")
