"""The thin steps after the merge: tokenizer check and copy, safetensors export in a dtype, publish manifest."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from mergelib.errors import InputModelError, OutputError
from mergelib.pipeline_steps import collect_tokenizer, export_safetensors, publish


def tensors_of(model_dir) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_collect_tokenizer_copies_checked_files(tiny_family, tmp_path):
    out = tmp_path / "tok"
    report = collect_tokenizer(tiny_family.base, out)
    assert report["tokens"] == report["model_vocab_size"] == 260  # 4 specials + 256 bytes
    assert set(report["files"]) == {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    for name, digest in report["files"].items():
        assert sha(out / name) == sha(tiny_family.base / name) == digest
    assert json.loads((out / "tokenizer_report.json").read_text()) == report


def test_collect_tokenizer_refuses_a_vocabulary_larger_than_the_embeddings(tiny_family, tmp_path):
    model = shutil.copytree(tiny_family.base, tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "vocab_size": 100}))
    with pytest.raises(InputModelError, match="260 tokens but the model embeds 100"):
        collect_tokenizer(model, tmp_path / "tok")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (model / name).unlink()
    with pytest.raises(InputModelError, match="no tokenizer files"):
        collect_tokenizer(model, tmp_path / "tok")
    assert not (tmp_path / "tok").exists()


@pytest.mark.parametrize(("dtype", "shard_size"), [("bfloat16", 5_000_000_000), ("float16", 60_000)])
def test_export_casts_every_tensor_and_shards(tiny_family, tmp_path, dtype, shard_size):
    collect_tokenizer(tiny_family.base, tmp_path / "tok")
    out = tmp_path / "export"
    info = export_safetensors(tiny_family.base, tmp_path / "tok", out, dtype, shard_size)
    source, exported = tensors_of(tiny_family.base), tensors_of(out)
    assert exported.keys() == source.keys()
    for name, tensor in source.items():
        assert exported[name].dtype == getattr(torch, dtype)
        assert torch.equal(exported[name], tensor.to(getattr(torch, dtype)))
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) == info["shards"] and (len(shards) > 1) == (shard_size < 1_000_000)
    if len(shards) > 1:
        weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
        assert {n: (out / f).is_file() for n, f in weight_map.items()} == dict.fromkeys(source, True)
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == dtype
    assert (out / "tokenizer.json").is_file() and not (out / "tokenizer_report.json").exists()
    assert info["files"] == {p.name: sha(p) for p in out.iterdir()}
    again = export_safetensors(tiny_family.base, tmp_path / "tok", tmp_path / "again", dtype, shard_size)
    assert again["files"] == info["files"]  # same input, same bytes


def test_exported_model_loads_in_transformers(tiny_family, tmp_path):
    from transformers import AutoModelForCausalLM

    collect_tokenizer(tiny_family.base, tmp_path / "tok")
    export_safetensors(tiny_family.base, tmp_path / "tok", tmp_path / "export", "bfloat16", 60_000)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert model.dtype == torch.bfloat16
    ref = AutoModelForCausalLM.from_pretrained(tiny_family.base, dtype=torch.bfloat16)
    ids = torch.tensor([[1, 40, 41, 42]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_publish_none_lists_what_would_be_uploaded(tiny_family, tmp_path):
    manifest = publish(tiny_family.base, tmp_path / "pub", "none")
    assert manifest["target"] == "none" and "commit" not in manifest
    files = {p.name: {"sha256": sha(p), "bytes": p.stat().st_size} for p in tiny_family.base.iterdir()}
    assert manifest["files"] == files
    assert json.loads((tmp_path / "pub" / "manifest.json").read_text()) == manifest


def test_publish_errors(tmp_path, monkeypatch):
    with pytest.raises(InputModelError, match="run the export stage first"):
        publish(tmp_path / "missing", tmp_path / "pub", "none")
    (tmp_path / "export").mkdir()
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OutputError, match="HF_HUB_OFFLINE is set"):
        publish(tmp_path / "export", tmp_path / "pub", "hub", repo_id="me/merged")
    assert not (tmp_path / "pub").exists()
