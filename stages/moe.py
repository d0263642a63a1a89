"""Stage moe (outside `dvc repro`): a Mixtral-style MoE from the family's fine-tunes (conf/experiment/moe_demo.yaml,
mergelib.moe.build.build_moe) into outputs/moe, scored like a merge into reports/moe/.

    python -m stages.moe [models=demo_quick eval=quick ...]   (experiment=moe_demo is implied)
"""

from __future__ import annotations

import sys

from stages._runner import main

PRESET = "experiment=moe_demo"


def run(config, tracker) -> str:
    from pathlib import Path

    from mergelib.errors import MergelibError
    from mergelib.moe.build import build_moe
    from mergelib.pipeline.eval_step import evaluate_merge, family_labels, summary_line
    from mergelib.pipeline.fetch import fetch_inputs, read_lock

    if not config.moe:
        raise MergelibError("moe: no `moe:` config; use experiment=moe_demo or give moe.base_model and moe.experts")
    if not Path(config.paths.lock).is_file():
        fetch_inputs(config.input_refs(), config.paths.models, config.models)
    out = Path(config.paths.merged).parent / "moe"
    result = build_moe(config.moe, out, seed=config.seed)
    tracker.log_metrics({"moe.experts": result.n_experts, "moe.tensors": result.n_tensors,
                         "moe.seconds": result.seconds})
    parents = family_labels(config.models.refs(), read_lock(config.paths.lock)) if config.eval.parents else {}
    reports = f"{config.paths.reports}/moe"
    document = evaluate_merge(out, parents, config.eval, reports)
    tracker.log_artifact(f"{reports}/metrics.json", "moe")
    return (f"wrote {out} ({result.architecture}, {result.n_experts} experts); "
            f"{config.eval.suite}: {summary_line(document)} -> {reports}/metrics.json")


if __name__ == "__main__":
    args = sys.argv[1:]
    main("moe", run, args if any(a.startswith("experiment=") for a in args) else [*args, PRESET])
