"""dvc.yaml is consistent with the code: one stage module per stage, every param key exists, every dependency exists
or is an earlier stage's output, and the merge stage depends on every module the merge engine imports."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())
STAGES = ("fetch", "merge", "tokenizer", "evaluate", "export", "publish")
# Exactly what each stage may re-run on: an eval knob must never re-run the merge.
STAGE_PARAMS = {
    "fetch": {"models", "paths.models"},
    "merge": {"merge", "recipe_file", "seed", "paths.merged"},
    "tokenizer": {"paths.tokenizer"},
    "evaluate": {"eval"},
    "export": {"export", "method", "models.name", "paths.export"},
    "publish": {"publish", "models.name", "paths.publish"},
}


def lookup(key: str):
    node = PARAMS
    for part in key.split("."):
        node = node[part]
    return node


def resolved(text: str) -> str:
    return re.sub(r"\$\{([^}]+)\}", lambda m: str(lookup(m.group(1))), text)


def entries(stage: dict, field: str) -> list[str]:
    return [resolved(next(iter(e)) if isinstance(e, dict) else e) for e in stage.get(field, [])]


STAGE_DEFS = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def test_stages_in_order_each_a_module():
    assert tuple(STAGE_DEFS) == STAGES
    for name, stage in STAGE_DEFS.items():
        assert stage["cmd"] == f"python -m stages.{name}"
        assert (REPO / "stages" / f"{name}.py").is_file()


@pytest.mark.parametrize("name", STAGES)
def test_params_exist_and_are_exactly_the_stage_s(name):
    listed = set(STAGE_DEFS[name]["params"])
    assert listed == STAGE_PARAMS[name]
    for key in listed:
        lookup(key)  # KeyError if params.yaml has no such key


def test_every_dependency_exists_or_is_an_earlier_output():
    produced: set[str] = set()
    for name in STAGES:
        stage = STAGE_DEFS[name]
        for dep in entries(stage, "deps"):
            assert dep in produced or (REPO / dep).exists(), f"{name}: dependency {dep} does not exist"
        produced |= set(entries(stage, "outs")) | set(entries(stage, "metrics"))
    assert f"{PARAMS['paths']['reports']}/metrics.json" in produced


def _module_file(name: str) -> Path | None:
    path = REPO / Path(*name.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def import_closure(start: Path) -> set[Path]:
    """Every mergelib source file `start` imports, directly or not (function-level imports included)."""
    seen: set[Path] = set()
    todo = [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            for name in names:
                parts = name.split(".")
                if parts[0] == "mergelib":
                    todo += [f for i in range(1, len(parts) + 1) if (f := _module_file(".".join(parts[:i])))]
    return seen


def missing_merge_deps(deps: list[str]) -> list[str]:
    """Modules the merge stage runs (the engine's import closure; the run config, the lock reader and the metrics
    writer the stage calls) that no entry of `deps` covers, as repository paths."""
    paths = [REPO / d for d in deps]
    stage_helpers = ("mergelib/config/run.py", "mergelib/pipeline/fetch.py", "mergelib/pipeline/outputs.py")
    needed = import_closure(REPO / "mergelib" / "merging" / "api.py") | {REPO / f for f in stage_helpers}
    assert len(needed) > 20
    return sorted(str(f.relative_to(REPO)) for f in needed if not any(f == d or d in f.parents for d in paths))


def test_merge_depends_on_every_module_the_engine_imports():
    missing = missing_merge_deps(entries(STAGE_DEFS["merge"], "deps"))
    assert not missing, f"add to the merge stage's deps in dvc.yaml: {missing}"


def test_the_dependency_check_fails_when_a_module_is_left_out():
    deps = entries(STAGE_DEFS["merge"], "deps")
    listed = [d for d in deps if d.startswith("mergelib/")]
    assert len(listed) > 10
    for dep in listed:
        assert missing_merge_deps([d for d in deps if d != dep]), f"{dep} is listed but the check does not need it"


def test_plots_are_images_the_evaluate_stage_writes():
    """Vega plots need scripts from a CDN and render blank offline; images render anywhere."""
    outs = set(entries(STAGE_DEFS["evaluate"], "outs"))
    plots = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    files = {resolved(p) if isinstance(p, str) else None for p in plots}
    assert files == {"reports/accuracy.png"} and files <= outs
    assert "dvc_plots/" in (REPO / ".gitignore").read_text().split()


def test_bytecode_is_ignored_by_dvc():
    ignored = (REPO / ".dvcignore").read_text().split()
    assert "__pycache__/" in ignored and "*.pyc" in ignored


def test_dvc_metrics_are_only_what_experiments_compare():
    """`dvc exp show` was ~180 columns: the parents' scores and every export check were metrics."""
    metrics = {name: entries(stage, "metrics") for name, stage in STAGE_DEFS.items() if stage.get("metrics")}
    assert metrics == {"merge": ["reports/merge.json"], "evaluate": ["reports/scores.json"]}
