"""Evaluate a model with lm-evaluation-harness (`lm_eval.simple_evaluate`, HF backend), fully offline.

Tasks are the YAMLs shipped in `mergelib/pipeline/eval_tasks/` (demo skills, exact match; `demo_ppl`, rolling
perplexity), passed to lm-eval as dicts with absolute data paths, or any lm-eval task name whose data is available.
https://github.com/EleutherAI/lm-evaluation-harness (v0.4.13)
"""

from __future__ import annotations

import copy
import functools
import hashlib
import io
import json
import logging
from collections.abc import Mapping, Sequence
from contextlib import contextmanager, redirect_stderr
from importlib.metadata import version
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from mergelib.errors import InputModelError, MergelibError, did_you_mean
from mergelib.io.hashing import hash_model_dir, sha256_file

TASK_DIR = Path(__file__).parent / "eval_tasks"
DATA_DIR = TASK_DIR / "data"  # the held-out sets, identical to what the demo family writes
ROLLING = "loglikelihood_rolling"
LOCAL_PREFIX = "demo_"  # shipped task names start with it; lm-eval 0.4.13 has none that do
CACHE_VERSION = 1  # bump when a cached parent result would no longer match what evaluate_model returns
EXAMPLES_KEPT = 5  # model outputs kept per task for reports


class EvalTaskError(MergelibError):
    """An evaluation task is unknown or its data is missing."""


class ResolvedTask(NamedTuple):
    """A validated task: its name, what lm-eval is given (a name or a config dict), and whether it is a rolling
    (perplexity) task."""

    name: str
    spec: str | dict[str, Any]
    rolling: bool


def local_task_names() -> list[str]:
    """Names of the tasks shipped with mergelib (`mergelib/pipeline/eval_tasks/*.yaml`)."""
    return sorted(p.stem for p in TASK_DIR.glob("*.yaml"))


def local_task(name: str, data_dir: Path | None = None) -> dict[str, Any]:
    """The lm-eval config dict of shipped task `name`, its data files made absolute under `data_dir`."""
    config = yaml.safe_load((TASK_DIR / f"{name}.yaml").read_text())
    base = Path(data_dir) if data_dir is not None else DATA_DIR
    files = config["dataset_kwargs"]["data_files"]
    for split, rel in files.items():
        path = (base / rel).resolve()
        if not path.is_file():
            raise EvalTaskError(
                f"eval task '{name}': data file {path} is missing; build the demo family or pass its data directory"
            )
        files[split] = str(path)
    return config


@functools.lru_cache(maxsize=1)
def _lm_eval_tasks():
    """lm-eval's task index (built once per process: it parses ~14k YAML files, several seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def resolve_tasks(tasks: Sequence[str | Mapping[str, Any]], data_dir: Path | None = None) -> list[ResolvedTask]:
    """Validate `tasks` before any model is loaded (EvalTaskError, one line, naming the task, otherwise).

    A str is a shipped task name or an lm-eval task/group/tag name; a dict is an lm-eval task config used as is.
    """
    if isinstance(tasks, (str, Mapping)):
        tasks = [tasks]
    if not tasks:
        raise EvalTaskError("eval tasks: the list is empty; name at least one task (e.g. demo_add)")
    local = local_task_names()
    resolved = []
    for task in tasks:
        if isinstance(task, Mapping):
            if "task" not in task:
                raise EvalTaskError(f"eval task {dict(task)!r}: a task dict needs a 'task' key (its name)")
            resolved.append(ResolvedTask(str(task["task"]), dict(task), task.get("output_type") == ROLLING))
        elif task in local:
            spec = local_task(task, data_dir)
            resolved.append(ResolvedTask(task, spec, spec["output_type"] == ROLLING))
        elif task.startswith(LOCAL_PREFIX):  # mergelib's namespace: no need to parse lm-eval's 14k YAMLs to say no
            raise EvalTaskError(
                f"eval task '{task}' is not a mergelib task ({', '.join(local)}){did_you_mean(task, local)}"
            )
        else:
            index = _lm_eval_tasks().task_index
            if task not in index:
                raise EvalTaskError(
                    f"eval task '{task}' is neither a mergelib task ({', '.join(local)}) nor an lm-eval task"
                    f"{did_you_mean(task, [*local, *index])}"
                )
            cfg = index[task].cfg or {}
            resolved.append(ResolvedTask(task, task, cfg.get("output_type") == ROLLING))
    return resolved


@contextmanager
def _quiet(enabled: bool = True):
    """No progress bars or INFO lines from lm-eval, datasets and transformers inside the block (a stage's log
    should show results, not ~20 bars per model). Bars go to sys.stderr, which is swapped for a buffer."""
    if not enabled:
        yield
        return
    loggers = [logging.getLogger(n) for n in ("lm_eval", "datasets", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def load_model(model_dir: str | Path, tokenizer_dir: str | Path | None = None):
    """(model in eval mode, tokenizer), float32 on CPU; the tokenizer from `tokenizer_dir` when given (a merge
    written without one). InputModelError, one line, when either cannot be loaded."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir or model_dir))
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputModelError(f"{model_dir}: cannot load the model for evaluation ({first})") from None
    return model.eval(), tokenizer


def evaluate_model(model_dir: str | Path, tasks: Sequence[str | Mapping[str, Any]], *, limit: int | float | None = None,
                   data_dir: str | Path | None = None, batch_size: int = 32, threads: int | None = None,
                   seed: int = 0, quiet: bool = True) -> dict[str, Any]:
    """Run `tasks` on the model at `model_dir` (CPU) and return
    `{"metrics": {task: {metric: value, "samples": n}}, "examples": {task: [{"input", "output", "target"}]}}`.

    `limit` caps the documents per task (an int, or a fraction < 1). Rolling-perplexity tasks are scored without
    the tokenizer's own `<s>`, since lm-eval already conditions the first token on it (no doubled `<s>`).
    `quiet` hides lm-eval's progress bars and INFO logging.
    """
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    resolved = resolve_tasks(tasks, Path(data_dir) if data_dir is not None else None)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    out: dict[str, Any] = {"metrics": {}, "examples": {}}
    try:
        with _quiet(quiet):
            model, tokenizer = load_model(model_dir)
            for rolling in (False, True):
                specs = [t.spec for t in resolved if t.rolling == rolling]
                if not specs:
                    continue
                lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device="cpu",
                          add_bos_token=False if rolling else None)
                needs_index = any(isinstance(s, str) for s in specs)
                manager = _lm_eval_tasks() if needs_index else TaskManager(include_defaults=False)
                try:
                    result = simple_evaluate(
                        model=lm, tasks=copy.deepcopy(specs), limit=limit, bootstrap_iters=0, log_samples=True,
                        task_manager=manager, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                        fewshot_random_seed=seed,
                    )
                except (ConnectionError, FileNotFoundError) as exc:  # a Hub dataset not in the local cache
                    names = ", ".join(t.name for t in resolved if t.rolling == rolling)
                    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                    raise EvalTaskError(
                        f"eval tasks {names}: data not available ({first}); fetch it once with network "
                        "or use the shipped demo_* tasks"
                    ) from None
                _collect(result, out)
    finally:
        torch.set_num_threads(before)
    return out


def _collect(result: Mapping[str, Any], out: dict[str, Any]) -> None:
    """Flatten lm-eval's `results` ("exact_match,none" -> "exact_match"; stderr and aliases dropped)."""
    for task, values in result["results"].items():
        metrics: dict[str, float] = {}
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            metrics[metric if filt == "none" else f"{metric}_{filt}"] = float(value)
        n = result.get("n-samples", {}).get(task)
        if n:
            metrics["samples"] = int(n["effective"])
        out["metrics"][task] = metrics
    for task, samples in (result.get("samples") or {}).items():
        out["examples"][task] = [
            {"input": s["arguments"][0][0] if s["arguments"][0] else "", "output": _first(s["filtered_resps"]),
             "target": str(s["target"])}
            for s in samples[:EXAMPLES_KEPT]
        ]


def _first(resps: Any) -> str:
    while isinstance(resps, (list, tuple)) and resps:
        resps = resps[0]
    return str(resps)


def _cache_key(model_dir: Path, resolved, limit, batch_size: int, seed: int) -> str:
    def describe(spec):
        if isinstance(spec, str):
            return spec
        spec = copy.deepcopy(spec)
        for split, path in spec.get("dataset_kwargs", {}).get("data_files", {}).items():
            spec["dataset_kwargs"]["data_files"][split] = sha256_file(Path(path))
        return spec

    blob = {
        "version": CACHE_VERSION, "lm_eval": version("lm_eval"), "model": hash_model_dir(model_dir),
        "tasks": [describe(t.spec) for t in resolved], "limit": limit, "batch_size": batch_size, "seed": seed,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def evaluate_family(merged_dir: str | Path, parents: Mapping[str, str | Path], tasks, *, cache_dir: str | Path,
                    limit: int | float | None = None, data_dir: str | Path | None = None, batch_size: int = 32,
                    threads: int | None = None, seed: int = 0, quiet: bool = True) -> dict[str, Any]:
    """Evaluate the merged model and its parents (label -> model dir, e.g. base and each fine-tune).

    A parent's result is cached under `cache_dir`, keyed by the sha256 of its files, the tasks (their data by
    content), `limit`, batch size, seed and lm-eval's version, so a family is evaluated once across merges.
    Returns `{"merged": result, "parents": {label: result}}` with results as `evaluate_model` gives them.
    """
    cache_dir = Path(cache_dir)
    data = Path(data_dir) if data_dir is not None else None
    resolved = resolve_tasks(tasks, data)
    kwargs = dict(limit=limit, data_dir=data, batch_size=batch_size, threads=threads, seed=seed, quiet=quiet)
    out: dict[str, Any] = {"parents": {}}
    for label, path in parents.items():
        key = _cache_key(Path(path), resolved, limit, batch_size, seed)
        cached = cache_dir / f"{key}.json"
        if cached.is_file():
            out["parents"][label] = json.loads(cached.read_text())
            continue
        result = evaluate_model(path, tasks, **kwargs)
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, sort_keys=True) + "\n")
        tmp.replace(cached)
        out["parents"][label] = result
    out["merged"] = evaluate_model(merged_dir, tasks, **kwargs)
    return out


def family_parents(root: str | Path) -> dict[str, Path]:
    """label -> model dir of the family under `root`: `base` then every fine-tune directory, by name."""
    root = Path(root)
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and (p / "config.json").is_file())
    return {p.name: p for p in sorted(dirs, key=lambda p: (p.name != "base", p.name))}
