"""Planning, last step: the output's config.json, from the reference model's with the merge's layer count, the
per-layer lists of the layers it took, untied heads and the output dtype."""

from __future__ import annotations

from typing import Any

from mergelib.arch import ArchSpec
from mergelib.errors import InputModelError
from mergelib.merging.plan import InputModel, TensorJob


def _layer_lists(config: dict, n_layers: int) -> list[str]:
    return [k for k, v in config.items() if isinstance(v, list) and len(v) == n_layers and n_layers > 1]


def _at(config: dict, path: tuple[str, ...]) -> dict:
    """The nested config node at `path` (e.g. ("text_config",))."""
    for part in path:
        config = config[part]
    return config


def output_config(
    ref: InputModel,
    spec: ArchSpec,
    n_layers: int,
    origin: list[tuple[int, int]],
    models: list[InputModel],
    untied_head: bool,
    jobs: list[TensorJob],
) -> dict[str, Any]:
    """config.json of the output: `origin` is the (model, source layer) of each output layer."""
    config = dict(ref.config)
    config.pop("quantization_config", None)  # inputs are dequantised on read; the output is never quantised
    if n_layers != ref.num_layers:
        if not spec.num_layers_key:
            raise InputModelError(
                f"'{ref.label}': cannot set the layer count in config.json for an architecture without a spec "
                f"({config.get('architectures')}); add one under mergelib/arch/specs/"
            )
        node = config
        *parents, leaf = spec.num_layers_key.split(".")
        for part in parents:
            node[part] = dict(node[part])
            node = node[part]
        node[leaf] = n_layers
        nodes = [(config, ())] + ([(node, tuple(parents))] if parents else [])  # a VLM's lists sit in text_config
        for target, path in nodes:
            source = _at(ref.config, path)
            for key in _layer_lists(source, ref.num_layers):
                target[key] = [_at(models[m].config, path)[key][layer] for m, layer in origin]
    if untied_head and config.get("tie_word_embeddings"):
        config["tie_word_embeddings"] = False
    if jobs:  # transformers 5 reads `dtype`; `torch_dtype` is kept (updated) only where the input had it
        dtype_name = str(jobs[-1].dtype).removeprefix("torch.")
        config["dtype"] = dtype_name
        if "torch_dtype" in config:
            config["torch_dtype"] = dtype_name
    return config
