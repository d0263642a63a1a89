"""The recipe shapes of mergekit's own basic-merge tests (two models with weight 0.6 / 0.4, the method's global
parameters at the top), written here as data: every one merges the tiny family, and the one mergekit rejects
(DELLA with epsilon 1.35) is a one-line error. Methods that ignore the per-model weight say so."""

from __future__ import annotations

import pytest

import mergelib
from mergelib.errors import RecipeError

# (method, which models are "a" and "b" and the base, global parameters); a/b/c = base, ft1, ft2 of the family
CASES = [
    ("linear", ("a", "b", None), {}),
    ("slerp", ("a", "b", "a"), {"t": 0.35}),
    ("nuslerp", ("a", "b", "c"), {}),
    ("task_arithmetic", ("a", "b", "c"), {}),
    ("breadcrumbs", ("a", "b", "c"), {}),
    ("ties", ("a", "b", "c"), {"density": 0.3}),
    ("sce", ("a", "b", "c"), {"select_topk": 0.5}),
    ("ram", ("a", "b", "c"), {}),
    ("ramplus_tl", ("a", "b", "c"), {"r": 0.05, "alpha": 1.0}),
    ("multislerp", ("a", "b", "c"), {}),
    ("dare_ties", ("a", "b", "c"), {"density": 0.66}),
    ("model_stock", ("b", "c", "a"), {}),
    ("model_stock", ("b", "c", "a"), {"filter_wise": True}),
    ("arcee_fusion", ("a", "b", "a"), {}),
    ("nearswap", ("a", "b", "a"), {"t": 0.0001}),
    ("della", ("a", "b", "c"), {"density": 0.66, "epsilon": 0.05, "lambda": 0.5}),
    ("karcher", ("a", "b", "c"), {"max_iter": 5, "tol": 1e-5}),
]
IGNORES_WEIGHT = {"slerp", "sce", "ram", "ramplus_tl", "model_stock", "arcee_fusion", "nearswap", "karcher"}


def recipe(family, method, roles, params):
    models = {"a": family.base, "b": family.finetunes[0], "c": family.finetunes[1]}
    first, second, base = roles
    out = {"merge_method": method, "models": [{"model": str(models[first]), "parameters": {"weight": 0.6}},
                                              {"model": str(models[second]), "parameters": {"weight": 0.4}}]}
    if base is not None:
        out["base_model"] = str(models[base])
    if params:
        out["parameters"] = params
    return out


@pytest.mark.parametrize("method, roles, params", CASES, ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(CASES)])
def test_mergekit_s_test_recipes_merge(tiny_family, tmp_path, method, roles, params):
    result = mergelib.merge(recipe(tiny_family, method, roles, params), tmp_path / "out", quiet=True)
    assert result.n_tensors > 0 and (tmp_path / "out" / "config.json").is_file()
    assert ("weight" in result.plan.ignored_params) == (method in IGNORES_WEIGHT)


def test_della_with_epsilon_outside_the_band_is_refused(tiny_family, tmp_path):
    bad = recipe(tiny_family, "della", ("a", "b", "c"), {"density": 0.66, "epsilon": 1.35, "lambda": 0.5})
    with pytest.raises(RecipeError, match="epsilon") as info:
        mergelib.merge(bad, tmp_path / "out", quiet=True)
    assert "\n" not in str(info.value)
