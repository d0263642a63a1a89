"""Errors a user can act on. Each message names the field or file and the fix; the CLI maps them to exit 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MergelibError(Exception):
    """Base of every error mergelib raises on purpose (bad input, not a bug). Exit code 2."""

    exit_code = 2

    def __init__(self, message: object = ""):
        # one line, always: messages quote user text and library errors that may hold newlines
        super().__init__(" ".join(str(message).split()))


class RecipeError(MergelibError):
    """The recipe (YAML or dict) is malformed: unknown key, bad value, missing parameter."""


class InputModelError(MergelibError):
    """An input model is missing, unreadable, or incompatible with the others."""


class ConfigError(MergelibError):
    """The pipeline configuration (conf/, params.yaml or an override) is invalid."""


class OutputError(MergelibError):
    """The output directory cannot be written."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return " (did you mean 'x'?)" for the closest choice, or "" when nothing is close."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
