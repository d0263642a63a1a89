"""Recipe-search throughput and the demo goal, measured in one run on the trained demo family (not a test).

Throughput: the same search (conf/search/demo.yaml's space, no pruning, a fresh storage and MLflow store) run
serially and on a local Ray with 2 workers: trials per minute of the trial loop, and where a trial's worker time
goes: setup + merge, scoring, and the rest (Optuna's sampling and ask/tell in SQLite, the MLflow child run, Ray's
scheduling and transfers). The search's fixed costs (parents, held-out re-score, report) are in wall_s only.
Goal: the demo search (conf/search/demo.yaml with `--trials`) for each of `--seeds`; the best recipe's held-out
share of each parent's skill next to the default recipe's.

    python benchmarks/search_bench.py [--trials 40] [--throughput-trials 30] [--seeds 0 1 2] [--space demo]
                                      [--out reports/search_bench.json]
Needs the demo family (`make demo`, or `python -m stages.fetch`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def configured(overrides: list[str]):
    """(RunConfig, refs) of the demo family with `overrides`, as the search stage builds them."""
    from mergelib.config.compose import compose
    from mergelib.config.run import run_config
    from mergelib.pipeline.fetch import pinned_refs, read_lock

    config = run_config(compose(["models=demo", *overrides]), source="benchmark")
    if not Path(config.paths.lock).is_file():
        raise SystemExit(f"{config.paths.lock}: missing; build the demo family first (make demo)")
    return config, pinned_refs(read_lock(config.paths.lock), config.input_refs(), config.paths.lock)


def one_search(overrides: list[str], tmp: Path, label: str) -> tuple[object, float, list[dict]]:
    """Run a search into `tmp/label` with a fresh storage and MLflow store; (outcome, wall seconds, trial rows)."""
    from mergelib.pipeline.tracking import stage_run
    from mergelib.search.run import run_search

    config, refs = configured([*overrides, f"search.storage=sqlite:///{tmp}/{label}.db"])
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/{label}-mlflow.db"
    with stage_run("search", config.model_dump(mode="json")) as run:
        start = time.perf_counter()
        outcome = run_search(config.recipe(), config.search, refs=refs, out_dir=tmp / label / "out",
                             reports_dir=tmp / label / "reports", family="demo", seed=config.seed, tracker=run,
                             log=lambda _: None)
        wall = time.perf_counter() - start
    return outcome, wall, outcome.trials


def throughput(trials: int, tmp: Path) -> list[dict]:
    rows = []
    for executor in ("serial", "ray"):
        overrides = [f"search.trials={trials}", "search.pruner=none", f"search.executor={executor}",
                     "search.workers=2"]
        outcome, wall, found = one_search(overrides, tmp, f"throughput-{executor}")
        done = [t for t in found if t["state"] == "complete"]
        seconds = {k: sum(t["seconds"].get(k, 0.0) for t in done) for k in ("setup", "merge", "eval")}
        busy = sum(seconds.values())
        workers = 2 if executor == "ray" else 1
        # the trial loop: first trial asked to last told (the parents' scores, the held-out re-score and the
        # report before and after it are the search's fixed cost, in wall_s only)
        loop = max(t["finished"] for t in done) - min(t["started"] for t in done)
        per_trial = loop * workers / len(done)  # worker-seconds per trial
        rows.append({
            "executor": executor, "workers": workers, "trials": len(done), "wall_s": round(wall, 2),
            "loop_s": round(loop, 2), "trials_per_min": round(60 * len(done) / loop, 1),
            "setup_merge_share": round((seconds["setup"] + seconds["merge"]) / len(done) / per_trial, 3),
            "eval_share": round(seconds["eval"] / len(done) / per_trial, 3),
            "other_share": round(1 - busy / len(done) / per_trial, 3),
        })
        print(f"throughput {executor}: {rows[-1]}", flush=True)
    return rows


def goal(seeds: list[int], trials: int, space: str, tmp: Path) -> list[dict]:
    from mergelib.search.scorer import HELD_OUT

    rows = []
    for seed in seeds:
        outcome, wall, _ = one_search([f"search={space}", f"search.trials={trials}", f"search.seed={seed}"], tmp,
                                      f"goal-{space}-{seed}")
        top = outcome.best[0]
        parents = {t: max(p[HELD_OUT][t] for p in outcome.parents.values()) for t in top["heldout"]}
        rows.append({
            "space": space, "seed": seed, "trials": trials, "wall_s": round(wall, 1), "best_trial": top["number"],
            "method": top["recipe"]["merge_method"], "feasible": top.get("feasible", True),
            "heldout": top["heldout"], "heldout_share": {t: round(v / parents[t], 3) for t, v in top["heldout"].items()},
            "default_heldout": outcome.default[HELD_OUT],
            "default_share": {t: round(v / parents[t], 3) for t, v in outcome.default[HELD_OUT].items()},
        })
        print(f"goal seed {seed}: {rows[-1]}", flush=True)
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40, help="budget of each goal search (default 40)")
    parser.add_argument("--throughput-trials", type=int, default=30, help="trials of each throughput run (30)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--space", default="demo", help="conf/search/ option of the goal searches (demo)")
    parser.add_argument("--out", default=str(ROOT / "reports" / "search_bench.json"))
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    with tempfile.TemporaryDirectory(prefix="search-bench-") as tmp:
        result = {"throughput": throughput(args.throughput_trials, Path(tmp)),
                  "goal": goal(args.seeds, args.trials, args.space, Path(tmp))}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
