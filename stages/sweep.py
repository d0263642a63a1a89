"""Stage sweep (outside `dvc repro`): merge the family with every method of conf/experiment/method_sweep.yaml,
evaluate each, and compare them in reports/method_comparison.{md,csv,png}.

    python -m stages.sweep [models=demo_quick eval=quick ...]   (experiment=method_sweep is implied)
"""

from __future__ import annotations

import sys

from stages._runner import main

SWEEP = "experiment=method_sweep"


def common_overrides(argv: list[str]) -> list[str]:
    """The user's overrides minus the sweep preset: what every entry is composed with."""
    return [a for a in argv if not a.startswith("experiment=")]


def run(config, tracker) -> str:
    from pathlib import Path

    from mergelib.errors import MergelibError
    from mergelib.pipeline.fetch import fetch_inputs
    from mergelib.pipeline.sweep import run_sweep

    if not config.sweep:
        raise MergelibError("sweep: no `sweep:` entries; use experiment=method_sweep or define sweep.<label>")
    if not Path(config.paths.lock).is_file():
        fetch_inputs(config.input_refs(), config.paths.models, config.models)
    common = common_overrides(sys.argv[1:])
    out = run_sweep(config.sweep, common, f"{Path(config.paths.merged).parent}/sweep", config.paths.reports)
    for path in out["paths"].values():
        tracker.log_artifact(path, "sweep")
    for label, doc in out["documents"].items():
        for task, metrics in doc["merged"].items():
            if "exact_match" in metrics:
                tracker.log_metrics({f"sweep.{label}.{task}.exact_match": metrics["exact_match"]})
    return f"{len(out['documents'])} merges compared -> {out['paths']['table']} and {out['paths']['plot']}"


if __name__ == "__main__":
    args = sys.argv[1:]
    main("sweep", run, args if any(a.startswith("experiment=") for a in args) else [*args, SWEEP])
