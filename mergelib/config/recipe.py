"""The merge recipe: mergekit's YAML schema, strict (unknown keys are errors that suggest the close match).

See ../shared/reference/mergekit-semantics.md section 2(d). Differences from mergekit, on purpose: unknown keys,
unknown parameter names, a model listed twice, and a global parameter set per model are errors, not ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from mergelib.config.textfile import CONFIG_LIMIT, looks_like_path, read_text, yaml_documents
from mergelib.errors import RecipeError, did_you_mean

DTYPE_NAMES = ("bfloat16", "float16", "float32")
DType = Literal["bfloat16", "float16", "float32"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelRef(_Strict):
    """A model: a local directory or a Hub id, with an optional revision (`org/name@rev`)."""

    path: str
    revision: str | None = None
    lora: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            return cls.parse(value)
        if isinstance(value, dict) and "model" in value and isinstance(value["model"], dict):
            inner = dict(value["model"])  # mergekit's dict form {model: {path, revision}, lora: ...}
            if value.get("lora") is not None:
                inner["lora"] = value["lora"] if isinstance(value["lora"], str) else value["lora"].get("path")
            return inner
        return value

    @staticmethod
    def parse(text: str) -> dict:
        """Split `path[@revision][+lora]` into its parts."""
        text = text.strip()
        if not text:
            raise ValueError("empty model reference")
        if text.count("+") > 1:
            raise ValueError(f"'{text}': more than one '+' (use path[@revision][+lora_path])")
        main, _, lora = text.partition("+")
        if main.count("@") > 1:
            raise ValueError(f"'{text}': more than one '@' (use path[@revision])")
        path, _, revision = main.partition("@")
        return {"path": path, "revision": revision or None, "lora": lora or None}

    def __str__(self) -> str:
        text = self.path + (f"@{self.revision}" if self.revision else "")
        return text + (f"+{self.lora}" if self.lora else "")


ParamValue = bool | int | float | str | list[Any]
ParamDict = dict[str, ParamValue]


class InputModel(_Strict):
    """One entry of `models:`."""

    model: ModelRef
    parameters: ParamDict = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _bare(cls, value: Any) -> Any:
        return {"model": value} if isinstance(value, str) else value


class SliceSource(_Strict):
    """One source of an output slice: a model and a half-open layer range."""

    model: ModelRef
    layer_range: tuple[int, int]
    parameters: ParamDict = Field(default_factory=dict)

    @field_validator("layer_range")
    @classmethod
    def _range(cls, value: tuple[int, int]) -> tuple[int, int]:
        if value[0] < 0 or value[1] < value[0]:
            raise ValueError(f"layer_range {list(value)} must be [start, end) with 0 <= start <= end")
        return value


class Slice(_Strict):
    """One output slice of a `slices:` recipe (a frankenmerge or a partial-range merge)."""

    sources: list[SliceSource] = Field(min_length=1)
    base_model: ModelRef | None = None
    parameters: ParamDict = Field(default_factory=dict)
    residual_weight: float | None = None  # parsed for compatibility; mergekit does not use it either


class ModelTokenSource(_Strict):
    """`{kind: model_token, model, token | token_id}`: take the row of another token (or id) of a model."""

    kind: Literal["model_token"]
    model: ModelRef
    token: str | None = None
    token_id: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _one_of(self) -> ModelTokenSource:
        if (self.token is None) == (self.token_id is None):
            raise ValueError("model_token: give exactly one of 'token' or 'token_id'")
        return self


class ZeroSource(_Strict):
    """`{kind: zero}`: a zero row."""

    kind: Literal["zero"]


def _token_source_kind(value: Any) -> str:
    if isinstance(value, dict) and "kind" in value:
        return str(value["kind"])
    return getattr(value, "kind", "model")  # a model reference (string or mapping) has no kind


TokenSource = Annotated[
    Annotated[ModelTokenSource, Tag("model_token")] | Annotated[ZeroSource, Tag("zero")]
    | Annotated[ModelRef, Tag("model")],
    Discriminator(_token_source_kind, custom_error_type="token_source",
                  custom_error_message="a token source is a model, {kind: model_token, ...} or {kind: zero}"),
]


class TokenEmbedding(_Strict):
    """One entry of `tokenizer.tokens`: where the token's embedding row comes from."""

    source: TokenSource | None = None
    force: bool = False  # also replace the rows of models that have the token


class TransplantConfig(_Strict):
    """`tokenizer.transplant`: give every input whose vocabulary differs from the source's that tokenizer first
    (`mergelib tokensurgeon`, the same options by their tokensurgeon names), so models with different vocabularies
    merge row for row. A bare string names the approximation method: `transplant: omp`."""

    approximation_method: Literal["omp", "common_interpolation", "subword", "mean", "zero", "randn"] = "omp"
    k: int = Field(64, ge=1)
    cosine_similarity: bool = False
    weight_scheme: Literal["distance_proportional", "barycentric", "least_squares"] = "distance_proportional"
    subword_method: Literal["mean", "sum", "weighted_mean", "first_last"] = "mean"
    prefix_match: Literal["no", "yes", "embed", "lm_head"] = "no"
    byte_match: Literal["no", "yes", "embed", "lm_head"] = "no"
    new_vocab_noise: float = Field(0.0, ge=0.0, allow_inf_nan=False)
    new_vocab_scale: float = Field(1.0, gt=0.0, allow_inf_nan=False)
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _method_name(cls, value: Any) -> Any:
        return {"approximation_method": value} if isinstance(value, str) else value


class TokenizerConfig(_Strict):
    """The `tokenizer:` block (assembled vocabulary); see mergelib/tokenizer."""

    source: str = "union"
    tokens: dict[str, TokenEmbedding] | None = None
    pad_to_multiple_of: int | None = Field(default=None, ge=1)
    transplant: TransplantConfig | None = None

    @model_validator(mode="after")
    def _transplant_source(self) -> TokenizerConfig:
        if self.transplant is not None and self.source == "union":
            raise ValueError("transplant: gives the models one donor's tokenizer, so 'source' must name it "
                             "('base' or a model path), not union")
        return self


class LinesConfig(_Strict):
    """LiNeS (arXiv:2410.17146): the merged task vector of a layer at relative depth d in [0, 1] is scaled by
    alpha + beta * d (embeddings at depth 0, the final norm and head at depth 1)."""

    alpha: float = Field(allow_inf_nan=False)
    beta: float = Field(allow_inf_nan=False)


class CalibrationConfig(_Strict):
    """The `calibration:` block of data-aware methods (regmean, regmean_plus_plus, fisher): either texts to gather
    statistics from (`data`, a jsonl file with a "text" field per line, and how many tokens to take), or
    precomputed statistics files per model (`statistics`: model as written in the recipe -> .safetensors)."""

    data: str | None = None
    tokens: int = Field(default=2048, ge=1)
    seed: int = 0
    sequence_length: int = Field(default=256, ge=2)
    statistics: dict[str, str] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> CalibrationConfig:
        if (self.data is None) == (self.statistics is None):
            raise ValueError("give exactly one of 'data' (a jsonl of texts) or 'statistics' (precomputed files)")
        return self


class MergeRecipe(_Strict):
    """A mergekit-compatible merge recipe."""

    merge_method: str
    base_model: ModelRef | None = None
    models: list[InputModel] | None = None
    slices: list[Slice] | None = None
    parameters: ParamDict = Field(default_factory=dict)
    dtype: DType | None = None
    out_dtype: DType | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerConfig | None = None
    chat_template: str | None = None
    name: str | None = None
    lines: LinesConfig | None = None  # mergelib's own: LiNeS depth scaling of the merged task vectors
    calibration: CalibrationConfig | None = None  # mergelib's own: data for methods that need statistics

    @field_validator("dtype", "out_dtype", mode="before")
    @classmethod
    def _dtype_name(cls, value: Any) -> Any:
        return value.removeprefix("torch.") if isinstance(value, str) else value

    @model_validator(mode="after")
    def _shape(self) -> MergeRecipe:
        from mergelib.methods import get_method  # late: the registry imports every method module

        if (self.models is None) == (self.slices is None):
            raise ValueError("give exactly one of 'models' or 'slices'")
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give 'tokenizer_source' or 'tokenizer', not both")
        method = get_method(self.merge_method)
        _check_parameter_names(self, method)
        if self.lines is not None and method.base != "required":
            raise ValueError(f"lines: scales merged task vectors, so it needs a task-vector method with a base_model "
                             f"({self.merge_method} has none); use e.g. task_arithmetic, ties or dare_ties")
        _check_calibration(self, method)
        if self.models is not None:
            seen: dict[str, int] = {}
            for i, entry in enumerate(self.models):
                key = str(entry.model)
                if key in seen:
                    raise ValueError(f"models[{i}]: '{key}' is already models[{seen[key]}]; list each model once")
                seen[key] = i
        return self

    def to_yaml(self) -> str:
        """The recipe as YAML (only the fields that are set, model references as strings)."""
        data = self.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
        return yaml.safe_dump(_refs_to_strings(data), sort_keys=False)


def _refs_to_strings(value: Any) -> Any:
    if isinstance(value, dict):
        if "path" in value and set(value) <= {"path", "revision", "lora"}:
            return str(ModelRef(**value))
        return {k: _refs_to_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_refs_to_strings(v) for v in value]
    return value


def _check_calibration(recipe: MergeRecipe, method) -> None:
    """A calibration block exactly when the method needs statistics."""
    if method.statistics is not None and recipe.calibration is None:
        raise ValueError(f"calibration: {method.name} needs statistics from data; add e.g. "
                         "calibration: {data: texts.jsonl, tokens: 2048}")
    if method.statistics is None and recipe.calibration is not None:
        raise ValueError(f"calibration: {method.name} uses no statistics; remove the block "
                         "(it is for regmean, regmean_plus_plus and fisher)")
    if method.statistics_flow == "merged" and recipe.slices is not None:
        raise ValueError(f"slices: {method.name} runs the calibration data through the merged layers in order; "
                         "give 'models:' (all layers) instead")
    given = (recipe.calibration.statistics or {}) if recipe.calibration is not None else {}
    if given:
        listed = [str(e.model) for e in recipe.models or []]
        listed += [str(s.model) for piece in recipe.slices or [] for s in piece.sources]
        for key in given:
            if key not in listed:
                raise ValueError(
                    f"calibration.statistics: '{key}' is not a model of the recipe{did_you_mean(key, listed)}")
        missing = [m for m in dict.fromkeys(listed) if m not in given]
        if missing:
            raise ValueError(f"calibration.statistics: no statistics file for model '{missing[0]}'; give one per model")


def _field_names(model: type[BaseModel]) -> set[str]:
    return {f.alias or name for name, f in model.model_fields.items()}


def _parameter_levels(recipe: MergeRecipe) -> list[tuple[str, dict, bool]]:
    """(where, parameters, per_model) for every parameters block of the recipe; per-model blocks take only
    per-model parameters."""
    levels: list[tuple[str, dict, bool]] = [("parameters", recipe.parameters, False)]
    for i, entry in enumerate(recipe.models or []):
        levels.append((f"models[{i}].parameters", entry.parameters, True))
    for i, piece in enumerate(recipe.slices or []):
        levels.append((f"slices[{i}].parameters", piece.parameters, False))
        for j, src in enumerate(piece.sources):
            levels.append((f"slices[{i}].sources[{j}].parameters", src.parameters, True))
    return levels


def ignored_parameters(recipe: MergeRecipe) -> dict[str, str]:
    """Parameters the recipe sets that its method accepts but does not use: name -> why (MethodSpec.ignored)."""
    from mergelib.methods import get_method

    reasons = dict(get_method(recipe.merge_method).ignored)
    return {key: reasons[key] for _, params, _ in _parameter_levels(recipe) for key in params if key in reasons}


def _check_parameter_names(recipe: MergeRecipe, method) -> None:
    global_names = _field_names(method.params)
    model_names = _field_names(method.model_params)
    known = global_names | model_names
    levels = [(where, params, model_names if per_model else known)
              for where, params, per_model in _parameter_levels(recipe)]
    for where, params, allowed in levels:
        for key in params:
            if key in allowed:
                continue
            if key in global_names:
                raise ValueError(
                    f"{where}.{key}: '{key}' is a global parameter of {method.name} (one value per tensor); "
                    "set it in the top-level or slice parameters"
                )
            hint = did_you_mean(key, known)
            listed = ", ".join(sorted(known)) or "none"
            raise ValueError(f"{where}.{key}: unknown parameter for {method.name}{hint}; it takes: {listed}")


def _location(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after[_shape()]",) or "[" in str(part):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


_ALL_KEYS = set().union(
    *(_field_names(m) for m in (MergeRecipe, InputModel, SliceSource, Slice, TokenizerConfig, TokenEmbedding,
                              ModelTokenSource, ModelRef, CalibrationConfig)),
    {"model", "lora", "filter", "value"},
)


def recipe_error(exc: ValidationError, source: str = "recipe") -> RecipeError:
    """One line for the first problem pydantic found, naming the field and the fix."""
    errors = exc.errors()
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])  # a typo explains a "missing"
    where = _location(err["loc"])
    if err["type"] == "extra_forbidden":
        key = str(err["loc"][-1])
        return RecipeError(f"{source}: unknown key '{where}'{did_you_mean(key, _ALL_KEYS)}")
    if err["type"] == "missing":
        return RecipeError(f"{source}: missing required key '{where}'")
    msg = err["msg"].removeprefix("Value error, ")
    return RecipeError(f"{source}: {where + ': ' if where else ''}{msg}")


def _documents(source: str | Path | dict) -> tuple[str, list]:
    """(label for messages, the YAML documents) of a file path, a YAML string or a dict. A Path, or a one-line
    string naming a file that exists (or ending in .yml/.yaml), is read as a file whatever its extension."""
    label = "recipe"
    if isinstance(source, Path) or (isinstance(source, str) and looks_like_path(source)):
        label = str(source)
        source = read_text(source, "the recipe", RecipeError, CONFIG_LIMIT)
    if not isinstance(source, str):
        return label, [source]
    return label, yaml_documents(source, label, RecipeError)


def _validate(doc: object, label: str) -> MergeRecipe:
    if not isinstance(doc, dict):
        raise RecipeError(f"{label}: a recipe is a mapping with 'merge_method' and 'models' or 'slices'")
    try:
        return MergeRecipe.model_validate(doc)
    except RecipeError as exc:
        raise RecipeError(f"{label}: {exc}") from None
    except ValidationError as exc:
        raise recipe_error(exc, label) from None


def load_recipe(source: str | Path | dict | MergeRecipe) -> MergeRecipe:
    """A validated recipe from a YAML file, a YAML string, a dict or a recipe; RecipeError on any problem."""
    if isinstance(source, MergeRecipe):
        return source
    label, docs = _documents(source)
    if len(docs) != 1:
        raise RecipeError(f"{label}: expected one YAML document with a recipe, found {len(docs)}")
    return _validate(docs[0], label)


def load_recipes(source: str | Path | dict | MergeRecipe) -> list[MergeRecipe]:
    """Every recipe of a (possibly multi-document, `---`-separated) YAML file or string, validated, in document
    order; errors name the document (`recipe.yml: document 2: ...`). A mergekit-multi file is one of these."""
    if isinstance(source, MergeRecipe):
        return [source]
    label, docs = _documents(source)
    if not docs:
        raise RecipeError(f"{label}: no recipe found (the file is empty)")
    if len(docs) == 1:
        return [_validate(docs[0], label)]
    return [_validate(doc, f"{label}: document {i + 1}") for i, doc in enumerate(docs)]
