"""The demo family: a small Llama pretrained on a synthetic mixture, and fine-tunes of it that each learned one skill.

Plain torch on CPU, deterministic for a seed (one thread, seeded init and data). The recipe (latent skills in the
base, 30% replay in the fine-tunes) is the one measured to keep both skills under task arithmetic / TIES merges;
see shared/reference/demo-family-notes.md. Models are written in Hugging Face layout with the family's byte-level
BPE tokenizer (mergelib.families.demo_tokenizer), so they export to GGUF for llama.cpp.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer
from tqdm import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mergelib.errors import InputModelError
from mergelib.families.demo_data import SKILLS, Example, Streams, heldout, skill, write_eval_data
from mergelib.families.demo_tokenizer import BOS, EOS, PAD, SPECIAL_TOKENS, UNK, demo_tokenizer, vocab_size
from mergelib.families.tiny import Family
from mergelib.merging.versions import TRAINING_LIBRARIES, package_versions

MAX_POSITIONS = 64
IGNORE = -100  # label of a position the loss skips
FAMILY_FILE = "family.json"
FAMILY_VERSION = 2  # bump when the bytes a (seed, quick) pair produce change (2: byte-level BPE tokenizer)


@dataclass(frozen=True)
class Schedule:
    """How long and how hard each model trains."""

    base_steps: int
    finetune_steps: dict[str, int]
    lr: float = 1e-3
    batch_size: int = 64
    base_warmup: int = 50
    replay: float = 0.3


FULL = Schedule(base_steps=1500, finetune_steps={"add": 800, "rev": 500, "sort": 600})
QUICK = Schedule(base_steps=30, finetune_steps={"add": 15, "rev": 15, "sort": 15}, batch_size=16, base_warmup=5)


def make_config() -> LlamaConfig:
    """The demo architecture: 2 layers, hidden 128, 4 heads, 395k parameters (261-token vocabulary)."""
    config = LlamaConfig(
        vocab_size=vocab_size(), hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=MAX_POSITIONS, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, dtype=torch.float32,
    )
    config.architectures = ["LlamaForCausalLM"]
    return config


def make_tokenizer() -> PreTrainedTokenizerFast:
    """The trained byte-level BPE tokenizer with its 4 specials; prepends `<s>` like Llama's tokenizer."""
    return PreTrainedTokenizerFast(
        tokenizer_object=demo_tokenizer(), pad_token=SPECIAL_TOKENS[PAD], bos_token=SPECIAL_TOKENS[BOS],
        eos_token=SPECIAL_TOKENS[EOS], unk_token=SPECIAL_TOKENS[UNK], model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )


@lru_cache(maxsize=1)
def _core() -> Tokenizer:
    return demo_tokenizer()


def encode(text: str) -> list[int]:
    """Token ids of `text` without specials (what the saved tokenizer gives after its `<s>`)."""
    return _core().encode(text, add_special_tokens=False).ids


def decode(ids: Sequence[int]) -> str:
    """Text of token ids (specials skipped)."""
    return _core().decode(list(ids), skip_special_tokens=True)


def new_model(seed: int) -> LlamaForCausalLM:
    """A freshly initialised demo model; the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(make_config())


def batch_tensors(examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """`<s> prompt answer </s>` per example, right-padded; labels cover only the answer and `</s>`."""
    rows = [([BOS, *encode(p)], [*encode(a), EOS]) for p, a in examples]
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)  # [B, T]
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)  # [B, T]
    for i, (p, a) in enumerate(rows):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        labels[i, len(p) : len(p) + len(a)] = torch.tensor(a)
    return ids, labels


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then cosine from `lr` down to 10% of it."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train(model: LlamaForCausalLM, stream: Iterator[Example], *, steps: int, lr: float, batch_size: int,
          warmup: int, desc: str = "training") -> float:
    """AdamW on the answer tokens of `steps` batches from `stream`; returns the last batch's loss. A progress bar
    shows in a terminal (tqdm stays quiet when stderr is piped)."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    loss = torch.tensor(float("nan"))
    for step in tqdm(range(steps), desc=desc, unit="step", disable=None, leave=False):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        ids, labels = batch_tensors([next(stream) for _ in range(batch_size)])
        # right padding needs no attention mask: a causal model never looks at the pads after a sequence
        logits = model(input_ids=ids).logits  # [B, T, V]
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    model.eval()
    return float(loss.detach())


@torch.no_grad()
def greedy_answers(model: LlamaForCausalLM, prompts: Sequence[str], max_new_tokens: int = 8) -> list[str | None]:
    """Greedy answer to each prompt, or None where no `</s>` came within `max_new_tokens`. Prompts of equal token
    count are batched together, so no padding is involved (an independent check of lm-eval's batched generation)."""
    model.eval()
    answers: list[str | None] = [None] * len(prompts)
    encoded = [encode(p) for p in prompts]
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(i)
    for idx in by_length.values():
        ids = torch.tensor([[BOS, *encoded[i]] for i in idx])  # [B, T]
        out: list[list[int]] = [[] for _ in idx]
        done = [False] * len(idx)
        for _ in range(max_new_tokens):
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1)  # [B]
            for j, t in enumerate(nxt.tolist()):
                if not done[j]:
                    done[j] = t == EOS
                    if not done[j]:
                        out[j].append(t)
            if all(done):
                break
            ids = torch.cat([ids, nxt[:, None]], dim=1)
        for j, i in enumerate(idx):
            answers[i] = decode(out[j]) if done[j] else None
    return answers


def accuracy(model: LlamaForCausalLM, examples: Sequence[Example]) -> float:
    """Fraction of examples answered exactly, followed by `</s>`."""
    answers = greedy_answers(model, [p for p, _ in examples])
    return sum(got == want for got, (_, want) in zip(answers, examples)) / len(examples)


def save_model(model: LlamaForCausalLM, path: Path) -> Path:
    """Write `model` with its tokenizer as a Hugging Face model directory, atomically; same weights, same bytes."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in sorted(model.state_dict().items())}
    save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    (tmp / "model.safetensors").chmod(0o644)
    model.config.save_pretrained(tmp)
    GenerationConfig(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD).save_pretrained(tmp)
    make_tokenizer().save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


@contextmanager
def torch_threads(n: int):
    """Run the block with `n` intra-op threads (restored after): on shared cores more threads can be 18x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class FamilyRecord:
    """What `family.json` says about a built family (deterministic: no timings)."""

    seed: int
    quick: bool
    base: str
    finetunes: dict[str, str]  # skill -> model directory, relative to the family root
    data: dict[str, str]  # task data name (skill or "ppl") -> jsonl path, relative to the family root
    schedule: dict = field(default_factory=dict)
    version: int = FAMILY_VERSION
    libraries: dict[str, str] = field(default_factory=lambda: package_versions(TRAINING_LIBRARIES))  # trained with


def build_demo_family(root: Path, *, seed: int = 0, quick: bool = False,
                      skills: Sequence[str] = tuple(SKILLS), threads: int = 1) -> Family:
    """Train the base and one fine-tune per skill under `root` (`base/`, `ft_<skill>/`, `data/*.jsonl`,
    `family.json`); `quick` trains for seconds (for tests; no quality bar). Same arguments, same bytes."""
    root = Path(root)
    skills = tuple(skill(s).name for s in skills)
    schedule = QUICK if quick else FULL
    streams = Streams(tuple(SKILLS))  # held-out problems of every skill stay out of every model
    root.mkdir(parents=True, exist_ok=True)
    (root / FAMILY_FILE).unlink(missing_ok=True)
    with torch_threads(threads):
        model = new_model(seed)
        train(model, streams.base(f"demo/{seed}/base"), steps=schedule.base_steps, lr=schedule.lr,
              batch_size=schedule.batch_size, warmup=schedule.base_warmup, desc="demo family: base")
        base = save_model(model, root / "base")
        base_state = {k: v.clone() for k, v in model.state_dict().items()}
        finetunes = []
        for name in skills:
            model.load_state_dict(base_state)
            steps = schedule.finetune_steps[name]
            train(model, streams.finetune(name, f"demo/{seed}/ft_{name}", schedule.replay), steps=steps,
                  lr=schedule.lr, batch_size=schedule.batch_size, warmup=min(50, max(1, steps // 10)),
                  desc=f"demo family: ft_{name}")
            finetunes.append(save_model(model, root / f"ft_{name}"))
    for stale in root.glob("ft_*"):  # fine-tunes of an earlier build with other skills
        if stale.name not in {p.name for p in finetunes} and (stale / "config.json").is_file():
            shutil.rmtree(stale)
    data = write_eval_data(root / "data", skills)
    record = FamilyRecord(
        seed=seed, quick=quick, base="base", finetunes={s: f"ft_{s}" for s in skills},
        data={k: p.relative_to(root).as_posix() for k, p in data.items()},
        schedule={**asdict(schedule), "finetune_steps": {s: schedule.finetune_steps[s] for s in skills}},
    )
    (root / FAMILY_FILE).write_text(json.dumps(asdict(record), indent=2, sort_keys=True) + "\n")
    return Family(root, base, tuple(finetunes))


def read_family(root: Path) -> FamilyRecord:
    """The record `build_demo_family` wrote under `root`."""
    path = Path(root) / FAMILY_FILE
    if not path.is_file():
        raise InputModelError(f"{path} is missing: build the demo family first (mergelib.families.demo)")
    return FamilyRecord(**json.loads(path.read_text()))


def skill_accuracy(model_dir: Path, skills: Sequence[str] = tuple(SKILLS), n: int = 200) -> dict[str, float]:
    """Exact-match accuracy of the model at `model_dir` on `n` held-out prompts per skill (plain torch)."""
    model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return {s: accuracy(model, heldout(s, n)) for s in skills}
