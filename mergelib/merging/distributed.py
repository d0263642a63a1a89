"""One merge split across processes or machines on Ray (`executor="ray"`): each output shard is a Ray task.

The plan fixes every shard's tensors and byte offsets before any weight is read, so a task needs only the recipe
and a shard name: it plans again from the same inputs (headers only), computes that shard's tensors with the same
per-tensor code and seeded randomness as a local merge, writes it into the staging directory all workers see, and
returns its digest and its peak RSS. The driver records each shard in the journal (a re-run resumes from them) and
writes the index, config and card itself, so the output is byte-identical to the local merge. A task whose worker
dies is re-run by Ray (`max_retries`). Ray is a local one by default, the cluster at RAY_ADDRESS otherwise; each
task declares the CPUs and the memory budget it merges under, so Ray places it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from mergelib.io.hashing import shard_digest
from mergelib.io.journal import Journal
from mergelib.merging.device import CPU, Placement
from mergelib.merging.faults import failpoint, failpoint_once

TASK_RETRIES = 3  # a shard whose worker died is run again this many times
WORKER_OVERHEAD = 512 << 20  # a worker process: python, torch, numba kernels (what Ray is told beyond the budget)


def merge_shard(plan_merge: Callable, recipe: Any, plan_kwargs: dict[str, Any], fname: str, staged: str, seed: int,
                threads: int, memory_budget: int, metadata: dict[str, str],
                placement: Placement = CPU) -> tuple[str, int]:
    """Plan `recipe` with `plan_merge` (mergelib.plan_merge, passed in by the caller) and write shard `fname` into
    `staged`; (its digest, this process's peak RSS in bytes). On a GPU placement the task uses the GPU Ray gave
    it (the worker sees it as cuda:0)."""
    from mergelib.io.process import peak_rss
    from mergelib.merging.engine import execute

    plan = plan_merge(recipe, **plan_kwargs)
    failpoint_once("ray-shard", Path(staged))
    if placement.devices[0] != "cpu":
        placement = replace(placement, devices=("cuda:0",))
    execute(plan, Path(staged), seed=seed, threads=threads, memory_budget=memory_budget, quiet=True,
            metadata=metadata, shards=[fname], placement=placement)
    return shard_digest(Path(staged) / fname), peak_rss()


def execute_on_ray(plan_merge: Callable, recipe: Any, plan_kwargs: dict[str, Any], plan, staged: Path, *, seed: int,
                   workers: int, threads: int, memory_budget: int, metadata: dict[str, str],
                   journal: Journal, placement: Placement = CPU) -> tuple[int, list[int]]:
    """Write every shard the journal does not hold as a Ray task (each plans `recipe` again with `plan_merge`);
    (shards reused, each task's peak RSS)."""
    import ray

    reused = journal.verified()
    todo = [fname for fname in plan.shards if fname not in reused]
    address = os.environ.get("RAY_ADDRESS") or None
    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
        if address is None:
            kwargs["num_cpus"] = workers * threads
        ray.init(address=address, **kwargs)
        started = address is None
    gpus = 1 if placement.devices[0] != "cpu" else 0  # a shard task on a GPU placement takes one GPU
    task = ray.remote(merge_shard).options(num_cpus=threads, num_gpus=gpus, memory=memory_budget + WORKER_OVERHEAD,
                                           max_retries=TASK_RETRIES, retry_exceptions=False)
    args = (str(staged), seed, threads, memory_budget, metadata, placement)
    pending = {task.remote(plan_merge, recipe, plan_kwargs, fname, *args): fname for fname in todo}
    peaks: list[int] = []
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            fname = pending.pop(done[0])
            try:
                digest, peak = ray.get(done[0])
            except ray.exceptions.RayTaskError as exc:  # the merge itself failed: its own error, one line
                raise (exc.cause if exc.cause is not None else exc) from None
            peaks.append(peak)
            failpoint("after-shard", journal.record(fname, digest))
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        if started:
            ray.shutdown()
    return len(reused), peaks
