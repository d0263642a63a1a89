"""Base + LoRA materialised for `model+lora` recipe inputs: the adapter's deltas (B @ A times PEFT's scale, with
its rank/alpha patterns and rsLoRA) added to the base's weights, cached by the content hash of both. Hu et al. 2021,
arXiv 2106.09685."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import torch

from mergelib.errors import InputModelError
from mergelib.io.atomic import MARKER, check_output_dir, commit_dir, staging_dir
from mergelib.io.cache import cache_dir
from mergelib.io.hashing import sha256_files
from mergelib.io.hub import resolve_model
from mergelib.io.index import ShardIndex, TensorInfo, index_model
from mergelib.io.journal import plan_key
from mergelib.io.reader import read_tensor
from mergelib.io.writer import ShardFile, TensorSlot, shard_names, write_index
from mergelib.lora.extract import PREFIX

APPLY_VERSION = "1"  # bump when apply_lora's output bytes for the same inputs change
_FACTOR = re.compile(r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.[^.]+)*$")
_COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
           "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
           "chat_template.jinja")


def lora_cache_dir() -> Path:
    """Where `model+lora` inputs are materialised: $MERGELIB_CACHE/lora, else ~/.cache/mergelib/lora."""
    return cache_dir("lora")


def lora_input(model_dir: Path, lora_ref: str) -> Path:
    """The model directory a recipe input `model+lora_ref` (`lora_path[@revision]`) stands for."""
    path, _, revision = lora_ref.partition("@")
    return apply_lora(model_dir, resolve_model(path, revision or None), lora_cache_dir())


def _pattern_value(patterns: dict, module: str, default):
    for key, value in patterns.items():  # PEFT's rule: the first key matching the end of the module name
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read_adapter(lora_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    try:
        config = json.loads((lora_dir / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise InputModelError(f"{lora_dir}: no readable adapter_config.json ({exc}); is it a PEFT LoRA?") from None
    if config.get("peft_type", "LORA").upper() != "LORA":
        raise InputModelError(f"{lora_dir}: peft_type {config.get('peft_type')} is not LORA")
    if config.get("use_dora"):
        raise InputModelError(f"{lora_dir}: DoRA adapters are not supported; merge it with PEFT first")
    weights = lora_dir / "adapter_model.safetensors"
    if weights.is_file():
        from safetensors.torch import load_file

        return config, load_file(weights)
    if (lora_dir / "adapter_model.bin").is_file():
        return config, torch.load(lora_dir / "adapter_model.bin", map_location="cpu", weights_only=True)
    raise InputModelError(f"{lora_dir}: no adapter_model.safetensors or adapter_model.bin")


def lora_deltas(config: dict, weights: dict[str, torch.Tensor]) -> tuple[dict[str, tuple], dict[str, torch.Tensor]]:
    """Per module: (kind, A, B, scale), and the tensors stored whole (modules_to_save), keyed by tensor name."""
    factors: dict[str, dict[str, torch.Tensor]] = {}
    whole: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        name = key.removeprefix(PREFIX)
        match = _FACTOR.match(name)
        if match:
            factors.setdefault(match["module"], {})[match["kind"]] = value
        elif name.endswith((".weight", ".bias")) and not re.search(r"\.(lora_|base_layer)", name):
            whole[name.replace(".modules_to_save.default.", ".")] = value
        else:
            raise InputModelError(f"adapter tensor '{key}' is not a LoRA factor this version can apply")
    out = {}
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    for module, parts in factors.items():
        kind = "embedding" if "lora_embedding_A" in parts else "linear"
        a, b = (parts.get("lora_embedding_A"), parts.get("lora_embedding_B")) if kind == "embedding" else (
            parts.get("lora_A"), parts.get("lora_B"))
        if a is None or b is None:
            raise InputModelError(f"adapter module '{module}' has only one of its two LoRA factors")
        rank = _pattern_value(config.get("rank_pattern") or {}, module, r)
        mod_alpha = _pattern_value(config.get("alpha_pattern") or {}, module, alpha)
        scale = mod_alpha / math.sqrt(rank) if config.get("use_rslora") else mod_alpha / rank
        out[module] = (kind, a, b, scale)
    return out, whole


def _delta(kind: str, a: torch.Tensor, b: torch.Tensor, scale: float, fan_in_fan_out: bool) -> torch.Tensor:
    product = b.float() @ a.float()  # (out, in), or for an embedding (hidden, vocab)
    if kind == "embedding" or fan_in_fan_out:
        product = product.T
    return product * scale


def apply_lora(model_dir: str | Path, lora_dir: str | Path, cache_dir: str | Path) -> Path:
    """`model_dir` with the LoRA at `lora_dir` merged into its weights, written under `cache_dir` in a directory
    named by the content hash of both (model files, adapter files, this code's version); reused when present."""
    model_dir, lora_dir, cache_dir = Path(model_dir), Path(lora_dir), Path(cache_dir)
    index = index_model(model_dir)
    adapter_files = sorted(p for p in lora_dir.iterdir() if p.name.startswith("adapter_")) if lora_dir.is_dir() else []
    if not adapter_files:
        raise InputModelError(f"LoRA '{lora_dir}': not a directory with adapter_config.json and adapter weights")
    files = [*index.files, model_dir / "config.json", *adapter_files]
    digests = sha256_files(files)
    key = plan_key([APPLY_VERSION] + [f"{p.name}|{digests[str(p)]}" for p in files])
    target = cache_dir / key[:32]
    if (target / MARKER).is_file():
        return target
    config, weights = _read_adapter(lora_dir)
    deltas, whole = lora_deltas(config, weights)
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    for module in deltas:
        if f"{module}.weight" not in index.tensors:
            raise InputModelError(f"LoRA '{lora_dir}' targets '{module}', which '{model_dir}' does not store")
    for name in whole:
        if name not in index.tensors:
            raise InputModelError(f"LoRA '{lora_dir}' stores '{name}', which '{model_dir}' does not have")
    cache_dir.mkdir(parents=True, exist_ok=True)
    check_output_dir(target)
    staged = staging_dir(target, key)
    try:
        _write_applied(staged, index, deltas, whole, fan_in_fan_out)
        for name in _COPIED:
            if (model_dir / name).is_file():
                shutil.copyfile(model_dir / name, staged / name)
        record = {"kind": "lora-apply", "model": str(model_dir), "lora": str(lora_dir), "key": key}
        (staged / MARKER).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        commit_dir(staged, target)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return target


def _write_applied(staged: Path, index: ShardIndex, deltas: dict, whole: dict, fan_in_fan_out: bool,
                   shard_limit: int = 5_000_000_000) -> None:
    slots, size = [[]], 0
    for name, info in index.tensors.items():  # the base's layout: same names, shapes and dtypes
        slot = TensorSlot(name, info.shape, info.dtype)
        if slots[-1] and size + slot.nbytes > shard_limit:
            slots.append([])
            size = 0
        slots[-1].append(slot)
        size += slot.nbytes
    layout = dict(zip(shard_names(len(slots)), slots))
    for fname, group in layout.items():
        shard = ShardFile(staged / fname, group, {"format": "pt"})
        try:
            for slot in group:
                shard.write(slot.name, _applied(slot.name, index.tensors[slot.name], deltas, whole, fan_in_fan_out))
        finally:
            shard.close()
    write_index(staged, layout, {})


def _applied(name: str, info: TensorInfo, deltas: dict, whole: dict, fan_in_fan_out: bool) -> torch.Tensor:
    if name in whole:
        value = whole[name]
        if tuple(value.shape) != info.shape:
            raise InputModelError(f"adapter tensor {name} is {list(value.shape)}, the model's is {list(info.shape)}")
        return value.to(info.dtype).contiguous()
    tensor = read_tensor(name, info)
    module = name.removesuffix(".weight")
    if name.endswith(".weight") and module in deltas:
        delta = _delta(*deltas[module], fan_in_fan_out)
        if tuple(delta.shape) != info.shape:
            raise InputModelError(f"LoRA for {module} gives {list(delta.shape)}, the weight is {list(info.shape)}")
        tensor = (tensor.float() + delta).to(info.dtype)
    return tensor.contiguous()
