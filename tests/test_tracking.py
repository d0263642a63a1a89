"""MLflow adapter: a stage run logs the resolved config, provenance, metrics and artifacts; stage runs of one pipeline
execution share a parent run; a failing stage is marked FAILED; the default store follows DVC_ROOT."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mergelib.pipeline import tracking

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")  # mlflow


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A private SQLite store; returns a client on it."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.delenv("MERGELIB_TRACKING", raising=False)
    monkeypatch.setenv("MERGELIB_PIPELINE_ID", "group-a")
    return MlflowClient(tracking_uri=uri)


def test_flatten_nested_config():
    flat = tracking.flatten({"a": {"b": 1, "c": {"d": "x"}}, "l": [1, {"m": 2}], "e": {}, "n": None, "s": "t"})
    assert flat == {"a.b": "1", "a.c.d": "x", "l": '[1, {"m": 2}]', "e": "{}", "n": "null", "s": "t"}
    assert len(tracking.flatten({"k": "x" * 9000})["k"]) == tracking.MAX_PARAM_CHARS


def test_stage_run_logs_config_provenance_metrics_and_artifacts(store, tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "brave-exp")
    report = tmp_path / "report.json"
    report.write_text("{}\n")
    config = {"method": "ties", "merge": {"parameters": {"density": 0.5}}, "eval": {"texts": ["a", "b"]}}
    with tracking.stage_run("merge", config) as run:
        run.log_metrics({"merge.seconds": 1.5, "merge.tensors": 39})
        run.log_artifact(report, "reports")
        run.log_artifact(tmp_path / "absent.json")  # a missing file is skipped, not an error
    got = store.get_run(run.run_id)
    assert got.info.status == "FINISHED" and got.info.run_name == "merge"
    assert got.data.params == {"method": "ties", "merge.parameters.density": "0.5", "eval.texts": '["a", "b"]'}
    assert got.data.metrics == {"merge.seconds": 1.5, "merge.tensors": 39.0}
    assert got.data.tags["mergelib.stage"] == "merge" and got.data.tags["dvc.exp_name"] == "brave-exp"
    assert got.data.tags["mlflow.parentRunId"] == run.parent_id
    assert [a.path for a in store.list_artifacts(run.run_id, "reports")] == ["reports/report.json"]
    parent = store.get_run(run.parent_id)
    assert parent.info.run_name == "brave-exp" and parent.data.tags["mergelib.role"] == "pipeline"
    assert parent.data.params == got.data.params and parent.data.metrics == got.data.metrics


def test_stages_of_one_pipeline_share_a_parent(store, monkeypatch):
    with tracking.stage_run("fetch", {"k": 1}) as first:
        pass
    with tracking.stage_run("merge", {"k": 1}) as second:
        pass
    monkeypatch.setenv("MERGELIB_PIPELINE_ID", "group-b")
    with tracking.stage_run("merge", {"k": 2}) as other:
        pass
    assert first.parent_id == second.parent_id != other.parent_id
    runs = store.search_runs([store.get_experiment_by_name("mergelib").experiment_id],
                             "tags.`mergelib.role` = 'pipeline'")
    assert sorted(r.data.tags["mergelib.pipeline_id"] for r in runs) == ["group-a", "group-b"]


def test_failed_stage_is_marked_failed(store):
    with pytest.raises(RuntimeError):
        with tracking.stage_run("evaluate", {"k": 1}) as run:
            raise RuntimeError("boom")
    assert store.get_run(run.run_id).info.status == "FAILED"
    assert store.get_run(run.parent_id).info.status == "FAILED"


def test_tracking_off_logs_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'never.db'}")
    monkeypatch.setenv("MERGELIB_TRACKING", "off")
    with tracking.stage_run("merge", {"k": 1}) as run:
        run.log_metrics({"x": 1.0})
        run.log_artifact(tmp_path)
    assert run.run_id == "untracked" and not (tmp_path / "never.db").exists()


def test_default_store_follows_dvc_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.delenv("DVC_ROOT")
    monkeypatch.chdir(tmp_path)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert tracking.tracking_uri() == "http://mlflow.example:5000"


def test_pipeline_id_is_the_enclosing_dvc_process(tmp_path, monkeypatch):
    """Two children of one process named `dvc` get that process's id; a child of another process gets another."""
    monkeypatch.delenv("MERGELIB_PIPELINE_ID", raising=False)
    fake = tmp_path / "dvc"  # a script whose argv[1] is named dvc, as `.venv/bin/dvc` runs under python
    child = (  # loads tracking.py alone: no need to import torch through the mergelib package
        "import importlib.util as u; s = u.spec_from_file_location('t', %r); m = u.module_from_spec(s); "
        "s.loader.exec_module(m); print(m.pipeline_id())" % tracking.__file__
    )
    fake.write_text(f"import subprocess, sys\nfor _ in range(2):\n    subprocess.run([sys.executable, '-c', {child!r}])\n")
    env = {k: v for k, v in os.environ.items() if k != "MERGELIB_PIPELINE_ID"}
    ids = subprocess.run([sys.executable, str(fake)], capture_output=True, text=True, env=env).stdout.split()
    other = subprocess.run([sys.executable, str(fake)], capture_output=True, text=True, env=env).stdout.split()
    assert len(ids) == 2 and ids[0] == ids[1] and len(ids[0]) == 12
    assert other[0] == other[1] != ids[0]


def test_git_commit(tmp_path):
    assert tracking.git_commit(tmp_path) is None  # not a repository
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "f").write_text("1")
    subprocess.run(["git", "add", "f"], cwd=tmp_path, check=True)
    subprocess.run(["git", "commit", "-qm", "c"], cwd=tmp_path, check=True, env=env)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert tracking.git_commit(tmp_path) == head
    (tmp_path / "f").write_text("2")
    assert tracking.git_commit(tmp_path) == head + "-dirty"


def test_the_experiment_opens_on_its_runs_and_cards_render(store, tmp_path):
    """MLflow 3 opens an experiment of no kind on an empty GenAI Traces page, and shows a card's YAML front matter
    as a garbled list; the experiment is marked model development, the card logged without its header."""
    card = tmp_path / "README.md"
    card.write_text("---\nlibrary_name: transformers\ntags:\n- merge\n---\n\n# merged-model\n\nBody.\n")
    with tracking.stage_run("merge", {"k": 1}) as run:
        run.log_markdown(card, "merged", "README.md")
    experiment = store.get_experiment(store.get_run(run.run_id).info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    local = store.download_artifacts(run.run_id, "merged/README.md", str(tmp_path / "dl"))
    assert open(local).read() == "# merged-model\n\nBody.\n"
    assert tracking.strip_front_matter("# no header\n") == "# no header\n"


def test_an_experiment_made_before_the_tag_gets_it(store):
    store.create_experiment("mergelib")
    with tracking.stage_run("fetch", {"k": 1}) as run:
        pass
    assert store.get_experiment(store.get_run(run.run_id).info.experiment_id).tags["mlflow.experimentKind"] == \
        "custom_model_development"
