"""sce against a per-element loop reference of mergekit's Select/Calculate/Erase, golden values and properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from mergelib.methods.base import MethodInputs
from mergelib.methods.sce import SPECS, SceModelParams, SceParams, merge
from mergelib.methods.select import top_k_mask

SHAPES = [(1,), (4,), (2, 3), (4, 5), (2, 2, 3)]


def run(base, *tensors, select_topk=1.0, int8_mask=False, weights=None):
    per_model = tuple(SceModelParams(weight=w) for w in (weights or [None] * len(tensors)))
    inputs = MethodInputs(tuple(tensors), base, per_model, "w")
    return merge(inputs, SceParams(select_topk=select_topk, int8_mask=int8_mask))


def reference(base, tensors, select_topk, k_override=None):
    """SCE per element with Python floats; top-k by (variance desc, flat index asc)."""
    b = base.reshape(-1).tolist()
    taus = [[x - y for x, y in zip(t.reshape(-1).tolist(), b)] for t in tensors]
    n, size = len(taus), len(b)
    if select_topk < 1:
        var = []
        for e in range(size):
            mean = sum(tau[e] for tau in taus) / n
            var.append(sum((tau[e] - mean) ** 2 for tau in taus) / n)
        nonzero = sum(1 for v in var if v != 0)
        k = k_override if k_override is not None else math.floor(round(nonzero * select_topk, 9))
        chosen = set(sorted(range(size), key=lambda e: (-var[e], e))[:k])
        taus = [[tau[e] if e in chosen else 0.0 for e in range(size)] for tau in taus]
    energy = [sum(v * v for v in tau) / size for tau in taus]
    total = sum(energy)
    weights = [1 / n] * n if abs(total) < 1e-6 else [en / total for en in energy]
    out = []
    for e in range(size):
        elected = 1 if sum(tau[e] for tau in taus) >= 0 else -1
        kept = [i for i in range(n) if taus[i][e] != 0 and (taus[i][e] > 0) == (elected > 0)]
        num = sum(weights[i] * taus[i][e] for i in kept)
        den = max(sum(weights[i] for i in kept), 1e-6)
        out.append(b[e] + num / den)
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape)


def randoms(seed, shape, count):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(count)]


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    shape=st.sampled_from(SHAPES),
    n=st.integers(1, 4),
    select_topk=st.sampled_from([1.0, 0.9, 0.5, 0.3, 0.1]),
)
def test_matches_loop_reference(seed, shape, n, select_topk):
    base, *tensors = randoms(seed, shape, n + 1)
    got = run(base, *tensors, select_topk=select_topk)
    assert got.dtype == torch.float32 and got.shape == shape
    torch.testing.assert_close(got.double(), reference(base, tensors, select_topk), atol=1e-5, rtol=1e-5)


def test_golden_equal_weights():
    # energies 3.5 and 3.5 -> w = (.5, .5); sums (4, 0, 2, 0) elect + everywhere (0 counts as +)
    # e0: both agree -> 2; e1: only +2 -> 2; e2: only 3 -> 3; e3: nobody -> 0 / 1e-6 = 0
    base = torch.zeros(4)
    a, b = torch.tensor([1.0, -2.0, 3.0, 0.0]), torch.tensor([3.0, 2.0, -1.0, 0.0])
    assert torch.equal(run(base, a, b), torch.tensor([2.0, 2.0, 3.0, 0.0]))


def test_golden_select_breaks_variance_ties_by_index():
    # variances (1, 4, 4, 0): 3 nonzero, k = floor(1.5) = 1; e1 and e2 tie at 4 -> e1 (lower index) wins.
    # Only e1 survives: tau = (-2, 2), sum 0 elects +, weights (.5, .5) -> 2
    base = torch.zeros(4)
    a, b = torch.tensor([1.0, -2.0, 3.0, 0.0]), torch.tensor([3.0, 2.0, -1.0, 0.0])
    assert torch.equal(run(base, a, b, select_topk=0.5), torch.tensor([0.0, 2.0, 0.0, 0.0]))


def test_golden_unequal_weights():
    # energies (4, 0.5) -> w = (8/9, 1/9); e0: (8/9*2 + 1/9*1) / 1 = 17/9; e1: model b's 0 does not count -> 2
    got = run(torch.zeros(2), torch.tensor([2.0, 2.0]), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(got, torch.tensor([17 / 9, 2.0]))


def test_small_task_vectors_get_uniform_weights():
    # energies 1e-8 and 9e-8 sum below mergekit's 1e-6: uniform weights, the plain mean 2e-4 (not 2.8e-4)
    got = run(torch.zeros(2), torch.full((2,), 1e-4), torch.full((2,), 3e-4))
    torch.testing.assert_close(got, torch.full((2,), 2e-4))


def test_select_fraction_is_the_decimal_written():
    # 100 distinct variances, select_topk 0.29: 29 positions (0.29 * 100 is 28.999999999999996 in floats)
    base = torch.zeros(100)
    spread = torch.arange(1, 101, dtype=torch.float32)
    got = run(base, spread, -spread, select_topk=0.29)
    # tau = (s, -s) everywhere: the election gives +, model 0 is kept with weight .5 -> s on the top 29
    assert torch.equal(got != 0, spread > 71)


def test_k_zero_gives_the_base():
    base, a, b = randoms(4, (2, 3), 3)
    # 6 nonzero variances * 0.1 -> k = 0: nothing is selected
    assert torch.equal(run(base, a, b, select_topk=0.1), base)


def test_single_fine_tune():
    base, tuned = randoms(8, (4, 5), 2)
    torch.testing.assert_close(run(base, tuned), tuned)
    # one model has zero variance everywhere: select_topk < 1 selects nothing (mergekit behaves the same)
    assert torch.equal(run(base, tuned, select_topk=0.5), base)


def test_top_k_mask_ties_and_bounds():
    scores = torch.tensor([[1.0, 3.0, 3.0], [3.0, 0.0, 2.0]])
    assert top_k_mask(scores, 2).tolist() == [[False, True, True], [False, False, False]]
    assert top_k_mask(scores, 4).tolist() == [[False, True, True], [True, False, True]]
    assert top_k_mask(scores, 5).tolist() == [[True, True, True], [True, False, True]]
    assert not top_k_mask(scores, 0).any() and top_k_mask(scores, 6).all()
    assert top_k_mask(torch.zeros(5), 3).tolist() == [True, True, True, False, False]


def test_top_k_mask_on_an_ordered_tensor():
    n = 200_001
    scores = torch.arange(n, 0, -1, dtype=torch.float32)  # reversed: quadratic for torch.kthvalue
    for k in (1, n // 4, n // 2, 3 * n // 4, n - 1):
        mask = top_k_mask(scores, k)
        assert int(mask.sum()) == k and bool(mask[:k].all())


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), shape=st.sampled_from(SHAPES), n=st.integers(1, 4))
def test_zero_task_vectors_give_the_base_exactly(seed, shape, n):
    (base,) = randoms(seed, shape, 1)
    for topk in (1.0, 0.5):
        assert torch.equal(run(base, *[base.clone() for _ in range(n)], select_topk=topk), base)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), shape=st.sampled_from(SHAPES), n=st.integers(1, 4))
def test_identical_fine_tunes_give_the_fine_tune(seed, shape, n):
    base, tuned = randoms(seed, shape, 2)
    torch.testing.assert_close(run(base, *[tuned.clone() for _ in range(n)]), tuned)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), shape=st.sampled_from(SHAPES), topk=st.sampled_from([1.0, 0.5]))
def test_task_vector_scale_equivariance_and_model_order(seed, shape, topk):
    base, a, b, c = randoms(seed, shape, 4)
    got = run(base, a, b, c, select_topk=topk) - base
    scaled = run(base, *(base + 3 * (x - base) for x in (a, b, c)), select_topk=topk) - base
    torch.testing.assert_close(scaled, 3 * got, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(run(base, c, a, b, select_topk=topk) - base, got, atol=1e-6, rtol=1e-5)


def test_per_model_weight_is_accepted_and_ignored():
    base, a, b = randoms(9, (4, 5), 3)
    assert torch.equal(run(base, a, b, weights=[0.9, 0.1]), run(base, a, b))


def test_int8_mask_changes_nothing():
    base, a, b = randoms(6, (4, 5), 3)
    assert torch.equal(run(base, a, b, select_topk=0.5, int8_mask=True), run(base, a, b, select_topk=0.5))


def test_inputs_are_not_modified():
    base, a, b = randoms(3, (2, 3), 3)
    copies = [x.clone() for x in (base, a, b)]
    run(base, a, b, select_topk=0.5)
    assert all(torch.equal(x, y) for x, y in zip((base, a, b), copies))


def test_parameters_and_spec():
    assert (SceParams().select_topk, SceParams().int8_mask) == (1.0, False)
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValidationError, match="select_topk"):
            SceParams(select_topk=bad)
    with pytest.raises(ValidationError, match="extra"):
        SceParams.model_validate({"density": 0.5})
    (spec,) = SPECS
    assert (spec.name, spec.base, spec.min_models, spec.max_models) == ("sce", "required", 1, None)
    assert spec.model_params is SceModelParams and SceModelParams().weight is None
    assert spec.params is SceParams and spec.paper == "https://arxiv.org/abs/2408.07990"
