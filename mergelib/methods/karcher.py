"""Karcher (Riemannian) mean of the inputs' directions on the unit hypersphere, times their mean norm.

Karcher, "Riemannian center of mass and mollifier smoothing" (https://doi.org/10.1002/cpa.3160300502); mergekit's
`karcher`: equal weights (a per-model `weight` is accepted and ignored, as mergekit), inputs with a norm <= tol
drop out of the direction but count in the mean norm; fixed-point iteration of the log/exp maps.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from mergelib.methods.base import WEIGHT_IGNORED, MethodInputs, MethodSpec, Params

_SIN_FLOOR = 1e-6  # |u − cosθ·m| below this is float32 rounding noise (~6e-8 for unit vectors)


class KarcherParams(Params):
    max_iter: int = Field(10, ge=0)
    tol: float = Field(1e-5, ge=0.0)


class KarcherModelParams(Params):
    weight: float | None = None  # ignored: mergekit's karcher weights every input equally


def karcher_mean(units: list[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    """Equal-weight Karcher mean on the sphere of the unit vectors `units` (each 1-D, same length)."""
    n = len(units)
    mean = torch.zeros_like(units[0])
    for unit in units:
        mean.add_(unit)
    mean.div_(n)
    mean_norm = torch.linalg.vector_norm(mean).item()
    mean = units[0].clone() if mean_norm < tol or mean_norm == 0.0 else mean.div_(mean_norm)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for unit in units:
            cos = torch.sum(unit * mean).item()  # not torch.dot: MKL's order follows alignment
            offset = torch.add(unit, mean, alpha=-cos)  # the component of `unit` orthogonal to `mean`
            sin = torch.linalg.vector_norm(offset).item()
            # atan2 keeps θ accurate near 0 and π, where acos(cos) of a float32 dot is off by up to 3e-4
            theta = math.atan2(sin, cos)
            # log map θ·offset/|offset|. Skip inputs at the mean, and at its antipode, where the log map is
            # undefined and `offset` is rounding noise (θ/sinθ would blow it up to a step in a random direction)
            if theta < tol or sin < _SIN_FLOOR:
                continue
            tangent.add_(offset, alpha=theta / sin / n)
        step = torch.linalg.vector_norm(tangent).item()
        if step < tol or step == 0.0:
            break
        mean.mul_(math.cos(step)).add_(tangent, alpha=math.sin(step) / step)  # exp map
        length = torch.linalg.vector_norm(mean).item()
        if length > tol:
            mean.div_(length)
    return mean


def merge(inputs: MethodInputs, params: KarcherParams) -> torch.Tensor:
    """Karcher mean direction of the non-negligible inputs, scaled by the mean norm of all inputs."""
    tensors = inputs.tensors
    if len(tensors) == 1:
        return tensors[0]
    flat = [x.reshape(-1) for x in tensors]
    norms = [torch.linalg.vector_norm(v).item() for v in flat]
    units = [v / norm for v, norm in zip(flat, norms, strict=True) if norm > params.tol]
    if not units:
        return torch.zeros_like(tensors[0])
    direction = karcher_mean(units, params.max_iter, params.tol)
    return direction.mul_(math.fsum(norms) / len(norms)).reshape(tensors[0].shape)


SPECS = (
    MethodSpec(
        name="karcher",
        summary="Karcher mean on the hypersphere of all inputs (equal weights), scaled by their mean norm",
        paper="https://doi.org/10.1002/cpa.3160300502",
        merge=merge,
        params=KarcherParams,
        model_params=KarcherModelParams,
        ignored=WEIGHT_IGNORED,
        base="input",
        min_models=1,
    ),
)
