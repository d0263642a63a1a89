"""The pipeline's quick evaluation: perplexity of fixed texts and greedy continuations of fixed prompts.

Perplexity = exp(mean next-token negative log-likelihood over every predicted token of every text), the usual
causal-LM definition (each text scored on its own, its first token only as context). Runs on CPU with transformers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class EvalResult:
    """Scores of one model on one quick suite."""

    perplexity: float
    mean_nll: float
    tokens: int  # predicted tokens the NLL averages over
    generations: tuple[tuple[str, str], ...]  # (prompt, greedy continuation)

    def metrics(self) -> dict[str, float]:
        """The numbers (what DVC and MLflow compare)."""
        return {"perplexity": self.perplexity, "mean_nll": self.mean_nll, "tokens": self.tokens}


def _load(model_dir: Path, tokenizer_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a loading bar per run is noise in `dvc repro` output

    from mergelib.errors import InputModelError

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputModelError(f"{model_dir}: cannot load the model for evaluation ({first})") from None
    return tokenizer, model.eval()


@torch.no_grad()
def text_nll(model, input_ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL of one sequence ([1, T] ids) and the number of predicted tokens (T - 1)."""
    logits = model(input_ids=input_ids).logits.float()  # [1, T, V]
    logprobs = torch.log_softmax(logits[0, :-1], dim=-1)  # [T-1, V]: position i predicts token i+1
    targets = input_ids[0, 1:]  # [T-1]
    return float(-logprobs.gather(1, targets[:, None]).sum()), int(targets.numel())


@torch.no_grad()
def greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The greedy continuation of `prompt` (new tokens only, decoded), stopping at EOS."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def evaluate_model(model_dir: str | Path, tokenizer_dir: str | Path, texts: Sequence[str],
                   prompts: Sequence[str] = (), max_new_tokens: int = 8) -> EvalResult:
    """Perplexity over `texts` and greedy continuations of `prompts` (deterministic on a given machine)."""
    torch.manual_seed(0)
    tokenizer, model = _load(Path(model_dir), Path(tokenizer_dir))
    total, count = 0.0, 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt").input_ids
        if ids.shape[1] < 2:
            continue  # nothing to predict
        nll, n = text_nll(model, ids)
        total, count = total + nll, count + n
    if count == 0:
        from mergelib.config.compose import ConfigError

        raise ConfigError("eval.texts: every text is shorter than two tokens; give longer texts")
    mean = total / count
    gens = tuple((p, greedy(model, tokenizer, p, max_new_tokens)) for p in prompts) if max_new_tokens else ()
    return EvalResult(perplexity=math.exp(mean), mean_nll=mean, tokens=count, generations=gens)
