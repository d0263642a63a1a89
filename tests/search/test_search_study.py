"""Searches end to end on the quick demo family: seeded repeats, failures recorded, SIGKILL mid-trial then resume,
Ray with two workers (one lost), and bad input refused before anything starts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from search_helpers import demo_recipe

from mergelib.search.config import validate_search
from mergelib.search.run import run_search

BIN = Path(sys.executable).parent


def search_data(storage: str, **extra) -> dict:
    data = {"storage": storage, "trials": 8, "startup_trials": 3, "seed": 3, "heartbeat_s": 1,
            "objective": {"tasks": {"demo_add": 1, "demo_rev": 1}, "limit": 24},
            "space": {"method": {"choices": ["task_arithmetic", "ties"]}, "ft_add.weight": {"low": 0.3, "high": 1.5},
                      "ft_rev.weight": {"low": 0.3, "high": 1.5}, "density": {"low": 0.3, "high": 1.0}}}
    return {**data, **extra}


def trials(storage: str, study: str | None = None) -> list:
    if study is None:
        (study,) = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)


def test_same_seed_same_trials_and_best_recipe(demo_quick, tmp_path):
    runs = []
    for i in range(2):
        url = f"sqlite:///{tmp_path}/optuna{i}.db"
        objective = {"tasks": {"demo_add": 1, "demo_rev": 1}, "limit": 24, "floor": {"demo_rev": 0.5}}
        out = run_search(demo_recipe(demo_quick), validate_search(search_data(url, objective=objective), "test"),
                         out_dir=tmp_path / f"o{i}",
                         reports_dir=tmp_path / f"r{i}", log=lambda _: None)
        runs.append(([(t.params, t.state, t.values) for t in trials(url)], (tmp_path / f"o{i}/best.yml").read_bytes(),
                     out))
    (first, best0, out0), (second, best1, _) = runs
    assert first == second and best0 == best1
    # the floor reached every finished trial as an Optuna constraint (what TPE steers by)
    assert all("constraints:floor.demo_rev" in t.system_attrs for t in trials(f"sqlite:///{tmp_path}/optuna0.db"))
    assert len(first) == 8 and len({json.dumps(p, sort_keys=True) for p, _, _ in first}) == 8
    recipe = yaml.safe_load(best0)
    assert recipe["merge_method"] in ("task_arithmetic", "ties") and "base_model" in recipe
    report = (tmp_path / "r0/search_report.md").read_text()
    assert "| default recipe |" in report and "| ft_add |" in report and "held-out" in report
    metrics = json.loads((tmp_path / "r0/search.json").read_text())
    assert metrics["trials"] == 8 and set(metrics["heldout"]) == {"demo_add", "demo_rev"}
    assert (tmp_path / "r0/search_history.png").read_bytes()[:4] == b"\x89PNG"
    assert out0.default["test"].keys() == {"demo_add", "demo_rev"}


def test_a_failing_trial_is_recorded_and_the_search_goes_on(demo_quick, tmp_path, monkeypatch):
    from mergelib.search import executors

    real = executors.run_trial

    def flaky(job, should_stop=None):
        if job.number == 1:
            raise RuntimeError("out of scratch space")
        return real(job, should_stop)

    monkeypatch.setattr(executors, "run_trial", flaky)
    url = f"sqlite:///{tmp_path}/optuna.db"
    out = run_search(demo_recipe(demo_quick), validate_search(search_data(url, trials=4), "test"),
                     out_dir=tmp_path / "o", reports_dir=tmp_path / "r", log=lambda _: None)
    found = trials(url)
    assert [t.state for t in found].count(TrialState.FAIL) == 1 and len(found) == 4
    assert found[1].user_attrs["error"] == "RuntimeError: out of scratch space"
    assert out.counts["failed"] == 1
    assert "out of scratch space" in (tmp_path / "r/search_trials.csv").read_text()


def cli(args, env_extra=None, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "MERGELIB_TRACKING": "off", **(env_extra or {})}
    return subprocess.run([str(BIN / "mergelib"), "search", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def write_config(tmp_path, family, **search) -> Path:
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump({"recipe": demo_recipe(family), "search": search}))
    return path


def test_sigkill_mid_trial_then_rerun_completes_without_repeating(demo_quick, tmp_path):
    url = f"sqlite:///{tmp_path}/optuna.db"
    config = write_config(tmp_path, demo_quick, **search_data(url, pruner="none"))
    args = [str(config), "--out", str(tmp_path / "o"), "--reports", str(tmp_path / "r")]
    killed = cli(args, {"MERGELIB_FAILPOINT": "search-trial:3"})
    assert killed.returncode == -signal.SIGKILL
    before = trials(url)
    assert [t.state for t in before] == [TrialState.COMPLETE] * 3 + [TrialState.RUNNING]
    assert not (tmp_path / "o").exists()
    again = cli(args)
    assert again.returncode == 0, again.stderr
    after = trials(url)
    complete = [t for t in after if t.state == TrialState.COMPLETE]
    assert len(complete) == 8  # the budget, finished trials only
    assert [(t.params, t.values) for t in after[:3]] == [(t.params, t.values) for t in before[:3]]
    assert after[3].state == TrialState.FAIL  # lost with its process, then queued again with the same values
    retried = [t for t in after[4:] if t.params == before[3].params]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE
    keys = [json.dumps(t.params, sort_keys=True) for t in complete]
    assert len(set(keys)) == len(keys)  # nothing finished ran twice
    assert (tmp_path / "o/best.yml").is_file()


def test_ray_two_workers_complete_the_budget_with_a_lost_worker(demo_quick, tmp_path):
    url = f"sqlite:///{tmp_path}/optuna.db"
    config = write_config(tmp_path, demo_quick, **search_data(url, trials=6, executor="ray", workers=2,
                                                              pruner="none", resources={"cpus": 1, "memory_mb": 512}))
    mlflow_db = tmp_path / "mlflow.db"
    proc = cli([str(config), "--out", str(tmp_path / "o"), "--reports", str(tmp_path / "r")],
               {"MERGELIB_FAILPOINT": "search-trial:1", "MERGELIB_TRACKING": "on",
                "MLFLOW_TRACKING_URI": f"sqlite:///{mlflow_db}"})
    assert proc.returncode == 0, proc.stderr
    found = trials(url)
    states = [t.state for t in found]
    assert states.count(TrialState.COMPLETE) == 6 and states.count(TrialState.FAIL) == 1
    lost = next(t for t in found if t.state == TrialState.FAIL)
    assert lost.number == 1 and "lost" in lost.user_attrs
    assert any(t.params == lost.params and t.state == TrialState.COMPLETE for t in found)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{mlflow_db}")
    exp = client.get_experiment_by_name("mergelib")
    search_run = client.search_runs([exp.experiment_id], "tags.`mergelib.stage` = 'search'")[0]
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{search_run.info.run_id}'")
    assert sorted(int(r.data.tags["optuna.trial"]) for r in children) == [t.number for t in found]
    assert {r.info.status for r in children} == {"FINISHED", "FAILED"}


@pytest.mark.parametrize("search, message", [
    ({"space": {"t": {"low": 0.0, "high": 1.0}}}, "search.space.t: task_arithmetic does not take 't'"),
    ({"space": {"density": {"low": 0.8, "high": 0.2}}}, "empty range"),
    ({"sampler": "annealing"}, "search.sampler: Input should be"),
    ({"storage": "sqlite:////nonexistent/dir/optuna.db"}, "search.storage 'sqlite:////nonexistent/dir/optuna.db': "
                                                          "cannot open it"),
])
def test_bad_input_is_one_line_exit_2_nothing_started(demo_quick, tmp_path, search, message):
    url = f"sqlite:///{tmp_path}/optuna.db"
    data = search_data(url)
    data.update({k: v for k, v in search.items() if k != "space"})
    if "space" in search:
        data["space"] = search["space"]
    config = write_config(tmp_path, demo_quick, **data)
    proc = cli([str(config), "--out", str(tmp_path / "o"), "--reports", str(tmp_path / "r")])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "o").exists() and not (tmp_path / "r").exists()


@pytest.mark.parametrize("sampler", ["tpe", "cmaes", "random"])
def test_every_sampler_repeats_itself_for_a_seed(demo_quick, tmp_path, sampler):
    seen = []
    for i in range(2):
        url = f"sqlite:///{tmp_path}/optuna{i}.db"
        data = search_data(url, trials=5, sampler=sampler, startup_trials=2,
                           objective={"tasks": {"demo_add": 1, "demo_rev": 1}, "limit": 8})
        run_search(demo_recipe(demo_quick), validate_search(data, "test"), out_dir=tmp_path / f"o{i}",
                   reports_dir=tmp_path / f"r{i}", log=lambda _: None)
        seen.append([t.params for t in trials(url)])
    assert seen[0] == seen[1] and len(seen[0]) == 5
    assert len({json.dumps(p, sort_keys=True) for p in seen[0]}) == 5


def test_pareto_search_writes_every_front_point_and_its_plot(demo_quick, tmp_path):
    url = f"sqlite:///{tmp_path}/optuna.db"
    data = search_data(url, trials=5, sampler="nsga2",
                       objective={"tasks": {"demo_add": 1, "demo_rev": 1}, "limit": 8, "aggregate": "pareto"})
    out = run_search(demo_recipe(demo_quick), validate_search(data, "test"), out_dir=tmp_path / "o",
                     reports_dir=tmp_path / "r", log=lambda _: None)
    front = sorted((tmp_path / "o/pareto").glob("trial-*.yml"))
    assert len(front) == len(out.best) >= 1
    assert (tmp_path / "o/best.yml").read_text() in {p.read_text() for p in front}  # the front's best mean
    assert all(len(p["values"]) == 2 for p in out.best)
    assert (tmp_path / "r/search_pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_a_wall_time_budget_stops_the_search(demo_quick, tmp_path):
    url = f"sqlite:///{tmp_path}/optuna.db"
    data = search_data(url, trials=None, timeout_s=2, objective={"tasks": {"demo_add": 1}, "limit": 8})
    out = run_search(demo_recipe(demo_quick), validate_search(data, "test"), out_dir=tmp_path / "o",
                     reports_dir=tmp_path / "r", log=lambda _: None)
    assert out.counts["complete"] + out.counts["pruned"] >= 1
    assert all(t.state != TrialState.RUNNING for t in trials(url))
