"""The search space over a recipe: which parameters a trial draws, and the mergekit recipe those values make.

Keys name recipe parameters as mergekit writes them: `density` (the recipe's top-level `parameters`),
`ft_add.weight` (one model's `parameters`; a model is named by its reference's last path part), `weight@mlp`
(a layer group: mergekit's filter list, `[{filter: mlp, value: x}, {value: <the unfiltered value>}]`), a dimension
with `points: N` (a gradient over the layers: mergekit's list of N values) and `method` (the merge method itself,
as choices). A parameter the trial's method does not take is not drawn and not written.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mergelib.errors import ConfigError, MergelibError, did_you_mean
from mergelib.pipeline.eval_step import model_label  # how a space key names a model, as the reports do
from mergelib.search.config import Dimension, SearchConfig

METHOD = "method"


class SearchSpaceError(ConfigError):
    """A searched parameter does not fit the recipe or its method."""


@dataclass(frozen=True)
class Key:
    """A parsed space key: `[model.]param[@filter]`."""

    text: str
    model: str | None
    param: str
    filter: str | None


def parse_key(text: str) -> Key:
    """`ft_add.weight@mlp` -> Key(model='ft_add', param='weight', filter='mlp')."""
    head, _, filt = text.partition("@")
    model, _, param = head.rpartition(".")
    if not param or (filt == "" and "@" in text):
        raise SearchSpaceError(f"search.space.{text}: write keys as [model.]parameter[@filter] (e.g. ft_add.weight)")
    return Key(text, model or None, param, filt or None)


def method_parameters(method: str) -> tuple[set[str], set[str]]:
    """(global parameter names, per-model parameter names) that `method` takes and uses."""
    from mergelib.methods import get_method

    spec = get_method(method)
    ignored = {name for name, _ in spec.ignored}
    names = [{f.alias or n for n, f in m.model_fields.items()} - ignored for m in (spec.params, spec.model_params)]
    return names[0], names[1]


def _takes(method: str, key: Key) -> bool:
    global_names, model_names = method_parameters(method)
    return key.param in model_names if key.model else key.param in global_names | model_names


class SearchSpace:
    """A SearchConfig's space bound to the base recipe (the one a trial's values edit)."""

    def __init__(self, config: SearchConfig, recipe: Mapping[str, Any], refs: Mapping[str, str] | None = None):
        self.recipe = copy.deepcopy(dict(recipe))
        self.refs = dict(refs or {})  # recipe reference -> where the input is (for checking corners on headers)
        self.dimensions: dict[str, Dimension] = {}
        self.fixed: dict[str, Any] = {}
        for key, value in config.space_items():
            (self.dimensions if isinstance(value, Dimension) else self.fixed)[key] = value
        method = self.dimensions.get(METHOD)
        if method is not None and method.choices is None:
            raise SearchSpaceError("search.space.method: give the methods as choices: [ties, dare_ties]")
        self.methods = tuple(method.choices) if method else (self.fixed.get(METHOD, self.recipe["merge_method"]),)
        self.keys = {k: parse_key(k) for k in [*self.dimensions, *self.fixed] if k != METHOD}
        self._validate()

    def _validate(self) -> None:
        from mergelib.methods import get_method

        for name in self.methods:
            try:
                get_method(str(name))
            except MergelibError as exc:
                raise SearchSpaceError(f"search.space.method: {str(exc).removeprefix('merge_method: ')}") from None
        labels = [model_label(m["model"]) for m in self.recipe.get("models") or []]
        for key in self.keys.values():
            if key.model is not None and key.model not in labels:
                raise SearchSpaceError(f"search.space.{key.text}: no model '{key.model}' in the recipe (models: "
                                       f"{', '.join(labels)}){did_you_mean(key.model, labels)}")
            if not any(_takes(str(m), key) for m in self.methods):
                taken = sorted(set().union(*(set().union(*method_parameters(str(m))) for m in self.methods)))
                raise SearchSpaceError(
                    f"search.space.{key.text}: {' and '.join(map(str, self.methods))} "
                    f"{'does' if len(self.methods) == 1 else 'do'} not take '{key.param}'"
                    f"{' per model' if key.model else ''} (takes: {', '.join(taken) or 'nothing'}); remove it"
                    f"{did_you_mean(key.param, taken)}")
        for name in self.methods:  # every corner of the space must make a valid recipe, checked on headers only
            for corner in ("low", "high"):
                self._check_recipe(self.corner(str(name), corner), str(name), corner)

    def _check_recipe(self, values: dict[str, Any], method: str, corner: str) -> None:
        from mergelib import plan_merge
        from mergelib.config.run import map_refs

        try:
            plan_merge(map_refs(self.recipe_for(values), self.refs))
        except MergelibError as exc:
            raise SearchSpaceError(f"search.space: with method {method} at the {corner} end of every range, the "
                                   f"recipe is invalid: {exc}") from None

    def corner(self, method: str, end: str) -> dict[str, Any]:
        """Trial values with every range at its `low` or `high` end (choices: the first)."""
        values: dict[str, Any] = {METHOD: method}
        for text, dim in self.dimensions.items():
            if text == METHOD or not _takes(method, self.keys[text]):
                continue
            value = dim.choices[0] if dim.choices is not None else getattr(dim, end)
            value = int(value) if dim.integer and dim.choices is None else value
            if dim.points:
                for i in range(dim.points):
                    values[f"{text}[{i}]"] = value
            else:
                values[text] = value
        return values

    def suggest(self, trial) -> dict[str, Any]:
        """Draw one trial's values (define-by-run: parameters the drawn method does not take are not drawn)."""
        values: dict[str, Any] = {}
        if METHOD in self.dimensions:
            values[METHOD] = trial.suggest_categorical(METHOD, list(self.methods))
        method = str(values.get(METHOD, self.methods[0]))
        for text, dim in self.dimensions.items():
            if text == METHOD or not _takes(method, self.keys[text]):
                continue
            names = [f"{text}[{i}]" for i in range(dim.points)] if dim.points else [text]
            for name in names:
                if dim.choices is not None:
                    values[name] = trial.suggest_categorical(name, list(dim.choices))
                elif dim.integer:
                    values[name] = trial.suggest_int(name, int(dim.low), int(dim.high), log=dim.log,
                                                     step=int(dim.step or 1))
                else:
                    values[name] = trial.suggest_float(name, dim.low, dim.high, log=dim.log, step=dim.step)
        return values

    def recipe_values(self) -> dict[str, Any] | None:
        """The base recipe as trial values (what the search enqueues first, so it starts from the recipe it was
        given and can only improve on it); None when the recipe lies outside the space (method or a value out of
        range, a parameter given as a list)."""
        method = str(self.recipe["merge_method"])
        if method not in map(str, self.methods):
            return None
        values: dict[str, Any] = {METHOD: method} if METHOD in self.dimensions else {}
        entries = {model_label(e["model"]): e.get("parameters") or {} for e in self.recipe.get("models") or []}
        top = self.recipe.get("parameters") or {}
        for text, dim in self.dimensions.items():
            if text == METHOD or not _takes(method, self.keys[text]):
                continue
            key = self.keys[text]
            if key.model:
                value = entries.get(key.model, {}).get(key.param, top.get(key.param))
            else:  # a top-level key: the recipe's top-level value, or the one every model gives
                each = {repr(p.get(key.param)) for p in entries.values()}
                value = top.get(key.param, next(iter(entries.values()), {}).get(key.param) if len(each) == 1 else None)
            if value is None:
                from mergelib.methods import get_method

                spec = get_method(method)
                fields = {f.alias or n: f for m in (spec.params, spec.model_params) for n, f in m.model_fields.items()}
                value = fields[key.param].default if key.param in fields else None
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                return None
            if dim.choices is not None:
                if value not in dim.choices:
                    return None
            elif not dim.low <= value <= dim.high:
                return None
            for name in ([f"{text}[{i}]" for i in range(dim.points)] if dim.points else [text]):
                values[name] = value
        return values

    def recipe_for(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The mergekit recipe of a trial: the base recipe with its method and searched parameters replaced;
        parameters the method does not take are left out (as the merge stage leaves out inactive knobs)."""
        recipe = copy.deepcopy(self.recipe)
        method = str(values.get(METHOD, self.fixed.get(METHOD, self.methods[0])))
        recipe["merge_method"] = method
        global_names, model_names = method_parameters(method)
        recipe["parameters"] = {k: v for k, v in (recipe.get("parameters") or {}).items()
                                if k in global_names | model_names}
        entries = {}
        for entry in recipe.get("models") or []:
            entry["parameters"] = {k: v for k, v in (entry.get("parameters") or {}).items() if k in model_names}
            entries[model_label(entry["model"])] = entry
        ordered = sorted(self.keys.values(), key=lambda k: (k.filter is not None, k.text))  # plain before filters
        for key in ordered:
            if not _takes(method, key):
                continue
            value = self._value(key.text, values)
            target = entries[key.model]["parameters"] if key.model else recipe["parameters"]
            if key.filter is None:
                target[key.param] = value
            else:
                current = target.get(key.param)
                rest = [e for e in current if isinstance(e, dict)] if isinstance(current, list) else []
                fallback = [e for e in rest if "filter" not in e] or (
                    [{"value": current}] if current is not None and not isinstance(current, list) else [])
                filters = [e for e in rest if "filter" in e] + [{"filter": key.filter, "value": value}]
                target[key.param] = filters + fallback
        for entry in recipe.get("models") or []:
            if not entry["parameters"]:
                del entry["parameters"]
        if not recipe["parameters"]:
            del recipe["parameters"]
        return recipe

    def _value(self, text: str, values: Mapping[str, Any]) -> Any:
        if text in self.fixed:
            return self.fixed[text]
        dim = self.dimensions[text]
        if dim.points:
            return [values[f"{text}[{i}]"] for i in range(dim.points)]
        return values[text]
