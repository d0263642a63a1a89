"""RAM (Reinforced Agent Merging, arXiv:2601.13572): keep each task vector's unique elements whole and average
the elements several models change. `ramplus_tl` also scales a model's unique elements by
λ_i = 1 + r·clip(#shared_i / max(#unique_i, ε), 0, α), counted per tensor (mergekit's tensor-local variant).
"""

from __future__ import annotations

import torch
from pydantic import Field

from mergelib.methods.base import WEIGHT_IGNORED, IgnoredWeight, MethodInputs, MethodSpec, Params


class RamParams(Params):
    epsilon: float = Field(1e-5, ge=0.0)


class RamPlusParams(Params):
    r: float = Field(0.1, ge=0.0)
    alpha: float = Field(0.2, ge=0.0)
    epsilon: float = Field(1e-5, ge=0.0)


def _task_vectors(inputs: MethodInputs, epsilon: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Task vectors zeroed where inactive (|τ| ≤ ε), the activity mask, and the active count per element."""
    base = inputs.base
    assert base is not None
    deltas = torch.stack([x - base for x in inputs.tensors])  # [N, ...]
    active = deltas.abs() > epsilon  # [N, ...]
    deltas = torch.where(active, deltas, torch.zeros((), dtype=deltas.dtype))
    return deltas, active, active.sum(dim=0)  # count: [...]


def merge_ram(inputs: MethodInputs, params: RamParams) -> torch.Tensor:
    """θ_base + the mean of the active task vectors at each element (a unique one is kept whole)."""
    deltas, _, count = _task_vectors(inputs, params.epsilon)
    return inputs.base + deltas.sum(dim=0) / count.clamp(min=1)


def unique_scales(active: torch.Tensor, count: torch.Tensor, params: RamPlusParams) -> torch.Tensor:
    """λ_i = 1 + r·clip(ρ_i, 0, α), ρ_i = #shared-active_i / max(#unique-active_i, ε). Shape [N]."""
    n = active.shape[0]
    flat = active.reshape(n, -1)  # [N, numel]
    count = count.reshape(1, -1)  # [1, numel]
    shared = (flat & (count > 1)).sum(dim=1).to(torch.float64)  # [N]
    unique = (flat & (count == 1)).sum(dim=1).to(torch.float64)  # [N]
    # 0/0 (ε = 0, a model active nowhere alone) is moot: λ_i then scales no element
    rho = torch.nan_to_num(shared / unique.clamp(min=params.epsilon), nan=0.0)
    return (1 + params.r * rho.clamp(0.0, params.alpha)).to(torch.float32)


def merge_ramplus_tl(inputs: MethodInputs, params: RamPlusParams) -> torch.Tensor:
    """RAM with each model's unique elements scaled by its tensor-local λ_i."""
    deltas, active, count = _task_vectors(inputs, params.epsilon)
    scales = unique_scales(active, count, params).reshape((-1,) + (1,) * (deltas.dim() - 1))  # [N, 1, ...]
    unique = (deltas * scales).sum(dim=0)  # the one active model's λ_i·τ_i where count == 1
    shared = deltas.sum(dim=0) / count.clamp(min=1)
    return inputs.base + torch.where(count == 1, unique, shared)


SPECS = (
    MethodSpec(
        name="ram",
        summary="Keep elements only one task vector changes, average the ones several change",
        paper="https://arxiv.org/abs/2601.13572",
        merge=merge_ram,
        params=RamParams,
        base="required",
        min_models=1,
        rowwise=True,  # per-element activity counts: row blocks give the same bits (ramplus_tl counts per tensor)
        model_params=IgnoredWeight,
        ignored=WEIGHT_IGNORED,
    ),
    MethodSpec(
        name="ramplus_tl",
        summary="RAM with each model's unique elements scaled up by its tensor-local shared/unique ratio",
        paper="https://arxiv.org/abs/2601.13572",
        merge=merge_ramplus_tl,
        params=RamPlusParams,
        base="required",
        min_models=1,
        model_params=IgnoredWeight,
        ignored=WEIGHT_IGNORED,
    ),
)
