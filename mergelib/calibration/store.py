"""The statistics file format and its readers: one safetensors file per input model, key = the weight's name in
that model's checkpoint, value float32; metadata {"kind": "gram"|"fisher", "tokens", "samples", "format", ...}.

  gram:   [in, in] = sum over the calibration tokens of x x^T, x the Linear's input (accumulated in float64)
  fisher: the weight's shape = sum over calibration sequences of the squared gradient of that sequence's
          log-likelihood (the empirical Fisher: labels are the data's next tokens)

Files are written whole under a temporary name and renamed, so a cached file is never half written.
"""

from __future__ import annotations

import json
import os
import struct
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from mergelib.errors import RecipeError
from mergelib.io.writer import ShardFile, TensorSlot

FORMAT_VERSION = "1"  # bump when the statistics the same inputs give change


@contextmanager
def statistics_file(path: Path, shapes: dict[str, tuple[int, ...]], metadata: dict[str, str]):
    """A ShardFile for `shapes` (float32) whose tensors are written in any order; renamed into `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    meta = {"format": "pt", "mergelib_statistics": FORMAT_VERSION, **metadata}
    shard = ShardFile(tmp, [TensorSlot(n, s, torch.float32) for n, s in shapes.items()], meta)
    try:
        yield shard
        shard.close()
        os.replace(tmp, path)
    finally:
        shard.close()
        tmp.unlink(missing_ok=True)


def read_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """(metadata, name -> shape) of a safetensors file, from its header only; RecipeError when unreadable."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100 << 20:
                raise ValueError("header too large")
            header = json.loads(handle.read(length))
    except (OSError, ValueError, struct.error) as exc:
        raise RecipeError(f"calibration.statistics: cannot read {path} as safetensors ({exc})") from None
    meta = header.pop("__metadata__", None) or {}
    return meta, {name: tuple(entry["shape"]) for name, entry in header.items()}


@dataclass(frozen=True)
class StatisticsStore:
    """Per input model (index into MergePlan.models): its statistics file; `get` reads one tensor."""

    kind: str
    files: dict[int, Path]
    digests: dict[int, str] = field(default_factory=dict)  # model -> cache key or sha256 of the file
    reused: dict[int, bool] = field(default_factory=dict)  # model -> taken from the cache, not gathered now

    def get(self, model: int, name: str) -> torch.Tensor | None:
        path = self.files.get(model)
        if path is None:
            return None
        with safe_open(path, "pt") as handle:
            return handle.get_tensor(name).to(torch.float32) if name in set(handle.keys()) else None


@dataclass(frozen=True)
class MemoryStore:
    """Statistics held in memory: (model, name) -> tensor (RegMean++ merges a layer before its file is closed)."""

    kind: str
    tensors: dict[tuple[int, str], torch.Tensor]

    def get(self, model: int, name: str) -> torch.Tensor | None:
        return self.tensors.get((model, name))


def expected_shape(kind: str, weight_shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The statistic's shape for a weight of `weight_shape` (None: a gram needs a 2-D weight)."""
    if kind == "fisher":
        return tuple(weight_shape)
    return (weight_shape[1], weight_shape[1]) if len(weight_shape) == 2 else None


def check_statistics_file(path: Path, kind: str, label: str, weights: dict[str, tuple[int, ...]]) -> None:
    """A precomputed file is of `kind` and each of its tensors that names a merged weight has the right shape."""
    if not path.is_file():
        raise RecipeError(f"calibration.statistics: file {path} for model '{label}' does not exist")
    meta, shapes = read_header(path)
    if meta.get("kind") != kind:
        raise RecipeError(f"calibration.statistics: {path} holds kind '{meta.get('kind')}' statistics, the method "
                          f"needs '{kind}'")
    for name, shape in shapes.items():
        if name in weights:
            want = expected_shape(kind, weights[name])
            if want is not None and shape != want:
                raise RecipeError(f"calibration.statistics: {path}: '{name}' is {list(shape)}, a {kind} of a weight "
                                  f"shaped {list(weights[name])} is {list(want)}")
