"""Model Stock: move from the base toward the fine-tunes' mean by a ratio set by their angle (arXiv:2403.19522).

t = N·cosθ / (1 + (N−1)·cosθ), cosθ the mean pairwise cosine of the offsets from the base (per tensor, or per
row with `filter_wise`). Fix of a mergekit defect: mergekit leaves t unbounded, so a negative mean cosine
extrapolates away from the fine-tunes (and N=2 with cosθ → −1 divides by ~0); we clamp t to [0, 1], so a
non-positive cosine gives the base.
"""

from __future__ import annotations

import torch

from mergelib.methods.base import WEIGHT_IGNORED, IgnoredWeight, MethodInputs, MethodSpec, Params


class ModelStockParams(Params):
    filter_wise: bool = False


def _rows(x: torch.Tensor, filter_wise: bool) -> torch.Tensor:
    """The vectors whose angles are measured: each last-dim row, or the whole tensor as one row."""
    if filter_wise and x.dim() >= 2:
        return x.reshape(-1, x.shape[-1])  # [rows, last dim]
    return x.reshape(1, -1)  # [1, numel]: a 1-D tensor (bias) is one row even with filter_wise


def interpolation_ratio(cos: torch.Tensor, n: int) -> torch.Tensor:
    """Model Stock's t for a mean cosine `cos` over `n` fine-tunes, clamped to [0, 1]."""
    positive = cos > 0
    safe = torch.where(positive, cos, torch.ones_like(cos))  # the denominator stays >= 1 where used
    t = n * safe / (1 + (n - 1) * safe)
    return torch.where(positive, t, torch.zeros_like(cos)).clamp(0.0, 1.0)


def merge(inputs: MethodInputs, params: ModelStockParams) -> torch.Tensor:
    """t·mean(θ_i) + (1−t)·θ_base, t from the mean pairwise cosine of the offsets θ_i − θ_base."""
    base = inputs.base
    assert base is not None
    w0 = _rows(base, params.filter_wise)
    ws = torch.stack([_rows(x, params.filter_wise) for x in inputs.tensors])  # [N, rows, cols]
    offsets = ws - w0  # [N, rows, cols]
    norms = torch.linalg.vector_norm(offsets, dim=-1)  # [N, rows]
    n = offsets.shape[0]
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            dot = (offsets[i] * offsets[j]).sum(dim=-1)  # [rows]
            cosines.append((dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1.0, 1.0))
    cos = torch.stack(cosines).mean(dim=0)  # [rows]
    t = interpolation_ratio(cos, n).unsqueeze(-1)  # [rows, 1]
    # lerp gives exactly the base at t=0 and exactly the mean at t=1
    return torch.lerp(w0, ws.mean(dim=0), t).reshape(base.shape)


SPECS = (
    MethodSpec(
        name="model_stock",
        summary="Interpolate base -> mean of fine-tunes by a ratio from their offsets' mean cosine",
        paper="https://arxiv.org/abs/2403.19522",
        merge=merge,
        params=ModelStockParams,
        base="required",
        min_models=2,
        model_params=IgnoredWeight,
        ignored=WEIGHT_IGNORED,
    ),
)
