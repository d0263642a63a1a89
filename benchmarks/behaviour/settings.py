"""The one parameter setting each method runs with in the behavioural benchmark (the same for every task and seed,
never tuned per method), and the recipe that merges fine-tunes with it.

- per-model `weight` 1.0 where the method takes one (mergekit semantics: normalising methods divide it out);
- `density` 0.5 for every sparsifying method (ties_paper included, so `ties` and `ties_paper` differ only in where
  the cut is taken; both also run at the paper's 0.2 as extra rows);
- `lambda` 0.4 for methods that add task vectors without normalising (task arithmetic, DARE, Breadcrumbs,
  DELLA-linear: the TIES paper's no-validation-set value for task arithmetic), the method's default (1.0) otherwise;
- every other parameter at its default. Methods that cannot take T fine-tunes (slerp, nearswap, arcee_fusion:
  two or one model) or that stack rather than merge (passthrough) are left out and listed as such.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mergelib.methods import REGISTRY, MethodSpec

DENSITY = 0.5
SUM_LAMBDA = 0.4
CALIBRATED = {"regmean": "gram", "regmean_plus_plus": "gram", "fisher": "fisher"}  # statistics each one reads


@dataclass(frozen=True)
class Setting:
    """One row of the benchmark: a method and the parameters it runs with."""

    label: str
    method: str
    per_model: dict = field(default_factory=dict)
    parameters: dict = field(default_factory=dict)


def _fields(model) -> set[str]:
    return {f.alias or n for n, f in model.model_fields.items() if not f.exclude}


def default_setting(spec: MethodSpec) -> Setting:
    """The documented default setting of `spec` (see the module docstring)."""
    ignored = {name for name, _ in spec.ignored}
    per_model, parameters = {}, {}
    model_fields, global_fields = _fields(spec.model_params), _fields(spec.params)
    if "weight" in model_fields and "weight" not in ignored:
        per_model["weight"] = 1.0
    if "density" in model_fields and "density" not in ignored:
        per_model["density"] = DENSITY
    if "lambda" in global_fields:
        normalize = spec.params.model_fields.get("normalize")
        if normalize is not None and normalize.default is False:
            parameters["lambda"] = SUM_LAMBDA
    return Setting(spec.name, spec.name, per_model, parameters)


def why_left_out(spec: MethodSpec, n_models: int) -> str | None:
    """Why `spec` cannot merge `n_models` fine-tunes of one base here, or None when it can."""
    if spec.base == "none" and spec.statistics is None:  # passthrough; the data-aware methods take no base either
        return "stacks layers, does not merge them"
    if spec.statistics_flow == "merged":
        return "its Grams come from the merged layers' activations, which only the LM gatherer computes"
    if spec.max_models is not None and spec.max_models < n_models:
        return f"takes at most {spec.max_models} model(s)"
    required = [n for n, f in spec.params.model_fields.items() if f.is_required()]
    required += [n for n, f in spec.model_params.model_fields.items() if f.is_required() and n != "weight"]
    if required:
        return f"needs {', '.join(required)} (a two-model interpolation)"
    return None


def settings(n_models: int, methods: list[str] | None = None) -> tuple[list[Setting], dict[str, str]]:
    """Every registered method's default setting plus the extra rows, and the methods left out with why."""
    rows, left_out = [], {}
    for name, spec in REGISTRY.items():
        if methods is not None and name not in methods:
            continue
        why = why_left_out(spec, n_models)
        if why:
            left_out[name] = why
            continue
        rows.append(default_setting(spec))
    extra = [
        Setting("dare_linear (no rescale)", "dare_linear", {"weight": 1.0, "density": DENSITY},
                {"lambda": SUM_LAMBDA, "rescale": False}),
        Setting("ties (density 0.2)", "ties", {"weight": 1.0, "density": 0.2}),
        Setting("ties_paper (density 0.2)", "ties_paper", {"density": 0.2}),
    ]
    rows += [s for s in extra if s.method in REGISTRY and (methods is None or s.method in methods)]
    for name in CALIBRATED:
        if name not in REGISTRY and (methods is None or name in methods):
            left_out[name] = "not registered on this branch"
    return rows, left_out


def recipe(setting: Setting, base: str, finetunes: list[str], statistics: dict[str, str] | None = None) -> dict:
    """The mergekit-style recipe of `setting` over `finetunes` (paths as written) of `base`."""
    spec = REGISTRY[setting.method]
    models = [{"model": path, "parameters": dict(setting.per_model)} for path in finetunes]
    out = {"merge_method": setting.method, "models": models, "parameters": dict(setting.parameters),
           "dtype": "float32", "out_dtype": "float32"}
    if spec.base in ("required", "optional"):  # "input": the base would join the average; leave it out
        out["base_model"] = base
    if statistics is not None:
        out["calibration"] = {"statistics": statistics}
    return out
