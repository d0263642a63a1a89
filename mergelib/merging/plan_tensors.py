"""Planning, step 2: one output tensor at a time, its inputs found in every model (by name, alias or tie), its
shape agreed, its parameters resolved for that tensor and validated, its dtype and merge mode chosen."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from pydantic import ValidationError

from mergelib.arch import WeightSpec
from mergelib.config import params as param_values
from mergelib.config.recipe import MergeRecipe
from mergelib.errors import InputModelError, RecipeError
from mergelib.merging.plan import DTYPES, InputModel, SourceTensor, TensorJob, merge_mode
from mergelib.merging.plan_inputs import Slice, SliceSource
from mergelib.methods import MethodSpec, Params
from mergelib.tokenizer import TokenizerPlan

WeightOf = Callable[[SliceSource], WeightSpec]  # the weight a slice source contributes to this output tensor


class ParamCache:
    """Validated parameter objects, shared between tensors whose values are equal."""

    def __init__(self, method: MethodSpec):
        self.method = method
        self._cache: dict[tuple, Params] = {}
        self.global_names = [f.alias or n for n, f in method.params.model_fields.items()]
        self.model_names = [f.alias or n for n, f in method.model_params.model_fields.items()]

    def validate(self, cls: type[Params], values: dict, what: str) -> Params:
        key = (cls, tuple(sorted((k, repr(v)) for k, v in values.items())))
        if key not in self._cache:
            try:
                self._cache[key] = cls.model_validate(values)
            except ValidationError as exc:
                err = exc.errors()[0]
                name = ".".join(str(p) for p in err["loc"]) or "parameters"
                if err["type"] == "missing":
                    raise RecipeError(
                        f"parameter '{name}' is required by {self.method.name} {what}; set it in the model's or "
                        "the top-level parameters"
                    ) from None
                got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
                msg = err["msg"].removeprefix("Value error, ")
                raise RecipeError(f"parameter '{name}' {what}: {msg}{got}") from None
        return self._cache[key]


def resolve_name(model: InputModel, weight: WeightSpec) -> tuple[str | None, bool]:
    """The name under which `model` stores `weight`, and whether it was found only through a tie."""
    names = model.index.tensors
    for candidate in (weight.name, *weight.aliases):
        if candidate in names:
            return candidate, False
    if weight.tied_to and weight.tied_to in names:
        return weight.tied_to, True
    return None, False


@dataclass(frozen=True)
class _Found:
    source: SliceSource
    name: str  # the name stored in that source's model
    via_tie: bool


class TensorPlanner:
    """Collects the TensorJobs of one plan (and its notes) as `plan` is called for each output tensor in order."""

    def __init__(self, recipe: MergeRecipe, method: MethodSpec, models: list[InputModel],
                 tokenizer: TokenizerPlan | None, align: bool, out_dtype: str | None,
                 truncate_embeddings: bool = False):
        self.recipe = recipe
        self.truncate_embeddings = truncate_embeddings  # keep the leading rows of embeddings whose sizes differ
        self.method = method
        self.models = models
        self.tokenizer = tokenizer
        self.align = align
        self.cache = ParamCache(method)
        self.out_override = DTYPES[out_dtype] if out_dtype else None
        self.working = DTYPES[recipe.dtype] if recipe.dtype else None
        self.jobs: list[TensorJob] = []
        self.notes: list[str] = []
        self.any_untied_head = False  # an input stores a head the architecture may tie: the output keeps it

    def plan(self, out_name: str, weight_of: WeightOf, piece: Slice, t: float, embed: bool, optional: bool) -> None:
        """Plan output tensor `out_name` of slice `piece` at relative depth `t`, or nothing when it is optional and
        absent, or tied to the embeddings in every input."""
        members = ([piece.base] if piece.base else []) + list(piece.sources)
        found = self._find_inputs(out_name, weight_of, members, optional)
        if found is None:
            return
        if all(f.via_tie for f in found) and weight_of(members[0]).tied_to:
            return  # every input ties this weight to the embeddings: so does the output
        if weight_of(members[0]).tied_to:
            self.any_untied_head = True
        infos = {id(f.source): self.models[f.source.model].index.tensors[f.name] for f in found}
        aligned = self.align and embed
        target = self._target_shape(out_name, found, infos, members[0], piece, embed, aligned)
        sources = {
            id(f.source): SourceTensor(
                f.source.model, f.name, infos[id(f.source)],
                target if tuple(infos[id(f.source)].shape) != target and not aligned else None,
            )
            for f in found
        }
        params, model_params = self._parameters(out_name, piece, sources, t)
        self.jobs.append(
            TensorJob(
                mode=merge_mode(target, self.method, aligned),
                align=aligned,
                name=out_name,
                shape=target,
                dtype=self._dtype(sources[id(members[0])].info.dtype),
                base=sources[id(piece.base)] if piece.base else None,
                sources=tuple(sources[id(s)] for s in piece.sources),
                params=params,
                model_params=model_params,
            )
        )

    def _find_inputs(self, out_name: str, weight_of: WeightOf, members: list[SliceSource],
                     optional: bool) -> list[_Found] | None:
        """Where each input stores this tensor; None when no input has it and it is optional."""
        found: list[_Found] = []
        missing: list[str] = []
        for src in members:
            name, via_tie = resolve_name(self.models[src.model], weight_of(src))
            if name is None:
                missing.append(self.models[src.model].label)
            else:
                found.append(_Found(src, name, via_tie))
        if not found:
            if optional:
                return None
            raise InputModelError(f"tensor '{out_name}' is missing from every input ({', '.join(missing)})")
        if missing:
            have = ", ".join(self.models[f.source.model].label for f in found)
            raise InputModelError(
                f"tensor '{out_name}' is in {have} but missing from {', '.join(missing)}; the models' "
                "architectures differ"
            )
        return found

    def _target_shape(self, out_name: str, found: list[_Found], infos: dict, lead: SliceSource, piece: Slice,
                      embed: bool, aligned: bool) -> tuple[int, ...]:
        """The output shape: the lead input's; the output vocabulary's rows for aligned embeddings; the common
        leading block of embeddings whose vocabularies differ."""
        shapes = {tuple(info.shape) for info in infos.values()}
        target = tuple(infos[id(lead)].shape)

        def detail() -> str:
            return ", ".join(f"{self.models[f.source.model].label}: {list(infos[id(f.source)].shape)}" for f in found)

        if aligned:  # every input's rows are mapped onto the output vocabulary, so only the columns must agree
            if len({s[1:] for s in shapes}) > 1:
                raise InputModelError(f"tensor '{out_name}' has different widths across models ({detail()})")
            return (self.tokenizer.vocab_size, *target[1:])
        if len(shapes) > 1:
            if not embed or len({len(s) for s in shapes}) > 1:
                raise InputModelError(f"tensor '{out_name}' has different shapes across models ({detail()})")
            if piece.base is None:
                target = tuple(min(dims) for dims in zip(*shapes))
            too_small = [s for s in shapes if any(a < b for a, b in zip(s, target))]
            if too_small:
                raise InputModelError(
                    f"tensor '{out_name}': a model has a smaller vocabulary than the base ({detail()}); "
                    "give the recipe a 'tokenizer' block to merge different vocabularies"
                )
            if not self.truncate_embeddings:
                raise InputModelError(
                    f"tensor '{out_name}': vocabularies differ ({detail()}); give the recipe a 'tokenizer' block "
                    f"(e.g. tokenizer: {{source: base}}) to merge them, or pass --unsafe-truncate-embeddings to keep "
                    f"the first {target[0]} rows (mergekit 0.1.5 refuses too without that flag)"
                )
            self.notes.append(f"{out_name}: vocabularies differ ({detail()}); kept the first {target[0]} rows "
                              "(--unsafe-truncate-embeddings)")
        return target

    def _parameters(self, out_name: str, piece: Slice, sources: dict[int, SourceTensor],
                    t: float) -> tuple[Params, tuple[Params, ...]]:
        """The method's global parameters at this tensor and each model's, resolved (scalar, gradient, filter)
        with mergekit's precedence and validated."""
        recipe, cache = self.recipe, self.cache
        global_values = param_values.resolve(cache.global_names, [piece.parameters, recipe.parameters], out_name, t)
        params = cache.validate(self.method.params, global_values, f"at tensor '{out_name}'")
        model_params = []
        for src in piece.sources:
            in_name = sources[id(src)].name
            values = param_values.resolve(
                cache.model_names, [src.parameters, piece.parameters, recipe.parameters], in_name, t
            )
            what = f"for model '{self.models[src.model].label}' at tensor '{in_name}'"
            model_params.append(cache.validate(self.method.model_params, values, what))
        if self.method.check is not None:
            try:
                self.method.check(params, tuple(model_params))
            except ValueError as exc:
                raise RecipeError(f"{recipe.merge_method} at tensor '{out_name}': {exc}") from None
        return params, tuple(model_params)

    def _dtype(self, lead: torch.dtype) -> torch.dtype:
        """--dtype, else the recipe's out_dtype, else its dtype, else the lead input's; integer tensors keep theirs."""
        recipe_out = DTYPES[self.recipe.out_dtype] if self.recipe.out_dtype else None
        dtype = self.out_override or recipe_out or self.working or lead
        return dtype if dtype.is_floating_point else lead
