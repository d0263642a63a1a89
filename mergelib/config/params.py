"""Parameter settings as mergekit users write them, evaluated to one value per tensor.

A setting is a scalar, a gradient (list of numbers, piecewise-linear over the layers of an output slice), a
step list (list of non-numbers), or a filter list `[{filter: "self_attn", value: ...}, {value: ...}]` whose first
entry with a matching filter (None, "*", or a substring of the tensor name) wins. Lookup walks the precedence
levels (source, slice, top level) and takes the first level that yields a value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

MISSING = object()


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_filter_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) for v in value)


def gradient(values: Sequence[float], t: float) -> float:
    """Piecewise-linear interpolation of evenly spaced anchors at position t in [0, 1]."""
    if len(values) == 1:
        return float(values[0])
    s = t * (len(values) - 1)
    i0 = min(int(math.floor(s)), len(values) - 1)
    i1 = min(len(values) - 1, i0 + 1)
    f = s - i0
    return (1.0 - f) * float(values[i0]) + f * float(values[i1])


def evaluate(setting: Any, tensor_name: str, t: float) -> Any:
    """The value of one setting for a tensor at slice position t, or MISSING when no filter matches."""
    if _is_filter_list(setting):
        for entry in setting:
            pattern = entry.get("filter")
            if pattern is None or pattern == "*" or pattern in tensor_name:
                return evaluate(entry["value"], tensor_name, t)
        return MISSING
    if isinstance(setting, list):
        if not setting:
            return MISSING
        if all(_is_number(v) for v in setting):
            return gradient(setting, t)
        return setting[min(int(math.floor(t * (len(setting) - 1))), len(setting) - 1)]
    return setting


def lookup(name: str, levels: Sequence[Mapping[str, Any]], tensor_name: str, t: float) -> Any:
    """The value of parameter `name` from the first level (highest precedence first) that yields one."""
    for level in levels:
        if name in level:
            value = evaluate(level[name], tensor_name, t)
            if value is not MISSING:
                return value
    return MISSING


def resolve(names: Sequence[str], levels: Sequence[Mapping[str, Any]], tensor_name: str, t: float) -> dict:
    """Every parameter in `names` that some level sets, evaluated for this tensor."""
    out = {}
    for name in names:
        value = lookup(name, levels, tensor_name, t)
        if value is not MISSING:
            out[name] = value
    return out
