"""WUDI merging (arXiv:2503.08099, "Whoever Started the Interference Should End It"): per weight matrix, the merged
task vector that interferes least with each task on inputs its own task vector stands in for. No LLM merging tool
shipped it.

A linear layer's task vector tau_i (out x in) approximately spans the inputs it was fine-tuned on, so the paper
bounds task i's interference by ||(tau_m - tau_i) tau_i^T||_F and, for a 2-D weight with T task vectors, minimises

    L(tau_m) = sum_i ||(tau_m - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2

with Adam (betas 0.9, 0.999, eps 1e-8, no weight decay) from tau_m = sum_i tau_i, for `iterations` steps at
`learning_rate` (300 steps at 1e-5: the reference code's ViT settings). The gradient is closed-form,
dL/dtau_m = 2 (tau_m G - B) with u_i = tau_i / ||tau_i||_F, G = sum_i u_i^T u_i (in x in) and B = sum_i tau_i u_i^T u_i,
so a step costs one (out x in) @ (in x in) product and no autograd; the Adam update is written out in
torch.optim.Adam's order of operations. A zero task vector has a zero term and is left out of G and B. The minimiser
also solves tau_m G = B (a least-squares problem; the tests use that solve as the reference), but the paper stops
Adam early from the sum, which is the method. The merge is base + lambda * tau_m (the paper rescales nothing:
lambda = 1). Tensors that are not 2-D matrices (norms, biases) and embedding matrices take
base + lambda * mean task vector, as the reference code does for parameters it does not optimise. A fixed number of
float32 steps and no randomness: the same inputs give the same bits on the CPU; on a GPU the matrix products round
differently, so the result agrees within float32 tolerance, not bit for bit.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field, FiniteFloat

from mergelib.methods.base import WEIGHT_IGNORED, IgnoredWeight, MethodInputs, MethodSpec
from mergelib.methods.spectral import SpectralParams, is_matrix

ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, which the reference code keeps
ADAM_EPS = 1e-8


class WudiParams(SpectralParams):
    """lambda scales the merged task vector; iterations and learning_rate are Adam's step count and step size."""

    iterations: int = Field(300, ge=0)
    learning_rate: FiniteFloat = Field(1e-5, gt=0.0)


def normal_equations(taus: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """G = sum_i u_i^T u_i and B = sum_i tau_i G_i for u_i = tau_i / ||tau_i||_F, leaving out zero task vectors:
    the objective's gradient is 2 (tau_m G - B)."""
    cols = taus[0].shape[1]
    gram = torch.zeros(cols, cols, dtype=taus[0].dtype, device=taus[0].device)
    target = torch.zeros_like(taus[0])
    for tau in taus:
        norm = torch.linalg.matrix_norm(tau)
        if norm == 0:
            continue
        unit = tau / norm
        own = unit.T @ unit
        gram = gram + own
        target = target + tau @ own
    return gram, target


def objective(merged: torch.Tensor, taus: list[torch.Tensor]) -> torch.Tensor:
    """The paper's loss: sum_i ||(merged - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2 over the nonzero task vectors."""
    total = merged.new_zeros(())
    for tau in taus:
        norm_sq = torch.linalg.matrix_norm(tau) ** 2
        if norm_sq > 0:
            total = total + torch.linalg.matrix_norm((merged - tau) @ tau.T) ** 2 / norm_sq
    return total


def adam(start: torch.Tensor, gradient, iterations: int, learning_rate: float) -> torch.Tensor:
    """`iterations` Adam steps from `start` along gradient(x), in torch.optim.Adam's order of float operations."""
    beta1, beta2 = ADAM_BETAS
    x = start.clone()
    first = torch.zeros_like(x)
    second = torch.zeros_like(x)
    for step in range(1, iterations + 1):
        grad = gradient(x)
        first.lerp_(grad, 1 - beta1)
        second.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = learning_rate / (1 - beta1**step)
        denom = (second.sqrt() / math.sqrt(1 - beta2**step)).add_(ADAM_EPS)
        x.addcdiv_(first, denom, value=-step_size)
    return x


def wudi(taus: list[torch.Tensor], iterations: int, learning_rate: float) -> torch.Tensor:
    """The merged task vector of one matrix: Adam on the interference objective, from the sum of the task vectors."""
    gram, target = normal_equations(taus)
    start = torch.stack(taus).sum(dim=0)
    return adam(start, lambda x: 2 * (x @ gram - target), iterations, learning_rate)


def merge(inputs: MethodInputs, params: WudiParams) -> torch.Tensor:
    """base + lambda * the WUDI task vector for 2-D non-embedding matrices, else base + lambda * the mean task
    vector."""
    base = inputs.base
    if base is None:
        raise ValueError(f"{inputs.name}: wudi needs a base_model")
    taus = [x - base for x in inputs.tensors]
    if is_matrix(inputs.name, base):
        delta = wudi(taus, params.iterations, params.learning_rate)
    else:
        delta = torch.stack(taus).mean(dim=0)
    return base + delta * params.lambda_


SPECS = (
    MethodSpec(
        name="wudi",
        summary="WUDI merging: per matrix, Adam from the summed task vectors on sum_i ||(tau - tau_i) tau_i^T||^2 / "
                "||tau_i||^2, the interference each task vector predicts on its own inputs; "
                "1-D tensors and embeddings: base + lambda * mean task vector",
        paper="https://arxiv.org/abs/2503.08099",
        merge=merge,
        params=WudiParams,
        model_params=IgnoredWeight,
        ignored=WEIGHT_IGNORED,
        base="required",
        min_models=1,
    ),
)
