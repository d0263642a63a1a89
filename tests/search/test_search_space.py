"""The search space: keys, what a trial draws, the recipe it makes, and one-line errors before anything starts."""

from __future__ import annotations

import optuna
import pytest

from mergelib.config.recipe import load_recipe
from mergelib.search.config import SearchConfig, validate_search
from mergelib.search.space import SearchSpace, SearchSpaceError, parse_key


def config(space, **extra) -> SearchConfig:
    return validate_search({"objective": {"tasks": {"demo_add": 1}}, "space": space, **extra}, "test")


def recipe(family, method="ties") -> dict:
    return {"merge_method": method, "base_model": str(family.base),
            "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in family.finetunes],
            "parameters": {"density": 0.5}, "dtype": "float32"}


def test_keys_name_model_parameter_and_filter():
    assert parse_key("density") == parse_key("density")
    key = parse_key("ft_add.weight@mlp")
    assert (key.model, key.param, key.filter) == ("ft_add", "weight", "mlp")
    assert (parse_key("weight").model, parse_key("weight").filter) == (None, None)
    with pytest.raises(SearchSpaceError, match="parameter"):
        parse_key("ft1.")


def test_recipe_for_writes_mergekit_parameters(tiny_family):
    space = SearchSpace(config({
        "method": {"choices": ["ties", "task_arithmetic"]},
        "density": {"low": 0.2, "high": 1.0},
        "ft1.weight": {"low": 0.5, "high": 1.5},
        "ft2.weight@mlp": {"low": 0.1, "high": 0.9},
        "weight": {"low": 0.1, "high": 1.0, "points": 3},
    }), recipe(tiny_family))
    values = {"method": "ties", "density": 0.3, "ft1.weight": 1.25, "ft2.weight@mlp": 0.4,
              "weight[0]": 0.1, "weight[1]": 0.5, "weight[2]": 0.9}
    out = space.recipe_for(values)
    assert out["merge_method"] == "ties"
    assert out["parameters"] == {"density": 0.3, "weight": [0.1, 0.5, 0.9]}
    assert out["models"][0]["parameters"] == {"weight": 1.25}
    # the filter entry first, then the model's own unfiltered weight for every other tensor
    assert out["models"][1]["parameters"] == {"weight": [{"filter": "mlp", "value": 0.4}, {"value": 1.0}]}
    load_recipe(out)
    # task_arithmetic ignores density: neither drawn nor written
    trial_values = space.suggest(optuna.trial.FixedTrial({
        "method": "task_arithmetic", "ft1.weight": 0.7, "ft2.weight@mlp": 0.2, "weight[0]": 0.3, "weight[1]": 0.3,
        "weight[2]": 0.3}))
    assert "density" not in trial_values
    assert "density" not in space.recipe_for(trial_values).get("parameters", {})


def test_fixed_values_and_integer_choices(tiny_family):
    space = SearchSpace(config({"density": 0.7, "ft1.weight": {"choices": [0.5, 1.0]}}), recipe(tiny_family))
    values = space.suggest(optuna.trial.FixedTrial({"ft1.weight": 0.5}))
    assert values == {"ft1.weight": 0.5}
    out = space.recipe_for(values)
    assert out["parameters"]["density"] == 0.7 and out["models"][0]["parameters"]["weight"] == 0.5


@pytest.mark.parametrize("space, method, message", [
    ({"t": {"low": 0.0, "high": 1.0}}, "ties", "search.space.t: ties does not take 't'"),
    ({"ft9.weight": {"low": 0.1, "high": 1.0}}, "ties", "search.space.ft9.weight: no model 'ft9' in the recipe"),
    ({"density": {"low": 0.5, "high": 1.5}}, "ties", "at the high end of every range, the recipe is invalid"),
    ({"method": {"choices": ["ties", "tiess"]}}, "ties", "search.space.method:"),
    ({"method": {"low": 0, "high": 1}}, "ties", "give the methods as choices"),
])
def test_space_errors_are_one_line(tiny_family, space, method, message):
    with pytest.raises(SearchSpaceError) as err:
        SearchSpace(config(space), recipe(tiny_family, method))
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("data, message", [
    ({"space": {"density": {"low": 0.9, "high": 0.2}}}, "empty range: low 0.9 must be below high 0.2"),
    ({"space": {"density": {"low": 0.2}}}, "a range needs both low and high"),
    ({"sampler": "bayes"}, "search.sampler: Input should be"),
    ({"trials": None, "timeout_s": None}, "give a budget"),
    ({"sampler": "cmaes", "objective": {"tasks": {"demo_add": 1}, "aggregate": "pareto"}}, "cmaes optimises one"),
    ({"objective": {"tasks": {"demo_add": 0}}}, "weight 0.0 must be above 0"),
])
def test_config_errors_name_the_key(data, message):
    base = {"objective": {"tasks": {"demo_add": 1}}, "space": {"density": {"low": 0.2, "high": 1.0}}}
    with pytest.raises(Exception) as err:
        validate_search({**base, **data}, "conf")
    assert message in str(err.value) and str(err.value).startswith("conf: ")


@pytest.mark.parametrize("name", ["demo", "layered", "tiny"])
def test_every_shipped_search_space_fits_its_family(name, tiny_family, demo_quick):
    from pathlib import Path

    from mergelib.config.compose import compose
    from mergelib.config.run import run_config

    conf = Path(__file__).resolve().parents[2] / "conf"
    assert sorted(p.stem for p in (conf / "search").glob("*.yaml")) == ["demo", "layered", "tiny"]
    overrides = [f"search={name}"] + (["models=tiny"] if name == "tiny" else [])
    config = run_config(compose(overrides, conf), source=name)
    family = tiny_family if name == "tiny" else demo_quick
    refs = dict(zip(config.models.refs(), [str(family.base), *map(str, family.finetunes)]))
    space = SearchSpace(config.search, config.recipe(), refs)  # every corner planned on the family's headers
    assert space.dimensions and len(space.methods) >= 2


def test_the_base_recipe_is_the_first_trial_when_it_lies_in_the_space(tiny_family):
    base = recipe(tiny_family)  # ties, weight 1.0 per model, density 0.5
    space = SearchSpace(config({"method": {"choices": ["ties", "dare_ties"]}, "density": {"low": 0.2, "high": 1.0},
                                "ft1.weight": {"low": 0.5, "high": 1.5}, "weight@mlp": {"low": 0.1, "high": 2.0}}),
                        base)
    values = space.recipe_values()
    assert values == {"method": "ties", "density": 0.5, "ft1.weight": 1.0, "weight@mlp": 1.0}
    rebuilt = space.recipe_for(values)
    assert rebuilt["models"][0]["parameters"] == {"weight": 1.0} and rebuilt["parameters"]["density"] == 0.5
    outside = SearchSpace(config({"density": {"low": 0.6, "high": 1.0}}), base)
    assert outside.recipe_values() is None  # density 0.5 is out of range: nothing to start from
    other = SearchSpace(config({"method": {"choices": ["dare_ties"]}, "density": {"low": 0.2, "high": 1.0}}), base)
    assert other.recipe_values() is None
