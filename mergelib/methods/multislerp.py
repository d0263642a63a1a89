"""Multi-SLERP: barycentric interpolation of N models on the hypersphere (task vectors when a base is given).

mergekit's `multislerp` (https://goddard.blog/posts/multislerp-wow-what-a-cool-idea). Its tangent-space step
cancels exactly (Σ w_i(u_i − ⟨u_i,m̂⟩m̂) = m − ‖m‖m̂ = 0), so out = m̂·Σ w_i‖x_i‖ with m = Σ w_i x_i/(‖x_i‖+eps);
we compute that directly. Fixes: all-zero task vectors give the base (mergekit raises for N > 2), weights summing
to 0 are rejected when normalised, and the cancellation test is relative to float32 resolution.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from mergelib.methods.base import MethodInputs, MethodSpec, Params, require_nonzero_weight_sum

# A weighted mean of unit vectors shorter than this fraction of Σ|w| is float32 rounding noise: no direction.
_CANCEL_RTOL = 1e-6


class MultiSlerpParams(Params):
    normalize_weights: bool = True
    eps: float = Field(1e-8, gt=0.0)


class MultiSlerpModelParams(Params):
    weight: float


def check_weights(params: MultiSlerpParams, model_params: tuple[MultiSlerpModelParams, ...]) -> None:
    """Reject weights that sum to (about) 0 when they are to be normalised (one model ignores its weight)."""
    if not params.normalize_weights or len(model_params) < 2:
        return
    require_nonzero_weight_sum(model_params, "normalize_weights")


def merge(inputs: MethodInputs, params: MultiSlerpParams) -> torch.Tensor:
    """Direction of the weighted mean of the unit inputs, times the weighted mean of their norms."""
    if len(inputs.tensors) == 1:
        return inputs.tensors[0]  # as mergekit: nothing to interpolate, the weight is not applied
    weights = [p.weight for p in inputs.model_params]
    if params.normalize_weights:
        total = math.fsum(weights)
        weights = [w / total for w in weights]
    base = inputs.base
    vectors = inputs.tensors if base is None else tuple(x - base for x in inputs.tensors)
    norms = [torch.linalg.vector_norm(v).item() for v in vectors]
    mean = torch.zeros_like(vectors[0])
    for w, v, n in zip(weights, vectors, norms, strict=True):
        mean.add_(v, alpha=w / (n + params.eps))
    mean_norm = torch.linalg.vector_norm(mean).item()
    if mean_norm < max(params.eps, _CANCEL_RTOL * math.fsum(abs(w) for w in weights)):
        if all(n == 0.0 for n in norms):
            out = torch.zeros_like(mean)
        elif len(vectors) == 2:  # antipodal pair: lerp, as mergekit
            out = weights[0] * vectors[0] + weights[1] * vectors[1]
        else:
            raise ValueError(
                f"multislerp: the inputs of '{inputs.name}' are antipodal and their weights cancel "
                "(the weighted mean direction is 0); use different weights"
            )
    else:
        out = mean.mul_(math.fsum(w * n for w, n in zip(weights, norms, strict=True)) / mean_norm)
    return out if base is None else out + base


SPECS = (
    MethodSpec(
        name="multislerp",
        summary="Spherical barycentric interpolation of any number of models (task vectors if a base is given)",
        paper="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
        merge=merge,
        params=MultiSlerpParams,
        model_params=MultiSlerpModelParams,
        base="optional",
        min_models=1,
        check=check_weights,
    ),
)
