"""Quantised checkpoints as inputs: FP8 (per-tensor, per-row and block scales) and MXFP4 tensors are dequantised on
read, each compared with a dequantisation written another way (loops over blocks; transformers' own MXFP4 code),
and a merge of an FP8 checkpoint gives the dequantised weights, an unquantised config and a card that says so."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import mergelib
from mergelib.io.index import index_model
from mergelib.io.quantized import FP4_E2M1
from mergelib.io.reader import read_rows, read_tensor

BIN = Path(sys.executable).parent
BLOCK = 16


def _quantize_fp8(weight: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 values, scale) of a 2-D weight: one scale ("tensor"), one per row ("row"), or per BLOCK x BLOCK."""
    w = weight.float()
    if layout == "tensor":
        scale = w.abs().max().clamp(min=1e-12) / 448
        return (w / scale).to(torch.float8_e4m3fn), scale.reshape(())
    if layout == "row":
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 448
        return (w / scale).to(torch.float8_e4m3fn), scale
    rows, cols = -(-w.shape[0] // BLOCK), -(-w.shape[1] // BLOCK)
    scale = torch.empty(rows, cols)
    q = torch.empty_like(w)
    for i in range(rows):
        for j in range(cols):
            block = w[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK]
            scale[i, j] = block.abs().max().clamp(min=1e-12) / 448
            q[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK] = block / scale[i, j]
    return q.to(torch.float8_e4m3fn), scale


def _reference_fp8(q: torch.Tensor, scale: torch.Tensor, layout: str) -> np.ndarray:
    """Dequantisation written another way: numpy, one element block at a time."""
    values = q.float().numpy().astype(np.float64)
    s = scale.numpy().astype(np.float64)
    out = np.empty_like(values)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            factor = s if layout == "tensor" else (s[i, 0] if layout == "row" else s[i // BLOCK, j // BLOCK])
            out[i, j] = np.float32(np.float32(values[i, j]) * np.float32(factor))
    return out.astype(np.float32)


def _fp8_model(source: Path, target: Path, layout: str) -> dict[str, np.ndarray]:
    """A copy of `source` (sharded) with every 2-D projection stored as FP8 in `layout`; the reference dequantised
    values."""
    shutil.copytree(source, target)
    expected = {}
    index_path = target / "model.safetensors.index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else None
    for shard in sorted(target.glob("*.safetensors")):
        out = {}
        for name, tensor in load_file(shard).items():
            if tensor.dim() == 2 and "proj" in name:
                q, scale = _quantize_fp8(tensor, layout)
                extra = {name + ("_scale_inv" if layout == "block" else "_scale"): scale}
                if layout != "block":
                    extra[name.rsplit(".", 1)[0] + ".input_scale"] = torch.ones(())
                out.update({name: q, **extra})
                if index is not None:
                    index["weight_map"].update({k: shard.name for k in extra})
                expected[name] = _reference_fp8(q, scale, layout)
            else:
                out[name] = tensor
        save_file(out, shard, metadata={"format": "pt"})
    if index is not None:
        index_path.write_text(json.dumps(index))
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"] = ({"quant_method": "fp8", "weight_block_size": [BLOCK, BLOCK]} if layout == "block"
                                     else {"quant_method": "compressed-tensors"})
    (target / "config.json").write_text(json.dumps(config))
    assert expected
    return expected


@pytest.mark.parametrize("layout", ["tensor", "row", "block"])
def test_fp8_tensors_read_as_their_dequantised_values(tiny_family, tmp_path, layout):
    expected = _fp8_model(tiny_family.finetunes[0], tmp_path / "fp8", layout)
    index = index_model(tmp_path / "fp8")
    assert index.note and "dequantised on read" in index.note
    assert not [n for n in index.tensors if n.endswith(("_scale", "_scale_inv", "input_scale"))]
    for name, want in expected.items():
        info = index.tensors[name]
        assert info.dequant is not None and info.shape == want.shape
        got = read_tensor(name, info)
        assert got.dtype == torch.float32 and np.array_equal(got.numpy(), want), name
        assert torch.equal(read_rows(name, info, 3, 7), got[3:7])


def test_block_scales_that_do_not_tile_the_weight_are_one_line_errors(tiny_family, tmp_path):
    _fp8_model(tiny_family.finetunes[0], tmp_path / "fp8", "block")
    shard = sorted((tmp_path / "fp8").glob("*.safetensors"))[0]
    tensors = load_file(shard)
    name = next(n for n in tensors if n.endswith("_scale_inv") and tensors[n].shape[0] > 1)
    tensors[name] = tensors[name][:-1]  # one block row short
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(mergelib.errors.InputModelError, match="does not tile a weight"):
        index_model(tmp_path / "fp8")


def test_a_merge_of_fp8_inputs_is_of_their_dequantised_weights(tiny_family, tmp_path):
    expected = _fp8_model(tiny_family.finetunes[0], tmp_path / "fp8", "block")
    recipe = {"merge_method": "task_arithmetic", "base_model": str(tiny_family.base), "dtype": "float32",
              "out_dtype": "float32",
              "models": [{"model": str(tmp_path / "fp8"), "parameters": {"weight": 1.0}}]}
    out = mergelib.merge(recipe, tmp_path / "out", quiet=True).out_dir
    merged = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    base = {k: v for f in sorted(tiny_family.base.glob("*.safetensors")) for k, v in load_file(f).items()}
    for name, want in expected.items():  # base + (ft - base) = the dequantised fine-tune, up to float32 rounding
        torch.testing.assert_close(merged[name], torch.from_numpy(want), rtol=1e-6, atol=1e-6)
        assert merged[name].dtype == torch.float32 and base[name].shape == merged[name].shape
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    card = (out / "README.md").read_text()
    assert "merge of dequantised weights" in card and "FP8 with 16x16 block scales" in card
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)  # loads as a plain checkpoint


def test_cli_notes_the_dequantisation(tiny_family, tmp_path):
    _fp8_model(tiny_family.finetunes[0], tmp_path / "fp8", "row")
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {tmp_path / 'fp8'}\n    parameters: {{weight: 1}}\n"
                      f"  - model: {tiny_family.base}\n    parameters: {{weight: 1}}\n")
    proc = subprocess.run([str(BIN / "mergelib"), "merge", str(recipe), str(tmp_path / "out"), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "note: " in proc.stderr and "FP8 with scales" in proc.stderr and "dequantised weights" in proc.stderr


def _mxfp4(values_shape: tuple[int, int, int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random gpt-oss style blocks [E, R, G, 16] and scales [E, R, G]."""
    g = torch.Generator().manual_seed(seed)
    experts, rows, cols = values_shape
    blocks = torch.randint(0, 256, (experts, rows, cols // 32, 16), generator=g, dtype=torch.int64).to(torch.uint8)
    scales = torch.randint(100, 140, (experts, rows, cols // 32), generator=g, dtype=torch.int64).to(torch.uint8)
    return blocks, scales


def _reference_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    experts, rows, groups, width = blocks.shape
    out = np.empty((experts, rows, groups * width * 2), dtype=np.float32)
    b, s = blocks.numpy(), scales.numpy()
    for e in range(experts):
        for r in range(rows):
            for gi in range(groups):
                factor = math.ldexp(1.0, int(s[e, r, gi]) - 127)
                for k in range(width):
                    byte = int(b[e, r, gi, k])
                    out[e, r, gi * 32 + 2 * k] = FP4_E2M1[byte & 0xF] * factor
                    out[e, r, gi * 32 + 2 * k + 1] = FP4_E2M1[byte >> 4] * factor
    return out.transpose(0, 2, 1)


def test_mxfp4_tensors_read_as_transformers_dequantises_them(tmp_path):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks, scales = _mxfp4((2, 6, 64), seed=1)
    root = tmp_path / "gptoss"
    root.mkdir()
    name = "model.layers.0.mlp.experts.gate_up_proj"
    save_file({name + "_blocks": blocks, name + "_scales": scales, "model.norm.weight": torch.ones(4)},
              root / "model.safetensors", metadata={"format": "pt"})
    (root / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "mxfp4"}}))
    index = index_model(root)
    assert set(index.tensors) == {name, "model.norm.weight"}
    info = index.tensors[name]
    assert info.shape == (2, 64, 6) and "MXFP4" in index.note
    got = read_tensor(name, info)
    assert np.array_equal(got.numpy(), _reference_mxfp4(blocks, scales))
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    assert torch.equal(got, theirs)


def test_a_gpt_oss_mxfp4_checkpoint_merges_into_a_plain_one_that_loads(tmp_path):
    """A tiny gpt-oss whose experts are stored as MXFP4 (the published layout), merged with its float32 twin:
    the output's experts are the mean of the dequantised and the float weights, and it loads and runs unquantised."""
    from transformers import GptOssConfig, GptOssForCausalLM
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    torch.manual_seed(0)
    config = GptOssConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, vocab_size=128, num_local_experts=4,
                          num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"])
    GptOssForCausalLM(config).save_pretrained(tmp_path / "float")
    shutil.copytree(tmp_path / "float", tmp_path / "mxfp4")
    shard = next((tmp_path / "mxfp4").glob("*.safetensors"))
    tensors = load_file(shard)
    dequantised = {}
    for i, name in enumerate(n for n in sorted(tensors) if n.endswith(("experts.gate_up_proj", "experts.down_proj"))):
        experts, cols, rows = tensors.pop(name).shape  # stored [E, rows, cols] as blocks, read back transposed
        blocks, scales = _mxfp4((experts, rows, cols), seed=10 + i)
        tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
        dequantised[name] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    save_file(tensors, shard, metadata={"format": "pt"})
    cfg = json.loads((tmp_path / "mxfp4" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4"}
    (tmp_path / "mxfp4" / "config.json").write_text(json.dumps(cfg))

    recipe = {"merge_method": "linear", "dtype": "float32", "models": [
        {"model": str(tmp_path / "mxfp4"), "parameters": {"weight": 0.5}},
        {"model": str(tmp_path / "float"), "parameters": {"weight": 0.5}}]}
    result = mergelib.merge(recipe, tmp_path / "out", quiet=True)
    assert result.plan.left_out == () and "MXFP4" in result.plan.dequantised_notes()[0]
    merged = {k: v for f in sorted((tmp_path / "out").glob("*.safetensors")) for k, v in load_file(f).items()}
    plain = load_file(next((tmp_path / "float").glob("*.safetensors")))
    for name, values in dequantised.items():
        torch.testing.assert_close(merged[name], values * 0.5 + plain[name] * 0.5, rtol=1e-6, atol=1e-7)
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    model = GptOssForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 5, 9, 3]])).logits).all()
