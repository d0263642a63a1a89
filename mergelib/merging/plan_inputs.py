"""Planning, step 1: the recipe's models resolved and indexed once each (headers only), and its `models:` or `slices:`
as output slices with the base model's role applied (mergekit's normalisation)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mergelib.arch import spec_for
from mergelib.config.recipe import MergeRecipe, ModelRef
from mergelib.errors import InputModelError, RecipeError
from mergelib.io.gguf_input import check_tokenizer_donor, gguf_model_dir
from mergelib.io.hub import resolve_model
from mergelib.io.index import index_model, read_config
from mergelib.merging.plan import InputModel
from mergelib.methods import MethodSpec


@dataclass(frozen=True)
class SliceSource:
    """One model's layers [start, end) in a slice, with its parameters."""

    model: int
    start: int
    end: int
    parameters: dict


@dataclass(frozen=True)
class Slice:
    """One output slice of the recipe: its base and the other inputs, after mergekit's base normalisation."""

    sources: tuple[SliceSource, ...]  # non-base inputs, recipe order
    base: SliceSource | None
    parameters: dict
    where: str


class ModelTable:
    """Resolves and indexes each distinct model reference once."""

    def __init__(self, trust_remote_code: bool, transplant: Callable[[Path, str], Path] | None = None):
        self.models: list[InputModel] = []
        self._by_key: dict[str, int] = {}
        self.trust_remote_code = trust_remote_code
        self.transplant = transplant  # gives a model the recipe's donor tokenizer (tokenizer.transplant)

    def add(self, ref: ModelRef) -> int:
        key = str(ref)
        if key in self._by_key:
            return self._by_key[key]
        path = gguf_model_dir(ref.path) or resolve_model(ref.path, ref.revision)  # a .gguf: a cached model dir
        if ref.lora:
            from mergelib.lora.apply import lora_input  # late: only recipes with model+lora need it

            path = lora_input(path, ref.lora)
        if self.transplant is not None:
            path = self.transplant(path, key)
        config = read_config(path)
        if config.get("auto_map") and not self.trust_remote_code:
            raise InputModelError(
                f"model '{key}': its config.json needs custom code (auto_map); pass --trust-remote-code "
                "if you trust it"
            )
        index = index_model(path)
        spec = spec_for(config, list(index.tensors))
        model = InputModel(ref, path, config, index, spec, spec.num_layers(config, list(index.tensors)))
        self._by_key[key] = len(self.models)
        self.models.append(model)
        return self._by_key[key]


def recipe_slices(recipe: MergeRecipe, method: MethodSpec, table: ModelTable) -> list[Slice]:
    """The recipe as output slices, with the base model's role applied (mergekit's normalisation)."""
    out: list[Slice] = []
    use_base = method.base in ("required", "optional", "input")
    if recipe.models is not None:
        entries = [(table.add(e.model), e.parameters) for e in recipe.models]
        base = table.add(recipe.base_model) if (recipe.base_model is not None and use_base) else None
        if base is not None and base not in [m for m, _ in entries]:
            entries.append((base, {}))
        counts = {table.models[m].label: table.models[m].num_layers for m, _ in entries}
        if len(set(counts.values())) > 1:
            listed = ", ".join(f"{k}: {v}" for k, v in counts.items())
            raise InputModelError(
                f"models have different layer counts ({listed}); use 'slices' with layer_range to merge them"
            )
        sources = [SliceSource(m, 0, table.models[m].num_layers, p) for m, p in entries]
        out.append(split_base(sources, base, method, {}, "models"))
    else:
        for i, piece in enumerate(recipe.slices or []):
            where = f"slices[{i}]"
            sources = []
            for j, src in enumerate(piece.sources):
                m = table.add(src.model)
                start, end = src.layer_range
                if end > table.models[m].num_layers:
                    raise RecipeError(
                        f"{where}.sources[{j}].layer_range: [{start}, {end}) exceeds the "
                        f"{table.models[m].num_layers} layers of '{table.models[m].label}'"
                    )
                sources.append(SliceSource(m, start, end, src.parameters))
            lengths = {s.end - s.start for s in sources}
            if len(lengths) > 1:
                raise RecipeError(f"{where}: all sources must span the same number of layers, got {sorted(lengths)}")
            base_ref = piece.base_model or recipe.base_model
            base = table.add(base_ref) if (base_ref is not None and use_base) else None
            if base is not None and method.base != "input" and base not in [s.model for s in sources]:
                if method.base == "required":
                    raise RecipeError(
                        f"{where}: base model '{table.models[base].label}' is not one of the slice's sources; "
                        "add it with a layer_range"
                    )
                base = None
            out.append(split_base(sources, base if method.base != "input" else None, method, piece.parameters, where))
    return out


def split_base(sources: list[SliceSource], base: int | None, method: MethodSpec, params: dict, where: str) -> Slice:
    """The slice with the base taken out of its sources, checked against the method's model counts."""
    base_src = None
    if base is not None and method.base in ("required", "optional"):
        base_src = next(s for s in sources if s.model == base)
        sources = [s for s in sources if s is not base_src]
    if method.base == "required" and base_src is None:
        raise RecipeError(f"base_model: {method.name} needs a base model; add 'base_model:' to the recipe")
    n = len(sources)
    if n < method.min_models or (method.max_models is not None and n > method.max_models):
        want = (
            f"exactly {method.min_models}"
            if method.max_models == method.min_models
            else f"at least {method.min_models}" + (f" and at most {method.max_models}" if method.max_models else "")
        )
        extra = " besides the base" if method.base in ("required", "optional") else ""
        raise RecipeError(f"{where}: {method.name} takes {want} model(s){extra}; got {n}")
    return Slice(tuple(sources), base_src, params, where)


def reference_model(slices: list[Slice]) -> int:
    """The model whose spec, config and tokenizer the output follows: the first slice's base, else its first input."""
    first = slices[0]
    return (first.base or first.sources[0]).model


def check_architectures(models: list[InputModel], reference: int, allow_crimes: bool) -> None:
    """Every model has the reference model's architecture, unless `allow_crimes`."""
    ref_model = models[reference]
    check_tokenizer_donor(ref_model.path, ref_model.label)  # a GGUF donor whose tokenizer could not be rebuilt
    arch = (ref_model.config.get("architectures") or ["?"])[0]
    for m in models:
        other = (m.config.get("architectures") or ["?"])[0]
        if other != arch and not allow_crimes:
            raise InputModelError(
                f"model '{m.label}' is a {other}, '{ref_model.label}' is a {arch}; "
                "pass --allow-crimes to merge different architectures whose shapes agree"
            )
