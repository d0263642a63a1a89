"""Fixtures of the recipe-search tests: the quick demo family (seconds to train), built once per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def demo_quick(tmp_path_factory):
    from mergelib.families.demo import build_demo_family

    return build_demo_family(tmp_path_factory.mktemp("search-demo") / "demo", seed=0, quick=True,
                             skills=("add", "rev"))

