"""The `search` node of the pipeline config (conf/search/): space, objective, budget, sampler, storage, executor.

Validated like the rest of RunConfig (unknown keys, empty ranges and unknown samplers fail before anything starts);
whether each searched parameter fits the recipe's method(s) is checked by mergelib.search.space.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Scalar = float | int | str | bool


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Dimension(_Frozen):
    """One searched parameter: a range (`low`, `high`, optional `log`/`step`/`integer`), a list of `choices`, or a
    gradient over the layers (`points` values in the range, mergekit's list syntax)."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = Field(default=None, gt=0)
    integer: bool = False
    choices: tuple[Scalar, ...] | None = None
    points: int | None = Field(default=None, ge=2, le=16)

    @model_validator(mode="after")
    def _one_kind(self) -> Dimension:
        if self.choices is not None:
            if not self.choices:
                raise ValueError("choices is empty; give at least one value")
            if self.low is not None or self.high is not None or self.points is not None:
                raise ValueError("give either choices or a range (low, high), not both")
            return self
        if self.low is None or self.high is None:
            raise ValueError("a range needs both low and high (or give choices)")
        if not self.low < self.high:
            raise ValueError(f"empty range: low {self.low} must be below high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0 (got {self.low})")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined")
        return self


class Objective(_Frozen):
    """What a trial maximises: exact match on the validation prompts of `tasks` (task -> weight)."""

    tasks: dict[str, float] = Field(min_length=1)
    limit: int | None = Field(default=None, ge=1)  # validation prompts per task; None: all (200 for demo tasks)
    normalise: bool = True  # divide each task's score by the best parent's (the share of the skill kept)
    aggregate: Literal["mean", "min", "pareto"] = "mean"  # weighted mean, worst task, or one objective per task
    # task -> the least score (a share of the best parent's when normalising) a recipe must keep to be chosen;
    # the sampler steers toward trials that keep it (Optuna's constraints)
    floor: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _weights(self) -> Objective:
        for task, weight in self.tasks.items():
            if not weight > 0:
                raise ValueError(f"tasks.{task}: weight {weight} must be above 0")
        for task in self.floor:
            if task not in self.tasks:
                raise ValueError(f"floor.{task}: not an objective task ({', '.join(self.tasks)}); add it to tasks")
        return self


class Resources(_Frozen):
    """What one trial asks of a Ray worker (Ray places tasks by it)."""

    cpus: float = Field(default=1, gt=0)
    gpus: float = Field(default=0, ge=0)
    memory_mb: int = Field(default=2048, ge=64)


class SearchConfig(_Frozen):
    """Everything `python -m stages.search` and `mergelib search` take besides the base recipe."""

    study: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]+$")  # None: search-<family>
    storage: str | None = None  # an RDB URL; None: sqlite:///<project>/optuna.db, beside mlflow.db
    sampler: Literal["tpe", "cmaes", "random", "nsga2"] = "tpe"
    seed: int = Field(default=0, ge=0)
    trials: int | None = Field(default=30, ge=1)  # finished trials (complete, pruned or failed with an error)
    timeout_s: float | None = Field(default=None, gt=0)  # wall time of this invocation
    pruner: Literal["median", "none"] = "median"
    prune_after: float = Field(default=0.25, gt=0, lt=1)  # share of the prompts scored before a pruning decision
    startup_trials: int = Field(default=5, ge=0)  # trials before the median pruner may prune
    executor: Literal["serial", "ray"] = "serial"
    workers: int = Field(default=2, ge=1)  # trials in flight at once (ray)
    resources: Resources = Resources()
    merge: Literal["auto", "memory", "disk"] = "auto"  # auto: in memory when the recipe and the inputs allow it
    heartbeat_s: int = Field(default=10, ge=1)  # a running trial whose heartbeat is 3x older was lost
    threads: int = Field(default=1, ge=1)  # torch threads per trial
    objective: Objective
    space: dict[str, Dimension | Scalar] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> SearchConfig:
        if self.trials is None and self.timeout_s is None:
            raise ValueError("give a budget: trials, timeout_s or both")
        pareto = self.objective.aggregate == "pareto"
        if self.sampler == "cmaes" and pareto:
            raise ValueError("sampler cmaes optimises one objective; use tpe, nsga2 or random for a Pareto front")
        if self.sampler == "cmaes" and self.objective.floor:
            raise ValueError("sampler cmaes takes no constraints (objective.floor); use tpe, nsga2 or random")
        if self.sampler == "nsga2" and not pareto:
            raise ValueError("sampler nsga2 is for objective.aggregate=pareto; use tpe, cmaes or random")
        return self

    @property
    def pareto(self) -> bool:
        return self.objective.aggregate == "pareto"

    def space_items(self) -> list[tuple[str, Dimension | Any]]:
        """(key, dimension or fixed value), in a fixed order."""
        return sorted(self.space.items())


def validate_search(data: Any, source: str) -> SearchConfig:
    """A SearchConfig from plain data; ConfigError with one line naming the key (`source: search.sampler: ...`)."""
    from pydantic import ValidationError

    from mergelib.errors import ConfigError

    try:
        return SearchConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in ("search", *err["loc"]))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            raise ConfigError(f"{source}: unknown key '{key}'; remove it or fix its name") from None
        got = f" (got {err['input']!r})" if not isinstance(err.get("input"), (dict, list)) else ""
        raise ConfigError(f"{source}: {key}: {msg}{got}") from None


def load_search_file(path: str | Path) -> tuple[dict[str, Any], SearchConfig]:
    """(recipe, search) from a `mergelib search` file: `recipe:` (a mergekit recipe, or the path of one, relative to
    the file) and `search:` (conf/search/'s schema)."""
    from mergelib.config.textfile import CONFIG_LIMIT, read_text, yaml_documents
    from mergelib.errors import ConfigError

    path = Path(path)
    docs = yaml_documents(read_text(path, "the search config", ConfigError, limit=CONFIG_LIMIT), str(path), ConfigError)
    data = docs[0] if len(docs) == 1 else None
    if not isinstance(data, dict) or set(data) - {"recipe", "search"} or not {"recipe", "search"} <= set(data):
        raise ConfigError(f"{path}: a search config is one mapping with `recipe:` (a mergekit recipe or its path) and "
                          "`search:` (space, objective, budget: see conf/search/demo.yaml)")
    recipe = data["recipe"]
    if isinstance(recipe, str):
        recipe_path = (path.parent / recipe) if not Path(recipe).is_absolute() else Path(recipe)
        docs = yaml_documents(read_text(recipe_path, "the recipe", ConfigError, limit=CONFIG_LIMIT), str(recipe_path),
                              ConfigError)
        recipe = docs[0] if len(docs) == 1 else None
    if not isinstance(recipe, dict):
        raise ConfigError(f"{path}: recipe: give one mergekit recipe (a mapping with merge_method), or its path")
    from mergelib.config.recipe import load_recipe

    load_recipe(recipe)  # RecipeError, one line, before anything starts
    return recipe, validate_search(data["search"], str(path))
