"""Arcee Fusion: take the fine-tune's value only where its importance is an outlier (https://arcee.ai).

importance = |θ − θ_base| ⊙ KL(softmax(θ) ‖ softmax(θ_base)) per last-dim row; keep θ where importance ≥
median + 1.5·IQR. Fix of a mergekit defect: above 1e6 elements mergekit estimates the quartiles from an unseeded
random subsample, so the merge is not reproducible; we take the exact quartiles over all elements (a selection,
interpolated as torch.quantile's 'linear', which refuses inputs above 16M elements).
"""

from __future__ import annotations

import torch

from mergelib.methods.base import WEIGHT_IGNORED, IgnoredWeight, MethodInputs, MethodSpec, NoParams
from mergelib.methods.select import kth_smallest

_SOFTMAX_EPS = 1e-8  # mergekit's smoothing of both distributions before the log ratio


def _last_dim_rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)  # [rows, last dim]


def importance(theta: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|θ − θ_base| scaled by each last-dim row's KL divergence of softmax(θ) from softmax(θ_base)."""
    rows, base_rows = _last_dim_rows(theta), _last_dim_rows(base)
    p = torch.softmax(rows, dim=-1) + _SOFTMAX_EPS
    q = torch.softmax(base_rows, dim=-1) + _SOFTMAX_EPS
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)  # [rows, 1]
    return ((rows - base_rows).abs() * kl).reshape(theta.shape)


def quartile(values: torch.Tensor, quarters: int) -> torch.Tensor:
    """The exact `quarters`/4 quantile of all elements, 'linear' interpolation as in torch.quantile."""
    flat = values.reshape(-1)
    # rank = q·(n−1) in exact integer arithmetic: floating point rounds it for large n
    below, remainder = divmod(quarters * (flat.numel() - 1), 4)
    low = kth_smallest(flat, below)
    if remainder == 0:
        return low
    # the next order statistic: `low` again if it repeats, else the least element above it
    repeats = int((flat <= low).sum()) > below + 1
    high = low if repeats else torch.where(flat > low, flat, torch.full((), torch.inf)).min()
    return torch.lerp(low, high, remainder / 4)


def threshold(scores: torch.Tensor) -> torch.Tensor:
    """Tukey's upper fence median + 1.5·IQR."""
    q1, median, q3 = (quartile(scores, k) for k in (1, 2, 3))
    return median + 1.5 * (q3 - q1)


def merge(inputs: MethodInputs, params: NoParams) -> torch.Tensor:
    """θ where the importance reaches the fence, θ_base elsewhere."""
    base = inputs.base
    assert base is not None
    (theta,) = inputs.tensors
    scores = importance(theta, base)
    return torch.where(scores >= threshold(scores), theta, base)


SPECS = (
    MethodSpec(
        name="arcee_fusion",
        summary="Keep the fine-tune's values whose |delta|*row-KL importance is above median + 1.5 IQR",
        paper="https://arcee.ai",
        merge=merge,
        base="required",
        min_models=1,
        max_models=1,
        model_params=IgnoredWeight,
        ignored=WEIGHT_IGNORED,
    ),
)
