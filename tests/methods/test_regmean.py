"""RegMean / RegMean++ merge math: the regression written another way (least squares on the stacked activations),
hand-derived goldens, and the rules for tensors without usable statistics."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from mergelib.methods.base import IgnoredWeight, MethodInputs
from mergelib.methods.regmean import SPECS, RegMeanParams, merge, reduce_non_diagonal

MODEL = IgnoredWeight()


def run(weights, grams, alpha=1.0):
    inputs = MethodInputs(tuple(weights), None, (MODEL,) * len(weights), "w", statistics=tuple(grams))
    return merge(inputs, RegMeanParams(reduce_non_diagonal=alpha))


def activations(n_models=3, tokens=20, d_in=5, d_out=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(tokens, d_in, generator=g, dtype=torch.float64) for _ in range(n_models)]
    ws = [torch.randn(d_out, d_in, generator=g, dtype=torch.float64) for _ in range(n_models)]
    return xs, ws


def test_alpha_one_is_the_least_squares_fit_of_every_models_outputs():
    xs, ws = activations()
    # reference: min_W sum_i ||X_i W^T - X_i W_i^T||^2 as one least-squares problem on the stacked activations
    stacked_x = torch.cat(xs)  # [3 * tokens, in]
    stacked_y = torch.cat([x @ w.T for x, w in zip(xs, ws)])  # [3 * tokens, out]
    want = torch.linalg.lstsq(stacked_x, stacked_y).solution.T
    got = run([w.float() for w in ws], [(x.T @ x).float() for x in xs])
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-5)


def test_alpha_scales_off_diagonals_as_the_papers_formula_with_an_explicit_inverse():
    xs, ws = activations(seed=1)
    alpha = 0.3
    grams = [x.T @ x for x in xs]
    reduced = []
    for gram in grams:  # element by element: off-diagonals times alpha, diagonal kept
        r = gram.clone()
        for a in range(r.shape[0]):
            for b in range(r.shape[1]):
                if a != b:
                    r[a, b] = alpha * gram[a, b]
        reduced.append(r)
    want = sum(w @ r for w, r in zip(ws, reduced)) @ torch.linalg.inv(sum(reduced))
    got = run([w.float() for w in ws], [g.float() for g in grams], alpha)
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-5)
    assert torch.equal(reduce_non_diagonal(grams[0], 1.0), grams[0])


def test_golden_diagonal_grams_weigh_each_input_feature():
    # W = (W1 G1 + W2 G2)(G1 + G2)^-1 = ([3, 0] + [0, 3]) / 4 per column
    got = run([torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])],
              [torch.diag(torch.tensor([3.0, 1.0])), torch.diag(torch.tensor([1.0, 3.0]))], alpha=0.5)
    assert torch.equal(got, torch.tensor([[0.75, 0.75]]))


def test_identical_models_give_that_model_and_one_model_gives_itself():
    xs, ws = activations(n_models=1, seed=2)
    w = ws[0].float()
    gram = (xs[0].T @ xs[0]).float()
    torch.testing.assert_close(run([w], [gram], 0.9), w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(run([w, w, w], [gram, 2 * gram, gram], 0.9), w, rtol=1e-5, atol=1e-6)


def test_zero_statistics_give_the_plain_average_and_inactive_features_their_average_column():
    a, b = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[3.0, 0.0], [1.0, 8.0]])
    zero = torch.zeros(2, 2)
    assert torch.equal(run([a, b], [zero, zero]), (a + b) / 2)
    # feature 1 never active: its column is the average; feature 0 alone is solved (one feature: G weights)
    g1, g2 = torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[3.0, 0.0], [0.0, 0.0]])
    got = run([a, b], [g1, g2])
    want = torch.tensor([[(1 * 1 + 3 * 3) / 4, 1.0], [(3 * 1 + 1 * 3) / 4, 6.0]])
    torch.testing.assert_close(got, want)
    assert torch.isfinite(got).all()


def test_a_singular_system_falls_back_to_the_plain_average():
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 6.0]])
    rank_one = torch.tensor([[1.0, 1.0], [1.0, 1.0]])  # x = (1, 1) only: alpha=1 leaves it singular
    got = run([a, b], [rank_one, rank_one], alpha=1.0)
    assert torch.isfinite(got).all()
    assert torch.equal(got, (a + b) / 2)


def test_tensors_without_grams_take_the_plain_average():
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    avg = ((a.double() + b.double()) / 2).float()
    assert torch.equal(run([a, b], [None, torch.eye(4)]), avg)  # one model lacks it
    norm_a, norm_b = torch.randn(4), torch.randn(4)
    inputs = MethodInputs((norm_a, norm_b), None, (MODEL, MODEL), "norm", statistics=(None, None))
    assert torch.equal(merge(inputs, RegMeanParams()), ((norm_a.double() + norm_b.double()) / 2).float())
    inputs = MethodInputs((a, b), None, (MODEL, MODEL), "w", statistics=None)
    assert torch.equal(merge(inputs, RegMeanParams()), avg)


def test_runs_repeat_bit_for_bit():
    xs, ws = activations(seed=5)
    args = ([w.float() for w in ws], [(x.T @ x).float() for x in xs], 0.9)
    assert torch.equal(run(*args).view(torch.int32), run(*args).view(torch.int32))


def test_specs_say_what_they_need():
    names = {s.name: s for s in SPECS}
    assert set(names) == {"regmean", "regmean_plus_plus"}
    assert all(s.statistics == "gram" and s.base == "none" and not s.rowwise and s.stream is None for s in SPECS)
    assert names["regmean"].statistics_flow == "own" and names["regmean_plus_plus"].statistics_flow == "merged"
    assert "plain average" in names["regmean"].summary


@given(seed=st.integers(0, 10_000), n=st.integers(1, 4), scale=st.floats(0.01, 100.0),
       alpha=st.floats(0.0, 1.0))
def test_model_order_and_a_common_gram_scale_do_not_matter(seed, n, scale, alpha):
    xs, ws = activations(n_models=n, tokens=12, d_in=4, d_out=3, seed=seed)
    weights = [w.float() for w in ws]
    grams = [(x.T @ x).float() for x in xs]
    got = run(weights, grams, alpha)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(run(weights[::-1], grams[::-1], alpha), got, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(run(weights, [g * scale for g in grams], alpha), got, rtol=1e-4, atol=1e-5)
