"""Fetch: local directories hashed, Hub ids resolved to a commit through the (offline) HF cache, the demo family
built, a lock written only when every input is there, and a merge refused when locked bytes changed."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from mergelib.config.compose import compose
from mergelib.config.run import run_config
from mergelib.errors import InputModelError
from mergelib.io.hashing import hash_model_dir
from mergelib.pipeline.fetch import LOCK_NAME, fetch_inputs, pinned_refs, read_lock

REPO = Path(__file__).resolve().parents[1]
SHA = "0123456789abcdef0123456789abcdef01234567"


def write_model(path: Path, payload: bytes) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "llama"}\n')
    (path / "model.safetensors").write_bytes(payload)
    (path / ".cache").mkdir()
    (path / ".cache" / "ignored").write_text("download metadata")
    return path


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline Hugging Face cache holding org/model at commit SHA, reachable as `main` and by sha."""
    import huggingface_hub.constants as constants

    repo = tmp_path / "hub" / "models--org--model"
    snapshot = repo / "snapshots" / SHA
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text('{"model_type": "llama"}\n')
    (snapshot / "model.safetensors").write_bytes(b"hub weights")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return snapshot


def test_sha256_golden_and_independent(tmp_path):
    model = write_model(tmp_path / "m", b"abc")
    digests = hash_model_dir(model)
    assert digests["model.safetensors"] == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert digests["config.json"] == hashlib.sha256((model / "config.json").read_bytes()).hexdigest()
    assert set(digests) == {"config.json", "model.safetensors"}  # hidden .cache/ is not part of the model


def test_local_directories_are_locked_in_place(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_model(tmp_path / "base", b"base")
    write_model(tmp_path / "ft", b"fine-tune")
    locked = fetch_inputs(["base", "ft"], "models/t")
    assert [m.kind for m in locked.values()] == ["local", "local"]
    assert locked["ft"].engine_ref == "ft" and locked["ft"].path == "ft" and locked["ft"].revision is None
    assert locked["ft"].files["model.safetensors"] == hashlib.sha256(b"fine-tune").hexdigest()
    on_disk = json.loads((tmp_path / "models/t" / LOCK_NAME).read_text())
    assert [m["ref"] for m in on_disk["models"]] == ["base", "ft"]
    assert read_lock(tmp_path / "models/t" / LOCK_NAME) == locked


@pytest.mark.parametrize("ref", ["org/model", "org/model@main", f"org/model@{SHA}"])
def test_hub_reference_resolves_to_its_commit(hub_cache, tmp_path, ref):
    locked = fetch_inputs([ref], tmp_path / "out")[ref]
    assert locked.kind == "hub" and locked.revision == SHA
    assert locked.engine_ref == f"org/model@{SHA}"  # a rebuild reads this commit, whatever `main` is later
    assert Path(locked.path) == hub_cache
    assert locked.files["model.safetensors"] == hashlib.sha256(b"hub weights").hexdigest()


def test_offline_without_cache_names_every_missing_model_and_keeps_the_old_lock(hub_cache, tmp_path):
    out = tmp_path / "out"
    fetch_inputs(["org/model"], out)
    before = (out / LOCK_NAME).read_bytes()
    refs = ["org/model", "org/absent@v1", "org/other"]
    with pytest.raises(InputModelError) as err:
        fetch_inputs(refs, out)
    message = str(err.value)
    assert "\n" not in message and "'org/absent@v1'" in message and "HF_HUB_OFFLINE=1" in message
    assert "1 more" in message and "org/other" in message
    assert (out / LOCK_NAME).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub", "out"]  # no half-built sibling left


def test_not_a_directory_nor_a_hub_id(tmp_path):
    with pytest.raises(InputModelError, match="no such directory, and not a Hub id"):
        fetch_inputs(["./missing/dir"], tmp_path / "out")


def test_tiny_family_is_built_deterministically(tmp_path, monkeypatch, tiny_family):
    monkeypatch.chdir(tmp_path)
    config = run_config(compose(["models=tiny"], REPO / "conf"))
    locked = fetch_inputs(config.input_refs(), config.paths.models, config.models)
    assert list(locked) == ["models/tiny/base", "models/tiny/ft1", "models/tiny/ft2"]
    # same arguments as the session family (tests/conftest.py): the same bytes, hashed independently
    for ref, model_dir in zip(locked, (tiny_family.base, *tiny_family.finetunes)):
        expected = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in model_dir.iterdir() if p.is_file()}
        assert locked[ref].files == expected
        assert locked[ref].engine_ref == ref and (tmp_path / ref / "config.json").is_file()
    from importlib.metadata import version

    libraries = json.loads((tmp_path / "models/tiny/lock.json").read_text())["libraries"]
    assert libraries["transformers"] == version("transformers") and libraries["torch"] == version("torch")


def test_quick_demo_family_is_built_with_the_fine_tunes_named(tmp_path, monkeypatch):
    from mergelib.families.demo import build_demo_family

    monkeypatch.chdir(tmp_path)
    config = run_config(compose(["models=demo_quick"], REPO / "conf"))
    locked = fetch_inputs(config.input_refs(), config.paths.models, config.models)
    assert list(locked) == ["models/demo_quick/base", "models/demo_quick/ft_add", "models/demo_quick/ft_rev"]
    assert not (tmp_path / "models/demo_quick/ft_sort").exists()  # only the skills the config merges
    # the library built with the same arguments elsewhere: the same bytes, hashed independently
    family = build_demo_family(tmp_path / "again", seed=0, quick=True, skills=("add", "rev"))
    for ref, model_dir in zip(locked, (family.base, *family.finetunes)):
        expected = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in model_dir.iterdir() if p.is_file()}
        assert locked[ref].files == expected and locked[ref].kind == "demo"
    lock = json.loads((tmp_path / "models/demo_quick/lock.json").read_text())
    assert all(len(d) == 64 for m in lock["models"] for d in m["files"].values())


def test_pinned_refs_map_and_verify(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_model(tmp_path / "base", b"base")
    lock_path = tmp_path / "out" / LOCK_NAME
    fetch_inputs(["base"], tmp_path / "out")
    lock = read_lock(lock_path)
    assert pinned_refs(lock, ["base"], lock_path) == {"base": "base"}
    with pytest.raises(InputModelError, match="not in .*the config changed since the fetch"):
        pinned_refs(lock, ["other"], lock_path)
    (tmp_path / "base" / "model.safetensors").write_bytes(b"tampered")
    os.utime(tmp_path / "base" / "model.safetensors", ns=(1, 1))
    with pytest.raises(InputModelError, match=r"model.safetensors is missing or changed since it was fetched"):
        pinned_refs(lock, ["base"], lock_path)


def test_read_lock_without_fetch_says_to_fetch(tmp_path):
    with pytest.raises(InputModelError, match=r"no lock file; run the fetch stage first"):
        read_lock(tmp_path / LOCK_NAME)
    (tmp_path / LOCK_NAME).write_text('{"version": 0, "models": []}')
    with pytest.raises(InputModelError, match="run fetch again"):
        read_lock(tmp_path / LOCK_NAME)
