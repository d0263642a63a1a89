"""Stage search (on demand, outside `dvc repro`): tune the recipe in the `merge` node over conf/search/'s space, on
validation prompts, with an Optuna study (resumable: its storage is sqlite beside mlflow.db unless search.storage
names another); writes paths.search/best.yml and reports/search/.

    python -m stages.search [search.trials=60 search.executor=ray search.seed=1 ...]
"""

from __future__ import annotations

from stages._runner import main


def run(config, tracker) -> str:
    from pathlib import Path

    from mergelib.errors import MergelibError
    from mergelib.pipeline.fetch import fetch_inputs, pinned_refs, read_lock
    from mergelib.search.run import run_search
    from mergelib.search.scorer import HELD_OUT

    if config.search is None:
        raise MergelibError("search: no `search:` node; add search=demo (conf/search/) or define search.space")
    if not Path(config.paths.lock).is_file():
        fetch_inputs(config.input_refs(), config.paths.models, config.models)
    lock = read_lock(config.paths.lock)
    refs = pinned_refs(lock, config.input_refs(), config.paths.lock)  # checks every file against its sha256
    inputs = [lock[ref].files for ref in config.input_refs()]
    outcome = run_search(config.recipe(), config.search, refs=refs, out_dir=config.paths.search,
                         reports_dir=f"{config.paths.reports}/search", family=config.models.name, seed=config.seed,
                         inputs=inputs, tracker=tracker)
    study = outcome.study
    top, counts = outcome.best[0], outcome.counts
    held = ", ".join(f"{t} {v:.3f}" for t, v in sorted(top["heldout"].items()))
    default = ", ".join(f"{t} {v:.3f}" for t, v in sorted(outcome.default[HELD_OUT].items()))
    ran = sum(counts.values())
    return (f"{ran} trials run now ({counts['complete']} complete, {counts['pruned']} pruned, {counts['failed']} "
            f"failed, {counts['lost']} lost) in study '{study}'; best trial {top['number']} -> "
            f"{outcome.paths['best']}; held-out {held} (default recipe {default})")


if __name__ == "__main__":
    main("search", run)
