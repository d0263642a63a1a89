"""Tier A of the behavioural benchmark: per seed, pre-train the digits MLP, fine-tune one encoder per task with its
head frozen, merge the encoders with every method through `mergelib.merge` (safetensors on disk, the real recipe
path), and score each merge on every task with that task's frozen head.

Normalised accuracy of a merge = mean over tasks of (merged accuracy on t) / (fine-tuned accuracy on t).
Two side experiments: averaging two fine-tunes (on the digits, whole classifiers) of one pre-trained model against
two of independently initialised ones; and how many entries per tensor `ties_paper`'s model-wide cut keeps
against `ties`'s per-tensor density.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

import mergelib
from benchmarks.behaviour import digits
from benchmarks.behaviour.settings import CALIBRATED, Setting, recipe, settings
from benchmarks.behaviour.statistics import fisher_file, gram_file

PRETRAIN_EPOCHS = 40
FINETUNE_EPOCHS = 10
FINETUNE_LR = 3e-4
CALIBRATION_SAMPLES = 256


def _finetune(pretrained: digits.Classifier, task: digits.Task, head, split: digits.Split, seed: int):
    model = digits.with_head(pretrained, head)
    x, y = task.inputs(split.x_train), task.labels(split.y_train)
    return digits.train(model, x, y, epochs=FINETUNE_EPOCHS, seed=seed, lr=FINETUNE_LR, train_head=False)


def _pretrain(split: digits.Split, seed: int) -> digits.Classifier:
    views = [split.x_train] + [digits.make_task(v, seed).inputs(split.x_train) for v in digits.PRETRAIN_VIEWS]
    labels = split.y_train.repeat(len(views))
    return digits.train(digits.init_model(seed), torch.cat(views), labels, epochs=PRETRAIN_EPOCHS, seed=seed)


def _score(path: Path, tasks: list[digits.Task], heads: dict, split: digits.Split) -> dict[str, float]:
    return {t.name: digits.accuracy(digits.load_encoder(path, heads[t.name]), t.inputs(split.x_test),
                                    t.labels(split.y_test)) for t in tasks}


def run_seed(seed: int, task_names: list[str], rows: list[Setting], work: Path, *, side: bool = True) -> dict:
    """Everything Tier A measures for one seed."""
    split = digits.load_digits_split()
    pretrained = _pretrain(split, seed)
    tasks = [digits.make_task(name, seed) for name in task_names]
    heads = {t.name: digits.task_head(t, seed) for t in tasks}
    work.mkdir(parents=True, exist_ok=True)
    base_dir = digits.save_model(pretrained, work / "base")
    finetuned, ft_dirs, stats = {}, [], {"gram": {}, "fisher": {}}
    for i, task in enumerate(tasks):
        model = _finetune(pretrained, task, heads[task.name], split, seed * 100 + i)
        path = digits.save_model(model, work / f"ft-{task.name}")
        ft_dirs.append(str(path))
        finetuned[task.name] = digits.accuracy(model, task.inputs(split.x_test), task.labels(split.y_test))
        if any(r.method in CALIBRATED for r in rows):
            x = task.inputs(split.x_train[:CALIBRATION_SAMPLES])
            stats["gram"][str(path)] = str(gram_file(model, x, work / f"gram-{task.name}.safetensors"))
            stats["fisher"][str(path)] = str(fisher_file(model, x, work / f"fisher-{task.name}.safetensors"))
    base = _score(base_dir, tasks, heads, split)
    merges = {}
    for row in rows:
        kind = CALIBRATED.get(row.method)
        out = work / "merged"
        started = time.perf_counter()
        mergelib.merge(recipe(row, str(base_dir), ft_dirs, stats[kind] if kind else None), out, seed=seed,
                       quiet=True, threads=1)
        seconds = time.perf_counter() - started
        merges[row.label] = {"accuracy": _score(out, tasks, heads, split), "merge_s": round(seconds, 3)}
        shutil.rmtree(out)
    result = {"seed": seed, "finetuned": finetuned, "base": base, "merges": merges}
    if side:
        result["init"] = init_experiment(pretrained, split, seed, work)
        result["ties_cut"] = ties_cut_shares(str(base_dir), ft_dirs, 0.2)
    return result


def init_experiment(pretrained: digits.Classifier, split: digits.Split, seed: int, work: Path) -> dict:
    """Average (linear, heads included) two fine-tunes on the digits themselves (other data orders): both of one
    pre-trained model, or of two independently initialised ones. Accuracy of the average / mean of the two's."""
    other = _pretrain(split, seed + 10_000)  # same data and recipe, another initialisation
    x, y = split.x_train, split.y_train

    def tuned(model: digits.Classifier, order: int) -> digits.Classifier:
        copy = digits.with_head(model, model.head)
        return digits.train(copy, x, y, epochs=FINETUNE_EPOCHS, seed=seed * 100 + order, lr=FINETUNE_LR)

    first = tuned(pretrained, 50)
    out = {}
    for label, second in (("same_init", tuned(pretrained, 51)), ("independent_init", tuned(other, 51))):
        a = digits.save_model(first, work / f"init-{label}-a", include_head=True)
        b = digits.save_model(second, work / f"init-{label}-b", include_head=True)
        merged = work / f"init-{label}-merged"
        mergelib.merge({"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 1.0}},
                                                             {"model": str(b), "parameters": {"weight": 1.0}}]},
                       merged, quiet=True, threads=1)
        own = (digits.accuracy(first, split.x_test, split.y_test) + digits.accuracy(second, split.x_test,
                                                                                     split.y_test)) / 2
        out[label] = digits.accuracy(digits.load_encoder(merged), split.x_test, split.y_test) / own
    return out


def ties_cut_shares(base: str, finetunes: list[str], density: float) -> dict[str, float]:
    """Per tensor, the share of entries `ties_paper` keeps (mean over the fine-tunes) at `density`; `ties` keeps
    exactly `density` of every tensor. Read from the plan the engine merges after its pre-pass."""
    from mergelib.merging.engine import task_vector_magnitudes
    from mergelib.merging.global_pass import with_kept_counts

    planned = mergelib.plan_merge({
        "merge_method": "ties_paper", "base_model": base,
        "models": [{"model": p, "parameters": {"density": density}} for p in finetunes]})
    plan = with_kept_counts(planned, lambda job: task_vector_magnitudes(planned, job))
    return {job.name: round(sum(p.kept for p in job.model_params) / (len(job.model_params) * job.numel), 4)
            for job in plan.jobs}


def run(seeds: list[int], task_names: list[str], work: Path, methods: list[str] | None = None) -> dict:
    """Tier A over `seeds`: the raw per-seed results plus the settings and the methods left out."""
    rows, left_out = settings(len(task_names), methods)
    per_seed = [run_seed(seed, task_names, rows, work / f"seed-{seed}") for seed in seeds]
    return {
        "tier": "a",
        "tasks": task_names,
        "seeds": seeds,
        "settings": {r.label: {"method": r.method, "per_model": r.per_model, "parameters": r.parameters}
                     for r in rows},
        "left_out": left_out,
        "per_seed": per_seed,
        "summary": summarise(per_seed, task_names),
    }


def normalised(accuracy: dict[str, float], finetuned: dict[str, float]) -> float:
    return sum(accuracy[t] / max(finetuned[t], 1e-9) for t in finetuned) / len(finetuned)


def summarise(per_seed: list[dict], task_names: list[str]) -> dict:
    """Per row (fine-tuned, base, each merge): normalised accuracy mean, min and max over seeds, and mean absolute
    accuracy per task."""
    def stats(values: list[float]) -> dict:
        return {"mean": round(sum(values) / len(values), 4), "min": round(min(values), 4),
                "max": round(max(values), 4)}

    rows = {"fine-tuned": [r["finetuned"] for r in per_seed], "base": [r["base"] for r in per_seed]}
    for label in per_seed[0]["merges"]:
        rows[label] = [r["merges"][label]["accuracy"] for r in per_seed]
    out = {}
    for label, accs in rows.items():
        norm = [normalised(a, r["finetuned"]) for a, r in zip(accs, per_seed)]
        out[label] = {"normalised": stats(norm),
                      "accuracy": {t: round(sum(a[t] for a in accs) / len(accs), 4) for t in task_names}}
    if "init" in per_seed[0]:
        out["_init"] = {k: stats([r["init"][k] for r in per_seed]) for k in per_seed[0]["init"]}
    return out
