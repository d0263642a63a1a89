"""Stage tokenizer: check the merged model's tokenizer and copy it into paths.tokenizer."""

from __future__ import annotations

from stages._runner import main


def run(config, tracker) -> str:
    from mergelib.pipeline_steps import collect_tokenizer

    report = collect_tokenizer(config.paths.merged, config.paths.tokenizer)
    tracker.log_metrics({"tokenizer.tokens": report["tokens"]})
    tracker.log_artifact(f"{config.paths.tokenizer}/tokenizer_report.json", "tokenizer")
    return f"wrote {config.paths.tokenizer} ({report['tokens']} tokens, {len(report['files'])} files)"


if __name__ == "__main__":
    main("tokenizer", run)
