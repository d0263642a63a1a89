"""The only place argv becomes config: load -> validate (RunConfig) -> run inside an MLflow run -> exit code.

No arguments: read params.yaml (what `dvc repro` tracks). Hydra overrides (`method=ties density=0.5`): compose
conf/ with them, as `dvc exp run -S` does. A MergelibError becomes one line on stderr and exit 2.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from mergelib.errors import MergelibError

Body = Callable[..., str]  # (RunConfig, tracking.StageRun) -> a one-line summary of what the stage wrote


def load_config(argv: Sequence[str]):
    """RunConfig from params.yaml, or from conf/ composed with the Hydra overrides in argv."""
    from mergelib.config.compose import PARAMS_FILE, compose, load_params
    from mergelib.config.run import run_config

    if argv:
        return run_config(compose(argv), source="config")
    return run_config(load_params(PARAMS_FILE), source=PARAMS_FILE)


def input_params(lock_path: str) -> dict:
    """Revisions and a digest of every input's files, from the fetch lock (empty before the first fetch)."""
    from mergelib.pipeline.fetch import read_lock

    if not Path(lock_path).is_file():
        return {}
    out = {}
    for i, model in enumerate(read_lock(lock_path).values()):
        listing = "".join(f"{name}\0{digest}\n" for name, digest in sorted(model.files.items()))
        out[str(i)] = {
            "ref": model.ref,
            "revision": model.revision or "",
            "sha256": hashlib.sha256(listing.encode()).hexdigest(),
        }
    return {"inputs": out}


def main(stage: str, body: Body, argv: Sequence[str] | None = None) -> None:
    """Run one stage and exit: 0 on success, 2 on a configuration or input error (one line, no traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(f"usage: python -m stages.{stage} [key=value ...]   (Hydra overrides of conf/; none: params.yaml)")
        sys.exit(0)
    try:
        config = load_config(argv)
        from mergelib.pipeline.tracking import stage_run

        with stage_run(stage, config.model_dump(mode="json")) as run:
            message = body(config, run)
            run.log_params(input_params(config.paths.lock))  # after the body: fetch writes the lock
    except MergelibError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    print(f"{stage}: {message}")
    if run.parent_id:
        print(f"{stage}: mlflow run {run.run_id} (pipeline run {run.parent_id})")
    else:
        print(f"{stage}: mlflow run {run.run_id} (MERGELIB_TRACKING=off)")
    sys.exit(0)
