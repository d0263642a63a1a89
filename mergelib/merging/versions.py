"""The versions of the libraries that shape output bytes, recorded wherever bytes are produced: the merge's run
record and model card, the demo family's family.json, the fetch stage's lock.json."""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

MERGE_LIBRARIES = ("mergelib", "torch", "safetensors", "numpy", "numba")  # the merge math and the files it writes
TRAINING_LIBRARIES = ("torch", "transformers", "tokenizers", "numpy", "safetensors")  # a family trained here


def package_versions(names: Sequence[str]) -> dict[str, str]:
    """name -> installed version ("unknown" when it is not installed)."""
    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "unknown"
    return out
