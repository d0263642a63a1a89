"""Keep rules decided over row blocks (mergelib.methods.keep) against whole-tensor masks computed another way."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergelib.methods import fused, keep, torch_kernels
from mergelib.methods import masks as masks_module
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


# ---- DELLA's per-row MAGPRUNE ranks (fused.magprune_keep, fused.magprune_keep_bf16) ----

RANK_KERNELS = [fused.magprune_keep, fused.magprune_keep_bf16]


def ranked(kernel, base, x, row, table, key, offset):
    """A rank kernel's mask and its exact L1 sums (all, kept) as floats."""
    got = np.empty(base.shape[0], dtype=np.bool_)
    before = np.zeros(torch_kernels.EXACT_SLOTS, dtype=np.int64)
    after = np.zeros_like(before)
    kernel(base, x, row, table, key, offset, got, before, after)
    return got, torch_kernels.exact_sum(before.tolist()), torch_kernels.exact_sum(after.tolist())


def exact_l1(magnitude, mask):
    """The exact L1 norms (all, kept) of float32 magnitudes, as Python fractions rounded once."""
    values = magnitude.double().reshape(-1).tolist()
    kept = [v for v, k in zip(values, mask.tolist()) if k]
    return float(math.fsum(values)), float(math.fsum(kept))


def sorted_keep(base, x, row, density, epsilon, key, offset):
    """The MAGPRUNE mask written another way: per row, Python's sort of (|delta|, -index) ascending gives
    each element's rank; keep where the draw at its flat index is below the float32 probability of that rank."""
    magnitude = (x - base).abs().reshape(-1, row).double()
    magnitude = torch.where(magnitude.isnan(), torch.inf, magnitude)  # NaN ranks above everything (ties among NaNs)
    nan = (x - base).isnan().reshape(-1, row)
    keys = torch.stack([torch.where(nan, 1.0, 0.0), magnitude], dim=-1)
    out = np.empty(magnitude.numel(), dtype=np.bool_)
    for r in range(magnitude.shape[0]):
        pairs = [(tuple(keys[r, j].tolist()), -j) for j in range(row)]
        order = sorted(range(row), key=lambda j: pairs[j])  # ascending; equal |delta|: higher index first
        for rank, j in enumerate(order):
            p = (density - epsilon) + 2 * epsilon * (rank / (row - 1) if row > 1 else 0.5)
            flat = r * row + j
            out[flat] = fused.uniform_at(key, offset + flat) < np.float32(p)
    return out


def tie_heavy(rows, row, seed, levels):
    """Rows whose |delta| take a handful of values (many equal, many zeros, opposite signs of equal size)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, row, generator=g)
    base = base.to(torch.bfloat16).float()
    steps = torch.randint(-levels, levels + 1, (rows, row), generator=g).float() / 16
    return base.reshape(-1).contiguous(), (base + steps).to(torch.bfloat16).float().reshape(-1).contiguous()


@pytest.mark.parametrize("kernel", RANK_KERNELS)
@pytest.mark.parametrize("rows,row,levels", [(7, 1, 3), (5, 2, 1), (6, 33, 2), (3, 300, 0), (4, 257, 5),
                                             (2, 1000, 40)])
def test_magprune_ranks_equal_a_plain_sort_with_ties(kernel, rows, row, levels):
    base, x = tie_heavy(rows, row, seed=rows * row + levels, levels=levels)
    density, epsilon, key, offset = 0.45, 0.3, 987654321, 12345
    table = masks_module.magprune_table(row, density, epsilon).numpy()
    got, l1, kept_l1 = ranked(kernel, base.numpy(), x.numpy(), row, table, key, offset)
    want = sorted_keep(base, x, row, density, epsilon, key, offset)
    assert np.array_equal(got, want)
    assert (l1, kept_l1) == exact_l1((x - base).abs(), torch.from_numpy(want))


@pytest.mark.parametrize("kernel", RANK_KERNELS)
def test_magprune_ranks_with_nan_inf_zero_and_wide_exponents(kernel):
    """Every float32 digit differs across the row (so every radix pass runs, and the counting kernel sorts
    nearly every element as inexact), with NaNs, infinities, zeros and subnormals."""
    g = torch.Generator().manual_seed(3)
    row = 64
    base = torch.zeros(4 * row)
    x = torch.randn(4 * row, generator=g) * torch.exp2(torch.randint(-60, 60, (4 * row,), generator=g).float())
    x[::9] = 0.0
    x[5::17] = float("nan")
    x[7::23] = float("inf")
    x[8::23] = -float("inf")
    x[3::31] = x[4::31][: len(x[3::31])]  # equal magnitudes at distant exponents
    x[10::37] = 1e-41  # subnormal
    table = masks_module.magprune_table(row, 0.5, 0.4).numpy()
    got, l1, kept_l1 = ranked(kernel, base.numpy(), x.numpy(), row, table, 5, 0)
    assert np.array_equal(got, sorted_keep(base, x, row, 0.5, 0.4, 5, 0))
    assert math.isnan(l1) and math.isnan(kept_l1) == bool((got & x.isnan().numpy()).any())
    finite = x[:row].clone()  # one row without NaN/inf: exact sums over 120 binades (the one-by-one path)
    finite[~finite.isfinite()] = 0.0
    got, l1, kept_l1 = ranked(kernel, base[:row].numpy(), finite.numpy(), row, table, 5, 0)
    assert (l1, kept_l1) == exact_l1(finite.abs(), torch.from_numpy(got))


@pytest.mark.parametrize("kernel", RANK_KERNELS)
def test_magprune_ranks_of_bf16_deltas_with_inexact_members(kernel):
    """bf16 weights and fine-tunes whose deltas cross exponents (a few inexact deltas share a top-16-bit key
    with exact ones) and whose values repeat: the counting kernel's inexact members rank after the exact ones
    of their key, by their low bits."""
    g = torch.Generator().manual_seed(8)
    rows, row = 6, 700
    base = (torch.randn(rows * row, generator=g) * 0.02).to(torch.bfloat16)
    x = (base.float() + torch.randint(-3, 4, (rows * row,), generator=g).float() * 2.0**-12).to(torch.bfloat16)
    base, x = base.float().contiguous(), x.float().contiguous()
    low = ((x - base).abs().view(torch.int32) & 0xFFFF) != 0
    assert 0 < int(low.sum()) < rows * row // 4  # the case under test: some inexact deltas among exact ones
    table = masks_module.magprune_table(row, 0.5, 0.2).numpy()
    got, l1, kept_l1 = ranked(kernel, base.numpy(), x.numpy(), row, table, 77, 3)
    assert np.array_equal(got, sorted_keep(base, x, row, 0.5, 0.2, 77, 3))
    assert (l1, kept_l1) == exact_l1((x - base).abs(), torch.from_numpy(got))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), row=st.integers(1, 40), rows=st.integers(1, 6), levels=st.integers(0, 6),
       counting=st.booleans())
def test_magprune_keep_equals_the_sorting_probabilities(seed, row, rows, levels, counting):
    """The kernels against `masks.magprune_probabilities` (torch's stable sort: the torch kernels' path)."""
    base, x = tie_heavy(rows, row, seed, levels)
    table = masks_module.magprune_table(row, 0.5, 0.2).numpy()
    got, _, _ = ranked(RANK_KERNELS[counting], base.numpy(), x.numpy(), row, table, seed, 7)
    probability = masks_module.magprune_probabilities((x - base).abs().view(-1, row), 0.5, 0.2)
    draws = np.empty(base.numel(), dtype=np.float32)
    fused.fill_uniform(seed, 7, draws)
    assert np.array_equal(got, draws < probability.reshape(-1).numpy())


@pytest.mark.parametrize("kernel", RANK_KERNELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_magprune_keep_reads_stored_bits_as_their_float32_values(kernel, dtype):
    """DELLA's ranks from bf16/fp16 bit patterns equal the ranks of the same values widened to float32."""
    base, x = tie_heavy(5, 96, seed=11, levels=4)
    base16, x16 = base.to(dtype), (x + 0.01 * torch.randn(x.shape)).to(dtype)
    bits = {torch.bfloat16: np.uint16, torch.float16: np.int16}[dtype]
    table = masks_module.magprune_table(96, 0.5, 0.25).numpy()
    got = ranked(kernel, base16.view(torch.int16).numpy().view(bits), x16.view(torch.int16).numpy().view(bits), 96,
                 table, 3, 40)
    want = ranked(kernel, base16.float().numpy(), x16.float().numpy(), 96, table, 3, 40)
    assert np.array_equal(got[0], want[0]) and got[1:] == want[1:]
    assert np.array_equal(want[0], sorted_keep(base16.float(), x16.float(), 96, 0.5, 0.25, 3, 40))


@pytest.mark.parametrize("span", [0, 10, 30, 120])
def test_exact_sums_whatever_the_exponent_span(span):
    """L1 sums of |delta| (abs_sums, the fused L1 pass) over blocks spanning few exponents (one integer sum) or
    many (value by value) are exact, and the slots give the same total as torch's exact slots."""
    g = torch.Generator().manual_seed(span)
    n = 5000
    x = torch.rand(n, generator=g) * torch.exp2(torch.randint(-span // 2 - 1, span // 2 + 1, (n,), generator=g).float())
    x[::7] = 0.0
    base = torch.zeros(n)
    args = keep.RuleArrays(1).args(0, n)
    args[0][0] = fused.KEEP_RANDOM
    args[5][0], args[6][0] = 99, 0.5
    before = np.zeros((1, torch_kernels.EXACT_SLOTS), dtype=np.int64)
    after = np.zeros_like(before)
    fused.abs_sums(base.numpy(), x.numpy()[None, :].copy(), 0, *args, before, after)
    draws = np.empty(n, dtype=np.float32)
    fused.fill_uniform(99, 0, draws)
    kept = torch.from_numpy(draws < np.float32(0.5))
    want = exact_l1(x, kept)
    assert (torch_kernels.exact_sum(before[0].tolist()), torch_kernels.exact_sum(after[0].tolist())) == want
    assert want[0] == torch_kernels.exact_sum(torch_kernels.exact_slots(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_l1_factors_of_ranked_and_other_rules_together(dtype):
    """A tensor where some models are row-ranked (their L1 sums come from ranking) and others are not (a pass of
    abs_sums over those alone): every factor equals ||delta||_1 / ||kept delta||_1 computed from the masks."""
    g = torch.Generator().manual_seed(4)
    rows, row = 10, 48
    base = torch.randn(rows, row, generator=g).to(dtype)
    models = [(base.float() + 0.05 * torch.randn(rows, row, generator=g)).to(dtype) for _ in range(3)]
    tensors = {-1: base, **dict(enumerate(models))}
    blocks = keep.Blocks((rows, row), 3, lambda i, a, b: tensors[i][a:b].float(), 3,
                         stored=lambda i, a, b: tensors[i][a:b])
    rules = [keep.Ranked(0.5, 0.2, 11, row), keep.Random(12, 0.4), keep.Ranked(0.3, 0.1, 13, row)]
    arrays = keep.rule_arrays(blocks, rules)
    factors = keep.l1_factors(blocks, arrays, [True, True, True])
    for i, rule in enumerate(rules):
        magnitude = (models[i].float() - base.float()).abs().reshape(-1)
        mask = keep.torch_mask(rule, magnitude)
        all_l1, kept_l1 = exact_l1(magnitude, mask)
        assert factors[i] == np.float32(all_l1 / kept_l1)


def test_l1_factors_of_a_ranked_rule_over_no_rows():
    """A tensor with no rows decides no block: its ranked model's norms are 0, so no rescale (factor 1)."""
    tensors = {-1: torch.zeros(0, 8), 0: torch.zeros(0, 8)}
    blocks = keep.Blocks((0, 8), 1, lambda i, a, b: tensors[i][a:b], 4)
    arrays = keep.rule_arrays(blocks, [keep.Ranked(0.5, 0.1, 3, 8)])
    assert keep.l1_factors(blocks, arrays, [True]).tolist() == [1.0]
