"""SLERP between the base (t=0) and one other model, over the whole flattened tensor.

Shoemake, "Animating rotation with quaternion curves" (SIGGRAPH 1985, https://doi.org/10.1145/325165.325242),
as mergekit's `slerp`: the angle comes from the normalised tensors, the weights apply to the raw ones (magnitude
not renormalised), and near-parallel or near-antiparallel tensors (|cos| > 0.9995) are lerped instead.

The angle needs only three sums (<v0, v1>, |v0|^2, |v1|^2), so large tensors stream: one pass over row blocks
accumulates them in float64 element by element (the exact float64 products of float32 values, added in element
order: `fused.stock_sums` with a zero base), the two weights follow in float64, and a second pass writes
s0*v0 + s1*v1 in float32 block by block. The whole-tensor merge is the same code on one block: the same bits.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from pydantic import Field

from mergelib.methods import fused, keep, torch_kernels
from mergelib.methods.base import WEIGHT_IGNORED, IgnoredWeight, MethodInputs, MethodSpec, Params, StreamInputs

_DOT_THRESHOLD = 0.9995  # |cos| above this: the slerp weights are ill-conditioned, lerp instead
_NORM_EPS = 1e-8  # a tensor with a norm at or below this is used unnormalised for the angle


class SlerpParams(Params):
    t: float = Field(ge=0.0, le=1.0)


def weights(t: float, dot: float, square0: float, square1: float) -> tuple[float, float]:
    """(s0, s1) of slerp(t, v0, v1) = s0*v0 + s1*v1 from <v0, v1>, |v0|^2 and |v1|^2 (float64 arithmetic).

    cos = <v0/|v0|, v1/|v1|>, a norm at or below 1e-8 counting as 1; |cos| > 0.9995 gives the lerp (1-t, t)."""
    n0, n1 = math.sqrt(square0), math.sqrt(square1)
    cos = dot / ((n0 if n0 > _NORM_EPS else 1.0) * (n1 if n1 > _NORM_EPS else 1.0))
    if abs(cos) > _DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(cos)
    sin_theta = math.sin(theta)
    theta_t = theta * t
    return math.sin(theta - theta_t) / sin_theta, math.sin(theta_t) / sin_theta


def _combine(v0: torch.Tensor, v1: torch.Tensor, s0: float, s1: float) -> torch.Tensor:
    """s0*v0 + s1*v1 in float32 (each weight rounded to float32 once; one rounding per op)."""
    out = torch.mul(v0, torch.tensor(s0, dtype=torch.float32, device=v0.device))
    return out.add_(torch.mul(v1, torch.tensor(s1, dtype=torch.float32, device=v1.device)))


def _run(blocks: keep.Blocks, t: float, emit) -> None:
    """slerp over row blocks: the sums, then the result, emitted block by block (float32 rows)."""
    sums = np.zeros((1, 3), dtype=np.float64)  # <v0, v1>, |v0|^2, |v1|^2
    for start, end, _ in blocks.ranges():
        base, xs = blocks.inputs(start, end)
        pair = np.empty((2, base.shape[0]), dtype=np.float32)
        pair[0], pair[1] = base, xs[0]
        if base.shape[0]:
            fused.stock_sums(np.zeros_like(base), pair, base.shape[0], sums)  # offsets from 0: the vectors
    s0, s1 = weights(t, *sums[0].tolist())
    for start, end, _ in blocks.ranges():
        base, xs = blocks.inputs(start, end)
        out = _combine(torch.from_numpy(base), torch.from_numpy(xs[0]), s0, s1)
        emit(start, out.view((end - start, *blocks.shape[1:])))


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation from v0 (t=0) to v1 (t=1), both taken as single flat vectors (float32 out)."""
    if torch_kernels.active(v0):  # on the inputs' device: the same sums up to their order
        a, b = v0.reshape(-1).double(), v1.reshape(-1).double()
        s0, s1 = weights(t, float(torch.sum(a * b)), float(torch.sum(a * a)), float(torch.sum(b * b)))
        return _combine(v0.to(torch.float32), v1.to(torch.float32), s0, s1)
    shape = tuple(v0.shape) or (1,)  # a 0-d tensor is one row of one element
    tensors = {-1: v0.reshape(shape), 0: v1.reshape(shape)}
    blocks = keep.Blocks(shape, 1, lambda i, a, b: tensors[i][a:b].to(torch.float32), shape[0])
    return keep.collect_rows(shape, lambda emit: _run(blocks, t, emit)).view(v0.shape)


def merge(inputs: MethodInputs, params: SlerpParams) -> torch.Tensor:
    """slerp(t, base, model)."""
    assert inputs.base is not None
    (other,) = inputs.tensors
    return slerp(params.t, inputs.base, other)


def stream(inputs: StreamInputs, params: SlerpParams) -> None:
    """`merge` for large tensors: the same bits, one row block of each input at a time."""
    _run(keep.Blocks(inputs.shape, 1, inputs.read, inputs.chunk_rows), params.t, inputs.emit)


SPECS = (
    MethodSpec(
        name="slerp",
        summary="Spherical interpolation from the base (t=0) to one other model (t=1)",
        paper="https://doi.org/10.1145/325165.325242",
        merge=merge,
        stream=stream,
        params=SlerpParams,
        base="required",
        min_models=1,
        max_models=1,
        model_params=IgnoredWeight,
        ignored=WEIGHT_IGNORED,
    ),
)
