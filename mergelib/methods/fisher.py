"""Fisher merging (Matena & Raffel 2022, arXiv:2111.09832) with the diagonal Fisher of each model.

merged = sum_i w_i F_i theta_i / sum_i w_i F_i, elementwise, with each F_i floored at `fisher_floor` first (the
paper's reference code does the same, with 1e-6), so an element no model is sensitive to takes the weighted
average, and so does a tensor for which some model has no Fisher. The Fisher itself is gathered by
`mergelib.calibration.fisher` (see there for the estimator).
"""

from __future__ import annotations

import torch
from pydantic import Field

from mergelib.methods.base import MethodInputs, MethodSpec, Params, require_nonzero_weight_sum


class FisherParams(Params):
    fisher_floor: float = Field(default=1e-6, gt=0.0)


class FisherModelParams(Params):
    weight: float = Field(default=1.0, ge=0.0)


def check_weights(params: FisherParams, model_params: tuple[FisherModelParams, ...]) -> None:
    if not any(p.weight > 0 for p in model_params):
        raise ValueError("weight: every model's weight is 0; give at least one a positive weight")
    require_nonzero_weight_sum(model_params, "fisher")


def merge(inputs: MethodInputs, params: FisherParams) -> torch.Tensor:
    """Fisher-weighted average (float64 sums in model order, float32 result)."""
    weights = [p.weight for p in inputs.model_params]
    fishers = inputs.statistics
    shape = inputs.tensors[0].shape
    device = inputs.tensors[0].device
    if fishers is None or any(f is None or tuple(f.shape) != tuple(shape) for f in fishers):
        # no usable Fisher: equal ones, i.e. the weighted average
        fishers = tuple(torch.ones(shape, dtype=torch.float64, device=device) for _ in inputs.tensors)
    numerator = torch.zeros(shape, dtype=torch.float64, device=device)
    denominator = torch.zeros(shape, dtype=torch.float64, device=device)
    for w, f, theta in zip(weights, fishers, inputs.tensors):
        scaled = w * f.to(torch.float64).clamp_min(params.fisher_floor)
        numerator += scaled * theta.to(torch.float64)
        denominator += scaled
    return (numerator / denominator).to(torch.float32)


SPECS = (
    MethodSpec(
        name="fisher",
        summary="Fisher merging: elementwise average weighted by w_i times each model's diagonal Fisher (squared "
                "gradients on the calibration data, floored at fisher_floor); tensors without a Fisher take the "
                "weighted average",
        paper="https://arxiv.org/abs/2111.09832",
        merge=merge,
        params=FisherParams,
        model_params=FisherModelParams,
        base="none",
        min_models=1,
        check=check_weights,
        statistics="fisher",
    ),
)
