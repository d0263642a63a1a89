"""Write a GGUF file (f16, bf16, q8_0, q4_0) with the gguf package's writer, streamed one tensor at a time; the
K-quants (q4_k_m, q5_k_m, q6_k) are that f16 file quantized by llama.cpp's own quantizer (mergelib.export.llamacpp).

All tensor infos are declared first (their byte sizes follow from shape and type), the header, metadata and
tensor table are written, then each tensor is read, laid out for llama.cpp, quantized with `gguf.quants` and
appended. Memory holds one tensor. Type policy follows llama.cpp's converter: 1-D tensors (norms, biases) stay
F32; a matrix whose rows do not split into 32-wide blocks falls back to F16.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from mergelib.export.artifact import ExportArtifact, artifact_for
from mergelib.export.errors import ExportError
from mergelib.export.gguf_meta import describe, gguf_names, prepare, tensor_order, write_hparams
from mergelib.export.gguf_vocab import read_vocab, write_vocab
from mergelib.export.llamacpp import K_QUANTS, quantize
from mergelib.export.staging import staged_file
from mergelib.io.index import index_model, read_config
from mergelib.io.reader import read_tensor

Q = gguf.GGMLQuantizationType
GGUF_TYPES = {
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
ALL_GGUF_TYPES = (*GGUF_TYPES, *K_QUANTS)  # what export_gguf writes; the K-quants need the llamacpp extra


class _Writer(gguf.GGUFWriter):
    """GGUFWriter that can store an empty typed array (the spec allows it; the writer refuses it)."""

    def _pack_val(self, val, vtype, add_vtype, sub_type=None):  # noqa: ANN001 - the base class's signature
        if vtype == gguf.GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
            head = self._pack("I", vtype) if add_vtype else b""
            return head + self._pack("I", sub_type) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type)


@dataclass(frozen=True)
class PlannedTensor:
    source: str  # Hugging Face name
    name: str  # GGUF name
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType


def tensor_type(shape: tuple[int, ...], wanted: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """The GGML type one tensor is stored in when the file's type is `wanted`."""
    if len(shape) < 2:
        return Q.F32
    block, _ = gguf.GGML_QUANT_SIZES[wanted]
    if shape[-1] % block:
        return Q.F16
    return wanted


def encode(array: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """float32 array -> the bytes (or f16/f32 values) GGUF stores for it."""
    if qtype == Q.F32:
        return np.ascontiguousarray(array, dtype=np.float32)
    return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)


def _declare(writer: gguf.GGUFWriter, item: PlannedTensor) -> None:
    if item.qtype in (Q.F32, Q.F16):
        dtype = np.float32 if item.qtype == Q.F32 else np.float16
        nbytes = int(np.prod(item.shape)) * np.dtype(dtype).itemsize
        writer.add_tensor_info(item.name, item.shape, np.dtype(dtype), nbytes)
    else:
        byte_shape = gguf.quants.quant_shape_to_byte_shape(item.shape, item.qtype)
        writer.add_tensor_info(item.name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                               raw_dtype=item.qtype)


def export_gguf(model_dir: str | Path, out_file: str | Path, *, gguf_type: str = "q8_0",
                tokenizer_dir: str | Path | None = None, name: str | None = None, threads: int = 1) -> ExportArtifact:
    """Write the model of `model_dir` (Llama, Mistral, Qwen2, Qwen3) to `out_file` as GGUF `gguf_type`
    (K-quants: an f16 file quantized by llama.cpp with `threads` threads)."""
    if gguf_type not in ALL_GGUF_TYPES:
        raise ExportError(f"gguf type '{gguf_type}': choose one of {', '.join(ALL_GGUF_TYPES)}")
    out_file = Path(out_file)
    if gguf_type in K_QUANTS:
        from mergelib.export.llamacpp import require

        require(f"GGUF {gguf_type.upper()}")  # before minutes of f16 writing
        with staged_file(out_file) as tmp, tempfile.TemporaryDirectory(dir=tmp.parent, prefix=".f16-") as scratch:
            notes = _write(model_dir, Path(scratch) / "f16.gguf", "f16", tokenizer_dir, name)
            notes += quantize(Path(scratch) / "f16.gguf", tmp, gguf_type, threads)
    else:
        with staged_file(out_file) as tmp:
            notes = _write(model_dir, tmp, gguf_type, tokenizer_dir, name)
    return artifact_for("gguf", gguf_type, out_file, notes)


def _write(model_dir: str | Path, path: Path, gguf_type: str, tokenizer_dir: str | Path | None,
           name: str | None) -> tuple[str, ...]:
    """Write GGUF `gguf_type` (a GGUF_TYPES key) to `path`; returns the notes of the model and its vocabulary."""
    model_dir = Path(model_dir)
    wanted, file_type = GGUF_TYPES[gguf_type]
    config = read_config(model_dir)
    model = describe(config)
    vocab = read_vocab(Path(tokenizer_dir) if tokenizer_dir else model_dir, config)
    index = index_model(model_dir)
    mapping = gguf_names(model, list(index.tensors))
    plan = sorted((PlannedTensor(src, dst, index.tensors[src].shape, tensor_type(index.tensors[src].shape, wanted))
                   for src, dst in mapping.items()), key=lambda p: tensor_order(p.name))
    title = name or model_dir.resolve().name
    if title.lower() == "mistral":  # transformers reads a file named exactly "mistral" as a separate architecture
        title = "mistral-merge"
    writer = _Writer(path, model.arch)
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(title)
        writer.add_file_type(int(file_type))
        if wanted not in (Q.F16, Q.BF16):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_hparams(writer, model)
        write_vocab(writer, vocab)
        for item in plan:
            _declare(writer, item)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for item in plan:
            tensor = read_tensor(item.source, index.tensors[item.source]).to(torch.float32)
            data = encode(prepare(model, item.name, tensor).numpy(), item.qtype)
            writer.write_tensor_data(data)
    finally:
        writer.close()
    return model.notes + tuple(vocab.notes)
