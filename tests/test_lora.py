"""LoRA extraction checked by PEFT itself, the truncation error by Eckart-Young, and `model+lora` recipe inputs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergelib.cli import main
from mergelib.errors import InputModelError, RecipeError
from mergelib.io.index import index_model
from mergelib.io.reader import read_tensor
from mergelib.lora.apply import apply_lora
from mergelib.lora.extract import extract_lora, low_rank
from mergelib.merging.api import merge

transformers = pytest.importorskip("transformers")


def tensors(path) -> dict[str, torch.Tensor]:
    index = index_model(path)
    return {name: read_tensor(name, info) for name, info in index.tensors.items()}


def peft_merged(base_path, adapter) -> dict[str, torch.Tensor]:
    """The base with the adapter applied by PEFT, as a state dict."""
    peft = pytest.importorskip("peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(base_path)
    return peft.PeftModel.from_pretrained(base, adapter).merge_and_unload().state_dict()


@pytest.fixture(scope="module")
def full_rank(tiny_family, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "full"
    result = extract_lora(tiny_family.finetunes[0], tiny_family.base, out, max_rank=64)
    return out, result


def test_full_rank_adapter_reproduces_the_finetune_through_peft(tiny_family, full_rank):
    adapter, result = full_rank
    merged = peft_merged(tiny_family.base, adapter)
    ft = tensors(tiny_family.finetunes[0])
    assert set(merged) == set(ft)
    for name, value in ft.items():
        torch.testing.assert_close(merged[name], value, atol=2e-6, rtol=0)
    assert max(result.errors.values()) < 1e-6
    assert "model.embed_tokens" in result.saved_modules and "model.norm" in result.saved_modules
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 64 and config["lora_alpha"] == 64
    assert config["rank_pattern"] == {m: 32 for m in result.ranks if m.endswith(("k_proj", "v_proj"))}
    assert config["alpha_pattern"] == config["rank_pattern"]


def test_low_rank_error_is_the_dropped_singular_values(tiny_family, tmp_path):
    """Eckart-Young: ||W_peft - W_ft||_F = sqrt(sum of the dropped s_i^2), s_i^2 the eigenvalues of D^T D."""
    out = tmp_path / "r4"
    result = extract_lora(tiny_family.finetunes[1], tiny_family.base, out, max_rank=4,
                          include=[r"layers\.[01]\."], exclude=["o_proj"])
    assert set(result.ranks) == {f"model.layers.{i}.{m}" for i in (0, 1) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert set(result.saved_modules) == {f"model.layers.{i}.{n}" for i in (0, 1)
                                         for n in ("input_layernorm", "post_attention_layernorm")}
    merged = peft_merged(tiny_family.base, out)
    ft, base = tensors(tiny_family.finetunes[1]), tensors(tiny_family.base)
    for module, rank in result.ranks.items():
        assert rank == 4
        name = module + ".weight"
        delta = (ft[name] - base[name]).double()
        eig = torch.linalg.eigvalsh(delta.T @ delta).clamp_min(0).flip(0)  # s_i^2, descending
        expected = eig[4:].sum().sqrt().item()
        got = torch.linalg.matrix_norm((merged[name] - ft[name]).double()).item()
        assert math.isclose(got, expected, rel_tol=1e-3), module
        assert math.isclose(result.errors[module], expected / eig.sum().sqrt().item(), rel_tol=1e-3)
    torch.testing.assert_close(merged["model.layers.2.mlp.up_proj.weight"], base["model.layers.2.mlp.up_proj.weight"])
    torch.testing.assert_close(merged["model.layers.0.self_attn.o_proj.weight"],
                               base["model.layers.0.self_attn.o_proj.weight"])


def test_apply_lora_matches_peft_and_is_cached(tiny_family, full_rank, tmp_path):
    adapter, _ = full_rank
    cache = tmp_path / "cache"
    first = apply_lora(tiny_family.base, adapter, cache)
    applied = tensors(first)
    for name, value in peft_merged(tiny_family.base, adapter).items():
        torch.testing.assert_close(applied[name], value, atol=1e-6, rtol=0)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert apply_lora(tiny_family.base, adapter, cache) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rewritten
    assert json.loads((first / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_embedding_lora_and_scale_options_through_peft(tiny_family, tmp_path):
    out = tmp_path / "embed"
    result = extract_lora(tiny_family.finetunes[0], tiny_family.base, out, max_rank=64, embed_lora=True,
                          distribute_scale=False, include=["embed_tokens", "lm_head"])
    assert result.ranks == {"model.embed_tokens": 64, "lm_head": 64} and result.saved_modules == ()
    merged, ft = peft_merged(tiny_family.base, out), tensors(tiny_family.finetunes[0])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        torch.testing.assert_close(merged[name], ft[name], atol=2e-6, rtol=0)
    cache_copy = tensors(apply_lora(tiny_family.base, out, tmp_path / "cache"))
    torch.testing.assert_close(cache_copy["model.embed_tokens.weight"], ft["model.embed_tokens.weight"],
                               atol=2e-6, rtol=0)


def test_low_rank_golden():
    a, b, err = low_rank(torch.tensor([[3.0, 0.0], [0.0, 1.0]]), max_rank=1)
    torch.testing.assert_close(b @ a, torch.tensor([[3.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(a.abs(), torch.tensor([[math.sqrt(3), 0.0]]))
    assert math.isclose(err, 1 / math.sqrt(10), rel_tol=1e-6)
    a, _, _ = low_rank(torch.tensor([[3.0, 0.0], [0.0, 1.0]]), max_rank=8, sv_epsilon=1.0)
    assert a.shape == (1, 2)  # s = 1 is not above the threshold


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.integers(1, 6), st.integers(0, 10_000), st.booleans())
def test_low_rank_properties(rows, cols, rank, seed, distribute):
    delta = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()
    a, b, err = low_rank(delta, rank, distribute_scale=distribute)
    k = min(rank, rows, cols)
    assert a.shape == (k, cols) and b.shape == (rows, k)
    s = torch.linalg.svdvals(delta.double())
    assert math.isclose(torch.linalg.matrix_norm((delta - b @ a).double()).item(), s[k:].square().sum().sqrt().item(),
                        abs_tol=1e-4)
    assert math.isclose(err * s.square().sum().sqrt().item(), s[k:].square().sum().sqrt().item(), abs_tol=1e-4)
    if distribute:  # sqrt(S) in both factors: equal singular values
        torch.testing.assert_close(torch.linalg.svdvals(a), torch.linalg.svdvals(b), atol=1e-4, rtol=1e-4)


def test_model_plus_lora_recipe_input_merges_as_the_finetune(tiny_family, full_rank, tmp_path):
    adapter, _ = full_rank
    ft1, ft2 = (str(p) for p in tiny_family.finetunes)

    def recipe(first):
        return {"merge_method": "linear", "models": [
            {"model": first, "parameters": {"weight": 0.5}}, {"model": ft2, "parameters": {"weight": 0.5}}]}

    via_lora = merge(recipe(f"{tiny_family.base}+{adapter}"), tmp_path / "via_lora", quiet=True)
    direct = merge(recipe(ft1), tmp_path / "direct", quiet=True)
    assert via_lora.plan.models[0].label == f"{tiny_family.base}+{adapter}"
    got, want = tensors(tmp_path / "via_lora"), tensors(tmp_path / "direct")
    assert set(got) == set(want) and direct.n_tensors == via_lora.n_tensors
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=2e-6, rtol=0)


def test_errors_name_the_problem(tiny_family, tmp_path):
    with pytest.raises(RecipeError, match="max-rank"):
        extract_lora(tiny_family.finetunes[0], tiny_family.base, tmp_path / "x", max_rank=0)
    with pytest.raises(RecipeError, match="not a valid regular expression"):
        extract_lora(tiny_family.finetunes[0], tiny_family.base, tmp_path / "x", include=["(q_proj"])
    with pytest.raises(InputModelError, match="do not differ"):
        extract_lora(tiny_family.base, tiny_family.base, tmp_path / "x")
    with pytest.raises(InputModelError, match="adapter_config.json and adapter weights"):
        apply_lora(tiny_family.base, tiny_family.finetunes[0], tmp_path / "cache")


def test_cli(tiny_family, tmp_path, capsys):
    args = ["extract-lora", "--model", str(tiny_family.finetunes[0]), "--base-model", str(tiny_family.base),
            "--out", str(tmp_path / "a"), "--max-rank", "2", "-i", "q_proj", "--sv-epsilon", "1e-9"]
    assert main(args) == 0
    assert "extracted 4 LoRA modules (rank <= 2" in capsys.readouterr().out
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
    assert main([*args[:-2], "-e", "("]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "'(' is not a valid regular expression" in err


def test_a_base_of_another_architecture_is_refused_not_silently_partial(tiny_family, tmp_path, capsys):
    """A Mixtral base for a Llama fine-tune: the fine-tune's MLP tensors have no module in the base. Before, the
    adapter was written without them ("worst relative error 0"); now it is an error naming them, or with
    --skip-undecomposable a partial adapter whose report lists every tensor left out."""
    from mergelib.moe.build import build_moe

    moe = tmp_path / "mixtral"
    build_moe({"base_model": str(tiny_family.base), "gate_mode": "random", "experts_per_token": 1,
               "experts": [{"source_model": str(p)} for p in tiny_family.finetunes]}, moe)
    ft = tiny_family.finetunes[0]
    expected = r"does not match base .*\.mlp\.down_proj\.weight \(only in the fine-tune\)"
    with pytest.raises(InputModelError, match=expected):
        extract_lora(ft, moe, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    args = ["extract-lora", "--model", str(ft), "--base", str(moe), "--out", str(tmp_path / "partial")]
    assert main(args) == 2
    assert "--skip-undecomposable" in capsys.readouterr().err
    assert main([*args, "--skip-undecomposable"]) == 0
    err = capsys.readouterr().err
    record = json.loads((tmp_path / "partial" / "mergelib_run.json").read_text())
    ft_only = [n for n in record["left_out"] if n.endswith("(only in the fine-tune)")]
    assert len(ft_only) == 3 * 4  # gate, up, down of every layer of the tiny model
    assert "left out" in err and "model.layers.0.mlp.gate_proj.weight" in err
