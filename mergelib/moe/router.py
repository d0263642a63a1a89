"""Router rows of an MoE built from dense experts (mergekit-moe's gate modes; mergekit-semantics.md section 2(b)).

`hidden`: each layer's row for an expert is the base model's residual-stream state entering that layer at the last
token, averaged over the expert's positive prompts, minus the same over its negative prompts, L2-normalised
(`hidden_avg` averages over the tokens instead). `cheap_embed`: the normalised sum of the prompts' token
embeddings, the same row for every layer. Unlike mergekit, `hidden_avg` averages over real tokens only (mergekit's
mean includes the padding of shorter prompts in a batch), and states are taken in the model's dtype, not bfloat16.
The same rows serve every output: DeepSeek-V3 scores experts with a sigmoid of the row dot products instead of a
softmax, and both are increasing, so the experts rank in the same order.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from mergelib.errors import InputModelError
from mergelib.merging.rng import generator_for
from mergelib.moe.config import GATED_SHARED, Expert, MoEConfig


def unit(rows: torch.Tensor) -> torch.Tensor:
    """Rows scaled to L2 norm 1 (a zero row stays zero)."""
    return rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-8)


def encode(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Token ids of each prompt as the model sees it at inference (the tokenizer's special tokens included)."""
    return [list(tokenizer(p)["input_ids"]) for p in prompts]


def _batches(ids: list[list[int]], pad_id: int, batch_size: int):
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        width = max(len(x) for x in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # right padding: positions unchanged
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, seq in enumerate(chunk):
            input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        yield input_ids, mask


@torch.no_grad()
def layer_states(model, tokenizer, prompts: list[str], *, average_tokens: bool = False,
                 batch_size: int = 16) -> torch.Tensor:
    """(num_layers, hidden) float32: the state entering each layer, at the last token (or averaged over tokens),
    averaged over `prompts`; computed in batches of `batch_size` prompts."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total = None
    ids = encode(tokenizer, prompts)
    if any(not seq for seq in ids):
        raise InputModelError("a prompt encodes to no tokens; give it some text")
    for input_ids, mask in _batches(ids, pad_id, batch_size):
        out = model.base_model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
        states = torch.stack(out.hidden_states[:-1]).float()  # (layers, batch, tokens, hidden); last is post-norm
        if average_tokens:
            weights = mask.to(states.dtype)[None, :, :, None]  # (1, batch, tokens, 1)
            picked = (states * weights).sum(dim=2) / weights.sum(dim=2)  # (layers, batch, hidden)
        else:
            last = (mask.sum(dim=1) - 1)[None, :, None, None].expand(states.shape[0], -1, 1, states.shape[-1])
            picked = states.gather(2, last).squeeze(2)  # (layers, batch, hidden)
        batch_sum = picked.sum(dim=1)
        total = batch_sum if total is None else total + batch_sum
    return total / len(prompts)


def embed_direction(embed: torch.Tensor, tokenizer, prompts: list[str]) -> torch.Tensor:
    """(hidden,) float32: the normalised sum of the embedding rows of every token of every prompt."""
    flat = [i for seq in encode(tokenizer, prompts) for i in seq]
    if not flat:
        raise InputModelError("the prompts encode to no tokens; give them some text")
    rows = embed.float()[torch.tensor(flat, dtype=torch.long)]  # (tokens, hidden)
    return unit(rows.sum(dim=0))


def random_rows(seed: int, mode: str, num_layers: int, n_rows: int, hidden: int) -> torch.Tensor:
    """(num_layers, n_rows, hidden): N(0, 1) for `random`; U(-1/sqrt(hidden), 1/sqrt(hidden)), nn.Linear's default
    init, for `uniform_random`. Seeded per layer, so a layer's rows do not depend on the layer count."""
    out = torch.empty(num_layers, n_rows, hidden)
    bound = 1.0 / math.sqrt(hidden)
    for layer in range(num_layers):
        gen = generator_for(seed, f"moe/router/{mode}/{layer}")
        if mode == "random":
            out[layer] = torch.randn(n_rows, hidden, generator=gen)
        else:
            out[layer] = (torch.rand(n_rows, hidden, generator=gen) * 2 - 1) * bound
    return out


def gate_vectors(config: MoEConfig, base_dir: Path, *, num_layers: int, hidden: int, seed: int = 0,
                 batch_size: int = 16, embed: torch.Tensor | None = None) -> torch.Tensor:
    """(num_layers, experts + gated shared experts, hidden) float32 router rows, in `experts` then `shared_experts`
    order; a shared expert gets a row only where the output gates it (Qwen2-MoE, not DeepSeek-V3). `embed` (the
    base's input embedding) is needed for `cheap_embed` only."""
    shared = config.shared_experts if config.output_architecture in GATED_SHARED else []
    group: list[Expert] = [*config.experts, *shared]
    mode = config.gate_mode
    if mode in ("random", "uniform_random"):
        return random_rows(seed, mode, num_layers, len(group), hidden)
    tokenizer = _tokenizer(base_dir)
    if mode == "cheap_embed":
        if embed is None:
            raise InputModelError(f"{base_dir}: no input embedding found for gate_mode cheap_embed")
        rows = []
        for expert in group:
            vec = embed_direction(embed, tokenizer, expert.positive_prompts)
            if expert.negative_prompts:
                vec = vec - embed_direction(embed, tokenizer, expert.negative_prompts)
            rows.append(unit(vec))
        return torch.stack(rows)[None].expand(num_layers, -1, -1).clone()  # (layers, experts, hidden)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto")
    model.eval()
    average = mode == "hidden_avg"
    rows = []
    for expert in group:
        vec = layer_states(model, tokenizer, expert.positive_prompts, average_tokens=average, batch_size=batch_size)
        if expert.negative_prompts:
            vec = vec - layer_states(model, tokenizer, expert.negative_prompts, average_tokens=average,
                                     batch_size=batch_size)
        rows.append(unit(vec))  # (layers, hidden)
    del model
    gates = torch.stack(rows, dim=1)  # (layers, experts, hidden)
    if gates.shape[0] != num_layers:
        raise InputModelError(f"{base_dir}: the model returned {gates.shape[0]} layer states, expected {num_layers}")
    return gates


def degenerate_layers(gates: torch.Tensor, threshold: float = 5.0) -> list[int]:
    """Layers whose routed-expert rows are nearly linearly dependent (condition number above `threshold`):
    their prompts are too alike, and some experts will rarely be chosen."""
    return [i for i in range(gates.shape[0]) if gates.shape[1] > 1 and torch.linalg.cond(gates[i]).item() > threshold]


def _tokenizer(base_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(base_dir)
    except (OSError, ValueError) as exc:
        raise InputModelError(
            f"{base_dir}: cannot load the base model's tokenizer ({exc}); prompt-based gate modes need it"
        ) from None
