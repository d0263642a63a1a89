"""Recipe schema: mergekit YAML accepted as written; mistakes are one-line errors that suggest the fix."""

import pytest

from mergelib import RecipeError, load_recipe
from mergelib.config.recipe import ModelRef

BASE = {"merge_method": "ties", "base_model": "org/base", "models": [{"model": "org/a", "parameters": {"weight": 1}}]}


def recipe(**changes):
    return {**BASE, **changes}


def test_mergekit_yaml_is_accepted():
    text = """
merge_method: dare_ties
base_model: mistralai/Mistral-7B-v0.1@main
models:
  - model: org/a
    parameters:
      weight: [0.2, 0.8]
      density: [{filter: self_attn, value: 0.3}, {value: 0.6}]
  - model: ./local/b
parameters:
  int8_mask: true
  normalize: false
dtype: bfloat16
tokenizer_source: base
"""
    r = load_recipe(text)
    assert r.merge_method == "dare_ties"
    assert r.base_model == ModelRef(path="mistralai/Mistral-7B-v0.1", revision="main")
    assert r.models[1].model.path == "./local/b"
    assert r.dtype == "bfloat16"


def test_slices_syntax():
    r = load_recipe(
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": "a", "layer_range": [0, 16]}]},
                {"sources": [{"model": "b", "layer_range": [8, 24]}], "parameters": {}},
            ],
            "dtype": "torch.float16",
        }
    )
    assert [s.sources[0].layer_range for s in r.slices] == [(0, 16), (8, 24)]
    assert r.dtype == "float16"


@pytest.mark.parametrize(
    "text,expected",
    [
        ("org/name", ("org/name", None, None)),
        ("org/name@v1.0", ("org/name", "v1.0", None)),
        ("org/name@abc+org/lora", ("org/name", "abc", "org/lora")),
        ("./models/x", ("./models/x", None, None)),
    ],
)
def test_model_reference_strings(text, expected):
    ref = ModelRef.model_validate(text)
    assert (ref.path, ref.revision, ref.lora) == expected
    assert str(ref) == text


@pytest.mark.parametrize(
    "bad,fragment",
    [
        (recipe(merge_methd="ties"), "unknown key 'merge_methd' (did you mean 'merge_method'?)"),
        (recipe(merge_method="tie"), "unknown method 'tie' (did you mean 'ties'?)"),
        (recipe(merge_method="slerpp"), "did you mean 'slerp'?"),
        (recipe(models=[{"modle": "org/a"}]), "unknown key 'models[0].modle' (did you mean 'model'?)"),
        (recipe(parameters={"densty": 0.5}), "parameters.densty: unknown parameter for ties (did you mean 'density'?)"),
        (recipe(models=[{"model": "a", "parameters": {"normalize": True}}]), "is a global parameter of ties"),
        (recipe(models=None), "give exactly one of 'models' or 'slices'"),
        (recipe(slices=[{"sources": [{"model": "a", "layer_range": [0, 2]}]}]), "exactly one of 'models' or 'slices'"),
        (recipe(dtype="float8"), "dtype"),
        (recipe(models=[{"model": "a"}, {"model": "a"}]), "models[1]: 'a' is already models[0]"),
        (recipe(tokenizer_source="base", tokenizer={"source": "union"}), "not both"),
        ({"models": [{"model": "a"}]}, "missing required key 'merge_method'"),
        (recipe(base_model="a@b@c"), "more than one '@'"),
    ],
)
def test_bad_recipes_name_the_field(bad, fragment):
    with pytest.raises(RecipeError) as info:
        load_recipe(bad)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "r.yml"
    path.write_text("merge_method: ties\nmodels:\n  - model: [unclosed\n")
    with pytest.raises(RecipeError, match=r"r.yml: invalid YAML at line \d+"):
        load_recipe(path)


def test_missing_file():
    with pytest.raises(RecipeError, match="cannot read the recipe"):
        load_recipe("/nonexistent/recipe.yml")


def test_round_trip_yaml():
    r = load_recipe(BASE)
    again = load_recipe(r.to_yaml())
    assert again == r
