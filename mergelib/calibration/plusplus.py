"""RegMean++'s statistics (Nguyen et al. 2025, arXiv:2508.03121): gathering and merging interleave layer by layer.

The paper's rule: the input features of layer l for candidate i are X_i^(l) = f_M^(l-1)(X_i^(l-1)), the previous
*merged* layer applied to the features that reached it (RegMean uses the candidate's own layer f_i^(l-1)); inside
layer l, each candidate's Linear inputs come from running that candidate's layer l on X^(l). The embeddings are
merged first (plain average, as the reference implementation does) and give X^(0). With one calibration set shared
by all models, X^(l) is the same stream for every candidate, so one stream is kept: for each layer, every model's
layer l is run on it with Gram hooks, layer l is merged from those Grams (through the engine, so it is exactly the
layer the output will hold, rounded to the output dtype), and the stream moves on through the merged layer.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from mergelib.calibration.gram import GramHooks, gram_shapes
from mergelib.calibration.layers import LayerwiseModel
from mergelib.calibration.store import MemoryStore, statistics_file


def _merged_tensor(plan, jobs: dict, name: str, store, seed: int) -> torch.Tensor:
    """Output tensor `name` as the engine computes it with the statistics in `store`."""
    from mergelib.merging.engine import compute  # late: the engine imports the methods, which import nothing here

    got: dict[int, torch.Tensor] = {}
    compute(replace(plan, statistics=store), jobs[name], seed, lambda start, rows: got.__setitem__(start, rows))
    return got[0].to(torch.float32)


def gather_merged_grams(plan, sequences: list[torch.Tensor], paths: dict[int, Path], metadata: dict[str, str],
                        seed: int = 0) -> None:
    """Write each model's RegMean++ Grams on `sequences` to `paths[model index]`."""
    models = [LayerwiseModel(m) for m in plan.models]
    ref = models[plan.donor]
    jobs = {job.name: job for job in plan.jobs}
    with torch.no_grad(), ExitStack() as stack:
        outs = {i: stack.enter_context(statistics_file(paths[i], gram_shapes(m), metadata))
                for i, m in enumerate(models)}
        embedding = _merged_tensor(plan, jobs, ref.embed_name, MemoryStore("gram", {}), seed)
        hidden = [F.embedding(ids.unsqueeze(0), embedding) for ids in sequences]
        kwargs = [ref.layer_kwargs(h) for h in hidden]
        for index in range(len(ref.layers)):
            grams: dict[tuple[int, str], torch.Tensor] = {}
            for i, model in enumerate(models):
                with model.loaded(model.layers[index]) as live:
                    hooks = GramHooks(model.linear_modules(live))
                    try:
                        for h, kw in zip(hidden, kwargs):
                            model.run_layer(live, h, kw[index])
                    finally:
                        hooks.remove()
                for name, total in hooks.sums.items():
                    stored = total.to(torch.float32)  # what the file holds, so the final merge sees the same
                    outs[i].write(name, stored)
                    grams[(i, name)] = stored
            store = MemoryStore("gram", grams)
            layer = ref.layers[index]
            source = lambda name, store=store: _merged_tensor(plan, jobs, name, store, seed)  # noqa: E731
            with ref.loaded(layer, source=source) as merged:
                hidden = [ref.run_layer(merged, h, kw[index]) for h, kw in zip(hidden, kwargs)]
        for i, model in enumerate(models):
            if model.tied:
                continue
            with model.loaded(model.base.norm) as norm:
                total = torch.zeros(model.head.in_features, model.head.in_features, dtype=torch.float64)
                for h in hidden:
                    x = norm(h).reshape(-1, h.shape[-1]).to(torch.float64)
                    total += x.T @ x
            outs[i].write(model.head_name, total.to(torch.float32))
