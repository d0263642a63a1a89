"""`python -m stages.<name> [overrides]` as a user runs it: a bad override, a missing model or an empty offline cache
is one line on stderr and exit 2, and nothing is written. (Success is checked in test_dvc_pipeline.py.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from stage_cli import run, stage


def one_error_line(proc) -> str:
    """The stderr of a failed stage: exactly one line, starting 'error: ', no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["method=ties", "density=2"], r"density: .*less than or equal to 1 \(got 2\).*density="),
        (["method=tie"], r"method: unknown method 'tie' \(did you mean 'ties'\?\)"),
    ],
    ids=["density-out-of-range", "method-typo"],
)
def test_bad_override_is_one_line_and_writes_nothing(workspace, overrides, expected):
    ws, env = workspace
    proc = stage("merge", *overrides, cwd=ws, env=env)
    assert re.search(expected, one_error_line(proc)), proc.stderr
    assert not (ws / "outputs").exists()
    assert not Path(env["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///")).exists()  # not even a tracking run


def test_bad_eval_task_is_one_line(workspace):
    ws, env = workspace
    before = sorted((ws / "reports").rglob("*")) if (ws / "reports").exists() else []  # a local bench.json, say
    proc = stage("evaluate", "eval.tasks=[demo_add,demo_addd]", cwd=ws, env={**env, "MERGELIB_TRACKING": "off"})
    line = one_error_line(proc)
    assert "demo_addd" in line and "demo_add" in line
    after = sorted((ws / "reports").rglob("*")) if (ws / "reports").exists() else []
    assert after == before  # the failed stage wrote nothing


def test_missing_local_model_names_it(workspace):
    ws, env = workspace
    proc = stage("fetch", "models=local", "models.base=/nonexistent/base", "models.finetunes=[{model: /nonexistent/ft}]",
                 cwd=ws, env={**env, "MERGELIB_TRACKING": "off"})  # tracking of failed runs: test_tracking.py
    line = one_error_line(proc)
    assert "'/nonexistent/base'" in line and "1 more" in line and "/nonexistent/ft" in line
    assert not (ws / "models").exists()  # nothing half-fetched, not even a staging directory


def test_offline_without_cache_says_what_is_missing(workspace):
    ws, env = workspace
    proc = stage("fetch", "models=qwen2_5_0_5b", cwd=ws, env={**env, "MERGELIB_TRACKING": "off"})
    line = one_error_line(proc)
    assert "Qwen/Qwen2.5-0.5B@060db6499f32faf8b98477b0a26969ef7d8b9987" in line
    assert "HF_HUB_OFFLINE=1" in line and "Qwen2.5-0.5B-Instruct" in line
    assert not (ws / "models").exists()


def test_kquant_export_without_llamacpp_names_the_extra(workspace):
    import sys

    ws, env = workspace
    code = ("import sys; sys.modules['llama_cpp'] = None; sys.argv = ['export', 'export.gguf=[f16,q4_k_m]']; "
            "from stages import export; from stages._runner import main; main('export', export.run)")
    proc = run([sys.executable, "-c", code], ws, {**env, "MERGELIB_TRACKING": "off"})
    assert one_error_line(proc).endswith("GGUF Q4_K_M needs llama.cpp: pip install 'mergelib[llamacpp]' (or `make demo`)")
    assert not (ws / "outputs" / "export").exists()
