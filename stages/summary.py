"""`make demo`'s closing tables: what each stage produced, its key numbers and its newest MLflow run; then every
task's score for the base, each fine-tune and the merge.

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
    timing = _json(f"{p.reports}/merge.json")
    merged = {**_json(f"{p.merged}/mergelib_run.json").get("output", {}),  # tensors; merge.json: the timings
              "seconds": timing.get("merge_s", "?"), "peak_rss_mb": timing.get("rss_mb", "?")}
    tok = _json(f"{p.tokenizer}/tokenizer_report.json")
    doc = _json(f"{p.reports}/metrics.json")
    exports = _json(f"{p.reports}/export.json").get("export", {})
    manifest = _json(f"{p.publish}/manifest.json")
    knobs = {"density": config.density, "weight": config.weight, "t": config.t}
    used = " ".join(f"{k}={v}" for k, v in knobs.items() if k in config.recipe().get("parameters", {}))
    accuracy = ", ".join(f"{t} {m['exact_match']:.3f}" for t, m in sorted(doc.get("merged", {}).items())
                         if "exact_match" in m)
    checks = ", ".join(f"{n} {'passed' if c.get('passed') else 'FAILED'} (top-1 {c.get('top1', float('nan')):.3f}"
                       + "".join(f", {k.split('.', 1)[1]} {v:.3f}" for k, v in sorted(c.items())
                                 if k.startswith("exact_match."))
                       + ")" for n, c in sorted(exports.items())) or "nothing exported"
    return [
        ("fetch", p.lock, f"{len(lock)} models locked: {pins}"),
        ("merge", p.merged, f"{config.method} {used}: {merged.get('tensors', '?')} tensors, {_mb(p.merged)}, "
                            f"{merged.get('seconds', '?')} s, peak RSS {merged.get('peak_rss_mb', '?')} MB"),
        ("tokenizer", p.tokenizer, f"{tok.get('tokens', '?')} tokens, {len(tok.get('added_tokens') or {})} added, "
                                   f"vocab_size {tok.get('model_vocab_size', '?')}"),
        ("evaluate", f"{p.reports}/metrics.json", f"{config.eval.suite}: merged {accuracy or 'no accuracy task'}"),
        ("export", p.export, f"{config.export.format}: {checks}"),
        ("publish", p.publish, f"{manifest.get('target', '?')}: {len(manifest.get('files', {}))} files, "
                               f"tag {manifest.get('tag', '?')}"),
    ]


def score_table(config) -> list[tuple[str, ...]]:
    """Header + one row per model (base, fine-tunes, merged): each task's primary metric."""
    from mergelib.pipeline.reports import primary_metric

    doc = _json(f"{config.paths.reports}/metrics.json")
    models = {**doc.get("parents", {}), "merged": doc.get("merged", {})}
    tasks = sorted({t for per_task in models.values() for t in per_task})
    if not tasks:
        return []
    metric = {t: primary_metric(next(m[t] for m in models.values() if t in m)) for t in tasks}
    table = [("model", *(f"{t} ({metric[t]})" for t in tasks))]
    for label, per_task in models.items():
        table.append((label, *(f"{per_task[t][metric[t]]:.3f}" if t in per_task else "-" for t in tasks)))
    return table


def print_table(table: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for i, row in enumerate(table):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


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
    from mergelib.pipeline.tracking import latest_stage_runs, tracking_uri

    runs = latest_stage_runs(STAGES)
    print()
    print_table([("stage", "output", "result", "mlflow run")]
                + [(s, out, res, runs.get(s, "-")[:12]) for s, out, res in rows(config)])
    scores = score_table(config)
    if scores:
        print(f"\nScores ({config.models.name} family, {config.eval.suite} suite; exact match: higher is better, "
              "bits per byte: lower is better)")
        print_table(scores)
    if args.repro_seconds is not None:
        print(f"\ndvc repro took {args.repro_seconds:.0f} s")
    print(f"MLflow: {tracking_uri()}  (browse: mlflow ui --backend-store-uri {tracking_uri()})")
    print(f"Reports: {config.paths.reports}/eval_table.md, accuracy.png "
          "(`dvc plots show` puts it in dvc_plots/index.html)")
    print("Find a better recipe: python -m stages.search (then python -m stages.merge "
          f"recipe_file={config.paths.search}/best.yml)")
    print("Compare experiments: commit dvc.lock and reports/ as the baseline, then dvc exp run -S method=ties "
          "-S density=0.5 and dvc exp show --drop '.*' --keep "
          "'Experiment|^(method|density|weight)$|demo_(add|rev)$|merge_s|rss_mb'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
