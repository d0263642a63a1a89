"""Planning: base roles, counts, ties, gradients and errors, all decided from headers before any read."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import mergelib
from mergelib import InputModelError, RecipeError, plan_merge
from mergelib.families.tiny import make_family, make_model


def test_gradient_and_filter_values_per_tensor(tiny_family):
    plan = plan_merge({
        "merge_method": "ties",
        "base_model": str(tiny_family.base),
        "models": [{"model": str(p), "parameters": {"weight": [0.0, 1.0]}} for p in tiny_family.finetunes],
        "parameters": {"density": [{"filter": "mlp", "value": 0.3}, {"value": 0.9}], "lambda": 2.0},
    })
    jobs = {j.name: j for j in plan.jobs}
    n = json.loads((tiny_family.base / "config.json").read_text())["num_hidden_layers"]
    for layer in range(n):
        job = jobs[f"model.layers.{layer}.mlp.up_proj.weight"]
        assert job.model_params[0].weight == pytest.approx(layer / (n - 1))
        assert job.model_params[0].density == 0.3
        assert jobs[f"model.layers.{layer}.self_attn.q_proj.weight"].model_params[1].density == 0.9
    assert jobs["lm_head.weight"].model_params[0].weight == 0.0  # post-layer weights sit at t = 0
    assert jobs["model.norm.weight"].params.lambda_ == 2.0
    assert jobs["model.norm.weight"].base is not None and len(jobs["model.norm.weight"].sources) == 2


def test_base_is_added_for_required_and_joins_linear(tiny_family):
    ties = plan_merge({"merge_method": "ties", "base_model": str(tiny_family.base),
                       "models": [{"model": str(tiny_family.finetunes[0]), "parameters": {"weight": 1}}]})
    assert len(ties.models) == 2 and ties.jobs[0].base.model == 1
    linear = plan_merge({"merge_method": "linear", "base_model": str(tiny_family.base),
                         "models": [{"model": str(tiny_family.finetunes[0])}], "parameters": {"weight": 1}})
    assert linear.jobs[0].base is None and len(linear.jobs[0].sources) == 2


@pytest.mark.parametrize(
    "recipe,fragment",
    [
        ({"merge_method": "ties", "models": "FTS"}, "ties needs a base model"),
        ({"merge_method": "slerp", "base_model": "BASE", "models": "FTS", "parameters": {"t": 0.5}},
         "slerp takes exactly 1 model(s) besides the base; got 2"),
        ({"merge_method": "slerp", "base_model": "BASE", "models": "FT1"}, "parameter 't' is required by slerp"),
        ({"merge_method": "linear", "models": "FTS", "parameters": {"weight": [1.0, -1.0]}},
         "weights sum to 0"),
    ],
)
def test_recipe_errors_at_planning(tiny_family, recipe, fragment):
    refs = {"BASE": str(tiny_family.base)}
    models = {"FTS": [{"model": str(p)} for p in tiny_family.finetunes],
              "FT1": [{"model": str(tiny_family.finetunes[0])}]}
    recipe = {k: refs.get(v, v) if isinstance(v, str) else v for k, v in recipe.items()}
    recipe["models"] = models[recipe["models"]]
    if recipe["merge_method"] == "linear":
        recipe["models"] = [{"model": str(tiny_family.finetunes[0]), "parameters": {"weight": 1.0}},
                            {"model": str(tiny_family.finetunes[1]), "parameters": {"weight": -1.0}}]
        recipe["parameters"] = {}
    with pytest.raises(RecipeError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        plan_merge(recipe)


def test_layer_count_mismatch_needs_slices(tmp_path, tiny_family):
    other = make_model(tmp_path / "deep", size="tiny", seed=3)
    config = json.loads((other / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputModelError, match="different layer counts"):
        plan_merge({"merge_method": "linear", "parameters": {"weight": 1},
                    "models": [{"model": str(tiny_family.base)}, {"model": str(other)}]})


def test_layer_range_beyond_model(tiny_family):
    with pytest.raises(RecipeError, match=r"slices\[0\].sources\[0\].layer_range: \[0, 99\) exceeds"):
        plan_merge({"merge_method": "passthrough",
                    "slices": [{"sources": [{"model": str(tiny_family.base), "layer_range": [0, 99]}]}]})


def test_tied_embeddings_stay_tied_and_mixed_ties_untie(tmp_path):
    tied = make_family(tmp_path / "tied", size="tiny", n_finetunes=1, seed=0, tie_embeddings=True)
    plan = plan_merge({"merge_method": "task_arithmetic", "base_model": str(tied.base),
                       "models": [{"model": str(tied.finetunes[0]), "parameters": {"weight": 1.0}}]})
    assert "lm_head.weight" not in {j.name for j in plan.jobs}
    assert plan.config["tie_word_embeddings"] is True

    untied = make_model(tmp_path / "untied", size="tiny", seed=0)
    out = tmp_path / "mixed"
    mergelib.merge({"merge_method": "linear", "models": [
        {"model": str(tied.base), "parameters": {"weight": 0.5}},
        {"model": str(untied), "parameters": {"weight": 0.5}}]}, out, quiet=True)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    merged = {k: v for p in out.glob("*.safetensors") for k, v in load_file(p).items()}
    a = {k: v for p in tied.base.glob("*.safetensors") for k, v in load_file(p).items()}
    b = {k: v for p in untied.glob("*.safetensors") for k, v in load_file(p).items()}
    want = 0.5 * a["model.embed_tokens.weight"] + 0.5 * b["lm_head.weight"]  # the tied model's head is its embedding
    torch.testing.assert_close(merged["lm_head.weight"], want)


def every_input_tensor(plan):
    return {(m.label, name) for m in plan.models for name in m.index.tensors}


@pytest.mark.parametrize("kind", ["models", "frankenmerge", "unknown tensor"])
def test_every_input_tensor_is_merged_or_listed_as_left_out(tiny_family, tmp_path, kind):
    """Nothing is dropped silently: each input tensor feeds an output tensor or is in plan.left_out with why,
    which --dry-run prints and mergelib_run.json keeps."""
    import shutil

    from safetensors.torch import load_file, save_file

    base, ft1, ft2 = tiny_family.base, *tiny_family.finetunes
    if kind == "unknown tensor":
        ft2 = tmp_path / "ft2"
        shutil.copytree(tiny_family.finetunes[1], ft2)
        shard = sorted(ft2.glob("*.safetensors"))[0]
        tensors = load_file(shard)
        tensors["model.rotary_emb.inv_freq"] = torch.ones(8)
        save_file(tensors, shard, metadata={"format": "pt"})
        index = json.loads((ft2 / "model.safetensors.index.json").read_text())
        index["weight_map"]["model.rotary_emb.inv_freq"] = shard.name
        (ft2 / "model.safetensors.index.json").write_text(json.dumps(index))
    if kind == "frankenmerge":
        recipe = {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": str(base), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(ft1), "layer_range": [1, 4]}]}]}
    else:
        recipe = {"merge_method": "ties", "base_model": str(base), "models": [
            {"model": str(m), "parameters": {"weight": 1.0, "density": 0.5}} for m in (ft1, ft2)]}
    plan = plan_merge(recipe)
    read = {(plan.models[s.model].label, s.name) for job in plan.jobs for s in job.inputs}
    left = {(m, t): why for m, t, why in plan.left_out}
    assert read | set(left) == every_input_tensor(plan) and not read & set(left)
    if kind == "models":
        assert left == {}
    elif kind == "frankenmerge":
        assert left[(str(base), "model.layers.2.self_attn.q_proj.weight")] == "layer 2 is in no slice"
        assert left[(str(ft1), "model.layers.0.mlp.up_proj.weight")] == "layer 0 is in no slice"
        assert left[(str(ft1), "model.embed_tokens.weight")] == "its place in the output comes from another input"
    else:
        assert left == {(str(ft2), "model.rotary_emb.inv_freq"): "unknown to the llama architecture spec"}


def test_memory_budget_leaves_room_beside_the_largest_tensor():
    """The default budget fits the largest tensor's work and, beside it, threads - 1 of the larger ones (90th
    percentile), so the other threads are not idle while an embedding is merged; at least 256 MiB."""
    from mergelib.merging.plan import memory_budget

    works = [500 << 20, 480 << 20] + [300 << 20] * 4 + [130 << 20] * 14
    p90 = sorted(works, reverse=True)[len(works) // 10]
    assert memory_budget(works, 2) == (500 << 20) + p90
    assert memory_budget(works, 4) == (500 << 20) + 3 * p90
    assert memory_budget(works, 1) == 500 << 20
    assert memory_budget([1 << 20], 2) == 256 << 20


def test_try_acquire_takes_only_what_fits_now():
    from mergelib.merging.engine import MemoryBudget

    budget = MemoryBudget(100)
    assert budget.try_acquire(70) == 70
    assert budget.try_acquire(40) is None  # does not fit beside the 70
    assert budget.try_acquire(30) == 30
    budget.release(70)
    assert budget.try_acquire(500) is None  # larger than the budget: runs alone, once nothing else holds memory
    budget.release(30)
    assert budget.try_acquire(500) == 100
    budget.cancel()
    budget.release(100)
    assert budget.try_acquire(1) is None
