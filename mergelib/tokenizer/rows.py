"""Embedding rows aligned to the output vocabulary: where each row of each input comes from, and the gather.

Fill rules follow mergekit's PermutedEmbeddings (../shared/reference/mergekit-semantics.md, "Embedding fill"):
a model uses its own row for a token it has (unless `force`); otherwise the token's default row: the explicit
`tokenizer.tokens` source, else the only model that has it, else the base's row, else the average over the
models that have it, else zeros. Padding rows get the model's mean embedding (Hewitt 2021, "Initializing
new word embeddings for pretrained language models").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from mergelib.errors import InputModelError


@dataclass(frozen=True)
class RowSource:
    """Where one output row of one input model's aligned matrix comes from.

    own: row `row` of this model (`model` is its label); model: row `row` of model `model`; average: the mean of
    the rows `parts` ((model, row) pairs: a token several non-base models have); mean: the mean of rows
    [0, row) of `model`, its real vocabulary; zero: zeros.
    """

    kind: Literal["own", "model", "average", "mean", "zero"]
    model: str | None = None
    row: int | None = None
    parts: tuple[tuple[str, int], ...] = ()


ZERO = RowSource("zero")


def default_row(holders: Sequence[tuple[str, int]], base: str) -> RowSource:
    """The row a model that lacks a token uses: `holders` are the (model, row) pairs that have it."""
    if not holders:
        return ZERO
    if len(holders) == 1:
        return RowSource("model", *holders[0])
    for model, row in holders:
        if model == base:
            return RowSource("model", model, row)
    return RowSource("average", parts=tuple(holders))


def plan_rows(
    tokens: Sequence[str | None],
    n_rows: int,
    labels: Sequence[str],
    owner: str,
    base: str,
    lookup: Callable[[str, str], int | None],
    rows: dict[str, int],
    real_rows: dict[str, int],
    explicit: dict[str, tuple[RowSource | None, bool]],
) -> dict[str, tuple[RowSource, ...]]:
    """Per model, one RowSource per output row.

    `tokens[r]` is the output token at row r (None: no token maps to it); `lookup(model, token)` its row in that
    model, None when the model lacks it or has no row for it; `owner` gave the vocabulary; `explicit[token]` is
    (source from `tokenizer.tokens` or None, force).
    """
    out: dict[str, list[RowSource]] = {m: [] for m in labels}
    for r in range(n_rows):
        token = tokens[r] if r < len(tokens) else None
        if token is None:
            for m in labels:
                out[m].append(_tokenless_row(r, m, owner, rows, real_rows))
            continue
        holders = [(m, i) for m in labels if (i := lookup(m, token)) is not None]
        chosen, force = explicit.get(token, (None, False))
        default = chosen or default_row(holders, base)
        own = dict(holders)
        for m in labels:
            if m in own and not force:
                out[m].append(RowSource("own", m, own[m]))
            elif default.kind == "model" and default.model == m:
                out[m].append(RowSource("own", m, default.row))
            else:
                out[m].append(default)
    return {m: tuple(sources) for m, sources in out.items()}


def _tokenless_row(r: int, m: str, owner: str, rows: dict[str, int], real_rows: dict[str, int]) -> RowSource:
    if r >= rows[owner]:  # padding past every row the vocabulary owner has: the mean embedding
        return RowSource("mean", m, real_rows[m]) if real_rows[m] else ZERO
    if m == owner or r < rows[m]:  # the owner's own padded rows are kept; so are other models' rows in range
        return RowSource("own", m, r)
    return RowSource("model", owner, r)


def gather_rows(sources: Sequence[RowSource], label: str, matrices: dict[str, torch.Tensor]) -> torch.Tensor:
    """The [len(sources), hidden] matrix for input `label` (embed_tokens or lm_head), one row per RowSource, built
    from the inputs' matrices of the same weight; the result has `matrices[label]`'s dtype."""
    own = matrices[label]
    if own.dim() != 2:
        raise InputModelError(f"model '{label}': an embedding matrix is 2-D, got shape {list(own.shape)}")
    hidden = own.shape[1]
    out = torch.empty((len(sources), hidden), dtype=own.dtype)
    zeros: list[int] = []
    gathers: dict[str, tuple[list[int], list[int]]] = {}
    means: dict[tuple[str, int], torch.Tensor] = {}
    for dst, src in enumerate(sources):
        if src.kind in ("own", "model"):
            dsts, rows = gathers.setdefault(src.model, ([], []))
            dsts.append(dst)
            rows.append(src.row)
        elif src.kind == "average":
            stacked = torch.stack([_matrix(matrices, m, hidden, r + 1, label)[r].float() for m, r in src.parts])
            out[dst] = stacked.mean(dim=0).to(own.dtype)  # [len(parts), hidden] -> [hidden]
        elif src.kind == "mean":
            key = (src.model, src.row)
            if key not in means:
                block = _matrix(matrices, src.model, hidden, src.row, label)[: src.row]  # [row, hidden]
                means[key] = block.mean(dim=0, dtype=torch.float32)  # accumulates in fp32, no copy
            out[dst] = means[key].to(own.dtype)
        else:
            zeros.append(dst)
    if zeros:
        out[torch.tensor(zeros)] = 0
    for model, (dsts, rows) in gathers.items():
        matrix = _matrix(matrices, model, hidden, max(rows) + 1, label)
        picked = matrix.index_select(0, torch.tensor(rows)).to(own.dtype)  # [len(rows), hidden]
        out.index_copy_(0, torch.tensor(dsts), picked)
    return out


def _matrix(matrices: dict[str, torch.Tensor], model: str, hidden: int, need: int, label: str) -> torch.Tensor:
    if model not in matrices:
        raise ValueError(f"gather_rows('{label}') needs the matrix of model '{model}' too; pass every input's")
    matrix = matrices[model]
    if matrix.dim() != 2 or matrix.shape[1] != hidden:
        raise InputModelError(
            f"model '{model}': embedding shape {list(matrix.shape)} does not match '{label}' (width {hidden})"
        )
    if matrix.shape[0] < need:
        raise InputModelError(
            f"model '{model}': the embedding has {matrix.shape[0]} rows, the vocabulary plan uses row {need - 1}; "
            "its config vocab_size overstates the matrix"
        )
    return matrix
