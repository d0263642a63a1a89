"""Fisher merging's statistics gathered layer by layer with exact gradients and one layer in memory.

Estimator (the empirical Fisher): for each calibration sequence s, l_s = sum over its positions t of
log p(token_{t+1} | tokens <= t), the labels being the data's own next tokens; the statistic of a parameter is
sum_s (d l_s / d theta)^2. (The paper's default samples the labels from the model instead; with real text as
calibration data the empirical form is the common choice for language models.)

How: a forward pass layer by layer stores each layer's input hidden states (on disk, beside the output); the
head gives d l_s / d h at the top; then, from the last layer down, each layer is materialised again, recomputed
from its stored input with autograd, and backpropagated with the incoming gradient, giving its parameters'
gradients and the gradient for the layer below. Per sequence, so the squares are of per-sequence gradients.
A tied embedding's gradient is the head's plus the lookup's, squared together.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from mergelib.calibration.gram import embed_sequences
from mergelib.calibration.layers import LayerwiseModel
from mergelib.calibration.store import statistics_file


def fisher_shapes(model: LayerwiseModel) -> dict[str, tuple[int, ...]]:
    """Every parameter the checkpoint stores: embeddings, each layer's, final norm, head (unless tied)."""
    shapes = {}
    for module in (model.embed, *model.layers, model.base.norm, model.head):
        for name, (_, param) in zip(model.tensor_names(module), module.named_parameters()):
            if name in model.tensors:
                shapes[name] = tuple(param.shape)
    return shapes


def _log_likelihood(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """sum_t log p(ids[t+1] | ids[:t+1]) for one sequence (logits [1, T, V], ids [T])."""
    return -F.cross_entropy(logits[0, :-1], ids[1:], reduction="sum")


def _top(model: LayerwiseModel, norm, head, hidden: torch.Tensor, ids: torch.Tensor, embed_weight=None):
    """The sequence's log-likelihood from the last layer's output (the head is the embedding when tied)."""
    x = norm(hidden)
    logits = F.linear(x, embed_weight) if embed_weight is not None else head(x)
    return _log_likelihood(logits, ids)


def gather_fisher(model: LayerwiseModel, sequences: list[torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write the diagonal empirical Fisher of every parameter of `model` on `sequences` to `path`."""
    with torch.no_grad():
        hidden = embed_sequences(model, sequences)
    kwargs = [model.layer_kwargs(h) for h in hidden]
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fisher-", dir=path.parent) as spill, \
            statistics_file(path, fisher_shapes(model), metadata) as out:
        # each layer's input hidden states go to disk on the way up and come back on the way down, so memory holds
        # one layer's activations, not every layer's
        inputs = [Path(spill) / f"layer{index}.pt" for index in range(len(model.layers))]
        with torch.no_grad():
            for index, layer in enumerate(model.layers):
                torch.save(hidden, inputs[index])
                with model.loaded(layer) as live:
                    hidden = [model.run_layer(live, h, kw[index]) for h, kw in zip(hidden, kwargs)]
        # the top: final norm and head, and the gradient each sequence sends into the last layer
        with model.loaded(model.base.norm, True) as norm, model.loaded(model.head, not model.tied) as head:
            params = dict(zip(model.tensor_names(norm), norm.parameters()))
            if not model.tied:
                params.update(zip(model.tensor_names(head), head.parameters()))
            grads, incoming = _per_sequence(params, hidden, lambda h, s: _top(model, norm, head, h, sequences[s]))
        _write(out, model, grads)
        for index in reversed(range(len(model.layers))):
            with model.loaded(model.layers[index], True) as live:
                params = dict(zip(model.tensor_names(live), live.parameters()))
                grads, incoming = _per_sequence(
                    params, torch.load(inputs[index], weights_only=True),
                    lambda h, s, index=index, above=incoming:
                        (model.run_layer(live, h, kwargs[s][index]) * above[s]).sum())
            inputs[index].unlink()
            _write(out, model, grads)
        # the embeddings: the lookup's gradient, plus the head's when they are one matrix
        with model.loaded(model.embed, True) as embed, model.loaded(model.base.norm) as norm:
            weight = embed.weight
            total = torch.zeros_like(weight, dtype=torch.float64)
            for s, ids in enumerate(sequences):
                objective = (embed(ids.unsqueeze(0)) * incoming[s]).sum()
                if model.tied:
                    objective = objective + _top(model, norm, None, hidden[s], ids, weight)
                (grad,) = torch.autograd.grad(objective, [weight])
                total += grad.to(torch.float64) ** 2
            out.write(model.embed_name, total.to(torch.float32))


def _per_sequence(params: dict[str, torch.Tensor], states: list[torch.Tensor], objective):
    """sum over sequences of squared d objective / d param (float64), and d objective / d input per sequence."""
    totals = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in params.items()}
    incoming = []
    for s, state in enumerate(states):
        h = state.detach().requires_grad_(True)
        grads = torch.autograd.grad(objective(h, s), [h, *params.values()], allow_unused=True)
        incoming.append(grads[0].detach())
        for name, grad in zip(params, grads[1:]):
            if grad is not None:
                totals[name] += grad.to(torch.float64) ** 2
    return totals, incoming


def _write(out, model: LayerwiseModel, grads: dict[str, torch.Tensor]) -> None:
    for name, total in grads.items():
        if name in model.tensors:
            out.write(name, total.to(torch.float32))
