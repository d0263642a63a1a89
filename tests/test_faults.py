"""Failure behaviour: killed merges, corrupted and hostile inputs, NaN weights, disk full, fuzzed recipes.

Every case asserts what the user sees (one line, exit 2) and that no good output is lost.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

import mergelib
from mergelib.errors import MergelibError


def digest(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


def cli(*args, env=None):
    full = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "mergelib", *args], capture_output=True, text=True, env=full)


def ties(family):
    return {
        "merge_method": "dare_ties",
        "base_model": str(family.base),
        "models": [{"model": str(p), "parameters": {"weight": 0.5, "density": 0.6}} for p in family.finetunes],
    }


SHARD = 60_000


@pytest.mark.parametrize("failpoint", ["mid-shard:3", "after-shard:1", "after-shard:2", "before-commit"])
def test_killed_merge_keeps_old_output_and_resumes_to_identical_bytes(tiny_family, tmp_path, failpoint):
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump(ties(tiny_family)))
    reference = tmp_path / "reference"
    mergelib.merge(recipe, reference, quiet=True, out_shard_size=SHARD)
    out = tmp_path / "out"
    mergelib.merge({**ties(tiny_family), "merge_method": "task_arithmetic"}, out, quiet=True)  # a good output
    before = digest(out)

    killed = cli("merge", str(recipe), str(out), "--quiet", "--out-shard-size", str(SHARD),
                 env={"MERGELIB_FAILPOINT": failpoint})
    assert killed.returncode == -signal.SIGKILL
    assert digest(out) == before  # the previous output is untouched
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]) == 1

    resumed = mergelib.merge(recipe, out, quiet=True, out_shard_size=SHARD)
    assert digest(out) == digest(reference)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    expected_reused = {"after-shard:1": 1, "after-shard:2": 2}.get(failpoint)
    if expected_reused is not None:
        assert resumed.shards_reused == expected_reused
    if failpoint == "before-commit":
        assert resumed.shards_reused == len(resumed.plan.shards)


def test_a_corrupted_complete_shard_is_redone(tiny_family, tmp_path):
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump(ties(tiny_family)))
    args = ("merge", str(recipe), str(tmp_path / "out"), "--quiet", "--out-shard-size", str(SHARD))
    assert cli(*args, env={"MERGELIB_FAILPOINT": "after-shard:2"}).returncode == -signal.SIGKILL
    staged = next(p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-"))
    journal = json.loads((staged / ".mergelib-progress.json").read_text())
    victim = staged / sorted(journal["shards"])[0]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    result = mergelib.merge(recipe, tmp_path / "out", quiet=True, out_shard_size=SHARD)
    assert result.shards_reused == 1  # the other recorded shard; the damaged one was redone
    mergelib.merge(recipe, tmp_path / "clean", quiet=True, out_shard_size=SHARD)
    assert digest(tmp_path / "out") == digest(tmp_path / "clean")


def test_disk_full_is_one_line_and_leaves_nothing(tiny_family, tmp_path, monkeypatch):
    out = tmp_path / "out"
    mergelib.merge(ties(tiny_family), out, quiet=True)
    before = digest(out)
    real_pwrite = os.pwrite
    calls = {"n": 0}

    def full(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(MergelibError, match="disk full") as info:
        mergelib.merge({**ties(tiny_family), "merge_method": "ties"}, out, quiet=True)
    assert "\n" not in str(info.value)
    assert digest(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def copy_model(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def poison(model_dir, name, value):
    from safetensors.torch import load_file, save_file

    for shard in sorted(model_dir.glob("*.safetensors")):
        tensors = load_file(shard)
        if name in tensors:
            tensors[name].view(-1)[3] = value
            save_file(tensors, shard, metadata={"format": "pt"})
            return
    raise AssertionError(name)


def linear_of(*dirs):
    return {"merge_method": "linear", "models": [{"model": str(d), "parameters": {"weight": 1.0}} for d in dirs]}


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_inputs_are_named_and_allow_nan_proceeds(tiny_family, tmp_path, value):
    bad = copy_model(tiny_family.finetunes[0], tmp_path / "bad")
    poison(bad, "model.layers.1.mlp.down_proj.weight", value)
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump(linear_of(tiny_family.base, bad)))
    proc = cli("merge", str(recipe), str(tmp_path / "out"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "model.layers.1.mlp.down_proj.weight" in proc.stderr and "--allow-nan" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert cli("merge", str(recipe), str(tmp_path / "out"), "--allow-nan", "--quiet").returncode == 0


def test_truncated_and_absurd_safetensors_are_one_line_errors(tiny_family, tmp_path):
    truncated = copy_model(tiny_family.finetunes[0], tmp_path / "trunc")
    shard = sorted(truncated.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    absurd = copy_model(tiny_family.finetunes[1], tmp_path / "absurd")
    shard = sorted(absurd.glob("*.safetensors"))[0]
    shard.write_bytes((1 << 60).to_bytes(8, "little") + shard.read_bytes()[8:])
    for model in (truncated, absurd):
        with pytest.raises(MergelibError, match="not a readable safetensors file") as info:
            mergelib.plan_merge(linear_of(tiny_family.base, model))
        assert str(model) in str(info.value)


def test_symlink_out_of_the_model_directory_is_refused(tiny_family, tmp_path):
    sneaky = copy_model(tiny_family.finetunes[0], tmp_path / "sneaky")
    shard = sorted(sneaky.glob("*.safetensors"))[0]
    outside = tmp_path / "elsewhere.safetensors"
    shard.rename(outside)
    shard.symlink_to(outside)
    with pytest.raises(MergelibError, match="symlink out of the model directory"):
        mergelib.plan_merge(linear_of(tiny_family.base, sneaky))


def test_remote_code_needs_trust_and_crimes_need_allowing(tiny_family, tmp_path):
    custom = copy_model(tiny_family.finetunes[0], tmp_path / "custom")
    config = json.loads((custom / "config.json").read_text())
    (custom / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "x.Y"}}))
    with pytest.raises(MergelibError, match="--trust-remote-code"):
        mergelib.plan_merge(linear_of(tiny_family.base, custom))
    mergelib.plan_merge(linear_of(tiny_family.base, custom), trust_remote_code=True)

    other = copy_model(tiny_family.finetunes[1], tmp_path / "other")
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"]}))
    with pytest.raises(MergelibError, match="--allow-crimes"):
        mergelib.plan_merge(linear_of(tiny_family.base, other))
    assert mergelib.plan_merge(linear_of(tiny_family.base, other), allow_crimes=True).jobs


def run_with_deadline(fn, seconds=30):
    """fn() in a daemon thread; its exception (or None), failing the test if it has not ended by the deadline."""
    import threading

    outcome = {}

    def target():
        try:
            fn()
            outcome["error"] = None
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            outcome["error"] = exc

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"the merge still runs after {seconds}s: it hangs"
    return outcome["error"]


@pytest.mark.parametrize("where", ["shard-open", "mid-write"])
@pytest.mark.parametrize("memory_budget", [1, None])  # 1: every job waits for the one before it to release
def test_disk_full_in_a_worker_ends_the_merge_within_seconds(tiny_family, tmp_path, monkeypatch, where, memory_budget):
    out = tmp_path / "out"
    real_open, real_pwrite = os.open, os.pwrite
    counts = {"open": 0, "pwrite": 0}

    def failing_open(path, flags, *args, **kwargs):
        if str(path).endswith(".safetensors") and flags & os.O_CREAT:
            counts["open"] += 1
            if counts["open"] >= 2:
                time.sleep(0.2)  # fail after the driver has moved on to wait for memory (the hang's race)
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, flags, *args, **kwargs)

    def failing_pwrite(fd, data, offset):
        counts["pwrite"] += 1
        if counts["pwrite"] > 8:
            time.sleep(0.2)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    if where == "shard-open":
        monkeypatch.setattr(os, "open", failing_open)
    else:
        monkeypatch.setattr(os, "pwrite", failing_pwrite)
    error = run_with_deadline(lambda: mergelib.merge(
        ties(tiny_family), out, quiet=True, threads=4, out_shard_size=SHARD, memory_budget=memory_budget))
    assert isinstance(error, MergelibError) and "disk full" in str(error) and "\n" not in str(error)
    assert error.exit_code == 2
    assert not out.exists() and list(tmp_path.iterdir()) == []  # staging removed, nothing half-written


def test_disk_full_from_the_command_is_one_line_exit_2(tiny_family, tmp_path, monkeypatch, capsys):
    from mergelib.cli import main

    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump(ties(tiny_family)))
    real_open = os.open

    def failing_open(path, flags, *args, **kwargs):
        if str(path).endswith(".safetensors") and flags & os.O_CREAT:
            time.sleep(0.2)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", failing_open)
    codes = []
    assert run_with_deadline(lambda: codes.append(main(
        ["merge", str(recipe), str(tmp_path / "out"), "--threads", "4", "--out-shard-size", str(SHARD),
         "--quiet"]))) is None
    err = capsys.readouterr().err
    assert codes == [2] and err.count("\n") == 1 and "disk full" in err
