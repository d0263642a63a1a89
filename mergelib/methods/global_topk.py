"""Model-wide top-k of task-vector magnitudes (TIES as published, arXiv:2306.01708): how many entries of each tensor
the k largest |delta| of the whole model fall in, found in two radix passes over float32 bit patterns.

|delta| >= 0, so its float32 bits order like its values: pass 1 histograms the high 16 bits per model and finds the
bucket holding the k-th largest; pass 2 histograms the low 16 bits inside that bucket (and counts, per tensor, what
lies above it), which gives the exact cut. Memory: two 65536-bin histograms per model and, per tensor, the distinct
low digits inside one bucket. Ties at the cut go to tensors in sorted-name order, then to lower flat indices inside
a tensor (the order of the paper's flattened vector, `state_dict_to_vector` sorting by key), so exactly k are kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

_BINS = 1 << 16

# magnitudes(name) yields (model, |delta| chunk) for every model taking part in tensor `name`; chunks of one tensor
# come in flat order and may be split anywhere (row blocks). It is called twice per tensor (once per pass).
Magnitudes = Callable[[str], Iterable[tuple[int, torch.Tensor]]]


def _digits(magnitude: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    bits = magnitude.to(torch.float32).contiguous().reshape(-1).view(torch.int32)
    return bits >> 16, bits & 0xFFFF


def _bucket(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """(digit, rank inside it): the largest digit d with count(digits >= d) >= k, and how many of the k lie in d."""
    at_least = hist.flip(0).cumsum(0).flip(0)  # at_least[d] = count of digits >= d
    digit = int(torch.nonzero(at_least >= k).max())
    return digit, k - int(at_least[digit] - hist[digit])


def kept_counts(names: Sequence[str], ks: Sequence[int], magnitudes: Magnitudes) -> dict[str, dict[int, int]]:
    """For each tensor, {model: entries kept}, so that each model m keeps exactly its ks[m] largest |delta| over
    every tensor it takes part in (all of them when ks[m] >= its size, none when ks[m] <= 0)."""
    order = sorted(names)
    n = len(ks)
    high = torch.zeros(n, _BINS, dtype=torch.int64)
    sizes: dict[tuple[str, int], int] = {}
    for name in order:
        for m, mag in magnitudes(name):
            digit, _ = _digits(mag)
            high[m] += torch.bincount(digit, minlength=_BINS)
            sizes[(name, m)] = sizes.get((name, m), 0) + mag.numel()
    totals = high.sum(dim=1).tolist()
    cut_high = {m: _bucket(high[m], ks[m]) for m in range(n) if 0 < ks[m] < totals[m]}

    above: dict[tuple[str, int], int] = {}
    inside: dict[tuple[str, int], torch.Tensor] = {}  # per tensor: bincount of the low digits in the cut's bucket
    low = torch.zeros(n, _BINS, dtype=torch.int64)
    for name in order:
        for m, mag in magnitudes(name):
            if m not in cut_high:
                continue
            digit, rest = _digits(mag)
            bucket = cut_high[m][0]
            above[(name, m)] = above.get((name, m), 0) + int((digit > bucket).sum())
            members = torch.bincount(rest[digit == bucket], minlength=_BINS)
            inside[(name, m)] = inside[(name, m)] + members if (name, m) in inside else members
            low[m] += members

    counts: dict[str, dict[int, int]] = {name: {} for name in order}
    for m in range(n):
        tensors = [name for name in order if (name, m) in sizes]
        if m not in cut_high:
            for name in tensors:
                counts[name][m] = sizes[(name, m)] if ks[m] >= totals[m] else 0
            continue
        low_digit, _ = _bucket(low[m], cut_high[m][1])
        greater = {name: above[(name, m)] + int(inside[(name, m)][low_digit + 1:].sum()) for name in tensors}
        room = ks[m] - sum(greater.values())  # entries equal to the cut still to keep, handed out in name order
        for name in tensors:
            ties = min(room, int(inside[(name, m)][low_digit]))
            room -= ties
            counts[name][m] = greater[name] + ties
    return counts

