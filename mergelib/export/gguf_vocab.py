"""The tokenizer as GGUF metadata (`tokenizer.ggml.*`), read from a Hugging Face `tokenizer.json`.

Two shapes are supported, the two llama.cpp and transformers' GGUF reader both rebuild:
- byte-level BPE (GPT-2, Llama 3, Qwen2, our tiny tokenizer) -> model `gpt2`, with merges and the pre-tokenizer
  named by its split regex (`tokenizer.ggml.pre`);
- SentencePiece-style BPE with byte fallback (Llama 2, Mistral v0.1) -> model `llama`, scores -id (the
  SentencePiece BPE score order), `<0xNN>` byte tokens.
Whether BOS/EOS are added is read from what the tokenizer does, not from flags that may disagree with it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import gguf
from tokenizers import Tokenizer

from mergelib.export.errors import ExportError

# Split regexes llama.cpp names (tokenizer.ggml.pre); transformers' GGUF reader maps the same names back.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
KNOWN_SPLITS = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}
SPECIAL_NAMES = ("bos", "eos", "unk", "pad")
PROBE = "a"  # encoded once to see which special tokens the tokenizer adds around text


@dataclass
class GgufVocab:
    """Everything `tokenizer.ggml.*` holds, ready to write."""

    model: str  # gpt2 | llama
    pre: str | None
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None
    merges: list[str]
    special_ids: dict[str, int]
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool | None = None
    chat_template: str | None = None
    notes: list[str] = field(default_factory=list)


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise ExportError(f"{path}: invalid JSON ({exc})") from None


def _pre_name(tok: dict) -> str:
    pre = tok.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (len(parts) == 2 and parts[0].get("type") == "Split" and parts[1].get("type") == "ByteLevel"
            and not parts[1].get("use_regex", True)):
        regex = (parts[0].get("pattern") or {}).get("Regex")
        if regex in KNOWN_SPLITS:
            return KNOWN_SPLITS[regex]
    raise ExportError(
        f"tokenizer.json pre_tokenizer {json.dumps(pre)[:120]}: not a split GGUF readers know (GPT-2, Llama 3, "
        "Qwen2), so they would cut text differently; export safetensors instead"
    )


def _merges(tok: dict) -> list[str]:
    merges = tok["model"].get("merges") or []
    # tokenizers >= 0.20 stores [left, right] pairs; GGUF stores "left right"
    return [m if isinstance(m, str) else f"{m[0]} {m[1]}" for m in merges]


def _space_prefix(tok: dict) -> bool:
    text = json.dumps([tok.get("normalizer"), tok.get("pre_tokenizer")])
    return '"Prepend"' in text or '"prepend_scheme": "always"' in text or '"prepend_scheme": "first"' in text


def _special_ids(tok_config: dict, config: dict, ids: dict[str, int]) -> dict[str, int]:
    out = {}
    for name in SPECIAL_NAMES:
        entry = tok_config.get(f"{name}_token")
        content = entry.get("content") if isinstance(entry, dict) else entry
        if isinstance(content, str) and content in ids:
            out[name] = ids[content]
        elif isinstance(config.get(f"{name}_token_id"), int):
            out[name] = config[f"{name}_token_id"]
    return out


def read_vocab(tokenizer_dir: Path, config: dict) -> GgufVocab:
    """The GGUF tokenizer of the model whose config.json is `config`, from `tokenizer_dir`."""
    tokenizer_dir = Path(tokenizer_dir)
    path = tokenizer_dir / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"{path}: missing; GGUF export needs a fast tokenizer (tokenizer.json) next to the model")
    tok = _load_json(path)
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise ExportError(f"{path}: tokenizer model '{model.get('type')}' is not BPE; export safetensors instead")
    byte_fallback = bool(model.get("byte_fallback"))
    pre = None if byte_fallback else _pre_name(tok)
    ids: dict[str, int] = dict(model["vocab"])
    special_added = set()
    user_added = set()
    for added in tok.get("added_tokens", []):
        ids[added["content"]] = added["id"]
        (special_added if added.get("special") else user_added).add(added["id"])
    by_id = {i: t for t, i in ids.items()}
    n_tokens = max(by_id) + 1
    vocab_size = int(config.get("vocab_size") or n_tokens)
    if n_tokens > vocab_size:
        raise ExportError(f"{path}: {n_tokens} tokens but config.json vocab_size is {vocab_size}; they must fit")
    # ids the tokenizer never produces (holes, padded embedding rows) get placeholder names, as llama.cpp does
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = []
    for i, text in enumerate(tokens):
        if i not in by_id:
            types.append(gguf.TokenType.UNUSED)
        elif i in special_added:
            types.append(gguf.TokenType.CONTROL)
        elif i in user_added:
            types.append(gguf.TokenType.USER_DEFINED)
        elif byte_fallback and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    tok_config = _load_json(tokenizer_dir / "tokenizer_config.json")
    specials = _special_ids(tok_config, config, ids)
    if byte_fallback and "unk" in specials:
        types[specials["unk"]] = gguf.TokenType.UNKNOWN
    try:
        probe = Tokenizer.from_file(str(path)).encode(PROBE).ids
    except Exception as exc:  # the tokenizers library raises a bare Exception for a malformed file
        raise ExportError(f"{path}: the tokenizers library cannot load it ({exc})") from None
    template = tok_config.get("chat_template")
    if template is None and (tokenizer_dir / "chat_template.jinja").is_file():
        template = (tokenizer_dir / "chat_template.jinja").read_text()
    notes = []
    if byte_fallback and _space_prefix(tok):
        notes.append("transformers' GGUF reader prefixes one space less than llama.cpp and the source tokenizer "
                     "to text that starts with a space")
    return GgufVocab(
        model="llama" if byte_fallback else "gpt2",
        pre=pre,
        tokens=tokens,
        token_types=[int(t) for t in types],
        scores=[-float(i) for i in range(vocab_size)] if byte_fallback else None,
        merges=_merges(tok),
        special_ids=specials,
        add_bos=bool(probe) and probe[0] == specials.get("bos", -1),
        add_eos=bool(probe) and probe[-1] == specials.get("eos", -1),
        add_space_prefix=_space_prefix(tok) if byte_fallback else None,
        chat_template=template if isinstance(template, str) else None,
        notes=notes,
    )


def write_vocab(writer: gguf.GGUFWriter, vocab: GgufVocab) -> None:
    """The `tokenizer.ggml.*` keys (and `tokenizer.chat_template`)."""
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    # llama.cpp refuses a BPE vocabulary without the merges key, even when there are none (a byte-level vocab)
    writer.add_key_value(gguf.Keys.Tokenizer.MERGES, vocab.merges, gguf.GGUFValueType.ARRAY,
                         sub_type=gguf.GGUFValueType.STRING)
    for name, token_id in vocab.special_ids.items():
        getattr(writer, f"add_{name}_token_id")(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
