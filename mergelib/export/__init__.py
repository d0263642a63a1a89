"""Exports of a merged model: safetensors in another dtype, GGUF (f16/bf16/q8_0/q4_0; K-quants via llama.cpp),
weight-only int8; each verified by reading it back with an independent reader (mergelib.export.check)."""

from mergelib.export.artifact import ExportArtifact
from mergelib.export.bundle import ExportResult, export_all
from mergelib.export.check import DEFAULT_PROMPTS, DEFAULT_THRESHOLDS, compare_logits, verify_export
from mergelib.export.errors import ExportCheckError, ExportError
from mergelib.export.gguf_file import ALL_GGUF_TYPES, GGUF_TYPES, export_gguf
from mergelib.export.int8 import export_int8
from mergelib.export.resave import DTYPES, export_safetensors

__all__ = [
    "DEFAULT_PROMPTS",
    "DEFAULT_THRESHOLDS",
    "DTYPES",
    "ALL_GGUF_TYPES",
    "GGUF_TYPES",
    "ExportArtifact",
    "ExportCheckError",
    "ExportError",
    "ExportResult",
    "compare_logits",
    "export_all",
    "export_gguf",
    "export_int8",
    "export_safetensors",
    "verify_export",
]
