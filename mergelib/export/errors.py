"""Errors of the export stage: a model we cannot export, and an export that fails its read-back check."""

from __future__ import annotations

from mergelib.errors import MergelibError


class ExportError(MergelibError):
    """The model (architecture, rope scaling, tokenizer) cannot be exported in the asked format, or the output
    cannot be written."""


class ExportCheckError(ExportError):
    """An export loaded back disagrees with its source beyond the format's threshold."""
