"""Radix-select order statistics: exact against a sort, any input order, deterministic tie-breaking."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergelib.methods.select import kth_smallest, top_k_mask

floats = st.floats(-1e6, 1e6, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(st.lists(floats, min_size=1, max_size=60), st.data())
def test_kth_smallest_matches_sorting(values, data):
    x = torch.tensor(values, dtype=torch.float32)
    rank = data.draw(st.integers(0, len(values) - 1))
    assert float(kth_smallest(x, rank)) == sorted(x.tolist())[rank]


def test_ordered_and_repeated_inputs_are_fast_and_exact():
    n = 1 << 20
    descending = torch.arange(n, 0, -1, dtype=torch.float32)
    assert float(kth_smallest(descending, n // 4)) == n // 4 + 1
    repeated = torch.zeros(n)
    repeated[::3] = 2.5
    assert float(kth_smallest(repeated, n - 1)) == 2.5
    assert float(kth_smallest(torch.tensor([-0.0, 0.0, -1.0]), 1)) == 0.0
    with pytest.raises(ValueError):
        kth_smallest(torch.ones(3), 3)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([0.0, 1.0, 2.0, 3.5, -1.0]), min_size=1, max_size=40), st.data())
def test_top_k_mask_against_stable_sort(values, data):
    x = torch.tensor(values)
    k = data.draw(st.integers(-1, len(values) + 1))
    # reference: order by value descending, then index ascending; keep the first k
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    want = [False] * len(values)
    for i in order[: max(0, k)]:
        want[i] = True
    assert top_k_mask(x, k).tolist() == want
