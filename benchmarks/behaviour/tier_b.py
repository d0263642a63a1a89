"""Tier B of the behavioural benchmark: the demo LM family (base + ft_add + ft_rev, `make demo`'s fetch stage)
merged with every method through `mergelib.merge` and scored by the pipeline's own evaluation
(`mergelib.pipeline.evaluate.evaluate_family`: lm-eval on the shipped demo_add / demo_rev tasks, exact match).

Normalised accuracy = mean of merged/ft_add on demo_add and merged/ft_rev on demo_rev. Seeds only change the
randomized methods' draws (the family is fixed): the others are merged and scored once and that score stands for
every seed. RegMean and Fisher need calibration statistics of the LM, which this tier does not compute: left out.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import mergelib
from benchmarks.behaviour.settings import CALIBRATED, recipe, settings
from mergelib.methods import REGISTRY
from mergelib.pipeline.evaluate import evaluate_family, family_parents

ROOT = Path(__file__).resolve().parents[2]
SKILLS = {"ft_add": "demo_add", "ft_rev": "demo_rev"}  # fine-tune -> the task it was trained for
LIMIT = 100  # prompts per task (of 200): the tier's time is the evaluation


def _exact(result: dict) -> dict[str, float]:
    return {task: float(result["metrics"][task]["exact_match"]) for task in SKILLS.values()}


def run(seeds: list[int], work: Path, methods: list[str] | None = None, family: Path | None = None) -> dict:
    family = Path(family or ROOT / "models" / "demo")
    if not (family / "family.json").is_file():
        raise SystemExit(f"{family}: no demo family; run `make demo` (its fetch stage trains it) or pass --family")
    parents = family_parents(family)
    tasks = list(SKILLS.values())
    rows, left_out = settings(len(SKILLS), methods)
    for name in CALIBRATED:
        if name in REGISTRY:
            left_out[name] = "Tier B computes no calibration statistics for the LM"
    rows = [r for r in rows if r.method not in CALIBRATED]
    base = str(parents["base"])
    finetunes = [str(parents[name]) for name in SKILLS]
    kwargs = dict(cache_dir=work / "eval-cache", limit=LIMIT, data_dir=family / "data", batch_size=64)
    merges: dict[str, list[dict]] = {}
    parent_scores: dict[str, dict] = {}
    for row in rows:
        randomized = REGISTRY[row.method].randomized
        scores = []
        for seed in seeds if randomized else seeds[:1]:
            out = work / "merged"
            started = time.perf_counter()
            mergelib.merge(recipe(row, base, finetunes), out, seed=seed, quiet=True, threads=1)
            result = evaluate_family(out, parents, tasks, **kwargs)
            shutil.rmtree(out)
            parent_scores = {label: _exact(r) for label, r in result["parents"].items()}
            scores.append({"accuracy": _exact(result["merged"]), "seconds": round(time.perf_counter() - started, 1)})
        merges[row.label] = scores if randomized else scores * len(seeds)
        print(f"tier b: {row.label} {scores[0]['accuracy']}", flush=True)
    finetuned = {task: parent_scores[name][task] for name, task in SKILLS.items()}
    per_seed = [{"seed": seed, "finetuned": finetuned, "base": parent_scores["base"],
                 "merges": {label: runs[i] for label, runs in merges.items()}} for i, seed in enumerate(seeds)]
    from benchmarks.behaviour.tier_a import summarise

    return {
        "tier": "b", "family": str(family), "tasks": tasks, "seeds": seeds, "limit": LIMIT,
        "settings": {r.label: {"method": r.method, "per_model": r.per_model, "parameters": r.parameters}
                     for r in rows},
        "left_out": left_out, "parents": parent_scores, "per_seed": per_seed,
        "summary": summarise(per_seed, tasks),
    }
