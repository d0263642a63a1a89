"""The explicit registry of merge methods: every module listed here ends in `SPECS = (MethodSpec(...), ...)`."""

from __future__ import annotations

from mergelib.errors import RecipeError, did_you_mean
from mergelib.methods import (
    arcee_fusion,
    fisher,
    gta,
    karcher,
    linear,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    ram,
    regmean,
    sce,
    slerp,
    spectral,
    wudi,
)
from mergelib.methods.base import MethodInputs, MethodSpec, NoParams, Params

METHOD_MODULES = (
    linear,
    slerp,
    nuslerp,
    multislerp,
    karcher,
    passthrough,
    gta,
    model_stock,
    arcee_fusion,
    nearswap,
    sce,
    ram,
    spectral,
    wudi,
    regmean,
    fisher,
)

REGISTRY: dict[str, MethodSpec] = {spec.name: spec for module in METHOD_MODULES for spec in module.SPECS}


def get_method(name: str) -> MethodSpec:
    """The registered method called `name`, or a RecipeError naming the closest match."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise RecipeError(
            f"merge_method: unknown method '{name}'{did_you_mean(name, REGISTRY)}; "
            f"run `mergelib methods` to list the {len(REGISTRY)} methods"
        ) from None


__all__ = ["REGISTRY", "METHOD_MODULES", "MethodInputs", "MethodSpec", "NoParams", "Params", "get_method"]
