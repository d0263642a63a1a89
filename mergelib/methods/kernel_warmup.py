"""Compiles every numba kernel for the argument types merges pass, into numba's on-disk cache (`cache=True`).

Run once after installing (`mergelib warm-kernels`; `make install` does it), so that a user's first merge loads
machine code instead of compiling it (seconds per kernel). The cache lives beside the modules (their
`__pycache__`) or under NUMBA_CACHE_DIR when that is set; numba keys it by source file, argument types and CPU,
so an edited module or another CPU compiles again, once. Model inputs reach the GTA kernels as one
[n_models, elements] array (float32, or bf16/fp16 bits), so one signature per input type serves every model count; `linear`'s tuple of inputs is warmed for
1 to `LINEAR_MODELS` models (more compile on first use, then are cached too).
"""

from __future__ import annotations

import numpy as np
from numba import typeof

LINEAR_MODELS = 8


def _signatures() -> list[tuple[object, tuple]]:
    """(dispatcher, example arguments) for every kernel entry point and argument type the merge code uses."""
    from mergelib.io import convert
    from mergelib.methods import fused

    f32 = np.zeros(4, dtype=np.float32)
    i64 = np.zeros(2, dtype=np.int64)
    bools = np.zeros(2, dtype=np.bool_)
    rules = (np.zeros(2, dtype=np.int8), np.zeros(2, dtype=np.float32), i64, np.zeros(2, dtype=np.float32), i64,
             np.zeros(2, dtype=np.uint64), np.zeros(2, dtype=np.float32), np.zeros((2, 4), dtype=np.bool_))
    hist = np.zeros((2, 4), dtype=np.int64)
    out = [
        (convert._widen_bf16, (np.zeros(4, dtype=np.int16), f32)),
        (convert._finite_f32, (f32,)),
        (convert._finite_16, (np.zeros(4, dtype=np.int16), np.int16(0x7F80))),
        (fused.fill_uniform, (0, 0, f32)),
        (fused.tie_position, (f32, f32, np.float32(0), 0, 0, 0)),
    ]
    for stored in (np.float32, np.uint16, np.int16):  # inputs: float32, bf16 bits, fp16 bits
        base, xs = np.zeros(4, dtype=stored), np.zeros((2, 4), dtype=stored)  # xs: [n_models, elements]
        out += [
            (fused.abs_samples, (base, base, 1, f32, 0)),
            (fused.abs_histograms, (base, xs, bools, hist)),
            (fused.low_histograms, (base, xs, i64, i64, hist)),
            (fused.abs_sums, (base, xs, 0, *rules, hist, hist)),
            (fused.gta_block, (base, xs, 0, *rules, f32, f32, True, True, np.float32(1), np.float32(1), f32)),
            (fused.magprune_keep, (base, xs[0], 4, f32, 0, 0, bools, i64, i64)),
            (fused.magprune_keep_bf16, (base, xs[0], 4, f32, 0, 0, bools, i64, i64)),
        ]
        for index in (np.int32, np.int64):  # flat indices: int32 unless a tensor has 2**31 elements or more
            idx = np.zeros(4, dtype=index)
            out.append((fused.window_members, (base, xs, i64, f32, f32, 0, i64, i64, i64, i64, idx, f32)))
            out.append((fused.bucket_members, (base, xs, i64, i64, 0, i64, i64, idx, np.zeros(4, dtype=np.uint16))))
    rows = np.zeros((2, 4), dtype=np.float32)  # float32 inputs only: Model Stock widens first
    out += [
        (fused.stock_sums, (f32, rows, 4, np.zeros((1, 3), dtype=np.float64))),
        (fused.stock_out, (f32, rows, 4, np.zeros(1, dtype=np.float32), f32)),
    ]
    for n in range(1, LINEAR_MODELS + 1):
        out.append((fused.weighted_sum, ((f32,) * n, f32, np.float32(1), f32)))
    return out


def warm_kernels() -> tuple[int, int]:
    """Compile (or load from the cache) every kernel signature; returns (signatures, compiled now)."""
    from mergelib.methods.fused import load_numba_target

    load_numba_target()
    compiled = 0
    signatures = _signatures()
    for dispatcher, args in signatures:
        types = tuple(typeof(a) for a in args)
        misses = sum(dispatcher.stats.cache_misses.values())
        dispatcher.compile(types)
        compiled += sum(dispatcher.stats.cache_misses.values()) > misses
    return len(signatures), compiled


def compiled_at_run_time() -> dict[str, list[str]]:
    """The kernels this process compiled (instead of loading them from the cache), with their argument types."""
    from mergelib.io import convert
    from mergelib.methods import fused

    out = {}
    for module in (convert, fused):
        for name, value in vars(module).items():
            stats = getattr(value, "stats", None)
            if stats is not None and stats.cache_misses:
                out[f"{module.__name__}.{name}"] = [str(sig) for sig in stats.cache_misses]
    return out
