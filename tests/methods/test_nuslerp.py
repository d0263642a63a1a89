"""nuslerp: t from the weights, a per-vector Python reference (math.acos), task-vector mode, edge cases."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from mergelib.methods.base import MethodInputs
from mergelib.methods.nuslerp import SPECS, NuSlerpModelParams, NuSlerpParams, interpolation_t, merge

SQRT_HALF = math.sqrt(0.5)


def nuslerp(
    v0: torch.Tensor,
    v1: torch.Tensor,
    w0: float = 1.0,
    w1: float = 1.0,
    base: torch.Tensor | None = None,
    **params: bool,
) -> torch.Tensor:
    model_params = (NuSlerpModelParams(weight=w0), NuSlerpModelParams(weight=w1))
    return merge(MethodInputs((v0, v1), base, model_params, "w"), NuSlerpParams(**params))


def slerp_vector(t: float, v0: list[float], v1: list[float]) -> list[float]:
    """One vector, Python floats: norms clamped at 1e-7, lerp when sinθ ≈ 0 or cosθ < -0.9995."""
    n0 = max(math.sqrt(sum(x * x for x in v0)), 1e-7)
    n1 = max(math.sqrt(sum(x * x for x in v1)), 1e-7)
    cos = max(-1.0, min(1.0, sum(a * b for a, b in zip(v0, v1)) / (n0 * n1)))
    theta = math.acos(cos)
    if abs(math.sin(theta)) < 1e-8 or cos < -0.9995:
        return [(1 - t) * a + t * b for a, b in zip(v0, v1)]
    c0 = math.sin((1 - t) * theta) / math.sin(theta)
    c1 = math.sin(t * theta) / math.sin(theta)
    return [c0 * a + c1 * b for a, b in zip(v0, v1)]


def reference(
    t: float, m0: list[list[float]], m1: list[list[float]], flatten: bool, row_wise: bool
) -> list[list[float]]:
    """2-D lists: the whole matrix, each row W[i][:], or each column W[:][j] as one vector."""
    rows, cols = len(m0), len(m0[0])
    if flatten:
        flat = slerp_vector(t, [x for r in m0 for x in r], [x for r in m1 for x in r])
        return [flat[i * cols : (i + 1) * cols] for i in range(rows)]
    if not row_wise:
        return [slerp_vector(t, m0[i], m1[i]) for i in range(rows)]
    columns = [slerp_vector(t, [m0[i][j] for i in range(rows)], [m1[i][j] for i in range(rows)]) for j in range(cols)]
    return [[columns[j][i] for j in range(cols)] for i in range(rows)]


def test_spec_and_params() -> None:
    (spec,) = SPECS
    assert (spec.name, spec.base, spec.min_models, spec.max_models) == ("nuslerp", "optional", 2, 2)
    assert NuSlerpParams() == NuSlerpParams(nuslerp_flatten=True, nuslerp_row_wise=False)
    with pytest.raises(ValidationError, match="weight"):
        NuSlerpModelParams()  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="t"):
        NuSlerpParams(t=0.5)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("w0", "w1", "t"), [(1, 1, 0.5), (1, 3, 0.75), (2, 0, 0.0), (-0.5, 0.5, 0.5), (1e-7, 1e-7, 0.5), (3, -1, -0.5)]
)
def test_interpolation_t(w0: float, w1: float, t: float) -> None:
    assert interpolation_t(w0, w1) == pytest.approx(t)


def test_golden_orthogonal_equal_weights() -> None:
    out = nuslerp(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(out, torch.tensor([SQRT_HALF, SQRT_HALF]))


def test_golden_task_vectors_around_a_base() -> None:
    base = torch.tensor([10.0, -5.0])
    out = nuslerp(base + torch.tensor([2.0, 0.0]), base + torch.tensor([0.0, 2.0]), base=base)
    torch.testing.assert_close(out, base + 2 * SQRT_HALF)


def test_zero_weight_sum_interpolates_halfway() -> None:
    v0, v1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(nuslerp(v0, v1, -0.5, 0.5), nuslerp(v0, v1, 1.0, 1.0))


@pytest.mark.parametrize(("flatten", "row_wise"), [(True, False), (False, False), (False, True), (True, True)])
@pytest.mark.parametrize("shape", [(2, 3), (4, 5)])
def test_matches_reference(flatten: bool, row_wise: bool, shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(hash(shape) % 1000 + 7 * flatten + row_wise)
    v0, v1 = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    out = nuslerp(v0, v1, 0.3, 0.9, nuslerp_flatten=flatten, nuslerp_row_wise=row_wise)
    expected = reference(0.75, v0.tolist(), v1.tolist(), flatten, row_wise)
    torch.testing.assert_close(out, torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_golden_row_wise_slerps_columns() -> None:
    v0 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    v1 = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    # rows: (1,0)->(0,1) orthogonal; (0,1)->(0,1) parallel, lerped
    rows = nuslerp(v0, v1, nuslerp_flatten=False, nuslerp_row_wise=False)
    torch.testing.assert_close(rows, torch.tensor([[SQRT_HALF, SQRT_HALF], [0.0, 1.0]]))
    # columns: (1,0)->(0,0) a zero vector counts as orthogonal; (0,1)->(1,1) at θ=π/4, both weights sin(π/8)/sin(π/4)
    c = math.sin(math.pi / 8) / math.sin(math.pi / 4)
    cols = nuslerp(v0, v1, nuslerp_flatten=False, nuslerp_row_wise=True)
    torch.testing.assert_close(cols, torch.tensor([[SQRT_HALF, c], [0.0, 2 * c]]))


def test_three_dim_tensor_row_wise_uses_dim_zero() -> None:
    g = torch.Generator().manual_seed(3)
    v0, v1 = torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    out = nuslerp(v0, v1, 1.0, 2.0, nuslerp_flatten=False, nuslerp_row_wise=True)
    for j in range(2):
        for k in range(4):
            expected = slerp_vector(2 / 3, v0[:, j, k].tolist(), v1[:, j, k].tolist())
            torch.testing.assert_close(out[:, j, k], torch.tensor(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("flatten", [True, False])
def test_one_dim_tensor_is_one_vector(flatten: bool) -> None:
    v0, v1 = torch.tensor([1.0, 2.0, -1.0]), torch.tensor([0.5, -1.0, 2.0])
    out = nuslerp(v0, v1, nuslerp_flatten=flatten, nuslerp_row_wise=True)
    torch.testing.assert_close(out, torch.tensor(slerp_vector(0.5, v0.tolist(), v1.tolist())))


def test_parallel_is_lerped() -> None:
    v = torch.tensor([1.0, -2.0, 0.5])
    torch.testing.assert_close(nuslerp(v, 3 * v, 1.0, 1.0), 2 * v)


def test_antiparallel_is_lerped_not_blown_up() -> None:
    # mergekit divides by sin(float32 π) = -8.7e-8 here and returns ~8e6·v
    v = torch.tensor([1.0, 0.0])
    torch.testing.assert_close(nuslerp(v, -2 * v, 3.0, 1.0), 0.25 * v)
    rows = nuslerp(
        torch.tensor([[1.0, 2.0], [1.0, 0.0]]),
        torch.tensor([[-2.0, -4.0], [0.0, 1.0]]),
        3.0,
        1.0,
        nuslerp_flatten=False,
    )
    torch.testing.assert_close(rows[0], torch.tensor([0.25, 0.5]))
    torch.testing.assert_close(rows[1], torch.tensor(slerp_vector(0.25, [1.0, 0.0], [0.0, 1.0])))


def test_zero_row_counts_as_orthogonal() -> None:
    v0 = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    v1 = torch.tensor([[2.0, -1.0, 1.0], [0.5, 0.5, 0.5]])
    out = nuslerp(v0, v1, 1.0, 1.0, nuslerp_flatten=False)
    torch.testing.assert_close(out[0], SQRT_HALF * v1[0])
    torch.testing.assert_close(out, torch.tensor(reference(0.5, v0.tolist(), v1.tolist(), False, False)))


def test_inputs_are_not_modified() -> None:
    base = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    v0, v1 = base + 1.0, base * 2.0
    copies = [x.clone() for x in (base, v0, v1)]
    nuslerp(v0, v1, base=base, nuslerp_flatten=False)
    assert all(torch.equal(a, b) for a, b in zip((base, v0, v1), copies))


finite = st.floats(-10.0, 10.0, allow_nan=False, width=32)
matrices = st.tuples(st.integers(1, 4), st.integers(1, 5)).flatmap(
    lambda s: st.lists(st.lists(finite, min_size=s[1], max_size=s[1]), min_size=s[0], max_size=s[0])
)
weights = st.floats(0.05, 5.0)


@settings(max_examples=50, deadline=None)
@given(matrices, st.booleans(), st.booleans())
def test_zero_task_vectors_give_the_base_exactly(base: list[list[float]], flatten: bool, row_wise: bool) -> None:
    b = torch.tensor(base)
    out = nuslerp(b.clone(), b.clone(), 0.3, 0.8, base=b, nuslerp_flatten=flatten, nuslerp_row_wise=row_wise)
    assert torch.equal(out, b)


@settings(max_examples=50, deadline=None)
@given(matrices, weights, st.booleans(), st.booleans())
def test_identical_inputs_give_the_input(m: list[list[float]], w: float, flatten: bool, row_wise: bool) -> None:
    x = torch.tensor(m)
    out = nuslerp(x, x.clone(), 1.0, w, nuslerp_flatten=flatten, nuslerp_row_wise=row_wise)
    torch.testing.assert_close(out, x, rtol=1e-4, atol=1e-4)


@settings(max_examples=50, deadline=None)
@given(st.data(), weights, weights, st.floats(0.1, 10.0), st.booleans())
def test_swap_and_weight_scale_symmetry(data: st.DataObject, w0: float, w1: float, c: float, flatten: bool) -> None:
    m0 = data.draw(matrices)
    m1 = data.draw(
        st.lists(st.lists(finite, min_size=len(m0[0]), max_size=len(m0[0])), min_size=len(m0), max_size=len(m0))
    )
    v0, v1 = torch.tensor(m0), torch.tensor(m1)
    out = nuslerp(v0, v1, w0, w1, nuslerp_flatten=flatten)
    expected = reference(w1 / (w0 + w1), m0, m1, flatten, False)
    cosines = _cosines(m0, m1, flatten)
    assume(all(abs(abs(x) - 1) > 1e-3 and abs(x + 0.9995) > 1e-4 for x in cosines))  # float32 acos near ±1
    tol = 1e-4 * max(1.0, *(abs(x) for r in m0 + m1 for x in r))
    torch.testing.assert_close(out, torch.tensor(expected), rtol=1e-4, atol=tol)
    torch.testing.assert_close(nuslerp(v1, v0, w1, w0, nuslerp_flatten=flatten), out, rtol=1e-4, atol=tol)
    torch.testing.assert_close(nuslerp(v0, v1, c * w0, c * w1, nuslerp_flatten=flatten), out, rtol=1e-4, atol=tol)


def _cosines(m0: list[list[float]], m1: list[list[float]], flatten: bool) -> list[float]:
    pairs = [([x for r in m0 for x in r], [x for r in m1 for x in r])] if flatten else list(zip(m0, m1))
    out = []
    for a, b in pairs:
        na = max(math.sqrt(sum(x * x for x in a)), 1e-7)
        nb = max(math.sqrt(sum(x * x for x in b)), 1e-7)
        out.append(sum(x * y for x, y in zip(a, b)) / (na * nb))
    return out
