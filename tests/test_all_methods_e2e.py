"""Contract: every registered method merges the tiny family end to end, and the result loads and generates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mergelib
from mergelib.methods import REGISTRY

CALIBRATION = Path(__file__).resolve().parents[1] / "conf" / "calibration" / "demo.jsonl"


def test_the_registry_has_all_twenty_eight():
    assert len(REGISTRY) == 28


def recipe_for(spec, family) -> dict:
    """A valid recipe for `spec`: required parameters set, as many fine-tunes as it takes."""
    n = 1 if spec.max_models == 1 else 2
    per_model = {}
    for name, field in spec.model_params.model_fields.items():
        key = field.alias or name
        if field.is_required() or key == "weight":
            per_model[key] = 0.5
        if key == "density":
            per_model[key] = 0.6
    top = {(f.alias or name): 0.4 for name, f in spec.params.model_fields.items() if f.is_required()}
    models = [{"model": str(p), "parameters": dict(per_model)} for p in family.finetunes[:n]]
    recipe = {"merge_method": spec.name, "models": models, "parameters": top}
    if spec.base != "none":
        recipe["base_model"] = str(family.base)
    if spec.base == "input":  # the base joins the inputs and takes its parameters from the top level
        recipe["parameters"].update(per_model)
    if spec.statistics is not None:  # data-aware methods: a few calibration tokens
        recipe["calibration"] = {"data": str(CALIBRATION), "tokens": 96, "sequence_length": 32}
    if spec.name == "slerp":  # slerp's two ends are the base and one model
        recipe["models"] = [{"model": str(family.base)}, {"model": str(family.finetunes[0])}]
    return recipe


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_method_merges_loads_and_generates(name, tiny_family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = REGISTRY[name]
    result = mergelib.merge(recipe_for(spec, tiny_family), tmp_path / "out", quiet=True)
    assert result.n_tensors == len(result.plan.jobs) > 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    ids = tokenizer("abc", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
        assert torch.isfinite(logits).all()
        out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 3


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_method_gives_the_same_bytes_again_in_one_process(name, tiny_family, tmp_path):
    """The same merge three times with other allocations in between: the buffers land at other addresses, and
    nothing may sum in an order that follows them (MKL's dot did, for slerp, nuslerp and karcher)."""
    import hashlib

    spec = REGISTRY[name]
    digests = set()
    for i in range(3):
        shift = [torch.empty(4096 * (7 * i + 1)) for _ in range(i)]  # moves where the next buffers land
        out = mergelib.merge(recipe_for(spec, tiny_family), tmp_path / str(i), quiet=True, seed=4).out_dir
        digests.add(hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest())
        del shift
    assert len(digests) == 1
