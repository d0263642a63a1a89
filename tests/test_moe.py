"""`mergelib moe`: router rows against states computed directly, routing, loading, and whole-model identities."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from safetensors import safe_open

from mergelib.cli import main
from mergelib.errors import InputModelError, RecipeError
from mergelib.io.index import index_model
from mergelib.io.reader import read_tensor
from mergelib.merging.rng import generator_for
from mergelib.moe.build import build_moe
from mergelib.moe.config import load_moe_config
from mergelib.moe.router import degenerate_layers, unit

transformers = pytest.importorskip("transformers")

# distinct last characters: the layer-0 state is the last token's embedding
CODE = ["def add(a, b): return a + b", "for i in range(3): print(i)"]
PROSE = ["The cat sat quietly on the warm mat."]
NEGATIVE = ["Bonjour, comment allez-vous?"]


def tensors(path) -> dict[str, torch.Tensor]:
    index = index_model(path)
    return {name: read_tensor(name, info) for name, info in index.tensors.items()}


def load(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    return model.eval()


def moe_config(family, **overrides):
    config = {
        "base_model": str(family.base),
        "experts_per_token": 1,
        "experts": [
            {"source_model": str(family.finetunes[0]), "positive_prompts": CODE, "negative_prompts": NEGATIVE},
            {"source_model": str(family.finetunes[1]), "positive_prompts": PROSE},
        ],
    }
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def hidden_moe(tiny_family, tmp_path_factory):
    out = tmp_path_factory.mktemp("moe") / "hidden"
    build_moe(moe_config(tiny_family), out, batch_size=2)  # 2 code prompts of different lengths: one padded batch
    return out


@pytest.fixture(scope="module")
def qwen2_family(tmp_path_factory):
    from mergelib.families.tiny import make_family

    return make_family(tmp_path_factory.mktemp("qwen2"), n_finetunes=2, arch="qwen2")


def direct_rows(base_path, prompts, average_tokens=False):
    """Per prompt, one unpadded forward pass; (layers, hidden) averaged over prompts."""
    model = load(base_path)
    tok = transformers.AutoTokenizer.from_pretrained(base_path)
    per_prompt = []
    with torch.no_grad():
        for prompt in prompts:
            states = model(**tok(prompt, return_tensors="pt"), output_hidden_states=True).hidden_states
            layers = states[: model.config.num_hidden_layers]  # the state entering each layer
            per_prompt.append(torch.stack([h[0].mean(0) if average_tokens else h[0, -1] for h in layers]))
    return torch.stack(per_prompt).mean(0)


def test_router_rows_equal_the_states_computed_directly(tiny_family, hidden_moe):
    out = tensors(hidden_moe)
    code = direct_rows(tiny_family.base, CODE) - direct_rows(tiny_family.base, NEGATIVE)
    prose = direct_rows(tiny_family.base, PROSE)
    for layer in range(4):
        gate = out[f"model.layers.{layer}.block_sparse_moe.gate.weight"]
        assert gate.shape == (2, 64)
        torch.testing.assert_close(gate[0], code[layer] / code[layer].norm(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gate[1], prose[layer] / prose[layer].norm(), atol=1e-5, rtol=1e-5)
        assert math.isclose(gate[1].norm().item(), 1.0, rel_tol=1e-6)


def test_hidden_avg_averages_over_tokens(tiny_family, tmp_path):
    build_moe(moe_config(tiny_family, gate_mode="hidden_avg"), tmp_path / "avg", batch_size=2)
    out = tensors(tmp_path / "avg")
    code = direct_rows(tiny_family.base, CODE, True) - direct_rows(tiny_family.base, NEGATIVE, True)
    for layer in range(4):
        gate = out[f"model.layers.{layer}.block_sparse_moe.gate.weight"]
        torch.testing.assert_close(gate[0], code[layer] / code[layer].norm(), atol=1e-5, rtol=1e-5)


def test_a_prompt_routes_to_its_expert(tiny_family, tmp_path):
    prompts = [CODE[0], PROSE[0], NEGATIVE[0]]
    config = moe_config(tiny_family, experts=[
        {"source_model": str(ft), "positive_prompts": [p]}
        for ft, p in zip((tiny_family.finetunes[0], tiny_family.finetunes[1], tiny_family.base), prompts)
    ])
    build_moe(config, tmp_path / "route")
    model = load(tmp_path / "route")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "route")
    with torch.no_grad():
        for expert, prompt in enumerate(prompts):
            logits = model(**tok(prompt, return_tensors="pt"), output_router_logits=True).router_logits
            assert len(logits) == 4
            assert [layer[-1].argmax().item() for layer in logits] == [expert] * 4, prompt


def test_output_loads_with_its_weights_and_generates(tiny_family, hidden_moe):
    model = load(hidden_moe)
    assert type(model).__name__ == "MixtralForCausalLM"
    assert model.config.num_local_experts == 2 and model.config.num_experts_per_tok == 1
    base, ft1, ft2 = (tensors(p) for p in (tiny_family.base, *tiny_family.finetunes))
    written = tensors(hidden_moe)
    params = model.state_dict()
    for layer in range(4):
        pre = f"model.layers.{layer}."
        torch.testing.assert_close(params[pre + "self_attn.q_proj.weight"], base[pre + "self_attn.q_proj.weight"])
        torch.testing.assert_close(params[pre + "mlp.gate.weight"], written[pre + "block_sparse_moe.gate.weight"])
        for e, ft in enumerate((ft1, ft2)):
            gate_up = torch.cat([ft[pre + "mlp.gate_proj.weight"], ft[pre + "mlp.up_proj.weight"]])
            torch.testing.assert_close(params[pre + "mlp.experts.gate_up_proj"][e], gate_up)
            torch.testing.assert_close(params[pre + "mlp.experts.down_proj"][e], ft[pre + "mlp.down_proj.weight"])
    torch.testing.assert_close(params["lm_head.weight"], base["lm_head.weight"])
    tok = transformers.AutoTokenizer.from_pretrained(hidden_moe)
    ids = tok("Hello", return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, ids["input_ids"].shape[1] + 4)
    record = yaml.safe_load((hidden_moe / "mergekit_moe_config.yml").read_text())
    assert record["experts"][1]["positive_prompts"] == PROSE


def dense_logits(path, text):
    model = load(path)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt")).logits


def test_experts_all_one_model_compute_that_model(tiny_family, tmp_path):
    """Routing weights over the top-k sum to 1, so an MoE whose base and experts are one model is that model."""
    ft = str(tiny_family.finetunes[0])
    config = {"base_model": ft, "gate_mode": "random", "experts_per_token": 2,
              "experts": [{"source_model": ft}, {"source_model": ft}, {"source_model": ft}]}
    with pytest.raises(InputModelError, match="i-understand-this-is-not-useful-without-training"):
        build_moe(config, tmp_path / "refused")
    build_moe(config, tmp_path / "same", allow_all_same=True)
    torch.testing.assert_close(dense_logits(tmp_path / "same", "a test"), dense_logits(ft, "a test"),
                               atol=1e-5, rtol=1e-4)


def test_qwen2_moe_with_a_shared_expert(qwen2_family, tmp_path):
    base, ft1, ft2 = qwen2_family.base, *qwen2_family.finetunes
    config = moe_config(qwen2_family, shared_experts=[{"source_model": str(base), "positive_prompts": ["Hi!"]}])
    build_moe(config, tmp_path / "qwen")
    model = load(tmp_path / "qwen")
    assert type(model).__name__ == "Qwen2MoeForCausalLM" and model.config.qkv_bias
    params = model.state_dict()
    src = {p: tensors(p) for p in (base, ft1, ft2)}
    rows = direct_rows(base, ["Hi!"])
    for layer in range(4):
        pre = f"model.layers.{layer}."
        torch.testing.assert_close(params[pre + "self_attn.q_proj.bias"], src[base][pre + "self_attn.q_proj.bias"])
        shared_up = params[pre + "mlp.shared_expert.up_proj.weight"]
        torch.testing.assert_close(shared_up, src[base][pre + "mlp.up_proj.weight"])
        torch.testing.assert_close(params[pre + "mlp.shared_expert_gate.weight"][0], unit(rows[layer]),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(params[pre + "mlp.experts.down_proj"][1], src[ft2][pre + "mlp.down_proj.weight"])
    ids = transformers.AutoTokenizer.from_pretrained(tmp_path / "qwen")("Hi", return_tensors="pt")
    assert model.generate(**ids, max_new_tokens=3, do_sample=False).shape == (1, ids["input_ids"].shape[1] + 3)


def test_qwen2_moe_identity_with_a_silenced_shared_expert(qwen2_family, tmp_path):
    """residual_scale 0 zeroes the shared expert's down_proj; the routed experts are all the base: dense base."""
    base = str(qwen2_family.base)
    config = {"base_model": base, "gate_mode": "uniform_random", "experts_per_token": 2,
              "experts": [{"source_model": base}, {"source_model": base}],
              "shared_experts": [{"source_model": str(qwen2_family.finetunes[0]), "residual_scale": 0.0}]}
    build_moe(config, tmp_path / "silent", allow_all_same=True)
    torch.testing.assert_close(dense_logits(tmp_path / "silent", "abc"), dense_logits(base, "abc"),
                               atol=1e-5, rtol=1e-4)


def test_random_gates_are_seeded_and_noise_is_reproducible(tiny_family, tmp_path):
    config = moe_config(tiny_family, gate_mode="uniform_random")
    config["experts"][0]["noise_scale"] = 0.01
    config["experts"][1]["residual_scale"] = 0.5
    build_moe(config, tmp_path / "a", seed=1)
    build_moe(config, tmp_path / "b", seed=1)
    build_moe(config, tmp_path / "c", seed=2)
    a, b, c = (tensors(tmp_path / x) for x in "abc")
    gate = "model.layers.2.block_sparse_moe.gate.weight"
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[gate], c[gate])
    assert a[gate].abs().max() <= 1 / math.sqrt(64)  # nn.Linear's default init bound
    ft1, ft2 = tensors(tiny_family.finetunes[0]), tensors(tiny_family.finetunes[1])
    name = "model.layers.1.block_sparse_moe.experts.0.w3.weight"
    noise = torch.randn((128, 64), generator=generator_for(1, f"moe/noise/{name}"))
    torch.testing.assert_close(a[name], ft1["model.layers.1.mlp.up_proj.weight"] + 0.01 * noise)
    torch.testing.assert_close(a["model.layers.1.block_sparse_moe.experts.1.w2.weight"],
                               ft2["model.layers.1.mlp.down_proj.weight"] * 0.5)
    torch.testing.assert_close(a["model.layers.1.block_sparse_moe.experts.1.w1.weight"],
                               ft2["model.layers.1.mlp.gate_proj.weight"])


def test_cheap_embed_is_the_normalised_embedding_sum(tiny_family, tmp_path):
    build_moe(moe_config(tiny_family, gate_mode="cheap_embed", dtype="bfloat16"), tmp_path / "cheap")
    embed = tensors(tiny_family.base)["model.embed_tokens.weight"]
    tok = transformers.AutoTokenizer.from_pretrained(tiny_family.base)

    def direction(prompts):
        total = torch.zeros(64)
        for prompt in prompts:
            for token in tok(prompt)["input_ids"]:
                total += embed[token]
        return total / total.norm()

    expected = direction(CODE) - direction(NEGATIVE)
    expected = expected / expected.norm()
    with safe_open(str(tmp_path / "cheap" / "model.safetensors"), "pt") as f:
        for layer in range(4):
            gate = f.get_tensor(f"model.layers.{layer}.block_sparse_moe.gate.weight")
            assert gate.dtype == torch.bfloat16
            torch.testing.assert_close(gate[0].float(), expected, atol=8e-3, rtol=8e-3)


def test_degenerate_layers_golden():
    rows = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.01]]])  # cond 1, then ~200
    assert degenerate_layers(rows) == [1]


@pytest.mark.parametrize(("change", "fragment"), [
    ({"experts_per_tokens": 2}, "unknown key 'experts_per_tokens' (did you mean 'experts_per_token'?)"),
    ({"experts_per_token": 3}, "experts_per_token is 3 but there are 2 experts"),
    ({"gate_mode": "hiden"}, "gate_mode"),
    ({"shared_experts": [{"source_model": "x", "positive_prompts": ["a"]}] * 2}, "at most one shared expert"),
    ({"architecture": "qwen"}, "architecture 'qwen' needs one entry in shared_experts"),
])
def test_config_errors_name_the_field(tiny_family, change, fragment):
    with pytest.raises(RecipeError, match=None) as err:
        load_moe_config(moe_config(tiny_family, **change))
    assert fragment in str(err.value)


def test_prompt_modes_need_distinct_prompts(tiny_family):
    config = moe_config(tiny_family)
    config["experts"][1] = {**config["experts"][0], "source_model": str(tiny_family.finetunes[1])}
    with pytest.raises(RecipeError, match="every expert has the same prompts"):
        load_moe_config(config)
    config["experts"][1] = {"source_model": str(tiny_family.finetunes[1])}
    with pytest.raises(RecipeError, match=r"experts\[1\].positive_prompts"):
        load_moe_config(config)
    assert load_moe_config({**config, "gate_mode": "random"}).gate_mode == "random"


def test_cli_builds_and_reports_errors_on_one_line(tiny_family, tmp_path, capsys):
    path = tmp_path / "moe.yml"
    path.write_text(yaml.safe_dump(moe_config(tiny_family, gate_mode="random")))
    assert main(["moe", str(path), str(tmp_path / "out"), "--seed", "3"]) == 0
    assert "built a MixtralForCausalLM with 2 experts" in capsys.readouterr().out
    path.write_text(yaml.safe_dump(moe_config(tiny_family, gate_mod="random")))
    assert main(["moe", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "unknown key 'gate_mod' (did you mean 'gate_mode'?)" in err
