"""Weight-only int8 in the compressed-tensors format (`naive-quantized`, W8A16, channel-wise, symmetric).

Each linear weight W (out, in) but lm_head is stored as int8 Q with a float32 scale per output row,
s_r = max_j |W_rj| / 127 and Q_rj = round(W_rj / s_r) clipped to [-127, 127], so W ~ Q_rj * s_r (vector-wise
absmax quantization, Dettmers et al. 2022, arXiv 2208.07339, without its outlier split). The tensors are named
and described the way compressed-tensors (https://github.com/vllm-project/compressed-tensors) stores them, so
transformers (with the `compressed-tensors` package) and vLLM load the directory with plain `from_pretrained`;
without that package transformers refuses it instead of misreading int8 as weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mergelib.export.artifact import ExportArtifact, artifact_for
from mergelib.export.errors import ExportError
from mergelib.export.resave import copy_side_files, group_slots, write_config, write_shards
from mergelib.export.staging import staged_dir
from mergelib.io.index import index_model, read_config
from mergelib.io.reader import read_tensor
from mergelib.io.writer import TensorSlot

SCALE_SUFFIX = "_scale"  # "<module>.weight" (int8) is paired with "<module>.weight_scale" (float32, (out, 1))
KEEP_FLOAT = ("lm_head",)  # the logits layer stays in float, as compressed-tensors W8A16 recipes do
QUANTIZATION_CONFIG = {
    "quant_method": "compressed-tensors",
    "format": "naive-quantized",
    "quantization_status": "compressed",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False},
            "input_activations": None,
            "output_activations": None,
            "format": "naive-quantized",
        }
    },
    "ignore": list(KEEP_FLOAT),
    "kv_cache_scheme": None,
}


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, float32 per-row scales (out,)) of a 2-D weight; an all-zero row gets scale 1."""
    w = weight.float()
    amax = w.abs().amax(dim=1)  # (out,)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Q * s per row, in `dtype`."""
    return (q.to(torch.float32) * scale.reshape(-1, 1).to(torch.float32)).to(dtype)


def is_quantized(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
    """Linear weights: 2-D floating `.weight` tensors other than embeddings and lm_head."""
    return (len(shape) == 2 and dtype.is_floating_point and name.endswith(".weight") and "embed" not in name
            and name.split(".")[0] not in KEEP_FLOAT)


def export_int8(model_dir: str | Path, out_dir: str | Path, *, shard_size: int = 5_000_000_000,
                tokenizer_dir: str | Path | None = None) -> ExportArtifact:
    """Write `out_dir`: linear weights as int8 + per-row scales, everything else as stored, streamed per tensor."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    index = index_model(model_dir)
    config = read_config(model_dir)
    if "quantization_config" in config:
        raise ExportError(f"{model_dir}/config.json: the model is already quantized "
                          f"({config['quantization_config'].get('quant_method')}); export from a float model")
    slots, quantized = [], set()
    for name, info in sorted(index.tensors.items()):
        if is_quantized(name, info.shape, info.dtype):
            quantized.add(name)
            slots.append(TensorSlot(name, info.shape, torch.int8))
            slots.append(TensorSlot(name + SCALE_SUFFIX, (info.shape[0], 1), torch.float32))
        else:
            slots.append(TensorSlot(name, info.shape, info.dtype))
    if not quantized:
        raise ExportError(f"{model_dir}: no linear weights to quantize")
    config["quantization_config"] = QUANTIZATION_CONFIG
    pending: dict[str, torch.Tensor] = {}

    def produce(name: str) -> torch.Tensor:
        # a weight and its scale are adjacent slots: quantize once, hand out the scale next
        if name in pending:
            return pending.pop(name)
        tensor = read_tensor(name, index.tensors[name])
        if name not in quantized:
            return tensor
        q, scale = quantize_rows(tensor)
        pending[name + SCALE_SUFFIX] = scale[:, None]
        return q

    with staged_dir(out_dir, marker="config.json") as staged:
        write_shards(staged, group_slots(slots, shard_size), produce)
        write_config(staged, config)
        copy_side_files(model_dir, Path(tokenizer_dir) if tokenizer_dir else None, staged)
    return artifact_for("safetensors", "int8", out_dir)
