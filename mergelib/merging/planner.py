"""Recipe + architecture -> a MergePlan, reading headers only: every error (missing tensor, shape mismatch, bad
parameter for any tensor) is raised in milliseconds, not an hour into a merge. `build_plan` reads top to bottom:
models and slices, architecture check, tokenizer, every tensor in output order, notes, config, shard layout.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from mergelib.arch import ArchSpec, WeightSpec
from mergelib.calibration.prepare import check_calibration
from mergelib.config.recipe import MergeRecipe, ignored_parameters
from mergelib.io.writer import TensorSlot, pack_shards
from mergelib.merging.plan import InputModel, MergePlan, TensorJob
from mergelib.merging.plan_config import output_config
from mergelib.merging.plan_inputs import (
    ModelTable,
    Slice,
    SliceSource,
    check_architectures,
    recipe_slices,
    reference_model,
)
from mergelib.merging.plan_tensors import TensorPlanner
from mergelib.methods import get_method
from mergelib.tokenizer import TokenizerPlan, plan_tokenizer

if TYPE_CHECKING:
    from mergelib.tokenizer.donor import DonorTransplant


def build_plan(
    recipe: MergeRecipe,
    *,
    out_shard_size: int = 5_000_000_000,
    out_dtype: str | None = None,
    allow_crimes: bool = False,
    trust_remote_code: bool = False,
    allow_nan: bool = False,
    unsafe_truncate_embeddings: bool = False,
) -> MergePlan:
    """Plan every output tensor of `recipe`; raises a MergelibError for anything wrong, reading no weights."""
    method = get_method(recipe.merge_method)
    transplant = _donor_transplant(recipe)
    table = ModelTable(trust_remote_code, transplant)
    slices = recipe_slices(recipe, method, table)
    models = table.models
    reference = reference_model(slices)
    check_architectures(models, reference, allow_crimes)
    spec = models[reference].spec

    tokenizer = _plan_tokenizer(recipe, models, spec, slices)
    align = tokenizer is not None and (recipe.tokenizer is not None or recipe.tokenizer_source is not None)
    planner = TensorPlanner(recipe, method, models, tokenizer, align, out_dtype, unsafe_truncate_embeddings)
    layer_origin = _plan_tensors(planner, spec, slices)
    transplanted = tuple(transplant.notes) if transplant else ()
    notes = list(transplanted) + planner.notes + _unmerged_note(recipe, spec, models[reference], planner)

    config = output_config(models[reference], spec, len(layer_origin), layer_origin, models,
                           planner.any_untied_head, planner.jobs)
    if align:
        config["vocab_size"] = tokenizer.vocab_size
    jobs = lines_scaled(planner.jobs, spec, len(layer_origin), recipe.lines) if recipe.lines else planner.jobs
    check_calibration(recipe, method, models, jobs)  # data-aware methods: the data or statistics files, headers only
    shards = pack_shards([TensorSlot(j.name, j.shape, j.dtype) for j in jobs], out_shard_size)
    return MergePlan(
        recipe, method, tuple(models), tuple(jobs), shards, config, planner.working, reference, tuple(notes),
        allow_nan, tokenizer, ignored_parameters(recipe), left_out(models, jobs, slices), transplanted,
    )


def lines_scaled(jobs: list[TensorJob], spec: ArchSpec, n_layers: int, lines) -> list[TensorJob]:
    """Each job with its LiNeS scale alpha + beta * depth: output layer l of L at depth l / (L - 1), what comes
    before the layers (embeddings, a carried vision tower) at 0, what comes after (final norm, head) at 1."""
    before = {w.name for w in spec.pre_weights}
    out = []
    for job in jobs:
        layer = spec.layer_of(job.name)
        if layer is not None:
            depth = layer / (n_layers - 1) if n_layers > 1 else 1.0
        else:
            depth = 0.0 if job.name in before or spec.carries(job.name) else 1.0
        out.append(replace(job, lines_scale=float(lines.alpha + lines.beta * depth)))
    return out


def left_out(models: list[InputModel], jobs: list, slices: list[Slice]) -> tuple[tuple[str, str, str], ...]:
    """Every input tensor that no output tensor reads, with why: so nothing is dropped without being said
    (`--dry-run` lists them, the run record keeps them)."""
    read = {(s.model, s.name) for job in jobs for s in job.inputs}
    written = {job.name for job in jobs}
    used_layers: dict[int, set[int]] = {}
    for piece in slices:
        for src in ([piece.base] if piece.base else []) + list(piece.sources):
            used_layers.setdefault(src.model, set()).update(range(src.start, src.end))
    out = []
    for i, model in enumerate(models):
        for name in model.index.tensors:
            if (i, name) in read:
                continue
            layer = model.spec.layer_of(name)
            if layer is not None and layer not in used_layers.get(i, set()):
                why = f"layer {layer} is in no slice"
            elif _is_known(model.spec, name):
                tied = _is_head(model.spec, name) and name not in written
                why = ("the output ties it to the embeddings" if tied
                       else "its place in the output comes from another input")
            else:
                why = f"unknown to the {model.spec.family} architecture spec"
            out.append((model.label, name, why))
    return tuple(out)


def _plan_tensors(planner: TensorPlanner, spec: ArchSpec, slices: list[Slice]) -> list[tuple[int, int]]:
    """Plan the tensors before the layers (embeddings), every layer of every slice, and those after (norm, head), in
    output order; returns the (model, source layer) of each output layer, for the per-layer config lists."""
    first = slices[0]
    lead = planner.models[(first.base or first.sources[0]).model]
    for name in sorted(n for n in lead.index.tensors if spec.carries(n)):  # vision tower, projector: whole
        planner.plan(name, lambda src, w=WeightSpec(name): w, first, 0.0, False, False)
    for weight in spec.pre_weights:
        planner.plan(weight.name, lambda src, w=weight: w, first, 0.0, weight.embed, weight.optional)
    out_layer = 0
    layer_origin: list[tuple[int, int]] = []
    for piece in slices:
        n = piece.sources[0].end - piece.sources[0].start if piece.sources else piece.base.end - piece.base.start
        for j in range(n):
            t = j / (n - 1) if n > 1 else 1.0
            for rel in spec.layer_weights:
                out_name = spec.layer_prefix.format(layer=out_layer) + rel.name

                def weight_of(src: SliceSource, rel: WeightSpec = rel, j: int = j) -> WeightSpec:
                    return spec.layer_weight_names(src.start + j)[spec.layer_weights.index(rel)]

                planner.plan(out_name, weight_of, piece, t, rel.embed, rel.optional)
            lead = piece.base or piece.sources[0]
            layer_origin.append((lead.model, lead.start + j))
            out_layer += 1
    for weight in spec.post_weights:
        planner.plan(weight.name, lambda src, w=weight: w, slices[-1], 0.0, weight.embed, weight.optional)
    return layer_origin


def _unmerged_note(recipe: MergeRecipe, spec: ArchSpec, ref_model: InputModel, planner: TensorPlanner) -> list[str]:
    """A note naming the reference model's tensors that the spec does not know (so nothing merged them)."""
    if recipe.models is None:
        return []
    covered = {j.name for j in planner.jobs} | {w.tied_to for w in spec.post_weights if w.tied_to}
    extra = sorted(n for n in ref_model.index.tensors if n not in covered and not _is_known(spec, n))
    return [f"not merged (unknown to the {spec.family} spec): {', '.join(extra[:8])}"] if extra else []


def _donor_transplant(recipe: MergeRecipe) -> DonorTransplant | None:
    """What gives the inputs the donor's tokenizer when the recipe sets `tokenizer.transplant`."""
    if recipe.tokenizer is None or recipe.tokenizer.transplant is None:
        return None
    from mergelib.tokenizer.donor import DonorTransplant  # late: only recipes that transplant need tokenizers

    first = recipe.models[0].model if recipe.models else recipe.slices[0].sources[0].model
    return DonorTransplant.from_recipe(recipe.tokenizer.source, recipe.base_model, first, recipe.tokenizer.transplant)


def _plan_tokenizer(recipe: MergeRecipe, models: list[InputModel], spec: ArchSpec,
                    slices: list[Slice]) -> TokenizerPlan | None:
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
    config = recipe.tokenizer
    if config is not None and config.transplant is not None:
        config = config.model_copy(update={"source": "base", "transplant": None})  # every input has the donor's
    return plan_tokenizer({m.label: m.path for m in models}, base, config, recipe.tokenizer_source,
                          recipe.chat_template, sizes)


def _is_head(spec: ArchSpec, name: str) -> bool:
    return any(w.tied_to and (name == w.name or name in w.aliases) for w in spec.post_weights)


def _is_known(spec: ArchSpec, name: str) -> bool:
    if spec.carries(name):
        return True
    if spec.layer_of(name) is not None:
        return any(name.endswith(w.name) for w in spec.layer_weights)
    return any(name == w.name or name in w.aliases for w in (*spec.pre_weights, *spec.post_weights))
