"""Model Stock: move from the base toward the fine-tunes' mean by a ratio set by their angle (arXiv:2403.19522).

t = N·cosθ / (1 + (N−1)·cosθ), cosθ the mean pairwise cosine of the offsets from the base (per tensor, or per
row with `filter_wise`). Fix of a mergekit defect: mergekit leaves t unbounded, so a negative mean cosine
extrapolates away from the fine-tunes (and N=2 with cosθ → −1 divides by ~0); we clamp t to [0, 1], so a
non-positive cosine gives the base.

The cosines come from sums (dot products and squared norms of the offsets), so large tensors stream: one pass over
row blocks accumulates the sums in float64 element by element (`fused.stock_sums`), a second writes the result
(with `filter_wise` each block holds whole rows, and one pass does both). The whole-tensor merge is the same code
on one block, so both give the same bits.
"""

from __future__ import annotations

import numpy as np
import torch

from mergelib.methods import fused, keep, torch_kernels
from mergelib.methods.base import WEIGHT_IGNORED, IgnoredWeight, MethodInputs, MethodSpec, Params, StreamInputs


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


def ratios(sums: torch.Tensor, n: int) -> torch.Tensor:
    """float32 t per row from float64 sums [rows, pairs + n]: the dot products of the pairs i < j in order, then
    the squared norms. Each cosine has its norm product clamped >= 1e-6 and is clamped to [-1, 1]."""
    norms = sums[:, -n:].sqrt()
    total = torch.zeros(sums.shape[0], dtype=torch.float64, device=sums.device)
    p = 0
    for i in range(n):
        for j in range(i + 1, n):
            total = total + (sums[:, p] / (norms[:, i] * norms[:, j]).clamp(min=1e-6)).clamp(-1.0, 1.0)
            p += 1
    return interpolation_ratio(total / torch.full_like(total, p), n).to(torch.float32)


def _sums_torch(w0: torch.Tensor, ws: list[torch.Tensor]) -> torch.Tensor:
    """`fused.stock_sums` with torch ops ([rows, cols] inputs, any device): float64 products of the float32
    offsets, each row summed by torch (the same sums up to their order)."""
    offsets = [(x - w0).double() for x in ws]
    pairs = [(offsets[i] * offsets[j]).sum(dim=-1) for i in range(len(ws)) for j in range(i + 1, len(ws))]
    return torch.stack(pairs + [(o * o).sum(dim=-1) for o in offsets], dim=-1)


def toward_mean(w0: torch.Tensor, ws: list[torch.Tensor], t: torch.Tensor) -> torch.Tensor:
    """`fused.stock_out` with torch ops: lerp(w0, mean of ws, t) ([rows, cols] inputs, t [rows, 1] float32), one
    rounding per op (torch.lerp may fuse two on a GPU)."""
    total = torch.zeros_like(w0)
    for x in ws:
        total = total + x
    mean = total / torch.full_like(total, len(ws))
    diff = mean - w0
    return torch.where(t < 0.5, w0 + t * diff, mean - diff * (1 - t))


def _run(blocks: keep.Blocks, filter_wise: bool, emit) -> None:
    """Model Stock over row blocks: sums, then the result, emitted block by block (float32 rows)."""
    n = blocks.n_models
    per_row = filter_wise and len(blocks.shape) >= 2
    pairs = n * (n - 1) // 2
    if blocks.numel == 0:  # nothing to measure or write (the kernels' rows would be empty)
        for start, end, _ in blocks.ranges():
            emit(start, torch.empty((end - start, *blocks.shape[1:])))
        return
    if per_row:  # each block holds whole last-dim rows: one pass
        row = blocks.shape[-1]
        for start, end, _ in blocks.ranges():
            base, xs = blocks.inputs(start, end)
            sums = np.zeros((base.shape[0] // row, pairs + n), dtype=np.float64)
            fused.stock_sums(base, xs, row, sums)
            _emit_block(blocks, start, end, base, xs, row, ratios(torch.from_numpy(sums), n).numpy(), emit)
        return
    sums = np.zeros((1, pairs + n), dtype=np.float64)
    for start, end, _ in blocks.ranges():
        base, xs = blocks.inputs(start, end)
        fused.stock_sums(base, xs, base.shape[0], sums)  # one row: the running sums carry across blocks
    t = ratios(torch.from_numpy(sums), n).numpy()
    for start, end, _ in blocks.ranges():
        base, xs = blocks.inputs(start, end)
        _emit_block(blocks, start, end, base, xs, base.shape[0], t, emit)


def _emit_block(blocks: keep.Blocks, start: int, end: int, base: np.ndarray, xs: tuple[np.ndarray, ...], row: int,
                t: np.ndarray, emit) -> None:
    out = np.empty_like(base)
    fused.stock_out(base, xs, row, t, out)
    emit(start, torch.from_numpy(out).view((end - start, *blocks.shape[1:])))


def merge(inputs: MethodInputs, params: ModelStockParams) -> torch.Tensor:
    """t·mean(θ_i) + (1−t)·θ_base, t from the mean pairwise cosine of the offsets θ_i − θ_base."""
    base = inputs.base
    assert base is not None
    n = len(inputs.tensors)
    if base.numel() == 0:
        return torch.empty_like(base)
    if torch_kernels.active(base):
        w0 = _rows(base, params.filter_wise)
        ws = [_rows(x, params.filter_wise) for x in inputs.tensors]
        t = ratios(_sums_torch(w0, ws), n).unsqueeze(-1)  # [rows, 1]
        return toward_mean(w0, ws, t).reshape(base.shape)
    shape = tuple(base.shape) or (1,)
    tensors = {-1: base.reshape(shape), **{i: x.reshape(shape) for i, x in enumerate(inputs.tensors)}}
    blocks = keep.Blocks(shape, n, lambda i, a, b: tensors[i][a:b], shape[0])
    return keep.collect_rows(shape, lambda emit: _run(blocks, params.filter_wise, emit)).view(base.shape)


def stream(inputs: StreamInputs, params: ModelStockParams) -> None:
    """`merge` for tensors too large to hold every input: the same bits, re-reading row blocks per pass."""
    _run(keep.Blocks(inputs.shape, inputs.n_models, inputs.read, inputs.chunk_rows), params.filter_wise,
         inputs.emit)


SPECS = (
    MethodSpec(
        name="model_stock",
        summary="Interpolate base -> mean of fine-tunes by a ratio from their offsets' mean cosine",
        paper="https://arxiv.org/abs/2403.19522",
        merge=merge,
        stream=stream,
        params=ModelStockParams,
        base="required",
        min_models=2,
        model_params=IgnoredWeight,
        ignored=WEIGHT_IGNORED,
    ),
)
