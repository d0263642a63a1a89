"""Time the demo-family build (wall and CPU seconds), score every model on its held-out prompts, and optionally merge
the family with each method and evaluate the merges through lm-eval (not a test).

    python benchmarks/demo_family_time.py [--root bench-cache/demo-family] [--seed 0] [--quick] [--skip-build]
                                          [--sweep] [--out-dir reports/demo]

CPU time is reported next to wall time because the 2 cores may be shared: wall time alone overstates the cost.
`--sweep` writes, per parent set, `<out-dir>/sweep_<set>.md|csv|png` (write_comparison) and `sweep_<set>.json`.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import mergelib
from mergelib.families.demo import build_demo_family, read_family, skill_accuracy, torch_threads
from mergelib.pipeline.evaluate import evaluate_family
from mergelib.pipeline.reports import write_comparison

ROOT = Path(__file__).resolve().parent.parent
TASKS = ["demo_add", "demo_rev", "demo_sort", "demo_ppl"]


def _models(fts, **params):
    return [{"model": str(p), "parameters": dict(params)} for p in fts]


def recipes(base: Path, fts: list[Path]) -> dict[str, dict]:
    """Run label -> merge recipe over the fine-tunes `fts` of `base` (slerp only for two fine-tunes)."""
    b = str(base)
    runs = {
        "linear": {"merge_method": "linear", "models": _models(fts, weight=1.0)},
        "task_arithmetic w=0.5": {"merge_method": "task_arithmetic", "base_model": b, "models": _models(fts, weight=0.5)},
        "task_arithmetic w=0.8": {"merge_method": "task_arithmetic", "base_model": b, "models": _models(fts, weight=0.8)},
        "task_arithmetic w=1.0": {"merge_method": "task_arithmetic", "base_model": b, "models": _models(fts, weight=1.0)},
        "ties d=0.2": {"merge_method": "ties", "base_model": b, "models": _models(fts, weight=1.0, density=0.2)},
        "ties d=0.5": {"merge_method": "ties", "base_model": b, "models": _models(fts, weight=1.0, density=0.5)},
        "dare_ties d=0.5": {"merge_method": "dare_ties", "base_model": b, "models": _models(fts, weight=1.0, density=0.5)},
        "dare_ties d=0.1": {"merge_method": "dare_ties", "base_model": b, "models": _models(fts, weight=1.0, density=0.1)},
        "della d=0.5": {"merge_method": "della", "base_model": b, "models": _models(fts, weight=1.0, density=0.5)},
        "model_stock": {"merge_method": "model_stock", "base_model": b, "models": _models(fts)},
        "breadcrumbs d=0.9": {"merge_method": "breadcrumbs", "base_model": b,
                              "models": _models(fts, weight=1.0, density=0.9, gamma=0.01)},
    }
    if len(fts) == 2:
        runs["slerp t=0.5"] = {"merge_method": "slerp", "base_model": str(fts[0]),
                               "models": [{"model": str(fts[0])}, {"model": str(fts[1])}], "parameters": {"t": 0.5}}
    return runs


def sweep(root: Path, out_dir: Path, skills: tuple[str, ...], seed: int) -> dict:
    """Merge the fine-tunes of `skills` with every recipe and evaluate each merge (parents cached)."""
    record = read_family(root)
    fts = [root / record.finetunes[s] for s in skills]
    parents = {"base": root / record.base, **{p.name: p for p in fts}}
    label = "+".join(skills)
    runs, seconds = {}, {}
    for name, recipe in recipes(root / record.base, fts).items():
        merged = out_dir / "merges" / label / name.replace(" ", "_").replace("=", "")
        started = time.perf_counter()
        mergelib.merge(recipe, merged, seed=seed, quiet=True)
        runs[name] = evaluate_family(merged, parents, TASKS, cache_dir=out_dir / "eval-cache",
                                     data_dir=root / "data", threads=1, seed=seed)
        seconds[name] = round(time.perf_counter() - started, 1)
        em = {t: runs[name]["merged"]["metrics"][t].get("exact_match") for t in TASKS[:3]}
        print(f"{label} {name}: {em} ({seconds[name]} s)", flush=True)
    paths = write_comparison(runs, out_dir, name=f"sweep_{label.replace('+', '_')}")
    summary = {name: r["merged"]["metrics"] for name, r in runs.items()}
    summary["_parents"] = {k: v["metrics"] for k, v in next(iter(runs.values()))["parents"].items()}
    summary["_seconds"] = seconds
    (out_dir / f"sweep_{label.replace('+', '_')}.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    print(paths["table"].read_text())
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT / "bench-cache" / "demo-family")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-build", action="store_true", help="reuse the family already under --root")
    parser.add_argument("--sweep", action="store_true", help="merge with each method and evaluate (lm-eval)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "reports" / "demo")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)

    if not args.skip_build:
        wall, cpu = time.perf_counter(), time.process_time()
        build_demo_family(args.root, seed=args.seed, quick=args.quick)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        record = read_family(args.root)
        skills = tuple(record.finetunes)
        with torch_threads(1):
            scores = {name: skill_accuracy(args.root / name, skills)
                      for name in (record.base, *record.finetunes.values())}
        result = {
            "seed": args.seed, "quick": args.quick, "build_wall_s": round(wall, 1), "build_cpu_s": round(cpu, 1),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, "accuracy": scores,
        }
        print(json.dumps(result, indent=2))
        (args.out_dir / "demo_family.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    if args.sweep:
        skills = tuple(read_family(args.root).finetunes)
        sweep(args.root, args.out_dir, skills[:2], args.seed)
        if len(skills) > 2:
            sweep(args.root, args.out_dir, skills, args.seed)


if __name__ == "__main__":
    main()
