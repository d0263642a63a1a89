"""NearSwap: swap in the fine-tune's values where they are near the base's, blend the rest by distance.

w = clamp(t / max(|θ_base − θ|, 1e-6), 0, 1) per element; out = w·θ + (1−w)·θ_base. As in mergekit
(https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001); t = 0 is allowed and gives the base.
"""

from __future__ import annotations

import torch
from pydantic import Field

from mergelib.methods.base import WEIGHT_IGNORED, IgnoredWeight, MethodInputs, MethodSpec, Params

_MIN_DISTANCE = 1e-6  # keeps t/|Δ| finite where the models agree exactly


class NearswapParams(Params):
    t: float = Field(ge=0.0)


def merge(inputs: MethodInputs, params: NearswapParams) -> torch.Tensor:
    """w·θ + (1−w)·θ_base with w = clamp(t/|θ_base − θ|, 0, 1) element-wise."""
    base = inputs.base
    assert base is not None
    (theta,) = inputs.tensors
    weight = (params.t / (base - theta).abs().clamp(min=_MIN_DISTANCE)).clamp(0.0, 1.0)
    # lerp, not w*theta + (1-w)*base: the same value, but exactly the base where the models agree and exactly
    # theta where w = 1 (the two-product form rounds both)
    return torch.lerp(base, theta, weight)


SPECS = (
    MethodSpec(
        name="nearswap",
        summary="Take the fine-tune's value where it is within t of the base, interpolate by t/|delta| elsewhere",
        paper="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
        merge=merge,
        params=NearswapParams,
        base="required",
        min_models=1,
        max_models=1,
        rowwise=True,  # elementwise: row blocks give the same bits as whole tensors
        model_params=IgnoredWeight,
        ignored=WEIGHT_IGNORED,
    ),
)
