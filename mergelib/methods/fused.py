"""Compiled per-element kernels (numba) for the hot merge methods: one pass over the inputs instead of dozens.

A chain of torch ops costs a full memory pass and a fresh output buffer per op (on this class of machine, the
page faults of a fresh buffer cost more than the op). These kernels fuse the whole chain for one block of
elements: linear sums, the generalized task arithmetic family (keep rules, L1 rescale, sign election,
normalisation, lambda), the statistics its tensor-wide selections need (radix histograms of |delta|) and
DELLA's per-row ranks (a radix sort of each row). Each
is plain float32 arithmetic in a fixed order (no fastmath: no reassociation, no FMA contraction), so a block
gives the same bits wherever it starts and whichever thread runs it. Arrays are flat and C-contiguous; the model
inputs of a block are one [n_models, elements] array. Inputs are float32, or the stored 16-bit values themselves
(bf16 bit patterns as uint16, fp16 bit patterns as int16), which `widen` turns into float32 exactly as each element
is read: no widening pass, half the bytes, and the same float32 arithmetic, so the same output bits. `offset` is
the flat index of the block's first element (ties and random draws are keyed by flat index).

Keep rules, one per model (arrays indexed by model):
  kind 0: keep all; 1: rank band (keep the top-k_lo |delta|, drop the top-k_hi), each cut given as a value and
  a flat-index limit for the values equal to it (those below it rank inside: lower indices win); 2: keep where
  uniform(key, index) < prob; 3: an explicit bool mask.
"""

from __future__ import annotations

import sys

import numpy as np
from numba import njit, types
from numba.extending import overload

KEEP_ALL, KEEP_BAND, KEEP_RANDOM, KEEP_MASK = 0, 1, 2, 3
_CHUNK = 4096  # elements per inner step of the histogram kernels (their scratch stays in L1)

_jit = njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")

# Loaded by numba's CPU target only to offer np.dot/BLAS and cffi pointers in compiled code, which no kernel
# here uses: about half of the target's first load (scipy.linalg alone is 0.4 s).
_UNUSED_BY_KERNELS = ("scipy.linalg.cython_blas", "cffi")


def load_numba_target() -> None:
    """Load numba's CPU target (its first use costs about a second) without importing scipy.linalg or cffi.

    Call before the first kernel of a process, from one thread; later calls do nothing. numba then records BLAS
    as unavailable for this process (np.dot in compiled code would fail to type); nothing in mergelib needs it."""
    from numba.core.registry import cpu_target

    if "numba.np.arraymath" in sys.modules:  # the target is already loaded
        return
    blocked = [name for name in _UNUSED_BY_KERNELS if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # an import of it raises ImportError, which numba takes as "not installed"
    try:
        cpu_target.typing_context.refresh()
        cpu_target.target_context.refresh()
    finally:
        for name in blocked:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]


def widen(value):
    """The float32 value of one stored element: float32 as is, bf16 bits (uint16) or fp16 bits (int16) exactly
    (kernels only; numba picks the conversion from the element type)."""
    raise NotImplementedError("widen is compiled into the kernels; call it inside them only")


@_jit
def _fp16_to_float32(value):
    """IEEE half-precision bits to the float32 of the same value: normal numbers re-biased, subnormals scaled (a
    multiple of 2**-24, exact in float32), infinities kept and NaNs kept with their payload and made quiet, as
    torch's own conversion (and the CPU's) does."""
    h = np.uint32(np.uint16(value))
    sign = (h & np.uint32(0x8000)) << np.uint32(16)
    exponent = (h >> np.uint32(10)) & np.uint32(0x1F)
    mantissa = h & np.uint32(0x3FF)
    if exponent == 0:
        magnitude = np.float32(mantissa) * np.float32(5.9604644775390625e-08)  # m * 2**-24
        return -magnitude if sign else magnitude
    if exponent == 0x1F:
        quiet = np.uint32(0x400000) if mantissa else np.uint32(0)
        return np.uint32(sign | np.uint32(0x7F800000) | (mantissa << np.uint32(13)) | quiet).view(np.float32)
    return np.uint32(sign | ((exponent + np.uint32(112)) << np.uint32(23)) | (mantissa << np.uint32(13))).view(
        np.float32)


@overload(widen, jit_options={"nogil": True, "boundscheck": False, "error_model": "numpy"})
def _widen_impl(value):
    if value == types.float32:
        return lambda value: value
    if value == types.uint16:  # bfloat16: the upper half of a float32
        return lambda value: np.uint32(np.uint32(value) << np.uint32(16)).view(np.float32)
    if value == types.int16:
        return lambda value: _fp16_to_float32(value)
    return None


@_jit
def _mix64(z):
    """splitmix64's finaliser: a bijective 64-bit mix with full avalanche."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@_jit
def uniform_at(key, index):
    """U[0,1) float32 for element `index` of the stream `key`: the top 24 bits of a mix of the pair, so every
    value is a multiple of 2**-24 and exactly representable. Counter-based: no state, any order, any block."""
    z = _mix64(np.uint64(key) + np.uint64(index) * np.uint64(0x9E3779B97F4A7C15))
    return np.float32(z >> np.uint64(40)) * np.float32(5.9604644775390625e-08)


@_jit
def fill_uniform(key, offset, out):
    """out[j] = uniform_at(key, offset + j)."""
    for j in range(out.shape[0]):
        out[j] = uniform_at(key, offset + j)


@_jit
def weighted_sum(xs, weights, divisor, out):
    """out = (sum_i weights[i] * xs[i]) / divisor, summed in model order from 0 (divisor 1: no division)."""
    n = out.shape[0]
    out[:] = 0
    for i in range(len(xs)):
        x = xs[i]
        w = weights[i]
        for j in range(n):
            out[j] += w * x[j]
    if divisor != 1:
        for j in range(n):
            out[j] = out[j] / divisor


@_jit
def _keep_row(k, a_row, n, offset, lo, lo_tie, hi, hi_tie, key, p, explicit_row, keep):
    """keep[j] = whether |delta| a_row[j] (flat index offset + j) survives one model's rule. One loop per rule
    kind, each free of data-dependent branches (random keep decisions would mispredict half the time).

    Rank bands: values above a cut are in, and so are values equal to it at flat indices below its tie limit."""
    if k == KEEP_ALL:
        for j in range(n):
            keep[j] = True
    elif k == KEEP_BAND:
        for j in range(n):
            a = a_row[j]
            index = offset + j
            inside = (a > lo) | ((a == lo) & (index < lo_tie))
            above = (a > hi) | ((a == hi) & (index < hi_tie))
            keep[j] = inside & (not above)
    elif k == KEEP_RANDOM:
        for j in range(n):
            keep[j] = uniform_at(key, offset + j) < p
    else:
        for j in range(n):
            keep[j] = explicit_row[j]


@_jit
def _abs_deltas(x, base, s, e, out):
    """out[j - s] = |x[j] - base[j]| for j in [s, e)."""
    for j in range(s, e):
        out[j - s] = abs(widen(x[j]) - widen(base[j]))


@_jit
def abs_histograms(base, xs, wanted, hist):
    """hist[i] += counts of the high 16 bits of |xs[i] - base| (their float32 bit patterns) for wanted models."""
    n = base.shape[0]
    scratch = np.empty(_CHUNK, dtype=np.float32)
    bits = scratch.view(np.uint32)
    for i in range(len(xs)):
        if not wanted[i]:
            continue
        x = xs[i]
        row = hist[i]
        for s in range(0, n, _CHUNK):
            e = min(n, s + _CHUNK)
            _abs_deltas(x, base, s, e, scratch)
            for j in range(e - s):
                row[bits[j] >> np.uint32(16)] += 1


@_jit
def abs_samples(base, x, stride, out, p):
    """out[p...] = |x - base| at every stride-th element; returns the next free place."""
    for j in range(0, base.shape[0], stride):
        out[p] = abs(widen(x[j]) - widen(base[j]))
        p += 1
    return p


@_jit
def window_members(base, xs, model, lo, hi, offset, start, fill, cap, above, index, values):
    """For each request r: above[r] += count of |xs[model[r]] - base| not <= hi[r] (NaN counts above), and the
    flat index and value of each one inside [lo[r], hi[r]] appended at start[r] + fill[r] while fewer than
    cap[r] are held (fill[r] keeps counting past it, so an overflow shows). Members are a few percent, so
    the branch predicts well (a branch-free compaction measured slower)."""
    n = base.shape[0]
    for r in range(model.shape[0]):
        x = xs[model[r]]
        low_end, high_end = lo[r], hi[r]
        p = fill[r]
        limit = cap[r]
        first = start[r]
        count = 0
        for j in range(n):
            a = abs(widen(x[j]) - widen(base[j]))
            count += not (a <= high_end)
            if (a >= low_end) & (a <= high_end):
                if p < limit:
                    index[first + p] = offset + j
                    values[first + p] = a
                p += 1
        above[r] += count
        fill[r] = p


@_jit
def low_histograms(base, xs, model, high, hist):
    """hist[r] += counts of the low 16 bits of |xs[model[r]] - base| among elements whose high bits are high[r]."""
    n = base.shape[0]
    for r in range(model.shape[0]):
        x = xs[model[r]]
        want = np.uint32(high[r])
        row = hist[r]
        for j in range(n):
            b = np.float32(abs(widen(x[j]) - widen(base[j]))).view(np.uint32)
            if (b >> np.uint32(16)) == want:
                row[b & np.uint32(0xFFFF)] += 1


@_jit
def bucket_members(base, xs, model, high, offset, start, fill, index, low):
    """For each request r: append the flat index and low 16 bits of every |xs[model[r]] - base| whose high 16
    bits are high[r], at index/low[start[r] + fill[r]...] (fill[r] counts what request r holds so far)."""
    n = base.shape[0]
    for r in range(model.shape[0]):
        x = xs[model[r]]
        want = np.uint32(high[r])
        p = start[r] + fill[r]
        for j in range(n):
            bits = np.float32(abs(widen(x[j]) - widen(base[j]))).view(np.uint32)
            if (bits >> np.uint32(16)) == want:
                index[p] = offset + j
                low[p] = bits & np.uint32(0xFFFF)
                p += 1
        fill[r] = p - start[r]


@_jit
def tie_position(base, x, cut, offset, seen, room):
    """The flat index of the value equal to `cut` numbered `room` (0-based, `seen` counted before this block):
    returns (how many equal values this block holds, that index or -1)."""
    count = 0
    for j in range(base.shape[0]):
        if abs(widen(x[j]) - widen(base[j])) == cut:
            if seen + count == room:
                return count, offset + j
            count += 1
    return count, -1


@_jit
def abs_sums(base, xs, offset, kind, lo_cut, lo_tie, hi_cut, hi_tie, key, prob, explicit, before, after):
    """before[i] and after[i] (int64 rows of 257 slots, see `torch_kernels.EXACT_SLOTS`) += the exponent-slot
    sums of |delta_i| and of the kept |delta_i|: integer sums, so the L1 norms they give are exact, the same
    however the tensor is cut into blocks and on any device."""
    n = base.shape[0]
    a_row = np.empty(_CHUNK, dtype=np.float32)
    a_bits = a_row.view(np.uint32)
    keep = np.empty(_CHUNK, dtype=np.bool_)
    for i in range(len(xs)):
        x = xs[i]
        total = before[i]
        kept = after[i]
        for s in range(0, n, _CHUNK):
            e = min(n, s + _CHUNK)
            _abs_deltas(x, base, s, e, a_row)
            _keep_row(kind[i], a_row, e - s, offset + s, lo_cut[i], lo_tie[i], hi_cut[i], hi_tie[i], key[i],
                      prob[i], explicit[i, s:e] if kind[i] == KEEP_MASK else explicit[i, :0], keep)
            _exact_sums(a_bits, keep, e - s, total, kept)


@_jit
def gta_block(base, xs, offset, kind, lo_cut, lo_tie, hi_cut, hi_tie, key, prob, explicit,
              factors, weights, consensus, normalize, divisor, lam, out):
    """out = base + lam * [sum_i w_i m_i f_i s_i(delta_i)] / [sum_i w_i m_i if normalize] per element.

    s_i: keep rule of model i; f_i: its L1 rescale factor (1: none); m_i: agreement with the elected sign (the
    sign of the sum of the weighted kept deltas, + on ties) when `consensus`, else 1. Under consensus a zero
    divisor counts as 1; without it `divisor` is the caller's (sum of weights, guarded). Works in L1-sized
    chunks, every loop running over elements (so it vectorizes) with models in the outer loops: the sums still
    add models in order for each element. Selects instead of branches throughout.
    """
    n = base.shape[0]
    n_models = len(xs)
    d = np.empty((n_models, _CHUNK), dtype=np.float32)
    a_row = np.empty(_CHUNK, dtype=np.float32)
    keep = np.empty(_CHUNK, dtype=np.bool_)
    total = np.empty(_CHUNK, dtype=np.float32)
    elected = np.empty(_CHUNK, dtype=np.float32)
    div = np.empty(_CHUNK, dtype=np.float32)
    zero = np.float32(0.0)
    one = np.float32(1.0)
    for s in range(0, n, _CHUNK):
        e = min(n, s + _CHUNK)
        m = e - s
        b = base[s:e]
        for i in range(n_models):
            x = xs[i][s:e]
            row = d[i]
            for j in range(m):
                v = widen(x[j]) - widen(b[j])
                row[j] = v
                a_row[j] = abs(v)
            _keep_row(kind[i], a_row, m, offset + s, lo_cut[i], lo_tie[i], hi_cut[i], hi_tie[i], key[i],
                      prob[i], explicit[i, s:e] if kind[i] == KEEP_MASK else explicit[i, :0], keep)
            f, w = factors[i], weights[i]
            for j in range(m):
                row[j] = row[j] * f * w if keep[j] else zero
        total[:m] = zero
        for i in range(n_models):
            row = d[i]
            for j in range(m):
                total[j] += row[j]
        if consensus:
            for j in range(m):
                elected[j] = one if total[j] >= 0 else -one
                total[j] = zero
                div[j] = zero
            for i in range(n_models):
                row = d[i]
                w = weights[i]
                for j in range(m):
                    agree = row[j] * elected[j] > 0
                    total[j] += row[j] if agree else zero
                    div[j] += w if agree else zero
            for j in range(m):
                div[j] = one if div[j] == 0 else div[j]
        else:
            div[:m] = divisor
        for j in range(m):
            t = total[j] / div[j] if normalize else total[j]
            t = t * lam if lam != 1 else t
            out[s + j] = widen(b[j]) + t


_RADIX_BITS = 8
_RADIX = 1 << _RADIX_BITS
_KEYS = 1 << 16  # bucket keys of the bf16 rank kernel: the upper halves of float32 bit patterns


@_jit
def _magnitude_bits(x, base):
    """The float32 bits of |x - base|, every NaN given one pattern above inf (so NaNs tie and rank highest)."""
    b = np.float32(abs(widen(x) - widen(base))).view(np.uint32)
    return np.uint32(0x7FC00000) if b > np.uint32(0x7F800000) else b


@_jit
def _exact_sums(bits, kept, n, before, after):
    """before/after (int64[EXACT_SLOTS], see `torch_kernels.EXACT_SLOTS`) += the exact sums of the n
    non-negative float32 values with bits `bits` and of those `kept`.

    Where the nonzero values span few exponents (fine-tuning deltas span under 20) their mantissas, shifted by
    exponent above the lowest, add up in one int64 (vectorized; exact while 24 mantissa bits + the span + the
    bits of n stay under 63), which lands in the slots 16 bits at a time; otherwise each value is added to
    the slot of its exponent."""
    lo = np.int64(255)
    hi = np.int64(0)
    for j in range(n):
        e = np.int64(bits[j] >> np.uint32(23))
        lo = min(lo, e if bits[j] != 0 else np.int64(255))
        hi = max(hi, e)
    span = 62 - 24
    m = n
    while m:
        m >>= 1
        span -= 1
    if 1 <= lo <= 206 and hi <= 254 and hi - lo <= span:
        all_sum = np.int64(0)
        kept_sum = np.int64(0)
        for j in range(n):
            b = np.int64(bits[j])
            nonzero = -np.int64(b != 0)  # all ones or zero
            amount = ((b & 0x7FFFFF) | (1 << 23)) << (((b >> 23) - lo) & nonzero)
            amount &= nonzero
            all_sum += amount
            kept_sum += amount & -np.int64(kept[j])
        for t in range(4):  # slot e counts units of 2**(e - 150): a piece 16t bits up belongs 16 slots up
            before[lo + 16 * t] += (all_sum >> (16 * t)) & 0xFFFF
            after[lo + 16 * t] += (kept_sum >> (16 * t)) & 0xFFFF
        return
    for j in range(n):
        b = np.int64(bits[j])
        exponent = b >> 23
        fraction = b & 0x7FFFFF
        special = exponent == 255  # inf or NaN: counted in slots 255 / 256
        slot = exponent + (special & (fraction != 0))
        amount = np.int64(1) if special else fraction | (np.int64(exponent > 0) << 23)
        before[slot] += amount
        after[slot] += amount * np.int64(kept[j])


@_jit
def _counts_to_starts(h):
    """Counts per digit, in place, to the place where each digit's first element goes (an exclusive prefix sum)."""
    total = 0
    for v in range(h.shape[0]):
        c = h[v]
        h[v] = total
        total += c


@_jit
def magprune_keep(base, x, row, table, key, offset, keep, before, after):
    """DELLA's MAGPRUNE keep mask of flat rows of `row` elements: keep[j] = uniform_at(key, offset + j) <
    table[rank], rank the ascending place of |x[j] - base[j]| within its row, equal magnitudes ranking the lower
    index higher (`masks.magprune_probabilities`, which sorts; the ranks here are the same, by an exact sort).
    before/after (int64[EXACT_SLOTS]) += the exact sums of all and of the kept |delta| (mergekit's L1 rescale).

    Per row: a stable LSD radix sort of the float32 bit patterns (non-negative, so their unsigned order is the
    float order; NaNs tie above inf) in four 8-bit passes, starting from descending index order so that ties
    keep the lower index later; passes whose digit is the same across the row are skipped. O(row) per row,
    whatever the values (`magprune_keep_bf16` is faster where the deltas are mostly exact bf16 values)."""
    n_rows = base.shape[0] // row
    bits = np.empty(row, dtype=np.uint32)
    index = np.empty(row, dtype=np.int32)
    bits_to = np.empty(row, dtype=np.uint32)
    index_to = np.empty(row, dtype=np.int32)
    hist = np.empty((4, _RADIX), dtype=np.int32)
    kept_sorted = np.empty(row, dtype=np.bool_)
    mask = np.uint32(_RADIX - 1)
    for r in range(n_rows):
        s = r * row
        hist[:] = 0
        for j in range(row):
            b = _magnitude_bits(x[s + j], base[s + j])
            k = row - 1 - j
            bits[k] = b
            index[k] = j
            hist[0, b & mask] += 1
            hist[1, (b >> np.uint32(8)) & mask] += 1
            hist[2, (b >> np.uint32(16)) & mask] += 1
            hist[3, b >> np.uint32(24)] += 1
        for d in range(4):
            shift = np.uint32(8 * d)
            h = hist[d]
            if h[(bits[0] >> shift) & mask] == row:
                continue  # one digit across the row: this pass would not move anything
            _counts_to_starts(h)
            for k in range(row):
                b = bits[k]
                v = (b >> shift) & mask
                p = h[v]
                h[v] = p + 1
                bits_to[p] = b
                index_to[p] = index[k]
            bits, bits_to = bits_to, bits
            index, index_to = index_to, index
        for p in range(row):
            j = index[p]
            kept = uniform_at(key, offset + s + j) < table[p]
            keep[s + j] = kept
            kept_sorted[p] = kept
        _exact_sums(bits, kept_sorted, row, before, after)


@_jit
def magprune_keep_bf16(base, x, row, table, key, offset, keep, before, after):
    """`magprune_keep` (the same masks and sums) by counting, for deltas that are mostly exact bf16 values.

    The difference of two bf16 values is usually one too (when both share an exponent): its float32 bits are
    zero below the top 16. Those "exact" |delta| are ranked by counting their top 16 bits (the key): one pass
    counts each key and gives every element the number of equal keys before it, a prefix sum over the row's
    key range gives each key's last place, and rank = that place - the equals before (ties: the lower index
    ranks higher). The others (a few percent) rank after the exact members of their key, sorted by their low
    16 bits (a stable radix pass per byte). About twice the speed of the radix sort on fine-tuned bf16 deltas;
    correct for any values."""
    n_rows = base.shape[0] // row
    bits = np.empty(row, dtype=np.uint32)
    before_key = np.empty(row, dtype=np.int32)  # exact: equal keys at lower indices; others: -1
    place = np.zeros(_KEYS, dtype=np.int32)  # per key: a count, then the place of its last exact member
    room = np.zeros(_KEYS, dtype=np.int32)  # per key: the others (placed after the exact members)
    others = np.empty(row, dtype=np.int32)
    others_to = np.empty(row, dtype=np.int32)
    hist = np.empty(_RADIX, dtype=np.int32)
    low = np.uint32(0xFFFF)
    for r in range(n_rows):
        s = r * row
        kmin1 = np.uint32(0xFFFFFFFF)  # (lowest nonzero key) - 1; a zero key wraps to the top
        kmax = np.uint32(0)
        for j in range(row):  # vectorized: the counting below is a loop of its own
            b = _magnitude_bits(x[s + j], base[s + j])
            bits[j] = b
            k = b >> np.uint32(16)
            km1 = k - np.uint32(1)
            kmin1 = km1 if km1 < kmin1 else kmin1
            kmax = k if k > kmax else kmax
        n_others = 0
        for j in range(row):
            b = bits[j]
            k = b >> np.uint32(16)
            other = (b & low) != 0
            c = place[k]
            before_key[j] = -1 if other else c
            place[k] = c + 1 - other
            others[n_others] = j
            n_others += other
        lo = np.int64(kmin1) + 1
        hi = np.int64(kmax)
        for q in range(n_others):
            room[bits[others[q]] >> np.uint32(16)] += 1
        c = place[0]
        place[0] = c - 1
        total = c + room[0]
        for v in range(lo, hi + 1):
            c = place[v]
            place[v] = total + c - 1
            total += c + room[v]
        for j in range(row):  # the others' draws here are overwritten below (their places are in range)
            keep[s + j] = uniform_at(key, offset + s + j) < table[place[bits[j] >> np.uint32(16)] - before_key[j]]
        if n_others:
            for q in range(n_others):
                room[bits[others[q]] >> np.uint32(16)] = 0
            # by low 16 bits, stable, from descending index order (ties: the lower index ranks higher)
            src = others
            dst = others_to
            for d in range(2):
                shift = np.uint32(8 * d)
                hist[:] = 0
                for q in range(n_others):
                    hist[(bits[src[q]] >> shift) & np.uint32(_RADIX - 1)] += 1
                _counts_to_starts(hist)
                for n in range(n_others):
                    q = n_others - 1 - n if d == 0 else n
                    j = src[q]
                    v = (bits[j] >> shift) & np.uint32(_RADIX - 1)
                    p = hist[v]
                    hist[v] = p + 1
                    dst[p] = j
                src, dst = dst, src
            for q in range(n_others):
                j = src[q]
                k = bits[j] >> np.uint32(16)
                p = place[k] + 1
                place[k] = p
                keep[s + j] = uniform_at(key, offset + s + j) < table[p]
        _exact_sums(bits, keep[s:s + row], row, before, after)
        place[0] = 0
        if hi >= lo:
            place[lo:hi + 1] = 0


@_jit
def stock_sums(base, xs, row, acc):
    """Model Stock's sums over each flat row of `row` elements: acc[r] += the dot products of the offsets
    o_i = xs[i] - base (float32, widened) for the pairs i < j in order, then their squared norms. float64 products
    of float32 values are exact; each sum adds them one element after another, so a row cut into consecutive
    calls (the accumulators carried) gives the same sums as one call. Four sums run side by side per loop (their
    additions overlap; one sum alone waits on each addition)."""
    n_models = len(xs)
    n_rows = base.shape[0] // row
    n_sums = n_models * (n_models - 1) // 2 + n_models
    left = np.empty(n_sums, dtype=np.int64)
    right = np.empty(n_sums, dtype=np.int64)
    p = 0
    for i in range(n_models):
        for k in range(i + 1, n_models):
            left[p], right[p] = i, k
            p += 1
    for i in range(n_models):
        left[p + i], right[p + i] = i, i
    o = np.empty((n_models, _CHUNK), dtype=np.float64)
    last = n_sums - 1
    for r in range(n_rows):
        a = acc[r]
        for s in range(r * row, (r + 1) * row, _CHUNK):
            m = min((r + 1) * row, s + _CHUNK) - s
            for i in range(n_models):
                x = xs[i]
                oi = o[i]
                for k in range(m):
                    oi[k] = np.float64(x[s + k] - base[s + k])
            for g in range(0, n_sums, 4):
                g1, g2, g3 = min(g + 1, last), min(g + 2, last), min(g + 3, last)  # past the end: a repeat
                l0, r0, l1, r1 = o[left[g]], o[right[g]], o[left[g1]], o[right[g1]]
                l2, r2, l3, r3 = o[left[g2]], o[right[g2]], o[left[g3]], o[right[g3]]
                s0, s1, s2, s3 = a[g], a[g1], a[g2], a[g3]
                for k in range(m):
                    s0 += l0[k] * r0[k]
                    s1 += l1[k] * r1[k]
                    s2 += l2[k] * r2[k]
                    s3 += l3[k] * r3[k]
                a[g] = s0
                if g + 1 <= last:
                    a[g1] = s1
                if g + 2 <= last:
                    a[g2] = s2
                if g + 3 <= last:
                    a[g3] = s3


@_jit
def stock_out(base, xs, row, t, out):
    """Model Stock's result over flat rows of `row` elements: lerp(base, mean of xs, t[r]) per row r in float32,
    as torch.lerp's formula (base + t*(mean - base) for t < 0.5, else mean - (mean - base)*(1 - t): exactly the
    base at t = 0 and the mean at t = 1); the mean sums models in order from 0 and divides by their count."""
    n_models = len(xs)
    n_rows = base.shape[0] // row
    count = np.float32(n_models)
    one = np.float32(1.0)
    for r in range(n_rows):
        tr = t[r]
        low = tr < np.float32(0.5)
        rest = one - tr
        for j in range(r * row, (r + 1) * row):
            total = np.float32(0.0)
            for i in range(n_models):
                total += xs[i][j]
            mean = total / count
            b = base[j]
            diff = mean - b
            out[j] = b + tr * diff if low else mean - diff * rest
