"""Stage tests run the real commands in subprocesses, in a copy of the working tree (never the checkout itself)."""

from __future__ import annotations

import pytest
from stage_cli import copy_worktree, stage_env


@pytest.fixture
def workspace(tmp_path):
    """(directory, env): a fresh copy of the working tree with its own caches and MLflow store."""
    ws = copy_worktree(tmp_path / "repo")
    return ws, stage_env(tmp_path)
