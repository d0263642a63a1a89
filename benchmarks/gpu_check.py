"""The GPU check (not a test): every method merged on the CPU and on a GPU, then the ~1B family timed on both.

1. Parity on the tiny family: for each registered method, `mergelib merge` on the CPU (numba kernels) and with
   `--device DEVICE`; device-exact methods must give identical shard bytes, the others are reported as the largest
   relative difference over all tensors (the claim: <= 1e-6).
2. Timing on the ~1B family (bf16, 3 fine-tunes; built once under bench-cache/): ties, dare_ties, della and
   model_stock, each a fresh `mergelib merge` process, CPU vs DEVICE, the fastest of --repeat runs.

    python benchmarks/gpu_check.py [--device cuda] [--sizes 1b] [--repeat 1] [--out reports/gpu.json]
    python benchmarks/gpu_check.py --device cpu --kernels torch --sizes   (the parity half on a machine without a GPU)

Exit status 1 when a device-exact method's bytes differ or another method is off by more than 1e-6.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_bench import CACHE, ROOT, case_recipes, measure_child  # noqa: E402

TIMED = ["ties", "dare_ties", "della", "model_stock"]
TOLERANCE = 1e-6


def parity(device: str, kernels: str | None) -> tuple[dict, bool]:
    """Per method: whether the shard bytes are equal and the largest relative difference from the CPU merge."""
    import torch
    from safetensors.torch import load_file

    import mergelib
    from mergelib.families.tiny import ensure_family
    from mergelib.methods import REGISTRY

    sys.path.insert(0, str(ROOT))
    from tests.test_all_methods_e2e import recipe_for

    family = ensure_family(CACHE / "tiny", size="tiny", n_finetunes=2, seed=0)
    report, ok = {}, True
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in sorted(REGISTRY.items()):
            recipe = recipe_for(spec, family)
            cpu = mergelib.merge(recipe, Path(tmp) / f"{name}-cpu", quiet=True, seed=1).out_dir
            dev = mergelib.merge(recipe, Path(tmp) / f"{name}-dev", quiet=True, seed=1, device=device,
                                 kernels=kernels).out_dir
            digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(cpu.glob("*.safetensors"))}
            same = digest == {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                              for p in sorted(dev.glob("*.safetensors"))}
            worst = 0.0
            for shard in sorted(cpu.glob("*.safetensors")):
                a, b = load_file(shard), load_file(dev / shard.name)
                for key in a:
                    x, y = a[key].double(), b[key].double()
                    scale = max(float(x.abs().max()), 1e-30)
                    worst = max(worst, float((x - y).abs().max()) / scale)
            good = same if spec.device_exact else worst <= TOLERANCE
            ok &= good
            report[name] = {"device_exact": spec.device_exact, "same_bytes": same, "max_rel_diff": worst, "ok": good}
            print(f"{name:18s} exact={spec.device_exact!s:5s} same_bytes={same!s:5s} max_rel={worst:.2e}", flush=True)
    del torch
    return report, ok


def timing(args) -> dict:
    """Seconds and peak RSS per (size, method) on the CPU and on the device, fresh processes, best of --repeat."""
    args.cases = [c for c in TIMED if c in args.cases] if args.cases else TIMED
    out: dict = {}
    for size, case, recipe, tmp in case_recipes(args):
        row = {}
        for where in ("cpu", args.device):
            best = None
            for _ in range(args.repeat):
                target = Path(tmp) / f"{case}-{where.replace(':', '')}"
                cmd = [sys.executable, "-m", "mergelib", "merge", str(recipe), str(target), "--quiet", "--threads",
                       str(args.threads), "--device", where]
                seconds, peak = measure_child(cmd)
                best = (seconds, peak) if best is None or seconds < best[0] else best
            row[where] = {"seconds": round(best[0], 2), "peak_rss_mb": round(best[1] / 2**20)}
        row["speedup"] = round(row["cpu"]["seconds"] / row[args.device]["seconds"], 2)
        out.setdefault(size, {})[case] = row
        print(f"[{size}] {case}: {json.dumps(row)}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--kernels", default=None, choices=("torch",), help="torch: the device path on the CPU")
    parser.add_argument("--sizes", nargs="*", default=["1b"], help="families to time (none: parity only)")
    parser.add_argument("--cases", nargs="*", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--shard-size", default=str(5_000_000_000))
    parser.add_argument("--out", default=str(ROOT / "reports" / "gpu.json"))
    args = parser.parse_args()
    import torch

    started = time.perf_counter()
    report: dict = {"device": args.device, "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    report["parity"], ok = parity(args.device, args.kernels)
    if args.sizes and args.device != "cpu":
        report["timing"] = timing(args)
    report["seconds"] = round(time.perf_counter() - started, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(yaml.safe_dump({"ok": ok, "out": args.out}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
