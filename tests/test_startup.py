"""Start-up: what `mergelib merge` imports, planning without tensors, and no kernel compiled after warm-kernels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
NEVER_ON_MERGE_PATH = ("transformers", "lm_eval", "hydra", "mlflow", "optuna", "ray", "jinja2", "datasets")
GTA = ("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
       "della_linear")


def _run(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=600)


def _recipe(family, method: str, path: Path) -> Path:
    params = {"weight": 0.5} if method == "linear" else {"weight": 0.5, "density": 0.5}
    if method == "model_stock":
        params = {}
    if method.startswith("della"):
        params["epsilon"] = 0.1
    recipe = {"merge_method": method, "out_dtype": "bfloat16",
              "models": [{"model": str(m), "parameters": params} for m in family.finetunes]}
    if method != "linear":
        recipe["base_model"] = str(family.base)
    path.write_text(yaml.safe_dump(recipe))
    return path


MODULES_AFTER = r"""
import gc, json, sys
from mergelib.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "modules": sorted({m.split(".")[0] for m in sys.modules}),
                  "gc_enabled": gc.isenabled(), "frozen": gc.get_freeze_count()}))
"""


@pytest.mark.parametrize("dry_run", [True, False])
def test_merge_imports_no_pipeline_library(tiny_family, tmp_path, dry_run):
    recipe = _recipe(tiny_family, "ties", tmp_path / "r.yml")
    args = ["merge", str(recipe), str(tmp_path / "out"), "--quiet", *(["--dry-run"] if dry_run else [])]
    done = _run(MODULES_AFTER, *args)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["code"] == 0
    assert "mergelib" in result["modules"] and "torch" in result["modules"]  # the check sees real imports
    assert sorted(set(NEVER_ON_MERGE_PATH) & set(result["modules"])) == []
    # torch's objects were imported with the collector off and frozen (never scanned again); collection is back on
    assert result["gc_enabled"] and result["frozen"] > 100_000


def test_help_imports_neither_torch_nor_numba():
    done = _run("import sys\nfrom mergelib.cli import build_parser\nbuild_parser().format_help()\n"
                "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numba', 'pydantic', 'numpy'}))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


class _Recorder(TorchDispatchMode):
    """Records every aten op (tensor creation included) run while it is active."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_planning_reads_headers_only_and_creates_no_tensor(tiny_family, tmp_path, monkeypatch):
    from mergelib.merging.api import plan_merge

    with _Recorder() as control:
        torch.empty(3)
    assert control.ops  # the recorder sees tensor creation
    created = []
    for name in ("from_numpy", "frombuffer", "load"):
        original = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _n=name, _f=original, **k: created.append(_n) or _f(*a, **k))
    for method in ("ties", "linear", "della"):
        with _Recorder() as recorder:
            plan = plan_merge(_recipe(tiny_family, method, tmp_path / f"{method}.yml"))
        assert len(plan.jobs) > 10
        assert recorder.ops == [] and created == [], method


def test_warmup_lists_every_kernel():
    """Every compiled entry point of the kernel modules has a signature in the warm-up (a new kernel must be added
    there, or the first merge that uses it compiles)."""
    from mergelib.io import convert
    from mergelib.methods import fused
    from mergelib.methods.kernel_warmup import _signatures

    warmed = {d for d, _ in _signatures()}
    called_inside_kernels = {fused._mix64, fused.uniform_at, fused._keep_row, fused._abs_deltas, fused._fp16_to_float32,
                             fused._magnitude_bits, fused._exact_sums, fused._counts_to_starts}
    kernels = {v for m in (fused, convert) for v in vars(m).values() if hasattr(v, "stats")}
    assert kernels - called_inside_kernels - warmed == set()


COMPILES_DURING = r"""
import json, sys
from mergelib import merge
from mergelib.methods.kernel_warmup import compiled_at_run_time
for i, recipe in enumerate(sys.argv[2:]):
    merge(recipe, f"{sys.argv[1]}/out{i}", quiet=True)
print(json.dumps(compiled_at_run_time()))
"""


@pytest.mark.slow
def test_no_kernel_compiles_after_warm_kernels(tiny_family, tmp_path):
    """A fresh numba cache: a merge compiles (the check can fail); after `mergelib warm-kernels`, merges of every
    kernel-using method on float32, bf16 and fp16 inputs, with 2 and 3 models, compile nothing."""
    from mergelib.families.tiny import make_family

    env = {"NUMBA_CACHE_DIR": str(tmp_path / "numba-cache")}
    first = _run(COMPILES_DURING, str(tmp_path), str(_recipe(tiny_family, "ties", tmp_path / "ties.yml")), env=env)
    assert first.returncode == 0, first.stderr
    assert "mergelib.methods.fused.gta_block" in json.loads(first.stdout.strip().splitlines()[-1])
    warm = subprocess.run([sys.executable, "-m", "mergelib", "warm-kernels"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env}, timeout=600)
    assert warm.returncode == 0, warm.stderr
    bf16 = make_family(tmp_path / "bf16", size="tiny", n_finetunes=3, seed=1, dtype=torch.bfloat16)
    fp16 = make_family(tmp_path / "fp16", size="tiny", n_finetunes=2, seed=2, dtype=torch.float16)
    recipes = [str(_recipe(family, method, tmp_path / f"{method}-{k}.yml"))
               for k, family in enumerate((tiny_family, bf16, fp16)) for method in ("linear", *GTA, "model_stock")]
    after = _run(COMPILES_DURING, str(tmp_path), *recipes, env=env)
    assert after.returncode == 0, after.stderr
    assert json.loads(after.stdout.strip().splitlines()[-1]) == {}


def test_merge_leaves_a_collector_the_caller_disabled_disabled(tiny_family, tmp_path):
    script = ("import gc, sys\ngc.disable()\nfrom mergelib.cli import main\ncode = main(sys.argv[1:])\n"
              "print(code, gc.isenabled())")
    recipe = _recipe(tiny_family, "ties", tmp_path / "r.yml")
    done = _run(script, "merge", str(recipe), str(tmp_path / "out"), "--quiet")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "0 False"
