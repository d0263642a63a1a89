"""Fisher merging math: the paper's elementwise formula written as loops, goldens, and the floor rule."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mergelib.methods.base import MethodInputs
from mergelib.methods.fisher import SPECS, FisherModelParams, FisherParams, check_weights, merge


def run(thetas, fishers, weights=None, floor=1e-6):
    weights = weights or [1.0] * len(thetas)
    inputs = MethodInputs(tuple(thetas), None, tuple(FisherModelParams(weight=w) for w in weights), "w",
                          statistics=None if fishers is None else tuple(fishers))
    return merge(inputs, FisherParams(fisher_floor=floor))


def test_matches_the_papers_formula_element_by_element():
    g = torch.Generator().manual_seed(0)
    thetas = [torch.randn(2, 3, generator=g) for _ in range(3)]
    fishers = [torch.rand(2, 3, generator=g) for _ in range(3)]
    fishers[1][0, 0] = 0.0  # floored
    weights = [0.5, 1.0, 2.0]
    want = torch.empty(2, 3)
    for a in range(2):
        for b in range(3):
            num = sum(w * max(float(f[a, b]), 1e-6) * float(t[a, b]) for w, f, t in zip(weights, fishers, thetas))
            den = sum(w * max(float(f[a, b]), 1e-6) for w, f in zip(weights, fishers))
            want[a, b] = num / den
    torch.testing.assert_close(run(thetas, fishers, weights), want)


def test_golden():
    # (3 * 1 + 1 * 3) / (3 + 1) = 1.5
    assert torch.equal(run([torch.tensor([1.0]), torch.tensor([3.0])], [torch.tensor([3.0]), torch.tensor([1.0])]),
                       torch.tensor([1.5]))


def test_equal_or_zero_or_missing_fishers_give_the_weighted_average():
    a, b = torch.tensor([1.0, -2.0]), torch.tensor([4.0, 2.0])
    want = torch.tensor([(1.0 * 1 + 3.0 * 4) / 4, (1.0 * -2 + 3.0 * 2) / 4])
    same = torch.tensor([0.7, 0.2])
    torch.testing.assert_close(run([a, b], [same, same], [1.0, 3.0]), want)
    torch.testing.assert_close(run([a, b], [torch.zeros(2), torch.zeros(2)], [1.0, 3.0]), want)
    torch.testing.assert_close(run([a, b], [None, same], [1.0, 3.0]), want)
    torch.testing.assert_close(run([a, b], None, [1.0, 3.0]), want)


def test_identical_models_and_one_model_give_that_model():
    t = torch.randn(5, 4)
    f = torch.rand(5, 4)
    torch.testing.assert_close(run([t], [f]), t)
    torch.testing.assert_close(run([t, t], [f, 3 * f]), t)


def test_weights_must_not_all_be_zero():
    with pytest.raises(ValueError, match="weight"):
        check_weights(FisherParams(), (FisherModelParams(weight=0.0), FisherModelParams(weight=0.0)))
    with pytest.raises(ValueError):
        FisherModelParams(weight=-1.0)
    with pytest.raises(ValueError):
        FisherParams(fisher_floor=0.0)


def test_runs_repeat_bit_for_bit():
    g = torch.Generator().manual_seed(3)
    args = ([torch.randn(8, 8, generator=g) for _ in range(3)], [torch.rand(8, 8, generator=g) for _ in range(3)])
    assert torch.equal(run(*args).view(torch.int32), run(*args).view(torch.int32))


def test_spec():
    (spec,) = SPECS
    assert spec.name == "fisher" and spec.statistics == "fisher" and spec.base == "none"


@given(seed=st.integers(0, 10_000), n=st.integers(1, 4), scale=st.floats(0.1, 10.0))
def test_model_order_and_weight_scale_do_not_matter_and_the_result_is_between_the_inputs(seed, n, scale):
    g = torch.Generator().manual_seed(seed)
    thetas = [torch.randn(3, 5, generator=g) for _ in range(n)]
    fishers = [torch.rand(3, 5, generator=g) for _ in range(n)]
    weights = [float(w) + 0.1 for w in torch.rand(n, generator=g)]
    got = run(thetas, fishers, weights)
    torch.testing.assert_close(run(thetas[::-1], fishers[::-1], weights[::-1]), got)
    torch.testing.assert_close(run(thetas, fishers, [w * scale for w in weights]), got)
    stacked = torch.stack(thetas)  # a convex combination per element
    assert bool((got >= stacked.min(0).values - 1e-6).all() and (got <= stacked.max(0).values + 1e-6).all())
