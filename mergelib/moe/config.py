"""The `mergelib moe` config: mergekit-moe's YAML schema, strict (unknown keys are errors that suggest a match).

See ../shared/reference/mergekit-semantics.md section 2(b), `mergekit-moe`. Differences on purpose: unknown keys
are errors; `uniform_random` needs no prompts (mergekit asks for them and ignores them); a config whose experts all
share one prompt set is refused for every prompt-based gate mode, as in mergekit.

`architecture` picks the output: `mixtral` (no shared expert), `qwen` (Qwen2-MoE, one shared expert with prompts:
it has a gate), `qwen3` (Qwen3-MoE, no shared expert) or `deepseek_v3` (one shared expert, ungated, so it needs no
prompts). Unset, the builder chooses from the shared experts and the inputs' model type (mergelib/moe/build.py).
mergekit's `Deepseek MoE` (DeepseekForCausalLM from Llama experts) is not written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergelib.config.recipe import DType, ModelRef
from mergelib.config.textfile import CONFIG_LIMIT, read_text, yaml_documents
from mergelib.errors import RecipeError, did_you_mean

GateMode = Literal["hidden", "hidden_last", "hidden_avg", "cheap_embed", "random", "uniform_random"]
PROMPT_MODES = ("hidden", "hidden_last", "hidden_avg", "cheap_embed")
ARCHITECTURES = ("mixtral", "qwen", "qwen3", "deepseek_v3")
SHARED = {"mixtral": 0, "qwen": 1, "qwen3": 0, "deepseek_v3": 1}  # shared experts each output has
GATED_SHARED = ("qwen",)  # outputs whose shared expert has a router row (so needs prompts)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Expert(_Strict):
    """A dense model whose MLP becomes one expert of every layer."""

    source_model: ModelRef
    positive_prompts: list[str] = Field(default_factory=list)
    negative_prompts: list[str] = Field(default_factory=list)
    noise_scale: float | None = Field(default=None, ge=0)  # std of Gaussian noise added to the expert's weights
    residual_scale: float | None = None  # multiplies the expert's down_proj (its contribution to the residual)

    @field_validator("positive_prompts", "negative_prompts", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return [] if value is None else value

    @field_validator("positive_prompts", "negative_prompts")
    @classmethod
    def _non_blank(cls, value: list[str]) -> list[str]:
        if any(not p.strip() for p in value):
            raise ValueError("a prompt is empty; remove it or write the text that should route to this expert")
        return value


class MoEConfig(_Strict):
    """A sparse mixture of experts built from dense models of one architecture and size."""

    base_model: ModelRef  # attention, norms and embeddings; also computes the router rows (gate_mode hidden)
    experts: list[Expert] = Field(min_length=1)
    gate_mode: GateMode = "hidden"
    dtype: DType | None = None
    experts_per_token: int = Field(default=2, ge=1)
    shared_experts: list[Expert] = Field(default_factory=list)
    architecture: str | None = None

    @field_validator("shared_experts", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return [] if value is None else value

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_name(cls, value: Any) -> Any:
        return value.removeprefix("torch.") if isinstance(value, str) else value

    @field_validator("architecture")
    @classmethod
    def _architecture(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return _architecture_name(value)

    @model_validator(mode="after")
    def _consistent(self) -> MoEConfig:
        if self.experts_per_token > len(self.experts):
            raise ValueError(
                f"experts_per_token is {self.experts_per_token} but there are {len(self.experts)} experts; "
                "lower it or add experts"
            )
        if len(self.shared_experts) > 1:
            raise ValueError("shared_experts: at most one shared expert (Qwen2-MoE or DeepSeek-V3) is supported")
        if self.architecture == "qwen3" and self.shared_experts:
            raise ValueError("shared_experts: a Qwen3-MoE output has routed experts only; remove shared_experts")
        if self.architecture is not None and SHARED[self.architecture] != len(self.shared_experts):
            need = "one entry in shared_experts" if SHARED[self.architecture] else "no shared_experts"
            raise ValueError(f"architecture '{self.architecture}' needs {need}")
        if self.architecture == "deepseek_v3" and len(self.experts) < 2:
            raise ValueError("experts: a DeepSeek-V3 output needs at least 2 routed experts (its router ranks groups "
                             "by their top-2 scores)")
        if self.gate_mode in PROMPT_MODES:
            gated = self.shared_experts if self.architecture in GATED_SHARED else []  # unset: checked once resolved
            for where, group in (("experts", self.experts), ("shared_experts", gated)):
                for i, expert in enumerate(group):
                    if not expert.positive_prompts:
                        raise ValueError(
                            f"{where}[{i}].positive_prompts: gate_mode '{self.gate_mode}' needs example prompts "
                            "for every expert (or use gate_mode: random)"
                        )
            sets = {(tuple(e.positive_prompts), tuple(e.negative_prompts)) for e in self.experts}
            if len(self.experts) > 1 and len(sets) == 1:
                raise ValueError(
                    "experts: every expert has the same prompts, so the router cannot tell them apart; give each "
                    "expert prompts of what it should handle"
                )
        return self

    @property
    def output_architecture(self) -> str:
        """`architecture` if set; otherwise `mixtral` without a shared expert, `qwen` (Qwen2-MoE) with one."""
        if self.architecture is not None:
            return self.architecture
        return "qwen" if self.shared_experts else "mixtral"


def _architecture_name(value: str) -> str:
    """The canonical output name of `value`: mergekit's names ("Qwen MoE"), model types ("qwen3_moe") and class
    names ("DeepseekV3ForCausalLM") are accepted."""
    name = "".join(ch for ch in value.strip().lower() if ch.isalnum())
    if name.startswith("mixtral"):
        return "mixtral"
    if name.startswith("qwen3"):
        return "qwen3"
    if name.startswith("qwen"):
        return "qwen"  # "qwen", "Qwen MoE" (mergekit's name), "qwen2_moe"
    if name.startswith("deepseekv3"):
        return "deepseek_v3"
    if name.startswith("deepseek"):
        raise ValueError(f"'{value}' is not written by this version (mergekit's Deepseek MoE takes Llama experts); "
                         "use deepseek_v3 for a DeepSeek-V3 MoE from dense DeepSeek-V3 models")
    hint = did_you_mean(value.strip().lower(), ARCHITECTURES)
    raise ValueError(f"'{value}' is not an output architecture this version writes{hint}; use one of "
                     f"{', '.join(ARCHITECTURES)}")


_KEYS = {f.alias or n for m in (MoEConfig, Expert) for n, f in m.model_fields.items()}


def _where(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in str(part) or str(part).startswith("function-"):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


def load_moe_config(source: str | Path | dict | MoEConfig) -> MoEConfig:
    """A validated MoE config from a YAML file, a dict or a config; RecipeError (one line) on any problem."""
    if isinstance(source, MoEConfig):
        return source
    label = "moe config"
    if isinstance(source, (str, Path)):
        label = str(source)
        docs = yaml_documents(read_text(source, "the MoE config", RecipeError, CONFIG_LIMIT), label, RecipeError)
        if len(docs) > 1:
            raise RecipeError(f"{label}: expected one YAML document with an MoE config, found {len(docs)}")
        source = docs[0] if docs else None
    if not isinstance(source, dict):
        raise RecipeError(f"{label}: an MoE config is a mapping with 'base_model' and 'experts'")
    try:
        return MoEConfig.model_validate(source)
    except ValidationError as exc:
        errors = exc.errors()
        err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
        where = _where(err["loc"])
        if err["type"] == "extra_forbidden":
            hint = did_you_mean(str(err["loc"][-1]), _KEYS)
            raise RecipeError(f"{label}: unknown key '{where}'{hint}") from None
        if err["type"] == "missing":
            raise RecipeError(f"{label}: missing required key '{where}'") from None
        msg = err["msg"].removeprefix("Value error, ")
        raise RecipeError(f"{label}: {where + ': ' if where else ''}{msg}") from None
