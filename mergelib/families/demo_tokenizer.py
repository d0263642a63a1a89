"""The demo family's tokenizer: byte-level BPE trained with `tokenizers` on a fixed sample of the demo's own data.

Byte-level (GPT-2's byte alphabet and split, `tokenizer.ggml.pre = gpt-2`), so any text encodes and llama.cpp
rebuilds the same tokenizer from a GGUF file. The skills work one character at a time (reverse, sort, digit-wise
addition), and a merged letter pair would turn `abcd>` -> `dcba` into a different problem, so training splits every
letter and digit off as its own piece: merges are learned only inside runs of other characters (on this data, the
double space of the sort skill's latent format). Same library version, same bytes (a test trains twice).
"""

from __future__ import annotations

import json
from functools import lru_cache

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from mergelib.families.demo_data import SKILLS, Streams

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3
PAD, BOS, EOS, UNK = range(4)
VOCAB_LIMIT = 320  # an upper bound: training stops when no pair of non-alphanumeric symbols is left to merge
CORPUS_SEED = "mergelib-demo-tokenizer-v1"
BASE_EXAMPLES = 20_000  # from the base mixture, then TASK_EXAMPLES per skill in its target format
TASK_EXAMPLES = 5_000
ATOMIC = r"\p{L}|\p{N}"  # letters and digits: never part of a merge


def corpus() -> list[str]:
    """The fixed training texts: prompts and answers separately, as the models read and write them."""
    streams = Streams(tuple(SKILLS))
    texts: list[str] = []
    base = streams.base(f"{CORPUS_SEED}/base")
    for _ in range(BASE_EXAMPLES):
        texts += next(base)
    for name in SKILLS:
        task = streams.finetune(name, f"{CORPUS_SEED}/{name}", replay=0.0)
        for _ in range(TASK_EXAMPLES):
            texts += next(task)
    return texts


def train_tokenizer(texts: list[str] | None = None, vocab_limit: int = VOCAB_LIMIT) -> Tokenizer:
    """Train the byte-level BPE on `texts` (default: `corpus()`) and give it the inference pipeline: GPT-2 split,
    byte-level decoder, `<s>` prepended."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(ATOMIC), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_limit, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(corpus() if texts is None else texts, trainer)
    # After training the GPT-2 split alone: no merge holds a letter or digit, so it cuts the same tokens, and it is
    # a split llama.cpp knows.
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    bos = SPECIAL_TOKENS[BOS]
    core.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                        special_tokens=[(bos, BOS)])
    for i, token in enumerate(SPECIAL_TOKENS):
        assert core.token_to_id(token) == i, token
    return core


@lru_cache(maxsize=1)
def demo_tokenizer_json() -> str:
    """The trained tokenizer as tokenizer.json text (trained once per process)."""
    return train_tokenizer().to_str()


def demo_tokenizer() -> Tokenizer:
    """A fresh `Tokenizer` of the trained demo tokenizer."""
    return Tokenizer.from_str(demo_tokenizer_json())


def vocab_size() -> int:
    """Number of tokens (specials, 256 bytes, merges)."""
    return len(json.loads(demo_tokenizer_json())["model"]["vocab"])
