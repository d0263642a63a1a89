"""Helpers of the recipe-search tests."""

from __future__ import annotations


def demo_recipe(family) -> dict:
    """Task arithmetic of the family's two fine-tunes at weight 0.8 (the pipeline's default recipe)."""
    return {"merge_method": "task_arithmetic", "base_model": str(family.base),
            "models": [{"model": str(p), "parameters": {"weight": 0.8}} for p in family.finetunes],
            "dtype": "float32"}
