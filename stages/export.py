"""Stage export: the merged model in the formats conf/export/ asks for (mergelib.export.export_all), each read back
and compared with the merge; the checks are a DVC metric (reports/export.json) and a failed one fails the stage."""

from __future__ import annotations

from stages._runner import main


def run(config, tracker) -> str:
    from mergelib.pipeline.export_step import export_model

    ex, reports = config.export, config.paths.reports
    try:
        checks = export_model(config.paths.merged, config.paths.tokenizer, config.paths.export, ex,
                              f"{reports}/export.json", name=f"{config.models.name}-{config.method}",
                              models_dir=config.paths.models)
    finally:
        tracker.log_artifact(f"{reports}/export.json", "export")
    tracker.log_metrics({f"export.{name}.{k}": float(v) for name, check in checks.items()
                         for k, v in check.items() if isinstance(v, (int, float))})
    if not checks:
        return f"nothing exported (export={ex.format})"
    verdicts = ", ".join(f"{name} {'passed' if c.get('passed', True) else 'FAILED'}" for name, c in checks.items())
    return f"wrote {config.paths.export}: {verdicts}"


if __name__ == "__main__":
    main("export", run)
