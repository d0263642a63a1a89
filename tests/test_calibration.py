"""Calibration statistics: layer-by-layer gathering equals whole-model references (transformers with hooks, full
autograd), the data rules, the cache, and RegMean++'s flow through the merged layers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import mergelib
from mergelib.calibration.data import read_texts, sequence_lengths, token_sequences
from mergelib.calibration.fisher import gather_fisher
from mergelib.calibration.gram import gather_grams
from mergelib.calibration.layers import LayerwiseModel
from mergelib.config.recipe import ModelRef
from mergelib.errors import RecipeError
from mergelib.merging.plan_inputs import ModelTable

DEMO = Path(__file__).resolve().parents[1] / "conf" / "calibration" / "demo.jsonl"


def input_model(path: Path):
    table = ModelTable(False)
    return table.models[table.add(ModelRef(path=str(path)))]


def sequences_for(path: Path, tokens=70, length=32, seed=0):
    return token_sequences(read_texts(DEMO), AutoTokenizer.from_pretrained(path), tokens, length, seed)


def full_model(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)


@pytest.fixture(scope="module")
def tied_model(tmp_path_factory):
    from mergelib.families.tiny import make_model, make_tokenizer

    path = make_model(tmp_path_factory.mktemp("tied") / "m", size="tiny", seed=3, tie_embeddings=True)
    make_tokenizer().save_pretrained(path)
    return path


# --- data -----------------------------------------------------------------------------------------------------------

def test_sequences_are_seeded_and_sized(tiny_family):
    a = sequences_for(tiny_family.base, tokens=70, length=32, seed=1)
    assert [len(s) for s in a] == [32, 32, 6] == sequence_lengths(70, 32)
    b = sequences_for(tiny_family.base, tokens=70, length=32, seed=1)
    c = sequences_for(tiny_family.base, tokens=70, length=32, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_bad_data_is_a_recipe_error_naming_the_field(tmp_path, tiny_family):
    with pytest.raises(RecipeError, match="calibration.data: cannot read"):
        read_texts(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(RecipeError, match="line 2 has no string field"):
        read_texts(bad)
    with pytest.raises(RecipeError, match="calibration.tokens: 100000 tokens asked"):
        sequences_for(tiny_family.base, tokens=100_000)


# --- Gram: layer by layer equals the whole model with hooks ---------------------------------------------------------

def test_layerwise_grams_equal_whole_model_hooks(tiny_family, tmp_path):
    path = tiny_family.finetunes[0]
    sequences = sequences_for(path)
    gather_grams(LayerwiseModel(input_model(path)), sequences, tmp_path / "g.safetensors", {"kind": "gram"})
    got = load_file(tmp_path / "g.safetensors")
    model = full_model(path)
    want: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            want[name] = want.get(name, 0) + x.T @ x
        return record

    handles = [m.register_forward_pre_hook(hook(n + ".weight")) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for ids in sequences:
            model(ids.unsqueeze(0))
    for h in handles:
        h.remove()
    assert set(got) == set(want) and len(got) == 4 * 7 + 1  # 7 Linears per layer and the head
    for name in want:
        torch.testing.assert_close(got[name], want[name].float(), rtol=1e-5, atol=1e-4)
    again = tmp_path / "again.safetensors"
    gather_grams(LayerwiseModel(input_model(path)), sequences, again, {"kind": "gram"})
    assert again.read_bytes() == (tmp_path / "g.safetensors").read_bytes()  # the same bytes every time


# --- Fisher: layer by layer equals full autograd --------------------------------------------------------------------

def full_fisher(path: Path, sequences) -> dict[str, torch.Tensor]:
    model = full_model(path)
    total: dict[str, torch.Tensor] = {}
    names = dict(model.named_parameters())
    for ids in sequences:
        logits = model(ids.unsqueeze(0)).logits
        loglik = -F.cross_entropy(logits[0, :-1], ids[1:], reduction="sum")
        grads = torch.autograd.grad(loglik, list(names.values()))
        for name, grad in zip(names, grads):
            total[name] = total.get(name, 0) + grad.double() ** 2
    return total


@pytest.fixture(scope="module")
def qwen2_model(tmp_path_factory):
    from mergelib.families.tiny import make_model, make_tokenizer

    path = make_model(tmp_path_factory.mktemp("qwen2") / "m", size="tiny", seed=4, arch="qwen2")  # q/k/v biases
    make_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("tied,arch", [(False, "llama"), (True, "llama"), (False, "qwen2")])
def test_layerwise_fisher_equals_full_autograd(tiny_family, tied_model, qwen2_model, tmp_path, tied, arch):
    path = tied_model if tied else (qwen2_model if arch == "qwen2" else tiny_family.finetunes[1])
    sequences = sequences_for(path, tokens=40, length=16)
    model = LayerwiseModel(input_model(path))
    assert model.tied == tied
    gather_fisher(model, sequences, tmp_path / "f.safetensors", {"kind": "fisher"})
    got = load_file(tmp_path / "f.safetensors")
    want = full_fisher(path, sequences)
    assert set(got) == set(want) and ("lm_head.weight" in got) != tied
    for name in want:
        scale = float(want[name].abs().max())
        torch.testing.assert_close(got[name], want[name].float(), rtol=1e-4, atol=1e-6 * max(scale, 1e-12))


# --- merges: cache, identity, RegMean++ -----------------------------------------------------------------------------

def recipe(method, models, **calibration):
    cal = {"data": str(DEMO), "tokens": 64, "sequence_length": 32, **calibration}
    return {"merge_method": method, "models": [{"model": str(p)} for p in models], "calibration": cal}


def test_second_merge_reuses_the_cached_statistics(tiny_family, tmp_path, monkeypatch):
    import mergelib.calibration.gram as gram

    calls = []
    real = gram.gather_grams
    monkeypatch.setattr(gram, "gather_grams", lambda *a, **k: (calls.append(1), real(*a, **k)))
    models = tiny_family.finetunes
    first = mergelib.merge(recipe("regmean", models, seed=7), tmp_path / "a", quiet=True)
    assert len(calls) == 2 and not any(first.plan.statistics.reused.values())
    files = {i: p.stat().st_mtime_ns for i, p in first.plan.statistics.files.items()}
    other = recipe("regmean", models, seed=7)
    other["parameters"] = {"reduce_non_diagonal": 0.5}
    second = mergelib.merge(other, tmp_path / "b", quiet=True)
    assert len(calls) == 2 and all(second.plan.statistics.reused.values())
    assert {i: p.stat().st_mtime_ns for i, p in second.plan.statistics.files.items()} == files
    record = json.loads((tmp_path / "b" / "mergelib_run.json").read_text())
    assert record["calibration"]["seed"] == 7 and record["calibration"]["kind"] == "gram"
    assert len(record["calibration"]["statistics"]) == 2
    assert "Statistics (gram) from calibration" in (tmp_path / "b" / "README.md").read_text()


@pytest.mark.parametrize("method", ["regmean", "regmean_plus_plus", "fisher"])
def test_identical_models_give_that_model(tiny_family, tmp_path, method):
    import shutil

    twin = tmp_path / "twin"
    shutil.copytree(tiny_family.finetunes[0], twin)
    out = mergelib.merge(recipe(method, [tiny_family.finetunes[0], twin]), tmp_path / "out", quiet=True).out_dir
    merged = load_file(out / "model.safetensors")
    original: dict[str, torch.Tensor] = {}
    for shard in sorted(tiny_family.finetunes[0].glob("*.safetensors")):
        original.update(load_file(shard))
    assert merged.keys() == original.keys()
    for name, tensor in original.items():  # float64 solves of float32 Grams: within 1e-5 relative
        torch.testing.assert_close(merged[name], tensor, rtol=1e-5, atol=1e-5)


def test_regmean_plus_plus_grams_come_from_the_merged_layers(tiny_family, tmp_path):
    """Reference: the merged output, loaded whole, gives the stream X^(l) (its hidden_states[l]); each candidate's
    own layer l, run on it with hooks, gives that candidate's Grams of layer l."""
    models = tiny_family.finetunes
    result = mergelib.merge(recipe("regmean_plus_plus", models), tmp_path / "out", quiet=True)
    merged = full_model(tmp_path / "out")
    sequences = sequences_for(models[0], tokens=64, length=32)
    for i, path in enumerate(models):
        got = load_file(result.plan.statistics.files[i])
        candidate = full_model(path)
        pieces = LayerwiseModel(input_model(path))  # for the layers' keyword arguments (mask, rotary)
        want: dict[str, torch.Tensor] = {}
        for ids in sequences:
            final = []  # the final norm's input (hidden_states[-1] is its output)
            handle = merged.model.norm.register_forward_pre_hook(lambda mod, args: final.append(args[0]))
            with torch.no_grad():
                states = merged(ids.unsqueeze(0), output_hidden_states=True).hidden_states
            handle.remove()
            for index, layer in enumerate(candidate.model.layers):
                records = {}
                handles = [m.register_forward_pre_hook(
                    lambda mod, args, n=f"model.layers.{index}.{name}.weight": records.__setitem__(n, args[0]))
                    for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
                kwargs = pieces.layer_kwargs(states[index])[index]
                with torch.no_grad():
                    layer(states[index], **kwargs)
                for h in handles:
                    h.remove()
                for name, x in records.items():
                    x = x.reshape(-1, x.shape[-1]).double()
                    want[name] = want.get(name, 0) + x.T @ x
            x = candidate.model.norm(final[0]).reshape(-1, 64).double().detach()
            want["lm_head.weight"] = want.get("lm_head.weight", 0) + x.T @ x
        assert set(got) == set(want)
        for name in want:
            torch.testing.assert_close(got[name], want[name].float(), rtol=1e-4, atol=1e-4, msg=name)


def test_merge_state_dicts_takes_statistics_and_needs_them():
    from mergelib.merging.in_memory import merge_state_dicts

    a = {"l.weight": torch.tensor([[1.0, 0.0]]), "n.weight": torch.tensor([1.0, 3.0])}
    b = {"l.weight": torch.tensor([[0.0, 1.0]]), "n.weight": torch.tensor([3.0, 1.0])}
    grams = [{"l.weight": torch.diag(torch.tensor([3.0, 1.0]))}, {"l.weight": torch.diag(torch.tensor([1.0, 3.0]))}]
    out = merge_state_dicts("regmean", None, [a, b], statistics=grams)
    assert torch.equal(out["l.weight"], torch.tensor([[0.75, 0.75]]))
    assert torch.equal(out["n.weight"], torch.tensor([2.0, 2.0]))
    with pytest.raises(RecipeError, match="statistics: regmean needs"):
        merge_state_dicts("regmean", None, [a, b])
    with pytest.raises(RecipeError, match="statistics: linear uses no statistics"):
        merge_state_dicts("linear", None, [a, b], {"weight": 1.0}, statistics=grams)


@pytest.mark.parametrize("method", ["regmean", "fisher", "regmean_plus_plus"])
def test_at_most_one_decoder_layer_is_in_memory_at_a_time(tiny_family, tmp_path, monkeypatch, method):
    from contextlib import contextmanager

    real = LayerwiseModel.loaded
    live, peak, loads = [0], [0], [0]

    @contextmanager
    def counting(self, module, *args, **kwargs):
        layer = any(module is m for m in self.layers)
        with real(self, module, *args, **kwargs) as out:
            live[0] += layer
            loads[0] += layer
            peak[0] = max(peak[0], live[0])
            try:
                yield out
            finally:
                live[0] -= layer

    monkeypatch.setattr(LayerwiseModel, "loaded", counting)
    monkeypatch.setenv("MERGELIB_CACHE", str(tmp_path / "cache"))  # gather afresh
    mergelib.merge(recipe(method, tiny_family.finetunes, tokens=40, sequence_length=20), tmp_path / "out", quiet=True)
    assert peak[0] == 1 and loads[0] >= 2 * 4  # every layer of both models, one at a time
    assert not list((tmp_path / "cache" / "statistics").glob(".*"))  # no temporary left behind
