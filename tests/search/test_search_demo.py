"""Slow: the shipped demo search on the trained demo family keeps most of both skills on prompts it never saw."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergelib.config.compose import compose
from mergelib.config.run import run_config
from mergelib.families.demo import build_demo_family
from mergelib.search.run import run_search

CONF = Path(__file__).resolve().parents[2] / "conf"


@pytest.mark.slow
def test_demo_search_keeps_85_percent_of_both_skills_held_out(tmp_path):
    family = build_demo_family(tmp_path / "demo", seed=0, skills=("add", "rev"))  # a few CPU-minutes
    config = run_config(compose(["models=demo"], CONF), source="test")
    refs = dict(zip(config.models.refs(), [str(family.base), *map(str, family.finetunes)]))
    search = config.search.model_copy(update={"storage": f"sqlite:///{tmp_path}/optuna.db"})
    outcome = run_search(config.recipe(), search, refs=refs, out_dir=tmp_path / "out",
                         reports_dir=tmp_path / "reports", family="demo", log=lambda _: None)
    top = outcome.best[0]
    parent = {t: max(p["test"][t] for p in outcome.parents.values()) for t in top["heldout"]}
    share = {t: top["heldout"][t] / parent[t] for t in parent}
    default = {t: outcome.default["test"][t] / parent[t] for t in parent}
    assert min(share.values()) >= 0.85, (share, default)
    assert min(share.values()) > min(default.values()) and sum(share.values()) > sum(default.values())
    assert top["heldout"]["demo_add"] > outcome.default["test"]["demo_add"]
    assert (tmp_path / "out/best.yml").is_file()
