"""`mergelib.merge_state_dicts`: the file path's math in memory, bit for bit; encoders too; no files written and
torch's thread settings untouched."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

import mergelib
from mergelib.errors import InputModelError, RecipeError

CASES = {  # method -> (global parameters, per-model parameters of the two fine-tunes)
    "linear": ({}, [{"weight": [0.2, 0.8]}, {"weight": 0.5}]),
    "task_arithmetic": ({"lambda": 0.9}, [{"weight": 0.7}, {"weight": [0.1, 0.6]}]),
    "ties": ({"density": 0.4}, [{"weight": 1.0}, {"weight": 0.5}]),
    "dare_ties": ({"density": [{"filter": "self_attn", "value": 0.3}, {"value": 0.7}]},
                  [{"weight": 1.0}, {"weight": 1.0}]),
    "della": ({"density": 0.5, "epsilon": 0.1}, [{"weight": 1.0}, {"weight": 0.8}]),
    "breadcrumbs": ({"density": 0.9, "gamma": 0.05}, [{"weight": 1.0}, {"weight": 1.0}]),
    "model_stock": ({}, [{}, {}]),
    "karcher": ({}, [{}, {}]),
    "sce": ({"select_topk": 0.5}, [{}, {}]),
    "multislerp": ({}, [{"weight": 0.3}, {"weight": 0.7}]),
    "ram": ({}, [{}, {}]),
}


def state_dict(model_dir):
    out = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


@pytest.mark.parametrize("method", sorted(CASES))
def test_equals_the_file_path_bit_for_bit(tiny_family, tmp_path, method):
    params, per_model = CASES[method]
    recipe = {"merge_method": method, "base_model": str(tiny_family.base), "parameters": params,
              "models": [{"model": str(ft), "parameters": p} for ft, p in zip(tiny_family.finetunes, per_model)]}
    base = state_dict(tiny_family.base)
    if method == "linear":  # its base would be one more weighted input: leave it out on both paths
        del recipe["base_model"]
        base = None
    written = state_dict(mergelib.merge(recipe, tmp_path / "out", seed=7, quiet=True).out_dir)
    models = [state_dict(ft) for ft in tiny_family.finetunes]
    merged = mergelib.merge_state_dicts(method, base, models, params, model_parameters=per_model, seed=7)
    assert set(written) <= set(merged)
    for name, tensor in written.items():
        assert merged[name].dtype == tensor.dtype and torch.equal(merged[name], tensor), name


def encoder(seed: int, layers: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {"embeddings.word_embeddings.weight": torch.randn(50, 8, generator=g),
          "pooler.dense.weight": torch.randn(8, 8, generator=g)}
    for i in range(layers):
        sd[f"encoder.layer.{i}.attention.self.query.weight"] = torch.randn(8, 8, generator=g)
        sd[f"encoder.layer.{i}.output.LayerNorm.bias"] = torch.randn(8, generator=g)
    return sd


def test_bert_like_encoders_with_a_gradient_over_their_layers(tmp_path, monkeypatch):
    """An encoder's layers are found from its names: a weight gradient [0, 1] gives layer 0 all of the second
    model's complement, the last layer all of the second model (linear, normalised by the weight sum)."""
    a, b = encoder(1), encoder(2)
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(3)
    merged = mergelib.merge_state_dicts("linear", None, [a, b], {"normalize": True},
                                        model_parameters=[{"weight": 1.0}, {"weight": [0.0, 1.0]}])
    assert torch.get_num_threads() == 3 and list(tmp_path.iterdir()) == []  # no thread change, no files
    q = "encoder.layer.{}.attention.self.query.weight"
    assert torch.equal(merged[q.format(0)], a[q.format(0)])  # weights 1 and 0
    expected = (a[q.format(1)] + 0.5 * b[q.format(1)]) / 1.5  # middle layer: t = 0.5
    torch.testing.assert_close(merged[q.format(1)], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(merged[q.format(2)], (a[q.format(2)] + b[q.format(2)]) / 2, rtol=0, atol=1e-6)
    emb = "embeddings.word_embeddings.weight"  # not in a layer: t = 0
    assert torch.equal(merged[emb], a[emb])


def test_bad_inputs_are_one_line_errors():
    a, b = encoder(1), encoder(2)
    with pytest.raises(InputModelError, match="'pooler.dense.weight' is missing from input 1"):
        mergelib.merge_state_dicts("linear", None, [a, {k: v for k, v in b.items() if "pooler" not in k}],
                                   {"weight": 1.0})
    with pytest.raises(InputModelError, match=r"\[4, 8\] in input 1"):
        mergelib.merge_state_dicts("linear", None, [a, {**b, "pooler.dense.weight": torch.zeros(4, 8)}],
                                   {"weight": 1.0})
    with pytest.raises(RecipeError, match="base: ties needs a base"):
        mergelib.merge_state_dicts("ties", None, [a, b], {"weight": 1.0})
    with pytest.raises(RecipeError, match="parameter 'density'"):
        mergelib.merge_state_dicts("ties", a, [b], {"weight": 1.0, "density": 1.5})
    assert os.environ.get("MERGELIB_FAILPOINT") is None
