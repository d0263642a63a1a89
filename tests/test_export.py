"""Exports: safetensors re-save, GGUF (layout and values read back by the gguf package's reader, the model by
transformers' GGUF reader), int8; the comparison math against plain loops; a failed check raises one line."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import gguf
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergelib.export import (
    ExportCheckError,
    ExportError,
    compare_logits,
    export_all,
    export_gguf,
    export_safetensors,
    verify_export,
)
from mergelib.export.check import DEFAULT_PROMPTS, failures, run_source
from mergelib.export.gguf_file import _Writer
from mergelib.export.gguf_meta import describe, interleave_rope_rows
from mergelib.export.gguf_vocab import read_vocab, write_vocab
from mergelib.export.int8 import dequantize_rows, quantize_rows
from mergelib.export.resave import group_slots
from mergelib.io.hashing import sha256_file
from mergelib.io.index import index_model
from mergelib.io.reader import read_tensor
from mergelib.io.writer import TensorSlot

# ---------------------------------------------------------------- rotary row order


def interleave_loop(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """Row h*d + 2i <- h*d + i and row h*d + 2i + 1 <- h*d + d/2 + i, one row at a time."""
    d = t.shape[0] // n_head
    out = torch.empty_like(t)
    for h in range(n_head):
        for i in range(d // 2):
            out[h * d + 2 * i] = t[h * d + i]
            out[h * d + 2 * i + 1] = t[h * d + d // 2 + i]
    return out


@pytest.mark.parametrize("n_head,head_dim,cols", [(1, 4, 1), (2, 6, 3), (3, 8, 2), (4, 16, 0)])
def test_interleave_rope_rows_matches_loop(n_head, head_dim, cols):
    shape = (n_head * head_dim, cols) if cols else (n_head * head_dim,)
    t = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape)
    assert torch.equal(interleave_rope_rows(t, n_head), interleave_loop(t, n_head))


def test_interleave_golden_and_undone_by_transformers_reader():
    assert interleave_rope_rows(torch.tensor([0.0, 1.0, 2.0, 3.0]), 1).tolist() == [0.0, 2.0, 1.0, 3.0]
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    t = torch.randn(4 * 8, 5)
    back = LlamaTensorProcessor()._reverse_permute_weights(interleave_rope_rows(t, 4).numpy(), 4, 4)
    assert np.array_equal(back, t.numpy())


# ---------------------------------------------------------------- int8


def quantize_loop(w: torch.Tensor) -> tuple[list[list[int]], list[float]]:
    """Per row: s = max|w| / 127 (1 for a zero row), q = round-half-even(w / s) clipped, all in float32."""
    qs, scales = [], []
    for row in w.tolist():
        amax = max(abs(np.float32(x)) for x in row)
        s = np.float32(amax) / np.float32(127) if amax > 0 else np.float32(1)
        qs.append([max(-127, min(127, round(float(np.float32(x) / s)))) for x in row])
        scales.append(float(s))
    return qs, scales


def test_quantize_rows_matches_loop_and_golden():
    w = torch.randn(5, 7)
    w[2] = 0.0
    q, scale = quantize_rows(w)
    want_q, want_s = quantize_loop(w)
    assert q.dtype == torch.int8 and q.tolist() == want_q and scale.tolist() == want_s
    q, scale = quantize_rows(torch.tensor([[2.54, -1.0, 0.5], [0.0, 0.0, 0.0]]))
    assert q.tolist() == [[127, -50, 25], [0, 0, 0]]
    assert scale.tolist() == pytest.approx([0.02, 1.0])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.floats(-100, 100, width=32), min_size=1, max_size=9), min_size=1, max_size=5)
       .filter(lambda rows: len({len(r) for r in rows}) == 1))
def test_int8_error_is_at_most_half_a_step(rows):
    w = torch.tensor(rows, dtype=torch.float32)
    q, scale = quantize_rows(w)
    err = (dequantize_rows(q, scale) - w).abs()
    assert bool((err <= scale[:, None] * 0.5001 + 1e-30).all())
    assert int(q.abs().max()) <= 127
    nonzero = w.abs().amax(1) > 0
    assert bool((q.abs().amax(1)[nonzero] == 127).all())  # each row's largest weight uses the full range


# ---------------------------------------------------------------- comparison math


def compare_loop(ref: list[list[float]], cand: list[list[float]], targets: list[int]) -> dict:
    kls, agree, nll_r, nll_c = [], 0, 0.0, 0.0
    for k, (a, b) in enumerate(zip(ref, cand)):
        za, zb = sum(math.exp(x) for x in a), sum(math.exp(x) for x in b)
        p, q = [math.exp(x) / za for x in a], [math.exp(x) / zb for x in b]
        kls.append(sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q)))
        agree += a.index(max(a)) == b.index(max(b))
        if k < len(targets):
            nll_r -= math.log(p[targets[k]])
            nll_c -= math.log(q[targets[k]])
    return {"kl_mean": sum(kls) / len(kls), "kl_max": max(kls), "top1": agree / len(ref),
            "nll_source": nll_r / len(targets), "nll_export": nll_c / len(targets)}


def test_compare_logits_matches_loops():
    ref = torch.randn(4, 6) * 3
    cand = ref + 0.3 * torch.randn(4, 6)
    targets = [torch.tensor([1, 5]), torch.tensor([], dtype=torch.long)]
    got = compare_logits([ref[:3], ref[3:]], [cand[:3], cand[3:]], targets)
    want = compare_loop(ref.tolist(), cand.tolist(), [1, 5])
    for key, value in want.items():
        if key.startswith("nll"):
            continue
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    # nll over the positions that have a next token: prompt 0 positions 0 and 1
    want_nll = compare_loop(ref[:2].tolist(), cand[:2].tolist(), [1, 5])
    assert got["nll_source"] == pytest.approx(want_nll["nll_source"], rel=1e-9)
    assert got["nll_export"] == pytest.approx(want_nll["nll_export"], rel=1e-9)
    assert got["positions"] == 4 and got["max_abs_logit_diff"] == pytest.approx(float((ref - cand).abs().max()))


def test_compare_logits_golden():
    same = torch.randn(3, 5)
    got = compare_logits([same], [same.clone()])
    assert got["kl_mean"] == 0.0 and got["top1"] == 1.0 and got["max_abs_logit_diff"] == 0.0
    # p = (1/4, 3/4), q = (3/4, 1/4): KL = 1/4 ln(1/3) + 3/4 ln 3 = ln(3) / 2
    ref = torch.tensor([[0.0, math.log(3)]], dtype=torch.float64)
    cand = torch.tensor([[math.log(3), 0.0]], dtype=torch.float64)
    got = compare_logits([ref], [cand])
    assert got["kl_mean"] == pytest.approx(math.log(3) / 2, rel=1e-12)
    assert got["top1"] == 0.0 and got["top1_clear"] == 0.0 and got["ties"] == 0


def test_near_ties_do_not_count_against_top1():
    ref = torch.tensor([[1.0, 1.0005, 0.0], [0.0, 2.0, 0.0]])
    cand = torch.tensor([[1.0006, 1.0, 0.0], [0.0, 2.0, 0.0]])
    got = compare_logits([ref], [cand])
    assert got["top1"] == 0.5 and got["ties"] == 1 and got["top1_clear"] == 1.0


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.0, 5.0))
def test_kl_is_never_negative(seed, noise):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(3, 7, generator=g)
    got = compare_logits([ref], [ref + noise * torch.randn(3, 7, generator=g)])
    assert got["kl_mean"] >= -1e-12 and got["kl_max"] >= got["kl_mean"] - 1e-12


def test_failure_messages():
    assert failures("gguf-q8_0", {"kl_mean": 0.02, "top1_clear": 1.0}, {"max_kl": 0.01}) == [
        "gguf-q8_0 KL 0.02 >= 0.01"]
    assert failures("gguf-f16", {"kl_mean": 0.0, "top1_clear": 0.99}, {"min_top1": 1.0}) == [
        "gguf-f16 top-1 agreement 0.9900 < 1 (positions with a clear winner)"]
    assert failures("gguf-q4_0", {"kl_mean": 9.0, "top1_clear": 0.1}, {}) == []
    with pytest.raises(ExportCheckError, match="unknown key"):
        failures("gguf-q4_0", {"kl_mean": 0.0, "top1_clear": 1.0}, {"max_kld": 1})


# ---------------------------------------------------------------- safetensors


def test_group_slots_is_greedy_in_order():
    slots = [TensorSlot(n, (s,), torch.float32) for n, s in [("a", 10), ("b", 10), ("c", 30), ("d", 5)]]
    shards = group_slots(slots, 80)  # 40, 40, 120 (alone), 20 bytes
    assert [[s.name for s in g] for g in shards.values()] == [["a", "b"], ["c"], ["d"]]
    assert list(shards) == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    with pytest.raises(ExportError, match="shard_size"):
        group_slots(slots, 0)


def test_safetensors_export_casts_reshards_and_repeats(tiny_family, tmp_path):
    base = tiny_family.base
    art = export_safetensors(base, tmp_path / "bf16", dtype="bfloat16", shard_size=40_000)
    index = index_model(tmp_path / "bf16")
    source = index_model(base)
    assert set(index.tensors) == set(source.tensors) and len(index.files) > 1
    assert (tmp_path / "bf16" / "model.safetensors.index.json").is_file()
    for name, info in source.tensors.items():
        got = read_tensor(name, index.tensors[name])
        assert got.dtype == torch.bfloat16 and torch.equal(got, read_tensor(name, info).to(torch.bfloat16))
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "bf16" / name).read_bytes() == (base / name).read_bytes()
    assert art.files == {p: sha256_file(tmp_path / "bf16" / p) for p in art.files}
    assert art.name == "safetensors-bfloat16"
    assert art.bytes == sum((tmp_path / "bf16" / p).stat().st_size for p in art.files)
    again = export_safetensors(base, tmp_path / "bf16", dtype="bfloat16", shard_size=40_000)
    assert again.files == art.files  # same inputs, same bytes; the old directory was replaced
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind
    with pytest.raises(ExportError, match="dtype 'int4'"):
        export_safetensors(base, tmp_path / "x", dtype="int4")


# ---------------------------------------------------------------- GGUF layout, read by the gguf package


def field(reader: gguf.GGUFReader, key: str):
    return reader.get_field(key).contents()


def test_gguf_metadata_and_values_read_back(tiny_family, tmp_path):
    base = tiny_family.base
    export_gguf(base, tmp_path / "m.gguf", gguf_type="q8_0", name="tiny")
    r = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert field(r, "general.architecture") == "llama" and field(r, "general.name") == "tiny"
    assert field(r, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert field(r, "general.quantization_version") == gguf.GGML_QUANT_VERSION
    expected = {"block_count": 4, "embedding_length": 64, "feed_forward_length": 128, "context_length": 256,
                "attention.head_count": 4, "attention.head_count_kv": 2, "rope.dimension_count": 16,
                "attention.key_length": 16, "vocab_size": 260}
    for key, value in expected.items():
        assert field(r, f"llama.{key}") == value, key
    assert field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    vocab = json.loads((base / "tokenizer.json").read_text())["model"]["vocab"]
    tokens = field(r, "tokenizer.ggml.tokens")
    assert len(tokens) == 260 and all(tokens[i] == t for t, i in vocab.items())
    assert tokens[:4] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert field(r, "tokenizer.ggml.token_type")[:5] == [3, 3, 3, 3, 1]
    assert field(r, "tokenizer.ggml.model") == "gpt2" and field(r, "tokenizer.ggml.pre") == "gpt-2"
    assert field(r, "tokenizer.ggml.merges") == []  # present (llama.cpp needs the key) and empty: byte-level
    assert (field(r, "tokenizer.ggml.bos_token_id"), field(r, "tokenizer.ggml.eos_token_id")) == (1, 2)
    assert field(r, "tokenizer.ggml.add_bos_token") is True and field(r, "tokenizer.ggml.add_eos_token") is False
    assert "bos_token" in field(r, "tokenizer.chat_template")

    source = index_model(base)
    names = {t.name: t for t in r.tensors}
    assert len(names) == len(source.tensors) == 4 * 9 + 3
    assert [t.name for t in r.tensors][:2] == ["token_embd.weight", "blk.0.attn_k.weight"]
    assert r.tensors[-1].name == "output.weight"
    for name, info in source.tensors.items():
        stem = name.removeprefix("model.")
        gname = (stem.replace("embed_tokens", "token_embd").replace("layers.", "blk.")
                 .replace("self_attn.q_proj", "attn_q").replace("self_attn.k_proj", "attn_k")
                 .replace("self_attn.v_proj", "attn_v").replace("self_attn.o_proj", "attn_output")
                 .replace("mlp.gate_proj", "ffn_gate").replace("mlp.up_proj", "ffn_up")
                 .replace("mlp.down_proj", "ffn_down").replace("post_attention_layernorm", "ffn_norm")
                 .replace("input_layernorm", "attn_norm").replace("lm_head", "output"))
        gname = "output_norm.weight" if gname == "norm.weight" else gname
        t = names[gname]
        want = read_tensor(name, info).float()
        if "attn_q" in gname:
            want = interleave_loop(want, 4)
        elif "attn_k" in gname:
            want = interleave_loop(want, 2)
        if len(info.shape) == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            assert np.array_equal(np.asarray(t.data), want.numpy())
            continue
        assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
        got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(want.shape)
        # Q8_0: 32-wide blocks, step amax/127, scale stored as f16: error under one step per block
        blocks = want.numpy().reshape(-1, 32)
        step = np.abs(blocks).max(axis=1, keepdims=True) / 127
        assert np.all(np.abs(got.reshape(-1, 32) - blocks) <= step * 1.01), gname


def test_gguf_f16_stores_the_f16_values(tiny_family, tmp_path):
    export_gguf(tiny_family.base, tmp_path / "m.gguf", gguf_type="f16")
    r = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    source = index_model(tiny_family.base)
    t = next(t for t in r.tensors if t.name == "blk.1.ffn_down.weight")
    want = read_tensor("model.layers.1.mlp.down_proj.weight", source.tensors["model.layers.1.mlp.down_proj.weight"])
    assert t.tensor_type == gguf.GGMLQuantizationType.F16
    assert np.array_equal(np.asarray(t.data).reshape(want.shape), want.to(torch.float16).numpy())


# ---------------------------------------------------------------- read back by transformers, thresholds


@pytest.fixture(scope="module")
def source_run(tiny_family):
    return run_source(tiny_family.base)


@pytest.fixture(scope="module")
def exported(tiny_family, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "out"
    return export_all(tiny_family.base, out, safetensors=("bfloat16",), gguf=("f16", "q8_0", "q4_0"), int8=True,
                      name="tiny")


def test_exports_read_back_within_thresholds(exported):
    checks = exported.checks
    assert set(checks) == {"safetensors-bfloat16", "gguf-f16", "gguf-q8_0", "gguf-q4_0", "safetensors-int8"}
    assert exported.passed and all(c["tokens_match"] for c in checks.values())
    assert checks["gguf-f16"]["top1_clear"] == 1.0 and checks["gguf-f16"]["thresholds"] == {"min_top1": 1.0}
    assert checks["gguf-q8_0"]["kl_mean"] < 0.01 and checks["safetensors-int8"]["kl_mean"] < 0.01
    assert checks["gguf-q4_0"]["thresholds"] == {}  # recorded only
    # fewer bits, more divergence
    assert checks["gguf-f16"]["kl_mean"] < checks["gguf-q8_0"]["kl_mean"] < checks["gguf-q4_0"]["kl_mean"]
    assert checks["gguf-f16"]["max_abs_logit_diff"] < 1e-3
    metrics = json.loads((exported.out_dir / "metrics.json").read_text())
    assert metrics == exported.metrics()
    assert all(isinstance(v, (int, float, bool)) for m in metrics.values() for v in m.values())
    report = json.loads((exported.out_dir / "export_report.json").read_text())
    q8 = report["artifacts"]["gguf-q8_0"]
    assert q8["files"] == {"tiny-q8_0.gguf": sha256_file(exported.out_dir / "tiny-q8_0.gguf")}
    sizes = {k: a.bytes for k, a in exported.artifacts.items()}
    assert sizes["gguf-q4_0"] < sizes["gguf-q8_0"] < sizes["gguf-f16"]


def test_failed_check_raises_one_line(tiny_family, exported, source_run, tmp_path):
    q4 = exported.artifacts["gguf-q4_0"]
    with pytest.raises(ExportCheckError) as err:
        verify_export(source_run, q4, thresholds={"max_kl": 1e-9})
    assert "\n" not in str(err.value) and str(err.value).startswith("export check failed: gguf-q4_0 KL ")
    with pytest.raises(ExportCheckError, match=r"gguf-q4_0 top-1 agreement .* < 1 .*metrics.json"):
        export_all(tiny_family.base, tmp_path / "out", gguf=("q4_0",), thresholds={"gguf-q4_0": {"min_top1": 1.0}},
                   prompts=DEFAULT_PROMPTS[1:2])
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["gguf-q4_0"]["passed"] is False  # the metric records the failure the stage reports


def test_an_export_that_does_not_load_fails_its_check(exported, source_run, tmp_path):
    good = exported.artifacts["gguf-f16"]
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(good.path.read_bytes()[: good.bytes // 2])
    result = verify_export(source_run, replace(good, path=broken), raise_on_fail=False)
    assert result["passed"] is False and result["failures"][0].startswith("gguf-f16 does not load back (")
    with pytest.raises(ExportCheckError, match="gguf-f16 does not load back"):
        verify_export(source_run, replace(good, path=broken))


def test_int8_export_is_compressed_tensors_read_by_transformers(exported, tiny_family):
    from transformers import AutoModelForCausalLM

    path = exported.artifacts["safetensors-int8"].path
    config = json.loads((path / "config.json").read_text())
    assert config["quantization_config"]["format"] == "naive-quantized"
    index = index_model(path)
    source = index_model(tiny_family.base)
    name = "model.layers.2.mlp.up_proj.weight"
    q, scale = read_tensor(name, index.tensors[name]), read_tensor(name + "_scale", index.tensors[name + "_scale"])
    assert q.dtype == torch.int8 and scale.shape == (q.shape[0], 1)
    want_q, want_s = quantize_loop(read_tensor(name, source.tensors[name]))
    assert q.tolist() == want_q and scale.flatten().tolist() == want_s
    assert index.tensors["lm_head.weight"].dtype == torch.float32  # kept in float
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.int8  # held compressed until used


# ---------------------------------------------------------------- refusals


def tiny_config(**changes) -> dict:
    config = {"model_type": "llama", "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64,
              "num_hidden_layers": 2, "intermediate_size": 128, "max_position_embeddings": 256,
              "rms_norm_eps": 1e-6, "vocab_size": 260}
    return {**config, **changes}


def test_unsupported_models_are_refused_with_the_field():
    assert describe(tiny_config()).arch == "llama" and describe(tiny_config(model_type="mistral")).arch == "llama"
    assert describe(tiny_config(model_type="qwen2")).arch == "qwen2"
    with pytest.raises(ExportError, match="model_type 'gpt2'"):
        describe(tiny_config(model_type="gpt2"))
    with pytest.raises(ExportError, match="rope type 'llama3'"):
        describe(tiny_config(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}))
    with pytest.raises(ExportError, match="gguf type 'q4_k'"):
        export_gguf("unused", "unused.gguf", gguf_type="q4_k")


def test_exports_never_replace_foreign_paths(tiny_family, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    (tmp_path / "notes.gguf").write_text("not a gguf")
    with pytest.raises(ExportError, match="is not empty and is not an export"):
        export_safetensors(tiny_family.base, tmp_path / "mine")
    with pytest.raises(ExportError, match="is not empty and is not an export"):
        export_all(tiny_family.base, tmp_path / "mine", gguf=("f16",), verify=False)
    with pytest.raises(ExportError, match="is not a GGUF file"):
        export_gguf(tiny_family.base, tmp_path / "notes.gguf", gguf_type="f16")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert (tmp_path / "notes.gguf").read_text() == "not a gguf"


def test_bad_export_requests(tiny_family, tmp_path):
    with pytest.raises(ExportError, match="nothing asked"):
        export_all(tiny_family.base, tmp_path / "o")
    with pytest.raises(ExportError, match="gguf type 'q5_k'"):
        export_all(tiny_family.base, tmp_path / "o", gguf=("q5_k",))
    assert not (tmp_path / "o").exists()


def test_unknown_pre_tokenizer_is_refused(tiny_family, tmp_path):
    tok = json.loads((tiny_family.base / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ExportError, match="pre_tokenizer .*not a split GGUF readers know"):
        read_vocab(tmp_path, {"vocab_size": 260})


def test_sentencepiece_style_vocab_reads_back_in_transformers(tmp_path):
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ["\u2581", "t", "h", "e", "a", "c", "\u2581t", "he", "\u2581the", "at", "\u2581c", "\u2581cat", "s"]:
        vocab[piece] = len(vocab)
    merges = [("\u2581", "t"), ("h", "e"), ("\u2581t", "he"), ("a", "t"), ("\u2581", "c"), ("\u2581c", "at")]
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    core.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    core.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(" ", 1, 0)])
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    core.add_special_tokens(["<unk>", "<s>", "</s>"])
    source = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    source.save_pretrained(tmp_path / "tok")
    meta = read_vocab(tmp_path / "tok", {"vocab_size": 280})
    assert meta.model == "llama" and meta.pre is None and meta.add_space_prefix is True and meta.add_bos
    assert meta.token_types[:4] == [2, 3, 3, 6] and meta.token_types[-1] == 5  # unknown, control, byte, unused
    assert meta.scores[:3] == [0.0, -1.0, -2.0] and meta.merges[2] == "\u2581t he"
    writer = _Writer(tmp_path / "v.gguf", "llama")
    write_vocab(writer, meta)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="v.gguf")
    # text starting with a space is left out: transformers' GGUF reader rebuilds a Metaspace tokenizer that
    # prefixes one space less there than the Prepend normalizer (and llama.cpp) do
    for text in ["the cat", "hello the cats!", "cat  the", "\u00e9 \u00fc \u732b"]:
        assert back(text)["input_ids"] == source(text)["input_ids"], text


# ---------------------------------------------------------------- other architectures (slow)


@pytest.mark.slow
@pytest.mark.parametrize("arch,tie", [("mistral", False), ("qwen2", False), ("qwen3", False), ("llama", True)])
def test_other_architectures_read_back(tmp_path, arch, tie):
    from mergelib.families.tiny import make_model

    model = make_model(tmp_path / arch, arch=arch, tie_embeddings=tie)
    result = export_all(model, tmp_path / "out", gguf=("f16", "bf16", "q8_0", "q4_0"), int8=True)
    assert result.passed and all(c["tokens_match"] for c in result.checks.values())
    assert result.checks["gguf-f16"]["top1_clear"] == 1.0 and result.checks["gguf-q8_0"]["kl_mean"] < 0.01
    reader = gguf.GGUFReader(str(result.artifacts["gguf-q8_0"].path))
    assert ("output.weight" in {t.name for t in reader.tensors}) is not tie
    if arch == "qwen3":
        assert any("head_dim" in note for note in result.checks["gguf-f16"]["notes"])
