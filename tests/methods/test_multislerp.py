"""multislerp: mergekit's tangent-space procedure in Python floats as the reference, goldens, edge cases."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from mergelib.methods.base import MethodInputs
from mergelib.methods.multislerp import SPECS, MultiSlerpModelParams, MultiSlerpParams, check_weights, merge


def multislerp(
    vectors: list[list[float]], weights: list[float], base: list[float] | None = None, **params: float | bool
) -> torch.Tensor:
    tensors = tuple(torch.tensor(v) for v in vectors)
    model_params = tuple(MultiSlerpModelParams(weight=w) for w in weights)
    b = None if base is None else torch.tensor(base)
    return merge(MethodInputs(tensors, b, model_params, "layers.0.w"), MultiSlerpParams(**params))


def reference(
    vectors: list[list[float]],
    weights: list[float],
    base: list[float] | None = None,
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> list[float]:
    """The published steps, element by element: units, weighted mean, tangent projection, exp map."""
    xs = [[x - b for x, b in zip(v, base)] for v in vectors] if base else [list(v) for v in vectors]
    w = [x / sum(weights) for x in weights] if normalize_weights else list(weights)
    dim = len(xs[0])
    norms = [math.sqrt(sum(x * x for x in v)) for v in xs]
    units = [[x / (n + eps) for x in v] for v, n in zip(xs, norms)]
    mean = [sum(wi * u[j] for wi, u in zip(w, units)) for j in range(dim)]
    mean_norm = math.sqrt(sum(x * x for x in mean))
    mean = [x / mean_norm for x in mean]
    tangents = []
    for u in units:
        dot = sum(a * b for a, b in zip(u, mean))
        tangents.append([a - dot * m for a, m in zip(u, mean)])
    tangent = [sum(wi * tv[j] for wi, tv in zip(w, tangents)) for j in range(dim)]
    tn = math.sqrt(sum(x * x for x in tangent)) + eps
    direction = [m * math.cos(tn) + tv * math.sin(tn) / tn for m, tv in zip(mean, tangent)]
    avg_norm = sum(wi * n for wi, n in zip(w, norms))
    out = [avg_norm * d for d in direction]
    return [o + b for o, b in zip(out, base)] if base else out


def test_spec_and_params() -> None:
    (spec,) = SPECS
    assert (spec.name, spec.base, spec.min_models, spec.max_models) == ("multislerp", "optional", 1, None)
    assert MultiSlerpParams() == MultiSlerpParams(normalize_weights=True, eps=1e-8)
    with pytest.raises(ValidationError, match="weight"):
        MultiSlerpModelParams()  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="eps"):
        MultiSlerpParams(eps=0.0)


def test_check_rejects_weights_summing_to_zero() -> None:
    mp = [MultiSlerpModelParams(weight=w) for w in (0.1, 0.2, -0.3)]
    with pytest.raises(ValueError, match=r"weight.*sum to.*normalize_weights"):
        check_weights(MultiSlerpParams(), tuple(mp))
    check_weights(MultiSlerpParams(normalize_weights=False), tuple(mp))
    check_weights(MultiSlerpParams(), (MultiSlerpModelParams(weight=0.0),))  # one model: weight unused
    check_weights(MultiSlerpParams(), tuple(mp[:2]))


def test_golden_orthogonal_pair_and_triple() -> None:
    s = math.sqrt(0.5)
    torch.testing.assert_close(multislerp([[1.0, 0.0], [0.0, 1.0]], [1.0, 1.0]), torch.tensor([s, s]))
    basis = [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0]]
    # direction (1,1,1)/√3 by symmetry; magnitude the mean norm 2
    torch.testing.assert_close(multislerp(basis, [1.0, 1.0, 1.0]), torch.full((3,), 2 / math.sqrt(3)))


def test_golden_unnormalised_weights_scale_the_norm() -> None:
    # weights 1, 1 unnormalised: direction (1,1)/√2, magnitude 1·1 + 1·1 = 2
    out = multislerp([[1.0, 0.0], [0.0, 1.0]], [1.0, 1.0], normalize_weights=False)
    torch.testing.assert_close(out, torch.tensor([math.sqrt(2), math.sqrt(2)]))


@pytest.mark.parametrize("normalize_weights", [True, False])
@pytest.mark.parametrize("with_base", [False, True])
def test_matches_reference(normalize_weights: bool, with_base: bool) -> None:
    g = torch.Generator().manual_seed(11 + with_base)
    vectors = torch.randn(4, 2, 3, generator=g)  # four 2x3 tensors
    base = torch.randn(2, 3, generator=g) if with_base else None
    weights = [0.5, 1.5, 0.25, 1.0]
    tensors = tuple(vectors)
    mp = tuple(MultiSlerpModelParams(weight=w) for w in weights)
    out = merge(MethodInputs(tensors, base, mp, "w"), MultiSlerpParams(normalize_weights=normalize_weights))
    assert out.shape == (2, 3) and out.dtype == torch.float32
    expected = reference(
        [v.reshape(-1).tolist() for v in tensors],
        weights,
        None if base is None else base.reshape(-1).tolist(),
        normalize_weights,
    )
    torch.testing.assert_close(out.reshape(-1), torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_single_model_is_returned_as_is() -> None:
    x = torch.tensor([1.0, -2.0])
    out = merge(MethodInputs((x,), torch.zeros(2), (MultiSlerpModelParams(weight=0.3),), "w"), MultiSlerpParams())
    assert torch.equal(out, x)


def test_antipodal_pair_is_lerped() -> None:
    torch.testing.assert_close(multislerp([[1.0, 2.0], [-1.0, -2.0]], [1.0, 1.0]), torch.zeros(2))
    # units cancel at equal weights; the lerp keeps the raw magnitudes: 0.5·a − 0.5·3a = −a
    torch.testing.assert_close(multislerp([[1.0, 2.0], [-3.0, -6.0]], [1.0, 1.0]), torch.tensor([-1.0, -2.0]))


def test_antipodal_task_vectors_around_a_base_are_lerped() -> None:
    base = [3.0, 1.0]
    out = multislerp([[4.0, 3.0], [0.0, -5.0]], [1.0, 1.0], base=base)  # task vectors (1,2) and (-3,-6)
    torch.testing.assert_close(out, torch.tensor([3.0 - 1.0, 1.0 - 2.0]))


def test_cancelling_inputs_with_more_than_two_models_are_an_error() -> None:
    with pytest.raises(ValueError, match=r"layers\.0\.w.*antipodal"):
        multislerp([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="antipodal"):
        multislerp([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]], [1.0, 1.0, math.sqrt(2)])


def test_zero_task_vectors_give_the_base_exactly() -> None:
    base = [1.5, -2.0, 0.25]
    assert torch.equal(multislerp([base, base, base], [1.0, 2.0, 3.0], base=base), torch.tensor(base))
    assert torch.equal(multislerp([[0.0, 0.0]] * 3, [1.0, 1.0, 1.0]), torch.zeros(2))


def test_one_zero_task_vector_shrinks_the_norm() -> None:
    # the zero vector has no direction but its norm 0 counts in the weighted mean norm
    out = multislerp([[3.0, 0.0], [0.0, 3.0], [0.0, 0.0]], [1.0, 1.0, 1.0])
    torch.testing.assert_close(out, torch.tensor([2 * math.sqrt(0.5), 2 * math.sqrt(0.5)]))


def test_inputs_are_not_modified() -> None:
    tensors = (torch.tensor([1.0, 2.0]), torch.tensor([2.0, -1.0]))
    base = torch.tensor([0.5, 0.5])
    copies = [x.clone() for x in (*tensors, base)]
    mp = (MultiSlerpModelParams(weight=1.0), MultiSlerpModelParams(weight=2.0))
    merge(MethodInputs(tensors, base, mp, "w"), MultiSlerpParams())
    assert all(torch.equal(a, b) for a, b in zip((*tensors, base), copies))


finite = st.floats(-10.0, 10.0, allow_nan=False, width=32)
groups = st.tuples(st.integers(2, 4), st.integers(1, 6)).flatmap(
    lambda s: st.lists(st.lists(finite, min_size=s[1], max_size=s[1]), min_size=s[0], max_size=s[0])
)
positive = st.floats(0.1, 5.0)


def _mean_unit_norm(vectors: list[list[float]], weights: list[float]) -> float:
    norms = [math.sqrt(sum(x * x for x in v)) for v in vectors]
    dim = len(vectors[0])
    mean = [sum(w * v[j] / n for w, v, n in zip(weights, vectors, norms)) / sum(weights) for j in range(dim)]
    return math.sqrt(sum(x * x for x in mean))


@settings(max_examples=50, deadline=None)
@given(groups, st.data())
def test_reference_permutation_and_weight_scale(vectors: list[list[float]], data: st.DataObject) -> None:
    weights = data.draw(st.lists(positive, min_size=len(vectors), max_size=len(vectors)))
    assume(all(math.sqrt(sum(x * x for x in v)) > 0.1 for v in vectors))
    assume(_mean_unit_norm(vectors, weights) > 1e-2)  # a well-defined mean direction
    out = multislerp(vectors, weights)
    tol = 1e-4 * max(1.0, *(abs(x) for v in vectors for x in v))
    torch.testing.assert_close(out, torch.tensor(reference(vectors, weights)), rtol=1e-4, atol=tol)
    order = data.draw(st.permutations(range(len(vectors))))
    permuted = multislerp([vectors[i] for i in order], [weights[i] for i in order])
    torch.testing.assert_close(permuted, out, rtol=1e-4, atol=tol)
    scaled = multislerp(vectors, [7.5 * w for w in weights])
    torch.testing.assert_close(scaled, out, rtol=1e-4, atol=tol)
    # the output norm is the weighted mean of the input norms
    norms = [math.sqrt(sum(x * x for x in v)) for v in vectors]
    avg = sum(w * n for w, n in zip(weights, norms)) / sum(weights)
    assert torch.linalg.vector_norm(out).item() == pytest.approx(avg, rel=1e-4)


@settings(max_examples=50, deadline=None)
@given(groups, st.data())
def test_identical_inputs_give_the_input(vectors: list[list[float]], data: st.DataObject) -> None:
    x = vectors[0]
    weights = data.draw(st.lists(positive, min_size=len(vectors), max_size=len(vectors)))
    out = multislerp([x] * len(vectors), weights)
    torch.testing.assert_close(out, torch.tensor(x), rtol=1e-5, atol=1e-5)
    with_base = multislerp([x] * len(vectors), weights, base=vectors[-1])
    torch.testing.assert_close(with_base, torch.tensor(x), rtol=1e-5, atol=1e-4)
