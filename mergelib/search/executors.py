"""Where trials run: in this process one at a time (`serial`), or as Ray tasks (`ray`: a local Ray by default, the
cluster at RAY_ADDRESS), each declaring the CPUs, GPUs and memory it needs. Both run mergelib.search.trial.run_trial;
a trial reports its partial score to the study's storage, where the pruner decides.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any

from mergelib.search.config import SearchConfig
from mergelib.search.trial import TrialJob, run_trial


def _pruning_callback(trial):
    def should_stop(step: int, value: float) -> bool:
        trial.report(value, step)
        return trial.should_prune()

    return should_stop


class SerialExecutor:
    """Runs each trial in this process when the driver waits for it."""

    capacity = 1

    def __init__(self, search: SearchConfig):
        self.search = search
        self.queue: deque = deque()

    def submit(self, trial, job: TrialJob) -> None:
        self.queue.append((trial, job))

    def wait_one(self) -> tuple[Any, Any, BaseException | None]:
        trial, job = self.queue.popleft()
        try:
            return trial, run_trial(job, _pruning_callback(trial) if job.prune_after else None), None
        except Exception as exc:  # recorded on the trial; the search goes on
            return trial, None, exc

    def lost(self, error: BaseException) -> bool:
        return False

    def close(self) -> None:
        pass


def _remote_trial(job: TrialJob, storage_url: str, study_name: str, trial_id: int, search: SearchConfig):
    """A Ray task's body: the trial, pruning through the shared storage."""
    import optuna

    from mergelib.search.study import make_pruner, quiet_optuna

    should_stop = None
    if job.prune_after:
        quiet_optuna()
        study = optuna.load_study(study_name=study_name, storage=storage_url, pruner=make_pruner(search))
        should_stop = _pruning_callback(optuna.trial.Trial(study, trial_id))
    return run_trial(job, should_stop)


class RayExecutor:
    """Runs up to `workers` trials at once as Ray tasks; a task whose worker dies is reported lost."""

    def __init__(self, search: SearchConfig, storage_url: str, study_name: str):
        import ray

        self.search, self.storage_url, self.study_name = search, storage_url, study_name
        self.capacity = search.workers
        address = os.environ.get("RAY_ADDRESS") or None
        if not ray.is_initialized():
            kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
            if address is None:  # a local Ray sized for the trials in flight
                kwargs["num_cpus"] = max(1, int(search.workers * search.resources.cpus + 0.999))
                kwargs["num_gpus"] = int(search.workers * search.resources.gpus + 0.999)
            ray.init(address=address, **kwargs)
        self._started_ray = address is None
        res = search.resources
        self._task = ray.remote(_remote_trial).options(
            num_cpus=res.cpus, num_gpus=res.gpus, memory=res.memory_mb * 2**20, max_retries=0)
        self.pending: dict[Any, Any] = {}  # object ref -> trial

    def submit(self, trial, job: TrialJob) -> None:
        ref = self._task.remote(job, self.storage_url, self.study_name, trial._trial_id, self.search)
        self.pending[ref] = trial

    def wait_one(self) -> tuple[Any, Any, BaseException | None]:
        import ray

        done, _ = ray.wait(list(self.pending), num_returns=1)
        trial = self.pending.pop(done[0])
        try:
            return trial, ray.get(done[0]), None
        except ray.exceptions.RayTaskError as exc:  # the trial raised: report its own error
            return trial, None, exc.cause if exc.cause is not None else exc
        except ray.exceptions.RayError as exc:  # the worker or its node died
            return trial, None, exc

    def lost(self, error: BaseException) -> bool:
        import ray

        return isinstance(error, ray.exceptions.RayError) and not isinstance(error, ray.exceptions.RayTaskError)

    def close(self) -> None:
        import ray

        for ref in self.pending:
            ray.cancel(ref, force=True)
        if self._started_ray and ray.is_initialized():
            ray.shutdown()


def make_executor(search: SearchConfig, storage_url: str, study_name: str):
    """The executor the config names."""
    if search.executor == "ray":
        return RayExecutor(search, storage_url, study_name)
    return SerialExecutor(search)
