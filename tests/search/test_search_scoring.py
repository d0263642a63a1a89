"""The search's scorer against lm-eval (what the evaluate stage runs), the objective's arithmetic, and the in-memory
trial merge against the merge written to disk."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from search_helpers import demo_recipe

from mergelib.pipeline.evaluate import evaluate_model
from mergelib.search.config import Objective
from mergelib.search.scorer import ScorerError, greedy_answers, load_model, load_task
from mergelib.search.trial import TrialJob, merge_mode, objective_values, run_trial


def _untrained_copy(model_dir: Path, out: Path) -> Path:
    """The model's architecture and tokenizer with seeded random weights: it answers with non-empty garbage, where
    the quickly trained demo models stop at once (empty answers would make the comparison below vacuous)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir)).save_pretrained(out)
    for f in model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copyfile(f, out / f.name)
    return out


def test_greedy_answers_are_lm_evals_outputs(demo_quick, tmp_path):
    """Same prompts, same model: the scorer's answers are the strings lm-eval's generate_until returned."""
    subject = _untrained_copy(Path(demo_quick.finetunes[0]), tmp_path / "untrained")
    result = evaluate_model(subject, ["demo_add", "demo_rev"], limit=5, batch_size=4)
    model, tokenizer = load_model(subject)
    for task in ("demo_add", "demo_rev"):
        prompts = load_task(task, "test", 5)
        ours = greedy_answers(model, tokenizer, prompts)
        theirs = [e["output"] for e in result["examples"][task]]
        assert [e["input"] for e in result["examples"][task]] == list(prompts.prompts)
        assert ours == theirs and any(ours)


def test_validation_prompts_are_not_the_held_out_ones():
    for task in ("demo_add", "demo_rev", "demo_sort"):
        val, test = load_task(task, "validation"), load_task(task, "test")
        assert len(val.prompts) == len(test.prompts) == 200 and not set(val.prompts) & set(test.prompts)
    with pytest.raises(ScorerError, match="demo_ppl.*exact-match tasks"):
        load_task("demo_ppl")


@pytest.mark.parametrize("aggregate, normalise, expected", [
    ("mean", True, [(0.45 / 0.9 * 1 + 0.6 / 0.8 * 3) / 4]),
    ("mean", False, [(0.45 + 0.6 * 3) / 4]),
    ("min", True, [0.5]),
    ("pareto", True, [0.5, 0.75]),  # task order: demo_add, demo_rev
])
def test_objective_values(aggregate, normalise, expected):
    objective = Objective(tasks={"demo_rev": 3.0, "demo_add": 1.0}, aggregate=aggregate, normalise=normalise)
    got = objective_values({"demo_add": 0.45, "demo_rev": 0.6}, {"demo_add": 0.9, "demo_rev": 0.8}, objective)
    assert got == pytest.approx(expected)
    # a parent that scores 0 cannot normalise: the raw score counts
    assert objective_values({"demo_add": 0.2}, {"demo_add": 0.0}, Objective(tasks={"demo_add": 1})) == [0.2]


@pytest.mark.parametrize("method, params", [("task_arithmetic", {}), ("dare_ties", {"density": 0.6})])
def test_memory_trial_scores_what_the_disk_merge_scores(demo_quick, tmp_path, method, params):
    recipe = {**demo_recipe(demo_quick), "merge_method": method, "parameters": params}
    assert merge_mode(recipe, "auto") == "memory"
    objective = Objective(tasks={"demo_add": 1, "demo_rev": 1}, limit=40)
    jobs = {mode: TrialJob(0, recipe, 7, objective, {"demo_add": 0.5, "demo_rev": 0.5}, None, mode, str(tmp_path))
            for mode in ("memory", "disk")}
    results = {mode: run_trial(job) for mode, job in jobs.items()}
    assert results["memory"].scores == results["disk"].scores
    assert results["memory"].values == results["disk"].values
    assert not list(tmp_path.iterdir())  # the scratch merge was removed
    # the weights the memory trial scored are the merge `mergelib merge` writes, bit for bit
    from mergelib import merge
    from mergelib.search.trial import _CACHE

    written = merge(recipe, tmp_path / "merged", seed=7, quiet=True).out_dir
    on_disk = {}
    for f in sorted(written.glob("*.safetensors")):
        on_disk.update(load_file(f))
    model, _ = _CACHE.model(recipe["base_model"])
    in_memory = model.state_dict()
    for name, tensor in on_disk.items():
        assert torch.equal(in_memory[name], tensor), name


def test_pruned_trial_stops_after_the_first_prompts(demo_quick, tmp_path):
    objective = Objective(tasks={"demo_add": 1, "demo_rev": 1}, limit=40)
    job = TrialJob(0, demo_recipe(demo_quick), 0, objective, {}, 0.25, "memory", str(tmp_path))
    asked = []
    result = run_trial(job, lambda step, value: asked.append((step, value)) or True)
    assert result.pruned and result.values is None and len(asked) == 1
    assert asked[0] == (0, result.partial[0])
    full = run_trial(job, lambda step, value: False)
    assert not full.pruned and len(full.values) == 1


def test_floors_are_constraints_and_the_best_trial_keeps_them():
    import optuna
    from optuna.distributions import FloatDistribution

    from mergelib.search.config import validate_search
    from mergelib.search.run import _best_trials
    from mergelib.search.trial import constraint_values

    objective = Objective(tasks={"demo_add": 1, "demo_rev": 1}, floor={"demo_rev": 0.85, "demo_add": 0.8})
    got = constraint_values({"demo_add": 0.9, "demo_rev": 0.6}, {"demo_add": 1.0, "demo_rev": 0.8}, objective)
    assert got == pytest.approx([0.8 - 0.9, 0.85 - 0.75])  # task order: demo_add, demo_rev

    search = validate_search({"objective": objective.model_dump(), "space": {"weight": {"low": 0, "high": 1}}}, "t")
    study = optuna.create_study(direction="maximize")
    for value, constraints in ((0.95, [0.1, -0.2]), (0.9, [-0.1, 0.0]), (0.7, [-0.3, -0.3])):
        study.add_trial(optuna.trial.create_trial(value=value, params={"weight": value},
                                                  distributions={"weight": FloatDistribution(0, 1)},
                                                  user_attrs={"result": {"constraints": constraints}}))
    assert [t.number for t in _best_trials(study, search)] == [1]  # the best of those that kept every floor
    study.add_trial(optuna.trial.create_trial(value=0.99, params={"weight": 0.5},
                                              distributions={"weight": FloatDistribution(0, 1)},
                                              user_attrs={"result": {"constraints": [0.5, 0.5]}}))
    assert [t.number for t in _best_trials(study, search)] == [1]


def test_the_study_digest_follows_config_recipe_and_inputs_not_budget():
    from mergelib.search.config import validate_search
    from mergelib.search.study import config_digest

    data = {"objective": {"tasks": {"demo_add": 1}}, "space": {"weight": {"low": 0, "high": 1}}}
    base = config_digest(validate_search(data, "t"), {"merge_method": "linear"}, [{"model.safetensors": "ab"}])
    same = config_digest(validate_search({**data, "trials": 500, "executor": "ray"}, "t"), {"merge_method": "linear"},
                         [{"model.safetensors": "ab"}])
    assert base == same
    for other in (config_digest(validate_search({**data, "seed": 1}, "t"), {"merge_method": "linear"},
                                [{"model.safetensors": "ab"}]),
                  config_digest(validate_search(data, "t"), {"merge_method": "ties"}, [{"model.safetensors": "ab"}]),
                  config_digest(validate_search(data, "t"), {"merge_method": "linear"}, [{"model.safetensors": "cd"}])):
        assert other != base
