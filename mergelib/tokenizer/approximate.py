"""Embedding rows for tokens a model lacks, built from the rows of tokens it shares with a donor (tokensurgeon math).

Pure tensor math, no IO. Shapes: `targets` [B, Dd] are the donor's rows of the B tokens to approximate,
`donor_anchors` [N, Dd] and `model_anchors` [N, Dm] the rows of the N shared tokens in the donor's and the model's
matrix (same order). Methods that work in the donor's space find coefficients there and apply them to the model's
rows of the same shared tokens (Goddard & Fernandes Neto 2025, "Training-Free Tokenizer Transplantation via
Orthogonal Matching Pursuit", arXiv 2506.06607; OMP: Pati, Rezaiifar & Krishnaprasad 1993).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

METHODS = ("omp", "common_interpolation", "subword", "mean", "zero", "randn")
DONOR_SPACE = ("omp", "common_interpolation")  # methods that read the donor's embedding matrices
WEIGHT_SCHEMES = ("distance_proportional", "barycentric", "least_squares")
SUBWORD_METHODS = ("mean", "sum", "weighted_mean", "first_last")
EPS = 1e-8


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(EPS)


def omp(targets: torch.Tensor, donor_anchors: torch.Tensor, k: int, cosine: bool = False):
    """Orthogonal matching pursuit: per target, `k` anchors picked one at a time (the one whose row is most
    correlated with what the anchors so far leave unexplained; `cosine` compares unit rows, else raw dot
    products), coefficients re-fit by least squares over all picked anchors after each pick.
    Returns (anchor indices [B, k], coefficients [B, k]); k is capped at N."""
    k = min(k, donor_anchors.shape[0])
    t = targets.double()
    atoms = donor_anchors.double()  # [N, Dd]
    scoring = _unit(atoms) if cosine else atoms
    batch = torch.arange(t.shape[0])
    picked = torch.zeros((t.shape[0], atoms.shape[0]), dtype=torch.bool)
    chosen = torch.empty((t.shape[0], k), dtype=torch.long)
    residual, coef = t, torch.zeros((t.shape[0], 0), dtype=torch.float64)
    for step in range(k):
        scores = (residual @ scoring.T).abs().masked_fill(picked, -1.0)  # [B, N]
        best = scores.argmax(dim=1)
        chosen[:, step] = best
        picked[batch, best] = True
        basis = atoms[chosen[:, : step + 1]]  # [B, s, Dd]
        coef = least_squares(basis, t)  # [B, s]
        residual = t - torch.einsum("bs,bsd->bd", coef, basis)
    return chosen, coef


def least_squares(basis: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Minimum-norm c [B, s] with c @ basis[b] closest to targets[b] (basis [B, s, D], rank-deficient allowed)."""
    solution = torch.linalg.lstsq(basis.transpose(1, 2), targets.unsqueeze(-1), driver="gelsd").solution
    return solution.squeeze(-1)


def neighbours(targets: torch.Tensor, donor_anchors: torch.Tensor, k: int, cosine: bool = False):
    """The `k` nearest anchors of each target (cosine similarity, or Euclidean distance) and their similarity
    (cosine) or distance (L2), both [B, k]; k is capped at N."""
    k = min(k, donor_anchors.shape[0])
    t, a = targets.double(), donor_anchors.double()
    if cosine:
        sim = _unit(t) @ _unit(a).T  # [B, N]
        values, idx = sim.topk(k, dim=1)
    else:
        dist = torch.cdist(t, a)  # [B, N]
        values, idx = dist.topk(k, dim=1, largest=False)
    return idx, values


def interpolation_weights(targets: torch.Tensor, donor_anchors: torch.Tensor, idx: torch.Tensor,
                          values: torch.Tensor, scheme: str, cosine: bool) -> torch.Tensor:
    """Weights [B, k] over each target's neighbours `idx`: distance_proportional (clamped cosine similarity, or
    inverse distance, normalised to sum 1), least_squares (unconstrained fit of the target), barycentric (the
    least-squares fit whose weights sum to 1)."""
    if scheme == "distance_proportional":
        raw = values.clamp_min(0.0) + EPS if cosine else 1.0 / (values + EPS)
        return raw / raw.sum(dim=1, keepdim=True)
    basis = donor_anchors.double()[idx]  # [B, k, Dd]
    t = targets.double()
    if scheme == "least_squares":
        return least_squares(basis, t)
    # barycentric: min ||w @ X - y|| s.t. sum(w) = 1, via the normal equations with a small ridge
    gram = basis @ basis.transpose(1, 2)  # [B, k, k]
    gram = gram + 1e-6 * gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(EPS)[:, None, None] * torch.eye(
        gram.shape[1], dtype=gram.dtype)
    rhs = (basis @ t.unsqueeze(-1)).squeeze(-1)  # [B, k]
    ones = torch.ones_like(rhs)
    free = torch.linalg.solve(gram, rhs)
    lift = torch.linalg.solve(gram, ones)
    shift = (1.0 - free.sum(dim=1, keepdim=True)) / lift.sum(dim=1, keepdim=True)
    return free + shift * lift


def combine(model_anchors: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Rows [B, Dm]: the weighted sums of the model's anchor rows `idx` [B, k] with `weights` [B, k]."""
    return torch.einsum("bk,bkd->bd", weights, model_anchors.double()[idx]).float()


def mean_row(model_matrix: torch.Tensor) -> torch.Tensor:
    """The model's mean row [Dm] (fp32 accumulation)."""
    return model_matrix.mean(dim=0, dtype=torch.float32)


def randn_rows(model_matrix: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` rows drawn from a normal with the model's per-column mean and standard deviation."""
    m = model_matrix.float()
    noise = torch.randn((count, m.shape[1]), generator=generator)
    return m.mean(dim=0) + noise * m.std(dim=0)


def subword_rows(pieces: Sequence[Sequence[tuple[int, int]]], model_matrix: torch.Tensor, method: str) -> torch.Tensor:
    """One row per token from the model's rows of the pieces its tokenizer splits the token's text into; each
    piece is (model row, length in bytes). mean, sum, weighted_mean (by byte length) or first_last (the mean of
    the first and last piece). A token with no pieces gets the model's mean row."""
    m = model_matrix.float()
    out = torch.empty((len(pieces), m.shape[1]))
    fallback = mean_row(m)
    for r, parts in enumerate(pieces):
        if not parts:
            out[r] = fallback
            continue
        rows = m[torch.tensor([p for p, _ in parts])]  # [n, Dm]
        if method == "sum":
            out[r] = rows.sum(dim=0)
        elif method == "weighted_mean":
            w = torch.tensor([max(n, 1) for _, n in parts], dtype=torch.float32)
            out[r] = (w[:, None] * rows).sum(dim=0) / w.sum()
        elif method == "first_last":
            out[r] = (rows[0] + rows[-1]) / 2
        else:
            out[r] = rows.mean(dim=0)
    return out
