"""Generalized task arithmetic: sparsify each task vector, optionally elect signs (TIES), take the weighted sum.

Task arithmetic (arXiv:2212.04089), TIES (arXiv:2306.01708), DARE (arXiv:2311.03099), Model Breadcrumbs
(arXiv:2312.06795), DELLA (arXiv:2406.11617). Names, parameters and defaults are mergekit's; `rescale` is
mergekit's whole-tensor L1 rescale, not the DARE/DELLA papers' per-element 1/p (recipes expect mergekit's
numbers). Breadcrumbs keeps the top values when the outlier count rounds to 0 (mergekit zeroes the tensor).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from pydantic import ConfigDict, Field, FiniteFloat, create_model, model_validator

from mergelib.methods import masks
from mergelib.methods.base import MethodInputs, MethodSpec, Params, StreamInputs


class GTAParams(Params):
    """Global parameters of the family; each method gets a subclass with its own normalize/rescale defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    # Accepted for mergekit recipes; it changes memory only, and masks here are always 1-byte bool anyway.
    int8_mask: bool = False
    normalize: bool = False  # divide by the sum of weights (of the models agreeing in sign, with consensus)
    rescale: bool = False  # L1-rescale each sparsified task vector to its original L1 norm
    lambda_: FiniteFloat = Field(1.0, alias="lambda")  # scales the merged task vector, after normalize


class GTAModelParams(Params):
    """Per-model parameters: weight (required) and density (kept fraction; ignored by task_arithmetic)."""

    weight: FiniteFloat
    density: float = Field(1.0, ge=0.0, le=1.0)


class BreadcrumbsModelParams(GTAModelParams):
    """Adds gamma: the fraction of largest-|delta| outliers dropped."""

    gamma: float = Field(0.01, ge=0.0, le=1.0)


class DellaModelParams(GTAModelParams):
    """Adds epsilon: keep probabilities spread over density +- epsilon by magnitude rank."""

    epsilon: float = Field(0.15, ge=0.0)

    @model_validator(mode="after")
    def _band_inside_unit_interval(self) -> DellaModelParams:
        if 0 < self.density < 1 and not (0 < self.density - self.epsilon and self.density + self.epsilon < 1):
            raise ValueError(
                f"density +- epsilon must lie strictly inside (0, 1), got density={self.density}, "
                f"epsilon={self.epsilon}; lower epsilon or move density away from 0 and 1"
            )
        return self


# A sparsifier turns one task vector into its keep mask (bool, same shape). Every one depends on |delta| only,
# so the streamed path hands them the magnitudes (`absolute=True`) and keeps a single float buffer.
Sparsifier = Callable[..., torch.Tensor]


def _seeded(generator: torch.Generator | None) -> torch.Generator:
    if generator is None:
        raise ValueError("a randomized GTA method needs MethodInputs.generator (the engine sets it)")
    return generator


def _magnitude(delta: torch.Tensor, p: GTAModelParams, generator: torch.Generator | None,
               absolute: bool = False) -> torch.Tensor:
    return masks.magnitude_mask(delta, p.density, absolute=absolute)


def _random(delta: torch.Tensor, p: GTAModelParams, generator: torch.Generator | None,
            absolute: bool = False) -> torch.Tensor:
    return masks.random_mask(delta, p.density, _seeded(generator))


def _outliers(delta: torch.Tensor, p: BreadcrumbsModelParams, generator: torch.Generator | None,
              absolute: bool = False) -> torch.Tensor:
    return masks.outlier_mask(delta, p.density, p.gamma, absolute=absolute)


def _magprune(delta: torch.Tensor, p: DellaModelParams, generator: torch.Generator | None,
              absolute: bool = False) -> torch.Tensor:
    return masks.magprune_mask(delta, p.density, p.epsilon, _seeded(generator))


def _merge(sparsify: Sparsifier | None, consensus: bool, inputs: MethodInputs, params: GTAParams) -> torch.Tensor:
    """base + lambda * [sum_i w_i m_i s_i(delta_i)] / [sum_i w_i m_i if normalize], delta_i = theta_i - base.

    s_i is the sparsifier (times the L1 rescale when `rescale`), m_i the sign-consensus mask (all ones without
    consensus). A zero divisor counts as 1; without consensus so does |sum w| < 1e-8 (mergekit's guards).
    Memory: one [N, ...] float stack of weighted task vectors, plus bool masks.
    """
    base = inputs.base
    if base is None:
        raise ValueError(f"{inputs.name}: GTA methods need a base_model")
    if not inputs.tensors:
        return base.clone()
    weighted = torch.empty((len(inputs.tensors), *base.shape), dtype=base.dtype, device=base.device)  # [N, ...]
    for i, (tensor, p) in enumerate(zip(inputs.tensors, inputs.model_params, strict=True)):
        delta = torch.sub(tensor, base, out=weighted[i])  # built in place: w_i * s_i(delta_i), one buffer
        if sparsify is not None and p.density < 1:  # density 1 keeps everything for every sparsifier
            mask = sparsify(delta, p, inputs.generator)
            factor = masks.l1_factor(delta, mask) if params.rescale else None
            delta.masked_fill_(mask.logical_not_(), 0.0)  # the mask is not needed after this
            if factor is not None:
                delta.mul_(factor)
        delta.mul_(p.weight)
    return _combine(weighted, inputs.model_params, consensus, params, base)


def _combine(
    weighted: torch.Tensor, model_params: tuple, consensus: bool, params: GTAParams, base: torch.Tensor
) -> torch.Tensor:
    """Sign election, normalisation, lambda and the base, over `weighted` [N, ...] = w_i * sparsified delta_i.

    Every step is per element, so row blocks of `weighted` give the same bits as the whole tensor.
    """
    weights = [p.weight for p in model_params]
    if consensus:
        agree = masks.sign_consensus(weighted)  # [N, ...] bool
        weighted.masked_fill_(agree.logical_not(), 0.0)
        divisor = torch.zeros_like(base)
        for weight, model_agrees in zip(weights, agree):  # a loop over models keeps temporaries at one tensor
            divisor.add_(model_agrees, alpha=weight)
        del agree
        divisor.masked_fill_(divisor == 0, 1.0)
    else:
        total = sum(weights)
        divisor = total if abs(total) >= 1e-8 else 1.0
    merged = weighted.sum(dim=0)
    del weighted
    if params.normalize:
        merged /= divisor
    if params.lambda_ != 1:
        merged *= params.lambda_
    return base + merged


def _stream(sparsify: Sparsifier | None, consensus: bool, inputs: StreamInputs, params: GTAParams) -> None:
    """`_merge` for tensors too large to hold every input: the same bits with far less memory.

    Phase 1, one model at a time: the whole task vector (its selection is tensor-wide), its keep mask (bool) and
    its L1 rescale factor. Phase 2, per row block: re-read the rows, apply masks and factors, `_combine`.
    Peak: one float32 |task vector| and its selection temporaries (about 9 bytes per element), plus one bool mask
    per model.
    """
    shape, step = inputs.shape, max(1, inputs.chunk_rows)
    rows = shape[0]
    if inputs.n_models == 0:
        for start in range(0, rows, step):
            inputs.emit(start, inputs.read(-1, start, min(rows, start + step)))
        return
    kept: list[torch.Tensor | None] = []
    factors: list[float | None] = []
    for i, p in enumerate(inputs.model_params):
        if sparsify is None or p.density >= 1:
            kept.append(None)
            factors.append(None)
            continue
        magnitude = torch.empty(shape, dtype=torch.float32)  # |delta_i|: all a sparsifier and the L1 norms need
        for start in range(0, rows, step):
            end = min(rows, start + step)
            block = magnitude[start:end]
            torch.sub(inputs.read(i, start, end), inputs.read(-1, start, end), out=block)
            block.abs_()
        mask = sparsify(magnitude, p, inputs.generator, absolute=True)
        factor = None
        if params.rescale:
            factor = masks.l1_factor(magnitude, mask)
        del magnitude
        kept.append(mask)
        factors.append(factor)
    for start in range(0, rows, step):
        end = min(rows, start + step)
        base = inputs.read(-1, start, end)
        weighted = torch.empty((inputs.n_models, *base.shape), dtype=torch.float32)  # [N, rows, ...]
        for i, p in enumerate(inputs.model_params):
            delta = inputs.read(i, start, end) - base
            if kept[i] is not None:
                delta.masked_fill_(kept[i][start:end].logical_not(), 0.0)
                if factors[i] is not None:
                    delta.mul_(factors[i])
            torch.mul(delta, p.weight, out=weighted[i])
        inputs.emit(start, _combine(weighted, inputs.model_params, consensus, params, base))


def _spec(
    name: str,
    summary: str,
    paper: str,
    sparsify: Sparsifier | None,
    consensus: bool,
    *,
    normalize: bool,
    rescale: bool,
    model_params: type[GTAModelParams] = GTAModelParams,
) -> MethodSpec:
    params = create_model(
        "".join(part.title() for part in name.split("_")) + "Params",
        __base__=GTAParams,
        __module__=__name__,
        __doc__=f"Global parameters of {name} (normalize={normalize}, rescale={rescale} by default).",
        normalize=(bool, normalize),
        rescale=(bool, rescale),
    )
    return MethodSpec(
        name=name,
        summary=summary,
        paper=paper,
        merge=partial(_merge, sparsify, consensus),
        stream=partial(_stream, sparsify, consensus),
        params=params,
        model_params=model_params,
        base="required",
        min_models=1,
        randomized=sparsify in (_random, _magprune),
    )


_TASK_ARITHMETIC = "https://arxiv.org/abs/2212.04089"
_TIES = "https://arxiv.org/abs/2306.01708"
_DARE = "https://arxiv.org/abs/2311.03099"
_BREADCRUMBS = "https://arxiv.org/abs/2312.06795"
_DELLA = "https://arxiv.org/abs/2406.11617"

SPECS = (
    _spec("task_arithmetic", "base + lambda * weighted sum of task vectors", _TASK_ARITHMETIC, None, False,
          normalize=False, rescale=False),
    _spec("ties", "top-k magnitude trim, sign election, disjoint weighted mean", _TIES, _magnitude, True,
          normalize=True, rescale=False),
    _spec("dare_ties", "random drop with L1 rescale, then TIES sign election", _DARE, _random, True,
          normalize=False, rescale=True),
    _spec("dare_linear", "random drop with L1 rescale, then weighted sum", _DARE, _random, False,
          normalize=False, rescale=True),
    _spec("breadcrumbs", "drop largest outliers and smallest values, then weighted sum", _BREADCRUMBS, _outliers,
          False, normalize=False, rescale=False, model_params=BreadcrumbsModelParams),
    _spec("breadcrumbs_ties", "Breadcrumbs trim, then TIES sign election", _BREADCRUMBS, _outliers, True,
          normalize=False, rescale=False, model_params=BreadcrumbsModelParams),
    _spec("della", "magnitude-ranked random drop (MAGPRUNE), L1 rescale, sign election", _DELLA, _magprune, True,
          normalize=True, rescale=True, model_params=DellaModelParams),
    _spec("della_linear", "MAGPRUNE with L1 rescale, then weighted sum", _DELLA, _magprune, False,
          normalize=False, rescale=True, model_params=DellaModelParams),
)
