"""Generalized task arithmetic: sparsify each task vector, optionally elect signs (TIES), take the weighted sum.

Task arithmetic (arXiv:2212.04089), TIES (arXiv:2306.01708), DARE (arXiv:2311.03099), Model Breadcrumbs
(arXiv:2312.06795), DELLA (arXiv:2406.11617). Names, parameters and defaults are mergekit's; `rescale` is
mergekit's whole-tensor L1 rescale, not the DARE/DELLA papers' per-element 1/p (recipes expect mergekit's
numbers). `ties` is mergekit's (top-k per tensor, weighted); `ties_paper` is the paper's (one top-k over every
tensor of each model, unweighted disjoint mean, density 0.2). Breadcrumbs keeps the top values when the outlier count rounds to 0 (mergekit zeroes the tensor).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from pydantic import ConfigDict, Field, FiniteFloat, create_model, model_validator

from mergelib.methods import fused, keep, masks, torch_kernels
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


class TiesPaperModelParams(GTAModelParams):
    """TIES as published: density is the share kept over the whole model (the paper's k, 20% by default), weight
    defaults to 1 (the paper's disjoint mean is unweighted). `kept` is set by the model-wide pre-pass
    (`mergelib.methods.global_topk`), never by a recipe."""

    weight: FiniteFloat = 1.0
    density: float = Field(0.2, ge=0.0, le=1.0)
    kept: int | None = Field(None, ge=0, exclude=True)  # internal: not listed by `mergelib methods`


# A sparsifier decides how one model's task vector is thinned: a keep rule (see `mergelib.methods.keep`) from
# its parameters, the tensor's size and the generator. Random rules draw their key here, in model order.
Sparsifier = Callable[["keep.Blocks", int, GTAModelParams, "torch.Generator | None"], keep.Rule]


def _seeded(generator: torch.Generator | None) -> torch.Generator:
    if generator is None:
        raise ValueError("a randomized GTA method needs MethodInputs.generator (the engine sets it)")
    return generator


def _magnitude(blocks: keep.Blocks, i: int, p: GTAModelParams, generator: torch.Generator | None) -> keep.Rule:
    return keep.Band(int(p.density * blocks.numel))  # mergekit's int(): floor; k = 0 keeps nothing


def _global_magnitude(blocks: keep.Blocks, i: int, p: TiesPaperModelParams,
                      generator: torch.Generator | None) -> keep.Rule:
    """This tensor's share of the model-wide top-k; a tensor merged on its own is a model of one tensor."""
    return keep.Band(p.kept if p.kept is not None else int(p.density * blocks.numel))


def _random(blocks: keep.Blocks, i: int, p: GTAModelParams, generator: torch.Generator | None) -> keep.Rule:
    if p.density <= 0:
        return keep.Band(0)  # keeps nothing, draws nothing
    return keep.Random(masks.draw_key(_seeded(generator)), p.density)


def _outliers(blocks: keep.Blocks, i: int, p: BreadcrumbsModelParams, generator: torch.Generator | None) -> keep.Rule:
    n_keep, n_top = masks.outlier_counts(blocks.numel, p.density, p.gamma)
    return keep.Band(n_keep + n_top, n_top)


def _magprune(blocks: keep.Blocks, i: int, p: DellaModelParams, generator: torch.Generator | None) -> keep.Rule:
    if p.density <= 0:
        return keep.Band(0)
    if len(blocks.shape) >= 2:  # rows along the last dimension are whole in every block: decided block by block
        return keep.Ranked(p.density, p.epsilon, masks.draw_key(_seeded(generator)), blocks.shape[-1])
    device = blocks.read(-1, 0, 1).device  # a 1-D tensor is one row: its ranks need the whole |delta_i|
    magnitude = torch.empty(blocks.shape, dtype=torch.float32, device=device)
    for start, end, _ in blocks.ranges():
        torch.sub(blocks.read(i, start, end), blocks.read(-1, start, end), out=magnitude[start:end]).abs_()
    return keep.Explicit(masks.magprune_mask(magnitude, p.density, p.epsilon, _seeded(generator)))


def _run(sparsify: Sparsifier | None, consensus: bool, blocks: keep.Blocks, model_params: tuple,
         generator: torch.Generator | None, params: GTAParams, emit: Callable[[int, torch.Tensor], None]) -> None:
    """base + lambda * [sum_i w_i m_i s_i(delta_i)] / [sum_i w_i m_i if normalize], delta_i = theta_i - base,
    emitted block by block.

    s_i is the sparsifier (times the L1 rescale when `rescale`), m_i the sign-consensus mask (all ones without
    consensus). A zero divisor counts as 1; without consensus so does |sum w| < 1e-8 (mergekit's guards).
    Passes over the blocks: the selections' radix passes (rank bands only), the L1 norms (rescale only), then
    one fused pass that writes the result. Memory: one block of every input.
    """
    if blocks.n_models == 0:
        for start, end, _ in blocks.ranges():
            emit(start, blocks.read(-1, start, end).to(torch.float32))
        return
    sparsified, rules = _rules(sparsify, blocks, model_params, generator)
    if any(isinstance(rule, keep.Explicit) for rule in rules):
        blocks = blocks.widened()  # those masks were made from float32 inputs outside the kernels
    arrays = keep.rule_arrays(blocks, rules)
    factors = keep.l1_factors(blocks, arrays, sparsified) if params.rescale and any(sparsified) else \
        np.ones(blocks.n_models, dtype=np.float32)
    weights = np.array([p.weight for p in model_params], dtype=np.float32)
    divisor = _divisor(model_params)
    lam = np.float32(params.lambda_)
    for start, end, offset in blocks.ranges():
        base, xs = blocks.inputs(start, end)
        out = np.empty(base.shape[0], dtype=np.float32)
        fused.gta_block(base, xs, offset, *arrays.args(offset, offset + base.shape[0], base, xs), factors, weights,
                        consensus, params.normalize, divisor, lam, out)
        emit(start, torch.from_numpy(out).view((end - start, *blocks.shape[1:])))


def _rules(sparsify: Sparsifier | None, blocks: keep.Blocks, model_params: tuple,
           generator: torch.Generator | None) -> tuple[list[bool], list[keep.Rule]]:
    """Which models are sparsified (density 1 keeps everything) and their keep rules, drawn in model order."""
    sparsified = [sparsify is not None and p.density < 1 for p in model_params]
    rules = [sparsify(blocks, i, p, generator) if on else None
             for i, (p, on) in enumerate(zip(model_params, sparsified))]
    return sparsified, rules


def _divisor(model_params: tuple) -> np.float32:
    """The normalising divisor without consensus: the sum of weights, 1 when it is about 0 (mergekit's guard)."""
    total = sum(p.weight for p in model_params)
    return np.float32(total if abs(total) >= 1e-8 else 1.0)


def _run_torch(sparsify: Sparsifier | None, consensus: bool, blocks: keep.Blocks, tensors: dict[int, torch.Tensor],
               model_params: tuple, generator: torch.Generator | None, params: GTAParams) -> torch.Tensor:
    """`_run` on whole tensors with torch ops, on the inputs' device: the same rules, draws and float32
    arithmetic, so the same bits (see `mergelib.methods.torch_kernels`)."""
    base = tensors[-1].reshape(-1)
    xs = [tensors[i].reshape(-1) for i in range(blocks.n_models)]
    if not xs:
        return base.clone()
    sparsified, rules = _rules(sparsify, blocks, model_params, generator)
    magnitudes = [(x - base).abs() if rule is not None else None for x, rule in zip(xs, rules)]
    keeps = [keep.torch_mask(rule, a) for rule, a in zip(rules, magnitudes)]
    factors = np.ones(blocks.n_models, dtype=np.float32)
    if params.rescale and any(sparsified):
        slots = [(torch_kernels.exact_slots(a), torch_kernels.exact_slots(torch.where(k, a, 0.0)))
                 if k is not None else ([0] * torch_kernels.EXACT_SLOTS,) * 2 for a, k in zip(magnitudes, keeps)]
        factors = keep.rescale_factors(slots, sparsified)
    weights = np.array([p.weight for p in model_params], dtype=np.float32)
    return torch_kernels.gta(base, xs, keeps, factors.tolist(), weights.tolist(), consensus, params.normalize,
                             float(_divisor(model_params)), float(np.float32(params.lambda_)))


def _merge(sparsify: Sparsifier | None, consensus: bool, inputs: MethodInputs, params: GTAParams) -> torch.Tensor:
    """The whole-tensor form of `_run`: the inputs as a single block."""
    base = inputs.base
    if base is None:
        raise ValueError(f"{inputs.name}: GTA methods need a base_model")
    shape = tuple(base.shape) or (1,)  # a 0-d tensor is one row of one element
    tensors = {-1: base.reshape(shape), **{i: t.reshape(shape) for i, t in enumerate(inputs.tensors)}}
    blocks = keep.Blocks(shape, len(inputs.tensors), lambda i, a, b: tensors[i][a:b].to(torch.float32), shape[0],
                         stored=lambda i, a, b: tensors[i][a:b])
    if torch_kernels.active(base):
        tensors = {i: t.to(torch.float32) for i, t in tensors.items()}
        out = _run_torch(sparsify, consensus, blocks, tensors, inputs.model_params, inputs.generator, params)
        return out.view(base.shape)
    out = keep.collect_rows(shape, lambda emit: _run(sparsify, consensus, blocks, inputs.model_params,
                                                     inputs.generator, params, emit))
    return out.view(base.shape)


def _stream(sparsify: Sparsifier | None, consensus: bool, inputs: StreamInputs, params: GTAParams) -> None:
    """`_merge` for tensors too large to hold every input: the same bits, re-reading row blocks per pass."""
    blocks = keep.Blocks(inputs.shape, inputs.n_models, lambda i, a, b: inputs.read(i, a, b).to(torch.float32),
                         inputs.chunk_rows, stored=inputs.read)
    _run(sparsify, consensus, blocks, inputs.model_params, inputs.generator, params, inputs.emit)


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
    global_top_k: bool = False,
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
        ignored=_ignored(sparsify),
        global_top_k=global_top_k,
        device_exact=True,  # torch_kernels: the same rules, draws and float32 order on any device
        reads_stored=True,  # the fused kernels widen bf16/fp16 as they read
    )


def _ignored(sparsify: Sparsifier | None) -> tuple[tuple[str, str], ...]:
    """What a GTA variant accepts from mergekit's shared schema and does not use."""
    out = [("int8_mask", "masks are 1-byte booleans here whatever it says; in mergekit it only saved memory")]
    if sparsify is None:
        out += [("density", "it keeps every element of each task vector (density applies to the sparsifying methods)"),
                ("rescale", "nothing is dropped, so there is nothing to rescale")]
    return tuple(out)


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
    _spec("ties_paper", "TIES as published: top-k over the whole model, sign election, disjoint mean", _TIES,
          _global_magnitude, True, normalize=True, rescale=False, model_params=TiesPaperModelParams,
          global_top_k=True),
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
