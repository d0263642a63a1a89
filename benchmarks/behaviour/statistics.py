"""Calibration statistics of a fine-tuned digits model for RegMean and Fisher merging, in the files their recipe
block `calibration: {statistics: {model: file}}` reads: per encoder Linear weight, the Gram matrix of its inputs
(sum of x x^T, float32 [in, in], kind "gram") or the diagonal Fisher (sum over samples of E_y~p(y|x) of the squared
gradient of log p(y|x) with respect to the weight, float32 in the weight's shape, kind "fisher").
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.func import functional_call, grad, vmap

from benchmarks.behaviour.digits import Classifier


def gram_file(model: Classifier, x: torch.Tensor, path: Path) -> Path:
    """Gram matrices of every encoder layer's input over the samples `x` (already transformed for the task)."""
    with torch.no_grad():
        inputs = model.layer_inputs(x)
    grams = {f"encoder.layers.{i}.weight": (a.T.double() @ a.double()).float().contiguous()
             for i, a in enumerate(inputs)}
    n = str(len(x))
    save_file(grams, str(path), metadata={"kind": "gram", "tokens": n, "samples": n})
    return path


def fisher_file(model: Classifier, x: torch.Tensor, path: Path) -> Path:
    """The exact diagonal Fisher of every encoder weight: for each sample, the squared per-class gradients of the
    log-likelihood weighted by the model's class probabilities, summed over samples."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def log_likelihood(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, p, (xi.unsqueeze(0),))
        return torch.log_softmax(logits, dim=1)[0].gather(0, yi.reshape(1))[0]  # no tensor index under vmap

    per_sample = vmap(grad(log_likelihood), in_dims=(None, 0, 0))
    with torch.no_grad():
        probs = torch.softmax(model(x), dim=1)  # [N, C]
    names = [f"encoder.layers.{i}.weight" for i in range(len(model.encoder.layers))]
    total = {name: torch.zeros_like(params[name], dtype=torch.float64) for name in names}
    for c in range(probs.shape[1]):
        grads = per_sample(params, x, torch.full((len(x),), c, dtype=torch.int64))
        for name in names:
            g2 = grads[name].double() ** 2  # [N, *weight shape]
            total[name] += (probs[:, c].double().view(-1, 1, 1) * g2).sum(dim=0)
    save_file({k: v.float().contiguous() for k, v in total.items()}, str(path),
              metadata={"kind": "fisher", "samples": str(len(x))})
    return path
