"""The generated model families: bytes repeat, shards and index agree, fine-tune deltas conflict in sign,
transformers loads and runs them, the tokenizer round-trips, and the large sizes have the advertised size."""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from mergelib.arch import spec_for  # noqa: E402
from mergelib.families import tiny  # noqa: E402
from mergelib.families.tiny import ensure_family, make_family, make_model, param_count  # noqa: E402
from mergelib.merging.rng import generator_for  # noqa: E402

transformers.logging.set_verbosity_error()


@pytest.fixture
def family(tiny_family):
    """conftest's session family: make_family with its defaults (tiny, 2 fine-tunes, seed 0)."""
    return tiny_family


def _digests(model_dir):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(model_dir.iterdir())}


def _tensors(model_dir) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


def _raw_header(path) -> dict:
    """The safetensors header parsed by hand: 8-byte little-endian length, then JSON."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))


# ---- determinism --------------------------------------------------------------------------------------------

def test_same_arguments_same_bytes(family, tmp_path, monkeypatch):
    monkeypatch.setattr(tiny, "WORKERS", 1)  # another thread count must not change a byte
    again = make_family(tmp_path / "again")
    for first, second in zip((family.base, *family.finetunes), (again.base, *again.finetunes), strict=True):
        assert _digests(first) == _digests(second)
    assert [p.name for p in again.finetunes] == ["ft1", "ft2"]


def test_other_seed_other_weights(family, tmp_path):
    other = make_model(tmp_path / "other", seed=1)
    a, b = _tensors(family.base), _tensors(other)
    assert a.keys() == b.keys()
    assert all(not torch.equal(a[k], b[k]) for k in a)


# ---- layout -------------------------------------------------------------------------------------------------

def test_shards_and_index_agree(family):
    for model_dir in (family.base, *family.finetunes):
        index = json.loads((model_dir / "model.safetensors.index.json").read_text())
        shard_files = sorted(p.name for p in model_dir.glob("*.safetensors"))
        count = len(shard_files)
        assert count >= 2
        assert shard_files == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
        assert sorted(set(index["weight_map"].values())) == shard_files
        config = AutoConfig.from_pretrained(model_dir)
        expected = tiny.tensor_shapes(config)
        assert set(index["weight_map"]) == set(expected)
        total = 0
        for fname in shard_files:
            header = _raw_header(model_dir / fname)
            assert header.pop("__metadata__") == {"format": "pt"}
            assert {n for n, f in index["weight_map"].items() if f == fname} == set(header)
            for name, entry in header.items():
                assert tuple(entry["shape"]) == expected[name] and entry["dtype"] == "F32"
                start, end = entry["data_offsets"]
                assert end - start == math.prod(entry["shape"]) * 4
                total += end - start
        assert index["metadata"]["total_size"] == total


def test_one_shard_is_model_safetensors(tmp_path):
    path = make_model(tmp_path / "one", shard_size=1 << 40)
    assert sorted(p.name for p in path.glob("model*")) == ["model.safetensors"]


def test_shard_grouping_respects_size():
    shapes = {"a": (10,), "b": (10,), "c": (30,), "d": (1,)}
    assert tiny.shard_names(shapes, 4, 80) == [["a", "b"], ["c"], ["d"]]  # 40+40 | 120 alone | 4
    assert tiny.shard_names(shapes, 4, 10**6) == [["a", "b", "c", "d"]]


def test_model_files_and_config(family):
    names = {p.name for p in family.base.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    config = json.loads((family.base / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["vocab_size"] == tiny.VOCAB_SIZE
    assert 32 <= config["hidden_size"] <= 64 and 2 <= config["num_hidden_layers"] <= 4
    generation = json.loads((family.base / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 3)


def test_refuses_to_replace_a_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        make_model(tmp_path / "precious")
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


def test_finetune_of_a_mismatched_base_fails(family, tmp_path):
    with pytest.raises(ValueError, match="no tensor|shape"):
        make_model(tmp_path / "bad", arch="qwen2", delta_of=family.base, delta_seed=1)


# ---- deltas -------------------------------------------------------------------------------------------------

def _deltas(fam):
    base = _tensors(fam.base)
    fts = [_tensors(p) for p in fam.finetunes]
    flat = lambda ts: torch.cat([ts[k].float().flatten() for k in sorted(base)])  # noqa: E731
    b = flat(base)
    return b, [flat(ft) - b for ft in fts]


def test_deltas_conflict_in_sign_and_move_alone(family):
    b, (d1, d2) = _deltas(family)
    n = b.numel()
    moved1, moved2 = (d1 != 0).sum().item() / n, (d2 != 0).sum().item() / n
    conflicts = ((d1 * d2) < 0).sum().item()
    only_one = ((d1 != 0) ^ (d2 != 0)).sum().item()
    assert abs(moved1 - tiny.DELTA_KEEP) < 0.01 and abs(moved2 - tiny.DELTA_KEEP) < 0.01
    # both move on ~0.49 of elements; a 0.36 correlation gives opposite signs on ~38% of those
    assert 0.15 < conflicts / n < 0.25
    assert 0.38 < only_one / n < 0.46  # 2 * 0.7 * 0.3 = 0.42
    agree = ((d1 * d2) > 0).sum().item()
    assert agree > conflicts  # the shared direction: fine-tunes agree more often than they conflict


def test_delta_magnitude_is_small_but_real(family):
    base = _tensors(family.base)
    ft = _tensors(family.finetunes[0])
    for name, b in base.items():
        rel = (ft[name] - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()
        assert 0.02 < rel.item() < 0.08, name  # DELTA_REL = 0.05 times sqrt(E[masked z^2]) ~ 0.05 * 0.9


def test_delta_matches_per_element_reference(family):
    """The delta of one tensor recomputed element by element from the documented formula."""
    name = "model.layers.1.input_layernorm.weight"
    base = _tensors(family.base)[name]
    ft = _tensors(family.finetunes[1])[name]
    shared = torch.randn(base.shape, generator=generator_for(0, f"tiny/shared/{name}")).tolist()
    own = torch.randn(base.shape, generator=generator_for(2, f"tiny/delta/0/{name}")).tolist()
    values = base.tolist()
    rms = math.sqrt(sum(v * v for v in values) / len(values))
    for i, v in enumerate(values):
        moved = abs(own[i]) >= 0.3853204664
        expected = v + (0.05 * rms * (0.6 * shared[i] + 0.8 * own[i]) if moved else 0.0)
        assert ft[i].item() == pytest.approx(expected, rel=1e-6, abs=1e-7)
        assert (ft[i].item() == v) == (not moved)
    base_noise = torch.randn(base.shape, generator=generator_for(0, f"tiny/base/{name}"))
    assert torch.equal(base, 1.0 + 0.05 * base_noise)


def test_bf16_family_keeps_the_deltas(tmp_path):
    fam = make_family(tmp_path / "bf16", dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in _tensors(fam.base).values())
    assert json.loads((fam.base / "config.json").read_text())["dtype"] == "bfloat16"
    b, (d1, d2) = _deltas(fam)
    assert (d1 != 0).float().mean().item() > 0.6  # of the 0.7 moved, few round away in bf16
    assert ((d1 * d2) < 0).float().mean().item() > 0.12


# ---- transformers round trip --------------------------------------------------------------------------------

def test_transformers_loads_and_generates(family):
    model = AutoModelForCausalLM.from_pretrained(family.finetunes[0])
    stored = _tensors(family.finetunes[0])
    assert torch.equal(model.state_dict()["model.layers.0.mlp.up_proj.weight"],
                       stored["model.layers.0.mlp.up_proj.weight"])
    tok = AutoTokenizer.from_pretrained(family.finetunes[0])
    inputs = tok("the cat", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 4)
    assert torch.isfinite(model(**inputs).logits).all()


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "qwen3"])
def test_other_architectures_load(arch, tmp_path):
    fam = make_family(tmp_path / arch, arch=arch, n_finetunes=1)
    config = json.loads((fam.base / "config.json").read_text())
    assert config["architectures"] == [tiny.ARCHITECTURES[arch]] and config["model_type"] == arch
    names = list(_tensors(fam.finetunes[0]))
    assert spec_for(config, names).family == arch
    model = AutoModelForCausalLM.from_pretrained(fam.finetunes[0])
    assert model.generate(torch.tensor([[1, 50, 60]]), max_new_tokens=2, do_sample=False).shape == (1, 5)


def test_tied_embeddings_store_no_head(tmp_path):
    path = make_model(tmp_path / "tied", tie_embeddings=True)
    assert "lm_head.weight" not in _tensors(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_tokenizer_round_trips(family):
    tok = AutoTokenizer.from_pretrained(family.base)
    text = "Merging models, naïvely: 3×4 = 12 — ✓ 你好\n\ttabs"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id == 1
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert (tok.unk_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 2, 3)
    assert len(tok) == tiny.VOCAB_SIZE == AutoConfig.from_pretrained(family.base).vocab_size
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<s><|user|>\nhi</s>\n<|assistant|>\n"


# ---- sizes --------------------------------------------------------------------------------------------------

def _formula(size: str, arch: str, tie: bool) -> int:
    c = tiny.SIZES[size]
    h, i, layers, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if arch == "qwen2" else 0)  # qwen2: q/k/v biases
    qk_norm = 2 * c["head_dim"] if arch == "qwen3" else 0
    per_layer = attn + qk_norm + 3 * h * i + 2 * h
    return layers * per_layer + v * h * (1 if tie else 2) + h


@pytest.mark.parametrize("size", sorted(tiny.SIZES))
@pytest.mark.parametrize("arch", sorted(tiny.ARCHITECTURES))
def test_param_count_matches_formula(size, arch):
    for tie in (False, True):
        assert param_count(size, arch, tie_embeddings=tie) == _formula(size, arch, tie)


def test_large_sizes_are_the_advertised_size():
    assert 110e6 < param_count("120m") < 130e6
    assert param_count("1b") == 1_100_048_384  # TinyLlama-1.1B's shape and count
    assert tiny.SIZES["1b"]["vocab_size"] == tiny.SIZES["120m"]["vocab_size"] == 32000


# ---- cache --------------------------------------------------------------------------------------------------

def test_ensure_family_reuses_then_rebuilds(tmp_path):
    root = tmp_path / "cached"
    fam = ensure_family(root, n_finetunes=3)
    stamp = json.loads((root / tiny.STAMP).read_text())
    assert stamp["args"]["n_finetunes"] == 3 and stamp["args"]["dtype"] == "torch.float32"
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*.safetensors")}
    assert ensure_family(root, n_finetunes=3) == fam
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.safetensors")} == mtimes  # reused

    before = _digests(fam.base)
    fam2 = ensure_family(root, n_finetunes=2, seed=5)  # other arguments: rebuilt, the extra fine-tune removed
    assert _digests(fam2.base) != before
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["base", "ft1", "ft2"]

    shard = next(fam2.base.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])  # a damaged file is noticed and rebuilt
    ensure_family(root, n_finetunes=2, seed=5)
    assert _digests(fam2.base) == _digests(make_model(tmp_path / "ref", seed=5))
