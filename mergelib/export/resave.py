"""Re-save a model as safetensors in another dtype and shard size, streaming one tensor at a time.

Uses the planned-shard writer (mergelib.io.writer): every header is known before any tensor is read, so memory
holds one tensor. Floating tensors are cast; integer and bool tensors are copied as stored.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from mergelib.export.artifact import ExportArtifact, artifact_for
from mergelib.export.errors import ExportError
from mergelib.export.staging import staged_dir
from mergelib.io.index import ShardIndex, index_model, read_config
from mergelib.io.reader import read_tensor
from mergelib.io.writer import ShardFile, TensorSlot, pack_shards, write_index

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


def torch_dtype(name: str) -> torch.dtype:
    """`float32 | float16 | bfloat16` -> torch dtype, or an ExportError naming the choices."""
    if name not in DTYPES:
        raise ExportError(f"dtype '{name}': choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def group_slots(slots: list[TensorSlot], shard_size: int) -> dict[str, list[TensorSlot]]:
    """Slots in order, packed greedily into shards of at most `shard_size` bytes (a bigger tensor alone)."""
    if shard_size <= 0:
        raise ExportError(f"shard_size {shard_size}: must be a positive number of bytes")
    return pack_shards(slots, shard_size)


def write_shards(staged: Path, shards: dict[str, list[TensorSlot]],
                 produce: Callable[[str], torch.Tensor]) -> None:
    """Fill every planned shard, asking `produce(name)` for one tensor at a time; then the index."""
    for fname, slots in shards.items():
        shard = ShardFile(staged / fname, slots, {"format": "pt"})
        try:
            for slot in slots:
                shard.write(slot.name, produce(slot.name).contiguous())
        finally:
            shard.close()
    write_index(staged, shards, {})


def copy_side_files(model_dir: Path, tokenizer_dir: Path | None, staged: Path) -> None:
    """Copy everything but weights, indexes and config.json (the caller writes it); tokenizer files from
    `tokenizer_dir` replace the model's own."""
    for source in sorted(Path(model_dir).iterdir()):
        if (source.is_file() and not source.name.startswith(".") and source.name != "config.json"
                and not source.name.endswith(WEIGHT_SUFFIXES) and not source.name.endswith(".index.json")):
            shutil.copyfile(source, staged / source.name)
    if tokenizer_dir is not None and Path(tokenizer_dir).resolve() != Path(model_dir).resolve():
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copyfile(Path(tokenizer_dir) / name, staged / name)


def write_config(staged: Path, config: dict) -> None:
    (staged / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def source_index(model_dir: Path) -> ShardIndex:
    """The shard index of the model to export (InputModelError when it is not a model directory)."""
    return index_model(Path(model_dir))


def export_safetensors(model_dir: str | Path, out_dir: str | Path, *, dtype: str = "bfloat16",
                       shard_size: int = 5_000_000_000, tokenizer_dir: str | Path | None = None) -> ExportArtifact:
    """Write `out_dir`: the model of `model_dir` as safetensors in `dtype`, in shards of at most `shard_size`
    bytes, with config.json (its dtype updated), tokenizer and the other side files."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    target = torch_dtype(dtype)
    index = source_index(model_dir)
    slots = [TensorSlot(name, info.shape, target if info.dtype.is_floating_point else info.dtype)
             for name, info in sorted(index.tensors.items())]
    shards = group_slots(slots, shard_size)
    config = read_config(model_dir)
    config["dtype" if "dtype" in config or "torch_dtype" not in config else "torch_dtype"] = dtype
    wanted = {s.name: s.dtype for s in slots}
    with staged_dir(out_dir, marker="config.json") as staged:
        write_shards(staged, shards, lambda name: read_tensor(name, index.tensors[name]).to(wanted[name]))
        write_config(staged, config)
        copy_side_files(model_dir, Path(tokenizer_dir) if tokenizer_dir else None, staged)
    return artifact_for("safetensors", dtype, out_dir)
