"""Input formats and references: PyTorch .bin checkpoints (weights_only), Hub ids from the local cache."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import mergelib
from mergelib.errors import InputModelError
from mergelib.io.hub import resolve_model


def to_bin(src, dst):
    """A copy of model `src` stored as a single pytorch_model.bin."""
    dst.mkdir()
    state = {}
    for shard in sorted(src.glob("*.safetensors")):
        state.update(load_file(shard))
    torch.save(state, dst / "pytorch_model.bin")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    return dst


def shards_digest(path):
    merged = {}
    for shard in sorted(path.glob("*.safetensors")):
        merged.update(load_file(shard))
    return {k: hashlib.sha256(v.float().numpy().tobytes()).hexdigest() for k, v in merged.items()}


def test_bin_inputs_merge_like_safetensors(tiny_family, tmp_path):
    ft_bin = to_bin(tiny_family.finetunes[0], tmp_path / "ft_bin")
    def recipe(ft):
        return {"merge_method": "ties", "base_model": str(tiny_family.base),
                "models": [{"model": str(ft), "parameters": {"weight": 1.0, "density": 0.5}}]}
    mergelib.merge(recipe(tiny_family.finetunes[0]), tmp_path / "a", quiet=True)
    mergelib.merge(recipe(ft_bin), tmp_path / "b", quiet=True)
    assert shards_digest(tmp_path / "a") == shards_digest(tmp_path / "b")


def test_bin_with_code_is_refused(tmp_path, tiny_family):
    evil = tmp_path / "evil"
    evil.mkdir()
    shutil.copy(tiny_family.base / "config.json", evil / "config.json")

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model.embed_tokens.weight": torch.zeros(2), "x": Payload()}, evil / "pytorch_model.bin")
    with pytest.raises(InputModelError, match="weights_only=True"):
        mergelib.plan_merge({"merge_method": "linear", "models": [{"model": str(evil), "parameters": {"weight": 1}}]})


def test_hub_id_resolves_from_the_offline_cache(tiny_family, tmp_path, monkeypatch):
    # Lay out the Hugging Face cache as huggingface_hub does: refs/<rev> -> snapshots/<sha>/files
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / sha
    shutil.copytree(tiny_family.base, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_model("org/tiny") == snapshot
    assert resolve_model("org/tiny", revision=sha) == snapshot
    with pytest.raises(InputModelError, match="org/missing.*not in the local Hugging Face cache"):
        resolve_model("org/missing")
    with pytest.raises(InputModelError, match="not a Hub id"):
        resolve_model("../escape/../x")
    plan = mergelib.plan_merge({"merge_method": "linear", "models": [{"model": "org/tiny@main", "parameters": {"weight": 1}}]})
    assert plan.models[0].path == snapshot and json.loads((snapshot / "config.json").read_text())
