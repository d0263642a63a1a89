"""karcher: circular means, first-order optimality on the sphere, a Python-float reference, edge cases."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from mergelib.methods.base import MethodInputs
from mergelib.methods.karcher import SPECS, KarcherModelParams, KarcherParams, merge


def karcher(vectors: list[list[float]], weights: list[float | None] | None = None, **params: float) -> torch.Tensor:
    tensors = tuple(torch.tensor(v) for v in vectors)
    ws = weights or [None] * len(vectors)
    mp = tuple(KarcherModelParams(weight=w) for w in ws)
    return merge(MethodInputs(tensors, None, mp, "w"), KarcherParams(**params))


def polar(angle: float, radius: float = 1.0) -> list[float]:
    return [radius * math.cos(angle), radius * math.sin(angle)]


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def log_map_sum(mean: list[float], units: list[list[float]]) -> list[float]:
    """Σ log_mean(u_i) in Python floats: the Riemannian gradient, zero at the Karcher mean."""
    total = [0.0] * len(mean)
    for u in units:
        c = max(-1.0, min(1.0, dot(u, mean)))
        theta = math.acos(c)
        if theta > 1e-12:
            total = [t + theta / math.sin(theta) * (x - c * m) for t, x, m in zip(total, u, mean)]
    return total


def reference(vectors: list[list[float]], max_iter: int = 10, tol: float = 1e-5) -> list[float]:
    """The published fixed-point iteration, element by element in Python floats."""
    norms = [math.sqrt(dot(v, v)) for v in vectors]
    units = [[x / n for x in v] for v, n in zip(vectors, norms) if n > tol]
    if not units:
        return [0.0] * len(vectors[0])
    k, dim = len(units), len(units[0])
    mean = [sum(u[j] for u in units) / k for j in range(dim)]
    mn = math.sqrt(dot(mean, mean))
    mean = list(units[0]) if mn < tol else [x / mn for x in mean]
    for _ in range(max_iter):
        tangent = [0.0] * dim
        for u in units:
            c = max(-1.0, min(1.0, dot(u, mean)))
            theta = math.acos(c)
            if theta < tol:
                continue
            tangent = [t + theta / math.sin(theta) / k * (x - c * m) for t, x, m in zip(tangent, u, mean)]
        step = math.sqrt(dot(tangent, tangent))
        if step < tol:
            break
        mean = [math.cos(step) * m + math.sin(step) * t / step for m, t in zip(mean, tangent)]
        length = math.sqrt(dot(mean, mean))
        mean = [x / length for x in mean]
    scale = sum(norms) / len(norms)
    return [scale * m for m in mean]


def test_spec_and_params() -> None:
    (spec,) = SPECS
    assert (spec.name, spec.base, spec.min_models, spec.max_models) == ("karcher", "input", 1, None)
    assert KarcherParams() == KarcherParams(max_iter=10, tol=1e-5)
    assert KarcherModelParams().weight is None  # accepted so mergekit recipes validate; ignored
    with pytest.raises(ValidationError, match="max_iter"):
        KarcherParams(max_iter=-1)
    with pytest.raises(ValidationError, match="tol"):
        KarcherParams(tol=-1e-3)


def test_golden_orthogonal_vectors() -> None:
    s = math.sqrt(0.5)
    torch.testing.assert_close(karcher([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([s, s]))
    # direction (1,1)/√2, magnitude the mean norm (1 + 2)/2
    torch.testing.assert_close(karcher([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([1.5 * s, 1.5 * s]))
    basis = [[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]]
    torch.testing.assert_close(karcher(basis), torch.full((3,), 2 / math.sqrt(3)))


def test_golden_iteration_reaches_the_circular_mean_not_the_chordal_one() -> None:
    # points at angles 0, 0, π/2: the Karcher mean is at π/6; the normalised chordal mean at atan(1/2)
    points = [polar(0.0), polar(0.0), polar(math.pi / 2)]
    torch.testing.assert_close(karcher(points), torch.tensor(polar(math.pi / 6)), rtol=1e-6, atol=1e-6)
    chordal = polar(math.atan2(1.0, 2.0))
    torch.testing.assert_close(karcher(points, max_iter=0), torch.tensor(chordal), rtol=1e-6, atol=1e-6)


def test_per_model_weights_are_ignored() -> None:
    points = [polar(0.1, 2.0), polar(1.2, 0.5), polar(-0.4, 1.0)]
    assert torch.equal(karcher(points, [5.0, 0.1, 1.0]), karcher(points))


def test_zero_input_drops_out_of_the_direction_but_counts_in_the_norm() -> None:
    out = karcher([[2.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    s = math.sqrt(0.5)
    torch.testing.assert_close(out, torch.tensor([4 / 3 * s, 4 / 3 * s]))


def test_all_zero_inputs_give_zero() -> None:
    assert torch.equal(karcher([[0.0, 0.0, 0.0]] * 3), torch.zeros(3))


def test_single_input_is_returned_as_is() -> None:
    x = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    assert torch.equal(merge(MethodInputs((x,), None, (KarcherModelParams(),), "w"), KarcherParams()), x)


def test_antipodal_inputs_stay_finite() -> None:
    # the mean of u and −u is undefined; the start falls back to the first input, which is stationary
    out = karcher([[1.0, 2.0], [-1.0, -2.0]])
    torch.testing.assert_close(out, torch.tensor([1.0, 2.0]))
    # with a third point, ±a cancel and the mean is the third direction
    out = karcher([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    torch.testing.assert_close(out, torch.tensor([0.0, 5 / 3, 0.0]), rtol=1e-5, atol=1e-5)
    # long vectors: rounding noise in u − cosθ·m must not be amplified by θ/sinθ into a random step
    a = torch.randn(257, generator=torch.Generator().manual_seed(2))
    out = merge(MethodInputs((a, -a), None, (KarcherModelParams(),) * 2, "w"), KarcherParams())
    torch.testing.assert_close(out, a, rtol=1e-5, atol=1e-5)


def test_zero_tolerance_stays_finite() -> None:
    x = [0.5, -1.0, 2.0]
    out = karcher([x, x, [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]], tol=0.0, max_iter=20)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(karcher([x, x], tol=0.0), torch.tensor(x))


def test_matrix_is_one_flattened_point() -> None:
    g = torch.Generator().manual_seed(5)
    tensors = tuple(torch.randn(2, 3, generator=g) + 1.0 for _ in range(3))  # three 2x3 tensors
    out = merge(MethodInputs(tensors, None, (KarcherModelParams(),) * 3, "w"), KarcherParams())
    assert out.shape == (2, 3) and out.dtype == torch.float32
    expected = reference([t.reshape(-1).tolist() for t in tensors])
    torch.testing.assert_close(out.reshape(-1), torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_inputs_are_not_modified() -> None:
    tensors = (torch.tensor([1.0, 2.0]), torch.tensor([2.0, -1.0]), torch.tensor([0.0, 0.0]))
    copies = [x.clone() for x in tensors]
    merge(MethodInputs(tensors, None, (KarcherModelParams(),) * 3, "w"), KarcherParams())
    assert all(torch.equal(a, b) for a, b in zip(tensors, copies))


angles = st.floats(-1.5, 1.5)  # within an open half circle around a centre: a unique circular mean
radii = st.floats(0.1, 10.0)


@settings(max_examples=50, deadline=None)
@given(st.floats(-math.pi, math.pi), st.lists(st.tuples(angles, radii), min_size=2, max_size=5))
def test_points_on_a_circle_give_the_mean_angle_and_mean_radius(
    centre: float, points: list[tuple[float, float]]
) -> None:
    vectors = [polar(centre + a, r) for a, r in points]
    mean_angle = centre + sum(a for a, _ in points) / len(points)
    mean_radius = sum(r for _, r in points) / len(points)
    expected = polar(mean_angle, mean_radius)
    torch.testing.assert_close(karcher(vectors), torch.tensor(expected), rtol=1e-4, atol=1e-4 * mean_radius)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.lists(st.floats(-0.4, 0.4), min_size=4, max_size=4), min_size=2, max_size=5),
    st.lists(radii, min_size=5, max_size=5),
)
def test_sphere_mean_is_stationary_and_matches_reference(offsets: list[list[float]], rs: list[float]) -> None:
    # points clustered around (1,1,1,1,1)/√5 on S⁴, so the mean is unique
    vectors = [[r * (1.0 + x) for x in [0.0, *o]] for o, r in zip(offsets, rs)]
    out = karcher(vectors, max_iter=50, tol=1e-7).tolist()
    norm = math.sqrt(dot(out, out))
    assert norm == pytest.approx(sum(math.sqrt(dot(v, v)) for v in vectors) / len(vectors), rel=1e-5)
    units = [[x / math.sqrt(dot(v, v)) for x in v] for v in vectors]
    gradient = log_map_sum([x / norm for x in out], units)
    assert math.sqrt(dot(gradient, gradient)) < 1e-4
    expected = reference(vectors, max_iter=50, tol=1e-7)
    torch.testing.assert_close(torch.tensor(out), torch.tensor(expected), rtol=1e-4, atol=1e-4 * norm)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-10.0, 10.0, width=32), min_size=1, max_size=6), st.integers(2, 4))
def test_identical_inputs_give_the_input(x: list[float], n: int) -> None:
    assume(math.sqrt(dot(x, x)) > 1e-3)
    torch.testing.assert_close(karcher([x] * n), torch.tensor(x), rtol=1e-5, atol=1e-5)
