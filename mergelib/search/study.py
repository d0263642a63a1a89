"""The Optuna study of a search: its storage (the one record of every trial), sampler, pruner, budget and the loop
that asks for trials, hands them to an executor and tells the results.

Budget: a search is done when `trials` trials have finished (complete, pruned, or failed with an error) or its
`timeout_s` has passed. A trial lost mid-run (its process killed: its heartbeat stops; a Ray worker died) is marked
failed as lost and its values are queued again, so it never counts and nothing finished is ever re-run. A re-run of
the same search resumes from the storage; a storage holding a study made with another search config is refused.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from mergelib.errors import ConfigError, MergelibError
from mergelib.search.config import SearchConfig

CONFIG_ATTR = "mergelib.search_config"  # study user attr: digest of what the trials depend on
ERROR_ATTR = "error"  # trial user attr: why it failed (counts toward the budget)
RESULT_ATTR = "result"  # trial user attr: {scores, constraints, seconds}, written once per trial
LOST_ATTR = "lost"  # trial user attr: its worker was lost (does not count; its values are queued again)
STALE_FACTOR = 3  # a running trial whose heartbeat is older than this many intervals is lost


class SearchError(MergelibError):
    """The search cannot start or go on (storage, study, config mismatch)."""


def default_storage() -> str:
    """sqlite:///<project>/optuna.db, beside the default MLflow database."""
    from mergelib.pipeline.tracking import project_root

    return f"sqlite:///{project_root() / 'optuna.db'}"


def open_storage(url: str, heartbeat_s: int):
    """An Optuna RDB storage with heartbeats (SearchError, one line, when it cannot be opened)."""
    import logging

    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    quiet_optuna()
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        return RDBStorage(url, heartbeat_interval=heartbeat_s, grace_period=heartbeat_s * STALE_FACTOR,
                          heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3))
    except Exception as exc:  # SQLAlchemy raises many kinds (ArgumentError, OperationalError, ImportError, ...)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SearchError(f"search.storage '{url}': cannot open it ({first}); give an RDB URL such as "
                          "sqlite:///path/optuna.db or postgresql://host/db") from None


def quiet_optuna() -> None:
    """Optuna's INFO lines and the warnings about what we use on purpose: heartbeats with ask-and-tell (we record
    them ourselves) and features it marks experimental."""
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


def make_sampler(search: SearchConfig, resumed_at: int = 0):
    """The seeded sampler the config names. A study resumed with `resumed_at` trials in its storage gets a seed
    derived from both, so it does not draw the values of its first trials again (a fresh study: the seed itself)."""
    import optuna

    seed = search.seed if not resumed_at else int.from_bytes(
        hashlib.sha256(f"{search.seed}/{resumed_at}".encode()).digest()[:4], "little")

    if search.sampler == "tpe":  # floors reach TPE and NSGA-II as the trials' constraints (_record)
        return optuna.samplers.TPESampler(seed=seed, constant_liar=search.executor == "ray")
    if search.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if search.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def trial_result(trial) -> dict[str, Any]:
    """What a finished trial recorded: `scores` (task -> exact match), `constraints` (floor - share per floored
    task) and `seconds` (setup, merge, eval); empty for a failed or lost one."""
    return trial.user_attrs.get(RESULT_ATTR, {})


def feasible(trial) -> bool:
    """Whether a finished trial kept every floor (True when the objective has none)."""
    return all(v <= 0 for v in trial_result(trial).get("constraints", []))


def make_pruner(search: SearchConfig):
    """Median pruning on the partial score (single objective), else none."""
    import optuna

    if search.pruner == "median" and not search.pareto:
        return optuna.pruners.MedianPruner(n_startup_trials=search.startup_trials, n_warmup_steps=0)
    return optuna.pruners.NopPruner()


def inputs_identity(paths: list[str]) -> list[dict[str, str]]:
    """The sha256 of every file of each input model: a changed input starts a new study instead of resuming one
    scored on other weights (the pipeline passes the fetch lock's digests instead of hashing again)."""
    from pathlib import Path

    from mergelib.io.hashing import hash_model_dir

    return [hash_model_dir(Path(p)) if Path(p).is_dir() else {} for p in paths]


def config_digest(search: SearchConfig, recipe: Mapping[str, Any], inputs: list | None = None) -> str:
    """What a trial's result depends on: the space, objective, sampler, seed, recipe and input files (not the
    budget, executor or storage, which may change between runs of one study)."""
    keep = search.model_dump(mode="json", exclude={"trials", "timeout_s", "executor", "workers", "resources",
                                                   "storage", "heartbeat_s", "study"})
    blob = json.dumps({"search": keep, "recipe": recipe, "inputs": inputs or []}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def open_study(search: SearchConfig, storage, name: str, digest: str):
    """Create the study, or load it to resume; refuse one made with another search config."""
    import optuna

    directions = ["maximize"] * (len(search.objective.tasks) if search.pareto else 1)
    study = optuna.create_study(storage=storage, study_name=name, sampler=make_sampler(search),
                                pruner=make_pruner(search), directions=directions, load_if_exists=True)
    found = study.user_attrs.get(CONFIG_ATTR)
    if found is None:
        if study.trials:
            raise SearchError(f"search.study '{name}': the storage holds a study of that name not made by mergelib; "
                              "name another study (search.study=NAME)")
        study.set_user_attr(CONFIG_ATTR, digest)
    elif found != digest:
        raise SearchError(f"search.study '{name}' was started with another search config, recipe or inputs; resume "
                          "it with the same ones, or start a new study (search.study=NAME)")
    if [d.name.lower() for d in study.directions] != directions:
        raise SearchError(f"search.study '{name}': its objectives differ from the config's; start a new study")
    resumed_at = len(study.get_trials(deepcopy=False))
    if resumed_at:
        study.sampler = make_sampler(search, resumed_at)
    return study


def finished(study) -> int:
    """Trials that count toward the budget: complete, pruned, or failed with an error (not lost)."""
    from optuna.trial import TrialState

    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED)
               or (t.state == TrialState.FAIL and ERROR_ATTR in t.user_attrs)
               for t in study.get_trials(deepcopy=False))


def running(study) -> set[int]:
    """Numbers of the trials the storage says are running (here or on another machine)."""
    from optuna.trial import TrialState

    return {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}


class Heartbeat:
    """Records a heartbeat for every trial in flight, every `interval` seconds, from a thread."""

    def __init__(self, storage, interval: float):
        self.storage, self.interval = storage, interval
        self.trial_ids: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="search-heartbeat")

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def add(self, trial_id: int) -> None:
        with self._lock:
            self.trial_ids.add(trial_id)
        self.storage.record_heartbeat(trial_id)

    def remove(self, trial_id: int) -> None:
        with self._lock:
            self.trial_ids.discard(trial_id)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                ids = list(self.trial_ids)
            for trial_id in ids:
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception:  # a trial finished between the copy and the write: nothing to keep alive
                    pass


Outcome = Callable[[Any, Any, BaseException | None], None]  # (trial, TrialResult or None, error or None)


def drive(study, storage, search: SearchConfig, suggest: Callable, make_job: Callable, executor,
          on_done: Outcome, log=print) -> dict[str, int]:
    """Ask, run and tell trials until the budget is spent; returns counts of what this call ran."""
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    deadline = time.monotonic() + search.timeout_s if search.timeout_s else None
    budget = search.trials if search.trials is not None else float("inf")
    counts = {"complete": 0, "pruned": 0, "failed": 0, "lost": 0}
    in_flight: dict[int, Any] = {}  # trial number -> trial
    with Heartbeat(storage, search.heartbeat_s) as heartbeat:
        while True:
            fail_stale_trials(study)
            elsewhere = running(study) - set(in_flight)
            room = budget - finished(study) - len(in_flight) - len(elsewhere)
            open_time = deadline is None or time.monotonic() < deadline
            while open_time and room > 0 and len(in_flight) < executor.capacity:
                trial = study.ask()
                values = suggest(trial)
                heartbeat.add(trial._trial_id)
                in_flight[trial.number] = trial
                executor.submit(trial, make_job(trial, values))
                room -= 1
            if not in_flight:
                if elsewhere and open_time and room + len(elsewhere) > 0:
                    time.sleep(min(search.heartbeat_s, 5))  # wait for trials running elsewhere (or going stale)
                    continue
                break
            trial, result, error = executor.wait_one()
            in_flight.pop(trial.number)
            heartbeat.remove(trial._trial_id)
            if error is not None and executor.lost(error):
                trial.set_user_attr(LOST_ATTR, _one_line(error))
                study.tell(trial, state=TrialState.FAIL)
                study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
                counts["lost"] += 1
                log(f"search: trial {trial.number} lost ({_one_line(error)}); its values are queued again")
            elif error is not None:
                trial.set_user_attr(ERROR_ATTR, _one_line(error))
                study.tell(trial, state=TrialState.FAIL)
                counts["failed"] += 1
                log(f"search: trial {trial.number} failed: {_one_line(error)}")
            elif result.pruned:
                _record(trial, result, search)
                study.tell(trial, state=TrialState.PRUNED)
                counts["pruned"] += 1
            else:
                _record(trial, result, search)
                study.tell(trial, result.values if len(result.values) > 1 else result.values[0])
                counts["complete"] += 1
            on_done(trial, result, error)
    return counts


def _record(trial, result, search: SearchConfig) -> None:
    trial.set_user_attr(RESULT_ATTR, {  # one write: each attribute is a storage transaction
        "scores": result.scores, "constraints": result.constraints,
        "seconds": {k: round(v, 4) for k, v in (("setup", result.setup_s), ("merge", result.merge_s),
                                                 ("eval", result.eval_s))},
    })
    for task, value in zip(sorted(search.objective.floor), result.constraints):  # what TPE and NSGA-II steer by
        trial.set_constraint(f"floor.{task}", value)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if isinstance(error, (MergelibError, ConfigError)) else f"{type(error).__name__}: {text}"[:500]
