"""Stage fetch: resolve and pin the input models (Hub commit, local hashes, or the demo family) in a lock file."""

from __future__ import annotations

from stages._runner import main


def run(config, tracker) -> str:
    from mergelib.pipeline.fetch import fetch_inputs

    locked = fetch_inputs(config.input_refs(), config.paths.models, config.models)
    tracker.log_artifact(config.paths.lock)
    tracker.log_metrics({
        "fetch.models": len(locked),
        "fetch.files": sum(len(m.files) for m in locked.values()),
    })
    pins = ", ".join(f"{m.ref}@{m.revision[:12]}" if m.revision else m.ref for m in locked.values())
    return f"locked {len(locked)} models in {config.paths.lock} ({pins})"


if __name__ == "__main__":
    main("fetch", run)
