"""Stage evaluate: lm-eval tasks on the merged model and its parents -> reports/metrics.json (DVC metrics), tables,
plots (reports/*.png, DVC plots) and every number on the MLflow run."""

from __future__ import annotations

from stages._runner import main


def run(config, tracker) -> str:
    from mergelib.pipeline.eval_step import evaluate_merge, family_labels, flat_metrics, summary_line
    from mergelib.pipeline.evaluate import resolve_tasks
    from mergelib.pipeline.fetch import read_lock

    resolve_tasks(list(config.eval.tasks))  # a bad task name fails here, before any model loads
    reports = config.paths.reports
    parents = family_labels(config.models.refs(), read_lock(config.paths.lock)) if config.eval.parents else {}
    document = evaluate_merge(config.paths.merged, parents, config.eval, reports)
    tracker.log_metrics(flat_metrics(document))
    for name in ("metrics.json", "eval_table.md", "eval_scores.csv", "eval_samples.json", "accuracy.png",
                 "skill_accuracy.csv"):
        tracker.log_artifact(f"{reports}/{name}", "reports")
    return f"{config.eval.suite}: {summary_line(document)} -> {reports}/metrics.json"


if __name__ == "__main__":
    main("evaluate", run)
