"""Exact-match answers on held-out prompts: the source model greedily in transformers, each GGUF greedily in llama.cpp
(its own tokenizer), so a quantized file is judged by what its users see: does it still answer the task."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from mergelib.export import llamacpp
from mergelib.export.artifact import ExportArtifact

Example = tuple[str, str]  # (prompt, answer)
MAX_NEW_TOKENS = 8


@torch.inference_mode()
def source_answers(model_dir: str | Path, tokenizer_dir: str | Path | None, prompt_sets: Mapping[str, Sequence[str]],
                   max_new_tokens: int = MAX_NEW_TOKENS) -> dict[str, list[str | None]]:
    """Greedy answer of the transformers model to each prompt of each set (None where no EOS came in
    `max_new_tokens`), one prompt at a time so no padding is involved."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir or model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None \
        else tokenizer.eos_token_id
    eos_ids = set(eos) if isinstance(eos, list) else {eos}
    answers: dict[str, list[str | None]] = {}
    for name, prompts in prompt_sets.items():
        answers[name] = []
        for prompt in prompts:
            ids = torch.tensor([tokenizer(prompt)["input_ids"]])  # [1, T]
            out: list[int] = []
            answer = None
            for _ in range(max_new_tokens):
                nxt = int(model(ids).logits[0, -1].argmax())
                if nxt in eos_ids:
                    answer = tokenizer.decode(out)
                    break
                out.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)  # [1, T + 1]
            answers[name].append(answer)
    return answers


def exact_match(answers: Sequence[str | None], examples: Sequence[Example]) -> float:
    """Fraction of examples answered exactly (an answer that never ended counts as wrong)."""
    return sum(got == want for got, (_, want) in zip(answers, examples, strict=True)) / len(examples)


def answer_accuracy(model_dir: str | Path, tokenizer_dir: str | Path | None, artifacts: Sequence[ExportArtifact],
                    tasks: Mapping[str, Sequence[Example]]) -> dict[str, dict[str, float]]:
    """{"source": {task: exact match}, "<gguf name>": {task: exact match}, ...} for every GGUF in `artifacts`."""
    answers = source_answers(model_dir, tokenizer_dir, {name: [p for p, _ in rows] for name, rows in tasks.items()})
    out = {"source": {name: exact_match(answers[name], rows) for name, rows in tasks.items()}}
    for artifact in artifacts:
        if artifact.kind != "gguf":
            continue
        with llamacpp.open_gguf(artifact.path) as model:
            out[artifact.name] = {name: exact_match(llamacpp.greedy_answers(model, [p for p, _ in rows]), rows)
                                  for name, rows in tasks.items()}
    return out
