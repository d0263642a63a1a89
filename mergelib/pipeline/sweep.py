"""Several merges of one fetched family, each scored like the evaluate stage, compared in one table and one plot
(mergelib.pipeline.reports.write_comparison). The sweep is data: label -> Hydra overrides of conf/
(conf/experiment/method_sweep.yaml), each composed exactly as `python -m stages.merge OVERRIDES` would be.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def sweep_config(label: str, overrides: Sequence[str], common: Sequence[str]):
    """The RunConfig of one sweep entry: conf/ composed with the common overrides, then the entry's."""
    from mergelib.config.compose import compose
    from mergelib.config.run import run_config

    return run_config(compose([*common, *overrides]), source=f"sweep entry '{label}'")


def run_sweep(entries: Mapping[str, Sequence[str]], common: Sequence[str], out_root: str | Path,
              reports_dir: str | Path, *, name: str = "method_comparison", log=print) -> dict[str, Any]:
    """Merge and evaluate every entry into `out_root/<label>/` (model) and `out_root/<label>.reports/`, then write
    `<name>.md/.csv/.png` into `reports_dir`. Every entry is validated before the first merge."""
    from mergelib import merge
    from mergelib.pipeline.eval_step import evaluate_merge, family_labels, summary_line
    from mergelib.pipeline.fetch import pinned_refs, read_lock
    from mergelib.pipeline.reports import write_comparison

    configs = {label: sweep_config(label, overrides, common) for label, overrides in entries.items()}
    out_root = Path(out_root)
    documents: dict[str, Any] = {}
    for label, config in configs.items():
        lock = read_lock(config.paths.lock)
        refs = pinned_refs(lock, config.input_refs(), config.paths.lock)
        merged = merge(config.recipe(refs), out_root / label, seed=config.seed, quiet=True).out_dir
        parents = family_labels(config.models.refs(), lock) if config.eval.parents else {}
        documents[label] = evaluate_merge(merged, parents, config.eval, out_root / f"{label}.reports")
        log(f"sweep: {label}: {summary_line(documents[label])}")
    paths = write_comparison(documents, reports_dir, name=name)
    return {"documents": documents, "paths": paths}
