"""Stage evaluate: the quick suite (perplexity, greedy continuations) -> reports/metrics.json (a DVC metric)."""

from __future__ import annotations

from stages._runner import main


def run(config, tracker) -> str:
    from mergelib.pipeline_eval import evaluate_model
    from mergelib.pipeline_steps import write_json

    ev = config.eval
    result = evaluate_model(config.paths.merged, config.paths.tokenizer, ev.texts, ev.prompts, ev.max_new_tokens)
    reports = config.paths.reports
    write_json(f"{reports}/metrics.json", {"eval": {ev.suite: result.metrics()}})
    write_json(f"{reports}/eval_samples.json", [{"prompt": p, "completion": c} for p, c in result.generations])
    tracker.log_metrics({f"eval.{ev.suite}.{k}": v for k, v in result.metrics().items()})
    tracker.log_artifact(f"{reports}/metrics.json", "reports")
    tracker.log_artifact(f"{reports}/eval_samples.json", "reports")
    return f"perplexity {result.perplexity:.3f} over {result.tokens} tokens -> {reports}/metrics.json"


if __name__ == "__main__":
    main("evaluate", run)
