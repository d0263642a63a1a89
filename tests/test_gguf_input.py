"""GGUF files as inputs: a tiny Llama exported with mergelib's own GGUF writer (f16, q8_0, q4_0) reads back under
its Hugging Face names and shapes, f16 exactly, q8_0/q4_0 equal to a dequantisation written another way (loops over
GGML blocks, rotary rows un-interleaved by index); K-quant files (written raw: gguf.quants cannot quantise K types)
read through the same plumbing; a merge with a GGUF input loads with transformers; unsupported files are one-line
errors."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import mergelib
from mergelib.errors import InputModelError, MergelibError
from mergelib.export import export_gguf
from mergelib.io.gguf_input import cached_model_dir, check_tokenizer_donor, gguf_model_dir
from mergelib.io.index import index_model
from mergelib.io.reader import read_rows, read_tensor

Q = gguf.GGMLQuantizationType
N_HEAD, N_HEAD_KV = 4, 2  # the tiny family's attention heads


@pytest.fixture(scope="module")
def exported(tiny_family, tmp_path_factory):
    """The tiny fine-tune as GGUF f16, q8_0 and q4_0 files."""
    root = tmp_path_factory.mktemp("gguf-in")
    out = {}
    for kind in ("f16", "q8_0", "q4_0"):
        out[kind] = root / kind / f"tiny-{kind}.gguf"
        out[kind].parent.mkdir()
        export_gguf(tiny_family.finetunes[0], out[kind], gguf_type=kind)
    return out


def _original(tiny_family) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(tiny_family.finetunes[0].glob("*.safetensors")) for k, v in load_file(f).items()}


def _reference_blocks(raw: np.ndarray, qtype: Q, n: int) -> np.ndarray:
    """GGML q8_0 / q4_0 blocks dequantised one block at a time: q8_0 = f16 d + 32 int8 (q * d); q4_0 = f16 d +
    16 bytes, element j (j < 16) the low nibble of byte j and element 16 + j its high nibble, value (q - 8) * d."""
    data = raw.reshape(-1).tobytes()
    size = 34 if qtype == Q.Q8_0 else 18
    out = np.empty(n, dtype=np.float32)
    for b in range(n // 32):
        block = data[b * size:(b + 1) * size]
        d = np.float32(np.frombuffer(block[:2], dtype=np.float16)[0])
        for j in range(size - 2 if qtype == Q.Q8_0 else 16):
            if qtype == Q.Q8_0:
                out[b * 32 + j] = np.float32(np.frombuffer(block[2 + j:3 + j], dtype=np.int8)[0]) * d
            else:
                byte = block[2 + j]
                out[b * 32 + j] = np.float32((byte & 0x0F) - 8) * d
                out[b * 32 + 16 + j] = np.float32((byte >> 4) - 8) * d
    return out


def _uninterleave_loop(rows: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary row order back to Hugging Face's, by index: within a head of d rows, stored rows 2i and
    2i + 1 are Hugging Face rows i and d/2 + i."""
    out = np.empty_like(rows)
    d = rows.shape[0] // n_head
    for h in range(n_head):
        for i in range(d // 2):
            out[h * d + i] = rows[h * d + 2 * i]
            out[h * d + d // 2 + i] = rows[h * d + 2 * i + 1]
    return out


def _hf_layout(name: str, values: np.ndarray) -> np.ndarray:
    if ".q_proj." in name:
        return _uninterleave_loop(values, N_HEAD)
    if ".k_proj." in name:
        return _uninterleave_loop(values, N_HEAD_KV)
    return values


# ---------------------------------------------------------------- index and values


@pytest.mark.parametrize("kind", ["f16", "q8_0", "q4_0"])
def test_index_has_the_original_names_and_shapes(tiny_family, exported, kind):
    original = index_model(tiny_family.finetunes[0])
    for ref in (exported[kind], exported[kind].parent):  # the file, or a directory holding only it
        model_dir = gguf_model_dir(ref)
        index = index_model(model_dir)
        assert {n: i.shape for n, i in index.tensors.items()} == {n: i.shape for n, i in original.tensors.items()}
        assert all(i.dequant.kind == "gguf" for i in index.tensors.values())
        assert f"tiny-{kind}.gguf: dequantised on read (GGUF " in index.note
        assert "the merge is of dequantised weights" in index.note
        want = "F16" if kind == "f16" else kind.upper()
        assert f"30 {want}, 9 F32" in index.note or f"9 F32, 30 {want}" in index.note
        assert index.files == [model_dir / f"tiny-{kind}.gguf"]


def test_config_comes_from_the_gguf_metadata(tiny_family, exported):
    config = json.loads((gguf_model_dir(exported["q8_0"]) / "config.json").read_text())
    original = json.loads((tiny_family.finetunes[0] / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "vocab_size",
                "tie_word_embeddings", "model_type", "architectures", "bos_token_id", "pad_token_id"):
        assert config[key] == original[key], key
    assert config["rope_parameters"] == original["rope_parameters"]


def test_f16_reads_back_the_original_rounded_to_f16(tiny_family, exported):
    original = _original(tiny_family)
    index = index_model(gguf_model_dir(exported["f16"]))
    for name, info in index.tensors.items():
        got = read_tensor(name, info)
        assert got.dtype == torch.float32
        want = original[name].float() if got.dim() == 1 else original[name].to(torch.float16).float()  # norms: F32
        assert torch.equal(got, want), name
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(read_rows(name, index.tensors[name], 3, 9), original[name].half().float()[3:9])


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_quantised_reads_equal_a_block_loop(tiny_family, exported, kind):
    original = _original(tiny_family)
    reader = gguf.GGUFReader(str(exported[kind]))
    stored = {t.name: t for t in reader.tensors}
    index = index_model(gguf_model_dir(exported[kind]))
    names = {"token_embd.weight": "model.embed_tokens.weight",
             "blk.2.attn_q.weight": "model.layers.2.self_attn.q_proj.weight",
             "blk.2.attn_k.weight": "model.layers.2.self_attn.k_proj.weight",
             "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight", "output.weight": "lm_head.weight"}
    for gguf_name, hf in names.items():
        t = stored[gguf_name]
        assert t.tensor_type == Q[kind.upper()]
        shape = tuple(reversed(t.shape.tolist()))
        want = _hf_layout(hf, _reference_blocks(np.asarray(t.data), t.tensor_type, int(t.n_elements)).reshape(shape))
        got = read_tensor(hf, index.tensors[hf])
        assert got.shape == original[hf].shape
        np.testing.assert_array_equal(got.numpy(), want)
        np.testing.assert_array_equal(read_rows(hf, index.tensors[hf], 5, 11).numpy(), want[5:11])
        step = 0.01 if kind == "q8_0" else 0.2  # quantisation error relative to the largest weight
        assert (got - original[hf].float()).abs().max() <= step * original[hf].float().abs().max()


def _k_block(qtype: Q, rng: np.random.Generator) -> bytes:
    """One random K-quant block with finite f16 scales (d, dmin) where the GGML layout keeps them."""
    _, size = gguf.GGML_QUANT_SIZES[qtype]
    block = bytearray(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    scale = np.array([0.01, 0.002], dtype=np.float16).tobytes()
    if qtype == Q.Q6_K:
        block[size - 2:] = scale[:2]  # ql[128], qh[64], scales[16], then d
    else:
        block[:4] = scale  # Q4_K / Q5_K: d, dmin first
    return bytes(block)


def _write_gguf(path: Path, tensors: dict[str, tuple[Q, tuple[int, int]]], arch: str = "llama", seed: int = 0
                ) -> dict[str, np.ndarray]:
    """A minimal GGUF: llama hyperparameters and raw random blocks for each (type, HF shape); returns the bytes."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(64)
    writer.add_embedding_length(256)
    writer.add_block_count(1)
    writer.add_feed_forward_length(256)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    raw = {}
    for name, (qtype, shape) in tensors.items():
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        n_blocks = shape[0] * shape[1] // block
        data = b"".join(_k_block(qtype, rng) for _ in range(n_blocks))
        raw[name] = np.frombuffer(data, dtype=np.uint8).reshape(gguf.quants.quant_shape_to_byte_shape(shape, qtype))
        writer.add_tensor(name, raw[name], raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return raw


def _scale_min_k4(j: int, q: bytes) -> tuple[int, int]:
    """The 6-bit scale and min of sub-block j packed in a K-quant block's 12 scale bytes (GGML's layout)."""
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    return (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)


def _reference_k_block(qtype: Q, block: bytes) -> list[float]:
    """One 256-value K-quant block decoded element by element in Python floats from GGML's block layout (written
    from the format, not with the gguf package): Q4_K/Q5_K = d, dmin, 12 scale bytes, [qh 32,] qs 128; Q6_K = ql 128,
    qh 64, 16 int8 scales, d."""
    half = lambda raw: float(np.frombuffer(raw, dtype=np.float16)[0])  # noqa: E731
    out = [0.0] * 256
    if qtype == Q.Q6_K:
        ql, qh, d = block[:128], block[128:192], half(block[208:210])
        scales = np.frombuffer(block[192:208], dtype=np.int8).tolist()
        for n in range(2):
            for l in range(32):
                sc = scales[8 * n + l // 16:]
                a, b, h = ql[64 * n + l], ql[64 * n + l + 32], qh[32 * n + l]
                values = ((a & 0xF) | ((h & 3) << 4), (b & 0xF) | (((h >> 2) & 3) << 4),
                          (a >> 4) | (((h >> 4) & 3) << 4), (b >> 4) | (((h >> 6) & 3) << 4))
                for part, q in enumerate(values):
                    out[128 * n + 32 * part + l] = d * sc[2 * part] * (q - 32)
        return out
    d, dmin, scales = half(block[0:2]), half(block[2:4]), block[4:16]
    qh, qs = (block[16:48], block[48:176]) if qtype == Q.Q5_K else (None, block[16:144])
    for chunk in range(4):
        for sub in range(2):
            sc, m = _scale_min_k4(2 * chunk + sub, scales)
            for l in range(32):
                q = (qs[32 * chunk + l] >> (4 * sub)) & 0xF
                if qh is not None:
                    q += 16 * ((qh[l] >> (2 * chunk + sub)) & 1)
                out[64 * chunk + 32 * sub + l] = d * sc * q - dmin * m
    return out


def test_k_quants_decode_as_the_ggml_block_layout_says(tmp_path):
    """Each K type against a decoder written from the block layout: the values the merge reads are GGML's."""
    tensors = {"token_embd.weight": (Q.Q4_K, (4, 256)), "blk.0.ffn_down.weight": (Q.Q5_K, (4, 256)),
               "blk.0.ffn_up.weight": (Q.Q6_K, (4, 256))}
    raw = _write_gguf(tmp_path / "k.gguf", tensors, seed=7)
    index = index_model(gguf_model_dir(tmp_path / "k.gguf"))
    for gguf_name, hf in (("token_embd.weight", "model.embed_tokens.weight"),
                          ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
                          ("blk.0.ffn_up.weight", "model.layers.0.mlp.up_proj.weight")):
        qtype, shape = tensors[gguf_name]
        data = raw[gguf_name].tobytes()
        size = gguf.GGML_QUANT_SIZES[qtype][1]
        want = np.array([v for i in range(0, len(data), size) for v in _reference_k_block(qtype, data[i:i + size])],
                        dtype=np.float64).reshape(shape)
        got = read_tensor(hf, index.tensors[hf]).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=f"{qtype.name}")


def test_k_quants_read_in_hugging_face_layout(tmp_path):
    with pytest.raises(NotImplementedError):  # why these files are written raw: gguf cannot quantise K types
        gguf.quants.quantize(np.zeros((1, 256), dtype=np.float32), Q.Q4_K)
    tensors = {"token_embd.weight": (Q.Q4_K, (8, 256)), "blk.0.ffn_down.weight": (Q.Q5_K, (4, 256)),
               "blk.0.attn_q.weight": (Q.Q6_K, (8, 256))}
    raw = _write_gguf(tmp_path / "k.gguf", tensors)
    index = index_model(gguf_model_dir(tmp_path / "k.gguf"))
    assert "GGUF 1 Q4_K, 1 Q5_K, 1 Q6_K" in index.note
    for gguf_name, hf in (("token_embd.weight", "model.embed_tokens.weight"),
                          ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
                          ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight")):
        qtype, shape = tensors[gguf_name]
        want = gguf.quants.dequantize(raw[gguf_name], qtype).reshape(shape)
        want = _uninterleave_loop(want, 2) if "attn_q" in gguf_name else want
        got = read_tensor(hf, index.tensors[hf])
        assert got.shape == shape and np.isfinite(got.numpy()).all()
        np.testing.assert_array_equal(got.numpy(), want)


# ---------------------------------------------------------------- merges


def test_a_linear_merge_with_a_gguf_input(tiny_family, exported, tmp_path):
    recipe = {"merge_method": "linear", "dtype": "float32", "out_dtype": "float32",
              "models": [{"model": str(tiny_family.base), "parameters": {"weight": 0.5}},
                         {"model": str(exported["f16"]), "parameters": {"weight": 0.5}}]}
    result = mergelib.merge(recipe, tmp_path / "out", quiet=True)
    out = result.out_dir
    merged = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    base = {k: v for f in sorted(tiny_family.base.glob("*.safetensors")) for k, v in load_file(f).items()}
    original = _original(tiny_family)
    assert set(merged) == set(base)
    for name, value in merged.items():
        ft = original[name].float() if value.dim() == 1 else original[name].half().float()
        torch.testing.assert_close(value, 0.5 * base[name].float() + 0.5 * ft, rtol=1e-6, atol=1e-6)
    assert any("dequantised on read (GGUF 30 F16, 9 F32)" in line for line in result.plan.dequantised_notes())
    assert "merge of dequantised weights" in (out / "README.md").read_text()
    assert (out / "tokenizer.json").is_file()  # the base (safetensors) is the donor
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)


def test_a_gguf_first_model_donates_the_tokenizer_transformers_rebuilds(tiny_family, exported, tmp_path):
    recipe = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": str(exported["q8_0"]), "parameters": {"weight": 1.0}},
                         {"model": str(tiny_family.base), "parameters": {"weight": 1.0}}]}
    out = mergelib.merge(recipe, tmp_path / "out", quiet=True).out_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 4
    text = "Hello world, 123!"
    assert AutoTokenizer.from_pretrained(out)(text).input_ids == \
        AutoTokenizer.from_pretrained(tiny_family.finetunes[0])(text).input_ids


# ---------------------------------------------------------------- errors


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_unsupported_quant_type_is_a_one_line_error(tmp_path):
    _write_gguf(tmp_path / "iq.gguf", {"token_embd.weight": (Q.Q8_0, (2, 256)),
                                       "blk.0.ffn_up.weight": (Q.IQ2_XXS, (1, 256))})
    with pytest.raises(InputModelError) as exc:
        index_model(gguf_model_dir(tmp_path / "iq.gguf"))
    message = _one_line(exc)
    assert "iq.gguf" in message and "IQ2_XXS" in message and "Q4_K" in message and "blk.0.ffn_up.weight" in message


def test_unsupported_architecture_is_a_one_line_error(tmp_path):
    _write_gguf(tmp_path / "qwen.gguf", {"token_embd.weight": (Q.Q8_0, (2, 256))}, arch="qwen2")
    with pytest.raises(InputModelError) as exc:
        gguf_model_dir(tmp_path / "qwen.gguf")
    message = _one_line(exc)
    assert "qwen.gguf" in message and "'qwen2'" in message and "llama" in message


def test_unknown_tensor_and_ambiguous_directory_are_one_line_errors(tmp_path):
    _write_gguf(tmp_path / "moe.gguf", {"token_embd.weight": (Q.Q8_0, (2, 256)),
                                        "blk.0.ffn_gate_exps.weight": (Q.Q8_0, (2, 256))})
    with pytest.raises(InputModelError) as exc:
        index_model(gguf_model_dir(tmp_path / "moe.gguf"))
    assert "ffn_gate_exps" in _one_line(exc)
    _write_gguf(tmp_path / "other.gguf", {"token_embd.weight": (Q.Q8_0, (2, 256))})
    with pytest.raises(InputModelError) as exc:
        gguf_model_dir(tmp_path)
    assert "2 GGUF files" in _one_line(exc)


def test_a_gguf_donor_without_a_tokenizer_is_refused(tiny_family, tmp_path):
    _write_gguf(tmp_path / "notok.gguf", {"token_embd.weight": (Q.Q8_0, (2, 256))})
    model_dir = cached_model_dir((tmp_path / "notok.gguf").resolve())
    with pytest.raises(InputModelError) as exc:
        check_tokenizer_donor(model_dir, "notok")
    assert "safetensors model the base/first model" in _one_line(exc)
    recipe = {"merge_method": "linear",
              "models": [{"model": str(tmp_path / "notok.gguf"), "parameters": {"weight": 1}}]}
    with pytest.raises(MergelibError, match="safetensors model the base/first model"):
        mergelib.merge(recipe, tmp_path / "out", quiet=True, dry_run=True)
