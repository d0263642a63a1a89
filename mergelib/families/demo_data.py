"""Synthetic skills of the demo family: their text formats, training streams and fixed held-out sets.

Each skill has a target format (`23+45=` -> `68`) and a latent format (`23 45 ` -> `68`). The base learns the
latent formats and sees the target formats only with random answers, so it has the skills but answers the real
prompts with noise; a fine-tune then only has to route the target format to the skill it already has, which is
what lets weight-space merges keep several skills (measured in shared/reference/demo-family-notes.md).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

LETTERS = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"
CHARS = DIGITS + LETTERS + "+=>|: \n"  # every character a demo text uses; the tokenizer's vocabulary after specials
HELDOUT_SEED = "mergelib-demo-heldout-v1"  # fixed: every family and seed is scored on the same prompts
HELDOUT_SIZE = 200
VALIDATION_SEED = "mergelib-demo-validation-v1"  # recipe search scores on these; never the held-out prompts
VALIDATION_SIZE = 200
COPY_FRACTION = 0.4  # base mixture: copy, then latent (correct) and target (random answer) formats
LATENT_FRACTION = 0.3

Example = tuple[str, str]  # (prompt, answer); the model reads `<s> prompt` and must write `answer </s>`


@dataclass(frozen=True)
class Skill:
    """One synthetic skill: how to draw a problem (its key), solve it and write it in each format."""

    name: str
    marker: str  # ends a target-format prompt
    latent_marker: str  # ends a latent-format prompt
    draw: Callable[[random.Random], str]  # a problem as its operands, space-separated (`23 45`, `dbca`)
    solve: Callable[[str], str]
    join: str = " "  # joins the operands in the target format (`+` for addition)

    def target(self, key: str) -> Example:
        """The problem in the format a fine-tune learns (the one evaluation asks)."""
        return key.replace(" ", self.join) + self.marker, self.solve(key)

    def latent(self, key: str) -> Example:
        """The problem in the format the base already answers correctly."""
        return key + self.latent_marker, self.solve(key)

    def noisy(self, key: str, rng: random.Random) -> Example:
        """The target format with a random answer of the right shape (what the base sees of it)."""
        answer = self.solve(key)
        if answer.isdigit():
            return self.target(key)[0], str(rng.randint(20, 198))
        return self.target(key)[0], "".join(rng.choice(LETTERS) for _ in answer)


def _letters(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))


def _two_numbers(rng: random.Random) -> str:
    return f"{rng.randint(10, 99)} {rng.randint(10, 99)}"


def _add(key: str) -> str:
    a, b = key.split()
    return str(int(a) + int(b))


SKILLS: dict[str, Skill] = {
    "add": Skill("add", "=", " ", _two_numbers, _add, join="+"),
    "rev": Skill("rev", ">", " ", _letters, lambda s: s[::-1]),
    "sort": Skill("sort", ":", "  ", _letters, lambda s: "".join(sorted(s))),
}


def skill(name: str) -> Skill:
    """The skill called `name` (ValueError naming the known ones otherwise)."""
    if name not in SKILLS:
        raise ValueError(f"unknown demo skill '{name}': choose from {', '.join(SKILLS)}")
    return SKILLS[name]


def heldout_keys(name: str, n: int = HELDOUT_SIZE) -> list[str]:
    """The first `n` distinct problems of skill `name` from the fixed held-out stream (never trained on)."""
    rng = random.Random(f"{HELDOUT_SEED}/{name}")
    keys: dict[str, None] = {}
    while len(keys) < n:
        keys.setdefault(skill(name).draw(rng))
    return list(keys)


def heldout(name: str, n: int = HELDOUT_SIZE) -> list[Example]:
    """Held-out prompts of skill `name` in its target format, with their answers."""
    return [skill(name).target(key) for key in heldout_keys(name, n)]


def validation(name: str, n: int = VALIDATION_SIZE) -> list[Example]:
    """Validation prompts of skill `name` (target format): a fixed stream disjoint from the held-out problems, for
    tuning a recipe without looking at the prompts it is finally scored on. (Training excludes only the held-out
    problems, so a fine-tune may have seen these: they measure what the merge kept, not generalisation.)"""
    rng = random.Random(f"{VALIDATION_SEED}/{name}")
    excluded = set(heldout_keys(name))
    keys: dict[str, None] = {}
    while len(keys) < n:
        key = skill(name).draw(rng)
        if key not in excluded:
            keys.setdefault(key)
    return [skill(name).target(key) for key in keys]


def write_validation_data(data_dir: Path, skills: tuple[str, ...] = tuple(SKILLS),
                          n: int = VALIDATION_SIZE) -> dict[str, Path]:
    """Write `<skill>_validation.jsonl` per skill (and `ppl_validation.jsonl`) into `data_dir`, in the layout of
    `write_eval_data`; returns name -> path. Same arguments, same bytes."""
    return _write_prompt_sets(Path(data_dir), {name: validation(name, n) for name in skills}, "_validation")


def copy_example(rng: random.Random) -> Example:
    """`abc|` -> `abc`: 2-8 characters, digits mixed in 30% of the time."""
    alphabet = LETTERS + DIGITS if rng.random() < 0.3 else LETTERS
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 8)))
    return f"{text}|", text


class Streams:
    """Seeded example streams for the base and the fine-tunes; held-out problems never appear, in any format."""

    def __init__(self, skills: tuple[str, ...] = tuple(SKILLS)):
        self.skills = tuple(skill(s) for s in skills)
        self._excluded = {s.name: set(heldout_keys(s.name)) for s in self.skills}

    def _key(self, s: Skill, rng: random.Random) -> str:
        while (key := s.draw(rng)) in self._excluded[s.name]:
            pass
        return key

    def base_example(self, rng: random.Random, skip: str | None = None) -> Example:
        """One example of the base mixture (without skill `skip`): copy, latent skills, noisy target formats."""
        u = rng.random()
        if u < COPY_FRACTION:
            return copy_example(rng)
        choices = [s for s in self.skills if s.name != skip]
        s = rng.choice(choices)
        key = self._key(s, rng)
        return s.latent(key) if u < COPY_FRACTION + LATENT_FRACTION else s.noisy(key, rng)

    def base(self, seed: str) -> Iterator[Example]:
        """The base pretraining mixture."""
        rng = random.Random(seed)
        while True:
            yield self.base_example(rng)

    def finetune(self, name: str, seed: str, replay: float) -> Iterator[Example]:
        """Skill `name` in its target format; a `replay` fraction comes from the base mixture without that skill."""
        target = skill(name)
        rng = random.Random(seed)
        while True:
            if rng.random() < replay:
                yield self.base_example(rng, skip=name)
            else:
                yield target.target(self._key(target, rng))


def write_eval_data(data_dir: Path, skills: tuple[str, ...] = tuple(SKILLS), n: int = HELDOUT_SIZE) -> dict[str, Path]:
    """Write `<skill>.jsonl` ({"prompt", "answer"}) per skill and `ppl.jsonl` ({"text"}: the solved held-out
    problems) into `data_dir`; returns name -> path. Same arguments, same bytes."""
    return _write_prompt_sets(Path(data_dir), {name: heldout(name, n) for name in skills}, "")


def _write_prompt_sets(data_dir: Path, sets: dict[str, list[Example]], suffix: str) -> dict[str, Path]:
    """`<skill><suffix>.jsonl` per prompt set and `ppl<suffix>.jsonl` (every solved prompt, in set order)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    texts: list[str] = []
    for name, rows in sets.items():
        paths[name] = _write_jsonl(data_dir / f"{name}{suffix}.jsonl", [{"prompt": p, "answer": a} for p, a in rows])
        texts += [p + a for p, a in rows]
    paths["ppl"] = _write_jsonl(data_dir / f"ppl{suffix}.jsonl", [{"text": t} for t in texts])
    return paths


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return path
