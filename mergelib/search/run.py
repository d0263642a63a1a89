"""`run_search`: one recipe search from config to files, what `python -m stages.search` and `mergelib search` call.

Everything is validated before the first trial (space against the recipe's method(s), objective tasks, storage,
study). Then: the parents scored on the validation and held-out prompts, the study driven to its budget (each trial
an MLflow run nested under the search's), the best recipe (each Pareto point) written as a mergekit YAML and
re-scored with the default recipe on the held-out prompts no trial saw, and the report.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergelib.pipeline.eval_step import model_label
from mergelib.search.config import SearchConfig
from mergelib.search.scorer import HELD_OUT
from mergelib.search.space import SearchSpace
from mergelib.search.trial import TrialJob, merge_mode, run_trial, score_model


@dataclass
class SearchOutcome:
    """What a search found and where it wrote it."""

    study: str
    storage: str
    counts: dict[str, int]
    best: list[dict[str, Any]]  # per best trial (or Pareto point): number, values, params, recipe, scores
    default: dict[str, Any]  # the base recipe's validation and held-out scores
    parents: dict[str, dict[str, dict[str, float]]]  # label -> split -> task -> score
    trials: list[dict[str, Any]] = field(default_factory=list)  # every trial in the storage, for the report
    paths: dict[str, Path] = field(default_factory=dict)


def family_refs(recipe: Mapping[str, Any]) -> dict[str, str]:
    """label -> reference of the recipe's base (`base`) and models, in recipe order."""
    out = {}
    if recipe.get("base_model"):
        out["base"] = recipe["base_model"]
    for entry in recipe.get("models") or []:
        out.setdefault(model_label(entry["model"]), entry["model"])
    return out


def run_search(recipe: Mapping[str, Any], search: SearchConfig, *, refs: Mapping[str, str] | None = None,
               out_dir: str | Path, reports_dir: str | Path, family: str = "recipe", seed: int = 0,
               scratch: str | Path | None = None, inputs: list | None = None, tracker=None,
               log=print) -> SearchOutcome:
    """Search `search.space` around `recipe` (mergekit recipe dict; `refs` maps its references to local paths).

    The study is `search.study`, else `search-<family>-<digest>`: a changed space, objective, sampler, seed or recipe
    starts a new study, and a re-run of the same config resumes (or, when its budget is spent, only re-reports).
    `inputs` identifies the input models' content (default: the sha256 of their files)."""
    from mergelib.config.run import map_refs
    from mergelib.search.executors import make_executor
    from mergelib.search.report import write_outputs
    from mergelib.search.scorer import load_task
    from mergelib.search.study import (
        SearchError,
        config_digest,
        default_storage,
        drive,
        feasible,
        inputs_identity,
        open_storage,
        open_study,
        trial_result,
    )

    refs = dict(refs or {})
    space = SearchSpace(search, recipe, refs)
    tasks = sorted(search.objective.tasks)
    for task in tasks:
        load_task(task, "validation", search.objective.limit)
    url = search.storage or default_storage()
    storage = open_storage(url, search.heartbeat_s)
    if inputs is None:
        inputs = inputs_identity([refs.get(r, r) for r in family_refs(recipe).values()])
    digest = config_digest(search, dict(recipe), [*inputs, seed])
    study_name = search.study or f"search-{family}-{digest[:8]}"
    study = open_study(search, storage, study_name, digest)
    start = space.recipe_values()
    if start is not None and not study.get_trials(deepcopy=False):
        study.enqueue_trial(start, user_attrs={"start": "the base recipe"})  # the search starts from what it was given
    local_recipe = map_refs(recipe, refs)
    lead = local_recipe.get("base_model") or local_recipe["models"][0]["model"]  # whose tokenizer scores
    parents = {label: {split: score_model(refs.get(ref, ref), tasks, split,
                                          search.objective.limit if split == "validation" else None, lead)
                       for split in ("validation", HELD_OUT)}
               for label, ref in family_refs(recipe).items()}
    parents_best = {t: max(p["validation"][t] for p in parents.values()) for t in tasks}
    log(f"search: study '{study_name}' in {url}; parents on validation: " + ", ".join(
        f"{label} " + "/".join(f"{p['validation'][t]:.2f}" for t in tasks) for label, p in parents.items()))
    scratch = Path(scratch or tempfile.gettempdir()) / f"mergelib-search-{study_name}"

    def job(number: int, trial_recipe: dict, split: str = "validation", prune: bool = True) -> TrialJob:
        mapped = map_refs(trial_recipe, refs)
        return TrialJob(number, mapped, seed, search.objective, parents_best,
                        search.prune_after if prune and search.pruner != "none" and not search.pareto else None,
                        merge_mode(mapped, search.merge), str(scratch), search.threads, split)

    def on_done(trial, result, error) -> None:
        if tracker is None:
            return
        metrics = {}
        if result is not None:
            metrics.update({f"val.{t}": v for t, v in result.scores.items()})
            metrics.update({"merge_s": result.merge_s, "eval_s": result.eval_s, "setup_s": result.setup_s})
            for i, v in enumerate(result.values or result.partial or []):
                metrics[f"objective{i or ''}"] = v
        state = "pruned" if result is not None and result.pruned else "failed" if error else "complete"
        tracker.log_child(f"trial-{trial.number}", {**trial.params, "recipe": space.recipe_for(trial.params)},
                          metrics, {"optuna.study": study_name, "optuna.trial": trial.number, "trial.state": state},
                          status="FAILED" if error else "FINISHED")

    executor = make_executor(search, url, study_name)
    try:
        counts = drive(study, storage, search, space.suggest,
                       lambda trial, values: job(trial.number, space.recipe_for(values)), executor, on_done, log=log)
    finally:
        executor.close()
    best_trials = _best_trials(study, search)
    if not best_trials:
        raise SearchError(f"search.study '{study_name}': no trial completed; see the failed trials' errors "
                          "(mlflow, or the report)")
    best = []
    for trial in best_trials:
        trial_recipe = space.recipe_for(trial.params)
        held = run_trial(job(trial.number, trial_recipe, HELD_OUT, prune=False))
        best.append({"number": trial.number, "values": list(trial.values), "params": dict(trial.params),
                     "feasible": feasible(trial),
                     "recipe": trial_recipe, "validation": dict(trial_result(trial).get("scores", {})),
                     "heldout": held.scores, "heldout_values": held.values})
    default = {split: run_trial(job(-1, dict(recipe), split, prune=False)).scores
               for split in ("validation", HELD_OUT)}
    outcome = SearchOutcome(study_name, url, counts, best, default, parents, _trial_rows(study))
    outcome.paths = write_outputs(outcome, study, search, Path(out_dir), Path(reports_dir))
    if tracker is not None:
        top = best[0]
        tracker.log_metrics({**{f"search.best.val.{t}": v for t, v in top["validation"].items()},
                             **{f"search.best.heldout.{t}": v for t, v in top["heldout"].items()},
                             **{f"search.default.heldout.{t}": v for t, v in default[HELD_OUT].items()}})
        for path in outcome.paths.values():
            tracker.log_artifact(path, "search")
    return outcome


def _best_trials(study, search: SearchConfig) -> list:
    """The best complete trial, or the Pareto front ordered by mean objective (best first), among the trials that
    kept objective.floor when any did (else among all: the report says no trial kept it)."""
    from optuna.trial import TrialState

    from mergelib.search.study import feasible, trial_result

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    pool = [t for t in complete if feasible(t)]
    if not pool and complete:  # none kept every floor: those that came closest
        def shortfall(t) -> float:
            return round(sum(max(v, 0.0) for v in trial_result(t).get("constraints", [])), 9)

        least = min(shortfall(t) for t in complete)
        pool = [t for t in complete if shortfall(t) == least]
    if not pool:
        return []
    if search.pareto:
        front = [t for t in pool if not any(_dominates(o.values, t.values) for o in pool)]
        return sorted(front, key=lambda t: (-sum(t.values) / len(t.values), t.number))
    return [min(pool, key=lambda t: (-t.values[0], t.number))]


def _dominates(a: list[float], b: list[float]) -> bool:
    """`a` is at least as good as `b` everywhere and better somewhere (every objective maximised)."""
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def _trial_rows(study) -> list[dict[str, Any]]:
    from mergelib.search.study import trial_result

    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append({"number": t.number, "state": t.state.name.lower(), "values": list(t.values or []),
                     "params": dict(t.params), "scores": dict(trial_result(t).get("scores", {})),
                     "seconds": dict(trial_result(t).get("seconds", {})),
                     "error": t.user_attrs.get("error") or t.user_attrs.get("lost") or "",
                     "lost": "lost" in t.user_attrs,
                     "started": t.datetime_start.timestamp() if t.datetime_start else None,
                     "finished": t.datetime_complete.timestamp() if t.datetime_complete else None})
    return rows
