"""The output tokenizer, planned before any weight is read: vocabulary, embedding row sources, chat template, files.

Recipe fields and rules are mergekit's (../shared/reference/mergekit-semantics.md, "Tokenizer"). On purpose:
union tokens are real vocabulary entries at fixed ids (see assembly.py), appended tokens take the vocabulary
owner's padded rows first, and rows past the tokenizer (config vocab_size > tokenizer length) are kept, never
shrunk away; tokens the owner lists past its own rows are kept too (filled by the rules) instead of stripped.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from mergelib.config.recipe import ModelRef, ModelTokenSource, TokenizerConfig, ZeroSource
from mergelib.errors import RecipeError
from mergelib.tokenizer.assembly import Assembly, NewToken
from mergelib.tokenizer.chat_template import Template, missing_markers, resolve_chat_template
from mergelib.tokenizer.rows import ZERO, RowSource, gather_rows, plan_rows
from mergelib.tokenizer.vocab import SLOW_FILES, Vocabulary, read_vocabulary

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
                      "additional_special_tokens")
REPORT_TOKENS = 20  # appended tokens listed one per line in the report; the rest are counted
# files that would contradict the saved tokenizer (transformers prefers chat_template.jinja over the config key)
STALE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt",
               "vocab.txt", "added_tokens.json")


@dataclass(frozen=True, eq=False)
class TokenizerPlan:
    """The output vocabulary and how every input's embedding rows map onto it."""

    vocab_size: int  # output rows (padded when pad_to_multiple_of)
    row_sources: dict[str, tuple[RowSource, ...]]  # per input model label: one RowSource per output row
    report: str  # tokens added, from where, rows filled how
    tokens: tuple[str | None, ...]  # token at each id of the tokenizer (None: an id no token has)
    added: tuple[NewToken, ...]  # tokens the output vocabulary gained over its owner's
    owner: str  # label of the model whose tokenizer the output starts from
    chat_template: Template | None
    files: dict[str, str]  # file name -> text written by save()

    def save(self, out_dir: Path) -> None:
        """Write tokenizer.json, tokenizer_config.json (with the chat template) and special_tokens_map.json,
        removing tokenizer files there that would contradict them (STALE_FILES)."""
        out_dir = Path(out_dir)
        for name in STALE_FILES:
            (out_dir / name).unlink(missing_ok=True)
        for name, text in self.files.items():
            (out_dir / name).write_text(text, encoding="utf-8")


def align_rows(plan: TokenizerPlan, label: str, matrices: dict[str, torch.Tensor]) -> torch.Tensor:
    """The [plan.vocab_size, hidden] matrix for input `label` (embed_tokens or lm_head), its rows mapped onto the
    output vocabulary by the plan's RowSources (`rows.gather_rows`)."""
    return gather_rows(plan.row_sources[label], label, matrices)


def plan_tokenizer(
    models: dict[str, Path],
    base: str | None,
    config: TokenizerConfig | None,
    source: str | None,
    chat_template: str | None,
    model_vocab_sizes: dict[str, int],
) -> TokenizerPlan:
    """Plan the output tokenizer of a merge.

    `models`: input label -> model directory, in recipe order; `base`: the base model's label (None: the first
    model); `config`: the `tokenizer:` block; `source`: legacy `tokenizer_source` (with neither, the base's
    vocabulary); `chat_template`: the recipe field; `model_vocab_sizes`: label -> rows of its embedding matrix.
    """
    labels = list(models)
    if not labels:
        raise RecipeError("models: a tokenizer needs at least one input model")
    if config is not None and source is not None:
        raise RecipeError("give 'tokenizer_source' or 'tokenizer', not both")
    absent = [m for m in labels if m not in model_vocab_sizes]
    if absent:
        raise ValueError(f"model_vocab_sizes lacks {absent}")
    field = "tokenizer.source" if config is not None else "tokenizer_source"
    mode = (config.source if config is not None else source) or "base"
    base_label = match_label(base, labels, "base_model") if base is not None else labels[0]
    owner = base_label if mode in ("union", "base") else match_label(mode, labels, field)
    vocabs, borrowed = _vocabularies(models, owner, union=mode == "union")
    rows = {m: int(model_vocab_sizes[m]) for m in labels}

    def lookup(model: str, token: str) -> int | None:
        i = vocabs[model].ids.get(token)
        return i if i is not None and i < rows[model] else None

    tokens_cfg = (config.tokens if config is not None else None) or {}
    differing = _differing_pipelines(vocabs, owner)
    if mode == "union" and differing:
        m, what = differing[0]
        raise RecipeError(
            f"{field}: union needs tokenizers that split text the same way, but '{m}' differs from '{owner}' "
            f"({what}); use source: base or source: <model>"
        )
    asm = _assemble(vocabs, owner, mode == "union", list(tokens_cfg), lookup)
    explicit = {
        token: (_explicit_row(token, entry.source, labels, lookup, rows), entry.force)
        for token, entry in tokens_cfg.items()
    }

    tokens: list[str | None] = [None] * asm.length
    for token, i in asm.ids.items():
        tokens[i] = token
    n_rows = max(len(tokens), rows[owner])
    pad = config.pad_to_multiple_of if config is not None else None
    vocab_size = -(-n_rows // pad) * pad if pad else n_rows
    real_rows = {m: min(vocabs[m].length, rows[m]) for m in labels}
    row_sources = plan_rows(tokens, vocab_size, labels, owner, base_label, lookup, rows, real_rows, explicit)

    template, template_note = resolve_chat_template(chat_template, models, owner)
    files = {
        "tokenizer.json": asm.render(),
        "tokenizer_config.json": _dump(_tokenizer_config(vocabs[owner], asm, template)),
        "special_tokens_map.json": _dump(_special_tokens_map(vocabs[owner])),
    }
    report = _report(mode, owner, vocabs, rows, asm, len(tokens), n_rows, vocab_size, pad, row_sources,
                     template, template_note, differing)
    for m in borrowed:
        report += f"\nnote: '{m}' has no tokenizer files; its rows are read by the ids of '{owner}'s vocabulary"
    return TokenizerPlan(vocab_size, row_sources, report, tuple(tokens), tuple(asm.new), owner, template, files)


def _vocabularies(models: dict[str, Path], owner: str, union: bool) -> tuple[dict[str, Vocabulary], list[str]]:
    """Every input's vocabulary, and the labels of those that borrowed the owner's: a model with no tokenizer files
    at all (a fine-tune saved without them) is read as sharing the owner's ids, unless the vocabulary is a union,
    which needs every model's own tokens."""
    owner_vocab = read_vocabulary(owner, models[owner])
    vocabs: dict[str, Vocabulary] = {}
    borrowed: list[str] = []
    for m, path in models.items():
        if m == owner:
            vocabs[m] = owner_vocab
        elif not union and not any((Path(path) / name).is_file() for name in ("tokenizer.json", *SLOW_FILES)):
            vocabs[m] = dataclasses.replace(owner_vocab, label=m, path=Path(path))
            borrowed.append(m)
        else:
            vocabs[m] = read_vocabulary(m, path)
    return vocabs, borrowed


def _assemble(vocabs: dict[str, Vocabulary], owner: str, union: bool, listed: list[str], lookup) -> Assembly:
    """The owner's vocabulary; for a union, then every other model's tokens that have a row (recipe order, then
    id order); then the tokens listed under `tokenizer.tokens` that are still missing."""
    asm = Assembly(vocabs[owner])
    if union:
        for m, vocab in vocabs.items():
            if m != owner:
                for i, token in vocab.by_id():
                    if lookup(m, token) == i and token not in asm.ids:
                        asm.append(token, vocab)
    for token in listed:
        if token not in asm.ids:
            origin = next((m for m in [owner, *vocabs] if lookup(m, token) is not None), None)
            asm.append(token, vocabs[origin] if origin else None)
    return asm


def match_label(text: str, labels: list[str], field: str) -> str:
    """The input label `text` names (written as in the recipe: path[@revision][+lora]); RecipeError if none."""
    if text in labels:
        return text
    try:
        canonical = str(ModelRef.model_validate(text))
    except ValueError:
        canonical = text
    if canonical in labels:
        return canonical
    raise RecipeError(
        f"{field}: '{text}' is not an input model; use union, base or one of: {', '.join(labels)}"
    )


def _explicit_row(token: str, source, labels, lookup, rows: dict[str, int]) -> RowSource | None:
    where = f"tokenizer.tokens.{token}.source"
    if source is None:
        return None
    if isinstance(source, ZeroSource):
        return ZERO
    if isinstance(source, ModelTokenSource):
        model = match_label(str(source.model), labels, f"{where}.model")
        if source.token_id is not None:
            if source.token_id >= rows[model]:
                raise RecipeError(f"{where}.token_id: {source.token_id} is past the {rows[model]} rows of '{model}'")
            return RowSource("model", model, source.token_id)
        row = lookup(model, source.token)
        if row is None:
            raise RecipeError(f"{where}.token: model '{model}' has no token {source.token!r} (with an embedding row)")
        return RowSource("model", model, row)
    model = match_label(str(source), labels, where)
    row = lookup(model, token)
    if row is None:
        raise RecipeError(
            f"{where}: model '{model}' has no token {token!r} (with an embedding row); take another token's row "
            "with {kind: model_token, model, token}"
        )
    return RowSource("model", model, row)


def _differing_pipelines(vocabs: dict[str, Vocabulary], owner: str) -> list[tuple[str, str]]:
    """(model, what differs) for models whose tokenizer turns text into vocabulary strings unlike the owner's."""
    ref = vocabs[owner].pipeline()
    out = []
    for m, vocab in vocabs.items():
        diff = [k for k, v in vocab.pipeline().items() if v != ref[k]]
        if diff:
            out.append((m, ", ".join(diff)))
    return out


def _tokenizer_config(owner: Vocabulary, asm: Assembly, template: Template | None) -> dict:
    path = owner.path / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    if "added_tokens_decoder" in config:  # transformers 4.x reads added tokens from here: keep it consistent
        config["added_tokens_decoder"] = {
            str(e["id"]): {k: v for k, v in e.items() if k != "id"} for e in asm.added_tokens()
        }
    config.pop("chat_template", None)
    if template:
        config["chat_template"] = template
    return config


def _special_tokens_map(owner: Vocabulary) -> dict:
    path = owner.path / "special_tokens_map.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    config_path = owner.path / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    return {k: config[k] for k in SPECIAL_TOKEN_KEYS if config.get(k) is not None}


def _dump(data: dict) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def _report(mode, owner, vocabs, rows, asm, n_tokens, n_rows, vocab_size, pad, row_sources, template,
            template_note, differing) -> str:
    what = {"union": "union", "base": "base"}.get(mode, "model")
    lines = [
        f"tokenizer: {what} vocabulary from '{owner}' ({vocabs[owner].length} tokens, {rows[owner]} rows), "
        f"{len(asm.new)} tokens appended"
    ]
    n_merges = len(asm.new_merges())
    for new in asm.new[:REPORT_TOKENS]:
        kind = "added token" if new.added else "vocabulary entry"
        lines.append(f"  + {new.token!r} -> id {new.id} from '{new.origin}' ({kind})" if new.origin
                     else f"  + {new.token!r} -> id {new.id}, listed under tokenizer.tokens ({kind})")
    if len(asm.new) > REPORT_TOKENS:
        lines.append(f"  ... and {len(asm.new) - REPORT_TOKENS} more")
    if n_merges:
        lines.append(f"  {n_merges} BPE merges taken from the donors so the tokenizer produces appended entries")
    size = f"vocab_size {vocab_size}: {n_tokens} token ids"
    if n_rows > n_tokens:
        size += f", rows {n_tokens}..{n_rows - 1} past the tokenizer kept from the models (not shrunk)"
    if vocab_size > n_rows:
        size += f", rows {n_rows}..{vocab_size - 1} pad to a multiple of {pad} (mean embedding)"
    lines.append(size)
    for m, sources in row_sources.items():
        counts: Counter[str] = Counter()
        for s in sources:
            counts[{"own": "own", "model": f"from '{s.model}'", "average": "averaged"}.get(s.kind, s.kind)] += 1
        lines.append(f"rows of '{m}': " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    for m, diff in differing:
        lines.append(f"note: '{m}' tokenizes differently from '{owner}' ({diff}); its rows are matched by token string")
    lines.append(f"chat_template: {template_note}")
    missing = missing_markers(template, asm.ids)
    if missing:
        lines.append(f"note: the chat template writes {', '.join(missing)}, not tokens of the output vocabulary")
    return "\n".join(lines)
