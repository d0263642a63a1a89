"""`merge_state_dicts`: the merge math on state dicts in memory, for integrators (no files, no recipe on disk).

The same method code, parameter resolution (scalar, gradient over the layers, filter) and per-(seed, tensor)
randomness as the file path, so the result equals `mergelib.merge` on the same tensors bit for bit. Layers are
found from the tensor names (any `<prefix>.<n>.` stack: decoders and BERT-like encoders alike). torch's thread
settings are left as they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mergelib.arch.spec import infer_spec
from mergelib.config import params as param_values
from mergelib.errors import InputModelError, RecipeError
from mergelib.io.convert import to_float32
from mergelib.merging.plan_tensors import ParamCache
from mergelib.merging.rng import generator_for
from mergelib.methods import MethodInputs, get_method
from mergelib.methods.global_topk import kept_counts

StateDict = Mapping[str, torch.Tensor]


def merge_state_dicts(
    method: str,
    base: StateDict | None,
    models: Sequence[StateDict],
    parameters: Mapping[str, Any] | None = None,
    *,
    model_parameters: Sequence[Mapping[str, Any]] | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    statistics: Sequence[Mapping[str, torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """Merge `models` (and `base`, in the role the method gives it) tensor by tensor into a new state dict.

    `parameters` are the recipe's top-level parameters (global ones, and per-model ones applying to every model);
    `model_parameters[i]` are model i's own (mergekit's `models[i].parameters`). Every tensor of the first input
    must be in every input with the same shape. Output tensors take `dtype`, else the lead input's dtype (the base
    when the method uses one). Data-aware methods (regmean, fisher) take `statistics[i]`: model i's statistic per
    tensor name (the format of `mergelib.calibration.store`). Raises a one-line MergelibError for anything wrong,
    before any math."""
    spec = get_method(method)
    if spec.statistics is not None and (statistics is None or len(statistics) != len(models)):
        raise RecipeError(f"statistics: {spec.name} needs one mapping of {spec.statistics} statistics per model")
    if spec.statistics is None and statistics is not None:
        raise RecipeError(f"statistics: {spec.name} uses no statistics; leave them out")
    parameters = dict(parameters or {})
    per_model = [dict(p) for p in (model_parameters or [{} for _ in models])]
    if len(per_model) != len(models):
        raise RecipeError(f"model_parameters: {len(per_model)} entries for {len(models)} models; give one per model")
    inputs, base_sd = list(models), None
    if base is not None and spec.base in ("required", "optional"):
        base_sd = base
    elif base is not None and spec.base == "input":
        inputs, per_model = [*inputs, base], [*per_model, {}]
    if spec.base == "required" and base_sd is None:
        raise RecipeError(f"base: {spec.name} needs a base model's state dict")
    n = len(inputs)
    if n < spec.min_models or (spec.max_models is not None and n > spec.max_models):
        most = f" and at most {spec.max_models}" if spec.max_models else ""
        raise RecipeError(f"models: {spec.name} takes at least {spec.min_models}{most} model(s); got {n}")
    lead = base_sd if base_sd is not None else inputs[0]
    _check_tensors(lead, ([base_sd] if base_sd is not None else []) + inputs)
    names = list(lead)
    layer_spec = infer_spec({}, names)
    layers = [layer_spec.layer_of(name) for name in names]
    n_layers = 1 + max((i for i in layers if i is not None), default=0)
    cache = ParamCache(spec)
    resolved: dict[str, tuple] = {}
    for name, layer in zip(names, layers):
        t = layer / (n_layers - 1) if layer is not None and n_layers > 1 else (1.0 if layer is not None else 0.0)
        global_values = param_values.resolve(cache.global_names, [parameters], name, t)
        params = cache.validate(spec.params, global_values, f"at tensor '{name}'")
        model_params = tuple(
            cache.validate(spec.model_params, param_values.resolve(cache.model_names, [own, parameters], name, t),
                           f"for model {i} at tensor '{name}'")
            for i, own in enumerate(per_model)
        )
        if spec.check is not None:
            try:
                spec.check(params, model_params)
            except ValueError as exc:
                raise RecipeError(f"{spec.name} at tensor '{name}': {exc}") from None
        resolved[name] = (params, model_params)
    if spec.global_top_k:
        resolved = _with_kept_counts(resolved, base_sd, inputs)
    out: dict[str, torch.Tensor] = {}
    for name in names:
        params, model_params = resolved[name]
        merged = spec.merge(
            MethodInputs(
                tensors=tuple(_float32(sd[name], name) for sd in inputs),
                base=_float32(base_sd[name], name) if base_sd is not None else None,
                model_params=model_params,
                name=name,
                generator=generator_for(seed, name) if spec.randomized else None,
                statistics=(tuple(None if st.get(name) is None else _float32(st[name], name) for st in statistics)
                            if statistics is not None else None),
            ),
            params,
        )
        target = dtype or lead[name].dtype
        out[name] = merged.to(target if target.is_floating_point else lead[name].dtype)
    return out


def _with_kept_counts(resolved: dict[str, tuple], base: StateDict, inputs: list[StateDict]) -> dict[str, tuple]:
    """Each model's share of its model-wide top-k per tensor (`MethodSpec.global_top_k`; see `global_topk`)."""
    densities = [{mp[i].density for _, mp in resolved.values()} for i in range(len(inputs))]
    for i, values in enumerate(densities):
        if len(values) > 1:
            raise RecipeError(f"density: model {i} needs one density over all its tensors (the trim is model-wide)")
    size = sum(base[name].numel() for name in resolved)
    ks = [int(next(iter(d)) * size) for d in densities]

    def magnitudes(name: str):
        b = _float32(base[name], name)
        return ((i, (_float32(sd[name], name) - b).abs()) for i, sd in enumerate(inputs))

    counts = kept_counts(list(resolved), ks, magnitudes)
    return {name: (params, tuple(p.model_copy(update={"kept": counts[name][i]}) for i, p in enumerate(mp)))
            for name, (params, mp) in resolved.items()}


def _check_tensors(lead: StateDict, inputs: list[StateDict]) -> None:
    for i, sd in enumerate(inputs):
        for name, tensor in lead.items():
            if name not in sd:
                raise InputModelError(f"tensor '{name}' is missing from input {i}; every input needs the same tensors")
            if tuple(sd[name].shape) != tuple(tensor.shape):
                raise InputModelError(
                    f"tensor '{name}': {list(sd[name].shape)} in input {i}, {list(tensor.shape)} in the first input"
                )


def _float32(tensor: torch.Tensor, name: str) -> torch.Tensor:
    value, finite = to_float32(tensor.detach().cpu())
    if not finite:
        raise InputModelError(f"tensor '{name}' holds NaN or Inf values; fix the state dict before merging")
    return value
