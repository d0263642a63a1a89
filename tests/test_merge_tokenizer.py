"""Merging models whose vocabularies differ: the engine aligns embedding rows to the assembled tokenizer before
the method runs, writes the tokenizer, updates vocab_size, and keeps tied embeddings tied."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import mergelib
from mergelib.families.vocab import make_vocab_trio
from mergelib.tokenizer import align_rows


def tensors(model_dir):
    out = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    return make_vocab_trio(tmp_path_factory.mktemp("trio"))


@pytest.mark.parametrize("tokenizer", [{"source": "union", "pad_to_multiple_of": 8}, {"source": "base"}])
def test_union_merge_aligns_rows_before_the_method(trio, tmp_path, tokenizer):
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(trio["a"]),
        "models": [{"model": str(trio[k]), "parameters": {"weight": w}} for k, w in (("b", 0.7), ("c", 0.4))],
        "tokenizer": tokenizer,
        "chat_template": "chatml",
    }
    out = tmp_path / "out"
    result = mergelib.merge(recipe, out, quiet=True)
    plan = result.plan.tokenizer
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == plan.vocab_size
    if tokenizer["source"] == "union":
        assert plan.vocab_size % 8 == 0 and set(plan.tokens) >= {"<tool>", "lo", "Ġlo", "<|im_start|>"}
    merged = tensors(out)
    inputs = {label: tensors(path) for label, path in ((str(trio[k]), trio[k]) for k in "abc")}
    base_label = str(trio["a"])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        matrices = {label: t[name] for label, t in inputs.items()}
        aligned = {label: align_rows(plan, label, matrices).float() for label in matrices}
        want = aligned[base_label] + sum(
            w * (aligned[str(trio[k])] - aligned[base_label]) for k, w in (("b", 0.7), ("c", 0.4))
        )
        assert merged[name].shape == (plan.vocab_size, want.shape[1])
        torch.testing.assert_close(merged[name], want, rtol=1e-6, atol=1e-6)
    # other tensors are merged as usual
    name = "model.layers.0.mlp.up_proj.weight"
    want = inputs[base_label][name] + sum(
        w * (inputs[str(trio[k])][name] - inputs[base_label][name]) for k, w in (("b", 0.7), ("c", 0.4))
    )
    torch.testing.assert_close(merged[name], want)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    for token_id, token in enumerate(plan.tokens):
        if token is not None:
            assert tok.convert_tokens_to_ids(token) == token_id, token
    assert "<|im_start|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tok("hello <tool>", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3
    assert (out / "tokenizer_report.md").read_text().strip()


def test_tied_embeddings_stay_tied_with_a_union_vocabulary(tmp_path):
    trio = make_vocab_trio(tmp_path / "tied", tie_embeddings=True)
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(trio[k]), "parameters": {"weight": 1.0}} for k in "abc"],
        "tokenizer": {"source": "union"},
    }
    result = mergelib.merge(recipe, tmp_path / "out", quiet=True)
    merged = tensors(tmp_path / "out")
    assert "lm_head.weight" not in merged
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert merged["model.embed_tokens.weight"].shape[0] == result.plan.tokenizer.vocab_size


def test_a_model_without_tokenizer_files_takes_the_source_s_vocabulary(tiny_family, tmp_path):
    """mergekit merges a fine-tune saved without tokenizer files when the tokenizer comes from the base; so do we
    (its rows read by the base's ids), unless the vocabulary is a union, which needs its tokens."""
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_family.finetunes[0], bare)
    for path in bare.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens")):
            path.unlink()

    def recipe(ft, **extra):
        return {"merge_method": "linear", "models": [{"model": str(tiny_family.base), "parameters": {"weight": 0.5}},
                                                     {"model": str(ft), "parameters": {"weight": 0.5}}],
                "base_model": str(tiny_family.base), "chat_template": "chatml", **extra}

    bare_out = mergelib.merge(recipe(bare, tokenizer_source="base"), tmp_path / "bare_out", quiet=True)
    full_out = mergelib.merge(recipe(tiny_family.finetunes[0], tokenizer_source="base"), tmp_path / "full_out",
                              quiet=True)
    assert tensors(bare_out.out_dir).keys() == tensors(full_out.out_dir).keys()
    for name, value in tensors(full_out.out_dir).items():
        assert torch.equal(tensors(bare_out.out_dir)[name], value), name
    assert f"'{bare}' has no tokenizer files" in (bare_out.out_dir / "tokenizer_report.md").read_text()
    with pytest.raises(mergelib.InputModelError, match="no tokenizer.json"):
        mergelib.merge(recipe(bare, tokenizer={"source": "union"}), tmp_path / "union", quiet=True)


def test_different_vocabulary_sizes_need_a_tokenizer_block_or_the_unsafe_flag(trio, tmp_path):
    """mergekit 0.1.5 refuses embeddings of different sizes without a `tokenizer:` block unless
    --unsafe-truncate-embeddings is given; so do we."""
    recipe = {"merge_method": "linear",
              "models": [{"model": str(trio[k]), "parameters": {"weight": 0.5}} for k in ("b", "c")]}
    with pytest.raises(mergelib.InputModelError, match="vocabularies differ .*--unsafe-truncate-embeddings"):
        mergelib.merge(recipe, tmp_path / "refused", quiet=True)
    result = mergelib.merge(recipe, tmp_path / "cut", quiet=True, unsafe_truncate_embeddings=True)
    assert any("kept the first 261 rows" in note for note in result.plan.notes)
    assert tensors(result.out_dir)["model.embed_tokens.weight"].shape[0] == 261
