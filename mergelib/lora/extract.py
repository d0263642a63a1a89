"""LoRA adapters from weight deltas (`mergelib extract-lora`).

Per Linear/Embedding module, the truncated SVD of delta = W_ft - W_base (Eckart-Young: the best rank-r
approximation, Frobenius error sqrt(sum of the dropped s_i^2)), written as a PEFT adapter (lora_A = sqrt(S)V^T,
lora_B = U sqrt(S), lora_alpha = r per module, so the scale is 1). Hu et al. 2021, arXiv 2106.09685; mergekit
semantics in mergekit-semantics.md section 2(b), `mergekit-extract-lora`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from mergelib.errors import InputModelError, RecipeError
from mergelib.io.atomic import MARKER, check_output_dir, commit_dir, staging_dir
from mergelib.io.hub import resolve_model
from mergelib.io.index import ShardIndex, index_model
from mergelib.io.journal import plan_key
from mergelib.io.reader import read_tensor

PREFIX = "base_model.model."


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
    undecomposable: list[str] = []  # tensors no adapter on this base can reproduce: an error, or skipped and listed
    for module, kind in kinds.items():
        name = f"{module}.weight"
        if not _selected(module, list(include), list(exclude)):
            continue
        if name not in ft_index.tensors and name not in base_index.tensors:
            continue  # a tied output head, or stored under another name: nothing to compare
        if (name in ft_index.tensors) != (name in base_index.tensors):
            undecomposable.append(f"{name} (only in the {'base' if name in base_index.tensors else 'fine-tune'})")
            continue
        ft, bw = _tensor(ft_index, name), _tensor(base_index, name)
        if ft.shape != bw.shape:
            undecomposable.append(f"{name} ({list(ft.shape)} in the fine-tune, {list(bw.shape)} in the base)")
            continue
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
    undecomposable += _unaccounted(ft_index, base_index, kinds, include, exclude)
    undecomposable.sort(key=lambda entry: entry.endswith("(only in the base)"))  # what the adapter would lose first
    if undecomposable and not skip_undecomposable:
        more = len(undecomposable) - 3
        shown = "; ".join(undecomposable[:3]) + (f"; and {more} more" if more > 0 else "")
        raise InputModelError(
            f"'{model}' does not match base '{base}' in {len(undecomposable)} tensor(s): {shown}. Use the base it "
            "was fine-tuned from, or pass --skip-undecomposable to leave these out (they are listed in the report)"
        )
    if undecomposable:
        notes.append(f"left out {len(undecomposable)} tensor(s) the base cannot take (--skip-undecomposable): "
                     + "; ".join(undecomposable))
    if not ranks and not saved:
        raise InputModelError(f"'{model}' and '{base}' do not differ in any selected module; nothing to extract")
    _write_adapter(out_dir, tensors, ranks, saved, str(base), {
        "kind": "extract-lora", "model": str(model), "base": str(base), "max_rank": max_rank,
        "left_out": undecomposable,
        "sv_epsilon": sv_epsilon, "distribute_scale": distribute_scale, "embed_lora": embed_lora,
        "include": list(include), "exclude": list(exclude), "errors": errors,
    })
    return LoraResult(out_dir, ranks, errors, tuple(saved), tuple(notes))


def _unaccounted(ft_index: ShardIndex, base_index: ShardIndex, kinds: dict[str, str], include, exclude) -> list[str]:
    """Selected tensors outside every module of the base's architecture that the adapter could not reproduce: in
    one model only, shaped differently, or changed (a fine-tune of another architecture lands here)."""
    known = {f"{module}.{part}" for module in kinds for part in ("weight", "bias")}
    out = []
    for name in sorted(set(ft_index.tensors) | set(base_index.tensors)):
        if name in known or not _selected(name.rsplit(".", 1)[0], list(include), list(exclude)):
            continue
        if (name in ft_index.tensors) != (name in base_index.tensors):
            out.append(f"{name} (only in the {'base' if name in base_index.tensors else 'fine-tune'})")
        elif ft_index.tensors[name].shape != base_index.tensors[name].shape:
            out.append(f"{name} ({list(ft_index.tensors[name].shape)} in the fine-tune, "
                       f"{list(base_index.tensors[name].shape)} in the base)")
        elif not torch.equal(_tensor(ft_index, name), _tensor(base_index, name)):
            out.append(f"{name} (changed, and no module of the base's architecture holds it)")
    return out


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
