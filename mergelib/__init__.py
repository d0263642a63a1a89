"""mergelib: reproducible, streaming, mergekit-compatible model merging."""

from mergelib.api import MergeResult, merge, plan_merge
from mergelib.config.recipe import MergeRecipe, load_recipe
from mergelib.errors import InputModelError, MergelibError, OutputError, RecipeError

__all__ = [
    "InputModelError",
    "MergeRecipe",
    "MergeResult",
    "MergelibError",
    "OutputError",
    "RecipeError",
    "load_recipe",
    "merge",
    "plan_merge",
]
