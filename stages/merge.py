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
    result = merge(config.recipe(refs), config.paths.merged, seed=config.seed, quiet=True,
                   executor=config.merge_executor, workers=config.merge_workers,
                   device=config.merge_device)
    for line in result.plan.ignored_warnings():
        print(f"merge: warning: {line}", file=sys.stderr)
    seconds, rss_mb = round(result.seconds, 3), round(result.peak_rss_bytes / 2**20, 1)
    sizes = {"bytes_read": result.bytes_read, "bytes_written": result.bytes_written, "tensors": result.n_tensors}
    # the DVC metric: what runs compare, under short names so `dvc exp show` stays narrow
    write_json(f"{config.paths.reports}/merge.json", {"merge_s": seconds, "rss_mb": rss_mb})
    tracker.log_metrics({f"merge.{k}": v for k, v in {"seconds": seconds, "peak_rss_mb": rss_mb, **sizes}.items()})
    for name in ("mergekit_config.yml", "mergelib_run.json"):
        tracker.log_artifact(result.out_dir / name, "merged")
    tracker.log_markdown(result.out_dir / "README.md", "merged", "README.md")  # the card, as MLflow renders it
    tracker.log_artifact(config.paths.lock, "merged")
    return (f"wrote {result.out_dir} ({result.n_tensors} tensors, {result.bytes_written / 1e6:.1f} MB, "
            f"{result.seconds:.1f} s)")


if __name__ == "__main__":
    main("merge", run)
