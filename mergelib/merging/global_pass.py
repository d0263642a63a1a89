"""The model-wide pre-pass of methods that trim over every tensor of a model at once (`MethodSpec.global_top_k`,
TIES as published): reads every task vector twice before any tensor is merged and writes each tensor's share of
the model's top-k into its per-model parameters (`kept`). Inputs are read exactly as the merge reads them (working
dtype, crops, vocabulary alignment), block by block for tensors the plan streams.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

import torch

from mergelib.errors import RecipeError
from mergelib.merging.plan import MergePlan, TensorJob
from mergelib.methods.global_topk import kept_counts


def with_kept_counts(plan: MergePlan, magnitudes: Callable[[TensorJob], Iterator[tuple[int, torch.Tensor]]]
                     ) -> MergePlan:
    """`plan` with every job's per-model `kept` set so that the i-th model of the recipe keeps exactly
    int(density_i * its task vector's size) entries over all tensors with a base (ties: see `global_topk`).
    `magnitudes(job)` yields (position in the recipe's models, |delta| chunk) as the merge reads them (the engine's
    `task_vector_magnitudes`)."""
    jobs = {job.name: job for job in plan.jobs if job.base is not None and job.sources}
    n = max((len(job.sources) for job in jobs.values()), default=0)
    densities: list[set[float]] = [set() for _ in range(n)]
    sizes = [0] * n
    for job in jobs.values():
        for i, p in enumerate(job.model_params):
            densities[i].add(p.density)
            sizes[i] += job.numel
    for i, values in enumerate(densities):
        if len(values) > 1:
            raise RecipeError(
                f"density: {plan.method.name} trims each model over all its tensors at once, so model {i} needs one "
                f"density, got {len(values)} different values over its tensors; give it a single value"
            )
    ks = [int(next(iter(d)) * size) if d else 0 for d, size in zip(densities, sizes)]
    counts = kept_counts(list(jobs), ks, lambda name: magnitudes(jobs[name]))

    def counted(job: TensorJob) -> TensorJob:
        if job.name not in jobs:
            return job
        params = tuple(p.model_copy(update={"kept": counts[job.name][i]}) for i, p in enumerate(job.model_params))
        return replace(job, model_params=params)

    return replace(plan, jobs=tuple(counted(job) for job in plan.jobs))
