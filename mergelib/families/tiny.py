"""Model families on disk in Hugging Face layout (a base plus seeded fine-tunes) for tests, the demo and benchmarks.

Every tensor comes from its own seeded CPU generator, so a model is written one shard at a time and never held
whole. A fine-tune is base + delta, delta = scale * mask * (0.6 * shared + 0.8 * own): the shared part makes the
fine-tunes agree more often than chance, the own part and the per-fine-tune masks give sign conflicts and elements
only one fine-tune moves, as TIES/DARE-style merges expect (Yadav et al. 2023, arXiv 2306.01708).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

from mergelib.merging.rng import generator_for

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3, Llama's order plus a pad
UNK, BOS, EOS, PAD = range(4)
VOCAB_SIZE = len(SPECIAL_TOKENS) + 256  # byte-level: one token per byte, so any string round-trips
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# "120m" and "1b" use a 32k vocabulary (their embedding tensors are realistically large); the tokenizer still
# covers only the first VOCAB_SIZE ids, as padded vocabularies do. "1b" is TinyLlama-1.1B's shape.
SIZES: dict[str, dict] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=VOCAB_SIZE, max_position_embeddings=256),
    "120m": dict(hidden_size=768, intermediate_size=1920, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=4, head_dim=64, vocab_size=32000, max_position_embeddings=2048),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, head_dim=64, vocab_size=32000, max_position_embeddings=2048),
}
INIT_STD = 0.02  # transformers' initializer_range: matrices and embeddings
NORM_JITTER = 0.05  # norm weights are 1 + N(0, jitter), as trained norms drift from 1
DELTA_REL = 0.05  # delta std relative to the tensor's RMS: small, yet several bf16 ulps
DELTA_KEEP = 0.7  # fraction of elements each fine-tune moves
KEEP_CUTOFF = 0.3853204664  # the 0.65 quantile of N(0,1): P(|z| >= it) = 0.7
TINY_SHARDS = 3  # the tiny size splits into about this many shards by default
LARGE_SHARD_BYTES = 1 << 29  # ~0.5 GiB: a shard and its serialized copy bound the memory
WORKERS = min(8, os.cpu_count() or 1)
STAMP = ".tiny-family.json"
GENERATOR_VERSION = 1  # bump when the bytes a given set of arguments produces change


@dataclass(frozen=True)
class Family:
    """A base model and fine-tunes of it, each a model directory."""

    root: Path
    base: Path
    finetunes: tuple[Path, ...]


def make_config(size: str = "tiny", arch: str = "llama", dtype: torch.dtype = torch.float32,
                tie_embeddings: bool = False):
    """The transformers config of a generated model."""
    if size not in SIZES:
        raise ValueError(f"size '{size}' is not one of {sorted(SIZES)}")
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch '{arch}' is not one of {sorted(ARCHITECTURES)}")
    config = AutoConfig.for_model(
        arch, **SIZES[size], bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
        tie_word_embeddings=tie_embeddings, dtype=dtype,
    )
    config.architectures = [ARCHITECTURES[arch]]
    return config


def tensor_shapes(config) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a checkpoint of `config` stores, in module order (built on `meta`)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tied = set(model._tied_weights_keys or {}) if config.tie_word_embeddings else set()
    return {name: tuple(t.shape) for name, t in model.state_dict().items() if name not in tied}


def param_count(size: str = "tiny", arch: str = "llama", tie_embeddings: bool = False) -> int:
    """Parameters a generated model has, from its config alone."""
    shapes = tensor_shapes(make_config(size, arch, tie_embeddings=tie_embeddings))
    return sum(math.prod(s) for s in shapes.values())


def make_tokenizer(model_max_length: int = SIZES["tiny"]["max_position_embeddings"]) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (no merges): 4 special tokens then the 256 byte symbols; prepends <s>."""
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *symbols))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=SPECIAL_TOKENS[UNK]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    bos = SPECIAL_TOKENS[BOS]
    core.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, BOS)]
    )
    core.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token=SPECIAL_TOKENS[UNK], bos_token=bos, eos_token=SPECIAL_TOKENS[EOS],
        pad_token=SPECIAL_TOKENS[PAD], chat_template=CHAT_TEMPLATE, model_max_length=model_max_length,
    )


def base_tensor(seed: int, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The float32 base weight `name`: norms near 1, biases and matrices N(0, INIT_STD)."""
    noise = torch.randn(shape, generator=generator_for(seed, f"tiny/base/{name}"))
    if len(shape) == 1 and "norm" in name:
        return 1.0 + NORM_JITTER * noise
    return INIT_STD * noise


def delta_tensor(seed: int, delta_seed: int, name: str, base: torch.Tensor) -> torch.Tensor:
    """The float32 fine-tune delta for `name` (`seed`: the family's shared direction; `delta_seed`: this one's)."""
    shared = torch.randn(base.shape, generator=generator_for(seed, f"tiny/shared/{name}"))
    own_gen = generator_for(delta_seed, f"tiny/delta/{seed}/{name}")
    own = torch.randn(base.shape, generator=own_gen)
    still = own.abs() < KEEP_CUTOFF  # P(|N(0,1)| >= cutoff) = DELTA_KEEP; saves a third random draw
    scale = DELTA_REL * (torch.linalg.vector_norm(base.float()) / math.sqrt(base.numel())).item()
    # in place: a 1B model's embedding is 65M elements and temporaries would dominate the time
    delta = own.mul_(0.8).add_(shared, alpha=0.6)  # 0.6^2 + 0.8^2 = 1 before the mask
    return delta.masked_fill_(still, 0.0).mul_(scale)


def shard_names(shapes: dict[str, tuple[int, ...]], itemsize: int, shard_size: int) -> list[list[str]]:
    """Tensor names grouped greedily in order into shards of at most `shard_size` bytes (a bigger tensor alone)."""
    shards: list[list[str]] = []
    used = shard_size  # forces a new shard for the first tensor
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * itemsize
        if used + nbytes > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def make_model(path: Path, *, size: str = "tiny", seed: int = 0, arch: str = "llama",
               dtype: torch.dtype = torch.float32, shard_size: int | None = None, tie_embeddings: bool = False,
               delta_of: Path | None = None, delta_seed: int = 0) -> Path:
    """Write one model directory; with `delta_of`, a fine-tune of the model there (read lazily, tensor by tensor).

    `seed` is the family seed: the base weights, or for a fine-tune the direction its family shares.
    The same arguments give byte-identical files. Returns `path`.
    """
    path = Path(path)
    config = make_config(size, arch, dtype, tie_embeddings)
    shapes = tensor_shapes(config)
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = sum(math.prod(s) for s in shapes.values()) * itemsize
    if shard_size is None:
        shard_size = -(-total // TINY_SHARDS) if size == "tiny" else LARGE_SHARD_BYTES
    groups = shard_names(shapes, itemsize, shard_size)
    tmp = _fresh_tmp(path)
    files = _shard_files(len(groups))
    with ExitStack() as stack:
        read_base = _base_reader(Path(delta_of), stack) if delta_of is not None else None

        def build(name: str) -> torch.Tensor:
            if read_base is None:
                return base_tensor(seed, name, shapes[name]).to(dtype)
            base = read_base(name, shapes[name]).float()
            return delta_tensor(seed, delta_seed, name, base).add_(base).to(dtype)

        # tensors are independent (one generator each), so threads change the speed, never the bytes
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=WORKERS))
        for fname, names in zip(files, groups):
            save_file(dict(zip(names, pool.map(build, names))), tmp / fname, metadata={"format": "pt"})
            (tmp / fname).chmod(0o644)  # safetensors creates files private to the owner; models are shared
    weight_map = {name: fname for fname, names in zip(files, groups) for name in names}
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    config.save_pretrained(tmp)
    GenerationConfig(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD).save_pretrained(tmp)
    make_tokenizer(config.max_position_embeddings).save_pretrained(tmp)
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return path


def make_family(root: Path, *, size: str = "tiny", n_finetunes: int = 2, seed: int = 0, arch: str = "llama",
                dtype: torch.dtype = torch.float32, shard_size: int | None = None,
                tie_embeddings: bool = False) -> Family:
    """Build `root/base` and fine-tunes `root/ft1..ftN` (fine-tune k uses delta_seed=k), replacing what was there."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / STAMP).unlink(missing_ok=True)
    common = dict(size=size, seed=seed, arch=arch, dtype=dtype, shard_size=shard_size, tie_embeddings=tie_embeddings)
    base = make_model(root / "base", **common)
    finetunes = tuple(make_model(root / f"ft{k}", **common, delta_of=base, delta_seed=k)
                      for k in range(1, n_finetunes + 1))
    for stale in root.glob("ft*"):
        match = re.fullmatch(r"ft(\d+)", stale.name)
        if match and int(match.group(1)) > n_finetunes and (stale / "config.json").is_file():
            shutil.rmtree(stale)
    return Family(root, base, finetunes)


def ensure_family(root: Path, **kwargs) -> Family:
    """`make_family(root, **kwargs)`, unless `root` holds a family a stamp says was built with the same arguments
    and every file it lists is still there with its size."""
    root = Path(root)
    bound = inspect.signature(make_family).bind(root, **kwargs)
    bound.apply_defaults()
    args = {k: str(v) if isinstance(v, torch.dtype) else v for k, v in bound.arguments.items() if k != "root"}
    stamp = root / STAMP
    family = _family_at(root, args["n_finetunes"])
    if stamp.is_file():
        recorded = json.loads(stamp.read_text())
        if recorded.get("version") == GENERATOR_VERSION and recorded.get("args") == args and all(
            (root / rel).is_file() and (root / rel).stat().st_size == size for rel, size in recorded["files"].items()
        ):
            return family
    make_family(root, **kwargs)
    files = {
        str(p.relative_to(root)): p.stat().st_size
        for model in (family.base, *family.finetunes) for p in sorted(model.rglob("*")) if p.is_file()
    }
    tmp = root / (STAMP + ".tmp")
    tmp.write_text(json.dumps({"version": GENERATOR_VERSION, "args": args, "files": files}, indent=2) + "\n")
    tmp.replace(stamp)
    return family


def _family_at(root: Path, n_finetunes: int) -> Family:
    return Family(root, root / "base", tuple(root / f"ft{k}" for k in range(1, n_finetunes + 1)))


def _shard_files(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]  # what save_pretrained writes when one shard holds everything
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _fresh_tmp(path: Path) -> Path:
    """An empty sibling build directory; refuses to later replace a non-empty directory that is not a model."""
    if path.exists() and any(path.iterdir()) and not (path / "config.json").is_file():
        raise FileExistsError(f"{path} exists and is not a model directory: choose an empty or new path")
    tmp = path.with_name(f".{path.name}.building")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _base_reader(base_dir: Path, stack: ExitStack):
    """A function name -> tensor reading the base model lazily, checking the shape the fine-tune expects."""
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
    else:
        with safe_open(base_dir / "model.safetensors", framework="pt") as f:
            weight_map = {name: "model.safetensors" for name in f.keys()}
    # opened up front: `read` runs on several threads
    handles = {f: stack.enter_context(safe_open(base_dir / f, framework="pt")) for f in sorted(set(weight_map.values()))}

    def read(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in weight_map:
            raise ValueError(f"base {base_dir} has no tensor {name}: build fine-tunes with the base's size/arch/tie")
        tensor = handles[weight_map[name]].get_tensor(name)
        if tuple(tensor.shape) != shape:
            raise ValueError(f"base {base_dir} tensor {name} has shape {tuple(tensor.shape)}, expected {shape}")
        return tensor

    return read
