"""Linear merge (model soups): Σ w_i·θ_i, divided by Σ w_i when `normalize` (arXiv:2203.05482).

As mergekit's `linear`, with one fix: mergekit divides by Σ w_i even when it is 0; we reject such weights in the
planner (`check_weights`) before any tensor is read.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mergelib.methods import fused, torch_kernels
from mergelib.methods.base import MethodInputs, MethodSpec, Params, require_nonzero_weight_sum

# Σ w below this fraction of Σ|w| is a cancellation: dividing by it would amplify the merge by > 1e6.


class LinearParams(Params):
    normalize: bool = True


class LinearModelParams(Params):
    weight: float


def check_weights(params: LinearParams, model_params: tuple[LinearModelParams, ...]) -> None:
    """Reject weights that sum to (about) 0 when they are to be normalised."""
    if not params.normalize:
        return
    require_nonzero_weight_sum(model_params, "normalize")


def merge(inputs: MethodInputs, params: LinearParams) -> torch.Tensor:
    """Weighted sum of the inputs, normalised by the weight sum when `params.normalize`."""
    weights = [p.weight for p in inputs.model_params]
    divisor = math.fsum(weights) if params.normalize else 1.0
    if torch_kernels.active(inputs.tensors[0]):
        return torch_kernels.weighted_sum(inputs.tensors, np.array(weights, dtype=np.float32).tolist(),
                                          float(np.float32(divisor)))
    flat = tuple(t.to(torch.float32).contiguous().reshape(-1).numpy() for t in inputs.tensors)
    out = np.empty(inputs.tensors[0].numel(), dtype=np.float32)
    fused.weighted_sum(flat, np.array(weights, dtype=np.float32), np.float32(divisor), out)  # one fused pass
    return torch.from_numpy(out).view(inputs.tensors[0].shape)


SPECS = (
    MethodSpec(
        name="linear",
        summary="Weighted average of the models (a base model, if given, is one more input)",
        paper="https://arxiv.org/abs/2203.05482",
        merge=merge,
        params=LinearParams,
        model_params=LinearModelParams,
        base="input",
        min_models=1,
        check=check_weights,
        rowwise=True,  # elementwise: row blocks give the same bits as whole tensors
        device_exact=True,
    ),
)
