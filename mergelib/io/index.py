"""The shard map of a checkpoint: every tensor's file, shape and dtype, read from headers only.

Handles `model.safetensors[.index.json]` (any shard names listed by the index) and PyTorch
`pytorch_model*.bin` (opened with `torch.load(mmap=True, weights_only=True)`, so no code runs and no weights are read).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from mergelib.config.textfile import read_json
from mergelib.errors import InputModelError
from mergelib.io.gguf_input import gguf_file_of, gguf_tensors
from mergelib.io.quantized import fold as fold_quantized

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,  # FP8 checkpoints: dequantised on read (mergelib.io.quantized)
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, without its data."""

    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    data_offset: int | None = None  # absolute byte offset of the data in a safetensors file (None for .bin)
    dequant: Any = None  # rebuilt on read (quantized.Dequant, gguf_input.GgufDequant: both .read), else None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class ShardIndex:
    """All tensors of one model directory."""

    root: Path
    tensors: dict[str, TensorInfo]
    note: str | None = None  # what was dequantised on read, when the checkpoint is quantised

    @property
    def files(self) -> list[Path]:
        return sorted({info.file for info in self.tensors.values()})


def _data_offsets(path: Path) -> dict[str, int]:
    """Each tensor's absolute data offset, from a header safetensors has already validated (u64 header
    length, JSON header, then the data; `data_offsets` count from the end of the header)."""
    with open(path, "rb") as handle:
        length = struct.unpack("<Q", handle.read(8))[0]
        header = json.loads(handle.read(length))
    return {name: 8 + length + entry["data_offsets"][0] for name, entry in header.items() if name != "__metadata__"}


def _safetensors_infos(path: Path) -> dict[str, TensorInfo]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            out = {}
            for name in handle.keys():
                piece = handle.get_slice(name)
                code = piece.get_dtype()
                if code not in SAFETENSORS_DTYPES:
                    raise InputModelError(f"{path}: tensor '{name}' has unsupported dtype {code}")
                out[name] = TensorInfo(path, tuple(piece.get_shape()), SAFETENSORS_DTYPES[code])
        offsets = _data_offsets(path)
        return {name: replace(info, data_offset=offsets[name]) for name, info in out.items()}
    except InputModelError:
        raise
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise InputModelError(f"{path}: not a readable safetensors file ({exc}); re-download it") from None


def _bin_infos(path: Path) -> dict[str, TensorInfo]:
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:
        raise InputModelError(
            f"{path}: cannot load it safely with weights_only=True ({str(exc).splitlines()[0]}); "
            "convert it to safetensors"
        ) from None
    if not isinstance(state, dict):
        raise InputModelError(f"{path}: expected a state dict of tensors")
    return {k: TensorInfo(path, tuple(v.shape), v.dtype) for k, v in state.items() if isinstance(v, torch.Tensor)}


def _read_index_json(path: Path) -> list[Path]:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputModelError(f"{path}: not a valid shard index ({exc}); re-download the model") from None
    files = []
    for name in sorted(set(weight_map.values())):
        shard = path.parent / name
        if not shard.is_file():
            raise InputModelError(f"{path}: lists shard '{name}', which is missing; re-download the model")
        files.append(shard)
    return files


def index_model(root: Path) -> ShardIndex:
    """The shard index of a model directory (safetensors preferred over .bin)."""
    root = Path(root)
    if not root.is_dir():
        raise InputModelError(f"{root}: model directory not found")
    gguf_file = gguf_file_of(root)
    if gguf_file is not None:  # a GGUF input (mergelib.io.gguf_input): dequantised on read like FP8/MXFP4
        infos, note = gguf_tensors(gguf_file)
        return ShardIndex(root, {n: TensorInfo(gguf_file, shape, dtype, None, dequant)
                                 for n, (shape, dtype, dequant) in infos.items()}, note)
    candidates: list[Path]
    if (root / "model.safetensors.index.json").is_file():
        candidates = _read_index_json(root / "model.safetensors.index.json")
    elif (root / "model.safetensors").is_file():
        candidates = [root / "model.safetensors"]
    elif sorted(root.glob("*.safetensors")):
        candidates = sorted(root.glob("*.safetensors"))
    elif (root / "pytorch_model.bin.index.json").is_file():
        candidates = _read_index_json(root / "pytorch_model.bin.index.json")
    elif (root / "pytorch_model.bin").is_file():
        candidates = [root / "pytorch_model.bin"]
    else:
        raise InputModelError(f"{root}: no model.safetensors, shard index or pytorch_model.bin found")
    allowed = _allowed_root(root)
    tensors: dict[str, TensorInfo] = {}
    for path in candidates:
        target = path.resolve()
        if not target.is_relative_to(allowed):
            raise InputModelError(
                f"{path}: a symlink out of the model directory (to {target}); copy the file into the model instead"
            )
        infos = _safetensors_infos(path) if path.suffix == ".safetensors" else _bin_infos(path)
        for name, info in infos.items():
            if name in tensors:
                raise InputModelError(f"{root}: tensor '{name}' is stored twice ({tensors[name].file.name}, {path.name})")
            tensors[name] = info
    config = _optional_config(root)
    tensors, note = fold_quantized(tensors, config, f"model {root}")
    return ShardIndex(root, tensors, note)


def _optional_config(root: Path) -> dict:
    """config.json when it is there and readable (quantisation settings), else {}; the planner checks it."""
    try:
        config = json.loads((root / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _allowed_root(root: Path) -> Path:
    """Where a model's files may live: its directory, or for a Hugging Face cache snapshot (whose files are
    symlinks to ../../blobs) the cached repository."""
    root = root.resolve()
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        return root.parent.parent
    return root


def read_config(root: Path) -> dict:
    """config.json of a model directory."""
    path = Path(root) / "config.json"
    if not path.exists():
        raise InputModelError(f"{path}: missing; a model directory needs its config.json")
    return read_json(path, "the model config", InputModelError, "fix or replace the model's config.json")
