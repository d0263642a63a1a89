"""The device path of the fused kernels: the same float32 arithmetic as `mergelib.methods.fused`, written as torch
ops, so a merge on a GPU gives the same bytes as the numba kernels on the CPU.

Each torch op rounds once to float32, as each numba statement does. Ops that would fuse two roundings into one
(addcmul, add with alpha, lerp: an FMA on CUDA) are not used, sums start from zeros (0 + -0.0 is +0.0, as in the
kernels), and divisions are by tensors, never by a Python scalar (CUDA turns a division by a scalar into a
multiplication by its reciprocal). Uniform draws are the kernels' counter-based stream (splitmix64 of key and flat
index) in int64 arithmetic, which wraps exactly as uint64 does. Selections are `select.top_k_mask` (exact
order statistics); L1 norms are exact sums (`exact_sum`), so no reduction order shows in the result.

The engine runs methods on this path for every non-CPU device, and on the CPU when asked (`kernels="torch"`),
which is how machines without a GPU test it.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

_FORCED = contextvars.ContextVar("mergelib_torch_kernels", default=False)


@contextmanager
def forced(enabled: bool = True) -> Iterator[None]:
    """Run the methods called inside on the torch path even for CPU tensors (one thread's context)."""
    token = _FORCED.set(enabled)
    try:
        yield
    finally:
        _FORCED.reset(token)


def active(tensor: torch.Tensor) -> bool:
    """Whether a method given `tensor` takes the torch path: a non-CPU tensor, or the path forced."""
    return _FORCED.get() or tensor.device.type != "cpu"


def _signed(value: int) -> int:
    """A uint64 constant as the int64 with the same bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def uniform(key: int, start: int, count: int, device: torch.device | str) -> torch.Tensor:
    """`fused.uniform_at(key, i)` for i in [start, start + count): float32 multiples of 2**-24 in [0, 1)."""
    z = torch.arange(start, start + count, dtype=torch.int64, device=device) * _GOLDEN + _signed(key)
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    z = z ^ _shift_right(z, 31)
    return _shift_right(z, 40).to(torch.float32) * 5.9604644775390625e-08  # 24 bits: exact in float32


def _divide(numerator: torch.Tensor, divisor: torch.Tensor | float) -> torch.Tensor:
    """Elementwise true division (a scalar divisor is spread into a tensor first; see the module note)."""
    if not isinstance(divisor, torch.Tensor):
        divisor = torch.full_like(numerator, float(divisor))
    return numerator / divisor


def weighted_sum(xs: Sequence[torch.Tensor], weights: Sequence[float], divisor: float) -> torch.Tensor:
    """`fused.weighted_sum`: (sum_i weights[i] * xs[i]) / divisor, summed in model order from 0."""
    out = torch.zeros_like(xs[0])
    for x, w in zip(xs, weights):
        out = out + x * float(w)
    return _divide(out, divisor) if divisor != 1 else out


def gta(base: torch.Tensor, xs: Sequence[torch.Tensor], keeps: Sequence[torch.Tensor | None],
        factors: Sequence[float], weights: Sequence[float], consensus: bool, normalize: bool, divisor: float,
        lam: float) -> torch.Tensor:
    """`fused.gta_block` over whole flat tensors: base + lam * [sum_i w_i m_i f_i s_i(delta_i)] / [sum_i w_i m_i
    if normalize]; `keeps[i]` is model i's keep mask (None: keep all), factors and weights float32 values."""
    rows = []
    for x, keep, f, w in zip(xs, keeps, factors, weights):
        row = ((x - base) * float(f)) * float(w)
        rows.append(row if keep is None else torch.where(keep, row, 0.0))
    total = torch.zeros_like(base)
    for row in rows:
        total = total + row
    if consensus:
        elected = torch.where(total >= 0, 1.0, -1.0)
        total = torch.zeros_like(base)
        div = torch.zeros_like(base)
        for row, w in zip(rows, weights):
            agree = row * elected > 0
            total = total + torch.where(agree, row, 0.0)
            div = div + torch.where(agree, float(w), 0.0)
        div = torch.where(div == 0, 1.0, div)
    else:
        div = divisor
    t = _divide(total, div) if normalize else total
    if lam != 1:
        t = t * float(lam)
    return base + t


EXACT_SLOTS = 257  # 0-254: mantissa sums by biased exponent; 255: count of infinities; 256: count of NaNs


def exact_sum(slots: Sequence[int]) -> float:
    """The float64 nearest to the exact sum of non-negative float32 values given as exponent slots (see
    EXACT_SLOTS): the same number whatever order or device summed them."""
    if slots[256]:
        return math.nan
    if slots[255]:
        return math.inf
    # value = mantissa * 2**(max(e, 1) - 150): scaled by 2**149 every term is an integer
    total = sum(int(count) << (max(e, 1) - 1) for e, count in enumerate(slots[:255]) if count)
    return total / (1 << 149)  # int / int is correctly rounded


def exact_slots(magnitudes: torch.Tensor) -> list[int]:
    """EXACT_SLOTS sums of a flat float32 tensor of non-negative values (|delta|), on its own device."""
    bits = magnitudes.contiguous().view(torch.int32)
    exponent = (bits >> 23).to(torch.int64)  # the sign bit is clear: 0..255
    fraction = (bits & 0x7FFFFF).to(torch.int64)
    special = exponent == 255
    mantissa = torch.where(exponent > 0, fraction | (1 << 23), fraction)
    slots = torch.zeros(EXACT_SLOTS, dtype=torch.int64, device=magnitudes.device)
    slots.index_add_(0, exponent, torch.where(special, 0, mantissa))
    slots[255] = (special & (fraction == 0)).sum()
    slots[256] = (special & (fraction != 0)).sum()
    return slots.tolist()

