"""Quantised checkpoints as merge inputs: FP8 and MXFP4 tensors dequantised per tensor on read.

FP8: `X.weight` stored as float8_e4m3fn (or e5m2) with `X.weight_scale` (compressed-tensors: one scale per tensor
or per output row) or `X.weight_scale_inv` (DeepSeek-V3 / Qwen3 FP8: one scale per block of rows x columns, the
block from `quantization_config.weight_block_size`, default 128 x 128); the weight is q * scale (DeepSeek's
`scale_inv` multiplies too). A float8 tensor without a scale is q. Activation scales (`X.input_scale`) mean
nothing once the weights are dequantised: they are folded away with the weight they belong to.

MXFP4 (gpt-oss): `X_blocks` (uint8, [..., G, 16]: 32 FP4 E2M1 values per block, the low nibble first) and
`X_scales` (uint8, [..., G]: an E8M0 exponent, 2**(s - 127)) become `X`, laid out as transformers dequantises it
(the last two dimensions swapped for 3-D expert tensors).

Each quantised group becomes one logical tensor whose `TensorInfo.dequant` says how to rebuild it; the engine reads
it as float32 and merges it like any other input. The output is never quantised: its config drops
`quantization_config`, and the card says the merge is of dequantised weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
DEFAULT_BLOCK = (128, 128)


@dataclass(frozen=True)
class Dequant:
    """How one logical tensor is rebuilt from stored ones: kind ("fp8" or "mxfp4"), the stored (name, TensorInfo)
    pairs it reads (fp8: weight and, if any, scale; mxfp4: blocks and scales), and the fp8 scale block."""

    kind: str
    parts: tuple[tuple[str, Any], ...]
    block: tuple[int, int] | None = None

    def describe(self) -> str:
        if self.kind == "mxfp4":
            return "MXFP4 (E2M1 values, E8M0 block scales)"
        if len(self.parts) == 1:
            return "FP8 without scales"
        return f"FP8 with {self.block[0]}x{self.block[1]} block scales" if self.block else "FP8 with scales"

    def read(self, name: str, info: Any, start: int, end: int | None, read_stored: Callable) -> torch.Tensor:
        """Rows [start, end) of the dequantised tensor (the whole tensor is rebuilt, then sliced);
        `read_stored(name, info)` reads a stored part."""
        return dequantize(self, read_stored)[start:end]


def _block_size(config: dict, weight_shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> tuple[int, int]:
    """The rows x columns each scale covers: the config's weight_block_size (which must fit); without one,
    128 x 128 when that fits, else the size that tiles the weight with the scale's grid."""
    wanted = (config.get("quantization_config") or {}).get("weight_block_size")
    candidates = [tuple(wanted)] if wanted else \
        [DEFAULT_BLOCK, tuple(-(-w // max(1, s)) for w, s in zip(weight_shape, scale_shape))]
    for block in candidates:
        if all(-(-w // b) == s for w, b, s in zip(weight_shape, block, scale_shape)):
            return int(block[0]), int(block[1])
    raise ValueError(f"scale grid {list(scale_shape)} does not tile a weight of shape {list(weight_shape)}")


def fold(tensors: dict[str, Any], config: dict, where: str) -> tuple[dict[str, Any], str | None]:
    """Replace every quantised group of stored tensors by one logical tensor (float dtype of the model, `dequant`
    set); (the tensors, a one-line note saying what was dequantised, or None when nothing was)."""
    out = dict(tensors)
    kinds: dict[str, int] = {}
    model_dtype = _model_dtype(config)
    for name, info in tensors.items():
        if info.dtype in FP8_DTYPES:
            parts = [(name, info)]
            for suffix in ("_scale", "_scale_inv"):
                if name + suffix in tensors:
                    parts.append((name + suffix, tensors[name + suffix]))
                    out.pop(name + suffix, None)
            block = None
            if len(parts) == 2:
                scale_shape = parts[1][1].shape
                if len(scale_shape) == 2 and len(info.shape) == 2 and tuple(scale_shape) != (info.shape[0], 1):
                    try:
                        block = _block_size(config, info.shape, scale_shape)
                    except ValueError as exc:
                        from mergelib.errors import InputModelError

                        raise InputModelError(f"{where}: tensor '{name}': {exc}; is the checkpoint complete?") from None
            stem = name.rsplit(".", 1)[0]
            out.pop(stem + ".input_scale", None)
            dequant = Dequant("fp8", tuple(parts), block)
            out[name] = replace(info, dtype=model_dtype, data_offset=None, dequant=dequant)
        elif name.endswith("_blocks") and info.dtype == torch.uint8 and name[:-7] + "_scales" in tensors:
            scales = tensors[name[:-7] + "_scales"]
            *prefix, groups, width = info.shape
            shape = (*prefix, groups * width * 2)
            if len(shape) == 3:
                shape = (shape[0], shape[2], shape[1])
            dequant = Dequant("mxfp4", ((name, info), (name[:-7] + "_scales", scales)))
            out.pop(name)
            out.pop(name[:-7] + "_scales")
            out[name[:-7]] = replace(info, shape=tuple(shape), dtype=model_dtype, data_offset=None, dequant=dequant)
        else:
            continue
        kinds[dequant.describe()] = kinds.get(dequant.describe(), 0) + 1
    if not kinds:
        return tensors, None
    said = ", ".join(f"{n} tensor{'s' if n > 1 else ''} {kind}" for kind, n in sorted(kinds.items()))
    return out, f"{where}: dequantised on read ({said}); the merge is of dequantised weights"


def _model_dtype(config: dict) -> torch.dtype:
    """The float dtype a dequantised tensor is written in unless the recipe says otherwise: the model's own."""
    name = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16").replace("torch.", "")
    return {"float16": torch.float16, "float32": torch.float32}.get(name, torch.bfloat16)


def dequantize(dequant: Dequant, read: Callable[[str, Any], torch.Tensor]) -> torch.Tensor:
    """The float32 values of one logical tensor; `read(name, info)` gives a stored tensor as stored."""
    if dequant.kind == "fp8":
        (name, info), *scale = dequant.parts
        values = read(name, info).to(torch.float32)
        if not scale:
            return values
        s = read(*scale[0]).to(torch.float32)
        if dequant.block is not None:
            rows, cols = dequant.block
            s = s.repeat_interleave(rows, 0)[: values.shape[0]].repeat_interleave(cols, 1)[:, : values.shape[1]]
        elif s.numel() == 1:
            s = s.reshape(())
        else:
            s = s.reshape(values.shape[0], *([1] * (values.dim() - 1)))  # one scale per output row
        return values * s
    (blocks_name, blocks_info), (scales_name, scales_info) = dequant.parts
    blocks = read(blocks_name, blocks_info)
    exponents = read(scales_name, scales_info).to(torch.int32) - 127
    lut = torch.tensor(FP4_E2M1, dtype=torch.float32)
    *prefix, groups, width = blocks.shape
    values = torch.empty((*prefix, groups, width * 2), dtype=torch.float32)
    values[..., 0::2] = lut[(blocks & 0x0F).to(torch.int64)]
    values[..., 1::2] = lut[(blocks >> 4).to(torch.int64)]
    values = torch.ldexp(values, exponents.unsqueeze(-1).to(torch.float32)).reshape(*prefix, groups * width * 2)
    return values.transpose(1, 2).contiguous() if values.dim() == 3 else values


def stored_bytes(dequant: Dequant) -> int:
    """Bytes read from disk to rebuild the tensor."""
    return sum(math.prod(info.shape) * info.dtype.itemsize for _, info in dequant.parts)
