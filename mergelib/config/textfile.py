"""Reading the text files users hand us (recipes, MoE configs, params.yaml, lock files, tokenizer.json): a path
that exists is a file to read whatever its name; a directory, an unreadable file or bytes that are not UTF-8 are one
line naming the file and what to do, raised as the caller's error type."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from mergelib.errors import MergelibError

CONFIG_LIMIT = 16 << 20  # a recipe, MoE config or params.yaml past this is not one (a checkpoint given by mistake)
JSON_LIMIT = 512 << 20  # tokenizer.json of the largest vocabularies is tens of MB


def read_text(path: str | Path, what: str, error: type[MergelibError] = MergelibError,
              limit: int = JSON_LIMIT) -> str:
    """The UTF-8 text of file `path`; `what` names it in errors ("the recipe", "the lock file"). A file larger
    than `limit` bytes is refused before it is read."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{path}: is a directory; give the path of {what} file")
    try:
        size = path.stat().st_size
        if size > limit:
            raise error(f"{path}: {size / 1e6:.0f} MB is too large for {what} (a text file of at most "
                        f"{limit >> 20} MiB); check the path")
        data = path.read_bytes()
    except OSError as exc:
        raise error(f"{path}: cannot read {what} ({exc.strerror}); check the path") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(
            f"{path}: {what} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "save it as UTF-8"
        ) from None


def yaml_documents(text: str, label: str, error: type[MergelibError] = MergelibError) -> list[Any]:
    """The non-empty YAML documents of `text`; invalid YAML is one line with its line and column."""
    try:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise error(f"{label}: invalid YAML{at}: {getattr(exc, 'problem', exc)}") from None


def parse_json(text: str, label: str, error: type[MergelibError], fix: str) -> Any:
    """JSON `text`, or one line naming `label`, the position and `fix`."""
    try:
        return json.loads(text)
    except ValueError as exc:
        detail = f"line {exc.lineno}, column {exc.colno}: {exc.msg}" if hasattr(exc, "lineno") else str(exc)
        raise error(f"{label}: invalid JSON ({detail}); {fix}") from None


def read_json(path: str | Path, what: str, error: type[MergelibError], fix: str) -> Any:
    """The JSON content of file `path` (read as `read_text` does); `fix` says what to do when it is not JSON."""
    return parse_json(read_text(path, what, error), str(path), error, fix)


def looks_like_path(text: str) -> bool:
    """Whether a one-line string argument names a file rather than holding YAML text: it exists, or it ends in a
    YAML extension (any case)."""
    if "\n" in text:
        return False
    try:
        exists = Path(text).exists()
    except (OSError, ValueError):  # a name too long, or holding NUL: not a path
        exists = False
    return exists or text.lower().endswith((".yml", ".yaml"))
