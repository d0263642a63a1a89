"""The output tokenizer.json: the owner's file (base or named source) with tokens appended at planned ids.

Every token, appended or already there, is written into the tokenizer model's own vocabulary at its id, and
added tokens are also listed as added tokens with the flags of the model they came from. tokenizers renumbers an
added token the model vocabulary lacks (next free id, in list order), so ids would drift once the vocabulary
grows; and a BPE string such as "Ġhello" appended as an *added token* would be matched literally in raw text
and never fire (mergekit issue #469). Appended BPE entries bring the donor's merges that form them, so the
tokenizer can produce them.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

from mergelib.errors import InputModelError
from mergelib.tokenizer.vocab import ADDED_TOKEN_FLAGS, Vocabulary

# a token listed under `tokenizer.tokens` that no model has: matched in the text as written
USER_TOKEN_FLAGS = dict.fromkeys(ADDED_TOKEN_FLAGS, False)
UNIGRAM_SCORE_GAP = 10.0  # appended Unigram pieces score this far below the least likely piece: never preferred


@dataclass(frozen=True)
class NewToken:
    """A token the output vocabulary gained."""

    token: str
    id: int
    origin: str | None  # label of the model it was taken from; None: listed under `tokenizer.tokens` only
    added: bool  # an added token (split out of the raw text) rather than a tokenizer-model vocabulary entry


class Assembly:
    """The output vocabulary being built: the owner's tokens at their ids, then appended tokens."""

    def __init__(self, owner: Vocabulary):
        self.owner = owner
        self.ids: dict[str, int] = dict(owner.ids)
        self.new: list[NewToken] = []
        self._origins: dict[str, Vocabulary] = {}

    @property
    def length(self) -> int:
        """Ids the output tokenizer produces: the largest id + 1."""
        return max(self.ids.values(), default=-1) + 1

    def append(self, token: str, origin: Vocabulary | None) -> NewToken:
        """Give `token` the next id; it keeps the kind (added or vocabulary entry) it has in `origin`."""
        if token in self.ids:
            raise ValueError(f"token {token!r} is already in the vocabulary")
        new = NewToken(token, self.length, origin.label if origin else None, origin is None or token in origin.added)
        self.ids[token] = new.id
        self.new.append(new)
        if origin is not None:
            self._origins.setdefault(origin.label, origin)
        return new

    def added_tokens(self) -> list[dict]:
        """The output's added-token entries (id, content and flags) in id order."""
        flags = dict(self.owner.added)
        for new in self.new:
            if new.added:
                flags[new.token] = dict(self._origins[new.origin].added[new.token]) if new.origin else USER_TOKEN_FLAGS
        return sorted(({"id": self.ids[t], "content": t, **f} for t, f in flags.items()), key=lambda e: e["id"])

    def new_merges(self) -> list[tuple[str, str]]:
        """The donors' BPE merges that form appended vocabulary entries, in each donor's priority order."""
        if self.owner.kind != "BPE":
            return []
        seen = set(self.owner.merges())
        out: list[tuple[str, str]] = []
        for label, origin in self._origins.items():
            targets = {n.token for n in self.new if n.origin == label and not n.added}
            if not targets or origin.kind != "BPE":
                continue
            prefix = origin.data["model"].get("continuing_subword_prefix") or ""
            for a, b in origin.merges():
                formed = a + b[len(prefix):]  # tokenizers strips the continuation prefix of the right part
                if formed in targets and a in self.ids and b in self.ids and (a, b) not in seen:
                    seen.add((a, b))
                    out.append((a, b))
        return out

    def render(self) -> str:
        """The output tokenizer.json text (the owner's text unchanged when nothing was appended)."""
        if not self.new:
            return self.owner.text
        data = copy.deepcopy(self.owner.data)
        model = data["model"]
        added = self.added_tokens()
        if self.owner.kind == "Unigram":
            self._extend_pieces(model["vocab"])
        else:
            vocab = model["vocab"]
            for token, tid in self.ids.items():
                vocab.setdefault(token, tid)
            model["vocab"] = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
        merges = self.new_merges()
        if merges:
            as_text = bool(model["merges"]) and isinstance(model["merges"][0], str)  # keep the owner's form
            model["merges"] = model["merges"] + [f"{a} {b}" if as_text else [a, b] for a, b in merges]
        data["added_tokens"] = added
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"

    def _extend_pieces(self, pieces: list) -> None:
        """Unigram ids are list positions: extend the piece list to cover every id, in order."""
        token_at = {tid: t for t, tid in self.ids.items()}
        floor = min((score for _, score in pieces), default=0.0) - UNIGRAM_SCORE_GAP
        origin_of = {n.token: n.origin for n in self.new}
        for tid in range(len(pieces), self.length):
            if tid not in token_at:
                raise InputModelError(
                    f"model '{self.owner.label}': its Unigram tokenizer has no token with id {tid}; appending tokens "
                    "to a Unigram vocabulary with holes is not supported (use a BPE/WordPiece/WordLevel tokenizer)"
                )
            token = token_at[tid]
            origin = self._origins.get(origin_of.get(token) or "")
            score = floor
            if origin is not None and origin.kind == "Unigram" and token not in origin.added:
                score = origin.data["model"]["vocab"][origin.ids[token]][1]
            pieces.append([token, score])
