"""conf/ -> params.yaml -> RunConfig: the committed params.yaml is what DVC would compose, every conf file composes
and validates, knobs reach the recipe, and every user mistake is one line naming the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mergelib.config.compose import compose, compose_yaml, load_params, main
from mergelib.config.recipe import load_recipe
from mergelib.config.run import KNOBS, run_config
from mergelib.errors import ConfigError
from mergelib.methods import REGISTRY

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
# Every file under conf/, with the overrides it needs to compose into a valid RunConfig.
CONF_FILES = {
    "config.yaml": [],
    "models/demo.yaml": ["models=demo"],
    "models/demo_quick.yaml": ["models=demo_quick"],
    "models/tiny.yaml": ["models=tiny"],
    "models/qwen2_5_0_5b.yaml": ["models=qwen2_5_0_5b"],
    "models/local.yaml": ["models=local", "models.base=/ckpt/base", "models.finetunes=[{model: /ckpt/ft}]"],
    "eval/demo.yaml": ["eval=demo"],
    "eval/quick.yaml": ["eval=quick"],
    "eval/leaderboard.yaml": ["eval=leaderboard"],
    "export/safetensors.yaml": ["export=safetensors"],
    "export/gguf.yaml": ["export=gguf"],
    "export/int8.yaml": ["export=int8"],
    "export/none.yaml": ["export=none"],
    "publish/none.yaml": ["publish=none"],
    "publish/hub.yaml": ["publish=hub", "publish.repo_id=me/merged"],
    "publish/mlflow.yaml": ["publish=mlflow"],
    "experiment/ties_half.yaml": ["experiment=ties_half"],
    "experiment/dare_ties.yaml": ["experiment=dare_ties"],
    "experiment/task_arithmetic.yaml": ["experiment=task_arithmetic"],
    "experiment/slerp.yaml": ["experiment=slerp"],
    "experiment/method_sweep.yaml": ["experiment=method_sweep"],
    "experiment/moe_demo.yaml": ["experiment=moe_demo"],
    "models/smollm2.yaml": ["models=smollm2"],
    "search/demo.yaml": ["search=demo"],
    "search/layered.yaml": ["search=layered"],
    "search/tiny.yaml": ["models=tiny", "search=tiny"],
}


DATA_FILES = {"calibration/demo.jsonl"}  # data beside the config groups (read by recipes, not composed)


def test_every_conf_file_is_listed():
    found = sorted(p.relative_to(CONF).as_posix() for p in CONF.rglob("*") if p.is_file())
    assert found == sorted({*CONF_FILES, *DATA_FILES}) and len(found) == 27


@pytest.mark.parametrize("name", sorted(CONF_FILES))
def test_conf_file_composes_into_a_valid_run_config(name):
    text = (CONF / name).read_text()
    assert isinstance(yaml.safe_load(text), dict)
    config = run_config(compose(CONF_FILES[name], CONF), source=name)
    recipe = load_recipe(config.recipe())  # the engine's schema accepts what the stages will pass
    assert recipe.merge_method == config.method


def test_params_yaml_matches_conf():
    assert (REPO / "params.yaml").read_text() == compose_yaml((), CONF), (
        "params.yaml drifted from conf/: run `python -m mergelib.config.compose`"
    )


@pytest.mark.parametrize("overrides", [[], ["method=dare_ties", "density=0.3"], ["experiment=slerp"]])
def test_compose_is_exactly_what_dvc_writes(tmp_path, overrides):
    from dvc.utils.hydra import compose_and_dump

    out = tmp_path / "params.yaml"
    compose_and_dump(out, str(CONF), None, "config", str(tmp_path), overrides)
    assert out.read_text() == compose_yaml(overrides, CONF)


def test_dvc_hydra_integration_is_enabled():
    text = (REPO / ".dvc" / "config").read_text()
    assert "[hydra]" in text and "enabled = true" in text and "config_dir = conf" in text


def test_overrides_reach_the_recipe():
    config = run_config(compose(["method=dare_ties", "density=0.3", "weight=0.7", "seed=4"], CONF))
    recipe = config.recipe()
    assert recipe["merge_method"] == "dare_ties" and config.seed == 4
    assert recipe["parameters"] == {"density": 0.3, "weight": 0.7}
    assert recipe["base_model"] == config.models.base == "models/demo/base"
    assert [m["model"] for m in recipe["models"]] == ["models/demo/ft_add", "models/demo/ft_rev"]


def test_sweep_entries_each_compose_into_a_valid_run_config():
    from mergelib.pipeline.sweep import sweep_config

    sweep = run_config(compose(["experiment=method_sweep"], CONF)).sweep
    assert list(sweep) == ["linear", "task_arithmetic", "ties", "dare_ties", "slerp", "della", "model_stock",
                           "breadcrumbs"]
    for label, overrides in sweep.items():
        config = sweep_config(label, overrides, ["models=demo_quick"])
        assert config.method == label and config.models.name == "demo_quick"
        load_recipe(config.recipe())


def test_moe_demo_names_the_family_s_models():
    from mergelib.moe.config import load_moe_config

    config = run_config(compose(["experiment=moe_demo", "models=tiny"], CONF))
    moe = load_moe_config(config.moe)
    assert str(moe.base_model) == "models/tiny/base"
    assert [str(e.source_model) for e in moe.experts] == ["models/tiny/ft1", "models/tiny/ft2"]


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_recipe_keeps_exactly_the_knobs_the_method_takes(method):
    """Knobs the method lacks, or accepts and ignores (task_arithmetic's density), never reach its recipe; the
    merge stage names them instead (inactive_knobs)."""
    spec = REGISTRY[method]
    takes = set(spec.params.model_fields) | set(spec.model_params.model_fields)
    acting = takes - {name for name, _ in spec.ignored}
    config = run_config(compose(["experiment=slerp" if spec.max_models == 1 else "method=ties"], CONF))
    config = config.model_copy(update={"method": method, "merge": {**config.merge, "merge_method": method}})
    recipe = config.recipe()
    assert set(recipe["parameters"]) == {k for k in KNOBS if k in acting}
    assert set(config.inactive_knobs()) == set(KNOBS) - set(recipe["parameters"])


def test_task_arithmetic_s_density_is_left_out_and_named():
    config = run_config(compose(["method=task_arithmetic", "density=0.1"], CONF))
    assert config.inactive_knobs() == {"density": 0.1, "t": 0.5}
    assert "density" not in config.recipe()["parameters"]


def test_recipe_maps_references_through_the_lock():
    config = run_config(compose((), CONF))
    refs = {"models/demo/base": "/abs/base", "models/demo/ft_rev": "org/ft2@abc"}
    recipe = config.recipe(refs)
    assert recipe["base_model"] == "/abs/base"
    assert [m["model"] for m in recipe["models"]] == ["models/demo/ft_add", "org/ft2@abc"]
    assert config.merge["base_model"] == "models/demo/base"  # the config itself is untouched


def test_input_refs_add_models_only_the_recipe_names():
    config = run_config(compose(["+merge.tokenizer_source=base"], CONF))
    assert config.input_refs() == ("models/demo/base", "models/demo/ft_add", "models/demo/ft_rev")
    slerp = run_config(compose(["experiment=slerp"], CONF))
    assert slerp.input_refs() == ("models/demo/base", "models/demo/ft_add", "models/demo/ft_rev")


def test_run_config_is_frozen():
    config = run_config(compose((), CONF))
    with pytest.raises(Exception):
        config.density = 0.1


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (["density=2"], ["density:", "less than or equal to 1", "(got 2)", "density=VALUE"]),
        (["method=tie"], ["method: unknown method 'tie'", "did you mean 'ties'"]),
        (["densty=0.5"], ["no key 'densty'", "did you mean 'density'"]),
        (["models=qwen"], ["no 'qwen' in conf/models/", "demo, demo_quick, local, qwen2_5_0_5b, smollm2, tiny"]),
        (["method=ties,dare_ties"], ["sweep", "--queue"]),
        (["density=[1"], ["write overrides as key=value"]),
        (["models=local"], ["'models.base' is required", "models.base=VALUE"]),
        (["publish=hub"], ["'publish.repo_id' is required"]),
        (["seed=-1"], ["seed:", "greater than or equal to 0"]),
        (["models.base=models/demo/b"], ["models.base: the demo family builds 'models/demo/base'"]),
        (["models.finetunes=[{model: models/demo/ft_mul}]"], ["models.finetunes[0].model", "ft_<skill>", "add"]),
        (["models=tiny", "models.finetunes=[{model: models/tiny/ft_a}]"], ["the tiny family builds 'models/tiny/ft1'"]),
        (["eval.tasks=[]"], ["eval.tasks"]),
        (["export.gguf=[q5_k]"], ["export.gguf[0]"]),
        (["publish=mlflow", "publish.version=null"], ["publish.version=1.0.0"]),
        (["+merge.parameters.lamda=2"], ["merge node:", "lamda", "did you mean 'lambda'"]),
        (["models=qwen2_5_0_5b", "experiment=slerp"], ["models.finetunes.1.model"]),
        (["recipe_file=/nonexistent/best.yml"], ["recipe_file: /nonexistent/best.yml: cannot read the recipe"]),
        (["search.sampler=bayes"], ["search.sampler:", "'tpe'", "(got 'bayes')"]),
        (["search.space.density.low=2"], ["search.space.density", "empty range: low 2.0 must be below high 1.0"]),
        (["search.objective.aggregate=max"], ["search.objective.aggregate", "'pareto'"]),
        (["merge_executor=spark"], ["merge_executor:", "'local' or 'ray'", "(got 'spark')"]),
        (["merge_device=gpu"], ["merge_device:", "cpu|cuda"]),
    ],
)
def test_bad_config_is_one_line_naming_the_key(overrides, fragments):
    with pytest.raises(ConfigError) as err:
        run_config(compose(overrides, CONF), source="config")
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_load_params_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read it"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_params(tmp_path / "params.yaml")


def test_compose_cli_writes_and_checks(tmp_path, monkeypatch, capsys):
    import shutil

    shutil.copytree(CONF, tmp_path / "conf")
    monkeypatch.chdir(tmp_path)
    assert main(["--check"]) == 1  # no params.yaml yet
    assert main([]) == 0
    assert (tmp_path / "params.yaml").read_text() == (REPO / "params.yaml").read_text()
    assert main(["--check"]) == 0
    assert main(["--check", "density=0.3"]) == 1
    assert main(["density=3x"]) == 2
    assert "error: " in capsys.readouterr().err
