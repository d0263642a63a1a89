"""GGUF files as merge inputs: a llama-architecture GGUF read as the Hugging Face Llama checkpoint it came from.

A model reference that is a `.gguf` file (or a directory holding exactly one `.gguf` and no safetensors or .bin
weights) stands for a model directory built once in $MERGELIB_CACHE/gguf: a config.json made from the GGUF
metadata (LlamaForCausalLM), the tokenizer files transformers rebuilds from the GGUF (when it can), and a link to
the GGUF file itself. Indexing reads the GGUF header only (`gguf.GGUFReader`, memory-mapped, no tensor data).

Each tensor gets its Hugging Face name (`blk.N.attn_q.weight` -> `model.layers.N.self_attn.q_proj.weight`, ...)
and shape (GGUF lists dimensions innermost first: reversed), and a `GgufDequant` that reads its bytes with
`os.pread` on demand, dequantises them with `gguf.quants.dequantize` (float32) and undoes llama.cpp's q/k rotary
row interleaving (the inverse of `mergelib.export.gguf_meta.interleave_rope_rows`). The engine streams it like any
other input; the card and CLI say the merge is of dequantised weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from mergelib.errors import InputModelError
from mergelib.io.cache import cache_dir

if TYPE_CHECKING:
    import gguf

# GGML type names (gguf.GGMLQuantizationType); the gguf package is imported only when a GGUF input is read
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                   "Q6_K")
SUPPORTED_ARCHS = ("llama",)
INPUT_VERSION = "1"  # bump when the cached model directory for the same GGUF file changes
TOKENIZER_ERROR = "gguf_tokenizer_error.txt"  # in the cached directory when transformers could not rebuild one

_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_PLAIN = re.compile(r"^([a-z_]+)\.(weight|bias)$")


def supported_types() -> str:
    return ", ".join(SUPPORTED_TYPES)


@dataclass(frozen=True)
class GgufDequant:
    """How one tensor is rebuilt from a GGUF file: its GGML type, where its bytes are, their numpy layout, and the
    number of heads whose q/k rows llama.cpp interleaved (None: rows as stored)."""

    qtype: str  # GGMLQuantizationType name
    offset: int  # absolute byte offset of the data in the file
    nbytes: int
    byte_shape: tuple[int, ...]  # numpy shape of the stored bytes (HF order, last dim in bytes)
    rope_heads: int | None = None
    kind: str = "gguf"

    def describe(self) -> str:
        return self.qtype

    def read(self, name: str, info, start: int, end: int | None, read_stored=None) -> torch.Tensor:
        """Rows [start, end) as float32 (only those rows' bytes where the layout allows; see read_gguf_tensor)."""
        return read_gguf_tensor(name, info, start, end)


# ---------------------------------------------------------------- references


def gguf_file_of(root: Path) -> Path | None:
    """The GGUF file a reference stands for: itself (a `.gguf` file), or the one `.gguf` of a directory holding no
    safetensors or .bin weights; None otherwise (an ordinary model directory)."""
    root = Path(root).expanduser()
    if root.is_file():
        return root if root.suffix == ".gguf" else None
    if not root.is_dir():
        return None
    if any(root.glob("*.safetensors")) or any(root.glob("pytorch_model*.bin")):
        return None
    found = sorted(root.glob("*.gguf"))
    if len(found) > 1:
        names = ", ".join(p.name for p in found[:4])
        raise InputModelError(f"{root}: holds {len(found)} GGUF files ({names}); name the one to merge")
    return found[0] if found else None


def gguf_model_dir(ref: str | Path) -> Path | None:
    """The model directory a GGUF reference stands for (built once in the cache), or None when `ref` is not one."""
    file = gguf_file_of(Path(ref))
    return cached_model_dir(file.resolve()) if file is not None else None


def _cache_root() -> Path:
    return cache_dir("gguf")


def cached_model_dir(file: Path) -> Path:
    """$MERGELIB_CACHE/gguf/<key>/: config.json, tokenizer files and a link to `file`; built unless already there
    for this file's path, size and mtime."""
    st = file.stat()
    key = hashlib.sha256(f"{INPUT_VERSION}|{file}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:20]
    target = _cache_root() / f"{file.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        config = gguf_config(file)
        (tmp / file.name).symlink_to(file)
        _write_tokenizer(file, tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        try:
            os.rename(tmp, target)
        except OSError:  # built meanwhile by another process
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_tokenizer(file: Path, out: Path) -> None:
    """The tokenizer files transformers rebuilds from the GGUF's `tokenizer.ggml.*`, else a note saying why not."""
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
        tokenizer.save_pretrained(str(out))
    except Exception as exc:  # transformers raises many kinds for tokenizers it cannot rebuild
        for name in os.listdir(out):
            if name != file.name:
                (out / name).unlink()
        (out / TOKENIZER_ERROR).write_text(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


def check_tokenizer_donor(path: Path, label: str) -> None:
    """Raise when the model whose tokenizer files the merge copies is a GGUF whose tokenizer could not be rebuilt."""
    error = Path(path) / TOKENIZER_ERROR
    if error.is_file():
        raise InputModelError(
            f"model '{label}': a GGUF whose tokenizer transformers cannot rebuild ({error.read_text().strip()}); "
            "make a safetensors model the base/first model"
        )


# ---------------------------------------------------------------- metadata


def _open(file: Path) -> gguf.GGUFReader:
    import gguf

    try:
        return gguf.GGUFReader(str(file), "r")
    except Exception as exc:
        raise InputModelError(f"{file}: not a readable GGUF file ({exc}); re-download it") from None


def _field(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _arch(reader: gguf.GGUFReader, file: Path) -> str:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise InputModelError(
            f"{file}: GGUF architecture '{arch}'; mergelib reads GGUF models of architecture "
            f"{', '.join(SUPPORTED_ARCHS)} only; convert it to safetensors"
        )
    if any(t.name.startswith("rope_freqs.") for t in reader.tensors):
        raise InputModelError(
            f"{file}: scaled rotary embeddings (rope_freqs.weight, Llama 3.1 style) cannot be mapped back to "
            "config.json; convert it to safetensors"
        )
    scaling = _field(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise InputModelError(f"{file}: rope scaling '{scaling}' is not supported for GGUF inputs; convert it to "
                              "safetensors")
    return arch


def _model_dtype(reader: gguf.GGUFReader) -> str:
    """The dtype the config names: float32 when every matrix is F32, float16 / bfloat16 for F16 / BF16 files, else
    bfloat16 (a quantised file's weights were most likely bf16)."""
    types = {t.tensor_type.name for t in reader.tensors if len(t.shape) > 1}
    if types <= {"F32"}:
        return "float32"
    if types <= {"F16", "F32"}:
        return "float16"
    return "bfloat16"


def gguf_config(file: Path) -> dict:
    """A config.json for LlamaForCausalLM from the GGUF metadata (`{arch}.*` and `tokenizer.ggml.*` keys)."""
    reader = _open(file)
    arch = _arch(reader, file)

    def need(key: str):
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise InputModelError(f"{file}: GGUF metadata lacks '{arch}.{key}'; is the file complete?")
        return value

    names = {t.name for t in reader.tensors}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    vocab = len(tokens.data) if tokens is not None else _field(reader, f"{arch}.vocab_size")
    if vocab is None and embed is not None:
        vocab = int(embed.shape[-1])
    if vocab is None:
        raise InputModelError(f"{file}: GGUF has no tokenizer.ggml.tokens and no token_embd.weight; is it complete?")
    n_embd, n_head = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length") or _field(reader, f"{arch}.rope.dimension_count")
                   or n_embd // n_head)
    rope_theta = float(_field(reader, f"{arch}.rope.freq_base", 10000.0))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": n_embd,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv") or n_head),
        "head_dim": head_dim,
        "max_position_embeddings": int(need("context_length")),
        "rms_norm_eps": float(f"{need('attention.layer_norm_rms_epsilon'):.7g}"),  # stored as float32
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_theta": rope_theta, "rope_type": "default"},
        "vocab_size": int(vocab),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": "blk.0.ffn_up.bias" in names,
        "dtype": _model_dtype(reader),
    }
    for special in ("bos", "eos", "pad"):
        value = _field(reader, f"tokenizer.ggml.{special}_token_id" if special != "pad"
                       else "tokenizer.ggml.padding_token_id")
        if value is not None:
            config[f"{special}_token_id"] = int(value)
    return config


# ---------------------------------------------------------------- tensors


def hf_name(gguf_name: str, file: Path) -> str:
    """The Hugging Face Llama name of a GGUF tensor; a one-line error for a tensor the llama layout lacks."""
    match = _BLOCK.match(gguf_name)
    if match and match.group(2) in _LAYER:
        layer, part, suffix = match.groups()
        return f"model.layers.{layer}.{_LAYER[part]}.{suffix}"
    match = _PLAIN.match(gguf_name)
    if match and match.group(1) in _GLOBAL:
        return f"{_GLOBAL[match.group(1)]}.{match.group(2)}"
    raise InputModelError(f"{file}: tensor '{gguf_name}' has no Hugging Face Llama name; mergelib reads dense "
                          "llama GGUF models only; convert it to safetensors")


def gguf_tensors(file: Path) -> tuple[dict[str, tuple[tuple[int, ...], torch.dtype, GgufDequant]], str]:
    """Every tensor of a GGUF file under its Hugging Face name: (shape, dtype, `GgufDequant`), and the note that
    says what is dequantised (header only; no tensor data is read). `mergelib.io.index` makes the ShardIndex."""
    import gguf

    reader = _open(file.resolve())
    arch = _arch(reader, file)
    n_head = int(_field(reader, f"{arch}.attention.head_count") or 0)
    n_head_kv = int(_field(reader, f"{arch}.attention.head_count_kv") or n_head)
    dtype = {"float32": torch.float32, "float16": torch.float16}.get(_model_dtype(reader), torch.bfloat16)
    tensors = {}
    kinds: dict[str, int] = {}
    for t in reader.tensors:
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise InputModelError(
                f"{file}: tensor '{t.name}' is stored as {t.tensor_type.name}; mergelib dequantises GGUF "
                f"{supported_types()} only"
            )
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists the innermost dimension first
        name = hf_name(t.name, file)
        rope = n_head if ".attn_q." in t.name else n_head_kv if ".attn_k." in t.name else None
        byte_shape = (shape if t.tensor_type.name in ("F32", "F16") else
                      gguf.quants.quant_shape_to_byte_shape(shape, t.tensor_type))
        dequant = GgufDequant(t.tensor_type.name, int(t.data_offset), int(t.n_bytes), tuple(byte_shape), rope)
        tensors[name] = (shape, dtype, dequant)
        kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + 1
    said = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
    note = f"model {file.resolve()}: dequantised on read (GGUF {said}); the merge is of dequantised weights"
    return tensors, note


def deinterleave_rope_rows(tensor: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q/k projection (or bias) from llama.cpp's interleaved rotary order back to Hugging Face's
    half-split order, per head: the inverse of `interleave_rope_rows`."""
    half = tensor.shape[0] // n_head // 2
    return tensor.reshape(n_head, half, 2, *tensor.shape[1:]).transpose(1, 2).reshape(tensor.shape)


def _pread(file: Path, offset: int, nbytes: int, name: str) -> np.ndarray:
    out = np.empty(nbytes, dtype=np.uint8)
    view = memoryview(out)
    fd = os.open(file, os.O_RDONLY)
    try:
        done = 0
        while done < nbytes:
            got = os.preadv(fd, [view[done:]], offset + done)
            if got == 0:
                raise InputModelError(f"{file}: ends inside tensor '{name}' (truncated); re-download it")
            done += got
    finally:
        os.close(fd)
    return out


def read_gguf_tensor(name: str, info, start: int = 0, end: int | None = None) -> torch.Tensor:
    """Rows [start, end) (all by default) of tensor `name` of a GGUF input as float32 in Hugging Face shape and row
    order; only those rows' bytes are read, except for q/k projections (rows permuted: read whole)."""
    import gguf

    d: GgufDequant = info.dequant
    qtype = gguf.GGMLQuantizationType[d.qtype]
    rows = info.shape[0] if len(info.shape) > 1 else 1
    end = rows if end is None else min(end, rows)
    if d.rope_heads or len(info.shape) < 2:
        first, last = 0, rows
    else:
        first, last = start, end
    row_bytes = d.nbytes // rows
    raw = _pread(info.file, d.offset + first * row_bytes, (last - first) * row_bytes, name)
    if d.qtype == "F32":
        values = raw.view(np.float32)
    elif d.qtype == "F16":
        values = raw.view(np.float16).astype(np.float32)
    else:
        values = gguf.quants.dequantize(raw.reshape(last - first, *d.byte_shape[1:]), qtype)
    shape = (last - first, *info.shape[1:]) if len(info.shape) > 1 else info.shape
    tensor = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32).reshape(shape))
    if d.rope_heads:
        tensor = deinterleave_rope_rows(tensor, d.rope_heads)
    if (first, last) != (start, end):
        tensor = tensor[start:end]
    return tensor.contiguous()
