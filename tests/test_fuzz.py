"""Fuzzing: random recipes reach the validator and random bytes reach the header reader; only our own errors
come out (never a traceback from deep inside)."""

from __future__ import annotations

import json
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergelib import MergeRecipe, RecipeError, load_recipe
from mergelib.errors import InputModelError
from mergelib.io.index import index_model

KEYS = ["merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source",
        "tokenizer", "chat_template", "model", "layer_range", "sources", "weight", "density", "filter", "value",
        "t", "lambda", "normalize", "name", "source", "tokens", "pad_to_multiple_of", "bogus"]
METHODS = ["ties", "linear", "slerp", "dare_ties", "passthrough", "della", "tie", 3, None]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(METHODS))
values = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.sampled_from(KEYS), children, max_size=5)),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(KEYS), values, max_size=7), st.sampled_from(METHODS))
def test_random_recipes_only_raise_recipe_errors(recipe, method):
    recipe = {"merge_method": method, **recipe} if method is not None else recipe
    try:
        result = load_recipe(recipe)
    except RecipeError as exc:
        assert str(exc) and "\n" not in str(exc)
    else:
        assert isinstance(result, MergeRecipe)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200))
def test_random_yaml_text_only_raises_recipe_errors(text):
    try:
        load_recipe(text + "\n")
    except RecipeError as exc:
        assert "\n" not in str(exc)


def header_file(tmp_path, blob: bytes):
    model = tmp_path / "m"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(blob)
    return model


headers = st.dictionaries(
    st.text(max_size=8),
    st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "F16", "BF16", "I8", "X9", 3]),
                           "shape": st.lists(st.integers(-2, 10**12), max_size=3),
                           "data_offsets": st.lists(st.integers(-5, 10**15), min_size=0, max_size=3)}),
    max_size=3,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(headers, st.integers(0, 64), st.binary(max_size=64), st.booleans())
def test_header_reader_only_raises_input_errors(tmp_path, header, payload_len, garbage, lie_about_length):
    text = json.dumps(header).encode()
    length = len(text) if not lie_about_length else (1 << 62)
    blob = struct.pack("<Q", length) + text + b"\0" * payload_len
    for candidate in (blob, garbage):
        model = header_file(tmp_path, candidate)
        try:
            index = index_model(model)
        except InputModelError as exc:
            assert "model.safetensors" in str(exc) and "\n" not in str(exc)
        else:
            for info in index.tensors.values():
                assert all(d >= 0 for d in info.shape)
