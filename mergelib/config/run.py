"""RunConfig: the composed pipeline config (params.yaml) validated into one frozen object.

Stages hand a RunConfig to mergelib functions; nothing below the stage runner sees a Hydra DictConfig.
The `merge` node is a mergekit recipe (mergelib.config.recipe) whose knobs are interpolated by conf/.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergelib.config.recipe import DType, load_recipe
from mergelib.errors import ConfigError, RecipeError
from mergelib.search.config import SearchConfig

KNOBS = ("density", "weight", "t")  # top-level knobs fed into merge.parameters; dropped where a method lacks them
MISSING = "???"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputEntry(_Frozen):
    """One fine-tune of a family, in mergekit's `models:` entry shape."""

    model: str = Field(min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)


BUILT_FAMILIES = ("demo", "tiny", "smollm2")  # families the fetch stage builds offline (base + ft_<skill> / ftN)


class ModelsConfig(_Frozen):
    """Which family to merge: the trained demo family (`demo`, mergelib.families.demo), the seeded tiny family
    (`tiny`, mergelib.families.tiny), Hub ids (`org/name@sha`) or local directories. Both built families are made
    offline by the fetch stage."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    source: Literal["demo", "tiny", "smollm2", "hub", "local"]
    size: str = "tiny"  # tiny family only
    seed: int = Field(default=0, ge=0)  # built families only
    quick: bool = False  # demo/smollm2 families only: train briefly (tests), no quality bar
    base: str = Field(min_length=1)
    finetunes: tuple[InputEntry, ...] = Field(min_length=1)

    def refs(self) -> tuple[str, ...]:
        """The base then every fine-tune, as written in conf/."""
        return (self.base, *(entry.model for entry in self.finetunes))

    def skills(self) -> tuple[str, ...]:
        """The demo skills the fine-tunes name (`.../ft_add` -> `add`), in order."""
        return tuple(entry.model.rsplit("/", 1)[-1].removeprefix("ft_") for entry in self.finetunes)


class PathsConfig(_Frozen):
    """Where each stage writes, relative to the repository root."""

    models: str
    merged: str
    tokenizer: str
    export: str
    publish: str
    reports: str
    search: str = "outputs/search"

    @property
    def lock(self) -> str:
        """The fetch lock file: resolved revisions and sha256 of every input file."""
        return f"{self.models}/lock.json"


class EvalConfig(_Frozen):
    """lm-eval tasks (mergelib.pipeline.evaluate) on the merged model and, cached once per family, on its parents."""

    suite: str
    tasks: tuple[str, ...] = Field(min_length=1)  # shipped demo_* tasks or any lm-eval task name
    limit: int | None = Field(default=None, ge=1)  # documents per task; None: all
    parents: bool = True  # also score the base and every fine-tune (cached), for the comparison
    batch_size: int = Field(default=32, ge=1)
    threads: int | None = Field(default=None, ge=1)  # torch threads while evaluating; None: torch's default


class ExportConfig(_Frozen):
    """What the export stage writes (mergelib.export.export_all); every export is verified by reading it back."""

    format: str  # the conf/export/ option, for reports
    safetensors: tuple[DType, ...] = ()
    gguf: tuple[Literal["f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"], ...] = ()  # K-quants: llamacpp extra
    int8: bool = False
    verify: bool = True
    shard_size: int = Field(gt=0)

    @property
    def enabled(self) -> bool:
        """Whether anything is exported (export=none: no)."""
        return bool(self.safetensors or self.gguf or self.int8)


class PublishConfig(_Frozen):
    """Where the merge goes: nowhere (what would be uploaded, a dry run), a Hub repo, or the MLflow registry."""

    target: Literal["none", "hub", "mlflow"]
    repo_id: str | None = None  # hub (and the dry run's would-be repo)
    revision: str = "main"
    private: bool = True
    version: str | None = "0.1.0"  # tag v<version> on the Hub commit / registry version
    tag: str | None = None  # an explicit tag instead of v<version>
    exports: bool = True  # upload the export stage's artifacts next to the model
    model_name: str | None = None  # mlflow registered model name; None: mergelib-<models.name>
    aliases: tuple[str, ...] = ()  # mlflow aliases that move (champion)

    @model_validator(mode="after")
    def _repo(self) -> PublishConfig:
        if self.target == "hub" and not self.repo_id:
            raise ValueError("publish=hub needs a repository: add publish.repo_id=you/merged-model")
        if self.version is None and self.tag is None:
            raise ValueError("publish: give publish.version=1.0.0 or publish.tag=NAME")
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
    merge_executor: Literal["local", "ray"] = "local"  # ray: each output shard a Ray task (same bytes)
    merge_workers: int | None = Field(default=None, ge=1)  # shard tasks at once on a local Ray; None: the cores
    merge_device: str = Field(default="cpu", pattern=r"^(cpu|cuda(:\d+)?)$")  # where the merge math runs
    recipe_file: str | None = None  # a mergekit recipe YAML merged instead of the `merge` node (outputs/search/best.yml)
    sweep: dict[str, tuple[str, ...]] | None = None  # experiment=method_sweep: label -> Hydra overrides
    moe: dict[str, Any] | None = None  # experiment=moe_demo: a mergekit-moe config (mergelib.moe.config)
    search: SearchConfig | None = None  # conf/search/: what stages.search tunes (mergelib.search)

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
        if self.models.source in BUILT_FAMILIES:
            self._check_built_layout()
        try:
            load_recipe(self.recipe())
        except RecipeError as exc:
            where = "recipe_file" if self.recipe_file else "merge node"
            raise ValueError(f"{where}: {str(exc).removeprefix('recipe: ')}") from None
        return self

    def merge_node(self) -> dict[str, Any]:
        """The recipe as configured: the file `recipe_file` names (one mergekit recipe), else the `merge` node."""
        if not self.recipe_file:
            return self.merge
        from mergelib.config.textfile import CONFIG_LIMIT, read_text, yaml_documents

        docs = yaml_documents(read_text(self.recipe_file, "the recipe", RecipeError, limit=CONFIG_LIMIT),
                              self.recipe_file, RecipeError)
        if len(docs) != 1 or not isinstance(docs[0], dict):
            raise RecipeError(f"{self.recipe_file}: give one mergekit recipe (a mapping with merge_method)")
        return docs[0]

    def _check_built_layout(self) -> None:
        """A built family's references are the directories the fetch stage makes: base and ft1..ftN (tiny), base
        and ft_<skill> for known skills (demo)."""
        n, root, kind = len(self.models.finetunes), self.paths.models, self.models.source
        keys = ("models.base", *(f"models.finetunes[{i}].model" for i in range(n)))
        if kind == "tiny":
            built = (f"{root}/base", *(f"{root}/ft{k}" for k in range(1, n + 1)))
        else:
            from mergelib.families.demo_data import SKILLS

            skills = self.models.skills()
            for key, ref, skill in zip(keys[1:], self.models.refs()[1:], skills):
                if skill not in SKILLS or skills.count(skill) > 1:
                    raise ValueError(f"{key}: the demo family builds {root}/ft_<skill> once per skill "
                                     f"({', '.join(SKILLS)}), not '{ref}'")
            built = (f"{root}/base", *(f"{root}/ft_{s}" for s in skills))
        for key, ref, want in zip(keys, self.models.refs(), built):
            if ref != want:
                raise ValueError(f"{key}: the {kind} family builds '{want}', not '{ref}'; use that path")

    def recipe(self, model_refs: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The merge node as the engine should see it: knobs that do not act on the method (`inactive_knobs`)
        removed, references mapped."""
        recipe = map_refs(self.merge_node(), dict(model_refs or {}))
        params = recipe.get("parameters")
        if isinstance(params, dict) and not self.recipe_file:
            inactive = self.inactive_knobs()
            recipe["parameters"] = {k: v for k, v in params.items() if k not in inactive}
        return recipe

    def inactive_knobs(self) -> dict[str, Any]:
        """The top-level knobs (density, weight, t) in the merge node's parameters that its method lacks or
        accepts and ignores (task_arithmetic and density): knob -> value. The merge stage says they were left out."""
        from mergelib.methods import get_method

        spec = get_method(self.merge.get("merge_method", self.method))
        taken = {f.alias or n for m in (spec.params, spec.model_params) for n, f in m.model_fields.items()}
        taken -= {name for name, _ in spec.ignored}
        params = self.merge.get("parameters")
        if not isinstance(params, dict) or self.recipe_file:
            return {}
        return {k: v for k, v in params.items() if k in KNOBS and k not in taken}

    def input_refs(self) -> tuple[str, ...]:
        """Every model reference the run needs: the family, then any other the recipe names."""
        refs = list(self.models.refs())
        for ref in _recipe_refs(self.merge_node()):
            if ref not in refs:
                refs.append(ref)
        return tuple(refs)


_REF_KEYS = ("base_model", "model", "tokenizer_source")


def map_refs(node: Any, refs: Mapping[str, str]) -> Any:
    """A recipe (or any node of one) with its model references replaced through `refs` (unknown ones kept)."""
    if isinstance(node, dict):
        return {
            k: refs.get(v, v) if k in _REF_KEYS and isinstance(v, str) else map_refs(v, refs) for k, v in node.items()
        }
    if isinstance(node, list):
        return [refs.get(v, v) if isinstance(v, str) and refs.get(v) else map_refs(v, refs) for v in node]
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
