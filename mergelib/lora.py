"""LoRA adapters from weight deltas (`mergelib extract-lora`), and base + LoRA materialised for `model+lora` inputs.

Extraction: per Linear/Embedding module, the truncated SVD of delta = W_ft - W_base (Eckart-Young: the best rank-r
approximation, Frobenius error sqrt(sum of the dropped s_i^2)), written as a PEFT adapter (lora_A = sqrt(S)V^T,
lora_B = U sqrt(S), lora_alpha = r per module, so the scale is 1). Hu et al. 2021, arXiv 2106.09685; mergekit
semantics in mergekit-semantics.md section 2(b), `mergekit-extract-lora`.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from mergelib.errors import InputModelError, RecipeError
from mergelib.io.atomic import MARKER, check_output_dir, commit_dir, staging_dir
from mergelib.io.hashing import sha256_files
from mergelib.io.hub import resolve_model
from mergelib.io.index import ShardIndex, TensorInfo, index_model
from mergelib.io.journal import plan_key
from mergelib.io.reader import read_tensor
from mergelib.io.writer import ShardFile, TensorSlot, shard_names, write_index

PREFIX = "base_model.model."
APPLY_VERSION = "1"  # bump when apply_lora's output bytes for the same inputs change
_FACTOR = re.compile(r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.[^.]+)*$")
_COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
           "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
           "chat_template.jinja")


@dataclass(frozen=True)
class LoraResult:
    """What `extract_lora` wrote."""

    out_dir: Path
    ranks: dict[str, int]  # module -> rank of its factors
    errors: dict[str, float]  # module -> relative Frobenius error of the truncation, ||delta - BA|| / ||delta||
    saved_modules: tuple[str, ...]  # stored whole (modules_to_save)
    notes: tuple[str, ...]


def module_kinds(model_dir: Path) -> dict[str, str]:
    """Module name -> `linear`, `embedding` or `other` for every module with its own `weight`, from the model
    class built on the meta device (no weights are read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except (OSError, ValueError, KeyError) as exc:
        raise InputModelError(f"{model_dir}: cannot build its model class to find the modules ({exc})") from None
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module._parameters.get("weight"), torch.Tensor):
            continue
        if isinstance(module, torch.nn.Linear):
            out[name] = "linear"
        elif isinstance(module, torch.nn.Embedding):
            out[name] = "embedding"
        else:
            out[name] = "other"
    return out


def low_rank(delta: torch.Tensor, max_rank: int, sv_epsilon: float = 0.0, distribute_scale: bool = True):
    """(A, B, error) with B @ A the best approximation of `delta` (out, in) of rank
    r = min(max_rank, #singular values, #{s > sv_epsilon}); A is (r, in), B is (out, r); `error` is the relative
    Frobenius error. r = 0 gives empty factors."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)  # (out, k), (k,), (k, in)
    rank = min(max_rank, s.numel(), int((s > sv_epsilon).sum()))
    total = s.square().sum()
    error = math.sqrt(s[rank:].square().sum() / total) if total > 0 else 0.0
    s, u, vh = s[:rank], u[:, :rank], vh[:rank]
    if distribute_scale:
        root = s.sqrt()
        return root[:, None] * vh, u * root[None, :], error
    return s[:, None] * vh, u, error


def _selected(name: str, include: list[str], exclude: list[str]) -> bool:
    if include and not any(re.search(p, name) for p in include):
        return False
    return not any(re.search(p, name) for p in exclude)


def _tensor(index: ShardIndex, name: str) -> torch.Tensor:
    return read_tensor(name, index.tensors[name])


def extract_lora(model: str | Path, base: str | Path, out_dir: str | Path, *, max_rank: int = 128,
                 sv_epsilon: float = 0.0, include: list[str] | tuple[str, ...] = (),
                 exclude: list[str] | tuple[str, ...] = (), distribute_scale: bool = True, embed_lora: bool = False,
                 skip_undecomposable: bool = False) -> LoraResult:
    """Write a PEFT LoRA adapter to `out_dir` that turns `base` into (approximately) `model`: one SVD per changed
    Linear (and, with `embed_lora`, Embedding) module; other changed modules are stored whole (modules_to_save)
    unless `skip_undecomposable`. Modules are filtered by `include`/`exclude` regexes (re.search on the name)."""
    if max_rank < 1:
        raise RecipeError(f"--max-rank must be at least 1, got {max_rank}")
    if sv_epsilon < 0:
        raise RecipeError(f"--sv-epsilon must be >= 0, got {sv_epsilon}")
    for pattern in (*include, *exclude):
        try:
            re.compile(pattern)
        except re.error as exc:
            raise RecipeError(f"'{pattern}' is not a valid regular expression ({exc})") from None
    out_dir = Path(out_dir)
    check_output_dir(out_dir)
    ft_path, base_path = _resolve(model), _resolve(base)
    ft_index, base_index = index_model(ft_path), index_model(base_path)
    kinds = module_kinds(base_path)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    errors: dict[str, float] = {}
    saved: list[str] = []
    notes: list[str] = []
    for module, kind in kinds.items():
        name = f"{module}.weight"
        if not _selected(module, list(include), list(exclude)):
            continue
        if name not in ft_index.tensors and name not in base_index.tensors:
            continue  # a tied output head, or stored under another name: nothing to compare
        if (name in ft_index.tensors) != (name in base_index.tensors):
            where = "the fine-tune" if name in base_index.tensors else "the base"
            raise InputModelError(f"{name} is missing from {where}; both models need the same tensors")
        ft, bw = _tensor(ft_index, name), _tensor(base_index, name)
        if ft.shape != bw.shape:
            raise InputModelError(
                f"{name}: {list(ft.shape)} in the fine-tune, {list(bw.shape)} in the base; extract-lora needs equal "
                "shapes (resize the base's vocabulary first)"
            )
        bias_changed = _bias_changed(ft_index, base_index, module)
        delta = ft.float() - bw.float()
        if not delta.any() and not bias_changed:
            continue
        factor = kind == "linear" or (kind == "embedding" and embed_lora)
        if factor and bias_changed:
            notes.append(f"{module}: its bias changed and a LoRA cannot hold it; left at the base's value")
        if not factor:
            if kind == "other" and skip_undecomposable:
                notes.append(f"{module}: changed but not decomposable, skipped (--skip-undecomposable)")
                continue
            saved.append(module)
            tensors[f"{PREFIX}{name}"] = ft.contiguous()
            if f"{module}.bias" in ft_index.tensors:
                tensors[f"{PREFIX}{module}.bias"] = _tensor(ft_index, f"{module}.bias").contiguous()
            continue
        # an embedding's LoRA factors act on the transposed weight: delta^T (hidden, vocab) = B @ A
        a, b, err = low_rank(delta.T if kind == "embedding" else delta, max_rank, sv_epsilon, distribute_scale)
        if a.shape[0] == 0:
            notes.append(f"{module}: every singular value is <= sv_epsilon, no LoRA")
            continue
        names = ("lora_embedding_A", "lora_embedding_B") if kind == "embedding" else ("lora_A.weight", "lora_B.weight")
        tensors[f"{PREFIX}{module}.{names[0]}"] = a.to(ft.dtype).contiguous()
        tensors[f"{PREFIX}{module}.{names[1]}"] = b.to(ft.dtype).contiguous()
        ranks[module] = a.shape[0]
        errors[module] = err
    if not ranks and not saved:
        raise InputModelError(f"'{model}' and '{base}' do not differ in any selected module; nothing to extract")
    _write_adapter(out_dir, tensors, ranks, saved, str(base), {
        "kind": "extract-lora", "model": str(model), "base": str(base), "max_rank": max_rank,
        "sv_epsilon": sv_epsilon, "distribute_scale": distribute_scale, "embed_lora": embed_lora,
        "include": list(include), "exclude": list(exclude), "errors": errors,
    })
    return LoraResult(out_dir, ranks, errors, tuple(saved), tuple(notes))


def _resolve(text: str | Path) -> Path:
    """A model directory from `path[@revision]` (a local directory is taken as is, '@' and all)."""
    if Path(text).expanduser().is_dir():
        return Path(text).expanduser().resolve()
    path, _, revision = str(text).partition("@")
    return resolve_model(path, revision or None)


def _bias_changed(ft_index: ShardIndex, base_index: ShardIndex, module: str) -> bool:
    name = f"{module}.bias"
    if name not in ft_index.tensors or name not in base_index.tensors:
        return False
    return not torch.equal(_tensor(ft_index, name), _tensor(base_index, name))


def _write_adapter(out_dir: Path, tensors: dict[str, torch.Tensor], ranks: dict[str, int], saved: list[str],
                   base_name: str, record: dict) -> None:
    r = max(ranks.values(), default=1)
    patterns = {m: k for m, k in ranks.items() if k != r}
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": r, "lora_alpha": r, "rank_pattern": patterns, "alpha_pattern": dict(patterns),
        "target_modules": sorted(ranks), "modules_to_save": sorted(saved) or None,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True,
    }
    staged = staging_dir(out_dir, plan_key([json.dumps(config, sort_keys=True), json.dumps(record, sort_keys=True)]))
    save_file(tensors, staged / "adapter_model.safetensors", metadata={"format": "pt"})
    (staged / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (staged / "README.md").write_text(
        f"# LoRA adapter extracted by mergelib\n\nBase model: `{base_name}`. Fine-tune: `{record['model']}`.\n"
        f"Rank {r} (max {record['max_rank']}), {len(ranks)} LoRA modules, {len(saved)} modules stored whole.\n"
        "Load it with `peft.PeftModel.from_pretrained(base, path)`.\n"
    )
    (staged / MARKER).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    commit_dir(staged, out_dir)


# ---- base + LoRA, materialised ----------------------------------------------------------------------------------


def lora_cache_dir() -> Path:
    """Where `model+lora` inputs are materialised: $MERGELIB_CACHE/lora, else ~/.cache/mergelib/lora."""
    root = os.environ.get("MERGELIB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mergelib"
    )
    return Path(root) / "lora"


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
