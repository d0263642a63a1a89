"""Stored tensors to float32 for the merge math, with the NaN/Inf check fused into the same pass (numba); or, for
methods whose kernels read bf16/fp16 themselves, only the check (`stored_finite`).

bfloat16 is the upper half of a float32, so widening it is a shift of its bits: exact, and one pass together
with the finiteness test (an exponent of all ones is Inf or NaN). torch's own widening plus a separate check
cost several passes and a fresh buffer each.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

_EXPONENT = np.uint32(0x7F800000)


@njit(nogil=True, cache=True, boundscheck=False)
def _widen_bf16(raw, out):
    finite = True
    for j in range(raw.shape[0]):
        bits = np.uint32((np.uint32(raw[j]) & np.uint32(0xFFFF)) << np.uint32(16))
        out[j] = bits.view(np.float32)
        finite &= (bits & _EXPONENT) != _EXPONENT
    return finite


@njit(nogil=True, cache=True, boundscheck=False)
def _finite_f32(values):
    finite = True
    bits = values.view(np.uint32)
    for j in range(bits.shape[0]):
        finite &= (bits[j] & _EXPONENT) != _EXPONENT
    return finite


@njit(nogil=True, cache=True, boundscheck=False)
def _finite_16(bits, exponent):
    finite = True
    for j in range(bits.shape[0]):
        finite &= (bits[j] & exponent) != exponent
    return finite


_EXPONENT_16 = {torch.bfloat16: np.int16(0x7F80), torch.float16: np.int16(0x7C00)}


def stored_finite(tensor: torch.Tensor) -> tuple[torch.Tensor, bool] | None:
    """For a bf16/fp16 CPU tensor: it (contiguous, not widened) and whether every value is finite, in one pass
    over its 2-byte values; None for any other tensor."""
    exponent = _EXPONENT_16.get(tensor.dtype)
    if exponent is None or tensor.device.type != "cpu":
        return None
    tensor = tensor.contiguous()
    return tensor, bool(_finite_16(tensor.view(torch.int16).reshape(-1).numpy(), exponent))


def to_float32(tensor: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """`tensor` as float32 (a new tensor unless it already is float32) and whether every value is finite."""
    tensor = tensor.contiguous()
    if tensor.device.type != "cpu":  # read onto a GPU: torch's widening (also exact) and one reduction there
        tensor = tensor.to(torch.float32)
        return tensor, bool(torch.isfinite(tensor).all())
    if tensor.dtype == torch.bfloat16:
        out = torch.empty(tensor.shape, dtype=torch.float32)
        finite = _widen_bf16(tensor.view(torch.int16).reshape(-1).numpy(), out.reshape(-1).numpy())
        return out, bool(finite)
    tensor = tensor.to(torch.float32)
    return tensor, bool(_finite_f32(tensor.reshape(-1).numpy()))
