"""mergelib: reproducible, streaming, mergekit-compatible model merging.

Names are imported on first use, so `import mergelib.errors` (or a pipeline stage that only reads config) does
not pay for importing torch.
"""

from __future__ import annotations

from importlib import import_module

_EXPORTS = {
    "merge": "mergelib.merging.api",
    "plan_merge": "mergelib.merging.api",
    "MergeResult": "mergelib.merging.api",
    "MergeRecipe": "mergelib.config.recipe",
    "load_recipe": "mergelib.config.recipe",
    "load_recipes": "mergelib.config.recipe",
    "merge_multi": "mergelib.merging.multi",
    "merge_state_dicts": "mergelib.merging.in_memory",
    "build_moe": "mergelib.moe.build",
    "extract_lora": "mergelib.lora.extract",
    "apply_lora": "mergelib.lora.apply",
    "MergelibError": "mergelib.errors",
    "RecipeError": "mergelib.errors",
    "InputModelError": "mergelib.errors",
    "OutputError": "mergelib.errors",
}

__all__ = sorted(_EXPORTS)

def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mergelib' has no attribute {name!r}")
