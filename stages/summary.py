"""`make demo`'s closing table: what each stage produced, its key numbers and its newest MLflow run.

Reads params.yaml, the reports and the outputs that `dvc repro` left; writes nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

STAGES = ("fetch", "merge", "tokenizer", "evaluate", "export", "publish")


def _json(path: str | Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def _mb(path: str | Path) -> str:
    files = [p for p in Path(path).rglob("*") if p.is_file()] if Path(path).is_dir() else []
    return f"{sum(p.stat().st_size for p in files) / 1e6:.2f} MB" if files else "missing"


def rows(config) -> list[tuple[str, str, str]]:
    """(stage, output, result) for every stage."""
    p = config.paths
    lock = _json(p.lock).get("models", [])
    pins = ", ".join(m["ref"].split("/")[-1] + (f"@{m['revision'][:8]}" if m.get("revision") else "") for m in lock)
    merged = _json(f"{p.reports}/merge.json").get("merge", {})
    tok = _json(f"{p.tokenizer}/tokenizer_report.json")
    ev = _json(f"{p.reports}/metrics.json").get("eval", {}).get(config.eval.suite, {})
    manifest = _json(f"{p.publish}/manifest.json")
    knobs = {"density": config.density, "weight": config.weight, "t": config.t}
    used = " ".join(f"{k}={v}" for k, v in knobs.items() if k in config.recipe().get("parameters", {}))
    return [
        ("fetch", p.lock, f"{len(lock)} models locked: {pins}"),
        ("merge", p.merged, f"{config.method} {used}: {merged.get('tensors', '?')} tensors, {_mb(p.merged)}, "
                            f"{merged.get('seconds', '?')} s, peak RSS {merged.get('peak_rss_mb', '?')} MB"),
        ("tokenizer", p.tokenizer, f"{tok.get('tokens', '?')} tokens, {len(tok.get('files', {}))} files"),
        ("evaluate", f"{p.reports}/metrics.json",
         f"{config.eval.suite}: perplexity {ev.get('perplexity', float('nan')):.3f} over {ev.get('tokens', '?')} tokens"),
        ("export", p.export, f"{config.export.format} {config.export.dtype}, {_mb(p.export)}"),
        ("publish", p.publish, f"target {manifest.get('target', '?')}: {len(manifest.get('files', {}))} files"),
    ]


def main(argv: list[str] | None = None) -> int:
    """Print the table (and how long `dvc repro` took, when given)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repro-seconds", type=float, default=None)
    args = parser.parse_args(argv)
    from mergelib.errors import MergelibError
    from stages._runner import load_config

    try:
        config = load_config([])
    except MergelibError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    from mergelib.tracking import latest_stage_runs, tracking_uri

    runs = latest_stage_runs(STAGES)
    table = [("stage", "output", "result", "mlflow run")]
    table += [(s, out, res, runs.get(s, "-")[:12]) for s, out, res in rows(config)]
    widths = [max(len(r[i]) for r in table) for i in range(3)]
    print()
    for i, row in enumerate(table):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3])
        if i == 0:
            print("  ".join("-" * w for w in widths) + "  " + "-" * 12)
    if args.repro_seconds is not None:
        print(f"\ndvc repro took {args.repro_seconds:.0f} s")
    print(f"MLflow: {tracking_uri()}  (browse: mlflow ui --backend-store-uri {tracking_uri()})")
    print("Compare experiments: dvc exp run -S method=dare_ties -S density=0.3 && dvc exp show")
    return 0


if __name__ == "__main__":
    sys.exit(main())
