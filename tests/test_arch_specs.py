"""Every `mergelib/arch/specs/*.json` checked against the tensors transformers itself builds for that family,
plus the generic fallback (`infer_spec`) on a made-up architecture."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import transformers  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from mergelib.arch import ArchSpec, WeightSpec, infer_spec, load_specs, spec_for  # noqa: E402
from mergelib.arch.spec import SPEC_DIR  # noqa: E402

transformers.logging.set_verbosity_error()

SPEC_FILES = sorted(SPEC_DIR.glob("*.json"))
# vision-language specs (a vision tower carried beside the layer stack) are checked against real tiny VLM
# checkpoints in tests/test_vlm.py; the causal-LM check below builds models with AutoModelForCausalLM
TEXT_SPEC_FILES = [p for p in SPEC_FILES if "carried_prefixes" not in json.loads(p.read_text())]
VOCAB = 96  # no other dimension of the tiny configs is 96, so shape[0] == VOCAB identifies vocabulary tensors
TINY = dict(
    hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
    head_dim=8, vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
# Config switches that add or remove tensors in the families we ship; each present one is toggled together.
KNOBS = ("attention_bias", "mlp_bias", "use_bias", "use_qk_norm")


def _spec(path) -> ArchSpec:
    family = json.loads(path.read_text())["family"]
    return next(s for s in load_specs() if s.family == family)


def _build(model_type: str, tie: bool, knobs_on: bool):
    """(config dict as save_pretrained writes it, state_dict shapes, names a saved checkpoint holds)."""
    cfg = AutoConfig.for_model(model_type, **TINY)
    for knob in KNOBS:
        if knob in cfg.to_dict():
            setattr(cfg, knob, knobs_on)
    cfg.tie_word_embeddings = tie
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    tied = set(model._tied_weights_keys or {}) if tie else set()
    saved = [n for n in shapes if n not in tied]  # save_pretrained drops tied copies
    config = cfg.to_dict() | {"architectures": [type(model).__name__]}
    return config, shapes, saved


def _all_weights(spec: ArchSpec, layers: int) -> list[WeightSpec]:
    per_layer = [w for i in range(layers) for w in spec.layer_weight_names(i)]
    return [*spec.pre_weights, *per_layer, *spec.post_weights]


def test_spec_dir_is_populated():
    assert len(SPEC_FILES) >= 7
    specs = load_specs()
    assert len(specs) == len(SPEC_FILES)
    assert len({s.family for s in specs}) == len(specs)
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma", "gpt2", "phi3"} <= {s.family for s in specs}


@pytest.mark.parametrize("path", SPEC_FILES, ids=lambda p: p.stem)
def test_spec_file_shape(path):
    data = json.loads(path.read_text())
    assert data["family"] == path.stem
    assert "{layer}" in data["layer_prefix"]
    assert data["architectures"] and data["model_types"] and data["num_layers_key"]
    spec = _spec(path)
    names = [w.name for w in _all_weights(spec, 2)]
    assert len(names) == len(set(names)), "a weight is listed twice"
    for w in _all_weights(spec, 2):
        if w.tied_to:
            assert w.optional, f"{w.name} is tied, so a checkpoint may omit it"
            assert w.tied_to in {p.name for p in spec.pre_weights}


@pytest.mark.parametrize("path", TEXT_SPEC_FILES, ids=lambda p: p.stem)
def test_spec_matches_transformers(path):
    spec = _spec(path)
    seen: set[str] = set()
    saved_per_variant: list[set[str]] = []
    for tie in (False, True):
        for knobs_on in (False, True):
            config, shapes, saved = _build(spec.model_types[0], tie, knobs_on)
            layers = TINY["num_hidden_layers"]
            weights = _all_weights(spec, layers)
            by_name = {w.name: w for w in weights}
            label = f"tie={tie} knobs={knobs_on}"
            # (a) every required weight is in the checkpoint; an absent optional one with tied_to can be read there
            for w in weights:
                if not w.optional:
                    assert w.name in saved, f"{label}: required {w.name} missing"
                elif w.name not in saved and w.tied_to:
                    assert tie and w.tied_to in saved, f"{label}: {w.name} absent and untied"
            # (b) every tensor transformers builds is named by the spec
            uncovered = sorted(set(shapes) - set(by_name))
            assert not uncovered, f"{label}: not in spec: {uncovered}"
            # embed flags: exactly the tensors whose rows are vocabulary entries
            for name, shape in shapes.items():
                assert by_name[name].embed == (shape[0] == VOCAB), f"{label}: embed flag of {name}"
            # (c) layer count from config.json, and from names alone
            assert spec.num_layers(config) == layers
            assert spec.num_layers({}, saved) == layers
            assert [spec.layer_of(n) for n in saved].count(None) == len(spec.pre_weights) + len(
                [w for w in spec.post_weights if w.name in saved]
            )
            # (d) the loader picks this file
            assert spec_for(config, saved).family == spec.family
            seen |= set(shapes)
            saved_per_variant.append(set(saved))
    every = _all_weights(spec, TINY["num_hidden_layers"])
    stale = sorted({w.name for w in every} - seen)
    assert not stale, f"spec names tensors no config variant has: {stale}"
    # optional exactly when some variant's checkpoint lacks it (a required weight marked optional hides a gap)
    for w in every:
        assert w.optional == any(w.name not in names for names in saved_per_variant), f"optional flag of {w.name}"


def test_gpt2_bare_pre_and_post_names_are_aliases():
    """openai-community/gpt2 stores `wte.weight`, `h.0.ln_1.weight`, ... without the `transformer.` prefix."""
    spec = next(s for s in load_specs() if s.family == "gpt2")
    _, _, saved = _build("gpt2", tie=True, knobs_on=False)
    bare = {n.removeprefix("transformer.") for n in saved}
    for w in (*spec.pre_weights, *spec.post_weights):
        if not w.optional:
            assert set(w.aliases) & bare, w.name


def test_gpt2_bare_layer_names_are_aliases():
    spec = next(s for s in load_specs() if s.family == "gpt2")
    _, _, saved = _build("gpt2", tie=True, knobs_on=False)
    bare = {n.removeprefix("transformer.") for n in saved}
    for layer in range(TINY["num_hidden_layers"]):
        for w in spec.layer_weight_names(layer):
            assert set(w.aliases) & bare, w.name


def test_gpt_neox_embed_out_alias():
    """Pythia checkpoints store the head as `embed_out.weight` (transformers renames it to `lm_head.weight`)."""
    spec = next(s for s in load_specs() if s.family == "gpt_neox")
    head = next(w for w in spec.post_weights if w.name == "lm_head.weight")
    assert head.aliases == ("embed_out.weight",)


# ---- generic fallback ---------------------------------------------------------------------------------------

LLAMA_LIKE = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "mlp.up_proj.weight", "input_layernorm.weight"]


def _made_up_names(layers: int) -> list[str]:
    names = ["model.embed_tokens.weight"]
    names += [f"model.layers.{i}.{rest}" for i in range(layers) for rest in LLAMA_LIKE]
    names += ["model.layers.1.extra_gate.weight"]  # a weight only one layer has
    return names + ["model.norm.weight", "lm_head.weight"]


def test_infer_spec_on_made_up_architecture():
    config = {"architectures": ["FrobnicatorForCausalLM"], "model_type": "frobnicator", "num_hidden_layers": 3}
    spec = spec_for(config, _made_up_names(3))
    assert spec.inferred and spec.family == "inferred"
    assert spec.architectures == ("FrobnicatorForCausalLM",)
    assert spec.layer_prefix == "model.layers.{layer}."
    assert {w.name: w.optional for w in spec.layer_weights} == {**{n: False for n in LLAMA_LIKE},
                                                                "extra_gate.weight": True}
    assert [(w.name, w.embed) for w in spec.pre_weights] == [("model.embed_tokens.weight", True)]
    assert [(w.name, w.embed) for w in spec.post_weights] == [("model.norm.weight", False), ("lm_head.weight", True)]
    assert spec.num_layers_key == "num_hidden_layers"
    assert spec.num_layers(config) == 3
    assert spec.layer_of("model.layers.2.mlp.up_proj.weight") == 2
    assert spec.layer_of("model.norm.weight") is None


def test_infer_spec_finds_other_layer_keys_and_counts_from_names():
    names = ["wte.weight", *[f"h.{i}.attn.weight" for i in range(5)], "ln_f.weight"]
    spec = infer_spec({"n_layer": 5}, names)
    assert spec.num_layers_key == "n_layer" and spec.layer_prefix == "h.{layer}."
    assert [w.name for w in spec.pre_weights] == ["wte.weight"]
    assert [w.name for w in spec.post_weights] == ["ln_f.weight"]
    no_key = infer_spec({}, names)
    assert no_key.num_layers_key is None
    assert no_key.num_layers({}, names) == 5


def test_infer_spec_agrees_with_llama_file_on_real_names():
    """Renamed so no file claims it, a llama checkpoint's inferred layout equals llama.json's."""
    config, shapes, saved = _build("llama", tie=False, knobs_on=True)
    config["architectures"] = ["NotARealLlamaForCausalLM"]
    inferred = spec_for(config, saved)
    llama = next(s for s in load_specs() if s.family == "llama")
    assert inferred.inferred
    assert inferred.layer_prefix == llama.layer_prefix
    assert sorted(w.name for w in inferred.layer_weights) == sorted(w.name for w in llama.layer_weights)
    assert [w.name for w in inferred.pre_weights] == [w.name for w in llama.pre_weights]
    assert sorted(w.name for w in inferred.post_weights) == sorted(w.name for w in llama.post_weights)
    assert inferred.num_layers(config) == llama.num_layers(config) == 3
