"""One input model's vocabulary, read from its fast tokenizer (`tokenizer.json`, the Hugging Face tokenizers format).

Only tokenizer.json is read: it is the one format that lists every token with its id (model vocabulary and
added tokens alike). Slow-only tokenizers (tokenizer.model, vocab.json + merges.txt) are refused by name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mergelib.config.textfile import read_text
from mergelib.errors import InputModelError

SUPPORTED_MODELS = ("BPE", "WordPiece", "WordLevel", "Unigram")
SLOW_FILES = ("tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "spiece.model")
ADDED_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")
# model options that change what a vocabulary string means; two vocabularies are only comparable when they agree
MEANING_OPTIONS = ("continuing_subword_prefix", "end_of_word_suffix", "byte_fallback")


@dataclass(frozen=True, eq=False)
class Vocabulary:
    """A model's tokens and ids as its tokenizer.json states them (`data` is the parsed file, never mutated)."""

    label: str
    path: Path
    text: str  # the tokenizer.json text as read
    data: dict
    kind: str  # tokenizer model type: BPE, WordPiece, WordLevel or Unigram
    ids: dict[str, int]  # token -> id; a model-vocabulary id wins over an added-token entry, as in tokenizers
    added: dict[str, dict]  # added-token content -> its flags (single_word, lstrip, rstrip, normalized, special)

    @property
    def length(self) -> int:
        """Ids the tokenizer can produce: the largest id + 1."""
        return max(self.ids.values(), default=-1) + 1

    def by_id(self) -> list[tuple[int, str]]:
        """(id, token) pairs in id order."""
        return sorted((i, t) for t, i in self.ids.items())

    def merges(self) -> list[tuple[str, str]]:
        """BPE merges as pairs, in priority order (either serialized form: "a b" or ["a", "b"])."""
        raw = self.data["model"].get("merges") or []
        return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in raw]

    def pipeline(self) -> dict:
        """What decides how text becomes vocabulary strings: two vocabularies are comparable when this agrees."""
        model = self.data["model"]
        return {
            "model": self.kind,
            "normalizer": self.data.get("normalizer"),
            "pre_tokenizer": self.data.get("pre_tokenizer"),
            **{k: model.get(k) for k in MEANING_OPTIONS},
        }


def model_kind(model: dict) -> str:
    """The tokenizer model type; files written by old tokenizers versions may omit `type`."""
    if "type" in model:
        return model["type"]
    vocab = model.get("vocab")
    if isinstance(vocab, list):
        return "Unigram"
    if "merges" in model:
        return "BPE"
    return "WordPiece" if "max_input_chars_per_word" in model else "WordLevel"


def vocab_ids(model: dict, kind: str) -> dict[str, int]:
    """Token -> id of the tokenizer model's own vocabulary (Unigram lists pieces in id order)."""
    if kind == "Unigram":
        return {piece: i for i, (piece, _score) in enumerate(model["vocab"])}
    return dict(model["vocab"])


def read_vocabulary(label: str, model_dir: Path) -> Vocabulary:
    """The vocabulary of model `label` in `model_dir`; InputModelError if it has no usable tokenizer.json."""
    model_dir = Path(model_dir)
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        slow = [name for name in SLOW_FILES if (model_dir / name).is_file()]
        found = f"it has only {', '.join(slow)} (a slow tokenizer)" if slow else "it has no tokenizer files"
        raise InputModelError(
            f"model '{label}': no tokenizer.json in {model_dir}; {found}. mergelib assembles vocabularies from fast "
            f"tokenizers only (tokenizer.json with a {'/'.join(SUPPORTED_MODELS)} model): save one with "
            "AutoTokenizer.from_pretrained(path).save_pretrained(path)"
        )
    text = read_text(path, f"model '{label}''s tokenizer.json", InputModelError)
    try:
        data = json.loads(text)
        kind = model_kind(data["model"])
    except (ValueError, KeyError, TypeError) as exc:
        raise InputModelError(f"model '{label}': {path} is not a tokenizers JSON file ({exc})") from None
    if kind not in SUPPORTED_MODELS:
        raise InputModelError(
            f"model '{label}': tokenizer model type '{kind}' is not supported; supported: {', '.join(SUPPORTED_MODELS)}"
        )
    ids = vocab_ids(data["model"], kind)
    added: dict[str, dict] = {}
    for entry in data.get("added_tokens") or []:
        content = entry["content"]
        added[content] = {k: bool(entry.get(k, False)) for k in ADDED_TOKEN_FLAGS}
        ids.setdefault(content, int(entry["id"]))
    return Vocabulary(label, model_dir, text, data, kind, ids, added)
