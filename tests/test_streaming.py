"""Large tensors merged in row blocks (rowwise methods) or passes over row blocks (GTA family, model_stock) give
the same bits as whole."""

from __future__ import annotations

import hashlib

import pytest
import torch

import mergelib
import mergelib.merging.plan
from mergelib.methods import REGISTRY, MethodInputs
from mergelib.methods.base import StreamInputs
from mergelib.methods.gta import SPECS as GTA_SPECS

GTA = [spec.name for spec in GTA_SPECS]  # the generalized task arithmetic family


def make_inputs(shape, n, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    fts = [base + 0.1 * torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < 0.7) for _ in range(n)]
    fts[0].view(-1)[:5] = base.view(-1)[:5]  # some zero deltas, some exact ties in magnitude
    return base, fts


def model_params(spec, n):
    extra = {"epsilon": 0.1} if "della" in spec.name else {}
    return tuple(spec.model_params(weight=w, density=d, **extra) for w, d in zip((0.5, 0.3, 0.9), (0.4, 1.0, 0.6)))[:n]


@pytest.mark.parametrize("name", GTA)
@pytest.mark.parametrize("shape,chunk", [((13, 7), 3), ((40, 5), 40), ((9, 2, 3), 4)])
def test_stream_equals_whole(name, shape, chunk):
    spec = REGISTRY[name]
    assert len(GTA) == 9
    base, fts = make_inputs(shape, 3, seed=len(name))
    mp = model_params(spec, 3)
    params = spec.params(rescale=True) if "ties" in name else spec.params()
    whole = spec.merge(MethodInputs(tuple(fts), base, mp, "t", torch.Generator().manual_seed(7)), params)
    out = torch.full(shape, float("nan"))

    def emit(start, rows):
        out[start : start + rows.shape[0]] = rows

    tensors = {-1: base, **dict(enumerate(fts))}
    spec.stream(
        StreamInputs(shape, 3, lambda i, a, b: tensors[i][a:b].clone(), emit, mp, "t",
                     torch.Generator().manual_seed(7), chunk),
        params,
    )
    assert torch.equal(out, whole)


def digest(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.glob("*.safetensors"))}


@pytest.mark.parametrize("method", ["ties", "dare_ties", "linear", "della", "ram", "nearswap", "model_stock"])
def test_engine_blocks_give_identical_bytes(method, tiny_family, tmp_path, monkeypatch):
    models = [{"model": str(p), "parameters": {"weight": w, "density": 0.5}} for p, w in zip(tiny_family.finetunes, (0.6, 0.4))]
    recipe = {"merge_method": method, "base_model": str(tiny_family.base), "models": models}
    if method == "linear":
        recipe = {"merge_method": "linear", "models": [{"model": m["model"], "parameters": {"weight": m["parameters"]["weight"]}} for m in models]}
    if method == "della":
        recipe["parameters"] = {"epsilon": 0.1}
    if method == "model_stock":
        recipe["models"] = [{"model": m["model"]} for m in models]
    if method in ("ram", "nearswap"):
        recipe["models"] = [{"model": models[0]["model"]}]
        recipe["parameters"] = {"t": 0.01} if method == "nearswap" else {}
    mergelib.merge(recipe, tmp_path / "whole", quiet=True)
    monkeypatch.setattr(mergelib.merging.plan, "STREAM_NUMEL", 1)
    monkeypatch.setattr(mergelib.merging.plan, "BLOCK_NUMEL", 200)
    result = mergelib.merge(recipe, tmp_path / "blocks", quiet=True)
    modes = {j.mode for j in result.plan.jobs}
    assert modes == ({"stream"} if REGISTRY[method].stream else {"rows"} if REGISTRY[method].rowwise else {"whole"})
    assert digest(tmp_path / "whole") == digest(tmp_path / "blocks")
