"""Boolean masks for sparsified task arithmetic: TIES trim and sign election (arXiv:2306.01708), DARE drop
(arXiv:2311.03099), Model Breadcrumbs (arXiv:2312.06795), DELLA MAGPRUNE (arXiv:2406.11617), and mergekit's
whole-tensor L1 rescale. Selections rank |delta| with ties broken by flat index (the lower index ranks higher),
so the same tensor always gives the same mask. Random masks draw only from the generator they are given.

These are the whole-tensor forms of the rules. Merges apply them over row blocks in the fused kernels
(`mergelib.methods.keep`, `mergelib.methods.fused`); the tests hold those to the masks here. DELLA's per-row
MAGPRUNE probability table is defined here, and ranked here by a sort (the fused kernel ranks without one).
"""

from __future__ import annotations

import numpy as np
import torch

from mergelib.methods import fused, torch_kernels
from mergelib.methods.select import top_k_mask


def sign_consensus(weighted: torch.Tensor) -> torch.Tensor:
    """TIES sign election over `weighted` [N, ...] = stacked w_i*delta_i.

    The elected sign is + where the sum over models is >= 0, else -; the mask is True where an entry has the
    elected sign. Zero entries (pruned or unchanged) never count.
    """
    elected = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(weighted.dtype)  # [...], broadcasts over models
    # x * (+-1) > 0 exactly when x is non-zero with the elected sign (a product with +-1 is exact)
    return torch.mul(weighted, elected) > 0  # [N, ...] bool


def magnitude_mask(delta: torch.Tensor, density: float, *, absolute: bool = False) -> torch.Tensor:
    """TIES trim: keep the k = floor(density*numel) largest |delta| over the whole flattened tensor.

    density >= 1 keeps everything. k == 0 keeps nothing (mergekit asserts k > 0 instead).
    """
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    k = int(density * delta.numel())  # mergekit's int(): floor for density >= 0
    magnitude = delta if absolute else delta.abs()  # absolute: `delta` already holds |delta| (saves a copy)
    return top_k_mask(magnitude.flatten(), k).view(delta.shape)


def draw_key(generator: torch.Generator) -> int:
    """A 63-bit key for `fused.uniform_at`, drawn from `generator` (one draw per random mask)."""
    return int(torch.randint(0, (1 << 63) - 1, (1,), generator=generator, dtype=torch.int64))


def _uniform(delta: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """U[0,1) draws shaped like `delta`: the counter-based stream of a key drawn from `generator`, element j of
    the flattened tensor getting draw j (so any block of the tensor can redraw its own values)."""
    key = draw_key(generator)
    if torch_kernels.active(delta):
        return torch_kernels.uniform(key, 0, delta.numel(), delta.device).view(delta.shape)
    draws = np.empty(delta.numel(), dtype=np.float32)
    fused.fill_uniform(key, 0, draws)
    return torch.from_numpy(draws).view(delta.shape)


def random_mask(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE drop: keep each element independently with probability `density` (U < density).

    density >= 1 keeps all and density <= 0 keeps none; neither draws from the generator.
    """
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    if density <= 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    return _uniform(delta, generator) < density


def outlier_mask(delta: torch.Tensor, density: float, gamma: float, *, absolute: bool = False) -> torch.Tensor:
    """Model Breadcrumbs: drop the n_top = floor(gamma*N) largest and the n_bot smallest |delta|.

    keep = floor(density*N) and n_bot = N - keep - n_top; when n_bot < 0 the top cut shrinks by that much.
    mergekit keeps sorted positions [n_bot:-n_top], which is empty when n_top == 0 (gamma = 0, or N < 1/gamma,
    e.g. every tensor under 100 elements at the default gamma): it zeroes the task vector. Here n_top == 0
    drops no top values and keeps the `keep` largest.
    """
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    n = delta.numel()
    n_keep, n_top = outlier_counts(n, density, gamma)
    n_bot = n - n_keep - n_top
    magnitude = (delta if absolute else delta.abs()).flatten()
    # Top-k masks are nested in one total order, so their difference is the band of ranks [n_top, n - n_bot).
    band = top_k_mask(magnitude, n - n_bot) & ~top_k_mask(magnitude, n_top)
    return band.view(delta.shape)


def outlier_counts(n: int, density: float, gamma: float) -> tuple[int, int]:
    """Breadcrumbs' (kept, dropped-from-the-top) counts for n elements: floor(density*n) and floor(gamma*n),
    the top cut shrunk when the two overlap (keep + top <= n)."""
    n_keep, n_top = int(density * n), int(gamma * n)
    return n_keep, min(n_top, n - n_keep)


def magprune_table(n: int, density: float, epsilon: float) -> torch.Tensor:
    """DELLA MAGPRUNE keep probability of each ascending rank r in a row of n: (density - eps) + 2*eps*r/(n-1)
    in float64, rounded to float32 ([n]; a one-element row gets density)."""
    ranks = torch.arange(n, dtype=torch.float64)
    rank_hat = ranks / (n - 1) if n > 1 else torch.full_like(ranks, 0.5)
    return ((density - epsilon) + 2 * epsilon * rank_hat).to(torch.float32)


def magprune_probabilities(magnitude_rows: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA MAGPRUNE keep probabilities of [R, n] rows of |delta|: `magprune_table` at the rank of |delta|
    ascending within each row, ties to the lower index (the higher rank). Each row on its own: any block of whole
    rows gives the same values. (The CPU merge ranks in `fused.magprune_keep`; this sort is its reference and
    the torch kernels' path.)"""
    n = magnitude_rows.shape[-1]
    # Position j in a descending stable sort has ascending rank n-1-j: ties give the lower index the higher rank.
    order = torch.sort(magnitude_rows, dim=-1, descending=True, stable=True).indices  # [R, n] int64
    p_by_position = magprune_table(n, density, epsilon).flip(0).to(magnitude_rows.device)  # [n]
    return torch.empty_like(magnitude_rows).scatter_(-1, order, p_by_position.expand_as(magnitude_rows))


def magprune_mask(delta: torch.Tensor, density: float, epsilon: float, generator: torch.Generator) -> torch.Tensor:
    """DELLA MAGPRUNE: per row, keep with the probability `magprune_probabilities` gives.

    Rows run along the last dimension; a 1-D tensor is one row (mergekit ranks along dim 1, which is the same
    for 1-D and 2-D tensors). density >= 1 keeps all and density <= 0 keeps none, without drawing; otherwise
    0 < density +- eps < 1.
    """
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    if density <= 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    if not (0 < density - epsilon and density + epsilon < 1):
        raise ValueError(f"density +- epsilon must lie in (0, 1), got density={density}, epsilon={epsilon}")
    n = delta.shape[-1] if delta.dim() > 0 else 1
    keep_prob = magprune_probabilities(delta.reshape(-1, n).abs(), density, epsilon)
    return _uniform(delta, generator) < keep_prob.view(delta.shape)


def l1_factor(delta: torch.Tensor, mask: torch.Tensor) -> float | None:
    """||delta||_1 / ||delta*mask||_1 (one scalar per tensor), or None when either is < 1e-7 (no rescale).

    This is mergekit's `rescale` (what users' recipes get), not the DARE/DELLA papers' per-element 1/p.
    |delta * mask| equals |delta| * mask exactly, so magnitudes may be passed for `delta`.
    """
    before = float(delta.abs().sum(dtype=torch.float64))
    after = float(torch.where(mask, delta.abs(), 0.0).sum(dtype=torch.float64))
    if before < 1e-7 or after < 1e-7:
        return None
    return before / after


def l1_rescale(delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`delta*mask` scaled by l1_factor (unscaled when the factor is None)."""
    masked = delta * mask
    factor = l1_factor(delta, mask)
    return masked if factor is None else masked * factor
