"""Vision-language models (tiny LLaVA and Qwen2-VL built with transformers): the vision tower, the projector and the
language model are all merged; `slices` cut only the language model's layers; the output loads with the model's
own class and runs on an image tensor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mergelib


def _tensors(root: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(root.glob("*.safetensors")) for k, v in load_file(f).items()}


def _llava(seed: int, path: Path):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=30, patch_size=6, projection_dim=32)
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128)
    LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_index=127,
                                              image_seq_length=25)).save_pretrained(path)


def _qwen2_vl(seed: int, path: Path):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    config = Qwen2VLConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=160,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_chans=3),
        image_token_id=150, video_token_id=151, vision_start_token_id=152)
    Qwen2VLForConditionalGeneration(config).save_pretrained(path)


def _qwen2_5_vl(seed: int, path: Path):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=160, bos_token_id=1, eos_token_id=2,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=28,
                           fullatt_block_indexes=[1]),
        image_token_id=150, video_token_id=151, vision_start_token_id=152)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(path)


FAMILIES = {
    "llava": (_llava, "LlavaForConditionalGeneration", "vision_tower.", "language_model.model.layers."),
    "qwen2_vl": (_qwen2_vl, "Qwen2VLForConditionalGeneration", "visual.", "model.layers."),
    "qwen2_5_vl": (_qwen2_5_vl, "Qwen2_5_VLForConditionalGeneration", "visual.", "model.layers."),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    make, cls, vision, layers = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    for i in range(2):
        make(i, root / f"m{i}")
    return request.param, root, cls, vision, layers


def _run_on_an_image(kind: str, out: Path, cls: str) -> torch.Tensor:
    import transformers

    model = getattr(transformers, cls).from_pretrained(out).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        if kind == "llava":
            ids = torch.tensor([[1, *([127] * 25), 5, 6]])
            logits = model(input_ids=ids, pixel_values=torch.randn(1, 3, 30, 30)).logits
        else:  # one 28x28 image: 2x2 patches of 14, merged 2x2 into one image token
            grid = torch.tensor([[1, 2, 2]])
            pixels = torch.randn(4, 3 * 2 * 14 * 14)
            ids = torch.tensor([[1, 152, 150, 5, 6]])
            kinds = (ids == 150).long()  # what the processor returns: 1 at image tokens, 0 at text
            logits = model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=kinds).logits
    assert torch.isfinite(logits).all()
    return logits


def test_a_linear_merge_merges_vision_tower_projector_and_language_model(family, tmp_path):
    kind, root, cls, vision, layers = family
    recipe = {"merge_method": "linear",
              "models": [{"model": str(root / f"m{i}"), "parameters": {"weight": 0.5}} for i in range(2)]}
    result = mergelib.merge(recipe, tmp_path / "out", quiet=True)
    assert result.plan.left_out == ()
    a, b, merged = _tensors(root / "m0"), _tensors(root / "m1"), _tensors(tmp_path / "out")
    assert merged.keys() == a.keys()
    assert any(k.startswith(vision) for k in merged) and any(k.startswith(layers) for k in merged)
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, (a[name] * 0.5 + b[name] * 0.5), rtol=1e-6, atol=1e-7)
    _run_on_an_image(kind, tmp_path / "out", cls)


def test_slices_cut_only_the_language_models_layers(family, tmp_path):
    kind, root, cls, vision, layers = family
    recipe = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(root / "m0"), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(root / "m1"), "layer_range": [1, 3]}]},
    ]}
    mergelib.merge(recipe, tmp_path / "out", quiet=True)
    a, b, merged = _tensors(root / "m0"), _tensors(root / "m1"), _tensors(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 4
    if "layer_types" in config["text_config"]:
        assert len(config["text_config"]["layer_types"]) == 4
    lm_layers = {int(k[len(layers):].split(".")[0]) for k in merged if k.startswith(layers)}
    assert lm_layers == {0, 1, 2, 3}
    for out_layer, (model, layer) in enumerate([(a, 0), (a, 1), (b, 1), (b, 2)]):
        for name in (k for k in model if k.startswith(f"{layers}{layer}.")):
            assert torch.equal(merged[name.replace(f"{layers}{layer}.", f"{layers}{out_layer}.")], model[name])
    vision_names = [k for k in a if k.startswith(vision)]
    assert vision_names and all(torch.equal(merged[k], a[k]) for k in vision_names)  # the first slice's tower
    _run_on_an_image(kind, tmp_path / "out", cls)


def test_the_spec_names_every_tensor_of_the_checkpoint(family):
    from mergelib.arch import spec_for
    from mergelib.io.index import index_model, read_config

    kind, root, cls, vision, layers = family
    config, names = read_config(root / "m0"), list(index_model(root / "m0").tensors)
    spec = spec_for(config, names)
    assert spec.family == kind.replace("qwen2_5_vl", "qwen2_vl") and not spec.inferred
    assert spec.num_layers(config) == 3 and spec.num_layers({}, names) == 3
    listed = {w.name for i in range(3) for w in spec.layer_weight_names(i)} | \
        {w.name for w in (*spec.pre_weights, *spec.post_weights)}
    assert all(n in listed or spec.carries(n) for n in names)
    assert all(w.name in names for i in range(3) for w in spec.layer_weight_names(i) if not w.optional)
    assert [n for n in names if spec.carries(n)] and all(spec.layer_of(n) is None for n in names if spec.carries(n))
