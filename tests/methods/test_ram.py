"""ram and ramplus_tl against per-element loop references, golden values and properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from mergelib.methods.base import MethodInputs, NoParams
from mergelib.methods.ram import SPECS, RamParams, RamPlusParams, merge_ram, merge_ramplus_tl

SHAPES = [(1,), (4,), (2, 3), (4, 5), (2, 2, 3)]


def inputs(base, tensors):
    return MethodInputs(tuple(tensors), base, tuple(NoParams() for _ in tensors), "w")


def ram(base, *tensors, epsilon=1e-5):
    return merge_ram(inputs(base, tensors), RamParams(epsilon=epsilon))


def ramplus(base, *tensors, r=0.1, alpha=0.2, epsilon=1e-5):
    return merge_ramplus_tl(inputs(base, tensors), RamPlusParams(r=r, alpha=alpha, epsilon=epsilon))


def reference(base, tensors, epsilon, plus=None):
    """Per element with Python floats; `plus` = (r, alpha) scales each model's unique elements by its λ."""
    b = base.reshape(-1).tolist()
    taus = [[x - y for x, y in zip(t.reshape(-1).tolist(), b)] for t in tensors]
    n, size = len(taus), len(b)
    active = [[abs(tau[e]) > epsilon for e in range(size)] for tau in taus]
    count = [sum(active[i][e] for i in range(n)) for e in range(size)]
    scale = [1.0] * n
    if plus is not None:
        r, alpha = plus
        for i in range(n):
            shared = sum(1 for e in range(size) if active[i][e] and count[e] > 1)
            unique = sum(1 for e in range(size) if active[i][e] and count[e] == 1)
            rho = shared / max(unique, epsilon) if (unique or epsilon) else 0.0
            scale[i] = 1 + r * min(max(rho, 0.0), alpha)
    out = []
    for e in range(size):
        if count[e] == 0:
            out.append(b[e])
        elif count[e] == 1:
            (i,) = [i for i in range(n) if active[i][e]]
            out.append(b[e] + scale[i] * taus[i][e])
        else:
            out.append(b[e] + sum(taus[i][e] for i in range(n) if active[i][e]) / count[e])
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape)


def sparse_randoms(seed, shape, count):
    """A base and fine-tunes whose task vectors are zero at about half the elements (unique/shared mixes)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    tuned = [base + torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < 0.5) for _ in range(count)]
    return base, tuned


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    shape=st.sampled_from(SHAPES),
    n=st.integers(1, 4),
    epsilon=st.sampled_from([0.0, 1e-5, 0.3]),
)
def test_ram_matches_loop_reference(seed, shape, n, epsilon):
    base, tensors = sparse_randoms(seed, shape, n)
    got = ram(base, *tensors, epsilon=epsilon)
    assert got.dtype == torch.float32 and got.shape == shape
    torch.testing.assert_close(got.double(), reference(base, tensors, epsilon), atol=1e-5, rtol=1e-5)


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    shape=st.sampled_from(SHAPES),
    n=st.integers(1, 4),
    epsilon=st.sampled_from([0.0, 1e-5, 0.3]),
    r=st.sampled_from([0.0, 0.1, 0.5]),
    alpha=st.sampled_from([0.0, 0.2, 2.0]),
)
def test_ramplus_tl_matches_loop_reference(seed, shape, n, epsilon, r, alpha):
    base, tensors = sparse_randoms(seed, shape, n)
    got = ramplus(base, *tensors, r=r, alpha=alpha, epsilon=epsilon)
    expected = reference(base, tensors, epsilon, plus=(r, alpha))
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_golden_ram():
    # e0 shared by both -> mean 2; e1 unique -> 2; e2 untouched -> 0; e3's 1e-6 is below epsilon -> 0
    base = torch.zeros(4)
    got = ram(base, torch.tensor([1.0, 2.0, 0.0, 1e-6]), torch.tensor([3.0, 0.0, 0.0, 0.0]))
    assert torch.equal(got, torch.tensor([2.0, 2.0, 0.0, 0.0]))


def test_golden_ramplus_tl():
    # model a: 1 shared (e0), 4 unique -> rho 0.25 -> lambda = 1 + 0.5*0.25 = 1.125
    # model b: 1 shared (e0), 1 unique (e5) -> rho 1, clipped at alpha 1 -> lambda = 1.5
    base = torch.zeros(6)
    a = torch.tensor([1.0, 2.0, 4.0, 4.0, 4.0, 0.0])
    b = torch.tensor([3.0, 0.0, 0.0, 0.0, 0.0, 5.0])
    got = ramplus(base, a, b, r=0.5, alpha=1.0)
    assert torch.equal(got, torch.tensor([2.0, 2.25, 4.5, 4.5, 4.5, 7.5]))
    # defaults r 0.1, alpha 0.2: both rho clip at 0.2 -> lambda 1.02
    got = ramplus(base, a, b)
    torch.testing.assert_close(got, torch.tensor([2.0, 2.04, 4.08, 4.08, 4.08, 5.1]))


def test_model_active_nowhere_alone_with_zero_epsilon_stays_finite():
    # every element shared (unique count 0, epsilon 0): rho = 0/0 must not leak NaN
    base = torch.zeros(3)
    tuned = torch.tensor([1.0, -2.0, 0.0])
    got = ramplus(base, tuned, tuned.clone(), epsilon=0.0)
    assert torch.equal(got, tuned)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), shape=st.sampled_from(SHAPES), n=st.integers(1, 4))
def test_zero_task_vectors_give_the_base_exactly(seed, shape, n):
    base, _ = sparse_randoms(seed, shape, 0)
    clones = [base.clone() for _ in range(n)]
    assert torch.equal(ram(base, *clones), base)
    assert torch.equal(ramplus(base, *clones, epsilon=0.0), base)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), shape=st.sampled_from(SHAPES), n=st.integers(1, 4))
def test_identical_fine_tunes_give_the_fine_tune(seed, shape, n):
    base, (tuned,) = sparse_randoms(seed, shape, 1)
    copies = [tuned.clone() for _ in range(n)]
    torch.testing.assert_close(ram(base, *copies), tuned)
    if n > 1:  # all shared: no unique element for lambda to scale
        torch.testing.assert_close(ramplus(base, *copies, r=0.5, alpha=1.0), tuned)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), shape=st.sampled_from(SHAPES))
def test_single_fine_tune_keeps_its_active_elements(seed, shape):
    base, (tuned,) = sparse_randoms(seed, shape, 1)
    # one model: every active element is unique and nothing is shared, so rho = 0 and lambda = 1
    torch.testing.assert_close(ram(base, tuned), tuned)
    assert torch.equal(ramplus(base, tuned, r=0.5, alpha=1.0), ram(base, tuned))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), shape=st.sampled_from(SHAPES))
def test_model_order_does_not_matter(seed, shape):
    base, (a, b, c) = sparse_randoms(seed, shape, 3)
    torch.testing.assert_close(ram(base, a, b, c), ram(base, c, a, b))
    torch.testing.assert_close(ramplus(base, a, b, c, r=0.5, alpha=1), ramplus(base, b, c, a, r=0.5, alpha=1))


def test_inputs_are_not_modified():
    base, tensors = sparse_randoms(3, (2, 3), 2)
    copies = [x.clone() for x in (base, *tensors)]
    ram(base, *tensors)
    ramplus(base, *tensors)
    assert all(torch.equal(x, y) for x, y in zip((base, *tensors), copies))


def test_parameters_and_specs():
    assert RamParams().epsilon == 1e-5
    assert (RamPlusParams().r, RamPlusParams().alpha, RamPlusParams().epsilon) == (0.1, 0.2, 1e-5)
    for model, field in ((RamParams, "epsilon"), (RamPlusParams, "r"), (RamPlusParams, "alpha")):
        with pytest.raises(ValidationError, match=field):
            model.model_validate({field: -1.0})
    with pytest.raises(ValidationError, match="extra"):
        RamParams.model_validate({"r": 0.1})
    assert [(s.name, s.base, s.min_models, s.max_models) for s in SPECS] == [
        ("ram", "required", 1, None),
        ("ramplus_tl", "required", 1, None),
    ]
    assert [s.params for s in SPECS] == [RamParams, RamPlusParams]
    assert all(s.paper == "https://arxiv.org/abs/2601.13572" for s in SPECS)
