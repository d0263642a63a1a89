"""Calibration texts -> token sequences: a jsonl file of {"text": ...} lines, tokenised with a model's tokenizer
into one stream (each text followed by EOS), cut into windows of `sequence_length`, windows chosen by `seed`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from mergelib.errors import RecipeError

DATA_LIMIT = 256 << 20  # calibration sets are small; a larger file is a mistake (a dataset dump)


def read_texts(path: str | Path) -> list[str]:
    """The "text" of every non-blank line of a jsonl file; RecipeError naming the file and line otherwise."""
    path = Path(path)
    try:
        if path.stat().st_size > DATA_LIMIT:
            raise RecipeError(f"calibration.data: {path} is over {DATA_LIMIT >> 20} MiB; give a smaller sample")
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"calibration.data: cannot read {path} ({exc.__class__.__name__}: {exc}); "
                          "give a readable jsonl file with a \"text\" field per line") from None
    texts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise RecipeError(f"calibration.data: {path} line {number} is not JSON") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise RecipeError(f"calibration.data: {path} line {number} has no string field \"text\"")
        texts.append(row["text"])
    if not texts:
        raise RecipeError(f"calibration.data: {path} holds no texts")
    return texts


def sequence_lengths(tokens: int, sequence_length: int) -> list[int]:
    """`tokens` split into sequences of `sequence_length` (the last one shorter when it does not divide)."""
    lengths = [sequence_length] * (tokens // sequence_length)
    return lengths + ([tokens % sequence_length] if tokens % sequence_length else [])


def token_sequences(texts: list[str], tokenizer, tokens: int, sequence_length: int, seed: int) -> list[torch.Tensor]:
    """The calibration sequences (1-D int64 tensors, `tokens` tokens in all): windows of the token stream drawn
    without replacement in the order of a permutation seeded by `seed`."""
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text)["input_ids"]
        if tokenizer.eos_token_id is not None:
            stream.append(tokenizer.eos_token_id)
    lengths = sequence_lengths(tokens, sequence_length)
    windows = len(stream) // sequence_length
    if windows < len(lengths):
        have = windows * sequence_length
        raise RecipeError(
            f"calibration.tokens: {tokens} tokens asked, but the data gives only {have} in whole windows of "
            f"{sequence_length} ({len(stream)} tokens); lower tokens or sequence_length, or add texts"
        )
    order = torch.randperm(windows, generator=torch.Generator().manual_seed(seed))[: len(lengths)]
    ids = torch.tensor(stream[: windows * sequence_length], dtype=torch.int64).view(windows, sequence_length)
    return [ids[int(w), :n].clone() for w, n in zip(order, lengths)]


def token_count(sequences: list[torch.Tensor]) -> int:
    return int(math.fsum(s.numel() for s in sequences))
