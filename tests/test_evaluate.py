"""Evaluation through lm-eval on tiny trained models: scores checked against plain-torch recomputations, the family
cache, report files, and one-line errors for bad task names."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

import mergelib
from mergelib.errors import MergelibError
from mergelib.families.demo import BOS, accuracy, build_demo_family, encode, new_model, save_model, torch_threads, train
from mergelib.pipeline import evaluate as ev
from mergelib.pipeline.reports import markdown_table, write_comparison, write_reports

SEEN = [f"{a}{b}|" for a, b in itertools.product("abcd", "abcd")] + ["a|", "b|", "c|"]  # copy 1-2 letters
UNSEEN = ["d|", "ae|", "ea|", "ee|", "cab|"]


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):  # the 2 cores are shared: more threads than free cores is many times slower
        yield


@pytest.fixture(scope="module")
def copier(tmp_path_factory):
    """A model trained (in about a second) to copy the 1-2 letter strings of SEEN, and a task over SEEN + UNSEEN
    in lm-eval's dict form (absolute data path)."""
    root = tmp_path_factory.mktemp("copier")
    rows = [(p, p[:-1]) for p in SEEN]
    with torch_threads(1):
        model = new_model(3)
        train(model, itertools.cycle(rows), steps=80, lr=3e-3, batch_size=len(rows), warmup=5)
    save_model(model, root / "model")
    data = root / "copy.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": p[:-1]}) + "\n" for p in SEEN + UNSEEN))
    task = ev.local_task("demo_add")  # the shipped YAML, pointed at another file
    task["task"] = "copy_letters"
    task["dataset_kwargs"]["data_files"]["test"] = str(data)
    return model, root / "model", task


@pytest.fixture(scope="module")
def quick_family(tmp_path_factory):
    return build_demo_family(tmp_path_factory.mktemp("demo") / "fam", seed=0, quick=True)


def test_a_model_that_answers_right_scores_high_and_lm_eval_agrees_with_plain_greedy(copier):
    model, path, task = copier
    seen = ev.evaluate_model(path, [{**task, "task": "seen"}], limit=len(SEEN))
    assert seen["metrics"]["seen"]["exact_match"] >= 0.9 and seen["metrics"]["seen"]["samples"] == len(SEEN)
    both = ev.evaluate_model(path, [task])
    rows = [(p, p[:-1]) for p in SEEN + UNSEEN]
    # lm-eval batches prompts of different lengths with left padding; the plain loop never pads
    score = both["metrics"]["copy_letters"]["exact_match"]
    assert 0 < score < 1 and score == pytest.approx(accuracy(model, rows))  # the unseen ones are (mostly) wrong
    first = both["examples"]["copy_letters"][0]
    assert first["input"] in SEEN + UNSEEN and first["target"] == first["input"][:-1]


def test_rolling_perplexity_matches_a_plain_torch_computation(copier):
    model, path, _ = copier
    texts = [json.loads(line)["text"] for line in (ev.DATA_DIR / "ppl.jsonl").read_text().splitlines()[:12]]
    result = ev.evaluate_model(path, ["demo_ppl"], limit=12)["metrics"]["demo_ppl"]
    total = 0.0
    with torch.no_grad():
        for text in texts:  # each text conditioned on a single <s>: lm-eval must not add a second one
            ids = torch.tensor([[BOS, *encode(text)]])
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
            total += float(logprobs.gather(1, ids[0, 1:, None]).sum())
    nbytes = sum(len(t.encode()) for t in texts)
    assert result["bits_per_byte"] == pytest.approx(-total / nbytes / math.log(2), rel=1e-5)
    assert result["byte_perplexity"] == pytest.approx(math.exp(-total / nbytes), rel=1e-5)


def test_family_evaluation_caches_parents_and_writes_reports(quick_family, tmp_path, monkeypatch):
    f = quick_family
    merged = tmp_path / "merged"
    mergelib.merge({"merge_method": "linear", "models": [
        {"model": str(f.finetunes[0]), "parameters": {"weight": 0.5}},
        {"model": str(f.finetunes[1]), "parameters": {"weight": 0.5}},
    ]}, merged, quiet=True)
    parents = ev.family_parents(f.root)
    assert list(parents) == ["base", "ft_add", "ft_rev", "ft_sort"]
    parents = {k: parents[k] for k in ("base", "ft_rev")}
    tasks = ["demo_add", "demo_rev", "demo_ppl"]
    kwargs = dict(cache_dir=tmp_path / "cache", limit=6, data_dir=f.root / "data")
    results = ev.evaluate_family(merged, parents, tasks, **kwargs)

    paths = write_reports(results, tmp_path / "reports")
    doc = json.loads(paths["metrics"].read_text())
    assert set(doc) == {"merged", "parents", "summary"} and set(doc["parents"]) == {"base", "ft_rev"}
    for per_task in [doc["merged"], *doc["parents"].values()]:
        assert set(per_task) == set(tasks)
        for name in ("demo_add", "demo_rev"):
            assert 0.0 <= per_task[name]["exact_match"] <= 1.0 and per_task[name]["samples"] == 6
        assert per_task["demo_ppl"]["bits_per_byte"] > 0 and per_task["demo_ppl"]["byte_perplexity"] > 1
    assert doc["summary"]["merged"]["exact_match_mean"] == pytest.approx(
        (doc["merged"]["demo_add"]["exact_match"] + doc["merged"]["demo_rev"]["exact_match"]) / 2)
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths["table"].read_text().splitlines()[0] == (
        "| model | demo_add (exact_match) | demo_ppl (bits_per_byte) | demo_rev (exact_match) |")
    assert json.loads(paths["samples"].read_text())["demo_rev"][0]["target"] == "ukh"

    calls = []
    real = ev.evaluate_model
    monkeypatch.setattr(ev, "evaluate_model", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    again = ev.evaluate_family(merged, parents, tasks, **kwargs)
    assert calls == [merged]  # parents came from the cache: same files, tasks, data and limit
    assert again == json.loads(json.dumps(results))  # and a fresh evaluation gives the same numbers


def test_reports_from_known_numbers(tmp_path):
    def result(add, rev, bpb):
        return {"metrics": {"demo_add": {"exact_match": add, "samples": 4}, "demo_rev": {"exact_match": rev},
                            "demo_ppl": {"bits_per_byte": bpb}}}

    results = {"parents": {"base": result(0.0, 0.25, 3.0), "ft_add": result(1.0, 0.0, 2.0)},
               "merged": result(0.75, 0.5, 1.23456789)}
    paths = write_reports(results, tmp_path)
    doc = json.loads(paths["metrics"].read_text())
    assert doc["merged"]["demo_ppl"]["bits_per_byte"] == 1.234568
    assert doc["summary"] == {"base": {"exact_match_mean": 0.125}, "ft_add": {"exact_match_mean": 0.5},
                              "merged": {"exact_match_mean": 0.625}}
    assert paths["table"].read_text().splitlines()[2:] == [
        "| base | 0.000 | 3.000 | 0.250 |", "| ft_add | 1.000 | 2.000 | 0.000 |", "| merged | 0.750 | 1.235 | 0.500 |"]
    assert paths["scores"].read_text().splitlines()[:2] == ["model,task,metric,value", "base,demo_add,exact_match,0.0"]
    first = paths["metrics"].read_bytes()
    assert write_reports(results, tmp_path)["metrics"].read_bytes() == first  # deterministic content

    runs = {"ties d=0.5": json.loads(first), "linear": {**results, "merged": result(0.5, 0.5, 2.5)}}
    cmp = write_comparison(runs, tmp_path)
    assert cmp["table"].read_text().splitlines()[2:] == [
        "| base | 0.000 | 3.000 | 0.250 |", "| ft_add | 1.000 | 2.000 | 0.000 |",
        "| ties d=0.5 | 0.750 | 1.235 | 0.500 |", "| linear | 0.500 | 2.500 | 0.500 |"]
    assert cmp["plot"].stat().st_size > 1000
    assert markdown_table({"m": {"t": {"acc": 0.5, "acc_norm": 0.25}}}, ["t"]).splitlines()[2] == "| m | 0.250 |"


def test_bad_task_names_give_one_line_errors(tmp_path):
    with pytest.raises(MergelibError) as err:
        ev.resolve_tasks(["demo_addd"])
    message = str(err.value)
    assert "\n" not in message and "'demo_addd'" in message and "did you mean 'demo_add'" in message
    with pytest.raises(ev.EvalTaskError, match=r"demo_rev.*rev\.jsonl is missing"):
        ev.resolve_tasks(["demo_rev"], data_dir=tmp_path)
    with pytest.raises(ev.EvalTaskError, match="'task' key"):
        ev.resolve_tasks([{"dataset_path": "json"}])


@pytest.mark.slow
def test_lm_eval_task_names_are_checked_against_its_index():
    assert ev.resolve_tasks(["wikitext"])[0] == ("wikitext", "wikitext", True)  # rolling: scored without a 2nd <s>
    assert ev.resolve_tasks(["hellaswag"])[0][2] is False
    with pytest.raises(ev.EvalTaskError) as err:
        ev.resolve_tasks(["hellaswagg"])
    assert "\n" not in str(err.value) and "did you mean 'hellaswag'" in str(err.value)


def test_the_chart_is_titled_with_the_method_and_its_parameters(tmp_path):
    from mergelib.pipeline.eval_step import merge_label

    (tmp_path / "mergelib_run.json").write_text(json.dumps({"recipe": {
        "merge_method": "ties", "parameters": {"density": 0.5, "normalize": True},
        "models": [{"model": "a", "parameters": {"weight": 0.7}}, {"model": "b", "parameters": {"weight": 0.3}}]}}))
    assert merge_label(tmp_path) == "ties density=0.5 normalize=True weights=0.7/0.3"
    assert merge_label(tmp_path / "absent") is None


def test_the_dvc_metric_holds_the_merge_s_scores_only():
    from mergelib.pipeline.eval_step import merge_scores

    document = {"merged": {"demo_add": {"exact_match": 0.7, "samples": 200}, "demo_ppl": {"bits_per_byte": 7.3}},
                "parents": {"base": {"demo_add": {"exact_match": 0.01}}}}
    assert merge_scores(document) == {"demo_add": 0.7, "demo_ppl_bpb": 7.3}
