"""The behavioural benchmark (benchmarks/behaviour): the fast test checks its machinery on a small run; the slow one
runs Tier A in full and asserts only the orderings that hold robustly at this scale."""

from __future__ import annotations

import json

import pytest

from benchmarks.behaviour import run, settings
from mergelib.methods import REGISTRY


def test_tier_a_machinery_on_one_seed_two_tasks(tmp_path, monkeypatch):
    from benchmarks.behaviour import tier_a

    monkeypatch.setattr(tier_a, "PRETRAIN_EPOCHS", 8)  # the machinery, not the figures: short training
    monkeypatch.setattr(tier_a, "FINETUNE_EPOCHS", 4)
    out = tmp_path / "behaviour.json"
    result = run.main(["--seeds", "0", "--tasks", "rot90", "invert", "--methods", "linear", "iso_c",
                       "--out", str(out), "--work", str(tmp_path / "work")])
    assert json.loads(out.read_text())["summary"] == result["summary"]
    assert (tmp_path / "behaviour.png").stat().st_size > 1000
    seed = result["per_seed"][0]
    assert set(seed["merges"]) == {"linear", "iso_c"}
    for accuracy in [seed["finetuned"], seed["base"], *(m["accuracy"] for m in seed["merges"].values())]:
        assert set(accuracy) == {"rot90", "invert"}
        assert all(0.0 <= a <= 1.0 for a in accuracy.values())
    assert all(seed["finetuned"][t] > seed["base"][t] + 0.2 for t in ("rot90", "invert"))
    assert result["summary"]["fine-tuned"]["normalised"]["mean"] == 1.0
    assert set(seed["init"]) == {"same_init", "independent_init"}
    assert set(seed["ties_cut"]) == {f"encoder.layers.{i}.{k}" for i in range(3) for k in ("weight", "bias")}
    assert 0.0 <= min(seed["ties_cut"].values()) and max(seed["ties_cut"].values()) <= 1.0


def test_every_method_has_a_setting_or_a_reason():
    rows, left_out = settings.settings(6)
    covered = {r.method for r in rows} | set(left_out)
    assert set(REGISTRY) <= covered
    ties = next(r for r in rows if r.label == "ties")
    assert ties.per_model == {"weight": 1.0, "density": 0.5} and ties.parameters == {}
    assert next(r for r in rows if r.label == "task_arithmetic").parameters == {"lambda": 0.4}


@pytest.mark.slow
def test_tier_a_orderings_that_hold_at_this_scale(tmp_path):
    methods = ["linear", "task_arithmetic", "ties", "dare_linear", "regmean"]
    result = run.main(["--out", str(tmp_path / "behaviour.json"), "--methods", *methods])
    summary = {k: v["normalised"]["mean"] for k, v in result["summary"].items() if not k.startswith("_")}
    per_seed = result["per_seed"]
    # fine-tunes well above the base on every task and seed
    for seed in per_seed:
        assert all(seed["finetuned"][t] > seed["base"][t] + 0.2 for t in result["tasks"])
    # DARE: rescaling the kept entries is at least as good as dropping alone, at p = 0.5
    assert summary["dare_linear"] >= summary["dare_linear (no rescale)"]
    # averaging fine-tunes of one base keeps them; of independently initialised bases it collapses
    init = result["summary"]["_init"]
    assert init["same_init"]["mean"] > init["independent_init"]["mean"] + 0.2
    if "regmean" in REGISTRY:
        assert summary["regmean"] >= max(summary["task_arithmetic"], summary["ties"])
