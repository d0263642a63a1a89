"""Passthrough: copy the single input tensor, optionally times a per-model `scale` (mergekit `passthrough`).

Used for frankenmerges (layers stacked from slices):
https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md
"""

from __future__ import annotations

import torch

from mergelib.methods.base import MethodInputs, MethodSpec, NoParams, Params


class PassthroughModelParams(Params):
    scale: float | None = None


def merge(inputs: MethodInputs, params: NoParams) -> torch.Tensor:
    """The input unchanged (the same tensor, no copy), or times its `scale`."""
    (tensor,) = inputs.tensors
    (model_params,) = inputs.model_params
    assert isinstance(model_params, PassthroughModelParams)
    if model_params.scale is None:
        return tensor
    return tensor * model_params.scale


SPECS = (
    MethodSpec(
        name="passthrough",
        summary="Copy one model's tensor as is (optionally scaled); for layer stacking",
        paper="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
        merge=merge,
        model_params=PassthroughModelParams,
        base="none",
        min_models=1,
        max_models=1,
        rowwise=True,  # elementwise: row blocks give the same bits as whole tensors
        device_exact=True,
    ),
)
