"""Keep rules decided over row blocks (mergelib.methods.keep) against whole-tensor masks computed another way."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergelib.methods import fused, keep
from mergelib.methods.select import top_k_mask


def blocks_of(base, models, rows_per_block):
    tensors = {-1: base, **dict(enumerate(models))}
    return keep.Blocks(tuple(base.shape), len(models), lambda i, a, b: tensors[i][a:b], rows_per_block)


def masks_of(blocks, arrays):
    """The keep mask each model's rule gives, evaluated by the fused kernel block by block."""
    out = [np.zeros(blocks.numel, dtype=np.bool_) for _ in range(blocks.n_models)]
    for start, end, offset in blocks.ranges():
        base, xs = blocks.inputs(start, end)
        for i in range(blocks.n_models):
            weights = np.zeros(blocks.n_models, dtype=np.float32)
            weights[i] = 1.0
            got = np.empty_like(base)
            # with one unit weight and no consensus, out - base is model i's kept delta (0 where dropped)
            fused.gta_block(base, xs, offset, *arrays.args(offset, offset + base.shape[0]),
                            np.ones(blocks.n_models, dtype=np.float32), weights, False, False, np.float32(1),
                            np.float32(1), got)
            out[i][offset : offset + base.shape[0]] = (got - base) != 0
    return out


def quantized(shape, seed, levels):
    """Inputs whose |delta| take few distinct values, so the cut has many ties; some deltas are exactly 0."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    steps = torch.randint(-levels, levels + 1, shape, generator=g).float() / 8
    return base, [base + steps, base - 2 * steps]


PATHS = ["window", "bucket", "histogram"]  # how the cuts are found (see mergelib.methods.keep)


def force_path(path):
    """Patch keep for one path; returns the undo. window: the sampled window; bucket: the exact radix select
    collecting the cut's bucket; histogram: the exact select with a low-digit histogram and a tie scan."""
    saved = keep._cuts_in_windows, keep._COLLECT_MIN
    if path != "window":
        keep._cuts_in_windows = lambda blocks, wanted: {}
    keep._COLLECT_MIN = 0 if path == "histogram" else 1 << 20  # 0: only n // 4 members are collected

    def undo():
        keep._cuts_in_windows, keep._COLLECT_MIN = saved

    return undo


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(0, 10_000), st.sampled_from([0.0, 0.1, 0.37, 0.5, 0.9, 1.0]), st.integers(1, 4),
       st.sampled_from([1, 3, 7]), st.sampled_from(PATHS))
def test_band_matches_top_k_with_ties(seed, density, levels, rows_per_block, path):
    base, models = quantized((11, 5), seed, levels)
    blocks = blocks_of(base, models, rows_per_block)
    k = int(density * blocks.numel)
    undo = force_path(path)
    try:
        arrays = keep.rule_arrays(blocks, [keep.Band(k), keep.Band(k, k // 3)])
    finally:
        undo()
    got = masks_of(blocks, arrays)
    for i, model in enumerate(models):
        delta = (model - base).reshape(-1)
        want = top_k_mask(delta.abs(), k)
        if i == 1:
            want &= ~top_k_mask(delta.abs(), k // 3)
        nonzero = delta != 0  # a kept zero and a dropped zero are the same delta
        assert (torch.from_numpy(got[i]) & nonzero).tolist() == (want & nonzero).tolist()


@pytest.mark.parametrize("path", PATHS)
def test_tie_limit_is_exact_at_a_nonzero_cut(path):
    base = torch.zeros(6, 4)
    model = torch.tensor([[1.0, 2.0, 2.0, 0.5]] * 6)  # the top 17: all 12 twos, then 5 of the 6 ones
    blocks = blocks_of(base, [model], 2)
    undo = force_path(path)
    try:
        arrays = keep.rule_arrays(blocks, [keep.Band(17)])
    finally:
        undo()
    assert float(arrays.lo_cut[0]) == 1.0
    got = masks_of(blocks, arrays)[0]
    assert got.tolist() == top_k_mask(model.reshape(-1), 17).tolist()
    assert got.sum() == 17


def test_window_missing_the_cut_falls_back_to_the_exact_select(monkeypatch):
    """A sample that misplaces the window (here: a sample of the smallest values only) still gives exact cuts."""
    base, models = quantized((40, 16), 3, 4)
    blocks = blocks_of(base, models, 8)
    k = 500
    monkeypatch.setattr(keep, "_SAMPLE_BLOCKS", 1)  # only the first block is sampled...
    original = fused.abs_samples

    def smallest(base_rows, x, stride, out, p):  # ...and it reports near-zero values
        end = original(base_rows, x, stride, out, p)
        out[p:end] = 1e-9
        return end

    monkeypatch.setattr(fused, "abs_samples", smallest)
    assert keep._cuts_in_windows(blocks, [(0, k)]) == {}  # the window [1e-9, 1e-9] misses the cut
    arrays = keep.rule_arrays(blocks, [keep.Band(k), None])
    want = top_k_mask((models[0] - base).reshape(-1).abs(), k)
    nonzero = (models[0] - base).reshape(-1) != 0
    assert (torch.from_numpy(masks_of(blocks, arrays)[0]) & nonzero).tolist() == (want & nonzero).tolist()
