"""`mergelib moe CONFIG OUT`: a sparse mixture of experts from dense models of one architecture (mergekit-moe).

Attention, norms and embeddings come from `base_model`; every layer's MLP from each expert; the router rows from
mergelib/moe/router.py. Outputs (`architecture` in the config), in the checkpoint names published models use:

- `mixtral` (Llama/Mistral inputs): `block_sparse_moe.gate`, `block_sparse_moe.experts.{e}.w1/w2/w3`.
- `qwen`, Qwen2-MoE (Llama/Mistral/Qwen2 inputs, one shared expert): `mlp.gate`, `mlp.experts.{e}.gate_proj/...`,
  `mlp.shared_expert.*` and its gate row `mlp.shared_expert_gate`.
- `qwen3`, Qwen3-MoE (Qwen3 inputs only: its attention normalises q and k per head, `q_norm`/`k_norm`): `mlp.gate`,
  `mlp.experts.{e}.*`; routed experts only, top-k weights renormalised (`norm_topk_prob`).
- `deepseek_v3`, DeepSeek-V3 (DeepSeek-V3 inputs dense in every layer; the MLA attention is copied as it is):
  every layer MoE (`first_k_dense_replace` 0), `mlp.gate.weight` in float32 (transformers keeps it so) with a zero
  `mlp.gate.e_score_correction_bias`, `mlp.experts.{e}.*`, and the ungated `mlp.shared_experts.*` (n_shared_experts
  1, as wide as a routed expert). One expert group (`n_group` = `topk_group` = 1) and `routed_scaling_factor` 1, so
  the routed weights sum to 1 as in the other outputs. DeepSeek-V3 scores experts with a sigmoid of the router row
  dot products where the others use a softmax; both rank experts alike, so the same router rows are used.

Unset, `architecture` follows the inputs: `qwen3` for Qwen3 models, `deepseek_v3` for DeepSeek-V3 ones, else
`qwen` with a shared expert and `mixtral` without. Tensors are streamed one at a time into planned shards and
committed atomically. mergekit-semantics.md section 2(b). On purpose unlike mergekit: `residual_scale` also scales
Mixtral experts' w2 (mergekit's check misses the renamed tensor); Llama experts with a shared expert build a
Qwen2-MoE (mergekit's crashes).
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from mergelib.config.recipe import ModelRef
from mergelib.errors import InputModelError, MergelibError
from mergelib.io.atomic import MARKER, check_output_dir, commit_dir, staging_dir
from mergelib.io.hashing import sha256_files
from mergelib.io.hub import resolve_model
from mergelib.io.index import ShardIndex, index_model, read_config
from mergelib.io.journal import plan_key
from mergelib.io.reader import read_tensor
from mergelib.io.writer import ShardFile, TensorSlot, shard_names, write_index
from mergelib.merging.rng import generator_for
from mergelib.moe.config import Expert, MoEConfig, load_moe_config
from mergelib.moe.router import degenerate_layers, gate_vectors

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
INPUT_TYPES = {"mixtral": ("llama", "mistral"), "qwen": ("llama", "mistral", "qwen2"), "qwen3": ("qwen3",),
               "deepseek_v3": ("deepseek_v3",)}
CLASS_NAMES = {"mixtral": "MixtralForCausalLM", "qwen": "Qwen2MoeForCausalLM", "qwen3": "Qwen3MoeForCausalLM",
               "deepseek_v3": "DeepseekV3ForCausalLM"}
AUTO_ARCH = {"qwen3": "qwen3", "deepseek_v3": "deepseek_v3"}  # input model_type -> output when unset
WHY_INPUTS = {  # why an output takes only its own family
    "qwen3": "Qwen3 attention normalises q and k per head; the base lacks q_norm/k_norm",
    "deepseek_v3": "DeepSeek-V3 attention is multi-head latent attention (q_a_proj, kv_a_proj_with_mqa, ...); "
                   "the base has none",
}
MLP = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
KEPT_LAYER = {"self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
              "self_attn.o_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight"}
QKV_BIAS = {"self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"}
QK_NORM = {"self_attn.q_norm.weight", "self_attn.k_norm.weight"}
NORMS = {"input_layernorm.weight", "post_attention_layernorm.weight"}
KEPT_OTHER = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
MIXTRAL_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")


@dataclass(frozen=True)
class _Model:
    ref: ModelRef
    path: Path
    config: dict
    index: ShardIndex


@dataclass(frozen=True)
class _Out:
    """One output tensor and how to make it."""

    slot: TensorSlot
    make: Callable[[], torch.Tensor]


@dataclass(frozen=True)
class MoEResult:
    """What `build_moe` wrote."""

    out_dir: Path
    architecture: str  # MixtralForCausalLM | Qwen2MoeForCausalLM | Qwen3MoeForCausalLM | DeepseekV3ForCausalLM
    n_experts: int
    n_tensors: int
    bytes_written: int
    seconds: float
    notes: tuple[str, ...]


def _load(ref: ModelRef) -> _Model:
    path = resolve_model(ref.path, ref.revision)
    if ref.lora:
        from mergelib.lora.apply import lora_input

        path = lora_input(path, ref.lora)
    return _Model(ref, path, read_config(path), index_model(path))


def _resolve(cfg: MoEConfig, base: _Model) -> MoEConfig:
    """`cfg` with `architecture` set (from the base's model type when unset), validated again for that output."""
    if cfg.architecture is not None:
        return cfg
    arch = AUTO_ARCH.get(base.config.get("model_type"), cfg.output_architecture)
    return load_moe_config({**cfg.model_dump(), "architecture": arch})


def _input_hint(arch: str, kind: str) -> str:
    """Why a `kind` model cannot go into an `arch` output, and what would take it."""
    if arch in WHY_INPUTS:
        return f" ({WHY_INPUTS[arch]})"
    if kind in AUTO_ARCH:
        return f"; use architecture {AUTO_ARCH[kind]} for {kind} inputs"
    return "; add one shared_experts entry for a Qwen2-MoE output" if arch == "mixtral" and kind == "qwen2" else ""


def _check_dense(m: _Model) -> None:
    """DeepSeek-V3 inputs must have a dense MLP in every layer (their MoE layers cannot become one expert)."""
    n, k = m.config.get("num_hidden_layers"), m.config.get("first_k_dense_replace", 0)
    if k is None or k < n:
        raise InputModelError(
            f"'{m.ref}' has MoE layers from layer {k} (first_k_dense_replace {k}, {n} layers); DeepSeek-V3 inputs "
            "must be dense in every layer (first_k_dense_replace >= num_hidden_layers)"
        )


def _check_shared(cfg: MoEConfig, base: _Model, shared: _Model | None) -> None:
    """A DeepSeek-V3 shared expert is n_shared_experts x moe_intermediate_size wide: as wide as a routed expert."""
    if shared is None or cfg.output_architecture != "deepseek_v3":
        return
    width, routed = shared.config.get("intermediate_size"), base.config.get("intermediate_size")
    if width != routed:
        raise InputModelError(
            f"shared_experts[0] '{shared.ref}' has intermediate_size {width} but the routed experts have {routed}; "
            "a DeepSeek-V3 shared expert is moe_intermediate_size wide, so they must match"
        )


def _check_inputs(cfg: MoEConfig, base: _Model, experts: list[_Model], shared: _Model | None,
                  allow_all_same: bool) -> None:
    arch = cfg.output_architecture
    experts = experts + ([shared] if shared else [])
    kinds = {str(m.ref): m.config.get("model_type") for m in (base, *experts)}
    if len(set(kinds.values())) > 1:
        listed = ", ".join(f"{k}: {v}" for k, v in kinds.items())
        raise InputModelError(f"MoE inputs must share one architecture, got {listed}")
    kind = kinds[str(base.ref)]
    if kind not in INPUT_TYPES[arch]:
        raise InputModelError(f"base_model '{base.ref}' is a {kind} model; a {arch} MoE takes "
                              f"{', '.join(INPUT_TYPES[arch])}{_input_hint(arch, kind)}")
    if arch == "deepseek_v3":
        for m in (base, *experts):
            _check_dense(m)
    _check_shared(cfg, base, shared)
    routed = [str(e.source_model) for e in cfg.experts]
    if len(routed) > 1 and len(set(routed)) == 1 and not allow_all_same:
        raise InputModelError(
            "every expert is the same model, so the MoE computes what the dense model does at a higher cost; pass "
            "--i-understand-this-is-not-useful-without-training to build it for training anyway"
        )
    for m in experts:
        for name, info in m.index.tensors.items():
            if MLP.match(name):
                ref_info = base.index.tensors.get(name)
                if ref_info is None or ref_info.shape != info.shape:
                    got = list(ref_info.shape) if ref_info is not None else "missing"
                    raise InputModelError(
                        f"expert '{m.ref}': {name} is {list(info.shape)} but {got} in the base; experts and base "
                        "must have the same size"
                    )
            elif ".mlp." in name:
                raise InputModelError(f"expert '{m.ref}': {name} cannot be placed in an MoE expert (no MLP biases)")
        n = base.config.get("num_hidden_layers")
        missing = [f"model.layers.{i}.mlp.{p}.weight" for i in range(n) for p in MIXTRAL_NAMES
                   if f"model.layers.{i}.mlp.{p}.weight" not in m.index.tensors]
        if missing:
            raise InputModelError(f"expert '{m.ref}': {missing[0]} is missing; experts need every layer's MLP")


def _output_config(cfg: MoEConfig, base: _Model, shared: _Model | None, dtype: torch.dtype, qkv_bias: bool):
    from transformers import DeepseekV3Config, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    arch = cfg.output_architecture
    fields = {k: v for k, v in base.config.items()
              if k not in ("architectures", "model_type", "transformers_version", "_name_or_path", "auto_map")}
    fields["dtype"] = str(dtype).removeprefix("torch.")
    fields.pop("torch_dtype", None)
    n_experts, top_k, width = len(cfg.experts), cfg.experts_per_token, base.config["intermediate_size"]
    if arch == "mixtral":
        out = MixtralConfig(**fields, num_local_experts=n_experts, num_experts_per_tok=top_k)
    elif arch == "qwen":
        fields.pop("layer_types", None)  # recomputed for the new sliding-window settings
        out = Qwen2MoeConfig(
            **{**fields, "use_sliding_window": False, "sliding_window": None},
            num_experts=n_experts, num_experts_per_tok=top_k, decoder_sparse_step=1, norm_topk_prob=True,
            mlp_only_layers=[], qkv_bias=qkv_bias, moe_intermediate_size=width,
            shared_expert_intermediate_size=shared.config["intermediate_size"],
        )
    elif arch == "qwen3":
        fields.pop("layer_types", None)
        out = Qwen3MoeConfig(**{**fields, "num_experts": n_experts, "num_experts_per_tok": top_k,
                                "moe_intermediate_size": width, "decoder_sparse_step": 1, "mlp_only_layers": [],
                                "norm_topk_prob": True})
    else:
        out = DeepseekV3Config(**{**fields, "n_routed_experts": n_experts, "num_experts_per_tok": top_k,
                                  "moe_intermediate_size": width, "n_shared_experts": 1, "first_k_dense_replace": 0,
                                  "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0,
                                  "norm_topk_prob": True})
    out.architectures = [CLASS_NAMES[arch]]
    return out


def _expert_tensor(model: _Model, name: str, expert: Expert, out_name: str, seed: int, dtype: torch.dtype):
    def make() -> torch.Tensor:
        tensor = read_tensor(name, model.index.tensors[name])
        if expert.noise_scale or (expert.residual_scale is not None and name.endswith("down_proj.weight")):
            tensor = tensor.float()
            if expert.noise_scale:
                noise = torch.randn(tensor.shape, generator=generator_for(seed, f"moe/noise/{out_name}"))
                tensor = tensor + noise * expert.noise_scale
            if expert.residual_scale is not None and name.endswith("down_proj.weight"):
                tensor = tensor * expert.residual_scale
        return tensor.to(dtype)

    return make


def _plan(cfg: MoEConfig, base: _Model, experts: list[_Model], shared: _Model | None, gates: torch.Tensor,
          dtype: torch.dtype, seed: int) -> tuple[list[_Out], bool]:
    """Every output tensor in layer order, and whether the attention has q/k/v biases."""
    arch = cfg.output_architecture
    n_layers = base.config["num_hidden_layers"]
    per_layer: dict[int, list[_Out]] = {i: [] for i in range(n_layers)}
    head: list[_Out] = []
    tail: list[_Out] = []
    qkv = {name for name in base.index.tensors if (m := LAYER.match(name)) and m.group(2) in QKV_BIAS}
    if qkv and arch == "mixtral":
        raise InputModelError(f"base_model '{base.ref}': Mixtral attention has no biases ({sorted(qkv)[0]})")

    def copy(name: str) -> _Out:
        info = base.index.tensors[name]
        return _Out(TensorSlot(name, info.shape, dtype), lambda: read_tensor(name, info).to(dtype))

    for name in sorted(base.index.tensors):
        layer = LAYER.match(name)
        if MLP.match(name) or name.endswith("rotary_emb.inv_freq"):
            continue
        if layer and _kept(arch, layer.group(2)):
            per_layer[int(layer.group(1))].append(copy(name))
        elif name in KEPT_OTHER:
            (head if "embed" in name else tail).append(copy(name))
        else:
            raise InputModelError(f"base_model '{base.ref}': tensor {name} has no place in a {arch} MoE")
    for i in range(n_layers):
        per_layer[i] += _router(arch, i, gates[i, : len(cfg.experts)].contiguous(), dtype)
        prefix = f"model.layers.{i}."
        for e, (expert, model) in enumerate(zip(cfg.experts, experts)):
            for proj, short in MIXTRAL_NAMES.items():
                name = f"{prefix}mlp.{proj}.weight"
                out_name = (f"{prefix}block_sparse_moe.experts.{e}.{short}.weight" if arch == "mixtral"
                            else f"{prefix}mlp.experts.{e}.{proj}.weight")
                slot = TensorSlot(out_name, model.index.tensors[name].shape, dtype)
                per_layer[i].append(_Out(slot, _expert_tensor(model, name, expert, out_name, seed, dtype)))
        if shared is not None:
            module = "shared_experts" if arch == "deepseek_v3" else "shared_expert"
            for proj in MIXTRAL_NAMES:
                name = f"{prefix}mlp.{proj}.weight"
                out_name = f"{prefix}mlp.{module}.{proj}.weight"
                slot = TensorSlot(out_name, shared.index.tensors[name].shape, dtype)
                per_layer[i].append(_Out(slot, _expert_tensor(shared, name, cfg.shared_experts[0], out_name, seed,
                                                              dtype)))
        if shared is not None and arch == "qwen":
            row = gates[i, len(cfg.experts):].contiguous()  # (1, hidden)
            slot = TensorSlot(prefix + "mlp.shared_expert_gate.weight", tuple(row.shape), dtype)
            per_layer[i].append(_Out(slot, lambda r=row: r.to(dtype)))
    return head + [o for i in range(n_layers) for o in per_layer[i]] + tail, bool(qkv)


def _kept(arch: str, rest: str) -> bool:
    """Whether the base's layer tensor `rest` (name after `model.layers.N.`) is copied into an `arch` output."""
    if arch == "deepseek_v3":
        return rest.startswith("self_attn.") or rest in NORMS  # MLA, as it is
    return rest in KEPT_LAYER or rest in QKV_BIAS or (arch == "qwen3" and rest in QK_NORM)


def _router(arch: str, layer: int, rows: torch.Tensor, dtype: torch.dtype) -> list[_Out]:
    """Layer `layer`'s router from its (experts, hidden) rows; DeepSeek-V3's in float32 with a zero score bias."""
    prefix = f"model.layers.{layer}."
    if arch == "mixtral":
        return [_Out(TensorSlot(prefix + "block_sparse_moe.gate.weight", tuple(rows.shape), dtype),
                     lambda: rows.to(dtype))]
    if arch != "deepseek_v3":
        return [_Out(TensorSlot(prefix + "mlp.gate.weight", tuple(rows.shape), dtype), lambda: rows.to(dtype))]
    bias = (rows.shape[0],)
    return [_Out(TensorSlot(prefix + "mlp.gate.weight", tuple(rows.shape), torch.float32), lambda: rows.float()),
            _Out(TensorSlot(prefix + "mlp.gate.e_score_correction_bias", bias, torch.float32),
                 lambda: torch.zeros(bias, dtype=torch.float32))]


def _shards(outs: list[_Out], limit: int) -> dict[str, list[_Out]]:
    groups: list[list[_Out]] = [[]]
    size = 0
    for out in outs:
        if groups[-1] and size + out.slot.nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(out)
        size += out.slot.nbytes
    return dict(zip(shard_names(len(groups)), groups))


def _out_dtype(cfg: MoEConfig, base: _Model) -> torch.dtype:
    name = cfg.dtype or base.config.get("dtype") or base.config.get("torch_dtype")
    if name in DTYPES:
        return DTYPES[name]
    return next(iter(base.index.tensors.values())).dtype


def build_moe(config: MoEConfig | dict | str | Path, out_dir: str | Path, *, seed: int = 0,
              out_shard_size: int = 5_000_000_000, batch_size: int = 16, allow_all_same: bool = False,
              copy_tokenizer: bool = True) -> MoEResult:
    """Build the MoE that `config` describes into `out_dir` (replaced only on success)."""
    started = time.perf_counter()
    cfg = load_moe_config(config)
    out_dir = Path(out_dir)
    check_output_dir(out_dir)
    cache: dict[str, _Model] = {}

    def model(ref: ModelRef) -> _Model:
        if str(ref) not in cache:
            cache[str(ref)] = _load(ref)
        return cache[str(ref)]

    base = model(cfg.base_model)
    cfg = _resolve(cfg, base)
    experts = [model(e.source_model) for e in cfg.experts]
    shared = model(cfg.shared_experts[0].source_model) if cfg.shared_experts else None
    _check_inputs(cfg, base, experts, shared, allow_all_same)
    n_layers, hidden = base.config["num_hidden_layers"], base.config["hidden_size"]
    embed_info = base.index.tensors.get("model.embed_tokens.weight")
    embed = None
    if cfg.gate_mode == "cheap_embed" and embed_info is not None:
        embed = read_tensor("model.embed_tokens.weight", embed_info)
    gates = gate_vectors(cfg, base.path, num_layers=n_layers, hidden=hidden, seed=seed, batch_size=batch_size,
                         embed=embed)
    del embed
    notes = []
    if cfg.output_architecture == "deepseek_v3" and cfg.shared_experts[0].positive_prompts:
        notes.append("shared_experts[0].positive_prompts are unused: the DeepSeek-V3 shared expert has no gate")
    bad = degenerate_layers(gates[:, : len(cfg.experts)])
    if bad and cfg.gate_mode not in ("random", "uniform_random"):
        notes.append(f"layers {bad} have near-dependent router rows (condition number > 5): the prompts are too "
                     "alike and some experts will rarely be chosen")
    dtype = _out_dtype(cfg, base)
    outs, qkv_bias = _plan(cfg, base, experts, shared, gates, dtype, seed)
    out_config = _output_config(cfg, base, shared, dtype, qkv_bias)
    files = sorted({info.file for m in cache.values() for info in m.index.tensors.values()})
    hashes: dict[str, str] = {}
    hasher = threading.Thread(target=lambda: hashes.update(sha256_files(files)), name="mergelib-hash", daemon=True)
    hasher.start()
    key = plan_key([cfg.model_dump_json(), str(seed), str(out_shard_size)]
                   + [f"{p.resolve()}|{p.stat().st_size}|{p.stat().st_mtime_ns}" for p in files])
    staged = staging_dir(out_dir, key)
    for stale in staged.iterdir():  # left by an interrupted run: this builder does not resume
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink()
    shards = _shards(outs, out_shard_size)
    try:
        metadata = {"format": "pt"}
        for fname, group in shards.items():
            shard = ShardFile(staged / fname, [o.slot for o in group], metadata)
            try:
                for out in group:
                    shard.write(out.slot.name, out.make().contiguous())
            finally:
                shard.close()
        write_index(staged, {f: [o.slot for o in g] for f, g in shards.items()}, {})
        out_config.save_pretrained(staged)
        if copy_tokenizer:
            for name in TOKENIZER_FILES:
                if (base.path / name).is_file():
                    shutil.copyfile(base.path / name, staged / name)
        dumped = cfg.model_dump(mode="json", exclude_defaults=True)
        (staged / "mergekit_moe_config.yml").write_text(yaml.safe_dump(_refs_as_strings(dumped), sort_keys=False))
        hasher.join()
        record = {
            "kind": "moe", "seed": seed, "architecture": out_config.architectures[0], "config": dumped,
            "inputs": {str(m.ref): {str(f.relative_to(m.path)): hashes[str(f)] for f in m.index.files}
                       for m in cache.values()},
        }
        (staged / MARKER).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        commit_dir(staged, out_dir)
    except MergelibError:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return MoEResult(out_dir, out_config.architectures[0], len(cfg.experts), len(outs),
                     sum(o.slot.nbytes for o in outs), time.perf_counter() - started, tuple(notes))


def _refs_as_strings(value):
    if isinstance(value, dict):
        if "path" in value and set(value) <= {"path", "revision", "lora"}:
            return str(ModelRef(**value))
        return {k: _refs_as_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_refs_as_strings(v) for v in value]
    return value
