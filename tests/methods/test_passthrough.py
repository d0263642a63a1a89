"""passthrough: the single input unchanged, or times its per-model `scale`."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from mergelib.methods.base import MethodInputs, NoParams
from mergelib.methods.passthrough import SPECS, PassthroughModelParams, merge


def passthrough(x: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    return merge(MethodInputs((x,), None, (PassthroughModelParams(scale=scale),), "w"), NoParams())


def test_spec_and_params() -> None:
    (spec,) = SPECS
    assert (spec.name, spec.base, spec.min_models, spec.max_models) == ("passthrough", "none", 1, 1)
    assert spec.params is NoParams and spec.model_params is PassthroughModelParams
    assert PassthroughModelParams().scale is None
    with pytest.raises(ValidationError, match="weight"):
        PassthroughModelParams(weight=1.0)  # type: ignore[call-arg]


def test_unscaled_is_the_input_itself() -> None:
    x = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.0, -0.25]])
    assert passthrough(x) is x


def test_golden_scales() -> None:
    x = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.0, -0.25]])
    assert torch.equal(passthrough(x, 0.5), torch.tensor([[0.5, -1.0, 1.5], [0.25, 0.0, -0.125]]))
    assert torch.equal(passthrough(x, 0.0), torch.zeros(2, 3))
    assert torch.equal(passthrough(x, -1.0), -x)
    assert torch.equal(x, torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.0, -0.25]]))  # not modified in place


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, width=32), min_size=1, max_size=12), st.floats(-4.0, 4.0, width=32))
def test_scale_matches_elementwise_product(values: list[float], scale: float) -> None:
    out = passthrough(torch.tensor(values), scale)
    expected = [float(torch.tensor(v * scale, dtype=torch.float32)) for v in values]  # one rounding, as float32
    assert out.dtype == torch.float32 and out.tolist() == expected
