"""`merge()`: recipe in, merged model directory out, atomically (plan -> stage -> stream -> commit)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from mergelib.config.recipe import MergeRecipe, load_recipe
from mergelib.errors import MergelibError, OutputError
from mergelib.io.atomic import MARKER, check_output_dir, commit_dir, staging_dir, stale_staging_dirs
from mergelib.io.hashing import sha256_files
from mergelib.io.journal import Journal, plan_key
from mergelib.io.process import peak_rss
from mergelib.io.writer import write_index
from mergelib.merging.card import calibration_record, model_card
from mergelib.merging.device import Placement, resolve_placement
from mergelib.merging.engine import default_memory_budget, execute
from mergelib.merging.faults import failpoint
from mergelib.merging.plan import MergePlan
from mergelib.merging.planner import build_plan
from mergelib.merging.versions import MERGE_LIBRARIES, package_versions

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
TAGALONG_FILES = ("generation_config.json",)


@dataclass(frozen=True)
class MergeResult:
    """What a merge did (or, for a dry run, would do)."""

    out_dir: Path
    n_tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    peak_rss_bytes: int
    input_files: dict[str, str]  # input shard path -> sha256
    seed: int
    recipe_yaml: str
    plan: MergePlan
    shards_reused: int = 0  # complete shards kept from an interrupted earlier run
    worker_peak_rss_bytes: list[int] = field(default_factory=list)  # executor="ray": each shard task's peak RSS


EXECUTORS = ("local", "ray")  # where a merge's shards are computed: this process, or Ray tasks


def library_versions() -> dict[str, str]:
    """Versions that determine the output bytes."""
    return package_versions(MERGE_LIBRARIES)


def default_threads() -> int:
    """Tensors merged in parallel when the caller does not say: the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


KERNEL_MEMORY = 64 << 20  # numba's compiled kernels and LLVM, loaded by the first merge (measured: ~66 MB)


def estimated_peak_rss(plan: MergePlan, threads: int) -> int:
    """What the merging process will hold at its peak: what it holds now (interpreter, torch, the plan), the
    compiled kernels it loads, and the merge's working memory (`MergePlan.peak_memory`)."""
    import psutil

    return psutil.Process().memory_info().rss + KERNEL_MEMORY + plan.peak_memory(threads)


def plan_merge(
    recipe: MergeRecipe | dict | str | Path,
    *,
    out_shard_size: int = 5_000_000_000,
    dtype: str | None = None,
    allow_crimes: bool = False,
    trust_remote_code: bool = False,
    allow_nan: bool = False,
    unsafe_truncate_embeddings: bool = False,
) -> MergePlan:
    """Validate a recipe and plan every output tensor without reading weights."""
    if out_shard_size < 1:
        raise OutputError(f"out_shard_size: {out_shard_size} bytes; a shard needs at least 1 byte (e.g. 5GB)")
    return build_plan(
        load_recipe(recipe),
        out_shard_size=out_shard_size,
        out_dtype=dtype,
        allow_crimes=allow_crimes,
        trust_remote_code=trust_remote_code,
        allow_nan=allow_nan,
        unsafe_truncate_embeddings=unsafe_truncate_embeddings,
    )


def _write_tokenizer(plan: MergePlan, staged: Path) -> None:
    """The assembled tokenizer when the recipe plans one, else the donor's (base, or first model) files."""
    donor = plan.models[plan.donor].path
    names = TAGALONG_FILES if plan.tokenizer is not None else TOKENIZER_FILES + TAGALONG_FILES
    for name in names:
        if (donor / name).is_file():
            shutil.copyfile(donor / name, staged / name)
    if plan.tokenizer is not None:
        plan.tokenizer.save(staged)
        (staged / "tokenizer_report.md").write_text(plan.tokenizer.report.rstrip() + "\n")


def merge(
    recipe: MergeRecipe | dict | str | Path,
    out_dir: str | Path,
    *,
    seed: int = 0,
    out_shard_size: int = 5_000_000_000,
    threads: int | None = None,
    copy_tokenizer: bool = True,
    allow_crimes: bool = False,
    trust_remote_code: bool = False,
    quiet: bool = False,
    dry_run: bool = False,
    dtype: str | None = None,
    memory_budget: int | None = None,
    allow_nan: bool = False,
    unsafe_truncate_embeddings: bool = False,
    executor: str = "local",
    workers: int | None = None,
    device: str = "cpu",
    read_to_gpu: bool = False,
    multi_gpu: bool = False,
    kernels: str | None = None,
) -> MergeResult:
    """Merge the models of `recipe` into `out_dir`; a previous output there is replaced only on success.

    `executor="ray"` writes each output shard as a Ray task (`workers` at once on a local Ray, each with `threads`
    threads; RAY_ADDRESS for a cluster whose workers see the inputs and `out_dir`): the same bytes as "local".
    `device` ("cpu", "cuda", "cuda:N"), `multi_gpu` (every GPU) and `read_to_gpu` place the math (see
    `mergelib.merging.device`); `kernels="torch"` runs the device path on the CPU."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    if executor not in EXECUTORS:
        raise OutputError(f"executor '{executor}': choose {' or '.join(EXECUTORS)}")
    placement = resolve_placement(device, multi_gpu=multi_gpu, read_to_gpu=read_to_gpu, kernels=kernels)
    plan_kwargs = dict(out_shard_size=out_shard_size, dtype=dtype, allow_crimes=allow_crimes,
                       trust_remote_code=trust_remote_code, allow_nan=allow_nan,
                       unsafe_truncate_embeddings=unsafe_truncate_embeddings)
    plan = plan_merge(recipe, **plan_kwargs)
    threads = threads or (1 if executor == "ray" else default_threads())
    if plan.method.statistics is not None and not dry_run:
        if executor == "ray":
            raise OutputError(f"executor 'ray': {plan.method.name} needs calibration statistics, which the Ray "
                              "executor does not carry yet; use the local executor")
        from mergelib.calibration.prepare import statistics_for

        plan = replace(plan, statistics=statistics_for(plan, seed))
    if dry_run:
        return MergeResult(out_dir, len(plan.jobs), plan.bytes_read, plan.bytes_written, 0.0, 0, {}, seed,
                           plan.recipe.to_yaml(), plan)
    check_output_dir(out_dir)
    free = shutil.disk_usage(out_dir.resolve().parent).free
    if free < plan.bytes_written * 1.02 + (1 << 20):
        raise OutputError(
            f"{out_dir.resolve().parent}: {free / 1e9:.2f} GB free, the output needs {plan.bytes_written / 1e9:.2f} GB"
        )
    files = [f for m in plan.models for f in m.index.files]
    hashes: dict[str, str] = {}
    hasher = threading.Thread(target=lambda: hashes.update(sha256_files(files)), name="mergelib-hash", daemon=True)
    hasher.start()
    key = _run_key(plan, seed, files, placement)
    staged = staging_dir(out_dir, key)
    journal = Journal(staged, key)
    try:
        metadata = {"format": "pt", "mergelib_version": library_versions()["mergelib"]}
        if executor == "ray":
            from mergelib.merging.distributed import execute_on_ray

            reused, worker_peaks = execute_on_ray(
                plan_merge, recipe, plan_kwargs, plan, staged, seed=seed, workers=workers or default_threads(),
                threads=threads, memory_budget=memory_budget or default_memory_budget(plan, threads), metadata=metadata,
                journal=journal, placement=placement)
        else:
            reused = execute(plan, staged, seed=seed, threads=threads, memory_budget=memory_budget, quiet=quiet,
                             metadata=metadata, journal=journal, placement=placement)
            worker_peaks = []
        write_index(staged, plan.shards, {"mergelib_version": metadata["mergelib_version"]})
        (staged / "config.json").write_text(json.dumps(plan.config, indent=2, sort_keys=True) + "\n")
        if copy_tokenizer or plan.tokenizer is not None:
            _write_tokenizer(plan, staged)
        hasher.join()
        _write_records(plan, staged, seed, hashes, placement)
        failpoint("before-commit")
        journal.remove()
        commit_dir(staged, out_dir)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise  # an IO failure: keep the staging directory, a re-run resumes from its complete shards
        shutil.rmtree(staged, ignore_errors=True)
        raise OutputError(
            f"{out_dir.resolve().parent}: disk full while writing the merge ({exc.strerror}); free space and re-run "
            "(the previous output, if any, is untouched)"
        ) from None
    except MergelibError:
        shutil.rmtree(staged, ignore_errors=True)  # bad input: nothing worth resuming
        raise
    for stale in stale_staging_dirs(out_dir, staged):
        shutil.rmtree(stale, ignore_errors=True)
    peak = peak_rss()
    return MergeResult(out_dir, len(plan.jobs), plan.bytes_read, plan.bytes_written,
                       time.perf_counter() - started, peak, hashes, seed, plan.recipe.to_yaml(), plan, reused,
                       worker_peaks)


def _compute_record(plan: MergePlan, placement: Placement) -> str | None:
    """Where the math ran, when that may show in the bytes: a method that is not device-exact, on a GPU."""
    kind = placement.devices[0].split(":")[0]
    return kind if kind != "cpu" and not plan.method.device_exact else None


def _run_key(plan: MergePlan, seed: int, files: list[Path], placement: Placement) -> str:
    """What decides the output bytes: recipe, seed, versions, the input files' identity, the output layout, and
    the device kind for methods whose bits depend on it."""
    parts = [plan.recipe.to_yaml(), str(seed), json.dumps(library_versions(), sort_keys=True),
             str(_compute_record(plan, placement))]
    for path in files:
        st = path.stat()
        parts.append(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}")
    for fname, slots in plan.shards.items():
        parts.append(fname + "|" + ";".join(f"{s.name}:{list(s.shape)}:{s.dtype}" for s in slots))
    parts.append(json.dumps(plan.config, sort_keys=True))
    return plan_key(parts)


def _write_records(plan: MergePlan, staged: Path, seed: int, hashes: dict[str, str], placement: Placement) -> None:
    per_model: dict[str, dict[str, str]] = {}
    for model in plan.models:
        per_model[model.label] = {
            str(f.relative_to(model.path)): hashes[str(f)] for f in model.index.files
        }
    versions = library_versions()
    recipe_yaml = plan.recipe.to_yaml()
    (staged / "mergekit_config.yml").write_text(recipe_yaml)
    (staged / "README.md").write_text(model_card(plan, seed=seed, input_hashes=per_model, versions=versions))
    record = {
        "seed": seed,
        "method": plan.method.name,
        "recipe": plan.recipe.model_dump(mode="json", exclude_none=True),
        "inputs": [
            {"model": m.label, "revision": m.ref.revision, "files": per_model[m.label]} for m in plan.models
        ],
        "output": {"shards": list(plan.shards), "tensors": len(plan.jobs), "bytes": plan.bytes_written},
        "ignored_params": plan.ignored_params,
        "left_out": [{"model": m, "tensor": t, "why": w} for m, t, w in plan.left_out],
        "versions": versions,
    }
    if plan.statistics is not None:
        record["calibration"] = calibration_record(plan)
    if _compute_record(plan, placement):  # within 1e-6 of the CPU's bits, not equal to them: say where
        record["computed_on"] = _compute_record(plan, placement)
    (staged / MARKER).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
