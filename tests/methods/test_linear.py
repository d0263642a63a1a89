"""linear: a per-element Python reference, goldens, the zero-sum check, and hypothesis properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from mergelib.methods.base import MethodInputs
from mergelib.methods.linear import SPECS, LinearModelParams, LinearParams, check_weights, merge


def linear(tensors: list[torch.Tensor], weights: list[float], normalize: bool = True) -> torch.Tensor:
    mp = tuple(LinearModelParams(weight=w) for w in weights)
    return merge(MethodInputs(tuple(tensors), None, mp, "w"), LinearParams(normalize=normalize))


def reference(matrices: list[list[list[float]]], weights: list[float], normalize: bool) -> list[list[float]]:
    """Σ w_i x_i (/ Σ w_i) for each element, in Python floats."""
    rows, cols = len(matrices[0]), len(matrices[0][0])
    total = sum(weights)
    out = []
    for i in range(rows):
        row = []
        for j in range(cols):
            value = sum(w * m[i][j] for w, m in zip(weights, matrices))
            row.append(value / total if normalize else value)
        out.append(row)
    return out


def test_spec_and_params() -> None:
    (spec,) = SPECS
    assert (spec.name, spec.base, spec.min_models, spec.max_models) == ("linear", "input", 1, None)
    assert spec.check is check_weights
    assert LinearParams().normalize is True
    with pytest.raises(ValidationError, match="weight"):
        LinearModelParams()  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="density"):
        LinearModelParams(weight=1.0, density=0.5)  # type: ignore[call-arg]


def test_golden() -> None:
    x0, x1 = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])
    assert torch.equal(linear([x0, x1], [1.0, 3.0]), torch.tensor([2.5, 3.5]))  # (1+9)/4, (2+12)/4
    assert torch.equal(linear([x0, x1], [1.0, 3.0], normalize=False), torch.tensor([10.0, 14.0]))
    assert torch.equal(linear([x0, x1], [-1.0, 3.0]), torch.tensor([4.0, 5.0]))  # (−1+9)/2, (−2+12)/2


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("shape", [(2, 3), (4, 5)])
def test_matches_reference(normalize: bool, shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(shape[0] + normalize)
    tensors = [torch.randn(shape, generator=g) for _ in range(3)]
    weights = [0.2, 1.3, -0.4]
    out = linear(tensors, weights, normalize)
    assert out.shape == shape and out.dtype == torch.float32
    expected = reference([t.tolist() for t in tensors], weights, normalize)
    torch.testing.assert_close(out, torch.tensor(expected), rtol=1e-6, atol=1e-6)


def test_single_model() -> None:
    x = torch.tensor([[1.0, -2.0, 3.5]])
    torch.testing.assert_close(linear([x], [0.3]), x, rtol=1e-7, atol=0.0)
    torch.testing.assert_close(linear([x], [0.3], normalize=False), 0.3 * x)


def test_zero_weight_sum_is_rejected_only_when_normalizing() -> None:
    def params(*ws: float) -> tuple[LinearModelParams, ...]:
        return tuple(LinearModelParams(weight=w) for w in ws)

    for ws in [(1.0, -1.0), (0.1, 0.2, -0.3), (0.0,), (0.0, 0.0)]:
        with pytest.raises(ValueError, match=r"weight: weights sum to .* normalize: true"):
            check_weights(LinearParams(), params(*ws))
        check_weights(LinearParams(normalize=False), params(*ws))
    check_weights(LinearParams(), params(1.0, -0.5))
    check_weights(LinearParams(), params(1e-9, 1e-9))  # tiny but not cancelling: normalising is fine


def test_inputs_are_not_modified() -> None:
    tensors = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])]
    copies = [t.clone() for t in tensors]
    linear(tensors, [0.5, 2.0])
    assert all(torch.equal(a, b) for a, b in zip(tensors, copies))


finite = st.floats(-100.0, 100.0, allow_nan=False, width=32)
groups = st.tuples(st.integers(1, 4), st.integers(1, 6)).flatmap(
    lambda s: st.lists(st.lists(finite, min_size=s[1], max_size=s[1]), min_size=s[0], max_size=s[0])
)
positive = st.floats(0.01, 10.0)


@settings(max_examples=50, deadline=None)
@given(groups, st.data())
def test_reference_permutation_and_weight_scale(vectors: list[list[float]], data: st.DataObject) -> None:
    weights = data.draw(st.lists(positive, min_size=len(vectors), max_size=len(vectors)))
    tensors = [torch.tensor(v) for v in vectors]
    out = linear(tensors, weights)
    expected = reference([[v] for v in vectors], weights, True)[0]
    torch.testing.assert_close(out, torch.tensor(expected), rtol=1e-5, atol=1e-4)
    order = data.draw(st.permutations(range(len(vectors))))
    permuted = linear([tensors[i] for i in order], [weights[i] for i in order])
    torch.testing.assert_close(permuted, out, rtol=1e-5, atol=1e-4)
    c = data.draw(st.floats(0.1, 10.0))
    torch.testing.assert_close(linear(tensors, [c * w for w in weights]), out, rtol=1e-5, atol=1e-4)


@settings(max_examples=50, deadline=None)
@given(st.lists(finite, min_size=1, max_size=8), st.lists(positive, min_size=1, max_size=4))
def test_identical_inputs_give_the_input(x: list[float], weights: list[float]) -> None:
    t = torch.tensor(x)
    out = linear([t.clone() for _ in weights], weights)
    torch.testing.assert_close(out, t, rtol=1e-5, atol=1e-5)
