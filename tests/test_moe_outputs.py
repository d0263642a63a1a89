"""`mergelib moe` outputs Qwen3-MoE and DeepSeek-V3: layout against the sources, loading, identities, refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from mergelib.cli import main
from mergelib.errors import InputModelError, RecipeError
from mergelib.io.index import index_model
from mergelib.io.reader import read_tensor
from mergelib.moe.build import build_moe
from mergelib.moe.config import load_moe_config
from mergelib.moe.router import unit

transformers = pytest.importorskip("transformers")

CODE = ["def add(a, b): return a + b", "for i in range(3): print(i)"]
PROSE = ["The cat sat quietly on the warm mat."]
PROJS = ("gate_proj", "up_proj", "down_proj")
LAYERS = 3  # of the DeepSeek-V3 models built here
DS_SIZES = dict(vocab_size=260, hidden_size=64, intermediate_size=128, moe_intermediate_size=128,
                num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16,
                q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=4,
                num_experts_per_tok=2, n_group=1, topk_group=1, max_position_embeddings=128,
                first_k_dense_replace=LAYERS, bos_token_id=1, eos_token_id=2, pad_token_id=3)


def tensors(path) -> dict[str, torch.Tensor]:
    index = index_model(path)
    return {name: read_tensor(name, info) for name, info in index.tensors.items()}


def load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def logits(path, text="a short test"):
    tok = transformers.AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        return load(path)(**tok(text, return_tensors="pt")).logits


def direct_rows(base_path, prompts):
    """(layers, hidden): the state entering each layer at the last token, one unpadded pass per prompt, averaged."""
    model = load(base_path)
    tok = transformers.AutoTokenizer.from_pretrained(base_path)
    rows = []
    with torch.no_grad():
        for prompt in prompts:
            states = model(**tok(prompt, return_tensors="pt"), output_hidden_states=True).hidden_states
            rows.append(torch.stack([h[0, -1] for h in states[: model.config.num_hidden_layers]]))
    return torch.stack(rows).mean(0)


def generates_finite(path):
    model = load(path)
    ids = transformers.AutoTokenizer.from_pretrained(path)("Hello", return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**ids).logits).all()
        out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, ids["input_ids"].shape[1] + 3)
    return model


def config_for(base, finetunes, **overrides):
    config = {"base_model": str(base), "experts_per_token": 1,
              "experts": [{"source_model": str(finetunes[0]), "positive_prompts": CODE},
                          {"source_model": str(finetunes[1]), "positive_prompts": PROSE}]}
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def qwen3_family(tmp_path_factory):
    from mergelib.families.tiny import make_family

    return make_family(tmp_path_factory.mktemp("qwen3"), n_finetunes=2, arch="qwen3")


def make_deepseek(path, seed, **overrides):
    """A tiny dense DeepSeek-V3 model (every layer's MLP dense), random init from `seed`, with the tiny tokenizer."""
    from mergelib.families.tiny import make_tokenizer

    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**{**DS_SIZES, **overrides}))
    with torch.no_grad():
        for param in model.parameters():  # norms away from 1, so a wrong copy shows
            param.add_(0.02 * torch.randn_like(param))
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepseek")
    base, ft1, ft2 = (make_deepseek(root / name, seed) for seed, name in enumerate(("base", "ft1", "ft2")))
    return base, ft1, ft2


# ---------------------------------------------------------------- Qwen3-MoE


def test_qwen3_moe_layout_loads_and_generates(qwen3_family, tmp_path):
    """Unset `architecture` follows Qwen3 inputs; every router row, expert and attention tensor is the spec's."""
    base, ft1, ft2 = qwen3_family.base, *qwen3_family.finetunes
    result = build_moe(config_for(base, (ft1, ft2)), tmp_path / "q3")
    assert result.architecture == "Qwen3MoeForCausalLM"
    written, src = tensors(tmp_path / "q3"), {p: tensors(p) for p in (base, ft1, ft2)}
    assert not any("shared" in name for name in written)
    code, prose = direct_rows(base, CODE), direct_rows(base, PROSE)
    for layer in range(4):
        pre = f"model.layers.{layer}."
        gate = written[pre + "mlp.gate.weight"]
        assert gate.shape == (2, 64)
        torch.testing.assert_close(gate[0], unit(code[layer]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gate[1], unit(prose[layer]), atol=1e-5, rtol=1e-5)
        for e, ft in enumerate((ft1, ft2)):
            for proj in PROJS:
                assert torch.equal(written[f"{pre}mlp.experts.{e}.{proj}.weight"], src[ft][f"{pre}mlp.{proj}.weight"])
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
            key = f"{pre}self_attn.{name}.weight"
            assert torch.equal(written[key], src[base][key])
    model = generates_finite(tmp_path / "q3")
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    c = model.config
    assert (c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size) == (2, 1, 128)
    assert c.decoder_sparse_step == 1 and c.mlp_only_layers == [] and c.norm_topk_prob
    params = model.state_dict()
    pre = "model.layers.2."
    torch.testing.assert_close(params[pre + "mlp.gate.weight"], written[pre + "mlp.gate.weight"])
    gate_up = torch.cat([src[ft2][pre + "mlp.gate_proj.weight"], src[ft2][pre + "mlp.up_proj.weight"]])
    torch.testing.assert_close(params[pre + "mlp.experts.gate_up_proj"][1], gate_up)
    torch.testing.assert_close(params[pre + "self_attn.k_norm.weight"], src[base][pre + "self_attn.k_norm.weight"])
    recorded = yaml.safe_load((tmp_path / "q3" / "mergekit_moe_config.yml").read_text())
    assert recorded["architecture"] == "qwen3"


def test_qwen3_moe_of_one_model_computes_that_model(qwen3_family, tmp_path):
    """Top-k weights renormalised to 1 and every expert the base: the MoE is the dense Qwen3 base."""
    base = str(qwen3_family.base)
    config = {"base_model": base, "architecture": "Qwen3 MoE", "gate_mode": "uniform_random", "experts_per_token": 2,
              "experts": [{"source_model": base}] * 3}
    build_moe(config, tmp_path / "same", allow_all_same=True)
    torch.testing.assert_close(logits(tmp_path / "same"), logits(base), atol=1e-5, rtol=1e-4)


def test_qwen3_moe_refusals(qwen3_family, tiny_family, tmp_path):
    shared = [{"source_model": str(qwen3_family.base), "positive_prompts": ["Hi"]}]
    with pytest.raises(RecipeError, match="shared_experts: a Qwen3-MoE output has routed experts only"):
        load_moe_config(config_for(qwen3_family.base, qwen3_family.finetunes, architecture="qwen3",
                                   shared_experts=shared))
    with pytest.raises(RecipeError, match="shared_experts"):  # unset architecture resolved from the qwen3 base
        build_moe(config_for(qwen3_family.base, qwen3_family.finetunes, shared_experts=shared), tmp_path / "a")
    with pytest.raises(InputModelError) as err:
        build_moe(config_for(tiny_family.base, tiny_family.finetunes, architecture="qwen3"), tmp_path / "b")
    message = str(err.value)
    assert "llama model" in message and "q_norm/k_norm" in message and "\n" not in message
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---------------------------------------------------------------- DeepSeek-V3


def test_deepseek_v3_layout_loads_and_generates(deepseek, tmp_path):
    base, ft1, ft2 = deepseek
    config = config_for(base, (ft1, ft2), shared_experts=[{"source_model": str(base)}])  # no prompts: ungated
    result = build_moe(config, tmp_path / "ds")
    assert result.architecture == "DeepseekV3ForCausalLM"
    written, src = tensors(tmp_path / "ds"), {p: tensors(p) for p in (base, ft1, ft2)}
    code, prose = direct_rows(base, CODE), direct_rows(base, PROSE)
    attention = [n.removeprefix("model.layers.0.") for n in src[base] if n.startswith("model.layers.0.self_attn.")]
    assert "self_attn.kv_a_proj_with_mqa.weight" in attention and "self_attn.q_a_layernorm.weight" in attention
    for layer in range(LAYERS):
        pre = f"model.layers.{layer}."
        gate = written[pre + "mlp.gate.weight"]
        assert gate.shape == (2, 64) and gate.dtype == torch.float32
        torch.testing.assert_close(gate[0], unit(code[layer]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gate[1], unit(prose[layer]), atol=1e-5, rtol=1e-5)
        bias = written[pre + "mlp.gate.e_score_correction_bias"]
        assert bias.dtype == torch.float32 and torch.equal(bias, torch.zeros(2))
        for proj in PROJS:
            for e, ft in enumerate((ft1, ft2)):
                assert torch.equal(written[f"{pre}mlp.experts.{e}.{proj}.weight"], src[ft][f"{pre}mlp.{proj}.weight"])
            assert torch.equal(written[f"{pre}mlp.shared_experts.{proj}.weight"], src[base][f"{pre}mlp.{proj}.weight"])
        for name in attention + ["input_layernorm.weight", "post_attention_layernorm.weight"]:
            assert torch.equal(written[pre + name], src[base][pre + name])
    assert not any(".mlp.gate_proj." in n or "shared_expert_gate" in n for n in written)
    model = generates_finite(tmp_path / "ds")
    assert type(model).__name__ == "DeepseekV3ForCausalLM"
    c = model.config
    assert (c.n_routed_experts, c.num_experts_per_tok, c.n_shared_experts, c.moe_intermediate_size) == (2, 1, 1, 128)
    assert (c.first_k_dense_replace, c.n_group, c.topk_group, c.routed_scaling_factor) == (0, 1, 1, 1.0)
    assert c.norm_topk_prob
    params = model.state_dict()
    pre = "model.layers.1."
    torch.testing.assert_close(params[pre + "mlp.gate.weight"], written[pre + "mlp.gate.weight"])
    torch.testing.assert_close(params[pre + "mlp.experts.down_proj"][0], src[ft1][pre + "mlp.down_proj.weight"])
    torch.testing.assert_close(params[pre + "mlp.shared_experts.up_proj.weight"], src[base][pre + "mlp.up_proj.weight"])
    torch.testing.assert_close(params[pre + "self_attn.kv_b_proj.weight"], src[base][pre + "self_attn.kv_b_proj.weight"])


def test_deepseek_v3_of_one_model_with_a_silenced_shared_expert_computes_that_model(deepseek, tmp_path):
    """Sigmoid top-k weights renormalised to 1, scaling 1, routed experts all the base, shared expert's down_proj
    zeroed (residual_scale 0): the MoE is the dense base."""
    base, ft1, _ = deepseek
    config = {"base_model": str(base), "architecture": "DeepseekV3ForCausalLM", "gate_mode": "random",
              "experts_per_token": 2, "experts": [{"source_model": str(base)}] * 3,
              "shared_experts": [{"source_model": str(ft1), "residual_scale": 0.0}]}
    build_moe(config, tmp_path / "same", allow_all_same=True)
    torch.testing.assert_close(logits(tmp_path / "same"), logits(base), atol=1e-5, rtol=1e-4)


def test_deepseek_v3_refusals(deepseek, tiny_family, tmp_path):
    base, ft1, ft2 = deepseek
    shared = [{"source_model": str(base)}]
    with pytest.raises(RecipeError, match="architecture 'deepseek_v3' needs one entry in shared_experts"):
        load_moe_config(config_for(base, (ft1, ft2), architecture="deepseek_v3"))
    with pytest.raises(RecipeError, match="at least 2 routed experts"):
        load_moe_config({"base_model": str(base), "architecture": "deepseek_v3", "gate_mode": "random",
                         "experts_per_token": 1, "experts": [{"source_model": str(ft1)}], "shared_experts": shared})
    wide = make_deepseek(tmp_path / "wide", 7, intermediate_size=96)
    cases = {
        "wide": (config_for(base, (ft1, ft2), shared_experts=[{"source_model": str(wide)}]),
                 "has intermediate_size 96 but the routed experts have 128"),
        "llama": (config_for(tiny_family.base, tiny_family.finetunes, architecture="deepseek_v3",
                             shared_experts=[{"source_model": str(tiny_family.base)}]), "multi-head latent attention"),
    }
    moe_input = tmp_path / "moe_input"
    shutil.copytree(ft2, moe_input)
    cfg = json.loads((moe_input / "config.json").read_text())
    (moe_input / "config.json").write_text(json.dumps({**cfg, "first_k_dense_replace": 1}))
    cases["moe input"] = (config_for(base, (ft1, moe_input), shared_experts=shared), "first_k_dense_replace 1")
    for label, (config, fragment) in cases.items():
        with pytest.raises(InputModelError) as err:
            build_moe(config, tmp_path / "out" / label)
        assert fragment in str(err.value) and "\n" not in str(err.value), label
        assert not (tmp_path / "out" / label).exists()


# ---------------------------------------------------------------- shared


def test_llama_experts_with_a_shared_expert_build_a_qwen2_moe(tiny_family, tmp_path):
    """mergekit-moe's Qwen output crashes on Llama experts with a shared expert; this one loads and generates."""
    shared = [{"source_model": str(tiny_family.base), "positive_prompts": ["Hi!"]}]
    build_moe(config_for(tiny_family.base, tiny_family.finetunes, shared_experts=shared), tmp_path / "q2")
    model = generates_finite(tmp_path / "q2")
    assert type(model).__name__ == "Qwen2MoeForCausalLM" and not model.config.qkv_bias
    assert model.config.shared_expert_intermediate_size == 128


@pytest.mark.parametrize(("name", "canonical"), [
    ("Qwen3 MoE", "qwen3"), ("qwen3_moe", "qwen3"), ("Qwen3MoeForCausalLM", "qwen3"), ("Qwen MoE", "qwen"),
    ("deepseek_v3", "deepseek_v3"), ("DeepseekV3ForCausalLM", "deepseek_v3"), ("Mixtral", "mixtral"),
])
def test_architecture_names(name, canonical):
    shared = [] if canonical in ("mixtral", "qwen3") else [{"source_model": "s", "positive_prompts": ["x"]}]
    config = {"base_model": "b", "architecture": name, "gate_mode": "random",
              "experts": [{"source_model": "a"}, {"source_model": "c"}], "shared_experts": shared}
    assert load_moe_config(config).output_architecture == canonical


@pytest.mark.parametrize(("name", "fragment"), [
    ("deepsek_v3", "(did you mean 'deepseek_v3'?)"), ("Deepseek MoE", "use deepseek_v3"), ("gpt", "mixtral, qwen"),
])
def test_unknown_architecture_is_one_line(name, fragment, tmp_path, capsys):
    path = tmp_path / "moe.yml"
    path.write_text(yaml.safe_dump({"base_model": "b", "architecture": name, "gate_mode": "random",
                                    "experts": [{"source_model": "a"}]}))
    assert main(["moe", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "architecture" in err and fragment in err


def test_cli_refuses_a_llama_base_for_qwen3_on_one_line(tiny_family, tmp_path, capsys):
    path = tmp_path / "moe.yml"
    path.write_text(yaml.safe_dump(config_for(tiny_family.base, tiny_family.finetunes, architecture="qwen3")))
    assert main(["moe", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "q_norm/k_norm" in err
    assert not (tmp_path / "out").exists()
