"""Parameter settings: scalars, gradients, step lists, filters, precedence (mergekit's rules)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mergelib.config.params import MISSING, evaluate, gradient, lookup, resolve


def test_scalar_is_itself():
    assert evaluate(0.3, "any", 0.7) == 0.3


def test_gradient_hand_values():
    # anchors [0, 1, 0.5] over t: t=0.25 -> halfway between 0 and 1; t=0.75 -> halfway between 1 and 0.5
    assert gradient([0.0, 1.0, 0.5], 0.0) == 0.0
    assert gradient([0.0, 1.0, 0.5], 0.25) == pytest.approx(0.5)
    assert gradient([0.0, 1.0, 0.5], 0.5) == pytest.approx(1.0)
    assert gradient([0.0, 1.0, 0.5], 0.75) == pytest.approx(0.75)
    assert gradient([0.0, 1.0, 0.5], 1.0) == pytest.approx(0.5)
    assert gradient([0.4], 0.9) == 0.4


@given(st.lists(st.floats(-10, 10), min_size=2, max_size=6), st.floats(0, 1))
def test_gradient_stays_within_neighbouring_anchors(values, t):
    s = t * (len(values) - 1)
    lo, hi = int(s), min(int(s) + 1, len(values) - 1)
    got = gradient(values, t)
    assert min(values[lo], values[hi]) - 1e-9 <= got <= max(values[lo], values[hi]) + 1e-9


def test_step_list_of_non_numbers():
    assert evaluate(["a", "b", "c"], "x", 0.0) == "a"
    assert evaluate(["a", "b", "c"], "x", 0.6) == "b"
    assert evaluate(["a", "b", "c"], "x", 1.0) == "c"


def test_filters_first_substring_match_wins():
    setting = [{"filter": "self_attn", "value": 0.1}, {"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.9}]
    assert evaluate(setting, "model.layers.0.self_attn.q_proj.weight", 0.5) == 0.1
    assert evaluate(setting, "model.layers.0.mlp.up_proj.weight", 0.5) == pytest.approx(0.5)
    assert evaluate(setting, "model.norm.weight", 0.5) == 0.9
    assert evaluate([{"filter": "mlp", "value": 1}], "model.norm.weight", 0.5) is MISSING
    assert evaluate([{"filter": "*", "value": 2}], "anything", 0.5) == 2


def test_precedence_falls_through_levels_without_a_match():
    source = {"weight": [{"filter": "mlp", "value": 0.7}]}
    top = {"weight": 0.2, "density": 0.5}
    assert lookup("weight", [source, {}, top], "layers.0.mlp.w", 0.0) == 0.7
    assert lookup("weight", [source, {}, top], "layers.0.attn.w", 0.0) == 0.2
    assert lookup("gamma", [source, {}, top], "x", 0.0) is MISSING
    assert resolve(["weight", "density", "gamma"], [source, top], "layers.0.attn.w", 0.0) == {
        "weight": 0.2,
        "density": 0.5,
    }
