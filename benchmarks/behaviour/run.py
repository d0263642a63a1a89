"""Behavioural benchmark of every merge method (one run, not a test): `make bench-behaviour`.

    python -m benchmarks.behaviour.run [--tier a|b] [--seeds 0 1 2] [--tasks rot90 permute ...]
        [--methods ties ties_paper ...] [--out reports/behaviour.json] [--plot reports/behaviour.png]

Tier A (minutes on 2 busy cores): the digits MLP (`benchmarks/behaviour/tier_a.py`). Tier B: the demo LM family
(`benchmarks/behaviour/tier_b.py`). Then `python tools/readme_figures.py --record behaviour` (or behaviour_b) copies
the JSON and the plot into docs/figures/ and re-renders the README block.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def plot(result: dict, path: Path) -> Path:
    """Bar chart: each row's normalised accuracy, mean over seeds with the min-max range as an error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = {k: v for k, v in result["summary"].items() if not k.startswith("_")}
    labels = sorted(summary, key=lambda k: summary[k]["normalised"]["mean"])
    means = [summary[k]["normalised"]["mean"] for k in labels]
    low = [m - summary[k]["normalised"]["min"] for k, m in zip(labels, means)]
    high = [summary[k]["normalised"]["max"] - m for k, m in zip(labels, means)]
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(labels) + 1.2))
    colors = ["#888888" if k in ("base", "fine-tuned") else "#3b6ea8" for k in labels]
    ax.barh(labels, means, xerr=[low, high], color=colors, capsize=2)
    ax.set_xlabel(f"normalised accuracy (merged / fine-tuned, mean of {len(result['tasks'])} tasks)\n"
                  f"bar: mean, whiskers: min-max over {len(result['seeds'])} seeds")
    ax.set_xlim(0, max(1.05, max(means) + 0.05))
    ax.tick_params(axis="y", labelsize=8)
    ax.xaxis.label.set_size(8)
    ax.set_title(f"Tier {result['tier'].upper()}: merge methods", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tier", choices=("a", "b"), default="a")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tasks", nargs="+", default=None, help="tier a: tasks (default: digits.BENCH_TASKS)")
    parser.add_argument("--methods", nargs="+", default=None, help="only these methods (default: every one)")
    parser.add_argument("--family", type=Path, default=None, help="tier b: the demo family (default models/demo)")
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=None, help="default reports/behaviour[_b].json")
    parser.add_argument("--plot", type=Path, default=None, help="default reports/behaviour[_b].png")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest on a shared machine, and repeatable
    suffix = "" if args.tier == "a" else "_b"
    out = args.out or ROOT / "reports" / f"behaviour{suffix}.json"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mergelib-behaviour-") as scratch:
        work = args.work or Path(scratch)
        if args.tier == "a":
            from benchmarks.behaviour import digits, tier_a

            result = tier_a.run(args.seeds, list(args.tasks or digits.BENCH_TASKS), work, args.methods)
        else:
            from benchmarks.behaviour import tier_b

            result = tier_b.run(args.seeds, work, args.methods, args.family)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    result["machine_note"] = "measured on a shared 2-core machine under load; accuracies do not depend on it"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    plot(result, args.plot or out.with_suffix(".png"))
    for label, row in result["summary"].items():
        if not label.startswith("_"):
            n = row["normalised"]
            print(f"{label:28s} {n['mean']:.3f}  [{n['min']:.3f}, {n['max']:.3f}]")
    print(f"wrote {out} in {result['wall_s']} s")
    return result


if __name__ == "__main__":
    main()
