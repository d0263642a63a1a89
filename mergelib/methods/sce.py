"""SCE: Select the highest-variance task-vector elements, Calculate per-model weights, Erase minority signs
(FuseChat-2.0, arXiv:2408.07990), with mergekit's exact steps and thresholds. Ties in the top-k variance
selection are broken by flat index (lower wins) rather than by torch.topk's unspecified order.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from pydantic import Field

from mergelib.methods.base import WEIGHT_IGNORED, MethodInputs, MethodSpec, Params
from mergelib.methods.masks import sign_consensus
from mergelib.methods.select import top_k_mask

_UNIFORM_BELOW = 1e-6  # mergekit: weights become uniform when Σ mean(τ²) is below this
_MIN_DIVISOR = 1e-6


class SceParams(Params):
    select_topk: float = Field(1.0, gt=0.0, le=1.0)
    int8_mask: bool = False  # accepted for mergekit recipes: it only changes mergekit's memory use


class SceModelParams(Params):
    weight: float | None = None  # ignored: SCE computes its own per-model weights, as in mergekit


def variance_mask(deltas: torch.Tensor, select_topk: float) -> torch.Tensor:
    """The positions (shared by all models) whose across-model variance is in the top fraction."""
    variance = deltas.var(dim=0, unbiased=False)  # [...]: population variance over models
    # floor of the decimal the user wrote: 0.29 of 100 positions is 29, though 0.29 * 100 < 29 in floats
    k = math.floor(Fraction(repr(select_topk)) * int(torch.count_nonzero(variance)))
    return top_k_mask(variance, k)


def model_weights(deltas: torch.Tensor) -> torch.Tensor:
    """w_i = mean(τ_i²) / Σ_j mean(τ_j²), uniform when that sum is below 1e-6. Shape [N]."""
    energy = deltas.reshape(deltas.shape[0], -1).square().mean(dim=1)  # [N]
    total = float(energy.sum())
    if abs(total) < _UNIFORM_BELOW:
        return torch.full_like(energy, 1.0 / energy.numel())
    return energy / total


def merge(inputs: MethodInputs, params: SceParams) -> torch.Tensor:
    """θ_base + Σ w_i m_i τ_i / max(Σ w_i m_i, 1e-6), m_i the sign-consensus mask of the selected τ."""
    base = inputs.base
    assert base is not None
    deltas = torch.stack([x - base for x in inputs.tensors])  # [N, ...]
    if params.select_topk < 1:
        selected = variance_mask(deltas, params.select_topk)  # [...], broadcast over models
        deltas = torch.where(selected, deltas, torch.zeros((), dtype=deltas.dtype))
    agree = sign_consensus(deltas)  # [N, ...] bool: the unweighted "sum" election
    weights = model_weights(deltas).reshape((-1,) + (1,) * base.dim())  # [N, 1, ...]
    kept = weights * agree  # [N, ...]
    merged = (deltas * kept).sum(dim=0) / kept.sum(dim=0).clamp(min=_MIN_DIVISOR)
    return base + merged


SPECS = (
    MethodSpec(
        name="sce",
        summary="Select top-variance deltas, weight models by mean squared delta, erase minority signs",
        paper="https://arxiv.org/abs/2408.07990",
        merge=merge,
        params=SceParams,
        model_params=SceModelParams,
        ignored=WEIGHT_IGNORED,
        base="required",
        min_models=1,
    ),
)
