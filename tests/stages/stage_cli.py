"""Helpers for stage tests: copy the working tree, an isolated environment, run a command as a user types it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def pipeline_products() -> set[str]:
    """dvc.lock and every output and metric dvc.yaml declares (resolved with params.yaml): what a run generates."""
    import re

    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())

    def lookup(match) -> str:
        node = params
        for part in match.group(1).split("."):
            node = node[part]
        return str(node)

    out = {"dvc.lock"}
    for stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].values():
        for entry in stage.get("outs", []) + stage.get("metrics", []):
            out.add(re.sub(r"\$\{([^}]+)\}", lookup, next(iter(entry)) if isinstance(entry, dict) else entry))
    return out


def copy_worktree(dest: Path) -> Path:
    """The files git would see in the checkout (tracked, plus untracked but not ignored), copied to `dest`,
    without anything a pipeline run generated (so the copy is a fresh clone that never ran)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                            capture_output=True).stdout.decode().split("\0")
    products = pipeline_products()
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file() and not any(rel == p or rel.startswith(p + "/") for p in products):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def stage_env(tmp: Path) -> dict[str, str]:
    """Offline, private caches and a private MLflow store; the venv's python first on PATH (dvc.yaml calls it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "MERGELIB_PIPELINE"))}
    env.update({
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp / "hf-home"),  # an empty Hugging Face cache
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DVC_NO_ANALYTICS": "1",
        "MERGELIB_CACHE": str(tmp / "mergelib-cache"),
        "TRANSFORMERS_VERBOSITY": "error",
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com",
    })
    env.pop("PYTHONPATH", None)
    return env


def run(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a command, capturing text output."""
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def stage(name: str, *overrides: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`python -m stages.<name> [overrides]`, exactly as a user types it."""
    return run([sys.executable, "-m", f"stages.{name}", *overrides], cwd, env)
