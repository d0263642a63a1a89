"""What a merge method is: pure tensor math over aligned inputs, plus its validated parameter models.

A method never does IO, dtype policy or RNG seeding: the engine hands it float32 tensors of one shape
and, for randomized methods, a generator seeded by (seed, tensor name) (see `mergelib.merging.rng`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict


class Params(BaseModel):
    """Base of every method's parameter model: unknown names are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoParams(Params):
    """A method (or scope) that takes no parameters."""


class IgnoredWeight(Params):
    """Per-model parameters of a method that takes none but, like mergekit, accepts a `weight` and ignores it
    (mergekit's own test recipes give every model one). The planner reports it as ignored."""

    weight: float | None = None


WEIGHT_IGNORED = (("weight", "it weights the models by its own rule, not by a per-model weight"),)


# How a method uses `base_model`:
#   required: must be given; passed as `MethodInputs.base`, never inside `tensors`.
#   optional: used as `MethodInputs.base` when given (e.g. nuslerp/multislerp work on task vectors then).
#   input:    when given, the base joins `tensors` as one more input model (linear, karcher).
#   none:     ignored (passthrough).
BaseRole = Literal["required", "optional", "input", "none"]


@dataclass(frozen=True)
class MethodInputs:
    """Everything a method sees for one output tensor."""

    tensors: tuple[torch.Tensor, ...]  # one per non-base input, float32, identical shapes, recipe order
    base: torch.Tensor | None  # float32, same shape, or None
    model_params: tuple[Params, ...]  # per-model parameters, aligned with `tensors`
    name: str  # output tensor name (for messages; randomness is already in `generator`)
    generator: torch.Generator | None = None  # set only for methods with randomized=True
    # Per input model (aligned with `tensors`): its statistic for this tensor (see `MethodSpec.statistics`), or
    # None where the model has none for it (embeddings, norms); None altogether for methods that use none.
    statistics: tuple[torch.Tensor | None, ...] | None = None


@dataclass(frozen=True)
class StreamInputs:
    """Lazy, row-block access to one output tensor's inputs, for tensors too large to hold every input whole.

    `read(i, start, end)` returns rows [start, end) of input i as float32 (i = -1 is the base); the engine may hand
    out the same tensor again for the same rows (blocks it keeps between passes), so rows are read, never modified.
    `emit(start, rows)` hands finished output rows to the writer. Results must equal the method's `merge` on whole
    tensors, bit for bit.
    """

    shape: tuple[int, ...]
    n_models: int
    read: Callable[[int, int, int], torch.Tensor]
    emit: Callable[[int, torch.Tensor], None]
    model_params: tuple[Params, ...]
    name: str
    generator: torch.Generator | None
    chunk_rows: int  # rows per block the engine suggests (bounded block memory)


@dataclass(frozen=True)
class MethodSpec:
    """One registered merge method: its name (mergekit's), math, parameter models and input rules."""

    name: str
    summary: str
    paper: str
    merge: Callable[[MethodInputs, Params], torch.Tensor]
    params: type[Params] = NoParams  # global parameters: one value per output tensor
    model_params: type[Params] = NoParams  # per-model parameters: one value per (model, tensor)
    base: BaseRole = "required"
    min_models: int = 1  # non-base inputs (after a base with role "input" joins them)
    max_models: int | None = None
    randomized: bool = False
    # Optional cross-model check run by the planner for every tensor before any weight is read
    # (e.g. "weights sum to zero"); raise ValueError with a one-line message naming the parameter.
    check: Callable[[Params, tuple[Params, ...]], None] | None = None
    # Memory for large tensors (the engine picks whole / rows / stream by size):
    #   rowwise: output rows depend only on the same input rows (elementwise methods): `merge` runs per row block.
    #   stream:  passes over the row blocks of StreamInputs (tensor-level statistics first, then the result).
    rowwise: bool = False
    stream: Callable[[StreamInputs, Params], None] | None = None
    # Parameters accepted (mergekit accepts them) that change nothing here: (name, why); a recipe that sets one
    # is merged with a warning and the name recorded in the run's `ignored_params`.
    ignored: tuple[tuple[str, str], ...] = ()
    # Whether the torch kernels (GPU, `--device cuda`) give the same bytes as the CPU: elementwise float32 in a
    # fixed order. Methods with reductions (norms, dot products, SVDs) agree within 1e-6 relative instead.
    device_exact: bool = False
    # Data-aware methods: the statistic each input model contributes per weight (mergelib.calibration.store):
    #   gram:   float32 [in, in], the sum of x x^T over the calibration tokens of the Linear's input x
    #   fisher: float32 of the weight's shape, the sum over calibration sequences of squared gradients
    # The engine merges such tensors whole and hands the statistics in `MethodInputs.statistics`.
    statistics: Literal["gram", "fisher"] | None = None
    # Where the calibration activations come from: each model's own layers ("own", RegMean), or the merged layers
    # below the one measured ("merged", RegMean++).
    statistics_flow: Literal["own", "merged"] = "own"
    # Whether, on the CPU kernels, the method takes bf16/fp16 inputs as stored (MethodInputs.tensors and
    # StreamInputs.read give them unwidened) and widens each element as its kernels read it: no widening pass,
    # half the bytes held between passes.
    reads_stored: bool = False
    # Trims by one magnitude cut per input model over all its tensors (TIES as published): before any tensor is
    # merged, a pre-pass over every task vector (`mergelib.merging.global_pass`) sets each per-model `kept`.
    global_top_k: bool = False


ZERO_SUM_RTOL = 1e-6  # a weight sum below this fraction of the sum of |weights| cannot be normalised


def require_nonzero_weight_sum(model_params: tuple[Params, ...], flag: str) -> None:
    """ValueError when the per-model weights sum to (about) 0, for methods that divide by that sum under `flag`."""
    weights = [p.weight for p in model_params]
    total = math.fsum(weights)
    if abs(total) <= ZERO_SUM_RTOL * math.fsum(abs(w) for w in weights):
        raise ValueError(
            f"weight: weights sum to {total:g} with {flag}: true; give weights with a nonzero sum or set {flag}: false"
        )
