"""The search's cheap scorer: greedy exact match of a model on a shipped task's validation (or test) prompts.

It scores what the evaluate stage scores (lm-eval's `generate_until` + `exact_match` on the same task YAML: the
prompt with the tokenizer's `<s>`, greedy, at most `max_gen_toks` new tokens, special tokens dropped) in-process and
without lm-eval, so a trial costs a model load and a few batched forward passes. Prompts are batched by token length,
so no padding enters the arithmetic and a prompt's answer does not depend on its batch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from mergelib.errors import MergelibError

VALIDATION = "validation"  # what a search tunes on
HELD_OUT = "test"  # the evaluate stage's prompts: never seen by a trial
SPLITS = (VALIDATION, HELD_OUT)


class ScorerError(MergelibError):
    """A search objective names a task the scorer cannot score, or its data is missing."""


@dataclass(frozen=True)
class TaskPrompts:
    """One exact-match task on one split: prompts, answers and the generation cap."""

    name: str
    split: str
    prompts: tuple[str, ...]
    answers: tuple[str, ...]
    max_new_tokens: int

    def head(self, count: int) -> TaskPrompts:
        """The first `count` prompts (what a pruned trial scores first)."""
        return TaskPrompts(self.name, self.split, self.prompts[:count], self.answers[:count], self.max_new_tokens)

    def tail(self, start: int) -> TaskPrompts:
        """The prompts from `start` on."""
        return TaskPrompts(self.name, self.split, self.prompts[start:], self.answers[start:], self.max_new_tokens)


def scorable_tasks() -> list[str]:
    """Shipped tasks the scorer takes: the exact-match (generate_until) ones."""
    from mergelib.pipeline.evaluate import TASK_DIR, local_task_names

    return [n for n in local_task_names()
            if yaml.safe_load((TASK_DIR / f"{n}.yaml").read_text()).get("output_type") == "generate_until"]


def load_task(name: str, split: str = "validation", limit: int | None = None) -> TaskPrompts:
    """Task `name`'s prompts on `split` (`validation`: `<file>_validation.jsonl` beside the task's test data)."""
    from mergelib.pipeline.evaluate import DATA_DIR, TASK_DIR

    if split not in SPLITS:
        raise ScorerError(f"search split '{split}': choose {' or '.join(SPLITS)}")
    known = scorable_tasks()
    if name not in known:
        raise ScorerError(f"search objective task '{name}': the scorer takes the shipped exact-match tasks "
                          f"({', '.join(known)})")
    config = yaml.safe_load((TASK_DIR / f"{name}.yaml").read_text())
    test_file = Path(config["dataset_kwargs"]["data_files"][config.get("test_split", "test")])
    path = DATA_DIR / (test_file.name if split == HELD_OUT else f"{test_file.stem}_validation{test_file.suffix}")
    if not path.is_file():
        raise ScorerError(f"search objective task '{name}': {path} is missing")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = rows[:limit] if limit else rows
    max_new = int(config.get("generation_kwargs", {}).get("max_gen_toks", 16))
    return TaskPrompts(name, split, tuple(r["prompt"] for r in rows), tuple(r["answer"] for r in rows), max_new)


def load_model(model_dir: str | Path, tokenizer_dir: str | Path | None = None):
    """(model, tokenizer) for scoring, as the evaluate stage loads them (float32, CPU), quietly; the tokenizer from
    `tokenizer_dir` when the model has none."""
    from transformers.utils import logging as hf_logging

    from mergelib.pipeline.evaluate import load_model as load_for_eval

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # a bar per model load would bury the search's own lines
    model_dir = Path(model_dir)
    has_own = (model_dir / "tokenizer_config.json").is_file()
    return load_for_eval(model_dir, None if has_own else tokenizer_dir)


def greedy_answers(model, tokenizer, task: TaskPrompts, batch_size: int = 256) -> list[str]:
    """The model's greedy answer to every prompt of `task`, in order."""
    import torch

    encoded = [tokenizer(p)["input_ids"] for p in task.prompts]
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(i)
    out = [""] * len(encoded)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    with torch.inference_mode():
        for length, rows in sorted(by_length.items()):
            for start in range(0, len(rows), batch_size):
                chunk = rows[start:start + batch_size]
                ids = torch.tensor([encoded[i] for i in chunk])  # [batch, length]: one length, no padding
                generated = model.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=task.max_new_tokens, do_sample=False,
                    eos_token_id=eos, pad_token_id=pad, num_beams=1,
                )
                for i, row in zip(chunk, generated[:, length:]):
                    out[i] = tokenizer.decode(row.tolist(), skip_special_tokens=True)
    return out


def correct(model, tokenizer, task: TaskPrompts) -> int:
    """How many of `task`'s prompts the model answers exactly."""
    return sum(a == b for a, b in zip(greedy_answers(model, tokenizer, task), task.answers))


def exact_match(model, tokenizer, tasks: Sequence[TaskPrompts]) -> dict[str, float]:
    """Task name -> exact-match accuracy."""
    return {t.name: correct(model, tokenizer, t) / max(len(t.prompts), 1) for t in tasks}
