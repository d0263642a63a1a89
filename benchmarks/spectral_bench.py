"""Time per weight matrix of the spectral methods (tsv, iso_c, iso_cts; tsv and iso_cts also with `svd: randomized`,
and how far that moves the merged task vector from the exact one) against task arithmetic, one run (not a test).

Each method merges one SIZE x SIZE float32 matrix from a base and T fine-tunes in this process, with torch's threads
set to --threads (the engine runs each tensor on one thread and tensors in parallel; an SVD is the whole cost, so
the per-matrix time on one thread is what a merge of N such matrices pays N / threads times).

    python benchmarks/spectral_bench.py [--size 4096] [--tasks 3] [--threads 1] [--out reports/spectral_bench.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mergelib.merging.rng import generator_for
from mergelib.methods import REGISTRY, MethodInputs
from mergelib.methods.base import IgnoredWeight

ROOT = Path(__file__).resolve().parent.parent
NAME = "model.layers.0.mlp.up_proj.weight"


CASES = (  # (row label, method, parameters)
    ("task_arithmetic", "task_arithmetic", {}),
    ("iso_c", "iso_c", {}),
    ("iso_cts", "iso_cts", {}),
    ("iso_cts (svd: randomized)", "iso_cts", {"svd": "randomized"}),
    ("tsv", "tsv", {}),
    ("tsv (svd: randomized)", "tsv", {"svd": "randomized"}),
)


def timed(method: str, params: dict, base: torch.Tensor, fts: list[torch.Tensor]) -> tuple[float, torch.Tensor]:
    spec = REGISTRY[method]
    if method == "task_arithmetic":
        model_params = tuple(spec.model_params(weight=1.0) for _ in fts)
    else:
        model_params = tuple(IgnoredWeight() for _ in fts)
    inputs = MethodInputs(tuple(fts), base, model_params, NAME, generator_for(0, NAME) if spec.randomized else None)
    started = time.perf_counter()
    out = spec.merge(inputs, spec.params(**params))
    return time.perf_counter() - started, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "reports" / "spectral_bench.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(args.size, args.size, generator=g) * 0.02
    fts = [base + 0.001 * torch.randn(args.size, args.size, generator=g) for _ in range(args.tasks)]
    rows, results, difference = {}, {}, {}
    for label, method, params in CASES:
        seconds, results[label] = timed(method, params, base, fts)
        rows[label] = round(seconds, 2)
        exact = results.get(method)
        if params.get("svd") == "randomized" and exact is not None:  # how far the merged task vector moved
            difference[label] = float(f"{float(torch.linalg.norm(results[label] - exact) / torch.linalg.norm(exact - base)):.3g}")
        print(f"{label}: {rows[label]} s", flush=True)
    reference = rows["task_arithmetic"]
    report = {"size": args.size, "tasks": args.tasks, "threads": args.threads, "seconds": rows,
              "ratio_to_task_arithmetic": {k: round(v / reference, 1) for k, v in rows.items()},
              "relative_difference_to_exact": difference}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
