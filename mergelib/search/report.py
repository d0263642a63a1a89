"""What a search leaves behind: the best recipe as mergekit YAML (each Pareto point too), `search.json` (the DVC
metric), every trial as CSV, a markdown report with validation and held-out scores side by side, and PNG plots
(optimisation history, parameter importances, the Pareto front) drawn by Optuna's matplotlib visualisations.
"""

from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path
from typing import Any

import yaml

from mergelib.pipeline.outputs import build_dir, write_json, write_text
from mergelib.search.config import SearchConfig
from mergelib.search.scorer import HELD_OUT

BEST = "best.yml"
METRICS = "search.json"


def recipe_yaml(recipe: dict[str, Any], header: str) -> str:
    """A mergekit recipe as YAML `mergelib merge` and the merge stage read as they are, under a comment header."""
    lines = "".join(f"# {line}\n" for line in header.splitlines())
    return lines + yaml.safe_dump(recipe, sort_keys=False, default_flow_style=False)


def write_outputs(outcome, study, search: SearchConfig, out_dir: Path, reports_dir: Path) -> dict[str, Path]:
    """Write the recipes into `out_dir` (swapped in whole) and the report into `reports_dir`; name -> path."""
    tasks = sorted(search.objective.tasks)

    def build(staged: Path) -> None:
        for rank, point in enumerate(outcome.best):
            header = (f"Found by mergelib search (study '{outcome.study}', trial {point['number']}): validation "
                      + ", ".join(f"{t} {point['validation'].get(t, 0):.3f}" for t in tasks)
                      + "; held-out " + ", ".join(f"{t} {point['heldout'][t]:.3f}" for t in tasks) + ".")
            text = recipe_yaml(point["recipe"], header)
            if rank == 0:
                (staged / BEST).write_text(text)
            if search.pareto:
                (staged / "pareto").mkdir(exist_ok=True)
                (staged / "pareto" / f"trial-{point['number']}.yml").write_text(text)

    out_dir = Path(out_dir)
    build_dir(out_dir, build)
    reports_dir = Path(reports_dir)
    reports_dir.mkdir(parents=True, exist_ok=True)
    paths = {"best": out_dir / BEST, "metrics": reports_dir / METRICS, "trials": reports_dir / "search_trials.csv",
             "report": reports_dir / "search_report.md"}
    top = outcome.best[0]
    counts = _states(outcome.trials)
    # the DVC metric: few columns in `dvc exp show` (the report and the CSV hold the rest)
    write_json(paths["metrics"], {"objective": round(top["values"][0], 6), "heldout": top["heldout"],
                                  "trials": counts["complete"] + counts["pruned"] + counts["failed"]})
    write_text(paths["trials"], _trials_csv(outcome.trials))
    paths.update(_plots(study, search, reports_dir))
    write_text(paths["report"], _markdown(outcome, search, counts, paths))
    return paths


def _states(trials: list[dict[str, Any]]) -> dict[str, int]:
    """Trials per outcome: complete, pruned, failed (with an error) and lost (retried)."""
    out = {"complete": 0, "pruned": 0, "failed": 0, "lost": 0}
    for t in trials:
        if t["state"] in ("complete", "pruned"):
            out[t["state"]] += 1
        elif t["state"] == "fail":
            out["lost" if t["lost"] else "failed"] += 1
    return out


def _trials_csv(trials: list[dict[str, Any]]) -> str:
    params = sorted({k for t in trials for k in t["params"]})
    tasks = sorted({k for t in trials for k in t["scores"]})
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["number", "state", "objective", *params, *(f"val_{t}" for t in tasks), "setup_s", "merge_s",
                     "eval_s", "error"])
    for t in trials:
        writer.writerow([t["number"], t["state"], "/".join(f"{v:.4f}" for v in t["values"]),
                         *(t["params"].get(p, "") for p in params), *(t["scores"].get(k, "") for k in tasks),
                         *(t["seconds"].get(k, "") for k in ("setup", "merge", "eval")), t["error"]])
    return buf.getvalue()


def _plots(study, search: SearchConfig, reports_dir: Path) -> dict[str, Path]:
    """history.png, importances.png (when at least two trials completed with some spread) and pareto.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm

    names = [f"objective {t}" for t in sorted(search.objective.tasks)] if search.pareto else ["objective"]
    out: dict[str, Path] = {}
    draws = {"history": lambda: ovm.plot_optimization_history(
        study, target=(lambda t: t.values[0]) if search.pareto else None, target_name=names[0])}
    draws["importances"] = lambda: ovm.plot_param_importances(
        study, target=(lambda t: t.values[0]) if search.pareto else None, target_name=names[0])
    if search.pareto:
        draws["pareto"] = lambda: ovm.plot_pareto_front(study, target_names=names)
    for name, draw in draws.items():
        try:
            with warnings.catch_warnings():  # experimental APIs; importances from few trials (the report says how many)
                warnings.simplefilter("ignore")
                axes = draw()
        except (ValueError, RuntimeError, ZeroDivisionError):  # too few complete trials, or no spread to rank
            continue
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        figure.set_size_inches(8, 5)
        figure.tight_layout()
        path = reports_dir / f"search_{name}.png"
        figure.savefig(path, dpi=100, metadata={"Software": None})
        plt.close(figure)
        out[name] = path
    return out


def _markdown(outcome, search: SearchConfig, counts: dict[str, int], paths: dict[str, Path]) -> str:
    tasks = sorted(search.objective.tasks)
    head = "| model | " + " | ".join(f"{t} validation | {t} held-out" for t in tasks) + " |"
    rule = "|---|" + "---|---|" * len(tasks)

    def row(label: str, val: dict, held: dict) -> str:
        return f"| {label} | " + " | ".join(f"{val.get(t, float('nan')):.3f} | {held.get(t, float('nan')):.3f}"
                                             for t in tasks) + " |"

    lines = [f"# Recipe search: study `{outcome.study}`", "",
             f"Storage `{outcome.storage}`; sampler {search.sampler} (seed {search.seed}); objective "
             f"{search.objective.aggregate} of " + ", ".join(f"{t} x{w:g}" for t, w in search.objective.tasks.items())
             + (" (share of the best parent's validation score)" if search.objective.normalise else "")
             + f"; trials: {counts['complete']} complete, {counts['pruned']} pruned, {counts['failed']} failed.", "",
             "Validation prompts are what the trials were scored on; held-out prompts are the evaluate stage's, "
             "which no trial saw.", ""]
    if search.objective.floor:
        kept = "kept" if outcome.best[0].get("feasible") else "NO trial kept them (shown: the closest)"
        lines += ["Floors (" + ", ".join(f"{t} >= {v:g}" for t, v in sorted(search.objective.floor.items()))
                  + f"): {kept}.", ""]
    lines += [head, rule]
    for label, scores in outcome.parents.items():
        lines.append(row(label, scores["validation"], scores[HELD_OUT]))
    lines.append(row("default recipe", outcome.default["validation"], outcome.default[HELD_OUT]))
    for point in outcome.best:
        lines.append(row(f"search: trial {point['number']}", point["validation"], point["heldout"]))
    lines += ["", f"Best recipe (`{paths['best']}`):", "", "```yaml",
              yaml.safe_dump(outcome.best[0]["recipe"], sort_keys=False).rstrip(), "```", ""]
    for name in ("history", "importances", "pareto"):
        if name in paths:
            lines.append(f"![{name}]({paths[name].name})")
    return "\n".join(lines) + "\n"
