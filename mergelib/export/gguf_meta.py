"""Model metadata and tensor layout for GGUF, following llama.cpp's conventions (GGUF spec:
https://github.com/ggml-org/ggml/blob/master/docs/gguf.md).

Llama and Mistral are written as llama.cpp's `llama` architecture, whose rotary embedding pairs adjacent
dimensions: the q/k projection rows are permuted from Hugging Face's half-split order to interleaved order (the
permutation llama.cpp's converter applies and every GGUF reader undoes). Qwen2/Qwen3 rotate half-split and keep
their rows as stored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import gguf
import torch

from mergelib.export.errors import ExportError

# transformers model_type -> llama.cpp architecture
GGUF_ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
IGNORED_TENSORS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
BLOCK = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class GgufModel:
    """What GGUF needs to know about one checkpoint: its architecture and hyperparameters."""

    arch: str  # llama.cpp architecture name
    model_type: str  # transformers model_type
    n_layers: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    context_length: int
    rms_eps: float
    rope_theta: float
    vocab_size: int
    notes: tuple[str, ...] = ()


def _rope_theta(config: dict) -> float:
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type != "default":
        raise ExportError(
            f"config.json rope type '{rope_type}': this GGUF exporter writes plain rotary embeddings only, and "
            "transformers' GGUF reader could not verify scaled ones; export safetensors instead"
        )
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def describe(config: dict) -> GgufModel:
    """Check a config.json is exportable and collect its GGUF hyperparameters."""
    model_type = config.get("model_type")
    if model_type not in GGUF_ARCHS:
        raise ExportError(
            f"config.json model_type '{model_type}': GGUF export supports {', '.join(sorted(GGUF_ARCHS))}; "
            "export safetensors instead"
        )
    n_head = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // n_head)
    notes = []
    window = config.get("sliding_window")
    if model_type == "mistral" and window and window < config["max_position_embeddings"]:
        notes.append(f"sliding_window {window} is not stored: llama.cpp runs Mistral as llama with full attention")
    return GgufModel(
        arch=GGUF_ARCHS[model_type],
        model_type=model_type,
        n_layers=int(config["num_hidden_layers"]),
        n_embd=int(config["hidden_size"]),
        n_ff=int(config["intermediate_size"]),
        n_head=n_head,
        n_head_kv=int(config.get("num_key_value_heads") or n_head),
        head_dim=head_dim,
        context_length=int(config["max_position_embeddings"]),
        rms_eps=float(config["rms_norm_eps"]),
        rope_theta=_rope_theta(config),
        vocab_size=int(config["vocab_size"]),
        notes=tuple(notes),
    )


def write_hparams(writer: gguf.GGUFWriter, model: GgufModel) -> None:
    """The `{arch}.*` keys llama.cpp reads to build the graph (transformers reads the same keys back)."""
    writer.add_context_length(model.context_length)
    writer.add_embedding_length(model.n_embd)
    writer.add_block_count(model.n_layers)
    writer.add_feed_forward_length(model.n_ff)
    writer.add_head_count(model.n_head)
    writer.add_head_count_kv(model.n_head_kv)
    writer.add_layer_norm_rms_eps(model.rms_eps)
    writer.add_rope_freq_base(model.rope_theta)
    writer.add_rope_dimension_count(model.head_dim)
    writer.add_key_length(model.head_dim)
    writer.add_value_length(model.head_dim)
    writer.add_vocab_size(model.vocab_size)


def gguf_names(model: GgufModel, names: list[str]) -> dict[str, str]:
    """Hugging Face tensor name -> GGUF name, via the gguf package's mapping; buffers like inv_freq dropped."""
    mapping = gguf.get_tensor_name_map(gguf.MODEL_ARCH[model.arch.upper()], model.n_layers)
    out = {}
    for name in names:
        if IGNORED_TENSORS.search(name):
            continue
        stem, _, suffix = name.rpartition(".")
        mapped = mapping.get_name(stem) if suffix in ("weight", "bias") else None
        if mapped is None:
            raise ExportError(f"tensor '{name}': no GGUF name for it in the {model.arch} layout; export safetensors")
        out[name] = f"{mapped}.{suffix}"
    return out


def tensor_order(gguf_name: str) -> tuple:
    """llama.cpp's order: token_embd, blocks by number, then output_norm and output."""
    match = BLOCK.match(gguf_name)
    if match:
        return (1, int(match.group(1)), gguf_name)
    rank = {"token_embd": 0, "output_norm": 2, "output": 3}.get(gguf_name.split(".")[0], 2)
    return (rank, 0, gguf_name)


def interleave_rope_rows(tensor: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q/k projection (or bias) from half-split rotary order to interleaved order, per head.

    Within a head of d rows, row i of the first half and row i of the second half become rows 2i and 2i+1.
    """
    rows = tensor.shape[0]
    half = rows // n_head // 2
    # (n_head, 2, half, ...) -> (n_head, half, 2, ...): halves interleaved pairwise
    return tensor.reshape(n_head, 2, half, *tensor.shape[1:]).transpose(1, 2).reshape(tensor.shape)


def prepare(model: GgufModel, gguf_name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The tensor as the GGUF layout stores it (q/k rows interleaved for the llama architecture)."""
    if model.arch == "llama" and ".attn_q." in gguf_name:
        return interleave_rope_rows(tensor, model.n_head)
    if model.arch == "llama" and ".attn_k." in gguf_name:
        return interleave_rope_rows(tensor, model.n_head_kv)
    return tensor
