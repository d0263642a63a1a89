"""Multi-document recipes: DAG order, errors, stages cached by content hash, the final output's numbers."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from mergelib.cli import main
from mergelib.config.recipe import load_recipe, load_recipes
from mergelib.errors import RecipeError
from mergelib.io.index import index_model
from mergelib.io.reader import read_tensor
from mergelib.merging.multi import STAGE_FILE, merge_multi, stage_graph


def tensors(path) -> dict[str, torch.Tensor]:
    index = index_model(path)
    return {name: read_tensor(name, info) for name, info in index.tensors.items()}


def linear(*pairs, name=None) -> dict:
    doc = {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": w}} for m, w in pairs]}
    return {**doc, "name": name} if name else doc


def multi_yaml(*docs) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False)


def test_order_follows_the_references_not_the_file(tiny_family):
    ft1, ft2 = (str(p) for p in tiny_family.finetunes)
    recipes = load_recipes(multi_yaml(
        linear(("mid", 1.0), (ft1, 1.0)),  # the final document may come first
        linear(("first", 1.0), (ft2, 1.0), name="mid"),
        linear((ft1, 1.0), name="unused"),
        linear((ft1, 1.0), (ft2, 1.0), name="first"),
    ))
    order = stage_graph(recipes)
    assert [s.name for s in order] == ["first", "mid", "unused", None]
    assert order[1].deps == ("first",) and order[-1].deps == ("mid",)


@pytest.mark.parametrize(("docs", "fragment"), [
    ([linear(("b", 1.0), name="a"), linear(("a", 1.0), name="b"), linear(("a", 1.0))],
     "the documents form a cycle: a -> b -> a"),
    ([linear(("a", 1.0), name="a"), linear(("a", 1.0))], "cycle: a -> a"),
    ([linear(("FT", 1.0), name="stage1"), linear(("stage2", 1.0))],
     "document 2: 'stage2' is neither a model directory nor the name of a document (did you mean 'stage1'?)"),
    ([linear(("FT", 1.0)), linear(("FT", 1.0))], "documents 1, 2 have no name"),
    ([linear(("FT", 1.0), name="x"), linear(("FT", 1.0), name="x")], "name 'x' is already document 1"),
    ([linear(("FT", 1.0), name="../x"), linear(("FT", 1.0))], "it names a directory"),
    ([linear(("user", 1.0), name="first"), linear(("FT", 1.0), name="user")],
     "document 2 ('user') is the final output but document 1 uses it"),
])
def test_graph_errors_name_the_documents(tiny_family, docs, fragment):
    text = multi_yaml(*docs).replace("FT", str(tiny_family.finetunes[0]))
    with pytest.raises(RecipeError) as err:
        stage_graph(load_recipes(text))
    assert fragment in str(err.value)


def test_load_recipes_labels_documents(tmp_path):
    path = tmp_path / "multi.yml"
    path.write_text(multi_yaml(linear(("a", 1.0), name="s"), {"merge_method": "linear", "modelz": []}))
    with pytest.raises(RecipeError, match=r"multi.yml: document 2: unknown key 'modelz'"):
        load_recipes(path)
    with pytest.raises(RecipeError, match="expected one YAML document"):
        load_recipe(path)
    assert [r.name for r in load_recipes(multi_yaml(linear(("a", 1.0), name="s")))] == ["s"]


def test_stages_run_in_order_are_cached_and_rerun_on_change(tiny_family, tmp_path):
    base, ft1, ft2 = str(tiny_family.base), *(str(p) for p in tiny_family.finetunes)
    docs = [linear(("avg", 0.5), (base, 0.5)), linear((ft1, 1.0), (ft2, 1.0), name="avg")]
    out, inter = tmp_path / "out", tmp_path / "stages"
    first = merge_multi(load_recipes(multi_yaml(*docs)), out, intermediate_dir=inter, quiet=True)
    assert [(r.name, r.reused) for r in first.stages] == [("avg", False), (None, False)]
    src = {p: tensors(p) for p in (base, ft1, ft2)}
    got = tensors(out)
    for name in ("model.layers.1.mlp.up_proj.weight", "model.norm.weight", "model.embed_tokens.weight"):
        expected = 0.25 * src[ft1][name] + 0.25 * src[ft2][name] + 0.5 * src[base][name]  # normalized weights
        torch.testing.assert_close(got[name], expected, atol=1e-6, rtol=1e-6)
    stamp = (inter / "avg" / "model.safetensors").stat().st_mtime_ns

    again = merge_multi(load_recipes(multi_yaml(*docs)), out, intermediate_dir=inter, quiet=True)
    assert [(r.name, r.reused) for r in again.stages] == [("avg", True), (None, False)]
    assert again.stages[0].key == first.stages[0].key
    assert (inter / "avg" / "model.safetensors").stat().st_mtime_ns == stamp

    docs[1] = linear((ft1, 1.0), (ft2, 3.0), name="avg")  # a change in the stage re-runs it
    changed = merge_multi(load_recipes(multi_yaml(*docs)), out, intermediate_dir=inter, quiet=True)
    assert [(r.name, r.reused) for r in changed.stages] == [("avg", False), (None, False)]
    assert changed.stages[0].key != first.stages[0].key
    name = "model.layers.1.mlp.up_proj.weight"
    expected = 0.125 * src[ft1][name] + 0.375 * src[ft2][name] + 0.5 * src[base][name]
    torch.testing.assert_close(tensors(out)[name], expected, atol=1e-6, rtol=1e-6)

    reseeded = merge_multi(load_recipes(multi_yaml(*docs)), out, intermediate_dir=inter, quiet=True, seed=5)
    assert not reseeded.stages[0].reused  # the seed is part of the key
    assert (inter / "avg" / STAGE_FILE).is_file()


def test_a_changed_input_file_reruns_the_stage(tiny_family, tmp_path):
    ft = tmp_path / "ft"
    shutil.copytree(tiny_family.finetunes[0], ft)
    docs = multi_yaml(linear((str(ft), 1.0), name="s"), linear(("s", 1.0)))
    run = [merge_multi(docs, tmp_path / "out", quiet=True) for _ in range(2)]
    assert [r.stages[0].reused for r in run] == [False, True]
    config = json.loads((ft / "config.json").read_text())
    (ft / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))  # same size class, new bytes
    assert not merge_multi(docs, tmp_path / "out", quiet=True).stages[0].reused
    assert (tmp_path / "out.intermediate" / "s" / "config.json").is_file()  # the default intermediate dir


def test_cli_runs_a_multi_document_recipe(tiny_family, tmp_path, capsys):
    ft1, ft2 = (str(p) for p in tiny_family.finetunes)
    path = tmp_path / "multi.yml"
    path.write_text(multi_yaml(linear((ft1, 1.0), (ft2, 1.0), name="s1"), linear(("s1", 1.0), (ft1, 1.0))))
    args = ["merge", str(path), str(tmp_path / "out"), "--quiet", "-I", str(tmp_path / "inter")]
    assert main([*args, "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"stage s1: would merge 39 tensors -> {tmp_path / 'inter' / 's1'}",
        f"stage (final): would run (after the stages it uses) -> {tmp_path / 'out'}",
    ]
    assert main(args) == 0
    assert "stage s1: merged" in capsys.readouterr().out
    assert main(args) == 0
    assert f"stage s1: unchanged, reused -> {tmp_path / 'inter' / 's1'}" in capsys.readouterr().out
    assert (tmp_path / "out" / "config.json").is_file()
