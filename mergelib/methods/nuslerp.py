"""NuSLERP: SLERP of two models at t = w₂/(w₁+w₂), on task vectors when a base is given, whole-tensor or per row.

mergekit's `nuslerp` (https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md). Fix of a mergekit
defect: its lerp fallback (|sinθ| < 1e-8) never fires for antiparallel vectors (sin of float32 π is -8.7e-8), so
they get weights divided by ~1e-7; like mergekit's own `slerp`, we lerp where cosθ < -0.9995.
"""

from __future__ import annotations

import torch

from mergelib.methods.base import MethodInputs, MethodSpec, Params

_NORM_EPS = 1e-7  # norms are clamped to this before taking the cosine
_SIN_EPS = 1e-8  # (near-)parallel: lerp
_ANTIPARALLEL_COS = -0.9995  # (near-)antiparallel: the slerp weights blow up, lerp
_ZERO_WEIGHT_SUM = 1e-6  # weights summing to less than this interpolate halfway


class NuSlerpParams(Params):
    nuslerp_flatten: bool = True
    nuslerp_row_wise: bool = False


class NuSlerpModelParams(Params):
    weight: float


def interpolation_t(w0: float, w1: float) -> float:
    """t = w1/(w0+w1), or 0.5 when the weights sum to about 0 (as mergekit)."""
    total = w0 + w1
    return 0.5 if abs(total) < _ZERO_WEIGHT_SUM else w1 / total


def slerp_last_dim(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Slerp each vector along the last dim of v0 and v1 (same shape) from v0 (t=0) to v1 (t=1)."""
    n0 = torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=_NORM_EPS)  # [..., 1]
    n1 = torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=_NORM_EPS)  # [..., 1]
    # a sum of products, not vecdot: MKL's dot sums in an order that follows the buffers' alignment
    cos = ((v0 * v1).sum(dim=-1, keepdim=True) / (n0 * n1)).clamp(-1.0, 1.0)  # [..., 1]
    theta = torch.acos(cos)
    sin_theta = torch.sin(theta)
    use_lerp = (sin_theta.abs() < _SIN_EPS) | (cos < _ANTIPARALLEL_COS)  # [..., 1]
    # per-vector weights; the slerp branch's inf/nan where sinθ = 0 is discarded by `where`
    c0 = torch.where(use_lerp, 1.0 - t, torch.sin((1.0 - t) * theta) / sin_theta)
    c1 = torch.where(use_lerp, t, torch.sin(t * theta) / sin_theta)
    return c0 * v0 + c1 * v1


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, flatten: bool, row_wise: bool) -> torch.Tensor:
    """Slerp over the whole tensor (`flatten`), each `W[i, :]`, or each `W[:, j]` (`row_wise`)."""
    if flatten or v0.dim() <= 1:
        return slerp_last_dim(t, v0.reshape(-1), v1.reshape(-1)).reshape(v0.shape)
    if row_wise:
        return slerp_last_dim(t, v0.transpose(0, -1), v1.transpose(0, -1)).transpose(0, -1)
    return slerp_last_dim(t, v0, v1)


def merge(inputs: MethodInputs, params: NuSlerpParams) -> torch.Tensor:
    """Slerp the two models (or their task vectors, plus the base) at t = w₂/(w₁+w₂)."""
    v0, v1 = inputs.tensors
    p0, p1 = inputs.model_params
    assert isinstance(p0, NuSlerpModelParams) and isinstance(p1, NuSlerpModelParams)
    t = interpolation_t(p0.weight, p1.weight)
    base = inputs.base
    if base is None:
        return nuslerp(t, v0, v1, params.nuslerp_flatten, params.nuslerp_row_wise)
    return base + nuslerp(t, v0 - base, v1 - base, params.nuslerp_flatten, params.nuslerp_row_wise)


SPECS = (
    MethodSpec(
        name="nuslerp",
        summary="SLERP of two models at t = w2/(w1+w2); task vectors if a base is given; optionally per row",
        paper="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
        merge=merge,
        params=NuSlerpParams,
        model_params=NuSlerpModelParams,
        base="optional",
        min_models=2,
        max_models=2,
    ),
)
