"""ties_paper (TIES as published): one top-k per model over all its tensors, checked against a reference that
flattens every task vector into one vector the way the paper's code does (keys sorted) and trims it with a sort."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import mergelib
from mergelib.merging import plan as plan_module
from mergelib.merging.in_memory import merge_state_dicts
from mergelib.methods import REGISTRY, MethodInputs
from mergelib.methods.global_topk import kept_counts


def reference(base: dict, models: list[dict], density: float, lam: float = 1.0) -> dict:
    """Flatten (sorted keys), keep each model's int(density * d) largest |tau| (ties: lower flat index first),
    elect the sign of the sum (0 counts as +), average the agreeing nonzero entries, base + lam * that."""
    names = sorted(base)
    flat = lambda sd: torch.cat([sd[n].float().reshape(-1) for n in names])  # noqa: E731
    b = flat(base)
    taus = torch.stack([flat(m) - b for m in models])  # [T, d]
    k = int(density * taus.shape[1])
    trimmed = torch.zeros_like(taus)
    for t in range(taus.shape[0]):
        order = torch.sort(taus[t].abs(), descending=True, stable=True).indices[:k]
        trimmed[t, order] = taus[t, order]
    sign = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0)
    agree = (torch.sign(trimmed) == sign).float()
    merged = (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
    out, at = {}, 0
    result = b + lam * merged
    for n in names:
        out[n] = result[at: at + base[n].numel()].view(base[n].shape)
        at += base[n].numel()
    return out


def family(seed: int = 0, n: int = 3, ties: bool = True) -> tuple[dict, list[dict]]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"b.weight": (7, 5), "a.bias": (9,), "c.weight": (4, 6), "a.weight": (3, 3)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    models = []
    for _ in range(n):
        m = {k: v + 0.1 * torch.randn(v.shape, generator=g) * (torch.rand(v.shape, generator=g) < 0.8)
             for k, v in base.items()}
        if ties:  # many equal magnitudes, spread over tensors, around the cut
            for k in m:
                m[k].view(-1)[::3] = base[k].view(-1)[::3] + 0.05
        models.append(m)
    return base, models


@pytest.mark.parametrize("density", [0.0, 0.2, 0.37, 0.5, 1.0])
def test_equals_the_flattened_reference(density):
    base, models = family()
    got = merge_state_dicts("ties_paper", base, models, {"density": density})
    want = reference(base, models, density)
    for name in base:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-7)


def test_keeps_exactly_k_with_ties_given_in_sorted_name_order():
    base, models = family(n=1)
    tau = {k: (models[0][k] - base[k]).abs() for k in base}
    d = sum(v.numel() for v in tau.values())
    for k in (1, 7, d // 3, d // 2, d - 1):
        counts = kept_counts(list(base), [k], lambda n: [(0, tau[n])])
        assert sum(c[0] for c in counts.values()) == k
        flat = torch.cat([tau[n].reshape(-1) for n in sorted(base)])
        kept = torch.sort(flat, descending=True, stable=True).indices[:k]
        at, want = 0, {}
        for n in sorted(base):
            want[n] = int(((kept >= at) & (kept < at + tau[n].numel())).sum())
            at += tau[n].numel()
        assert {n: c[0] for n, c in counts.items()} == want


def test_differs_from_per_tensor_ties_where_tensors_differ_in_scale():
    base, models = family(ties=False)
    for m in models:  # one tensor's task vector is 10x larger: a global cut keeps most of it, little elsewhere
        m["b.weight"] = base["b.weight"] + 10 * (m["b.weight"] - base["b.weight"])
    k = int(0.2 * sum(v.numel() for v in base.values()))  # 15 of 77: fewer than b.weight's 35 entries
    counts = kept_counts(sorted(base), [k], lambda n: [(0, (models[0][n] - base[n]).abs())])
    assert counts["b.weight"][0] == k  # per-tensor ties would keep int(0.2 * 35) = 7 there and 8 elsewhere
    assert counts["a.bias"][0] == counts["a.weight"][0] == counts["c.weight"][0] == 0


def test_edge_cases_zero_deltas_identical_models_one_tensor():
    base, models = family()
    same = merge_state_dicts("ties_paper", base, [base, base], {"density": 0.3})
    assert all(torch.equal(same[k], base[k]) for k in base)
    twins = merge_state_dicts("ties_paper", base, [models[0], models[0]], {"density": 0.3})
    single = merge_state_dicts("ties_paper", base, [models[0]], {"density": 0.3})
    assert all(torch.equal(twins[k], single[k]) for k in base)  # the disjoint mean of equal values is the value
    want = reference(base, [models[0]], 0.3)
    assert all(torch.allclose(single[k], want[k], rtol=0, atol=1e-7) for k in base)
    # called on one tensor alone (no pre-pass), the tensor is the whole model: per-tensor ties with weight 1
    spec = REGISTRY["ties_paper"]
    mp = tuple(spec.model_params(density=0.4) for _ in models)
    alone = spec.merge(MethodInputs(tuple(m["b.weight"] for m in models), base["b.weight"], mp, "b.weight"),
                       spec.params())
    one = reference({"b.weight": base["b.weight"]}, [{"b.weight": m["b.weight"]} for m in models], 0.4)
    torch.testing.assert_close(alone, one["b.weight"], rtol=0, atol=1e-7)


def test_one_density_per_model():
    base, models = family()
    with pytest.raises(mergelib.MergelibError, match="density"):
        merge_state_dicts("ties_paper", base, models[:2], {"density": [{"filter": "bias", "value": 0.5},
                                                                       {"value": 0.2}]})


@pytest.mark.parametrize("blocks", [False, True])
def test_file_merge_equals_the_reference_and_the_in_memory_merge(tiny_family, tmp_path, monkeypatch, blocks):
    if blocks:  # every tensor of 64+ elements in row blocks: the pre-pass reads blocks too
        monkeypatch.setattr(plan_module, "BLOCK_NUMEL", 64)
    recipe = {"merge_method": "ties_paper", "base_model": str(tiny_family.base),
              "models": [{"model": str(p)} for p in tiny_family.finetunes], "parameters": {"density": 0.3},
              "dtype": "float32", "out_dtype": "float32"}
    result = mergelib.merge(recipe, tmp_path / "out", quiet=True)
    if blocks:
        assert {j.mode for j in result.plan.jobs} - {"whole"}
    read = lambda d: {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}  # noqa: E731
    got = read(tmp_path / "out")
    base, models = read(tiny_family.base), [read(p) for p in tiny_family.finetunes]
    merged = {j.name for j in result.plan.jobs}
    base = {k: v.float() for k, v in base.items() if k in merged}
    models = [{k: v.float() for k, v in m.items() if k in merged} for m in models]
    want = reference(base, models, 0.3)
    for name in base:
        torch.testing.assert_close(got[name].float(), want[name], rtol=0, atol=1e-6)
