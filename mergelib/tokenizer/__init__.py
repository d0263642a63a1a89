"""Tokenizer assembly for merges of models whose vocabularies differ: output vocabulary, aligned embedding rows,
chat template. Entry points: `plan_tokenizer` (before any weight is read), `align_rows` (per input matrix),
`TokenizerPlan.save` (tokenizer files next to the merged weights)."""

from mergelib.tokenizer.assembly import NewToken
from mergelib.tokenizer.chat_template import BUILTIN_TEMPLATES, read_chat_template, resolve_chat_template
from mergelib.tokenizer.plan import TokenizerPlan, align_rows, plan_tokenizer
from mergelib.tokenizer.rows import RowSource
from mergelib.tokenizer.vocab import Vocabulary, read_vocabulary

__all__ = [
    "BUILTIN_TEMPLATES",
    "NewToken",
    "RowSource",
    "TokenizerPlan",
    "Vocabulary",
    "align_rows",
    "plan_tokenizer",
    "read_chat_template",
    "read_vocabulary",
    "resolve_chat_template",
]
