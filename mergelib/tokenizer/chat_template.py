"""The `chat_template` recipe field: `auto`, a built-in name, or a literal Jinja template (mergekit's rules).

Built-ins are written here from the formats' public descriptions (ChatML, Llama 3, Mistral [INST], Alpaca);
templates are rendered by transformers' `apply_chat_template` (Jinja2, with `raise_exception` available).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from mergelib.errors import RecipeError, did_you_mean

BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
        " + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    # Mistral's instruct format has no system role: a system message is prepended to the next user turn
    "mistral": (
        "{{ bos_token }}{% set ns = namespace(system='') %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\\n\\n' %}"
        "{% elif message['role'] == 'user' %}{{ '[INST] ' + ns.system + message['content'] + ' [/INST]' }}"
        "{% set ns.system = '' %}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
        "{% else %}{{ raise_exception('mistral chat template: roles are system, user and assistant') }}"
        "{% endif %}"
        "{% endfor %}"
    ),
    "alpaca": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
}
MIN_LITERAL_CHARS = 20  # mergekit's threshold for treating the value as a Jinja template
SPECIAL_MARKER = re.compile(r"<\|[A-Za-z0-9_]+\|>")  # <|im_start|>-style markers a template expects as tokens

Template = str | list  # a template, or transformers' list of named templates [{name, template}, ...]


def read_chat_template(model_dir: Path) -> Template | None:
    """A model's chat template where transformers looks: chat_template.jinja, chat_template.json,
    then the `chat_template` key of tokenizer_config.json."""
    model_dir = Path(model_dir)
    if (model_dir / "chat_template.jinja").is_file():
        return (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        if (model_dir / name).is_file():
            value = json.loads((model_dir / name).read_text(encoding="utf-8")).get("chat_template")
            if value:
                return value
    return None


def resolve_chat_template(value: str | None, model_dirs: dict[str, Path], owner: str) -> tuple[Template | None, str]:
    """The template to write and a phrase saying where it came from.

    None keeps the tokenizer source's own template; `auto` takes the template most input models share (the
    first in recipe order on a tie); a built-in name gives that template; anything else must be a Jinja
    template of at least 20 characters containing '{'.
    """
    if value is None:
        template = read_chat_template(model_dirs[owner])
        return template, f"kept from '{owner}'" if template else "none (the tokenizer source has none)"
    if value == "auto":
        return _most_common(model_dirs)
    if value in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[value], f"built-in '{value}'"
    if len(value) < MIN_LITERAL_CHARS or "{" not in value:
        raise RecipeError(
            f"chat_template: '{value}' is neither 'auto', a built-in ({', '.join(BUILTIN_TEMPLATES)})"
            f"{did_you_mean(value, [*BUILTIN_TEMPLATES, 'auto'])} nor a Jinja template "
            f"(at least {MIN_LITERAL_CHARS} characters with '{{')"
        )
    import jinja2  # only a literal template needs it; not imported on every merge
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment().parse(value)
    except jinja2.TemplateSyntaxError as exc:
        raise RecipeError(f"chat_template: not a valid Jinja template: {exc.message} (line {exc.lineno})") from None
    return value, "literal Jinja from the recipe"


def missing_markers(template: Template | None, vocabulary: dict[str, int]) -> list[str]:
    """<|...|> markers the template writes that the vocabulary lacks (they would be tokenized as plain text)."""
    text = json.dumps(template) if isinstance(template, list) else template or ""
    return sorted({m for m in SPECIAL_MARKER.findall(text) if m not in vocabulary})


def _most_common(model_dirs: dict[str, Path]) -> tuple[Template | None, str]:
    found = {label: read_chat_template(path) for label, path in model_dirs.items()}
    keys = {label: json.dumps(t, sort_keys=True) for label, t in found.items() if t}
    if not keys:
        return None, "auto: no input model has a chat template"
    counts = Counter(keys.values())
    best = max(counts.values())
    winner = next(label for label, key in keys.items() if counts[key] == best)  # recipe order breaks ties
    return found[winner], f"auto: the template of '{winner}' ({best} of {len(model_dirs)} models use it)"
