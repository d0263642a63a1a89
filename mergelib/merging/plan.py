"""What a merge plan is: every output tensor's name, shape, dtype, source tensors and validated parameters, fixed
before any weight is read, so the shard layout is known up front. `planner.build_plan` makes one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergelib.arch import ArchSpec
from mergelib.config.recipe import MergeRecipe, ModelRef
from mergelib.io.index import ShardIndex, TensorInfo
from mergelib.io.writer import TensorSlot
from mergelib.methods import MethodSpec, Params
from mergelib.tokenizer import TokenizerPlan

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
    lines_scale: float | None = None  # LiNeS: the merged task vector times this (None: as the method gave it)

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
        if self.mode == "stream":  # the members a rank selection collects (TIES, Breadcrumbs: a few bytes an element),
            # DELLA's block masks (a byte an element per model), the kept input blocks
            held = self.numel * (4 + len(self.sources)) + (self.numel * 4 * n_inputs if self.cached else 0)
            return held + per_block
        return self.numel * 4 * (n_inputs + WORK_FACTOR) + self.read_bytes


def memory_budget(works: list[int], threads: int) -> int:
    """Room for the largest tensor's work beside `threads` - 1 of the larger tensors (the one at the 90th
    percentile of the work sizes), and at least 256 MiB: peak memory follows the largest tensor, not the model,
    and while the largest is merged the other threads still have work that fits."""
    if not works:
        return 256 << 20
    ordered = sorted(works, reverse=True)
    return max(256 << 20, ordered[0] + (max(1, threads) - 1) * ordered[len(ordered) // 10])


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
    ignored_params: dict[str, str] = field(default_factory=dict)  # set in the recipe, unused by the method: why
    left_out: tuple[tuple[str, str, str], ...] = ()  # (model, tensor, why) for every input tensor not merged
    transplanted: tuple[str, ...] = ()  # one line per input given the donor's tokenizer (tokenizer.transplant)
    # data-aware methods: where each input model's statistics are (mergelib.calibration.store), set by
    # `mergelib.calibration.prepare.statistics_for` after planning, before the engine runs
    statistics: object | None = None

    def dequantised_notes(self) -> list[str]:
        """One line per quantised input model: what was dequantised on read."""
        return [f"'{m.label}': {m.index.note.split(': ', 1)[1]}" for m in self.models if m.index.note]

    def ignored_warnings(self) -> list[str]:
        """One line per parameter the recipe sets that the method accepts and ignores."""
        return [f"{self.method.name} ignores '{name}' (it changes nothing: {why})"
                for name, why in self.ignored_params.items()]

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


def merge_mode(shape: tuple[int, ...], method: MethodSpec, aligned: bool) -> str:
    """How a tensor of `shape` is merged: "whole", in row blocks ("rows"), or in passes over row blocks ("stream").
    Reads BLOCK_NUMEL and STREAM_NUMEL at call time (tests lower them to exercise the block paths)."""
    if math.prod(shape) >= min(BLOCK_NUMEL, STREAM_NUMEL) and len(shape) >= 1 and shape[0] > 1 and not aligned:
        return "stream" if method.stream is not None else ("rows" if method.rowwise else "whole")
    return "whole"
