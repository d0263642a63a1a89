"""Stage merge: the recipe in the `merge` node, on the locked inputs, into paths.merged."""

from __future__ import annotations

import sys

from stages._runner import main


def run(config, tracker) -> str:
    from mergelib import merge
    from mergelib.pipeline.fetch import pinned_refs, read_lock
    from mergelib.pipeline.outputs import write_json

    refs = pinned_refs(read_lock(config.paths.lock), config.input_refs(), config.paths.lock)
    inactive = config.inactive_knobs()
    if inactive:
        knobs = ", ".join(f"{k}={v}" for k, v in inactive.items())
        print(f"merge: {config.method} does not use {knobs}; left out of the recipe", file=sys.stderr)
    result = merge(config.recipe(refs), config.paths.merged, seed=config.seed, quiet=True)
    for name, why in result.plan.ignored_params.items():
        print(f"merge: warning: {result.plan.method.name} ignores '{name}' (it changes nothing: {why})",
              file=sys.stderr)
    compared = {"seconds": round(result.seconds, 3), "peak_rss_mb": round(result.peak_rss_bytes / 2**20, 1)}
    sizes = {"bytes_read": result.bytes_read, "bytes_written": result.bytes_written, "tensors": result.n_tensors}
    write_json(f"{config.paths.reports}/merge.json", {"merge": compared})  # the DVC metric: what runs compare
    tracker.log_metrics({f"merge.{k}": v for k, v in {**compared, **sizes}.items()})
    for name in ("mergekit_config.yml", "mergelib_run.json"):
        tracker.log_artifact(result.out_dir / name, "merged")
    tracker.log_markdown(result.out_dir / "README.md", "merged", "README.md")  # the card, as MLflow renders it
    tracker.log_artifact(config.paths.lock, "merged")
    return (f"wrote {result.out_dir} ({result.n_tensors} tensors, {result.bytes_written / 1e6:.1f} MB, "
            f"{result.seconds:.1f} s)")


if __name__ == "__main__":
    main("merge", run)
