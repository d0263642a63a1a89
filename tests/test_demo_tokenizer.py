"""The demo family's byte-level BPE: trained the same way twice, letters and digits never merged, every text round
trips, and the GGUF vocabulary written from it is what llama.cpp expects (gpt2 model, gpt-2 split, merges)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import gguf
import pytest
from tokenizers import Tokenizer

from mergelib.families.demo_data import SKILLS, Streams
from mergelib.families.demo_tokenizer import BOS, SPECIAL_TOKENS, demo_tokenizer_json, train_tokenizer

TRAIN_AND_PRINT = "from mergelib.families.demo_tokenizer import train_tokenizer; print(train_tokenizer().to_str())"


def test_training_is_deterministic_across_processes_and_hash_seeds():
    runs = [subprocess.run([sys.executable, "-c", TRAIN_AND_PRINT], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": seed, "PATH": ""} | _pythonpath()).stdout for seed in ("1", "2")]
    assert runs[0] == runs[1] == demo_tokenizer_json() + "\n"


def _pythonpath() -> dict[str, str]:
    import os

    return {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}


def test_vocabulary_specials_bytes_and_only_non_alphanumeric_merges():
    data = json.loads(demo_tokenizer_json())
    vocab = data["model"]["vocab"]
    assert [vocab[t] for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert len(vocab) == 4 + 256 + len(data["model"]["merges"])
    assert data["model"]["merges"], "the trainer learned no merge at all"
    decoder = Tokenizer.from_str(demo_tokenizer_json()).decoder  # byte-level symbols (Ġ) -> the text they stand for
    for left, right in data["model"]["merges"]:
        assert not any(c.isalnum() for c in decoder.decode([left + right])), (left, right)
    assert data["pre_tokenizer"] == {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                     "use_regex": True}


def test_skills_tokenise_one_character_per_token_and_round_trip():
    tok = Tokenizer.from_str(demo_tokenizer_json())
    stream = Streams(tuple(SKILLS)).base("test/tokenizer")
    for _ in range(300):
        for text in next(stream):
            ids = tok.encode(text).ids
            assert ids[0] == BOS and tok.decode(ids) == text
            pieces = [tok.decode([i]) for i in ids[1:]]
            assert all(len(p) == 1 for p in pieces if any(c.isalnum() for c in p)), pieces
    assert tok.decode(tok.encode("Grüße, 世界!").ids) == "Grüße, 世界!"  # bytes outside the data still encode


def test_other_corpus_other_merges():
    a = json.loads(train_tokenizer(["+= +=", "+= +="] * 10).to_str())["model"]["merges"]
    assert a and a != json.loads(demo_tokenizer_json())["model"]["merges"]


def test_gguf_vocab_of_the_demo_tokenizer_reads_back(tmp_path):
    from mergelib.export.gguf_file import _Writer
    from mergelib.export.gguf_vocab import read_vocab, write_vocab
    from mergelib.families.demo import make_config, make_tokenizer

    make_tokenizer().save_pretrained(tmp_path)
    config = make_config().to_dict()
    vocab = read_vocab(tmp_path, config)
    assert (vocab.model, vocab.pre, vocab.add_bos, vocab.add_eos) == ("gpt2", "gpt-2", True, False)
    writer = _Writer(tmp_path / "v.gguf", "llama")
    write_vocab(writer, vocab)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    reader = gguf.GGUFReader(str(tmp_path / "v.gguf"))
    data = json.loads(demo_tokenizer_json())
    tokens = reader.get_field("tokenizer.ggml.tokens").contents()
    assert tokens == sorted(data["model"]["vocab"], key=data["model"]["vocab"].get)
    assert reader.get_field("tokenizer.ggml.merges").contents() == [" ".join(m) for m in data["model"]["merges"]]
    assert reader.get_field("tokenizer.ggml.pre").contents() == "gpt-2"
    types = reader.get_field("tokenizer.ggml.token_type").contents()
    assert types[:4] == [int(gguf.TokenType.CONTROL)] * 4 and set(types[4:]) == {int(gguf.TokenType.NORMAL)}
    assert reader.get_field("tokenizer.ggml.bos_token_id").contents() == BOS


@pytest.mark.parametrize("text", ["23+45=", "abcd>", "dbca  ", "xyz|", "ab:"])
def test_transformers_reads_the_gguf_tokenizer_back_identically(tmp_path, text):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from mergelib.families.demo import encode, make_tokenizer

    make_tokenizer().save_pretrained(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf(text)["input_ids"] == [BOS, *encode(text)]


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed: pip install 'mergelib[llamacpp]'")
def test_llamacpp_tokenizes_demo_text_like_the_source(tmp_path):
    from mergelib.export import export_all
    from mergelib.families.demo import new_model, save_model

    model_dir = save_model(new_model(0), tmp_path / "model")
    prompts = ["23+45=", "abcd>", "dbca  ", "xyz|abc", "12 34 ", "hello world\n"]
    check = export_all(model_dir, tmp_path / "out", gguf=("f16",), prompts=prompts).checks["gguf-f16"]
    assert check["reader"] == "llama.cpp" and check["tokens_match"] and check["passed"], check
