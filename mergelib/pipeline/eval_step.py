"""The evaluate stage's work: the merged model and its parents through lm-eval (mergelib.pipeline.evaluate), the reports
(mergelib.pipeline.reports) and the rows DVC plots and MLflow read.

Parents are the fetched family as the lock records it (`base`, then each fine-tune by directory name); their
results are cached by content under $MERGELIB_CACHE/eval, so a family is scored once across merges.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mergelib.io.cache import cache_dir
from mergelib.pipeline.outputs import write_json

SCORES = "scores.json"  # the evaluate stage's DVC metric (merge_scores)
SKILL_ROWS = "skill_accuracy.csv"  # model, task, label, accuracy: the DVC bar plot of accuracy per model and task


def eval_cache_dir() -> Path:
    """Where parent results are cached: $MERGELIB_CACHE/eval, else ~/.cache/mergelib/eval."""
    return cache_dir("eval")


def model_label(ref: str) -> str:
    """A fine-tune's label: the last part of its reference (`models/demo/ft_add` -> `ft_add`, `org/x@rev` -> `x`);
    reports name parents by it and search spaces name models by it."""
    return str(ref).rstrip("/").rsplit("/", 1)[-1].split("@", 1)[0]


def family_labels(refs: tuple[str, ...], lock: Mapping[str, Any]) -> dict[str, Path]:
    """label -> model directory for the base (`base`) and each fine-tune (its directory or repo name), from the
    fetch lock (`refs` as written in conf/, base first)."""
    out: dict[str, Path] = {}
    for i, ref in enumerate(refs):
        label = "base" if i == 0 else model_label(ref)
        out[label if label not in out else f"{label}_{i}"] = Path(lock[ref].path)
    return out


def merge_label(merged_dir: str | Path) -> str | None:
    """`method key=value ...` from the merge's run record (its top-level scalar parameters), for chart titles;
    None for a model mergelib did not write."""
    path = Path(merged_dir) / "mergelib_run.json"
    if not path.is_file():
        return None
    recipe = json.loads(path.read_text()).get("recipe", {})
    params = {k: v for k, v in (recipe.get("parameters") or {}).items() if isinstance(v, (int, float, str, bool))}
    models = recipe.get("models") or []
    weights = [m.get("parameters", {}).get("weight") for m in models]
    if all(isinstance(w, (int, float)) for w in weights) and weights and "weight" not in params:
        params["weights"] = "/".join(f"{w:g}" for w in weights)
    return " ".join([recipe.get("merge_method", "?"), *(f"{k}={v}" for k, v in sorted(params.items()))])


def evaluate_merge(merged_dir: str | Path, parents: Mapping[str, Path], eval_config, reports_dir: str | Path,
                   *, seed: int = 0) -> dict[str, Any]:
    """Score the merge (and the parents unless eval.parents is off), write the reports into `reports_dir`
    (metrics.json, scores.json, eval_table.md, eval_scores.csv, eval_samples.json, accuracy.png,
    skill_accuracy.csv) and return the metrics document (what metrics.json holds)."""
    from mergelib.pipeline.evaluate import evaluate_family
    from mergelib.pipeline.reports import load_metrics, write_reports

    results = evaluate_family(
        merged_dir, dict(parents) if eval_config.parents else {}, list(eval_config.tasks),
        cache_dir=eval_cache_dir(), limit=eval_config.limit, batch_size=eval_config.batch_size,
        threads=eval_config.threads, seed=seed,
    )
    paths = write_reports(results, reports_dir, merge_label=merge_label(merged_dir))
    document = load_metrics(paths["metrics"])
    write_skill_rows(document, Path(reports_dir) / SKILL_ROWS)
    write_json(Path(reports_dir) / SCORES, merge_scores(document))
    return document


def merge_scores(document: Mapping[str, Any]) -> dict[str, float]:
    """The merge's headline number per task (exact match, else bits per byte as `<task>_bpb`): the DVC metric
    `dvc exp show` compares, without the parents' columns."""
    out = {}
    for task, metrics in sorted(_models(document).get("merged", {}).items()):
        if "exact_match" in metrics:
            out[task] = metrics["exact_match"]
        elif "bits_per_byte" in metrics:
            out[f"{task}_bpb"] = metrics["bits_per_byte"]
    return out


def _models(document: Mapping[str, Any]) -> dict[str, Mapping[str, Mapping[str, float]]]:
    """label -> task -> metrics: parents first, the merge last."""
    return {**document.get("parents", {}), "merged": document.get("merged", {})}


def write_skill_rows(document: Mapping[str, Any], path: str | Path) -> Path:
    """One row per (model, accuracy task): what the DVC plot `skill accuracy` draws."""
    path = Path(path)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["model", "task", "label", "accuracy"])
        for label, per_task in _models(document).items():
            for task, metrics in sorted(per_task.items()):
                if "exact_match" in metrics:
                    writer.writerow([label, task, f"{task} / {label}", metrics["exact_match"]])
    return path


def flat_metrics(document: Mapping[str, Any]) -> dict[str, float]:
    """`eval.<model>.<task>.<metric>` -> value, for MLflow (sample counts left out)."""
    out = {}
    for label, per_task in _models(document).items():
        for task, metrics in per_task.items():
            for name, value in metrics.items():
                if name != "samples":
                    out[f"eval.{label}.{task}.{name}"] = float(value)
    for label, summary in document.get("summary", {}).items():
        for name, value in summary.items():
            out[f"eval.{label}.{name}"] = float(value)
    return out


def summary_line(document: Mapping[str, Any]) -> str:
    """`demo_add 0.72 (ft_add 0.98), ...`: the merge's accuracy per task, next to the best parent's."""
    merged, parents = document.get("merged", {}), document.get("parents", {})
    parts = []
    for task, metrics in sorted(merged.items()):
        if "exact_match" not in metrics:
            continue
        best = max(((p, m[task]["exact_match"]) for p, m in parents.items() if task in m), key=lambda x: x[1],
                   default=None)
        parts.append(f"{task} {metrics['exact_match']:.2f}" + (f" ({best[0]} {best[1]:.2f})" if best else ""))
    return ", ".join(parts) or "no accuracy task"
