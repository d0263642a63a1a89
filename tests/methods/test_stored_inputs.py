"""GTA kernels reading bf16/fp16 as stored give the bytes of the float32 widening path, on every path they take."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import mergelib
from mergelib.families.tiny import make_family
from mergelib.merging import engine, plan
from mergelib.methods import fused, keep

GTA = ("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
       "della_linear")


def _special(dtype: torch.dtype) -> torch.Tensor:
    """Values that test the exact widening: signed zeros, subnormals, the largest finite, tiny normals."""
    info = torch.finfo(dtype)
    return torch.tensor([0.0, -0.0, info.smallest_normal / 4, -info.smallest_normal / 2, info.smallest_normal,
                         info.max, -info.max, info.tiny * 3], dtype=torch.float32).to(dtype)


def _family(root, dtype: torch.dtype, nonfinite: bool):
    family = make_family(root, size="tiny", n_finetunes=2, seed=3, dtype=dtype)
    for k, model in enumerate((family.base, *family.finetunes)):
        for shard in sorted(model.glob("*.safetensors")):
            tensors = load_file(shard)
            for name, tensor in tensors.items():
                flat = tensor.view(-1)
                values = _special(dtype)
                if k == 1 and nonfinite:
                    values = torch.cat([values, torch.tensor([float("inf"), float("nan")], dtype=dtype)])
                n = min(len(values), flat.numel())
                flat[k : k + n] = values[:n]  # shifted per model: specials meet ordinary values too
            save_file(tensors, shard, metadata={"format": "pt"})
    return family


def _recipe(family, method: str) -> dict:
    params = {"weight": 0.6, "density": 0.5}
    if method.startswith("della"):
        params["epsilon"] = 0.1
    if method.startswith("breadcrumbs"):
        params["gamma"] = 0.05
    return {"merge_method": method, "base_model": str(family.base), "out_dtype": "float32",
            "parameters": {"rescale": True} if method in ("ties", "breadcrumbs") else {},
            "models": [{"model": str(m), "parameters": {**params, "weight": 0.6 - 0.2 * i}}
                       for i, m in enumerate(family.finetunes)]}


def _shards(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def family(request, tmp_path_factory):
    return request.param, _family(tmp_path_factory.mktemp("stored"), request.param, nonfinite=False)


@pytest.mark.parametrize("cuts", ["whole", "windows-ties", pytest.param("windows", marks=pytest.mark.slow),
                                  pytest.param("members", marks=pytest.mark.slow),
                                  pytest.param("histograms", marks=pytest.mark.slow)])
def test_every_gta_method_gives_the_bytes_of_the_widening_path(family, cuts, tmp_path, monkeypatch):
    """whole: every tensor merged whole (the tiny family's sizes); otherwise row blocks, some kept between passes,
    some re-read, with the top-k cuts found by the sampled window or by the exact radix selects."""
    dtype, fam = family
    if cuts != "whole":
        monkeypatch.setattr(plan, "BLOCK_NUMEL", 64)
        monkeypatch.setattr(plan, "STREAM_NUMEL", 1024)
    if cuts != "windows":  # the exact radix selects, by collected members or by low-digit histograms
        monkeypatch.setattr(keep, "_cuts_in_windows", lambda blocks, wanted: {})
    if cuts == "histograms":
        monkeypatch.setattr(keep, "_cuts_from_members",
                            lambda blocks, located, sizes, model_of, high_of:
                            keep._cuts_from_histograms(blocks, located, model_of, high_of))
    seen = []
    real_gta_block = fused.gta_block

    def gta_block(base, xs, *args):
        seen.append(xs.dtype)
        return real_gta_block(base, xs, *args)

    monkeypatch.setattr(fused, "gta_block", gta_block)
    for method in ("ties",) if cuts == "windows-ties" else GTA:  # windows-ties: the default suite's quick case
        seen.clear()
        stored = mergelib.merge(_recipe(fam, method), tmp_path / f"{method}-stored", quiet=True, threads=2)
        modes = {(job.mode, job.cached) for job in stored.plan.jobs}
        assert modes == {("whole", True)} if cuts == "whole" else {("stream", True), ("stream", False)} <= modes
        expected = {np.dtype(keep._STORED_BITS[dtype])}
        if method.startswith("della"):  # a 1-D tensor is one row ranked outside the kernels, on widened inputs
            expected.add(np.dtype(np.float32))
        assert set(seen) == expected, method
        with monkeypatch.context() as m:
            m.setattr(engine, "_reads_stored", lambda plan, placement: False)  # today's path: widened first
            seen.clear()
            widened = mergelib.merge(_recipe(fam, method), tmp_path / f"{method}-widened", quiet=True, threads=2)
            assert set(seen) == {np.dtype(np.float32)}
        assert _shards(stored.out_dir) == _shards(widened.out_dir), (method, cuts)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_inf_and_nan_inputs_are_refused_and_merged_as_before(dtype, tmp_path, monkeypatch):
    fam = _family(tmp_path / "fam", dtype, nonfinite=True)
    with pytest.raises(mergelib.InputModelError, match="NaN or Inf"):
        mergelib.merge(_recipe(fam, "ties"), tmp_path / "refused", quiet=True)
    for method in ("ties", "task_arithmetic", "dare_linear"):
        stored = mergelib.merge(_recipe(fam, method), tmp_path / f"{method}-s", quiet=True, allow_nan=True)
        monkeypatch.setattr(engine, "_reads_stored", lambda plan, placement: False)
        widened = mergelib.merge(_recipe(fam, method), tmp_path / f"{method}-w", quiet=True, allow_nan=True)
        monkeypatch.undo()
        assert _shards(stored.out_dir) == _shards(widened.out_dir), method


def test_widen_is_exact_for_every_16_bit_pattern():
    """Every bf16 and fp16 bit pattern (NaNs, infinities and subnormals included) widens to torch's float32 bits."""
    from numba import njit

    @njit
    def widen_all(values, out):
        for j in range(values.shape[0]):
            out[j] = fused.widen(values[j])

    patterns = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    for dtype, kind in keep._STORED_BITS.items():
        out = np.empty(1 << 16, dtype=np.float32)
        widen_all(patterns.view(kind), out)
        expected = torch.from_numpy(patterns.view(np.int16).copy()).view(dtype).to(torch.float32).numpy()
        assert np.array_equal(out.view(np.uint32), expected.view(np.uint32)), dtype
