"""RegMean (Jin et al. 2023, arXiv:2212.09849) and RegMean++ (Nguyen et al. 2025, arXiv:2508.03121).

For a Linear weight W_i [out, in] (y = x W_i^T) of each model with the Gram matrix G_i = sum over calibration
tokens of x x^T of its input, the merge minimising sum_i ||X_i W^T - X_i W_i^T||^2 is
W = (sum_i W_i G_i) (sum_i G_i)^-1. Like the paper, the off-diagonal entries of every G_i are first scaled by
`reduce_non_diagonal` (alpha; 1 keeps the exact regression, 0 gives a per-input-feature weighted average). We solve
(sum_i G_i) W^T = sum_i G_i W_i^T in float64 (no explicit inverse).

Rules beyond the paper, so no tensor ever comes out NaN: input features whose summed Gram diagonal is 0 (never
active in the calibration data) take the plain average of the models' columns, and the solve runs on the others;
a tensor for which some model has no Gram (embeddings, norms, biases, a tied head) or whose reduced system is
singular takes the plain average. RegMean++ uses the same formula; only where its Grams come from differs
(`mergelib.calibration.plusplus`: activations that flowed through the merged layers below).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from pydantic import Field

from mergelib.methods.base import WEIGHT_IGNORED, IgnoredWeight, MethodInputs, MethodSpec, Params


class RegMeanParams(Params):
    # The paper scales the Grams' off-diagonals by alpha in [0, 1], tuned per task family; 0.9 is our default
    # (FusionBench's CLIP and GPT-2 configs use 0.6).
    reduce_non_diagonal: float = Field(default=0.9, ge=0.0, le=1.0)


def reduce_non_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * G off the diagonal, the diagonal kept."""
    diagonal = torch.diagonal(gram).clone()
    out = gram * alpha
    out.diagonal().copy_(diagonal)
    return out


def plain_average(tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The mean of the inputs, in float32 (summed in input order)."""
    total = tensors[0].to(torch.float64).clone()
    for t in tensors[1:]:
        total += t.to(torch.float64)
    return (total / len(tensors)).to(torch.float32)


def regmean_solve(weights: tuple[torch.Tensor, ...], grams: tuple[torch.Tensor, ...], alpha: float) -> torch.Tensor:
    """W = (sum_i W_i G_i)(sum_i G_i)^-1 over the active input features (the rules of the module docstring)."""
    reduced = [reduce_non_diagonal(g.to(torch.float64), alpha) for g in grams]
    total = torch.stack(reduced).sum(0)  # [in, in]
    rhs = torch.stack([g @ w.to(torch.float64).T for g, w in zip(reduced, weights)]).sum(0)  # [in, out]
    merged = plain_average(weights).to(torch.float64)  # [out, in]: inactive features keep the average
    active = torch.diagonal(total) > 0
    if not bool(active.any()):
        return merged.to(torch.float32)
    index = active.nonzero().squeeze(1)
    system = total[index][:, index]
    # inactive features have zero rows/columns in every G_i (a PSD matrix with a zero diagonal entry), so they
    # add nothing to the active rows of rhs
    solution, info = torch.linalg.solve_ex(system, rhs[index])
    if int(info) != 0 or not bool(torch.isfinite(solution).all()):
        return merged.to(torch.float32)
    merged[:, index] = solution.T
    return merged.to(torch.float32)


def merge(inputs: MethodInputs, params: RegMeanParams) -> torch.Tensor:
    """RegMean for a 2-D weight every model has a Gram for; the plain average for anything else."""
    grams = inputs.statistics
    usable = (
        grams is not None and all(g is not None for g in grams) and inputs.tensors[0].dim() == 2
        and all(tuple(g.shape) == (inputs.tensors[0].shape[1],) * 2 for g in grams)
    )
    if not usable:
        return plain_average(inputs.tensors)
    return regmean_solve(inputs.tensors, grams, params.reduce_non_diagonal)


FALLBACK = ("; tensors without a Gram (embeddings, norms, biases, a tied head) and inputs never active in the "
            "calibration data take the plain average")

_REGMEAN = MethodSpec(
    name="regmean",
    summary="Regression mean: per Linear, the weight that best reproduces every model's outputs on the "
            "calibration data, (sum W_i G_i)(sum G_i)^-1 with G_i the input Gram" + FALLBACK,
    paper="https://arxiv.org/abs/2212.09849",
    merge=merge,
    params=RegMeanParams,
    model_params=IgnoredWeight,
    base="none",
    min_models=1,
    ignored=WEIGHT_IGNORED,
    statistics="gram",
)

SPECS = (
    _REGMEAN,
    replace(  # the same merge; only where the Grams come from differs
        _REGMEAN,
        name="regmean_plus_plus",
        summary="RegMean++: RegMean whose Grams of layer l come from calibration activations that went through the "
                "merged layers below l (merging and gathering interleave layer by layer)" + FALLBACK,
        paper="https://arxiv.org/abs/2508.03121",
        statistics_flow="merged",
    ),
)
