"""The 8 GTA methods against a per-element Python reference, hand-derived literals and hypothesis properties.

Masks come from `mergelib.methods.masks` (checked on their own in test_masks.py); for random sparsifiers the
test replays the same generator in model order, so the reference sees the masks the merge saw.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from mergelib.methods import masks
from mergelib.methods.base import MethodInputs
from mergelib.methods.gta import SPECS

FAST = settings(max_examples=50, deadline=None)
QUICK = settings(max_examples=20, deadline=None)  # properties: 8 methods each
BY_NAME = {spec.name: spec for spec in SPECS if not spec.global_top_k}  # ties_paper: tests/methods/test_ties_paper.py
NAMES = list(BY_NAME)

# name: (sparsifier, consensus, normalize default, rescale default) -- mergekit's registry table
TABLE = {
    "task_arithmetic": (None, False, False, False),
    "ties": ("magnitude", True, True, False),
    "dare_ties": ("random", True, False, True),
    "dare_linear": ("random", False, False, True),
    "breadcrumbs": ("outliers", False, False, False),
    "breadcrumbs_ties": ("outliers", True, False, False),
    "della": ("magprune", True, True, True),
    "della_linear": ("magprune", False, False, True),
}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def run(name, base, models, model_params, seed=0, **params):
    """Merge with `name`; model_params are dicts, params use mergekit's names (`lambda`)."""
    spec = BY_NAME[name]
    inputs = MethodInputs(
        tensors=tuple(models),
        base=base,
        model_params=tuple(spec.model_params(**p) for p in model_params),
        name="t",
        generator=gen(seed) if spec.randomized else None,
    )
    return spec.merge(inputs, spec.params.model_validate(params))


def replay_masks(name, deltas, model_params, seed):
    """The keep masks the merge draws: same sparsifier, same generator, same model order."""
    kind, g = TABLE[name][0], gen(seed)
    out = []
    for delta, p in zip(deltas, model_params):
        density = p.get("density", 1.0)
        if kind is None or density >= 1:
            out.append(None)
        elif kind == "magnitude":
            out.append(masks.magnitude_mask(delta, density))
        elif kind == "random":
            out.append(masks.random_mask(delta, density, g))
        elif kind == "outliers":
            out.append(masks.outlier_mask(delta, density, p.get("gamma", 0.01)))
        else:
            out.append(masks.magprune_mask(delta, density, p.get("epsilon", 0.15), g))
    return out


def reference(base, models, weights, keeps, consensus, normalize, rescale, lam):
    """mergekit's GTA formula, one element at a time, in Python floats."""
    b = base.flatten().tolist()
    size = len(b)
    deltas = []
    for model, keep in zip(models, keeps):
        d = [x - y for x, y in zip(model.flatten().tolist(), b)]
        if keep is not None:
            k = keep.flatten().tolist()
            masked = [v if m else 0.0 for v, m in zip(d, k)]
            before, after = sum(abs(v) for v in d), sum(abs(v) for v in masked)
            scale = before / after if rescale and before >= 1e-7 and after >= 1e-7 else 1.0
            d = [v * scale for v in masked]
        deltas.append(d)
    out = []
    for j in range(size):
        terms = [(w, w * d[j]) for w, d in zip(weights, deltas)]
        if consensus:
            elected = 1 if sum(t for _, t in terms) >= 0 else -1
            terms = [(w, t) for w, t in terms if (t > 0 and elected > 0) or (t < 0 and elected < 0)]
            divisor = sum(w for w, _ in terms) or 1.0
        else:
            divisor = sum(weights) if abs(sum(weights)) >= 1e-8 else 1.0
        merged = sum(t for _, t in terms)
        if normalize:
            merged /= divisor
        out.append(b[j] + lam * merged)
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape)


# ---- the registry rows ----


def test_specs_match_mergekit_table():
    assert NAMES == list(TABLE)
    for name, (kind, _, normalize, rescale) in TABLE.items():
        spec = BY_NAME[name]
        defaults = spec.params()
        assert (defaults.normalize, defaults.rescale, defaults.lambda_, defaults.int8_mask) == (
            normalize, rescale, 1.0, False), name
        assert spec.base == "required" and spec.min_models == 1 and spec.max_models is None
        assert spec.randomized == (kind in ("random", "magprune"))
        assert spec.paper.startswith("https://arxiv.org/abs/")
        extra = {"breadcrumbs": {"gamma"}, "della": {"epsilon"}}.get(name.split("_")[0], set())
        assert set(spec.model_params.model_fields) == {"weight", "density"} | extra
        p = spec.model_params(weight=0.5)
        assert p.density == 1.0 and getattr(p, "gamma", 0.01) == 0.01 and getattr(p, "epsilon", 0.15) == 0.15


def test_params_validation():
    ties = BY_NAME["ties"]
    assert ties.params.model_validate({"lambda": 0.5, "int8_mask": True}).lambda_ == 0.5
    assert ties.params(lambda_=0.25).lambda_ == 0.25
    with pytest.raises(ValidationError, match="consensus_method"):
        ties.params.model_validate({"consensus_method": "count"})
    with pytest.raises(ValidationError, match="weight"):
        ties.model_params(density=0.5)
    with pytest.raises(ValidationError, match="density"):
        ties.model_params(weight=1, density=1.5)
    with pytest.raises(ValidationError, match="gamma"):
        ties.model_params(weight=1, gamma=0.1)
    with pytest.raises(ValidationError, match="gamma"):
        BY_NAME["breadcrumbs"].model_params(weight=1, gamma=-0.1)
    della = BY_NAME["della"].model_params
    for density, epsilon in ((0.1, 0.15), (0.9, 0.15), (0.5, 0.5)):
        with pytest.raises(ValidationError, match=r"density.*epsilon"):
            della(weight=1, density=density, epsilon=epsilon)
    for density in (0.0, 0.5, 1.0):
        della(weight=1, density=density, epsilon=0.3)


# ---- golden literals ----

BASE = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
DELTA_A = torch.tensor([[3.0, -1.0, 0.5], [-2.0, 4.0, 1.0]])
DELTA_B = torch.tensor([[-2.0, 2.0, 0.25], [-3.0, -0.5, 2.0]])
HALF = [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.5}]


def test_ties_golden():
    # Trim (k = 3): A keeps 3, -2, 4; B keeps -3 and, of three tied |2|, the lower indices 0 and 1 -> -2, 2.
    # Weighted: A [[3,0,0],[-2,4,0]], B [[-1,1,0],[-1.5,0,0]]; sums [[2,1,0],[-3.5,4,0]] elect + + + - + +.
    # Agreeing: A at 0, 3, 4; B at 1, 3. Numerators [3,1,0,-3.5,4,0], divisors [1,.5,1*,1.5,1,1*] (*0 -> 1).
    # Means [3, 2, 0, -7/3, 4, 0]; plus the base.
    models = [BASE + DELTA_A, BASE + DELTA_B]
    out = run("ties", BASE, models, HALF)
    assert torch.allclose(out, torch.tensor([[3.0, 2.0, 0.0], [-4 / 3, 5.0, 1.0]]), rtol=0, atol=1e-6)
    out = run("ties", BASE, models, HALF, **{"lambda": 0.5})
    assert torch.allclose(out, torch.tensor([[1.5, 1.0, 0.0], [-1 / 6, 3.0, 1.0]]), rtol=0, atol=1e-6)
    out = run("ties", BASE, models, HALF, normalize=False)
    assert torch.equal(out, torch.tensor([[3.0, 1.0, 0.0], [-2.5, 5.0, 1.0]]))


def test_breadcrumbs_small_tensor_keeps_top_values():
    # 6 elements, gamma 0.01: n_top = 0. mergekit returns the base here; we keep the top 3 of A: 3, -2, 4.
    out = run("breadcrumbs", BASE, [BASE + DELTA_A], [{"weight": 1.0, "density": 0.5}])
    assert torch.equal(out, torch.tensor([[3.0, 0.0, 0.0], [-1.0, 5.0, 1.0]]))


def test_task_arithmetic_golden():
    out = run("task_arithmetic", BASE, [BASE + DELTA_A, BASE + DELTA_B], HALF, **{"lambda": 2.0})
    assert torch.equal(out, BASE + 2 * (DELTA_A + 0.5 * DELTA_B))
    out = run("task_arithmetic", BASE, [BASE + DELTA_A, BASE + DELTA_B], HALF, normalize=True)
    assert torch.allclose(out, BASE + (DELTA_A + 0.5 * DELTA_B) / 1.5)


# ---- against the per-element reference ----

quarters = st.integers(-12, 12).map(lambda i: i / 4)  # exact in float32; many ties and zeros
shapes = st.sampled_from([(), (1,), (5,), (2, 3), (3, 4), (2, 2, 3)])


@st.composite
def cases(draw, name):
    shape = draw(shapes)
    numel = math.prod(shape)
    n_models = draw(st.integers(1, 3))

    def tensor():
        return torch.tensor(draw(st.lists(quarters, min_size=numel, max_size=numel))).reshape(shape)

    base = tensor()
    models = [base + tensor() for _ in range(n_models)]
    kind = TABLE[name][0]
    densities = [0.0, 0.3, 0.5, 0.8, 1.0] if kind == "magprune" else [0.0, 0.25, 0.5, 0.8, 1.0]
    model_params = []
    for _ in range(n_models):
        p = {"weight": draw(quarters), "density": draw(st.sampled_from(densities))}
        if kind == "outliers":
            p["gamma"] = draw(st.sampled_from([0.0, 0.01, 0.1, 0.3]))
        if kind == "magprune":
            p["epsilon"] = draw(st.sampled_from([0.0, 0.1, 0.15]))
        model_params.append(p)
    params = {"normalize": draw(st.booleans()), "rescale": draw(st.booleans()), "lambda": draw(quarters)}
    return base, models, model_params, params, draw(st.integers(0, 2**31))


@pytest.mark.parametrize("name", NAMES)
def test_matches_reference(name):
    @FAST
    @given(cases(name))
    def check(case):
        base, models, model_params, params, seed = case
        got = run(name, base, models, model_params, seed, **params)
        assert got.dtype == torch.float32 and got.shape == base.shape
        keeps = replay_masks(name, [m - base for m in models], model_params, seed)
        ref = reference(base, models, [p["weight"] for p in model_params], keeps, TABLE[name][1],
                        params["normalize"], params["rescale"], params["lambda"])
        assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-5), (got, ref)

    check()


# ---- properties ----


@pytest.mark.parametrize("name", NAMES)
def test_zero_deltas_give_base_exactly(name):
    @QUICK
    @given(cases(name))
    def check(case):
        base, models, model_params, params, seed = case
        out = run(name, base, [base.clone() for _ in models], model_params, seed, **params)
        assert torch.equal(out, base)

    check()


@pytest.mark.parametrize("name", NAMES)
def test_one_finetune_weight_one_density_one_gives_it(name):
    @QUICK
    @given(cases(name))
    def check(case):
        base, models, _, _, seed = case
        out = run(name, base, models[:1], [{"weight": 1.0, "density": 1.0}], seed)
        assert torch.equal(out, models[0])  # quarter-integers: every step is exact

    check()


@pytest.mark.parametrize("name", NAMES)
def test_inputs_untouched(name):
    base, models = BASE.clone(), [BASE + DELTA_A, BASE + DELTA_B]
    run(name, base, models, HALF, rescale=True)
    assert torch.equal(base, BASE) and torch.equal(models[0], BASE + DELTA_A) and torch.equal(models[1], BASE + DELTA_B)


@pytest.mark.parametrize("name", ["ties", "della"])
def test_normalized_weight_scale_invariance(name):
    @QUICK
    @given(cases(name), st.sampled_from([0.25, 2.0, 8.0]))
    def check(case, factor):
        base, models, model_params, params, seed = case
        # non-negative weights: with mixed signs the divisor can cancel to exactly 0, and its guard (a zero
        # divisor counts as 1) is not scale invariant
        model_params = [{**p, "weight": abs(p["weight"])} for p in model_params]
        scaled = [{**p, "weight": p["weight"] * factor} for p in model_params]
        params["normalize"] = True
        # a power-of-two factor scales every product and sum exactly, and leaves the sign election alone
        assert torch.equal(run(name, base, models, scaled, seed, **params),
                           run(name, base, models, model_params, seed, **params))

    check()


@pytest.mark.parametrize("name", [name for name in NAMES if BY_NAME[name].randomized])
def test_seeded_repeat_and_differ(name):
    base = torch.zeros(6, 7)
    models = [torch.randn(6, 7, generator=gen(1)), torch.randn(6, 7, generator=gen(2))]
    params = [{"weight": 0.5, "density": 0.5}, {"weight": 0.5, "density": 0.5}]
    first = run(name, base, models, params, seed=3)
    assert torch.equal(first, run(name, base, models, params, seed=3))
    assert not torch.equal(first, run(name, base, models, params, seed=4))
    spec = BY_NAME[name]
    inputs = MethodInputs(tuple(models), base, tuple(spec.model_params(**p) for p in params), "t", None)
    with pytest.raises(ValueError, match="generator"):
        spec.merge(inputs, spec.params())


@pytest.mark.parametrize(
    ("sparse", "dense"),
    [("dare_linear", "task_arithmetic"), ("della_linear", "task_arithmetic"), ("breadcrumbs", "task_arithmetic"),
     ("dare_ties", "ties"), ("della", "ties"), ("breadcrumbs_ties", "ties")],
)
def test_density_one_is_the_dense_method(sparse, dense):
    models = [BASE + DELTA_A, BASE + DELTA_B]
    full = [{"weight": 1.0}, {"weight": 0.5, "density": 1.0}]
    for normalize in (False, True):
        assert torch.equal(run(sparse, BASE, models, full, normalize=normalize),
                           run(dense, BASE, models, full, normalize=normalize))


def test_dare_keeps_density_fraction_and_rescales_l1():
    base = torch.zeros(100, 100)
    model = torch.randn(100, 100, generator=gen(9))
    kept = run("dare_linear", base, [model], [{"weight": 1.0, "density": 0.3}], seed=5, rescale=False) != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.02
    rescaled = run("dare_linear", base, [model], [{"weight": 1.0, "density": 0.3}], seed=5)
    assert torch.equal(rescaled != 0, kept)
    assert math.isclose(rescaled.abs().sum().item(), model.abs().sum().item(), rel_tol=1e-5)
