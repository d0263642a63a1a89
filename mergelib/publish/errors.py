"""Errors of the publish stage: what the user can fix (login, tag taken, bad repo id), in one line."""

from __future__ import annotations

from mergelib.errors import MergelibError


class PublishError(MergelibError):
    """Publishing to the Hub or registering in MLflow was refused or failed; nothing was tagged."""
