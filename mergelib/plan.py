"""Recipe + architecture -> every output tensor planned before any weight is read.

A plan fixes each output tensor's name, shape, dtype, source tensors and validated parameters, so the shard
layout is known up front and every error (missing tensor, shape mismatch, bad parameter for any tensor) is
raised in milliseconds, not an hour into a merge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from mergelib.arch import ArchSpec, WeightSpec, spec_for
from mergelib.config import params as param_values
from mergelib.config.recipe import MergeRecipe, ModelRef
from mergelib.errors import InputModelError, RecipeError
from mergelib.io.hub import resolve_model
from mergelib.io.index import ShardIndex, TensorInfo, index_model, read_config
from mergelib.io.writer import TensorSlot, pack_shards
from mergelib.methods import MethodSpec, Params, get_method
from mergelib.tokenizer import TokenizerPlan, plan_tokenizer

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
WORK_FACTOR = 4  # float32 copies a method holds beyond its inputs (stacked deltas, masks, result)
BLOCK_NUMEL = 1 << 20  # elements per input in one row block; tensors from this size up are merged in blocks
STREAM_NUMEL = 1 << 24  # from this size up (embeddings) a multi-pass method re-reads its blocks instead of keeping them


@dataclass(frozen=True)
class InputModel:
    """One distinct input model, resolved and indexed (headers only)."""

    ref: ModelRef
    path: Path
    config: dict
    index: ShardIndex
    spec: ArchSpec
    num_layers: int

    @property
    def label(self) -> str:
        return str(self.ref)


@dataclass(frozen=True)
class SourceTensor:
    """One input tensor feeding an output tensor."""

    model: int  # index into MergePlan.models
    name: str  # name stored in that model's checkpoint
    info: TensorInfo
    crop: tuple[int, ...] | None = None  # leading sub-block to keep (embeddings of a larger vocabulary)


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: where its inputs come from and how they combine."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    base: SourceTensor | None
    sources: tuple[SourceTensor, ...]
    params: Params
    model_params: tuple[Params, ...]
    mode: str = "whole"  # "whole": merge whole tensors; "rows": merge per row block; "stream": two-phase
    align: bool = False  # embedding rows are permuted/filled to the output vocabulary before the method runs

    @property
    def block_rows(self) -> int:
        """Rows per block in "rows"/"stream" mode."""
        row = self.numel // self.shape[0] if self.shape and self.shape[0] else 1
        return max(1, BLOCK_NUMEL // max(1, row))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def out_bytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def read_bytes(self) -> int:
        return sum(s.info.nbytes for s in self.inputs)

    @property
    def inputs(self) -> tuple[SourceTensor, ...]:
        return ((self.base,) if self.base is not None else ()) + self.sources

    @property
    def cached(self) -> bool:
        """In "stream" mode: whether the input blocks are read once and kept for every pass (below
        STREAM_NUMEL) rather than re-read per pass."""
        return self.numel < STREAM_NUMEL

    @property
    def work_bytes(self) -> int:
        """Estimated peak memory of computing this tensor (float32 inputs plus method intermediates)."""
        n_inputs = len(self.inputs)
        block = min(self.numel, self.block_rows * (self.numel // max(1, self.shape[0] if self.shape else 1)))
        per_block = block * 4 * (n_inputs + WORK_FACTOR)
        if self.mode == "rows":
            return per_block + block * self.dtype.itemsize
        if self.mode == "stream":  # a per-row-ranked |task vector| and its mask (DELLA), the kept input blocks
            held = self.numel * (4 * 3 + len(self.sources)) + (self.numel * 4 * n_inputs if self.cached else 0)
            return held + per_block
        return self.numel * 4 * (n_inputs + WORK_FACTOR) + self.read_bytes


def memory_budget(works: list[int], threads: int) -> int:
    """Room for the largest tensor's work alone, or for `threads` of the larger tensors at once (the one at the
    90th percentile of the work sizes), whichever is more, and at least 256 MiB: peak memory follows the
    largest tensor, not the model."""
    if not works:
        return 256 << 20
    ordered = sorted(works, reverse=True)
    return max(256 << 20, ordered[0], max(1, threads) * ordered[len(ordered) // 10])


@dataclass(frozen=True)
class MergePlan:
    """Everything a merge will do, decided before any weight is read."""

    recipe: MergeRecipe
    method: MethodSpec
    models: tuple[InputModel, ...]
    jobs: tuple[TensorJob, ...]
    shards: dict[str, list[TensorSlot]]
    config: dict  # output config.json
    working_dtype: torch.dtype | None
    donor: int  # model whose tokenizer files are copied
    notes: tuple[str, ...] = field(default=())
    allow_nan: bool = False  # merge inputs holding NaN/Inf instead of stopping at the first
    tokenizer: TokenizerPlan | None = None  # output vocabulary, when the recipe assembles one

    @property
    def bytes_read(self) -> int:
        return sum(j.read_bytes for j in self.jobs)

    @property
    def bytes_written(self) -> int:
        return sum(j.out_bytes for j in self.jobs)

    def peak_memory(self, threads: int) -> int:
        """Estimated peak working memory with `threads` tensors in flight under the default budget
        (`memory_budget`), never more than the `threads` largest jobs together."""
        works = [j.work_bytes for j in self.jobs]
        if not works:
            return 0
        return min(sum(sorted(works, reverse=True)[: max(1, threads)]), memory_budget(works, threads))


@dataclass(frozen=True)
class _Source:
    model: int
    start: int
    end: int
    parameters: dict


@dataclass(frozen=True)
class _Slice:
    sources: tuple[_Source, ...]  # non-base inputs, recipe order
    base: _Source | None
    parameters: dict
    where: str


class _ModelTable:
    """Resolves and indexes each distinct model reference once."""

    def __init__(self, trust_remote_code: bool):
        self.models: list[InputModel] = []
        self._by_key: dict[str, int] = {}
        self.trust_remote_code = trust_remote_code

    def add(self, ref: ModelRef) -> int:
        key = str(ref)
        if key in self._by_key:
            return self._by_key[key]
        path = resolve_model(ref.path, ref.revision)
        if ref.lora:
            from mergelib.lora import lora_input  # late: only recipes with model+lora need it

            path = lora_input(path, ref.lora)
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


def _slices(recipe: MergeRecipe, method: MethodSpec, table: _ModelTable) -> list[_Slice]:
    """The recipe as output slices, with the base model's role applied (mergekit's normalisation)."""
    out: list[_Slice] = []
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
        sources = [_Source(m, 0, table.models[m].num_layers, p) for m, p in entries]
        out.append(_split_base(sources, base, method, {}, "models"))
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
                sources.append(_Source(m, start, end, src.parameters))
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
            out.append(_split_base(sources, base if method.base != "input" else None, method, piece.parameters, where))
    return out


def _split_base(sources: list[_Source], base: int | None, method: MethodSpec, params: dict, where: str) -> _Slice:
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
    return _Slice(tuple(sources), base_src, params, where)


class _ParamCache:
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


def _resolve_name(model: InputModel, weight: WeightSpec) -> tuple[str | None, bool]:
    """The name under which `model` stores `weight`, and whether it was found only through a tie."""
    names = model.index.tensors
    for candidate in (weight.name, *weight.aliases):
        if candidate in names:
            return candidate, False
    if weight.tied_to and weight.tied_to in names:
        return weight.tied_to, True
    return None, False


def _layer_lists(config: dict, n_layers: int) -> list[str]:
    return [k for k, v in config.items() if isinstance(v, list) and len(v) == n_layers and n_layers > 1]


def build_plan(
    recipe: MergeRecipe,
    *,
    out_shard_size: int = 5_000_000_000,
    out_dtype: str | None = None,
    allow_crimes: bool = False,
    trust_remote_code: bool = False,
    allow_nan: bool = False,
) -> MergePlan:
    """Plan every output tensor of `recipe`; raises a MergelibError for anything wrong, reading no weights."""
    method = get_method(recipe.merge_method)
    table = _ModelTable(trust_remote_code)
    slices = _slices(recipe, method, table)
    models = table.models
    first = slices[0]
    reference = (first.base or first.sources[0]).model
    ref_model = models[reference]
    spec = ref_model.spec
    arch = (ref_model.config.get("architectures") or ["?"])[0]
    for m in models:
        other = (m.config.get("architectures") or ["?"])[0]
        if other != arch and not allow_crimes:
            raise InputModelError(
                f"model '{m.label}' is a {other}, '{ref_model.label}' is a {arch}; "
                "pass --allow-crimes to merge different architectures whose shapes agree"
            )

    tokenizer = _plan_tokenizer(recipe, models, spec, slices)
    align = tokenizer is not None and (recipe.tokenizer is not None or recipe.tokenizer_source is not None)
    cache = _ParamCache(method)
    out_override = DTYPES[out_dtype] if out_dtype else None
    working = DTYPES[recipe.dtype] if recipe.dtype else None
    jobs: list[TensorJob] = []
    notes: list[str] = []
    any_untied_head = False

    def plan_tensor(out_name: str, weight_of, piece: _Slice, t: float, embed: bool, optional: bool) -> None:
        nonlocal any_untied_head
        members = ([piece.base] if piece.base else []) + list(piece.sources)
        found: list[tuple[_Source, str, bool]] = []
        missing: list[str] = []
        for src in members:
            weight = weight_of(src)
            name, via_tie = _resolve_name(models[src.model], weight)
            if name is None:
                missing.append(models[src.model].label)
            else:
                found.append((src, name, via_tie))
        if not found:
            if optional:
                return
            raise InputModelError(f"tensor '{out_name}' is missing from every input ({', '.join(missing)})")
        if missing:
            have = ", ".join(models[s.model].label for s, _, _ in found)
            raise InputModelError(
                f"tensor '{out_name}' is in {have} but missing from {', '.join(missing)}; the models' "
                "architectures differ"
            )
        if all(via_tie for _, _, via_tie in found) and weight_of(members[0]).tied_to:
            return  # every input ties this weight to the embeddings: so does the output
        if weight_of(members[0]).tied_to:
            any_untied_head = True
        infos = {id(src): models[src.model].index.tensors[name] for src, name, _ in found}
        shapes = {tuple(info.shape) for info in infos.values()}
        target = tuple(infos[id(members[0])].shape)
        aligned = align and embed
        if aligned:  # every input's rows are mapped onto the output vocabulary, so only the columns must agree
            if len({s[1:] for s in shapes}) > 1:
                detail = ", ".join(f"{models[s.model].label}: {list(infos[id(s)].shape)}" for s, _, _ in found)
                raise InputModelError(f"tensor '{out_name}' has different widths across models ({detail})")
            target = (tokenizer.vocab_size, *target[1:])
        elif len(shapes) > 1:
            detail = ", ".join(f"{models[s.model].label}: {list(infos[id(s)].shape)}" for s, _, _ in found)
            if not embed or len({len(s) for s in shapes}) > 1:
                raise InputModelError(f"tensor '{out_name}' has different shapes across models ({detail})")
            if piece.base is None:
                target = tuple(min(dims) for dims in zip(*shapes))
            too_small = [s for s in shapes if any(a < b for a, b in zip(s, target))]
            if too_small:
                raise InputModelError(
                    f"tensor '{out_name}': a model has a smaller vocabulary than the base ({detail}); "
                    "give the recipe a 'tokenizer' block to merge different vocabularies"
                )
            notes.append(f"{out_name}: vocabularies differ ({detail}); kept the first {target[0]} rows")
        sources = {
            id(src): SourceTensor(
                src.model, name, infos[id(src)],
                target if tuple(infos[id(src)].shape) != target and not aligned else None,
            )
            for src, name, _ in found
        }
        global_values = param_values.resolve(cache.global_names, [piece.parameters, recipe.parameters], out_name, t)
        params = cache.validate(method.params, global_values, f"at tensor '{out_name}'")
        model_params = []
        for src in piece.sources:
            in_name = sources[id(src)].name
            values = param_values.resolve(
                cache.model_names, [src.parameters, piece.parameters, recipe.parameters], in_name, t
            )
            what = f"for model '{models[src.model].label}' at tensor '{in_name}'"
            model_params.append(cache.validate(method.model_params, values, what))
        if method.check is not None:
            try:
                method.check(params, tuple(model_params))
            except ValueError as exc:
                raise RecipeError(f"{recipe.merge_method} at tensor '{out_name}': {exc}") from None
        lead = sources[id(members[0])].info
        dtype = out_override or (DTYPES[recipe.out_dtype] if recipe.out_dtype else None) or working or lead.dtype
        if not dtype.is_floating_point:
            dtype = lead.dtype
        numel = math.prod(target)
        mode = "whole"
        if numel >= min(BLOCK_NUMEL, STREAM_NUMEL) and len(target) >= 1 and target[0] > 1 and not aligned:
            mode = "stream" if method.stream is not None else ("rows" if method.rowwise else "whole")
        jobs.append(
            TensorJob(
                mode=mode,
                align=aligned,
                name=out_name,
                shape=target,
                dtype=dtype,
                base=sources[id(piece.base)] if piece.base else None,
                sources=tuple(sources[id(s)] for s in piece.sources),
                params=params,
                model_params=tuple(model_params),
            )
        )

    for weight in spec.pre_weights:
        plan_tensor(weight.name, lambda src, w=weight: w, first, 0.0, weight.embed, weight.optional)
    out_layer = 0
    layer_origin: list[tuple[int, int]] = []  # (model, source layer) of each output layer, for per-layer config
    for piece in slices:
        n = piece.sources[0].end - piece.sources[0].start if piece.sources else piece.base.end - piece.base.start
        for j in range(n):
            t = j / (n - 1) if n > 1 else 1.0
            for rel in spec.layer_weights:
                out_name = spec.layer_prefix.format(layer=out_layer) + rel.name

                def weight_of(src: _Source, rel: WeightSpec = rel, j: int = j) -> WeightSpec:
                    return spec.layer_weight_names(src.start + j)[spec.layer_weights.index(rel)]

                plan_tensor(out_name, weight_of, piece, t, rel.embed, rel.optional)
            lead = piece.base or piece.sources[0]
            layer_origin.append((lead.model, lead.start + j))
            out_layer += 1
    for weight in spec.post_weights:
        plan_tensor(weight.name, lambda src, w=weight: w, slices[-1], 0.0, weight.embed, weight.optional)

    covered = {j.name for j in jobs} | {
        w.tied_to for w in spec.post_weights if w.tied_to
    }
    if recipe.models is not None:
        extra = sorted(n for n in ref_model.index.tensors if n not in covered and not _is_known(spec, n, ref_model))
        if extra:
            notes.append(f"not merged (unknown to the {spec.family} spec): {', '.join(extra[:8])}")

    config = _output_config(ref_model, spec, out_layer, layer_origin, models, any_untied_head, jobs)
    if align:
        config["vocab_size"] = tokenizer.vocab_size
    shards = pack_shards([TensorSlot(j.name, j.shape, j.dtype) for j in jobs], out_shard_size)
    donor = reference
    return MergePlan(
        recipe, method, tuple(models), tuple(jobs), shards, config, working, donor, tuple(notes), allow_nan,
        tokenizer,
    )


def _plan_tokenizer(recipe: MergeRecipe, models: list[InputModel], spec: ArchSpec, slices) -> TokenizerPlan | None:
    """The output vocabulary when the recipe sets `tokenizer`, `tokenizer_source` or `chat_template`."""
    if recipe.tokenizer is None and recipe.tokenizer_source is None and recipe.chat_template is None:
        return None
    embed = next((w for w in (*spec.pre_weights, *spec.post_weights) if w.embed), None)
    sizes = {}
    for m in models:
        info = m.index.tensors.get(embed.name) if embed else None
        sizes[m.label] = info.shape[0] if info is not None else int(m.config.get("vocab_size", 0))
    first = slices[0]
    base = models[first.base.model].label if first.base is not None else (
        str(recipe.base_model) if recipe.base_model is not None else None
    )
    return plan_tokenizer({m.label: m.path for m in models}, base, recipe.tokenizer, recipe.tokenizer_source,
                          recipe.chat_template, sizes)


def _is_known(spec: ArchSpec, name: str, model: InputModel) -> bool:
    if spec.layer_of(name) is not None:
        return any(name.endswith(w.name) for w in spec.layer_weights)
    return any(name == w.name or name in w.aliases for w in (*spec.pre_weights, *spec.post_weights))


def _output_config(
    ref: InputModel,
    spec: ArchSpec,
    n_layers: int,
    origin: list[tuple[int, int]],
    models: list[InputModel],
    untied_head: bool,
    jobs: list[TensorJob],
) -> dict[str, Any]:
    config = dict(ref.config)
    if n_layers != ref.num_layers:
        if not spec.num_layers_key:
            raise InputModelError(
                f"'{ref.label}': cannot set the layer count in config.json for an architecture without a spec "
                f"({config.get('architectures')}); add one under mergelib/arch/specs/"
            )
        node = config
        *parents, leaf = spec.num_layers_key.split(".")
        for part in parents:
            node[part] = dict(node[part])
            node = node[part]
        node[leaf] = n_layers
        for key in _layer_lists(ref.config, ref.num_layers):
            config[key] = [models[m].config[key][layer] for m, layer in origin]
    if untied_head and config.get("tie_word_embeddings"):
        config["tie_word_embeddings"] = False
    if jobs:
        dtype_name = str(jobs[-1].dtype).removeprefix("torch.")
        config["dtype" if "dtype" in config else "torch_dtype"] = dtype_name
    return config
