"""Merge speed and memory as ratios to the IO floor, measured in one run (not a test).

For each family (~120M and ~1B parameters, bf16, built once and cached under bench-cache/) and each case, time
a `mergelib merge` in a fresh process and compare it with the IO floor: a process that reads the same input
tensors and writes the same output bytes with plain safetensors, then syncs them to disk as the merge does (it
records a shard complete only once its bytes are on disk). The inputs are read once first (a warm page cache for
both); floor and merge then run `--repeat` times, alternating, each after a `sync` (so no run pays for writing back
the previous run's output), and the fastest of each is reported (the floor is a few seconds, so machine noise would
otherwise swing the ratio). Peak RSS is the child's
ru_maxrss, the largest over the merge's runs.

    python benchmarks/merge_bench.py [--sizes 120m 1b] [--cases linear ties dare_ties della] [--repeat 2]
                                     [--out reports/bench.json]
    python benchmarks/merge_bench.py --executor ray --workers 2 --sizes 1b --shard-size 500000000
                                     [--out reports/bench_ray.json]   (Ray shard tasks against the local merge)
    python benchmarks/merge_bench.py --peer-env /path/to/venv-with-mergekit --cases linear slerp ties dare_ties
                                     della model_stock [--peer-variants default j1] [--peer-repeat 1]
                                     [--out reports/bench_peer.json]

With `--peer-env` (a Python environment with mergekit installed, e.g. `python -m venv V && V/bin/pip install
mergekit`), each case is also merged by `V/bin/mergekit-yaml` from the same recipe, in the same run, alternating with
the floor and mergelib: mergekit's time is the best of its default settings and `-j 1` (it runs its graph on a
thread pool by default), and each row gets the ratios mergelib / mergekit (time, peak RSS) beside the IO floor.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "bench-cache"

FLOOR_SCRIPT = r"""
import json, os, sys
from pathlib import Path
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from mergelib.merging.api import plan_merge

plan = plan_merge(sys.argv[1], out_shard_size=int(sys.argv[3]))
out = Path(sys.argv[2]); out.mkdir(parents=True, exist_ok=True)
shard_of = {s.name: f for f, slots in plan.shards.items() for s in slots}
for fname, slots in plan.shards.items():
    tensors = {}
    for job in (j for j in plan.jobs if shard_of[j.name] == fname):
        read = []
        for src in job.inputs:  # one read per input tensor, as the merge does
            with safe_open(str(src.info.file), "pt") as handle:
                read.append(handle.get_tensor(src.name))
        tensors[job.name] = read[0].to(job.dtype)
        del read
    save_file(tensors, out / fname, metadata={"format": "pt"})
    del tensors
    with open(out / fname, "rb") as handle:
        os.fsync(handle.fileno())  # on disk, as the merge leaves each shard
"""


RAY_SCRIPT = r"""
import json, sys, time
from mergelib import merge
t = time.perf_counter()
result = merge(sys.argv[1], sys.argv[2], quiet=True, out_shard_size=int(sys.argv[3]), executor="ray",
               workers=int(sys.argv[4]))
print(json.dumps([time.perf_counter() - t, result.worker_peak_rss_bytes]))
"""


def recipes(family) -> dict[str, dict]:
    fts = [str(p) for p in family.finetunes]
    return {
        "linear": {
            "merge_method": "linear",
            "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(fts, (0.5, 0.3, 0.2))],
        },
        **{
            method: {
                "merge_method": method,
                "base_model": str(family.base),
                "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(fts, (0.5, 0.3, 0.2))],
                "parameters": {"density": 0.5},
            }
            for method in ("ties", "dare_ties", "della", "task_arithmetic")
        },
        "slerp": {
            "merge_method": "slerp",
            "base_model": str(family.base),
            "models": [{"model": str(family.base)}, {"model": fts[0]}],
            "parameters": {"t": 0.5},
        },
        "model_stock": {
            "merge_method": "model_stock",
            "base_model": str(family.base),
            "models": [{"model": m} for m in fts],
        },
    }


def measure_child(cmd: list[str]) -> tuple[float, int]:
    """Run under /usr/bin/time-like accounting: a wrapper reports the child's own ru_maxrss. Dirty pages are
    written back first, so the child does not share the disk with the previous run's write-back."""
    os.sync()
    wrapper = (
        "import resource, subprocess, sys, time, json\n"
        "t = time.perf_counter(); subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)\n"
        "print(json.dumps([time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024]))\n"
    )
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], check=True, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds, peak = json.loads(out.stdout.strip().splitlines()[-1])
    return seconds, peak


def warm_page_cache(paths) -> None:
    """Read every input file once, so the floor and the merge both start from a warm page cache (otherwise
    whichever runs first pays for the disk)."""
    for root in paths:
        for path in sorted(Path(root).glob("*.safetensors")):
            with open(path, "rb") as handle:
                while handle.read(64 << 20):
                    pass


def case_recipes(args):
    """(size, case, recipe file, scratch dir) for every size and case, each family built once (cached) with a warm
    page cache: what both benchmarks iterate over."""
    import torch

    from mergelib.families.tiny import ensure_family

    for size in args.sizes:
        t0 = time.perf_counter()
        family = ensure_family(CACHE / size, size=size, n_finetunes=3, seed=0, dtype=torch.bfloat16)
        print(f"[{size}] family ready in {time.perf_counter() - t0:.0f}s", flush=True)
        all_recipes = recipes(family)
        warm_page_cache([family.base, *family.finetunes])
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            tmp = Path(tmp)
            for case in args.cases:
                recipe = tmp / f"{case}.yml"
                recipe.write_text(yaml.safe_dump(all_recipes[case]))
                yield size, case, recipe, tmp


def merge_command(args, recipe: Path, out: Path) -> list[str]:
    """`mergelib merge` of `recipe` into `out`, in-process threads, the benchmark's shard size."""
    return [sys.executable, "-m", "mergelib", "merge", str(recipe), str(out), "--quiet", "--threads",
            str(args.threads), "--out-shard-size", args.shard_size]


def peer_command(args, recipe: Path, out: Path, extra: list[str]) -> list[str]:
    """mergekit's `mergekit-yaml` on the same recipe (its shard size counts parameters: the default keeps one
    shard at these sizes, as mergelib's 5 GB does)."""
    return [str(Path(args.peer_env) / "bin" / "mergekit-yaml"), str(recipe), str(out), "--quiet",
            "--random-seed", "0", "--no-write-model-card", *extra]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["120m", "1b"])
    parser.add_argument("--cases", nargs="+", default=["linear", "ties", "dare_ties", "della"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2,
                        help="runs of the floor and of the merge, alternating; the fastest of each is reported")
    parser.add_argument("--out", default=str(ROOT / "reports" / "bench.json"))
    parser.add_argument("--executor", choices=("local", "ray"), default="local",
                        help="ray: time `--executor ray` against the local merge instead of the IO floor")
    parser.add_argument("--workers", type=int, default=2, help="Ray shard tasks at once (--executor ray)")
    parser.add_argument("--shard-size", default=str(5_000_000_000),
                        help="output shard bytes (Ray splits a merge by shards: give several, e.g. 500000000)")
    parser.add_argument("--peer-env", default=None,
                        help="a Python environment holding mergekit: time `mergekit-yaml` on the same recipes")
    parser.add_argument("--peer-variants", nargs="+", choices=("default", "j1"), default=["default", "j1"],
                        help="mergekit settings timed: its default thread pool, `-j 1`, or both (the best is kept)")
    parser.add_argument("--peer-repeat", type=int, default=None,
                        help="runs of each mergekit variant (default: --repeat; 1 saves minutes at 1b)")
    args = parser.parse_args()
    if args.peer_env and not (Path(args.peer_env) / "bin" / "mergekit-yaml").is_file():
        parser.error(f"--peer-env {args.peer_env}: no bin/mergekit-yaml there; install mergekit into that venv")
    if args.executor == "ray":
        return bench_ray(args)

    rows = []
    for size, case, recipe, tmp in case_recipes(args):
        floor_runs, merge_runs, peer_runs = [], [], []
        peer_repeat = args.repeat if args.peer_repeat is None else args.peer_repeat
        variants = [{"default": [], "j1": ["-j", "1"]}[v] for v in args.peer_variants]
        for run in range(max(1, args.repeat)):  # alternating, so both see the same machine state
            floor_runs.append(measure_child(
                [sys.executable, "-c", FLOOR_SCRIPT, str(recipe), str(tmp / "floor"), args.shard_size]))
            merge_runs.append(measure_child(merge_command(args, recipe, tmp / "merged")))
            if args.peer_env and run < peer_repeat:
                for extra in variants:
                    peer_runs.append((*measure_child(peer_command(args, recipe, tmp / "peer", extra)), extra))
        floor_s, floor_rss = min(floor_runs)
        merge_s = min(t for t, _ in merge_runs)
        merge_rss = max(rss for _, rss in merge_runs)
        size_bytes = sum(p.stat().st_size for p in (tmp / "merged").glob("*.safetensors"))
        row = {
            "size": size, "case": case, "merge_s": round(merge_s, 2), "floor_s": round(floor_s, 2),
            "ratio": round(merge_s / floor_s, 2), "merge_peak_rss_mb": round(merge_rss / 1e6),
            "floor_peak_rss_mb": round(floor_rss / 1e6), "output_mb": round(size_bytes / 1e6),
        }
        if peer_runs:
            peer_s, peer_rss, peer_flags = min(peer_runs, key=lambda r: r[0])
            row.update({"mergekit_s": round(peer_s, 2), "mergekit_flags": " ".join(peer_flags) or "default",
                        "mergekit_peak_rss_mb": round(peer_rss / 1e6),
                        "time_vs_mergekit": round(merge_s / peer_s, 2),
                        "rss_vs_mergekit": round(merge_rss / peer_rss, 2),
                        "mergekit_vs_floor": round(peer_s / floor_s, 2)})
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    if args.peer_env:
        print("\n| size | case | mergelib s | mergekit s | time ratio | RSS ratio | mergelib / IO floor |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['size']} | {r['case']} | {r['merge_s']} | {r['mergekit_s']} | {r['time_vs_mergekit']} | "
                  f"{r['rss_vs_mergekit']} | {r['ratio']} |")
        return
    print("\n| size | case | merge s | IO floor s | ratio | merge peak RSS MB | output MB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['case']} | {r['merge_s']} | {r['floor_s']} | {r['ratio']} | "
              f"{r['merge_peak_rss_mb']} | {r['output_mb']} |")


def read_bandwidth(paths) -> tuple[int, float, float]:
    """(bytes, cold GB/s, warm GB/s) reading every input file start to end: cold after asking the kernel to drop
    the files' cached pages (posix_fadvise DONTNEED: no root needed), warm right after. What one node reads from
    its storage bounds a Ray worker there."""
    files = [p for root in paths for p in sorted(Path(root).glob("*.safetensors"))]

    def read_all() -> float:
        t = time.perf_counter()
        for path in files:
            with open(path, "rb", buffering=0) as handle:
                while handle.read(64 << 20):
                    pass
        return time.perf_counter() - t

    for path in files:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    total = sum(p.stat().st_size for p in files)
    cold = read_all()
    warm = read_all()
    return total, total / cold / 1e9, total / warm / 1e9


def bench_ray(args) -> None:
    """The same merge in-process (`--threads`) and as Ray shard tasks (`--workers`, one thread each), alternating:
    time ratio, the driver's peak RSS and each worker's, and identical bytes."""
    import hashlib

    def digests(root: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.glob("*.safetensors"))}

    rows = []
    for size, case, recipe, tmp in case_recipes(args):
        inputs = [m["model"] for m in yaml.safe_load(recipe.read_text())["models"]]
        base = yaml.safe_load(recipe.read_text()).get("base_model")
        total, cold, warm = read_bandwidth([*inputs, *([base] if base else [])])
        warm_page_cache([*inputs, *([base] if base else [])])
        local, ray = [], []
        for _ in range(max(1, args.repeat)):  # alternating, so both see the same machine state
            local.append(measure_child(merge_command(args, recipe, tmp / "local")))
            out = subprocess.run([sys.executable, "-c", RAY_SCRIPT, str(recipe), str(tmp / "ray"), args.shard_size,
                                  str(args.workers)], check=True, capture_output=True, text=True,
                                 env={**os.environ, "HF_HUB_OFFLINE": "1"})
            ray.append(json.loads(out.stdout.strip().splitlines()[-1]))
        local_s = min(t for t, _ in local)
        ray_s = min(t for t, _ in ray)
        row = {"size": size, "case": case, "shards": len(list((tmp / "local").glob("*.safetensors"))),
               "local_s": round(local_s, 2), "ray_s": round(ray_s, 2), "ratio": round(ray_s / local_s, 2),
               "local_peak_rss_mb": round(max(r for _, r in local) / 1e6),
               "worker_peak_rss_mb": round(max(max(p) for _, p in ray) / 1e6),
               "identical": digests(tmp / "local") == digests(tmp / "ray"),
               "input_gb": round(total / 1e9, 2), "read_gbps_cold": round(cold, 2), "read_gbps_warm": round(warm, 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
