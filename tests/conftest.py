"""Shared fixtures: offline environment, a tiny model family built once per session."""

from __future__ import annotations

import os
import tempfile

os.environ["MERGELIB_CACHE"] = tempfile.mkdtemp(prefix="mergelib-test-cache-")  # never the user's home
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# The same examples on every run (a red CI is always reproducible) and no deadlines on a shared 2-core machine.
# `HYPOTHESIS_PROFILE=explore` draws fresh examples when hunting for new counterexamples.
settings.register_profile("deterministic", derandomize=True, deadline=None)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    """A tiny Llama family: base + 2 fine-tunes with sign-conflicting deltas, 2+ shards each."""
    from mergelib.families.tiny import make_family

    return make_family(tmp_path_factory.mktemp("family"), size="tiny", n_finetunes=2, seed=0)
