"""Tiny models whose vocabularies differ (added tokens, extra BPE entries, padded or short embeddings), for the
tokenizer tests, the demo and integration tests. Built on `mergelib.families.tiny`; every new row is seeded."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

from mergelib.families.tiny import INIT_STD, make_model
from mergelib.merging.rng import generator_for

EMBEDDINGS = ("model.embed_tokens.weight", "lm_head.weight")
KEEP = "keep"  # chat_template argument: leave the model's template as it is
TRIO_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


@dataclass(frozen=True)
class Added:
    """An added token (split out of the raw text before the BPE model), as `tokenizer.add_tokens` makes one."""

    content: str
    special: bool = True


@dataclass(frozen=True)
class Entry:
    """A BPE vocabulary entry formed by `merge` (its two parts must already be tokens)."""

    token: str
    merge: tuple[str, str]


def edit_vocabulary(model_dir: Path, tokens: Sequence[Added | Entry] = (), *, rows: int | None = None,
                    seed: int = 0, chat_template: str | None = KEEP) -> Path:
    """Append `tokens` to the model's tokenizer (entries first, then added tokens, at the next ids), resize its
    embedding matrices to `rows` rows (new rows seeded, N(0, INIT_STD)) and set config vocab_size to match."""
    model_dir = Path(model_dir)
    path = model_dir / "tokenizer.json"
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    next_id = max([*vocab.values(), *(t["id"] for t in data["added_tokens"])]) + 1
    for spec in [t for t in tokens if isinstance(t, Entry)] + [t for t in tokens if isinstance(t, Added)]:
        if isinstance(spec, Entry):
            vocab[spec.token] = next_id
            data["model"]["merges"].append(list(spec.merge))
        else:  # transformers' add_tokens: not in the model vocabulary; normalized unless special
            data["added_tokens"].append({"id": next_id, "content": spec.content, "single_word": False,
                                         "lstrip": False, "rstrip": False, "normalized": not spec.special,
                                         "special": spec.special})
        next_id += 1
    text = json.dumps(data, indent=2, ensure_ascii=False)
    loaded = Tokenizer.from_str(text)
    for spec in tokens:  # the fixture is only useful if tokenizers gives the ids written here
        token = spec.token if isinstance(spec, Entry) else spec.content
        assert loaded.token_to_id(token) is not None, token
    path.write_text(text)
    if rows is not None:
        resize_embeddings(model_dir, rows, seed)
    if chat_template != KEEP:
        (model_dir / "chat_template.jinja").unlink(missing_ok=True)
        if chat_template is not None:
            (model_dir / "chat_template.jinja").write_text(chat_template)
    return model_dir


def resize_embeddings(model_dir: Path, rows: int, seed: int = 0) -> None:
    """Cut or extend every embedding matrix of the model to `rows` rows, and set config.json vocab_size."""
    model_dir = Path(model_dir)
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
            metadata = f.metadata()
        hit = [name for name in tensors if name in EMBEDDINGS]
        if not hit:
            continue
        for name in hit:
            old = tensors[name]
            extra = max(0, rows - old.shape[0])
            new = INIT_STD * torch.randn((extra, old.shape[1]), generator=generator_for(seed, f"vocab/{name}"))
            tensors[name] = torch.cat([old[:rows], new.to(old.dtype)])  # [rows, hidden]
        save_file(tensors, file, metadata=metadata)
        _fix_index_size(model_dir)
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["vocab_size"] = rows
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _fix_index_size(model_dir: Path) -> None:
    index_path = model_dir / "model.safetensors.index.json"
    if not index_path.is_file():
        return
    index = json.loads(index_path.read_text())
    total = 0
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(model_dir / file, framework="pt") as f:
            for name in f.keys():
                t = f.get_slice(name)
                total += torch.empty((), dtype=_DTYPES[t.get_dtype()]).element_size() * _numel(t.get_shape())
    index["metadata"]["total_size"] = total
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _numel(shape: list[int]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


def make_vocab_trio(root: Path, *, seed: int = 0, tie_embeddings: bool = False) -> dict[str, Path]:
    """Three tiny Llamas (a base `a` and fine-tunes `b`, `c` of it) whose vocabularies differ. Tiny tokenizers
    have ids 0..259 (4 specials, 256 bytes); beyond them:

    a: 260 <|im_start|>, 261 <|im_end|> (special); 266 rows, i.e. 4 padded rows past the tokenizer.
    b: 260 'lo' = l+o, 261 'Ġlo' = Ġ+lo (BPE entries), 262 <|im_end|> (special), 263 <tool>; 264 rows.
    c: 260 <tool>, 261 <c_only>; 261 rows, so <c_only> has no embedding row.
    b and c share a chat template (TRIO_TEMPLATE); a keeps the tiny family's.
    """
    root = Path(root)
    common = dict(seed=seed, tie_embeddings=tie_embeddings, shard_size=1 << 40)
    a = make_model(root / "a", **common)
    b = make_model(root / "b", **common, delta_of=a, delta_seed=1)
    c = make_model(root / "c", **common, delta_of=a, delta_seed=2)
    edit_vocabulary(a, [Added("<|im_start|>"), Added("<|im_end|>")], rows=266, seed=seed + 101)
    edit_vocabulary(b, [Entry("lo", ("l", "o")), Entry("Ġlo", ("Ġ", "lo")), Added("<|im_end|>"),
                        Added("<tool>", special=False)], rows=264, seed=seed + 102, chat_template=TRIO_TEMPLATE)
    edit_vocabulary(c, [Added("<tool>", special=False), Added("<c_only>", special=False)], rows=261,
                    seed=seed + 103, chat_template=TRIO_TEMPLATE)
    return {"a": a, "b": b, "c": c}
