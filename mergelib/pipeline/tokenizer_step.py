"""The tokenizer stage's work: check that the merged model's tokenizer loads and fits its embeddings, record the
tokens it has beyond the base's, and copy its files out with a report."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from mergelib.errors import InputModelError
from mergelib.io.hashing import sha256_file
from mergelib.io.index import read_config
from mergelib.pipeline.outputs import build_dir, write_json, write_text

TOKENIZER_FILES = (  # what mergelib.merge copies from the donor, in the same order
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
ENGINE_REPORT = "tokenizer_report.md"  # written by mergelib.merge when the recipe assembles a tokenizer


def _vocabulary(model_dir: Path) -> dict[str, int] | None:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir)).get_vocab()
    except (OSError, ValueError):
        return None


def collect_tokenizer(model_dir: str | Path, out_dir: str | Path, base_dir: str | Path | None = None,
                      report_md: str | Path | None = None) -> dict[str, Any]:
    """Check the merged model's tokenizer (loads with AutoTokenizer, fits the embeddings), record the tokens it has
    beyond the base's, and copy its files to `out_dir` with `tokenizer_report.json`. `report_md` receives the
    engine's `tokenizer_report.md` (tokenizer assembled by the recipe) or, without one, a short note."""
    from transformers import AutoTokenizer

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    present = [name for name in TOKENIZER_FILES if (model_dir / name).is_file()]
    if not present:
        raise InputModelError(f"{model_dir}: no tokenizer files; merge with copy_tokenizer or set tokenizer_source")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise InputModelError(f"{model_dir}: the tokenizer does not load ({str(exc).splitlines()[0]})") from None
    vocab = read_config(model_dir).get("vocab_size")
    if vocab is not None and len(tokenizer) > vocab:
        raise InputModelError(
            f"{model_dir}: the tokenizer has {len(tokenizer)} tokens but the model embeds {vocab}; "
            "use a tokenizer_source whose vocabulary fits"
        )
    base_vocab = _vocabulary(Path(base_dir)) if base_dir is not None else None
    merged_vocab = tokenizer.get_vocab()
    added = sorted((t for t in merged_vocab if base_vocab is not None and t not in base_vocab), key=merged_vocab.get)
    engine_report = model_dir / ENGINE_REPORT
    report = {
        "source": "assembled by the merge engine" if engine_report.is_file() else "copied from the base model",
        "tokens": len(tokenizer),
        "model_vocab_size": vocab,
        "padding_rows": (vocab - len(tokenizer)) if vocab is not None else 0,
        "added_tokens": {t: merged_vocab[t] for t in added} if base_vocab is not None else None,
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "files": {name: sha256_file(model_dir / name) for name in present},
    }

    def build(staged: Path) -> None:
        for name in present:
            shutil.copyfile(model_dir / name, staged / name)
        write_json(staged / "tokenizer_report.json", report)

    build_dir(out_dir, build)
    if report_md is not None:
        write_text(report_md, engine_report.read_text() if engine_report.is_file() else _tokenizer_note(report))
    return report


def _tokenizer_note(report: dict[str, Any]) -> str:
    added = report["added_tokens"]
    lines = ["# Tokenizer", "", f"Copied from the base model by the merge (no `tokenizer:` in the recipe): "
             f"{report['tokens']} tokens, config vocab_size {report['model_vocab_size']} "
             f"({report['padding_rows']} padding rows).", ""]
    if added is None:
        lines.append("The base model has no tokenizer to compare with.")
    else:
        lines.append(f"Tokens added beyond the base's vocabulary: {len(added)}"
                     + (": " + ", ".join(f"`{t}` ({i})" for t, i in added.items()) if added else "."))
    return "\n".join(lines) + "\n"
