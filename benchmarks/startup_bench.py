"""Start-up cost of the `mergelib` command against the floor of a Python process that imports torch (not a test).

Times, each the fastest of `--repeat` fresh processes: `python -c pass`, `python -c "import torch"` (the floor:
interpreter + torch), `mergelib --help`, a dry run of the tiny family (bf16), and a full merge of it; wall time
and CPU time (user + system, which a loaded machine disturbs less). The work of that
merge is timed inside one process: `merge()` run a second time, once imports and kernels are loaded (the first
run's time, which includes loading the numba kernels from their cache, is reported too). The goal (issue #17): a
merge takes at most 1.5x (import torch + work). The kernels must be in numba's cache first (`mergelib
warm-kernels`; `make install` runs it); the benchmark says how many it found compiled.

    python benchmarks/startup_bench.py [--method ties] [--repeat 5] [--out reports/startup_bench.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent

WORK_SCRIPT = r"""
import json, resource, sys
from mergelib import merge
from mergelib.methods.kernel_warmup import compiled_at_run_time
def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return usage.ru_utime + usage.ru_stime
first = merge(sys.argv[1], sys.argv[2] + "-1", quiet=True).seconds
start = cpu()
second = merge(sys.argv[1], sys.argv[2] + "-2", quiet=True).seconds
print(json.dumps({"first": first, "second": second, "second_cpu": cpu() - start, "compiled": compiled_at_run_time()}))
"""


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def fastest(argv: list[str], repeat: int) -> tuple[float, float]:
    """The fastest wall time and the smallest CPU time (user + system) of `repeat` runs of `argv` (each must
    succeed). On a loaded machine the CPU time moves less than the wall time."""
    wall = cpu = float("inf")
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), _children_cpu()
        subprocess.run(argv, check=True, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wall = min(wall, time.perf_counter() - start)
        cpu = min(cpu, _children_cpu() - start_cpu)
    return wall, cpu


def make_recipe(root: Path, method: str) -> Path:
    import torch

    from mergelib.families.tiny import make_family

    family = make_family(root / "family", size="tiny", n_finetunes=2, seed=0, dtype=torch.bfloat16)
    recipe = {"merge_method": method, "base_model": str(family.base), "out_dtype": "bfloat16",
              "models": [{"model": str(ft), "parameters": {"weight": 0.5, "density": 0.5}} for ft in family.finetunes]}
    path = root / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="ties", help="merge method of the tiny-family recipe (default ties)")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each command; the fastest counts (5)")
    parser.add_argument("--out", default="reports/startup_bench.json", help="where the figures go")
    args = parser.parse_args(argv)
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="mergelib-startup-") as tmp:
        root = Path(tmp)
        recipe = make_recipe(root, args.method)
        out = str(root / "out")
        cli = [py, "-m", "mergelib"]
        work = json.loads(subprocess.run([py, "-c", WORK_SCRIPT, str(recipe), str(root / "work")], check=True,
                                         env=_env(), capture_output=True, text=True).stdout)
        commands = {
            "python_pass": [py, "-c", "pass"],
            "import_torch": [py, "-c", "import torch"],
            "help": [*cli, "--help"],
            "dry_run": [*cli, "merge", str(recipe), out, "--dry-run"],
            "merge": [*cli, "merge", str(recipe), out, "--quiet"],
        }
        figures = {}
        for name, command in commands.items():
            wall, cpu = fastest(command, args.repeat)
            figures[f"{name}_s"], figures[f"{name}_cpu_s"] = round(wall, 3), round(cpu, 3)
    figures["work_s"] = round(work["second"], 3)
    figures["work_cpu_s"] = round(work["second_cpu"], 3)
    figures["first_merge_in_process_s"] = round(work["first"], 3)
    figures["kernels_compiled"] = sum(len(v) for v in work["compiled"].values())
    figures["ratio"] = round(figures["merge_s"] / (figures["import_torch_s"] + figures["work_s"]), 2)
    figures["cpu_ratio"] = round(figures["merge_cpu_s"] / (figures["import_torch_cpu_s"] + figures["work_cpu_s"]), 2)
    figures["target_ratio"] = 1.5
    figures["method"] = args.method
    figures["repeat"] = args.repeat
    for key, value in figures.items():
        print(f"{key}: {value}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
