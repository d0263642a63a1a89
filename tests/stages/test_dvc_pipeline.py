"""`dvc repro` end to end in a temporary git repository holding a copy of the working tree.

One test function walks the steps in order (a module fixture could be built twice under pytest-xdist):
repro with tracking; `python -m stages.merge method=ties density=0.5` as written; the rebuild guarantee (delete the
outputs and DVC's cache, repro, same bytes); an eval-only experiment that must not re-run the merge.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
import yaml
from stage_cli import copy_worktree, run, stage, stage_env

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")  # mlflow
STAGES = ("fetch", "merge", "tokenizer", "evaluate", "export", "publish")
PRODUCTS = ("models", "outputs", "reports/metrics.json", "reports/eval_samples.json")


def digests(root: Path) -> dict[str, str]:
    """sha256 of every file the pipeline produces, except timings (reports/merge.json)."""
    out = {}
    for rel in PRODUCTS:
        path = root / rel
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            out[f.relative_to(root).as_posix()] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def git(args: list[str], repo: Path, env: dict) -> None:
    proc = run(["git", *args], repo, env)
    assert proc.returncode == 0, proc.stderr


def dvc(args: list[str], repo: Path, env: dict):
    proc = run(["dvc", *args], repo, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def new_repo(tmp: Path) -> tuple[Path, dict]:
    """A git repository with one commit holding the working tree's files, and its isolated environment."""
    env = stage_env(tmp)
    root = copy_worktree(tmp / "repo")
    git(["init", "-q"], root, env)
    git(["add", "-A"], root, env)
    git(["commit", "-qm", "copy of the working tree"], root, env)
    return root, env


def check_tracking(env: dict, merge_run_id: str) -> None:
    """The repro's six stage runs share one pipeline run; the stage-command run logged its config and inputs."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("mergelib")
    runs = client.search_runs([exp.experiment_id], "tags.`mergelib.role` = 'stage'")
    repro = [r for r in runs if r.info.run_id != merge_run_id]
    assert sorted(r.data.tags["mergelib.stage"] for r in repro) == sorted(STAGES)
    parents = {r.data.tags["mlflow.parentRunId"] for r in repro}
    assert len(parents) == 1
    parent = client.get_run(parents.pop())
    assert parent.data.tags["mergelib.role"] == "pipeline" and parent.data.params["method"] == "ties"
    assert {"eval.quick.perplexity", "merge.seconds", "merge.peak_rss_mb"} <= set(parent.data.metrics)
    assert all(r.data.tags.get("mlflow.source.git.commit") for r in repro)

    own = client.get_run(merge_run_id)
    assert own.info.status == "FINISHED" and own.info.run_name == "merge"
    assert own.data.tags["mlflow.parentRunId"] not in {r.data.tags["mlflow.parentRunId"] for r in repro}
    assert own.data.params["method"] == "ties" and own.data.params["merge.parameters.density"] == "0.5"
    assert own.data.params["inputs.0.ref"] == "models/demo/base" and len(own.data.params["inputs.0.sha256"]) == 64
    artifacts = {a.path for a in client.list_artifacts(merge_run_id, "merged")}
    assert {"merged/mergekit_config.yml", "merged/README.md", "merged/lock.json"} <= artifacts


def test_repro_stage_command_rebuild_and_eval_only_change(tmp_path):
    root, env = new_repo(tmp_path)
    started = time.perf_counter()
    first = dvc(["repro"], root, env)
    print(f"dvc repro: {time.perf_counter() - started:.1f} s")
    for name in STAGES:
        assert f"Running stage '{name}'" in first.stdout
    assert "Data and pipelines are up to date" in dvc(["status"], root, env).stdout
    before = digests(root)
    assert any(k.startswith("outputs/merged/") and k.endswith(".safetensors") for k in before)

    # The same merge typed by hand with the defaults as overrides: composed from conf/, same bytes as the repro.
    proc = stage("merge", "method=ties", "density=0.5", cwd=root, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "merge: wrote " in proc.stdout and "outputs/merged" in proc.stdout
    run_id = re.search(r"mlflow run ([0-9a-f]{32})", proc.stdout).group(1)
    assert digests(root) == before
    out = root / "outputs/merged"
    recipe = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert recipe["merge_method"] == "ties" and recipe["parameters"] == {"density": 0.5, "weight": 1.0}
    lock = {m["ref"]: m for m in json.loads((root / "models/demo/lock.json").read_text())["models"]}
    for entry in json.loads((out / "mergelib_run.json").read_text())["inputs"]:  # read exactly the locked bytes
        assert entry["files"] == {k: v for k, v in lock[entry["model"]]["files"].items() if k in entry["files"]}
    check_tracking(env, run_id)

    # Rebuild: nothing left to restore from, every stage runs again, every byte is the same.
    for rel in ("outputs", "models", "reports/metrics.json", "reports/eval_samples.json", ".dvc/cache"):
        path = root / rel
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    rebuilt = dvc(["repro"], root, {**env, "MERGELIB_TRACKING": "off"})
    for name in STAGES:
        assert f"Running stage '{name}'" in rebuilt.stdout
    assert digests(root) == before

    # An eval knob re-runs only the evaluation.
    git(["add", "-A"], root, env)
    git(["commit", "-qm", "pipeline outputs"], root, env)
    exp = dvc(["exp", "run", "-S", "eval.max_new_tokens=4"], root, {**env, "MERGELIB_TRACKING": "off"})
    assert "Running stage 'evaluate'" in exp.stdout
    for name in ("fetch", "merge", "tokenizer", "export", "publish"):
        assert f"Stage '{name}' didn't change, skipping" in exp.stdout
    after = digests(root)
    assert {k: v for k, v in after.items() if "eval_samples" not in k} == {
        k: v for k, v in before.items() if "eval_samples" not in k
    }
    shown = list(csv.DictReader(io.StringIO(dvc(["exp", "show", "--csv"], root, env).stdout)))
    assert {row["eval.max_new_tokens"] for row in shown} >= {"4", "8"}


@pytest.mark.slow
def test_experiments_compare_and_queue(tmp_path):
    root, env = new_repo(tmp_path)
    env = {**env, "MERGELIB_TRACKING": "off"}
    dvc(["repro"], root, env)
    git(["add", "-A"], root, env)
    git(["commit", "-qm", "pipeline outputs"], root, env)
    exp = dvc(["exp", "run", "-S", "method=dare_ties", "-S", "density=0.3"], root, env)
    assert "Running stage 'merge'" in exp.stdout
    dvc(["exp", "run", "--queue", "-S", "method=task_arithmetic", "-S", "weight=0.8", "-n", "ta"], root, env)
    dvc(["exp", "run", "--queue", "-S", "experiment=slerp", "-n", "slerp"], root, env)
    dvc(["queue", "start", "-j", "1"], root, env)
    deadline = time.time() + 540
    status = ""
    while time.time() < deadline:
        status = dvc(["queue", "status"], root, env).stdout
        if "Running" not in status and "Queued" not in status:
            break
        time.sleep(5)
    assert "Failed" not in status, status
    rows = list(csv.DictReader(io.StringIO(dvc(["exp", "show", "--csv"], root, env).stdout)))
    assert {("ta", "task_arithmetic"), ("slerp", "slerp")} <= {(row["Experiment"], row["method"]) for row in rows}
    assert any(row["method"] == "dare_ties" and row["density"] == "0.3" for row in rows)
    perplexity = {row["method"]: row["eval.quick.perplexity"] for row in rows if row["eval.quick.perplexity"]}
    assert len(set(perplexity.values())) == len(perplexity) >= 4  # four methods, four different models


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
