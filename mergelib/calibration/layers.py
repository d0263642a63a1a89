"""A transformers causal LM run one piece at a time: the skeleton is built on the meta device from config.json and
each piece (embeddings, one decoder layer, final norm, head) is materialised from the checkpoint only while it is
used (`to_empty` + our lazy reader), in float32. The keyword arguments every decoder layer receives (position
embeddings, attention mask) are recorded by running the base model over recorder layers, so any architecture's own
mask and rotary logic is used unchanged."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from mergelib.errors import InputModelError
from mergelib.io.reader import read_tensor


class _Recorder(nn.Module):
    """Stands in for a decoder layer: records the keyword arguments it is called with, passes hidden states on."""

    def __init__(self, layer: nn.Module, calls: list):
        super().__init__()
        self.calls = calls
        if hasattr(layer, "attention_type"):  # models with per-layer masks (sliding/full) read it
            self.attention_type = layer.attention_type

    def forward(self, hidden_states, *args, **kwargs):
        self.calls.append(kwargs)
        return hidden_states


class LayerwiseModel:
    """One input model (`mergelib.merging.plan.InputModel`), run piece by piece."""

    def __init__(self, model):
        self.label = model.label
        self.tensors = model.index.tensors
        config = AutoConfig.from_pretrained(model.path)
        with torch.device("meta"):
            try:
                self.skeleton = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
            except (ValueError, KeyError) as exc:
                raise InputModelError(f"model '{model.label}': transformers cannot build it to gather calibration "
                                      f"statistics ({exc}); give precomputed statistics instead") from None
        self.config = self.skeleton.config
        self.base = self.skeleton.get_decoder()
        self.layers = self.base.layers
        self.prefix = {id(m): (name + "." if name else "") for name, m in self.skeleton.named_modules()}
        self.embed = self.skeleton.get_input_embeddings()
        self.head = self.skeleton.get_output_embeddings()
        self.head_name = self.prefix[id(self.head)] + "weight"
        self.embed_name = self.prefix[id(self.embed)] + "weight"
        self.tied = self.head_name not in self.tensors  # the head reads the embedding matrix
        rotary = type(self.base.rotary_emb)
        self.base.rotary_emb = rotary(config=self.config)  # its buffers are computed, not stored: build on the CPU

    def tensor_names(self, module: nn.Module) -> list[str]:
        """Checkpoint names of the parameters of `module` (a piece of the skeleton)."""
        return [self.prefix[id(module)] + name for name, _ in module.named_parameters()]

    @contextmanager
    def loaded(self, module: nn.Module, requires_grad: bool = False, source=None):
        """`module` with its weights (float32) for the duration of the block: read from the checkpoint, or given by
        `source(name)` (RegMean++ runs merged layers)."""
        module.to_empty(device="cpu")
        prefix = self.prefix[id(module)]
        for name, param in module.named_parameters():
            full = prefix + name
            if full not in self.tensors and full == self.head_name and self.tied:
                full = self.embed_name
            if source is None and full not in self.tensors:
                raise InputModelError(f"model '{self.label}': tensor '{full}' is missing from the checkpoint")
            value = source(full) if source is not None else read_tensor(full, self.tensors[full])
            with torch.no_grad():
                param.copy_(value.to(torch.float32))
            param.requires_grad_(requires_grad)
        try:
            yield module
        finally:
            module.to("meta")  # drop the weights

    def layer_kwargs(self, hidden: torch.Tensor) -> list[dict]:
        """The keyword arguments each decoder layer receives for hidden states shaped like `hidden` [1, T, H]."""
        calls: list[dict] = []
        layers, norm = self.base.layers, self.base.norm
        self.base.layers = nn.ModuleList([_Recorder(layer, calls) for layer in layers])
        self.base.norm = nn.Identity()
        try:
            with torch.no_grad():
                self.base(inputs_embeds=hidden, use_cache=False)
        finally:
            self.base.layers, self.base.norm = layers, norm
        return [{k: v for k, v in kw.items() if k not in ("cache", "past_key_values")} for kw in calls]

    @staticmethod
    def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        out = layer(hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def linear_modules(self, module: nn.Module) -> dict[str, nn.Linear]:
        """Checkpoint weight name -> every nn.Linear inside `module`, in module order."""
        return {self.prefix[id(m)] + "weight": m for m in module.modules() if isinstance(m, nn.Linear)}
