"""MLflow adapter: one run per stage execution, nested under one parent run per pipeline execution.

The store is `MLFLOW_TRACKING_URI` when set (a shared server), else `sqlite:///<project>/mlflow.db` with artifacts
in `<project>/mlartifacts`, where <project> is DVC_ROOT (DVC sets it to the parent repo even for temp/queued
experiments, whose cwd is thrown away) or the working directory. Stages started by one `dvc repro` / `dvc exp run`
process share that process, hence one parent run; `MERGELIB_PIPELINE_ID` names the group explicitly.
`MERGELIB_TRACKING=off` skips MLflow entirely (the stage's outputs are the same either way).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

EXPERIMENT = "mergelib"
# MLflow 3 opens an experiment without a kind on its GenAI "Traces" page; runs of model development open the list
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
MAX_PARAM_CHARS = 6000  # MLflow's limit on one param value
BATCH = 100  # MLflow's limit on params per log_batch call


def project_root() -> Path:
    """Where the default store lives: DVC_ROOT when DVC runs the stage, else the working directory."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri(root: Path | None = None) -> str:
    """MLFLOW_TRACKING_URI when set, else the project's SQLite file."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root or project_root()) / 'mlflow.db'}"


def git_commit(cwd: Path | None = None) -> str | None:
    """HEAD's sha, with '-dirty' when tracked files changed; None outside git or before the first commit."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def pipeline_id() -> str:
    """The group a stage run belongs to: MERGELIB_PIPELINE_ID, else the enclosing dvc process, else this process."""
    explicit = os.environ.get("MERGELIB_PIPELINE_ID")
    if explicit:
        return explicit
    import psutil

    proc = psutil.Process()
    for ancestor in proc.parents():
        try:
            argv = ancestor.cmdline()
        except psutil.Error:
            continue
        if any(os.path.basename(a) == "dvc" for a in argv[:2]) or argv[1:3] == ["-m", "dvc"]:
            proc = ancestor
            break
    return hashlib.sha256(f"{proc.pid}-{proc.create_time()}".encode()).hexdigest()[:12]


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {'a.b': 'value'}; lists become JSON, long values are cut to MLflow's limit."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
            out[name] = text[:MAX_PARAM_CHARS]
    return out


class StageRun:
    """The MLflow run of one stage execution."""

    def __init__(self, client, run_id: str, parent_id: str | None):  # client None: tracking is off
        self.client = client
        self.run_id = run_id
        self.parent_id = parent_id
        self._experiment_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log (flattened) params in batches."""
        if self.client is None:
            return
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten(params).items()]
        for start in range(0, len(items), BATCH):
            self.client.log_batch(self.run_id, params=items[start:start + BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """Log numeric metrics in one batch (one SQLite transaction), on this run and on the pipeline run."""
        if self.client is None:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        for run_id in (self.run_id, self.parent_id):
            if items and run_id:
                self.client.log_batch(run_id, metrics=items)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags in one batch."""
        if self.client is None:
            return
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_child(self, name: str, params: Mapping[str, Any], metrics: Mapping[str, float],
                  tags: Mapping[str, Any] | None = None, status: str = "FINISHED") -> str | None:
        """A finished run nested under this one (a search trial): params, metrics and tags in one go; its id."""
        if self.client is None:
            return None
        import time

        from mlflow.entities import Metric, Param

        if self._experiment_id is None:
            self._experiment_id = self.client.get_run(self.run_id).info.experiment_id
        run = self.client.create_run(self._experiment_id, run_name=name, tags={
            "mlflow.parentRunId": self.run_id, "mergelib.role": "trial", **{k: str(v) for k, v in (tags or {}).items()},
        })
        now = int(time.time() * 1000)
        items = [Param(k, v) for k, v in flatten(params).items()]
        for start in range(0, max(len(items), 1), BATCH):  # one transaction for a trial's params and metrics
            self.client.log_batch(run.info.run_id, params=items[start:start + BATCH], metrics=[] if start else [
                Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None])
        self.client.set_terminated(run.info.run_id, status)
        return run.info.run_id

    def log_markdown(self, path: str | Path, artifact_path: str, name: str) -> None:
        """Log a markdown file without its YAML front matter (the Hub's metadata block), which MLflow's viewer
        shows as a garbled list, as `artifact_path/name`."""
        path = Path(path)
        if self.client is None or not path.is_file():
            return
        self.client.log_text(self.run_id, strip_front_matter(path.read_text()), f"{artifact_path}/{name}")

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a file (or a directory's files) into the run's artifacts."""
        path = Path(path)
        if self.client is None:
            return
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.is_file():
            self.client.log_artifact(self.run_id, str(path), artifact_path)


def _experiment_id(client, root: Path) -> str:
    from mlflow.exceptions import MlflowException

    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    found = client.get_experiment_by_name(name)
    if found is None:
        location = None if os.environ.get("MLFLOW_TRACKING_URI") else (root / "mlartifacts").as_uri()
        try:
            experiment_id = client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)
        except MlflowException:  # another stage process created it first
            found = client.get_experiment_by_name(name)
        else:
            return experiment_id
    for key, value in EXPERIMENT_TAGS.items():  # an experiment made before these tags existed
        if found.tags.get(key) != value:
            client.set_experiment_tag(found.experiment_id, key, value)
    return found.experiment_id


def _parent_run(client, experiment_id: str, group: str, tags: Mapping[str, str],
                config: Mapping[str, Any]) -> str:
    query = f"tags.`mergelib.pipeline_id` = '{group}' and tags.`mergelib.role` = 'pipeline'"
    runs = client.search_runs([experiment_id], filter_string=query, max_results=1)
    if runs:
        return runs[0].info.run_id
    name = tags.get("dvc.exp_name") or f"pipeline-{group}"
    run = client.create_run(experiment_id, run_name=name, tags={**tags, "mergelib.role": "pipeline"})
    StageRun(client, run.info.run_id, None).log_params(config)  # pipeline runs compare side by side in the UI
    return run.info.run_id


@contextmanager
def stage_run(stage: str, config: Mapping[str, Any]) -> Iterator[StageRun]:
    """An MLflow run for `stage`, with the resolved config as params and provenance as tags; FAILED on error."""
    if os.environ.get("MERGELIB_TRACKING", "").lower() in ("off", "0", "false", "no"):
        yield StageRun(None, "untracked", None)
        return
    import logging

    from mlflow.tracking import MlflowClient

    for name in ("mlflow", "alembic"):  # their INFO lines (DB creation, migrations) are noise in stage output
        logging.getLogger(name).setLevel(logging.WARNING)
    root = project_root()
    client = MlflowClient(tracking_uri=tracking_uri(root))
    experiment_id = _experiment_id(client, root)
    group = pipeline_id()
    tags = {"mergelib.pipeline_id": group}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    for env, tag in (("DVC_EXP_NAME", "dvc.exp_name"), ("DVC_EXP_BASELINE_REV", "dvc.baseline_rev")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    parent = _parent_run(client, experiment_id, group, tags, config)
    run = client.create_run(experiment_id, run_name=stage, tags={
        **tags, "mlflow.parentRunId": parent, "mergelib.role": "stage", "mergelib.stage": stage,
    })
    handle = StageRun(client, run.info.run_id, parent)
    status = "FAILED"
    try:
        handle.log_params(config)
        yield handle
        status = "FINISHED"
    finally:
        client.set_terminated(handle.run_id, status)
        client.set_terminated(parent, "FINISHED" if status == "FINISHED" else "FAILED")


def latest_stage_runs(stages: tuple[str, ...]) -> dict[str, str]:
    """The id of the newest finished run of each stage in the current store (absent: never tracked)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri())
    found = client.get_experiment_by_name(os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT))
    if found is None:
        return {}
    out = {}
    for stage in stages:
        query = f"tags.`mergelib.stage` = '{stage}' and attributes.status = 'FINISHED'"
        runs = client.search_runs([found.experiment_id], filter_string=query, max_results=1,
                                  order_by=["attributes.start_time DESC"])
        if runs:
            out[stage] = runs[0].info.run_id
    return out


def strip_front_matter(text: str) -> str:
    """Markdown without a leading `---` YAML block."""
    if text.startswith("---\n"):
        end = text.find("\n---\n", 4)
        if end != -1:
            return text[end + 5:].lstrip("\n")
    return text
