"""Spectral merges of task vectors, one weight matrix at a time: TSV-Merge (arXiv:2412.00081), Iso-C and Iso-CTS
(arXiv:2502.04959). No LLM merging tool shipped them.

For a 2-D weight with task vectors tau_i = theta_i - base (T of them, r = min(rows, cols)):
- iso_c: M = sum_i tau_i = U S V^T; the spectrum is flattened to its mean: delta = mean(S) U V^T.
- iso_cts: the top k of M's singular directions (k = int(r * common_space_fraction), moved so that r - k splits
  evenly over the tasks) form the common subspace; each task adds the top (r - k) / T directions of its task vector
  with the common subspace projected out (tau_i - U_k U_k^T tau_i); the stacked left and right directions are made
  orthonormal (each replaced by its polar factor), and the spectrum flattened: delta = mean(S*) U* V*^T.
- tsv: each tau_i keeps its top int(r / T) singular triplets; the stacked left and right vectors are replaced by
  their polar factors (decorrelating the tasks' subspaces) and delta = U_perp diag(S) V_perp^T.
The merge is base + lambda * delta. Tensors that are not 2-D matrices (norms, biases) and embedding matrices
(vocabulary rows: their SVD would cost the most and the papers leave them out) take the mean task vector instead:
base + lambda * mean_i tau_i. The SVDs are exact (LAPACK, float32), deterministic for the same inputs on the CPU; on
a GPU they agree within float32 rounding, not bit for bit.

`svd: randomized` (tsv, iso_cts) computes the truncated SVDs the papers keep only the top of (each task's top r/T,
Iso-CTS's task-specific (r - k)/T) with a randomized range finder (Halko, Martinsson & Tropp, arXiv:0909.4061):
k + 10 Gaussian probes drawn from the engine's per-tensor generator (seed, tensor name), 2 power iterations with QR
re-orthonormalisation, then an exact SVD of the small projected matrix. The polar factors and Iso-CTS's common
subspace (k = 0.8 r of the sum) stay exact: they need every direction, so there is nothing to truncate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from pydantic import ConfigDict, Field, FiniteFloat

from mergelib.methods.base import WEIGHT_IGNORED, IgnoredWeight, MethodInputs, MethodSpec, Params

_EMBEDDING_HINTS = ("embed_tokens", "lm_head", "wte", "word_embeddings", "embed_in", "embed_out", "tok_embeddings")


class SpectralParams(Params):
    """lambda scales the merged task vector (the papers' alpha / scaling factor)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    lambda_: FiniteFloat = Field(1.0, alias="lambda")


class TSVParams(SpectralParams):
    """Adds how the truncated SVDs are computed: exact (LAPACK) or randomized (see the module docstring)."""

    svd: Literal["exact", "randomized"] = "exact"


class IsoCTSParams(TSVParams):
    """Adds the share of the spectrum kept as the common subspace (the paper's default 0.8)."""

    common_space_fraction: float = Field(0.8, ge=0.0, le=1.0)


OVERSAMPLE = 10  # extra probes beyond k: the range finder's error bound tightens quickly with a few more
POWER_ITERATIONS = 2  # passes through A A^T: sharpen a slowly decaying spectrum


def truncated_svd(matrix: torch.Tensor, k: int,
                  generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top k singular triplets (U [m, k], S [k], Vh [k, n]): exact without a generator, else by a randomized
    range finder (exact too when k + OVERSAMPLE probes would not be fewer than min(m, n))."""
    m, n = matrix.shape
    probes = k + OVERSAMPLE
    if generator is None or probes >= min(m, n):
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u[:, :k], s[:k], vh[:k]
    omega = torch.randn(n, probes, generator=generator, dtype=torch.float32).to(matrix.device, matrix.dtype)
    q, _ = torch.linalg.qr(matrix @ omega)  # [m, probes]: an orthonormal basis of A's range, roughly
    for _ in range(POWER_ITERATIONS):
        w, _ = torch.linalg.qr(matrix.T @ q)  # [n, probes]
        q, _ = torch.linalg.qr(matrix @ w)
    ub, s, vh = torch.linalg.svd(q.T @ matrix, full_matrices=False)  # [probes, n]: small
    return (q @ ub)[:, :k], s[:k], vh[:k]


def _svd_generator(inputs_generator: torch.Generator | None, params: Params) -> torch.Generator | None:
    if getattr(params, "svd", "exact") == "exact":
        return None
    if inputs_generator is None:
        raise ValueError("svd: randomized needs the engine's per-tensor generator (MethodInputs.generator)")
    return inputs_generator


def is_matrix(name: str, tensor: torch.Tensor) -> bool:
    """Whether the spectral rule applies: a 2-D weight that is not a vocabulary matrix."""
    return tensor.dim() == 2 and min(tensor.shape) > 1 and not any(h in name for h in _EMBEDDING_HINTS)


def polar(matrix: torch.Tensor) -> torch.Tensor:
    """The orthonormal polar factor P Q^T of matrix = P S Q^T: the nearest matrix with orthonormal columns/rows."""
    try:
        p, _, q = torch.linalg.svd(matrix, full_matrices=False)
    except torch.linalg.LinAlgError:  # LAPACK's divide and conquer did not converge: the Gram route instead
        return polar_by_gram(matrix)
    return p @ q


def polar_by_gram(matrix: torch.Tensor) -> torch.Tensor:
    """The polar factor as M (M^T M)^(-1/2) (wide M: (M M^T)^(-1/2) M), through a float64 eigendecomposition; the
    fallback for matrices LAPACK's SVD fails on (seen on a 4096 x 4095 stack of randomized singular vectors)."""
    m = matrix.double()
    tall = m.shape[0] >= m.shape[1]
    gram = m.T @ m if tall else m @ m.T
    w, q = torch.linalg.eigh(gram)
    inverse_root = (q * w.clamp(min=torch.finfo(torch.float64).tiny).rsqrt()) @ q.T
    return (m @ inverse_root if tall else inverse_root @ m).to(matrix.dtype)


def iso_c(taus: list[torch.Tensor]) -> torch.Tensor:
    """mean(S) U V^T of the summed task vectors."""
    total = torch.stack(taus).sum(dim=0)
    u, s, v = torch.linalg.svd(total, full_matrices=False)
    return (u * s.mean()) @ v


def common_size(rank: int, tasks: int, fraction: float) -> int:
    """Iso-CTS's common subspace size: int(rank * fraction), moved so the rest splits evenly over the tasks."""
    common = int(rank * fraction)
    specific = round((rank - common) / tasks) * tasks
    return max(0, rank - min(specific, rank))


def iso_cts(taus: list[torch.Tensor], fraction: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Common top directions of the sum plus each task's top directions outside them, orthonormalised, with a
    flat spectrum."""
    total = torch.stack(taus).sum(dim=0)
    rank = min(total.shape)
    k = common_size(rank, len(taus), fraction)
    per_task = (rank - k) // len(taus)
    if k == 0 and per_task == 0:  # more tasks than directions and no common share: keep the whole common space
        k = rank
    u, s, v = torch.linalg.svd(total, full_matrices=False)
    us, ss, vs = [u[:, :k]], [s[:k]], [v[:k]]
    for tau in taus:
        if per_task == 0:
            break
        specific = tau - u[:, :k] @ (u[:, :k].T @ tau)
        ut, st, vt = truncated_svd(specific, per_task, generator)
        us.append(ut)
        ss.append(st)
        vs.append(vt)
    spectrum = torch.cat(ss)
    return (polar(torch.cat(us, dim=1)) * spectrum.mean()) @ polar(torch.cat(vs, dim=0))


def tsv(taus: list[torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
    """Each task's top int(r/T) singular triplets, stacked, with orthonormalised left and right vectors."""
    keep = int(min(taus[0].shape) / len(taus))
    if keep == 0:
        return torch.stack(taus).mean(dim=0)  # fewer directions than tasks: nothing to stack
    us, ss, vs = [], [], []
    for tau in taus:
        u, s, v = truncated_svd(tau, keep, generator)
        us.append(u)
        ss.append(s)
        vs.append(v)
    return (polar(torch.cat(us, dim=1)) * torch.cat(ss)) @ polar(torch.cat(vs, dim=0))


def _merge(rule: Callable[[list[torch.Tensor], Params, torch.Generator | None], torch.Tensor], inputs: MethodInputs,
           params: SpectralParams) -> torch.Tensor:
    base = inputs.base
    if base is None:
        raise ValueError(f"{inputs.name}: spectral methods need a base_model")
    taus = [x - base for x in inputs.tensors]
    if is_matrix(inputs.name, base):
        delta = rule(taus, params, _svd_generator(inputs.generator, params))
    else:
        delta = torch.stack(taus).mean(dim=0)
    return base + delta * params.lambda_


def _spec(name: str, summary: str, paper: str, rule, params: type[SpectralParams] = SpectralParams,
          randomized: bool = False) -> MethodSpec:
    from functools import partial

    return MethodSpec(
        name=name,
        summary=summary + "; 1-D tensors and embeddings: base + lambda * mean task vector",
        paper=paper,
        merge=partial(_merge, rule),
        params=params,
        model_params=IgnoredWeight,
        ignored=WEIGHT_IGNORED,
        base="required",
        min_models=1,
        randomized=randomized,  # a generator per tensor, drawn from only with svd: randomized
    )


SPECS = (
    _spec("tsv", "Task Singular Vectors: each task's top 1/T singular triplets, decorrelated (TSV-Merge)",
          "https://arxiv.org/abs/2412.00081", lambda taus, p, g: tsv(taus, g), TSVParams, randomized=True),
    _spec("iso_c", "Isotropic merge in the common subspace: the summed task vectors' spectrum made flat",
          "https://arxiv.org/abs/2502.04959", lambda taus, p, g: iso_c(taus)),
    _spec("iso_cts", "Isotropic merge in common and task-specific subspaces (Iso-CTS)",
          "https://arxiv.org/abs/2502.04959", lambda taus, p, g: iso_cts(taus, p.common_space_fraction, g),
          IsoCTSParams, randomized=True),
)
