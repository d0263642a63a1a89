"""Stage tokenizer: check the merged model's tokenizer (loads, fits vocab_size), record the tokens it added beyond
the base's, copy it to paths.tokenizer and its report to reports/tokenizer_report.md. The merge engine assembles it
(recipe `tokenizer:` / `tokenizer_source` / `chat_template`)."""

from __future__ import annotations

from stages._runner import main


def run(config, tracker) -> str:
    from mergelib.pipeline.fetch import read_lock
    from mergelib.pipeline.tokenizer_step import collect_tokenizer

    lock = read_lock(config.paths.lock)
    base = lock[config.models.base].path if config.models.base in lock else None
    report_md = f"{config.paths.reports}/tokenizer_report.md"
    report = collect_tokenizer(config.paths.merged, config.paths.tokenizer, base, report_md)
    added = len(report["added_tokens"] or {})
    tracker.log_metrics({"tokenizer.tokens": report["tokens"], "tokenizer.added_tokens": added,
                         "tokenizer.vocab_size": report["model_vocab_size"] or 0})
    tracker.log_artifact(f"{config.paths.tokenizer}/tokenizer_report.json", "tokenizer")
    tracker.log_artifact(report_md, "tokenizer")
    return (f"wrote {config.paths.tokenizer} ({report['tokens']} tokens, {added} added, vocab_size "
            f"{report['model_vocab_size']}; {report['source']})")


if __name__ == "__main__":
    main("tokenizer", run)
