"""RegMean's statistics gathered layer by layer: the calibration sequences' hidden states go through one decoder
layer at a time (only that layer's weights in memory) while forward hooks on its nn.Linear modules add x^T x of
their inputs into float64 sums, sequence after sequence in order; the head's Gram comes from the final norm's
output when the checkpoint stores a head of its own."""

from __future__ import annotations

from pathlib import Path

import torch

from mergelib.calibration.layers import LayerwiseModel
from mergelib.calibration.store import statistics_file


class GramHooks:
    """Forward pre-hooks adding x^T x (float64) of each Linear's input into `sums[name]`."""

    def __init__(self, linears: dict[str, torch.nn.Linear]):
        self.sums = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64)
                     for name, m in linears.items()}
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in linears.items()]

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)  # [tokens, in]
            self.sums[name] += x.T @ x
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def gram_shapes(model: LayerwiseModel) -> dict[str, tuple[int, int]]:
    """Every Gram a model's file holds: each Linear of each layer, and the head unless tied."""
    shapes = {name: (m.in_features, m.in_features) for layer in model.layers
              for name, m in model.linear_modules(layer).items()}
    if not model.tied:
        shapes[model.head_name] = (model.head.in_features, model.head.in_features)
    return shapes


def embed_sequences(model: LayerwiseModel, sequences: list[torch.Tensor]) -> list[torch.Tensor]:
    """The embedding of each sequence, [1, T, H] float32."""
    with torch.no_grad(), model.loaded(model.embed) as embed:
        return [embed(ids.unsqueeze(0)) for ids in sequences]


def gather_grams(model: LayerwiseModel, sequences: list[torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write the Gram of every Linear input of `model` on `sequences` to `path` (see `store` for the format)."""
    hidden = embed_sequences(model, sequences)
    kwargs = [model.layer_kwargs(h) for h in hidden]
    with statistics_file(path, gram_shapes(model), metadata) as out, torch.no_grad():
        for index, layer in enumerate(model.layers):
            with model.loaded(layer) as live:
                hooks = GramHooks(model.linear_modules(live))
                try:
                    hidden = [model.run_layer(live, h, kw[index]) for h, kw in zip(hidden, kwargs)]
                finally:
                    hooks.remove()
            for name, total in hooks.sums.items():
                out.write(name, total.to(torch.float32))
        if not model.tied:
            with model.loaded(model.base.norm) as norm:
                total = torch.zeros(model.head.in_features, model.head.in_features, dtype=torch.float64)
                for h in hidden:
                    total += _gram(norm(h))
            out.write(model.head_name, total.to(torch.float32))


def _gram(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1]).to(torch.float64)
    return flat.T @ flat
