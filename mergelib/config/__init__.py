"""Recipes (mergekit YAML) and their parameter values."""

from mergelib.config.recipe import MergeRecipe, ModelRef, load_recipe

__all__ = ["MergeRecipe", "ModelRef", "load_recipe"]
