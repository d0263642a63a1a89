"""Lazy tensor reads: one tensor at a time, never a whole model.

Each read opens the safetensors file, copies out one tensor and closes it again: `safe_open` memory-maps the
file, and every page it touches stays in this process's RSS until the handle closes, so a long-lived handle
would make memory grow with the model instead of the largest tensor.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from safetensors import safe_open

from mergelib.io.index import TensorInfo

_bin_lock = threading.Lock()
_bin_cache: dict[Path, dict[str, torch.Tensor]] = {}


def read_tensor(name: str, info: TensorInfo) -> torch.Tensor:
    """Tensor `name` from its file, as stored (dtype and shape of the checkpoint)."""
    if info.file.suffix == ".safetensors":
        with safe_open(str(info.file), framework="pt") as handle:
            return handle.get_tensor(name)
    with _bin_lock:
        state = _bin_cache.get(info.file)
        if state is None:
            state = torch.load(info.file, map_location="cpu", mmap=True, weights_only=True)
            _bin_cache[info.file] = state
    return state[name].clone()


def read_rows(name: str, info: TensorInfo, start: int, end: int) -> torch.Tensor:
    """Rows [start, end) of tensor `name` (along dim 0), reading only those bytes."""
    if info.file.suffix == ".safetensors":
        with safe_open(str(info.file), framework="pt") as handle:
            return handle.get_slice(name)[start:end]
    return read_tensor(name, info)[start:end].clone()
