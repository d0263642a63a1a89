"""arcee_fusion against a per-element loop reference, torch.quantile, golden values and properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from mergelib.methods.arcee_fusion import SPECS, importance, merge, quartile
from mergelib.methods.base import MethodInputs, NoParams
from mergelib.methods.select import kth_smallest as order_statistic

SHAPES = [(1,), (5,), (2, 3), (4, 5), (3, 1), (2, 2, 3)]


def run(base, theta):
    return merge(MethodInputs((theta,), base, (NoParams(),), "w"), NoParams())


def ref_softmax(row):
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    return [e / sum(exps) for e in exps]


def ref_importance(theta, base):
    """Per row of the last dim: |θ−θ_b|·Σ p log(p/q), p and q the softmaxes plus 1e-8 (Python floats)."""
    cols = theta.shape[-1] if theta.dim() else 1
    t_rows, b_rows = theta.reshape(-1, cols).tolist(), base.reshape(-1, cols).tolist()
    out = []
    for t_row, b_row in zip(t_rows, b_rows):
        p = [v + 1e-8 for v in ref_softmax(t_row)]
        q = [v + 1e-8 for v in ref_softmax(b_row)]
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        out += [abs(a - b) * kl for a, b in zip(t_row, b_row)]
    return out


def ref_quantile(values, q):
    """Hyndman-Fan type 7 (numpy/torch 'linear'): interpolate the sorted list at position q·(n−1)."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (pos - lo) * (s[hi] - s[lo])


def randoms(seed, shape, count, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(shape, generator=g) for _ in range(count)]


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), shape=st.sampled_from(SHAPES), scale=st.sampled_from([0.1, 1.0, 3.0]))
def test_importance_matches_loop_reference(seed, shape, scale):
    base, theta = randoms(seed, shape, 2, scale)
    expected = torch.tensor(ref_importance(theta, base), dtype=torch.float64).reshape(shape)
    torch.testing.assert_close(importance(theta, base).double(), expected, atol=1e-6, rtol=1e-4)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), shape=st.sampled_from(SHAPES))
def test_merge_matches_loop_reference(seed, shape):
    base, theta = randoms(seed, shape, 2)
    # the threshold comes from float64 references; compare the selection on scores away from the fence
    scores = ref_importance(theta, base)
    fence = ref_quantile(scores, 0.5) + 1.5 * (ref_quantile(scores, 0.75) - ref_quantile(scores, 0.25))
    got = run(base, theta).reshape(-1).tolist()
    for s, g, t, b in zip(scores, got, theta.reshape(-1).tolist(), base.reshape(-1).tolist()):
        if abs(s - fence) > 1e-5 * max(1.0, abs(fence)):
            assert g == (t if s >= fence else b)


@settings(max_examples=50, deadline=None)
@given(
    values=st.lists(st.floats(-100, 100, width=32), min_size=1, max_size=60),
    rounded=st.booleans(),
)
def test_quartiles_match_torch_quantile_bit_for_bit(values, rounded):
    x = torch.tensor(values, dtype=torch.float32)
    if rounded:  # many ties
        x = x.round()
    for k in (1, 2, 3):
        assert torch.equal(quartile(x, k), torch.quantile(x, k / 4))
        # the float64 reference may differ by the float32 rounding of the interpolation (a couple of ulps)
        torch.testing.assert_close(
            quartile(x, k).double(), torch.tensor(ref_quantile(x.tolist(), k / 4)).double(), rtol=3e-7, atol=1e-30
        )


def test_quartiles_golden():
    # sorted 1..8: positions 1.75, 3.5, 5.25 -> 2.75, 4.5, 6.25
    x = torch.tensor([8.0, 3, 1, 7, 2, 6, 4, 5])
    assert [float(quartile(x, k)) for k in (1, 2, 3)] == [2.75, 4.5, 6.25]
    assert float(quartile(torch.tensor([5.0]), 1)) == 5.0


def test_order_statistic_every_rank():
    x = torch.tensor([3.0, -1.0, 3.0, 0.0, 7.0, -1.0, 2.0])
    assert [float(order_statistic(x, r)) for r in range(7)] == sorted(x.tolist())


def test_quartiles_of_a_tensor_above_torch_quantile_limit():
    # 2**24 + 1 elements, reversed (an ordered input: torch.kthvalue's quickselect is quadratic there)
    n = 2**24 + 1
    x = torch.arange(n - 1, -1, -1, dtype=torch.float32)
    with pytest.raises(RuntimeError):
        torch.quantile(x, 0.5)
    assert [float(quartile(x, k)) for k in (1, 2, 3)] == [2.0**22, 2.0**23, 3 * 2.0**22]


def test_golden_single_outlier_is_fused():
    # one row: KL is a single positive factor, so the fence is that of |d| = 1..7, 100:
    # median 4.5 + 1.5 * (6.25 - 2.75) = 9.75; only the 100 reaches it
    base = torch.zeros(8)
    theta = torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 100])
    assert torch.equal(run(base, theta), torch.tensor([0.0] * 7 + [100.0]))


def test_row_without_distribution_change_counts_as_unimportant():
    # row 0 is a constant shift (softmax unchanged: KL = 0, importance 0) with big deltas; row 1 moves mass
    base = torch.zeros(2, 4)
    theta = torch.tensor([[5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 0.5, 9.0]])
    scores = importance(theta, base)
    assert torch.equal(scores[0], torch.zeros(4)) and bool((scores[1, 2:] > 0).all())
    # 8 scores: six zeros, 0.5K, 9K (K = row 1's KL); q1 = 0, median = 0, q3 at rank 5.25 = 0.125K:
    # fence = 0.1875K: 0.5K and 9K pass, row 0's shift of 5 stays at the base
    expected = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.5, 9.0]])
    assert torch.equal(run(base, theta), expected)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), shape=st.sampled_from(SHAPES))
def test_every_element_is_exactly_base_or_fine_tune(seed, shape):
    base, theta = randoms(seed, shape, 2)
    got = run(base, theta)
    assert bool(((got == base) | (got == theta)).all())


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), shape=st.sampled_from(SHAPES))
def test_zero_delta_gives_the_base_exactly(seed, shape):
    (base,) = randoms(seed, shape, 1)
    assert torch.equal(run(base, base.clone()), base)


def test_large_tensor_is_deterministic_and_exact():
    # over mergekit's 1e6 subsample limit: the fence uses every element, so it equals torch.quantile's
    base, theta = randoms(5, (1100, 1000), 2)
    first, second = run(base, theta), run(base, theta)
    assert torch.equal(first, second)
    scores = importance(theta, base)
    q = torch.quantile(scores.reshape(-1), torch.tensor([0.25, 0.5, 0.75]))
    expected = torch.where(scores >= q[1] + 1.5 * (q[2] - q[0]), theta, base)
    assert torch.equal(first, expected)


def test_scalar_tensor():
    base, theta = torch.tensor(1.0), torch.tensor(2.0)
    got = run(base, theta)
    assert got.shape == () and float(got) in (1.0, 2.0)


def test_inputs_are_not_modified():
    base, theta = randoms(3, (2, 3), 2)
    copies = base.clone(), theta.clone()
    run(base, theta)
    assert torch.equal(base, copies[0]) and torch.equal(theta, copies[1])


def test_spec():
    (spec,) = SPECS
    assert (spec.name, spec.base, spec.min_models, spec.max_models) == ("arcee_fusion", "required", 1, 1)
    with pytest.raises(ValidationError):
        spec.params.model_validate({"threshold": 1.0})
