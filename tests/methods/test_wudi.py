"""WUDI merging against references written another way: the objective's minimiser from its normal equations
(float64 solve), torch.optim.Adam with autograd on the paper's loss, and the properties users rely on (zero task
vectors give the base, one task vector is its own optimum, fallbacks, the same bits again)."""

from __future__ import annotations

import pytest
import torch

from mergelib.methods import REGISTRY, MethodInputs
from mergelib.methods.base import IgnoredWeight
from mergelib.methods.wudi import normal_equations, objective, wudi

MATRIX = "model.layers.0.mlp.up_proj.weight"


def run(base, fts, tensor_name=MATRIX, **params):
    spec = REGISTRY["wudi"]
    inputs = MethodInputs(tuple(fts), base, tuple(IgnoredWeight() for _ in fts), tensor_name)
    return spec.merge(inputs, spec.params(**params))


def _taus(shape, n, seed, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]


def paper_loss(merged: torch.Tensor, taus: list[torch.Tensor]) -> torch.Tensor:
    """sum_i ||(merged - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2, elementwise over the stacked task vectors."""
    stacked = torch.stack(taus)
    weights = stacked.pow(2).sum(dim=(1, 2))
    products = torch.matmul(merged.unsqueeze(0) - stacked, stacked.transpose(1, 2))
    return (products.pow(2).sum(dim=(1, 2)) / weights).sum()


def closed_form(taus: list[torch.Tensor]) -> torch.Tensor:
    """The minimiser in float64: M (sum_i w_i tau_i^T tau_i) = sum_i w_i tau_i tau_i^T tau_i, w_i = 1/||tau_i||^2."""
    taus = [t.double() for t in taus]
    weights = [1.0 / t.pow(2).sum() for t in taus]
    lhs = sum(w * t.T @ t for w, t in zip(weights, taus))
    rhs = sum(w * t @ t.T @ t for w, t in zip(weights, taus))
    return torch.linalg.solve(lhs, rhs.T).T  # lhs is symmetric: M lhs = rhs <=> lhs M^T = rhs^T


def test_the_closed_form_gradient_is_the_paper_losss_gradient():
    taus = _taus((7, 5), 3, 1)
    merged = torch.randn(7, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64, requires_grad=True)
    paper_loss(merged, taus).backward()
    gram, target = normal_equations(taus)
    torch.testing.assert_close(2 * (merged.detach() @ gram - target), merged.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(objective(merged.detach(), taus), paper_loss(merged.detach(), taus))


@pytest.mark.parametrize("shape,n", [((6, 4), 2), ((5, 8), 3), ((8, 8), 3)])
def test_adam_descends_to_the_closed_form_minimum(shape, n):
    """Each checkpoint of one trajectory (fixed step size: k steps are the first k of any longer run) is no worse
    than the one before, and the last reaches the least-squares minimum."""
    taus = [t.float() for t in _taus(shape, n, 3)]
    exact = closed_form(taus)
    best = paper_loss(exact, [t.double() for t in taus]).item()
    losses = [paper_loss(wudi(taus, k, 1e-3).double(), [t.double() for t in taus]).item()
              for k in (0, 50, 100, 200, 400, 800, 1600, 3200, 6400)]
    assert losses[0] > best * 1.05  # the start (the sum) is not already optimal
    assert all(b <= a * (1 + 1e-6) for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] == pytest.approx(best, rel=1e-5)
    torch.testing.assert_close(wudi(taus, 6400, 1e-3).double(), exact, rtol=0, atol=1e-5)


def test_the_paper_settings_follow_torch_adam_on_the_paper_loss():
    """300 Adam steps at 1e-5 from the sum, as the reference code runs them with autograd."""
    taus = [t.float() for t in _taus((12, 10), 3, 4, scale=0.01)]
    merged = torch.nn.Parameter(torch.stack(taus).sum(dim=0))
    optimizer = torch.optim.Adam([merged], lr=1e-5)
    for _ in range(300):
        optimizer.zero_grad()
        paper_loss(merged, taus).backward()
        optimizer.step()
    base = torch.randn(12, 10, generator=torch.Generator().manual_seed(5))
    got = run(base, [base + t for t in taus])
    torch.testing.assert_close(got, base + merged.detach(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, base + torch.stack(taus).sum(dim=0), rtol=0, atol=1e-4)  # it did move


def test_zero_task_vectors_give_the_base_exactly():
    base = torch.randn(6, 5, generator=torch.Generator().manual_seed(6))
    assert torch.equal(run(base, [base.clone(), base.clone()]), base)
    assert torch.equal(run(base, [base.clone()], iterations=50, learning_rate=1e-2, **{"lambda": 0.5}), base)


@pytest.mark.parametrize("lam", [1.0, 0.7])
def test_one_task_vector_is_its_own_optimum(lam):
    """tau_m = tau_1 zeroes the gradient, so Adam never leaves the start: base + lambda * tau_1."""
    base = torch.randn(9, 6, generator=torch.Generator().manual_seed(7))
    ft = base + _taus((9, 6), 1, 8)[0].float()
    got = run(base, [ft], learning_rate=1e-2, **{"lambda": lam})
    torch.testing.assert_close(got, base + lam * (ft - base), rtol=0, atol=1e-7)
    tau = ft - base
    assert torch.equal(wudi([tau], 300, 1e-2), tau)


def test_a_model_equal_to_the_base_changes_no_matrix():
    """A zero task vector has a zero term: on a matrix, merging it in is merging the other alone."""
    base = torch.randn(8, 5, generator=torch.Generator().manual_seed(9))
    ft = base + _taus((8, 5), 1, 10)[0].float()
    torch.testing.assert_close(run(base, [ft, base.clone()]), run(base, [ft]), rtol=0, atol=0)


def test_no_iterations_is_task_arithmetic():
    base = torch.randn(7, 4, generator=torch.Generator().manual_seed(11))
    fts = [base + t.float() for t in _taus((7, 4), 3, 12)]
    expected = base + 0.5 * torch.stack([f - base for f in fts]).sum(dim=0)
    torch.testing.assert_close(run(base, fts, iterations=0, **{"lambda": 0.5}), expected, rtol=0, atol=0)


@pytest.mark.parametrize("tensor_name,shape", [("model.norm.weight", (7,)), ("model.embed_tokens.weight", (9, 4)),
                                               ("lm_head.weight", (9, 4)), ("model.layers.0.mlp.bias", (1, 6))])
def test_vectors_and_embeddings_take_the_mean_task_vector(tensor_name, shape):
    base = torch.randn(shape, generator=torch.Generator().manual_seed(13))
    fts = [base + t.float() for t in _taus(shape, 3, 14)]
    expected = base + 0.5 * torch.stack([f - base for f in fts]).mean(dim=0)
    torch.testing.assert_close(run(base, fts, tensor_name=tensor_name, **{"lambda": 0.5}), expected)


def test_the_same_inputs_give_the_same_bits():
    base = torch.randn(24, 16, generator=torch.Generator().manual_seed(15))
    fts = [base + t.float() for t in _taus((24, 16), 3, 16)]
    assert torch.equal(run(base, fts), run(base.clone(), [f.clone() for f in fts]))


def test_the_listing_names_the_fallback_and_the_defaults():
    spec = REGISTRY["wudi"]
    assert "embeddings" in spec.summary and "mean task vector" in spec.summary
    defaults = spec.params()
    assert (defaults.iterations, defaults.learning_rate, defaults.lambda_) == (300, 1e-5, 1.0)
    assert not spec.randomized and spec.base == "required"


@pytest.mark.parametrize("params,name", [({"iterations": -1}, "iterations"), ({"iterations": 2.5}, "iterations"),
                                         ({"learning_rate": 0.0}, "learning_rate"),
                                         ({"learning_rate": float("nan")}, "learning_rate"),
                                         ({"lambda": float("inf")}, "lambda"), ({"lr": 1e-3}, "lr")])
def test_bad_parameters_are_rejected_by_name(params, name):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=name):
        REGISTRY["wudi"].params(**params)
