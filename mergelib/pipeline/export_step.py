"""The export stage's work: `mergelib.export.export_all` for an ExportConfig, its checks copied to the DVC metric.
A built family's held-out prompts (the demo's `data/<skill>.jsonl`) are answered by the merge and by each GGUF."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mergelib.pipeline.outputs import build_dir, write_json


def heldout_tasks(models_dir: str | Path) -> dict[str, list[tuple[str, str]]]:
    """skill -> (prompt, answer) held-out pairs of the family built under `models_dir` (empty for other inputs)."""
    record = Path(models_dir) / "family.json"
    if not record.is_file():
        return {}
    data = json.loads(record.read_text()).get("data", {})
    tasks = {}
    for name, rel in sorted(data.items()):
        rows = [json.loads(line) for line in (Path(models_dir) / rel).read_text().splitlines() if line.strip()]
        if rows and {"prompt", "answer"} <= set(rows[0]):
            tasks[name] = [(r["prompt"], r["answer"]) for r in rows]
    return tasks


def export_model(model_dir: str | Path, tokenizer_dir: str | Path, out_dir: str | Path, export,
                 metrics_path: str | Path, name: str, models_dir: str | Path | None = None) -> dict[str, Any]:
    """Run `mergelib.export.export_all` for an ExportConfig and copy its checks to `metrics_path` (the DVC metric,
    also written when a check fails, before ExportCheckError propagates). export=none writes an empty directory."""
    from mergelib.export import ExportCheckError, export_all

    out_dir, metrics_path = Path(out_dir), Path(metrics_path)
    if not export.enabled:
        build_dir(out_dir, lambda staged: write_json(staged / "metrics.json", {}))
        write_json(metrics_path, {"export": {}})
        return {}
    try:
        result = export_all(model_dir, out_dir, safetensors=export.safetensors, gguf=export.gguf, int8=export.int8,
                            name=name, shard_size=export.shard_size, tokenizer_dir=tokenizer_dir,
                            verify=export.verify, tasks=heldout_tasks(models_dir) if models_dir else None)
    except ExportCheckError:
        written = out_dir / "metrics.json"
        write_json(metrics_path, {"export": json.loads(written.read_text()) if written.is_file() else {}})
        raise
    write_json(metrics_path, {"export": result.metrics()})
    return result.metrics()
