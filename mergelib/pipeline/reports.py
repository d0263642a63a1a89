"""Evaluation reports: `metrics.json` (DVC metrics), a markdown table, CSV rows for DVC plots and PNG charts of the
merged model against its parents, and a comparison of several merges (methods, densities) per task.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# the metric a task is summarised by, first match wins; the first three are accuracies in [0, 1]
PRIMARY_METRICS = ("exact_match", "acc_norm", "acc", "bits_per_byte", "byte_perplexity", "word_perplexity")
ACCURACIES = PRIMARY_METRICS[:3]
DIGITS = 6  # rounding of metrics.json: same scores, same bytes, whatever the float noise in the last places


def primary_metric(metrics: Mapping[str, float]) -> str:
    """The metric that summarises one task's scores."""
    for name in PRIMARY_METRICS:
        if name in metrics:
            return name
    names = sorted(k for k in metrics if k != "samples")
    if not names:
        raise ValueError("a task result has no metric")
    return names[0]


def model_metrics(results: Mapping[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """label -> task -> metrics, from an `evaluate_family` result (`{"merged", "parents"}`), an `evaluate_model`
    result (labelled "merged") or a `metrics.json` already written."""
    if "metrics" in results:
        return {"merged": dict(results["metrics"])}
    table = {label: _metrics_of(r) for label, r in (results.get("parents") or {}).items()}
    if "merged" in results:
        table["merged"] = _metrics_of(results["merged"])
    return table


def _metrics_of(result: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    return dict(result["metrics"]) if "metrics" in result else dict(result)


def _rounded(value: float | int) -> float | int:
    return value if isinstance(value, int) else round(float(value), DIGITS)


def write_reports(results: Mapping[str, Any], out_dir: str | Path,
                  merge_label: str | None = None) -> dict[str, Path]:
    """Write `metrics.json`, `eval_table.md`, `eval_scores.csv`, `eval_samples.json` and `accuracy.png` into
    `out_dir` for an `evaluate_family` (or `evaluate_model`) result; returns name -> path. `merge_label` (the
    method and its parameters) titles the chart."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = model_metrics(results)
    tasks = sorted({t for per_task in table.values() for t in per_task})
    metrics = {
        label: {t: {m: _rounded(v) for m, v in sorted(ms.items())} for t, ms in sorted(per_task.items())}
        for label, per_task in table.items()
    }
    summary = {}
    for label, per_task in metrics.items():
        scores = [ms["exact_match"] for ms in per_task.values() if "exact_match" in ms]
        if scores:
            summary[label] = {"exact_match_mean": _rounded(sum(scores) / len(scores))}
    document = {"merged": metrics.pop("merged", {}), "parents": metrics, "summary": summary}
    paths = {"metrics": out_dir / "metrics.json"}
    paths["metrics"].write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    paths["table"] = out_dir / "eval_table.md"
    paths["table"].write_text(markdown_table(table, tasks))
    paths["scores"] = out_dir / "eval_scores.csv"
    _write_rows(paths["scores"], table)
    merged = results.get("merged", results)
    paths["samples"] = out_dir / "eval_samples.json"
    paths["samples"].write_text(json.dumps(merged.get("examples", {}), indent=2, sort_keys=True) + "\n")
    paths["plot"] = out_dir / "accuracy.png"
    title = f"merged ({merge_label}) vs its parents" if merge_label else "merged model vs its parents"
    plot_models(table, tasks, paths["plot"], title=title)
    return paths


def markdown_table(table: Mapping[str, Mapping[str, Mapping[str, float]]], tasks: Sequence[str]) -> str:
    """One row per model, one column per task (its primary metric)."""
    columns = []
    for task in tasks:
        seen = next(per_task[task] for per_task in table.values() if task in per_task)
        columns.append((task, primary_metric(seen)))
    lines = ["| model | " + " | ".join(f"{t} ({m})" for t, m in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for label, per_task in table.items():
        cells = [_cell(per_task.get(t, {}).get(m)) for t, m in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _write_rows(path: Path, table: Mapping[str, Mapping[str, Mapping[str, float]]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["model", "task", "metric", "value"])
        for label, per_task in table.items():
            for task, ms in sorted(per_task.items()):
                for metric, value in sorted(ms.items()):
                    if metric != "samples":
                        writer.writerow([label, task, metric, _rounded(value)])


def _panels(table: Mapping[str, Mapping[str, Mapping[str, float]]], tasks: Sequence[str]):
    """(task, metric) pairs split into accuracy tasks and the rest (perplexity-like, lower is better)."""
    pairs = [(t, primary_metric(next(pt[t] for pt in table.values() if t in pt))) for t in tasks]
    return [group for group in ([p for p in pairs if p[1] in ACCURACIES], [p for p in pairs if p[1] not in ACCURACIES])
            if group]


def plot_models(table: Mapping[str, Mapping[str, Mapping[str, float]]], tasks: Sequence[str], path: Path,
                title: str = "merged model vs its parents") -> Path:
    """Grouped bars, one per model (the merge striped): accuracy per task, and bits per byte of perplexity tasks."""
    from matplotlib.figure import Figure

    panels = _panels(table, tasks)
    labels = list(table)
    fig = Figure(figsize=(3 + 0.5 * len(labels) * sum(len(p) for p in panels), 4.4), layout="constrained")
    axes = fig.subplots(1, max(1, len(panels)), squeeze=False,
                        width_ratios=[len(p) for p in panels] or None)[0]
    width = 0.8 / max(1, len(labels))
    for ax, chosen in zip(axes, panels):
        for i, label in enumerate(labels):
            values = [table[label].get(t, {}).get(m, float("nan")) for t, m in chosen]
            xs = [k + (i - (len(labels) - 1) / 2) * width for k in range(len(chosen))]
            bars = ax.bar(xs, values, width, label=label, color=f"C{i}", hatch="//" if label == "merged" else None)
            ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
        ax.set_xticks(range(len(chosen)), [t for t, _ in chosen])
        metric = chosen[0][1]
        if metric in ACCURACIES:
            ax.set_ylim(0, 1.08)
            ax.set_ylabel(metric)
        else:
            ax.set_ylabel(f"{metric} (lower is better)")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=min(len(labels), 6),
               fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    return path


def plot_comparison(table: Mapping[str, Mapping[str, Mapping[str, float]]], tasks: Sequence[str], path: Path,
                    merges: Sequence[str]) -> Path:
    """One panel per task, one horizontal bar per row of `table` (parents grey, `merges` coloured), value labels."""
    from matplotlib.figure import Figure

    pairs = [pair for panel in _panels(table, tasks) for pair in panel]
    labels = list(table)
    fig = Figure(figsize=(2.2 + 2.3 * len(pairs), 1.0 + 0.28 * len(labels)), layout="constrained")
    axes = fig.subplots(1, max(1, len(pairs)), squeeze=False, sharey=True)[0]
    ys = list(range(len(labels)))[::-1]  # first row on top
    colors = ["C0" if label in merges else "0.6" for label in labels]
    for ax, (task, metric) in zip(axes, pairs):
        values = [table[label].get(task, {}).get(metric, float("nan")) for label in labels]
        bars = ax.barh(ys, values, color=colors)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
        ax.set_title(task, fontsize=9)
        ax.set_xlabel(metric if metric in ACCURACIES else f"{metric} (lower is better)", fontsize=8)
        if metric in ACCURACIES:
            ax.set_xlim(0, 1.15)
        else:
            finite = [v for v in values if v == v]
            ax.set_xlim(0, max(finite, default=1.0) * 1.18)
    axes[0].set_yticks(ys, labels, fontsize=8)
    fig.suptitle("merges compared per task (grey: parents)")
    fig.savefig(path, dpi=110, metadata={"Software": None})
    return path


def load_metrics(path: str | Path) -> dict[str, Any]:
    """A `metrics.json` written by `write_reports`."""
    return json.loads(Path(path).read_text())


def write_comparison(runs: Mapping[str, Mapping[str, Any]], out_dir: str | Path, *,
                     name: str = "method_comparison") -> dict[str, Path]:
    """Compare several merges of one family: `runs` maps a run label (`ties density=0.5`) to its `metrics.json`
    content or `evaluate_family` result. The parents of the first run that has them are shown for reference.
    Writes `<name>.md` (one row per run and parent), `<name>.csv` and `<name>.png`; returns name -> path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table: dict[str, dict[str, dict[str, float]]] = {}
    for label, result in runs.items():
        per_model = model_metrics(result)
        for parent, per_task in per_model.items():
            if parent != "merged" and parent not in table:
                table[parent] = per_task
    for label, result in runs.items():
        table[label] = model_metrics(result)["merged"]
    tasks = sorted({t for per_task in table.values() for t in per_task})
    paths = {"table": out_dir / f"{name}.md", "scores": out_dir / f"{name}.csv", "plot": out_dir / f"{name}.png"}
    paths["table"].write_text(markdown_table(table, tasks))
    _write_rows(paths["scores"], table)
    plot_comparison(table, tasks, paths["plot"], merges=tuple(runs))
    return paths
