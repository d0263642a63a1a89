"""The `mergelib` command as users run it: exit codes, one-line errors, outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml


def run(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "mergelib", *args], capture_output=True, text=True, cwd=cwd, env=env)


def write_recipe(tmp_path, recipe, name="recipe.yml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def ties_recipe(family, **params):
    return {
        "merge_method": "ties",
        "base_model": str(family.base),
        "models": [
            {"model": str(family.finetunes[0]), "parameters": {"weight": 0.5, "density": 0.5, **params}},
            {"model": str(family.finetunes[1]), "parameters": {"weight": 0.5, "density": 0.8}},
        ],
    }


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_merge_command_writes_a_model(tiny_family, tmp_path):
    recipe = write_recipe(tmp_path, ties_recipe(tiny_family))
    proc = run("merge", str(recipe), str(tmp_path / "out"), "--quiet", "--out-shard-size", "50kB")
    assert proc.returncode == 0, proc.stderr
    assert "merged" in proc.stdout and str(tmp_path / "out") in proc.stdout
    run_record = json.loads((tmp_path / "out" / "mergelib_run.json").read_text())
    assert run_record["method"] == "ties" and run_record["seed"] == 0
    assert yaml.safe_load((tmp_path / "out" / "mergekit_config.yml").read_text())["merge_method"] == "ties"


def test_dry_run_prints_the_plan(tiny_family, tmp_path):
    recipe = write_recipe(tmp_path, ties_recipe(tiny_family))
    proc = run("merge", str(recipe), str(tmp_path / "out"), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "plan: ties, 3 models" in proc.stdout
    assert "model.layers.0.self_attn.q_proj.weight" in proc.stdout
    assert "estimated peak memory" in proc.stdout
    assert not (tmp_path / "out").exists()


def test_methods_lists_all_twenty_eight():
    proc = run("methods")
    assert proc.returncode == 0
    names = [line.split(":")[0] for line in proc.stdout.splitlines() if line and not line.startswith(" ")]
    assert len(names) == 28 and "dare_ties" in names and "iso_cts" in names and "regmean_plus_plus" in names
    assert "ties_paper" in names
    assert "needs calibration: gram statistics" in proc.stdout and "take the plain average" in proc.stdout
    assert "density (default 1.0)" in proc.stdout
    assert "kept" not in proc.stdout  # ties_paper's per-tensor count is set by the engine's pre-pass, not listed


@pytest.mark.parametrize(
    "mutate,fragments",
    [
        (lambda r: {**r, "merge_method": "tie"}, ["unknown method 'tie'", "did you mean 'ties'"]),
        (lambda r: {**r, "paramters": {}}, ["unknown key 'paramters'", "did you mean 'parameters'"]),
        (lambda r: {**r, "base_model": "/nonexistent/model"}, ["/nonexistent/model", "no such directory"]),
        (lambda r: {**r, "base_model": "org/not-cached"}, ["org/not-cached", "HF_HUB_OFFLINE=1"]),
        (lambda r: {**r, "models": [{"model": m["model"], "parameters": {"density": 0.5}} for m in r["models"]]},
         ["parameter 'weight' is required by ties"]),
    ],
)
def test_bad_input_is_one_line_exit_2(tiny_family, tmp_path, mutate, fragments):
    recipe = write_recipe(tmp_path, mutate(ties_recipe(tiny_family)))
    proc = run("merge", str(recipe), str(tmp_path / "out"))
    assert_one_line_error(proc, *fragments)
    assert not (tmp_path / "out").exists()


def test_bad_parameter_on_some_tensors_fails_before_reading(tiny_family, tmp_path):
    # density 1.5 only for the MLP tensors of layer 1: still caught in planning, naming model and tensor
    recipe = ties_recipe(tiny_family, density=[{"filter": "layers.1.mlp", "value": 1.5}, {"value": 0.5}])
    proc = run("merge", str(write_recipe(tmp_path, recipe)), str(tmp_path / "out"))
    assert_one_line_error(proc, "parameter 'density'", "model.layers.1.mlp", "less than or equal to 1")


def test_bad_yaml_and_missing_recipe(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("merge_method: [ties\n")
    assert_one_line_error(run("merge", str(bad), str(tmp_path / "o")), "bad.yml: invalid YAML at line")
    assert_one_line_error(run("merge", str(tmp_path / "none.yml"), str(tmp_path / "o")), "none.yml", "cannot read")


def test_bad_flag_is_one_line(tmp_path):
    proc = run("merge", "a.yml", "out", "--out-shard-size", "lots")
    assert_one_line_error(proc, "'lots' is not a size")


def test_unwritable_output(tiny_family, tmp_path):
    recipe = write_recipe(tmp_path, ties_recipe(tiny_family))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_one_line_error(run("merge", str(recipe), str(blocker)), "is not a directory")
    if os.geteuid() != 0:  # root ignores directory permissions
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        assert_one_line_error(run("merge", str(recipe), str(locked / "out")), "not writable")


def test_incompatible_shapes_name_models_and_tensor(tmp_path):
    from mergelib.families.tiny import make_model

    a = make_model(tmp_path / "a", size="tiny", seed=0)
    config = json.loads((a / "config.json").read_text())
    other = tmp_path / "b"
    make_model(other, size="tiny", seed=1)
    # same architecture, different intermediate size: rewrite one tensor's shape
    from safetensors.torch import load_file, save_file

    for shard in sorted(other.glob("*.safetensors")):
        tensors = load_file(shard)
        key = "model.layers.0.mlp.up_proj.weight"
        if key in tensors:
            tensors[key] = tensors[key][:-1].clone()
            save_file(tensors, shard, metadata={"format": "pt"})
    recipe = {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 1}},
                                                    {"model": str(other), "parameters": {"weight": 1}}]}
    proc = run("merge", str(write_recipe(tmp_path, recipe)), str(tmp_path / "out"))
    assert_one_line_error(proc, "model.layers.0.mlp.up_proj.weight", "different shapes", str(a), str(other))
    assert config["num_hidden_layers"] >= 2


@pytest.mark.parametrize("name", ["good.txt", "good.YML", "recipe"])
def test_a_recipe_file_is_read_whatever_its_name(tiny_family, tmp_path, name):
    path = write_recipe(tmp_path, ties_recipe(tiny_family), name=name)
    proc = run("merge", str(path), str(tmp_path / "out"), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("plan: ties, 3 models")


def test_a_directory_or_missing_recipe_is_named(tmp_path):
    assert_one_line_error(run("merge", str(tmp_path), str(tmp_path / "out")), str(tmp_path), "is a directory")
    missing = tmp_path / "recipe"
    assert_one_line_error(run("merge", str(missing), str(tmp_path / "out")), str(missing), "cannot read the recipe")


@pytest.mark.parametrize("blob", [b"merge_method: linear\n# caf\xe9 au lait\n", bytes(range(256))])
def test_a_recipe_that_is_not_utf8_names_the_file_and_offset(tmp_path, blob):
    path = tmp_path / "recipe.yml"
    path.write_bytes(blob)
    offset = blob.index(next(b for b in blob if b >= 0x80).to_bytes(1, "big"))
    assert_one_line_error(run("merge", str(path), str(tmp_path / "out")), str(path), "not UTF-8",
                          f"at offset {offset}")


def task_arithmetic_recipe(family, density):
    return {"merge_method": "task_arithmetic", "base_model": str(family.base),
            "models": [{"model": str(p), "parameters": {"weight": 0.5, "density": density}} for p in family.finetunes]}


def test_a_parameter_the_method_ignores_is_said_and_recorded(tiny_family, tmp_path):
    digests = set()
    for density in (0.1, 0.5, 1.0):
        out = tmp_path / f"out{density}"
        proc = run("merge", str(write_recipe(tmp_path, task_arithmetic_recipe(tiny_family, density))), str(out))
        assert proc.returncode == 0, proc.stderr
        assert "warning: task_arithmetic ignores 'density' (it changes nothing" in proc.stderr
        record = json.loads((out / "mergelib_run.json").read_text())
        assert list(record["ignored_params"]) == ["density"]
        digests.add((out / "model.safetensors").read_bytes() if (out / "model.safetensors").exists()
                    else b"".join(p.read_bytes() for p in sorted(out.glob("*.safetensors"))))
    assert len(digests) == 1  # the knob really does nothing
    clean = run("merge", str(write_recipe(tmp_path, ties_recipe(tiny_family))), str(tmp_path / "ties"))
    assert clean.returncode == 0 and "warning" not in clean.stderr
    assert json.loads((tmp_path / "ties" / "mergelib_run.json").read_text())["ignored_params"] == {}


def test_methods_says_which_parameters_are_ignored():
    out = run("methods").stdout
    block = out[out.index("task_arithmetic:"):out.index("ties:")]
    assert "density (accepted for mergekit recipes, ignored)" in block


@pytest.mark.parametrize("method", ["slerp", "model_stock", "ram", "ramplus_tl", "arcee_fusion", "nearswap"])
def test_mergekit_test_recipes_with_a_weight_per_model_are_accepted(tiny_family, tmp_path, method):
    """mergekit's own test recipes give every model weight 0.6/0.4, which these methods accept and ignore."""
    two = method in ("slerp", "arcee_fusion", "nearswap")
    models = [tiny_family.base, tiny_family.finetunes[0]] if two else [tiny_family.base, *tiny_family.finetunes]
    recipe = {"merge_method": method, "base_model": str(tiny_family.base),
              "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(models, (0.6, 0.4, 0.4))]}
    if method in ("slerp", "nearswap"):
        recipe["parameters"] = {"t": 0.5}
    proc = run("merge", str(write_recipe(tmp_path, recipe)), str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert f"warning: {method} ignores 'weight'" in proc.stderr
    unknown = {**recipe, "models": [{"model": str(m), "parameters": {"wieght": 1.0}} for m in models]}
    assert_one_line_error(run("merge", str(write_recipe(tmp_path, unknown)), str(tmp_path / "bad")),
                          "unknown parameter")


def test_version():
    proc = run("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("mergelib ")


def test_config_json_says_dtype_and_keeps_torch_dtype_only_where_the_input_had_it(tiny_family, tmp_path):
    src = json.loads((tiny_family.base / "config.json").read_text())
    out = tmp_path / "out"
    assert run("merge", str(write_recipe(tmp_path, ties_recipe(tiny_family))), str(out), "--dtype",
               "bfloat16").returncode == 0
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "torch_dtype" not in src and "torch_dtype" not in config
    import shutil

    old = tmp_path / "old_base"  # a config written by transformers 4: torch_dtype only
    shutil.copytree(tiny_family.base, old)
    (old / "config.json").write_text(json.dumps({**{k: v for k, v in src.items() if k != "dtype"},
                                                 "torch_dtype": "float32"}))
    recipe = {"merge_method": "linear", "models": [{"model": str(old), "parameters": {"weight": 1.0}}]}
    assert run("merge", str(write_recipe(tmp_path, recipe)), str(tmp_path / "out4"), "--dtype",
               "bfloat16").returncode == 0
    config = json.loads((tmp_path / "out4" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["torch_dtype"] == "bfloat16"


def test_dry_run_memory_estimate_counts_what_the_process_holds(tiny_family, tmp_path):
    """The estimate once said 2.6 MB (the tensors' work alone) for a merge that peaks at 500 MB."""
    import re

    recipe = write_recipe(tmp_path, ties_recipe(tiny_family))
    dry = run("merge", str(recipe), str(tmp_path / "out"), "--dry-run")
    value, unit = re.search(r"estimated peak memory ([\d.]+) (kB|MB|GB)", dry.stdout).groups()
    estimate = float(value) * {"kB": 1e3, "MB": 1e6, "GB": 1e9}[unit]
    real = run("merge", str(recipe), str(tmp_path / "out"))
    value, unit = re.search(r"peak RSS ([\d.]+) (kB|MB|GB)", real.stdout).groups()
    peak = float(value) * {"kB": 1e3, "MB": 1e6, "GB": 1e9}[unit]
    assert 0.5 * peak <= estimate <= 2 * peak, (estimate, peak)  # was 0.004x


@pytest.mark.parametrize("flag, value", [("--out-shard-size", "0"), ("--out-shard-size", "0MB"),
                                         ("--memory-budget", "0kB"), ("--threads", "0")])
def test_nonsense_sizes_are_one_line_errors(tmp_path, flag, value):
    assert_one_line_error(run("merge", "a.yml", str(tmp_path / "out"), flag, value), value)


def test_dry_run_lists_what_is_left_out(tiny_family, tmp_path):
    recipe = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(tiny_family.base), "layer_range": [0, 3]}]}]}
    proc = run("merge", str(write_recipe(tmp_path, recipe)), str(tmp_path / "out"), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert f"left out: {tiny_family.base}: model.layers.3.mlp.down_proj.weight (layer 3 is in no slice)" in proc.stdout
    proc = run("merge", str(write_recipe(tmp_path, recipe)), str(tmp_path / "out"))
    record = json.loads((tmp_path / "out" / "mergelib_run.json").read_text())
    assert {"model": str(tiny_family.base), "tensor": "model.layers.3.mlp.down_proj.weight",
            "why": "layer 3 is in no slice"} in record["left_out"]


IMPORTS_OF_A_MERGE = """
import sys
from mergelib.cli import main
code = main(sys.argv[1:])
heavy = sorted(m for m in ("lm_eval", "transformers", "hydra", "omegaconf", "mlflow", "dvc", "matplotlib", "peft")
               if m in sys.modules)
print("HEAVY", code, heavy)
"""


@pytest.mark.parametrize("extra", [[], ["--dry-run"]])
def test_a_merge_imports_nothing_it_does_not_use(tiny_family, tmp_path, extra):
    """lm-eval, transformers, hydra and mlflow are never on the merge path: their import time is not the user's."""
    recipe = write_recipe(tmp_path, ties_recipe(tiny_family))
    proc = subprocess.run([sys.executable, "-c", IMPORTS_OF_A_MERGE, "merge", str(recipe), str(tmp_path / "out"),
                           "--quiet", *extra], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert "HEAVY 0 []" in proc.stdout, proc.stdout + proc.stderr


def test_threads_default_to_the_cores():
    from mergelib.merging.api import default_threads

    assert default_threads() == len(os.sched_getaffinity(0))
    assert "default: the cores available" in " ".join(run("merge", "--help").stdout.split())


BIG_PARENT = """
import subprocess, sys
big = bytearray(900 << 20)
big[::4096] = b"x" * len(big[::4096])  # touch every page: a 900 MB parent
sys.exit(subprocess.run([sys.executable, "-m", "mergelib", *sys.argv[1:]]).returncode)
"""


def test_the_reported_peak_is_the_merge_s_own_not_its_parent_s(tiny_family, tmp_path):
    """ru_maxrss carries the parent's high-water mark across fork and exec: a merge started from a large test
    runner reported 1.06 GB. The peak is now the process's own (VmHWM)."""
    import re

    recipe = write_recipe(tmp_path, ties_recipe(tiny_family))
    proc = subprocess.run([sys.executable, "-c", BIG_PARENT, "merge", str(recipe), str(tmp_path / "out")],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    value, unit = re.search(r"peak RSS ([\d.]+) (kB|MB|GB)", proc.stdout).groups()
    assert float(value) * {"kB": 1e3, "MB": 1e6, "GB": 1e9}[unit] < 800e6, proc.stdout
