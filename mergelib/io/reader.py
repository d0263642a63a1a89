"""Lazy tensor reads: one tensor (or one block of rows) at a time, never a whole model.

safetensors data is read with `os.preadv` straight into a fresh tensor at the offset the index recorded, so only
the bytes asked for are read and nothing stays mapped: a memory-mapped file keeps every touched page in this
process's RSS while the mapping lives, which would make memory grow with the model instead of the largest tensor.
"""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path

import torch

from mergelib.errors import InputModelError
from mergelib.io.index import TensorInfo

_bin_lock = threading.Lock()
_bin_cache: dict[Path, dict[str, torch.Tensor]] = {}


def _pread_rows(name: str, info: TensorInfo, start: int, end: int) -> torch.Tensor:
    row_numel = math.prod(info.shape[1:]) if info.shape else 1
    shape = (end - start, *info.shape[1:]) if info.shape else ()
    out = torch.empty(shape, dtype=info.dtype)
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
    offset = info.data_offset + start * row_numel * info.dtype.itemsize
    fd = os.open(info.file, os.O_RDONLY)
    try:
        done = 0
        while done < len(view):  # a read may return less than asked (signals, large buffers)
            got = os.preadv(fd, [view[done:]], offset + done)
            if got == 0:
                raise InputModelError(f"{info.file}: ends inside tensor '{name}' (truncated); re-download the model")
            done += got
    finally:
        os.close(fd)
    return out


def _bin_state(info: TensorInfo) -> dict[str, torch.Tensor]:
    with _bin_lock:
        state = _bin_cache.get(info.file)
        if state is None:
            state = torch.load(info.file, map_location="cpu", mmap=True, weights_only=True)
            _bin_cache[info.file] = state
    return state


def read_tensor(name: str, info: TensorInfo) -> torch.Tensor:
    """Tensor `name` from its file, as stored (dtype and shape of the checkpoint); a quantised one dequantised
    (float32)."""
    if info.dequant is not None:  # FP8/MXFP4 (mergelib.io.quantized) or GGUF (mergelib.io.gguf_input)
        return info.dequant.read(name, info, 0, None, read_tensor)
    if info.data_offset is not None:
        return _pread_rows(name, info, 0, info.shape[0] if info.shape else 1)
    return _bin_state(info)[name].clone()


def read_rows(name: str, info: TensorInfo, start: int, end: int) -> torch.Tensor:
    """Rows [start, end) of tensor `name` (along dim 0), reading only those bytes (a quantised tensor: whole)."""
    if info.dequant is not None:
        return info.dequant.read(name, info, start, end, read_tensor)
    if info.data_offset is not None:
        return _pread_rows(name, info, start, end)
    return _bin_state(info)[name][start:end].clone()
