"""`dvc repro` end to end in a temporary git repository holding a copy of the working tree.

The fast test runs on the seeded tiny family with the quick eval suite (params.yaml recomposed in the copy); one
test function walks the steps in order (a module fixture could be built twice under pytest-xdist): repro with
tracking; the merge typed as `python -m stages.merge ...`; an eval-only experiment that must not re-run the merge.
(publish=hub and publish=mlflow: tests/stages/test_stage_steps.py, in-process.) Slow tests: the rebuild guarantee (delete the outputs and
DVC's cache, repro, same bytes) on the quick demo family, and queued experiments.
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
PRODUCTS = ("models", "outputs", "reports/metrics.json", "reports/eval_samples.json", "reports/skill_accuracy.csv",
            "reports/export.json", "reports/tokenizer_report.md")
EVAL_PRODUCTS = ("reports/metrics.json", "reports/eval_samples.json", "reports/skill_accuracy.csv", "outputs/publish")
FAST = ("models=tiny", "eval=quick", "export=safetensors")  # the fast test: no llama.cpp (the default GGUF export needs it)


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


def new_repo(tmp: Path, overrides=FAST) -> tuple[Path, dict]:
    """A git repository with one commit holding the working tree's files (params.yaml composed with `overrides`),
    and its isolated environment."""
    env = stage_env(tmp)
    root = copy_worktree(tmp / "repo")
    proc = run([sys.executable, "-m", "mergelib.config.compose", *overrides], root, env)
    assert proc.returncode == 0, proc.stderr
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
    assert parent.data.tags["mergelib.role"] == "pipeline" and parent.data.params["method"] == "task_arithmetic"
    metrics = set(parent.data.metrics)
    assert {"eval.merged.demo_add.exact_match", "eval.base.demo_rev.exact_match", "eval.ft1.demo_ppl.bits_per_byte",
            "export.safetensors-float16.top1", "merge.seconds", "tokenizer.added_tokens"} <= metrics
    assert all(r.data.tags.get("mlflow.source.git.commit") for r in repro)
    evaluate = next(r for r in repro if r.data.tags["mergelib.stage"] == "evaluate")
    logged = {a.path for a in client.list_artifacts(evaluate.info.run_id, "reports")}
    assert {"reports/metrics.json", "reports/accuracy.png", "reports/skill_accuracy.csv"} <= logged

    own = client.get_run(merge_run_id)
    assert own.info.status == "FINISHED" and own.info.run_name == "merge"
    assert own.data.tags["mlflow.parentRunId"] not in {r.data.tags["mlflow.parentRunId"] for r in repro}
    assert own.data.params["method"] == "task_arithmetic" and own.data.params["merge.parameters.weight"] == "0.8"
    assert own.data.params["inputs.0.ref"] == "models/tiny/base" and len(own.data.params["inputs.0.sha256"]) == 64
    artifacts = {a.path for a in client.list_artifacts(merge_run_id, "merged")}
    assert {"merged/mergekit_config.yml", "merged/README.md", "merged/lock.json"} <= artifacts


def check_reports(root: Path) -> None:
    """metrics.json has the merge and both parents per task, in range; the export check passed."""
    doc = json.loads((root / "reports/metrics.json").read_text())
    assert set(doc["parents"]) == {"base", "ft1", "ft2"}
    for per_task in [doc["merged"], *doc["parents"].values()]:
        assert set(per_task) == {"demo_add", "demo_rev", "demo_ppl"}
        assert all(0 <= per_task[t]["exact_match"] <= 1 and per_task[t]["samples"] == 8 for t in ("demo_add", "demo_rev"))
        assert per_task["demo_ppl"]["bits_per_byte"] > 0
    assert (root / "reports/accuracy.png").read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader(open(root / "reports/skill_accuracy.csv")))
    assert len(rows) == 4 * 2 and {r["model"] for r in rows} == {"base", "ft1", "ft2", "merged"}
    export = json.loads((root / "reports/export.json").read_text())["export"]
    assert export["safetensors-float16"]["passed"] is True and export["safetensors-float16"]["top1"] == 1.0
    manifest = json.loads((root / "outputs/publish/manifest.json").read_text())
    assert manifest["target"] == "none" and manifest["tag"] == "v0.1.0"
    assert "safetensors-float16/model.safetensors" in manifest["files"] and "README.md" in manifest["files"]
    assert "tokens added beyond the base's vocabulary: 0." in (root / "reports/tokenizer_report.md").read_text().lower()


def test_repro_stage_command_publish_and_eval_only_change(tmp_path):
    root, env = new_repo(tmp_path)
    started = time.perf_counter()
    first = dvc(["repro"], root, env)
    print(f"dvc repro: {time.perf_counter() - started:.1f} s")
    for name in STAGES:
        assert f"Running stage '{name}'" in first.stdout
    assert "Data and pipelines are up to date" in dvc(["status"], root, env).stdout
    before = digests(root)
    assert any(k.startswith("outputs/merged/") and k.endswith(".safetensors") for k in before)
    check_reports(root)

    # The same merge typed by hand with the defaults as overrides: composed from conf/, same bytes as the repro.
    proc = stage("merge", *FAST, "method=task_arithmetic", "weight=0.8", cwd=root, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "merge: wrote " in proc.stdout and "outputs/merged" in proc.stdout
    run_id = re.search(r"mlflow run ([0-9a-f]{32})", proc.stdout).group(1)
    assert digests(root) == before
    out = root / "outputs/merged"
    recipe = yaml.safe_load((out / "mergekit_config.yml").read_text())
    # density does not act on task_arithmetic: left out of its recipe (the stage says so)
    assert recipe["merge_method"] == "task_arithmetic" and recipe["parameters"] == {"weight": 0.8}
    assert "task_arithmetic does not use density=0.5" in proc.stderr
    lock = {m["ref"]: m for m in json.loads((root / "models/tiny/lock.json").read_text())["models"]}
    for entry in json.loads((out / "mergelib_run.json").read_text())["inputs"]:  # read exactly the locked bytes
        assert entry["files"] == {k: v for k, v in lock[entry["model"]]["files"].items() if k in entry["files"]}
    check_tracking(env, run_id)

    # An eval knob re-runs only the evaluation (and the publish, whose card holds the scores).
    git(["add", "-A"], root, env)
    git(["commit", "-qm", "pipeline outputs"], root, env)
    # `-S` recomposes params.yaml from conf/ (DVC's Hydra integration): the family and suite are given again
    exp = dvc(["exp", "run", *(f"-S{o}" for o in FAST), "-S", "eval.limit=4"], root,
              {**env, "MERGELIB_TRACKING": "off"})
    assert "Running stage 'evaluate'" in exp.stdout
    for name in ("fetch", "merge", "tokenizer", "export"):  # unchanged, or restored from DVC's run cache
        assert f"Running stage '{name}'" not in exp.stdout and f"Stage '{name}' " in exp.stdout
    after = digests(root)
    assert {k: v for k, v in after.items() if not k.startswith(EVAL_PRODUCTS)} == {
        k: v for k, v in before.items() if not k.startswith(EVAL_PRODUCTS)
    }
    shown = list(csv.DictReader(io.StringIO(dvc(["exp", "show", "--csv"], root, env).stdout)))
    assert {row["eval.limit"] for row in shown} >= {"4", "8"}
    assert any(row.get("demo_add") for row in shown)  # scores.json: the merge's score per task
    check_search(root, env)


def check_search(root: Path, env: dict) -> None:
    """The search stage (on demand, outside `dvc repro`) writes a recipe the merge stage (recipe_file=) and
    `mergelib merge` take as they are, and a metric `dvc metrics show` reads."""
    proc = stage("search", *FAST, "search=tiny", cwd=root, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "search: 4 trials run now" in proc.stdout
    shown = dvc(["metrics", "show", "reports/search/search.json"], root, env).stdout
    assert "heldout.demo_add" in shown
    metrics = json.loads((root / "reports/search/search.json").read_text())
    assert metrics["trials"] == 4 and set(metrics["heldout"]) == {"demo_add", "demo_rev"}
    best = root / "outputs/search/best.yml"
    recipe = yaml.safe_load(best.read_text())
    assert recipe["base_model"] == "models/tiny/base" and recipe["merge_method"] in ("task_arithmetic", "ties")
    proc = stage("merge", *FAST, "recipe_file=outputs/search/best.yml", cwd=root, env=env)
    assert proc.returncode == 0, proc.stderr
    by_hand = run([str(Path(sys.executable).parent / "mergelib"), "merge", str(best), str(root / "by_hand"),
                   "--quiet"], root, env)
    assert by_hand.returncode == 0, by_hand.stderr
    written = sorted(p.name for p in (root / "by_hand").glob("*.safetensors"))
    assert written and written == sorted(p.name for p in (root / "outputs/merged").glob("*.safetensors"))
    for name in written:
        assert (root / "by_hand" / name).read_bytes() == (root / "outputs/merged" / name).read_bytes()


@pytest.mark.slow
def test_rebuild_gives_the_same_bytes(tmp_path):
    """Nothing left to restore from (outputs, models and DVC's cache deleted): every stage runs, same bytes."""
    root, env = new_repo(tmp_path, ("models=demo_quick", "eval=quick"))
    env = {**env, "MERGELIB_TRACKING": "off"}
    dvc(["repro"], root, env)
    before = digests(root)
    for rel in ("outputs", "models", "reports", ".dvc/cache"):
        shutil.rmtree(root / rel)
    rebuilt = dvc(["repro"], root, env)
    for name in STAGES:
        assert f"Running stage '{name}'" in rebuilt.stdout
    assert digests(root) == before


@pytest.mark.slow
def test_experiments_compare_and_queue(tmp_path):
    root, env = new_repo(tmp_path)
    env = {**env, "MERGELIB_TRACKING": "off"}
    dvc(["repro"], root, env)
    git(["add", "-A"], root, env)
    git(["commit", "-qm", "pipeline outputs"], root, env)
    fast = [f"-S{o}" for o in FAST]  # `-S` recomposes params.yaml from conf/: keep the tiny family
    exp = dvc(["exp", "run", *fast, "-S", "method=dare_ties", "-S", "density=0.3"], root, env)
    assert "Running stage 'merge'" in exp.stdout
    dvc(["exp", "run", "--queue", *fast, "-S", "method=ties", "-S", "density=0.5", "-S", "weight=1.0", "-n", "ties"],
        root, env)
    dvc(["exp", "run", "--queue", *fast, "-S", "experiment=slerp", "-n", "slerp"], root, env)
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
    assert {("ties", "ties"), ("slerp", "slerp")} <= {(row["Experiment"], row["method"]) for row in rows}
    assert any(row["method"] == "dare_ties" and row["density"] == "0.3" for row in rows)
    bpb = {row["method"]: row["demo_ppl_bpb"] for row in rows if row.get("demo_ppl_bpb")}  # scores.json
    assert len(set(bpb.values())) == len(bpb) >= 4  # four methods, four different models


@pytest.mark.slow
def test_method_sweep_and_moe_stages(tmp_path):
    """`python -m stages.sweep` merges and scores every method, then one table and one plot; `stages.moe` builds
    and scores the MoE. The quick demo family (seconds) stands in for the trained one."""
    env = {**stage_env(tmp_path), "MERGELIB_TRACKING": "off"}
    root = copy_worktree(tmp_path / "repo")
    proc = stage("sweep", "models=demo_quick", "eval=quick", "eval.parents=false", cwd=root, env=env)
    assert proc.returncode == 0, proc.stderr
    table = (root / "reports/method_comparison.md").read_text().splitlines()
    methods = ["linear", "task_arithmetic", "ties", "dare_ties", "slerp", "della", "model_stock", "breadcrumbs"]
    assert [line.split("|")[1].strip() for line in table[2:]] == methods
    assert (root / "reports/method_comparison.png").read_bytes()[:4] == b"\x89PNG"
    proc = stage("moe", "models=demo_quick", "eval=quick", "eval.parents=false", cwd=root, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "MixtralForCausalLM, 2 experts" in proc.stdout
    doc = json.loads((root / "reports/moe/metrics.json").read_text())
    assert set(doc["merged"]) == {"demo_add", "demo_rev", "demo_ppl"}


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
