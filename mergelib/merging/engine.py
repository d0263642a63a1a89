"""Streams a MergePlan: tensors merged in parallel under a memory budget, written at planned offsets.

Each tensor is computed with torch's intra-op threads set to 1 and parallelism across tensors instead, so every
result is computed the same way whatever `threads` is: the output bytes never depend on the thread count or on
the order in which tensors finish.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable, Collection
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from pathlib import Path

import psutil
import torch
from tqdm import tqdm

from mergelib.errors import InputModelError, MergelibError
from mergelib.io.convert import stored_finite, to_float32
from mergelib.io.journal import Journal
from mergelib.io.reader import read_rows, read_tensor
from mergelib.io.writer import ShardFile, WriteQueue
from mergelib.merging.device import CPU, Placement
from mergelib.merging.faults import failpoint
from mergelib.merging.plan import MergePlan, SourceTensor, TensorJob
from mergelib.merging.plan import memory_budget as planned_budget
from mergelib.merging.rng import generator_for
from mergelib.methods import MethodInputs, fused, torch_kernels
from mergelib.methods.base import StreamInputs
from mergelib.tokenizer import align_rows


class MemoryBudget:
    """A counting semaphore over bytes; a job larger than the whole budget runs alone. `cancel` wakes every waiter:
    once a job has failed, nothing waits for memory that may never be released."""

    def __init__(self, limit: int):
        self.limit = max(1, int(limit))
        self.used = 0
        self.cancelled = False
        self._cond = threading.Condition()

    def acquire(self, amount: int) -> int | None:
        """Take `amount` bytes (capped at the limit) when they fit; None once the budget is cancelled."""
        amount = min(amount, self.limit)
        with self._cond:
            self._cond.wait_for(lambda: self.cancelled or self.used + amount <= self.limit)
            if self.cancelled:
                return None
            self.used += amount
        return amount

    def try_acquire(self, amount: int) -> int | None:
        """`acquire` without waiting: None when the bytes do not fit now (or the budget is cancelled)."""
        amount = min(amount, self.limit)
        with self._cond:
            if self.cancelled or self.used + amount > self.limit:
                return None
            self.used += amount
        return amount

    def cancel(self) -> None:
        with self._cond:
            self.cancelled = True
            self._cond.notify_all()

    def release(self, amount: int) -> None:
        with self._cond:
            self.used -= amount
            self._cond.notify_all()


def default_memory_budget(plan: MergePlan, threads: int = 2) -> int:
    """`mergelib.merging.plan.memory_budget` over the plan's jobs, capped at half of the memory available now."""
    works = [job.work_bytes for job in plan.jobs]
    return int(min(psutil.virtual_memory().available * 0.5, planned_budget(works, threads)))


def device_work_bytes(job: TensorJob) -> int:
    """Memory one tensor takes when merged whole with the torch kernels: its float32 inputs and, per input,
    a task vector, its magnitudes and a mask, plus the running sums."""
    inputs = len(job.sources) + (1 if job.base is not None else 0)
    return job.numel * 4 * (3 * inputs + 6) + job.out_bytes


def _reuse_freed_memory() -> None:
    """Keep freed blocks of up to 32 MiB (glibc's largest mmap threshold) in the heap for the next block instead
    of unmapping them: a fresh mapping costs a page fault per 4 KiB on first touch, more than the merge math
    itself. Larger buffers still get their own mapping and go back to the system when freed."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD (fixing it also stops glibc's adaptive threshold)
        libc.mallopt(-1, 512 << 20)  # M_TRIM_THRESHOLD: free heap top kept before it is handed back
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def _reads_stored(plan: MergePlan, placement: Placement) -> bool:
    """Whether inputs reach the method as stored (bf16/fp16 not widened): its CPU kernels widen as they read."""
    return plan.method.reads_stored and not placement.torch_kernels


def _prepare(plan: MergePlan, tensor: torch.Tensor, source: SourceTensor, rows: bool,
             placement: Placement = CPU, device: str = "cpu") -> torch.Tensor:
    if placement.read_to_device:
        tensor = tensor.to(device)  # the stored bytes go over; widening happens there
    if source.crop is not None:  # a larger vocabulary than the output's: keep the leading block
        first = slice(None) if rows else slice(0, source.crop[0])  # row blocks are already inside the crop
        tensor = tensor[(first, *(slice(0, n) for n in source.crop[1:]))]
    if plan.working_dtype is not None and tensor.dtype != plan.working_dtype:
        tensor = tensor.to(plan.working_dtype)  # mergekit's `dtype`: inputs are rounded to it on load
    checked = stored_finite(tensor) if _reads_stored(plan, placement) else None
    tensor, finite = checked if checked is not None else to_float32(tensor)
    if not plan.allow_nan and not finite:
        raise InputModelError(
            f"model '{plan.models[source.model].label}': tensor '{source.name}' holds NaN or Inf values "
            "(the first found; others may follow); fix the checkpoint or pass --allow-nan to merge anyway"
        )
    return tensor.to(device)


def load_source(plan: MergePlan, source: SourceTensor, placement: Placement = CPU, device: str = "cpu") -> torch.Tensor:
    """One input tensor as float32, cropped and rounded through the recipe's working dtype, on `device`."""
    return _prepare(plan, read_tensor(source.name, source.info), source, False, placement, device)


def load_rows(plan: MergePlan, source: SourceTensor, start: int, end: int) -> torch.Tensor:
    """Rows [start, end) of one input tensor, prepared as `load_source` would."""
    return _prepare(plan, read_rows(source.name, source.info, start, end), source, rows=True)


def _aligned_inputs(plan: MergePlan, job: TensorJob, placement: Placement,
                    device: str) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Embedding matrices with their rows mapped onto the output vocabulary (fill rules need every input)."""
    label = {s.model: plan.models[s.model].label for s in job.inputs}
    raw = {label[s.model]: read_tensor(s.name, s.info) for s in job.inputs}

    def aligned(source: SourceTensor) -> torch.Tensor:
        return _prepare(plan, align_rows(plan.tokenizer, label[source.model], raw), source, False, placement, device)

    return [aligned(s) for s in job.sources], aligned(job.base) if job.base is not None else None


def task_vector_magnitudes(plan: MergePlan, job: TensorJob):
    """(position in the recipe's models, |delta| chunk) of one job's task vectors, read as the merge reads them
    (whole, in row blocks, or vocabulary-aligned): what a model-wide top-k (`global_pass`) counts."""
    if job.align:
        sources, base = _aligned_inputs(plan, job, CPU, "cpu")
        for i, x in enumerate(sources):
            yield i, (x - base).abs()
    elif job.mode == "whole":
        base = load_source(plan, job.base)
        for i, source in enumerate(job.sources):
            yield i, (load_source(plan, source) - base).abs()
    else:
        for start in range(0, job.shape[0], job.block_rows):
            end = min(job.shape[0], start + job.block_rows)
            base = load_rows(plan, job.base, start, end)
            for i, source in enumerate(job.sources):
                yield i, (load_rows(plan, source, start, end) - base).abs()


def lines_scale(merged: torch.Tensor, base: torch.Tensor, scale: float) -> torch.Tensor:
    """LiNeS: base + scale * (merged - base), in float32, one rounding per step (the same bits on any device)."""
    return base + (merged - base) * scale


def _merge_whole(plan: MergePlan, job: TensorJob, seed: int, sources, base) -> torch.Tensor:
    inputs = MethodInputs(
        tensors=tuple(sources),
        base=base,
        model_params=job.model_params,
        name=job.name,
        generator=generator_for(seed, job.name) if plan.method.randomized else None,
        statistics=_statistics(plan, job, sources[0].device) if plan.method.statistics else None,
    )
    try:
        result = plan.method.merge(inputs, job.params)
    except ValueError as exc:
        raise InputModelError(f"{plan.method.name} failed at tensor '{job.name}': {exc}") from None
    return result


def _statistics(plan: MergePlan, job: TensorJob, device) -> tuple[torch.Tensor | None, ...]:
    """Each input model's statistic for this tensor (see MethodSpec.statistics), on the tensors' device."""
    if plan.statistics is None:
        raise MergelibError(f"{plan.method.name} needs calibration statistics and the plan has none")
    found = (plan.statistics.get(s.model, s.name) for s in job.sources)
    return tuple(t.to(device) if t is not None else None for t in found)


def compute(plan: MergePlan, job: TensorJob, seed: int, emit, placement: Placement = CPU,
            device: str = "cpu") -> None:
    """Merge one output tensor and hand it to `emit(start_row, rows)` in its output dtype (whole or in blocks).

    On a device placement the tensor is merged whole on `device` with the torch kernels and comes back to the
    CPU in its output dtype."""
    whole = job.mode == "whole" or placement.torch_kernels
    base_rows: Callable[[int, int], torch.Tensor] | None = None  # the base's rows, for LiNeS

    def out(start: int, rows: torch.Tensor) -> None:
        expected = (rows.shape[0], *job.shape[1:]) if not whole else job.shape
        if tuple(rows.shape) != tuple(expected):
            raise RuntimeError(f"{plan.method.name} gave shape {tuple(rows.shape)} for {job.name}, planned {job.shape}")
        if job.lines_scale is not None:
            base = base_rows(start, start + rows.shape[0]).to(torch.float32)  # as stored, for some methods
            rows = lines_scale(rows, base, job.lines_scale)
        data = rows.to(job.dtype).cpu()
        if not whole and data.data_ptr() == rows.data_ptr():
            data = data.clone()  # it is written later, by the writer thread; the method may reuse its block buffer
        emit(start, data)

    if whole:  # aligned embeddings are always planned whole
        with torch_kernels.forced(placement.torch_kernels):
            if job.align:
                sources, base = _aligned_inputs(plan, job, placement, device)
            else:
                sources = [load_source(plan, s, placement, device) for s in job.sources]
                base = load_source(plan, job.base, placement, device) if job.base is not None else None
            base_rows = lambda a, b: base  # one block: the whole base
            out(0, _merge_whole(plan, job, seed, sources, base))
    elif job.mode == "rows":
        for start in range(0, job.shape[0], job.block_rows):
            end = min(job.shape[0], start + job.block_rows)
            sources = [load_rows(plan, s, start, end) for s in job.sources]
            base = load_rows(plan, job.base, start, end) if job.base is not None else None
            base_rows = lambda a, b, base=base: base  # this block's base rows
            out(start, _merge_whole(plan, job, seed, sources, base))
    else:
        kept: dict[tuple[int, int, int], torch.Tensor] = {}

        def read(i: int, start: int, end: int) -> torch.Tensor:
            rows = kept.get((i, start, end))
            if rows is None:
                rows = load_rows(plan, job.base if i < 0 else job.sources[i], start, end)
                if job.cached:  # read once, then every pass of the method reuses it
                    kept[(i, start, end)] = rows
            return rows

        base_rows = lambda a, b: read(-1, a, b)  # the blocks the method emits
        stream_inputs = StreamInputs(
            shape=job.shape,
            n_models=len(job.sources),
            read=read,
            emit=out,
            model_params=job.model_params,
            name=job.name,
            generator=generator_for(seed, job.name) if plan.method.randomized else None,
            chunk_rows=job.block_rows,
        )
        try:
            plan.method.stream(stream_inputs, job.params)
        except ValueError as exc:
            raise InputModelError(f"{plan.method.name} failed at tensor '{job.name}': {exc}") from None


def execute(
    plan: MergePlan,
    out_dir: Path,
    *,
    seed: int = 0,
    threads: int = 2,
    memory_budget: int | None = None,
    quiet: bool = False,
    metadata: dict[str, str] | None = None,
    journal: Journal | None = None,
    shards: Collection[str] | None = None,
    placement: Placement = CPU,
) -> int:
    """Compute every planned tensor (of `shards` only, when given) and write the shards into `out_dir` (which
    must exist). `placement` says where the math runs (see `mergelib.merging.device`): output tensors go to its
    devices in turn, each device under its own memory budget.

    Shards the journal lists as complete and verified are kept as they are; each shard finished here is synced,
    hashed and recorded. Returns the number of shards reused.
    """
    out_dir = Path(out_dir)
    if plan.method.global_top_k:  # one magnitude cut per model over all its tensors: counted before any merge
        from mergelib.merging.global_pass import with_kept_counts

        plan = with_kept_counts(plan, lambda job: task_vector_magnitudes(plan, job))
    kept = journal.verified() if journal is not None else set()
    reused = kept | (set(plan.shards) - set(shards) if shards is not None else set())  # not written here
    shard_of = {slot.name: fname for fname, slots in plan.shards.items() for slot in slots}
    jobs = [job for job in plan.jobs if shard_of[job.name] not in reused]
    # Within each shard the largest tensors start first, so the threads finish together instead of one of them
    # merging the last big tensor (an embedding, a head) alone; shards complete roughly in order (the journal
    # resumes by shard, in any order). The bytes do not depend on the order.
    shard_rank = {fname: i for i, fname in enumerate(plan.shards)}
    jobs.sort(key=lambda job: (shard_rank[shard_of[job.name]], -job.work_bytes))
    remaining = {fname: len(slots) for fname, slots in plan.shards.items() if fname not in reused}
    files: dict[str, ShardFile] = {}
    host_budget = memory_budget or default_memory_budget(plan, threads)
    budgets = {d: MemoryBudget(placement.budget_for(d, host_budget)) for d in placement.devices}
    device_of = {job.name: placement.device_for(i) for i, job in enumerate(plan.jobs)}
    skipped = sum(j.out_bytes for j in plan.jobs) - sum(j.out_bytes for j in jobs)
    bar = tqdm(total=plan.bytes_written, initial=skipped, unit="B", unit_scale=True, desc="merging",
               disable=True if quiet else None, leave=False)  # None: off when stderr is not a terminal
    done = 0
    lock = threading.Lock()

    def shard_file(fname: str) -> ShardFile:
        with lock:
            if fname not in files:
                files[fname] = ShardFile(out_dir / fname, plan.shards[fname], metadata)
            return files[fname]

    writes = WriteQueue()  # one writer thread: workers go on computing while their results reach the disk

    def finish(fname: str) -> None:  # on the writer thread, after every write of the shard
        handle = files[fname]
        handle.close()
        if journal is not None:
            completed = journal.record(fname, handle.digest())
            failpoint("after-shard", completed)

    def run(job: TensorJob, held: int) -> None:
        nonlocal done
        fname = shard_of[job.name]
        device = device_of[job.name]
        try:
            shard = shard_file(fname)

            def emit(start: int, rows: torch.Tensor) -> None:
                whole = job.mode == "whole" or placement.torch_kernels
                writes.write(shard, job.name, rows, None if whole else start)

            compute(plan, job, seed, emit, placement, device)
        except BaseException:  # whatever fails (opening the shard on a full disk included), the memory goes back
            budgets[device].release(held)
            raise
        # the job's results are in the queue: its memory goes back once they are written (or the writer failed)
        writes.call(lambda: budgets[device].release(held), always=True)
        with lock:
            done += 1
            count = done
            remaining[fname] -= 1
            last = remaining[fname] == 0
            bar.update(job.out_bytes)
            bar.set_postfix_str(f"{done + len(plan.jobs) - len(jobs)}/{len(plan.jobs)} tensors", refresh=False)
        failpoint("mid-shard", count)
        if last:
            writes.call(lambda: finish(fname))

    _reuse_freed_memory()
    fused.load_numba_target()  # here, before the workers: its imports are not thread-safe
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # OpenMP's thread count is per thread: each worker sets its own to 1, or LAPACK/BLAS calls (SVDs, products)
    # would split over the cores and sum in an order that depends on scheduling
    pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="mergelib",
                              initializer=torch.set_num_threads, initargs=(1,))
    futures: list[Future] = []
    try:
        def cancel_all(future: Future) -> None:
            if not future.cancelled() and future.exception():
                for budget in budgets.values():
                    budget.cancel()

        def work_of(job: TensorJob) -> int:
            return device_work_bytes(job) if placement.torch_kernels else job.work_bytes

        pending = list(jobs)
        while pending:
            # The first job in order whose memory fits now starts; a later, smaller one may pass a large one that
            # waits for room (the threads stay busy beside it). When none fits, wait for the first one's room.
            fits = ((k, held) for k, job in enumerate(pending)
                    if (held := budgets[device_of[job.name]].try_acquire(work_of(job))) is not None)
            k, held = next(fits, (0, None))
            if held is None:
                held = budgets[device_of[pending[0].name]].acquire(work_of(pending[0]))
            if held is None:  # a job failed: submit nothing more
                break
            job = pending.pop(k)
            future = pool.submit(run, job, held)
            future.add_done_callback(cancel_all)
            futures.append(future)
        wait(futures, return_when=FIRST_EXCEPTION)  # returns when all are done unless one failed
        for future in futures:
            if future.done() and future.exception() is not None:
                raise future.exception()
        writes.close()  # every queued write done (its failure raised here)
    except BaseException:
        for future in futures:
            future.cancel()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        writes.close(abandon=True)  # after a failure: drop what is queued, keep the first error raised above
        torch.set_num_threads(previous_threads)
        for handle in files.values():
            handle.close()
        bar.close()
    return len(kept)


__all__ = ["MemoryBudget", "MergelibError", "compute", "execute", "default_memory_budget", "load_source"]
