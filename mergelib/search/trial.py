"""One trial of a recipe search: merge the trial's recipe, score it on the validation prompts, maybe stop early.

The merge is the real one: `mergelib.merge` into a scratch directory removed afterwards (`disk`), or
`mergelib.merge_state_dicts` into a model kept for the process (`memory`: the same math bit for bit, for small
single-stage recipes). Inputs and the model skeleton are cached per process, so a worker pays their load once.
A job is plain data, so the same function runs in-process or as a Ray task.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergelib.merging.faults import failpoint
from mergelib.search.config import Objective

MEMORY_LIMIT_BYTES = 1 << 30  # auto: inputs up to this size in all are merged in memory
MEMORY_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source",
               "tokenizer", "chat_template", "name"}


@dataclass(frozen=True)
class TrialJob:
    """Everything a worker needs for one trial (picklable; model references are absolute paths)."""

    number: int
    recipe: dict[str, Any]
    seed: int
    objective: Objective
    parents_best: dict[str, float]  # task -> best parent's validation score (normalisation)
    prune_after: float | None  # share of prompts scored before asking whether to stop; None: no pruning
    merge_mode: str  # memory | disk
    scratch: str
    threads: int = 1
    split: str = "validation"


@dataclass
class TrialResult:
    """A trial's scores and where its time went."""

    number: int
    values: list[float] | None = None  # the objective(s); None when pruned
    scores: dict[str, float] = field(default_factory=dict)  # task -> exact match (all prompts, or the pruned part)
    partial: list[float] | None = None  # objective(s) on the first prompts (what pruning looked at)
    constraints: list[float] = field(default_factory=list)  # floor - score per floored task: <= 0 keeps it
    pruned: bool = False
    setup_s: float = 0.0
    merge_s: float = 0.0
    eval_s: float = 0.0


def objective_values(scores: Mapping[str, float], parents_best: Mapping[str, float],
                     objective: Objective) -> list[float]:
    """The objective(s) of task scores: per task share of the best parent's score (when normalising), then the
    weighted mean, the minimum, or one value per task (pareto, in task order)."""
    rel = shares(scores, parents_best, objective)
    if objective.aggregate == "pareto":
        return [rel[t] for t in sorted(objective.tasks)]
    if objective.aggregate == "min":
        return [min(rel.values())]
    total = sum(objective.tasks.values())
    return [sum(rel[t] * w for t, w in objective.tasks.items()) / total]


def shares(scores: Mapping[str, float], parents_best: Mapping[str, float], objective: Objective) -> dict[str, float]:
    """Task -> the score as the objective counts it: a share of the best parent's when normalising, else raw."""
    out = {}
    for task in objective.tasks:
        best = parents_best.get(task, 0.0)
        out[task] = scores[task] / best if objective.normalise and best > 0 else scores[task]
    return out


def constraint_values(scores: Mapping[str, float], parents_best: Mapping[str, float],
                      objective: Objective) -> list[float]:
    """Optuna's constraints of a trial: floor - share per floored task (in task order); all <= 0 is feasible."""
    rel = shares(scores, parents_best, objective)
    return [objective.floor[t] - rel[t] for t in sorted(objective.floor)]


def merge_mode(recipe: Mapping[str, Any], requested: str) -> str:
    """`memory` or `disk` for `requested` (auto: memory for a single-stage recipe without slices whose inputs are
    safetensors directories of at most MEMORY_LIMIT_BYTES in all)."""
    if requested != "auto":
        return requested
    if set(recipe) - MEMORY_KEYS or not isinstance(recipe.get("models"), list):
        return "disk"
    refs = [recipe.get("base_model"), *(m.get("model") for m in recipe["models"])]
    total = 0
    for ref in filter(None, refs):
        files = list(Path(ref).glob("*.safetensors")) if Path(ref).is_dir() else []
        if not files:
            return "disk"
        total += sum(f.stat().st_size for f in files)
    return "memory" if total <= MEMORY_LIMIT_BYTES else "disk"


class _ProcessCache:
    """Input state dicts, the model skeleton and tokenizer, loaded once per process."""

    def __init__(self):
        self.state_dicts: dict[str, dict] = {}
        self.models: dict[str, tuple] = {}

    def state_dict(self, ref: str) -> dict:
        if ref not in self.state_dicts:
            from safetensors.torch import load_file

            sd: dict = {}
            for path in sorted(Path(ref).glob("*.safetensors")):
                sd.update(load_file(path))
            self.state_dicts[ref] = sd
        return self.state_dicts[ref]

    def model(self, ref: str):
        """(model, tokenizer) built from `ref`'s config and tokenizer, for loading merged weights into."""
        if ref not in self.models:
            from mergelib.search.scorer import load_model

            self.models[ref] = load_model(ref)
        return self.models[ref]


_CACHE = _ProcessCache()


def _torch_dtype(recipe: Mapping[str, Any]):
    import torch

    name = recipe.get("out_dtype") or recipe.get("dtype")
    return getattr(torch, name) if name else None


def _merge_in_memory(recipe: Mapping[str, Any], seed: int):
    from mergelib import merge_state_dicts

    base_ref = recipe.get("base_model")
    models = recipe["models"]
    merged = merge_state_dicts(
        recipe["merge_method"], _CACHE.state_dict(base_ref) if base_ref else None,
        [_CACHE.state_dict(m["model"]) for m in models], recipe.get("parameters"),
        model_parameters=[m.get("parameters") or {} for m in models], seed=seed, dtype=_torch_dtype(recipe),
    )
    model, tokenizer = _CACHE.model(base_ref or models[0]["model"])
    model.load_state_dict(merged, strict=True)
    return model, tokenizer


def _lead_ref(recipe: Mapping[str, Any]) -> str:
    return recipe.get("base_model") or recipe["models"][0]["model"]


def run_trial(job: TrialJob, should_stop: Callable[[int, float], bool] | None = None) -> TrialResult:
    """Merge and score one trial. `should_stop(step, value)` is asked once, after the first `prune_after` share of
    the prompts, with the objective so far (single objective only); True stops the trial as pruned."""
    import torch

    from mergelib.search.scorer import correct, load_model, load_task

    torch.set_num_threads(job.threads)
    out = TrialResult(job.number)
    start = time.perf_counter()
    tasks = [load_task(name, job.split, job.objective.limit) for name in sorted(job.objective.tasks)]
    scratch = None
    try:
        if job.merge_mode == "memory":
            _CACHE.model(_lead_ref(job.recipe))
            for ref in filter(None, [job.recipe.get("base_model"), *(m["model"] for m in job.recipe["models"])]):
                _CACHE.state_dict(ref)
            out.setup_s = time.perf_counter() - start
            model, tokenizer = _merge_in_memory(job.recipe, job.seed)
        else:
            from mergelib import merge

            Path(job.scratch).mkdir(parents=True, exist_ok=True)
            scratch = Path(tempfile.mkdtemp(prefix=f"trial-{job.number}-", dir=job.scratch))
            out.setup_s = time.perf_counter() - start
            merged = merge(job.recipe, scratch / "model", seed=job.seed, quiet=True, threads=job.threads).out_dir
            model, tokenizer = load_model(merged, _lead_ref(job.recipe))
        out.merge_s = time.perf_counter() - start - out.setup_s
        failpoint("search-trial", job.number)
        evaluated = time.perf_counter()
        right = {t.name: 0 for t in tasks}
        done = {t.name: 0 for t in tasks}
        if should_stop is not None and job.prune_after and job.objective.aggregate != "pareto":
            for task in tasks:
                head = task.head(max(1, math.ceil(len(task.prompts) * job.prune_after)))
                right[task.name], done[task.name] = correct(model, tokenizer, head), len(head.prompts)
            out.scores = {n: right[n] / done[n] for n in right}
            out.partial = objective_values(out.scores, job.parents_best, job.objective)
            out.constraints = constraint_values(out.scores, job.parents_best, job.objective)
            if should_stop(0, out.partial[0]):
                out.pruned = True
                out.eval_s = time.perf_counter() - evaluated
                return out
        for task in tasks:
            rest = task.tail(done[task.name])
            right[task.name] += correct(model, tokenizer, rest) if rest.prompts else 0
        out.scores = {t.name: right[t.name] / max(len(t.prompts), 1) for t in tasks}
        out.values = objective_values(out.scores, job.parents_best, job.objective)
        out.constraints = constraint_values(out.scores, job.parents_best, job.objective)
        out.eval_s = time.perf_counter() - evaluated
        return out
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def score_model(model_dir: str | Path, tasks: list[str], split: str, limit: int | None = None,
                tokenizer_dir: str | Path | None = None) -> dict[str, float]:
    """Exact match per task of a model on disk (parents, and the held-out re-score)."""
    from mergelib.search.scorer import exact_match, load_model, load_task

    model, tokenizer = load_model(model_dir, tokenizer_dir)
    return exact_match(model, tokenizer, [load_task(t, split, limit) for t in sorted(tasks)])
