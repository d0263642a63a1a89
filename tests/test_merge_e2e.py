"""End to end: merge the tiny family with every method of the engine issue, load the result with transformers,
generate, and compare every output tensor with a reference computed directly from the input files."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

import mergelib
from mergelib.merging.rng import generator_for
from mergelib.methods import MethodInputs, get_method

N_LAYERS = None  # read from the family's config


def state(model_dir):
    """Every tensor of a model directory, loaded the plain way (independent of mergelib's reader)."""
    out = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def layer_t(name: str, n_layers: int) -> float:
    """Gradient position of a tensor: j/(n-1) for layer j, 0 for embeddings, norm and head."""
    parts = name.split(".")
    if "layers" in parts:
        j = int(parts[parts.index("layers") + 1])
        return j / (n_layers - 1) if n_layers > 1 else 1.0
    return 0.0


def files_digest(out_dir) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out_dir.iterdir()) if p.is_file()}


def load_and_generate(out_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    ids = tokenizer("hello world", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 4
    return model


# Each case: (recipe, per-tensor reference(name, base, finetunes, t) -> tensor)
def _ref_linear(name, base, fts, t):
    w = [0.2, 0.3, 0.5]
    return (w[0] * base + w[1] * fts[0] + w[2] * fts[1]) / sum(w)


def _ref_task_arithmetic(name, base, fts, t):
    w1 = 0.6
    w2 = 0.2 + (0.8 - 0.2) * t  # gradient [0.2, 0.8]
    return base + w1 * (fts[0] - base) + w2 * (fts[1] - base)


def _ref_slerp(name, base, fts, t):
    tt = 0.3 if "self_attn" in name else 0.7
    spec = get_method("slerp")
    return spec.merge(MethodInputs((fts[0],), base, (spec.model_params(),), name), spec.params(t=tt))


def _ref_gta(method, density2):
    def ref(name, base, fts, t):
        spec = get_method(method)
        mp = (spec.model_params(weight=0.6, density=0.5), spec.model_params(weight=0.4, density=density2))
        gen = generator_for(0, name) if spec.randomized else None
        return spec.merge(MethodInputs(tuple(fts), base, mp, name, gen), spec.params())

    return ref


CASES = {
    "linear": (
        lambda f: {
            "merge_method": "linear",
            "models": [
                {"model": str(f.base), "parameters": {"weight": 0.2}},
                {"model": str(f.finetunes[0]), "parameters": {"weight": 0.3}},
                {"model": str(f.finetunes[1]), "parameters": {"weight": 0.5}},
            ],
        },
        _ref_linear,
    ),
    "slerp": (
        lambda f: {
            "merge_method": "slerp",
            "base_model": str(f.base),
            "models": [{"model": str(f.base)}, {"model": str(f.finetunes[0])}],
            "parameters": {"t": [{"filter": "self_attn", "value": 0.3}, {"value": 0.7}]},
        },
        _ref_slerp,
    ),
    "task_arithmetic": (
        lambda f: {
            "merge_method": "task_arithmetic",
            "base_model": str(f.base),
            "models": [
                {"model": str(f.finetunes[0]), "parameters": {"weight": 0.6}},
                {"model": str(f.finetunes[1]), "parameters": {"weight": [0.2, 0.8]}},
            ],
        },
        _ref_task_arithmetic,
    ),
    **{
        method: (
            lambda f, method=method: {
                "merge_method": method,
                "base_model": str(f.base),
                "models": [
                    {"model": str(f.finetunes[0]), "parameters": {"weight": 0.6, "density": 0.5}},
                    {"model": str(f.finetunes[1]), "parameters": {"weight": 0.4}},
                ],
                "parameters": {"density": 0.7},
            },
            _ref_gta(method, 0.7),
        )
        for method in ("ties", "dare_ties", "dare_linear")
    },
}


@pytest.mark.parametrize("method", sorted(CASES))
def test_merge_matches_direct_reference_and_loads(method, tiny_family, tmp_path):
    recipe_of, reference = CASES[method]
    out = tmp_path / "out"
    result = mergelib.merge(recipe_of(tiny_family), out, quiet=True)
    assert result.n_tensors > 0 and result.bytes_written > 0
    config = json.loads((tiny_family.base / "config.json").read_text())
    n_layers = config["num_hidden_layers"]
    base, fts = state(tiny_family.base), [state(p) for p in tiny_family.finetunes]
    merged = state(out)
    assert set(merged) == set(base)
    for name, tensor in merged.items():
        want = reference(name, base[name].float(), [ft[name].float() for ft in fts], layer_t(name, n_layers))
        assert tensor.dtype == base[name].dtype, name
        torch.testing.assert_close(tensor.float(), want, rtol=1e-6, atol=1e-6, msg=name)
    load_and_generate(out)
    for fname in ("config.json", "README.md", "mergekit_config.yml", "mergelib_run.json", "tokenizer.json"):
        assert (out / fname).is_file(), fname
    card = (out / "README.md").read_text()
    for digest in result.input_files.values():
        assert digest in card


def test_output_bytes_do_not_depend_on_threads(tiny_family, tmp_path):
    recipe = CASES["dare_ties"][0](tiny_family)
    mergelib.merge(recipe, tmp_path / "a", threads=1, quiet=True)
    mergelib.merge(recipe, tmp_path / "b", threads=3, quiet=True)
    assert files_digest(tmp_path / "a") == files_digest(tmp_path / "b")
    mergelib.merge(recipe, tmp_path / "c", threads=2, seed=1, quiet=True)
    shards = [n for n in files_digest(tmp_path / "a") if n.endswith(".safetensors")]
    assert any(files_digest(tmp_path / "a")[n] != files_digest(tmp_path / "c")[n] for n in shards)


def test_sharding_and_index(tiny_family, tmp_path):
    recipe = CASES["linear"][0](tiny_family)
    result = mergelib.merge(recipe, tmp_path / "o", out_shard_size=20_000, quiet=True)
    index = json.loads((tmp_path / "o" / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in (tmp_path / "o").glob("*.safetensors"))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == result.bytes_written
    single = mergelib.merge(recipe, tmp_path / "one", out_shard_size=10**12, quiet=True)
    assert [p.name for p in (tmp_path / "one").glob("*.safetensors")] == ["model.safetensors"]
    assert not (tmp_path / "one" / "model.safetensors.index.json").exists()
    assert single.bytes_written == result.bytes_written


def test_passthrough_frankenmerge_updates_layer_count(tiny_family, tmp_path):
    config = json.loads((tiny_family.base / "config.json").read_text())
    n = config["num_hidden_layers"]
    a, b = tiny_family.finetunes
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(a), "layer_range": [0, n - 1]}]},
            {"sources": [{"model": str(b), "layer_range": [1, n]}]},
        ],
    }
    mergelib.merge(recipe, tmp_path / "f", quiet=True)
    out_config = json.loads((tmp_path / "f" / "config.json").read_text())
    assert out_config["num_hidden_layers"] == 2 * (n - 1)
    merged, sa, sb = state(tmp_path / "f"), state(a), state(b)
    for j in range(n - 1):
        key = f"model.layers.{j}.mlp.up_proj.weight"
        assert torch.equal(merged[key], sa[key])
        out_key = f"model.layers.{n - 1 + j}.mlp.up_proj.weight"
        assert torch.equal(merged[out_key], sb[f"model.layers.{1 + j}.mlp.up_proj.weight"])
    assert torch.equal(merged["model.embed_tokens.weight"], sa["model.embed_tokens.weight"])  # first slice
    assert torch.equal(merged["model.norm.weight"], sb["model.norm.weight"])  # last slice
    load_and_generate(tmp_path / "f")


def test_out_dtype_and_working_dtype(tiny_family, tmp_path):
    recipe = {**CASES["linear"][0](tiny_family), "dtype": "bfloat16", "out_dtype": "float16"}
    mergelib.merge(recipe, tmp_path / "d", quiet=True)
    merged = state(tmp_path / "d")
    assert {t.dtype for t in merged.values()} == {torch.float16}
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "float16"
    base, fts = state(tiny_family.base), [state(p) for p in tiny_family.finetunes]
    name = "model.layers.0.mlp.up_proj.weight"
    rounded = [x[name].to(torch.bfloat16).float() for x in (base, *fts)]
    want = (0.2 * rounded[0] + 0.3 * rounded[1] + 0.5 * rounded[2]) / 1.0
    torch.testing.assert_close(merged[name].float(), want.to(torch.float16).float())


def test_failed_merge_keeps_previous_output(tiny_family, tmp_path, monkeypatch):
    out = tmp_path / "keep"
    mergelib.merge(CASES["linear"][0](tiny_family), out, quiet=True)
    before = files_digest(out)

    def boom(*args, **kwargs):
        raise OSError("disk on fire")

    monkeypatch.setattr("mergelib.merging.engine.compute", boom)
    with pytest.raises(OSError):
        mergelib.merge(CASES["ties"][0](tiny_family), out, quiet=True)
    assert files_digest(out) == before
    # the staging directory stays for a resume; the next successful run consumes it
    assert [p.name for p in tmp_path.iterdir() if p.name != "keep"][0].startswith(".keep.partial-")
    monkeypatch.undo()
    mergelib.merge(CASES["ties"][0](tiny_family), out, quiet=True)
    assert [p.name for p in tmp_path.iterdir()] == ["keep"]
    assert files_digest(out) != before


def test_refuses_to_replace_a_foreign_directory(tiny_family, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(mergelib.OutputError, match="was not written by mergelib"):
        mergelib.merge(CASES["linear"][0](tiny_family), out, quiet=True)
    assert (out / "notes.txt").read_text() == "precious"


def test_dry_run_reads_no_weights_and_writes_nothing(tiny_family, tmp_path, monkeypatch):
    def no_reads(*args, **kwargs):
        raise AssertionError("a weight was read")

    monkeypatch.setattr("mergelib.merging.engine.read_tensor", no_reads)
    result = mergelib.merge(CASES["ties"][0](tiny_family), tmp_path / "x", dry_run=True)
    assert result.n_tensors == len(result.plan.jobs) and result.bytes_read > result.bytes_written > 0
    assert not (tmp_path / "x").exists()
