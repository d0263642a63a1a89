"""The device path (`--device cuda`): the torch kernels give the numba kernels' bytes for every device-exact
method, the rest agree within 1e-6, and device flags a machine cannot honour are one-line errors (exit 2).

This machine has no GPU: the torch kernels run here on the CPU (`kernels="torch"`), the same code a GPU runs;
`benchmarks/gpu_check.py` repeats the parity check on a real GPU."""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import mergelib
import mergelib.merging.device as device_module
import mergelib.merging.plan
from mergelib.merging.device import DeviceError, Placement, resolve_placement
from mergelib.merging.rng import generator_for
from mergelib.methods import REGISTRY, MethodInputs, fused, torch_kernels
from mergelib.methods.gta import SPECS as GTA_SPECS
from tests.test_all_methods_e2e import recipe_for

BIN = Path(sys.executable).parent
GTA = [spec.name for spec in GTA_SPECS]  # the generalized task arithmetic family


def shard_digests(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.glob("*.safetensors"))}


def tensors_of(root: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(root.glob("*.safetensors")):
        out.update(load_file(path))
    return out


# --- kernels, one by one ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key,start", [(0, 0), (1, 7), (12345678901234567, 5), ((1 << 63) - 2, 1 << 40)])
def test_uniform_stream_is_the_numba_stream(key, start):
    expected = np.empty(50_000, dtype=np.float32)
    fused.fill_uniform(key, start, expected)
    got = torch_kernels.uniform(key, start, 50_000, "cpu")
    assert np.array_equal(got.numpy(), expected)


@pytest.mark.parametrize("normalize", [True, False])
def test_weighted_sum_matches_the_numba_kernel_bit_for_bit(normalize):
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(4097, generator=g) for _ in range(3)]
    xs[1][:10] = -0.0  # signed zeros: the sum starts from +0 in both
    weights = np.array([0.3, -0.7, 1.9], dtype=np.float32)
    divisor = np.float32(weights.sum()) if normalize else np.float32(1)
    expected = np.empty(4097, dtype=np.float32)
    fused.weighted_sum(tuple(x.numpy() for x in xs), weights, divisor, expected)
    got = torch_kernels.weighted_sum(xs, weights.tolist(), float(divisor))
    assert np.array_equal(got.numpy().view(np.uint32), expected.view(np.uint32))


def test_exact_sum_is_the_exact_sum_whatever_the_order():
    g = torch.Generator().manual_seed(2)
    values = (torch.randn(10_000, generator=g) * torch.logspace(-30, 30, 10_000)).abs().to(torch.float32)
    values[:3] = torch.tensor([0.0, 1e-45, 3e38])  # zero, the smallest subnormal, near the largest float32
    exact = sum(Fraction(float(v)) for v in values)
    slots = torch_kernels.exact_slots(values)
    assert torch_kernels.exact_sum(slots) == float(exact)  # the float64 nearest the exact sum
    assert torch_kernels.exact_slots(values.flip(0)) == slots
    special = torch.tensor([1.0, math.inf])
    assert torch_kernels.exact_sum(torch_kernels.exact_slots(special)) == math.inf
    assert math.isnan(torch_kernels.exact_sum(torch_kernels.exact_slots(torch.tensor([math.nan, math.inf]))))


def _gta_inputs(shape, seed, ties: bool):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    fts = [base + 0.1 * torch.randn(shape, generator=g) for _ in range(3)]
    if ties:  # many equal magnitudes and whole zero task vectors: the tie rules decide the masks
        base = torch.round(base * 8) / 8
        fts = [torch.round(f * 8) / 8 for f in fts]
        fts[1] = base.clone()
    return base, fts


@pytest.mark.parametrize("name", GTA)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("rescale,normalize,lam", [(True, True, 1.0), (False, False, 0.7), (True, False, 1.3)])
def test_gta_torch_kernels_give_the_numba_bits(name, ties, rescale, normalize, lam):
    assert len(GTA) == 9
    spec = REGISTRY[name]
    base, fts = _gta_inputs((37, 53), len(name), ties)
    extra = {"epsilon": 0.05} if "della" in name else {}
    mp = tuple(spec.model_params(weight=w, density=d, **extra)
               for w, d in zip((0.5, 0.7, -0.2), (0.3, 0.5, 0.85)))
    params = spec.params(rescale=rescale, normalize=normalize, **{"lambda": lam})

    def run(forced: bool) -> torch.Tensor:
        inputs = MethodInputs(tuple(fts), base, mp, "t", generator_for(3, "t") if spec.randomized else None)
        with torch_kernels.forced(forced):
            return spec.merge(inputs, params)

    assert torch.equal(run(True).view(torch.int32), run(False).view(torch.int32))


# --- whole merges ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cpu_merges(tiny_family, tmp_path_factory):
    """Every method merged the default way (numba kernels, row blocks and streams where the plan says)."""
    root = tmp_path_factory.mktemp("device-cpu")
    return {name: mergelib.merge(recipe_for(spec, tiny_family), root / name, quiet=True, seed=5).out_dir
            for name, spec in REGISTRY.items()}


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_method_on_the_torch_kernels(name, tiny_family, cpu_merges, tmp_path):
    spec = REGISTRY[name]
    out = mergelib.merge(recipe_for(spec, tiny_family), tmp_path / "torch", quiet=True, seed=5,
                         kernels="torch").out_dir
    if spec.device_exact:
        assert shard_digests(out) == shard_digests(cpu_merges[name])
    else:
        got, want = tensors_of(out), tensors_of(cpu_merges[name])
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key].float(), want[key].float(), rtol=1e-6, atol=1e-6)
    assert (out / "mergelib_run.json").read_text() == (cpu_merges[name] / "mergelib_run.json").read_text()


def test_streamed_and_row_block_merges_equal_the_device_path(tiny_family, monkeypatch, tmp_path):
    """With every tensor planned in row blocks or streams on the CPU, the whole-tensor device path still gives
    the same bytes."""
    monkeypatch.setattr(mergelib.merging.plan, "STREAM_NUMEL", 1)
    monkeypatch.setattr(mergelib.merging.plan, "BLOCK_NUMEL", 1)
    for name in ("dare_ties", "linear", "breadcrumbs_ties"):
        recipe = recipe_for(REGISTRY[name], tiny_family)
        cpu = mergelib.merge(recipe, tmp_path / f"{name}-cpu", quiet=True, seed=2, memory_budget=1 << 16)
        assert {j.mode for j in cpu.plan.jobs} - {"whole"}, "the plan should stream some tensors"
        dev = mergelib.merge(recipe, tmp_path / f"{name}-torch", quiet=True, seed=2, kernels="torch")
        assert shard_digests(dev.out_dir) == shard_digests(cpu.out_dir)


# --- flags ----------------------------------------------------------------------------------------------------------

@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(device_module, "_cuda_devices", lambda: 0)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(device="cuda"), "--device cuda: this machine has no CUDA device"),
    (dict(device="cuda:1"), "--device cuda:1: this machine has no CUDA device"),
    (dict(multi_gpu=True), "--multi-gpu: this machine has no CUDA device"),
    (dict(read_to_gpu=True), "--read-to-gpu reads inputs onto the GPU"),
    (dict(device="tpu"), "--device 'tpu': choose cpu, cuda or cuda:N"),
    (dict(device="cpu:1"), "choose cpu, cuda or cuda:N"),
    (dict(kernels="triton"), "kernels 'triton': choose numba or torch"),
])
def test_placements_this_machine_cannot_give_are_errors(no_cuda, kwargs, needle):
    with pytest.raises(DeviceError, match=needle.replace("(", r"\(")):
        resolve_placement(**kwargs)


def test_placements_on_a_machine_with_two_gpus(monkeypatch):
    monkeypatch.setattr(device_module, "_cuda_devices", lambda: 2)
    assert resolve_placement("cuda") == Placement(("cuda:0",), torch_kernels=True)
    assert resolve_placement("cuda:1", read_to_gpu=True) == Placement(("cuda:1",), True, True)
    spread = resolve_placement(multi_gpu=True)
    assert spread.devices == ("cuda:0", "cuda:1") and spread.torch_kernels
    assert [spread.device_for(i) for i in range(5)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    with pytest.raises(DeviceError, match="has 2 CUDA device"):
        resolve_placement("cuda:2")
    with pytest.raises(DeviceError, match="numba"):
        resolve_placement("cuda", kernels="numba")
    assert resolve_placement("cpu") == Placement()
    assert resolve_placement("cpu", kernels="torch").torch_kernels


def test_cli_cuda_on_a_machine_without_it_is_one_line_exit_2(tiny_family, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {tiny_family.base}\n    parameters: {{weight: 1}}\n")
    for flags in (["--cuda"], ["--device", "cuda:0", "--read-to-gpu"], ["--multi-gpu"]):
        proc = subprocess.run([str(BIN / "mergelib"), "merge", str(recipe), str(tmp_path / "out"), *flags],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "no CUDA device" in lines[0] and "Traceback" not in proc.stderr
        assert not (tmp_path / "out").exists()


def test_methods_listing_says_which_methods_are_device_exact():
    proc = subprocess.run([str(BIN / "mergelib"), "methods"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    said = {}
    for block in ("\n" + proc.stdout).split("\n")[1:]:
        if block and not block.startswith(" "):
            name = block.split(":", 1)[0]
        elif block.strip().startswith("on a GPU: "):
            said[name] = "the same bytes" in block
    assert said == {name: spec.device_exact for name, spec in REGISTRY.items()}
    assert {n for n, exact in said.items() if exact} == {"linear", "passthrough", *GTA}


def test_inputs_read_to_the_device_before_widening_give_the_same_bytes(tiny_family, tmp_path):
    from mergelib.merging.api import plan_merge
    from mergelib.merging.engine import execute

    recipe = recipe_for(REGISTRY["ties"], tiny_family)
    plan = plan_merge(recipe)
    outs = []
    for i, placement in enumerate([Placement(), Placement(("cpu",), torch_kernels=True, read_to_device=True)]):
        out = tmp_path / str(i)
        out.mkdir()
        execute(plan, out, seed=1, quiet=True, placement=placement)
        outs.append(shard_digests(out))
    assert outs[0] == outs[1] and outs[0]
