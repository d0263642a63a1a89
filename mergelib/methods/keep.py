"""Keep rules of sparsified task vectors, decided over row blocks without holding a whole task vector.

A rank band (TIES top-k, Breadcrumbs' band) becomes a cut value plus a flat-index limit for the values equal to
the cut (lower flat indices win, as `select.top_k_mask`). Usually one pass finds it: a sample of |delta| places
a narrow window of values around the cut, the pass counts the values above the window and collects those inside
(a few percent), and the k-th largest among them is exact. When the sample misplaces the window, an exact radix
select on the float32 bits runs instead: a histogram of the 16-bit high digits, then the members of the bucket
holding the cut (or, for a bucket too large to collect, a low-digit histogram and a scan for the tie limit).
DARE's random drop is a key into a counter-based uniform stream (`fused.uniform_at`); DELLA's per-row ranks are
decided per block by an exact sort of each row (`fused.magprune_keep`; by counting for bf16 deltas,
`fused.magprune_keep_bf16`), into a mask held for the passes, summing the L1 norms as they go.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch

from mergelib.methods import fused, torch_kernels
from mergelib.methods import masks as masks_module
from mergelib.methods.select import top_k_mask

_DIGITS = 1 << 16
_SAMPLES = 1 << 16  # |delta| values sampled to place each window
_SAMPLE_BLOCKS = 8  # blocks the sample is drawn from (evenly spread)
_WINDOW_SHARE = 0.12  # a window holding more than this share of the tensor is given up
_COLLECT_MIN = 1 << 20  # bucket members are always collected up to this many (6 to 10 bytes each)


_STORED_BITS = {torch.bfloat16: np.uint16, torch.float16: np.int16}  # how the fused kernels take 16-bit inputs


def stored_bits(tensor: torch.Tensor, kind: type) -> np.ndarray:
    """The bit patterns of a bf16/fp16 tensor, flat, as the kernels' element type `kind` (no copy when contiguous)."""
    return tensor.contiguous().reshape(-1).view(torch.int16).numpy().view(kind)


@dataclass(frozen=True)
class Blocks:
    """Row-block access to one tensor's inputs: `read(i, start, end)` gives rows of input i (-1: the base) in
    float32; `stored`, when given, the same rows as stored (bf16/fp16 not widened), which `inputs` hands to the
    kernels as they are when every input has the same 16-bit dtype."""

    shape: tuple[int, ...]
    n_models: int
    read: Callable[[int, int, int], torch.Tensor]
    rows_per_block: int
    stored: Callable[[int, int, int], torch.Tensor] | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def ranges(self) -> Iterator[tuple[int, int, int]]:
        """(start row, end row, flat offset of the start) of each block, in order."""
        rows = self.shape[0]
        row_numel = self.numel // rows if rows else 0
        step = max(1, self.rows_per_block)
        for start in range(0, rows, step):
            yield start, min(rows, start + step), start * row_numel

    def flat(self, i: int, start: int, end: int) -> np.ndarray:
        """Rows [start, end) of input i as a flat float32 array."""
        return self.read(i, start, end).to(torch.float32).contiguous().reshape(-1).numpy()

    def inputs(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """The base's rows [start, end), flat, and every model's as the rows of one [n_models, elements] array
        (one array type whatever the model count: the kernels compile once, see `kernel_warmup`): float32, or
        the stored bf16/fp16 bits when `stored` is given and every input has that dtype."""
        if self.stored is not None:
            rows = [self.stored(i, start, end) for i in range(-1, self.n_models)]
            kind = _STORED_BITS.get(rows[0].dtype)
            if kind is not None and all(r.dtype == rows[0].dtype for r in rows):
                base = stored_bits(rows[0], kind)
                xs = np.empty((self.n_models, base.shape[0]), dtype=kind)
                for i in range(self.n_models):
                    xs[i] = stored_bits(rows[i + 1], kind)
                return base, xs
            read = lambda i, a, b: rows[i + 1]  # noqa: E731 - mixed dtypes: widened below, read once
        else:
            read = self.read
        base = read(-1, start, end).to(torch.float32).contiguous().reshape(-1).numpy()
        xs = np.empty((self.n_models, base.shape[0]), dtype=np.float32)
        for i in range(self.n_models):
            torch.from_numpy(xs[i]).copy_(read(i, start, end).reshape(-1))  # widens while it copies
        return base, xs

    def widened(self) -> Blocks:
        """These blocks with float32 inputs only (for rules that compute on the inputs outside the kernels)."""
        return replace(self, stored=None)


def collect_rows(shape: tuple[int, ...], run: Callable[[Callable[[int, torch.Tensor], None]], None]) -> torch.Tensor:
    """The whole float32 tensor of `shape` that `run(emit)` emits row block by row block: a streamed method's
    whole-tensor form (the same code on one block gives the same bits)."""
    out = torch.empty(shape, dtype=torch.float32)

    def emit(start: int, rows: torch.Tensor) -> None:
        out[start : start + rows.shape[0]] = rows

    run(emit)
    return out


@dataclass(frozen=True)
class Band:
    """Keep the top `k_lo` |delta| and drop the top `k_hi` (k_hi = 0: drop none)."""

    k_lo: int
    k_hi: int = 0


@dataclass(frozen=True)
class Random:
    """Keep where uniform(key, flat index) < prob."""

    key: int
    prob: float


@dataclass(frozen=True)
class Explicit:
    """Keep where `mask` (bool, the tensor's shape) is True."""

    mask: torch.Tensor


@dataclass(frozen=True)
class Ranked:
    """DELLA's MAGPRUNE: keep where uniform(key, flat index) < the row-rank probability of |delta| within its
    last-dimension row of `row` elements (`masks.magprune_probabilities`). Rows are whole inside any block of
    leading rows, so each block decides its own mask: no whole-tensor |delta|, sort or mask is held."""

    density: float
    epsilon: float
    key: int
    row: int


Rule = Band | Random | Explicit | Ranked | None  # None: keep everything


class RuleArrays:
    """Per-model keep rules in the flat arrays the fused kernels take (see `mergelib.methods.fused`)."""

    def __init__(self, n_models: int):
        self.kind = np.zeros(n_models, dtype=np.int8)
        self.lo_cut = np.full(n_models, -1.0, dtype=np.float32)
        self.lo_tie = np.zeros(n_models, dtype=np.int64)
        self.hi_cut = np.full(n_models, np.inf, dtype=np.float32)
        self.hi_tie = np.zeros(n_models, dtype=np.int64)
        self.key = np.zeros(n_models, dtype=np.uint64)
        self.prob = np.zeros(n_models, dtype=np.float32)
        self.masks: dict[int, torch.Tensor] = {}
        self.ranked: dict[int, Ranked] = {}
        self._ranked_blocks: dict[tuple[int, int], np.ndarray] = {}  # block masks, decided once for every pass
        # exact L1 slots (all, kept) of each row-ranked model's |delta| over the blocks decided so far: the rank
        # kernels sum while they rank, so `l1_factors` needs no pass of its own for them
        self.ranked_sums: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._tables: dict[int, np.ndarray] = {}  # each ranked model's keep probability by rank

    def add_ranked(self, i: int, rule: Ranked) -> None:
        """Model i keeps by row rank: its masks are decided block by block (`explicit`), its sums start at 0."""
        self.kind[i] = fused.KEEP_MASK
        self.ranked[i] = rule
        self._tables[i] = masks_module.magprune_table(rule.row, rule.density, rule.epsilon).numpy()
        self.ranked_sums[i] = (np.zeros(torch_kernels.EXACT_SLOTS, dtype=np.int64),
                               np.zeros(torch_kernels.EXACT_SLOTS, dtype=np.int64))

    def explicit(self, start: int, end: int, base: np.ndarray | None = None,
                 xs: tuple[np.ndarray, ...] | None = None) -> np.ndarray:
        """[N, end - start] bool rows of the explicit masks for flat elements [start, end) (a dummy when none);
        row-ranked rules are decided here from the block's inputs (`base`, `xs`: flat, that range)."""
        if not self.masks and not self.ranked:
            return np.zeros((len(self.kind), 1), dtype=np.bool_)
        out = np.zeros((len(self.kind), end - start), dtype=np.bool_)
        for i, mask in self.masks.items():
            out[i] = mask.reshape(-1)[start:end].numpy()
        if self.ranked:
            if (start, end) not in self._ranked_blocks:
                self._ranked_blocks[(start, end)] = self._decide_ranked(start, end, base, xs)
            out[list(self.ranked)] = self._ranked_blocks[(start, end)]
        return out

    def _decide_ranked(self, start: int, end: int, base: np.ndarray, xs: tuple[np.ndarray, ...]) -> np.ndarray:
        masks = np.zeros((len(self.ranked), end - start), dtype=np.bool_)
        # bf16 deltas are mostly bf16 values themselves: ranked by counting (the same ranks, faster)
        kernel = fused.magprune_keep_bf16 if base.dtype == np.uint16 else fused.magprune_keep
        for r, (i, rule) in enumerate(self.ranked.items()):
            kernel(base, xs[i], rule.row, self._tables[i], rule.key, start, masks[r], *self.ranked_sums[i])
        return masks

    def args(self, start: int, end: int, base: np.ndarray | None = None,
             xs: tuple[np.ndarray, ...] | None = None) -> tuple:
        """The rule arguments of the kernels, for flat elements [start, end) (given the block's inputs when a
        rule is row-ranked)."""
        return (self.kind, self.lo_cut, self.lo_tie, self.hi_cut, self.hi_tie, self.key, self.prob,
                self.explicit(start, end, base, xs))


def _bits_to_float(bits: int) -> float:
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])


def _digit(hist: np.ndarray, rank: int) -> tuple[int, int]:
    """The digit holding the rank-th smallest (0-based) of a histogram, and the count below that digit."""
    counts = np.cumsum(hist)
    digit = int(np.searchsorted(counts, rank, side="right"))
    return digit, int(counts[digit - 1]) if digit > 0 else 0


def _cuts(blocks: Blocks, wanted: list[tuple[int, int]]) -> dict[tuple[int, int], tuple[float, int]]:
    """(cut value, tie limit) of "the k largest |delta_i|" for each (model i, k) with 0 < k < numel: kept are
    |delta| > cut, and |delta| == cut at flat indices below the tie limit."""
    found = _cuts_in_windows(blocks, wanted)
    missing = [w for w in wanted if w not in found]
    return {**found, **(_exact_cuts(blocks, missing) if missing else {})}


def _cuts_in_windows(blocks: Blocks, wanted: list[tuple[int, int]]) -> dict[tuple[int, int], tuple[float, int]]:
    """The cuts whose value falls inside a window guessed from a sample: one pass counts the values above each
    window and collects those inside it, whose k-th largest is then exact. A guess that misses (or a window
    holding too many values) is left out, for `_exact_cuts`."""
    n = blocks.numel
    ranges = list(blocks.ranges())
    picked = ranges[:: max(1, len(ranges) // _SAMPLE_BLOCKS)]
    in_picked = sum(end - start for start, end, _ in picked) * (n // max(1, blocks.shape[0]))
    stride = max(1, in_picked // _SAMPLES)
    models = sorted({i for i, _ in wanted})
    samples = {i: np.empty(in_picked // stride + len(picked), dtype=np.float32) for i in models}
    filled = dict.fromkeys(models, 0)
    for start, end, _ in picked:
        base, xs = blocks.inputs(start, end)
        for i in models:
            filled[i] = fused.abs_samples(base, xs[i], stride, samples[i], filled[i])
    lo = np.empty(len(wanted), dtype=np.float32)
    hi = np.empty(len(wanted), dtype=np.float32)
    for r, (i, k) in enumerate(wanted):
        ordered = np.sort(samples[i][: filled[i]])
        m = len(ordered)
        q = 1 - k / n  # the cut's quantile; the window spans it +- 4 standard errors of a sample quantile
        spread = 4 * math.sqrt(q * (1 - q) / m) + 8 / m
        lo[r] = ordered[max(0, math.floor((q - spread) * m))]
        hi[r] = ordered[min(m - 1, math.ceil((q + spread) * m))]
    cap = np.full(len(wanted), int(n * _WINDOW_SHARE) + 1024, dtype=np.int64)
    starts = np.arange(len(wanted), dtype=np.int64) * cap
    index = np.empty(int(cap.sum()), dtype=_index_dtype(n))
    values = np.empty(int(cap.sum()), dtype=np.float32)
    fill = np.zeros(len(wanted), dtype=np.int64)
    above = np.zeros(len(wanted), dtype=np.int64)
    model_of = np.array([i for i, _ in wanted], dtype=np.int64)
    for start, end, offset in ranges:
        fused.window_members(*blocks.inputs(start, end), model_of, lo, hi, offset, starts, fill, cap, above,
                             index, values)
    out = {}
    for r, (i, k) in enumerate(wanted):
        held = int(fill[r])
        if held > cap[r] or not int(above[r]) < k <= int(above[r]) + held:
            continue  # overflowed, or the cut lies outside the window
        inside = values[starts[r] : starts[r] + held]
        cut = np.partition(inside, held - (k - int(above[r])))[held - (k - int(above[r]))]
        room = k - int(above[r]) - int((inside > cut).sum())  # places left for the values equal to the cut
        ties = index[starts[r] : starts[r] + held][inside == cut]  # in flat order
        out[(i, k)] = (float(cut), int(ties[room]) if len(ties) > room else n)
    return out


def _exact_cuts(blocks: Blocks, wanted: list[tuple[int, int]]) -> dict[tuple[int, int], tuple[float, int]]:
    """`_cuts` by a full radix select: a histogram of the high digits, then the bucket holding each cut."""
    n = blocks.numel
    need = np.zeros(blocks.n_models, dtype=np.bool_)
    need[sorted({i for i, _ in wanted})] = True
    high = np.zeros((blocks.n_models, _DIGITS), dtype=np.int64)
    for start, end, _ in blocks.ranges():
        fused.abs_histograms(*blocks.inputs(start, end), need, high)
    located = [(i, k, *_digit(high[i], n - k)) for i, k in wanted]  # (i, k, high digit, count below it)
    sizes = np.array([int(high[i, digit]) for i, _, digit, _ in located], dtype=np.int64)
    model_of = np.array([i for i, *_ in located], dtype=np.int64)
    high_of = np.array([digit for *_, digit, _ in located], dtype=np.int64)
    if int(sizes.sum()) <= max(_COLLECT_MIN, n // 4):  # 6 bytes a member: at most 1.5 bytes per element
        return _cuts_from_members(blocks, located, sizes, model_of, high_of)
    return _cuts_from_histograms(blocks, located, model_of, high_of)


def _index_dtype(numel: int) -> type:
    """The narrowest integer type holding every flat index of a tensor."""
    return np.int32 if numel < 1 << 31 else np.int64


def _cuts_from_members(blocks: Blocks, located: list, sizes: np.ndarray, model_of: np.ndarray,
                       high_of: np.ndarray) -> dict:
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)
    fill = np.zeros(len(located), dtype=np.int64)
    index = np.empty(int(sizes.sum()), dtype=_index_dtype(blocks.numel))
    low = np.empty(int(sizes.sum()), dtype=np.uint16)
    for start, end, offset in blocks.ranges():
        fused.bucket_members(*blocks.inputs(start, end), model_of, high_of, offset, starts, fill, index, low)
    out = {}
    for r, (i, k, digit_high, below) in enumerate(located):
        lows = low[starts[r] : starts[r] + sizes[r]]
        counts = np.bincount(lows, minlength=_DIGITS)
        digit_low, below_low = _digit(counts, blocks.numel - k - below)
        room = k - (blocks.numel - (below + below_low + int(counts[digit_low])))  # places left at the cut
        tie = blocks.numel
        if counts[digit_low] > room:
            tie = int(index[starts[r] : starts[r] + sizes[r]][lows == digit_low][room])  # members are in flat order
        out[(i, k)] = (_bits_to_float((digit_high << 16) | digit_low), tie)
    return out


def _cuts_from_histograms(blocks: Blocks, located: list, model_of: np.ndarray, high_of: np.ndarray) -> dict:
    low = np.zeros((len(located), _DIGITS), dtype=np.int64)
    for start, end, _ in blocks.ranges():
        fused.low_histograms(*blocks.inputs(start, end), model_of, high_of, low)
    out = {}
    for r, (i, k, digit_high, below) in enumerate(located):
        digit_low, below_low = _digit(low[r], blocks.numel - k - below)
        cut = _bits_to_float((digit_high << 16) | digit_low)
        room = k - (blocks.numel - (below + below_low + int(low[r, digit_low])))
        tie = blocks.numel
        if int(low[r, digit_low]) > room and cut != 0:  # at a zero cut, kept or dropped zeros change nothing
            tie = _tie_limit(blocks, i, np.float32(cut), room)
        out[(i, k)] = (cut, tie)
    return out


def _tie_limit(blocks: Blocks, i: int, cut: np.float32, room: int) -> int:
    """The flat index of the value equal to `cut` numbered `room` (0-based) in |delta_i|: those below it are kept."""
    seen = 0
    for start, end, offset in blocks.ranges():
        count, index = fused.tie_position(blocks.flat(-1, start, end), blocks.flat(i, start, end), cut, offset,
                                          seen, room)
        if index >= 0:
            return index
        seen += count
    return blocks.numel


def torch_mask(rule: Rule, magnitudes: torch.Tensor) -> torch.Tensor | None:
    """One rule as a flat bool keep mask over flat |delta| on its device, for the torch kernels (None: keep all).
    The same selections as the fused kernels: a band's ties go to lower flat indices, random rules use the same
    counter-based stream."""
    if rule is None:
        return None
    if isinstance(rule, Band):
        inside = top_k_mask(magnitudes, rule.k_lo)
        return inside & ~top_k_mask(magnitudes, rule.k_hi) if rule.k_hi > 0 else inside
    if isinstance(rule, Random):
        draws = torch_kernels.uniform(rule.key, 0, magnitudes.numel(), magnitudes.device)
        return draws < torch.tensor(rule.prob, dtype=torch.float32, device=magnitudes.device)
    if isinstance(rule, Ranked):
        probability = masks_module.magprune_probabilities(magnitudes.view(-1, rule.row), rule.density, rule.epsilon)
        return torch_kernels.uniform(rule.key, 0, magnitudes.numel(), magnitudes.device) < probability.reshape(-1)
    return rule.mask.reshape(-1).to(magnitudes.device)


def rule_arrays(blocks: Blocks, rules: list[Rule]) -> RuleArrays:
    """Resolve each model's rule over the blocks (radix passes only for rank bands that need them)."""
    n = blocks.numel
    arrays = RuleArrays(blocks.n_models)
    wanted = sorted({(i, k) for i, r in enumerate(rules) if isinstance(r, Band)
                     for k in (r.k_lo, r.k_hi) if 0 < k < n})
    cuts = _cuts(blocks, wanted) if wanted else {}

    def cut(i: int, k: int) -> tuple[float, int]:
        if k <= 0:
            return math.inf, -1  # nothing lies above, none at the cut counts
        if k >= n:
            return -1.0, 0  # every |delta| >= 0 lies above
        return cuts[(i, k)]

    for i, rule in enumerate(rules):
        if isinstance(rule, Band):
            arrays.kind[i] = fused.KEEP_BAND
            arrays.lo_cut[i], arrays.lo_tie[i] = cut(i, rule.k_lo)
            arrays.hi_cut[i], arrays.hi_tie[i] = cut(i, rule.k_hi)
        elif isinstance(rule, Random):
            arrays.kind[i] = fused.KEEP_RANDOM
            arrays.key[i] = rule.key
            arrays.prob[i] = rule.prob
        elif isinstance(rule, Explicit):
            arrays.kind[i] = fused.KEEP_MASK
            arrays.masks[i] = rule.mask
        elif isinstance(rule, Ranked):
            arrays.add_ranked(i, rule)
    return arrays


def l1_factors(blocks: Blocks, arrays: RuleArrays, sparsified: list[bool]) -> np.ndarray:
    """mergekit's rescale per model: ||delta||_1 / ||kept delta||_1 (float32), 1 where either norm is < 1e-7
    or the model is not sparsified. The norms are exact sums (`torch_kernels.exact_sum`); row-ranked models'
    come from deciding their masks, the others' from a pass of `fused.abs_sums`."""
    summed = [i for i in range(blocks.n_models) if i not in arrays.ranked]
    before = np.zeros((len(summed), torch_kernels.EXACT_SLOTS), dtype=np.int64)
    after = np.zeros_like(before)
    every = len(summed) == blocks.n_models
    for start, end, offset in blocks.ranges():
        base, xs = blocks.inputs(start, end)
        args = arrays.args(offset, offset + base.shape[0], base, xs)  # decides the ranked masks of the block
        if every:
            fused.abs_sums(base, xs, offset, *args, before, after)
        elif summed:
            fused.abs_sums(base, xs[summed], offset, *(a[summed] for a in args), before, after)
    slots = {i: (b.tolist(), a.tolist()) for i, b, a in zip(summed, before, after)}
    slots.update({i: (b.tolist(), a.tolist()) for i, (b, a) in arrays.ranked_sums.items()})
    return rescale_factors([slots[i] for i in range(blocks.n_models)], sparsified)


def rescale_factors(slots: list[tuple[list[int], list[int]]], sparsified: list[bool]) -> np.ndarray:
    """float32 L1 rescale factors from each model's (all, kept) exact-sum slots; 1 where a norm is < 1e-7 or the
    model is not sparsified."""
    factors = np.ones(len(slots), dtype=np.float32)
    for i, ((all_slots, kept_slots), on) in enumerate(zip(slots, sparsified)):
        before, after = torch_kernels.exact_sum(all_slots), torch_kernels.exact_sum(kept_slots)
        if on and before >= 1e-7 and after >= 1e-7:
            factors[i] = before / after
    return factors
