"""`tokenizer: {source: DONOR, transplant: ...}` in a recipe: every input model whose vocabulary differs from the
donor's is given the donor's tokenizer first (`transplant_tokenizer`, tokensurgeon's job), so a merge of models
with different vocabularies lines up row for row and the output speaks the donor's tokenizer.

Transplanted models are written once under $MERGELIB_CACHE/transplant, in a directory named by the content hash of
the model's files, the donor's tokenizer (and, for methods that read them, the donor's weights) and the options;
a later merge with the same inputs reuses it. A model whose vocabulary already equals the donor's is used as it is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mergelib.config.recipe import ModelRef, TransplantConfig
from mergelib.io.atomic import MARKER
from mergelib.io.cache import cache_dir
from mergelib.io.hashing import hash_model_dir, sha256_files
from mergelib.io.hub import resolve_model
from mergelib.io.journal import plan_key
from mergelib.tokenizer import approximate as approx
from mergelib.tokenizer.transplant import TOKENIZER_FILES, TransplantOptions, transplant_tokenizer
from mergelib.tokenizer.vocab import Vocabulary, read_vocabulary

CACHE_VERSION = "1"  # bump when a transplanted directory for the same inputs would differ


def transplant_cache_dir() -> Path:
    """$MERGELIB_CACHE/transplant, else ~/.cache/mergelib/transplant."""
    return cache_dir("transplant")


def same_vocabulary(a: Vocabulary, b: Vocabulary) -> bool:
    """Whether two tokenizers map the same text to the same ids: same tokens at the same ids, same pipeline."""
    return a.ids == b.ids and a.pipeline() == b.pipeline()


@dataclass
class DonorTransplant:
    """Gives recipe inputs the donor's tokenizer; `notes` says what was done to which model."""

    donor: Path
    settings: TransplantConfig
    notes: list[str] = field(default_factory=list)

    @classmethod
    def from_recipe(cls, source: str, base_model: ModelRef | None, first_model: ModelRef,
                    settings: TransplantConfig) -> DonorTransplant:
        """The donor `tokenizer.source` names: `base` (the base model, else the first model) or a model reference."""
        ref = (base_model or first_model) if source == "base" else ModelRef(**ModelRef.parse(source))
        return cls(resolve_model(ref.path, ref.revision), settings)

    def __call__(self, model_dir: Path, label: str) -> Path:
        """`model_dir` itself when its vocabulary is the donor's, else its transplanted copy (built once)."""
        donor_vocab = read_vocabulary("tokenizer.source", self.donor)
        if same_vocabulary(read_vocabulary(label, model_dir), donor_vocab):
            return model_dir
        options = TransplantOptions(**self.settings.model_dump())
        target = transplant_cache_dir() / self._key(model_dir, options)[:32]
        if not (target / MARKER).is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            transplant_tokenizer(model_dir, self.donor, target, options)
        record = json.loads((target / MARKER).read_text())
        approximated = max(record.get("approximated", {}).values(), default=0)
        self.notes.append(
            f"model '{label}': given the tokenizer of '{self.donor}' ({options.approximation_method}): "
            f"{record.get('shared')} shared tokens keep their rows, {approximated} rows approximated"
        )
        return target

    def _key(self, model_dir: Path, options: TransplantOptions) -> str:
        donor_files = [self.donor / n for n in TOKENIZER_FILES if (self.donor / n).is_file()]
        parts = [CACHE_VERSION, json.dumps(options.__dict__, sort_keys=True)]
        parts += [f"model:{k}|{v}" for k, v in sorted(hash_model_dir(model_dir).items())]
        if options.approximation_method in approx.DONOR_SPACE:
            parts += [f"donor:{k}|{v}" for k, v in sorted(hash_model_dir(self.donor).items())]
        else:
            digests = sha256_files(donor_files)
            parts += [f"donor:{p.name}|{digests[str(p)]}" for p in donor_files]
        return plan_key(parts)
