"""nearswap against a per-element loop reference, golden values and properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from mergelib.methods.base import MethodInputs, NoParams
from mergelib.methods.nearswap import SPECS, NearswapParams, merge

SHAPES = [(1,), (4,), (2, 3), (4, 5), (2, 2, 3)]


def run(base, theta, t):
    return merge(MethodInputs((theta,), base, (NoParams(),), "w"), NearswapParams(t=t))


def reference(base, theta, t):
    out = []
    for b, x in zip(base.reshape(-1).tolist(), theta.reshape(-1).tolist()):
        w = min(1.0, max(0.0, t / max(abs(b - x), 1e-6)))
        out.append(w * x + (1 - w) * b)
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape)


def randoms(seed, shape, count):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(count)]


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), shape=st.sampled_from(SHAPES), t=st.floats(0.0, 3.0))
def test_matches_loop_reference(seed, shape, t):
    base, theta = randoms(seed, shape, 2)
    got = run(base, theta, t)
    assert got.dtype == torch.float32 and got.shape == shape
    torch.testing.assert_close(got.double(), reference(base, theta, t), atol=1e-6, rtol=1e-6)


def test_golden():
    # |d| = 0.5, 2, 4 with t = 1: w = 1, 0.5, 0.25 -> 0.5, 1, 1
    got = run(torch.zeros(3), torch.tensor([0.5, 2.0, 4.0]), 1.0)
    assert torch.equal(got, torch.tensor([0.5, 1.0, 1.0]))
    # negative deltas and a nonzero base: base 1, theta -1 (|d| = 2), t = 0.5 -> w = 0.25 -> 0.5
    assert torch.equal(run(torch.tensor([1.0]), torch.tensor([-1.0]), 0.5), torch.tensor([0.5]))


def test_t_zero_gives_the_base_exactly():
    base, theta = randoms(1, (4, 5), 2)
    assert torch.equal(run(base, theta, 0.0), base)


def test_close_elements_are_swapped_exactly():
    base = torch.tensor([1.0, 1.0, 1.0, 1.0])
    theta = torch.tensor([1.0, 1.1, 0.95, 3.0])
    got = run(base, theta, 0.2)
    assert torch.equal(got[:3], theta[:3])  # |d| <= t: w = 1, the fine-tune's own value
    assert 1.0 < float(got[3]) < 3.0


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), shape=st.sampled_from(SHAPES), t=st.floats(0.0, 3.0))
def test_zero_delta_gives_the_base_exactly(seed, shape, t):
    (base,) = randoms(seed, shape, 1)
    assert torch.equal(run(base, base.clone(), t), base)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), shape=st.sampled_from(SHAPES), t=st.floats(0.0, 3.0))
def test_result_lies_between_the_two_models(seed, shape, t):
    base, theta = randoms(seed, shape, 2)
    got = run(base, theta, t)
    assert bool((got >= torch.minimum(base, theta) - 1e-6).all() and (got <= torch.maximum(base, theta) + 1e-6).all())


def test_huge_t_gives_the_fine_tune_exactly():
    base, theta = randoms(2, (4, 5), 2)
    assert torch.equal(run(base, theta, 1e9), theta)


def test_inputs_are_not_modified():
    base, theta = randoms(3, (2, 3), 2)
    copies = base.clone(), theta.clone()
    run(base, theta, 0.5)
    assert torch.equal(base, copies[0]) and torch.equal(theta, copies[1])


def test_parameters_and_spec():
    with pytest.raises(ValidationError, match="t"):
        NearswapParams.model_validate({})  # required, as in mergekit
    with pytest.raises(ValidationError, match="greater than or equal"):
        NearswapParams(t=-0.1)
    with pytest.raises(ValidationError, match="extra"):
        NearswapParams.model_validate({"t": 0.1, "weight": 1})
    (spec,) = SPECS
    assert (spec.name, spec.base, spec.min_models, spec.max_models) == ("nearswap", "required", 1, 1)
    assert spec.params is NearswapParams
