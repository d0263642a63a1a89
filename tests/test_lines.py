"""LiNeS (`lines: {alpha, beta}` in a recipe): each output tensor's merged task vector scaled by alpha + beta * its
relative depth, exactly base + s * (merged - base), whatever the merge mode or device."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import load_file

import mergelib
import mergelib.merging.plan
from mergelib.config.recipe import load_recipe
from mergelib.errors import RecipeError


def _tensors(root):
    return {k: v for f in sorted(root.glob("*.safetensors")) for k, v in load_file(f).items()}


def _digests(root):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.glob("*.safetensors"))}


def _recipe(family, method="ties", lines=None):
    recipe = {"merge_method": method, "base_model": str(family.base), "parameters": {"density": 0.5},
              "models": [{"model": str(p), "parameters": {"weight": 0.6}} for p in family.finetunes]}
    if lines is not None:
        recipe["lines"] = lines
    return recipe


def test_each_layer_is_scaled_by_its_depth(tiny_family, tmp_path):
    plain = mergelib.merge(_recipe(tiny_family), tmp_path / "plain", quiet=True, seed=1)
    scaled = mergelib.merge(_recipe(tiny_family, lines={"alpha": 0.3, "beta": 0.9}), tmp_path / "lines", quiet=True,
                            seed=1)
    n_layers = scaled.plan.config["num_hidden_layers"]
    base, merged, got = _tensors(tiny_family.base), _tensors(plain.out_dir), _tensors(scaled.out_dir)
    spec = scaled.plan.models[0].spec
    seen = set()
    for name, tensor in got.items():
        layer = spec.layer_of(name)
        depth = layer / (n_layers - 1) if layer is not None else (0.0 if "embed" in name else 1.0)
        scale = 0.3 + 0.9 * depth
        expected = base[name] + (merged[name] - base[name]) * scale
        assert torch.equal(tensor, expected), name
        seen.add(round(depth, 3))
    assert {0.0, 1.0} <= seen and len(seen) == n_layers


def test_alpha_one_beta_zero_changes_nothing(tiny_family, tmp_path):
    plain = mergelib.merge(_recipe(tiny_family, "dare_ties"), tmp_path / "plain", quiet=True, seed=2)
    same = mergelib.merge(_recipe(tiny_family, "dare_ties", {"alpha": 1.0, "beta": 0.0}), tmp_path / "same",
                          quiet=True, seed=2)
    assert _digests(same.out_dir) == _digests(plain.out_dir)


@pytest.mark.parametrize("method", ["task_arithmetic", "dare_ties"])
def test_row_blocks_streams_and_the_device_path_agree(tiny_family, tmp_path, monkeypatch, method):
    recipe = _recipe(tiny_family, method, {"alpha": 0.5, "beta": 0.7})
    whole = mergelib.merge(recipe, tmp_path / "whole", quiet=True, seed=3)
    device = mergelib.merge(recipe, tmp_path / "device", quiet=True, seed=3, kernels="torch")
    monkeypatch.setattr(mergelib.merging.plan, "STREAM_NUMEL", 1)
    monkeypatch.setattr(mergelib.merging.plan, "BLOCK_NUMEL", 1)
    blocks = mergelib.merge(recipe, tmp_path / "blocks", quiet=True, seed=3, memory_budget=1 << 16)
    assert {j.mode for j in blocks.plan.jobs} - {"whole"}
    assert _digests(blocks.out_dir) == _digests(whole.out_dir) == _digests(device.out_dir)


def test_lines_needs_a_task_vector_method(tiny_family):
    recipe = {"merge_method": "linear", "lines": {"alpha": 0.5, "beta": 0.5},
              "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in tiny_family.finetunes]}
    with pytest.raises(RecipeError, match="lines: scales merged task vectors"):
        load_recipe(recipe)
    with pytest.raises(RecipeError, match="lines"):
        load_recipe(_recipe(tiny_family, lines={"alpha": 0.5}))  # beta missing
