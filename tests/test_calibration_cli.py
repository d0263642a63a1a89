"""Data-aware methods through the `mergelib` command: recipe errors (exit 2, one line, before any weight is read),
precomputed statistics files, and a merge that loads and generates, then reuses its cached statistics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.test_cli import assert_one_line_error, write_recipe

DEMO = Path(__file__).resolve().parents[1] / "conf" / "calibration" / "demo.jsonl"


def run(*args, env=None):
    full = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "mergelib", *args], capture_output=True, text=True, env=full)


def recipe(family, method="regmean", calibration=None, **extra):
    out = {"merge_method": method, "models": [{"model": str(p)} for p in family.finetunes], **extra}
    if calibration is not False:
        out["calibration"] = calibration or {"data": str(DEMO), "tokens": 64, "sequence_length": 32}
    return out


def stats_file(path: Path, kind: str, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, path, {"kind": kind, "tokens": "10", "samples": "1"})
    return path


@pytest.mark.parametrize("case,fragments", [
    ("no_block", ["calibration: regmean needs statistics"]),
    ("on_linear", ["calibration: linear uses no statistics"]),
    ("missing_data", ["calibration.data: cannot read", "nowhere.jsonl"]),
    ("zero_tokens", ["calibration.tokens", "greater than or equal to 1"]),
    ("both", ["give exactly one of 'data'", "'statistics'"]),
    ("unknown_key", ["unknown key 'calibration.token'"]),
    ("wrong_kind", ["holds kind 'fisher' statistics", "needs 'gram'"]),
    ("missing_model", ["calibration.statistics: no statistics file for model"]),
    ("wrong_shape", ["model.layers.0.self_attn.q_proj.weight", "is [3, 3]", "[64, 64]"]),
    ("plus_plus_slices", ["slices: regmean_plus_plus"]),
    ("too_many_tokens", ["calibration.tokens: 1000000 tokens asked"]),
])
def test_recipe_errors_are_one_line_before_any_weight(case, fragments, tiny_family, tmp_path):
    a, b = (str(p) for p in tiny_family.finetunes)
    gram = stats_file(tmp_path / "g.safetensors", "gram", {"model.layers.0.self_attn.q_proj.weight": torch.eye(64)})
    cases = {
        "no_block": recipe(tiny_family, calibration=False),
        "on_linear": recipe(tiny_family, "linear"),
        "missing_data": recipe(tiny_family, calibration={"data": str(tmp_path / "nowhere.jsonl")}),
        "zero_tokens": recipe(tiny_family, calibration={"data": str(DEMO), "tokens": 0}),
        "both": recipe(tiny_family, calibration={"data": str(DEMO), "statistics": {a: str(gram), b: str(gram)}}),
        "unknown_key": recipe(tiny_family, calibration={"data": str(DEMO), "token": 5}),
        "wrong_kind": recipe(tiny_family, calibration={"statistics": {
            a: str(gram), b: str(stats_file(tmp_path / "f.safetensors", "fisher", {"x": torch.ones(1)}))}}),
        "missing_model": recipe(tiny_family, calibration={"statistics": {a: str(gram)}}),
        "wrong_shape": recipe(tiny_family, calibration={"statistics": {a: str(gram), b: str(stats_file(
            tmp_path / "s.safetensors", "gram", {"model.layers.0.self_attn.q_proj.weight": torch.eye(3)}))}}),
        "plus_plus_slices": {"merge_method": "regmean_plus_plus", "slices": [{"sources": [
            {"model": a, "layer_range": [0, 4]}, {"model": b, "layer_range": [0, 4]}]}],
            "calibration": {"data": str(DEMO)}},
        "too_many_tokens": recipe(tiny_family, calibration={"data": str(DEMO), "tokens": 1_000_000}),
    }
    proc = run("merge", str(write_recipe(tmp_path, cases[case])), str(tmp_path / "out"))
    assert_one_line_error(proc, *fragments)
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_merge_loads_generates_and_reuses_the_cache(tiny_family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = tmp_path / "cache"
    path = write_recipe(tmp_path, recipe(tiny_family, parameters={"reduce_non_diagonal": 0.8}))
    env_run = lambda *args: run(*args, env={"MERGELIB_CACHE": str(cache)})  # noqa: E731
    first = env_run("merge", str(path), str(tmp_path / "out"))
    assert first.returncode == 0, first.stderr
    assert "0 of 2 model(s) from the cache or given files, 2 gathered" in first.stderr
    files = sorted((cache / "statistics").glob("gram-*.safetensors"))
    assert len(files) == 2
    stamps = [f.stat().st_mtime_ns for f in files]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    ids = tokenizer("12+34=", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 4
    record = json.loads((tmp_path / "out" / "mergelib_run.json").read_text())
    assert record["calibration"]["tokens"] == 64 and set(record["calibration"]["statistics"]) == {
        str(p) for p in tiny_family.finetunes}
    second = env_run("merge", str(path), str(tmp_path / "out2"))
    assert second.returncode == 0, second.stderr
    assert "2 of 2 model(s) from the cache or given files, 0 gathered" in second.stderr
    assert [f.stat().st_mtime_ns for f in files] == stamps
    first_bytes = (tmp_path / "out" / "model.safetensors").read_bytes()
    assert first_bytes == (tmp_path / "out2" / "model.safetensors").read_bytes()


def test_precomputed_statistics_files_are_used(tiny_family, tmp_path):
    """A given statistics file is what the merge uses: Grams that make model b's feature 0 dominate move
    q_proj's column 0 to b's."""
    from safetensors.torch import load_file

    a, b = tiny_family.finetunes
    name = "model.layers.0.self_attn.q_proj.weight"
    ga, gb = torch.eye(64), torch.eye(64)
    gb[0, 0] = 1e6
    files = {str(a): str(stats_file(tmp_path / "a.safetensors", "gram", {name: ga})),
             str(b): str(stats_file(tmp_path / "b.safetensors", "gram", {name: gb}))}
    proc = run("merge", str(write_recipe(tmp_path, recipe(tiny_family, calibration={"statistics": files}))),
               str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    merged = load_file(tmp_path / "out" / "model.safetensors")[name]
    wa, wb = (_tensor(p, name) for p in (a, b))
    torch.testing.assert_close(merged[:, 0], wb[:, 0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(merged[:, 1:], (wa[:, 1:] + wb[:, 1:]) / 2, rtol=1e-5, atol=1e-6)


def _tensor(model_dir: Path, name: str) -> torch.Tensor:
    from safetensors import safe_open

    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            if name in f.keys():  # noqa: SIM118
                return f.get_tensor(name)
    raise KeyError(name)
