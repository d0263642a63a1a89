"""Tokenizer transplant (`mergelib tokensurgeon MODEL DONOR OUT`, mergekit-tokensurgeon's job): MODEL with the
DONOR's tokenizer.

The output's embedding rows (`*embed_tokens.weight`) and, when untied, `lm_head.weight` rows follow the donor's
vocabulary: a donor token the model has (same vocabulary string) keeps the model's row exactly; a token it lacks
gets a row approximated from the shared tokens (`mergelib.tokenizer.approximate`); donor rows no token maps to
(padding) get the model's mean row. Every other tensor is copied as stored. config.json takes the donor's
vocab_size and bos/eos/pad ids; the donor's tokenizer files are copied. Only exactly shared tokens are anchors.

Matching options (mergekit's names; what mergelib does, each `no`, `yes`, `embed` or `lm_head`: which matrices):
- `byte_match`: a donor token the model lacks by string but has under another spelling of the same bytes
  (`▁the` in a SentencePiece vocabulary, `Ġthe` in a byte-level one; `<0x0A>` and `Ċ`) copies that row.
- `prefix_match`: a donor token still unmatched copies the row of the model's longest token whose bytes are a
  proper prefix of its bytes (no minimum length); tokens with no such prefix are approximated.
The output is built in a staging sibling and swapped in (`mergelib.io.atomic`); bad input writes nothing.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer

from mergelib.errors import InputModelError, RecipeError
from mergelib.io.atomic import MARKER, check_output_dir, commit_dir, staging_dir
from mergelib.io.hub import resolve_model
from mergelib.io.index import ShardIndex, index_model, read_config
from mergelib.io.journal import plan_key
from mergelib.io.reader import read_tensor
from mergelib.io.writer import ShardFile, TensorSlot, pack_shards, write_index
from mergelib.tokenizer import approximate as approx
from mergelib.tokenizer.vocab import Vocabulary, read_vocabulary

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
MATCH_SCOPES = ("no", "yes", "embed", "lm_head")
SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@dataclass(frozen=True)
class TransplantOptions:
    """The knobs of a transplant (mergekit-tokensurgeon's names)."""

    approximation_method: str = "omp"
    k: int = 64
    cosine_similarity: bool = False
    weight_scheme: str = "distance_proportional"
    subword_method: str = "mean"
    batch_size: int = 512
    prefix_match: str = "no"
    byte_match: str = "no"
    new_vocab_noise: float = 0.0  # std of Gaussian noise added to approximated rows
    new_vocab_scale: float = 1.0  # approximated rows are multiplied by this
    seed: int = 0
    out_shard_size: int = 5_000_000_000

    def validate(self) -> TransplantOptions:
        """Self, or a one-line RecipeError naming the bad option."""
        if self.approximation_method not in approx.METHODS:
            raise RecipeError(f"--approximation-method '{self.approximation_method}': choose one of "
                              f"{', '.join(approx.METHODS)}")
        if self.k < 1:
            raise RecipeError(f"-k must be at least 1, got {self.k}")
        if self.weight_scheme not in approx.WEIGHT_SCHEMES:
            raise RecipeError(f"--weight-scheme '{self.weight_scheme}': choose one of {', '.join(approx.WEIGHT_SCHEMES)}")
        if self.subword_method not in approx.SUBWORD_METHODS:
            raise RecipeError(f"--subword-method '{self.subword_method}': choose one of "
                              f"{', '.join(approx.SUBWORD_METHODS)}")
        if self.batch_size < 1:
            raise RecipeError(f"--batch-size must be at least 1, got {self.batch_size}")
        for name in ("prefix_match", "byte_match"):
            if getattr(self, name) not in MATCH_SCOPES:
                raise RecipeError(f"--{name.replace('_', '-')} '{getattr(self, name)}': choose one of "
                                  f"{', '.join(MATCH_SCOPES)}")
        if self.new_vocab_noise < 0 or self.new_vocab_scale <= 0:
            raise RecipeError("--new-vocab-noise must be >= 0 and --new-vocab-scale > 0")
        if self.out_shard_size < 1:
            raise RecipeError(f"--out-shard-size: {self.out_shard_size} bytes; a shard needs at least 1 byte")
        return self


@dataclass(frozen=True)
class TokenMatch:
    """How each output (donor) row is filled. Dicts map donor row -> model row."""

    n_rows: int
    exact: dict[int, int]  # same vocabulary string: copied, and the anchors of every approximation
    by_bytes: dict[int, int]  # same bytes, another spelling (used with byte_match)
    by_prefix: dict[int, int]  # the model's longest proper byte prefix (used with prefix_match)
    new: tuple[int, ...]  # donor rows of tokens the model lacks (approximated unless matched above)
    padding: tuple[int, ...]  # donor rows no token maps to


@dataclass(frozen=True)
class TransplantResult:
    """What `transplant_tokenizer` wrote."""

    out_dir: Path
    n_rows: int
    n_shared: int
    n_approximated: dict[str, int]  # matrix name -> rows approximated
    method: str
    seconds: float
    notes: tuple[str, ...] = field(default_factory=tuple)


def bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table byte-level BPE vocabularies are spelled in (GPT-2's)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_UNICODE_TO_BYTE = {c: b for b, c in bytes_to_unicode().items()}


def _mentions(node, kind: str) -> bool:
    if isinstance(node, dict):
        return node.get("type") == kind or any(_mentions(v, kind) for v in node.values())
    if isinstance(node, list):
        return any(_mentions(v, kind) for v in node)
    return False


def is_byte_level(vocab: Vocabulary) -> bool:
    """True when the vocabulary spells tokens in the byte-level alphabet (a ByteLevel pre-tokenizer or decoder)."""
    return _mentions(vocab.data.get("pre_tokenizer"), "ByteLevel") or _mentions(vocab.data.get("decoder"), "ByteLevel")


def token_bytes(vocab: Vocabulary, token: str, byte_level: bool) -> bytes:
    """The bytes a vocabulary string stands for: byte-level spelling undone, `▁` as a space, `<0xNN>` as a byte;
    added tokens are literal text."""
    if token in vocab.added:
        return token.encode()
    if byte_level and all(c in _UNICODE_TO_BYTE for c in token):
        return bytes(_UNICODE_TO_BYTE[c] for c in token)
    if (m := _BYTE_TOKEN.match(token)) is not None:
        return bytes([int(m.group(1), 16)])
    return token.replace("▁", " ").encode()


def match_tokens(model_vocab: Vocabulary, donor_vocab: Vocabulary, n_rows: int, model_rows: int) -> TokenMatch:
    """Which donor rows the model has (by string, by bytes, by longest byte prefix) and which it lacks."""
    model_ids = {t: i for t, i in model_vocab.ids.items() if i < model_rows}
    model_bl, donor_bl = is_byte_level(model_vocab), is_byte_level(donor_vocab)
    model_by_bytes: dict[bytes, int] = {}
    for i, t in model_vocab.by_id():
        if i < model_rows:
            model_by_bytes.setdefault(token_bytes(model_vocab, t, model_bl), i)
    exact, by_bytes, by_prefix, new = {}, {}, {}, []
    mapped = set()
    for row, token in donor_vocab.by_id():
        if row >= n_rows:
            continue
        mapped.add(row)
        if token in model_ids:
            exact[row] = model_ids[token]
            continue
        new.append(row)
        raw = token_bytes(donor_vocab, token, donor_bl)
        if raw in model_by_bytes:
            by_bytes[row] = model_by_bytes[raw]
        for cut in range(len(raw) - 1, 0, -1):
            if raw[:cut] in model_by_bytes:
                by_prefix[row] = model_by_bytes[raw[:cut]]
                break
    padding = tuple(r for r in range(n_rows) if r not in mapped)
    return TokenMatch(n_rows, exact, by_bytes, by_prefix, tuple(new), padding)


def _applies(scope: str, which: str) -> bool:
    return scope == "yes" or scope == which


def build_matrix(match: TokenMatch, which: str, model_matrix: torch.Tensor, donor_matrix: torch.Tensor | None,
                 opts: TransplantOptions, pieces: dict[int, list[tuple[int, int]]] | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """The output matrix [match.n_rows, Dm] (model dtype) for `which` ("embed" or "lm_head"): exact (and, as the
    options say, byte/prefix) matches copied, the other new tokens approximated, padding rows the model's mean.
    `donor_matrix` is needed by the donor-space methods, `pieces` (donor row -> model pieces) by subword."""
    dtype = model_matrix.dtype
    out = torch.zeros((match.n_rows, model_matrix.shape[1]), dtype=dtype)  # every row is set below
    copies = dict(match.exact)
    if _applies(opts.byte_match, which):
        copies.update({r: m for r, m in match.by_bytes.items() if r not in copies})
    if _applies(opts.prefix_match, which):
        copies.update({r: m for r, m in match.by_prefix.items() if r not in copies})
    if copies:
        dst, src = torch.tensor(list(copies)), torch.tensor(list(copies.values()))
        out[dst] = model_matrix.index_select(0, src)
    mean = approx.mean_row(model_matrix)
    if match.padding:
        out[torch.tensor(match.padding)] = mean.to(dtype)
    todo = [r for r in match.new if r not in copies]
    if todo:
        generator = generator or torch.Generator().manual_seed(opts.seed)
        rows = _approximate(todo, match, model_matrix, donor_matrix, opts, pieces or {}, generator, mean)
        if opts.new_vocab_scale != 1.0:
            rows = rows * opts.new_vocab_scale
        if opts.new_vocab_noise > 0:
            rows = rows + opts.new_vocab_noise * torch.randn(rows.shape, generator=generator)
        out[torch.tensor(todo)] = rows.to(dtype)
    return out


def _approximate(todo: list[int], match: TokenMatch, model_matrix: torch.Tensor, donor_matrix: torch.Tensor | None,
                 opts: TransplantOptions, pieces: dict[int, list[tuple[int, int]]], generator: torch.Generator,
                 mean: torch.Tensor) -> torch.Tensor:
    """Rows [len(todo), Dm] (fp32) for donor rows the model lacks, by `opts.approximation_method`."""
    method = opts.approximation_method
    if method == "zero":
        return torch.zeros((len(todo), model_matrix.shape[1]))
    if method == "mean" or (method in approx.DONOR_SPACE and not match.exact):
        return mean.expand(len(todo), -1).clone()
    if method == "randn":
        return approx.randn_rows(model_matrix, len(todo), generator)
    if method == "subword":
        return approx.subword_rows([pieces.get(r, []) for r in todo], model_matrix, opts.subword_method)
    donor_rows, model_rows = torch.tensor(list(match.exact)), torch.tensor(list(match.exact.values()))
    donor_anchors = donor_matrix.index_select(0, donor_rows).float()
    model_anchors = model_matrix.index_select(0, model_rows).float()
    out = torch.empty((len(todo), model_matrix.shape[1]))
    for start in range(0, len(todo), opts.batch_size):
        batch = todo[start:start + opts.batch_size]
        targets = donor_matrix.index_select(0, torch.tensor(batch)).float()  # [B, Dd]
        if method == "omp":
            idx, weights = approx.omp(targets, donor_anchors, opts.k, opts.cosine_similarity)
        else:
            idx, values = approx.neighbours(targets, donor_anchors, opts.k, opts.cosine_similarity)
            weights = approx.interpolation_weights(targets, donor_anchors, idx, values, opts.weight_scheme,
                                                   opts.cosine_similarity)
        out[start:start + len(batch)] = approx.combine(model_anchors, idx, weights)
    return out


def subword_pieces(model_vocab: Vocabulary, donor_vocab: Vocabulary, rows: list[int]) -> dict[int, list[tuple[int, int]]]:
    """Donor row -> the (model row, byte length) pieces MODEL's tokenizer splits the token's text into; tokens
    whose bytes are not whole UTF-8 text get no pieces (and the mean row)."""
    tokenizer = Tokenizer.from_str(model_vocab.text)
    donor_tokens = {i: t for t, i in donor_vocab.ids.items()}
    byte_level = is_byte_level(donor_vocab)
    out = {}
    for row in rows:
        try:
            text = token_bytes(donor_vocab, donor_tokens[row], byte_level).decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            out[row] = []
            continue
        enc = tokenizer.encode(text, add_special_tokens=False)
        out[row] = [(i, max(e - s, 1)) for i, (s, e) in zip(enc.ids, enc.offsets)]
    return out


def _resolve(ref: str | Path, role: str) -> Path:
    """The local directory of MODEL or DONOR (a Hub id through the cache)."""
    try:
        return resolve_model(str(ref))
    except InputModelError as exc:
        raise InputModelError(f"{role}: {exc}") from None


def _embedding_names(index: ShardIndex, role: str, ref) -> tuple[str, str | None]:
    """(embed_tokens weight, lm_head weight or None when tied) of a checkpoint."""
    embeds = sorted((n for n in index.tensors if n.endswith("embed_tokens.weight")), key=len)
    if not embeds:
        raise InputModelError(f"{role} '{ref}': no '*embed_tokens.weight' tensor; tokensurgeon handles architectures "
                              "with embed_tokens/lm_head (Llama, Mistral, Qwen, Gemma, ...)")
    heads = sorted((n for n in index.tensors if n.endswith("lm_head.weight")), key=len)
    return embeds[0], (heads[0] if heads else None)


def _donor_special_ids(donor_dir: Path, donor_vocab: Vocabulary) -> dict[str, int | None]:
    """bos/eos/pad ids from the donor's config.json, else from the tokens its tokenizer_config names."""
    config = _json_or_empty(donor_dir / "config.json")
    tok_config = _json_or_empty(donor_dir / "tokenizer_config.json")
    out = {}
    for key in SPECIAL_IDS:
        value = config.get(key)
        if value is None:
            token = tok_config.get(key.removesuffix("_id"))
            token = token.get("content") if isinstance(token, dict) else token
            value = donor_vocab.ids.get(token) if isinstance(token, str) else None
        out[key] = value
    return out


def _json_or_empty(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _donor_rows(donor_dir: Path, donor_vocab: Vocabulary, donor_index: ShardIndex | None, embed: str | None) -> int:
    """Output rows: the donor's embedding rows when it has weights, else its config vocab_size, at least its
    tokenizer's length."""
    if donor_index is not None and embed is not None:
        rows = donor_index.tensors[embed].shape[0]
    else:
        rows = _json_or_empty(donor_dir / "config.json").get("vocab_size") or 0
    return max(int(rows), donor_vocab.length)


def transplant_tokenizer(model: str | Path, donor: str | Path, out_dir: str | Path,
                         options: TransplantOptions | None = None, **kwargs) -> TransplantResult:
    """Write MODEL with DONOR's tokenizer to `out_dir` (see the module docstring); `kwargs` are TransplantOptions
    fields. Bad input raises a one-line MergelibError before anything is written."""
    started = time.perf_counter()
    opts = (options or TransplantOptions(**kwargs)).validate()
    out_dir = Path(out_dir)
    model_dir, donor_dir = _resolve(model, "MODEL"), _resolve(donor, "DONOR")
    model_vocab, donor_vocab = read_vocabulary("MODEL", model_dir), read_vocabulary("DONOR", donor_dir)
    model_index = index_model(model_dir)
    embed, head = _embedding_names(model_index, "MODEL", model)
    config = read_config(model_dir)
    needs_donor = opts.approximation_method in approx.DONOR_SPACE
    donor_index = index_model(donor_dir) if needs_donor else None
    donor_embed, donor_head = _embedding_names(donor_index, "DONOR", donor) if donor_index else (None, None)
    n_rows = _donor_rows(donor_dir, donor_vocab, donor_index, donor_embed)
    check_output_dir(out_dir)
    model_embed = read_tensor(embed, model_index.tensors[embed])
    match = match_tokens(model_vocab, donor_vocab, n_rows, model_embed.shape[0])
    notes = _notes(model_vocab, donor_vocab, match, opts)
    pieces = (subword_pieces(model_vocab, donor_vocab, list(match.new))
              if opts.approximation_method == "subword" else None)
    generator = torch.Generator().manual_seed(opts.seed)
    replaced, approximated = {}, {}
    for which, name, donor_name in (("embed", embed, donor_embed), ("lm_head", head, donor_head or donor_embed)):
        if name is None:
            continue
        matrix = model_embed if name == embed else read_tensor(name, model_index.tensors[name])
        donor_matrix = read_tensor(donor_name, donor_index.tensors[donor_name]) if donor_index else None
        if donor_matrix is not None and donor_matrix.shape[0] < n_rows:
            raise InputModelError(f"DONOR '{donor}': {donor_name} has {donor_matrix.shape[0]} rows, its tokenizer "
                                  f"uses {n_rows}")
        replaced[name] = build_matrix(match, which, matrix, donor_matrix, opts, pieces, generator)
        approximated[name] = match.n_rows - len(match.padding) - _copied(match, which, opts)
    config = _output_config(config, n_rows, _donor_special_ids(donor_dir, donor_vocab), model_index)
    record = {"kind": "tokensurgeon", "model": str(model), "donor": str(donor), "options": asdict(opts),
              "rows": n_rows, "shared": len(match.exact), "approximated": approximated, "notes": notes}
    _write_output(out_dir, model_dir, donor_dir, model_index, replaced, config, record, opts)
    return TransplantResult(out_dir, n_rows, len(match.exact), approximated, opts.approximation_method,
                            time.perf_counter() - started, tuple(notes))


def _copied(match: TokenMatch, which: str, opts: TransplantOptions) -> int:
    rows = set(match.exact)
    if _applies(opts.byte_match, which):
        rows |= set(match.by_bytes)
    if _applies(opts.prefix_match, which):
        rows |= set(match.by_prefix)
    return len(rows)


def _notes(model_vocab: Vocabulary, donor_vocab: Vocabulary, match: TokenMatch, opts: TransplantOptions) -> list[str]:
    notes = [f"{len(match.exact)} donor tokens shared with the model, {len(match.new)} new, "
             f"{len(match.padding)} padding rows"]
    if model_vocab.pipeline() != donor_vocab.pipeline():
        notes.append("the two tokenizers split text differently (normalizer, pre-tokenizer or model options); "
                     "tokens are matched by their vocabulary strings as is")
    if opts.approximation_method in approx.DONOR_SPACE and len(match.exact) < opts.k:
        notes.append(f"-k {opts.k} is more than the {len(match.exact)} shared tokens; using them all")
    if opts.approximation_method in approx.DONOR_SPACE and not match.exact:
        notes.append("no shared tokens to anchor on: new rows are the model's mean row")
    return notes


def _output_config(config: dict, n_rows: int, special: dict[str, int | None], index: ShardIndex) -> dict:
    """MODEL's config with the donor's vocab_size and special-token ids."""
    config = dict(config)
    for target in (config, config.get("text_config")):
        if isinstance(target, dict) and (target is config or "vocab_size" in target):
            target["vocab_size"] = n_rows
            target.update(special)
    if index.note is not None:  # dequantised on read: the output is plain
        config.pop("quantization_config", None)
    return config


def _write_output(out_dir: Path, model_dir: Path, donor_dir: Path, index: ShardIndex,
                  replaced: dict[str, torch.Tensor], config: dict, record: dict, opts: TransplantOptions) -> None:
    """Weights (copied, the embedding matrices replaced), config and the donor's tokenizer into a staging
    directory, then swapped into `out_dir`; a failure removes the staging directory."""
    parts = [json.dumps(record, sort_keys=True, default=str), json.dumps(config, sort_keys=True)]
    parts += [f"{f.resolve()}|{f.stat().st_size}|{f.stat().st_mtime_ns}" for f in index.files]
    staged = staging_dir(out_dir, plan_key(parts))
    try:
        slots = [_slot(name, info, replaced) for name, info in sorted(index.tensors.items())]
        shards = pack_shards(slots, opts.out_shard_size)
        for fname, group in shards.items():
            shard = ShardFile(staged / fname, group)
            for slot in group:
                tensor = replaced.get(slot.name)
                if tensor is None:
                    tensor = read_tensor(slot.name, index.tensors[slot.name])
                shard.write(slot.name, tensor.to(slot.dtype).contiguous())
            shard.close()
        write_index(staged, shards, {"mergelib_tool": "tokensurgeon"})
        (staged / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        _write_generation_config(model_dir, staged, config)
        for name in TOKENIZER_FILES:
            if (donor_dir / name).is_file():
                shutil.copyfile(donor_dir / name, staged / name)
        (staged / MARKER).write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
        commit_dir(staged, out_dir)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def _slot(name: str, info, replaced: dict[str, torch.Tensor]) -> TensorSlot:
    dtype = info.dtype if info.dequant is None else torch.float32
    if name in replaced:
        return TensorSlot(name, tuple(replaced[name].shape), replaced[name].dtype)
    return TensorSlot(name, tuple(info.shape), dtype)


def _write_generation_config(model_dir: Path, staged: Path, config: dict) -> None:
    """MODEL's generation_config.json with the donor's special-token ids (they name donor rows now)."""
    gen = _json_or_empty(model_dir / "generation_config.json")
    if not gen:
        return
    gen.update({k: config.get(k) for k in SPECIAL_IDS if k in gen or config.get(k) is not None})
    (staged / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")


__all__ = ["TokenMatch", "TransplantOptions", "TransplantResult", "build_matrix", "match_tokens",
           "transplant_tokenizer"]
