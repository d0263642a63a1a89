"""slerp: golden literals, a Python-float reference (math.acos per vector), and hypothesis properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from mergelib.methods import torch_kernels
from mergelib.methods.base import MethodInputs, NoParams, StreamInputs
from mergelib.methods.slerp import SPECS, SlerpParams, merge

SQRT_HALF = math.sqrt(0.5)


def slerp(t: float, base: list[float], other: list[float]) -> torch.Tensor:
    x0 = torch.tensor(base, dtype=torch.float32)
    x1 = torch.tensor(other, dtype=torch.float32)
    return merge(MethodInputs((x1,), x0, (NoParams(),), "w"), SlerpParams(t=t))


def reference(t: float, v0: list[float], v1: list[float]) -> list[float]:
    """The textbook formula on Python floats: θ from the unit vectors, weights on the raw vectors."""
    n0 = math.sqrt(sum(x * x for x in v0))
    n1 = math.sqrt(sum(x * x for x in v1))
    u0 = [x / n0 for x in v0] if n0 > 1e-8 else list(v0)
    u1 = [x / n1 for x in v1] if n1 > 1e-8 else list(v1)
    dot = sum(a * b for a, b in zip(u0, u1))
    if abs(dot) > 0.9995:
        return [(1 - t) * a + t * b for a, b in zip(v0, v1)]
    theta = math.acos(dot)
    s0 = math.sin((1 - t) * theta) / math.sin(theta)
    s1 = math.sin(t * theta) / math.sin(theta)
    return [s0 * a + s1 * b for a, b in zip(v0, v1)]


def close(actual: torch.Tensor, expected: list[float], tol: float = 1e-5) -> None:
    torch.testing.assert_close(actual.reshape(-1), torch.tensor(expected, dtype=torch.float32), rtol=tol, atol=tol)


def test_spec() -> None:
    (spec,) = SPECS
    assert (spec.name, spec.base, spec.min_models, spec.max_models) == ("slerp", "required", 1, 1)
    assert spec.params is SlerpParams and not spec.randomized


def test_t_is_required_and_in_unit_interval() -> None:
    with pytest.raises(ValidationError, match="t"):
        SlerpParams()  # type: ignore[call-arg]
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValidationError, match="t"):
            SlerpParams(t=bad)


def test_golden_orthogonal_unit_vectors_halfway() -> None:
    close(slerp(0.5, [1.0, 0.0], [0.0, 1.0]), [SQRT_HALF, SQRT_HALF], tol=1e-7)


def test_golden_magnitudes_are_not_renormalised() -> None:
    # θ = π/2: both weights sin(π/4)/1, applied to the raw (1, 0) and (0, 3)
    close(slerp(0.5, [1.0, 0.0], [0.0, 3.0]), [SQRT_HALF, 3 * SQRT_HALF])


def test_golden_third_of_the_way() -> None:
    # θ = π/2, t = 1/3: (cos(π/6), sin(π/6)) for unit inputs
    close(slerp(1 / 3, [1.0, 0.0], [0.0, 1.0]), [math.sqrt(3) / 2, 0.5])


def test_ends_are_exact() -> None:
    base, other = [0.3, -1.2, 2.0, 0.5], [1.1, 0.4, -0.7, 0.2]
    assert torch.equal(slerp(0.0, base, other), torch.tensor(base))
    assert torch.equal(slerp(1.0, base, other), torch.tensor(other))


@pytest.mark.parametrize("factor", [2.0, 1.0, -1.0, -3.0])
def test_parallel_and_antiparallel_are_lerped(factor: float) -> None:
    v0 = [1.0, -2.0, 0.5, 3.0, 0.0, 1.5]
    v1 = [factor * x for x in v0]
    out = slerp(0.25, v0, v1)
    assert torch.isfinite(out).all()
    close(out, [0.75 * a + 0.25 * b for a, b in zip(v0, v1)])


def test_antipodal_halfway_is_zero() -> None:
    close(slerp(0.5, [1.0, 2.0], [-1.0, -2.0]), [0.0, 0.0])


def test_zero_base_counts_as_orthogonal() -> None:
    # an unnormalisable zero vector gives cos = 0, so θ = π/2 and out = sin(tπ/2)·v1
    t = 0.3
    close(slerp(t, [0.0, 0.0, 0.0], [1.0, -2.0, 4.0]), [math.sin(t * math.pi / 2) * x for x in (1.0, -2.0, 4.0)])
    close(slerp(t, [0.0, 0.0], [0.0, 0.0]), [0.0, 0.0])


def test_whole_tensor_is_one_vector() -> None:
    base = torch.tensor([[1.0, 0.5, -0.3], [0.2, -1.0, 0.8]])  # 2x3
    other = torch.tensor([[0.1, 0.9, 0.4], [-0.6, 0.3, 0.2]])
    out = merge(MethodInputs((other,), base, (NoParams(),), "w"), SlerpParams(t=0.4))
    assert out.shape == (2, 3) and out.dtype == torch.float32
    close(out, reference(0.4, base.reshape(-1).tolist(), other.reshape(-1).tolist()))


def test_inputs_are_not_modified() -> None:
    base, other = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([-1.0, 0.5, 2.0])
    copies = base.clone(), other.clone()
    merge(MethodInputs((other,), base, (NoParams(),), "w"), SlerpParams(t=0.7))
    assert torch.equal(base, copies[0]) and torch.equal(other, copies[1])


finite = st.floats(-10.0, 10.0, allow_nan=False, width=32)
vectors = st.integers(2, 12).flatmap(
    lambda n: st.tuples(st.lists(finite, min_size=n, max_size=n), st.lists(finite, min_size=n, max_size=n))
)


def _cos(v0: list[float], v1: list[float]) -> float:
    return sum(a * b for a, b in zip(v0, v1)) / math.sqrt(sum(a * a for a in v0) * sum(b * b for b in v1))


@settings(max_examples=50, deadline=None)
@given(vectors, st.floats(0.0, 1.0))
def test_matches_reference(pair: tuple[list[float], list[float]], t: float) -> None:
    v0, v1 = pair
    assume(math.hypot(*v0) > 0.1 and math.hypot(*v1) > 0.1)
    assume(abs(abs(_cos(v0, v1)) - 0.9995) > 1e-4)  # the branch is decided by a float32 dot
    expected = reference(t, v0, v1)
    scale = max(1.0, max(abs(x) for x in v0 + v1))
    torch.testing.assert_close(
        slerp(t, v0, v1), torch.tensor(expected, dtype=torch.float32), rtol=1e-4, atol=1e-5 * scale
    )


@settings(max_examples=50, deadline=None)
@given(vectors, st.floats(0.0, 1.0))
def test_unit_inputs_stay_on_the_sphere_at_angle_t_theta(pair: tuple[list[float], list[float]], t: float) -> None:
    v0, v1 = pair
    assume(math.hypot(*v0) > 0.1 and math.hypot(*v1) > 0.1)
    cos = _cos(v0, v1)
    assume(abs(cos) < 0.999)
    u0 = [x / math.hypot(*v0) for x in v0]
    u1 = [x / math.hypot(*v1) for x in v1]
    out = slerp(t, u0, u1).tolist()
    assert math.hypot(*out) == pytest.approx(1.0, abs=1e-4)
    # geodesic: the angle from u0 is t·θ and the angle to u1 is (1−t)·θ
    theta = math.acos(cos)
    assert math.acos(max(-1.0, min(1.0, _cos(u0, out)))) == pytest.approx(t * theta, abs=2e-3)
    assert math.acos(max(-1.0, min(1.0, _cos(out, u1)))) == pytest.approx((1 - t) * theta, abs=2e-3)


# ---- streamed over row blocks (the engine's path for large tensors), and the torch kernels' path ----


def streamed(base: torch.Tensor, other: torch.Tensor, chunk: int, t: float) -> torch.Tensor:
    """`stream` over row blocks of `chunk` rows, each block read afresh (as the engine re-reads)."""
    out = torch.full(base.shape, float("nan"))
    inputs = {-1: base, 0: other}

    def emit(start: int, rows: torch.Tensor) -> None:
        out[start : start + rows.shape[0]] = rows

    (spec,) = SPECS
    spec.stream(StreamInputs(tuple(base.shape), 1, lambda i, a, b: inputs[i][a:b].clone(), emit, (NoParams(),), "w",
                             None, chunk), SlerpParams(t=t))
    return out


@pytest.mark.parametrize("shape,chunk", [((13, 7), 3), ((40, 5), 40), ((9, 2, 3), 4), ((1000,), 7), ((3, 4096), 2)])
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("relation", ["random", "parallel"])
def test_stream_equals_whole_bit_for_bit_and_the_reference(shape, chunk, t, relation):
    g = torch.Generator().manual_seed(chunk * 7 + len(shape))
    base = torch.randn(shape, generator=g) * 10.0 ** torch.randint(-3, 2, shape, generator=g)
    other = base * -2.0 if relation == "parallel" else torch.randn(shape, generator=g)
    whole = merge(MethodInputs((other,), base, (NoParams(),), "w"), SlerpParams(t=t))
    assert torch.equal(streamed(base, other, chunk, t).view(torch.int32), whole.view(torch.int32))
    expected = reference(t, base.reshape(-1).double().tolist(), other.reshape(-1).double().tolist())
    torch.testing.assert_close(whole.reshape(-1).double(), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-5, atol=1e-5 * float(base.abs().max()))
    if t in (0.0, 1.0):  # the ends are the inputs themselves
        assert torch.equal(whole, base if t == 0.0 else other)


def test_torch_kernels_path_agrees_with_the_cpu_kernels():
    g = torch.Generator().manual_seed(5)
    base, other = torch.randn(64, 33, generator=g), torch.randn(64, 33, generator=g)
    cpu = merge(MethodInputs((other,), base, (NoParams(),), "w"), SlerpParams(t=0.35))
    with torch_kernels.forced():
        device = merge(MethodInputs((other,), base, (NoParams(),), "w"), SlerpParams(t=0.35))
    torch.testing.assert_close(device, cpu, rtol=1e-6, atol=1e-7)
