"""The quick evaluation: perplexity against a per-prefix recomputation and a hand-derived golden value (an all-zero
head gives uniform predictions, so perplexity = vocabulary size), greedy text against a plain argmax loop."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergelib.config.compose import ConfigError
from mergelib.pipeline_eval import evaluate_model

TEXTS = ("23+45=68", "abcd>dcba", "x")


def reference_nll(model, tokenizer, texts) -> tuple[float, int]:
    """Sum of -log p(token t | tokens < t), each prefix run through the model on its own."""
    total, count = 0.0, 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt").input_ids[0].tolist()
        for t in range(1, len(ids)):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids[:t]])).logits[0, -1].double()
            total -= float(logits[ids[t]] - torch.logsumexp(logits, 0))
            count += 1
    return total, count


def reference_greedy(model, tokenizer, prompt: str, steps: int) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids[0].tolist()
    new = []
    for _ in range(steps):
        with torch.no_grad():
            nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
        new.append(nxt)
        if nxt == tokenizer.eos_token_id:
            break
    return tokenizer.decode(new, skip_special_tokens=True)


def test_perplexity_and_greedy_match_independent_loops(tiny_family):
    model_dir = tiny_family.finetunes[0]
    result = evaluate_model(model_dir, model_dir, TEXTS, prompts=("12+", "ab"), max_new_tokens=5)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = reference_nll(model, tokenizer, TEXTS)
    assert result.tokens == count == (8 + 9 + 1)  # byte-level: one token per character, <s> only as context
    assert result.mean_nll == pytest.approx(total / count, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)
    assert result.generations == tuple((p, reference_greedy(model, tokenizer, p, 5)) for p in ("12+", "ab"))
    assert result.metrics() == {"perplexity": result.perplexity, "mean_nll": result.mean_nll, "tokens": count}


def test_zero_head_gives_perplexity_equal_to_vocabulary(tiny_family, tmp_path):
    model_dir = shutil.copytree(tiny_family.base, tmp_path / "uniform")
    for shard in model_dir.glob("*.safetensors"):
        tensors = load_file(shard)
        if "lm_head.weight" in tensors:
            tensors["lm_head.weight"] = torch.zeros_like(tensors["lm_head.weight"])
            save_file(tensors, shard, metadata={"format": "pt"})
    result = evaluate_model(model_dir, model_dir, TEXTS, max_new_tokens=0)
    vocab = AutoModelForCausalLM.from_pretrained(model_dir).config.vocab_size
    assert result.mean_nll == pytest.approx(math.log(vocab), rel=1e-6)
    assert result.perplexity == pytest.approx(vocab, rel=1e-5) and result.generations == ()


def test_no_predictable_token_is_a_config_error(tiny_family):
    with pytest.raises(ConfigError, match="eval.texts"):
        evaluate_model(tiny_family.base, tiny_family.base, [""], max_new_tokens=0)
