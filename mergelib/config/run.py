"""RunConfig: the composed pipeline config (params.yaml) validated into one frozen object.

Stages hand a RunConfig to mergelib functions; nothing below the stage runner sees a Hydra DictConfig.
The `merge` node is a mergekit recipe (mergelib.config.recipe) whose knobs are interpolated by conf/.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergelib.config.compose import ConfigError
from mergelib.config.recipe import DType, load_recipe
from mergelib.errors import RecipeError

KNOBS = ("density", "weight", "t")  # top-level knobs fed into merge.parameters; dropped where a method lacks them
MISSING = "???"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputEntry(_Frozen):
    """One fine-tune of a family, in mergekit's `models:` entry shape."""

    model: str = Field(min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)


class ModelsConfig(_Frozen):
    """Which family to merge: the demo family (built offline), Hub ids (`org/name@sha`) or local directories."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    source: Literal["demo", "hub", "local"]
    size: str = "tiny"  # demo family only
    seed: int = 0  # demo family only
    base: str = Field(min_length=1)
    finetunes: tuple[InputEntry, ...] = Field(min_length=1)

    def refs(self) -> tuple[str, ...]:
        """The base then every fine-tune, as written in conf/."""
        return (self.base, *(entry.model for entry in self.finetunes))


class PathsConfig(_Frozen):
    """Where each stage writes, relative to the repository root."""

    models: str
    merged: str
    tokenizer: str
    export: str
    publish: str
    reports: str

    @property
    def lock(self) -> str:
        """The fetch lock file: resolved revisions and sha256 of every input file."""
        return f"{self.models}/lock.json"


class EvalConfig(_Frozen):
    """The quick evaluation: perplexity of fixed texts and greedy continuations of fixed prompts."""

    suite: str
    texts: tuple[str, ...] = Field(min_length=1)
    prompts: tuple[str, ...] = ()
    max_new_tokens: int = Field(default=8, ge=0, le=512)


class ExportConfig(_Frozen):
    """What the export stage writes."""

    format: Literal["safetensors"]
    dtype: DType
    shard_size: int = Field(gt=0)


class PublishConfig(_Frozen):
    """Where the export goes: nowhere (a manifest of what would be uploaded) or a Hub repo."""

    target: Literal["none", "hub"]
    repo_id: str | None = None
    revision: str = "main"
    private: bool = True

    @model_validator(mode="after")
    def _repo(self) -> PublishConfig:
        if self.target == "hub" and not self.repo_id:
            raise ValueError("publish=hub needs a repository: add publish.repo_id=you/merged-model")
        return self


class RunConfig(_Frozen):
    """Everything a pipeline stage needs, validated before any stage does work."""

    method: str
    density: float = Field(ge=0.0, le=1.0)
    weight: float
    t: float
    seed: int = Field(ge=0)
    dtype: DType
    paths: PathsConfig
    models: ModelsConfig
    eval: EvalConfig
    export: ExportConfig
    publish: PublishConfig
    merge: dict[str, Any]

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        from mergelib.methods import get_method

        try:
            get_method(value)
        except RecipeError as exc:
            raise ValueError(str(exc).removeprefix("merge_method: ")) from None
        return value

    @model_validator(mode="after")
    def _recipe_valid(self) -> RunConfig:
        if self.models.source == "demo":  # mergelib.testing.tiny.make_family's layout: base, ft1..ftN
            n = len(self.models.finetunes)
            keys = ("models.base", *(f"models.finetunes[{i}].model" for i in range(n)))
            built = (f"{self.paths.models}/base", *(f"{self.paths.models}/ft{k}" for k in range(1, n + 1)))
            for key, ref, want in zip(keys, self.models.refs(), built):
                if ref != want:
                    raise ValueError(f"{key}: the demo family builds '{want}', not '{ref}'; use that path")
        try:
            load_recipe(self.recipe())
        except RecipeError as exc:
            raise ValueError(f"merge node: {str(exc).removeprefix('recipe: ')}") from None
        return self

    def recipe(self, model_refs: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The merge node as the engine should see it: knobs the method lacks removed, references mapped."""
        from mergelib.methods import get_method

        spec = get_method(self.merge.get("merge_method", self.method))
        taken = {f.alias or n for m in (spec.params, spec.model_params) for n, f in m.model_fields.items()}
        recipe = _mapped(self.merge, dict(model_refs or {}))
        params = recipe.get("parameters")
        if isinstance(params, dict):
            recipe["parameters"] = {k: v for k, v in params.items() if k not in KNOBS or k in taken}
        return recipe

    def input_refs(self) -> tuple[str, ...]:
        """Every model reference the run needs: the family, then any other the recipe names."""
        refs = list(self.models.refs())
        for ref in _recipe_refs(self.merge):
            if ref not in refs:
                refs.append(ref)
        return tuple(refs)


_REF_KEYS = ("base_model", "model", "tokenizer_source")


def _mapped(node: Any, refs: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {
            k: refs.get(v, v) if k in _REF_KEYS and isinstance(v, str) else _mapped(v, refs) for k, v in node.items()
        }
    if isinstance(node, list):
        return [refs.get(v, v) if isinstance(v, str) and refs.get(v) else _mapped(v, refs) for v in node]
    return node


def _recipe_refs(node: Any) -> list[str]:
    out: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("base_model", "model") and isinstance(value, str):
                out.append(value)
            else:
                out.extend(_recipe_refs(value))
    elif isinstance(node, list):
        for value in node:
            out.extend(_recipe_refs(value))
    return out


def _missing(node: Any, where: str = "") -> str | None:
    if isinstance(node, dict):
        for key, value in node.items():
            found = _missing(value, f"{where}.{key}" if where else str(key))
            if found:
                return found
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found = _missing(value, f"{where}[{i}]")
            if found:
                return found
    elif node == MISSING:
        return where
    return None


def _location(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out


def run_config(data: Mapping[str, Any], source: str = "params.yaml") -> RunConfig:
    """Validate composed config data; ConfigError with one line naming the key and the fix."""
    # the merge node repeats interpolated values: name the key the user sets (models.base), not its copy
    ordered = {k: v for k, v in data.items() if k != "merge"} | {k: v for k, v in data.items() if k == "merge"}
    where = _missing(ordered)
    if where:
        raise ConfigError(f"{source}: '{where}' is required but not set (???); give it, e.g. {where}=VALUE")
    try:
        return RunConfig.model_validate(dict(data))
    except ValidationError as exc:
        err = exc.errors()[0]
        key = _location(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            raise ConfigError(f"{source}: unknown key '{key}'; remove it or fix its name in conf/") from None
        if err["type"] == "missing":
            raise ConfigError(f"{source}: '{key}' is missing; add it to conf/ (or params.yaml)") from None
        if err["type"] == "value_error":  # our validators' messages already say what to do
            raise ConfigError(f"{source}: {key + ': ' if key else ''}{msg}") from None
        got = f" (got {err['input']!r})" if not isinstance(err.get("input"), (dict, list)) else ""
        raise ConfigError(f"{source}: {key}: {msg}{got}; fix it in conf/ or override {key}=VALUE") from None
