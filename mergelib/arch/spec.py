"""Architecture specs: tensor-name templates per family, read from `specs/*.json`, with a generic fallback.

A spec file looks like::

    {"family": "llama", "architectures": ["LlamaForCausalLM"], "model_types": ["llama"],
     "num_layers_key": "num_hidden_layers", "layer_prefix": "model.layers.{layer}.",
     "pre_weights":   [{"name": "model.embed_tokens.weight", "embed": true}],
     "layer_weights": [{"name": "self_attn.q_proj.weight"}, {"name": "self_attn.q_proj.bias", "optional": true}],
     "post_weights":  [{"name": "model.norm.weight"},
                       {"name": "lm_head.weight", "embed": true, "optional": true,
                        "tied_to": "model.embed_tokens.weight"}]}

`layer_weights` names are relative to `layer_prefix`. `tied_to` names the tensor read in place of a missing one
(tied embeddings). `aliases` lists other names a checkpoint may store a weight under. `carried_prefixes` (vision-
language models) names the parts outside the layer stack that are merged whole, tensor by tensor, whatever they
hold (a vision tower, a projector): `slices` cut only the language model's layers.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

SPEC_DIR = Path(__file__).parent / "specs"
LAYER_NAME = re.compile(r"^(?P<prefix>.+?)\.(?P<index>\d+)\.(?P<rest>.+)$")
_EMBED_HINTS = ("embed_tokens", "wte", "word_embeddings", "lm_head", "embed_in", "embed_out", "tok_embeddings")
_PRE_HINTS = ("embed", "wte", "wpe", "word_embeddings", "tok_embeddings")
NUM_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


@dataclass(frozen=True)
class WeightSpec:
    """One tensor of an architecture."""

    name: str
    embed: bool = False  # rows are vocabulary entries (embed_tokens, lm_head)
    optional: bool = False
    tied_to: str | None = None
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class ArchSpec:
    """The tensor layout of one architecture family."""

    family: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    num_layers_key: str | None
    layer_prefix: str  # contains "{layer}"
    pre_weights: tuple[WeightSpec, ...]
    layer_weights: tuple[WeightSpec, ...]
    post_weights: tuple[WeightSpec, ...]
    carried_prefixes: tuple[str, ...] = ()
    inferred: bool = False
    _layer_re: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        head, _, tail = self.layer_prefix.partition("{layer}")
        object.__setattr__(self, "_layer_re", re.compile("^" + re.escape(head) + r"(\d+)" + re.escape(tail)))

    def layer_weight_names(self, layer: int) -> list[WeightSpec]:
        """The weights of layer `layer`, with absolute names."""
        prefix = self.layer_prefix.format(layer=layer)
        return [
            WeightSpec(
                prefix + w.name,
                w.embed,
                w.optional,
                w.tied_to,
                # an alias with its own "{layer}" is a full name (e.g. GPT-2's bare "h.{layer}.ln_1.weight")
                tuple(a.format(layer=layer) if "{layer}" in a else prefix + a for a in w.aliases),
            )
            for w in self.layer_weights
        ]

    def carries(self, tensor_name: str) -> bool:
        """Whether the tensor belongs to a part merged whole outside the layer stack (`carried_prefixes`)."""
        return tensor_name.startswith(self.carried_prefixes) if self.carried_prefixes else False

    def layer_of(self, tensor_name: str) -> int | None:
        """The layer index of a per-layer tensor name, or None for pre/post weights."""
        match = self._layer_re.match(tensor_name)
        return int(match.group(1)) if match else None

    def num_layers(self, config: dict, tensor_names: list[str] | None = None) -> int:
        """Layer count from config.json (dotted key), else counted from tensor names."""
        if self.num_layers_key:
            value: object = config
            for part in self.num_layers_key.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            if isinstance(value, int):
                return value
        if tensor_names is None:
            raise ValueError(f"config has no '{self.num_layers_key}' and no tensor names were given")
        layers = {self.layer_of(n) for n in tensor_names} - {None}
        return max(layers) + 1 if layers else 0


def _weights(items: list[dict]) -> tuple[WeightSpec, ...]:
    return tuple(
        WeightSpec(
            name=item["name"],
            embed=bool(item.get("embed", False)),
            optional=bool(item.get("optional", False)),
            tied_to=item.get("tied_to"),
            aliases=tuple(item.get("aliases", ())),
        )
        for item in items
    )


def _parse(data: dict) -> ArchSpec:
    return ArchSpec(
        family=data["family"],
        architectures=tuple(data["architectures"]),
        model_types=tuple(data.get("model_types", ())),
        num_layers_key=data.get("num_layers_key"),
        layer_prefix=data["layer_prefix"],
        pre_weights=_weights(data.get("pre_weights", [])),
        layer_weights=_weights(data["layer_weights"]),
        post_weights=_weights(data.get("post_weights", [])),
        carried_prefixes=tuple(data.get("carried_prefixes", ())),
    )


@cache
def load_specs() -> tuple[ArchSpec, ...]:
    """Every spec under `specs/`, sorted by file name."""
    return tuple(_parse(json.loads(path.read_text())) for path in sorted(SPEC_DIR.glob("*.json")))


def spec_for(config: dict, tensor_names: list[str]) -> ArchSpec:
    """The spec matching config.json's `architectures[0]` (and `model_type` when several claim it),
    else one inferred from the tensor names."""
    arch = (config.get("architectures") or [None])[0]
    model_type = config.get("model_type")
    candidates = [s for s in load_specs() if arch in s.architectures]
    if len(candidates) > 1:
        candidates = [s for s in candidates if model_type in s.model_types] or candidates[:1]
    if candidates:
        return candidates[0]
    return infer_spec(config, tensor_names)


def infer_spec(config: dict, tensor_names: list[str]) -> ArchSpec:
    """A spec guessed from tensor names: the most common `<prefix>.<n>.` is the layer stack."""
    prefixes = Counter(m.group("prefix") for n in tensor_names if (m := LAYER_NAME.match(n)))
    if prefixes:
        prefix = prefixes.most_common(1)[0][0]
        layer_re = re.compile("^" + re.escape(prefix) + r"\.(\d+)\.(.+)$")
        per_layer: dict[str, set[int]] = {}
        for name in tensor_names:
            if m := layer_re.match(name):
                per_layer.setdefault(m.group(2), set()).add(int(m.group(1)))
        layers = set().union(*per_layer.values())
        rests = sorted(per_layer)
        layer_weights = tuple(WeightSpec(r, optional=per_layer[r] != layers) for r in rests)
        layer_prefix = prefix + ".{layer}."
        in_layers = {n for n in tensor_names if layer_re.match(n)}
    else:
        layer_weights, layer_prefix, in_layers = (), "__no_layers__.{layer}.", set()
    loose = [n for n in tensor_names if n not in in_layers]
    pre = tuple(WeightSpec(n, embed=_is_embed(n)) for n in loose if any(h in n for h in _PRE_HINTS))
    post = tuple(WeightSpec(n, embed=_is_embed(n)) for n in loose if not any(h in n for h in _PRE_HINTS))
    key = next((k for k in NUM_LAYER_KEYS if isinstance(config.get(k), int)), None)
    return ArchSpec(
        family="inferred",
        architectures=tuple(config.get("architectures") or ()),
        model_types=(config.get("model_type", ""),),
        num_layers_key=key,
        layer_prefix=layer_prefix,
        pre_weights=pre,
        layer_weights=layer_weights,
        post_weights=post,
        inferred=True,
    )


def _is_embed(name: str) -> bool:
    return any(h in name for h in _EMBED_HINTS)
