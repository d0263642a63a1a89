"""One merge as Ray tasks (`--executor ray`): the same bytes as the local merge, a killed worker's shard re-run,
and an interrupted driver resumed from the journal. Each run is a `mergelib merge` process with its own local Ray."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mergelib import merge
from mergelib.errors import OutputError

BIN = Path(sys.executable).parent
SHARD = "30KB"  # many shards from the tiny family, so two workers share the work


def digests(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir()) if p.is_file()}


def cli(args: list[str], env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([str(BIN / "mergelib"), "merge", *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.fixture(scope="module")
def recipe_file(tiny_family, tmp_path_factory):
    path = tmp_path_factory.mktemp("ray-recipe") / "dare.yml"
    path.write_text(yaml.safe_dump({
        "merge_method": "dare_ties", "base_model": str(tiny_family.base),
        "models": [{"model": str(p), "parameters": {"weight": 0.7, "density": 0.5}} for p in tiny_family.finetunes],
    }))
    return path


@pytest.fixture(scope="module")
def local_merge(recipe_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("ray-local") / "out"
    merge(recipe_file, out, seed=3, out_shard_size=30_000, quiet=True)
    return out


def test_ray_merge_is_byte_identical_and_survives_a_killed_worker(recipe_file, local_merge, tmp_path):
    out = tmp_path / "ray"
    proc = cli([str(recipe_file), str(out), "--seed", "3", "--out-shard-size", SHARD, "--executor", "ray",
                "--workers", "2", "--quiet"], {"MERGELIB_FAILPOINT": "ray-shard"})  # the first shard task dies
    assert proc.returncode == 0, proc.stderr
    assert len(list(out.glob("model-*.safetensors"))) > 4
    assert digests(out) == digests(local_merge)


def test_an_interrupted_ray_merge_resumes_from_its_complete_shards(recipe_file, local_merge, tmp_path):
    out = tmp_path / "ray"
    args = [str(recipe_file), str(out), "--seed", "3", "--out-shard-size", SHARD, "--executor", "ray", "--workers", "2"]
    killed = cli(args, {"MERGELIB_FAILPOINT": "after-shard:3"})  # the driver dies after recording 3 shards
    assert killed.returncode == -signal.SIGKILL and not out.exists()
    again = cli(args)
    assert again.returncode == 0, again.stderr
    assert "3 complete shard(s) reused" in again.stdout
    assert digests(out) == digests(local_merge)


def test_an_unknown_executor_is_one_line(recipe_file, tmp_path):
    with pytest.raises(OutputError, match="executor 'spark': choose local or ray"):
        merge(recipe_file, tmp_path / "out", executor="spark")
    proc = cli([str(recipe_file), str(tmp_path / "out"), "--executor", "spark"])
    assert proc.returncode == 2 and "invalid choice: 'spark'" in proc.stderr and proc.stderr.count("\n") == 1


@pytest.mark.slow
def test_ray_merge_of_the_120m_family_is_byte_identical(tmp_path_factory):
    """The ~120M family (bf16, two fine-tunes): TIES as two local Ray workers' shard tasks, against the local merge."""
    import torch

    from mergelib.families.tiny import make_family

    root = tmp_path_factory.mktemp("ray-120m")
    family = make_family(root / "family", size="120m", n_finetunes=2, seed=0, dtype=torch.bfloat16)
    recipe = root / "ties.yml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "ties", "base_model": str(family.base), "parameters": {"density": 0.5},
        "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(family.finetunes, (0.6, 0.4))],
    }))
    local = merge(recipe, root / "local", seed=1, out_shard_size=60_000_000, quiet=True)
    proc = cli([str(recipe), str(root / "ray"), "--seed", "1", "--out-shard-size", "60MB", "--executor", "ray",
                "--workers", "2", "--quiet"])
    assert proc.returncode == 0, proc.stderr
    assert len(list(local.out_dir.glob("model-*.safetensors"))) >= 4
    assert digests(root / "ray") == digests(local.out_dir)
