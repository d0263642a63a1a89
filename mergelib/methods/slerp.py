"""SLERP between the base (t=0) and one other model, over the whole flattened tensor.

Shoemake, "Animating rotation with quaternion curves" (SIGGRAPH 1985, https://doi.org/10.1145/325165.325242),
as mergekit's `slerp`: the angle comes from the normalised tensors, the weights apply to the raw ones (magnitude
not renormalised), and near-parallel or near-antiparallel tensors (|cos| > 0.9995) are lerped instead.
"""

from __future__ import annotations

import torch
from pydantic import Field

from mergelib.methods.base import WEIGHT_IGNORED, IgnoredWeight, MethodInputs, MethodSpec, Params

_DOT_THRESHOLD = 0.9995  # |cos| above this: the slerp weights are ill-conditioned, lerp instead
_NORM_EPS = 1e-8  # a tensor with a norm at or below this is used unnormalised for the angle


class SlerpParams(Params):
    t: float = Field(ge=0.0, le=1.0)


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation from v0 (t=0) to v1 (t=1), both taken as single flat vectors."""
    n0 = torch.linalg.vector_norm(v0)
    n1 = torch.linalg.vector_norm(v1)
    # cos of the angle = <v0/|v0|, v1/|v1|>, without materialising the unit copies
    scale = torch.where(n0 > _NORM_EPS, n0, 1.0) * torch.where(n1 > _NORM_EPS, n1, 1.0)
    # torch.dot is MKL's sdot on the CPU, whose sum order follows the buffers' alignment (the same inputs gave
    # different bits from one merge to the next); torch's own reduction sums in a fixed order
    dot = torch.sum(v0.reshape(-1) * v1.reshape(-1)) / scale
    if dot.abs().item() > _DOT_THRESHOLD:
        return (1 - t) * v0 + t * v1
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    theta_t = theta * t
    s0 = torch.sin(theta - theta_t) / sin_theta
    s1 = torch.sin(theta_t) / sin_theta
    return s0 * v0 + s1 * v1


def merge(inputs: MethodInputs, params: SlerpParams) -> torch.Tensor:
    """slerp(t, base, model)."""
    assert inputs.base is not None
    (other,) = inputs.tensors
    return slerp(params.t, inputs.base, other)


SPECS = (
    MethodSpec(
        name="slerp",
        summary="Spherical interpolation from the base (t=0) to one other model (t=1)",
        paper="https://doi.org/10.1145/325165.325242",
        merge=merge,
        params=SlerpParams,
        base="required",
        min_models=1,
        max_models=1,
        model_params=IgnoredWeight,
        ignored=WEIGHT_IGNORED,
    ),
)
