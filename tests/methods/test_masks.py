"""Masks of the GTA family against plain-Python references, hand-derived literals and hypothesis properties.

Ranking convention under test: larger |x| ranks higher; equal |x| ranks the lower flat index higher.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergelib.methods.masks import (
    l1_rescale,
    magnitude_mask,
    magprune_mask,
    outlier_mask,
    random_mask,
    sign_consensus,
)

FAST = settings(max_examples=50, deadline=None)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- plain-Python references (lists, no torch math) ----


def ascending(values: list[float]) -> list[int]:
    """Indices from lowest to highest rank."""
    return sorted(range(len(values)), key=lambda i: (abs(values[i]), -i))


def ref_magnitude(values: list[float], density: float) -> list[bool]:
    n = len(values)
    k = n if density >= 1 else math.floor(density * n)
    top = set(ascending(values)[n - k :]) if k > 0 else set()
    return [i in top for i in range(n)]


def ref_outlier(values: list[float], density: float, gamma: float) -> list[bool]:
    n = len(values)
    if density >= 1:
        return [True] * n
    keep, n_top = math.floor(density * n), math.floor(gamma * n)
    n_bot = n - keep - n_top
    if n_bot < 0:
        n_top, n_bot = n_top + n_bot, 0
    kept = set(ascending(values)[n_bot : n - n_top])  # mergekit's [n_bot:-n_top] minus its n_top == 0 bug
    return [i in kept for i in range(n)]


def ref_sign_consensus(stack: list[list[float]]) -> list[list[bool]]:
    n_models, size = len(stack), len(stack[0])
    out = [[False] * size for _ in range(n_models)]
    for j in range(size):
        elected = 1 if sum(stack[i][j] for i in range(n_models)) >= 0 else -1
        for i in range(n_models):
            x = stack[i][j]
            out[i][j] = (x > 0 and elected == 1) or (x < 0 and elected == -1)
    return out


def ref_magprune(rows: list[list[float]], density: float, epsilon: float, draws: list[float]) -> list[bool]:
    keep, k = [], 0
    for row in rows:
        n = len(row)
        rank = [0] * n
        for r, i in enumerate(ascending(row)):
            rank[i] = r
        for i in range(n):
            rank_hat = rank[i] / (n - 1) if n > 1 else 0.5
            p = (density - epsilon) + 2 * epsilon * rank_hat
            p32 = torch.tensor(p, dtype=torch.float32).item()  # the library compares in float32
            keep.append(draws[k] < p32)
            k += 1
    return keep


def ref_l1_rescale(values: list[float], keep: list[bool]) -> list[float]:
    masked = [v if m else 0.0 for v, m in zip(values, keep)]
    before, after = sum(abs(v) for v in values), sum(abs(v) for v in masked)
    if before < 1e-7 or after < 1e-7:
        return masked
    return [v * before / after for v in masked]


# Quarter-integers: exact in float32, many ties and zeros.
quarters = st.integers(-12, 12).map(lambda i: i / 4)
shapes = st.sampled_from([(1,), (5,), (2, 3), (3, 4), (4, 5), (2, 2, 3)])


@st.composite
def tensors(draw, shape=None):
    shape = draw(shapes) if shape is None else shape
    values = draw(st.lists(quarters, min_size=math.prod(shape), max_size=math.prod(shape)))
    return torch.tensor(values, dtype=torch.float32).reshape(shape)


# ---- sign_consensus ----


def test_sign_consensus_golden():
    # column sums: 1.5 (+), -1 (-), 0 (+, zero goes to +), 2 (+)
    weighted = torch.tensor([[2.0, -3.0, 0.0, 2.0], [-0.5, 2.0, 0.0, 0.0]])
    expected = torch.tensor([[True, True, False, True], [False, False, False, False]])
    assert torch.equal(sign_consensus(weighted), expected)


@FAST
@given(st.integers(1, 4).flatmap(lambda n: st.lists(tensors((2, 3)), min_size=n, max_size=n)))
def test_sign_consensus_matches_loop(stack):
    weighted = torch.stack(stack)  # [N, 2, 3]
    got = sign_consensus(weighted)
    assert got.dtype == torch.bool
    ref = ref_sign_consensus([t.flatten().tolist() for t in stack])
    assert got.reshape(len(stack), -1).tolist() == ref


# ---- magnitude_mask ----


def test_magnitude_golden_ties_lower_index_wins():
    delta = torch.tensor([[-2.0, 2.0, 0.25], [-3.0, -0.5, 2.0]])
    # k = 3: |-3| first, then three 2s compete for two places: indices 0 and 1 win over 5
    assert magnitude_mask(delta, 0.5).tolist() == [[True, True, False], [True, False, False]]


def test_magnitude_edges():
    delta = torch.tensor([1.0, -2.0, 3.0, 0.0, 5.0])
    assert magnitude_mask(delta, 1.0).all()
    assert not magnitude_mask(delta, 0.1).any()  # k = floor(0.5) = 0: mergekit asserts, we keep none
    assert not magnitude_mask(delta, 0.0).any()
    assert magnitude_mask(torch.zeros(4), 0.5).tolist() == [True, True, False, False]  # all tied: lowest indices


@FAST
@given(tensors(), st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]))
def test_magnitude_matches_sort_reference(delta, density):
    got = magnitude_mask(delta, density)
    assert got.shape == delta.shape and got.dtype == torch.bool
    assert got.flatten().tolist() == ref_magnitude(delta.flatten().tolist(), density)


# ---- random_mask ----


def ref_draws(seed: int, count: int) -> list[float]:
    """The counter-based U[0,1) stream, computed in Python ints: the key is one randint from the generator,
    draw j is the top 24 bits of splitmix64's finaliser applied to key + j * 0x9E3779B97F4A7C15 (mod 2**64)."""
    mask = (1 << 64) - 1
    key = int(torch.randint(0, (1 << 63) - 1, (1,), generator=gen(seed)))
    out = []
    for j in range(count):
        z = (key + j * 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z ^= z >> 31
        out.append((z >> 40) / 2**24)
    return out


def test_uniform_draws_golden_and_blockwise():
    from mergelib.methods import fused

    # splitmix64 of 0 is 0 whatever the finaliser; index 1 of key 0 mixes the golden-ratio increment
    assert fused.uniform_at(0, 0) == 0.0
    draws = np.empty(1000, dtype=np.float32)
    fused.fill_uniform(12345, 0, draws)
    tail = np.empty(400, dtype=np.float32)
    fused.fill_uniform(12345, 600, tail)  # a block starting at 600 redraws the same values
    assert np.array_equal(draws[600:], tail)
    assert ((draws >= 0) & (draws < 1)).all() and abs(float(draws.mean()) - 0.5) < 0.05


def test_random_mask_matches_draws_and_repeats():
    delta = torch.randn(4, 5, generator=gen(0))
    draws = ref_draws(7, 20)
    got = random_mask(delta, 0.3, gen(7))
    assert got.dtype == torch.bool
    assert got.flatten().tolist() == [u < 0.3 for u in draws]
    assert torch.equal(got, random_mask(delta, 0.3, gen(7)))
    assert not torch.equal(random_mask(delta, 0.5, gen(7)), random_mask(delta, 0.5, gen(8)))


def test_random_mask_statistics():
    delta = torch.ones(200, 100)
    for density in (0.1, 0.5, 0.9):
        kept = random_mask(delta, density, gen(3)).float().mean().item()
        assert abs(kept - density) < 0.02  # 20k Bernoulli draws: std <= 0.0036


def test_random_mask_certain_outcomes_do_not_draw():
    g = gen(5)
    state = g.get_state()
    assert random_mask(torch.ones(3), 1.0, g).all()
    assert not random_mask(torch.ones(3), 0.0, g).any()
    assert torch.equal(g.get_state(), state)


# ---- outlier_mask ----


def test_outlier_golden():
    delta = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0, 9.0, -10.0])
    # keep = 6, n_top = 2, n_bot = 2: drop |1|,|2| and |9|,|10|
    assert outlier_mask(delta, 0.6, 0.2).tolist() == [False, False] + [True] * 6 + [False, False]
    # n_top = floor(0.01*10) = 0: mergekit zeroes everything; the fix keeps the top 5
    assert outlier_mask(delta, 0.5, 0.01).tolist() == [False] * 5 + [True] * 5
    # density + gamma > 1: the top cut shrinks (keep 9, n_top 2 -> 1, n_bot 0)
    assert outlier_mask(delta, 0.9, 0.2).tolist() == [True] * 9 + [False]


def test_outlier_gamma_zero_is_magnitude_and_density_one_keeps_all():
    delta = torch.randn(4, 5, generator=gen(1))
    assert torch.equal(outlier_mask(delta, 0.4, 0.0), magnitude_mask(delta, 0.4))
    assert outlier_mask(delta, 1.0, 0.3).all()


@FAST
@given(tensors(), st.sampled_from([0.0, 0.2, 0.5, 0.8, 1.0]), st.sampled_from([0.0, 0.01, 0.1, 0.25, 0.5]))
def test_outlier_matches_sort_reference(delta, density, gamma):
    got = outlier_mask(delta, density, gamma)
    assert got.shape == delta.shape and got.dtype == torch.bool
    assert got.flatten().tolist() == ref_outlier(delta.flatten().tolist(), density, gamma)


# ---- magprune_mask ----


@FAST
@given(tensors(), st.sampled_from([(0.5, 0.15), (0.3, 0.1), (0.8, 0.1), (0.5, 0.0)]), st.integers(0, 2**31))
def test_magprune_matches_row_reference(delta, density_eps, seed):
    density, epsilon = density_eps
    got = magprune_mask(delta, density, epsilon, gen(seed))
    assert got.shape == delta.shape and got.dtype == torch.bool
    rows = delta.reshape(-1, delta.shape[-1]).tolist()
    draws = ref_draws(seed, delta.numel())
    assert got.flatten().tolist() == ref_magprune(rows, density, epsilon, draws)
    assert torch.equal(got, magprune_mask(delta, density, epsilon, gen(seed)))


def test_magprune_keep_rates_follow_rank():
    # every row ranks |1| < |-2| < |3|: keep probabilities 0.4, 0.5, 0.6
    delta = torch.tensor([1.0, -2.0, 3.0]).repeat(20000, 1)
    rates = magprune_mask(delta, 0.5, 0.1, gen(11)).float().mean(dim=0)
    assert torch.allclose(rates, torch.tensor([0.4, 0.5, 0.6]), atol=0.015)  # std ~0.0035


def test_magprune_edges():
    g = gen(2)
    state = g.get_state()
    assert magprune_mask(torch.ones(2, 3), 1.0, 0.15, g).all()
    assert not magprune_mask(torch.ones(2, 3), 0.0, 0.15, g).any()
    assert torch.equal(g.get_state(), state)
    with pytest.raises(ValueError, match="density"):
        magprune_mask(torch.ones(3), 0.1, 0.15, g)
    with pytest.raises(ValueError, match="epsilon"):
        magprune_mask(torch.ones(3), 0.9, 0.1, g)
    # a one-element row keeps with p = density (mergekit computes 0/0 there)
    rate = magprune_mask(torch.ones(20000, 1), 0.3, 0.1, gen(4)).float().mean().item()
    assert abs(rate - 0.3) < 0.02


# ---- l1_rescale ----


def test_l1_rescale_golden():
    delta = torch.tensor([1.0, -2.0, 3.0, -4.0])
    keep = torch.tensor([False, True, False, True])
    # ||delta||_1 = 10, kept L1 = 6: scale 10/6
    assert torch.allclose(l1_rescale(delta, keep), torch.tensor([0.0, -20 / 6, 0.0, -40 / 6]))
    assert torch.equal(l1_rescale(delta, torch.zeros(4, dtype=torch.bool)), torch.zeros(4))  # skipped, no NaN
    assert torch.equal(l1_rescale(delta, torch.ones(4, dtype=torch.bool)), delta)


@FAST
@given(tensors(), st.integers(0, 2**31))
def test_l1_rescale_matches_reference(delta, seed):
    keep = torch.rand(delta.shape, generator=gen(seed)) < 0.5
    got = l1_rescale(delta, keep)
    ref = ref_l1_rescale(delta.flatten().tolist(), keep.flatten().tolist())
    assert torch.allclose(got.flatten(), torch.tensor(ref, dtype=torch.float32), rtol=1e-6, atol=0)
